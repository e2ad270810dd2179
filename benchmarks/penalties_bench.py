"""Host time of the sampler's penalties at a large batch (CPU; the GPU's share is the same scatters):
256 rows of 1,000 prompt + 1,000 output ids, repetition and frequency penalties, a small vocabulary so that the
id handling on the host is what is timed.

    .venv/bin/python benchmarks/penalties_bench.py
"""
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kiln.engine.request import Request, SamplingParams  # noqa: E402
from kiln.engine.sampler import Sampler  # noqa: E402


def main(rows: int = 256, prompt: int = 1000, output: int = 1000, vocab: int = 1000, iters: int = 5) -> float:
    torch.set_num_threads(1)
    rnd = random.Random(0)
    reqs = []
    for i in range(rows):
        r = Request(f"r{i}", [rnd.randrange(vocab) for _ in range(prompt)],
                    SamplingParams(repetition_penalty=1.1, frequency_penalty=0.1))
        r.output_token_ids = [rnd.randrange(vocab) for _ in range(output)]
        reqs.append(r)
    logits = torch.randn(rows, vocab)
    Sampler._apply_penalties(logits.clone(), reqs, vocab)
    t = time.perf_counter()
    for _ in range(iters):
        Sampler._apply_penalties(logits.clone(), reqs, vocab)
    ms = (time.perf_counter() - t) / iters * 1e3
    print(f"_apply_penalties, {rows} rows x ({prompt} prompt + {output} output) ids, vocab {vocab}: {ms:.1f} ms")
    return ms


if __name__ == "__main__":
    main()
