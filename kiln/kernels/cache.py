"""reshape_and_cache: write this step's K/V into the paged KV cache; rope_and_cache: RoPE on q and k as well."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import FP8_MAX, KV_FP8, KV_INT8, gdc_enter, interpreting, kv_scale_args, launch, next_pow2
from .rotary import _rope_rotate


# the slot mapping's address follows the step's layout (a slice of the packed step)
@triton.jit(do_not_specialize=['slot_ptr', 'num_rows'])
def _reshape_and_cache_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, k_scale_ptr, v_scale_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_ct, stride_ch,
    stride_sb, stride_st, stride_sh,
    num_heads, num_rows,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    KV_KIND: tl.constexpr,
    USE_GDC: tl.constexpr = False,
):
    """BLOCK_R rows of (token, KV head) a program: a decode step's token in one program, a prefill's tokens a few
    at a time."""
    gdc_enter(USE_GDC)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    t = (r // num_heads).to(tl.int64)
    h = r % num_heads
    slot = tl.load(slot_ptr + t, mask=r < num_rows, other=-1).to(tl.int64)
    rmask = slot >= 0
    offs_d = tl.arange(0, BLOCK_D)
    mask = rmask[:, None] & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(key_ptr + (t * stride_kt + h * stride_kh)[:, None] + offs_d[None, :], mask=mask, other=0.0)
    v = tl.load(value_ptr + (t * stride_vt + h * stride_vh)[:, None] + offs_d[None, :], mask=mask, other=0.0)
    _write_kv(k, v, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, slot // BLOCK_SIZE, slot % BLOCK_SIZE, h,
              offs_d, rmask, mask, stride_cb, stride_ct, stride_ch, stride_sb, stride_st, stride_sh, KV_KIND)


@triton.jit
def _write_kv(k, v, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, blk, off, head, offs_d, rmask, mask,
              stride_cb, stride_ct, stride_ch, stride_sb, stride_st, stride_sh, KV_KIND: tl.constexpr):
    """K and V tiles [R, BLOCK_D], one (token, KV head) a row, into the cache: row i at block blk, offset off and
    head head (each a scalar or one per row)."""
    c_off = (blk * stride_cb + off * stride_ct + head * stride_ch)[:, None] + offs_d[None, :]
    if KV_KIND == KV_INT8:  # per-token-head scales
        kf = k.to(tl.float32)
        vf = v.to(tl.float32)
        k_amax = tl.max(tl.abs(kf), axis=1)
        v_amax = tl.max(tl.abs(vf), axis=1)
        k_inv = tl.where(k_amax > 0, 127.0 / k_amax, 0.0)
        v_inv = tl.where(v_amax > 0, 127.0 / v_amax, 0.0)
        kq = tl.minimum(tl.maximum(tl.floor(kf * k_inv[:, None] + 0.5), -127.0), 127.0)
        vq = tl.minimum(tl.maximum(tl.floor(vf * v_inv[:, None] + 0.5), -127.0), 127.0)
        tl.store(k_cache_ptr + c_off, kq.to(tl.int8), mask=mask)
        tl.store(v_cache_ptr + c_off, vq.to(tl.int8), mask=mask)
        s_off = blk * stride_sb + off * stride_st + head * stride_sh
        tl.store(k_scale_ptr + s_off, k_amax / 127.0, mask=rmask)
        tl.store(v_scale_ptr + s_off, v_amax / 127.0, mask=rmask)
    elif KV_KIND == KV_FP8:  # E4M3: static per-head scales; x / scale (IEEE division, as torch) then RTNE cast
        ks = tl.load(k_scale_ptr + head * stride_sh, mask=rmask, other=1.0)
        vs = tl.load(v_scale_ptr + head * stride_sh, mask=rmask, other=1.0)
        kq = tl.minimum(tl.maximum(tl.div_rn(k.to(tl.float32), ks[:, None]), -FP8_MAX), FP8_MAX)
        vq = tl.minimum(tl.maximum(tl.div_rn(v.to(tl.float32), vs[:, None]), -FP8_MAX), FP8_MAX)
        tl.store(k_cache_ptr + c_off, kq.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + c_off, vq.to(v_cache_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(k_cache_ptr + c_off, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + c_off, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


# positions and slots: addresses that follow the step's layout (slices of the packed step); each one scalar load
@triton.jit(do_not_specialize=['pos_ptr', 'slot_ptr'])
def _rope_and_cache_kernel(
    pos_ptr, q_ptr, key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, cos_sin_ptr, k_scale_ptr, v_scale_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_ct, stride_ch,
    stride_sb, stride_st, stride_sh, stride_cs,
    n_q_heads, q_heads_per_program, num_heads,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_HQ: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, KV_KIND: tl.constexpr,
    USE_GDC: tl.constexpr = False,
):
    """rotary_embedding on q (in place) and k, and reshape_and_cache of the rotated k and of v, in one kernel:
    program (t, j) rotates token t's j-th share of q heads and writes its j-th tile of KV heads (k itself is left
    unrotated: only the cache holds it). The same arithmetic as the two kernels, so the same bits."""
    gdc_enter(USE_GDC)
    HALF: tl.constexpr = HEAD_DIM // 2
    t = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    cs_row = cos_sin_ptr + pos * stride_cs
    offs_half = tl.arange(0, HALF_PAD)
    hmask_d = offs_half < HALF
    cos = tl.load(cs_row + offs_half, mask=hmask_d, other=0.0).to(tl.float32)
    sin = tl.load(cs_row + HALF + offs_half, mask=hmask_d, other=0.0).to(tl.float32)
    q0 = j * q_heads_per_program
    _rope_rotate(q_ptr + t * stride_qt + q0 * stride_qh, stride_qh, tl.minimum(q_heads_per_program, n_q_heads - q0),
                 cos, sin, HALF, BLOCK_HQ, HALF_PAD)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    offs_h = j * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    hmask = offs_h < num_heads
    mask = hmask[:, None] & (offs_d[None, :] < HEAD_DIM)
    # k rotated whole-width: each element with its partner in the other half (rotate_half), in rotary_embedding's
    # expressions, rounded to k's dtype as it stores them; then the cache's conversion
    first = offs_d < HALF
    partner = tl.where(first, offs_d + HALF, offs_d - HALF)
    k_row = key_ptr + t * stride_kt + offs_h[:, None] * stride_kh
    k = tl.load(k_row + offs_d[None, :], mask=mask, other=0.0)
    kp = tl.load(k_row + partner[None, :], mask=mask, other=0.0).to(tl.float32)
    kf = k.to(tl.float32)
    c = tl.load(cs_row + offs_d % HALF, mask=offs_d < HEAD_DIM, other=0.0).to(tl.float32)[None, :]
    s = tl.load(cs_row + HALF + offs_d % HALF, mask=offs_d < HEAD_DIM, other=0.0).to(tl.float32)[None, :]
    k = tl.where(first[None, :], kf * c - kp * s, kf * c + kp * s).to(k.dtype)
    v = tl.load(value_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask, other=0.0)
    _write_kv(k, v, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, slot // BLOCK_SIZE, slot % BLOCK_SIZE, offs_h,
              offs_d, hmask, mask, stride_cb, stride_ct, stride_ch, stride_sb, stride_st, stride_sh, KV_KIND)


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                      v_scale: torch.Tensor | None = None) -> None:
    """Write key/value [T, Hkv, D] into k_cache/v_cache [num_blocks, block_size, Hkv, D] at
    slot_mapping [T] (slot = block * block_size + offset; -1 = skip). With an int8 cache,
    quantizes per token and head (symmetric, scale = absmax / 127) and writes k_scale/v_scale
    [num_blocks, block_size, Hkv]. With an fp8 (E4M3) cache, writes x / scale[head] clamped to +-448
    with the static k_scale/v_scale [Hkv] (read only). In place; returns None."""
    T, H, D = key.shape
    if T == 0:
        return
    assert value.shape == key.shape
    assert k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride()
    assert k_cache.shape[2] == H and k_cache.shape[3] == D
    assert key.stride(-1) == 1 and value.stride(-1) == 1 and k_cache.stride(-1) == 1
    assert slot_mapping.shape[0] == T
    kind, k_scale, v_scale, s_strides = kv_scale_args(k_cache, k_scale, v_scale)
    block_d = next_pow2(D)
    # rows of (token, head): tiles of 2,048 elements (one token of Llama-3-8B's 8 KV heads is 1,024); under the
    # interpreter, whose cost is per program, 8,192
    block_r = max(1, (8192 if interpreting() else 2048) // block_d)
    launch(_reshape_and_cache_kernel, (triton.cdiv(T * H, block_r),),
        key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        s_strides[0], s_strides[1], s_strides[2],
        H, T * H,
        BLOCK_SIZE=k_cache.shape[1], HEAD_DIM=D, BLOCK_R=block_r, BLOCK_D=block_d,
        KV_KIND=kind,
        num_warps=4,
    )


def rope_and_cache(positions: torch.Tensor, q: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                   cos_sin_cache: torch.Tensor, k_scale: torch.Tensor | None = None,
                   v_scale: torch.Tensor | None = None) -> None:
    """rotary_embedding(positions, q, key, cos_sin_cache) then reshape_and_cache(key, value, ...), in one kernel,
    with the same bits in q and in the cache; key itself is left unrotated. q [T, Hq, D] and key/value [T, Hkv, D]
    with a unit last stride (slices of a fused qkv output), positions [T], cos_sin_cache [max_pos, D] float32."""
    T, H, D = key.shape
    Hq = q.shape[1]
    if T == 0:
        return
    assert q.shape[0] == T and q.shape[2] == D and value.shape == key.shape and D % 2 == 0
    assert q.stride(-1) == 1 and key.stride(-1) == 1 and value.stride(-1) == 1 and k_cache.stride(-1) == 1
    assert k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride()
    assert k_cache.shape[2] == H and k_cache.shape[3] == D and slot_mapping.shape[0] == T
    assert cos_sin_cache.shape[1] == D and cos_sin_cache.stride(1) == 1
    kind, k_scale, v_scale, s_strides = kv_scale_args(k_cache, k_scale, v_scale)
    block_d = next_pow2(D)
    block_h = min(next_pow2(H), max(1, 2048 // block_d))
    tiles = triton.cdiv(H, block_h)
    q_per = triton.cdiv(Hq, tiles)
    half_pad = next_pow2(D // 2)
    launch(_rope_and_cache_kernel, (T, tiles),
        positions, q, key, value, k_cache, v_cache, slot_mapping, cos_sin_cache, k_scale, v_scale,
        q.stride(0), q.stride(1), key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        s_strides[0], s_strides[1], s_strides[2], cos_sin_cache.stride(0),
        Hq, q_per, H,
        BLOCK_SIZE=k_cache.shape[1], HEAD_DIM=D, HALF_PAD=half_pad,
        BLOCK_HQ=min(next_pow2(q_per), max(1, 4096 // half_pad)), BLOCK_H=block_h, BLOCK_D=block_d, KV_KIND=kind,
        num_warps=4,
    )
