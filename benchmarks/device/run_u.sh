#!/usr/bin/env bash
# Device run U (one call, carrying .whl, ~3 minutes): the batch-1 GEMV's default after run T's sweep (8 channels,
# 256 of K, K split in 4): its kernel tests at real shapes and the nucleus tests (the tied row fixed, the search's
# new starting bound), the nucleus search's configs (benchmarks/nucleus_bench.py), and the engine's batch 1 with
# the GEMV and with the tile kernel (KILN_W8_GEMV=0).
source benchmarks/device/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date -u
timeout 100 python3 -m pytest -q -p no:cacheprovider -W ignore --tb=line tests/kernels/test_kernels.py \
  -k "w8a16 or top_p" 2>&1 | grep -E "^E |Error|passed|failed" | cut -c1-300 | head -8
timeout 60 python3 benchmarks/nucleus_bench.py 2>&1 | tail -3
b1 w8a16-gemv --quantization w8a16
(export KILN_W8_GEMV=0; b1 w8a16-tc --quantization w8a16)
