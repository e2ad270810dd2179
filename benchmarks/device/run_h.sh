#!/usr/bin/env bash
# Device run H (one call, repository root, carrying .whl; right after run G on the same machine): issue 10's
# offline 1000 x (1000 in / 1000 out) with FP8 weights and an fp8 cache (batch up to 512), then issue 11's cold
# serving again, now with the server's own log kept (CompileWatch names any kernel compiled after ready). NOT RUN yet
# (2026-12-05: no device time left).
source benchmarks/device/common.sh
nvidia-smi --query-gpu=name --format=csv,noheader; git rev-parse --short HEAD 2>/dev/null
timeout 170 $B throughput --preset $PRESET --num-prompts 1000 --input-len 1000 --output-len 1000 \
  --quantization w8a8-fp8 --kv-cache-dtype fp8 --max-num-seqs 512 --output-json $R/t1000_fp8.json > $R/t1000_fp8.log 2>&1
echo "1000x1000 w8a8-fp8 + fp8 KV, batch <= 512: $(j $R/t1000_fp8.json output_tok_s total_s preemptions kv_blocks)"
grep -m2 -E "KV cache:|Error" $R/t1000_fp8.log | cut -c1-300
COLD_TIMEOUT=${COLD_TIMEOUT:-130} bash benchmarks/device/run_serving.sh cold 2>&1 | grep -v "^tar"
grep -h "after ready" $R/*.server.log | sed 's/.*after ready//' | cut -c1-260 | sort | uniq -c | sort -rn | head -12
grep -h -m1 "warm-up:" $R/first.json.server.log | cut -c1-400
tar czf $OUT/run_h.tgz -C $OUT r
