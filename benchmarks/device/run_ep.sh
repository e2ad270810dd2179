#!/usr/bin/env bash
# Device run EP (nineteenth session; one call on a machine of 2+ GPUs, e.g. nvidia-h100-x2, carrying .whl):
#   N=2 bash benchmarks/device/run_ep.sh
# Expert parallelism against the intermediate-size split for Qwen3-30B-A3B (random weights) at MP_NUM=N: the TP
# and MoE tests on the GPUs, then batch 1 and 64 decode (128 in / 128 out) and 256 x (512 in / 256 out) offline,
# each with and without --enable-expert-parallel. Prediction: at batch 1 about equal (each layer reads the same
# expert bytes, spread by routing instead of evenly); at 64+ EP ahead where 768 / N-wide expert GEMMs waste
# tiles, behind where routing piles tokens on one GPU's experts. Not run yet (written 2026-12-08 without GPUs).
source benchmarks/device/common.sh
N=${N:-2}
BUDGET_S=${BUDGET_S:-560}
gpu_state; date -u
timeout 200 python3 -m pytest -q -p no:cacheprovider -W ignore -rf tests/parity/test_tensor_parallel.py \
  tests/kernels/test_moe_kernel.py -k "moe or expert or pairs or fused" > $R/tests.log 2>&1
grep -E "^FAILED|passed|failed" $R/tests.log | head -12
M="$B latency --preset qwen3-30b-a3b --mp-num $N"
for ep in "" "--enable-expert-parallel"; do
  tag=${ep:+_ep}
  for bs in 1 64; do
    [ $(left) -gt 70 ] || break
    timeout 120 $M --batch-size $bs --input-len 128 --output-len 128 --iters 2 $ep \
      --output-json $R/b${bs}$tag.json > $R/b${bs}$tag.log 2>&1
    echo "b$bs$tag: $(j $R/b${bs}$tag.json output_tok_s decode_ms_per_step) $(grep -m1 Error $R/b${bs}$tag.log | cut -c1-200)"
  done
  [ $(left) -gt 100 ] || continue
  timeout 150 $B throughput --preset qwen3-30b-a3b --mp-num $N --num-prompts 256 --input-len 512 --output-len 256 \
    $ep --output-json $R/thr$tag.json > $R/thr$tag.log 2>&1
  echo "throughput$tag: $(j $R/thr$tag.json output_tok_s total_s) $(grep -m1 Error $R/thr$tag.log | cut -c1-200)"
done
gpu_state; echo "left: $(left) s"
tar czf $OUT/run_ep.tgz -C $OUT r
