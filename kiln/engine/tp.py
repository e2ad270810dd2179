"""Tensor parallelism (MP_NUM): ranks 1..N-1 are worker processes that replay each step of rank 0.

Rank 0 (the engine core) schedules and samples; every step it broadcasts the step's host inputs, then all ranks
run the sharded model in lockstep (all-reduce after row-parallel layers, all-gather of the logits). NCCL on GPUs,
gloo on CPU (which is how CI tests it).
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import socket

import torch
import torch.distributed as dist

from kiln import distributed as tpd
from kiln.engine.config import EngineConfig

log = logging.getLogger("kiln.tp")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend(cfg: EngineConfig) -> str:
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    return "nccl" if cuda else "gloo"


def _bind_device(rank: int, backend: str) -> None:
    if backend == "nccl":
        torch.cuda.set_device(rank)


def build_runner(cfg: EngineConfig, model_dir: str):
    """Same sequence of collectives on every rank: load, size the cache (min over ranks), allocate, capture."""
    from kiln.engine.runner import ModelRunner
    runner = ModelRunner(cfg, model_dir)
    max_len = runner.max_model_len()
    n, why = runner.decide_num_blocks(max_len)
    if tpd.tp_size() > 1:
        t = torch.tensor([n], dtype=torch.long, device=runner.device if _backend(cfg) == "nccl" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        n = int(t.item())
    runner.allocate_kv_cache(n)
    runner.capture_cuda_graphs(max_len)
    return runner, n, why


class TPGroup:
    def __init__(self, cfg: EngineConfig, model_dir: str):
        self.size = cfg.tensor_parallel_size
        backend = _backend(cfg)
        if backend == "nccl" and torch.cuda.device_count() < self.size:
            raise RuntimeError(f"MP_NUM={self.size} needs {self.size} GPUs, {torch.cuda.device_count()} visible")
        init = f"tcp://127.0.0.1:{_free_port()}"
        ctx = mp.get_context("spawn")
        self.procs = [ctx.Process(target=tp_worker_main, args=(cfg, model_dir, r, init), daemon=True,
                                  name=f"kiln-tp-rank{r}") for r in range(1, self.size)]
        for p in self.procs:
            p.start()
        _bind_device(0, backend)
        tpd.init_tensor_parallel(0, self.size, init, backend)
        log.info("tensor parallel: %d ranks over %s", self.size, backend)

    def broadcast_step(self, inputs) -> None:
        dist.broadcast_object_list([("step", inputs)], src=0)

    def shutdown(self) -> None:
        try:
            dist.broadcast_object_list([("stop", None)], src=0)
        except Exception:  # noqa: BLE001 - a rank may already be gone
            pass
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.terminate()
        tpd.destroy_tensor_parallel()


def tp_worker_main(cfg: EngineConfig, model_dir: str, rank: int, init: str) -> None:
    backend = _backend(cfg)
    _bind_device(rank, backend)
    tpd.init_tensor_parallel(rank, cfg.tensor_parallel_size, init, backend)
    runner, _, _ = build_runner(cfg, model_dir)
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0)
        kind, inputs = box[0]
        if kind == "stop":
            break
        runner.forward(inputs)
    tpd.destroy_tensor_parallel()
