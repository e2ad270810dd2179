"""Batched sampling with per-request parameters, on the logits' device.

Order, as in Hugging Face's processors: penalties (repetition over prompt+output, frequency/presence over the
output), min_tokens (stop ids masked), then temperature, top-k, top-p, min-p, then a draw. Greedy rows take the
argmax of the penalised logits. A draw is argmax(p / E) with E ~ Exp(1) (the Gumbel-max trick in another form),
so a request with a seed takes its noise from its own generator: same seed, same output, whatever the batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.engine.request import Request


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # per row, when asked: (logprob of the sampled token, [(token_id, logprob), ...] top-n)
    logprobs: list[tuple[float, list[tuple[int, float]]] | None]


class Sampler:
    def __call__(self, logits: torch.Tensor, reqs: list[Request]) -> SamplerOutput:
        logits = logits.float()
        dev = logits.device
        b, vocab = logits.shape
        params = [r.params for r in reqs]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(p.logprobs is not None for p in params) else None

        if any(p.repetition_penalty != 1.0 or p.frequency_penalty or p.presence_penalty for p in params):
            logits = self._apply_penalties(logits, reqs, vocab)
        if any(len(r.output_token_ids) < r.params.min_tokens and r.stop_token_set for r in reqs):
            for i, r in enumerate(reqs):
                if len(r.output_token_ids) < r.params.min_tokens and r.stop_token_set:
                    ids = torch.tensor([t for t in r.stop_token_set if t < vocab], dtype=torch.long, device=dev)
                    logits[i, ids] = float("-inf")

        greedy_ids = logits.argmax(dim=-1)
        if all(p.greedy for p in params):
            ids = greedy_ids
        else:
            greedy = torch.tensor([p.greedy for p in params], device=dev)
            temp = torch.tensor([1.0 if p.greedy else p.temperature for p in params], device=dev)
            scaled = logits / temp[:, None]
            if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
                scaled = self._top_k_top_p(scaled, params, vocab)
            probs = torch.softmax(scaled, dim=-1)
            if any(p.min_p > 0 for p in params):
                min_p = torch.tensor([p.min_p for p in params], device=dev)
                probs = probs.masked_fill(probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values, 0.0)
            noise = torch.empty_like(probs).exponential_()
            for i, r in enumerate(reqs):
                if r.params.seed is not None and not r.params.greedy:
                    if r.generator is None:
                        r.generator = torch.Generator(device=dev).manual_seed(r.params.seed)
                    noise[i] = torch.empty(vocab, device=dev).exponential_(generator=r.generator)
            sampled = (probs / noise).argmax(dim=-1)
            ids = torch.where(greedy, greedy_ids, sampled)

        token_ids = ids.tolist()  # the one host sync per step
        logprobs: list = [None] * b
        if raw_logprobs is not None:
            for i, p in enumerate(params):
                if p.logprobs is None:
                    continue
                row = raw_logprobs[i]
                chosen = float(row[token_ids[i]])
                top = []
                if p.logprobs > 0:
                    vals, idx = row.topk(p.logprobs)
                    top = list(zip(idx.tolist(), vals.tolist()))
                logprobs[i] = (chosen, top)
        return SamplerOutput(token_ids, logprobs)

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, reqs: list[Request], vocab: int) -> torch.Tensor:
        dev = logits.device
        b = len(reqs)
        rep = torch.tensor([r.params.repetition_penalty for r in reqs], device=dev)
        freq = torch.tensor([r.params.frequency_penalty for r in reqs], device=dev)
        pres = torch.tensor([r.params.presence_penalty for r in reqs], device=dev)

        max_out = max(1, max(len(r.output_token_ids) for r in reqs))
        out_ids = torch.full((b, max_out), vocab, dtype=torch.long)
        for i, r in enumerate(reqs):
            if r.output_token_ids:
                out_ids[i, :len(r.output_token_ids)] = torch.tensor(r.output_token_ids)
        out_ids = out_ids.to(dev)
        counts = torch.zeros(b, vocab + 1, device=dev).scatter_add_(1, out_ids, torch.ones_like(out_ids, dtype=torch.float))
        counts = counts[:, :vocab]

        if bool((rep != 1.0).any()):
            max_p = max(1, max(len(r.prompt_token_ids) for r in reqs))
            p_ids = torch.full((b, max_p), vocab, dtype=torch.long)
            for i, r in enumerate(reqs):
                p_ids[i, :len(r.prompt_token_ids)] = torch.tensor(r.prompt_token_ids)
            seen = torch.zeros(b, vocab + 1, dtype=torch.bool, device=dev)
            seen.scatter_(1, p_ids.to(dev), True)
            seen = seen[:, :vocab] | (counts > 0)
            penalised = torch.where(logits > 0, logits / rep[:, None], logits * rep[:, None])
            logits = torch.where(seen, penalised, logits)
        logits = logits - freq[:, None] * counts - pres[:, None] * (counts > 0).float()
        return logits

    @staticmethod
    def _top_k_top_p(logits: torch.Tensor, params, vocab: int) -> torch.Tensor:
        dev = logits.device
        top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=dev)
        top_p = torch.tensor([p.top_p for p in params], device=dev)
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        rank = torch.arange(vocab, device=dev)[None, :]
        mask = rank >= top_k[:, None]
        sorted_logits = sorted_logits.masked_fill(mask, float("-inf"))
        probs = sorted_logits.softmax(dim=-1)
        cum_before = probs.cumsum(dim=-1) - probs
        mask = cum_before >= top_p[:, None]   # keep the smallest prefix whose mass reaches top_p
        mask[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(mask, float("-inf"))
        return torch.empty_like(logits).scatter_(1, order, sorted_logits)
