"""Batch-1 W8A16 projections as a decode step meets them (GPU): the Llama-3-8B layer's qkv, o, gate_up and down
for LAYERS layers of distinct int8 weights (1.7 GB at 8: nothing stays in L2), captured in one CUDA graph, per
kernel choice: the tensor-core kernel (_w8a16_kernel at its T <= 16 tile) and CUDA-core GEMV configs. Prints the
microseconds a layer and the weight stream's GB/s, and checks each choice against the reference on one layer.

    python benchmarks/w8_gemv_bench.py [--layers 8] [--codes int8|e4m3] [--configs tc default gemv:8,256,4,1 ...]
"""
from __future__ import annotations

import argparse

import torch

from kiln.kernels import reference as R
from kiln.kernels import w8a16 as W

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
DEFAULT_GEMV = ["default", "gemv:8,256,4,1", "gemv:8,512,4,1", "gemv:16,256,8,1", "gemv:8,256,8,1",
                "gemv:32,512,4,4"]


def parse(c: str):
    if c in ("tc", "default"):
        return c
    name, nums = c.split(":")
    return (name, *[int(v) for v in nums.split(",")])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--configs", nargs="*", default=["tc"] + DEFAULT_GEMV)
    ap.add_argument("--codes", default="int8", choices=["int8", "e4m3"], help="w8a16's int8 or w8a8-fp8's E4M3")
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    layers = []

    def codes(n, kd):
        if args.codes == "int8":
            return torch.randint(-127, 128, (n, kd), dtype=torch.int8, device=dev)
        return (torch.randn(n, kd, device=dev) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    for _ in range(args.layers):
        layers.append({k: (codes(n, kd), torch.rand(n, device=dev) * 0.02 + 0.001) for k, (n, kd) in SHAPES.items()})
    xs = {k: torch.randn(1, kd, device=dev, dtype=torch.bfloat16) for k, (n, kd) in SHAPES.items()}
    nbytes = sum(n * kd for n, kd in SHAPES.values())
    print(f"{torch.cuda.get_device_name()}: {args.layers} layers, {nbytes / 1e6:.1f} MB of {args.codes} weight a layer")
    for c in args.configs:
        cfg = parse(c)

        def mm(k, lay):
            w, s = lay[k]
            n, kd = SHAPES[k]
            if cfg == "tc":  # the tensor-core kernel at its own tile choice
                return W.w8a16_matmul(xs[k], w, s, config=W._config(1, n, kd, dev))
            if cfg == "default":  # what the engine runs (KILN_W8_GEMV)
                return W.w8a16_matmul(xs[k], w, s)
            return W.w8a16_matmul(xs[k], w, s, config=cfg)

        try:
            errs = [((mm(k, layers[0]).float() - R.w8a16_matmul(xs[k], *layers[0][k]).float()).norm()
                     / R.w8a16_matmul(xs[k], *layers[0][k]).float().norm()).item() for k in SHAPES]

            def step():
                for lay in layers:
                    for k in SHAPES:
                        mm(k, lay)
            step(); torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                step()
            g.replay(); torch.cuda.synchronize()
            per = {}
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            reps = 20
            s.record()
            for _ in range(reps):
                g.replay()
            e.record(); torch.cuda.synchronize()
            us = s.elapsed_time(e) * 1e3 / reps / args.layers
            for k in SHAPES:  # each projection alone, over the layers (graph per projection)
                g1 = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g1):
                    for lay in layers:
                        mm(k, lay)
                g1.replay(); torch.cuda.synchronize()
                s.record()
                for _ in range(reps):
                    g1.replay()
                e.record(); torch.cuda.synchronize()
                per[k] = s.elapsed_time(e) * 1e3 / reps / args.layers
            print(f"{c:>18}: {us:7.1f} us a layer, {nbytes / us / 1e3:6.0f} GB/s; "
                  + " ".join(f"{k} {v:.1f}us ({SHAPES[k][0] * SHAPES[k][1] / v / 1e3:.0f} GB/s)" for k, v in per.items())
                  + f"; max err {max(errs):.1e}", flush=True)
        except Exception as ex:  # a config that does not compile or run: say so, go on
            print(f"{c:>18}: failed: {type(ex).__name__}: {str(ex)[:300]}", flush=True)


if __name__ == "__main__":
    main()
