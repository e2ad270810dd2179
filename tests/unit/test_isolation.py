"""One bad request never harms another (issue 15, defect 1): the engine refuses it alone at admission, and a
request whose own sampling work fails inside a step ends alone while the step goes on for the others."""
from __future__ import annotations

import pytest

from kiln.engine.config import EngineConfig
from kiln.engine.core import EngineCore
from kiln.engine.request import PENDING_TOKEN, SamplingParams
from tests.helpers.tiny_models import write_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model("llama", tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def core(request, model_dir):
    return EngineCore(EngineConfig(model=str(model_dir), dtype="float32", block_size=16, num_gpu_blocks=64,
                                   max_num_seqs=16, max_num_batched_tokens=64, async_scheduling=request.param))


HEALTHY = [(f"ok{i}", [1 + i, 2, 3, 4 + i], SamplingParams(max_tokens=6, temperature=0.8 if i % 2 else 0.0,
                                                             top_k=5 if i % 3 == 0 else 0, seed=i, ignore_eos=True))
           for i in range(8)]


def run(core, extra=()):
    """Admit the healthy requests (and `extra` (id, prompt, params) ones after the first step); step until done."""
    for rid, prompt, sp in HEALTHY:
        assert core.add_request(rid, prompt, sp) is None
    outs = {rid: [] for rid, _, _ in HEALTHY}
    reasons, rejected = {}, {}
    first = True
    while core.has_unfinished():
        for o in core.step():
            assert PENDING_TOKEN not in o.new_token_ids
            outs.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.finished:
                assert o.request_id not in reasons
                reasons[o.request_id] = (o.finish_reason, o.error_type, o.error)
        if first:
            first = False
            for rid, prompt, sp in extra:
                err = core.add_request(rid, prompt, sp)
                if err is not None:
                    rejected[rid] = err
    assert core.kv.num_free_blocks == core.kv.num_blocks
    assert not core.requests and not core.scheduler.running and not core.scheduler.waiting
    return outs, reasons, rejected


def poisoned(**fields) -> SamplingParams:
    """Valid at construction, then corrupted, as a request from a foreign or buggy client arrives."""
    sp = SamplingParams(max_tokens=6, temperature=0.7)
    for k, v in fields.items():
        setattr(sp, k, v)
    return sp


def test_bad_requests_are_refused_alone_at_admission(core):
    baseline, base_reasons, _ = run(core)
    bad = [("big_top_k", [5, 6], poisoned(top_k=2**63)),
           ("neg_stop", [5, 6], poisoned(stop_token_ids=[-5000], min_tokens=2)),
           ("big_stop", [5, 6], poisoned(stop_token_ids=[10**9], min_tokens=2)),
           ("huge_seed", [5, 6], poisoned(seed=2**64)),
           ("nan_temp", [5, 6], poisoned(temperature=float("nan"))),
           ("str_max", [5, 6], poisoned(max_tokens="10")),
           ("neg_prompt", [-1, 5], SamplingParams(max_tokens=4))]
    outs, reasons, rejected = run(core, bad)
    assert set(rejected) == {rid for rid, _, _ in bad}
    for rid, err in rejected.items():
        assert err.finished and err.finish_reason == "error" and err.error_type == "invalid", rid
    assert "top_k" in rejected["big_top_k"].error
    assert "stop_token_ids" in rejected["neg_stop"].error
    assert "vocabulary" in rejected["big_stop"].error
    # the healthy ones are untouched: same tokens as without the bad ones (greedy and seeded alike)
    assert {k: outs[k] for k in baseline} == baseline
    assert reasons == base_reasons and all(r[0] == "length" for r in reasons.values())


def test_eos_ids_outside_the_vocabulary_are_refused(core):
    err = core.add_request("bad_eos", [1, 2], SamplingParams(max_tokens=2), [-3])
    assert err is not None and err.error_type == "invalid" and "eos_token_ids" in err.error
    assert not core.requests


def test_a_failure_in_one_requests_sampling_ends_only_that_request(core):
    baseline, _, _ = run(core)
    # admitted healthy, then its state goes bad mid-run (what admission cannot see): the sampler's per-request
    # work fails for it alone
    sp = SamplingParams(max_tokens=6, min_tokens=4, temperature=0.0)
    assert core.add_request("victim", [7, 8, 9], sp) is None
    core.requests["victim"].stop_token_set = frozenset({-5000})
    outs, reasons, _ = run(core)
    assert reasons["victim"][:2] == ("error", "internal")
    assert "-5000" not in reasons["victim"][2] and "index" not in reasons["victim"][2]  # no internals leak
    assert {k: outs[k] for k in baseline} == baseline
    assert all(reasons[k][0] == "length" for k in baseline)


def test_engine_process_refuses_a_poisoned_request_sent_past_the_front_end(model_dir):
    """The engine process on its socket: 8 healthy streams run while poisoned requests arrive straight from a
    client (no front-end validation); the poisoned ones get an error output, the 8 finish untouched."""
    import asyncio

    from kiln.engine.client import AsyncEngineClient
    from kiln.engine.core import launch_engine_core
    from tests.helpers.ports import free_port
    addr = f"tcp://127.0.0.1:{free_port()}"
    secret = "isolation-test"
    proc = launch_engine_core(EngineConfig(model=str(model_dir), dtype="float32", block_size=16, num_gpu_blocks=64,
                                           max_num_seqs=16), addr, secret)

    async def collect(c, rid, prompt, sp):
        toks, last = [], None
        async for out in c.generate(rid, prompt, sp):
            toks += out.new_token_ids
            last = out
        return toks, last

    async def main():
        c = AsyncEngineClient(addr, secret)
        await c.start()
        await c.wait_ready(120)
        alone = [await collect(c, f"a{i}", p, sp) for i, (_, p, sp) in enumerate(HEALTHY)]
        healthy = [asyncio.ensure_future(collect(c, f"h{i}", p, sp)) for i, (_, p, sp) in enumerate(HEALTHY)]
        await asyncio.sleep(0.2)
        bad = await asyncio.gather(collect(c, "p1", [5, 6], poisoned(top_k=2**63)),
                                   collect(c, "p2", [5, 6], poisoned(stop_token_ids=[-5000], min_tokens=3)))
        together = await asyncio.gather(*healthy)
        await c.close()
        return alone, together, bad

    try:
        alone, together, bad = asyncio.run(asyncio.wait_for(main(), 300))
    finally:
        proc.terminate()
        proc.join(10)
    for toks, last in bad:
        assert toks == [] and last.finish_reason == "error" and last.error_type == "invalid", last
    assert [t for t, _ in together] == [t for t, _ in alone]
    assert all(last.finish_reason == "length" for _, last in together)
