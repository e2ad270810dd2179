"""Time Kiln's Triton kernels at Llama-3-8B shapes against their floors and references.

    PYTHONPATH=. python benchmarks/kernels/bench_kernels.py [--sweep] [--json FILE]

Llama-3-8B: hidden 4096, 32 q heads, 8 kv heads, head_dim 128, intermediate 14336, bf16;
decode batches 1/64/256 with contexts 1024-4096; prefill 8 x 512 tokens.

Each row: the kernel's median time (triton.testing.do_bench, which clears L2 before each
run), the bytes it must move at the least (every input read once, every output written
once), achieved GB/s, the floor = max(bytes / 3.0 TB/s, FLOPs / 790 TFLOP/s) (H100 copy
bandwidth and bf16 matmul rate measured on this workplace's H100; the script measures
both again and prints them), time / floor, and the torch reference's time (the float32
code in kiln.kernels.reference unless the row says otherwise) and its ratio.

--sweep also times a few tile/partition choices of decode attention and w8a16 (for
tuning the heuristics), and a grid of configs of the 8-bit (int8, fp8) decode kernel at
B=256, context ~1,100 (`decode8`: BLOCK_N 64/128/256 x warps 4/8 x stages 1/2/3). --smoke runs tiny shapes on CPU through Triton's interpreter
(set TRITON_INTERPRET=1) to check the script itself.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time

import torch

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.testing  # noqa: E402

from kiln import kernels as K  # noqa: E402
from kiln.kernels import reference as R  # noqa: E402

BW = 3.0e12      # bytes/s, device-to-device copy on the H100 (read + write)
FLOPS = 790e12   # bf16 dense matmul, FLOP/s

DEV = "cpu" if SMOKE else "cuda"
DT = torch.bfloat16 if not SMOKE else torch.float16
ROWS: list[dict] = []


_FLUSH = None


def bench_eager(fn, rep=100, warmup=25):
    """triton.testing.do_bench median: a plain Python call per run, L2 cleared before each.
    Includes the host's launch cost whenever that exceeds the kernel's own time."""
    if SMOKE:
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def capture_graph(fn, warmups: int = 2) -> torch.cuda.CUDAGraph:
    """fn run on a side stream first (its kernels compiled, the allocator warm), then captured in a CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    torch.cuda.synchronize()
    return g


