#!/usr/bin/env bash
# Device run P (one call, ~60 s after start, carrying .whl): checks of this session's changes after run O (H100).
# 1. 64 streams, 1000 in / 300 out, native API (its bench sets min_dec_len: the sampler now masks every row's stop
#    ids in one copy, run O had native TPOT 13.5 ms against OpenAI's 10.3) then OpenAI, on one warm server with
#    programmatic dependent launch on (now the default);
# 2. batch-1 W8A16 with the default (PDL on), against run O's 238.5 (off) / 247.8 (on) tok/s.
source benchmarks/device/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date -u
serve_apis $R/p_server.log
for api in native openai; do
  timeout 60 $B serve $VOCAB --api $api --num-prompts 64 --max-concurrency 64 --input-len 1000 --output-len 300 \
    --output-json $R/p_$api.json > $R/p_$api.log 2>&1
  python3 -c "import json;r=json.load(open('$R/p_$api.json'));print('c64 $api: TPOT median', r['tpot_ms']['median'], 'out tok/s', round(r['output_tok_s']), 'failed', r['failed'])"
done
stop_server
b1 w8a16 --quantization w8a16
grep -h "after ready" $R/*.log 2>/dev/null | cut -c1-300 | sort | uniq -c | head -4
