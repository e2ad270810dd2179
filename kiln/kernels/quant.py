"""W8A8 helpers: per-token activation quantization in one pass, and the int8 GEMM's scale epilogue.

`quantize_activation` is kiln.quantization.ops.quantize_activation (its reference) as one kernel: a program per
row reads the row once, takes its absmax (or the static input_scale), and writes the int8 or E4M3 codes and the
float32 row scale. The PyTorch version takes ~6 passes (float cast, abs, amax, divide, round/clamp, cast).
Codes are bit-identical to the reference on a GPU: IEEE division (`div_rn`), round-half-to-even for int8 (done
with floor so that the interpreter runs it too), the saturating round-to-nearest-even cast for E4M3. Rows up to
`pad_rows` (cuBLAS's M constraints) are written as zero codes, so the GEMM needs no padded copy.

`scale_int32` is the int8 path's epilogue: int32 result x row scale x channel scale (+ bias) -> the output
dtype, in one pass instead of three (bias is added in float32 before the one rounding; the reference rounds
before adding it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import gdc_enter, launch, next_pow2

INT8_MAX = 127.0
FP8_MAX = 448.0
ONE_TILE_MAX_K = 16384  # rows up to this many elements are held in registers: read once


@triton.jit
def _round_half_even(y):
    # torch.round's rounding; libdevice.rint does not run in Triton's interpreter. y - floor(y) is exact.
    r = tl.floor(y)
    f = y - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    return tl.where((f > 0.5) | ((f == 0.5) & odd), r + 1.0, r)


@triton.jit
def _to_codes(x, scale, codes_ptr, INT8: tl.constexpr, QMAX: tl.constexpr):
    # one return type: branches that return int8 and E4M3 do not compile on Triton 3.6 (the interpreter takes them)
    y = tl.math.div_rn(x, scale)
    y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
    if INT8:
        y = _round_half_even(y)  # integral: the int8 cast below is exact
    return y.to(codes_ptr.dtype.element_ty)


@triton.jit
def _dynamic_scale(x, QMAX: tl.constexpr):
    # the per-token scale: absmax / QMAX, floored so that an all-zero row has one
    return tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=0), 1e-8), QMAX)


@triton.jit
def store_row_codes(y, offs, mask, c_row, scale_ptr, static_ptr, row,
                    INT8: tl.constexpr, QMAX: tl.constexpr, STATIC: tl.constexpr):
    """One whole float32 row `y` (zero where masked) as 8-bit codes at c_row + offs and its float32 scale at
    scale_ptr + row: quantize_activation's arithmetic, so also the epilogue of the kernels that produce a W8A8
    layer's input (rmsnorm, silu_and_mul)."""
    if STATIC:
        scale = tl.load(static_ptr).to(tl.float32)
    else:
        scale = _dynamic_scale(y, QMAX)
    tl.store(c_row + offs, _to_codes(y, scale, c_row, INT8, QMAX), mask=mask)
    tl.store(scale_ptr + row, scale)


# values that change with traffic are not specialized on, so no new variant compiles after warm-up (docs/kernels.md)
@triton.jit(do_not_specialize=['M'])
def _quant_rows_kernel(x_ptr, codes_ptr, scale_ptr, static_ptr, M, K, stride_xm, stride_cm,
                       INT8: tl.constexpr, QMAX: tl.constexpr, STATIC: tl.constexpr,
                       BLOCK_K: tl.constexpr, ONE_TILE: tl.constexpr,
                       USE_GDC: tl.constexpr = False):
    gdc_enter(USE_GDC)
    row = tl.program_id(0)
    k_live = tl.where(row < M, K, 0)  # rows past M (padding) load nothing: zero codes
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    c_row = codes_ptr + row.to(tl.int64) * stride_cm
    offs = tl.arange(0, BLOCK_K)
    if ONE_TILE:
        x = tl.load(x_row + offs, mask=offs < k_live, other=0.0).to(tl.float32)
        store_row_codes(x, offs, offs < K, c_row, scale_ptr, static_ptr, row, INT8, QMAX, STATIC)
    else:
        if STATIC:
            scale = tl.load(static_ptr).to(tl.float32)
        else:
            amax = tl.zeros([BLOCK_K], tl.float32)
            for k0 in range(0, K, BLOCK_K):
                x = tl.load(x_row + k0 + offs, mask=k0 + offs < k_live, other=0.0).to(tl.float32)
                amax = tl.maximum(amax, tl.abs(x))
            scale = _dynamic_scale(amax, QMAX)
        for k0 in range(0, K, BLOCK_K):  # the second read of a long row mostly hits L2
            x = tl.load(x_row + k0 + offs, mask=k0 + offs < k_live, other=0.0).to(tl.float32)
            tl.store(c_row + k0 + offs, _to_codes(x, scale, codes_ptr, INT8, QMAX), mask=k0 + offs < K)
        tl.store(scale_ptr + row, scale)


