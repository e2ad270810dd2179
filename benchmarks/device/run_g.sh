#!/usr/bin/env bash
# Device run G (one call, repository root, carrying .whl): what ~3 minutes of device time allowed, most wanted
# first: issue 12's check (batch 64 with and without a json_schema on every request), the 8-bit kernel tests at real
# shapes (W8A8 and the 8-bit KV attention after the fp16 tile-product change), issue 11's cold first request with
# the server's log (CompileWatch names what compiles after ready).
source benchmarks/device/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; git rev-parse --short HEAD 2>/dev/null
for g in plain schema; do  # issue 12: batch 64, a json_schema on every request or none
  timeout 50 $L --batch-size 64 --input-len 128 --output-len 256 --max-num-seqs 64 --output-json $R/b64_$g.json \
    $([ $g = schema ] && echo --json-schema benchmarks/json_schema_long.json) > $R/b64_$g.log 2>&1
  echo "b64 $g: $(j $R/b64_$g.json decode_ms_per_step output_tok_s ended_early overlapped_steps steps) $(grep -m1 -E 'Error|error' $R/b64_$g.log)"
done
X=""; python3 -c "import xdist" 2>/dev/null && X="-n 8"
timeout 75 python3 -m pytest -q -p no:cacheprovider -W ignore $X tests/kernels 2>&1 | tail -3
COLD_TIMEOUT=60 bash benchmarks/device/run_serving.sh first 2>&1 | grep -v "^tar"
grep -h "after ready\|warm-up:" $R/first.json.server.log | cut -c1-400 | head -8
tar czf $OUT/run_g.tgz -C $OUT r
