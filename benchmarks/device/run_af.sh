#!/usr/bin/env bash
# Device run AF (one call, up to BUDGET_S seconds (default 570), carrying .whl; any card): the W8A8 input fusion
# (the norms and SiLU-and-mul write their projection's 8-bit codes: one kernel fewer per projection; run AC's
# batch-135 profile on an H100 spent 8% of the step in the separate quantization kernel). Its GPU tests, the
# batch-256 step with and without it (KILN_FUSE_INPUT_QUANT=0) for each 8-bit scheme, where the step goes now, then
# the 1000 x 1000 (w8a8-fp8 + fp8 cache): with the reserve ratio at 1 (run AC's H100: 12,390 out tok/s without the
# fusion) and, on an H200, at 0 and the int8 scheme as time allows.
source benchmarks/device/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date -u
timeout 90 python3 -m pytest -q -p no:cacheprovider -W ignore --tb=short -rf tests/kernels/test_w8a8.py \
  -k "quant_equals or producer or decoder_layers or input_quant" > $R/tests.log 2>&1
grep -E "^FAILED|passed|failed|^E " $R/tests.log | cut -c1-250 | head -12
for f in 1 0; do
  KILN_FUSE_INPUT_QUANT=$f b256 fp8-kvfp8-fuse$f --quantization w8a8-fp8 --kv-cache-dtype fp8
done
for f in 1 0; do
  KILN_FUSE_INPUT_QUANT=$f b256 int8-kv8-fuse$f --quantization w8a8-int8 --kv-cache-dtype int8
done
timeout 100 $L --batch-size 256 --input-len 1000 --output-len 64 --max-num-seqs 256 --iters 1 --warmup-iters 1 \
  --quantization w8a8-fp8 --kv-cache-dtype fp8 --profile $R/prof256.json > $R/prof256.log 2>&1
head -16 $R/prof256.json | cut -c1-60,100-200
t1000 fp8-kvfp8-fused-reserve --quantization w8a8-fp8 --kv-cache-dtype fp8 --max-num-seqs 1024 --kv-reserve-ratio 1
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  t1000 fp8-kvfp8-fused --quantization w8a8-fp8 --kv-cache-dtype fp8 --max-num-seqs 1024
  t1000 int8-kv8-fused-reserve --quantization w8a8-int8 --kv-cache-dtype int8 --max-num-seqs 1024 --kv-reserve-ratio 1
fi
tar czf $OUT/run_af.tgz -C $OUT r