def bench_graph(fn, rep_ms=100):
    """GPU time: fn captured once in a CUDA graph, replayed after a 256 MB read that
    evicts L2 (and hides the replay's host cost); median of events. The flush reads rather
    than writes: a memset flush (do_bench's) leaves L2 full of dirty lines whose write-back
    is then charged to the timed kernel, up to doubling the time of a 16 MB kernel."""
    global _FLUSH
    if SMOKE:
        return bench_eager(fn)
    if _FLUSH is None:
        _FLUSH = torch.ones(256 * 1024 * 1024 // 4, dtype=torch.int32, device=DEV)
    g = capture_graph(fn)

    def timed(n):
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for a, b in ev:
            torch.sum(_FLUSH, dtype=torch.int64)
            a.record()
            g.replay()
            b.record()
        torch.cuda.synchronize()
        return sorted(a.elapsed_time(b) for a, b in ev)

    est = timed(5)[2]
    n = int(min(2000, max(20, rep_ms / max(est + 0.09, 1e-3))))
    t = timed(n)
    del g
    return t[len(t) // 2]


def bench(fn, rep=100, graph=True):
    """(ms, eager_ms): ms is the graph-replay GPU time when fn can be captured, else eager."""
    eager = bench_eager(fn, rep=rep)
    if not graph:
        return eager, eager
    try:
        return bench_graph(fn, rep), eager
    except Exception as e:  # not capturable: report the eager time
        print(f"    (graph capture failed: {type(e).__name__}: {str(e)[:100]})", flush=True)
        torch.cuda.synchronize()
        return eager, eager


def ref_time(fn, rep=50):
    return bench_eager(fn, rep=rep)


def row(name, shape, t, nbytes, flops=0.0, ref_ms=None, ref_name="ref fp32", note=""):
    ms, eager = t
    floor_ms = max(nbytes / BW, flops / FLOPS) * 1e3
    r = dict(kernel=name.strip(), shape=shape, ms=ms, eager_ms=eager, bytes=nbytes, flops=flops,
             gbps=nbytes / ms / 1e6, tflops=flops / ms / 1e9 if flops else None, floor_ms=floor_ms,
             x_floor=ms / floor_ms, ref_ms=ref_ms, ref_name=ref_name, speedup=(ref_ms / ms) if ref_ms else None,
             note=note)
    ROWS.append(r)
    tf = f" {r['tflops']:6.1f} TF/s" if flops else ""
    ref = f" | {ref_name} {ref_ms * 1e3:9.1f} us ({ref_ms / ms:6.1f}x)" if ref_ms else ""
    print(f"{name:26s} {shape:34s} {ms * 1e3:8.1f} us (eager {eager * 1e3:7.1f}) {r['gbps']:6.0f} GB/s{tf}"
          f" | floor {floor_ms * 1e3:7.1f} us ({r['x_floor']:4.2f}x){ref} {note}", flush=True)
    return r


def rand(*shape, dtype=DT, scale=1.0):
    return (torch.randn(*shape, device=DEV, dtype=torch.float32) * scale).to(dtype)


# ----------------------------------------------------------------------------- ceilings

def ceilings():
    if SMOKE:
        return {}
    n = 1 << 29  # 1 GiB of bytes, copied
    a = torch.empty(n, dtype=torch.uint8, device=DEV).random_()
    b = torch.empty_like(a)
    ms = bench_eager(lambda: b.copy_(a))
    copy_bw = 2 * n / ms / 1e6
    x = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    y = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    ms = bench_eager(lambda: x @ y)
    mm = 2 * 8192 ** 3 / ms / 1e9
    print(f"measured ceilings: D2D copy {copy_bw:.0f} GB/s (read + write), bf16 8192^3 matmul {mm:.0f} TFLOP/s;"
          f" floors below use {BW / 1e9:.0f} GB/s and {FLOPS / 1e12:.0f} TFLOP/s", flush=True)
    del a, b, x, y
    return dict(copy_gbps=copy_bw, bf16_tflops=mm)


# ----------------------------------------------------------------------------- paged setup

KV_KINDS = (None, "int8", "fp8")  # the cache kinds: compute dtype, int8 per-token scales, fp8 per-head scales


def kv_label(kv):
    return f" {kv}" if kv else ""


def paged(seq_lens, hkv, d, bs, kv, dtype=DT):
    """Caches holding the sequences in shuffled blocks (non-contiguous block tables); kv as in KV_KINDS."""
    nblk = [math.ceil(L / bs) for L in seq_lens]
    num_blocks = sum(nblk)
    perm = torch.randperm(num_blocks, device=DEV).to(torch.int32)
    tables = torch.zeros(len(seq_lens), max(nblk), dtype=torch.int32, device=DEV)
    i = 0
    for b, n in enumerate(nblk):
        tables[b, :n] = perm[i:i + n]
        i += n
    shape = (num_blocks, bs, hkv, d)
    if kv == "int8":
        kc = torch.randint(-127, 128, shape, dtype=torch.int8, device=DEV)
        vc = torch.randint(-127, 128, shape, dtype=torch.int8, device=DEV)
        ks = torch.rand(shape[:3], device=DEV) / 127
        vs = torch.rand(shape[:3], device=DEV) / 127
    elif kv == "fp8":
        kc = rand(*shape, dtype=torch.float32, scale=100.0).clamp_(-448, 448).to(torch.float8_e4m3fn)
        vc = rand(*shape, dtype=torch.float32, scale=100.0).clamp_(-448, 448).to(torch.float8_e4m3fn)
        ks = torch.rand(hkv, device=DEV) / 100 + 1e-3
        vs = torch.rand(hkv, device=DEV) / 100 + 1e-3
    else:
        kc, vc = rand(*shape), rand(*shape)
        ks = vs = None
    return kc, vc, ks, vs, tables, torch.tensor(seq_lens, dtype=torch.int32, device=DEV)


def kv_bytes(seq_lens, hkv, d, kv, dtype=DT):
    """K and V bytes read: 1-byte codes for the 8-bit caches, plus int8's float32 scale per token and head
    (fp8's per-head scales are 2 x hkv floats per layer: not counted)."""
    tok = sum(seq_lens)
    esize = 1 if kv else torch.finfo(dtype).bits // 8
    return tok * hkv * d * esize * 2 + (tok * hkv * 4 * 2 if kv == "int8" else 0)


# ----------------------------------------------------------------------------- benches

def bench_decode(cfg, sweep):
    hq, hkv, d = cfg["hq"], cfg["hkv"], cfg["d"]
    g = torch.Generator().manual_seed(0)
    cases = [(1, [4096]), (64, None), (256, None)] if not SMOKE else [(1, [100]), (3, None)]
    for B, lens in cases:
        if lens is None:
            lo, hi = (1024, 4096) if not SMOKE else (20, 90)
            lens = torch.randint(lo, hi + 1, (B,), generator=g).tolist()
        for kv in KV_KINDS:
            for bs in ((64, 16) if (B == 64 and not kv and not SMOKE) else (64 if not SMOKE else 16,)):
                kc, vc, ks, vs, tables, sl = paged(lens, hkv, d, bs, kv)
                q = rand(B, hq, d)
                scale = d ** -0.5
                max_len = max(lens)
                nbytes = kv_bytes(lens, hkv, d, kv) + 2 * q.numel() * q.element_size() + tables.numel() * 4
                fn = lambda: K.paged_decode_attention(q, kc, vc, tables, sl, scale, ks, vs, max_seq_len=max_len)
                err = rel_err(fn(), R.paged_decode_attention(q.float(), kc, vc, tables, sl, scale, ks, vs))
                ms = bench(fn)
                ref_ms = ref_time(lambda: R.paged_decode_attention(q, kc, vc, tables, sl, scale, ks, vs))
                shape = f"B={B} ctx={min(lens)}-{max_len} bs={bs}{kv_label(kv)}"
                row("paged_decode_attention", shape, ms, nbytes, ref_ms=ref_ms,
                    note=f"err={err:.1e}")
                if B == 1 and not kv and not SMOKE:
                    kk = rand(1, hkv, lens[0], d)
                    vv = rand(1, hkv, lens[0], d)
                    qq = q.view(1, hq, 1, d)
                    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, enable_gqa=True)
                    row("  torch sdpa (contiguous)", shape, bench(sdpa), nbytes, note="not paged: baseline")
                if sweep:
                    for part in ((None,) if B > 1 else ()):
                        for c in DECODE_CONFIGS:
                            f2 = lambda: K.paged_decode_attention(q, kc, vc, tables, sl, scale, ks, vs,
                                                                  max_seq_len=max_len, partition_size=part, config=c)
                            sweep_line(f"decode {shape} partition={part} cfg={c}", f2, nbytes)
                del kc, vc, ks, vs


DECODE_CONFIGS = [(64, 4, 3), (128, 8, 2), (128, 4, 3), (256, 8, 2)]  # (BLOCK_N, warps, stages); default is
# (128, 4, 2)
# stages 1: no register prefetch, so fewer registers (255 + spills at 2, compiled for sm_90 here) and more programs
# per SM; 4 ran as 3 on the H100
# (BLOCK_N, warps, stages, int8 Q.K^T, V widened as loaded): around run K's best (128, 4, 2); the int8 Q.K^T is
# the int8 cache's default (the fp8 cache ignores it). The full (BLOCK_N, warps, stages) grid of run K (docs/kernels.md)
# found (128, 4, 2) best for both kinds.
# (BLOCK_N, warps, stages, int8 Q.K^T, V widened, products swapped): the default (128, 4, 3, V widened), the old
# one, and the swapped products around the default (the full grid without swapping: run AB, docs/kernels.md)
# not swapped (the default before run AM), then swapped: V widened at 128/64/32-token tiles over 4, 2 and 1 warps
# (sm_90 SASS, warp instructions a token: 64 tokens over 2 warps 20-24% fewer than over 4, at the same shared
# memory; benchmarks/kernels/sass_loop.py), and one without the widening
DECODE8_CONFIGS = ([(128, 4, 3, False, True), (128, 4, 2, True, False)]
                   + [(n, w, st, False, True, True) for (n, w, st) in ((128, 4, 3), (128, 4, 2), (64, 4, 3),
                                                                       (64, 2, 3), (64, 2, 4), (32, 1, 3),
                                                                       (32, 2, 3), (128, 8, 3))]
                   + [(64, 4, 3, False, False, True)])
DECODE8_BEST: list[dict] = []


def bench_decode8_sweep(cfg):
    """The 8-bit decode kernel's config grid at the issue-10 shape (B=256, context ~1,100, Llama-3-8B heads): each
    (BLOCK_N, warps, stages) for the int8 and the fp8 cache, its error against the float32 reference, the best per
    kind (kept in the JSON as decode8_best); the bf16 cache at the default config beside them."""
    hq, hkv, d = cfg["hq"], cfg["hkv"], cfg["d"]
    g = torch.Generator().manual_seed(1)
    B, (lo, hi), bs = (256, (1000, 1200), 64) if not SMOKE else (3, (30, 60), 16)
    lens = torch.randint(lo, hi + 1, (B,), generator=g).tolist()
    configs = DECODE8_CONFIGS if not SMOKE else [(32, 4, 2), (64, 4, 3, True, True), (32, 4, 2, False, True, True)]
    for kv in KV_KINDS:
        kc, vc, ks, vs, tables, sl = paged(lens, hkv, d, bs, kv)
        q = rand(B, hq, d)
        scale, max_len = d ** -0.5, max(lens)
        nbytes = kv_bytes(lens, hkv, d, kv) + 2 * q.numel() * q.element_size() + tables.numel() * 4
        ref = R.paged_decode_attention(q.float(), kc, vc, tables, sl, scale, ks, vs)
        shape = f"B={B} ctx={min(lens)}-{max_len} bs={bs}{kv_label(kv)}"
        fn = lambda: K.paged_decode_attention(q, kc, vc, tables, sl, scale, ks, vs, max_seq_len=max_len)
        row("paged_decode_attention", shape, bench(fn), nbytes, note=f"err={rel_err(fn(), ref):.1e} default config")
        if not kv:
            continue
        timed = []
        for c in configs:
            if kv == "fp8" and len(c) > 3 and c[3]:  # no int8 Q.K^T for fp8 codes
                continue
            f2 = lambda: K.paged_decode_attention(q, kc, vc, tables, sl, scale, ks, vs, max_seq_len=max_len, config=c)
            try:
                err = rel_err(f2(), ref)
                ms = bench_graph(f2)
            except Exception as e:  # out of shared memory / registers
                print(f"    decode8 {shape} cfg={c}: failed {type(e).__name__}: {str(e)[:150]}", flush=True)
                if not SMOKE:
                    torch.cuda.synchronize()
                continue
            ok = err < 2e-2
            print(f"    decode8 {shape} cfg={c}: {ms * 1e3:8.1f} us ({nbytes / ms / 1e6:5.0f} GB/s,"
                  f" {ms / (nbytes / BW * 1e3):4.2f}x floor) err={err:.1e}{'' if ok else ' WRONG'}", flush=True)
            if ok:
                timed.append((ms, c))
        if timed:
            ms, c = min(timed)
            DECODE8_BEST.append(dict(kv=kv, shape=shape, config=c, ms=ms, gbps=nbytes / ms / 1e6,
                                     floor_ms=nbytes / BW * 1e3))
            print(f"    best decode8{kv_label(kv)}: {c} {ms * 1e3:.1f} us ({nbytes / ms / 1e6:.0f} GB/s)", flush=True)
        del kc, vc, ks, vs
# the B=256 grid's winners on an H100 (run AP) beside the default, at the batches where a program of 1-2 warps may
# leave the SMs short of warps: batch 1 (1,000 and 4,000 tokens, in partitions), 16 and 64
DECODE8_SMALL_CONFIGS = [(64, 4, 3, False, True, True), (64, 2, 3, False, True, True), (32, 1, 3, False, True, True),
                         (32, 2, 3, False, True, True)]


def bench_decode8_small(cfg):
    """The 8-bit decode kernel's candidate configs (DECODE8_SMALL_CONFIGS) at small batches, each kind."""
    hq, hkv, d = cfg["hq"], cfg["hkv"], cfg["d"]
    g = torch.Generator().manual_seed(2)
    cases = ([(1, (1000, 1000)), (1, (4000, 4000)), (16, (1000, 1200)), (64, (1000, 1200))] if not SMOKE
             else [(1, (40, 40)), (3, (30, 60))])
    configs = DECODE8_SMALL_CONFIGS if not SMOKE else [(32, 4, 2, False, True, True), (16, 1, 2, False, True, True)]
    for B, (lo, hi) in cases:
        lens = torch.randint(lo, hi + 1, (B,), generator=g).tolist()
        for kv in ("int8", "fp8"):
            kc, vc, ks, vs, tables, sl = paged(lens, hkv, d, 64 if not SMOKE else 16, kv)
            q = rand(B, hq, d)
            nbytes = kv_bytes(lens, hkv, d, kv) + 2 * q.numel() * q.element_size() + tables.numel() * 4
            ref = R.paged_decode_attention(q.float(), kc, vc, tables, sl, d ** -0.5, ks, vs)
            shape = f"B={B} ctx={min(lens)}-{max(lens)}{kv_label(kv)}"
            for c in configs:
                fn = lambda: K.paged_decode_attention(q, kc, vc, tables, sl, d ** -0.5, ks, vs, max_seq_len=max(lens),
                                                      config=c)
                err = rel_err(fn(), ref)
                ms = bench_graph(fn)
                print(f"    decode8b {shape} cfg={c}: {ms * 1e3:8.1f} us ({nbytes / ms / 1e6:5.0f} GB/s)"
                      f" err={err:.1e}{'' if err < 2e-2 else ' WRONG'}", flush=True)
            del kc, vc, ks, vs


PREFILL_CONFIGS = [(128, 128, 8, 2), (64, 64, 4, 3), (64, 128, 4, 2), (128, 64, 8, 3)]  # (BLOCK_M, BLOCK_N, warps,
# stages)


def sweep_line(label, fn, nbytes, flops=0.0):
    try:
        ms = bench_graph(fn)
        tf = f" {flops / ms / 1e9:5.0f} TF/s" if flops else ""
        print(f"    sweep {label}: {ms * 1e3:8.1f} us ({nbytes / ms / 1e6:5.0f} GB/s{tf})", flush=True)
    except Exception as e:  # out of shared memory, etc.
        print(f"    sweep {label}: failed {type(e).__name__}: {str(e)[:150]}", flush=True)
        torch.cuda.synchronize()


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def causal_flops(ctx_q, hq, d):
    f = 0
    for ctx, n in ctx_q:
        # query i (0-based) sees ctx + i + 1 keys: QK^T and PV, 2 FLOPs per multiply-add
        f += (n * ctx + n * (n + 1) / 2) * hq * d * 4
    return f


def bench_prefill(cfg, sweep):
    hq, hkv, d = cfg["hq"], cfg["hkv"], cfg["d"]
    cases = [[(0, 512)] * 8, [(1536, 512)] * 8] if not SMOKE else [[(0, 40)] * 2]
    for ctx_q in cases:
        for kv in KV_KINDS:
            seq_lens = [c + n for c, n in ctx_q]
            q_lens = [n for _, n in ctx_q]
            kc, vc, ks, vs, tables, sl = paged(seq_lens, hkv, d, 64 if not SMOKE else 16, kv)
            T = sum(q_lens)
            qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
            q = rand(T, hq, d)
            scale = d ** -0.5
            mq = max(q_lens)
            fn = lambda: K.paged_prefill_attention(q, kc, vc, tables, qsl, sl, scale, mq, ks, vs)
            err = rel_err(fn(), R.paged_prefill_attention(q.float(), kc, vc, tables, qsl, sl, scale, mq, ks, vs))
            nbytes = kv_bytes(seq_lens, hkv, d, kv) + 2 * q.numel() * q.element_size()
            flops = causal_flops(ctx_q, hq, d)
            ms = bench(fn)
            ref_ms = ref_time(lambda: R.paged_prefill_attention(q, kc, vc, tables, qsl, sl, scale, mq, ks, vs))
            shape = f"{len(ctx_q)}x{q_lens[0]} prefix={ctx_q[0][0]}{kv_label(kv)}"
            row("paged_prefill_attention", shape, ms, nbytes, flops, ref_ms=ref_ms, note=f"err={err:.1e}")
            if sweep and not SMOKE:
                for c in PREFILL_CONFIGS:
                    f2 = lambda: K.paged_prefill_attention(q, kc, vc, tables, qsl, sl, scale, mq, ks, vs, config=c)
                    sweep_line(f"prefill {shape} cfg={c}", f2, nbytes, flops)
            if not kv and not SMOKE and ctx_q[0][0] == 0:
                B, n = len(ctx_q), q_lens[0]
                qq = rand(B, hq, n, d)
                kk, vv = rand(B, hkv, n, d), rand(B, hkv, n, d)
                sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, is_causal=True,
                                                                                enable_gqa=True)
                row("  torch sdpa (contiguous)", shape, bench(sdpa), nbytes, flops, note="not paged: baseline")
            del kc, vc, ks, vs


