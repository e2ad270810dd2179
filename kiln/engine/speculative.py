"""Speculative decoding by n-gram lookup in the request's own tokens (prompt lookup decoding).

A decode step of a request that speculates computes its last sampled token plus k draft tokens: the tokens that
followed the most recent earlier occurrence of its last n tokens (n from prompt_lookup_max down to
prompt_lookup_min). The model's logits at those k + 1 positions are sampled as any decode row is, each with the
request's own settings, and the drafts are confirmed up to the first position whose sample differs from its
draft; that sample is the step's last new token (and where all k are confirmed, the sample after the last one).

Why this keeps the output distribution: the draft is one fixed token, so sampling position i from the model's
distribution p_i and keeping the draft when the sample equals it is the rejection rule for a point-mass draft (the
draft is kept with probability p_i(draft), otherwise the sample comes from p_i without the draft). Greedy rows
therefore give exactly the tokens they give without speculation. A row's settings must not depend on the tokens
before it within the step, so requests with penalties, a grammar or min_tokens still masking their stop ids
decode one token at a time.

The runner gives each draft token a decode row of its own (the request's blocks, one more position of context
each), so a speculating step is a decode step of a larger batch (the decode kernel, the decode CUDA graphs); the
scheduler keeps the rows within max_num_seqs.

The positions whose drafts were not confirmed were written to the KV cache: the request's computed count is
moved back over them (the scheduler's `resolve`), and the next step writes its own tokens there.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from kiln.engine.request import Request

MAX_SPECULATIVE_TOKENS = 32


@dataclass(frozen=True)
class SpeculativeConfig:
    """vLLM's `speculative_config` for its n-gram method: {"method": "ngram", "num_speculative_tokens": 5,
    "prompt_lookup_max": 4, "prompt_lookup_min": 2}; disable_by_batch_size turns speculation off while more
    requests than that run (a full batch is compute-bound: verifying drafts there costs more than it saves)."""

    num_speculative_tokens: int
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2
    disable_by_batch_size: int | None = None
    method: str = "ngram"

    @classmethod
    def parse(cls, value: "str | dict[str, Any] | SpeculativeConfig | None") -> "SpeculativeConfig | None":
        """From a JSON object (a flag's or an env var's text) or a dict; None or "" for none. Raises ValueError
        naming what to fix."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            if not value.strip():
                return None
            try:
                value = json.loads(value)
            except ValueError as e:
                raise ValueError(f"speculative config: not JSON ({e}); example: "
                                 '{"method": "ngram", "num_speculative_tokens": 5}') from None
        if not isinstance(value, dict):
            raise ValueError("speculative config: must be a JSON object, e.g. "
                             '{"method": "ngram", "num_speculative_tokens": 5}')
        known = {"method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min", "disable_by_batch_size"}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"speculative config: unknown field(s) {unknown}; known: {sorted(known)}")
        method = value.get("method", "ngram")
        if method != "ngram":
            raise ValueError(f"speculative config: method {method!r} is not supported; Kiln speculates by n-gram "
                             f"lookup only (\"ngram\")")

        def positive(name: str, hi: int | None = None) -> int | None:
            v = value.get(name)
            if v is None:
                return None
            if isinstance(v, bool) or not isinstance(v, int) or v < 1 or (hi is not None and v > hi):
                raise ValueError(f"speculative config: {name} must be an integer in [1, {hi or 'inf'}], got {v!r}")
            return v

        k = positive("num_speculative_tokens", MAX_SPECULATIVE_TOKENS)
        if k is None:
            raise ValueError("speculative config: num_speculative_tokens is required (draft tokens per step, e.g. 5)")
        n_max, n_min = positive("prompt_lookup_max", 64), positive("prompt_lookup_min", 64)
        # one bound given: the other follows it where the default would contradict it
        n_max = n_max or max(cls.prompt_lookup_max, n_min or 0)
        n_min = n_min or min(cls.prompt_lookup_min, n_max)
        if n_min > n_max:
            raise ValueError(f"speculative config: prompt_lookup_min ({n_min}) exceeds prompt_lookup_max ({n_max})")
        return cls(k, n_max, n_min, positive("disable_by_batch_size"))

    def describe(self) -> str:
        return (f"ngram, {self.num_speculative_tokens} draft tokens, lookup {self.prompt_lookup_min}-"
                f"{self.prompt_lookup_max} tokens"
                + (f", off above {self.disable_by_batch_size} running" if self.disable_by_batch_size else ""))


