"""What the int8 cache's int8 Q.K^T (paged_decode_attention's INT8_QK: q quantized per token and head, symmetric,
round half away from zero, its own scale) does to accuracy, on CPU: perplexity of tests/data/perplexity.txt on the
bundled SmolLM2-135M (real weights) with the int8 cache, with q as the model computes it and with q round-tripped
through the same int8 quantization before attention (the scores the kernel computes, up to float rounding).

    .venv/bin/python benchmarks/int8_qk_accuracy.py
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from kiln.layers.attention import TorchAttention
from kiln.models.default_model import default_model_dir
from kiln.models.loader import load_model
from kiln.quantization.calibration import sequence_forward

TEXT = Path(__file__).parent.parent / "tests" / "data" / "perplexity.txt"


class Int8Q(TorchAttention):
    def forward(self, q, k, v, cache, meta, scale):
        qf = q.float()
        s = qf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-30) / 127.0
        q8 = torch.where(qf >= 0, qf / s + 0.5, qf / s - 0.5).trunc().clamp(-127, 127)
        return super().forward((q8 * s).to(q.dtype), k, v, cache, meta, scale)


def ppl(model, ids, kv, backends=None):
    x = torch.tensor(ids)
    with torch.inference_mode():
        h = sequence_forward(model, x, kv, backends=backends)
        logits = model.compute_logits(h[:-1]).float()
        return math.exp(torch.nn.functional.cross_entropy(logits, x[1:]).item())


def main():
    from transformers import AutoTokenizer
    d = default_model_dir()
    ids = AutoTokenizer.from_pretrained(str(d)).encode(TEXT.read_text(), add_special_tokens=False)
    for dtype in (torch.float32, torch.bfloat16):
        model = load_model(d, dtype, torch.device("cpu"))
        n = len(model.model.layers)
        base = ppl(model, ids, "auto")
        int8 = ppl(model, ids, "int8")
        int8_q = ppl(model, ids, "int8", backends=[Int8Q() for _ in range(n)])
        print(f"{str(dtype):>15}: float cache {base:.3f}; int8 cache {int8:.3f} ({(int8 / base - 1) * 100:+.2f}%); "
              f"int8 cache + int8 q {int8_q:.3f} ({(int8_q / base - 1) * 100:+.2f}%), {len(ids)} tokens", flush=True)


if __name__ == "__main__":
    main()
