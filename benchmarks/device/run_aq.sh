#!/usr/bin/env bash
# Device run AQ (one call, up to BUDGET_S seconds (default 570), carrying .whl; any card): run AO's plan (the
# decode8 grid, the small-batch candidates, then issue 10's figures on an H200 or the GPU tests elsewhere) with,
# after the candidates, the two-stream overlap question (benchmarks/kernels/overlap_bench.py: one half of a decode
# batch's attention beside the other half's FP8 GEMMs, 32 layers in a CUDA graph, batches 324 and 512).
source benchmarks/device/common.sh
gpu_state; date -u
decode8_grid
decode8_small
timeout 180 python3 benchmarks/kernels/overlap_bench.py --batches 324,512 --mixed > $R/overlap.log 2>&1; cat $R/overlap.log | tail -30
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  t1000 fp8-kvfp8 --quantization w8a8-fp8 --kv-cache-dtype fp8 --max-num-seqs 1024
  b256 fp8-kvfp8 --quantization w8a8-fp8 --kv-cache-dtype fp8
  [ $(left) -gt 150 ] && decode_w8a8_tests 120
  t1000 int8-kv8 --quantization w8a8-int8 --kv-cache-dtype int8 --max-num-seqs 1024
else
  [ $(left) -gt 60 ] && decode_w8a8_tests $(( $(left) > 170 ? 150 : $(left) - 20 ))
fi
gpu_state; echo "left: $(left) s"
tar czf $OUT/run_aq.tgz -C $OUT r
