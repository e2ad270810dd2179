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
