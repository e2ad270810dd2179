#!/usr/bin/env bash
# Device run G (one call, repository root, carrying .whl; ~8 minutes): the quantized path's and issue 12's GPU
# figures, most wanted first. Written 2026-12-05; NOT RUN: that session's device time went on failed machine starts.
#   1. issue 12: batch 64 with and without a json_schema on every request (target: <= 10% more TPOT)
#   2. tests/kernels at every shape (the W8A8 kernels, the 8-bit KV attention after the fp16 tile-product change,
#      the variant-key tests against the real JIT cache)
#   3. the decode kernel at bench shapes (the 8-bit rows: were 1.47-1.51x their floor on an H100 before the fp16
#      change), and the W8A8 GEMMs against their floors (picks KILN_W8A8_WEIGHT_ONLY_MAX_T)
#   4. issue 10's engine figures at batch 1 per weight format; W8A16 at T <= 16 with the FP16_CODES conversion and
#      more K splits (bench sweep), and batch 1 with FP16_CODES on
# The batch-256 step and the cold first request moved to run_h.sh (one call must stay under 10 minutes).
source benchmarks/device/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; git rev-parse --short HEAD 2>/dev/null
grammar_b64
kernel_tests
timeout 60 python3 benchmarks/kernels/bench_kernels.py --only decode --json $R/decode.json > $R/decode.log 2>&1
grep -E "measured ceilings|B=256|B=64" $R/decode.log | cut -c1-160
timeout 90 python3 benchmarks/gpu_w8a8_check.py --m 1,16,64,256 --json $R/w8a8.json > $R/w8a8.log 2>&1; tail -36 $R/w8a8.log
b1 bf16; b1 w8a16 --quantization w8a16; b1 fp8 --quantization w8a8-fp8; b1 int8 --quantization w8a8-int8
KILN_W8A16_FP16_CODES=1 b1 w8a16-fp16codes --quantization w8a16
w8_sweep
tar czf $OUT/run_g.tgz -C $OUT r
