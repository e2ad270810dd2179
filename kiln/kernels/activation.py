"""silu_and_mul: the SwiGLU activation of a fused gate/up projection, optionally quantized for a W8A8 down_proj."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import gdc_enter, launch, next_pow2
from .quant import ONE_TILE_MAX_K, codes_and_scales, quant_constants, store_row_codes


# the activation dtype an int32 accumulator is rounded to (ACT_KIND), as scale_int32 stores it
ACT_KINDS = {torch.bfloat16: 1, torch.float16: 2, torch.float32: 3}


@triton.jit
def _as_stored(y, ACT_KIND: tl.constexpr):
    # y rounded to the activation dtype and back: the value a kernel storing it in that dtype leaves
    if ACT_KIND == 1:
        y = y.to(tl.bfloat16).to(tl.float32)
    elif ACT_KIND == 2:
        y = y.to(tl.float16).to(tl.float32)
    return y


# T (the live rows) changes with traffic: not specialized on, so no variant compiles after warm-up (docs/kernels.md)
@triton.jit(do_not_specialize=['T'])
def _silu_and_mul_kernel(x_ptr, out_ptr, scale_ptr, static_ptr, xs_ptr, ws_ptr, stride_x, stride_o, T, I,
                         BLOCK: tl.constexpr, QUANT: tl.constexpr = False, INT8: tl.constexpr = False,
                         QMAX: tl.constexpr = 0.0, STATIC: tl.constexpr = False, ACT_KIND: tl.constexpr = 0,
                         USE_GDC: tl.constexpr = False):
    # QUANT: a program takes a whole row (BLOCK >= I) and writes its 8-bit codes and scale; rows T.. of the grid
    # are padding (zero codes). ACT_KIND > 0: x is the int8 GEMM's int32 accumulator, scaled here by the row scale
    # (xs_ptr) and channel scales (ws_ptr) and rounded to the activation dtype, as scale_int32 would store it
    gdc_enter(USE_GDC)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I
    live = offs < tl.where(row < T, I, 0)  # padding rows load nothing
    a = tl.load(x_ptr + row * stride_x + offs, mask=live, other=0.0).to(tl.float32)
    g = tl.load(x_ptr + row * stride_x + I + offs, mask=live, other=0.0).to(tl.float32)
    if ACT_KIND > 0:
        xs = tl.load(xs_ptr + row, mask=row < T, other=0.0)
        a = _as_stored(a * xs * tl.load(ws_ptr + offs, mask=mask, other=0.0), ACT_KIND)
        g = _as_stored(g * xs * tl.load(ws_ptr + I + offs, mask=mask, other=0.0), ACT_KIND)
    y = a / (1.0 + tl.exp(-a)) * g
    if QUANT:
        # rounded to the activation dtype first, as the unfused output is
        if ACT_KIND > 0:
            y = _as_stored(y, ACT_KIND)
        else:
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
    launch(_silu_and_mul_kernel, (T, triton.cdiv(I, block)), x2, o2, o2, o2, o2, o2, x2.stride(0), o2.stride(0),
           T, I, BLOCK=block, num_warps=4)
    return out


def silu_and_mul_quant(x: torch.Tensor, dtype: torch.dtype, static_scale: torch.Tensor | None = None,
                       pad_rows: int = 0, rows: int | None = None,
                       int32_scales: tuple[torch.Tensor, torch.Tensor, torch.dtype] | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """silu_and_mul whose output is a W8A8 layer's input: x [>= T, 2I] (T = rows, default all) -> (codes
    [max(T, pad_rows), I] of dtype, scales [same rows, 1] float32), quantize_activation's arithmetic on
    silu_and_mul(x[:T]); rows past T zero codes. One kernel instead of two; I up to ONE_TILE_MAX_K (a row in
    registers). int32_scales = (row scales [>= T, 1], channel scales [2I] float32, activation dtype): x is the int8
    gate/up GEMM's int32 accumulator, and its scale epilogue (scale_int32) is done here too: one kernel instead of
    three, the same codes."""
    I = x.shape[-1] // 2
    assert I <= ONE_TILE_MAX_K, f"silu_and_mul_quant: {I} features exceed one tile ({ONE_TILE_MAX_K})"
    x2 = x.reshape(-1, 2 * I)
    assert x2.stride(-1) == 1
    T = x2.shape[0] if rows is None else rows
    codes, scales = codes_and_scales(max(T, pad_rows), I, dtype, x.device)
    if codes.shape[0] == 0:
        return codes, scales
    consts, static = quant_constants(dtype, static_scale, x.device)
    xs = ws = scales
    if int32_scales is not None:
        assert x.dtype == torch.int32
        xs, ws, act = int32_scales
        xs, ws = xs.reshape(-1).contiguous(), ws.float().contiguous()
        consts["ACT_KIND"] = ACT_KINDS[act]
    block = next_pow2(I)
    launch(_silu_and_mul_kernel, (codes.shape[0], 1), x2, codes, scales, scales if static is None else static, xs,
           ws, x2.stride(0), codes.stride(0), T, I, BLOCK=block, QUANT=True, **consts,
           num_warps=16 if block >= 8192 else (8 if block >= 2048 else 4))
    return codes, scales
