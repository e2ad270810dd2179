# Sourced by the run_*.sh scripts (device tool, repository root): the carried wheels (.whl: fastapi, uvicorn,
# pyzmq, ... for the server), paths, and helpers. Each run leaves its files under $OUT/r.
PRESET=${PRESET:-llama3-8b}  # PRESET=tiny: a smoke run of a script here on CPU (this checkout's .venv) first
if [ "$PRESET" = tiny ]; then
  export PATH=$PWD/.venv/bin:$PATH
elif [ -d .whl ] && [ ! -f /tmp/site/.kiln-wheels ]; then  # once per machine (scripts source this again)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  touch /tmp/site/.kiln-wheels
fi
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R
B="python3 -m kiln.entrypoints.cli bench"
L="$B latency --preset $PRESET"
# j FILE KEY...: the keys of a bench JSON file, on one line
j() { python3 -c "import json,sys;r=json.load(open(sys.argv[1]));print(*[f'{k}={r[k]:.4g}' if isinstance(r[k],float) else f'{k}={r[k]}' for k in sys.argv[2:] if k in r])" "$@"; }
# start_server LOG [ENV=VALUE ...]: a random Llama-3-8B shape behind the HTTP API, batch 64; waits until ready
start_server() {
  local log=$1; shift
  [ -d /tmp/m-$PRESET ] || $B write-checkpoint --preset $PRESET --out /tmp/m-$PRESET --no-weights > /dev/null
  env "$@" KILN_LOAD_FORMAT=dummy MODEL_DIR=/tmp/m-$PRESET BATCH_SIZE=64 MAX_SEQ_LEN=2048 MAX_DEC_LEN=1024 GRPC_PORT=-1 \
    setsid python3 -m kiln.entrypoints.cli serve > $log 2>&1 &
  SERVER_PID=$!
  for i in $(seq 90); do
    python3 -c "import urllib.request as u;u.urlopen('http://127.0.0.1:8110/v2/health/ready')" 2>/dev/null && break
    sleep 1
  done
  echo "server ready after ${i}s"
}
# serve_bg LOG: kiln serve in its own session with this environment; SERVER_PID is its process group
serve_bg() { setsid python3 -m kiln.entrypoints.cli serve > $1 2>&1 & SERVER_PID=$!; }
# stop_server: SIGTERM to the server's process group (its processes rename themselves "kiln serve: ...", so a
# pkill on the command line misses them), then SIGKILL if it is still there after 60 s
stop_server() {
  [ -n "$SERVER_PID" ] || return 0
  kill -TERM -- -$SERVER_PID 2>/dev/null
  for i in $(seq 120); do kill -0 -- -$SERVER_PID 2>/dev/null || break; sleep 0.5; done
  kill -KILL -- -$SERVER_PID 2>/dev/null; SERVER_PID=
}
# the tiny preset's vocabulary is 1024: its random prompts must stay under it
VOCAB=""; [ "$PRESET" = tiny ] && VOCAB="--vocab-limit 1000"
# serve_c64 NAME: 128 prompts of 1000 tokens, 1000 out, concurrency 64, over the OpenAI streaming API
serve_c64() {
  timeout 100 $B serve --num-prompts 128 --max-concurrency 64 --input-len 1000 --output-len 1000 \
    --output-json $R/$1.json > $R/$1_bench.log 2>&1
  python3 -c "import json;r=json.load(open('$R/$1.json'));print('$1:',r['completed'],'ok',r['failed'],'failed',
    round(r['output_tok_s']),'tok/s; TPOT',r['tpot_ms'],'TTFT',r['ttft_ms'],'ITL',r['itl_ms'],'E2E',r['e2e_ms'],r['errors'][:1])"
}
