#!/usr/bin/env bash
# Device run S (one call, ~40 s, carrying .whl): the nucleus search with per-lane accumulators (run R: 1.32 ms at
# 64 rows, 2.22 ms at 256 rows of 128,256, against torch.sort's 2.84 ms at 256), its test at 128k columns, and the
# sampler per variant.
source benchmarks/device/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date -u
timeout 60 python3 -m pytest -q -p no:cacheprovider -W ignore tests/kernels/test_kernels.py -k top_p 2>&1 | tail -1
timeout 60 python3 - <<'PY'
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
for b in (64, 256):
    x = torch.randn(b, 128256, device="cuda") * 3
    p, f = torch.full((b,), 0.7, device="cuda"), torch.full((b,), float("-inf"), device="cuda")
    print(f"{b} rows: nucleus search {ms(lambda: top_p_threshold(x, p, f)):.3f} ms, torch.sort "
          f"{ms(lambda: x.sort(dim=-1, descending=True)):.3f} ms, topk(50) {ms(lambda: x.topk(50, dim=-1)):.3f} ms")
PY
timeout 60 python3 benchmarks/sampler_bench.py 2>&1 | grep -E "greedy  |top_p|top_k" | tail -8
