"""The "priority" scheduling policy (KILN_SCHEDULING_POLICY, vLLM's): the waiting queue in order of (priority,
arrival), lower first; preemption takes the running request that comes last in that order; a preempted request
goes back to its place; under fcfs a priority other than 0 is refused with the setting to change."""
from __future__ import annotations

import itertools

import pytest

from kiln.config import KilnConfig
from kiln.engine.config import EngineConfig
from kiln.engine.core import EngineCore
from kiln.engine.kv_cache import KVCacheManager
from kiln.engine.request import Request, RequestStatus, SamplingParams
from kiln.engine.scheduler import Scheduler
from kiln.errors import ErrorKind
from tests.helpers.tiny_models import write_tiny_model

_arrivals = itertools.count()


def req(rid: str, priority: int = 0, prompt_len: int = 8, max_tokens: int = 2) -> Request:
    first = 1 + 100 * (sum(map(ord, rid)) % 90)
    return Request(rid, list(range(first, first + prompt_len)),
                   SamplingParams(max_tokens=max_tokens, ignore_eos=True, priority=priority),
                   arrival_time=float(next(_arrivals)))


def step(sched: Scheduler) -> list[str]:
    """One step without a model (token 7 for every row that samples); the ids of the requests it ran."""
    batch = sched.schedule()
    sampling = [r for r, n in zip(batch.requests, batch.num_tokens) if r.num_computed_tokens + n == r.num_tokens]
    sched.resolve(batch, sampling, sched.launched(batch, sampling), [[7]] * len(sampling))
    return [r.request_id for r in batch.requests]


def admission_order(policy: str, reqs: list[Request]) -> list[str]:
    sched = Scheduler(KVCacheManager(64, 16), max_num_seqs=1, max_num_batched_tokens=64, max_model_len=256,
                      policy=policy)
    for r in reqs:
        sched.add(r)
    order = []
    while sched.has_work():
        for rid in step(sched):
            if rid not in order:
                order.append(rid)
    return order


def test_waiting_requests_run_in_priority_then_arrival_order():
    mk = lambda: [req("a", 5), req("b", 0), req("c", 5), req("d", -1), req("e", 0)]  # noqa: E731
    assert admission_order("priority", mk()) == ["d", "b", "e", "a", "c"]
    assert admission_order("fcfs", mk()) == ["a", "b", "c", "d", "e"]


@pytest.mark.parametrize("policy,victim", [("fcfs", "urgent"), ("priority", "batch")])
def test_preemption_takes_the_request_that_comes_last(policy, victim):
    """Two running requests outgrow a 6-block cache: fcfs preempts the newest, priority the least urgent (here the
    older one). The preempted request goes back to its place in the queue: before a later arrival of its own
    priority, after a more urgent one."""
    sched = Scheduler(KVCacheManager(6, 4), max_num_seqs=2, max_num_batched_tokens=64, max_model_len=64,
                      reserve_ratio=0.0, policy=policy)
    batch_job, urgent = req("batch", 3, prompt_len=6, max_tokens=20), req("urgent", 0, prompt_len=6, max_tokens=20)
    sched.add(batch_job)
    step(sched)
    sched.add(urgent)
    while sched.num_preemptions == 0:
        step(sched)
    assert [r.request_id for r in sched.running] == [({"batch", "urgent"} - {victim}).pop()]
    assert sched.waiting[0].request_id == victim and sched.waiting[0].status is RequestStatus.WAITING
    if policy == "priority":
        later, first = req("later", 3), req("first", -5)
        sched.add(later)
        sched.add(first)
        assert [r.request_id for r in sched.waiting] == ["first", "batch", "later"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model("llama", tmp_path_factory.mktemp("llama"))


def test_the_engine_refuses_a_priority_under_fcfs_and_serves_it_under_priority(model_dir):
    sp = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, priority=2)
    fcfs = EngineCore(EngineConfig(model=str(model_dir), dtype="float32", num_gpu_blocks=32, block_size=16))
    err = fcfs.add_request("a", [1, 2, 3], sp)
    assert err is not None and err.error_type is ErrorKind.INVALID
    assert "KILN_SCHEDULING_POLICY=priority" in err.error
    assert fcfs.add_request("b", [1, 2, 3], SamplingParams(max_tokens=3, priority=0)) is None
    core = EngineCore(EngineConfig(model=str(model_dir), dtype="float32", num_gpu_blocks=32, block_size=16,
                                   scheduling_policy="priority", max_num_seqs=1))
    for rid, prio in (("low", 9), ("high", -9)):
        assert core.add_request(rid, [4, 5, 6], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True,
                                                               priority=prio)) is None
    finished = []
    while core.has_unfinished():
        finished += [o.request_id for o in core.step() if o.finished]
    assert finished == ["high", "low"]
    with pytest.raises(ValueError, match="priority must be an int"):
        SamplingParams(priority=1.5)
    cfg = KilnConfig.load({"KILN_SCHEDULING_POLICY": "priority"})
    assert cfg.to_engine_config().scheduling_policy == "priority"
