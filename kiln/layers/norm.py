"""RMSNorm (with the fused residual add the decoder layers use)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kiln.quantization.ops import InputQuant, QuantizedRows


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, out_quant: InputQuant | None = None):
        """Without residual: norm(x). With residual: (norm(x + residual), x + residual). out_quant (the next
        layer's input_quant, CUDA): norm(...) as that layer's 8-bit input (QuantizedRows), in the same kernel."""
        if out_quant is not None:  # given on CUDA only (kiln.quantization.ops.producers_quantize_on)
            from kiln import kernels
            q = out_quant
            codes, scales, res = kernels.rmsnorm_quant(x, self.weight, self.eps, q.dtype, q.static_scale,
                                                       q.pad_rows, residual)
            rows = QuantizedRows(codes, scales, q.rows, x.dtype)
            return rows if residual is None else (rows, res)
        if x.is_cuda:  # one fused Triton kernel instead of ~8 elementwise launches
            from kiln import kernels
            if residual is None:
                return kernels.rmsnorm(x.reshape(-1, x.shape[-1]), self.weight, self.eps).view(x.shape)
            return kernels.fused_add_rmsnorm(x, residual, self.weight, self.eps)
        if residual is None:
            return self._cpu_norm(x)
        x = x + residual
        return self._cpu_norm(x), x

    def _cpu_norm(self, x: torch.Tensor) -> torch.Tensor:
        # torch's fused kernel: one op instead of six (float32 math, as Hugging Face; bf16 outputs within one ulp)
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
