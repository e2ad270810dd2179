#!/usr/bin/env bash
# Device run AW (one call, up to BUDGET_S seconds (default 560), carrying .whl): the swapped split-K tile, now the
# bf16 default up to 64 rows (run AV), checked on the GPU as committed (its tests, the engine at batch 32), and tried
# for 8-bit weights (KILN_W8_SWAP=1): w8a8-fp8 decode steps at batch 16, 32 and 64 with the weight-only tile up to 64
# rows (KILN_W8A8_WEIGHT_ONLY_MAX_T=64; the default: 16, cuBLAS's FP8 GEMM above) plain and swapped, w8a16 at batch
# 32 plain and swapped, then gemm_rows.py on int8 and fp8 weights (the fp8 one with its sweep, as time allows).
# (Tree 5ec3b87; KILN_W8_SWAP and gemm_rows.py's "swapped" heuristic column were removed after it: 8-bit weights lost.)
source benchmarks/device/common.sh
BUDGET_S=${BUDGET_S:-560}
gpu_state; date -u
timeout 120 python3 -m pytest -q -p no:cacheprovider -W ignore --tb=line -rf tests/kernels/test_kernels.py \
  tests/unit/test_tile_configs.py -k "skinny or swapped or w8a16 or tile" 2>&1 | grep -E "^FAILED|passed|failed" | head
# step NAME BATCH [ENV=VALUE ...] -- [bench args]: the decode step of a 1,000-token context, batch BATCH
step() {
  local name=$1 bs=$2; shift 2
  local envs=(); while [ "$1" != "--" ]; do envs+=("$1"); shift; done; shift
  [ $(left) -gt 40 ] || return 0
  env "${envs[@]}" timeout 60 $L --batch-size $bs --input-len 1000 --output-len 128 --max-num-seqs $(( bs < 8 ? 8 : bs )) \
    --output-json $R/$name.json "$@" > $R/$name.log 2>&1
  echo "$name: $(j $R/$name.json decode_ms_per_step output_tok_s) $(grep -m1 -E 'Error' $R/$name.log)"
}
FP8="--quantization w8a8-fp8"
step bf16-b32 32 --
for bs in 32 64 16; do
  step fp8-b$bs-default $bs --  $FP8
  step fp8-b$bs-plain64 $bs KILN_W8A8_WEIGHT_ONLY_MAX_T=64 -- $FP8
  step fp8-b$bs-swap64 $bs KILN_W8A8_WEIGHT_ONLY_MAX_T=64 KILN_W8_SWAP=1 -- $FP8
done
step w8a16-b32-plain 32 -- --quantization w8a16
step w8a16-b32-swap 32 KILN_W8_SWAP=1 -- --quantization w8a16
timeout 60 python3 benchmarks/kernels/gemm_rows.py --weights int8 --rows 16,32,64 > $R/int8_rows.log 2>&1
grep -E "^[0-9]+ \|" $R/int8_rows.log | cut -c1-230; grep -m3 -E "Error|error" $R/int8_rows.log
timeout $(( $(left) - 15 )) python3 benchmarks/kernels/gemm_rows.py --weights fp8 --rows 32,64,16 --sweep > $R/fp8_rows.log 2>&1
grep -E "^[0-9]+ \|" $R/fp8_rows.log | cut -c1-230; grep -m3 -E "Error|error" $R/fp8_rows.log
gpu_state; echo "left: $(left) s"
tar czf $OUT/run_aw.tgz -C $OUT r
