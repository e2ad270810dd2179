"""Speculative decoding by n-gram lookup (KILN_SPECULATIVE_CONFIG): the lookup, the config's checks, the scheduler's
drafts and their confirmation, and the engine's output equal to its output without speculation (greedy tokens and
their logprobs) through preemptions, prefix-cache reuse of blocks written under speculation, async scheduling,
the warm-up and the metrics."""
from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kiln.config import ConfigError, KilnConfig
from kiln.engine.config import EngineConfig
from kiln.engine.core import EngineCore
from kiln.engine.kv_cache import KVCacheManager
from kiln.engine.request import FinishReason, Request, RequestStatus, SamplingParams
from kiln.engine.scheduler import Scheduler
from kiln.engine.speculative import (
    NgramProposer,
    SpeculativeConfig,
    confirmed,
    lookup,
    next_draft_limit,
    token_history,
)
from kiln.server.metrics import EngineStatsCollector
from tests.helpers.tiny_models import write_tiny_model

NGRAM5 = {"method": "ngram", "num_speculative_tokens": 5}


def look(tokens, k=3, n_min=2, n_max=4):
    return lookup(np.asarray(tokens, dtype=np.int64), k, n_min, n_max)


def test_lookup_takes_what_followed_the_longest_earlier_match():
    assert look([1, 2, 3, 4, 1, 2, 3]) == [4, 1, 2]
    assert look([1, 2, 3, 4, 5, 6], k=3) == []                      # the suffix never came before
    assert look([7, 3, 8, 9, 2, 3, 5, 6, 2, 3]) == [5, 6, 2]        # only the 2-gram [2, 3] matches
    # the 3-gram [1, 2, 3] wins over the more recent 2-gram [2, 3]
    assert look([1, 2, 3, 50, 51, 9, 2, 3, 60, 61, 1, 2, 3]) == [50, 51, 9]
    # of several matches, the latest one followed by k tokens
    assert look([5, 6, 10, 11, 12, 5, 6, 20, 21, 22, 5, 6]) == [20, 21, 22]
    # none followed by k tokens: the earliest (the longest continuation)
    assert look([5, 6, 10, 5, 6, 20, 5, 6], k=4) == [10, 5, 6, 20]
    assert look([5, 6, 10, 5, 6, 20, 5, 6], k=7) == [10, 5, 6, 20, 5, 6]
    # a run of one token drafts more of it; k and n_min bound the lookup
    assert look([4, 4, 4, 4, 4, 4], k=2) == [4, 4]
    assert look([1, 2, 3, 1, 2, 3], k=1) == [1]
    assert look([9, 1, 5, 1], n_min=2) == [] and look([9, 1, 5, 1], n_min=1) == [5, 1]
    assert look([1, 2], k=3) == [] and look([1, 2, 1, 2], k=0) == []


def test_lookup_agrees_with_a_plain_search():
    rnd = random.Random(3)
    for _ in range(300):
        toks = [rnd.randrange(4) for _ in range(rnd.randrange(1, 40))]
        k, n_min = rnd.randint(1, 5), rnd.randint(1, 3)
        n_max = n_min + rnd.randint(0, 2)
        want = []
        for n in range(min(n_max, len(toks) - 1), n_min - 1, -1):
            ends = [e for e in range(n - 1, len(toks) - 1) if toks[e - n + 1:e + 1] == toks[-n:]]
            if ends:
                full = [e for e in ends if e + k < len(toks)]
                e = full[-1] if full else ends[0]
                want = toks[e + 1:e + 1 + k]
                break
        assert look(toks, k, n_min, n_max) == want, (toks, k, n_min, n_max)


def test_token_history_grows_with_the_output():
    r = Request("a", [1, 2, 3], SamplingParams())
    assert token_history(r).tolist() == [1, 2, 3]
    r.output_token_ids += [4, 5]
    assert token_history(r).tolist() == [1, 2, 3, 4, 5]
    r.output_token_ids += list(range(6, 200))
    assert token_history(r).tolist() == list(range(1, 200))


def test_confirmed_counts_drafts_up_to_the_first_difference():
    assert confirmed([4, 5, 6], [4, 5, 6, 7]) == 3
    assert confirmed([4, 5, 6], [4, 9, 6, 7]) == 1
    assert confirmed([4, 5, 6], [3, 5, 6, 7]) == 0
    assert confirmed([], [8]) == 0


