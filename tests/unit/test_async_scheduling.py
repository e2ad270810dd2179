"""Async scheduling (step N+1 queued before step N's ids reach the host) gives exactly what synchronous
stepping gives: same tokens, finish reasons and logprobs, every block back. Forced on here, on the CPU, where
the same code paths run (in-flight tokens read on the device, one-step-late outputs, dropped extra tokens)."""
from __future__ import annotations

import random

import pytest

from kiln.engine.config import EngineConfig
from kiln.engine.core import EngineCore
from kiln.engine.request import PENDING_TOKEN, SamplingParams
from tests.helpers.tiny_models import write_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model("llama", tmp_path_factory.mktemp("llama"))


def make_core(model_dir, async_scheduling, **kw):
    cfg = dict(model=str(model_dir), dtype="float32", block_size=16, num_gpu_blocks=64, max_num_seqs=8,
               max_num_batched_tokens=48, async_scheduling=async_scheduling)
    cfg.update(kw)
    return EngineCore(EngineConfig(**cfg))


def drain(core, requests, abort_at=None):
    """Submit (id, prompt, params) and step until done. abort_at: {id: number of tokens after which to abort}."""
    abort_at = dict(abort_at or {})
    for rid, prompt, sp in requests:
        assert core.add_request(rid, prompt, sp) is None
    toks = {rid: [] for rid, _, _ in requests}
    lps = {rid: [] for rid, _, _ in requests}
    reasons = {}
    steps = 0
    while core.has_unfinished():
        steps += 1
        assert steps < 10_000, "the engine did not finish"
        for o in core.step():
            assert o.request_id not in reasons, f"{o.request_id} got output after it finished"
            assert PENDING_TOKEN not in o.new_token_ids
            toks[o.request_id] += o.new_token_ids
            lps[o.request_id] += o.logprobs or []
            if o.finished:
                reasons[o.request_id] = o.finish_reason
        for rid, n in list(abort_at.items()):
            if len(toks[rid]) >= n and rid not in reasons:
                for o in core.abort([rid]):
                    reasons[o.request_id] = o.finish_reason
                del abort_at[rid]
    assert set(reasons) == set(toks)
    assert core.kv.num_free_blocks == core.kv.num_blocks
    assert not core.requests and not core.scheduler.running and not core.scheduler.waiting
    return toks, reasons, lps


def mixed_workload(seed: int, stop_ids: dict[str, int] | None = None):
    rnd = random.Random(seed)
    out = []
    for i in range(12):
        rid = f"r{i}"
        prompt = [rnd.randrange(3, 500) for _ in range(rnd.randrange(1, 70))]
        kind = i % 4
        if kind == 0:
            sp = SamplingParams(max_tokens=rnd.randrange(1, 40), temperature=0, ignore_eos=True)
        elif kind == 1:
            sp = SamplingParams(max_tokens=rnd.randrange(1, 40), temperature=1.2, top_p=0.9, seed=100 + i,
                                ignore_eos=True, logprobs=2)
        elif kind == 2:  # stops on a token id it is known to produce (taken from a first run), after min_tokens
            sp = SamplingParams(max_tokens=40, temperature=0, min_tokens=2,
                                stop_token_ids=[stop_ids[rid]] if stop_ids and rid in stop_ids else [])
        else:
            sp = SamplingParams(max_tokens=rnd.randrange(1, 40), temperature=0.8, top_k=20, seed=7 * i,
                                ignore_eos=True, logprobs=0)
        out.append((rid, prompt, sp))
    return out


def stop_ids_from(toks) -> dict[str, int]:
    return {rid: t[5] for rid, t in toks.items() if len(t) > 5}


@pytest.mark.parametrize("cache", [dict(), dict(num_gpu_blocks=9, kv_reserve_ratio=0.0),  # greedy: preemptions
                                   dict(max_num_batched_tokens=20)],
                         ids=["roomy", "preempting", "chunked"])
def test_async_matches_sync(model_dir, cache):
    sync_core = make_core(model_dir, False, **cache)
    async_core = make_core(model_dir, True, **cache)
    first, _, _ = drain(sync_core, mixed_workload(0))
    work = mixed_workload(0, stop_ids_from(first))
    ref = drain(sync_core, work)
    got = drain(async_core, work)
    assert got[0] == ref[0]
    assert got[1] == ref[1]
    for rid in ref[2]:
        assert len(got[2][rid]) == len(ref[2][rid])
        for (c1, top1), (c2, top2) in zip(got[2][rid], ref[2][rid]):
            assert c1 == pytest.approx(c2, abs=1e-5)
            assert [t for t, _ in top1] == [t for t, _ in top2]
    # the workload did exercise what it is meant to
    assert "stop" in ref[1].values() and "length" in ref[1].values()
    assert async_core.num_overlapped_steps > 0 and sync_core.num_overlapped_steps == 0
    if "num_gpu_blocks" in cache:
        assert async_core.scheduler.num_preemptions > 0


