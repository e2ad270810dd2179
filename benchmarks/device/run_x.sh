#!/usr/bin/env bash
# Device run X (one call, carrying .whl, ~1 minute): decode attention at batch 1, partitions and tiles
# (benchmarks/decode_b1_bench.py): run W had it at 7.15 us a layer, the largest of batch 1's small kernels.
source benchmarks/device/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date -u
timeout 120 python3 benchmarks/decode_b1_bench.py 2>&1 | tail -6
