"""W8A8 on the GPU: w8a8_linear (int8, fp8) at Llama-3-8B shapes, checked against float64 and timed against the floor.

    PYTHONPATH=. python3 benchmarks/gpu_w8a8_check.py [--m 1,16,64,256,1024] [--json OUT.json]

For each scheme, projection (N x K) and row count M: the relative error of w8a8_linear against a float64 product
of the same activations and the dequantized 8-bit weight (so the error shown is the activation quantization plus
rounding: 0 quantization error on the weight-only path), and its time. Times (us) are GPU time of the call captured
in a CUDA graph and replayed after an L2-evicting read (bench_kernels.bench_graph), with the triton.testing.do_bench
median of a plain Python call ("eager", host launch cost included) beside it. Columns:

  path      the path w8a8_linear took (weight-only kernel up to KILN_W8A8_WEIGHT_ONLY_MAX_T rows, else W8A8)
  wo us     the weight-only kernel (kernels.w8a16_matmul on the 8-bit codes), timed at every M <= 256
  w8a8 us   the W8A8 path (activation quantization + cuBLAS int8 / FP8 GEMM + epilogue) at every M
  quant us  the activation quantization kernel alone
  bf16 us   cuBLAS bf16 x @ W.T on the dequantized weight, for scale
  floor us  max(8-bit weight bytes / copy rate, 2 M N K / the scheme's measured 8192^3 matmul rate)

The lead chooses KILN_W8A8_WEIGHT_ONLY_MAX_T from where "wo us" stops beating "w8a8 us".
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels"))
import bench_kernels as B  # noqa: E402  (one home for the graph and eager timers)
import triton  # noqa: E402

from kiln import kernels as K  # noqa: E402
from kiln.quantization import ops as qops  # noqa: E402

SHAPES = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)]
SCHEMES = [(qops.W8A8_INT8, torch.int8), (qops.W8A8_FP8, qops.FP8_DTYPE)]


def ceilings() -> dict:
    n = 1 << 29
    a = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    copy = 2 * n / B.bench_eager(lambda: b.copy_(a)) / 1e6 * 1e9  # bytes/s
    del a, b
    s = 8192
    x = torch.randn(s, s, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(s, s, device="cuda", dtype=torch.bfloat16)
    flop = 2 * s ** 3
    rates = {"bf16": flop / B.bench_eager(lambda: x @ y) * 1e3}
    x8, y8 = x.to(torch.int8), y.to(torch.int8)
    rates[qops.W8A8_INT8] = flop / B.bench_eager(lambda: torch._int_mm(x8, y8.t())) * 1e3
    xf, yf = x.to(qops.FP8_DTYPE), y.to(qops.FP8_DTYPE)
    one = torch.ones((), device="cuda")
    rates[qops.W8A8_FP8] = flop / B.bench_eager(
        lambda: torch._scaled_mm(xf, yf.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)) * 1e3
    print(f"{torch.cuda.get_device_name()}: copy {copy / 1e9:.0f} GB/s (read + write); 8192^3 matmul TFLOP/s: "
          + ", ".join(f"{k} {v / 1e12:.0f}" for k, v in rates.items()), flush=True)
    return dict(copy=copy, **rates)


def forced(max_t: int, fn):
    """Run fn with the weight-only threshold at max_t (0: always W8A8; a large value: always weight-only)."""
    def call():
        saved, qops.WEIGHT_ONLY_MAX_T = qops.WEIGHT_ONLY_MAX_T, max_t
        try:
            return fn()
        finally:
            qops.WEIGHT_ONLY_MAX_T = saved
    return call


def us(t):
    return f"{t[0] * 1e3:8.1f} ({t[1] * 1e3:6.1f})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", default="1,16,64,256,1024")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    ms = [int(v) for v in args.m.split(",")]
    ceil = ceilings()
    rows = []
    print(f"weight-only threshold: KILN_W8A8_WEIGHT_ONLY_MAX_T = {qops.WEIGHT_ONLY_MAX_T}; times: graph us (eager us)")
    print(f"{'scheme':10s} {'proj':8s} {'M':>5s} {'path':5s} {'rel err':>8s} {'us (eager)':>17s} {'x floor':>7s} "
          f"{'wo us':>17s} {'w8a8 us':>17s} {'quant us':>17s} {'bf16 us':>17s} {'floor':>7s}", flush=True)
    for scheme, code in SCHEMES:
        for name, N, Kd in SHAPES:
            w = torch.randn(N, Kd, device="cuda") * 0.02
            wq, ws = qops.quantize_weight(w, code)
            w_deq64 = wq.double() * ws.double()[:, None]
            w_bf16 = w_deq64.to(torch.bfloat16)
            del w
            for m in ms:
                x = torch.randn(m, Kd, device="cuda").to(torch.bfloat16)
                truth = x.double() @ w_deq64.t()
                y = qops.w8a8_linear(x, wq, ws, None)
                err = ((y.double() - truth).norm() / truth.norm()).item()
                path = "wo" if m <= qops.WEIGHT_ONLY_MAX_T else "w8a8"
                t = B.bench(lambda: qops.w8a8_linear(x, wq, ws, None))
                wo = B.bench(forced(1 << 30, lambda: qops.w8a8_linear(x, wq, ws, None))) if m <= 256 else None
                w8 = B.bench(forced(0, lambda: qops.w8a8_linear(x, wq, ws, None)))
                qt = B.bench(lambda: K.quantize_activation(x, code))
                bf = B.bench(lambda: x @ w_bf16.t())
                floor = max(N * Kd / ceil["copy"], 2 * m * N * Kd / ceil[scheme])
                r = dict(scheme=scheme, proj=name, N=N, K=Kd, M=m, path=path, rel_err=err, us=t[0] * 1e3,
                         eager_us=t[1] * 1e3, weight_only_us=wo and wo[0] * 1e3, w8a8_us=w8[0] * 1e3,
                         quant_us=qt[0] * 1e3, bf16_us=bf[0] * 1e3, floor_us=floor * 1e6,
                         x_floor=t[0] * 1e-3 / floor)
                rows.append(r)
                print(f"{scheme:10s} {name:8s} {m:5d} {path:5s} {err:8.1e} {us(t):>17s} {r['x_floor']:7.2f} "
                      f"{us(wo) if wo else '-':>17s} {us(w8):>17s} {us(qt):>17s} {us(bf):>17s} "
                      f"{floor * 1e6:7.1f}", flush=True)
            del wq, ws, w_deq64, w_bf16
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                           triton=triton.__version__, ceilings=ceil,
                           weight_only_max_t=qops.WEIGHT_ONLY_MAX_T, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