def codes_and_scales(rows: int, K: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The outputs of a quantizing kernel: codes [rows, K] of dtype (int8 or float8_e4m3fn), scales [rows, 1]."""
    assert dtype in (torch.int8, torch.float8_e4m3fn)
    return (torch.empty((rows, K), dtype=dtype, device=device),
            torch.empty((rows, 1), dtype=torch.float32, device=device))


def quant_constants(dtype: torch.dtype, static_scale: torch.Tensor | None, device) -> dict:
    """The constexprs of store_row_codes for dtype, and its static-scale pointer (float32, one element) if any."""
    int8 = dtype == torch.int8
    static = None if static_scale is None else static_scale.reshape(1).to(device=device, dtype=torch.float32)
    return dict(INT8=int8, QMAX=INT8_MAX if int8 else FP8_MAX, STATIC=static is not None), static


def quantize_activation(x: torch.Tensor, dtype: torch.dtype, static_scale: torch.Tensor | None = None,
                        pad_rows: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (codes [max(M, pad_rows), K] of `dtype` (int8 or float8_e4m3fn), scales [same rows, 1] float32):
    dynamic per-token absmax scales, or the one static scale (a float32 tensor of one element). Rows past M are
    zero codes (their scales are meaningless)."""
    assert x.dim() == 2
    M, K = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    rows = max(M, pad_rows)
    codes, scales = codes_and_scales(rows, K, dtype, x.device)
    if rows == 0:
        return codes, scales
    consts, static = quant_constants(dtype, static_scale, x.device)
    one_tile = K <= ONE_TILE_MAX_K
    block = next_pow2(K) if one_tile else 4096
    launch(_quant_rows_kernel, (rows,), x, codes, scales, scales if static is None else static, M, K, x.stride(0),
           codes.stride(0), **consts, BLOCK_K=block, ONE_TILE=one_tile, num_warps=8 if block >= 4096 else 4)
    return codes, scales


# values that change with traffic are not specialized on, so no new variant compiles after warm-up (docs/kernels.md)
@triton.jit(do_not_specialize=['M'])
def _scale_int32_kernel(acc_ptr, xs_ptr, ws_ptr, b_ptr, out_ptr, M, N, stride_am, stride_om,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
                        USE_GDC: tl.constexpr = False):
    gdc_enter(USE_GDC)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = offs_m < M
    nmask = offs_n < N
    mask = mmask[:, None] & nmask[None, :]
    m64 = offs_m.to(tl.int64)[:, None]
    acc = tl.load(acc_ptr + m64 * stride_am + offs_n[None, :], mask=mask, other=0).to(tl.float32)
    xs = tl.load(xs_ptr + offs_m, mask=mmask, other=0.0)
    ws = tl.load(ws_ptr + offs_n, mask=nmask, other=0.0)
    y = acc * xs[:, None] * ws[None, :]  # the reference's order: (acc * row scale) * channel scale
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + m64 * stride_om + offs_n[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


def scale_int32(acc: torch.Tensor, row_scale: torch.Tensor, channel_scale: torch.Tensor, bias: torch.Tensor | None,
                out_dtype: torch.dtype, rows: int | None = None) -> torch.Tensor:
    """acc [>= rows, N] int32 -> [rows, N] out_dtype: acc * row_scale[:rows] (float32 [>= rows, 1]) *
    channel_scale (float32 [N]) (+ bias [N]); `rows` (default all) drops the padding rows of the GEMM."""
    M = acc.shape[0] if rows is None else rows
    N = acc.shape[1]
    assert acc.dtype == torch.int32 and acc.stride(-1) == 1 and row_scale.dtype == torch.float32
    out = torch.empty((M, N), dtype=out_dtype, device=acc.device)
    if M == 0:
        return out
    ws = channel_scale.float().contiguous()
    xs = row_scale.reshape(-1).contiguous()
    has_bias = bias is not None
    bm, bn = 16, 256
    grid = (triton.cdiv(N, bn), triton.cdiv(M, bm))
    launch(_scale_int32_kernel, grid, acc, xs, ws, bias.contiguous() if has_bias else ws, out, M, N, acc.stride(0),
           out.stride(0), BLOCK_M=bm, BLOCK_N=bn, HAS_BIAS=has_bias, num_warps=4,
           enable_fp_fusion=False)  # no FMA: the product is rounded before the bias, as in the reference
    return out
