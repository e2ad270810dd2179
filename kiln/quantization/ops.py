"""The arithmetic of 8-bit weights and activations: per-channel weight quantization, per-token (or static
per-tensor) activation quantization, and the W8A8 matmul.

One home for these numbers: the linear layers (kiln/layers/linear.py), `kiln quantize` and the loader of
compressed-tensors checkpoints all quantize through here, so what is written is what is served.

The CPU path is the reference: int8 through `torch._int_mm` (exact int32 accumulation), FP8 emulated (E4M3
codes cast to float32, scaled fp32 matmul). On CUDA the same math runs through `torch._scaled_mm` (FP8) and
`torch._int_mm` (int8) with the scales applied after; that branch is written but not tested in CI (no GPU).
"""
from __future__ import annotations

import torch

INT8_MAX = 127.0
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448

# Kiln's names of the weight formats it runs; each maps to an 8-bit storage dtype
W8A16, W8A8_INT8, W8A8_FP8 = "w8a16", "w8a8-int8", "w8a8-fp8"
SCHEMES = (W8A16, W8A8_INT8, W8A8_FP8)


def code_dtype(scheme: str) -> torch.dtype:
    return FP8_DTYPE if scheme == W8A8_FP8 else torch.int8


def to_codes(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x / scale as 8-bit codes (round-to-nearest for int8, the float8 cast's rounding for E4M3)."""
    y = x.float() / scale
    if dtype == torch.int8:
        return torch.round(y).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return y.clamp_(-FP8_MAX, FP8_MAX).to(dtype)


def qmax(dtype: torch.dtype) -> float:
    return INT8_MAX if dtype == torch.int8 else FP8_MAX


def channel_scales(w: torch.Tensor, dtype: torch.dtype, absmax: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric per-output-channel scales [N] (float32) of w [N, K]; `absmax` overrides the row maxima
    (row-parallel layers take them over the whole row)."""
    if absmax is None:
        absmax = w.float().abs().amax(dim=1)
    return absmax.float().clamp(min=1e-8) / qmax(dtype)


def quantize_weight(w: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (codes [N, K] of `dtype`, per-channel scales [N] float32) with w ~= codes * scale[:, None]."""
    if scale is None:
        scale = channel_scales(w, dtype)
    return to_codes(w, scale[:, None], dtype), scale


def quantize_activation(x: torch.Tensor, dtype: torch.dtype, static_scale: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (codes, scales [M, 1] float32): dynamic per-token, or one static scale from the checkpoint."""
    if static_scale is not None:
        scale = static_scale.float().reshape(1, 1).expand(x.shape[0], 1)
    else:
        scale = x.float().abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / qmax(dtype)
    return to_codes(x, scale, dtype), scale


def w8a8_linear(x: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor, bias: torch.Tensor | None,
                input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T (+ b) with W = qweight * wscale[:, None] (int8 or E4M3 codes, [N, K]) and x quantized to the
    same 8-bit type per token (or with the static input_scale); accumulation in int32 / fp32, output x.dtype."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    xq, xs = quantize_activation(x2, qweight.dtype, input_scale)
    if x.is_cuda:
        y = _w8a8_cuda(xq, xs, qweight, wscale, x.dtype)
    elif qweight.dtype == torch.int8:
        y = torch._int_mm(xq, qweight.t()).float() * xs * wscale[None, :]
    else:  # FP8 emulated: the E4M3 values are exact in float32
        y = (xq.float() @ qweight.float().t()) * xs * wscale[None, :]
    y = y.to(x.dtype).reshape(*shape[:-1], -1)
    return y if bias is None else y + bias


def _w8a8_cuda(xq, xs, qweight, wscale, out_dtype):  # pragma: no cover - needs a GPU
    if qweight.dtype == torch.int8:
        m = xq.shape[0]
        if m <= 16:  # cuBLAS int8 needs M > 16: pad the few rows of a small decode batch
            xq = torch.nn.functional.pad(xq, (0, 0, 0, 17 - m))
        y = torch._int_mm(xq, qweight.t())[:m]
        return y.float() * xs * wscale[None, :]
    # row-wise scales in the epilogue; qweight.t() of a row-major [N, K] tensor is the column-major B it wants
    return torch._scaled_mm(xq, qweight.t(), scale_a=xs.contiguous(), scale_b=wscale[None, :].float().contiguous(),
                            out_dtype=out_dtype)


def w8a16_reference(x: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor,
                    bias: torch.Tensor | None) -> torch.Tensor:
    return torch.nn.functional.linear(x, qweight.to(x.dtype) * wscale.to(x.dtype)[:, None], bias)
