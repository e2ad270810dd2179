#!/usr/bin/env bash
# Device run L (one call, ~9 minutes, carrying .whl): issue 11's cold serving loads at 4 and 8 req/s (each from a
# freshly started server on an empty compile cache, `kiln bench serve --cold`), 1000 x 1000 offline in bf16, then
# start to ready from a real 16 GB checkpoint, on an empty and then a warm compile cache (issue 11: <= 12 s warm).
source benchmarks/device/common.sh
nvidia-smi --query-gpu=name --format=csv,noheader; git rev-parse --short HEAD 2>/dev/null
export KILN_LOAD_FORMAT=dummy BATCH_SIZE=256 MAX_SEQ_LEN=2048 MAX_DEC_LEN=1024
COLD_TIMEOUT=${COLD_TIMEOUT:-230} bash benchmarks/device/run_serving.sh rates 2>&1 | grep -v "^tar"
grep -h "after ready" $R/*.server.log | sed 's/.*after ready//' | cut -c1-260 | sort | uniq -c | sort -rn | head -12
timeout 100 $B throughput --preset $PRESET --num-prompts 1000 --input-len 1000 --output-len 1000 \
  --max-num-seqs 256 --output-json $R/t1000_bf16.json > $R/t1000_bf16.log 2>&1
echo "1000x1000 bf16: $(j $R/t1000_bf16.json output_tok_s total_s preemptions kv_blocks)"
bash benchmarks/device/run_serving.sh warm 2>&1 | grep -v "^tar"  # it drops KILN_LOAD_FORMAT itself
tar czf $OUT/run_l.tgz -C $OUT r
