"""Batched sampling with per-request parameters, on the logits' device.

Order, as in Hugging Face's processors: penalties (repetition over prompt+output, frequency/presence over the
output), min_tokens (stop ids masked), then temperature, top-k, top-p, min-p, then a draw. Greedy rows take the
argmax of the penalised logits. A draw is argmax(p / E) with E ~ Exp(1) (the Gumbel-max trick in another form),
so a request with a seed takes its noise from its own generator: same seed, same output, whatever the batch.

Nothing here waits for the GPU: per-row parameters go up through pinned memory, and the sampled ids (and
logprobs) come back through a non-blocking copy that `PendingSample.result()` waits for. That is what lets the
engine launch the next step before this one's ids reach the host (async scheduling).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from kiln import kernels
from kiln.engine.request import Request
from kiln.engine.structured import GrammarMasks

log = logging.getLogger("kiln.sampler")


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # per row, when asked: (logprob of the sampled token, [(token_id, logprob), ...] top-n)
    logprobs: list[tuple[float, list[tuple[int, float]]] | None]
    failed_rows: list[int] = field(default_factory=list)  # rows whose request could not be sampled: end them


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on the device without a stream sync (a plain .to(cuda) from pageable memory waits for all
    queued GPU work). The pinned source is kept alive by PyTorch's host allocator until the copy has run."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def rows_to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on the device without a stream sync."""
    return host_to_device(torch.tensor(values, dtype=dtype), device)


