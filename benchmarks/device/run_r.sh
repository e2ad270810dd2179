#!/usr/bin/env bash
# Device run R (one call, ~2.5 min, carrying .whl): checks of the fixes after run Q (H100).
# 1. sync_check: the min_tokens mask no longer syncs (run Q: 5 syncs in 5 steps); nothing else does;
# 2. sampler_bench: top-k / top-p without the full sort (run Q: 1.61 ms at 64 rows, 5.20 ms at 256 rows);
# 3. the nucleus kernel against its sorted reference at 128,256 columns;
# 4. 64 streams, 1000 in / 300 out, native then OpenAI (run P: 11.24 vs 10.20 ms TPOT).
source benchmarks/device/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date -u
timeout 100 python3 benchmarks/device/sync_check.py 2>&1 | grep -v Warning | tail -20
timeout 100 python3 benchmarks/sampler_bench.py 2>&1 | tail -16
timeout 100 python3 -m pytest -q -p no:cacheprovider -W ignore tests/kernels/test_kernels.py -k top_p 2>&1 | tail -3
serve_apis $R/r_server.log
for api in native openai grpc; do
  timeout 60 $B serve $VOCAB --api $api --num-prompts 64 --max-concurrency 64 --input-len 1000 --output-len 300 \
    --output-json $R/r_$api.json > $R/r_$api.log 2>&1
  python3 -c "import json;r=json.load(open('$R/r_$api.json'));print('c64 $api: TPOT median', round(r['tpot_ms']['median'],2), 'out tok/s', round(r['output_tok_s']), 'failed', r['failed'])"
done
# 16 native requests with the seed's default sampling (temperature 0.95, top_p 0.7): the nucleus kernel's variant
# must have compiled in the warm-up (the server warns of any kernel compiled after ready)
python3 - <<'PY'
import json, random, urllib.request
from concurrent.futures import ThreadPoolExecutor
def ask(i):
    body = json.dumps({"req_id": f"d{i}", "input_ids": [random.randrange(100, 1000) for _ in range(200)],
                       "max_dec_len": 32}).encode()
    r = urllib.request.urlopen(urllib.request.Request("http://127.0.0.1:9965/v1/chat/completions", body,
                                                      {"Content-Type": "application/json"}), timeout=60)
    return r.status
with ThreadPoolExecutor(16) as ex:
    print("default-sampling native requests:", list(ex.map(ask, range(16))))
PY
echo "compiled after ready: $(grep -c 'compiled a kernel after ready' $R/r_server.log)"
stop_server
