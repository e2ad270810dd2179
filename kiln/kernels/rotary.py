"""rotary_embedding: neox / Hugging Face rotate_half RoPE, in place on q and k."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import gdc_enter, launch, next_pow2


@triton.jit
def _rope_rotate(ptr, stride_h, n_heads, cos, sin, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                 HALF_PAD: tl.constexpr):
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HALF_PAD)
    for h0 in range(0, n_heads, BLOCK_H):
        hh = h0 + offs_h
        mask = (hh < n_heads)[:, None] & (offs_d < HALF)[None, :]
        p1 = ptr + hh[:, None] * stride_h + offs_d[None, :]
        x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(p1 + HALF, mask=mask, other=0.0).to(tl.float32)
        o1 = x1 * cos[None, :] - x2 * sin[None, :]
        o2 = x2 * cos[None, :] + x1 * sin[None, :]
        tl.store(p1, o1.to(ptr.dtype.element_ty), mask=mask)
        tl.store(p1 + HALF, o2.to(ptr.dtype.element_ty), mask=mask)


# the positions' address follows the step's token count (a slice of the packed step: aligned for even counts);
# it is one scalar load
@triton.jit(do_not_specialize=['pos_ptr'])
def _rope_kernel(
    pos_ptr, q_ptr, k_ptr, cache_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_c,
    n_q_heads, n_k_heads,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
    USE_GDC: tl.constexpr = False,
):
    gdc_enter(USE_GDC)
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    offs_d = tl.arange(0, HALF_PAD)
    dmask = offs_d < HALF
    cos = tl.load(cache_ptr + pos * stride_c + offs_d, mask=dmask, other=0.0).to(tl.float32)
    sin = tl.load(cache_ptr + pos * stride_c + HALF + offs_d, mask=dmask, other=0.0).to(tl.float32)
    _rope_rotate(q_ptr + t * stride_qt, stride_qh, n_q_heads, cos, sin, HALF, BLOCK_HQ, HALF_PAD)
    _rope_rotate(k_ptr + t * stride_kt, stride_kh, n_k_heads, cos, sin, HALF, BLOCK_HK, HALF_PAD)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply RoPE in place: q [T, Hq, D], k [T, Hkv, D] (views with a unit last stride,
    e.g. slices of a fused qkv output), positions [T] int64, cos_sin_cache [max_pos, D]
    float32 (first D/2 columns cos, last D/2 sin). Returns (q, k)."""
    T, Hq, D = q.shape
    Hk = k.shape[1]
    assert k.shape[0] == T and k.shape[2] == D and D % 2 == 0
    assert cos_sin_cache.shape[1] == D and cos_sin_cache.stride(1) == 1
    assert q.stride(2) == 1 and k.stride(2) == 1
    if T == 0:
        return q, k
    half = D // 2
    half_pad = next_pow2(half)
    per_tile = max(1, 4096 // half_pad)
    block_hq = min(next_pow2(Hq), per_tile)
    block_hk = min(next_pow2(Hk), per_tile)
    launch(_rope_kernel, (T,),
        positions, q, k, cos_sin_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
        Hq, Hk,
        HALF=half, HALF_PAD=half_pad, BLOCK_HQ=block_hq, BLOCK_HK=block_hk,
        num_warps=4,
    )
    return q, k
