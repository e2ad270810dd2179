#!/usr/bin/env bash
# Device run G (one call, repository root, carrying .whl; ~8 minutes): the quantized path's and issue 12's GPU
# figures, most wanted first. Written 2026-12-05; NOT RUN: that session's device time went on failed machine starts.
#   1. issue 12: batch 64 with and without a json_schema on every request (target: <= 10% more TPOT)
#   2. tests/kernels at every shape (the W8A8 kernels, the 8-bit KV attention after the fp16 tile-product change,
#      the variant-key tests against the real JIT cache)
#   3. the decode kernel at bench shapes (the 8-bit rows: were 1.47-1.51x their floor on an H100 before the fp16
#      change), and the W8A8 GEMMs against their floors (picks KILN_W8A8_WEIGHT_ONLY_MAX_T)
#   4. issue 10's engine figures at batch 1 per weight format; W8A16 at T <= 16 with the FP16_CODES conversion and
#      more K splits (bench sweep), and batch 1 with FP16_CODES on
# The batch-256 step and the cold first request moved to run_h.sh (one call must stay under 10 minutes).
source benchmarks/device/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; git rev-parse --short HEAD 2>/dev/null
for g in plain schema; do
  timeout 60 $L --batch-size 64 --input-len 128 --output-len 256 --max-num-seqs 64 --output-json $R/b64_$g.json \
    $([ $g = schema ] && echo --json-schema benchmarks/json_schema_long.json) > $R/b64_$g.log 2>&1
  echo "b64 $g: $(j $R/b64_$g.json decode_ms_per_step output_tok_s ended_early overlapped_steps steps) $(grep -m1 -E 'Error|error' $R/b64_$g.log)"
done
X=""; python3 -c "import xdist" 2>/dev/null && X="-n 8"
timeout 120 python3 -m pytest -q -p no:cacheprovider -W ignore $X tests/kernels 2>&1 | tail -3
timeout 60 python3 benchmarks/kernels/bench_kernels.py --only decode --json $R/decode.json > $R/decode.log 2>&1
grep -E "measured ceilings|B=256|B=64" $R/decode.log | cut -c1-160
timeout 90 python3 benchmarks/gpu_w8a8_check.py --m 1,16,64,256 --json $R/w8a8.json > $R/w8a8.log 2>&1; tail -36 $R/w8a8.log
b1() {  # b1 NAME ARGS: batch-1 decode, 128 in / 256 out
  timeout 50 $L --batch-size 1 --input-len 128 --output-len 256 --max-num-seqs 8 --output-json $R/b1_$1.json "${@:2}" \
    > $R/b1_$1.log 2>&1; echo "b1 $1: $(j $R/b1_$1.json output_tok_s decode_ms_per_step) $(grep -m1 -E 'Error|error' $R/b1_$1.log)"
}
b1 bf16; b1 w8a16 --quantization w8a16; b1 fp8 --quantization w8a8-fp8; b1 int8 --quantization w8a8-int8
KILN_W8A16_FP16_CODES=1 b1 w8a16-fp16codes --quantization w8a16
timeout 100 python3 benchmarks/kernels/bench_kernels.py --sweep --only w8a16 --json $R/w8.json > $R/w8.log 2>&1
grep -E "T=1 |T=16 " $R/w8.log | cut -c1-150
tar czf $OUT/run_g.tgz -C $OUT r
