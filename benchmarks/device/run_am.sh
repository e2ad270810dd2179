#!/usr/bin/env bash
# Device run AM (one call, up to BUDGET_S seconds (default 480), carrying .whl; any card, an H200 preferred): the
# 8-bit decode with its tile products swapped (SWAP: K.q^T and V^T.P^T, the GQA group as N padded to 8; sm_90 SASS
# of the decode8 tile: fp8 936 -> 706 instructions a thread, int8 1,299 -> 983) on a GPU for the first time,
# and the int8 gate/up epilogue in the SwiGLU kernel (fe614db, never run on a GPU).
# 1. GPU tests: the decode kernels (swapped, widened, plain) and tests/kernels/test_w8a8.py.
# 2. the decode8 grid (B=256, context 1,001-1,199): default, old default, swapped configs.
# 3. batch-256 steps with KILN_DECODE_SWAP=0/1: w8a8-fp8 + fp8 cache, w8a8-int8 + int8 cache.
# 4. time allowing, the 1000 x 1000 w8a8-fp8 + fp8 cache with the swap (run AH, H100: 12,740; H200 eighth session
#    12,240 before every change since).
BUDGET_S=${BUDGET_S:-480}
source benchmarks/device/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date -u
decode_w8a8_tests
decode8_grid
for s in 0 1; do
  KILN_DECODE_SWAP=$s b256 fp8-kvfp8-swap$s --quantization w8a8-fp8 --kv-cache-dtype fp8
done
for s in 0 1; do
  KILN_DECODE_SWAP=$s b256 int8-kv8-swap$s --quantization w8a8-int8 --kv-cache-dtype int8
done
echo "left: $(left) s"
KILN_DECODE_SWAP=1 t1000 fp8-kvfp8-swap1 --quantization w8a8-fp8 --kv-cache-dtype fp8 --max-num-seqs 1024
echo "left: $(left) s"
tar czf $OUT/run_am.tgz -C $OUT r
