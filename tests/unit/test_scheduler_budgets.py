"""The scheduler's per-step budgets and admission rule (issue 11): the prefill bound, decodes first, nobody
waiting behind work it could run beside, no starvation; and the stats they publish (prefill tokens per step,
refusals) as Prometheus families."""
from __future__ import annotations

import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kiln.engine.config import EngineConfig
from kiln.engine.core import EngineCore
from kiln.engine.kv_cache import KVCacheManager
from kiln.engine.request import Request, RequestStatus, SamplingParams
from kiln.engine.scheduler import PREFILL_TOKEN_BUCKETS, Scheduler
from kiln.errors import ErrorKind
from kiln.server.metrics import EngineStatsCollector
from tests.helpers.tiny_models import write_tiny_model


def run_step(sched: Scheduler, token: int = 7):
    """One synchronous step without a model: schedule, launch, resolve with `token` for every sampling row."""
    batch = sched.schedule()
    sampling = [r for r, n in zip(batch.requests, batch.num_tokens) if r.num_computed_tokens + n == r.num_tokens]
    slots = sched.launched(batch, sampling)
    sched.resolve(batch, sampling, slots, [[token]] * len(sampling))
    return batch


def req(rid: str, prompt_len: int, max_tokens: int = 50) -> Request:
    """A request whose prompt shares no prefix with another's (so the prefix cache plays no part)."""
    first = 1 + 1000 * (sum(map(ord, rid)) % 50)
    return Request(rid, list(range(first, first + prompt_len)), SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def test_prefill_tokens_per_step_are_bounded_and_decodes_always_run():
    sched = Scheduler(KVCacheManager(200, 16), max_num_seqs=8, max_num_batched_tokens=256, max_model_len=4096,
                      max_prefill_tokens=32)
    decoders = [req(f"d{i}", 4) for i in range(3)]
    for r in decoders:
        sched.add(r)
    run_step(sched)  # their prompts: 12 prefill tokens, within the bound
    assert all(len(r.output_token_ids) == 1 for r in decoders)
    long = req("long", 300, max_tokens=2)
    sched.add(long)
    chunks = []
    while long.status is not RequestStatus.FINISHED:
        batch = run_step(sched)
        rows = dict(zip((r.request_id for r in batch.requests), batch.num_tokens))
        assert batch.num_prefill_tokens <= 32
        # every running decode has its token in every step, ahead of the prefill rows
        for d in decoders:
            if d.status is RequestStatus.RUNNING or d in batch.requests:
                assert rows.get(d.request_id) == 1
        assert batch.requests[:len(decoders)] == decoders
        if "long" in rows and rows["long"] > 1:
            chunks.append(rows["long"])
    assert chunks[:-1] == [32] * (len(chunks) - 1) and sum(chunks) == 300
    # the histogram saw every step: 1 step of 12, then ceil(300/32) - 1 full chunks, then the decode-only ones
    h = sched.prefill_tokens_per_step
    assert sum(h.counts) == len(chunks) + 1 + (h.counts[0])
    assert h.sum == 12 + 300


def test_step_budget_still_bounds_the_whole_step():
    sched = Scheduler(KVCacheManager(200, 16), max_num_seqs=8, max_num_batched_tokens=40, max_model_len=4096,
                      max_prefill_tokens=1000)  # the prefill bound cannot exceed the step budget
    assert sched.max_prefill_tokens == 40
    for i in range(4):
        sched.add(req(f"d{i}", 2))
    run_step(sched)
    sched.add(req("long", 200))
    batch = run_step(sched)
    assert batch.total_tokens == 40 and batch.num_prefill_tokens == 36  # 4 decodes + 36 prompt tokens


def test_a_short_request_is_not_kept_waiting_behind_a_long_one_that_does_not_fit():
    # 10 blocks of 16 tokens: "big" holds 6, so "huge" (needs 8 for its first chunk) cannot be admitted yet
    sched = Scheduler(KVCacheManager(10, 16), max_num_seqs=8, max_num_batched_tokens=512, max_model_len=4096)
    big = req("big", 90, max_tokens=5)
    sched.add(big)
    run_step(sched)
    huge, short = req("huge", 120, max_tokens=2), req("short", 10, max_tokens=2)
    sched.add(huge)
    sched.add(short)
    batch = run_step(sched)
    assert short in batch.requests and huge not in batch.requests  # short ran beside big
    assert huge.num_overtaken == 1
    while huge.status is not RequestStatus.FINISHED:  # once big is done, huge gets its blocks
        run_step(sched)
    assert big.status is RequestStatus.FINISHED and short.status is RequestStatus.FINISHED


def test_a_request_waiting_for_blocks_is_overtaken_a_bounded_number_of_times():
    sched = Scheduler(KVCacheManager(10, 16), max_num_seqs=8, max_num_batched_tokens=512, max_model_len=4096,
                      max_overtakes=2)
    big = req("big", 90, max_tokens=30)
    sched.add(big)
    run_step(sched)
    huge = req("huge", 120, max_tokens=2)
    sched.add(huge)
    smalls = [req(f"s{i}", 5, max_tokens=40) for i in range(4)]
    for s in smalls:
        sched.add(s)
    run_step(sched)
    # two may pass it; then the queue waits for huge's blocks instead of letting more in
    assert [s.status for s in smalls] == [RequestStatus.RUNNING] * 2 + [RequestStatus.WAITING] * 2
    assert list(sched.waiting)[:1] == [huge] and huge.num_overtaken == 2
    for _ in range(5):
        run_step(sched)
    assert smalls[2].status is RequestStatus.WAITING and smalls[3].status is RequestStatus.WAITING


def test_strict_fifo_when_no_overtaking_is_allowed():
    sched = Scheduler(KVCacheManager(10, 16), max_num_seqs=8, max_num_batched_tokens=512, max_model_len=4096,
                      max_overtakes=0)
    sched.add(req("big", 90, max_tokens=5))
    run_step(sched)
    huge, short = req("huge", 120, max_tokens=2), req("short", 10, max_tokens=2)
    sched.add(huge)
    sched.add(short)
    run_step(sched)
    assert short.status is RequestStatus.WAITING


def test_preemption_under_the_bound_keeps_every_block_and_finishes_everyone():
    kv = KVCacheManager(12, 16)
    sched = Scheduler(kv, max_num_seqs=6, max_num_batched_tokens=64, max_model_len=4096, max_prefill_tokens=16,
                      reserve_ratio=0.0)  # greedy admission: preemptions
    reqs = [req(f"r{i}", 20 + 7 * i, max_tokens=30) for i in range(6)]
    for r in reqs:
        sched.add(r)
    for _ in range(2000):
        if not sched.has_work():
            break
        batch = run_step(sched)
        assert batch.num_prefill_tokens <= 16
    assert all(r.status is RequestStatus.FINISHED and len(r.output_token_ids) == 30 for r in reqs)
    assert sched.num_preemptions > 0 and kv.num_free_blocks == kv.num_blocks


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model("llama", tmp_path_factory.mktemp("llama"))


def scrape(stats) -> dict:
    registry = CollectorRegistry()
    registry.register(EngineStatsCollector(lambda: stats))
    out = {}
    for fam in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_engine_stats_publish_prefill_histogram_refusals_and_queue_depth(model_dir):
    core = EngineCore(EngineConfig(model=str(model_dir), dtype="float32", block_size=16, num_gpu_blocks=64,
                                   max_num_seqs=4, max_num_batched_tokens=64, max_prefill_tokens=24,
                                   max_waiting=3))
    p = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    for i in range(3):
        assert core.add_request(f"r{i}", [i + 1] * 50, p) is None  # no shared prefix
    refused = core.add_request("r3", [1, 2], p)
    assert refused.error_type is ErrorKind.QUEUE_FULL
    m = scrape(core.stats())
    assert m[("kiln:num_requests_waiting", ())] == 3
    assert m[("kiln:num_requests_refused_total", ())] == 1
    while core.has_unfinished():
        core.step()
    s = core.stats()
    m = scrape(s)
    assert m[("kiln:prefill_tokens_per_step_sum", ())] == 150
    steps = m[("kiln:prefill_tokens_per_step_count", ())]
    assert steps == s.num_steps_total
    assert m[("kiln:prefill_tokens_per_step_bucket", (("le", "16"),))] < steps
    assert m[("kiln:prefill_tokens_per_step_bucket", (("le", "64"),))] == steps  # never above the bound of 24
    assert m[("kiln:prefill_tokens_per_step_bucket", (("le", "+Inf"),))] == steps
    assert len(s.prefill_tokens_buckets) == len(PREFILL_TOKEN_BUCKETS) + 1


def test_engine_reports_queue_time_from_arrival_to_first_scheduling(model_dir):
    core = EngineCore(EngineConfig(model=str(model_dir), dtype="float32", block_size=16, num_gpu_blocks=64,
                                   max_num_seqs=1, max_num_batched_tokens=64))
    p = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    core.add_request("first", [1, 2, 3], p)
    core.add_request("second", [1, 2, 3], p)  # waits for the one batch slot
    t0 = time.monotonic()
    queue = {}
    while core.has_unfinished():
        for o in core.step():
            if o.queue_time is not None:
                queue[o.request_id] = o.queue_time
    assert set(queue) == {"first", "second"}
    assert 0 <= queue["first"] < queue["second"] <= time.monotonic() - t0 + 1


@pytest.mark.parametrize("ratio", [0.0, 0.5, 1.0])
def test_admission_reserve_ratio(ratio):
    """KILN_KV_RESERVE_RATIO: admission keeps free that share of the blocks the running requests may still take to
    their max_tokens. Ten requests of 32 + 64 tokens (6 blocks of 16 each) on 30 blocks: admitted greedily (0) the
    batch outgrows the cache and requests are preempted and recomputed; at 1 none is, and five run at once (5 x 6
    blocks fill the cache exactly); every request ends with all its tokens either way."""
    sched = Scheduler(KVCacheManager(30, 16, enable_prefix_caching=False), max_num_seqs=10,
                      max_num_batched_tokens=512, max_model_len=4096, reserve_ratio=ratio)
    reqs = [req(f"r{i}", 32, max_tokens=64) for i in range(10)]
    for r in reqs:
        sched.add(r)
    peak = 0
    for _ in range(2000):
        if not sched.has_work():
            break
        run_step(sched)
        peak = max(peak, len(sched.running))
    assert all(r.status is RequestStatus.FINISHED and len(r.output_token_ids) == 64 for r in reqs)
    assert sched.kv.num_free_blocks == 30
    if ratio == 1.0:
        assert sched.num_preemptions == 0 and peak == 5
    elif ratio == 0.0:
        assert sched.num_preemptions > 0 and peak > 5
    else:  # in between: fewer preemptions than greedy admission
        greedy = Scheduler(KVCacheManager(30, 16, enable_prefix_caching=False), max_num_seqs=10,
                           max_num_batched_tokens=512, max_model_len=4096, reserve_ratio=0.0)
        for i in range(10):
            greedy.add(req(f"r{i}", 32, max_tokens=64))
        while greedy.has_work():
            run_step(greedy)
        assert sched.num_preemptions < greedy.num_preemptions


def test_auto_reserve_learns_how_much_of_max_tokens_requests_use():
    """The default (auto): admission starts as if requests run to max_tokens (so the run-to-max workload above sees
    no preemption and at most 5 at once), then reserves the share of max_tokens that finished requests used.
    Here every request stops (EOS) after 16 of its 64 allowed tokens: the share falls towards 1/4 and more
    requests run at once than a ratio of 1 allows, still without a preemption."""
    def run(ratio, eos_after):
        sched = Scheduler(KVCacheManager(30, 16, enable_prefix_caching=False), max_num_seqs=10,
                          max_num_batched_tokens=512, max_model_len=4096, reserve_ratio=ratio)
        reqs = []
        for i in range(40):
            r = req(f"r{i}", 32, max_tokens=64)
            if eos_after:
                r = Request(r.request_id, r.prompt_token_ids, SamplingParams(max_tokens=64),
                            eos_token_ids=frozenset([2]))
            reqs.append(r)
            sched.add(r)
        peak = 0
        for _ in range(5000):
            if not sched.has_work():
                break
            batch = sched.schedule()
            sampling = [r for r, n in zip(batch.requests, batch.num_tokens)
                        if r.num_computed_tokens + n == r.num_tokens]
            slots = sched.launched(batch, sampling)
            sched.resolve(batch, sampling, slots, [[2 if eos_after and len(r.output_token_ids) >= eos_after else 7]
                                                   for r in sampling])
            peak = max(peak, len(sched.running))
        assert all(r.status is RequestStatus.FINISHED for r in reqs) and sched.kv.num_free_blocks == 30
        return sched, peak

    to_max, peak = run(None, 0)
    assert to_max.num_preemptions == 0 and peak == 5 and to_max.reserve_ratio == 1.0
    early, peak_early = run(None, 16)
    assert 0.25 <= early.reserve_ratio < 0.5 and early.num_preemptions == 0
    _, peak_one = run(1.0, 16)
    assert peak_early > peak_one


def test_reserve_ratio_setting():
    from kiln.config import ConfigError, KilnConfig
    cfg = KilnConfig.load({"KILN_KV_RESERVE_RATIO": "1"})
    assert cfg.kv_reserve_ratio == 1.0 and cfg.to_engine_config().kv_reserve_ratio == 1.0
    assert KilnConfig.load({}).to_engine_config().kv_reserve_ratio is None  # auto
    assert KilnConfig.load({"KILN_KV_RESERVE_RATIO": "auto"}).kv_reserve_ratio is None
    assert KilnConfig.load({"KILN_KV_RESERVE_RATIO": "0"}).to_engine_config().kv_reserve_ratio == 0.0
    with pytest.raises(ConfigError, match="KILN_KV_RESERVE_RATIO.*<= 1"):
        KilnConfig.load({"KILN_KV_RESERVE_RATIO": "1.5"})