def test_async_with_prefix_cache_hits(model_dir):
    shared = list(range(3, 53))  # 3 full blocks shared by every prompt
    work = [(f"p{i}", shared + [100 + i] * (i + 1), SamplingParams(max_tokens=12 + i, temperature=0, ignore_eos=True))
            for i in range(6)]
    ref = drain(make_core(model_dir, False), work)
    core = make_core(model_dir, True)
    got = drain(core, work[:1])
    got2 = drain(core, work[1:])
    assert {**got[0], **got2[0]} == ref[0]
    assert core.kv.num_cached_hits >= 5 * 48


def test_penalties_make_steps_synchronous_and_stay_exact(model_dir):
    rnd = random.Random(3)
    work = [(f"q{i}", [rnd.randrange(3, 500) for _ in range(10)],
             SamplingParams(max_tokens=20, temperature=0, ignore_eos=True,
                            repetition_penalty=1.3 if i == 2 else 1.0, frequency_penalty=0.5 if i == 3 else 0.0))
            for i in range(5)]
    ref = drain(make_core(model_dir, False), work)
    core = make_core(model_dir, True)
    got = drain(core, work)
    assert got[0] == ref[0] and got[1] == ref[1]


def test_a_penalised_request_arriving_beside_a_token_in_flight(model_dir):
    """A request with penalties admitted by a step that overlaps another request's in-flight token: its penalties
    read only its own output (the other row's in-flight token cannot be read; it once failed the whole step)."""
    rnd = random.Random(5)
    first = ("a", [rnd.randrange(3, 500) for _ in range(10)], SamplingParams(max_tokens=12, temperature=0,
                                                                           ignore_eos=True))
    late = ("b", [rnd.randrange(3, 500) for _ in range(10)], SamplingParams(max_tokens=8, temperature=0,
                                                                          ignore_eos=True, presence_penalty=1.5,
                                                                          repetition_penalty=1.3))
    ref = drain(make_core(model_dir, False), [first, late])
    core = make_core(model_dir, True)
    assert core.add_request(*first) is None
    for _ in range(3):
        core.step()
    assert core.inflight is not None and core.requests["a"].num_pending_tokens == 1
    assert core.add_request(*late) is None
    toks = {"a": [], "b": []}
    while core.has_unfinished():
        for o in core.step():
            assert o.error is None, o.error
            toks[o.request_id] += o.new_token_ids
    assert toks["b"] == ref[0]["b"] and len(toks["a"]) + 2 >= 12  # "a"'s first tokens came in the steps above


def test_abort_while_a_step_is_in_flight(model_dir):
    work = [(f"a{i}", [5 + i, 6, 7, 8], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
            for i in range(4)]
    ref, _, _ = drain(make_core(model_dir, False), work)
    core = make_core(model_dir, True)
    got, reasons, _ = drain(core, work, abort_at={"a1": 3, "a2": 10})
    assert reasons == {"a0": "length", "a1": "abort", "a2": "abort", "a3": "length"}
    for rid in ("a1", "a2"):
        assert got[rid] == ref[rid][:len(got[rid])] and len(got[rid]) < 30
    assert got["a0"] == ref["a0"] and got["a3"] == ref["a3"]


def test_auto_is_on_with_cuda_only_and_tokens_come_one_step_late_when_on(model_dir):
    auto = make_core(model_dir, None)
    assert auto.async_scheduling is (auto.runner.device.type == "cuda")
    core = make_core(model_dir, True)
    core.add_request("x", [9, 8, 7], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert core.step() == []          # the prefill is queued; its token is collected with the next step
    assert core.inflight is not None
    outs = core.step()
    assert [o.request_id for o in outs] == ["x"] and len(outs[0].new_token_ids) == 1
    n = 1
    while core.has_unfinished():
        n += sum(len(o.new_token_ids) for o in core.step())
    assert n == 3 and core.kv.num_free_blocks == core.kv.num_blocks
