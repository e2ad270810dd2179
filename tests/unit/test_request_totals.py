"""The engine's request totals (KServe's model statistics, kiln.server.kserve.model_statistics): what ended well,
what failed, where the time went, and steps as executions; the warm-up's requests are not counted."""
from __future__ import annotations

import time

import pytest

from kiln.engine.config import EngineConfig
from kiln.engine.core import EngineCore
from kiln.engine.request import SamplingParams
from kiln.server.kserve import model_statistics
from tests.helpers.tiny_models import write_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model("llama", tmp_path_factory.mktemp("llama"))


def drain(core: EngineCore) -> None:
    while core.has_unfinished():
        core.step()


def test_totals_count_endings_and_their_times(model_dir):
    core = EngineCore(EngineConfig(model=str(model_dir), dtype="float32", block_size=16, num_gpu_blocks=64,
                                   max_num_seqs=4, warmup=True))
    assert core.stats().requests["succeeded"] == 0 and core.stats().num_warmup_steps == core.num_steps > 0
    before = time.time()
    sp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    for rid in ("a", "b"):
        assert core.add_request(rid, [5, 6, 7], sp) is None
    assert core.add_request("c", [5, 6, 7], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)) is None
    core.step()
    core.abort(["c"])                       # a client's cancel (or a stop string): an ending, not a failure
    drain(core)
    assert core.add_request("too-long", [5] * 5000, sp) is not None  # refused at admission: a failure
    stats = core.stats()
    t = stats.requests
    assert (t["succeeded"], t["failed"]) == (3, 1)
    assert 0 < t["queue_seconds"] <= t["success_seconds"] and t["fail_seconds"] == 0
    assert t["last_end_time"] >= before

    m = model_statistics(stats)["model_stats"][0]
    inf = m["inference_stats"]
    assert (m["name"], m["version"], m["inference_count"]) == ("model", "1", 3)
    assert m["execution_count"] == core.num_steps - core.num_warmup_steps > 0
    assert inf["success"] == {"count": 3, "ns": int(t["success_seconds"] * 1e9)}
    assert inf["fail"]["count"] == 1
    assert inf["queue"]["ns"] + inf["compute_infer"]["ns"] == pytest.approx(inf["success"]["ns"], abs=2)
    assert m["last_inference"] == int(t["last_end_time"] * 1000)


def test_statistics_before_the_engine_reports():
    m = model_statistics(None)["model_stats"][0]
    assert m["inference_count"] == m["execution_count"] == 0 and m["inference_stats"]["success"]["count"] == 0
