#!/usr/bin/env bash
# Device run AA (one call, ~4 minutes, carrying .whl; any card, an H200 preferred): the fp8 cache's decode products
# on the fp8 tensor cores (FP8_MMA: q and P in E4M3, no K or V code converted; unmeasured): its kernel tests, the
# decode8 grid (B=256, context ~1,100) with and without it, and the batch-256 step with w8a8-fp8 weights and the fp8
# cache, default against KILN_DECODE_FP8_MMA=1. Then w8a8-fp8 + fp8 cache 1000 x 1000 with it, and with a step budget
# of 8,192 tokens, as time allows (t1000 checks what is left).
source benchmarks/device/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date -u
t0=$(date +%s)
left() { echo $((${BUDGET_S:-570} - $(date +%s) + t0)); }
timeout 100 python3 -m pytest -q -p no:cacheprovider -W ignore --tb=line tests/kernels/test_kernels.py \
  -k "8bit_cache_decode or paged_decode" 2>&1 | grep -E "^E |Error|passed|failed" | cut -c1-300 | head -6
timeout 150 python3 benchmarks/kernels/bench_kernels.py --sweep --only decode8 --json $R/decode8.json \
  > $R/decode8.log 2>&1
grep -E "best decode8|cfg=\(128, 4, 2|True\)|failed" $R/decode8.log | cut -c1-160
b256 fp8-kvfp8 --quantization w8a8-fp8 --kv-cache-dtype fp8
(export KILN_DECODE_FP8_MMA=1; b256 fp8-kvfp8-mma --quantization w8a8-fp8 --kv-cache-dtype fp8)
(export KILN_DECODE_FP8_MMA=1; t1000 fp8-kvfp8-mma --quantization w8a8-fp8 --kv-cache-dtype fp8 --max-num-seqs 1024)
# and a larger step budget (default max(2048, batch): 1,024 decodes leave ~1,000 prefill tokens a step)
(export KILN_DECODE_FP8_MMA=1; t1000 fp8-kvfp8-mma-8k --quantization w8a8-fp8 --kv-cache-dtype fp8 --max-num-seqs 1024 \
  --max-num-batched-tokens 8192)
