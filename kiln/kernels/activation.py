"""silu_and_mul: the SwiGLU activation of a fused gate/up projection, optionally quantized for a W8A8 down_proj."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import gdc_enter, launch, next_pow2
from .quant import ONE_TILE_MAX_K, codes_and_scales, quant_constants, store_row_codes


# T (the live rows) changes with traffic: not specialized on, so no variant compiles after warm-up (docs/kernels.md)
@triton.jit(do_not_specialize=['T'])
def _silu_and_mul_kernel(x_ptr, out_ptr, scale_ptr, static_ptr, stride_x, stride_o, T, I, BLOCK: tl.constexpr,
                         QUANT: tl.constexpr = False, INT8: tl.constexpr = False, QMAX: tl.constexpr = 0.0,
                         STATIC: tl.constexpr = False, USE_GDC: tl.constexpr = False):
    # QUANT: a program takes a whole row (BLOCK >= I) and writes its 8-bit codes and scale; rows T.. of the grid
    # are padding (zero codes)
    gdc_enter(USE_GDC)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I
    live = offs < tl.where(row < T, I, 0)  # padding rows load nothing
    a = tl.load(x_ptr + row * stride_x + offs, mask=live, other=0.0).to(tl.float32)
    g = tl.load(x_ptr + row * stride_x + I + offs, mask=live, other=0.0).to(tl.float32)
    y = a / (1.0 + tl.exp(-a)) * g
    if QUANT:
        # rounded to the activation dtype first, as the unfused output is
        y = y.to(x_ptr.dtype.element_ty).to(tl.float32)
        store_row_codes(y, offs, mask, out_ptr + row * stride_o, scale_ptr, static_ptr, row, INT8, QMAX, STATIC)
    else:
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
    launch(_silu_and_mul_kernel, (T, triton.cdiv(I, block)), x2, o2, o2, o2, x2.stride(0), o2.stride(0), T, I,
           BLOCK=block, num_warps=4)
    return out


def silu_and_mul_quant(x: torch.Tensor, dtype: torch.dtype, static_scale: torch.Tensor | None = None,
                       pad_rows: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """silu_and_mul whose output is a W8A8 layer's input: x [T, 2I] -> (codes [max(T, pad_rows), I] of dtype,
    scales [same rows, 1] float32), quantize_activation's arithmetic on silu_and_mul(x); rows past T zero codes.
    One kernel instead of two; I up to ONE_TILE_MAX_K (a row in registers)."""
    I = x.shape[-1] // 2
    assert I <= ONE_TILE_MAX_K, f"silu_and_mul_quant: {I} features exceed one tile ({ONE_TILE_MAX_K})"
    x2 = x.reshape(-1, 2 * I)
    assert x2.stride(-1) == 1
    T = x2.shape[0]
    codes, scales = codes_and_scales(max(T, pad_rows), I, dtype, x.device)
    if codes.shape[0] == 0:
        return codes, scales
    consts, static = quant_constants(dtype, static_scale, x.device)
    block = next_pow2(I)
    launch(_silu_and_mul_kernel, (codes.shape[0], 1), x2, codes, scales, scales if static is None else static,
           x2.stride(0), codes.stride(0), T, I, BLOCK=block, QUANT=True, **consts,
           num_warps=16 if block >= 8192 else (8 if block >= 2048 else 4))
    return codes, scales
