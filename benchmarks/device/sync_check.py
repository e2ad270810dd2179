"""Which host<->device synchronizations a steady engine step makes, per sampling variant (GPU).

An async step must not wait for the GPU except at its one planned wait (the previous step's ids, an event). Any
other sync (a copy from pageable memory, .item(), nonzero, ...) makes the host wait for the forward in flight, and
its host work then adds to the step time. torch.cuda.set_sync_debug_mode("warn") names each such op; this runs a
few steady decode steps of each variant under it and prints where they came from.

    PYTHONPATH=. python3 benchmarks/device/sync_check.py [PRESET]   (default tiny; any preset, dummy weights)
"""
import random
import sys
import warnings
from collections import Counter

import torch

from kiln.engine.config import EngineConfig
from kiln.engine.core import EngineCore
from kiln.engine.request import SamplingParams
from kiln.entrypoints.bench import resolve_model

preset = sys.argv[1] if len(sys.argv) > 1 else "tiny"
VARIANTS = {
    "greedy ignore_eos (OpenAI bench)": dict(temperature=0.0, ignore_eos=True),
    "greedy min_tokens (native/gRPC bench)": dict(temperature=0.0, min_tokens=64),
    "seed default: temperature 0.95 top_p 0.7": dict(temperature=0.95, top_p=0.7, ignore_eos=True),
    "top_k 20": dict(temperature=1.0, top_k=20, ignore_eos=True),
    "min_p 0.1": dict(temperature=1.0, min_p=0.1, ignore_eos=True),
    "seeded": dict(temperature=1.0, seed=7, ignore_eos=True),
    "logprobs 5": dict(temperature=0.0, logprobs=5, ignore_eos=True),
    "penalties (steps synchronously by design)": dict(temperature=1.0, repetition_penalty=1.1,
                                                      frequency_penalty=0.2, ignore_eos=True),
}

cuda = torch.cuda.is_available()  # on CPU: a smoke run of the script itself (nothing syncs there)
core = EngineCore(EngineConfig(model=resolve_model(None, preset), load_format="dummy", max_num_seqs=16,
                               max_model_len=512, enable_prefix_caching=False, async_scheduling=True))
vocab = min(core.runner.model_config.vocab_size, 32000)
rnd = random.Random(0)
print(f"preset {preset}, async {core.async_scheduling}, device {core.runner.device}")
for name, kw in VARIANTS.items():
    for i in range(8):
        core.add_request(f"{name}-{i}", [rnd.randrange(10, vocab) for _ in range(100)],
                         SamplingParams(max_tokens=100, **kw))
    for _ in range(6):  # past the prefills, into steady decode
        core.step()
    if cuda:
        torch.cuda.synchronize()
    hits = Counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        for _ in range(5):
            core.step()
        if cuda:
            torch.cuda.set_sync_debug_mode(0)
    for w in caught:
        if "synchronizing CUDA operation" in str(w.message):
            hits[f"{w.filename.split('kiln/')[-1]}:{w.lineno} {str(w.message)[:70]}"] += 1
    print(f"{name}: {sum(hits.values())} syncs in 5 steps" + "".join(f"\n    {n} x {k}" for k, n in hits.items()))
    while core.has_unfinished():
        core.step()
