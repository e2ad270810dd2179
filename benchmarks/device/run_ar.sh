#!/usr/bin/env bash
# Device run AR (one call, up to BUDGET_S seconds (default 570), carrying .whl; any card): the 8-bit decode's smaller
# programs from 16 rows (f4df01c) in the engine, against the 64-token, 4-warp programs (KILN_DECODE_SMALL_ROWS=100000)
# on the same card: the batch-256 step with each 8-bit kind, then the 1000 x 1000 w8a8-fp8 + fp8 cache at the new
# default; on an H200 also issue 10's int8 1000 x 1000 and batch 1 (w8a16).
# (The smaller programs and KILN_DECODE_SMALL_ROWS were removed after this run: 0.5-0.7% slower in the step.)
source benchmarks/device/common.sh
gpu_state; date -u
for rows in 100000 16; do KILN_DECODE_SMALL_ROWS=$rows b256 fp8-kvfp8-small$rows --quantization w8a8-fp8 --kv-cache-dtype fp8; done
for rows in 100000 16; do
  [ $(left) -gt 100 ] && KILN_DECODE_SMALL_ROWS=$rows b256 int8-kv8-small$rows --quantization w8a8-int8 --kv-cache-dtype int8
done
t1000 fp8-kvfp8 --quantization w8a8-fp8 --kv-cache-dtype fp8 --max-num-seqs 1024
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  t1000 int8-kv8 --quantization w8a8-int8 --kv-cache-dtype int8 --max-num-seqs 1024
  [ $(left) -gt 60 ] && b1 w8a16 --quantization w8a16
fi
gpu_state; echo "left: $(left) s"
tar czf $OUT/run_ar.tgz -C $OUT r