def may_speculate(req: Request) -> bool:
    """Whether every row of a speculating step would be sampled with the request's settings unchanged."""
    p = req.params
    return (req.num_pending_tokens == 0 and not req.needs_output_history and req.grammar is None
            and p.structured is None and not (len(req.output_token_ids) < p.min_tokens and req.stop_token_set))


def lookup(tokens: np.ndarray, k: int, n_min: int, n_max: int) -> list[int]:
    """Up to k tokens that followed an earlier occurrence of the last n tokens, for the largest n in
    [n_min, n_max] that occurs: of the occurrences, the latest one followed by k tokens, else the earliest (the
    longest continuation). [] when none occurs."""
    size = len(tokens)
    if k < 1 or size < n_min + 1:
        return []
    # ends of earlier windows that match the last token (a window must end before the last position)
    ends = np.flatnonzero(tokens[:size - 1] == tokens[size - 1])
    for n in range(min(n_max, size - 1), n_min - 1, -1):
        cand = ends[ends >= n - 1]
        for j in range(1, n):
            if not cand.size:
                break
            cand = cand[tokens[cand - j] == tokens[size - 1 - j]]
        if cand.size:
            full = cand[cand + k < size]
            end = int(full[-1] if full.size else cand[0])
            return tokens[end + 1:end + 1 + k].tolist()
    return []


class NgramProposer:
    def __init__(self, cfg: SpeculativeConfig):
        self.cfg = cfg

    def propose(self, req: Request, limit: int) -> list[int]:
        """Draft tokens for `req` (at most `limit`, the configured number and the request's own draft limit)."""
        k = min(limit, self.cfg.num_speculative_tokens, req.draft_limit or self.cfg.num_speculative_tokens)
        if k < 1:
            return []
        return lookup(token_history(req), k, self.cfg.prompt_lookup_min, self.cfg.prompt_lookup_max)


def token_history(req: Request) -> np.ndarray:
    """The request's known tokens (prompt + output) as an int64 array, kept on the request and grown by what
    is new since the last call (a copy of the whole history each step would cost O(length) in Python)."""
    total = req.num_tokens
    buf, n = req.history_array, min(req.history_len, total)
    if buf is None or len(buf) < total:
        grown = np.empty(max(2 * total, 64), dtype=np.int64)
        if buf is not None:
            grown[:n] = buf[:n]
        buf = req.history_array = grown
    if n < req.num_prompt_tokens:
        buf[n:req.num_prompt_tokens] = req.prompt_token_ids[n:]
        n = req.num_prompt_tokens
    if n < total:
        buf[n:total] = req.output_token_ids[n - req.num_prompt_tokens:]
    req.history_len = total
    return buf[:total]


def next_draft_limit(drafted: int, confirmed_count: int, k: int) -> int:
    """How many drafts a request may carry next step: twice as many after all were confirmed (up to k), one more
    than were confirmed otherwise. Each unconfirmed draft costs a row of compute (on a CPU, or a GPU near its
    compute bound, nearly as much as a token); on free text, where lookups rarely come true, this keeps that cost
    at about one row a step, and on copied text it is back to k in a few steps."""
    if confirmed_count == drafted:
        return min(k, 2 * drafted)
    return confirmed_count + 1


def confirmed(drafts: list[int], sampled: list[int]) -> int:
    """How many drafts the step's samples confirm: sampled[i] is the model's token at draft i's position."""
    a = 0
    while a < len(drafts) and sampled[a] == drafts[a]:
        a += 1
    return a


@dataclass
class SpecDecodeStats:
    """Totals since ready (vLLM's spec-decode counters): steps that verified drafts, drafts, confirmed drafts."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    def record(self, num_draft_tokens: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
