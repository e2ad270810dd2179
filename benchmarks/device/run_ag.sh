#!/usr/bin/env bash
# Device run AG (one call, up to BUDGET_S seconds (default 570), carrying .whl; any card): the FP8 GEMM swapped
# (W @ x^T) against as now at decode row counts (benchmarks/kernels/fp8_swap_ab.py, ~30 s); the 1000 x 1000 with
# admission's new default (auto reserve: the share of max_tokens finished requests used, starting at 1;
# benchmarks/sched_sim.py: as reserve 1 here, run AF's 12,610 on an H100); on an H200, run AC's figures after.
source benchmarks/device/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date -u
timeout 120 python3 benchmarks/kernels/fp8_gemm_rows.py 2>&1 | tail -18
t1000 fp8-kvfp8-auto --quantization w8a8-fp8 --kv-cache-dtype fp8 --max-num-seqs 1024
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  b256 fp8-kvfp8 --quantization w8a8-fp8 --kv-cache-dtype fp8
  t1000 int8-kv8-auto --quantization w8a8-int8 --kv-cache-dtype int8 --max-num-seqs 1024
  b256 int8-kv8 --quantization w8a8-int8 --kv-cache-dtype int8
  timeout 60 python3 benchmarks/kernels/bench_kernels.py --sweep --only decode8 > $R/decode8.log 2>&1
  grep -E "decode8|best" $R/decode8.log | tail -6 | cut -c1-200
fi
tar czf $OUT/run_ag.tgz -C $OUT r
