"""Offline throughput of a scheduler policy without a GPU: kiln's own Scheduler and KVCacheManager run a
`kiln bench throughput`-like workload (N prompts of random tokens, every request to max_tokens, or ending early at
a random length with an EOS token, max_tokens set apart by --max-tokens) with a step time from a cost model, not
a model:

    step = fixed + per decode row + per prefill token + KV bytes of the decode rows' contexts / read rate

The default coefficients fit run AC (H100, 2026-12-07, w8a8-fp8 + fp8 cache, Llama-3-8B shape, 1000 x 1000,
15,491 blocks of 64, batch <= 1,024): it measured 87.4 s, 241 preemptions, 809 steps with prefill tokens (43.9 s)
and 1,535 decode-only steps (43.2 s) at a mean batch of 431; this model gives 82.7 s, 241 preemptions, 2,343
steps, 40.7 + 42.0 s, a mean batch of 431. The model leaves out the GEMMs' better efficiency at larger M and the
host, so compare policies with it, and confirm on a GPU.

    .venv/bin/python benchmarks/sched_sim.py --reserve-ratio 0 0.5 1 auto

(the fit was with greedy admission, --reserve-ratio 0; the default is auto, as the engine's.)
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kiln.engine.kv_cache import KVCacheManager  # noqa: E402
from kiln.engine.request import Request, SamplingParams  # noqa: E402
from kiln.engine.scheduler import Scheduler  # noqa: E402


EOS = 2


def simulate(num_blocks: int, block_size: int, max_num_seqs: int, budget: int, reserve_ratio: float | None, n: int,
             input_len: int, output_len: int, early_stop: bool, cost: dict, seed: int = 0,
             max_tokens: int | None = None) -> dict:
    max_tokens = max_tokens or output_len
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=False)
    sched = Scheduler(kv, max_num_seqs, budget, input_len + max_tokens + 8, reserve_ratio=reserve_ratio)
    rng = random.Random(seed)
    ends = {}
    for i in range(n):
        r = Request(str(i), [rng.randrange(1, 30000) for _ in range(input_len)],
                    SamplingParams(max_tokens=max_tokens), eos_token_ids=frozenset([EOS]))
        ends[r.request_id] = rng.randrange(1, output_len + 1) if early_stop else output_len
        sched.add(r)
    t = mixed_s = decode_s = 0.0
    steps = decode_steps = decode_rows = 0
    while sched.has_work():
        batch = sched.schedule()
        if not batch:
            raise RuntimeError("a step with nothing to do: the cache cannot hold one request")
        rows = list(zip(batch.requests, batch.num_tokens))
        sampling = [r for r, k in rows if r.num_computed_tokens + k >= r.num_tokens]
        decodes = [r for r, k in rows if k == 1 and r.num_computed_tokens >= r.num_prompt_tokens]
        step = (cost["fixed"] + cost["row"] * len(decodes) + cost["prefill"] * batch.num_prefill_tokens
                + cost["kv_bytes"] * sum(r.num_tokens for r in decodes) / cost["read_rate"])
        t += step
        steps += 1
        if batch.num_prefill_tokens:
            mixed_s += step
        else:
            decode_s += step
            decode_steps += 1
            decode_rows += len(decodes)
        slots = sched.launched(batch, sampling)
        # an EOS at each request's drawn length
        sched.resolve(batch, sampling, slots, [[EOS if len(r.output_token_ids) >= ends[r.request_id] else 5]
                                               for r in sampling])
    out = sum(ends.values())
    return dict(total_s=t, output_tok_s=out / t, preemptions=sched.num_preemptions, steps=steps, mixed_s=mixed_s,
                decode_only_s=decode_s, decode_only_mean_batch=decode_rows / max(decode_steps, 1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-blocks", type=int, default=15491)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--max-num-seqs", type=int, default=1024)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--input-len", type=int, default=1000)
    p.add_argument("--output-len", type=int, default=1000)
    p.add_argument("--early-stop", action="store_true", help="each request ends at a random length <= output-len")
    p.add_argument("--reserve-ratio", nargs="+", default=["auto"], help="numbers 0-1, or auto (the default)")
    p.add_argument("--max-tokens", type=int, default=None, help="each request's max_tokens (default: output-len); "
                   "with --early-stop the lengths are still drawn up to output-len")
    # run AC's H100 fit: 0.3 ms a step, 20 us a decode row and 16 us a prefill token of FP8 matmul, the decode
    # rows' KV (64 KiB a token: 32 layers x 8 heads x 128 x K and V in 8 bits) at 2.4 TB/s
    p.add_argument("--fixed-s", type=float, default=3e-4)
    p.add_argument("--row-s", type=float, default=2.0e-5)
    p.add_argument("--prefill-token-s", type=float, default=1.6e-5)
    p.add_argument("--kv-bytes-per-token", type=float, default=65536)
    p.add_argument("--kv-read-rate", type=float, default=2.4e12)
    a = p.parse_args()
    cost = dict(fixed=a.fixed_s, row=a.row_s, prefill=a.prefill_token_s, kv_bytes=a.kv_bytes_per_token,
                read_rate=a.kv_read_rate)
    for ratio in a.reserve_ratio:
        ratio = None if ratio == "auto" else float(ratio)
        r = simulate(a.num_blocks, a.block_size, a.max_num_seqs, a.max_num_batched_tokens, ratio, a.num_prompts,
                     a.input_len, a.output_len, a.early_stop, cost, max_tokens=a.max_tokens)
        name = "auto" if ratio is None else ratio
        print(f"reserve ratio {name}: {r['total_s']:.1f} s, {r['output_tok_s']:,.0f} out tok/s, "
              f"{r['preemptions']} preemptions, {r['steps']} steps: with prefill {r['mixed_s']:.1f} s, decode-only "
              f"{r['decode_only_s']:.1f} s at a mean batch of {r['decode_only_mean_batch']:.0f}", flush=True)


if __name__ == "__main__":
    main()
