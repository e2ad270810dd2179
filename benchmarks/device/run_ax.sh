#!/usr/bin/env bash
# Device run AX (one call, up to BUDGET_S seconds (default 560), carrying .whl; the H100 half of the next call after
# the fifteenth session): the swapped bf16 tile, the default up to 64 rows since run AV, checked end to end. Its GPU
# tests again (run AW's follow-up found fp32 configs out of shared memory; fixed in 948514f and not run on a GPU
# since; and the real decode graphs with a one-token prompt chunk, tests/unit/test_decode_graph_rows.py), gpu_parity.py (transformers, Kiln's PyTorch path and its fast path on the same random weights; its
# skinny_vs_cublas_projections compares the default with cuBLAS at every batch), the bf16 decode step at batch 8
# and 24 three ways (the swapped tile; KILN_SKINNY_SWAP=0, the plain tile, at batch 8 the default before run AV;
# cuBLAS: KILN_SKINNY_MAX_T=0, or 8 at batch 24, the default before run AV there), then issue 11's 8 req/s load with
# an fp8 cache (run AT: TPOT 13.8 / 14.6 ms).
source benchmarks/device/common.sh
BUDGET_S=${BUDGET_S:-560}
gpu_state; date -u
timeout 150 python3 -m pytest -q -p no:cacheprovider -W ignore --tb=short -rf tests/kernels/test_kernels.py \
  tests/unit/test_tile_configs.py tests/unit/test_decode_graph_rows.py -k "skinny or swapped_operands or tile or graph" 2>&1 | grep -E "Error|^FAILED|passed|failed" | head
timeout 150 python3 benchmarks/gpu_parity.py --out $R/parity.json > $R/parity.log 2>&1; tail -1 $R/parity.log | cut -c1-1500
for bs in 8 24; do
  for way in swapped plain cublas; do
    [ $(left) -gt 150 ] || break
    case $way in swapped) e="";; plain) e="KILN_SKINNY_SWAP=0";; cublas) e="KILN_SKINNY_MAX_T=$((bs == 8 ? 0 : 8))";; esac
    env $e timeout 40 $L --batch-size $bs --input-len 1000 --output-len 128 --max-num-seqs $bs \
      --output-json $R/bs${bs}_$way.json > $R/bs${bs}_$way.log 2>&1
    echo "batch $bs, $way ($e): $(j $R/bs${bs}_$way.json decode_ms_per_step output_tok_s) $(grep -m1 -E 'Error' $R/bs${bs}_$way.log)"
  done
done
[ $(left) -gt 130 ] && timeout $(( $(left) - 15 )) bash benchmarks/device/run_serving.sh one rate8_kvfp8 --request-rate 8 \
  --num-prompts 400 --server-env KILN_KV_CACHE_DTYPE=fp8 2>&1 | tail -3
gpu_state; echo "left: $(left) s"
tar czf $OUT/run_ax.tgz -C $OUT r
