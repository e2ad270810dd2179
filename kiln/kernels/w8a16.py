"""w8a16_matmul: weight-only 8-bit linear layer, y = x @ (w_codes * w_scale[:, None]).T + bias.

The codes are int8, or E4M3 (float8_e4m3fn: a W8A8 FP8 checkpoint's weights, which the W8A8 path runs through
here at small batch; Triton converts them on sm_89+ GPUs).

At T = 1 with bf16 activations, a GEMV on the CUDA cores (_w8_gemv_kernel) takes both code types: int8 codes
against the activations as int16 with a scale per K block (dp2a; the weight at ~84% of the copy rate on an H100,
docs/kernels.md), E4M3 codes against fp16 activations (fp16x2 FMAs). Otherwise, at decode sizes (T <= 64) the
work is reading the weight: _w8a16_kernel streams the int8 weight (half the bytes of bf16), converts each tile to the activation dtype in registers,
multiplies on the tensor cores, and applies the per-channel scale to the float32
accumulator. When the output tiles alone would leave SMs idle, K is split across programs
and a second kernel sums the float32 partials. Up to T = 256 the same kernel runs with
larger tiles; above, the weight is dequantized once per call (one pass) and torch.matmul
does the rest.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ._utils import gdc_enter, interpreting, launch, next_pow2, num_sms, zeroed_counters
from .activation import silu_and_mul

SMALL_T = 64    # up to here: decode-sized tiles (the weight read dominates)
LARGE_T = 256   # above: dequantize once, then torch.matmul
CODE_DTYPES = (torch.int8, torch.float8_e4m3fn)


# values that change with traffic are not specialized on, so no new variant compiles after warm-up (docs/kernels.md)
@triton.jit(do_not_specialize=['M'])
def _w8a16_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, out_ptr, part_ptr,
    M, N, K, K_SPLIT,
    stride_xm, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, FP32: tl.constexpr,
    HAS_SCALE: tl.constexpr = True,
    SWAP_AB: tl.constexpr = False,
    USE_GDC: tl.constexpr = False,
):
    gdc_enter(USE_GDC)
    # HAS_SCALE=False: a plain bf16/fp16 weight (kiln.kernels.skinny reuses this kernel).
    # SWAP_AB: the product as W x^T ([BLOCK_N, BLOCK_M] accumulator), so that the weight's rows fill the tensor
    # cores' 64-row side and a few activation rows their narrow one, instead of padding the rows to 64 for wgmma.
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = offs_m < M
    nmask = offs_n < N
    offs_kb = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    k_start = pid_k * K_SPLIT
    k_end = tl.minimum(k_start + K_SPLIT, K)
    if SWAP_AB:
        acc_t = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + offs_kb
        if EVEN_K:
            x = tl.load(x_rows + offs_k[None, :], mask=mmask[:, None], other=0.0)
            w = tl.load(w_rows + offs_k[None, :], mask=nmask[:, None], other=0.0)
        else:
            kmask = offs_k < k_end
            x = tl.load(x_rows + offs_k[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
            w = tl.load(w_rows + offs_k[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
        if SWAP_AB:
            acc_t += tl.dot(w.to(x.dtype), tl.trans(x))
        elif FP32:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    if SWAP_AB:
        acc = tl.trans(acc_t)
    offs_m64 = offs_m.to(tl.int64)
    if SPLIT_K == 1:
        y = acc
        if HAS_SCALE:
            y = acc * tl.load(s_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            y += tl.load(b_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m64[:, None] * stride_om + offs_n[None, :], y.to(out_ptr.dtype.element_ty),
                 mask=mmask[:, None] & nmask[None, :])
    else:
        p = part_ptr + (pid_k * M + offs_m64)[:, None] * N + offs_n[None, :]
        tl.store(p, acc, mask=mmask[:, None] & nmask[None, :])


# values that change with traffic are not specialized on, so no new variant compiles after warm-up (docs/kernels.md)
@triton.jit(do_not_specialize=['M'])
def _w8a16_reduce_kernel(part_ptr, s_ptr, b_ptr, out_ptr, M, N, stride_om,
                         SPLIT_K: tl.constexpr, BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr,
                         HAS_SCALE: tl.constexpr = True,
                         USE_GDC: tl.constexpr = False):
    gdc_enter(USE_GDC)
    m = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    nmask = offs_n < N
    acc = tl.zeros([BLOCK], tl.float32)
    for s in range(SPLIT_K):
        acc += tl.load(part_ptr + (s * M + m) * N + offs_n, mask=nmask, other=0.0)
    y = acc
    if HAS_SCALE:
        y = acc * tl.load(s_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * stride_om + offs_n, y.to(out_ptr.dtype.element_ty), mask=nmask)


@triton.jit
def _bf16_pair_to_i16(pair, inv_scale, MAGIC: tl.constexpr):
    """A 32-bit word of two bf16 activations -> the same word of two int16, round(x * inv_scale) each
    (|x * inv_scale| <= 32767). MAGIC (a GPU): the bf16 bits shifted into floats, then one FMA each adds 1.5 * 2^23,
    which rounds to an integer and leaves it, two's complement, in the low 16 bits, and one byte permute packs the
    halves. Else the same arithmetic in plain operations (the interpreter)."""
    if MAGIC:
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 a, b;
            shl.b32 a, $1, 16;
            and.b32 b, $1, 0xFFFF0000;
            fma.rn.f32 a, a, $2, 0f4B400000;
            fma.rn.f32 b, b, $2, 0f4B400000;
            prmt.b32 $0, a, b, 0x5410;
            }""",
            constraints="=r,r,r", args=[pair, inv_scale], dtype=tl.int32, is_pure=True, pack=1)
    lo = (pair << 16).to(tl.float32, bitcast=True) * inv_scale
    hi = (pair & -65536).to(tl.float32, bitcast=True) * inv_scale
    lo = tl.where(lo < 0, lo - 0.5, lo + 0.5).to(tl.int32)
    hi = tl.where(hi < 0, hi - 0.5, hi + 0.5).to(tl.int32)
    return (lo & 0xFFFF) | (hi << 16)