def test_the_draft_limit_doubles_after_a_full_confirmation_and_drops_after_a_miss():
    assert [next_draft_limit(d, c, 5) for d, c in [(1, 1), (2, 2), (4, 4), (5, 5), (5, 0), (5, 3), (3, 2)]] == \
        [2, 4, 5, 5, 1, 4, 3]
    sched = spec_scheduler(k=6)
    r = decode_ready(sched, [1, 2, 3, 4, 5, 6, 7, 8, 9] * 3 + [1], max_tokens=40)   # + 1 -> drafts 2, 3, ...
    batch = sched.schedule()
    assert r.draft_token_ids == [2, 3, 4, 5, 6, 7]
    sched.resolve(batch, [r], sched.launched(batch, [r]), [[2, 8]])                  # one confirmed
    assert r.draft_limit == 2
    batch = sched.schedule()
    assert len(r.draft_token_ids) == 2


def test_config_parses_vllms_json_and_names_what_is_wrong():
    c = SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 5}')
    assert (c.num_speculative_tokens, c.prompt_lookup_min, c.prompt_lookup_max) == (3, 2, 5)
    assert SpeculativeConfig.parse({"num_speculative_tokens": 2, "prompt_lookup_min": 6}).prompt_lookup_max == 6
    assert SpeculativeConfig.parse(None) is None and SpeculativeConfig.parse(" ") is None
    for bad, words in [("{", "not JSON"), ("[1]", "JSON object"), ('{"method": "eagle", "num_speculative_tokens": 2}',
                       "eagle"), ("{}", "num_speculative_tokens is required"),
                       ('{"num_speculative_tokens": 0}', "[1, 32]"), ('{"num_speculative_tokens": true}', "integer"),
                       ('{"num_speculative_tokens": 2, "model": "x"}', "unknown field"),
                       ('{"num_speculative_tokens": 2, "prompt_lookup_min": 5, "prompt_lookup_max": 3}', "exceeds")]:
        with pytest.raises(ValueError, match=None) as e:
            SpeculativeConfig.parse(bad)
        assert words in str(e.value), (bad, str(e.value))
    with pytest.raises(ConfigError, match="KILN_SPECULATIVE_CONFIG.*num_speculative_tokens"):
        KilnConfig.load({"KILN_SPECULATIVE_CONFIG": '{"method": "ngram"}'})
    cfg = KilnConfig.load({"KILN_SPECULATIVE_CONFIG": '{"method": "ngram", "num_speculative_tokens": 4}'})
    assert SpeculativeConfig.parse(cfg.to_engine_config().speculative_config).num_speculative_tokens == 4


# -- the scheduler ------------------------------------------------------------------------------------------

def spec_scheduler(num_blocks=40, budget=64, k=4, **kw) -> Scheduler:
    return Scheduler(KVCacheManager(num_blocks, 4), max_num_seqs=8, max_num_batched_tokens=budget, max_model_len=64,
                     proposer=NgramProposer(SpeculativeConfig(k, 3, 1, **kw)))


def decode_ready(sched: Scheduler, prompt: list[int], **params) -> Request:
    """A running request whose prompt is computed and whose first token is known (`prompt[-1]` again)."""
    r = Request("r", prompt, SamplingParams(ignore_eos=True, **params), eos_token_ids=frozenset({0}))
    sched.add(r)
    batch = sched.schedule()
    sched.resolve(batch, [r], sched.launched(batch, [r]), [[prompt[-1]]])
    return r


def test_a_decode_row_carries_drafts_and_gives_back_the_unconfirmed_positions():
    sched = spec_scheduler()
    r = decode_ready(sched, [1, 2, 3, 9, 1, 2, 3, 8, 1, 2], max_tokens=20)   # + 2 -> drafts 3, 8, 1, 2
    batch = sched.schedule()
    assert r.draft_token_ids == [3, 8, 1, 2] and batch.num_tokens == [5] and batch.num_draft_tokens == 4
    computed, blocks = r.num_computed_tokens, len(r.block_ids)
    slots = sched.launched(batch, [r])
    assert r.num_computed_tokens == computed + 5
    sched.resolve(batch, [r], slots, [[3, 8, 5]])      # two drafts confirmed, then the model's 5
    assert r.output_token_ids == [2, 3, 8, 5] and r.num_computed_tokens == computed + 3 and not r.draft_token_ids
    assert r.num_tokens - r.num_computed_tokens == 1 and len(r.block_ids) == blocks
    assert r.status is RequestStatus.RUNNING


