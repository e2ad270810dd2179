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
import time

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
    global _governor
    _governor = CoreShareGovernor(n) if role == ENGINE and not engine_setting and n > 1 else None
    return n


# ----------------------------------------------------------------------------------------------------
# auto engine threads follow the cores other processes leave free
# ----------------------------------------------------------------------------------------------------

def threads_for(cores: int, others_busy: float) -> int:
    """Threads for the engine when other processes keep `others_busy` cores busy: the free cores, rounded,
    at least one. A parallel region runs at the pace of its slowest thread, so a thread that must share a
    core with another process's work slows the whole region more than the thread adds."""
    return max(1, min(cores, int(cores - others_busy + 0.5)))


def _busy_ticks(cpus: set[int]) -> int | None:
    """Busy clock ticks of the given CPUs since boot, from /proc/stat (None where there is none)."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    total = 0
    for line in lines:
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        v = [int(x) for x in rest.split()]
        # user nice system idle iowait irq softirq steal ...: busy = all but idle and iowait
        total += v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)
    return total


def _own_ticks() -> int | None:
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return int(fields[11]) + int(fields[12])  # utime + stime of every thread of this process
    except (OSError, IndexError, ValueError):
        return None


class CoreShareGovernor:
    """Auto engine threads on CPU (KILN_ENGINE_THREADS unset): every PERIOD_S, count the cores that other
    processes kept busy (the CPUs' busy time in /proc/stat minus this process's own) and run torch's pool on
    the rest. On 2 cores with one taken by another process, 2 threads make every parallel region wait for the
    thread that shares its core; 1 thread on the free core runs ~2x faster."""

    PERIOD_S = 1.0

    def __init__(self, max_threads: int):
        self.max_threads = max_threads
        self.threads = max_threads   # what the free cores allow
        self.applied = max_threads   # what torch's pool is set to now
        try:
            self.cpus = set(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            self.cpus = set(range(os.cpu_count() or 1))
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._last = (time.monotonic(), _busy_ticks(self.cpus), _own_ticks())

    def poll(self) -> int:
        now = time.monotonic()
        t0, busy0, own0 = self._last
        if now - t0 < self.PERIOD_S or busy0 is None or own0 is None:
            return self.threads
        busy, own = _busy_ticks(self.cpus), _own_ticks()
        self._last = (now, busy, own)
        if busy is None or own is None:
            return self.threads
        others = max(0.0, (busy - busy0) - (own - own0)) / self.hz / (now - t0)
        self.threads = threads_for(self.max_threads, others)
        return self.threads


_governor: CoreShareGovernor | None = None


# Steps of at most this many tokens run on one thread: each of their ~450 small ops would pay an OpenMP
# fork/join (a futex wake of the sleeping workers) worth more than the second core's help. Measured on the
# 2-core CI VM (docs/benchmarks.md, CPU): batch 1 decode 73 tok/s on one thread against 49 on two.
SMALL_STEP_TOKENS = 1


def follow_free_cores(step_tokens: int) -> None:
    """Called by the engine before each step on CPU: auto thread counts follow the free cores (read from /proc
    once a second) and the step's size."""
    if _governor is None:
        return
    n = 1 if step_tokens <= SMALL_STEP_TOKENS else _governor.poll()
    if n != _governor.applied:
        _governor.applied = n
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.set_num_threads(n)