@triton.jit
def _dot8_i16_i8(w, p0, p1, p2, p3, MAGIC: tl.constexpr):
    """Eight int8 codes (one 64-bit word, the lowest byte first) . eight int16 activations (four words of two, the
    low half first) -> int32. MAGIC (a GPU): four two-way dot products (dp2a). Else plain integer operations."""
    if MAGIC:
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 lo, hi, d;
            mov.b64 {lo, hi}, $1;
            mov.b32 d, 0;
            dp2a.lo.s32.s32 d, $2, lo, d;
            dp2a.hi.s32.s32 d, $3, lo, d;
            dp2a.lo.s32.s32 d, $4, hi, d;
            dp2a.hi.s32.s32 $0, $5, hi, d;
            }""",
            constraints="=r,l,r,r,r,r", args=[w, p0, p1, p2, p3], dtype=tl.int32, is_pure=True, pack=1)
    d = tl.zeros(w.shape, tl.int32)
    for i in tl.static_range(4):
        p = p0 if i == 0 else (p1 if i == 1 else (p2 if i == 2 else p3))
        c0 = ((w << (56 - 16 * i)) >> 56).to(tl.int32)
        c1 = ((w << (48 - 16 * i)) >> 56).to(tl.int32)
        d += c0 * ((p << 16) >> 16) + c1 * (p >> 16)
    return d


@triton.jit
def _bf16_pair_to_f16x2(pair, inv_scale, MAGIC: tl.constexpr):
    """A 32-bit word of two bf16 activations -> the same word of two fp16, x * inv_scale each (a power of two that
    keeps |x| < 1: exact for all but values below fp16's normal range). MAGIC (a GPU): one cvt packs both halves.
    Else the same arithmetic in plain operations (the interpreter)."""
    lo = (pair << 16).to(tl.float32, bitcast=True) * inv_scale
    hi = (pair & -65536).to(tl.float32, bitcast=True) * inv_scale
    if MAGIC:
        return tl.inline_asm_elementwise(
            asm="cvt.rn.f16x2.f32 $0, $2, $1;", constraints="=r,f,f", args=[lo, hi], dtype=tl.int32, is_pure=True,
            pack=1)
    lo16 = lo.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    hi16 = hi.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
    return lo16 | (hi16 << 16)


@triton.jit
def _e4m3_to_f32(byte):
    """An E4M3 (float8_e4m3fn) code, as the low byte of an int, -> float32 (the interpreter's conversion)."""
    e = (byte >> 3) & 15
    m = (byte & 7).to(tl.float32)
    v = tl.where(e == 0, m * 0.001953125, (m + 8.0) * tl.exp2((e - 10).to(tl.float32)))  # 2^-9 m; (8 + m) 2^(e-10)
    return tl.where((byte & 128) != 0, -v, v)


@triton.jit
def _dot8_f16_e4m3(w, p0, p1, p2, p3, MAGIC: tl.constexpr):
    """Eight E4M3 codes (one 64-bit word, the lowest byte first) . eight fp16 activations (four words of two, the
    low half first) -> float32. MAGIC (a GPU): each pair of codes becomes two fp16 (one cvt), four fp16x2 FMAs sum
    the products in two fp16 lanes (each product < 448 and each lane's sum of four < 1,792: no overflow), and the
    lanes are added in float32. Else the same sums, each step rounded to fp16, in plain operations."""
    if MAGIC:
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 lo, hi, a0, a1, a2, a3, acc;
            .reg .b16 c0, c1, c2, c3, h0, h1;
            .reg .f32 f0, f1;
            mov.b64 {lo, hi}, $1;
            mov.b32 {c0, c1}, lo;
            mov.b32 {c2, c3}, hi;
            cvt.rn.f16x2.e4m3x2 a0, c0;
            cvt.rn.f16x2.e4m3x2 a1, c1;
            cvt.rn.f16x2.e4m3x2 a2, c2;
            cvt.rn.f16x2.e4m3x2 a3, c3;
            mul.rn.f16x2 acc, a0, $2;
            fma.rn.f16x2 acc, a1, $3, acc;
            fma.rn.f16x2 acc, a2, $4, acc;
            fma.rn.f16x2 acc, a3, $5, acc;
            mov.b32 {h0, h1}, acc;
            cvt.f32.f16 f0, h0;
            cvt.f32.f16 f1, h1;
            add.f32 $0, f0, f1;
            }""",
            constraints="=f,l,r,r,r,r", args=[w, p0, p1, p2, p3], dtype=tl.float32, is_pure=True, pack=1)
    lane_lo = tl.zeros(w.shape, tl.float32)
    lane_hi = tl.zeros(w.shape, tl.float32)
    for i in tl.static_range(4):
        p = p0 if i == 0 else (p1 if i == 1 else (p2 if i == 2 else p3))
        x_lo = (p & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        x_hi = (p >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        c_lo = _e4m3_to_f32(((w >> (16 * i)) & 255).to(tl.int32))
        c_hi = _e4m3_to_f32(((w >> (16 * i + 8)) & 255).to(tl.int32))
        lane_lo = (lane_lo + c_lo * x_lo).to(tl.float16).to(tl.float32)
        lane_hi = (lane_hi + c_hi * x_hi).to(tl.float16).to(tl.float32)
    return lane_lo + lane_hi


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _gemv_weights(w_rows, k0, offs_j, nmask, EVEN_N: tl.constexpr):
    """The weight words [BLOCK_N, BLOCK_K // 8] of the K block at k0."""
    if EVEN_N:
        return tl.load(w_rows + (k0 // 8 + offs_j)[None, :])
    return tl.load(w_rows + (k0 // 8 + offs_j)[None, :], mask=nmask[:, None], other=0)


@triton.jit
def _gemv_block(acc, w, x_ptr, k0, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, E4M3: tl.constexpr,
                MAGIC: tl.constexpr):
    """One BLOCK_K of the GEMV: acc [BLOCK_N, BLOCK_K // 8] += this block's weight words w . the activations at k0."""
    J: tl.constexpr = BLOCK_K // 8
    offs_j = tl.arange(0, J)
    # NaN-propagating: a NaN or inf activation makes the block's scale NaN or inf, so the outputs are not
    # finite, as a float product's would be (a finite max would turn them into arbitrary codes)
    amax = tl.reduce(tl.abs(tl.load(x_ptr + k0 + tl.arange(0, BLOCK_K)).to(tl.float32)), 0, _max_nan)
    pair = x_ptr.to(tl.pointer_type(tl.int32)) + k0 // 2 + 4 * offs_j
    if E4M3:
        # amax < 2^(e - 126) for its biased exponent e: x * 2^(126 - e) lies in (-1, 1)
        e = (amax.to(tl.int32, bitcast=True) >> 23) & 255
        inv = (tl.maximum(253 - e, 1) << 23).to(tl.float32, bitcast=True)
        scale = tl.where(amax < float("inf"), ((e + 1) << 23).to(tl.float32, bitcast=True), amax)
        p0 = tl.broadcast_to(_bf16_pair_to_f16x2(tl.load(pair), inv, MAGIC)[None, :], [BLOCK_N, J])
        p1 = tl.broadcast_to(_bf16_pair_to_f16x2(tl.load(pair + 1), inv, MAGIC)[None, :], [BLOCK_N, J])
        p2 = tl.broadcast_to(_bf16_pair_to_f16x2(tl.load(pair + 2), inv, MAGIC)[None, :], [BLOCK_N, J])
        p3 = tl.broadcast_to(_bf16_pair_to_f16x2(tl.load(pair + 3), inv, MAGIC)[None, :], [BLOCK_N, J])
        acc += _dot8_f16_e4m3(w, p0, p1, p2, p3, MAGIC) * scale
    else:
        inv = tl.where(amax > 0, 32767.0 / amax, 0.0)
        p0 = tl.broadcast_to(_bf16_pair_to_i16(tl.load(pair), inv, MAGIC)[None, :], [BLOCK_N, J])
        p1 = tl.broadcast_to(_bf16_pair_to_i16(tl.load(pair + 1), inv, MAGIC)[None, :], [BLOCK_N, J])
        p2 = tl.broadcast_to(_bf16_pair_to_i16(tl.load(pair + 2), inv, MAGIC)[None, :], [BLOCK_N, J])
        p3 = tl.broadcast_to(_bf16_pair_to_i16(tl.load(pair + 3), inv, MAGIC)[None, :], [BLOCK_N, J])
        acc += _dot8_i16_i8(w, p0, p1, p2, p3, MAGIC).to(tl.float32) * (amax / 32767.0)
    return acc


@triton.jit
def _w8_gemv_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, out_ptr, part_ptr, count_ptr, N, K, K_SPLIT, stride_w64,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
    EVEN_N: tl.constexpr, E4M3: tl.constexpr, MAGIC: tl.constexpr, EARLY_W: tl.constexpr = False,
    GLU: tl.constexpr = False, USE_GDC: tl.constexpr = False,
):
    """Batch 1 (bf16 activations) on the CUDA cores' packed units; K a multiple of BLOCK_K, K_SPLIT of BLOCK_K.
    int8 codes: each BLOCK_K of activations becomes int16 with its own scale (max |x| / 32767: an error of at most
    1.5e-5 of the block's largest value, below bf16's own rounding), so that two codes cost one dp2a where
    converting and multiplying floats costs ~4 instructions a code; a block's int32 sums cannot overflow (8 codes
    a word: at most 8 * 128 * 32767). E4M3 codes (E4M3=True): the activations become fp16 scaled by a power of
    two (exact), and two codes cost one conversion and one fp16x2 FMA. With SPLIT_K > 1, programs (n,
    0..SPLIT_K-1) share an output tile: each writes its partial sums, and the last to finish (a counter per tile,
    which it resets) adds them up in order and writes the tile. EARLY_W (under programmatic dependent launch):
    the first block of weights is loaded before waiting for the previous kernel (weights are not its output).
    GLU: w holds a gate projection's N / 2 rows, then an up projection's, and out [N / 2] gets silu(gate) * up (the
    SwiGLU activation, as silu_and_mul computes it from the bf16 outputs): a program's first BLOCK_N / 2 rows are
    gate rows and the rest the up rows of the same channels."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    if GLU:
        HALF: tl.constexpr = BLOCK_N // 2
        r = tl.arange(0, BLOCK_N)
        channel = pid_n * HALF + r % HALF
        offs_n = tl.where(r < HALF, channel, channel + N // 2)
        nmask = channel < N // 2
    else:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
    J: tl.constexpr = BLOCK_K // 8
    offs_j = tl.arange(0, J)
    w_rows = w_ptr.to(tl.pointer_type(tl.int64)) + offs_n.to(tl.int64)[:, None] * stride_w64
    acc = tl.zeros([BLOCK_N, J], tl.float32)
    k_start = pid_k * K_SPLIT
    k_end = tl.minimum(k_start + K_SPLIT, K)
    if EARLY_W:
        w = _gemv_weights(w_rows, k_start, offs_j, nmask, EVEN_N)
        gdc_enter(USE_GDC)
        acc = _gemv_block(acc, w, x_ptr, k_start, BLOCK_N, BLOCK_K, E4M3, MAGIC)
        k_start += BLOCK_K
    else:
        gdc_enter(USE_GDC)
    for k0 in range(k_start, k_end, BLOCK_K):
        acc = _gemv_block(acc, _gemv_weights(w_rows, k0, offs_j, nmask, EVEN_N), x_ptr, k0, BLOCK_N, BLOCK_K, E4M3,
                          MAGIC)
    y = tl.sum(acc, axis=1)
    if SPLIT_K == 1:
        _gemv_store(y, s_ptr, b_ptr, out_ptr, offs_n, nmask, pid_n, N, BLOCK_N, HAS_BIAS, GLU)
    else:
        tl.store(part_ptr + pid_k * N + offs_n, y, mask=nmask)
        tl.debug_barrier()  # every thread's partials stored before the count goes up
        if tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel") == SPLIT_K - 1:
            y = tl.zeros([BLOCK_N], tl.float32)
            for k in range(SPLIT_K):  # in order: the same sums whichever program came last
                y += tl.load(part_ptr + k * N + offs_n, mask=nmask, other=0.0, cache_modifier=".cg")
            tl.store(count_ptr + pid_n, 0)
            _gemv_store(y, s_ptr, b_ptr, out_ptr, offs_n, nmask, pid_n, N, BLOCK_N, HAS_BIAS, GLU)


@triton.jit
def _gemv_store(y, s_ptr, b_ptr, out_ptr, offs_n, nmask, pid_n, N, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
                GLU: tl.constexpr):
    y = y * tl.load(s_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)
    if GLU:
        # gate and up rounded to the output type first: the bits silu_and_mul gets from the unfused projection
        HALF: tl.constexpr = BLOCK_N // 2
        y = tl.reshape(y.to(out_ptr.dtype.element_ty).to(tl.float32), [2, HALF])
        is_gate = (tl.arange(0, 2) == 0)[:, None]
        gate = tl.sum(tl.where(is_gate, y, 0.0), axis=0)
        up = tl.sum(tl.where(is_gate, 0.0, y), axis=0)
        channel = pid_n * HALF + tl.arange(0, HALF)
        tl.store(out_ptr + channel, (gate / (1.0 + tl.exp(-gate)) * up).to(out_ptr.dtype.element_ty),
                 mask=channel < N // 2)
    else:
        tl.store(out_ptr + offs_n, y.to(out_ptr.dtype.element_ty), mask=nmask)


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, out_ptr, K, stride_wn, stride_on, BLOCK: tl.constexpr, USE_GDC: tl.constexpr = False):
    gdc_enter(USE_GDC)
    n = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < K
    s = tl.load(s_ptr + n).to(tl.float32)
    w = tl.load(w_ptr + n * stride_wn + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + n * stride_on + offs, (w * s).to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_int8_weight(w_int8: torch.Tensor, w_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[N, K] int8 (or E4M3) * scale[N] -> [N, K] dtype (float32 math, one pass)."""
    N, K = w_int8.shape
    out = torch.empty((N, K), dtype=dtype, device=w_int8.device)
    block = 1024
    launch(_dequant_kernel, (N, triton.cdiv(K, block)), w_int8, w_scale, out, K, w_int8.stride(0), out.stride(0),
           BLOCK=block, num_warps=4)
    return out


def _config(M: int, N: int, K: int, device: torch.device):
    """(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages) for a small-M problem."""
    if interpreting():
        bm = max(16, next_pow2(M))
        return bm, 32, 32, (2 if K >= 128 else 1), 4, 1
    sms = num_sms(device)
    bm = max(16, next_pow2(M))
    if bm > 64:
        # 64 < T <= 256 on an H100 (docs/kernels.md): 128 x 128 tiles when they alone fill
        # the SMs (gate_up), else 64 x 128 tiles with K split in two; both beat dequantize +
        # torch.matmul on the Llama-3-8B projections (by up to 1.6x), but not bf16 cuBLAS.
        if triton.cdiv(N, 128) * triton.cdiv(M, 128) >= sms:
            return 128, 128, 64, 1, 8, 3
        return 64, 128, 128, 2, 4, 3
    if bm <= 16:
        # T <= 16 on an H100 (docs/kernels.md): 32 x 256 int8 tiles, 4 stages, were best or
        # within 3% of the best of the configs tried on all four Llama-3-8B projections.
        bn, bk, stages = 32, 256, 4
    elif bm == 32:
        bn, bk, stages = 64, 128, 4
    else:
        # T = 64: 128-wide tiles for the wide gate_up, 64 x 128 (split in two) for the rest.
        bn, bk, stages = (128, 128, 4) if triton.cdiv(N, 128) >= sms else (64, 128, 4)
    bk = min(bk, max(32, next_pow2(K)))
    tiles = triton.cdiv(N, bn) * triton.cdiv(M, bm)
    split = 1
    # split K until the grid roughly fills the SMs and no program walks more than 8192 of K
    while (tiles * split < 0.9 * sms or K / split > 8192) and K // (split * 2) >= 4 * bk:
        split *= 2
    return bm, bn, bk, split, 4, stages


def rows_and_out(x: torch.Tensor, N: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] as unit-stride rows [M, K], and an empty [M, N] output in x's dtype."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2, torch.empty((x2.shape[0], N), dtype=x.dtype, device=x.device)


def w8a16_matmul(x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor,
                 bias: torch.Tensor | None = None, config: tuple | None = None) -> torch.Tensor:
    """x [..., K] (bf16/fp16/fp32) @ dequant(w_int8 [N, K], w_scale [N]).T (+ bias [N]) ->
    [..., N] in x's dtype; w_int8 holds int8 or E4M3 codes. config overrides the tile choice (tuning/benchmarks
    only)."""
    K = x.shape[-1]
    N, Kw = w_int8.shape
    assert Kw == K and w_int8.dtype in CODE_DTYPES and w_int8.stride(-1) == 1
    x2, out = rows_and_out(x, N)
    M = x2.shape[0]
    if M == 0:
        return out.view(*x.shape[:-1], N)
    if config is None and M > LARGE_T:
        w = dequantize_int8_weight(w_int8, w_scale, x.dtype)
        torch.matmul(x2, w.t(), out=out)
        if bias is not None:
            out += bias.to(out.dtype)
        return out.view(*x.shape[:-1], N)
    if config is None and M == 1 and use_gemv():
        gemv = _gemv_config(N, K, x.device)
        config = gemv if _gemv_ok(x2, w_int8, gemv[2]) else None
    if config and config[0] == "gemv":
        gemv_w8(x2, w_int8, w_scale, bias, out, config)
    else:
        small_m_matmul(x2, w_int8, w_scale, bias, out, config or _config(M, N, K, x.device))
    return out.view(*x.shape[:-1], N)


def w8a16_silu_and_mul(x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor,
                       bias: torch.Tensor | None = None, config: tuple | None = None) -> torch.Tensor:
    """silu_and_mul(w8a16_matmul(x, w_int8, w_scale, bias)): w_int8 [2I, K] holds a gate projection's rows, then an
    up projection's; -> [..., I]. At one row on the GEMV, one kernel that also applies the activation (the same
    bits as the two calls); otherwise those two calls. config overrides the GEMV's choice (tests only)."""
    N = w_int8.shape[0]
    x2, out = rows_and_out(x, N // 2)
    one_row = x2.shape[0] == 1 and N % 2 == 0 and w_int8.shape[1] == x2.shape[1]
    if config is None and one_row and use_gemv() and fused_glu():
        config = _gemv_config(N, x2.shape[1], x.device)
    if not (config and one_row and _gemv_ok(x2, w_int8, config[2])):
        return silu_and_mul(w8a16_matmul(x, w_int8, w_scale, bias))
    gemv_w8(x2, w_int8, w_scale, bias, out, config, glu=True)
    return out.view(*x.shape[:-1], N // 2)


@functools.lru_cache(maxsize=None)
def use_gemv() -> bool:
    """Batch-1 int8 or E4M3 weights with bf16 activations on the CUDA cores' packed units (_w8_gemv_kernel) unless
    KILN_W8_GEMV=0 (the tensor-core tile kernel instead; for A/B runs). Read once per process."""
    return os.environ.get("KILN_W8_GEMV", "1") != "0"


@functools.lru_cache(maxsize=None)
def fused_glu() -> bool:
    """The batch-1 gate/up GEMV applies SwiGLU itself unless KILN_W8_GEMV_GLU=0 (silu_and_mul after it; for A/B
    runs). Read once per process."""
    return os.environ.get("KILN_W8_GEMV_GLU", "1") != "0"


@functools.lru_cache(maxsize=None)
def early_weights() -> bool:
    """KILN_W8_GEMV_EARLY=1: the GEMV loads its first weight block before waiting for the previous kernel (an
    A/B experiment, off by default). Read once per process."""
    return os.environ.get("KILN_W8_GEMV_EARLY", "0") == "1"


def _gemv_ok(x2: torch.Tensor, w: torch.Tensor, block_k: int) -> bool:
    """The GEMV's preconditions: bf16 activations, K a multiple of its K block, and word-aligned
    rows (pairs of activations and 64-bit words of codes are loaded whole)."""
    return (x2.dtype == torch.bfloat16 and x2.shape[1] % block_k == 0 and x2.data_ptr() % 16 == 0
            and w.data_ptr() % 16 == 0 and w.stride(0) % 8 == 0)


def _gemv_config(N: int, K: int, device: torch.device) -> tuple:
    """("gemv", BLOCK_N, BLOCK_K, SPLIT_K, num_warps): one-warp programs of 8 channels, K split in 4 (run T, H100,
    Llama-3-8B's projections over 8 layers: 86.9 us a layer against the tile kernel's 104.3; the configs that give
    an SM ~8 warps or more came within 7% of it, those with fewer up to 3x slower: docs/kernels.md)."""
    if interpreting():
        return "gemv", 8, 64, (2 if K >= 256 else 1), 1
    return "gemv", 8, 256, 4, 1


def gemv_w8(x2: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
            out: torch.Tensor, config: tuple, glu: bool = False) -> None:
    """out [1, N] = x2 [1, K] (bf16) @ (w [N, K] int8 or E4M3 * w_scale[:, None]).T (+ bias), one kernel
    (_w8_gemv_kernel; _gemv_ok holds). glu: out [1, N / 2] = silu(first half) * second half of that product."""
    _, bn, bk, split, warps = config
    N, K = w.shape
    blocks = K // bk
    split = min(split, blocks)
    k_split = triton.cdiv(blocks, split) * bk
    split = triton.cdiv(K, k_split)
    tiles = triton.cdiv(N // 2, bn // 2) if glu else triton.cdiv(N, bn)
    part = torch.empty((split, N), dtype=torch.float32, device=x2.device) if split > 1 else out
    count = zeroed_counters(tiles, x2.device) if split > 1 else out
    launch(_w8_gemv_kernel, (tiles, split), x2, w, w_scale, bias if bias is not None else w_scale, out, part,
           count, N, K, k_split, w.stride(0) // 8, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, HAS_BIAS=bias is not None,
           EVEN_N=(N // 2) % (bn // 2) == 0 if glu else N % bn == 0, E4M3=w.dtype == torch.float8_e4m3fn,
           MAGIC=not interpreting(), EARLY_W=early_weights(), GLU=glu, num_warps=warps)


def small_m_matmul(x2: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor | None, bias: torch.Tensor | None,
                   out: torch.Tensor, config: tuple) -> None:
    """out [M, N] = x2 [M, K] @ (w [N, K] (* w_scale[:, None])).T (+ bias), K split over `config`'s SPLIT_K
    programs and summed by a second kernel. w is int8 or E4M3 with a scale, or in x's dtype with w_scale None."""
    M, K = x2.shape
    N = w.shape[0]
    bm, bn, bk, split, warps, stages = config[:6]
    swap = len(config) > 6 and bool(config[6])  # a 7th element: SWAP_AB (tuning configs)
    k_split = triton.cdiv(triton.cdiv(K, split), bk) * bk
    split = triton.cdiv(K, k_split)
    even_k = K % bk == 0 and k_split % bk == 0
    part = torch.empty((split, M, N), dtype=torch.float32, device=x2.device) if split > 1 else out
    has_bias, has_scale = bias is not None, w_scale is not None
    s = w_scale if has_scale else w
    b = bias if has_bias else s
    grid = (triton.cdiv(N, bn), triton.cdiv(M, bm), split)
    launch(_w8a16_kernel, grid,
        x2, w, s, b, out, part,
        M, N, K, k_split,
        x2.stride(0), w.stride(0), out.stride(0),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, HAS_BIAS=has_bias, EVEN_K=even_k,
        FP32=x2.dtype == torch.float32, HAS_SCALE=has_scale, SWAP_AB=swap and x2.dtype != torch.float32,
        num_warps=warps, num_stages=stages,
    )
    if split > 1:
        block = 1024
        launch(_w8a16_reduce_kernel, (M, triton.cdiv(N, block)), part, s, b, out, M, N, out.stride(0),
               SPLIT_K=split, BLOCK=block, HAS_BIAS=has_bias, HAS_SCALE=has_scale, num_warps=4)
