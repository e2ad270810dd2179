#!/usr/bin/env bash
# Device run C (carrying .whl, now with opentelemetry-api): serving, and repeats of run B's 256-request figure and
# batch 1 (with a profile) for their spread.
source benchmarks/device/common.sh
start_server $R/serve.log; serve_c64 serve; stop_server
grep -E "KV cache|captured|warm" $R/serve.log | cut -c1-400
for i in 1 2; do
  timeout 60 $B throughput --preset llama3-8b --num-prompts 256 --input-len 512 --output-len 256 \
    --output-json $R/t256_$i.json > $R/t256_$i.log 2>&1
  echo "256x512/256 #$i: $(j $R/t256_$i.json output_tok_s total_s)"
done
timeout 60 $L --batch-size 1 --input-len 128 --output-len 256 --max-num-seqs 8 --output-json $R/b1.json \
  --profile $R/prof_b1.txt > $R/b1.log 2>&1
echo "b1: $(j $R/b1.json output_tok_s decode_ms_per_step)"; head -1 $R/prof_b1.txt
tar czf $OUT/run_c.tgz -C $OUT r
