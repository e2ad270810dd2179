#!/usr/bin/env bash
# Device run G (one call, repository root, carrying .whl and .carry (the SmolLM2 tokenizer files)): the quantized
# path's first GPU run, trimmed to the device time left, most wanted first. The W8A8 kernel tests at real shapes
# (the fp8-KV ones ran in a helper's run: docs/kernels.md), issue 12's grammar check, the W8A8 GEMM check and
# timing, issue 10's batch-1 figures per weight format, issue 11's cold first request with the server's log
# (CompileWatch), then the batch-256 decode step at context ~1,100 per weight/cache format.
source benchmarks/device/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; git rev-parse --short HEAD 2>/dev/null
X=""; python3 -c "import xdist" 2>/dev/null && X="-n 8"
timeout 100 python3 -m pytest -q -p no:cacheprovider -W ignore $X tests/kernels/test_w8a8.py 2>&1 | tail -4
# issue 12: batch 64 with a json_schema on every request vs without
timeout 120 python3 benchmarks/grammar_tpot.py --tokenizer .carry/smollm2-tok --batch 64 --json $R/grammar.json \
  > $R/grammar.log 2>&1; tail -4 $R/grammar.log
timeout 90 python3 benchmarks/gpu_w8a8_check.py --m 1,16,64,256 --json $R/w8a8.json > $R/w8a8.log 2>&1; tail -40 $R/w8a8.log
b1() {  # b1 NAME ARGS: batch-1 decode, 128 in / 256 out
  timeout 60 $L --batch-size 1 --input-len 128 --output-len 256 --max-num-seqs 8 --output-json $R/b1_$1.json "${@:2}" \
    > $R/b1_$1.log 2>&1; echo "b1 $1: $(j $R/b1_$1.json output_tok_s decode_ms_per_step) $(grep -m1 -E 'Error|error' $R/b1_$1.log)"
}
b1 bf16; b1 w8a16 --quantization w8a16; b1 fp8 --quantization w8a8-fp8
# issue 11: the first request after ready on a cold server, with the server's log
COLD_TIMEOUT=100 bash benchmarks/device/run_serving.sh first 2>&1 | grep -v "^tar"
grep -h "after ready\|warm-up:" $R/first.json.server.log | cut -c1-500 | head -12
b256() {  # b256 NAME ARGS: batch-256 decode step, context 1000..1200
  timeout 90 $L --batch-size 256 --input-len 1000 --output-len 200 --max-num-seqs 256 --iters 1 --warmup-iters 1 \
    --output-json $R/b256_$1.json "${@:2}" > $R/b256_$1.log 2>&1
  echo "b256 $1: $(j $R/b256_$1.json decode_ms_per_step output_tok_s) $(grep -m1 -E 'Error|error' $R/b256_$1.log)"
}
b256 fp8-kvfp8 --quantization w8a8-fp8 --kv-cache-dtype fp8; b256 bf16; b256 kv8 --kv-cache-dtype int8
tar czf $OUT/run_g.tgz -C $OUT r
