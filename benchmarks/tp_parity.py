"""Greedy agreement of MP_NUM=N with MP_NUM=1 on one checkpoint (run on a machine with N GPUs).

The same prompts (lengths 1..2047, a batch with chunked prefill) through one engine per MP_NUM, async
scheduling and CUDA graphs as configured by default; prints per prompt how many leading tokens agree. bf16
all-reduces sum in another order than one GPU's matmuls, so long tails may part after a near tie; the first
tokens must agree.

Usage: PYTHONPATH=. python benchmarks/tp_parity.py --model /tmp/m8 --mp-num 2 [--tokens 32] [--out r.json]
"""
from __future__ import annotations

import argparse
import json

import torch


def greedy(model: str, mp_num: int, prompts: list[list[int]], n: int, **kw) -> tuple[list[list[int]], dict]:
    from kiln.engine.config import EngineConfig
    from kiln.engine.core import EngineCore
    from kiln.engine.request import SamplingParams
    core = EngineCore(EngineConfig(model=model, dtype="bfloat16", device="cuda", tensor_parallel_size=mp_num,
                                   gpu_memory_utilization=0.6, max_num_seqs=16, max_num_batched_tokens=2048,
                                   max_model_len=4096, **kw))
    try:
        sp = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        res = core.run_to_completion(prompts, sp)
        info = dict(async_scheduling=core.async_scheduling, overlapped_steps=core.num_overlapped_steps,
                    cuda_graphs=core.runner.graphs is not None, preemptions=core.scheduler.num_preemptions)
        return res, info
    finally:
        core.close()
        del core
        torch.cuda.empty_cache()


def leading_agreement(a: list[int], b: list[int]) -> int:
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="a checkpoint with weights (dummy weights differ per MP_NUM)")
    ap.add_argument("--mp-num", type=int, required=True)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(100, 32000, (n,), generator=g).tolist() for n in (1, 7, 64, 65, 300, 1000, 2047)]
    ref, ref_info = greedy(args.model, 1, prompts, args.tokens)
    res = {"mp_num": args.mp_num, "tokens": args.tokens, "one_gpu": ref_info}
    for name, kw in (("async", {}), ("sync", {"async_scheduling": False})):
        out, info = greedy(args.model, args.mp_num, prompts, args.tokens, **kw)
        agree = [leading_agreement(a, b) for a, b in zip(out, ref)]
        res[name] = dict(info, leading_agreement=agree, first_token_agreement=sum(a > 0 for a in agree) / len(agree))
    print(json.dumps(res))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
