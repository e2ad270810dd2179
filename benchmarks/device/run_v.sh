#!/usr/bin/env bash
# Device run V (one call, carrying .whl, ~4 minutes): where batch 1's step goes with W8A16 (the int16 GEMV default)
# (--profile: kernel times of 16 decode steps); the E4M3 GEMV (w8a8-fp8 at batch 1): its kernel tests, the four
# projections against the tile kernel, and the engine's batch 1 with and without it; the nucleus tests with the
# default config that now depends on the row count.
source benchmarks/device/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date -u
timeout 100 python3 -m pytest -q -p no:cacheprovider -W ignore --tb=line tests/kernels/test_kernels.py \
  -k "top_p or gemv" 2>&1 | grep -E "^E |Error|passed|failed" | cut -c1-300 | head -6
timeout 60 python3 benchmarks/w8_gemv_bench.py --codes e4m3 --configs tc default gemv:8,256,4,1 gemv:8,512,4,1 \
  gemv:16,256,8,1 2>&1 | cut -c1-200 | tail -6
b1 fp8-gemv --quantization w8a8-fp8
(export KILN_W8_GEMV=0; b1 fp8-tc --quantization w8a8-fp8)
b1 w8a16-prof --quantization w8a16 --iters 1 --profile $R/prof_w8a16.txt
head -1 $R/prof_w8a16.txt | cut -c1-400
sed -n '2,24p' $R/prof_w8a16.txt | tr -s ' -' | cut -c1-150
