"""What running an fp8 (E4M3) cache's attention products on the fp8 tensor cores would do to accuracy, on CPU:
perplexity of tests/data/perplexity.txt on the bundled SmolLM2-135M (real weights) with the fp8 cache (scales
1.0), with q as the model computes it, with q rounded to E4M3 per token and head (its own scale: max |q| / 448)
for Q.K^T, and with that and P (the softmax numerator, exp(s - max), in (0, 1]) rounded to E4M3 after scaling by 256
(so that weights down to ~1e-5 stay normal) for P.V, the row sums kept in float32 -- the scores and outputs such a
decode kernel computes, up to float rounding.

    .venv/bin/python benchmarks/fp8_mma_accuracy.py
"""
from __future__ import annotations

from pathlib import Path

import torch

from kiln.layers.attention import TorchAttention
from kiln.models.default_model import default_model_dir
from kiln.models.loader import load_model

from int8_qk_accuracy import ppl  # this folder's; the same perplexity

TEXT = Path(__file__).parent.parent / "tests" / "data" / "perplexity.txt"
E4M3 = torch.float8_e4m3fn
P_SCALE = 256.0


def e4m3(x: torch.Tensor) -> torch.Tensor:
    return x.to(E4M3).float()


class Fp8Products(TorchAttention):
    """The prefill path with materialized scores: q through E4M3 (per token and head), and optionally P too."""

    def __init__(self, round_p: bool):
        self.round_p = round_p

    def forward(self, q, k, v, cache, meta, scale, rope=None):
        if rope is not None:
            q, k = rope[0](rope[1], q, k)
        self.write_kv(cache, k, v, meta.slot_mapping)
        out = torch.empty_like(q)
        start = 0
        for b, (qlen, slen) in enumerate(zip(meta.query_lens_list, meta.seq_lens_list)):
            kb, vb = self._gather(cache, meta.block_tables[b], slen, q.dtype)  # [S, Hkv, D], the cache's values
            rep = q.shape[1] // kb.shape[1]
            kb, vb = kb.repeat_interleave(rep, 1).transpose(0, 1), vb.repeat_interleave(rep, 1).transpose(0, 1)
            qf = q[start:start + qlen].float()
            qs = qf.abs().amax(-1, keepdim=True).clamp(min=1e-30) / 448.0
            q8 = (e4m3(qf / qs) * qs).transpose(0, 1)                              # [H, Q, D]
            s = q8 @ kb.transpose(1, 2) * scale                                     # [H, Q, S]
            pos_q = torch.arange(slen - qlen, slen)[:, None]
            s = s.masked_fill(torch.arange(slen)[None, :] > pos_q, float("-inf"))
            p = torch.exp(s - s.amax(-1, keepdim=True))
            l = p.sum(-1, keepdim=True)
            if self.round_p:
                p = e4m3(p * P_SCALE) / P_SCALE
            out[start:start + qlen] = ((p @ vb) / l).transpose(0, 1).to(q.dtype)
            start += qlen
        return out


def main():
    from transformers import AutoTokenizer
    d = default_model_dir()
    ids = AutoTokenizer.from_pretrained(str(d)).encode(TEXT.read_text(), add_special_tokens=False)
    model = load_model(d, torch.float32, torch.device("cpu"))
    n = len(model.model.layers)
    base = ppl(model, ids, "auto")
    fp8 = ppl(model, ids, "fp8")
    q8 = ppl(model, ids, "fp8", backends=[Fp8Products(False) for _ in range(n)])
    qp8 = ppl(model, ids, "fp8", backends=[Fp8Products(True) for _ in range(n)])
    rel = lambda x: f"{x:.3f} ({(x / base - 1) * 100:+.2f}%)"  # noqa: E731
    print(f"float32, {len(ids)} tokens: float cache {base:.3f}; fp8 cache {rel(fp8)}; fp8 cache + E4M3 q "
          f"{rel(q8)}; + E4M3 P {rel(qp8)}", flush=True)


if __name__ == "__main__":
    main()
