#!/usr/bin/env bash
# Device run AD (one call, ~3-5 minutes, carrying .whl; any card): the arrival counters' fence (every thread's
# partial results released GPU-wide before the count goes up: runs AB and AC failed one float32 decode case with a
# NaN head merged from a partial not yet visible). The decode and GEMV kernel tests, batch 1 w8a16 (the split-K
# GEMV's merge takes the fence), and on an H200 the 1000 x 1000 w8a8-fp8 + fp8 cache with V widened as loaded.
source benchmarks/device/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date -u
t0=$(date +%s)
left() { echo $((${BUDGET_S:-400} - $(date +%s) + t0)); }
timeout 150 python3 -m pytest -q -p no:cacheprovider -W ignore --tb=short -rf tests/kernels/test_kernels.py \
  -k "paged_decode or gemv or w8a16 or widen or 8bit" > $R/tests.log 2>&1
grep -E "^FAILED|passed|failed|^E " $R/tests.log | cut -c1-250 | head -12
b1 w8a16 --quantization w8a16
nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && \
  t1000 fp8-kvfp8-wide --quantization w8a8-fp8 --kv-cache-dtype fp8 --max-num-seqs 1024
tar czf $OUT/run_ad.tgz -C $OUT r
