#!/usr/bin/env bash
# Device run AQ (one call, up to BUDGET_S seconds (default 570), carrying .whl; any card). In order of what each
# answer is worth:
# - decode8_small: the 8-bit decode's smaller programs (fp8 (32, 1, 3), int8 (32, 2, 3); run AP's H100 found them
#   4-7% faster at B=256) at batches 1, 16 and 64, before they become the defaults;
# - overlap_bench.py: does one half of a decode batch's attention gain beside the other half's FP8 GEMMs on a
#   second stream (batches 324 and 512); and a mixed step (--mixed) with its attention on two streams, and split:
#   the decode rows' layers (memory-bound attention) beside the prefill tokens' (compute-bound GEMMs);
# - the mixed-step A/B in the engine (KILN_MIXED_ATTN_STREAMS=0/1): 600 x (1,000 in / 200 out), w8a8-fp8 + fp8
#   cache, where mixed steps carry most of the time (the switch was removed after this run: 11% slower);
# - on an H200: the decode8 grid and issue 10's figures (1000 x 1000 fp8, batch-256 step, 1000 x 1000 int8);
# - the GPU tests of the decode, W8A8 and mixed-step attention (two streams included).
source benchmarks/device/common.sh
gpu_state; date -u
decode8_small
timeout 180 python3 benchmarks/kernels/overlap_bench.py --batches 324,512 --mixed > $R/overlap.log 2>&1
grep -v "^ *$" $R/overlap.log | tail -32 | cut -c1-160
mixed_ab() {  # mixed_ab NAME ENV...: 600 x 1000/200, w8a8-fp8 + fp8 cache
  env "${@:2}" timeout 100 $B throughput --preset $PRESET --num-prompts 600 --input-len 1000 --output-len 200 \
    --max-num-seqs 1024 --quantization w8a8-fp8 --kv-cache-dtype fp8 --output-json $R/mix_$1.json > $R/mix_$1.log 2>&1
  echo "mixed $1: $(j $R/mix_$1.json output_tok_s total_s mixed_steps mixed_s decode_only_s preemptions)"
}
h200=0; nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && h200=1
if [ $h200 = 1 ]; then
  decode8_grid
  t1000 fp8-kvfp8 --quantization w8a8-fp8 --kv-cache-dtype fp8 --max-num-seqs 1024
  b256 fp8-kvfp8 --quantization w8a8-fp8 --kv-cache-dtype fp8
fi
[ $(left) -gt 250 ] && { mixed_ab streams0 KILN_MIXED_ATTN_STREAMS=0; mixed_ab streams1 KILN_MIXED_ATTN_STREAMS=1; }
if [ $(left) -gt 60 ]; then
  timeout 60 python3 -m pytest -q -p no:cacheprovider -W ignore --tb=line -rf tests/kernels/test_triton_backend.py \
    -k mixed > $R/tests_mixed.log 2>&1; echo "mixed tests: rc $?"; tail -2 $R/tests_mixed.log | cut -c1-200
fi
[ $(left) -gt 60 ] && decode_w8a8_tests $(( $(left) > 170 ? 150 : $(left) - 20 ))
[ $h200 = 1 ] && t1000 int8-kv8 --quantization w8a8-int8 --kv-cache-dtype int8 --max-num-seqs 1024
gpu_state; echo "left: $(left) s"
tar czf $OUT/run_aq.tgz -C $OUT r
