"""Time of one `Sampler.sample` per sampling variant: the host's launch time and the device's time (GPU: CUDA
events; CPU: the same wall time), at a real vocabulary (Llama-3's 128,256) and a decode batch.

    PYTHONPATH=. python3 benchmarks/sampler_bench.py [--rows 64 256] [--vocab 128256]
"""
import argparse
import random
import time

import torch

from kiln.engine.request import Request, SamplingParams
from kiln.engine.sampler import Sampler

VARIANTS = {
    "greedy": dict(temperature=0.0, ignore_eos=True),
    "greedy + min_tokens": dict(temperature=0.0, min_tokens=1000),
    "temperature 1": dict(temperature=1.0, ignore_eos=True),
    "temperature 0.95 top_p 0.7 (seed default)": dict(temperature=0.95, top_p=0.7, ignore_eos=True),
    "top_k 50": dict(temperature=1.0, top_k=50, ignore_eos=True),
    "top_k 50 top_p 0.9": dict(temperature=1.0, top_k=50, top_p=0.9, ignore_eos=True),
    "min_p 0.05": dict(temperature=1.0, min_p=0.05, ignore_eos=True),
    "logprobs 5": dict(temperature=0.0, logprobs=5, ignore_eos=True),
}


def bench(rows: int, vocab: int, kw: dict, dev: torch.device, iters: int) -> tuple[float, float]:
    rnd = random.Random(0)
    reqs = [Request(f"r{i}", [rnd.randrange(vocab) for _ in range(16)], SamplingParams(max_tokens=1000, **kw),
                    eos_token_ids=[2]) for i in range(rows)]
    # peaked like a model's logits, so that top_p keeps a realistic handful of tokens
    logits = torch.randn(rows, vocab, device=dev) * 3
    sampler = Sampler()
    sampler.sample(logits, reqs).result()
    host = 0.0
    if dev.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    for _ in range(iters):
        t = time.perf_counter()
        pending = sampler.sample(logits, reqs)
        host += time.perf_counter() - t
    if dev.type == "cuda":
        end.record()
        pending.result()
        device_ms = start.elapsed_time(end) / iters
    else:
        device_ms = (time.perf_counter() - t0) / iters * 1e3
    return host / iters * 1e3, device_ms


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for rows in args.rows:
        for name, kw in VARIANTS.items():
            host, device = bench(rows, args.vocab, kw, dev, args.iters)
            print(f"{dev.type} rows {rows:4d} vocab {args.vocab}: {name:45s} host {host:7.3f} ms  device {device:7.3f} ms")


if __name__ == "__main__":
    main()
