#!/usr/bin/env bash
# Device run G (one call, repository root, carrying .whl and .carry (the SmolLM2 tokenizer files)): the quantized path's first GPU run. Kernel tests at real
# shapes (fp8 KV, W8A8), the W8A8 GEMM check and timing, the 8-bit decode kernel's config sweep, then issue 10's
# engine figures: batch 1 for each weight format, the batch-256 decode step at context ~1,100 per cache dtype.
source benchmarks/device/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; git rev-parse --short HEAD 2>/dev/null
X=""; python3 -c "import xdist" 2>/dev/null && X="-n 8"
timeout 150 python3 -m pytest -q -p no:cacheprovider -W ignore $X tests/kernels 2>&1 | tail -6
timeout 100 python3 benchmarks/gpu_w8a8_check.py --m 1,16,64,256 --json $R/w8a8.json > $R/w8a8.log 2>&1; tail -42 $R/w8a8.log
[ -n "$SWEEP" ] && timeout 100 python3 benchmarks/kernels/bench_kernels.py --only decode --sweep --json $R/decode.json \
  > $R/decode.log 2>&1 && grep -E "measured ceilings|decode8|best|int8|fp8" $R/decode.log | tail -16
b1() {  # b1 NAME ARGS: batch-1 decode, 128 in / 256 out
  timeout 60 $L --batch-size 1 --input-len 128 --output-len 256 --max-num-seqs 8 --output-json $R/b1_$1.json "${@:2}" \
    > $R/b1_$1.log 2>&1; echo "b1 $1: $(j $R/b1_$1.json output_tok_s decode_ms_per_step) $(grep -m1 -E 'Error|error' $R/b1_$1.log)"
}
b1 bf16; b1 w8a16 --quantization w8a16; b1 fp8 --quantization w8a8-fp8
b256() {  # b256 NAME ARGS: batch-256 decode step, context 1000..1200
  timeout 90 $L --batch-size 256 --input-len 1000 --output-len 200 --max-num-seqs 256 --iters 1 --warmup-iters 1 \
    --output-json $R/b256_$1.json "${@:2}" > $R/b256_$1.log 2>&1
  echo "b256 $1: $(j $R/b256_$1.json decode_ms_per_step output_tok_s) $(grep -m1 -E 'Error|error' $R/b256_$1.log)"
}
b256 bf16; b256 kv8 --kv-cache-dtype int8; b256 fp8-kvfp8 --quantization w8a8-fp8 --kv-cache-dtype fp8
# issue 12: batch 64 with a json_schema on every request vs without (carry .carry: the SmolLM2 tokenizer)
timeout 120 python3 benchmarks/grammar_tpot.py --tokenizer .carry/smollm2-tok --batch 64 --json $R/grammar.json \
  > $R/grammar.log 2>&1; tail -4 $R/grammar.log
# issue 11: the first request after ready on a cold server, with the server's log (CompileWatch)
COLD_TIMEOUT=100 bash benchmarks/device/run_serving.sh first 2>&1 | grep -v "^tar"
grep -h "after ready\|warm-up:" $R/first.json.server.log | cut -c1-500 | head -12
tar czf $OUT/run_g.tgz -C $OUT r
