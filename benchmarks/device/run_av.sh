#!/usr/bin/env bash
# Device run AV (one call, up to BUDGET_S seconds (default 330), carrying .whl): the swapped split-K tile as the bf16
# linear layers' kernel up to 64 rows (KILN_SKINNY_MAX_T=64, KILN_SKINNY_SWAP=1; before: the plain tile up to 8 rows,
# cuBLAS above). The four projections and the LM head at 1-64 rows against cuBLAS (bf16_gemm_rows.py, the new
# heuristic), then the engine's decode step at batch 1, 16 and 48 (bf16) both ways, then the kernels' GPU tests.
source benchmarks/device/common.sh
BUDGET_S=${BUDGET_S:-330}
gpu_state; date -u
timeout 75 python3 benchmarks/kernels/bf16_gemm_rows.py --rows 1,16,48 --lm-head > $R/gemm_rows.log 2>&1
grep -E "^[0-9]+ \|" $R/gemm_rows.log | cut -c1-160; grep -m3 -E "Error|error" $R/gemm_rows.log
for bs in 48 16 1; do
  for way in old new; do
    [ $(left) -gt 35 ] || break
    env $([ $way = old ] && echo KILN_SKINNY_MAX_T=8 KILN_SKINNY_SWAP=0) timeout 40 $L --batch-size $bs \
      --input-len $([ $bs = 1 ] && echo 128 || echo 1000) --output-len 128 --max-num-seqs $(( bs < 8 ? 8 : bs )) \
      --output-json $R/bs${bs}_$way.json > $R/bs${bs}_$way.log 2>&1
    echo "batch $bs, $way: $(j $R/bs${bs}_$way.json decode_ms_per_step output_tok_s) $(grep -m1 -E 'Error' $R/bs${bs}_$way.log)"
  done
done
[ $(left) -gt 40 ] && timeout $(( $(left) - 10 )) python3 -m pytest -q -p no:cacheprovider -W ignore --tb=line -rf \
  tests/kernels/test_kernels.py -k "skinny or swapped_operands or w8a16_matmul" 2>&1 | grep -E "^FAILED|passed|failed" | head
gpu_state; echo "left: $(left) s"
tar czf $OUT/run_av.tgz -C $OUT r