def test_drafts_stop_at_max_tokens_the_budget_and_free_blocks():
    sched = spec_scheduler()
    r = decode_ready(sched, [1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3], max_tokens=4)
    batch = sched.schedule()
    assert r.draft_token_ids == [4, 1]                 # 4 tokens at most: 1 known, 2 drafts, the one after them
    sched.resolve(batch, [r], sched.launched(batch, [r]), [[4, 1, 2]])
    assert r.status is RequestStatus.FINISHED and r.finish_reason is FinishReason.LENGTH
    assert r.output_token_ids == [3, 4, 1, 2] and sched.kv.num_free_blocks == 40

    sched = spec_scheduler()
    r = decode_ready(sched, [1, 2, 3, 4, 1, 2, 3, 4, 1, 2], max_tokens=20)
    sched.max_num_batched_tokens = 3
    assert sched.schedule().num_tokens == [3] and r.draft_token_ids == [3, 4]

    # drafts never preempt: with no block free for them the row decodes its one token
    sched = spec_scheduler(num_blocks=4)
    r = decode_ready(sched, [1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3], max_tokens=20)  # 4 blocks for 16
    assert sched.kv.num_free_blocks == 0
    batch = sched.schedule()
    assert not r.draft_token_ids and batch.num_tokens == [1] and not batch.preempted


def test_drafts_and_admissions_share_the_batch_rows():
    """Each draft is a row that samples: a step with drafts admits only as many new requests as rows are left."""
    sched = spec_scheduler()
    sched.max_num_seqs = 4
    r = decode_ready(sched, [1, 2, 3, 4, 1, 2, 3, 4, 1, 2], max_tokens=20)
    sched.add(Request("w", [50, 51, 52], SamplingParams(ignore_eos=True, max_tokens=5)))
    batch = sched.schedule()
    assert r.draft_token_ids == [3, 4, 1] and [q.request_id for q in batch.requests] == ["r"]
    sched.resolve(batch, [r], sched.launched(batch, [r]), [[9]])   # no draft confirmed: the limit drops to 1
    batch = sched.schedule()
    assert [q.request_id for q in batch.requests] == ["r", "w"]
    assert len(batch.requests) + batch.num_draft_tokens <= 4


def test_a_stop_among_confirmed_drafts_ends_the_request_there():
    sched = spec_scheduler()
    r = decode_ready(sched, [1, 2, 0, 7, 7, 1, 2], max_tokens=20, stop_token_ids=[0])  # + 2 -> drafts 0, 7, 7, 1
    batch = sched.schedule()
    assert r.draft_token_ids == [0, 7, 7, 1]
    sched.resolve(batch, [r], sched.launched(batch, [r]), [[0, 7, 7, 1, 3]])
    assert r.output_token_ids == [2, 0] and r.finish_reason is FinishReason.STOP
    assert sched.kv.num_free_blocks == 40 and not sched.running


@pytest.mark.parametrize("params", [dict(repetition_penalty=1.2), dict(presence_penalty=0.5),
                                    dict(min_tokens=5, stop_token_ids=[0]), dict(grammar=True)])
def test_rows_whose_settings_depend_on_earlier_tokens_do_not_speculate(params):
    sched = spec_scheduler()
    grammar = params.pop("grammar", False)
    r = decode_ready(sched, [1, 2, 3, 4, 1, 2, 3, 4, 1, 2], max_tokens=20, **params)
    if grammar:
        r.grammar = object()  # a structured-output request's matcher
    assert sched.schedule().num_tokens == [1] and not r.draft_token_ids


def test_min_tokens_without_stop_ids_to_mask_still_speculates():
    sched = spec_scheduler()
    r = decode_ready(sched, [1, 2, 3, 4, 1, 2, 3, 4, 1, 2], max_tokens=20, min_tokens=5)
    assert sched.schedule().num_tokens == [5] and r.draft_token_ids == [3, 4, 1, 2]


