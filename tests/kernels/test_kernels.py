"""Each Triton kernel against its float32 PyTorch reference (kiln.kernels.reference).

Runs on a CUDA GPU (all shapes), or on CPU under TRITON_INTERPRET=1 (small shapes only;
the shapes marked `gpu_only` skip there). Skips otherwise. Every case draws fresh random
inputs; outputs are pre-filled with NaN so an unwritten element fails the check.

Triton 3.6's interpreter computes tl.dot on bfloat16 inputs wrongly (it multiplies the raw
uint16 storage), so under the interpreter the kernels that use tl.dot (attention, w8a16)
are checked in float16 and float32; bfloat16 is covered on the GPU.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.kernels.kernel_env import DEVICE, DOT_DTYPES, HAS_CUDA, INTERP, gpu_only  # skips where no kernels run

from kiln import kernels as K  # noqa: E402
from kiln.kernels import reference as R  # noqa: E402
from kiln.quantization import ops as qops  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from kiln.kernels._utils import KV_FP8, KV_INT8  # noqa: E402
from kiln.kernels.decode_attention import _widen_codes, swap_default, wide_v_default  # noqa: E402

ALL_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
TOL = {torch.bfloat16: 1.6e-2, torch.float16: 4e-3, torch.float32: 1e-5}
# Attention/matmul outputs round p or the result to the compute dtype: a bit looser.
ATTN_TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 2e-5}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.double()
    ref = ref.double()
    assert not torch.isnan(out).any(), "NaN in output (unwritten element?)"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def rand(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, device=DEVICE, dtype=torch.float32) * scale).to(dtype)


# ----------------------------------------------------------------------------- paged cache


def fp8_head_scales(num_kv_heads):
    """Non-trivial static per-head scales of an fp8 cache: N(0, 1) data then spans E4M3 codes up to ~150-450."""
    return torch.rand(num_kv_heads, device=DEVICE) * 0.02 + 0.01


def make_paged(seq_lens, num_kv_heads, head_dim, block_size, dtype, kv=None, extra_blocks=3):
    """Random paged K/V caches holding len(seq_lens) sequences in shuffled, non-contiguous
    blocks; unused block-table entries hold an out-of-range id so a stray read shows.
    kv: None (a `dtype` cache), "int8" (per-token-head scales) or "fp8" (E4M3, per-head scales)."""
    nblk_per = [math.ceil(L / block_size) for L in seq_lens]
    max_blocks = max(nblk_per) + 1
    num_blocks = sum(nblk_per) + extra_blocks
    perm = torch.randperm(num_blocks)
    tables = torch.full((len(seq_lens), max_blocks), 10 ** 7, dtype=torch.int32)
    i = 0
    for b, n in enumerate(nblk_per):
        tables[b, :n] = perm[i:i + n].to(torch.int32)
        i += n
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    kf, vf = rand(*shape), rand(*shape)
    if kv == "int8":
        kq, ks = R.quantize_int8(kf)
        vq, vs = R.quantize_int8(vf)
        caches = (kq, vq, ks, vs)
    elif kv == "fp8":
        ks, vs = fp8_head_scales(num_kv_heads), fp8_head_scales(num_kv_heads)
        caches = (qops.to_codes(kf, ks[:, None], torch.float8_e4m3fn),
                  qops.to_codes(vf, vs[:, None], torch.float8_e4m3fn), ks, vs)
    else:
        caches = (kf.to(dtype), vf.to(dtype), None, None)
    return caches, tables.to(DEVICE), torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)


def random_lens(n, lo, hi):
    return torch.randint(lo, hi + 1, (n,)).tolist()


# ----------------------------------------------------------------------------- reshape_and_cache

CACHE_CASES = [
    # T, Hkv, D, block_size, num_blocks
    (13, 2, 64, 16, 4),
    (20, 4, 64, 64, 2),
    pytest.param(300, 8, 128, 16, 40, marks=gpu_only),
    pytest.param(777, 8, 128, 64, 20, marks=gpu_only),
]


@pytest.mark.parametrize("T,H,D,bs,nb", CACHE_CASES)
@pytest.mark.parametrize("dtype", ALL_DTYPES + ["int8"])
def test_reshape_and_cache(T, H, D, bs, nb, dtype):
    quant = dtype == "int8"
    act_dtype = torch.bfloat16 if quant else dtype
    slots = torch.randperm(nb * bs)[:T]
    slots[torch.rand(T) < 0.2] = -1
    slots = slots.to(DEVICE)
    key, value = rand(T, H, D, dtype=act_dtype), rand(T, H, D, dtype=act_dtype)
    cdtype = torch.int8 if quant else dtype
    if quant:
        kc = torch.randint(-127, 128, (nb, bs, H, D), dtype=torch.int8, device=DEVICE)
        vc = torch.randint(-127, 128, (nb, bs, H, D), dtype=torch.int8, device=DEVICE)
        ks, vs = torch.rand(nb, bs, H, device=DEVICE), torch.rand(nb, bs, H, device=DEVICE)
    else:
        kc, vc = rand(nb, bs, H, D, dtype=cdtype), rand(nb, bs, H, D, dtype=cdtype)
        ks = vs = None
    ref = [t.clone() if t is not None else None for t in (kc, vc, ks, vs)]
    R.reshape_and_cache(key, value, ref[0], ref[1], slots, ref[2], ref[3])
    K.reshape_and_cache(key, value, kc, vc, slots, ks, vs)
    if quant:
        assert (kc.int() - ref[0].int()).abs().max().item() <= 1
        assert (vc.int() - ref[1].int()).abs().max().item() <= 1
        torch.testing.assert_close(ks, ref[2], rtol=1e-6, atol=0)
        torch.testing.assert_close(vs, ref[3], rtol=1e-6, atol=0)
        # dequantized cache vs the written values
        valid = slots >= 0
        blk, off = slots[valid] // bs, slots[valid] % bs
        deq = kc[blk, off].float() * ks[blk, off].unsqueeze(-1)
        assert rel_err(deq, key[valid].float()) < 1e-2
    else:
        assert torch.equal(kc, ref[0]) and torch.equal(vc, ref[1])


@pytest.mark.parametrize("T,H,D,bs,nb", CACHE_CASES)
@pytest.mark.parametrize("act_dtype", ALL_DTYPES)
def test_reshape_and_cache_fp8(T, H, D, bs, nb, act_dtype):
    """fp8 (E4M3) cache: the kernel writes the torch reference's codes bit for bit (x / scale[head], clamped
    to +-448, round to nearest even), leaves the static scales and the skipped slots alone."""
    slots = torch.randperm(nb * bs)[:T]
    slots[torch.rand(T) < 0.2] = -1
    slots = slots.to(DEVICE)
    key, value = rand(T, H, D, dtype=act_dtype, scale=2.0), rand(T, H, D, dtype=act_dtype)
    key[0, :, :4] = torch.tensor([0.0, -0.0, 1e-6, 60.0], dtype=act_dtype)  # zeros, a subnormal code, a clamp
    ks, vs = fp8_head_scales(H), fp8_head_scales(H)
    ks[0] = 0.001  # head 0's 2.0-sigma values pass 448 * scale: the clamp is exercised
    kc = (torch.randn(nb, bs, H, D, device=DEVICE) * 50).to(torch.float8_e4m3fn)
    vc = (torch.randn(nb, bs, H, D, device=DEVICE) * 50).to(torch.float8_e4m3fn)
    ref_k, ref_v, ks0, vs0 = kc.clone(), vc.clone(), ks.clone(), vs.clone()
    R.reshape_and_cache(key, value, ref_k, ref_v, slots, ks, vs)
    K.reshape_and_cache(key, value, kc, vc, slots, ks, vs)
    assert torch.equal(kc.view(torch.uint8), ref_k.view(torch.uint8))
    assert torch.equal(vc.view(torch.uint8), ref_v.view(torch.uint8))
    assert torch.equal(ks, ks0) and torch.equal(vs, vs0)
    valid = slots >= 0
    blk, off = slots[valid] // bs, slots[valid] % bs
    assert (kc[blk, off, 0].float().abs() == 448).any()  # the clamp was reached (and written, not NaN)
    # dequantized V (its values fit the E4M3 range) vs the written values: 3 mantissa bits, ~2.5% rms
    deq = vc[blk, off].float() * vs[None, :, None]
    assert rel_err(deq, value[valid].float()) < 4e-2


# ----------------------------------------------------------------------------- decode attention

DECODE_CASES = [
    # B, Hq, Hkv, D, block_size, (min_len, max_len), partition_size (None = heuristic)
    (3, 2, 2, 64, 16, (1, 150), None),
    (3, 8, 2, 64, 16, (20, 200), 64),
    (2, 8, 1, 64, 64, (65, 260), 64),
    (4, 4, 4, 64, 64, (1, 100), 32),
    (2, 16, 2, 128, 16, (30, 140), None),
    (3, 8, 2, 64, 48, (20, 300), None),  # a block size that is not a power of two: tiles straddle blocks
    pytest.param(1, 32, 8, 128, 64, (4000, 4000), None, marks=gpu_only),
    pytest.param(7, 32, 8, 128, 16, (1, 3000), None, marks=gpu_only),
    pytest.param(64, 32, 8, 128, 64, (1000, 2100), None, marks=gpu_only),
    pytest.param(5, 16, 16, 128, 16, (500, 700), 128, marks=gpu_only),
    pytest.param(3, 64, 8, 128, 64, (9000, 17000), None, marks=gpu_only),
    pytest.param(9, 16, 2, 64, 16, (1, 600), None, marks=gpu_only),
]


@pytest.mark.parametrize("B,Hq,Hkv,D,bs,lens,part", DECODE_CASES)
@pytest.mark.parametrize("dtype", DOT_DTYPES + ["int8", "fp8"])
def test_paged_decode_attention(B, Hq, Hkv, D, bs, lens, part, dtype):
    kv = dtype if dtype in ("int8", "fp8") else None
    qdtype = (torch.float16 if INTERP else torch.bfloat16) if kv else dtype
    seq_lens = random_lens(B, *lens)
    (kc, vc, ks, vs), tables, sl = make_paged(seq_lens, Hkv, D, bs, qdtype, kv)
    q = rand(B, Hq, D, dtype=qdtype)
    scale = D ** -0.5
    out = torch.full_like(q, float("nan"))
    K.paged_decode_attention(q, kc, vc, tables, sl, scale, ks, vs, partition_size=part, out=out)
    ref = R.paged_decode_attention(q.float(), kc, vc, tables, sl, scale, ks, vs)
    err = rel_err(out, ref)
    # an int8 cache quantizes q per head for its int8 Q.K^T by default (below): ~6e-3 more than the float path
    assert err < (1e-2 if dtype == "int8" else ATTN_TOL[qdtype]), err


CASES_8BIT = ([c for c in DECODE_CASES if not getattr(c, "marks", None)][:3]
              + [pytest.param(64, 32, 8, 128, 64, (1000, 2100), None, marks=gpu_only)])


@pytest.mark.parametrize("B,Hq,Hkv,D,bs,lens,part", CASES_8BIT)
def test_int8_cache_decode_on_int8_tensor_cores(B, Hq, Hkv, D, bs, lens, part):
    """An int8 cache's Q.K^T on the int8 tensor cores (config's 4th field, the default), against the reference on
    the same codes: q quantized per head in the kernel (steps of 1/254 of each head's largest value), ~6e-3 more
    error than the float path (~1e-3 in fp16, ~2e-3 in bf16); held to 1e-2."""
    qdtype = torch.float16 if INTERP else torch.bfloat16
    seq_lens = random_lens(B, *lens)
    (kc, vc, ks, vs), tables, sl = make_paged(seq_lens, Hkv, D, bs, qdtype, "int8")
    q = rand(B, Hq, D, dtype=qdtype)
    ref = R.paged_decode_attention(q.float(), kc, vc, tables, sl, D ** -0.5, ks, vs)
    block_n = 32 if INTERP else 128
    out = K.paged_decode_attention(q, kc, vc, tables, sl, D ** -0.5, ks, vs, partition_size=part,
                                   config=(block_n, 4, 2, True))
    assert rel_err(out, ref) < 1e-2, rel_err(out, ref)
    plain = K.paged_decode_attention(q, kc, vc, tables, sl, D ** -0.5, ks, vs, partition_size=part,
                                     config=(block_n, 4, 2))
    assert not torch.equal(out, plain)  # the int8 path did run: its rounding differs from the float one


@pytest.mark.parametrize("kv", ["int8", "fp8"])
@pytest.mark.parametrize("B,Hq,Hkv,D,bs,lens,part", CASES_8BIT)
def test_8bit_cache_decode_wide_v(B, Hq, Hkv, D, bs, lens, part, kv):
    """V's 8-bit codes widened to fp16 as loaded (config's 5th field; on a GPU by inline PTX, here by byte
    operations): exact, so with fp16 q, where the plain path also multiplies P by V in fp16, the same output to
    the bit; with bf16 q (a GPU) within the reference's bound."""
    qdtype = torch.float16 if INTERP else torch.bfloat16
    seq_lens = random_lens(B, *lens)
    (kc, vc, ks, vs), tables, sl = make_paged(seq_lens, Hkv, D, bs, qdtype, kv)
    q = rand(B, Hq, D, dtype=qdtype)
    block_n = 32 if INTERP else 128
    for qk8 in ((False, True) if kv == "int8" else (False,)):
        wide = K.paged_decode_attention(q, kc, vc, tables, sl, D ** -0.5, ks, vs, partition_size=part,
                                        config=(block_n, 4, 2, qk8, True))
        plain = K.paged_decode_attention(q, kc, vc, tables, sl, D ** -0.5, ks, vs, partition_size=part,
                                         config=(block_n, 4, 2, qk8, False))
        if qdtype == torch.float16 or kv == "fp8":
            assert torch.equal(wide, plain), rel_err(wide, plain)
        ref = R.paged_decode_attention(q.float(), kc, vc, tables, sl, D ** -0.5, ks, vs)
        assert rel_err(wide, ref) < (1e-2 if qk8 else ATTN_TOL[qdtype]), rel_err(wide, ref)
    # the default for both 8-bit kinds: widened V, 3 stages, no int8 Q.K^T, the products swapped at 64-token tiles
    # (KILN_DECODE_SWAP=0: not swapped at (128, 4, 3); KILN_DECODE_WIDE_V=0: the old one)
    if not wide_v_default():
        want = (128, 4, 2, True, False)
    elif swap_default():
        want = (64, 4, 3, False, True, True)
    else:
        want = (128, 4, 3, False, True)
    assert torch.equal(K.paged_decode_attention(q, kc, vc, tables, sl, D ** -0.5, ks, vs, partition_size=part),
                       K.paged_decode_attention(q, kc, vc, tables, sl, D ** -0.5, ks, vs, partition_size=part,
                                                config=want))


