#!/usr/bin/env bash
# Device run U (one call, carrying .whl): the nucleus search's configs (benchmarks/nucleus_bench.py); the batch-1
# GEMV's default after run T's sweep (8 channels, 256 of K,
# K split in 4): its kernel tests at real shapes (and the nucleus test's fixed tied row), the projections against
# the tile kernel, and the engine's batch 1 with each (KILN_W8_GEMV=0: the tile kernel). Then, on an H200 only,
# issue 10's figures (run O's H200 branch) in the time left of BUDGET_S (default 420).
t0=$(date +%s)
source benchmarks/device/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date -u
timeout 100 python3 -m pytest -q -p no:cacheprovider -W ignore --tb=line tests/kernels/test_kernels.py \
  -k "w8a16 or top_p" 2>&1 | grep -E "^E |Error|passed|failed" | cut -c1-300 | head -8
timeout 100 python3 benchmarks/w8_gemv_bench.py 2>&1 | tail -8
timeout 60 python3 benchmarks/nucleus_bench.py 2>&1 | tail -3
b1 w8a16-gemv --quantization w8a16
(export KILN_W8_GEMV=0; b1 w8a16-tc --quantization w8a16)
b1 fp8 --quantization w8a8-fp8
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  BUDGET_S=$(( ${BUDGET_S:-420} - $(date +%s) + t0 )) bash benchmarks/device/run_o.sh
fi
