#!/usr/bin/env bash
# Device run AD (2026-12-07, H100, ~3 minutes, carrying .whl): tried a GPU-wide fence in every thread before the
# arrival counters go up, on the guess that runs AB and AC's float32 decode NaN was a partial not yet visible. It
# was not (the tests' 150 s limit cut this run with the same case failing; run AE, benchmarks/device/debug_nan.py,
# found a float32-only fault at 128-token tiles, no merge involved), and the pattern (barrier, then one thread's
# acq_rel atomic) is CUTLASS's semaphore's, correct under PTX's cumulative release: the fence was reverted. The
# decode and GEMV kernel tests, batch 1 w8a16, and on an H200 the 1000 x 1000 w8a8-fp8 + fp8 cache.
source benchmarks/device/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date -u
: ${BUDGET_S:=400}
timeout 150 python3 -m pytest -q -p no:cacheprovider -W ignore --tb=short -rf tests/kernels/test_kernels.py \
  -k "paged_decode or gemv or w8a16 or widen or 8bit" > $R/tests.log 2>&1
grep -E "^FAILED|passed|failed|^E " $R/tests.log | cut -c1-250 | head -12
b1 w8a16 --quantization w8a16
nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && \
  t1000 fp8-kvfp8-wide --quantization w8a8-fp8 --kv-cache-dtype fp8 --max-num-seqs 1024
tar czf $OUT/run_ad.tgz -C $OUT r