def test_decode_tile_setting(monkeypatch):
    """KILN_DECODE_TILE=N,W,S sets the tile of every swapped 8-bit decode launch (to time tiles in the engine's own
    steps); a malformed value is refused with what to write."""
    from kiln.kernels import decode_attention

    qdtype = torch.float16 if INTERP else torch.bfloat16
    seq_lens = random_lens(3, 20, 200)
    (kc, vc, ks, vs), tables, sl = make_paged(seq_lens, 2, 64, 16, qdtype, "fp8")
    q = rand(3, 8, 64, dtype=qdtype)
    try:
        monkeypatch.setenv("KILN_DECODE_TILE", "32,1,3")
        decode_attention.swapped_tile.cache_clear()
        assert decode_attention.swapped_tile() == (32, 1, 3)
        if wide_v_default() and swap_default():
            assert torch.equal(K.paged_decode_attention(q, kc, vc, tables, sl, 0.125, ks, vs),
                               K.paged_decode_attention(q, kc, vc, tables, sl, 0.125, ks, vs,
                                                        config=(32, 1, 3, False, True, True)))
        for bad in ("64,4", "48,4,3", "64,3,3", "64,4,9", "sixty-four"):
            monkeypatch.setenv("KILN_DECODE_TILE", bad)
            decode_attention.swapped_tile.cache_clear()
            with pytest.raises(ValueError, match="KILN_DECODE_TILE=.*BLOCK_N,warps,stages"):
                decode_attention.swapped_tile()
    finally:
        monkeypatch.delenv("KILN_DECODE_TILE")
        decode_attention.swapped_tile.cache_clear()
    assert decode_attention.swapped_tile() == (64, 4, 3)


