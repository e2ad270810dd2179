"""paged_prefill_attention: varlen causal attention of a flattened batch of query tokens
against the paged KV cache (chunked prefill / prefix caching: the cache may hold a
prefix before this step's tokens, whose K/V are already written).

Grid: (query tile, sequence, q head). Each program runs a flash-attention loop over the
K/V tiles it can see: first the tiles wholly before its first query position (no causal
mask), then the diagonal tiles (masked).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import KV_FLOAT, KV_FP8, KV_INT8, gdc_enter, interpreting, kv_scale_args, launch, next_pow2
from .decode_attention import _online_softmax

LOG2E = 1.4426950408889634


@triton.jit
def _prefill_tile(q, acc, m_i, l_i, n0, q_pos, seq_len, kvh, bt_row,
                  k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, qk_scale,
                  stride_cb, stride_ct, stride_ch, stride_sb, stride_st, stride_sh,
                  HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                  KV_KIND: tl.constexpr, MASK: tl.constexpr, FP32: tl.constexpr):
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    if MASK:
        nmask = offs_n < seq_len
        blk = tl.load(bt_row + offs_n // BLOCK_SIZE, mask=nmask, other=0).to(tl.int64)
    else:
        blk = tl.load(bt_row + offs_n // BLOCK_SIZE).to(tl.int64)
    tok = blk * stride_cb + (offs_n % BLOCK_SIZE) * stride_ct + kvh * stride_ch
    if MASK:
        k = tl.load(k_cache_ptr + tok[:, None] + offs_d[None, :], mask=nmask[:, None], other=0.0)
    else:
        k = tl.load(k_cache_ptr + tok[:, None] + offs_d[None, :])
    if FP32:
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k.to(q.dtype)))
    if KV_KIND == KV_INT8:
        s_off = blk * stride_sb + (offs_n % BLOCK_SIZE) * stride_st + kvh * stride_sh
        if MASK:
            ks = tl.load(k_scale_ptr + s_off, mask=nmask, other=0.0)
            vs = tl.load(v_scale_ptr + s_off, mask=nmask, other=0.0)
        else:
            ks = tl.load(k_scale_ptr + s_off)
            vs = tl.load(v_scale_ptr + s_off)
        s = s * (ks * qk_scale)[None, :]
    else:
        s = s * qk_scale
    if MASK:
        causal = (offs_n[None, :] <= q_pos[:, None]) & nmask[None, :]
        s = tl.where(causal, s, float("-inf"))
    p, alpha, m_new, l_i = _online_softmax(s, m_i, l_i)
    if KV_KIND == KV_INT8:
        p = p * vs[None, :]
    if MASK:
        v = tl.load(v_cache_ptr + tok[:, None] + offs_d[None, :], mask=nmask[:, None], other=0.0)
    else:
        v = tl.load(v_cache_ptr + tok[:, None] + offs_d[None, :])
    if FP32:
        pv = tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision="ieee")
    else:
        pv = tl.dot(p.to(q.dtype), v.to(q.dtype))
    acc = acc * alpha[:, None] + pv
    return acc, m_new, l_i


# Values that change with traffic are not specialized on, so no new variant compiles after warm-up
# (docs/kernels.md): the block table's width, and the addresses of the index tensors, which a mixed step passes as
# row slices (block_tables[nd:], seq_lens[nd:]). As specializations they bought nothing: the block-table row's
# alignment is unknown anyway (stride_bt), the others are scalar loads.
@triton.jit(do_not_specialize=['block_tables_ptr', 'query_start_loc_ptr', 'seq_lens_ptr', 'stride_bt'])
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, block_tables_ptr,
    query_start_loc_ptr, seq_lens_ptr, out_ptr,
    qk_scale,
    stride_qt, stride_qh,
    stride_cb, stride_ct, stride_ch,
    stride_sb, stride_st, stride_sh,
    stride_bt,
    stride_ot, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    KV_KIND: tl.constexpr, FP32: tl.constexpr,
    USE_GDC: tl.constexpr = False,
):
    gdc_enter(USE_GDC)
    # heaviest (last, longest-context) query tiles first: better tail balance under causality
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + b)
    q_len = tl.load(query_start_loc_ptr + b + 1) - q_start
    m_start = pid_m * BLOCK_M
    if m_start >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    ctx_len = seq_len - q_len
    kvh = h // GROUP

    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mmask = offs_m < q_len
    rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=mmask[:, None], other=0.0)
    if KV_KIND == KV_FLOAT:
        q = q.to(k_cache_ptr.dtype.element_ty)
    elif KV_KIND == KV_FP8 and not FP32:  # E4M3 tiles in fp16, int8 in q's dtype (decode_attention.py says why)
        q = q.to(tl.float16)
    if KV_KIND == KV_FP8:
        # static per-head scales: K's folds into the score scale, V's multiplies the finished accumulator
        qk_scale = qk_scale * tl.load(k_scale_ptr + kvh * stride_sh)
    q_pos = ctx_len + offs_m

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    bt_row = block_tables_ptr + b.to(tl.int64) * stride_bt

    # K/V positions < ctx_len + m_start are visible to every query row of this tile
    full_end = ((ctx_len + m_start) // BLOCK_N) * BLOCK_N
    for n0 in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _prefill_tile(q, acc, m_i, l_i, n0, q_pos, seq_len, kvh, bt_row,
                                      k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, qk_scale,
                                      stride_cb, stride_ct, stride_ch, stride_sb, stride_st, stride_sh,
                                      HEAD_DIM, BLOCK_SIZE, BLOCK_N, KV_KIND, False, FP32)
    end = tl.minimum(seq_len, ctx_len + m_start + BLOCK_M)
    for n0 in range(full_end, end, BLOCK_N):
        acc, m_i, l_i = _prefill_tile(q, acc, m_i, l_i, n0, q_pos, seq_len, kvh, bt_row,
                                      k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, qk_scale,
                                      stride_cb, stride_ct, stride_ch, stride_sb, stride_st, stride_sh,
                                      HEAD_DIM, BLOCK_SIZE, BLOCK_N, KV_KIND, True, FP32)

    if KV_KIND == KV_FP8:
        acc = acc * (tl.load(v_scale_ptr + kvh * stride_sh) / l_i)[:, None]
    else:
        acc = acc / l_i[:, None]
    tl.store(out_ptr + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mmask[:, None])


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                            seq_lens: torch.Tensor, scale: float, max_query_len: int,
                            k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                            out: torch.Tensor | None = None, config: tuple | None = None) -> torch.Tensor:
    """Varlen causal attention: q [T, Hq, D] (sequence b's tokens are rows
    query_start_loc[b]:query_start_loc[b+1], at positions seq_lens[b] - q_len_b + i)
    against the paged cache; returns [T, Hq, D] in q's dtype. max_query_len must be
    >= every q_len (it sizes the grid). config: (BLOCK_M, BLOCK_N, num_warps, num_stages)
    override, for tuning only."""
    T, Hq, D = q.shape
    _, block_size, Hkv, Dk = k_cache.shape
    assert Dk == D and Hq % Hkv == 0 and D == next_pow2(D)
    assert k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride()
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1
    if out is None:
        out = torch.empty_like(q)
    B = query_start_loc.shape[0] - 1
    if T == 0 or B == 0 or max_query_len == 0:
        return out
    kind, k_scale, v_scale, s_strides = kv_scale_args(k_cache, k_scale, v_scale)
    fp32 = q.dtype == torch.float32
    # Tiles measured on an H100 (docs/kernels.md, 8 x 512 tokens with and without a 1536
    # prefix): bf16/fp16 and fp8 caches 128x128 8 warps 2 stages (fp8: 121/493 us against 136/560 with the
    # int8 tile); int8 cache 64x128 4 warps 2 stages.
    if fp32:
        block_m, block_n, warps, stages = 64, 32, 4, 2
    elif kind == KV_INT8.value or D > 128:
        block_m, block_n, warps, stages = 64, 128 if D <= 128 else 64, 4, 2
    else:
        block_m, block_n, warps, stages = 128, 128, 8, 2
    # short rows (decode-sized chunks): a BLOCK_M class of 16, 32 or 64 (kiln.engine.variants.prefill_tile)
    if max_query_len <= 64:
        block_m = max(16, next_pow2(max_query_len))
        warps = 4
    if interpreting():  # the GPU's BLOCK_M classes, so CI launches the variants a GPU compiles; K/V tiles of 64
        block_n, stages = 64, 1
    if config is not None:
        block_m, block_n, warps, stages = config
    grid = (triton.cdiv(max_query_len, block_m), B, Hq)
    launch(_prefill_kernel, grid,
        q, k_cache, v_cache, k_scale, v_scale, block_tables, query_start_loc, seq_lens, out,
        scale * LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        s_strides[0], s_strides[1], s_strides[2],
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=Hq // Hkv, HEAD_DIM=D, BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=block_n,
        KV_KIND=kind, FP32=fp32,
        num_warps=warps, num_stages=stages,
    )
    return out
