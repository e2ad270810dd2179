"""FP8 GEMM (torch._scaled_mm, row-wise scales) at decode-step row counts, Llama-3-8B's four projections summed:
the rows padded to a multiple of 16 (Kiln's rule before the tenth session), of 64, 128 and 256 (zero rows: cuBLAS
then picks its kernel for the padded M), and the product swapped (W @ x^T, transposed back to [M, N] contiguous).
Run AC's profile (H100) showed cuBLAS's 128-row tiles at 135 rows. GPU time from CUDA graphs
(triton.testing.do_bench_cudagraph).

    PYTHONPATH=. python benchmarks/kernels/fp8_gemm_rows.py [--rows 135,323,...] [--int8]

--int8: the int8 product (torch._int_mm, int32 out) instead, the w8a8-int8 scheme's GEMM before its epilogue.
"""
from __future__ import annotations

import argparse

import torch
import triton.testing

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
ROWS = [64, 135, 192, 256, 323, 384, 431, 512, 700, 1024, 1700, 2048]
FP8 = torch.float8_e4m3fn
PADS = [16, 64, 128, 256]


def ceil(m: int, k: int) -> int:
    return -(-m // k) * k


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default=None)
    ap.add_argument("--swapped", action="store_true")
    ap.add_argument("--int8", action="store_true")
    args = ap.parse_args()
    rows = [int(r) for r in args.rows.split(",")] if args.rows else ROWS
    print(torch.cuda.get_device_name(), torch.__version__)
    print("M | " + " | ".join(f"pad {p} us" for p in PADS) + (" | swapped us" if args.swapped else "")
          + " | best")
    code = torch.int8 if args.int8 else FP8

    def codes(*shape):
        x = torch.randn(*shape, device="cuda")
        return x.mul(40).clamp(-127, 127).to(torch.int8) if args.int8 else (x * 0.05).to(FP8)
    weights = {name: (codes(n, k), torch.rand(n, device="cuda") / 100) for name, (n, k) in SHAPES.items()}
    print("codes:", code)
    for m in rows:
        totals = []
        for pad in PADS + (["swap"] if args.swapped else []):
            mp = ceil(m, 16 if pad == "swap" else pad)
            tot = 0.0
            for name, (n, k) in SHAPES.items():
                w, ws = weights[name]
                x = codes(mp, k)
                xs = torch.rand(mp, 1, device="cuda") / 100
                if args.int8:
                    def fn():
                        return torch._int_mm(x, w.t())[:m]
                elif pad == "swap":
                    def fn():
                        return torch._scaled_mm(w, x.t(), scale_a=ws.reshape(-1, 1), scale_b=xs.reshape(1, -1),
                                                out_dtype=torch.bfloat16).t().contiguous()[:m]
                else:
                    def fn():
                        return torch._scaled_mm(x, w.t(), scale_a=xs, scale_b=ws.reshape(1, -1),
                                                out_dtype=torch.bfloat16)[:m]
                tot += triton.testing.do_bench_cudagraph(fn) * 1e3
            totals.append(tot)
        best = min(range(len(totals)), key=totals.__getitem__)
        names = [f"pad {p}" for p in PADS] + (["swapped"] if args.swapped else [])
        print(f"{m} | " + " | ".join(f"{t:.1f}" for t in totals) + f" | {names[best]}", flush=True)


if __name__ == "__main__":
    main()
