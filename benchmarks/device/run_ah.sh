#!/usr/bin/env bash
# Device run AH (one call, up to BUDGET_S seconds (default 570), carrying .whl; any card): the FP8 GEMM's rows padded
# to a multiple of 128 (run AG's fp8_gemm_rows.py on an H100: cuBLAS picks slower kernels off the multiple) against
# 16 (KILN_FP8_GEMM_ROW_MULTIPLE=16, the old rule) in decode steps of batch 135 and 431 (w8a8-fp8 + fp8 cache), its
# tests, then the 1000 x 1000 (w8a8-fp8 + fp8 cache, auto reserve; run AG: 12,370 out tok/s on an H100).
source benchmarks/device/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date -u
timeout 90 python3 -m pytest -q -p no:cacheprovider -W ignore --tb=line -rf tests/kernels/test_w8a8.py \
  -k "w8a8 or input_quant or decoder_layers" 2>&1 | grep -E "^FAILED|passed|failed" | cut -c1-200 | head -12
# bN NAME BATCH ARGS: a decode step at batch BATCH, context 1000..1200
bN() {
  timeout 80 $L --batch-size $2 --input-len 1000 --output-len 200 --max-num-seqs $2 --iters 1 --warmup-iters 1 \
    --output-json $R/b$2_$1.json "${@:3}" > $R/b$2_$1.log 2>&1
  echo "b$2 $1: $(j $R/b$2_$1.json decode_ms_per_step output_tok_s) $(grep -m1 -E 'Error|error' $R/b$2_$1.log)"
}
for b in 135 431; do
  for p in 16 128; do
    KILN_FP8_GEMM_ROW_MULTIPLE=$p bN fp8-rows$p $b --quantization w8a8-fp8 --kv-cache-dtype fp8
  done
done
t1000 fp8-kvfp8-rows128 --quantization w8a8-fp8 --kv-cache-dtype fp8 --max-num-seqs 1024
tar czf $OUT/run_ah.tgz -C $OUT r
