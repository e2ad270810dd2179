"""Continuous batching under a per-step token budget.

Every request, running or waiting, is just "tokens known" vs "tokens whose K/V are computed". Two budgets
bound a step:
  * max_num_batched_tokens (KILN_MAX_NUM_BATCHED_TOKENS): every token the step computes, decodes included;
  * max_prefill_tokens (KILN_MAX_PREFILL_TOKENS_PER_STEP): the tokens of prefill rows (prompts, prompt chunks,
    recomputes after preemption) within it. A long prefill stalls every decode of its step, so bounding it
    bounds the decodes' time per token; a prompt longer than the bound is prefilled in chunks over several steps.
A step first gives every running decode its one token (decodes are never starved by prefills), then running
prefills their next chunk, then admits waiting requests while the budgets, the batch slots and the KV blocks
allow. Admission is FIFO, except that a request whose first chunk does not fit the free KV blocks lets later
ones that fit go first (it would otherwise make them wait for work they could run beside); each waiting request
lets at most `max_overtakes` others pass it, then the queue waits for it, so nobody starves. When blocks run
out, the newest running request not yet in this step is preempted: its blocks are freed and it is recomputed
later from its tokens, ahead of the queue. Under the "priority" policy (KILN_SCHEDULING_POLICY) the queue is
kept in order of (SamplingParams.priority, arrival), lower first, a preempted request goes back to its place in
that order, and the victim is the running request that comes last in it (vLLM's priority policy). With
speculative decoding (kiln/engine/speculative.py) a decode row carries its request's draft tokens too, within
the step's budget, the batch's free rows (max_num_seqs less the running requests: each draft becomes a row), the
request's max_tokens and the model length, and only where their blocks are free without a preemption.
reserve_ratio (KILN_KV_RESERVE_RATIO) makes admission keep free that
share of the blocks the running requests may still take up to their max_tokens: 1 admits only what can run to
the end without a preemption, at the price of a smaller batch where requests end early; auto (the default) takes
the share of max_tokens that finished requests actually used (benchmarks/sched_sim.py: as good as 1 where
requests run to max_tokens, within 0.5% of 0 where they end early).

A step has two halves: `launched` (right after the runner queued it: computed counts advance and every
sampling request gets a PENDING_TOKEN) and `resolve` (when its ids reach the host: tokens filled in, stops
checked). Under async scheduling the next step is scheduled between the two, so a request may be scheduled
once more after the step that ends it; that step's token is dropped. A request whose max_tokens or the model
length is reached by its in-flight token is not scheduled again.
"""
from __future__ import annotations

import bisect
import itertools
import time
from collections import deque
from dataclasses import dataclass, field

from kiln.engine.kv_cache import KVCacheManager
from kiln.engine.request import PENDING_TOKEN, FinishReason, Request, RequestStatus
from kiln.engine.speculative import NgramProposer, may_speculate, next_draft_limit


USAGE_WEIGHT = 0.05  # the running average's weight of one finished request (~20 requests to follow a change)


@dataclass
class ScheduledBatch:
    requests: list[Request] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)     # tokens to compute this step, per request
    preempted: list[Request] = field(default_factory=list)
    num_prefill_tokens: int = 0                              # tokens of rows that are not decodes
    num_decode_rows: int = 0                                 # decodes come first in `requests`
    num_draft_tokens: int = 0                                # speculative tokens among the decode rows'

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    def __bool__(self) -> bool:
        return bool(self.requests)

    def add(self, req: Request, n: int, prefill: bool) -> None:
        self.requests.append(req)
        self.num_tokens.append(n)
        if prefill:
            self.num_prefill_tokens += n
        else:
            self.num_decode_rows += 1


