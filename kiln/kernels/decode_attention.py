"""paged_decode_attention: one query token per sequence against the paged KV cache.

Flash-decoding: the grid is (sequence, kv head, partition). Each program loads every
K/V tile of its partition once for all the q heads of its GQA group (the group is the
M dimension of the tile products, padded to 16), keeps an online softmax in float32
and writes a partial result; the last of a sequence's programs for a kv head to finish
(an arrival counter) merges the partitions and writes the output. When one partition
covers the longest context, each program writes its output directly.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ._utils import (KV_FLOAT, KV_FP8, KV_INT8, gdc_enter, interpreting, kv_scale_args, launch, next_pow2, num_sms,
                     zeroed_counters)

LOG2E = 1.4426950408889634
MERGE_CHUNK = tl.constexpr(4)  # partitions whose partial results the merge loads at once


@triton.jit
def _online_softmax(s, m_i, l_i):
    """One tile of the streaming softmax (base 2): scores s [M, N] against the running max m_i and sum l_i [M] ->
    (p, the factor alpha that rescales what came before, the new max, the new sum)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, axis=1)


# Values that change with traffic are not specialized on, so no new variant compiles after warm-up
# (docs/kernels.md): the partition length and count follow the batch and the longest context; the block table's,
# seq lens' addresses follow the step's layout (a mixed step passes row slices). None of them buys speed as a
# specialization: the partition start gets its divisibility back from tl.multiple_of, the block-table row's
# alignment is unknown anyway (stride_bt), and seq_lens is one scalar load.
@triton.jit(do_not_specialize=['block_tables_ptr', 'seq_lens_ptr', 'stride_bt', 'num_partitions', 'partition'])
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, block_tables_ptr, seq_lens_ptr,
    out_ptr, part_out_ptr, part_m_ptr, part_l_ptr, count_ptr,
    qk_scale,  # softmax scale * log2(e)
    stride_qb, stride_qh,
    stride_cb, stride_ct, stride_ch,
    stride_sb, stride_st, stride_sh,
    stride_bt,
    stride_ob, stride_oh,
    num_partitions, partition,  # partition: tokens per program, a power of two, a multiple of BLOCK_N
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    KV_KIND: tl.constexpr, DIRECT: tl.constexpr, FP32: tl.constexpr, INT8_QK: tl.constexpr = False,
    WIDE_V: tl.constexpr = False, MAGIC: tl.constexpr = False, USE_GDC: tl.constexpr = False,
    SWAP: tl.constexpr = False,
):
    gdc_enter(USE_GDC)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    part = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    start = tl.multiple_of(part * partition, BLOCK_N)
    if start >= seq_len:
        return
    end = tl.minimum(start + partition, seq_len)

    offs_g = tl.arange(0, GROUP_PAD)
    gmask = offs_g < GROUP
    heads = kvh * GROUP + offs_g
    offs_d = tl.arange(0, HEAD_DIM)
    offs_w = tl.arange(0, HEAD_DIM // 4)  # WIDE_V: 32-bit words of four codes
    b64 = b.to(tl.int64)
    q = tl.load(q_ptr + b64 * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=gmask[:, None], other=0.0)
    if KV_KIND == KV_FLOAT:
        cdtype = k_cache_ptr.dtype.element_ty
        q = q.to(cdtype)
    elif FP32:  # the reference
        cdtype = tl.float32
    elif KV_KIND == KV_FP8:
        # E4M3 converts exactly to fp16 in one instruction per two codes (to bf16 it takes three, and that bounded
        # this loop: H100, 666 -> 569 us at B=256); so its tile products run in fp16 whatever q's dtype (q is
        # O(1..100), P in [0, 1]: both well inside fp16, with more mantissa than bf16)
        cdtype = tl.float16
        q = q.to(cdtype)
    else:
        # int8 codes convert exactly to q's dtype (one I2F each). Through fp16 by an integer add and a bitcast
        # instead, the loop spilled registers (sm_90 SASS) and ran slower: H100, B=256, 671 -> 816 us
        cdtype = q.dtype
    if KV_KIND == KV_FP8:
        # one static scale per kv head, so per program: K's folds into the score scale, V's multiplies the
        # finished accumulator (P.V is linear in V); no per-token scale loads
        qk_scale = qk_scale * tl.load(k_scale_ptr + kvh * stride_sh)

    if INT8_QK:
        # an int8 cache's Q.K^T on the int8 tensor cores: q quantized per head here (symmetric, its own scale), so
        # that no K code is converted (converting every K and V code bounds this kernel: docs/kernels.md, run K)
        qf = q.to(tl.float32)
        q_scale = tl.maximum(tl.max(tl.abs(qf), axis=1), 1e-30) / 127.0
        qf = qf / q_scale[:, None]
        q8 = tl.where(qf >= 0, qf + 0.5, qf - 0.5).to(tl.int8)  # round half away from zero
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    bt_row = block_tables_ptr + b64 * stride_bt
    # a tile's rows' offsets inside their blocks (codes, 32-bit words of codes, an int8 cache's scales), with the kv
    # head's: the same every tile when a tile is whole blocks (BLOCK_N a multiple of the block size; each tile then
    # starts at a multiple of it), so computed once here (sm_90 SASS, one 128-token tile, swapped: fp8 694 -> 625
    # instructions; int8 at 64-token tiles 606 -> 544; bf16 793 -> 645)
    WHOLE_BLOCKS: tl.constexpr = BLOCK_N % BLOCK_SIZE == 0
    in_block = (tl.arange(0, BLOCK_N) % BLOCK_SIZE) * stride_ct + kvh * stride_ch
    in_block_s = (tl.arange(0, BLOCK_N) % BLOCK_SIZE) * stride_st + kvh * stride_sh
    if WIDE_V:  # 32-bit words of four codes: the wrapper widens only where every stride is a multiple of 4
        stride_cb_w = stride_cb // 4
        in_block_w = in_block // 4
    # an int8 cache's K widened as loaded in the swapped products (byte permutes and a subtraction per two codes,
    # fp16 products: q is O(1..100)): sm_90 SASS 1,062 -> 983 instructions a tile against the conversion to q's bf16
    WIDE_K: tl.constexpr = SWAP and WIDE_V and KV_KIND == KV_INT8
    if SWAP:
        qT = tl.trans(q)
        accT = tl.zeros([HEAD_DIM, GROUP_PAD], tl.float32)
        # the softmax's sums per token position, reduced once after the loop: a per-tile sum across the warps (the
        # tokens are M, split over the warps) took 3 of the tile's 9 barriers (sm_90 SASS, fp8: 706 -> 694
        # instructions a tile, int8 at 64-token tiles 634 -> 606)
        lT = tl.zeros([BLOCK_N, GROUP_PAD], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < end
        blk = tl.load(bt_row + offs_n // BLOCK_SIZE, mask=nmask, other=0).to(tl.int64)
        if WHOLE_BLOCKS:
            tok = blk * stride_cb + in_block
            s_off = blk * stride_sb + in_block_s
            if WIDE_V:
                wtok = blk * stride_cb_w + in_block_w
        else:
            tok = blk * stride_cb + (offs_n % BLOCK_SIZE) * stride_ct + kvh * stride_ch
            s_off = blk * stride_sb + (offs_n % BLOCK_SIZE) * stride_st + kvh * stride_sh
            if WIDE_V:
                wtok = tok // 4
        if not WIDE_K:
            k = tl.load(k_cache_ptr + tok[:, None] + offs_d[None, :], mask=nmask[:, None], other=0.0)
        if WIDE_V:
            # V's 8-bit codes widened to fp16 as loaded, four to a 32-bit word, before the P.V operand's
            # shared-memory stage: that stage transposes V, and an 8-bit transpose is one byte load per code
            # (sm_90 SASS, B=256 tile: 128 LDS.U8 a tile), a 16-bit one a matrix load (ldmatrix.trans)
            words = tl.load(v_cache_ptr.to(tl.pointer_type(tl.int32)) + wtok[:, None] + offs_w[None, :],
                            mask=nmask[:, None], other=0)
            v = _widen_codes(words, KV_KIND, MAGIC, BLOCK_N, HEAD_DIM)
        else:
            v = tl.load(v_cache_ptr + tok[:, None] + offs_d[None, :], mask=nmask[:, None], other=0.0)
        if SWAP:
            # the tile's tokens as the products' M, the GQA group as N (padded to 8: mma.sync's n8)
            if WIDE_K:  # loaded after V: issued before it, 558 instructions a 64-token tile against 544
                kw = tl.load(k_cache_ptr.to(tl.pointer_type(tl.int32)) + wtok[:, None] + offs_w[None, :],
                             mask=nmask[:, None], other=0)
                sT = tl.dot(_widen_codes(kw, KV_KIND, MAGIC, BLOCK_N, HEAD_DIM), qT.to(tl.float16))
            else:
                sT = tl.dot(k.to(cdtype), qT)
            if KV_KIND == KV_INT8:
                ks = tl.load(k_scale_ptr + s_off, mask=nmask, other=0.0)
                vs = tl.load(v_scale_ptr + s_off, mask=nmask, other=0.0)
                sT = sT * (ks * qk_scale)[:, None]
            else:
                sT = sT * qk_scale
            sT = tl.where(nmask[:, None], sT, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sT, axis=0))
            alpha = tl.exp2(m_i - m_new)
            pT = tl.exp2(sT - m_new[None, :])
            lT = lT * alpha[None, :] + pT
            if KV_KIND == KV_INT8:
                pT = pT * vs[:, None]
            pv_dtype = cdtype if KV_KIND == KV_FLOAT else tl.float16
            accT = accT * alpha[None, :] + tl.dot(tl.trans(v.to(pv_dtype)), pT.to(pv_dtype))
            m_i = m_new
        else:
            if INT8_QK:
                s = tl.dot(q8, tl.trans(k), out_dtype=tl.int32).to(tl.float32) * q_scale[:, None]
            elif FP32:
                s = tl.dot(q, tl.trans(k.to(cdtype)), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k.to(cdtype)))
            if KV_KIND == KV_INT8:
                ks = tl.load(k_scale_ptr + s_off, mask=nmask, other=0.0)
                vs = tl.load(v_scale_ptr + s_off, mask=nmask, other=0.0)
                s = s * (ks * qk_scale)[None, :]
            else:
                s = s * qk_scale
            s = tl.where(nmask[None, :], s, float("-inf"))
            p, alpha, m_new, l_i = _online_softmax(s, m_i, l_i)
            if KV_KIND == KV_INT8:
                p = p * vs[None, :]
            if FP32:
                pv = tl.dot(p.to(cdtype), v.to(cdtype), input_precision="ieee")
            elif WIDE_V:  # fp16 (more mantissa than bf16; p, and p times an int8 cache's scales, well inside its range)
                pv = tl.dot(p.to(tl.float16), v)
            else:
                pv = tl.dot(p.to(cdtype), v.to(cdtype))
            acc = acc * alpha[:, None] + pv
            m_i = m_new

    if SWAP:
        acc = tl.trans(accT)
        l_i = tl.sum(lT, axis=0)
    if KV_KIND == KV_FP8:
        acc = acc * (tl.load(v_scale_ptr + kvh * stride_sh) / l_i)[:, None]
    else:
        acc = acc / l_i[:, None]
    n_parts = tl.cdiv(seq_len, partition)  # the programs of this sequence that did not return early
    if DIRECT or n_parts == 1:  # this program holds the whole context (H100, 128 tokens: 3.8 us a layer, not 5.3)
        o_ptrs = out_ptr + b64 * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=gmask[:, None])
    else:
        # partial buffers: [B, Hq, P, D] and [B, Hq, P], contiguous
        rows = (b64 * (GROUP * tl.num_programs(1)) + heads) * num_partitions
        tl.store(part_out_ptr + (rows + part)[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=gmask[:, None])
        tl.store(part_m_ptr + rows + part, m_i, mask=gmask)
        tl.store(part_l_ptr + rows + part, l_i, mask=gmask)
        tl.debug_barrier()  # every thread's partials stored before the count goes up
        count = count_ptr + b64 * tl.num_programs(1) + kvh
        if tl.atomic_add(count, 1, sem="acq_rel") == n_parts - 1:
            _merge_partitions(out_ptr, part_out_ptr, part_m_ptr, part_l_ptr, rows, n_parts, b64, heads, gmask,
                              offs_d, stride_ob, stride_oh, GROUP_PAD, HEAD_DIM)
            tl.store(count, 0)


@triton.jit
def _widen_codes(words, KV_KIND: tl.constexpr, MAGIC: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """[ROWS, COLS // 4] int32 words of four 8-bit codes each (int8 or E4M3; the lowest address in the low byte) ->
    [ROWS, COLS] fp16, exact. MAGIC (a GPU): E4M3 two codes an instruction (cvt.rn.f16x2.e4m3x2); int8 by the
    bits: each code + 128 under an exponent of 1024 (byte permutes), then one subtraction of 1152 per two codes.
    Else plain byte operations (the interpreter)."""
    if MAGIC:
        if KV_KIND == KV_FP8:
            w01, w23 = tl.inline_asm_elementwise(
                asm="""{
                .reg .b16 lo, hi;
                mov.b32 {lo, hi}, $2;
                cvt.rn.f16x2.e4m3x2 $0, lo;
                cvt.rn.f16x2.e4m3x2 $1, hi;
                }""", constraints="=r,=r,r", args=[words], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
        else:
            w01, w23 = tl.inline_asm_elementwise(
                asm="""{
                .reg .b32 t, a, b, m;
                xor.b32 t, $2, 0x80808080;
                prmt.b32 a, t, 0x64646464, 0x4140;
                prmt.b32 b, t, 0x64646464, 0x4342;
                mov.b32 m, 0x64806480;
                sub.f16x2 $0, a, m;
                sub.f16x2 $1, b, m;
                }""", constraints="=r,=r,r", args=[words], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
        c0 = (w01 & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
        c1 = (w01 >> 16).to(tl.int16).to(tl.float16, bitcast=True)
        c2 = (w23 & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
        c3 = (w23 >> 16).to(tl.int16).to(tl.float16, bitcast=True)
    else:
        b0 = (words & 0xFF).to(tl.int8)
        b1 = ((words >> 8) & 0xFF).to(tl.int8)
        b2 = ((words >> 16) & 0xFF).to(tl.int8)
        b3 = ((words >> 24) & 0xFF).to(tl.int8)
        if KV_KIND == KV_FP8:
            b0 = b0.to(tl.float8e4nv, bitcast=True)
            b1 = b1.to(tl.float8e4nv, bitcast=True)
            b2 = b2.to(tl.float8e4nv, bitcast=True)
            b3 = b3.to(tl.float8e4nv, bitcast=True)
        c0, c1, c2, c3 = b0.to(tl.float16), b1.to(tl.float16), b2.to(tl.float16), b3.to(tl.float16)
    # [ROWS, COLS // 4, pair, code in pair] -> column 4j + 2 * pair + code: the codes' order in memory
    return tl.reshape(tl.join(tl.join(c0, c2), tl.join(c1, c3)), (ROWS, COLS))


@triton.jit
def _merge_partitions(out_ptr, part_out_ptr, part_m_ptr, part_l_ptr, rows, n_parts, b64, heads, gmask, offs_d,
                      stride_ob, stride_oh, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr):
    """The output of a GQA group's heads from their partitions' partial results, in partition order (the same sums
    whichever program came last), through L2 (.cg: where the other programs' stores are). One pass with a running
    max over chunks of MERGE_CHUNK partitions, each chunk's loads in flight at once: partition by partition the
    merge is a chain of L2 round trips (H100: ~0.25 us a partition)."""
    offs_p = tl.arange(0, MERGE_CHUNK)
    m_run = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    denom = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for p0 in range(0, n_parts, MERGE_CHUNK):
        pmask = gmask[:, None] & ((p0 + offs_p) < n_parts)[None, :]               # [G, P]
        idx = rows[:, None] + p0 + offs_p[None, :]
        m = tl.load(part_m_ptr + idx, mask=pmask, other=float("-inf"), cache_modifier=".cg")
        l = tl.load(part_l_ptr + idx, mask=pmask, other=0.0, cache_modifier=".cg")
        o = tl.load(part_out_ptr + idx[:, :, None] * HEAD_DIM + offs_d[None, None, :], mask=pmask[:, :, None],
                    other=0.0, cache_modifier=".cg")                               # [G, P, D]
        m_new = tl.maximum(m_run, tl.max(m, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # padded heads: weight 0, no NaN
        alpha = tl.exp2(m_run - m_safe)
        w = l * tl.exp2(m - m_safe[:, None])
        denom = denom * alpha + tl.sum(w, axis=1)
        acc = acc * alpha[:, None] + tl.sum(o * w[:, :, None], axis=1)
        m_run = m_new
    denom = tl.where(gmask, denom, 1.0)
    tl.store(out_ptr + b64 * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
             (acc / denom[:, None]).to(out_ptr.dtype.element_ty), mask=gmask[:, None])


@functools.lru_cache(maxsize=None)
def swap_default() -> bool:
    """KILN_DECODE_SWAP=0: an 8-bit cache's decode without its tile products swapped (SWAP; on by default since run
    AM) and at the tile before it. Read once per process."""
    return os.environ.get("KILN_DECODE_SWAP", "1") == "1"


@functools.lru_cache(maxsize=None)
def swapped_tile() -> tuple[int, int, int]:
    """(BLOCK_N, warps, stages) of an 8-bit cache's swapped decode: (64, 4, 3), or KILN_DECODE_TILE=N,W,S, for timing
    other tiles in the engine's own steps (the kernel grid alone misranked them: run AR). Read once per process."""
    raw = os.environ.get("KILN_DECODE_TILE", "").strip()
    if not raw:
        return 64, 4, 3
    try:
        n, w, st = (int(x) for x in raw.split(","))
    except ValueError:
        n = w = st = 0
    if n < 16 or n & (n - 1) or w not in (1, 2, 4, 8) or not 1 <= st <= 4:
        raise ValueError(f"KILN_DECODE_TILE={raw!r}: want BLOCK_N,warps,stages, e.g. 64,4,3 (BLOCK_N a power of "
                         f"two >= 16, warps 1/2/4/8, stages 1-4)")
    return n, w, st


@functools.lru_cache(maxsize=None)
def wide_v_default() -> bool:
    """KILN_DECODE_WIDE_V=0: an 8-bit cache's decode without V widened as loaded (WIDE_V; on by default since run AB)
    and at the config before it. Read once per process."""
    return os.environ.get("KILN_DECODE_WIDE_V", "1") == "1"


def choose_partition(batch: int, num_kv_heads: int, max_ctx: int, device: torch.device,
                     block_n: int) -> int:
    """Partition length (tokens per program): one partition per sequence when the grid
    already has >= 8 programs per SM, else halve until it does, down to one tile while that makes at most 16
    partitions, else two tiles. Measured on an H100 (docs/kernels.md): B=64 x 8 kv heads at 1-4k context runs
    3-11% faster split into 1024-token partitions than whole; B=256 runs 1-3% faster whole; at B=1 (run Z) a
    384-token context takes 6.3 us a layer in one-tile partitions against 8.4 in two-tile ones, and 4,096 tokens
    14.3 against 13.7 (the merge of 32 partitions costs more than it saves)."""
    target = 8 * num_sms(device)
    part = max(block_n, next_pow2(max_ctx))
    min_part = block_n if triton.cdiv(max_ctx, block_n) <= 16 else 2 * block_n
    while part > min_part and batch * num_kv_heads * triton.cdiv(max_ctx, part) < target:
        part //= 2
    return part


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                           max_seq_len: int | None = None, partition_size: int | None = None,
                           out: torch.Tensor | None = None, config: tuple | None = None) -> torch.Tensor:
    """Decode attention: q [B, Hq, D] (one token per sequence, the last of its context)
    against the paged cache; returns [B, Hq, D] in q's dtype.

    max_seq_len: an upper bound of seq_lens (default: block_tables.shape[1] * block_size,
    which needs no device sync and so is safe under CUDA graphs). partition_size: tokens
    per flash-decoding partition (default: chosen to fill the SMs); a power of two >= 32.
    config: (BLOCK_N, num_warps, num_stages[, int8_qk[, wide_v[, swap]]]) override, for tuning only; int8_qk, with
    bf16 or fp16 q: an int8 cache's Q.K^T on the int8 tensor cores, q quantized per head (the default without a
    config); wide_v: an 8-bit cache's V codes widened to fp16 before P.V's shared-memory stage (without a config,
    wide_v_default()); swap: an 8-bit cache's tile products with the tile's tokens as M and the GQA group as N
    (K.q^T and V^T.P^T; without a config, swap_default()).
    """
    B, Hq, D = q.shape
    _, block_size, Hkv, Dk = k_cache.shape
    assert Dk == D and Hq % Hkv == 0 and D == next_pow2(D)
    assert k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride()
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1
    group = Hq // Hkv
    if out is None:
        out = torch.empty_like(q)
    if B == 0:
        return out
    kind, k_scale, v_scale, s_strides = kv_scale_args(k_cache, k_scale, v_scale)
    fp32 = q.dtype == torch.float32

    # BLOCK_N 128, 4 warps, 2 stages: best or within 1% of the best of the configs tried on
    # an H100 for bf16 and int8 caches at B = 1, 64, 256 (int8: 20-25% faster than 64/4/3).
    block_n, warps, stages = (128, 4, 2) if D <= 128 and not fp32 else (64, 4, 2)
    # float32 q (the reference dtype) at 128-token tiles with the partition merge compiled in: NaN heads from the
    # one-partition store on an H100 (run AE: heads 1-3 of each group of 8, B=2, D=128, contexts 114-125); 64-token
    # tiles are right, and fit float32's registers better
    # an int8 cache's Q.K^T on the int8 tensor cores (q quantized per head): 8% faster on an H100 (run O: 317.2
    # against 346.3 us, B=256, context ~1,100); perplexity on CPU with q through the same quantization, int8 cache:
    # +0.03% / +0.28% over the float cache in float32 / bf16, against +0.22% / +0.48% without it
    # (benchmarks/int8_qk_accuracy.py, 2026-12-06)
    int8_qk, wide_v, swap = True, False, False
    if kind != KV_FLOAT.value and wide_v_default():
        # V widened as loaded, 3 stages, int8 codes converted for Q.K^T as well: the decode8 grid's best for both
        # 8-bit kinds (run AB, H100, B=256, context ~1,100: int8 273.7 us against 314.8 at the old default, fp8
        # 240.1 against 249.9; with the int8 Q.K^T at 3 stages 289.7)
        int8_qk, wide_v, stages = False, True, 3
        if swap_default():
            # the products swapped at 64-token tiles: run AM (H100, B=256, context ~1,100) fp8 245.8 -> 238.9 us
            # at (128, 4, 3), int8 283.0 -> 265.9 us at (64, 4, 3) (277.2 at 128); since the offsets are computed
            # once a program (a314785), run AN: fp8 228.5 us at 64 against 240.8 at 128, int8 246.7 against 278.0
            swap = True
            block_n, warps, stages = swapped_tile()
    if config is not None:
        block_n, warps, stages, *rest = config
        int8_qk, wide_v = bool(rest and rest[0]), bool(len(rest) > 1 and rest[1])
        swap = bool(len(rest) > 2 and rest[2])
    int8_qk = int8_qk and kind == KV_INT8.value and not fp32
    # the swapped products (8-bit caches; sm_90 SASS of the decode8 tile, 128 tokens, 4 warps, 3 stages, V
    # widened: fp8 936 -> 706 instructions a thread, int8 1,299 -> 983): the GQA group is the products' N,
    # padded to 8 instead of 16 as M, and the ~200 register moves that built q's A fragments go (q^T is B now)
    swap = swap and kind != KV_FLOAT.value and not fp32 and not int8_qk
    # the float32 reference keeps the plain loads; the words need 4-byte-aligned rows
    wide_v = (wide_v and kind != KV_FLOAT.value and not fp32 and D % 4 == 0 and v_cache.data_ptr() % 4 == 0
              and all(s % 4 == 0 for s in v_cache.stride()[:3]))
    if interpreting():
        stages = 1
    max_ctx = max_seq_len if max_seq_len is not None else block_tables.shape[1] * block_size
    # partitions as for 64-token tiles at least: a 32-token tile (a config) splits a sequence no finer than they do
    part = partition_size or choose_partition(B, Hkv, max_ctx, q.device, max(block_n, 64))
    block_n = min(block_n, part)
    assert part % block_n == 0, "partition_size: a power of two >= 32"
    num_parts = triton.cdiv(max_ctx, part)
    direct = num_parts == 1
    if direct:
        part_out = part_m = part_l = count = out  # unused
    else:
        count = zeroed_counters(B * Hkv, q.device)
        part_out = torch.empty((B, Hq, num_parts, D), dtype=torch.float32, device=q.device)
        part_m = torch.empty((B, Hq, num_parts), dtype=torch.float32, device=q.device)
        part_l = torch.empty((B, Hq, num_parts), dtype=torch.float32, device=q.device)

    group_pad = max(8 if swap else 16, next_pow2(group))
    launch(_decode_kernel, (B, Hkv, num_parts),
        q, k_cache, v_cache, k_scale, v_scale, block_tables, seq_lens,
        out, part_out, part_m, part_l, count,
        scale * LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        s_strides[0], s_strides[1], s_strides[2],
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        num_parts, part,
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=D,
        BLOCK_SIZE=block_size, BLOCK_N=block_n,
        KV_KIND=kind, DIRECT=direct, FP32=fp32, INT8_QK=int8_qk, WIDE_V=wide_v, MAGIC=not interpreting(), SWAP=swap,
        num_warps=warps, num_stages=stages,
    )
    return out