def test_speculation_is_off_above_its_batch_size():
    sched = spec_scheduler(disable_by_batch_size=1)
    reqs = [Request(f"r{i}", [1, 2, 3, 1, 2, 3, 1, 2], SamplingParams(ignore_eos=True, max_tokens=9))
            for i in range(2)]
    for r in reqs:
        sched.add(r)
    batch = sched.schedule()
    sched.resolve(batch, reqs, sched.launched(batch, reqs), [[3], [3]])
    assert sched.schedule().num_draft_tokens == 0


# -- the engine -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model("llama", tmp_path_factory.mktemp("llama"))


def make_core(model_dir, spec=NGRAM5, **kw) -> EngineCore:
    cfg = dict(model=str(model_dir), dtype="float32", block_size=16, num_gpu_blocks=128, max_num_seqs=16,
               async_scheduling=False, speculative_config=spec) | kw
    return EngineCore(EngineConfig(**cfg))


def run(core: EngineCore, work) -> dict[str, tuple[list[int], list]]:
    """Each request's tokens and logprobs, every block back at the end."""
    for rid, prompt, sp in work:
        assert core.add_request(rid, prompt, sp) is None
    got = {rid: ([], []) for rid, _, _ in work}
    steps = 0
    while core.has_unfinished():
        steps += 1
        assert steps < 3000, "the engine did not finish"
        for o in core.step():
            got[o.request_id][0].extend(o.new_token_ids)
            got[o.request_id][1].extend(o.logprobs or [])
            assert o.error is None, o.error
    assert core.kv.num_free_blocks == core.kv.num_blocks or core.cfg.enable_prefix_caching
    assert all(len(r.block_ids) == 0 for r in core.requests.values())
    return got