def bench_cache(cfg):
    hkv, d = cfg["hkv"], cfg["d"]
    for T in ((256, 4096) if not SMOKE else (8,)):
        for kv in KV_KINDS:
            nb = (T + 63) // 64 * 2
            bs = 64
            shape_c = (nb, bs, hkv, d)
            if kv == "int8":
                kc = torch.zeros(shape_c, dtype=torch.int8, device=DEV)
                vc = torch.zeros_like(kc)
                ks = torch.zeros(shape_c[:3], device=DEV)
                vs = torch.zeros_like(ks)
            elif kv == "fp8":
                kc = torch.zeros(shape_c, dtype=torch.float8_e4m3fn, device=DEV)
                vc = torch.zeros_like(kc)
                ks = torch.rand(hkv, device=DEV) / 100 + 1e-3
                vs = torch.rand(hkv, device=DEV) / 100 + 1e-3
            else:
                kc, vc = rand(*shape_c), rand(*shape_c)
                ks = vs = None
            key, value = rand(T, hkv, d), rand(T, hkv, d)
            slots = torch.randperm(nb * bs, device=DEV)[:T]
            fn = lambda: K.reshape_and_cache(key, value, kc, vc, slots, ks, vs)
            nbytes = (2 * key.numel() * 2 + 2 * key.numel() * (1 if kv else 2) + (2 * T * hkv * 4 if kv == "int8" else 0)
                      + T * 8)
            ms = bench(fn)
            ref_ms = ref_time(lambda: R.reshape_and_cache(key, value, kc, vc, slots, ks, vs))
            row("reshape_and_cache", f"T={T}{kv_label(kv)}", ms, nbytes, ref_ms=ref_ms)


