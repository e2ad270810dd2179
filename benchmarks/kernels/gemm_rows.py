"""Projections at decode batches of 1-256 rows (GPU), bf16 or 8-bit weights: cuBLAS against the split-K tile kernel
(kiln/kernels/w8a16.py's, which kiln.kernels.skinny_matmul runs for bf16) at its heuristic configs and over a small
sweep of tiles. At these rows a layer is mostly a read of its weight, so the figure that matters is the weight
stream's GB/s against the copy rate. Llama-3-8B's four projections, LAYERS distinct weights each (nothing stays in
L2), captured in one CUDA graph per projection; us a layer = graph time / LAYERS.

    PYTHONPATH=. python benchmarks/kernels/gemm_rows.py [--weights bf16|int8|fp8] [--rows 8,16,32,48,64,96,128]
                                                        [--layers 8] [--sweep] [--lm-head]

bf16: cuBLAS is `x @ w.T` (the linear layers above KILN_SKINNY_MAX_T rows), the tile is skinny_config's. int8 /
fp8 (per-channel scales, bf16 activations): cuBLAS is the W8A8 path's GEMM on rows already quantized
(`ops.w8a8_gemm`: torch._int_mm + the scale epilogue, or torch._scaled_mm; in a decoder layer the producer kernels
quantize), against the weight-only tile (`w8a16_matmul`, activations unquantized) at its heuristic
(`w8a16._config`; the sweep: swapped tiles, which lost in run AW).

Prints, per rows and projection: cuBLAS us, each heuristic's us (config, error against the reference relative to
its largest value), the sweep's best us and config, GB/s of each; then per rows the four projections summed (one
layer's GEMMs) and their bytes' time at the copy rate measured here (a copy reads and writes: on an H100 it ran at
2.43 TB/s where a read-only stream reaches ~2.9, so that time is not a floor).
"""
from __future__ import annotations

import argparse
import itertools

import torch

from benchmarks.kernels.bench_kernels import capture_graph
from kiln.kernels import w8a16
from kiln.kernels.skinny import skinny_config, skinny_matmul
from kiln.quantization import ops

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
CODES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}


def graph_us(fn, layers: int, reps: int = 20) -> float:
    g = capture_graph(fn)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / layers)
    return sorted(times)[len(times) // 2]


def copy_rate() -> float:
    a = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    us = graph_us(lambda: b.copy_(a), 1)
    return 2 * a.numel() / us / 1e3  # GB/s


def sweep_configs(m: int, w_bytes: int) -> list[tuple]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, warps, stages, SWAP_AB): for bf16 the plain tiles (rows padded to
    BLOCK_M, 32 or 64 weight rows a program) and the swapped ones (W x^T: the weight's rows on the tensor cores'
    wide side, 64 or 128 of them a program); for 8-bit weights the swapped ones, K tiles of 128 and 256."""
    bm = max(16, 1 << (m - 1).bit_length())
    out = []
    for swap, bn, bk, split, stages in itertools.product((False, True), (32, 64, 128), (128, 256), (1, 2, 4),
                                                         (3, 4)):
        if (bn == 128) != swap and bn != 64:  # plain: 32, 64 wide; swapped: 64, 128 wide
            continue
        if (w_bytes == 1 and not swap) or (w_bytes == 2 and bk != 128):
            continue
        warps = 8 if bn * bm >= 128 * 64 else 4
        out.append((bm, bn, bk, split, warps, stages, swap))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", choices=("bf16", "int8", "fp8"), default="bf16")
    ap.add_argument("--rows", default="8,16,32,48,64,96,128")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--lm-head", action="store_true", help="also the LM head (128256 x 4096; not in the layer's sum)")
    ap.add_argument("--sweep", action="store_true", help="also time sweep_configs' tiles (compiles ~24 per rows)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    w_bytes = 2 if args.weights == "bf16" else 1
    shapes = {**SHAPES, **({"lm_head": (128256, 4096)} if args.lm_head else {})}

    def make(n, k):
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        if w_bytes == 2:
            return w, None
        return ops.quantize_weight(w, CODES[args.weights])

    weights = {name: [make(n, k) for _ in range(args.layers if name != "lm_head" else 2)]
               for name, (n, k) in shapes.items()}
    gbs = copy_rate()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {args.weights} weights; copy rate {gbs:.0f} "
          f"GB/s; {args.layers} layers of distinct weights a projection")

    def tile(x, w, s, cfg):
        return skinny_matmul(x, w, config=cfg) if s is None else w8a16.w8a16_matmul(x, w, s, config=cfg)

    def cublas_fn(x, ws):
        if w_bytes == 2:
            return lambda: [x @ w.t() for w, _ in ws]
        m = x.shape[0]
        codes, scales = ops.quantize_activation(x, ws[0][0].dtype)
        pad = ops.gemm_pad_rows(ws[0][0].dtype, m)
        codes = torch.cat([codes, codes.new_zeros(max(0, pad - m), codes.shape[1])])
        scales = torch.cat([scales, scales.new_ones(max(0, pad - m), 1)])
        xq = ops.QuantizedRows(codes, scales, m, x.dtype)
        return lambda: [ops.w8a8_gemm(xq, w, s, None) for w, s in ws]

    heuristics = {"tile": skinny_config if w_bytes == 2 else w8a16._config}
    print("rows | proj | cuBLAS us (GB/s) | " + " | ".join(f"{h} us (GB/s) config rel.err" for h in heuristics)
          + " | best of sweep us (config)")
    for m in [int(r) for r in args.rows.split(",")]:
        sums = {"cuBLAS": 0.0, **{h: 0.0 for h in heuristics}, "best": 0.0}
        at_copy = 0.0
        for name, (n, k) in shapes.items():
            ws = weights[name]
            per = len(ws)
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            nbytes = n * k * w_bytes + m * k * 2 + m * n * 2
            w0, s0 = ws[0]
            ref = (x @ w0.t()) if s0 is None else ops.w8a16_reference(x, w0, s0, None)
            rate = lambda us: f"{nbytes / us / 1e3:.0f}"  # noqa: E731
            times = {"cuBLAS": graph_us(cublas_fn(x, ws), per)}
            cells = [f"{times['cuBLAS']:.1f} ({rate(times['cuBLAS'])})"]
            for h, rule in heuristics.items():
                cfg = rule(m, n, k, dev)
                err = ((tile(x, w0, s0, cfg).float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                times[h] = graph_us(lambda: [tile(x, w, s, cfg) for w, s in ws], per)
                cells.append(f"{times[h]:.1f} ({rate(times[h])}) {cfg} {err:.1e}")
            best, best_cfg = min((t, h) for h, t in times.items())
            if args.sweep:
                for cfg in sweep_configs(m, w_bytes):
                    try:
                        t = graph_us(lambda: [tile(x, w, s, cfg) for w, s in ws], per, reps=10)
                    except Exception as e:  # a tile that does not fit shared memory: skip it
                        print(f"  {cfg}: {type(e).__name__}")
                        continue
                    if t < best:
                        best, best_cfg = t, cfg
            print(f"{m} | {name} | " + " | ".join(cells) + f" | {best:.1f} ({rate(best)}) {best_cfg}", flush=True)
            if name == "lm_head":
                continue
            at_copy += nbytes / gbs / 1e3
            for h, t in times.items():
                sums[h] += t
            sums["best"] += best
        print(f"{m} | layer | " + " | ".join(f"{h} {t:.1f} us" for h, t in sums.items())
              + f" | bytes at the copy rate {at_copy:.1f}", flush=True)


if __name__ == "__main__":
    main()
