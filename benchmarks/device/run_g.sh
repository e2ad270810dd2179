#!/usr/bin/env bash
# Device run G (one call, repository root, carrying .whl): the quantized
# path's first GPU run, trimmed to the ~5 minutes of device time left, most wanted first: the 8-bit kernel tests at
# real shapes (W8A8; the fp8-KV attention after the fp16 tile-product change), issue 12's grammar check, the 8-bit
# decode kernel's time, batch-1 decode with FP8 / int8 weights, issue 11's cold first request with the server's
# log (CompileWatch), and the batch-256 decode step at context ~1,100 with FP8 weights and an fp8 cache.
source benchmarks/device/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; git rev-parse --short HEAD 2>/dev/null
X=""; python3 -c "import xdist" 2>/dev/null && X="-n 8"
timeout 80 python3 -m pytest -q -p no:cacheprovider -W ignore $X tests/kernels -k "w8a8 or int8 or fp8" 2>&1 | tail -3
for g in plain schema; do  # issue 12: batch 64, a json_schema on every request or none
  timeout 60 $L --batch-size 64 --input-len 128 --output-len 256 --max-num-seqs 64 --output-json $R/b64_$g.json \
    $([ $g = schema ] && echo --json-schema benchmarks/json_schema_long.json) > $R/b64_$g.log 2>&1
  echo "b64 $g: $(j $R/b64_$g.json decode_ms_per_step output_tok_s ended_early overlapped_steps steps) $(grep -m1 -E 'Error|error' $R/b64_$g.log)"
done
timeout 60 python3 benchmarks/kernels/bench_kernels.py --only decode --json $R/decode.json > $R/decode.log 2>&1
grep -E "measured ceilings|B=256" $R/decode.log | cut -c1-160
b1() {  # b1 NAME ARGS: batch-1 decode, 128 in / 256 out
  timeout 50 $L --batch-size 1 --input-len 128 --output-len 256 --max-num-seqs 8 --output-json $R/b1_$1.json "${@:2}" \
    > $R/b1_$1.log 2>&1; echo "b1 $1: $(j $R/b1_$1.json output_tok_s decode_ms_per_step) $(grep -m1 -E 'Error|error' $R/b1_$1.log)"
}
b1 fp8 --quantization w8a8-fp8; b1 w8a16 --quantization w8a16
COLD_TIMEOUT=70 bash benchmarks/device/run_serving.sh first 2>&1 | grep -v "^tar"
grep -h "after ready\|warm-up:" $R/first.json.server.log | cut -c1-400 | head -8
timeout 80 $L --batch-size 256 --input-len 1000 --output-len 200 --max-num-seqs 256 --iters 1 --warmup-iters 1 \
  --quantization w8a8-fp8 --kv-cache-dtype fp8 --output-json $R/b256.json > $R/b256.log 2>&1
echo "b256 w8a8-fp8 + fp8 KV: $(j $R/b256.json decode_ms_per_step output_tok_s) $(grep -m1 -E 'Error|error' $R/b256.log)"
tar czf $OUT/run_g.tgz -C $OUT r