@pytest.mark.parametrize("kv", ["int8", "fp8"])
@pytest.mark.parametrize("B,Hq,Hkv,D,bs,lens,part", CASES_8BIT + [(2, 16, 2, 128, 16, (30, 140), None)])
def test_8bit_cache_decode_swapped_products(B, Hq, Hkv, D, bs, lens, part, kv):
    """The tile products swapped (config's 6th field: K.q^T and V^T.P^T, the tile's tokens as M, the GQA group as
    N padded to 8), with and without V widened: against the reference on the same codes, and near the plain path
    (the same products, summed in another order). Groups of 1, 4 and 8 heads, partitions merged and not."""
    qdtype = torch.float16 if INTERP else torch.bfloat16
    seq_lens = random_lens(B, *lens)
    (kc, vc, ks, vs), tables, sl = make_paged(seq_lens, Hkv, D, bs, qdtype, kv)
    q = rand(B, Hq, D, dtype=qdtype)
    block_n = 32 if INTERP else 128
    ref = R.paged_decode_attention(q.float(), kc, vc, tables, sl, D ** -0.5, ks, vs)
    plain = K.paged_decode_attention(q, kc, vc, tables, sl, D ** -0.5, ks, vs, partition_size=part,
                                     config=(block_n, 4, 2, False, True))
    for wide in (True, False):
        out = torch.full_like(q, float("nan"))
        K.paged_decode_attention(q, kc, vc, tables, sl, D ** -0.5, ks, vs, partition_size=part, out=out,
                                 config=(block_n, 4, 2, False, wide, True))
        assert rel_err(out, ref) < ATTN_TOL[qdtype], (wide, rel_err(out, ref))
        assert rel_err(out, plain) < ATTN_TOL[qdtype], (wide, rel_err(out, plain))


