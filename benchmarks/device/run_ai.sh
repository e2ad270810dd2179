#!/usr/bin/env bash
# Device run AI (one call, up to BUDGET_S seconds (default 570), carrying .whl; any card): the int8 GEMM
# (torch._int_mm) at decode row counts padded to 16/64/128/256 (run AG' found cuBLAS's FP8 kernels faster padded to
# 128), then where a decode step of batch 323 goes (the 1000 x 1000's mean decode batch on an H100; w8a8-fp8 + fp8
# cache, the FP8 rows padded to 128).
source benchmarks/device/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date -u
timeout 100 python3 benchmarks/kernels/fp8_gemm_rows.py --int8 --rows 64,135,192,323,431,700,1024,2048 2>&1 | tail -10
timeout 150 $L --batch-size 323 --input-len 1000 --output-len 400 --max-num-seqs 323 --iters 1 --warmup-iters 1 \
  --quantization w8a8-fp8 --kv-cache-dtype fp8 --profile $R/prof323.json > $R/prof323.log 2>&1
head -18 $R/prof323.json | cut -c1-60,100-200
tar czf $OUT/run_ai.tgz -C $OUT r
