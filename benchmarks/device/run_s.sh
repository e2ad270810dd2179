#!/usr/bin/env bash
# Device run S (one call, ~40 s, carrying .whl): the nucleus search with per-lane accumulators (run R: 1.32 ms at
# 64 rows, 2.22 ms at 256 rows of 128,256, against torch.sort's 2.84 ms at 256), its test at 128k columns, and the
# sampler per variant.
source benchmarks/device/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date -u
timeout 60 python3 -m pytest -q -p no:cacheprovider -W ignore tests/kernels/test_kernels.py -k top_p 2>&1 | tail -1
timeout 60 python3 benchmarks/nucleus_bench.py --configs 512,8 2>&1 | tail -2
timeout 60 python3 benchmarks/sampler_bench.py 2>&1 | grep -E "greedy  |top_p|top_k" | tail -8