def _top_p_threshold(logits: torch.Tensor, top_p: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """The Triton nucleus search on a GPU, the sort on CPU (where the interpreter would be slow)."""
    if logits.is_cuda and kernels.HAS_TRITON:
        return kernels.top_p_threshold(logits, top_p, floor)
    return kernels.reference.top_p_threshold(logits, top_p, floor)


def _padded_ids(rows: list, pad: int, device: torch.device) -> torch.Tensor:
    """[len(rows), longest row (at least 1)] int64 on the device, each row's ids (a list or an array) then `pad`."""
    ids = np.full((len(rows), max(1, max(map(len, rows), default=1))), pad, dtype=np.int64)
    for i, row in enumerate(rows):
        if len(row):
            ids[i, :len(row)] = row
    return host_to_device(torch.from_numpy(ids), device)


def _prompt_array(r: Request) -> np.ndarray:
    """The request's prompt ids as a numpy array, made once (penalties read them every step)."""
    if r.prompt_ids_array is None:
        r.prompt_ids_array = np.asarray(r.prompt_token_ids, dtype=np.int64)
    return r.prompt_ids_array


def token_logprobs(logprobs: torch.Tensor, ids: torch.Tensor, k: int):
    """From log-probabilities [rows, vocab] (float32): (logprob of ids[i] in row i, each row's top k logprobs, their
    ids; None, None for k = 0). For k = 1 a max, not a top-k select: on an H100 torch's radix top-k over a 128k
    vocabulary takes ~0.5 ms for 256 rows, the max ~0.06 (docs/benchmarks.md, runs AY and AZ; a log-sum-exp less the
    raw logits instead of the fused log-softmax was slower still: torch's logsumexp is five passes)."""
    chosen = logprobs.gather(1, ids[:, None])[:, 0]
    if not k:
        return chosen, None, None
    vals, idx = logprobs.max(dim=-1, keepdim=True) if k == 1 else logprobs.topk(k, dim=-1)
    return chosen, vals, idx


class PendingSample:
    """A step's sampled ids on the device, on their way to the host."""

    def __init__(self, ids: torch.Tensor, num_logprobs: list[int | None], chosen: torch.Tensor | None,
                 top_vals: torch.Tensor | None, top_idx: torch.Tensor | None, failed_rows: list[int] = ()):
        self.ids = ids  # stays on the device: the next step reads its in-flight input tokens from here
        self.failed_rows = list(failed_rows)
        self.num_logprobs = num_logprobs
        tensors = [t for t in (ids, chosen, top_vals, top_idx) if t is not None]
        self._ready = None
        if ids.is_cuda:
            host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
            for h, t in zip(host, tensors):
                h.copy_(t, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
            tensors = host
        self._host = tensors

    def result(self) -> SamplerOutput:
        if self._ready is not None:
            self._ready.synchronize()  # the one wait per step: only for this step's copy, not later work
        ids, *rest = self._host
        token_ids = ids.tolist()
        logprobs: list = [None] * len(token_ids)
        if rest:
            chosen = rest[0].tolist()
            top_vals, top_idx = (rest[1].tolist(), rest[2].tolist()) if len(rest) == 3 else (None, None)
            for i, n in enumerate(self.num_logprobs):
                if n is None:
                    continue
                top = list(zip(top_idx[i][:n], top_vals[i][:n])) if n > 0 else []
                logprobs[i] = (chosen[i], top)
        return SamplerOutput(token_ids, logprobs, self.failed_rows)


@dataclass
class _Row:
    """One request's sampling settings for this step, checked on the host."""
    greedy: bool
    temperature: float
    top_k: int              # 1..vocab (vocab: off)
    top_p: float
    min_p: float
    masked_ids: list[int]   # stop ids masked until min_tokens
    logprobs: int | None
    bias: Sequence[tuple[int, float]] = ()  # logit_bias


_NEUTRAL = _Row(True, 1.0, 1 << 62, 1.0, 0.0, [], None)  # top_k past any vocabulary: off


def _penalised(r: Request) -> bool:
    p = r.params
    return p.repetition_penalty != 1.0 or bool(p.frequency_penalty) or bool(p.presence_penalty)


class Sampler:
    def __init__(self):
        self.grammar_masks = GrammarMasks()

    def __call__(self, logits: torch.Tensor, reqs: list[Request]) -> SamplerOutput:
        return self.sample(logits, reqs).result()

    @staticmethod
    def _row(r: Request, vocab: int) -> _Row:
        """Raises when the request's state cannot be sampled (the engine validates at admission; this guards
        the step against anything that slipped through)."""
        p = r.params
        masked: list[int] = []
        if len(r.output_token_ids) < p.min_tokens and r.stop_token_set and r.grammar is None:  # a grammar decides
            masked = sorted(r.stop_token_set)
            if masked[0] < 0:
                raise ValueError(f"negative stop token id {masked[0]}")
            masked = [t for t in masked if t < vocab]  # a model's own eos id may lie past its logits
        if not isinstance(p.top_k, int) or p.top_k < 0:
            raise ValueError(f"bad top_k {p.top_k!r}")
        if any(not 0 <= t < vocab for t, _ in p.logit_bias):
            raise ValueError(f"logit_bias token id outside the logits [0, {vocab})")
        return _Row(p.greedy, 1.0 if p.greedy else float(p.temperature), min(p.top_k, vocab) or vocab,
                    float(p.top_p), float(p.min_p), masked, p.logprobs, p.logit_bias)

    @staticmethod
    def paths(reqs: list[Request]) -> frozenset[str]:
        """The code paths of `sample` these rows take (kiln/engine/variants.py: what a warm-up must reach)."""
        out = set()
        for r in reqs:
            p = r.params
            if p.greedy:
                out.add("greedy")
            else:
                out.add("seeded" if p.seed is not None else "random")
                if p.top_k or p.top_p < 1.0:
                    out.add("top_k_top_p")
                if p.min_p > 0:
                    out.add("min_p")
            if r.needs_output_history:
                out.add("penalties")
            if len(r.output_token_ids) < p.min_tokens and r.stop_token_set and r.grammar is None:
                out.add("min_tokens")
            if p.logprobs is not None:
                out.add("logprobs" if p.logprobs == 0 else "top_logprobs")
            if r.grammar is not None:
                out.add("grammar")
            if p.logit_bias:
                out.add("logit_bias")
        return frozenset(out)

    def sample(self, logits: torch.Tensor, reqs: list[Request]) -> PendingSample:
        """logits: [rows, vocab] in any float dtype (the decode graphs hand over bf16 ones); float32 only where a
        row needs more than an argmax (the conversion and an argmax over twice the bytes: ~0.2 ms a step at batch
        323 on an H100 with a 128k vocabulary)."""
        dev = logits.device
        b, vocab = logits.shape
        # Per-request host work first: a request that fails it is sampled greedily with neutral settings and
        # reported in failed_rows, so it ends alone and the step goes on for the others.
        rows: list[_Row] = []
        failed: list[int] = []
        for i, r in enumerate(reqs):
            try:
                rows.append(self._row(r, vocab))
            except Exception as e:  # noqa: BLE001 - whatever it is, it belongs to this request only
                log.error("request %s cannot be sampled, ending it: %s", r.request_id, e)
                rows.append(_NEUTRAL)
                failed.append(i)
        if all(w.greedy and w.logprobs is None and not w.masked_ids and not w.bias for w in rows) and not any(
                _penalised(r) or r.grammar is not None for r in reqs):
            # every row takes the argmax of its raw logits: float32 holds a bf16 value exactly, so the ids are
            # those of the float32 path, ties included (the first index of the maximum either way)
            return PendingSample(logits.argmax(dim=-1), [None] * b, None, None, None, failed)
        logits = logits.float()
        # the model's distribution: logprobs are of these (before penalties, biases and masks)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(w.logprobs is not None for w in rows) else None

        if any(_penalised(r) for r in reqs):
            logits = self._apply_penalties(logits, reqs, vocab)
        # every row's logit_bias in one index_add_ on the flat logits (the ids and biases in one host copy each)
        biased = [(i * vocab + t, b) for i, w in enumerate(rows) for t, b in w.bias]
        if biased:
            logits = logits.contiguous()
            logits.view(-1).index_add_(0, rows_to_device([j for j, _ in biased], torch.long, dev),
                                       rows_to_device([b for _, b in biased], torch.float32, dev))
        # every row's masked stop ids in one copy and one index_fill_ on the flat logits (one copy per row cost run O's
        # 64 streams of the native API, whose min_dec_len masks EOS, 3.3 ms a step on an H100; an indexed assignment
        # of a Python float copies it from pageable memory, a stream sync that made every such step wait for its
        # forward: run Q)
        masked = [i * vocab + t for i, w in enumerate(rows) for t in w.masked_ids]
        if masked:
            logits = logits.contiguous()
            logits.view(-1).index_fill_(0, rows_to_device(masked, torch.long, dev), float("-inf"))
        if any(r.grammar is not None for r in reqs):
            self.grammar_masks.apply(logits, reqs)  # rows with a grammar keep only the tokens it allows

        greedy_ids = logits.argmax(dim=-1)
        if all(w.greedy for w in rows):
            ids = greedy_ids
        else:
            greedy = rows_to_device([w.greedy for w in rows], torch.bool, dev)
            temp = rows_to_device([w.temperature for w in rows], torch.float32, dev)
            scaled = logits / temp[:, None]
            if any(w.top_k < vocab or w.top_p < 1.0 for w in rows):
                scaled = self._top_k_top_p(scaled, rows, vocab)
            probs = torch.softmax(scaled, dim=-1)
            if any(w.min_p > 0 for w in rows):
                min_p = rows_to_device([w.min_p for w in rows], torch.float32, dev)
                probs = probs.masked_fill(probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values, 0.0)
            noise = torch.empty_like(probs).exponential_()
            for i, r in enumerate(reqs):
                if r.params.seed is not None and not rows[i].greedy:
                    try:
                        if r.generator is None:
                            r.generator = torch.Generator(device=dev).manual_seed(r.params.seed)
                        noise[i] = torch.empty(vocab, device=dev).exponential_(generator=r.generator)
                    except Exception as e:  # noqa: BLE001 - this request's seed only
                        log.error("request %s: seeded sampling failed, ending it: %s", r.request_id, e)
                        failed.append(i)
            sampled = (probs / noise).argmax(dim=-1)
            ids = torch.where(greedy, greedy_ids, sampled)

        chosen = top_vals = top_idx = None
        if raw_logprobs is not None:
            chosen, top_vals, top_idx = token_logprobs(raw_logprobs, ids, max(w.logprobs or 0 for w in rows))
        return PendingSample(ids, [w.logprobs for w in rows], chosen, top_vals, top_idx, sorted(set(failed)))

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, reqs: list[Request], vocab: int) -> torch.Tensor:
        dev = logits.device
        b = len(reqs)
        rep = rows_to_device([r.params.repetition_penalty for r in reqs], torch.float32, dev)
        freq = rows_to_device([r.params.frequency_penalty for r in reqs], torch.float32, dev)
        pres = rows_to_device([r.params.presence_penalty for r in reqs], torch.float32, dev)

        # the token ids of the penalised rows (none for the others: they may hold a token still in flight, which
        # a step overlapping theirs cannot read; such rows have neutral penalties), padded with `vocab` (a column
        # dropped below), filled through numpy (a torch.tensor per row took 47 ms at 256 rows of 1,000 ids on the
        # CI CPU, numpy 5.5 ms; a prompt's array is made once)
        penalised = [_penalised(r) for r in reqs]
        out_ids = _padded_ids([r.output_token_ids if p else () for r, p in zip(reqs, penalised)], vocab, dev)
        counts = torch.zeros(b, vocab + 1, device=dev).scatter_add_(1, out_ids, torch.ones_like(out_ids, dtype=torch.float))
        counts = counts[:, :vocab]

        if any(r.params.repetition_penalty != 1.0 for r in reqs):
            p_ids = _padded_ids([_prompt_array(r) if p else () for r, p in zip(reqs, penalised)], vocab, dev)
            seen = torch.zeros(b, vocab + 1, dtype=torch.bool, device=dev)
            seen.scatter_(1, p_ids, True)
            seen = seen[:, :vocab] | (counts > 0)
            penalised = torch.where(logits > 0, logits / rep[:, None], logits * rep[:, None])
            logits = torch.where(seen, penalised, logits)
        logits = logits - freq[:, None] * counts - pres[:, None] * (counts > 0).float()
        return logits

    @staticmethod
    def _top_k_top_p(logits: torch.Tensor, rows: list[_Row], vocab: int) -> torch.Tensor:
        """Each row's logits below its top-k and top-p cuts set to -inf; ties at a cut are kept. No full sort (it
        took 5.2 ms a step at 256 rows of a 128k vocabulary on an H100, run Q): top-k's cut is the k-th value of
        one torch.topk for the largest k, top-p's the nucleus search of kiln.kernels.top_p_threshold on a GPU
        (the same cut by sorting on CPU), over the logits the top-k cut keeps."""
        dev = logits.device
        b = logits.shape[0]
        ks = [w.top_k for w in rows]
        floor = torch.full((b,), float("-inf"), device=dev)
        if any(k < vocab for k in ks):
            k_max = max(k for k in ks if k < vocab)
            kth = logits.topk(k_max, dim=-1, sorted=True).values
            pick = rows_to_device([k - 1 if k < vocab else -1 for k in ks], torch.long, dev)  # -1: no top-k
            floor = torch.where(pick >= 0, kth.gather(1, pick.clamp(min=0)[:, None])[:, 0], floor)
        cut = floor
        if any(w.top_p < 1.0 for w in rows):
            top_p = rows_to_device([w.top_p for w in rows], torch.float32, dev)
            # a top_p of 1 keeps all: its search's target is the whole mass, which rounding can put just out of
            # reach, cutting the row's tail (and making the row's draw depend on whether its batch had top-p rows)
            cut = torch.where(top_p < 1.0, _top_p_threshold(logits.contiguous(), top_p, floor), floor)
        return logits.masked_fill(logits < cut[:, None], float("-inf"))
