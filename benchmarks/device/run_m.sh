#!/usr/bin/env bash
# Device run M (one call, up to BUDGET_S seconds (default 370), carrying .whl), after run L: start to ready from a real 16 GB checkpoint on an
# empty then a warm compile cache (the front ends no longer import torch; weights read ahead of the GPU copies),
# batch-1 W8A16 (run K: two kernels compiled after ready; their variants are named now), then 1000 x 1000 offline
# in bf16 with an fp8 cache at batch <= 512 (issue 10's "bf16 with an 8-bit cache"), in the time left.
source benchmarks/device/common.sh
nvidia-smi --query-gpu=name --format=csv,noheader; git rev-parse --short HEAD 2>/dev/null; date -u
bash benchmarks/device/run_serving.sh warm 2>&1 | grep -v "^tar"
left() { echo $((${BUDGET_S:-370} - $(date +%s) + t0 - 10)); }
if [ $(left) -gt 50 ]; then
  b1 w8a16 --quantization w8a16
  grep -h "after ready" $R/b1_w8a16.log | cut -c1-900
fi
left=$(left)
echo "time left for 1000 x 1000: ${left}s"
if [ $left -gt 60 ]; then
  timeout $left $B throughput --preset $PRESET --num-prompts 1000 --input-len 1000 --output-len 1000 \
    --kv-cache-dtype fp8 --max-num-seqs 512 --output-json $R/t1000_bf16_kvfp8.json > $R/t1000_bf16_kvfp8.log 2>&1
  echo "1000x1000 bf16 + fp8 KV, batch <= 512: $(j $R/t1000_bf16_kvfp8.json output_tok_s total_s preemptions kv_blocks)"
  grep -h "after ready" $R/t1000_bf16_kvfp8.log | cut -c1-900
fi
tar czf $OUT/run_m.tgz -C $OUT r
