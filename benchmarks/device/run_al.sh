#!/usr/bin/env bash
# Device run AL (one call, up to BUDGET_S seconds (default 570), carrying .whl): run_ak.sh's work, ordered by what a
# card can tell. Every card first runs tests/kernels/test_w8a8.py at every shape (the int8 gate/up epilogue in the
# SwiGLU kernel, fe614db, has never run on a GPU).
# - an H200: issue 10's headline first (1000 x 1000 w8a8-fp8 + fp8 cache with every change since the eighth
#   session: eighth session 12,240), the batch-256 fp8 step (10.86), the 8-bit decode grid (fp8 56% / int8 47% of
#   the copy rate before V was widened), then the int8 step with the input fusion on / off and int8's 1000 x 1000.
# - an H100: the int8 step on / off (run AF: 13.24 / 13.37 ms before fe614db), then the 1000 x 1000 fp8 (run AH:
#   12,740; since then greedy batches take the argmax of bf16 logits).
# - then, time allowing: a profile of 4 mixed steps (w8a8-fp8 + fp8 cache; `bench throughput --profile-steps`).
source benchmarks/device/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date -u
timeout 150 python3 -m pytest -q -p no:cacheprovider -W ignore --tb=line -rf tests/kernels/test_w8a8.py 2>&1 \
  | grep -E "^FAILED|passed|failed" | cut -c1-200 | head -12
int8_ab() {
  for f in 1 0; do
    KILN_FUSE_INPUT_QUANT=$f b256 int8-kv8-fuse$f --quantization w8a8-int8 --kv-cache-dtype int8
  done
}
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  t1000 fp8-kvfp8 --quantization w8a8-fp8 --kv-cache-dtype fp8 --max-num-seqs 1024
  b256 fp8-kvfp8 --quantization w8a8-fp8 --kv-cache-dtype fp8
  timeout 60 python3 benchmarks/kernels/bench_kernels.py --sweep --only decode8 > $R/decode8.log 2>&1
  grep -E "decode8|best" $R/decode8.log | tail -6 | cut -c1-200
  [ $(left) -gt 100 ] && int8_ab
  t1000 int8-kv8 --quantization w8a8-int8 --kv-cache-dtype int8 --max-num-seqs 1024
else
  int8_ab
  t1000 fp8-kvfp8 --quantization w8a8-fp8 --kv-cache-dtype fp8 --max-num-seqs 1024
fi
# where a mixed step's time goes (prefill chunk beside ~400 decode rows): 4 steps from step 250 under the profiler
if [ $(left) -gt 70 ]; then
  timeout $(( $(left) - 10 )) $B throughput --preset $PRESET --num-prompts 600 --input-len 1000 --output-len 200 \
    --quantization w8a8-fp8 --kv-cache-dtype fp8 --max-num-seqs 1024 --profile-steps 250,4 --profile $R/mixed.txt \
    > $R/mixed.log 2>&1
  head -42 $R/mixed.txt | cut -c1-200
fi
echo "left: $(left) s"
tar czf $OUT/run_al.tgz -C $OUT r