@triton.jit
def _widen_probe_kernel(words_ptr, out_ptr, KV_KIND: tl.constexpr, MAGIC: tl.constexpr):
    rows, cols = tl.arange(0, 16), tl.arange(0, 4)
    words = tl.load(words_ptr + rows[:, None] * 4 + cols[None, :])
    out = _widen_codes(words, KV_KIND, MAGIC, 16, 16)
    tl.store(out_ptr + rows[:, None] * 16 + tl.arange(0, 16)[None, :], out)


def test_widen_codes_every_byte():
    """The widening of V's codes (WIDE_V) for every 8-bit code in each byte position of a word: int8 -128..127
    and every finite E4M3 value, against torch's conversion (on a GPU the inline PTX, here the byte operations)."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    for kind, view in (("int8", torch.int8), ("fp8", torch.float8_e4m3fn)):
        for shift in range(4):  # each code in each byte of its word
            data = torch.roll(codes, shift).reshape(-1, 4).contiguous()
            got = torch.empty(16, 16, dtype=torch.float16, device=DEVICE)
            _widen_probe_kernel[(1,)](data.view(torch.int32).reshape(16, 4).to(DEVICE), got,
                                      KV_FP8 if kind == "fp8" else KV_INT8, not INTERP)
            got = got.cpu()
            want = data.view(view).to(torch.float16).reshape(16, 16)
            finite = want.isfinite()  # E4M3's two NaN codes: never in a cache (writes clamp to +-448)
            assert torch.equal(got[finite], want[finite]), kind


@pytest.mark.parametrize("batch,max_ctx,want", [
    (1, 448, 128),     # batch 1, a short context: one-tile partitions (4 of them)
    (1, 2048, 128),    # 16 one-tile partitions, the most of them
    (1, 4288, 256),    # beyond: two tiles each (17 partitions)
    (64, 4096, 1024),  # enough sequences: partitions only as small as the grid needs (4 a sequence)
    (256, 1200, 2048),  # whole contexts
])
def test_decode_partition_choice(batch, max_ctx, want, monkeypatch):
    """Partition lengths by batch and context bound, on an H100's 132 SMs with 8 KV heads and 128-token tiles."""
    from kiln.kernels import decode_attention
    monkeypatch.setattr(decode_attention, "num_sms", lambda device: 132)
    assert decode_attention.choose_partition(batch, 8, max_ctx, torch.device("cpu"), 128) == want


@pytest.mark.parametrize("dtype", DOT_DTYPES[:1])
def test_paged_decode_attention_max_seq_len(dtype):
    """An explicit max_seq_len bound (the engine's, no device sync) gives the same result."""
    seq_lens = random_lens(3, 10, 120)
    (kc, vc, _, _), tables, sl = make_paged(seq_lens, 2, 64, 16, dtype)
    q = rand(3, 4, 64, dtype=dtype)
    a = K.paged_decode_attention(q, kc, vc, tables, sl, 0.125, max_seq_len=max(seq_lens))
    b = K.paged_decode_attention(q, kc, vc, tables, sl, 0.125, partition_size=32)
    ref = R.paged_decode_attention(q.float(), kc, vc, tables, sl, 0.125)
    assert rel_err(a, ref) < ATTN_TOL[dtype] and rel_err(b, ref) < ATTN_TOL[dtype]


# ----------------------------------------------------------------------------- prefill attention

PREFILL_CASES = [
    # Hq, Hkv, D, block_size, [(ctx_len, q_len), ...]
    (2, 2, 64, 16, [(0, 37), (0, 1), (21, 9)]),
    (8, 2, 64, 64, [(70, 20), (0, 40)]),
    (8, 1, 64, 16, [(3, 17), (16, 16), (0, 5)]),
    (4, 4, 128, 16, [(40, 24), (0, 33)]),
    (2, 1, 64, 16, [(30, 150), (0, 70), (100, 3)]),  # rows over 64: the full tile, several query tiles per row
    pytest.param(32, 8, 128, 64, [(0, 512)] * 4, marks=gpu_only),
    pytest.param(32, 8, 128, 16, [(0, 300), (1000, 77), (4000, 1), (130, 513), (0, 2)], marks=gpu_only),
    pytest.param(16, 16, 128, 64, [(200, 1000), (0, 129)], marks=gpu_only),
    pytest.param(16, 2, 64, 16, [(0, 1), (5, 3), (64, 64), (63, 65)], marks=gpu_only),
    pytest.param(64, 8, 128, 64, [(2048, 2048)], marks=gpu_only),
]


@pytest.mark.parametrize("Hq,Hkv,D,bs,seqs", PREFILL_CASES)
@pytest.mark.parametrize("dtype", DOT_DTYPES + ["int8", "fp8"])
def test_paged_prefill_attention(Hq, Hkv, D, bs, seqs, dtype):
    kv = dtype if dtype in ("int8", "fp8") else None
    qdtype = (torch.float16 if INTERP else torch.bfloat16) if kv else dtype
    seq_lens = [c + n for c, n in seqs]
    q_lens = [n for _, n in seqs]
    (kc, vc, ks, vs), tables, sl = make_paged(seq_lens, Hkv, D, bs, qdtype, kv)
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    T = sum(q_lens)
    q = rand(T, Hq, D, dtype=qdtype)
    scale = D ** -0.5
    out = torch.full_like(q, float("nan"))
    K.paged_prefill_attention(q, kc, vc, tables, qsl, sl, scale, max(q_lens), ks, vs, out=out)
    ref = R.paged_prefill_attention(q.float(), kc, vc, tables, qsl, sl, scale, max(q_lens), ks, vs)
    err = rel_err(out, ref)
    assert err < ATTN_TOL[qdtype], err


