"""fused_moe on the GPU at Qwen3-30B-A3B's (or Mixtral 8x7B's) layer shape: time per call against the floor (the
bytes of the experts a step touches, and x/out, over the copy rate; FLOPs over the bf16 matmul rate), and against
the PyTorch experts loop (kiln.layers.moe.experts_reference). Also checks the two agree. Then the same with int8
experts (w8a16: half the bytes).

    PYTHONPATH=. python3 benchmarks/kernels/moe_bench.py [--shape qwen3-30b-a3b|mixtral-8x7b] [--configs]

--configs sweeps the kernel's tiles (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) per T and prints the best.
"""
from __future__ import annotations

import argparse
import itertools

import torch
import triton.testing

from kiln.kernels.moe import fused_moe, moe_config
from kiln.layers.moe import experts_reference, route

SHAPES = {"qwen3-30b-a3b": (2048, 768, 128, 8), "mixtral-8x7b": (4096, 14336, 8, 2)}  # hidden, I, experts, k
COPY_TB_S = {"H100": 3.35, "H200": 4.25}  # measured copy rates (HOPPER.md / H200.md)
MATMUL_TFLOP_S = {"H100": 660.0, "H200": 700.0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3-30b-a3b", choices=sorted(SHAPES))
    ap.add_argument("--tokens", default="1,8,32,64,256,1024,4096")
    ap.add_argument("--configs", action="store_true")
    args = ap.parse_args()
    h, inter, e, k = SHAPES[args.shape]
    name = torch.cuda.get_device_name()
    gpu = "H200" if "H200" in name else "H100"
    g = torch.Generator(device="cuda").manual_seed(0)
    w13 = torch.randn(e, 2 * inter, h, device="cuda", dtype=torch.bfloat16, generator=g) * h ** -0.5
    w2 = torch.randn(e, h, inter, device="cuda", dtype=torch.bfloat16, generator=g) * inter ** -0.5
    per_expert = (w13[0].numel() + w2[0].numel()) * 2
    print(f"{name}: {args.shape}, hidden {h}, I {inter}, {e} experts, top {k}; {per_expert / 1e6:.1f} MB an expert")
    from kiln.quantization import ops as qops
    (c13, s13), (c2, s2) = (qops.quantize_weight(w13.flatten(0, 1), torch.int8),
                            qops.quantize_weight(w2.flatten(0, 1), torch.int8))
    int8 = (c13.view_as(w13), c2.view_as(w2), (s13.view(e, -1), s2.view(e, -1)))
    print(f"{'T':>6} {'experts':>7} {'floor us':>9} {'fused us':>9} {'of floor':>8} {'torch us':>9} {'rel err':>8} "
          f"{'int8 floor':>10} {'int8 us':>8} {'of floor':>8}")
    for t in map(int, args.tokens.split(",")):
        x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16, generator=g)
        weights, ids = route(torch.randn(t, e, device="cuda", generator=g), k, True)
        touched = ids.unique().numel()
        flops = 2 * t * k * 3 * h * inter
        floor = max(touched * per_expert / (COPY_TB_S[gpu] * 1e12), flops / (MATMUL_TFLOP_S[gpu] * 1e12)) * 1e6
        fused = triton.testing.do_bench(lambda: fused_moe(x, w13, w2, weights, ids), warmup=20, rep=100) * 1e3
        ref_fn = lambda: experts_reference(x, w13, w2, weights, ids)  # noqa: E731
        ref = triton.testing.do_bench(ref_fn, warmup=5, rep=50) * 1e3
        got, want = fused_moe(x, w13, w2, weights, ids).float(), ref_fn().float()
        err = ((got - want).norm() / want.norm()).item()
        floor8 = max(touched * per_expert / 2 / (COPY_TB_S[gpu] * 1e12), flops / (MATMUL_TFLOP_S[gpu] * 1e12)) * 1e6
        q = triton.testing.do_bench(lambda: fused_moe(x, int8[0], int8[1], weights, ids, scales=int8[2]), warmup=20,
                                    rep=100) * 1e3
        print(f"{t:>6} {touched:>7} {floor:>9.1f} {fused:>9.1f} {floor / fused:>8.0%} {ref:>9.1f} {err:>8.1e} "
              f"{floor8:>10.1f} {q:>8.1f} {floor8 / q:>8.0%}")
        if args.configs:
            best = []
            for bm, bn, bk, w, s in itertools.product((16, 32, 64), (32, 64, 128), (64, 128), (4, 8), (2, 3, 4)):
                try:
                    us = triton.testing.do_bench(lambda: fused_moe(x, w13, w2, weights, ids, (bm, bn, bk, w, s)),
                                                 warmup=5, rep=30) * 1e3
                except Exception:  # noqa: BLE001 - out of shared memory
                    continue
                best.append((us, (bm, bn, bk, w, s)))
            best.sort()
            print(f"        default {moe_config(t * k, 2 * inter, h)}; best: " +
                  ", ".join(f"{c} {us:.1f} us" for us, c in best[:4]))


if __name__ == "__main__":
    main()