def repetitive(seed: int, n: int) -> list[int]:
    rnd = random.Random(seed)
    unit = [rnd.randrange(1, 500) for _ in range(rnd.randint(3, 9))]
    return (unit * (n // len(unit) + 1))[:n]


def workload(seed: int = 0):
    greedy = dict(temperature=0.0, ignore_eos=True)
    params = [dict(max_tokens=40), dict(max_tokens=33, logprobs=2), dict(max_tokens=25, stop_token_ids=[17, 33]),
              dict(max_tokens=30, repetition_penalty=1.3), dict(max_tokens=20, min_tokens=6, stop_token_ids=[5]),
              dict(max_tokens=3), dict(max_tokens=24, logit_bias=[(11, 30.0)])]
    return [(f"r{i}", repetitive(seed * 10 + i, 20 + 9 * i), SamplingParams(**greedy, **p))
            for i, p in enumerate(params)]


def assert_same(got, ref):
    assert got.keys() == ref.keys()
    for rid in ref:
        assert got[rid][0] == ref[rid][0], rid
        assert len(got[rid][1]) == len(ref[rid][1])
        for (c1, top1), (c2, top2) in zip(got[rid][1], ref[rid][1]):
            assert c1 == pytest.approx(c2, abs=1e-4) and [t for t, _ in top1] == [t for t, _ in top2]


@pytest.mark.parametrize("kw", [dict(), dict(max_num_batched_tokens=24, max_num_seqs=10),
                                dict(async_scheduling=True), dict(num_gpu_blocks=10, kv_reserve_ratio=0.0,
                                                                       enable_prefix_caching=False)])
def test_greedy_output_and_logprobs_equal_the_output_without_speculation(model_dir, kw):
    """Small step budgets and few free batch rows (drafts cut to fit, prompts chunked beside speculating rows), async
    scheduling asked for
    (the engine steps synchronously), a cache so small that requests are preempted and recomputed."""
    ref = run(make_core(model_dir, spec=None, **kw), workload())
    core = make_core(model_dir, **kw)
    assert_same(run(core, workload()), ref)
    s = core.spec_stats
    assert s.num_drafts > 5 and 0 < s.num_accepted_tokens < s.num_draft_tokens, vars(s)
    if "num_gpu_blocks" in kw:
        assert core.scheduler.num_preemptions > 0


def test_a_speculating_step_is_a_decode_step_of_a_row_per_token(model_dir):
    """Each draft token becomes a decode row of its own (same blocks, one more position of context each), so the
    step stays decode-only (on a GPU: its CUDA graph of that batch size) and never has more rows than
    max_num_seqs."""
    core = make_core(model_dir, max_num_seqs=4)
    seen = []
    upload = core.runner.upload

    def spy(p):
        d = upload(p)
        seen.append((p.num_seqs, d.meta.decode_only, d.meta.seq_lens_list, d.positions.tolist()))
        return d
    core.runner.upload = spy
    run(core, [("a", [5, 6, 7, 8] * 5, SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=20,
                                                         logit_bias=[(5, 50.0)]))])
    spec_steps = [s for s in seen if s[0] > 1]
    assert spec_steps and all(decode_only and rows <= 4 for rows, decode_only, _, _ in spec_steps)
    rows, _, lens, positions = spec_steps[0]
    assert lens == [positions[0] + 1 + j for j in range(rows)] and positions == [lens[0] - 1 + j for j in range(rows)]
    assert core.variants.snapshot() >= {("step", "speculative"), ("step", "decode"), ("decode_batch", 4)}


def test_steps_overlap_again_above_the_batch_size_that_turns_drafting_off(model_dir):
    """Six requests, drafting off above two running: the full batch's steps overlap (async scheduling), the last
    requests draft in synchronous steps, and the tokens equal those without speculation."""
    spec = {**NGRAM5, "disable_by_batch_size": 2}
    work = [w for w in workload() if w[2].repetition_penalty == 1.0]  # penalties would make every step wait
    ref = run(make_core(model_dir, spec=None), work)
    core = make_core(model_dir, spec=spec, async_scheduling=True)
    assert_same(run(core, work), ref)
    assert core.num_overlapped_steps > 10 and core.spec_stats.num_accepted_tokens > 0


def test_steps_overlap_while_nothing_is_drafted(model_dir):
    """Async scheduling with speculation on text that seldom repeats: after four synchronous steps that draft
    nothing, steps overlap again (4, then 8, 16 ... up to 64 steps) between short synchronous tries; the tokens are
    those of an engine without speculation. On repeating text the same engine drafts."""
    spec = {**NGRAM5, "prompt_lookup_min": 3}
    rnd = random.Random(1)
    work = [(f"u{i}", rnd.sample(range(1, 500), 20), SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=120,
                                                                   logit_bias=[(t, -100.0) for t in range(1, 400)]))
            for i in range(2)]
    ref = run(make_core(model_dir, spec=None, async_scheduling=True), work)
    core = make_core(model_dir, spec=spec, async_scheduling=True)
    assert_same(run(core, work), ref)
    steps = core.num_steps
    # (the random model's output comes back to itself now and then: a few drafts, each resetting the pauses)
    assert core.num_overlapped_steps > 0.5 * steps, (core.num_overlapped_steps, steps, vars(core.spec_stats))
    run(core, [("copy", [5, 6, 7, 8] * 6, SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=40,
                                                           logit_bias=[(5, 50.0)]))])
    assert core.spec_stats.num_accepted_tokens > 0


def test_blocks_written_under_speculation_serve_a_later_prefix_hit(model_dir):
    """The rejected drafts' KV were overwritten before their blocks were cached: a request that continues another's
    output from the prefix cache answers as on an engine that never speculated."""
    sp = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=48)
    first = [("a", repetitive(7, 37), sp)]
    core = make_core(model_dir)
    out = run(core, first)["a"][0]
    assert core.spec_stats.num_accepted_tokens > 0
    follow = [("b", first[0][1] + out[:40], SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=16))]
    hits = core.kv.num_cached_hits
    got = run(core, follow)
    assert core.kv.num_cached_hits - hits >= 64  # four blocks of the first request's prompt + output
    assert got["b"][0] == run(make_core(model_dir, spec=None), follow)["b"][0]


