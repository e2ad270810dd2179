"""FP8 GEMM (torch._scaled_mm, row-wise scales) at decode-step row counts: the layer's product as it is now
(x [M, K] @ W^T) against the swapped one (W @ x^T, then transposed back to [M, N] contiguous): cuBLAS picks 128-row
tiles for M, which wastes most of the last tile at M just above a multiple of 128 (run AC's profile, H100: 135
rows took 256 rows of work). Llama-3-8B's four projections; GPU time from CUDA graphs (triton's do_bench_cudagraph).

    PYTHONPATH=. python benchmarks/kernels/fp8_swap_ab.py
"""
from __future__ import annotations

import torch
import triton.testing

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
ROWS = [32, 64, 96, 135, 192, 256, 323, 431, 512, 1024]
FP8 = torch.float8_e4m3fn


def main() -> None:
    print(torch.cuda.get_device_name(), torch.__version__)
    print("M | " + " | ".join(f"{k} now / swapped us" for k in SHAPES) + " | sum now / swapped us")
    for m in ROWS:
        cells, tot_a, tot_b = [], 0.0, 0.0
        for name, (n, k) in SHAPES.items():
            w = (torch.randn(n, k, device="cuda") * 0.05).to(FP8)
            ws = torch.rand(n, device="cuda") / 100
            mp = -(-m // 16) * 16  # Kiln pads the codes to a multiple of 16 rows (cuBLAS's FP8 wants it)
            x = torch.randn(mp, k, device="cuda").to(FP8)
            xs = torch.rand(mp, 1, device="cuda") / 100

            def now():
                return torch._scaled_mm(x, w.t(), scale_a=xs, scale_b=ws.reshape(1, -1), out_dtype=torch.bfloat16)

            def swapped():
                yt = torch._scaled_mm(w, x.t(), scale_a=ws.reshape(-1, 1), scale_b=xs.reshape(1, -1),
                                      out_dtype=torch.bfloat16)
                return yt.t().contiguous()
            ref = now().float()
            err = ((swapped().float() - ref).norm() / ref.norm()).item()
            assert err < 1e-2, (name, m, err)
            a = triton.testing.do_bench_cudagraph(now) * 1e3
            b = triton.testing.do_bench_cudagraph(swapped) * 1e3
            tot_a += a
            tot_b += b
            cells.append(f"{a:.1f} / {b:.1f}")
        print(f"{m} | " + " | ".join(cells) + f" | {tot_a:.1f} / {tot_b:.1f} ({(tot_b / tot_a - 1) * 100:+.0f}%)",
              flush=True)


if __name__ == "__main__":
    main()
