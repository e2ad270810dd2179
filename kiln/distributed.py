"""Tensor-parallel state: rank, world size and the all-reduce the row-parallel layers need."""
from __future__ import annotations

import torch
import torch.distributed as dist

_tp_rank = 0
_tp_size = 1


def init_tensor_parallel(rank: int, world_size: int, init_method: str, backend: str) -> None:
    global _tp_rank, _tp_size
    _tp_rank, _tp_size = rank, world_size
    if world_size > 1:
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)


def destroy_tensor_parallel() -> None:
    global _tp_rank, _tp_size
    if _tp_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
    _tp_rank, _tp_size = 0, 1


def tp_rank() -> int:
    return _tp_rank


def tp_size() -> int:
    return _tp_size


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _tp_size > 1:
        dist.all_reduce(x)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    if _tp_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_tp_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)
