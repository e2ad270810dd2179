#!/usr/bin/env bash
# Device run AO (one call, up to BUDGET_S seconds (default 570), carrying .whl; any card): why run AN's H100
# (2026-12-07 13:11 UTC, tree 21b1ccd) ran the GEMM-bound steps ~40% slower than run AM's (mixed steps of the
# 1000 x 1000 26.8 -> 36.7 s, batch-256 prefill 4.93 -> 7.12 s) with its CUDA-graph decode steps unchanged
# (10.89 / 10.86 ms), and its GPU tests printed no summary. The card's clocks and power; run AM''s mixed-step
# profile again (per kernel: GEMMs 177 us a call, decode attention 337, prefill attention 94; 42.7 ms a step);
# the decode8 grid (now with 64-token tiles over 2 warps), the 1000 x 1000 (fp8 at 64-token tiles since run AN),
# the GPU tests with their log kept. On an H200: run AN's H200 figures first (the decode8 grid,
# the 1000 x 1000 fp8, the batch-256 step), then the tests and the int8 1000 x 1000.
source benchmarks/device/common.sh
gpu_state; date -u
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  decode8_grid
  t1000 fp8-kvfp8 --quantization w8a8-fp8 --kv-cache-dtype fp8 --max-num-seqs 1024
  b256 fp8-kvfp8 --quantization w8a8-fp8 --kv-cache-dtype fp8
  [ $(left) -gt 150 ] && decode_w8a8_tests 120
  t1000 int8-kv8 --quantization w8a8-int8 --kv-cache-dtype int8 --max-num-seqs 1024
else
  mixed_profile mixed-fp8 --quantization w8a8-fp8 --kv-cache-dtype fp8
  gpu_state
  decode8_grid
  t1000 fp8-kvfp8 --quantization w8a8-fp8 --kv-cache-dtype fp8 --max-num-seqs 1024
  [ $(left) -gt 60 ] && decode_w8a8_tests $(( $(left) > 170 ? 150 : $(left) - 20 ))
fi
gpu_state; echo "left: $(left) s"
tar czf $OUT/run_ao.tgz -C $OUT r
