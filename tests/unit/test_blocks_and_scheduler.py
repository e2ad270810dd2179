"""Block accounting, prefix caching, admission and preemption (tiny random Llama, real engine steps)."""
from __future__ import annotations

import random

import pytest

from kiln.engine.config import EngineConfig
from kiln.engine.core import EngineCore
from kiln.engine.kv_cache import KVCacheManager
from kiln.engine.request import Request, SamplingParams
from kiln.errors import seed_message
from tests.helpers.tiny_models import write_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model("llama", tmp_path_factory.mktemp("llama"))


def make_core(model_dir, **kw):
    cfg = dict(model=str(model_dir), dtype="float32", block_size=16, num_gpu_blocks=12, max_num_seqs=6,
               max_num_batched_tokens=64)
    cfg.update(kw)
    return EngineCore(EngineConfig(**cfg))


def test_every_block_comes_back_after_finish_abort_and_preemption(model_dir):
    core = make_core(model_dir, kv_reserve_ratio=0.0)  # greedy admission: preemptions
    rnd = random.Random(0)
    finished, aborted = set(), set()
    for i in range(14):
        prompt = [rnd.randrange(1, 500) for _ in range(rnd.randrange(1, 60))]
        sp = SamplingParams(max_tokens=rnd.randrange(1, 50), temperature=rnd.choice([0, 1.0]), ignore_eos=True)
        assert core.add_request(f"q{i}", prompt, sp) is None
    step = 0
    while core.has_unfinished():
        for o in core.step():
            if o.finished:
                finished.add(o.request_id)
        step += 1
        if step % 7 == 0:
            live = sorted(core.requests)
            if live:
                victim = rnd.choice(live)
                assert core.abort([victim])[0].finish_reason == "abort"
                aborted.add(victim)
    assert core.scheduler.num_preemptions > 0
    assert aborted and finished and len(finished | aborted) == 14
    assert core.kv.num_free_blocks == core.kv.num_blocks
    assert not core.requests and not core.scheduler.running and not core.scheduler.waiting


def test_request_that_can_never_fit_is_rejected_at_admission(model_dir):
    core = make_core(model_dir)
    err = core.add_request("big", list(range(1, 150)), SamplingParams(max_tokens=100))
    assert err is not None and err.error_type == "too_long"
    # the engine gives the kind and the facts; the seed's words are the front end's (kiln.errors)
    assert "12" in err.error and "exceed the limit" in seed_message(err.error_type, err.error, err.error_args)


def test_duplicate_id_and_queue_cap(model_dir):
    core = make_core(model_dir, max_waiting=2)
    sp = SamplingParams(max_tokens=4)
    assert core.add_request("a", [1, 2], sp) is None
    dup = core.add_request("a", [1, 2], sp)
    assert dup.error_type == "duplicate_id" and "already exists" in dup.error
    assert core.add_request("b", [1, 2], sp) is None
    full = core.add_request("c", [1, 2], sp)
    assert full.error_type == "queue_full"
    assert seed_message(full.error_type, full.error, full.error_args) == "cached task num (2) exceeds the limit (2)"
    core.abort(["a", "b"])
    assert core.kv.num_free_blocks == core.kv.num_blocks


def test_prefix_cache_reuses_blocks_and_keeps_output(model_dir):
    core = make_core(model_dir, num_gpu_blocks=32)
    prompt = list(range(1, 70))  # 4 full blocks + 5 tokens
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)

    def gen(rid):
        core.add_request(rid, prompt, sp)
        out = []
        while core.has_unfinished():
            for o in core.step():
                out += o.new_token_ids
        return out

    first = gen("p1")
    hits_before = core.kv.num_cached_hits
    second = gen("p2")
    assert core.kv.num_cached_hits - hits_before == 64
    assert first == second
    assert core.kv.num_free_blocks == core.kv.num_blocks


def test_long_prompt_is_prefilled_in_chunks_alongside_decodes(model_dir):
    core = make_core(model_dir, num_gpu_blocks=32, max_num_batched_tokens=32, enable_prefix_caching=False)
    core.add_request("short", [1, 2, 3], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    core.step()
    core.add_request("long", list(range(1, 100)), SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    steps_with_both = 0
    while core.has_unfinished():
        batch_sizes = len(core.scheduler.running)
        outs = core.step()
        if batch_sizes == 2 and any(o.request_id == "short" for o in outs):
            steps_with_both += 1
    assert steps_with_both >= 3  # the 99-token prompt took >= 3 steps of 31 tokens while "short" kept decoding


def test_fifo_admission_waits_for_blocks():
    kv = KVCacheManager(4, 16)
    a = Request("a", list(range(40)), SamplingParams())
    assert kv.can_admit(a, [], 40)
    kv.admit(a, [])
    assert kv.allocate_slots(a, 40) and kv.num_free_blocks == 1
    b = Request("b", list(range(40)), SamplingParams())
    assert not kv.can_admit(b, [], 40)
    kv.free_request(a)
    assert kv.num_free_blocks == 4 and kv.can_admit(b, [], 40)
