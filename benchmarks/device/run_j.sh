#!/usr/bin/env bash
# Device run J (one call, repository root, carrying .whl; ~9 minutes): the most wanted GPU figures of issues 10-12
# in one call, for a session that may get only one machine (runs G/H/I hold the rest):
#   issue 12: batch 64 with and without a json_schema on every request (<= 10% more TPOT); kernel tests at every
#   shape; the decode kernel's 8-bit rows; batch 1 per weight format (W8A16 with and without FP16_CODES) and the
#   W8A16 T <= 16 sweep; the batch-256 step at context ~1,100 (FP8 weights + fp8 cache, bf16); the cold first
#   request with the server's start-up lines.
source benchmarks/device/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; git rev-parse --short HEAD 2>/dev/null; date -u
for g in plain schema; do
  timeout 60 $L --batch-size 64 --input-len 128 --output-len 256 --max-num-seqs 64 --output-json $R/b64_$g.json \
    $([ $g = schema ] && echo --json-schema benchmarks/json_schema_long.json) > $R/b64_$g.log 2>&1
  echo "b64 $g: $(j $R/b64_$g.json decode_ms_per_step output_tok_s ended_early overlapped_steps steps) $(grep -m1 -E 'Error|error' $R/b64_$g.log)"
done
X=""; python3 -c "import xdist" 2>/dev/null && X="-n 8"
timeout 120 python3 -m pytest -q -p no:cacheprovider -W ignore $X tests/kernels 2>&1 | tail -3
timeout 50 python3 benchmarks/kernels/bench_kernels.py --only decode --json $R/decode.json > $R/decode.log 2>&1
grep -E "measured ceilings|B=256" $R/decode.log | cut -c1-160
b1() {  # b1 NAME ARGS: batch-1 decode, 128 in / 256 out
  timeout 45 $L --batch-size 1 --input-len 128 --output-len 256 --max-num-seqs 8 --output-json $R/b1_$1.json "${@:2}" \
    > $R/b1_$1.log 2>&1; echo "b1 $1: $(j $R/b1_$1.json output_tok_s decode_ms_per_step) $(grep -m1 -E 'Error|error' $R/b1_$1.log)"
}
b1 bf16; b1 w8a16 --quantization w8a16; KILN_W8A16_FP16_CODES=1 b1 w8a16-fp16codes --quantization w8a16
b1 fp8 --quantization w8a8-fp8
b256() {  # b256 NAME ARGS: batch-256 decode step, context 1000..1200
  timeout 75 $L --batch-size 256 --input-len 1000 --output-len 200 --max-num-seqs 256 --iters 1 --warmup-iters 1 \
    --output-json $R/b256_$1.json "${@:2}" > $R/b256_$1.log 2>&1
  echo "b256 $1: $(j $R/b256_$1.json decode_ms_per_step output_tok_s) $(grep -m1 -E 'Error|error' $R/b256_$1.log)"
}
b256 fp8-kvfp8 --quantization w8a8-fp8 --kv-cache-dtype fp8; b256 bf16
COLD_TIMEOUT=70 bash benchmarks/device/run_serving.sh first 2>&1 | grep -v "^tar"
grep -h "after ready" $R/first.json.server.log | sed 's/.*after ready//' | cut -c1-200 | sort | uniq -c | sort -rn | head -6
grep -h -E "starting Kiln|loaded in|warm-up:|captured|ready in" $R/first.json.server.log | cut -c1-300
timeout 80 python3 benchmarks/kernels/bench_kernels.py --sweep --only w8a16 --json $R/w8.json > $R/w8.log 2>&1
grep -E "T=1 |T=16 " $R/w8.log | cut -c1-150
tar czf $OUT/run_j.tgz -C $OUT r
