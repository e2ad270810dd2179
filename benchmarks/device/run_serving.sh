#!/usr/bin/env bash
# Device run: issue 11's serving workload (one call of the device tool per part, repository root, carrying .whl):
#   bash benchmarks/device/run_serving.sh cold     first request after ready (1000 in / 16 out) and start-to-ready
#                                                  on an empty compile cache; 4 req/s x 200 and 8 req/s x 400
#                                                  Poisson, each on a freshly started server with an empty cache
#   bash benchmarks/device/run_serving.sh rates    the two loads of `cold` alone
#   bash benchmarks/device/run_serving.sh burst    all at once, 1,000 requests, MAX_CACHED_TASK_NUM=1000 (cold)
#   bash benchmarks/device/run_serving.sh one NAME ARGS...   one cold load with these `kiln bench serve` arguments
#   bash benchmarks/device/run_serving.sh warm     start to ready twice on one compile cache (the second is warm),
#                                                  from a real safetensors checkpoint of the preset's shape
#   bash benchmarks/device/run_serving.sh apis     concurrency 64, 1000 in / 1000 out: OpenAI vs native vs gRPC
#                                                  streaming on one warm server (TPOT within 10% is the target)
# A random Llama-3-8B shape (dummy weights), BATCH_SIZE=256, MAX_SEQ_LEN=2048, MAX_DEC_LEN=1024, prompts of
# 1,000 random tokens, 1,000 out; PUSH_MODE_HTTP_WORKERS left at its effective default. `kiln bench serve --cold`
# starts each cold server itself (temp TRITON_CACHE_DIR and log dir) and reports the client's TTFT/TPOT beside
# the server's queue/prefill/decode split from its requests.log. Parts cold, rates, first, warm ran on H100s (runs F-M).
source benchmarks/device/common.sh
part=${1:-cold}
[ -d /tmp/m-$PRESET ] || $B write-checkpoint --preset $PRESET --out /tmp/m-$PRESET --no-weights > /dev/null
export KILN_LOAD_FORMAT=dummy MODEL_DIR=/tmp/m-$PRESET BATCH_SIZE=256 MAX_SEQ_LEN=2048 MAX_DEC_LEN=1024
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > $R/gpu.txt; git rev-parse HEAD > $R/commit.txt 2>/dev/null
# show NAME: the client's and the server's figures of one bench JSON, on two lines
show() {
  python3 - $R/$1.json $1 <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
f = lambda d: {k: (round(v, 1) if isinstance(v, float) else v) for k, v in (d or {}).items()}
print(f"{sys.argv[2]}: {r['api']} {r['completed']} ok {r['failed']} failed, {round(r['output_tok_s'])} out tok/s;"
      f" TTFT ms {f(r['ttft_ms'])} TPOT ms {f(r['tpot_ms'])}", r.get("cold") or "", r["errors"][:1])
s = r.get("server") or {}
print("   server:", {k: f(v) for k, v in s.items() if k.endswith("_ms")}, "matched", s.get("matched"))
PY
}
cold() {  # cold NAME ARGS...: kiln bench serve --cold
  local name=$1; shift
  timeout ${COLD_TIMEOUT:-580} $B serve $VOCAB --cold --input-len 1000 --output-len 1000 --timeout $((${COLD_TIMEOUT:-580} - 20)) "$@" --output-json $R/$name.json \
    > $R/$name.log 2>&1
  show $name
}
case $part in
  first)
    cold first --num-prompts 1 --output-len 16 ;;
  cold)
    cold first --num-prompts 1 --output-len 16
    cold rate4 --request-rate 4 --num-prompts 200
    cold rate8 --request-rate 8 --num-prompts 400 ;;
  rates)
    cold rate4 --request-rate 4 --num-prompts 200
    cold rate8 --request-rate 8 --num-prompts 400 ;;
  one)  # one NAME ARGS...: one cold load of the caller's choosing
    shift; cold "$@" ;;
  burst)
    cold burst --num-prompts 1000 --server-env MAX_CACHED_TASK_NUM=1000 ;;
  warm)
    # a real checkpoint (random weights in sharded bf16 safetensors, 16 GB; in the page cache after writing)
    [ -f /tmp/ckpt-$PRESET/config.json ] || $B write-checkpoint --preset $PRESET --out /tmp/ckpt-$PRESET > /dev/null
    export TRITON_CACHE_DIR=/tmp/triton-warm MODEL_DIR=/tmp/ckpt-$PRESET; unset KILN_LOAD_FORMAT
    for i in 1 2; do
      t0=$(date +%s.%N)
      serve_bg $R/warm$i.log
      until python3 -c "import urllib.request as u;u.urlopen('http://127.0.0.1:8110/v2/health/ready')" 2>/dev/null; do
        sleep 0.2; done
      echo "start $i ($([ $i = 1 ] && echo empty || echo warm) compile cache): ready after $(python3 -c "import time;print(round(time.time()-$t0,1))") s"
      grep -E "loaded in|warm-up|captured|Triton compile cache|start-up:|Kiln is ready|warmed up in|engine core starting" $R/warm$i.log | cut -c1-300 | head -14
      stop_server
    done ;;
  apis)
    GRPC_PORT=8811 serve_bg $R/apis_server.log
    until python3 -c "import urllib.request as u;u.urlopen('http://127.0.0.1:8110/v2/health/ready')" 2>/dev/null; do
      sleep 0.5; done
    timeout 60 $B serve $VOCAB --num-prompts 64 --input-len 1000 --output-len 16 > /dev/null 2>&1  # warm-up load
    for api in openai native grpc; do
      timeout 150 $B serve $VOCAB --api $api --num-prompts 128 --max-concurrency 64 --input-len 1000 --output-len 1000 \
        --request-log log/requests.log --output-json $R/c64_$api.json > $R/c64_$api.log 2>&1
      show c64_$api
    done
    stop_server ;;
esac
tar czf $OUT/run_serving_$part.tgz -C $OUT r
