#!/usr/bin/env bash
# Device run AV (one call, up to BUDGET_S seconds (default 330), carrying .whl): run AU's candidate for the bf16 linear
# layers up to 32 rows, the split-K tile with its operands swapped (KILN_SKINNY_SWAP=1 KILN_SKINNY_MAX_T=32; the
# default: the plain tile up to 8 rows, cuBLAS above). First its GPU tests (never run on a GPU yet), then the four
# projections and the LM head at 1, 16 and 32 rows against cuBLAS with each result's error (gemm_rows.py), then
# the engine's bf16 decode step at batch 32, 16 and 1, the default and the candidate.
source benchmarks/device/common.sh
BUDGET_S=${BUDGET_S:-330}
gpu_state; date -u
timeout 90 python3 -m pytest -q -p no:cacheprovider -W ignore --tb=line -rf tests/kernels/test_kernels.py \
  -k "skinny or swapped_operands" 2>&1 | grep -E "^FAILED|passed|failed" | head
KILN_SKINNY_SWAP=1 timeout 75 python3 benchmarks/kernels/gemm_rows.py --rows 1,16,32 --lm-head > $R/gemm_rows.log 2>&1
grep -E "^[0-9]+ \|" $R/gemm_rows.log | cut -c1-160; grep -m3 -E "Error|error" $R/gemm_rows.log
for bs in 32 16 1; do
  for way in default swapped; do
    [ $(left) -gt 35 ] || break
    env $([ $way = swapped ] && echo KILN_SKINNY_MAX_T=32 KILN_SKINNY_SWAP=1) timeout 40 $L --batch-size $bs \
      --input-len $([ $bs = 1 ] && echo 128 || echo 1000) --output-len 128 --max-num-seqs $(( bs < 8 ? 8 : bs )) \
      --output-json $R/bs${bs}_$way.json > $R/bs${bs}_$way.log 2>&1
    echo "batch $bs, $way: $(j $R/bs${bs}_$way.json decode_ms_per_step output_tok_s) $(grep -m1 -E 'Error' $R/bs${bs}_$way.log)"
  done
done
gpu_state; echo "left: $(left) s"
tar czf $OUT/run_av.tgz -C $OUT r
