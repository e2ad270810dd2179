"""The front-end benchmark's fake engine path end to end (benchmarks/frontend_bench.py: a fake engine core on the
real wire protocol, one real HTTP worker, many streams), and PUSH_MODE_HTTP_WORKERS' effective default.
No timing assertions: the figures live in docs/benchmarks.md."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from kiln.config import KilnConfig

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "frontend_bench.py"


def _bench():
    # imported by name, so that its processes (spawned) find their functions
    if str(BENCH.parent) not in sys.path:
        sys.path.insert(0, str(BENCH.parent))
    import frontend_bench
    return frontend_bench


@pytest.mark.parametrize("api", ["openai", "native"])
def test_fake_engine_streams_reach_the_client(api):
    r = _bench().run(api=api, streams=8, step_ms=10, seconds=1.5, warmup=1.0, max_tokens=20)
    # every event the client counted was a token the fake engine sent through the worker
    assert r["events"] > 0
    assert r["engine_tok_s"] > 0
    assert r["worker_cpu_s"] > 0


def test_http_workers_default_follows_the_device_and_an_explicit_value_wins(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(32)))
    auto = KilnConfig.load({"BATCH_SIZE": "256"})
    assert auto.push_mode_http_workers is None
    assert auto.http_workers(on_gpu=False) == 1
    # 256 streams x 125 tokens/s = 32,000 events/s, twice over, at 20,000 a worker
    assert auto.http_workers(on_gpu=True) == 4
    assert KilnConfig.load({"BATCH_SIZE": "8"}).http_workers(on_gpu=True) == 2
    assert KilnConfig.load({}).http_workers(on_gpu=True) == 2  # the default BATCH_SIZE (50)
    explicit = KilnConfig.load({"BATCH_SIZE": "256", "PUSH_MODE_HTTP_WORKERS": "1"})
    assert explicit.http_workers(on_gpu=True) == 1
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: {0, 1})
    assert auto.http_workers(on_gpu=True) == 1  # never more workers than half the cores
