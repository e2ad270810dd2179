"""Tensor-parallel state: rank, world size, the collectives the sharded layers need, and the host group that
carries each step's inputs from rank 0 to the other ranks."""
from __future__ import annotations

import torch
import torch.distributed as dist

_tp_rank = 0
_tp_size = 1
_host_group = None  # gloo group for host tensors when the default group is NCCL (None: the default group)


def init_tensor_parallel(rank: int, world_size: int, init_method: str, backend: str) -> None:
    global _tp_rank, _tp_size, _host_group
    _tp_rank, _tp_size = rank, world_size
    if world_size > 1:
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)
        # step inputs go host to host: over NCCL a worker would first have to wait for its GPU to read them
        _host_group = dist.new_group(backend="gloo") if backend == "nccl" else None


def destroy_tensor_parallel() -> None:
    global _tp_rank, _tp_size, _host_group
    if _tp_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
    _tp_rank, _tp_size, _host_group = 0, 1, None


def tp_rank() -> int:
    return _tp_rank


def tp_size() -> int:
    return _tp_size


def host_group():
    return _host_group


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _tp_size > 1:
        dist.all_reduce(x)
    return x


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    if _tp_size > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    if _tp_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_tp_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)
