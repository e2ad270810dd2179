#!/usr/bin/env bash
# Device run AC (one call, up to BUDGET_S seconds (default 570), carrying .whl; an H200 preferred, any card): the
# decode kernel's new default for 8-bit caches (V widened as loaded, (128, 4, 3), run AB's grid best on an H100) in
# its tests (~20 s; run AC ran every decode case: a float32 fault at 128-token tiles, fixed), the batch-256 step with each 8-bit
# cache, then issue 10's 1000 x 1000: w8a8-fp8 + fp8 cache (the decode graphs now share one logits buffer: run AB's
# 1,024-sequence run ran out of memory capturing them on an H100), w8a8-int8 + int8 cache; then, on an H200 with
# the time left, issue 11's 1,000 requests at once (bf16).
source benchmarks/device/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date -u
timeout 60 python3 -m pytest -q -p no:cacheprovider -W ignore --tb=short -rf tests/kernels/test_kernels.py \
  -k "8bit or int8_cache or widen" > $R/tests.log 2>&1
grep -E "^FAILED|passed|failed|^E " $R/tests.log | cut -c1-250 | head -12
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  b256 fp8-kvfp8-wide --quantization w8a8-fp8 --kv-cache-dtype fp8
  b256 int8-kv8-wide --quantization w8a8-int8 --kv-cache-dtype int8
  t1000 fp8-kvfp8-wide --quantization w8a8-fp8 --kv-cache-dtype fp8 --max-num-seqs 1024
  t1000 int8-kv8-wide --quantization w8a8-int8 --kv-cache-dtype int8 --max-num-seqs 1024
else  # an H100 measured the above on this tree in the ninth session (runs AB/AC)
  # admission that reserves the running requests' future blocks: benchmarks/sched_sim.py predicts -6%, no preemption
  t1000 fp8-kvfp8-reserve --quantization w8a8-fp8 --kv-cache-dtype fp8 --max-num-seqs 1024 --kv-reserve-ratio 1
  # where a decode step of batch 512 goes (the 1000 x 1000's decode-only steps run at a mean batch of ~430)
  timeout 120 $L --batch-size 512 --input-len 1000 --output-len 64 --max-num-seqs 512 --iters 1 --warmup-iters 1 \
    --quantization w8a8-fp8 --kv-cache-dtype fp8 --profile $R/prof512.json > $R/prof512.log 2>&1
  grep -v "^\[" $R/prof512.log | tail -45 | cut -c1-200
fi
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && [ $(left) -gt 230 ]; then
  COLD_TIMEOUT=$(( $(left) - 10 )) bash benchmarks/device/run_serving.sh burst 2>&1 | grep -v "^tar"
fi
tar czf $OUT/run_ac.tgz -C $OUT r
