#!/usr/bin/env bash
# Device run AO (one call, up to BUDGET_S seconds (default 570), carrying .whl; any card): the next call after the
# twelfth session. Run AP's H100 grid (B=256, context ~1,100) found smaller programs faster than the default
# (64, 4, 3): fp8 (32, 1, 3) 224.4 us against 233.0, int8 (32, 2, 3) 239.7 against 256.8; before changing the
# default, the same candidates at small batches (decode8_small: B=1 at 1,000 and 4,000 tokens, 16, 64), where
# programs of 1-2 warps may leave the SMs short of warps. On an H200 (whose 8-bit decode run O found bound by its
# instructions): the grid, the candidates, then issue 10's figures (1000 x 1000 fp8, batch-256 step, the GPU
# tests, 1000 x 1000 int8). On any other card: the grid, the candidates, the GPU tests.
# (Run AN's slow card: run AP's card ran the mixed steps' kernels as run AM''s did, 42.9 ms a step against 42.7.)
source benchmarks/device/common.sh
gpu_state; date -u
decode8_grid
decode8_small
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  t1000 fp8-kvfp8 --quantization w8a8-fp8 --kv-cache-dtype fp8 --max-num-seqs 1024
  b256 fp8-kvfp8 --quantization w8a8-fp8 --kv-cache-dtype fp8
  [ $(left) -gt 150 ] && decode_w8a8_tests 120
  t1000 int8-kv8 --quantization w8a8-int8 --kv-cache-dtype int8 --max-num-seqs 1024
else
  [ $(left) -gt 60 ] && decode_w8a8_tests $(( $(left) > 170 ? 150 : $(left) - 20 ))
fi
gpu_state; echo "left: $(left) s"
tar czf $OUT/run_ao.tgz -C $OUT r
