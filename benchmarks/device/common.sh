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
# left: seconds of the run's budget (BUDGET_S, default 570: a 600 s call less the start) not yet spent
t0=$(date +%s)
left() { echo $((${BUDGET_S:-570} - $(date +%s) + t0)); }
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
# serve_apis LOG: the random Llama-3-8B shape behind all three APIs (HTTP, gRPC on 8811), BATCH_SIZE=256, ready and
# past a warm-up load of 64 prompts
serve_apis() {
  export KILN_LOAD_FORMAT=dummy MODEL_DIR=/tmp/m-$PRESET BATCH_SIZE=256 MAX_SEQ_LEN=2048 MAX_DEC_LEN=1024
  [ -d /tmp/m-$PRESET ] || $B write-checkpoint --preset $PRESET --out /tmp/m-$PRESET --no-weights > /dev/null
  GRPC_PORT=8811 serve_bg $1
  for i in $(seq 120); do
    python3 -c "import urllib.request as u;u.urlopen('http://127.0.0.1:8110/v2/health/ready')" 2>/dev/null && break
    sleep 0.5
  done
  timeout 60 $B serve $VOCAB --num-prompts 64 --input-len 1000 --output-len 16 > /dev/null 2>&1
}
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
# grammar_b64: batch 64 (128 in / 256 out) without and with a json_schema on every request (issue 12: <= 10% TPOT)
grammar_b64() {
  for g in plain schema; do
    timeout 60 $L --batch-size 64 --input-len 128 --output-len 256 --max-num-seqs 64 --output-json $R/b64_$g.json \
      $([ $g = schema ] && echo --json-schema benchmarks/json_schema_long.json) > $R/b64_$g.log 2>&1
    echo "b64 $g: $(j $R/b64_$g.json decode_ms_per_step output_tok_s ended_early overlapped_steps steps) $(grep -m1 -E 'Error|error' $R/b64_$g.log)"
  done
}
# kernel_tests: tests/kernels at every shape, 8 workers where xdist is there
kernel_tests() {
  local x=""; python3 -c "import xdist" 2>/dev/null && x="-n 8"
  timeout 120 python3 -m pytest -q -p no:cacheprovider -W ignore --tb=no -rf $x tests/kernels 2>&1 \
    | grep -E "^FAILED|passed|failed" | sed 's/ - .*//' | cut -c1-160 | head -40
}
# b1 NAME ARGS: batch-1 decode, 128 in / 256 out
b1() {
  timeout 50 $L --batch-size 1 --input-len 128 --output-len 256 --max-num-seqs 8 --output-json $R/b1_$1.json "${@:2}" \
    > $R/b1_$1.log 2>&1; echo "b1 $1: $(j $R/b1_$1.json output_tok_s decode_ms_per_step) $(grep -m1 -E 'Error|error' $R/b1_$1.log)"
}
# b256 NAME ARGS: batch-256 decode step, context 1000..1200
b256() {
  timeout 80 $L --batch-size 256 --input-len 1000 --output-len 200 --max-num-seqs 256 --iters 1 --warmup-iters 1 \
    --output-json $R/b256_$1.json "${@:2}" > $R/b256_$1.log 2>&1
  echo "b256 $1: $(j $R/b256_$1.json decode_ms_per_step output_tok_s) $(grep -m1 -E 'Error|error' $R/b256_$1.log)"
}
# w8_sweep: W8A16 at T <= 16 (default tiles, narrower ones, deeper K splits); the sweep goes on to larger T if time allows
w8_sweep() {
  timeout ${1:-100} python3 benchmarks/kernels/bench_kernels.py --sweep --only w8a16 --json $R/w8.json > $R/w8.log 2>&1
  grep -E "T=1 |T=16 " $R/w8.log | cut -c1-150
}
# first_request: the cold first request after ready (1000 in / 16 out) and the server's start-up lines
first_request() {
  COLD_TIMEOUT=70 bash benchmarks/device/run_serving.sh first 2>&1 | grep -v "^tar"
  grep -h "after ready" $R/first.json.server.log | sed 's/.*after ready//' | cut -c1-200 | sort | uniq -c | sort -rn | head -6
  grep -h -E "starting Kiln|loaded in|warm-up:|captured|ready in" $R/first.json.server.log | cut -c1-300
}
# t1000 NAME ARGS: 1000 x 1000 offline, at most 200 s and within the time the caller's left() gives, with where
# the time went (steps with prefill tokens against decode-only steps)
t1000() {
  local t=$(( $(left) - 15 )); [ $t -gt 90 ] || return 0; [ $t -gt 200 ] && t=200
  timeout $t $B throughput --preset $PRESET --num-prompts 1000 --input-len 1000 --output-len 1000 \
    --output-json $R/t1000_$1.json "${@:2}" > $R/t1000_$1.log 2>&1
  echo "1000x1000 $1: $(j $R/t1000_$1.json output_tok_s total_s preemptions kv_blocks mixed_steps mixed_s decode_only_steps \
    decode_only_s decode_only_mean_batch 2>/dev/null)"
  grep -m2 -E "KV cache:|after ready|Error" $R/t1000_$1.log | cut -c1-300
}
# decode_w8a8_tests: the GPU tests of the decode kernels and of W8A8 (the kernels this work changes most)
decode_w8a8_tests() {
  timeout ${1:-200} python3 -m pytest -q -p no:cacheprovider -W ignore --tb=line -rf tests/kernels/test_w8a8.py \
    tests/kernels/test_kernels.py -k "decode or swapped or widen or w8a8 or quant or silu" > $R/tests.log 2>&1
  echo "tests: rc $?"  # 124: cut by the timeout (run AN printed no summary)
  grep -E "^FAILED|passed|failed" $R/tests.log | cut -c1-200 | head -14 | grep . || tail -4 $R/tests.log | cut -c1-200
}
# gpu_state: the card's clocks, power limit and temperature (run AN's H100 ran its GEMM-bound steps ~40% slower than
# run AM's with the same decode-only steps)
gpu_state() {
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu,clocks_throttle_reasons.active \
    --format=csv 2>&1 | tail -2
}
# decode8_grid: the 8-bit decode kernel's configs at B=256, context ~1,100 (bench_kernels.py's DECODE8_CONFIGS)
decode8_grid() {
  timeout 90 python3 benchmarks/kernels/bench_kernels.py --sweep --only decode8 > $R/decode8.log 2>&1
  grep -E "decode8|best|default config" $R/decode8.log | cut -c1-170
}
# mixed_profile NAME ARGS: four mixed steps of a 1000-in run (step 250: ~1,700 prefill tokens beside ~350 decode
# rows) under torch.profiler, their kernel table's top rows beside the run's wall time of its mixed steps (run AM')
mixed_profile() {
  timeout 120 $B throughput --preset $PRESET --num-prompts 600 --input-len 1000 --output-len 200 --max-num-seqs 1024 \
    --profile-steps 250,4 --profile $R/$1.txt --output-json $R/$1.json "${@:2}" > $R/$1.log 2>&1
  head -1 $R/$1.txt | cut -c1-250
  grep -E "nvjet|_kernel|cutlass|gemm" $R/$1.txt | head -9 | awk '{print $1, $(NF-2), $(NF-1), $NF}' | cut -c1-150
  echo "$1: $(j $R/$1.json output_tok_s total_s mixed_steps mixed_s decode_only_s)"
}
# decode8_small: the 8-bit decode's candidate configs at batches 1 (1,000 and 4,000 tokens), 16 and 64
decode8_small() {
  timeout 100 python3 benchmarks/kernels/bench_kernels.py --sweep --only decode8b > $R/decode8b.log 2>&1
  grep -E "decode8b" $R/decode8b.log | sed 's/    decode8b //' | cut -c1-150
}
# score_runs MIN_LEFT: 256 prompts of 1,000 tokens and one new token each, without prompt logprobs and with 1 and 5
# top logprobs a position (bench throughput --prompt-logprobs): what scoring a prompt costs; each while MIN_LEFT s
# of the budget remain
score_runs() {
  for pl in none 1 5; do
    [ $(left) -gt $1 ] || break
    local a=""; [ $pl = none ] || a="--prompt-logprobs $pl"
    timeout 100 $B throughput --preset $PRESET --load-format dummy --num-prompts 256 --input-len 1000 --output-len 1 \
      --max-num-seqs 256 $a --output-json $R/score_$pl.json > $R/score_$pl.log 2>&1
    echo "prompt logprobs $pl: $(j $R/score_$pl.json total_s input_tok_s steps) $(grep -m1 Error $R/score_$pl.log)"
  done
}
