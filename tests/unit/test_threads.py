"""Thread pools per process (kiln/threads.py) and the KILN_ENGINE_THREADS setting."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kiln.config import ConfigError, KilnConfig
from kiln.threads import usable_cores

CHILD = """
import os, sys
from kiln.threads import configure_threads
n = configure_threads(sys.argv[1], int(sys.argv[2]) or None)
import torch  # after the call, as in the server's child processes
print(n, torch.get_num_threads(), os.environ["OMP_NUM_THREADS"], os.environ.get("TOKENIZERS_PARALLELISM"))
"""


def _child(role: str, setting: int = 0) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", CHILD, role, str(setting)], capture_output=True, text=True,
                         env=env, timeout=120, check=True)
    return out.stdout.split()


def test_front_end_processes_get_one_thread():
    for role in ("http", "kiln.server.grpc_server", "kiln.server.metrics"):
        assert _child(role) == ["1", "1", "1", "false"]


def test_engine_gets_every_usable_core_or_the_setting():
    n = str(usable_cores())
    assert _child("engine")[:3] == [n, n, n]
    assert _child("engine", 1)[:3] == ["1", "1", "1"]


def test_usable_cores_follows_the_affinity():
    assert usable_cores() == len(os.sched_getaffinity(0))


def test_engine_threads_setting():
    assert KilnConfig.load({}).engine_threads is None
    assert KilnConfig.load({"KILN_ENGINE_THREADS": "auto"}).engine_threads is None
    assert KilnConfig.load({"KILN_ENGINE_THREADS": "2"}).engine_threads == 2
    with pytest.raises(ConfigError, match="KILN_ENGINE_THREADS"):
        KilnConfig.load({"KILN_ENGINE_THREADS": "two"})
    with pytest.raises(ConfigError, match="KILN_ENGINE_THREADS"):
        KilnConfig.load({"KILN_ENGINE_THREADS": "-1"})


def test_threads_for_leaves_the_cores_others_keep_busy():
    from kiln.threads import threads_for

    assert threads_for(2, 0.0) == 2
    assert threads_for(2, 0.3) == 2      # a front end streaming beside the engine: keep both
    assert threads_for(2, 0.7) == 1      # one core taken: one thread on the free one
    assert threads_for(2, 1.0) == 1
    assert threads_for(2, 5.0) == 1      # never zero
    assert threads_for(8, 2.2) == 6


def test_governor_follows_other_processes_and_the_step_size(monkeypatch):
    import torch

    from kiln import threads

    clock = {"t": 100.0, "busy": 0, "own": 0}
    monkeypatch.setattr(threads.time, "monotonic", lambda: clock["t"])
    monkeypatch.setattr(threads, "_busy_ticks", lambda cpus: clock["busy"])
    monkeypatch.setattr(threads, "_own_ticks", lambda: clock["own"])
    before = torch.get_num_threads()
    try:
        gov = threads.CoreShareGovernor(2)
        torch.set_num_threads(gov.applied)  # as configure_threads leaves it (a test worker may run fewer)
        monkeypatch.setattr(threads, "_governor", gov)
        hz = gov.hz

        def step(seconds, engine_cores, other_cores, tokens=8):
            clock["t"] += seconds
            clock["own"] += int(engine_cores * seconds * hz)
            clock["busy"] += int((engine_cores + other_cores) * seconds * hz)
            threads.follow_free_cores(tokens)
            return torch.get_num_threads()

        assert step(1.0, 1.9, 0.0) == 2                          # idle machine
        assert step(0.1, 1.9, 0.0, tokens=1) == 1                # a one-token step: one thread
        assert step(0.1, 1.9, 0.0) == 2
        assert step(1.0, 1.3, 0.7) == 1                          # another process takes a core
        assert step(0.2, 1.0, 0.0) == 1                          # polled within the period: no change
        assert step(1.0, 1.0, 1.0) == 1
        assert step(1.0, 1.0, 0.0) == 2                          # it stopped: both cores again
        # an explicit KILN_ENGINE_THREADS (or one core) means no governor at all
        monkeypatch.setattr(threads, "_governor", None)
        for var in threads._POOL_VARS + ("OMP_WAIT_POLICY",):  # restored after the test
            monkeypatch.delenv(var, raising=False)
        threads.configure_threads(threads.ENGINE, 2)
        assert threads._governor is None
    finally:
        torch.set_num_threads(before)

