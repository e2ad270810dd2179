"""bf16 projections at decode batches of 1-256 rows (GPU): cuBLAS (`x @ w.T`, what the linear layers run above
KILN_SKINNY_MAX_T rows) against the split-K tile kernel (kiln.kernels.skinny_matmul) at its heuristic config and
over a small sweep of tiles. At these rows a bf16 layer is mostly a read of its weight, so the figure that matters
is the weight stream's GB/s against the copy rate. Llama-3-8B's four projections, LAYERS distinct weights each
(nothing stays in L2), captured in one CUDA graph per projection; us a layer = graph time / LAYERS.

    PYTHONPATH=. python benchmarks/kernels/bf16_gemm_rows.py [--rows 8,16,32,48,64,96,128] [--layers 8] [--sweep]

Prints, per rows and projection: cuBLAS us, the heuristic's us, the sweep's best us and its config, GB/s of each;
then per rows the four projections summed (one layer's GEMMs) and their bytes' time at the copy rate measured here
(a copy reads and writes: on an H100 it ran at 2.43 TB/s where a read-only stream reaches ~2.9, so that time is not
a floor).
"""
from __future__ import annotations

import argparse
import itertools

import torch

from benchmarks.kernels.bench_kernels import capture_graph
from kiln.kernels.skinny import skinny_config, skinny_matmul

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


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


def sweep_configs(m: int, n: int, k: int) -> list[tuple]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, warps, stages, SWAP_AB): the plain tiles (rows padded to BLOCK_M), and
    the swapped ones (W x^T: the weight's rows on the tensor cores' wide side, 64 or 128 of them a program)."""
    bm = max(16, 1 << (m - 1).bit_length())
    out = []
    for swap, bn, split, stages in itertools.product((False, True), (32, 64, 128), (1, 2, 4), (3, 4)):
        if (bn == 128) != swap and bn != 64:  # plain: 32, 64 wide; swapped: 64, 128 wide
            continue
        warps = 8 if bn * bm >= 128 * 64 else 4
        out.append((bm, bn, 128, split, warps, stages, swap))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="8,16,32,48,64,96,128")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--lm-head", action="store_true", help="also the LM head (128256 x 4096; not in the layer's sum)")
    ap.add_argument("--sweep", action="store_true", help="also time sweep_configs' tiles (compiles ~24 per rows)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    shapes = {**SHAPES, **({"lm_head": (128256, 4096)} if args.lm_head else {})}
    weights = {name: [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
                      for _ in range(args.layers if name != "lm_head" else 2)] for name, (n, k) in shapes.items()}
    gbs = copy_rate()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; copy rate {gbs:.0f} GB/s; "
          f"{args.layers} layers of distinct weights a projection")
    print("rows | proj | cuBLAS us (GB/s) | heuristic us (config) | best of sweep us (config)")
    for m in [int(r) for r in args.rows.split(",")]:
        sums = {"cublas": 0.0, "heuristic": 0.0, "best": 0.0}
        at_copy = 0.0
        for name, (n, k) in shapes.items():
            ws = weights[name]
            per = len(ws)
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            nbytes = n * k * 2 + m * k * 2 + m * n * 2
            ref = x @ ws[0].t()
            cub = graph_us(lambda: [x @ w.t() for w in ws], per)
            heur_cfg = skinny_config(m, n, k, dev)
            got = skinny_matmul(x, ws[0], config=heur_cfg)
            err = (got.float() - ref.float()).abs().max().item()
            heur = graph_us(lambda: [skinny_matmul(x, w, config=heur_cfg) for w in ws], per)
            best, best_cfg = heur, heur_cfg
            if args.sweep:
                for cfg in sweep_configs(m, n, k):
                    try:
                        t = graph_us(lambda: [skinny_matmul(x, w, config=cfg) for w in ws], per, reps=10)
                    except Exception as e:  # a tile that does not fit shared memory: skip it
                        print(f"  {cfg}: {type(e).__name__}")
                        continue
                    if t < best:
                        best, best_cfg = t, cfg
            rate = lambda us: f"{nbytes / us / 1e3:.0f}"  # noqa: E731
            print(f"{m} | {name} | {cub:.1f} ({rate(cub)}) | {heur:.1f} ({rate(heur)}) {heur_cfg} err {err:.2g} | "
                  f"{best:.1f} ({rate(best)}) {best_cfg}", flush=True)
            if name == "lm_head":
                continue
            at_copy += nbytes / gbs / 1e3
            sums["cublas"] += cub
            sums["heuristic"] += heur
            sums["best"] += min(best, cub)
        print(f"{m} | layer | cuBLAS {sums['cublas']:.1f} us | heuristic {sums['heuristic']:.1f} | best per "
              f"projection (either) {sums['best']:.1f} | bytes at the copy rate {at_copy:.1f}", flush=True)


if __name__ == "__main__":
    main()
