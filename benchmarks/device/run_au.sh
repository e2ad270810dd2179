#!/usr/bin/env bash
# Device run AU (one call, up to BUDGET_S seconds (default 570), carrying .whl): bf16 projections at decode batches
# of 8-128 rows, where issue 11's served loads run (4 req/s: ~40 decoding sequences; 8 req/s: ~140) and a bf16 layer
# is mostly a read of its weight. cuBLAS (the linear layers above KILN_SKINNY_MAX_T=8 rows) against the split-K tile
# kernel at its heuristic and a sweep (benchmarks/kernels/gemm_rows.py; H200, 2026-12-02: cuBLAS streamed qkv
# and o at 53-66% of the copy rate at T <= 8). Then the engine's decode step at batch 48 and 96, 1000 in, both ways.
source benchmarks/device/common.sh
# an H200 is rarer than this question: it runs issue 10's figures instead
nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && exec bash benchmarks/device/run_as.sh
gpu_state; date -u
timeout 300 python3 benchmarks/kernels/gemm_rows.py --rows 16,32,64,128 --sweep > $R/gemm_sweep.log 2>&1
grep -E "layer|copy rate|Error" $R/gemm_sweep.log
timeout 60 python3 benchmarks/kernels/gemm_rows.py --rows 8,24,48,96 > $R/gemm_rows.log 2>&1
grep -E "layer|Error" $R/gemm_rows.log
for bs in 48 96; do
  for t in 8 128; do
    [ $(left) -gt 60 ] || break
    KILN_SKINNY_MAX_T=$t timeout 60 $L --batch-size $bs --input-len 1000 --output-len 256 --max-num-seqs $bs \
      --output-json $R/bs${bs}_skinny$t.json > $R/bs${bs}_skinny$t.log 2>&1
    echo "batch $bs, KILN_SKINNY_MAX_T=$t: $(j $R/bs${bs}_skinny$t.json decode_ms_per_step output_tok_s)"
  done
done
gpu_state; echo "left: $(left) s"
tar czf $OUT/run_au.tgz -C $OUT r
