"""silu_and_mul: the SwiGLU activation of a fused gate/up projection."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import gdc_enter, launch


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, I, BLOCK: tl.constexpr, USE_GDC: tl.constexpr = False):
    gdc_enter(USE_GDC)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I
    a = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(x_ptr + row * stride_x + I + offs, mask=mask, other=0.0).to(tl.float32)
    y = a / (1.0 + tl.exp(-a)) * g
    tl.store(out_ptr + row * stride_o + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., 2I] -> silu(x[..., :I]) * x[..., I:] with float32 math, in x's dtype."""
    I = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * I)
    assert x2.stride(-1) == 1
    if out is None:
        out = torch.empty(x.shape[:-1] + (I,), dtype=x.dtype, device=x.device)
    o2 = out.view(-1, I)
    T = x2.shape[0]
    if T == 0:
        return out
    block = 1024
    launch(_silu_and_mul_kernel, (T, triton.cdiv(I, block)), x2, o2, x2.stride(0), o2.stride(0), I,
           BLOCK=block, num_warps=4)
    return out
