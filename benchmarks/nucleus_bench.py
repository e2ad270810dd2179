"""The nucleus search (kiln.kernels.top_p_threshold) per config against torch.sort, at 64 and 256 rows of
Llama-3's 128,256-column vocabulary (GPU): each config's cuts checked against the default's first.

    python benchmarks/nucleus_bench.py [--configs 512,8 2048,8 ...]   (BLOCK,num_warps)
"""
from __future__ import annotations

import argparse

import torch

from kiln.kernels import top_p_threshold


def ms(f, n=20):
    f(); torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(n):
        f()
    e.record(); torch.cuda.synchronize()
    return s.elapsed_time(e) / n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="*", default=["512,8", "1024,8", "2048,8", "1024,4", "2048,16"])
    args = ap.parse_args()
    for b in (64, 256):
        x = torch.randn(b, 128256, device="cuda") * 3
        p, f = torch.full((b,), 0.7, device="cuda"), torch.full((b,), float("-inf"), device="cuda")
        want = top_p_threshold(x, p, f)
        line = f"{b} rows: torch.sort {ms(lambda: x.sort(dim=-1, descending=True)):.3f} ms;"
        for c in args.configs:
            cfg = tuple(int(v) for v in c.split(","))
            try:
                same = torch.equal(top_p_threshold(x, p, f, config=cfg), want)
                line += f" {c} {ms(lambda: top_p_threshold(x, p, f, config=cfg)):.3f} ms{'' if same else ' (DIFFERENT CUTS)'};"
            except Exception as ex:
                line += f" {c} failed ({type(ex).__name__}: {str(ex)[:80]});"
        print(line, flush=True)


if __name__ == "__main__":
    main()