def test_sampled_rows_with_a_seed_repeat_and_every_request_ends(model_dir):
    """Seeded sampling (temperature 0.8, top-p 0.9) with drafts: two engines give the same tokens. The bias makes
    the output come back to token 9 often enough that drafts are confirmed on any device's arithmetic (at +4 this
    test failed on CUDA in run BA, which assert is not known: one suspect is that no draft was confirmed there)."""
    work = [(f"s{i}", repetitive(i, 30), SamplingParams(temperature=0.8, top_p=0.9, seed=i, max_tokens=30,
                                                        ignore_eos=True, logit_bias=[(9, 6.0)]))
            for i in range(4)]
    one, two = make_core(model_dir), make_core(model_dir)
    a, b = run(one, work), run(two, work)
    assert a == b and all(len(toks) == 30 for toks, _ in a.values())
    assert one.spec_stats.num_accepted_tokens > 0


def test_warmup_runs_a_speculating_step_and_a_load_reaches_nothing_new(model_dir):
    core = make_core(model_dir, warmup=True, max_num_seqs=4, max_num_batched_tokens=64, max_prefill_tokens=48)
    warm = core.variants.snapshot()
    assert ("step", "speculative") in warm and core.spec_stats.num_drafts == 0  # counted from ready on
    work = [(f"w{i}", repetitive(i, 10 + 13 * i), SamplingParams(temperature=[0.0, 0.7][i % 2], max_tokens=20,
                                                                 ignore_eos=True)) for i in range(6)]
    run(core, work)
    assert core.spec_stats.num_drafts > 0
    assert core.variants.snapshot() - warm == set()


def test_metrics_show_drafts_and_confirmed_drafts(model_dir):
    core = make_core(model_dir)
    run(core, workload()[:2])
    stats = core.stats()
    registry = CollectorRegistry()
    registry.register(EngineStatsCollector(lambda: stats))
    got = {s.name: s.value for fam in text_string_to_metric_families(generate_latest(registry).decode())
           for s in fam.samples}
    assert got["kiln:spec_decode_num_draft_tokens_total"] == core.spec_stats.num_draft_tokens > 0
    assert got["kiln:spec_decode_num_accepted_tokens_total"] == core.spec_stats.num_accepted_tokens
    assert got["kiln:spec_decode_num_drafts_total"] == core.spec_stats.num_drafts
    plain = make_core(model_dir, spec=None).stats()
    assert plain.spec_decode == {}
    registry = CollectorRegistry()
    registry.register(EngineStatsCollector(lambda: plain))
    assert "spec_decode" not in generate_latest(registry).decode()


def test_the_bundled_model_repeats_a_list_faster_with_the_same_text(default_model_dir):
    """Real text: a list the model is asked to repeat. The same greedy answer in fewer than half the engine steps
    (2026-12-07: 36 tokens in 9 steps, 29 of 30 drafts confirmed)."""
    from kiln import LLM
    msgs = [{"role": "user", "content": "Repeat this list exactly, twice: Apple, Banana, Cherry, Date, Elderberry, "
                                        "Fig, Grape, Honeydew, Kiwi, Lemon, Mango, Nectarine, Orange."}]
    sp = SamplingParams(max_tokens=80, temperature=0)
    answers, steps = [], []
    for spec in (None, NGRAM5):
        llm = LLM(str(default_model_dir), speculative_config=spec)
        s0 = llm.engine.num_steps
        answers.append(llm.chat(msgs, sp)[0].text)
        steps.append(llm.engine.num_steps - s0)
    assert answers[0] == answers[1] and "Banana, Cherry" in answers[0]
    assert steps[1] < 0.5 * steps[0], steps


@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
                    reason="needs CUDA or TRITON_INTERPRET=1 (the Triton attention backend)")
def test_the_triton_decode_kernel_reads_each_draft_rows_context(tmp_path):
    """The draft rows on the Triton backend (on CPU its interpreter): the cache write of the step's tokens comes
    before the decode kernel, which reads each row's context through the shared block table; the same greedy tokens
    as without speculation."""
    d = write_tiny_model("llama", tmp_path / "one", num_layers=1)
    kw = dict(attention_backend="triton", use_cuda_graph=False, max_num_seqs=8)
    work = [("a", [5, 6, 7, 8] * 5, SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=12)),
            ("b", repetitive(4, 30), SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=12,
                                                      logit_bias=[(9, 8.0)]))]
    ref = run(make_core(d, spec=None, **kw), work)
    core = make_core(d, **kw)
    assert_same(run(core, work), ref)
    assert core.runner.backend.name == "triton" and core.spec_stats.num_accepted_tokens > 0


