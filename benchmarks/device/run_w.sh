#!/usr/bin/env bash
# Device run W (one call, carrying .whl, ~2 minutes): batch 1's kernels without programmatic dependent launch
# (KILN_PDL=0: each kernel's own time, not its wait for the one before), with their trace (gaps between kernels),
# w8a16 and bf16; the GEMV tests (E4M3's with the shuffled codes).
source benchmarks/device/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date -u
timeout 100 python3 -m pytest -q -p no:cacheprovider -W ignore --tb=line tests/kernels/test_kernels.py \
  -k "gemv" 2>&1 | grep -E "^E |Error|passed|failed" | cut -c1-300 | head -6
for q in w8a16 bf16; do
  for pdl in 1 0; do
    KILN_PDL=$pdl b1 $q-pdl$pdl $([ $q = w8a16 ] && echo --quantization w8a16) --iters 1 --profile $R/prof_$q-pdl$pdl.txt
    head -1 $R/prof_$q-pdl$pdl.txt | cut -c1-300
  done
done
sed -n '4,14p' $R/prof_w8a16-pdl0.txt | tr -s ' -' | cut -c1-150
