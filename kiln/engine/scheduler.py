"""Continuous batching under a per-step token budget.

Every request, running or waiting, is just "tokens known" vs "tokens whose K/V are computed". A step hands
each running request the tokens it still needs (1 for a decode, a chunk for a long prefill) and then admits
waiting requests FIFO while the budget, the batch slots and the KV blocks allow. Prefill and decode share a
step; a prompt longer than the budget is prefilled in chunks over several steps. When blocks run out, the
newest running request is preempted: its blocks are freed and it is recomputed later from its tokens.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from kiln.engine.kv_cache import KVCacheManager
from kiln.engine.request import FinishReason, Request, RequestStatus


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
    def update(self, batch: ScheduledBatch, sampled: dict[str, int]) -> list[Request]:
        """Advance computed counts, append sampled tokens, finish requests. Returns the finished ones."""
        finished = []
        for req, n in zip(batch.requests, batch.num_tokens):
            req.num_computed_tokens += n
            tok = sampled.get(req.request_id)
            if tok is not None:
                req.output_token_ids.append(tok)
                reason = self.check_stop(req, tok)
                if reason is not None:
                    req.finish_reason = reason
                    finished.append(req)
            self.kv.cache_full_blocks(req)
        for req in finished:
            self.finish(req)
        return finished

    def check_stop(self, req: Request, tok: int) -> FinishReason | None:
        n_out = len(req.output_token_ids)
        if n_out >= req.params.min_tokens and tok in req.stop_token_set:
            return FinishReason.STOP
        if n_out >= req.params.max_tokens or req.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def finish(self, req: Request) -> None:
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.status == RequestStatus.WAITING:
            self.waiting.remove(req)
        self.kv.free_request(req)
        req.status = RequestStatus.FINISHED
