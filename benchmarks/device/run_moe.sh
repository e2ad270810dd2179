#!/usr/bin/env bash
# Device run MOE (one call, up to BUDGET_S seconds (default 560), carrying .whl; eighteenth session): mixtures of
# experts on a GPU. The MoE tests on CUDA (fused_moe against the PyTorch experts at real shapes, the tiny Qwen3-MoE
# and Mixtral against transformers, LoRA on a MoE model), the kernel against its floor at Qwen3-30B-A3B's shape
# with a tile sweep, then the engine on the random Qwen3-30B-A3B shape: batch 1, 8 and 64 (128 in / 128 out), and
# 256 prompts offline; batch 1 with int8 experts (w8a16).
source benchmarks/device/common.sh
BUDGET_S=${BUDGET_S:-560}
gpu_state; date -u
timeout 150 python3 -m pytest -q -p no:cacheprovider -W ignore --tb=short -rf tests/kernels/test_moe_kernel.py \
  tests/unit/test_moe.py "tests/parity/test_models.py" -k "moe or mixtral or pairs or fused" > $R/tests.log 2>&1
grep -E "^E  |Error|^FAILED|passed|failed" $R/tests.log | cut -c1-240 | head -24
timeout 100 python3 benchmarks/kernels/moe_bench.py --configs --tokens 1,8,64,512,4096 > $R/moe_bench.log 2>&1
cat $R/moe_bench.log | cut -c1-400
M="$B latency --preset qwen3-30b-a3b"
moe_b() {  # moe_b NAME BATCH [ARGS]
  [ $(left) -gt 60 ] || return 0
  timeout 110 $M --batch-size $2 --input-len 128 --output-len 128 --iters 2 --output-json $R/moe_$1.json "${@:3}" \
    > $R/moe_$1.log 2>&1
  echo "$1: $(j $R/moe_$1.json output_tok_s decode_ms_per_step prefill_s) $(grep -m1 -E 'Error' $R/moe_$1.log | cut -c1-200)"
}
moe_b b1 1 --profile $R/moe_b1_profile.txt
head -30 $R/moe_b1_profile.txt 2>/dev/null | cut -c1-160
moe_b b8 8
moe_b b64 64
moe_b b1_w8a16 1 --quantization w8a16
M="$B latency --preset qwen1.5-moe-a2.7b"  # a shared expert beside 4 of 60 routed ones (nineteenth session)
moe_b q2_b1 1
moe_b q2_b8 8
M="$B latency --preset qwen3-30b-a3b"
if [ $(left) -gt 80 ]; then
  timeout $(( $(left) - 15 )) $B throughput --preset qwen3-30b-a3b --num-prompts 256 --input-len 512 --output-len 256 \
    --output-json $R/moe_thr.json > $R/moe_thr.log 2>&1
  echo "throughput: $(j $R/moe_thr.json output_tok_s total_s) $(grep -m1 -E 'Error' $R/moe_thr.log | cut -c1-200)"
fi
grep -m3 -E "memory|KV" $R/moe_b1.log | cut -c1-200
gpu_state; echo "left: $(left) s"
tar czf $OUT/run_moe.tgz -C $OUT r
