#!/usr/bin/env bash
# Device run V (one call, carrying .whl, ~3 minutes): where batch 1's step goes with W8A16 (the int16 GEMV default)
# and with bf16 (--profile: kernel times of 16 decode steps), and the nucleus tests with the default config that
# now depends on the row count.
source benchmarks/device/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date -u
timeout 60 python3 -m pytest -q -p no:cacheprovider -W ignore --tb=line tests/kernels/test_kernels.py -k top_p 2>&1 \
  | grep -E "^E |Error|passed|failed" | cut -c1-300 | head -4
for q in w8a16 bf16; do
  b1 $q-prof $([ $q = w8a16 ] && echo --quantization w8a16) --iters 1 --profile $R/prof_$q.txt
  head -1 $R/prof_$q.txt | cut -c1-400
  sed -n '2,24p' $R/prof_$q.txt | tr -s ' -' | cut -c1-150
done
