#!/usr/bin/env bash
# Device run T (one call, carrying .whl): run S (the nucleus search's timing, ~40 s); the batch-1 W8A16 projections,
# the tensor-core kernel against CUDA-core GEMV configs (benchmarks/w8_gemv_bench.py), and the engine's batch 1 with
# each (~90 s); then on an H200 only, issue 11's serving targets (run N) in the time left of BUDGET_S (default 560).
t0=$(date +%s)
bash benchmarks/device/run_s.sh
source benchmarks/device/common.sh
timeout 90 python3 -m pytest -q -p no:cacheprovider -W ignore --tb=line tests/kernels/test_kernels.py -k "w8a16" 2>&1 \
  | grep -E "^E |Error|passed|failed" | cut -c1-300 | head -8
timeout 120 python3 benchmarks/w8_gemv_bench.py 2>&1 | tail -15
b1 w8a16-gemv --quantization w8a16
(export KILN_W8_GEMV=0; b1 w8a16-tc --quantization w8a16)
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  BUDGET_S=$(( ${BUDGET_S:-560} - $(date +%s) + t0 )) bash benchmarks/device/run_n.sh
fi
