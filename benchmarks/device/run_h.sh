#!/usr/bin/env bash
# Device run H (one call, repository root, carrying .whl; right after run G on the same machine): issue 10's
# batch-256 decode step at context ~1,100 per cache, and the offline 1000 x (1000 in / 1000 out) with FP8 weights
# and an fp8 cache (batch up to 512); then issue 11's cold first request after ready (1000 in / 16 out) with the
# server's log (CompileWatch names any kernel compiled after ready). The loads at 4 and 8 req/s: run_i.sh.
source benchmarks/device/common.sh
nvidia-smi --query-gpu=name --format=csv,noheader; git rev-parse --short HEAD 2>/dev/null
b256 fp8-kvfp8 --quantization w8a8-fp8 --kv-cache-dtype fp8; b256 bf16; b256 kv8 --kv-cache-dtype int8
timeout 170 $B throughput --preset $PRESET --num-prompts 1000 --input-len 1000 --output-len 1000 \
  --quantization w8a8-fp8 --kv-cache-dtype fp8 --max-num-seqs 512 --output-json $R/t1000_fp8.json > $R/t1000_fp8.log 2>&1
echo "1000x1000 w8a8-fp8 + fp8 KV, batch <= 512: $(j $R/t1000_fp8.json output_tok_s total_s preemptions kv_blocks)"
grep -m2 -E "KV cache:|Error" $R/t1000_fp8.log | cut -c1-300
first_request
tar czf $OUT/run_h.tgz -C $OUT r
