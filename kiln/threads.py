"""CPU threads per process: the engine gets the compute threads, every other process (HTTP workers, gRPC,
metrics, supervisor) one.

Thread pools read their size when the library loads (OpenMP, MKL, OpenBLAS) or at first use (tokenizers'
Rayon pool), so `configure_threads` is called first thing in each child process, before torch, numpy or
tokenizers are imported; if torch is already loaded its pool is resized as well.

Why it matters on small machines: two processes each running one OpenMP thread per core make every parallel
region wait for a thread that the other process has pre-empted; on 2 cores that cost the engine ~8x.
"""
from __future__ import annotations

import os
import sys

ENGINE = "engine"

_POOL_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. under taskset or a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def engine_threads(setting: int | None) -> int:
    """KILN_ENGINE_THREADS, or auto (None): every core this process may use."""
    return setting if setting else usable_cores()


def configure_threads(role: str, engine_setting: int | None = None) -> int:
    """Size this process's thread pools for its role; returns the thread count. The engine gets
    `engine_threads(engine_setting)`, every other role one thread and no tokenizer parallelism."""
    n = engine_threads(engine_setting) if role == ENGINE else 1
    for var in _POOL_VARS:
        os.environ[var] = str(n)
    if role == ENGINE:
        # idle OpenMP workers sleep instead of spinning: a spinning pool steals the core that the front ends
        # (or anything else on the machine) need, and a stolen core stalls the engine's next parallel region
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    else:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(n)
    return n
