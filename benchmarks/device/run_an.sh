#!/usr/bin/env bash
# Device run AN (one call, up to BUDGET_S seconds (default 570), carrying .whl; for an H200 (see below for any
# other card): issue 10's H200 figures with every change since the eighth session
# (the last H200 run), the eleventh session's 8-bit decode above all (swapped tile products, sums reduced after the
# loop, offsets computed once: sm_90 fp8 936 -> 625 instructions a tile; on the H200 run O found the kernel bound
# by its instructions: fp8 at 56% of the copy rate, int8 47%).
# 1. GPU tests of the decode kernels and W8A8 (the address change after run AM has not run on a GPU).
# 2. the decode8 grid (B=256, context ~1,100): against 4.25 TB/s, the 85%.
# On any other card (an H100): after 1 and 2, the batch-256 fp8 and int8 steps and the 1000 x 1000 fp8 against
# run AM (10.89 / 13.32 ms, 13,060 tok/s), which predates the kernel's last three changes.
# 3. the 1000 x 1000 w8a8-fp8 + fp8 cache (eighth session on an H200: 12,240; target 18,000), the batch-256 fp8
#    step (10.86; target 11.5), the 1000 x 1000 w8a8-int8 + int8 cache, batch 1 w8a16 (345.5 with the int8 head).
source benchmarks/device/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date -u
decode_w8a8_tests
decode8_grid
if ! nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  b256 fp8-kvfp8 --quantization w8a8-fp8 --kv-cache-dtype fp8
  b256 int8-kv8 --quantization w8a8-int8 --kv-cache-dtype int8
  t1000 fp8-kvfp8 --quantization w8a8-fp8 --kv-cache-dtype fp8 --max-num-seqs 1024
  echo "left: $(left) s"; tar czf $OUT/run_an.tgz -C $OUT r; exit 0
fi
t1000 fp8-kvfp8 --quantization w8a8-fp8 --kv-cache-dtype fp8 --max-num-seqs 1024
b256 fp8-kvfp8 --quantization w8a8-fp8 --kv-cache-dtype fp8
t1000 int8-kv8 --quantization w8a8-int8 --kv-cache-dtype int8 --max-num-seqs 1024
[ $(left) -gt 60 ] && b1 w8a16-head --quantization w8a16 --quantize-lm-head
echo "left: $(left) s"
tar czf $OUT/run_an.tgz -C $OUT r
