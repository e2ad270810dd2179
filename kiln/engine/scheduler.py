"""Continuous batching under a per-step token budget.

Every request, running or waiting, is just "tokens known" vs "tokens whose K/V are computed". A step hands
each running request the tokens it still needs (1 for a decode, a chunk for a long prefill) and then admits
waiting requests FIFO while the budget, the batch slots and the KV blocks allow. Prefill and decode share a
step; a prompt longer than the budget is prefilled in chunks over several steps. When blocks run out, the
newest running request is preempted: its blocks are freed and it is recomputed later from its tokens.

A step has two halves: `launched` (right after the runner queued it: computed counts advance and every
sampling request gets a PENDING_TOKEN) and `resolve` (when its ids reach the host: tokens filled in, stops
checked). Under async scheduling the next step is scheduled between the two, so a request may be scheduled
once more after the step that ends it; that step's token is dropped. A request whose max_tokens or the model
length is reached by its in-flight token is not scheduled again.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from kiln.engine.kv_cache import KVCacheManager
from kiln.engine.request import PENDING_TOKEN, FinishReason, Request, RequestStatus


@dataclass
class ScheduledBatch:
    requests: list[Request] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)     # tokens to compute this step, per request
    preempted: list[Request] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    def __bool__(self) -> bool:
        return bool(self.requests)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        # keep a few blocks free when admitting, so running requests can grow without instant preemption
        self.watermark = max(1, kv.num_blocks // 100)

    # -- intake ----------------------------------------------------------------------------------------
    def max_blocks_needed(self, req: Request) -> int:
        return self.kv.blocks_needed(min(req.num_prompt_tokens + req.params.max_tokens, self.max_model_len))

    def add(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step --------------------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if req.num_pending_tokens and self._ends_at(req, len(req.output_token_ids)) is FinishReason.LENGTH:
                i += 1  # its last token is in flight: nothing left to compute
                continue
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.kv.allocate_slots(req, n):
                victim = self.running.pop()      # the newest
                self._preempt(victim, batch)
                if victim is req:
                    break
            else:
                batch.requests.append(req)
                batch.num_tokens.append(n)
                budget -= n
                i += 1
                continue
            break  # req itself was preempted: everything after it is gone too

        # admit waiting requests only when no one was preempted this step (they would just thrash)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not batch.preempted:
            req = self.waiting[0]
            cached = self.kv.match_prefix(req) if req.num_computed_tokens == 0 else []
            n = min(req.num_tokens - len(cached) * self.kv.block_size, budget)
            if not self.kv.can_admit(req, cached, n, self.watermark if self.running else 0):
                break  # FIFO: the head waits for blocks, nobody overtakes it
            self.waiting.popleft()
            self.kv.admit(req, cached)
            if not self.kv.allocate_slots(req, n):  # cannot happen after can_admit; keep the pool honest
                self.kv.free_request(req)
                self.waiting.appendleft(req)
                break
            req.status = RequestStatus.RUNNING
            if req.first_scheduled_time is None:
                req.first_scheduled_time = time.monotonic()
            self.running.append(req)
            batch.requests.append(req)
            batch.num_tokens.append(n)
            budget -= n
        return batch

    def _preempt(self, req: Request, batch: ScheduledBatch) -> None:
        self.kv.free_request(req)
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
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
                token_ids: list[int]) -> list[Request]:
        """The step's sampled ids are on the host: fill them in, finish requests. Returns the finished ones.
        `sampling` must hold only requests not finished since the launch."""
        finished = []
        for req, i, tok in zip(sampling, slots, token_ids):
            req.output_token_ids[i] = tok
            req.num_pending_tokens -= 1
            reason = self._ends_at(req, i + 1, tok)
            if reason is not None:
                req.finish_reason = reason
                # a step launched after this one may have added a token past the end: drop it
                req.num_pending_tokens -= len(req.output_token_ids) - (i + 1)
                del req.output_token_ids[i + 1:]
                finished.append(req)
        for req in finished:
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