# KILN_FUZZ_SEEDS=80: a longer run by hand (80 passed, 2026-12-07)
@pytest.mark.parametrize("seed", range(int(os.environ.get("KILN_FUZZ_SEEDS", 8))))
def test_random_engines_speculate_to_the_same_tokens(model_dir, seed):
    """Random engine shapes (blocks of 4 or 16, 10-64 of them, 2-40 tokens a step, 1-10 sequences, async asked or
    not, prefix caching on or off, greedy or reserving admission, 1-6 draft tokens, lookups of 1-4 tokens) and
    random repetitive requests that share prefixes, some with logprobs, stop ids or penalties, some aborted
    midway: every request that is not aborted gets the tokens (and logprobs) an engine without speculation gives,
    every block comes back."""
    rnd = random.Random(100 + seed)
    block = rnd.choice([4, 16])
    seqs = rnd.randrange(1, 11)
    n_min = rnd.randint(1, 3)
    spec = {"method": "ngram", "num_speculative_tokens": rnd.randint(1, 6), "prompt_lookup_min": n_min,
            "prompt_lookup_max": n_min + rnd.randint(0, 1)}
    shape = dict(block_size=block, num_gpu_blocks=rnd.randrange(10, 64), max_num_seqs=seqs,
                 max_num_batched_tokens=max(seqs, rnd.randrange(2, 40)), async_scheduling=rnd.random() < 0.5,
                 enable_prefix_caching=rnd.random() < 0.5, kv_reserve_ratio=rnd.choice([0.0, None]))
    shared = repetitive(seed, rnd.randrange(0, 24))
    work, aborted = [], set()
    for i in range(rnd.randrange(2, 8)):
        prompt = shared + repetitive(seed * 100 + i, rnd.randrange(1, 40))
        room = shape["num_gpu_blocks"] * block - len(prompt) - 1
        if room < 2:
            continue
        p = dict(max_tokens=rnd.randrange(1, min(room, 30)), temperature=0.0, ignore_eos=True)
        p.update(rnd.choice([{}, {}, {"logprobs": 2}, {"stop_token_ids": [rnd.randrange(1, 500)]},
                             {"presence_penalty": 0.5}, {"logit_bias": [(prompt[-1], 20.0)]}]))
        work.append((f"r{i}", prompt, SamplingParams(**p)))
        if rnd.random() < 0.2:
            aborted.add(f"r{i}")

    def drive(core) -> dict:
        for rid, prompt, sp in work:
            assert core.add_request(rid, prompt, sp) is None
        got = {rid: ([], []) for rid, _, _ in work}
        for step in range(3000):
            if not core.has_unfinished():
                break
            if step == 3:
                core.abort(sorted(aborted))
            for o in core.step():
                got[o.request_id][0].extend(o.new_token_ids)
                got[o.request_id][1].extend(o.logprobs or [])
        assert not core.has_unfinished()
        core.kv.reset_prefix_cache()
        assert core.kv.num_free_blocks == core.kv.num_blocks
        return {rid: v for rid, v in got.items() if rid not in aborted}

    ref = drive(make_core(model_dir, spec=None, **shape))
    assert_same(drive(make_core(model_dir, spec=spec, **shape)), ref)


def test_kiln_generate_speculates_and_names_a_bad_config(default_model_dir):
    import subprocess
    import sys
    # a raw prompt that the model goes on repeating (n-gram drafts confirmed), greedy: the tokens of no speculation
    cmd = [sys.executable, "-m", "kiln.entrypoints.cli", "generate", "--model", str(default_model_dir), "--no-chat",
           "--prompt", "Apple, Banana, Cherry, Date. Apple, Banana, Cherry, Date. Apple,", "--max-tokens", "24"]
    ok = subprocess.run(cmd + ["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 4}'],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0 and "Banana, Cherry" in ok.stdout, ok.stderr[-2000:]
    plain = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0 and plain.stdout == ok.stdout
    bad = subprocess.run(cmd + ["--speculative-config", '{"method": "eagle"}'], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "method 'eagle' is not supported" in bad.stderr