def bench_norm(cfg):
    h = cfg["hidden"]
    for T in ((64, 4096) if not SMOKE else (4,)):
        x, r = rand(T, h), rand(T, h)
        w = rand(h)
        esz = 2
        ms = bench(lambda: K.rmsnorm(x, w, 1e-5))
        row("rmsnorm", f"T={T} H={h}", ms, 2 * T * h * esz + h * esz,
            ref_ms=ref_time(lambda: R.rmsnorm(x, w, 1e-5)))
        ms = bench(lambda: K.fused_add_rmsnorm(x, r, w, 1e-5))
        row("fused_add_rmsnorm", f"T={T} H={h}", ms, 4 * T * h * esz + h * esz,
            ref_ms=ref_time(lambda: R.fused_add_rmsnorm(x, r, w, 1e-5)))


def bench_rope(cfg):
    hq, hkv, d = cfg["hq"], cfg["hkv"], cfg["d"]
    for T in ((256, 4096) if not SMOKE else (4,)):
        qkv = rand(T, (hq + 2 * hkv) * d)
        q = qkv[:, : hq * d].view(T, hq, d)
        k = qkv[:, hq * d: (hq + hkv) * d].view(T, hkv, d)
        cache = torch.randn(8192, d, device=DEV)
        pos = torch.randint(0, 8192, (T,), device=DEV)
        nbytes = 2 * T * (hq + hkv) * d * 2 + T * d * 4 + T * 8
        ms = bench(lambda: K.rotary_embedding(pos, q, k, cache))
        row("rotary_embedding", f"T={T} Hq={hq} Hkv={hkv} D={d}", ms, nbytes,
            ref_ms=ref_time(lambda: R.rotary_embedding(pos, q, k, cache)))


