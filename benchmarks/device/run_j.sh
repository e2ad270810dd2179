#!/usr/bin/env bash
# Device run J (one call, repository root, carrying .whl; ~9 minutes): the most wanted GPU figures of issues 10-12
# in one call, most wanted first (a call cut short keeps what ran), for a session that may get only one machine
# (runs G/H/I hold the rest):
#   issue 12: batch 64 with and without a json_schema on every request (<= 10% more TPOT); kernel tests at every
#   shape; the decode kernel's 8-bit rows; batch 1 per weight format and the
#   W8A16 T <= 16 sweep; the batch-256 step at context ~1,100 (FP8 weights + fp8 cache, bf16); the cold first
#   request with the server's start-up lines.
source benchmarks/device/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; git rev-parse --short HEAD 2>/dev/null; date -u
grammar_b64
b1 bf16; b1 w8a16 --quantization w8a16
first_request
b256 fp8-kvfp8 --quantization w8a8-fp8 --kv-cache-dtype fp8; b256 bf16
kernel_tests
timeout 50 python3 benchmarks/kernels/bench_kernels.py --only decode --json $R/decode.json > $R/decode.log 2>&1
grep -E "measured ceilings|B=256" $R/decode.log | cut -c1-160
b1 fp8 --quantization w8a8-fp8
w8_sweep 80
tar czf $OUT/run_j.tgz -C $OUT r
