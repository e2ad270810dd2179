"""Which kernel variants a batch-1 latency run (128 in) launches that the engine's warm-up did not (GPU; run M)."""
import random
import sys

from kiln.engine.config import EngineConfig
from kiln.engine.core import EngineCore
from kiln.engine.request import SamplingParams
from kiln.entrypoints.bench import resolve_model
from kiln.kernels._utils import KernelVariants, describe_variant

q = sys.argv[1] if len(sys.argv) > 1 else None
core = EngineCore(EngineConfig(model=resolve_model(None, "llama3-8b"), load_format="dummy", max_num_seqs=8,
                               max_model_len=392, quantization=q, enable_prefix_caching=False, warmup=False))
core.variants.watch_kernels()
core.warmup()
warm = set(core.variants.kernels.keys)
load = KernelVariants().start()
rnd = random.Random(0)
core.add_request("x", [rnd.randrange(100, 30000) for _ in range(128)], SamplingParams(max_tokens=4, temperature=0,
                                                                                    ignore_eos=True))
while core.has_unfinished():
    core.step()
load.stop()
for k in sorted(set(load.keys) - warm):
    same = [w for w in warm if w[0] == k[0]]
    print("NEW", describe_variant(k, min(same, key=lambda w: sum(a != b for a, b in zip(k[1] + k[2], w[1] + w[2])))
                                  if same else None))
print("warm-up w8a16 variants:", *[describe_variant(w) for w in sorted(warm) if w[0] == "_w8a16_kernel"], sep="\n")