def bench_silu(cfg):
    inter = cfg["inter"]
    for T in ((64, 4096) if not SMOKE else (4,)):
        x = rand(T, 2 * inter)
        ms = bench(lambda: K.silu_and_mul(x))
        row("silu_and_mul", f"T={T} I={inter}", ms, 3 * T * inter * 2,
            ref_ms=ref_time(lambda: R.silu_and_mul(x)))


W8_SWEEP = {  # T -> (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, warps, stages) configs tried besides the default
    64: [(64, 64, 128, 2, 8, 4), (32, 64, 128, 2, 4, 4), (64, 32, 256, 1, 4, 4)],
    128: [(128, 128, 64, 1, 8, 3), (128, 128, 64, 2, 8, 3), (64, 128, 128, 2, 4, 3)],
    256: [(128, 128, 64, 1, 8, 3), (128, 128, 64, 2, 8, 3), (64, 128, 128, 2, 4, 3)],
}


def w8_small_sweep(T, N, Kd):
    """At T <= 16: narrower, deeper tiles, and K split further (about 2 programs per SM, as skinny_matmul does).
    (Int8 codes converted to fp16 by add + bitcast instead of the int->float unit ran 1.5x slower: run J.)"""
    if T > 16:
        return []
    bm, bn, bk, split, warps, stages = K.w8a16._config(T, N, Kd, torch.device(DEV))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    more = split
    while -(-N // bn) * more < 2 * sms and Kd // (more * 2) >= 4 * bk:
        more *= 2
    out = [(bm, 64, 128, split, warps, stages)]
    if more != split:
        out.append((bm, bn, bk, more, warps, stages))
    return out


def bench_w8a16(cfg, sweep):
    h, inter, hq, hkv, d = cfg["hidden"], cfg["inter"], cfg["hq"], cfg["hkv"], cfg["d"]
    shapes = [("qkv", (hq + 2 * hkv) * d, h), ("o", h, hq * d), ("gate_up", 2 * inter, h), ("down", h, inter)]
    if SMOKE:
        shapes = [("tiny", 96, 128)]
    for T in ((1, 16, 32, 64, 128, 256) if not SMOKE else (1, 3)):
        for name, N, Kd in shapes:
            x = rand(T, Kd)
            wq, ws = R.quantize_int8(rand(N, Kd, dtype=torch.float32))
            wb = (wq.float() * ws[:, None]).to(DT)
            fn = lambda: K.w8a16_matmul(x, wq, ws)
            err = rel_err(fn(), R.w8a16_matmul(x, wq, ws))
            nbytes = N * Kd + N * 4 + T * Kd * 2 + T * N * 2
            ms = bench(fn)
            mm_ms = bench(lambda: x @ wb.t())[0]
            flops = 2 * T * N * Kd
            row("w8a16_matmul", f"{name} T={T} N={N} K={Kd}", ms, nbytes, flops, ref_ms=mm_ms,
                ref_name="bf16 torch.matmul",
                note=f"err={err:.1e} bf16-floor={(N * Kd * 2 + T * (Kd + N) * 2) / BW * 1e6:.1f}us")
            if sweep and not SMOKE:
                for c in W8_SWEEP.get(T, []) + w8_small_sweep(T, N, Kd):
                    sweep_line(f"w8a16 {name} T={T} cfg={c}", lambda: K.w8a16_matmul(x, wq, ws, config=c), nbytes,
                               flops)
            del wq, ws, wb


SKINNY_SWEEP = [  # (BLOCK_N, BLOCK_K, stages, programs per SM the split aims at)
    (bn, bk, st, per_sm) for bn, bk in ((16, 256), (32, 128), (32, 256), (64, 128))
    for st in (3, 5) for per_sm in (1, 2, 4)]


def _skinny_cfg(M, N, Kd, bn, bk, st, per_sm):
    from kiln.kernels._utils import next_pow2, num_sms
    bm = max(16, next_pow2(M))
    tiles = triton.cdiv(N, bn) * triton.cdiv(M, bm)
    split = 1
    while tiles * split < per_sm * num_sms(torch.device(DEV)) and Kd // (split * 2) >= 4 * bk:
        split *= 2
    return bm, bn, bk, split, 4, st


def bench_skinny(cfg, sweep):
    """Dense bf16 weight, few rows: the split-K kernel against cuBLAS (x @ w.T), Llama-3-8B's projections and
    LM head. With --sweep, a grid of tiles; the best per shape is printed and collected in SKINNY_BEST."""
    from kiln.kernels.skinny import skinny_config
    h, inter, hq, hkv, d = cfg["hidden"], cfg["inter"], cfg["hq"], cfg["hkv"], cfg["d"]
    shapes = [("qkv", (hq + 2 * hkv) * d, h), ("o", h, hq * d), ("gate_up", 2 * inter, h), ("down", h, inter),
              ("lm_head", 128256 if not SMOKE else 256, h)]
    for T in ((1, 4, 8, 16) if not SMOKE else (1, 3)):
        for name, N, Kd in shapes:
            x = rand(T, Kd)
            ws = [rand(N, Kd, scale=0.02) for _ in range(2 if not SMOKE else 1)]
            w = ws[0]
            fn = lambda: K.skinny_matmul(x, w)
            err = rel_err(fn(), R.skinny_matmul(x, w))
            nbytes = N * Kd * 2 + T * (Kd + N) * 2
            ms = bench(fn)
            mm_ms = bench(lambda: x @ w.t())[0]
            c0 = skinny_config(T, N, Kd, x.device)
            row("skinny_matmul", f"{name} T={T} N={N} K={Kd}", ms, nbytes, 2 * T * N * Kd, ref_ms=mm_ms,
                ref_name="cuBLAS", note=f"err={err:.1e} cfg={c0}")
            if sweep and not SMOKE:
                best = (ms[0], c0)
                seen = {c0}
                for p in SKINNY_SWEEP:
                    c = _skinny_cfg(T, N, Kd, *p)
                    if c in seen:
                        continue
                    seen.add(c)
                    try:
                        t = bench_graph(lambda: K.skinny_matmul(x, w, config=c), rep_ms=30)
                    except Exception as e:  # out of shared memory, etc.
                        print(f"    sweep {c}: failed {type(e).__name__}", flush=True)
                        torch.cuda.synchronize()
                        continue
                    if t < best[0]:
                        best = (t, c)
                SKINNY_BEST.append(dict(shape=name, T=T, cublas_us=mm_ms * 1e3, default_us=ms[0] * 1e3,
                                        best_us=best[0] * 1e3, best_cfg=best[1]))
                print(f"    best {name} T={T}: {best[0] * 1e3:.1f} us {best[1]} ({nbytes / best[0] / 1e6:.0f} GB/s;"
                      f" cuBLAS {mm_ms * 1e3:.1f} us, default {ms[0] * 1e3:.1f} us)", flush=True)
            del ws, w


SKINNY_BEST: list[dict] = []


def kernel_stats():
    """Registers, spills and shared memory of every compiled variant (the compiler's report)."""
    import importlib
    m = {n: importlib.import_module(f"kiln.kernels.{n}") for n in
         ("activation", "cache", "decode_attention", "prefill_attention", "rmsnorm", "rotary", "w8a16")}
    activation, cache, decode_attention, prefill_attention = (m["activation"], m["cache"], m["decode_attention"],
                                                              m["prefill_attention"])
    rmsnorm, rotary, w8a16 = m["rmsnorm"], m["rotary"], m["w8a16"]
    fns = [cache._reshape_and_cache_kernel, cache._rope_and_cache_kernel, decode_attention._decode_kernel,
           prefill_attention._prefill_kernel, rmsnorm._rmsnorm_kernel, rotary._rope_kernel,
           activation._silu_and_mul_kernel, w8a16._w8a16_kernel, w8a16._w8a16_reduce_kernel, w8a16._w8_gemv_kernel]
    print("\ncompiled variants: kernel | regs | spills | shared bytes | warps | stages | constexprs")
    for fn in fns:
        try:
            for dev, caches in fn.device_caches.items():
                for ck in caches[0].values():
                    ck._init_handles()
                    consts = {k[0] if isinstance(k, tuple) else k: v for k, v in getattr(ck.src, "constants", {}).items()}
                    consts = {fn.arg_names[k] if isinstance(k, int) else k: v for k, v in consts.items()}
                    consts = {k: v for k, v in consts.items() if isinstance(k, str) and k.isupper()}
                    md = ck.metadata
                    print(f"{fn.__name__} | {ck.n_regs} | {ck.n_spills} | {md.shared} | {md.num_warps} |"
                          f" {md.num_stages} | {consts}")
        except Exception as e:  # the attribute names move between Triton versions
            print(f"{fn.__name__}: no stats ({type(e).__name__}: {e})")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--only", default=None,
                    help="comma list: decode,decode8,decode8b,prefill,cache,norm,rope,silu,w8a16,skinny (decode8, "
                         "decode8b: with --sweep)")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = dict(hidden=4096, hq=32, hkv=8, d=128, inter=14336)
    if SMOKE:
        cfg = dict(hidden=256, hq=4, hkv=2, d=64, inter=128)
    env = dict(date=datetime.date.today().isoformat(), python=platform.python_version(), torch=torch.__version__,
               triton=triton.__version__, cuda=torch.version.cuda,
               gpu=torch.cuda.get_device_name() if not SMOKE else "cpu (interpreter)")
    print(env, flush=True)
    env.update(ceilings())
    only = set(args.only.split(",")) if args.only else None
    steps = [("cache", lambda: bench_cache(cfg)), ("decode", lambda: bench_decode(cfg, args.sweep)),
             ("decode8", lambda: bench_decode8_sweep(cfg) if args.sweep else None),
            ("decode8b", lambda: bench_decode8_small(cfg) if args.sweep else None),
             ("prefill", lambda: bench_prefill(cfg, args.sweep)), ("norm", lambda: bench_norm(cfg)),
             ("rope", lambda: bench_rope(cfg)), ("silu", lambda: bench_silu(cfg)),
             ("w8a16", lambda: bench_w8a16(cfg, args.sweep)), ("skinny", lambda: bench_skinny(cfg, args.sweep))]
    for name, f in steps:
        if only and name not in only:
            continue
        try:
            f()
        except Exception as e:  # keep going: one broken kernel should not hide the others' numbers
            import traceback
            traceback.print_exc()
            print(f"!! {name} failed: {e}", flush=True)
        if not SMOKE:
            torch.cuda.empty_cache()
    print("\nsummary: kernel | shape | us | GB/s | x floor | ref us | speedup")
    for r in ROWS:
        ref = f"{r['ref_ms'] * 1e3:.1f} | {r['speedup']:.1f}x" if r["ref_ms"] else "- | -"
        print(f"{r['kernel'].strip()} | {r['shape']} | {r['ms'] * 1e3:.1f} | {r['gbps']:.0f} | {r['x_floor']:.2f} | {ref}")
    if not SMOKE:
        kernel_stats()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(env=env, rows=ROWS, skinny_best=SKINNY_BEST, decode8_best=DECODE8_BEST), f, indent=1)


if __name__ == "__main__":
    main()