# upper bounds of the prefill-tokens-per-step histogram (kiln:prefill_tokens_per_step)
PREFILL_TOKEN_BUCKETS = (0, 1, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


class CumulativeHistogram:
    """Counts per upper bound (Prometheus style: cumulative, +Inf last) and the sum; cheap to send as stats."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)   # not cumulative here; `cumulative()` sums them
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def reset(self) -> None:
        self.counts = [0] * len(self.counts)
        self.sum = 0.0

    def cumulative(self) -> list[int]:
        return list(itertools.accumulate(self.counts))


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                 max_prefill_tokens: int | None = None, max_overtakes: int | None = None,
                 reserve_ratio: float | None = 0.0, proposer: NgramProposer | None = None, policy: str = "fcfs"):
        if policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling policy must be fcfs or priority, got {policy!r}")
        self.kv = kv
        self.policy = policy
        self.proposer = proposer  # speculative decoding's drafts, None: off
        self.drafting_paused = False  # set by the engine while steps overlap instead (EngineCore._pace_drafting)
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # None: prefills may take the whole step budget
        self.max_prefill_tokens = min(max_prefill_tokens or max_num_batched_tokens, max_num_batched_tokens)
        # how many later requests may be admitted past one whose KV blocks are not free yet
        self.max_overtakes = max_num_seqs if max_overtakes is None else max_overtakes
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.prefill_tokens_per_step = CumulativeHistogram(PREFILL_TOKEN_BUCKETS)
        # keep a few blocks free when admitting, so running requests can grow without instant preemption
        self.watermark = max(1, kv.num_blocks // 100)
        # admission also keeps free this share of the running requests' remaining max_tokens (0: none, vLLM's
        # way; 1: no preemption while every request runs to max_tokens, TensorRT-LLM's "guaranteed no evict");
        # None (auto): the share of their max_tokens that finished requests used, a running average that starts
        # at 1 (until requests finish, admission assumes they run to max_tokens)
        self.reserve_auto = reserve_ratio is None
        self.reserve_ratio = 1.0 if self.reserve_auto else reserve_ratio

    # -- intake ----------------------------------------------------------------------------------------
    def max_blocks_needed(self, req: Request) -> int:
        return self.kv.blocks_needed(min(req.num_prompt_tokens + req.params.max_tokens, self.max_model_len))

    def blocks_to_come(self, req: Request) -> int:
        """Blocks running `req` may still take: to the end of its max_tokens, within the model length."""
        return max(0, self.max_blocks_needed(req) - len(req.block_ids))

    def add(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        if self.policy == "priority":
            self._queue_in_order(req)
        else:
            self.waiting.append(req)

    @staticmethod
    def _order(req: Request) -> tuple[int, float]:
        return req.params.priority, req.arrival_time

    def _queue_in_order(self, req: Request) -> None:
        """Into the waiting queue after every request that comes before it by (priority, arrival): a scan from the
        end, where a new arrival of the common priority goes at once."""
        key = self._order(req)
        i = len(self.waiting)
        while i and self._order(self.waiting[i - 1]) > key:
            i -= 1
        self.waiting.insert(i, req)

    def _victim(self, scheduled: set[int]) -> Request:
        """The running request to preempt, of those not in this step: the newest (fcfs) or the last by (priority,
        arrival), the newest of equals (priority)."""
        candidates = (r for r in reversed(self.running) if id(r) not in scheduled)
        if self.policy == "priority":
            return max(candidates, key=self._order)
        return next(candidates)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def drafting(self) -> bool:
        """Whether the next step may give decode rows draft tokens (speculation on, and not switched off by the
        number of running requests)."""
        p = self.proposer
        return (p is not None and not self.drafting_paused
                and len(self.running) <= (p.cfg.disable_by_batch_size or 1 << 30))

    # -- one step --------------------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        scheduled: set[int] = set()  # id() of the running requests already in this step

        def grow(req: Request, n: int, prefill: bool) -> bool:
            """Blocks for n more tokens of running `req`, preempting the newest running requests not in this
            step; False if req itself had to go."""
            while not self.kv.allocate_slots(req, n):
                victim = self._victim(scheduled)
                self.running.remove(victim)
                self._preempt(victim, batch)
                if victim is req:
                    return False
            scheduled.add(id(req))
            batch.add(req, n, prefill)
            return True

        # 1. decodes: one token each (and a speculating request's drafts), before any prefill
        proposer = self.proposer if self.drafting() else None
        # each draft token is a decode row of its own (the runner's): they fill the batch's free rows, so a step
        # never has more rows than max_num_seqs (the decode graphs' sizes, the logits memory sized at start)
        spare_rows = self.max_num_seqs - len(self.running)
        for req in list(self.running):
            if budget <= 0:
                break
            if req.status is not RequestStatus.RUNNING or req.num_tokens - req.num_computed_tokens != 1:
                continue
            if req.num_pending_tokens and self._ends_at(req, len(req.output_token_ids)) is FinishReason.LENGTH:
                continue  # its last token is in flight: nothing left to compute
            n = 1
            if proposer is not None and budget > 1 and may_speculate(req):
                # the step's tokens end the request at its max_tokens or the model length at the latest
                room = min(budget - 1, spare_rows, req.params.max_tokens - len(req.output_token_ids) - 1,
                           self.max_model_len - req.num_tokens - 1)
                req.draft_token_ids = proposer.propose(req, room)
                if req.draft_token_ids and not self.kv.allocate_slots(req, 1 + len(req.draft_token_ids)):
                    req.draft_token_ids = []  # drafts never preempt anyone
                n += len(req.draft_token_ids)
                spare_rows -= len(req.draft_token_ids)
            if grow(req, n, False):
                budget -= n
                batch.num_draft_tokens += n - 1

        # 2. running prefills (chunked prompts, recomputes), oldest first, within the prefill bound
        prefill_budget = min(self.max_prefill_tokens, budget)
        for req in list(self.running):
            if prefill_budget <= 0:
                break
            left = req.num_tokens - req.num_computed_tokens
            if req.status is not RequestStatus.RUNNING or left <= 1 or id(req) in scheduled:
                continue
            n = min(left, prefill_budget)
            if grow(req, n, True):
                prefill_budget -= n

        # 3. admission, only when no one was preempted this step (they would just thrash)
        i = 0
        reserve = 0  # blocks kept free for the running requests' growth (reserve_ratio)
        if self.reserve_ratio and self.waiting and not batch.preempted:
            reserve = sum(self.blocks_to_come(r) for r in self.running)
        # draft tokens hold batch rows too (each is a row that samples): with them the step stays within
        # max_num_seqs rows of logits, the most the memory sizing allowed for
        while (i < len(self.waiting) and prefill_budget > 0
               and len(self.running) + batch.num_draft_tokens < self.max_num_seqs and not batch.preempted):
            req = self.waiting[i]
            # prompt logprobs need the logits of every prompt position: no cached prefix for those
            cached = (self.kv.match_prefix(req) if req.num_computed_tokens == 0 and not req.needs_prompt_logprobs
                      else [])
            n = min(req.num_tokens - len(cached) * self.kv.block_size, prefill_budget)
            keep = self.watermark + int(self.reserve_ratio * reserve) if self.running else 0
            if not self.kv.can_admit(req, cached, n, keep):
                if req.num_overtaken >= self.max_overtakes:
                    break  # it has let enough others pass: the queue waits for its blocks now
                i += 1     # later requests that fit go first
                continue
            del self.waiting[i]
            self.kv.admit(req, cached)
            if not self.kv.allocate_slots(req, n):  # cannot happen after can_admit; keep the pool honest
                self.kv.free_request(req)
                self.waiting.insert(i, req)
                break
            passed = list(itertools.islice(self.waiting, i))
            for skipped in passed:
                skipped.num_overtaken += 1
            req.status = RequestStatus.RUNNING
            if req.first_scheduled_time is None:
                req.first_scheduled_time = time.monotonic()
            self.running.append(req)
            batch.add(req, n, True)
            prefill_budget -= n
            if self.reserve_ratio:
                reserve += self.blocks_to_come(req)
            if any(r.num_overtaken >= self.max_overtakes for r in passed):
                break  # one it passed has let enough others go first
        if batch:
            self.prefill_tokens_per_step.observe(batch.num_prefill_tokens)
        return batch

    def _preempt(self, req: Request, batch: ScheduledBatch) -> None:
        self.kv.free_request(req)
        req.draft_token_ids = []
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        req.num_overtaken = 0
        if self.policy == "priority":
            self._queue_in_order(req)
        else:
            self.waiting.appendleft(req)
        batch.preempted.append(req)

    # -- after the model ran ----------------------------------------------------------------------------
    def launched(self, batch: ScheduledBatch, sampling: list[Request]) -> list[int]:
        """The runner has queued `batch`: its tokens count as computed, and each sampling request gets a
        placeholder for the token it will receive. Returns each one's index in its output list."""
        for req, n in zip(batch.requests, batch.num_tokens):
            req.num_computed_tokens += n
        slots = []
        for row, req in enumerate(sampling):
            req.output_token_ids.append(PENDING_TOKEN)
            req.num_pending_tokens += 1
            req.pending_row = row
            slots.append(len(req.output_token_ids) - 1)
        return slots

    def resolve(self, batch: ScheduledBatch, sampling: list[Request], slots: list[int],
                token_ids: list[list[int]]) -> list[Request]:
        """The step's sampled ids are on the host: fill them in, finish requests. Returns the finished ones.
        `sampling` must hold only requests not finished since the launch; token_ids[i] are sampling[i]'s new
        tokens: one, or after speculation its confirmed drafts and the token after them (their KV positions past
        the confirmed ones are given back here)."""
        finished = []
        for req, i, toks in zip(sampling, slots, token_ids):
            req.output_token_ids[i] = toks[0]
            req.num_pending_tokens -= 1
            if req.draft_token_ids:  # a speculating step runs alone (no later step in flight): i is the last
                req.output_token_ids[i + 1:i + 1] = toks[1:]
                req.num_computed_tokens -= len(req.draft_token_ids) - (len(toks) - 1)
                req.draft_limit = next_draft_limit(len(req.draft_token_ids), len(toks) - 1,
                                                   self.proposer.cfg.num_speculative_tokens)
                req.draft_token_ids = []
            for j, tok in enumerate(toks):
                reason = self._ends_at(req, i + j + 1, tok)
                if reason is not None:
                    req.finish_reason = reason
                    # a step launched after this one may have added a token past the end: drop it, and any
                    # confirmed draft after the end
                    req.num_pending_tokens -= len(req.output_token_ids) - (i + len(toks))
                    del req.output_token_ids[i + j + 1:]
                    finished.append(req)
                    break
        for req in finished:
            if self.reserve_auto:
                allowed = min(req.params.max_tokens, self.max_model_len - req.num_prompt_tokens)
                used = min(1.0, len(req.output_token_ids) / max(allowed, 1))
                self.reserve_ratio += USAGE_WEIGHT * (used - self.reserve_ratio)
            self.finish(req)
        for req in batch.requests:
            if req.status == RequestStatus.RUNNING:
                self.kv.cache_full_blocks(req)
        return finished

    def _ends_at(self, req: Request, n_out: int, tok: int | None = None) -> FinishReason | None:
        """Why the request ends once it has n_out output tokens, the last being `tok` (None: not known yet)."""
        if tok is not None and req.grammar is not None:  # its matcher has taken `tok` (EngineCore._collect)
            if req.grammar.rejected_token is not None:
                return FinishReason.ERROR
            if req.grammar.terminated:
                return FinishReason.STOP
        if tok is not None and n_out >= req.params.min_tokens and tok in req.stop_token_set:
            return FinishReason.STOP
        if n_out >= req.params.max_tokens or req.num_prompt_tokens + n_out >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def finish(self, req: Request) -> None:
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.status == RequestStatus.WAITING:
            self.waiting.remove(req)
        self.kv.free_request(req)
        req.status = RequestStatus.FINISHED