@pytest.mark.parametrize("dtype", DOT_DTYPES[:1])
def test_prefill_matches_decode(dtype):
    """A prefill step of q_len 1 per sequence is a decode step."""
    seq_lens = random_lens(3, 1, 90)
    (kc, vc, _, _), tables, sl = make_paged(seq_lens, 2, 64, 16, dtype)
    q = rand(3, 4, 64, dtype=dtype)
    qsl = torch.arange(4, dtype=torch.int32, device=DEVICE)
    a = K.paged_prefill_attention(q, kc, vc, tables, qsl, sl, 0.125, 1)
    b = K.paged_decode_attention(q, kc, vc, tables, sl, 0.125)
    assert rel_err(a, b.float()) < ATTN_TOL[dtype]


# ----------------------------------------------------------------------------- rmsnorm

NORM_SHAPES = [(7, 256), (3, 1000), pytest.param(33, 4096, marks=gpu_only),
               pytest.param(5, 2560, marks=gpu_only), pytest.param(1000, 5120, marks=gpu_only)]


@pytest.mark.parametrize("T,H", NORM_SHAPES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_rmsnorm(T, H, dtype):
    x = rand(T, H, dtype=dtype, scale=3.0)
    w = rand(H, dtype=dtype) + 1
    out = torch.full_like(x, float("nan"))
    K.rmsnorm(x, w, 1e-6, out=out)
    assert rel_err(out, R.rmsnorm(x, w, 1e-6)) < TOL[dtype]


@pytest.mark.parametrize("T,H", NORM_SHAPES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("inplace", [False, True])
def test_fused_add_rmsnorm(T, H, dtype, inplace):
    x = rand(T, H, dtype=dtype)
    r = rand(T, H, dtype=dtype, scale=4.0)
    w = rand(H, dtype=dtype) + 1
    ref_out, ref_res = R.fused_add_rmsnorm(x, r, w, 1e-5)
    out, res = K.fused_add_rmsnorm(x, r, w, 1e-5, inplace=inplace)
    if inplace:
        assert out.data_ptr() == x.data_ptr() and res.data_ptr() == r.data_ptr()
    if INTERP and dtype == torch.bfloat16:
        # the interpreter truncates float32 -> bfloat16 (the GPU rounds to nearest even)
        torch.testing.assert_close(res, ref_res, rtol=2 ** -7, atol=0)
    else:
        assert torch.equal(res, ref_res)
    assert rel_err(out, ref_out) < TOL[dtype]


# ----------------------------------------------------------------------------- rotary

def rope_cache(max_pos, D, base=10000.0):
    inv = 1.0 / (base ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    f = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv[None, :]
    return torch.cat([f.cos(), f.sin()], dim=-1).to(DEVICE)


ROPE_CASES = [(9, 8, 2, 64), (4, 4, 4, 32), pytest.param(333, 32, 8, 128, marks=gpu_only),
              pytest.param(64, 16, 8, 64, marks=gpu_only), pytest.param(17, 40, 8, 128, marks=gpu_only)]


@pytest.mark.parametrize("T,Hq,Hkv,D", ROPE_CASES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_rotary_embedding(T, Hq, Hkv, D, dtype):
    cache = rope_cache(4096, D)
    pos = torch.randint(0, 4096, (T,), device=DEVICE)
    qkv = rand(T, (Hq + 2 * Hkv) * D, dtype=dtype)  # q and k as views of a fused projection
    q = qkv[:, : Hq * D].view(T, Hq, D)
    k = qkv[:, Hq * D: (Hq + Hkv) * D].view(T, Hkv, D)
    v_before = qkv[:, (Hq + Hkv) * D:].clone()
    q_ref, k_ref = q.clone(), k.clone()
    R.rotary_embedding(pos, q_ref, k_ref, cache)
    K.rotary_embedding(pos, q, k, cache)
    assert rel_err(q, q_ref) < TOL[dtype] / 2 and rel_err(k, k_ref) < TOL[dtype] / 2
    assert torch.equal(qkv[:, (Hq + Hkv) * D:], v_before)


@pytest.mark.parametrize("T,Hq,Hkv,D,bs", [
    (9, 8, 2, 64, 16),
    (3, 40, 20, 128, 16),   # two programs a token (KV heads in two tiles, q heads in two shares)
    pytest.param(333, 32, 8, 128, 16, marks=gpu_only),
])
@pytest.mark.parametrize("kv", ["float", "int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rope_and_cache(T, Hq, Hkv, D, bs, kv, dtype):
    """RoPE on q and k with the cache write in one kernel: the bits of rotary_embedding then reshape_and_cache in q,
    the cache and its scales under the interpreter; on a GPU, where the compiler contracts k's rotation into FMAs
    its own way, q's bits and the cache within one rounding of k (H100: a few of 10^5 bf16 values one ulp apart, one
    E4M3 code a step apart). k itself stays as it was; a padding slot (-1) writes nothing."""
    nb = (T + bs - 1) // bs + 1
    cache = rope_cache(4096, D)
    pos = torch.randint(0, 4096, (T,), device=DEVICE)
    slots = torch.randperm(nb * bs)[:T]
    slots[torch.rand(T) < 0.2] = -1
    slots = slots.to(DEVICE)
    qkv = rand(T, (Hq + 2 * Hkv) * D, dtype=dtype, scale=3.0)  # views of a fused projection
    q = qkv[:, : Hq * D].view(T, Hq, D)
    k = qkv[:, Hq * D: (Hq + Hkv) * D].view(T, Hkv, D)
    v = qkv[:, (Hq + Hkv) * D:].view(T, Hkv, D)
    cdtype = {"float": dtype, "int8": torch.int8, "fp8": torch.float8_e4m3fn}[kv]
    kc = (torch.randn(nb, bs, Hkv, D, device=DEVICE) * 20).to(cdtype)
    vc = (torch.randn(nb, bs, Hkv, D, device=DEVICE) * 20).to(cdtype)
    if kv == "int8":
        ks, vs = torch.rand(nb, bs, Hkv, device=DEVICE), torch.rand(nb, bs, Hkv, device=DEVICE)
    elif kv == "fp8":
        ks, vs = fp8_head_scales(Hkv), fp8_head_scales(Hkv)
    else:
        ks = vs = None
    q2, k2 = q.clone(), k.clone()
    ref = [x.clone() if x is not None else None for x in (kc, vc, ks, vs)]
    K.rotary_embedding(pos, q2, k2, cache)
    K.reshape_and_cache(k2, v, ref[0], ref[1], slots, ref[2], ref[3])
    k_before = k.clone()
    K.rope_and_cache(pos, q, k, v, kc, vc, slots, cache, ks, vs)
    assert torch.equal(q, q2) and torch.equal(k, k_before)
    for got, want in zip((kc, vc, ks, vs), ref):
        if got is None:
            continue
        if INTERP or got is vc:
            assert torch.equal(got.view(torch.uint8) if kv == "fp8" and got.dim() == 4 else got,
                               want.view(torch.uint8) if kv == "fp8" and want.dim() == 4 else want)
        elif kv == "int8" and got.dtype == torch.int8:
            assert (got.int() - want.int()).abs().max() <= 1
        else:  # a float cache one ulp of k's dtype, an E4M3 one a code step (2^-3), a scale one float32 ulp
            step = {torch.bfloat16: 2 ** -7, torch.float32: 2 ** -22, torch.float8_e4m3fn: 2 ** -3}[got.dtype]
            # and a float32 rounding of the rotation's terms (x cos, y sin: |k| at most) where they cancel: an FMA
            # rounds once where the separate products round twice (run Z, float32: 4e-7 with |k| up to ~15)
            atol = 2 ** -9 if kv == "fp8" else 2 ** -23 * 2 * float(k.abs().max())
            torch.testing.assert_close(got.float(), want.float(), rtol=step, atol=atol)
    assert not torch.equal(k2, k)  # the rotation moved k, and the cache holds the rotated k
    valid = slots >= 0
    if kv == "float":
        written = kc[slots[valid] // bs, slots[valid] % bs]
        assert torch.equal(written, k2[valid]) if INTERP else rel_err(written, k2[valid]) < 1e-2


# ----------------------------------------------------------------------------- silu_and_mul

@pytest.mark.parametrize("T,I", [(5, 1000), (2, 64), pytest.param(77, 14336, marks=gpu_only)])
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_silu_and_mul(T, I, dtype):
    x = rand(T, 2 * I, dtype=dtype, scale=3.0)
    out = torch.full((T, I), float("nan"), dtype=dtype, device=DEVICE)
    K.silu_and_mul(x, out=out)
    assert rel_err(out, R.silu_and_mul(x)) < TOL[dtype] / 2


# ----------------------------------------------------------------------------- w8a16

W8_CASES = [
    # M, N, K, bias
    (1, 96, 160, False),
    (5, 64, 256, True),
    (17, 40, 64, False),
    (100, 48, 64, True),                                     # 64 < T <= 256 tiles
    (1, 43, 192, True),                                      # batch 1: the int16 GEMV in bf16, split K, ragged N
    (1, 43, 200, True),                                      # K not a multiple of its K block: the tile kernel
    pytest.param(1, 4096, 4096, False, marks=gpu_only),
    pytest.param(1, 1000, 1000, True, marks=gpu_only),
    pytest.param(16, 6144, 4096, True, marks=gpu_only),
    pytest.param(33, 1000, 1000, True, marks=gpu_only),
    pytest.param(64, 4096, 14336, False, marks=gpu_only),
    pytest.param(65, 1024, 512, True, marks=gpu_only),      # 64 < T <= 256: 64 x 128 tiles, split K
    pytest.param(128, 4096, 4096, True, marks=gpu_only),
    pytest.param(256, 6144, 1000, False, marks=gpu_only),
    pytest.param(128, 28672, 512, True, marks=gpu_only),    # 64 < T <= 256, wide N: 128 x 128 tiles
    pytest.param(200, 20000, 384, False, marks=gpu_only),   # same path, ragged M and N
    pytest.param(512, 4096, 4096, False, marks=gpu_only),   # T > 256: dequantize + torch.matmul
]


@pytest.mark.parametrize("M,N,Kd,bias", W8_CASES)
@pytest.mark.parametrize("dtype", DOT_DTYPES)
def test_w8a16_matmul(M, N, Kd, bias, dtype):
    x = rand(M, Kd, dtype=dtype)
    wq, ws = R.quantize_int8(rand(N, Kd))
    b = rand(N, dtype=dtype) if bias else None
    out = K.w8a16_matmul(x, wq, ws, b)
    ref = R.w8a16_matmul(x, wq, ws, b)
    tol = TOL[dtype] if dtype != torch.float32 else (1e-5 if M <= 256 else 2e-3)  # cuBLAS may use tf32
    assert out.shape == (M, N) and out.dtype == dtype
    assert rel_err(out, ref) < tol


SWAP_CASES = [
    (5, 96, 256, 16),                                      # BLOCK_M 16, two tiles of N
    (20, 64, 512, 32),                                     # ragged rows, K split
    pytest.param(40, 6144, 4096, 64, marks=gpu_only),      # Llama-3-8B qkv at a decode batch of 40
    pytest.param(100, 4096, 14336, 128, marks=gpu_only),   # down
]


@pytest.mark.parametrize("M,N,Kd,bm", SWAP_CASES)
@pytest.mark.parametrize("weight", ["dense", "int8", "e4m3"])
@pytest.mark.parametrize("dtype", [d for d in DOT_DTYPES if d != torch.float32])
def test_tile_kernel_swapped_operands(M, N, Kd, bm, weight, dtype):
    """SWAP_AB (W x^T on the tensor cores, transposed back) against the plain tile and the reference, for a dense
    weight (skinny_matmul), int8 and E4M3 codes with their scales, K unsplit and split."""
    from kiln.kernels.w8a16 import small_m_matmul
    x = rand(M, Kd, dtype=dtype)
    if weight == "dense":
        w, ws = rand(N, Kd, dtype=dtype, scale=0.05), None
        ref = R.skinny_matmul(x, w)
    else:
        w, ws = R.quantize_int8(rand(N, Kd))
        if weight == "e4m3":
            w = (w.float() / 127 * 448).to(torch.float8_e4m3fn)
            ws = ws * 127 / 448
        ref = R.w8a16_matmul(x, w, ws)
    bn, bk = (32, 32) if INTERP else (64, 128)
    for split in (1, 2):
        for swap in (False, True):
            out = torch.empty(M, N, dtype=dtype, device=x.device)
            small_m_matmul(x, w, ws, None, out, (bm, bn, bk, split, 4, 1 if INTERP else 3, swap))
            assert rel_err(out, ref) < TOL[dtype], (split, swap)


def _every_code(n: int, code: torch.dtype) -> torch.Tensor:
    """n codes cycling through every value of the code type (E4M3: every finite one; its two NaN bytes are 0)."""
    b = torch.arange(n) % 256
    if code == torch.int8:
        return (b - 128).to(torch.int8)
    return torch.where((b & 127) == 127, 0, b).to(torch.uint8).view(torch.float8_e4m3fn)


@pytest.mark.parametrize("code", [torch.int8, torch.float8_e4m3fn], ids=["int8", "e4m3"])
@pytest.mark.parametrize("N,Kd,config", [
    (24, 256, ("gemv", 8, 64, 1, 1)),     # one program a tile
    (43, 320, ("gemv", 8, 64, 2, 1)),     # K split in two (3 and 2 blocks), a ragged last tile
    (40, 512, ("gemv", 16, 64, 4, 1)),
    pytest.param(4096, 14336, ("gemv", 16, 512, 4, 1), marks=gpu_only),
    pytest.param(6144, 4096, None, marks=gpu_only),  # the default choice
])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy, on the NaN / inf activations
def test_w8a16_gemv(N, Kd, config, code):
    """Batch 1 with bf16 activations on the CUDA cores: int16 activations (a scale per K block) against int8 codes,
    dot products in int32; fp16 activations (a power-of-two scale per K block) against E4M3 codes, fp16x2 FMAs.
    K split across programs with the last one summing. Every code and activations spanning several orders of
    magnitude (the block scale must keep the small ones); twice, as the tile counters must be left at zero."""
    g = torch.Generator().manual_seed(1)
    # every code in shuffled places: in order, every row of a K that 256 divides would be the same (run V: one such
    # output, cancelled to ~1% of its terms' size, missed 1e-2 by the E4M3 GEMV's fp16 sums, exactly as emulated)
    wq = _every_code(N * Kd, code)[torch.randperm(N * Kd, generator=g)].reshape(N, Kd)
    wq, ws = wq.to(DEVICE), (torch.rand(N, generator=g) + 0.5).to(DEVICE)
    for _ in range(2):  # new activations the second time: stale partials or counts would show
        x = (torch.randn(1, Kd, generator=g) * torch.logspace(-3, 2, Kd)[torch.randperm(Kd, generator=g)])
        x = x.to(torch.bfloat16).to(DEVICE)
        out = K.w8a16_matmul(x, wq, ws, config=config)
        assert out.dtype == torch.bfloat16
        assert rel_err(out.float(), R.w8a16_matmul(x.float(), wq, ws)) < 1e-2
    if config is None:
        assert K.w8a16._gemv_ok(x, wq, K.w8a16._gemv_config(N, Kd, x.device)[2])
    if INTERP and N != 24:  # the block scale's NaN / inf is the same code in every config: one case in CI
        return
    for bad in (float("nan"), float("inf")):  # not finite in, not finite out (as the float kernels do)
        xb = x.clone()
        xb[0, Kd // 3] = bad
        assert not K.w8a16_matmul(xb, wq, ws, config=config).float().isfinite().any()


@pytest.mark.parametrize("code", [torch.int8, torch.float8_e4m3fn], ids=["int8", "e4m3"])
@pytest.mark.parametrize("I,Kd,config,bias", [
    (16, 128, ("gemv", 8, 64, 1, 1), False),   # four channels a program, K whole
    (21, 192, ("gemv", 8, 64, 2, 1), True),    # K split in two (2 and 1 blocks), a ragged last tile, a bias
    (40, 256, ("gemv", 16, 64, 4, 1), False),
    pytest.param(14336, 4096, None, False, marks=gpu_only),  # Llama-3-8B's gate_up, the default choice
])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy: exp(-gate) overflows to inf
def test_w8a16_silu_and_mul_gemv(I, Kd, config, bias, code):
    """The gate/up GEMV that applies SwiGLU as it stores (a program's rows: gate rows, then the same channels' up
    rows) gives silu_and_mul's bits on the unfused GEMV's output, and falls back to the two calls off its path."""
    g = torch.Generator().manual_seed(2)
    wq = _every_code(2 * I * Kd, code)[torch.randperm(2 * I * Kd, generator=g)].reshape(2 * I, Kd).to(DEVICE)
    ws = (torch.rand(2 * I, generator=g) + 0.5).to(DEVICE)
    b = (torch.randn(2 * I, generator=g) * 10).to(torch.bfloat16).to(DEVICE) if bias else None
    for _ in range(2):  # the split-K tile counters must be left at zero
        x = (torch.randn(1, Kd, generator=g) * 0.05).to(torch.bfloat16).to(DEVICE)
        unfused = K.w8a16_matmul(x, wq, ws, b, config=config)
        fused = K.w8a16_silu_and_mul(x, wq, ws, b, config=config)
        assert fused.shape == (1, I) and fused.dtype == torch.bfloat16
        assert torch.equal(fused, K.silu_and_mul(unfused))
        gate, up = R.w8a16_matmul(x.float(), wq, ws, b).chunk(2, dim=-1)
        assert rel_err(fused.float(), torch.nn.functional.silu(gate) * up) < 2e-2
    x3 = rand(3, Kd, dtype=torch.bfloat16)  # three rows: the tile kernel, then silu_and_mul
    assert torch.equal(K.w8a16_silu_and_mul(x3, wq, ws, b), K.silu_and_mul(K.w8a16_matmul(x3, wq, ws, b)))


@pytest.mark.parametrize("dtype", DOT_DTYPES[:1])
def test_w8a16_leading_dims(dtype):
    x = rand(2, 3, 64, dtype=dtype)
    wq, ws = R.quantize_int8(rand(48, 64))
    out = K.w8a16_matmul(x, wq, ws)
    assert out.shape == (2, 3, 48)
    assert rel_err(out, R.w8a16_matmul(x.reshape(6, 64), wq, ws).reshape(2, 3, 48)) < TOL[dtype]


# ----------------------------------------------------------------------------- skinny (dense, few rows)

SKINNY_CASES = [
    # M, N, K, bias
    (1, 96, 160, False),
    (3, 64, 256, True),
    (8, 40, 64, False),
    (24, 64, 128, True),                                   # swapped, rows padded to 32
    pytest.param(1, 6144, 4096, False, marks=gpu_only),    # Llama-3-8B qkv
    pytest.param(1, 4096, 4096, True, marks=gpu_only),     # o
    pytest.param(2, 28672, 4096, False, marks=gpu_only),   # gate_up
    pytest.param(8, 4096, 14336, False, marks=gpu_only),   # down: K split
    pytest.param(5, 128256, 4096, False, marks=gpu_only),  # lm_head
    pytest.param(7, 1000, 1000, True, marks=gpu_only),     # ragged
    pytest.param(48, 28672, 4096, False, marks=gpu_only),  # gate_up at 48 rows: swapped, 128 weight rows a program
    pytest.param(64, 4096, 14336, True, marks=gpu_only),   # down at 64 rows: swapped, K split
    pytest.param(65, 4096, 4096, False, marks=gpu_only),   # past the swapped tile's rows: the plain one
]


@pytest.mark.parametrize("M,N,Kd,bias", SKINNY_CASES)
@pytest.mark.parametrize("dtype", DOT_DTYPES)
def test_skinny_matmul(M, N, Kd, bias, dtype):
    x = rand(M, Kd, dtype=dtype)
    w = rand(N, Kd, dtype=dtype, scale=0.05)
    b = rand(N, dtype=dtype) if bias else None
    out = K.skinny_matmul(x, w, b)
    assert out.shape == (M, N) and out.dtype == dtype
    assert rel_err(out, R.skinny_matmul(x, w, b)) < TOL[dtype]


@pytest.mark.skipif(not HAS_CUDA, reason="the dispatch only picks the kernel for CUDA tensors")
def test_linear_layer_dispatches_few_rows_to_skinny_and_matches():
    from kiln.kernels.skinny import MAX_T
    from kiln.layers.linear import _dense
    w = rand(512, 256, dtype=torch.bfloat16)
    for m in sorted({1, max(1, MAX_T), MAX_T + 1, 64}):
        x = rand(m, 256, dtype=torch.bfloat16)
        assert K.use_skinny(x, w) == (0 < m <= MAX_T)
        assert rel_err(_dense(x, w, None), R.skinny_matmul(x, w)) < TOL[torch.bfloat16]


# ---- top_p_threshold (the sampler's nucleus cut) ------------------------------------------------------------------

@pytest.mark.parametrize("vocab", [1000, 2500] + ([128256] if not INTERP else []))
def test_top_p_threshold_is_the_sorted_cut(vocab):
    """The search finds the cut that sorting finds: peaked and flat rows, a top-k floor, -inf logits (masked stop
    ids, grammars), ties at the cut, top_p near 0 and 1. Where the mass at the cut lies within float32 rounding of
    the target (summed in another order) the two may differ by a boundary value: run R's H100 found one at 128k
    columns and top_p 0.999. Such a row must still hold the cut's property in float64, to that rounding."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for spread in (0.3, 1.0, 3.0, 10.0):
        rows.append(torch.randn(vocab, generator=g) * spread)
    tied = torch.randn(vocab, generator=g)
    tied[:40] = 12.0  # 40 equal leaders with nearly all the mass: a 0.5 nucleus ends inside them, so all 40 stay
    rows.append(tied)
    masked = torch.randn(vocab, generator=g) * 2
    masked[::3] = float("-inf")
    rows.append(masked)
    x = torch.stack(rows + [torch.randn(vocab, generator=g) * 2 for _ in range(3)]).to(DEVICE)
    b = x.shape[0]
    top_p = torch.tensor([0.7, 0.9, 0.5, 0.95, 0.5, 0.8, 1e-4, 0.999, 0.6], device=DEVICE)[:b]
    floor = torch.full((b,), float("-inf"), device=DEVICE)
    floor[8] = x[8].topk(20).values[-1]  # a top-k of 20 first
    got = K.top_p_threshold(x, top_p, floor)
    want = R.top_p_threshold(x, top_p, floor)
    xd = x.double()
    e = torch.where(xd >= floor.double()[:, None], (xd - xd.max(dim=1, keepdim=True).values).exp(), 0.0)
    target, tol = top_p.double() * e.sum(dim=1), 1e-5 * e.sum(dim=1)
    assert ((e * (xd >= got.double()[:, None])).sum(dim=1) >= target - tol).all()   # the cut reaches top_p
    assert ((e * (xd > got.double()[:, None])).sum(dim=1) < target + tol).all()     # the next value up does not
    if vocab < 10000:  # and at these sizes no row comes within rounding of its target: the very same cut
        assert torch.equal(x >= got[:, None], x >= want[:, None]), (got, want)
    assert (x[4] >= got[4]).sum().item() == 40
    assert (x[6] >= got[6]).sum().item() == 1  # a tiny top_p keeps the argmax alone
    assert (x[8] >= got[8]).sum().item() <= 20
    from kiln.kernels import sampling  # both configs (the default picks by rows against SMs) find the same cuts
    for config in (sampling.FEW_ROWS_CONFIG, sampling.MANY_ROWS_CONFIG):
        assert torch.equal(K.top_p_threshold(x, top_p, floor, config=config), got), config
