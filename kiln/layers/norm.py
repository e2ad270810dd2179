"""RMSNorm (with the fused residual add the decoder layers use)."""
from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # float32 statistics, as Hugging Face does, so bf16 outputs round the same way
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Without residual: norm(x). With residual: (norm(x + residual), x + residual)."""
        if x.is_cuda:  # one fused Triton kernel instead of ~8 elementwise launches
            from kiln import kernels
            if residual is None:
                return kernels.rmsnorm(x.reshape(-1, x.shape[-1]), self.weight, self.eps).view(x.shape)
            return kernels.fused_add_rmsnorm(x, residual, self.weight, self.eps)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x
