#!/usr/bin/env bash
# Device run E (one call of the device tool, repository root, carrying .whl): serving with 1 and 4 HTTP workers
# (PUSH_MODE_HTTP_WORKERS), each after a warm-up load, with the server's own TTFT and queue-time histograms, to
# tell the engine's share of run D's TTFT from the front end's and the client's. Not run yet (2026-12-02: the
# first attempt lacked its set-up lines, and the session's device time ran out).
source benchmarks/device/common.sh
for w in 1 4; do
  start_server $R/serve_w$w.log PUSH_MODE_HTTP_WORKERS=$w
  timeout 40 $B serve --num-prompts 64 --max-concurrency 64 --input-len 1000 --output-len 16 > /dev/null 2>&1
  python3 -c "import urllib.request as u;open('$R/metrics_w${w}_0.txt','wb').write(u.urlopen('http://127.0.0.1:8722/metrics').read())"
  timeout 60 $B serve --num-prompts 128 --max-concurrency 64 --input-len 1000 --output-len 1000 \
    --output-json $R/serve_w$w.json > $R/serve_bench_w$w.log 2>&1
  python3 -c "import urllib.request as u;open('$R/metrics_w${w}_1.txt','wb').write(u.urlopen('http://127.0.0.1:8722/metrics').read())"
  python3 - $w $R <<'PY'
import json, re, sys
w, R = sys.argv[1], sys.argv[2]
r = json.load(open(f"{R}/serve_w{w}.json"))
def m(i, name):
    t = open(f"{R}/metrics_w{w}_{i}.txt").read()
    return sum(float(x) for x in re.findall(rf"^{name} ([0-9.e+-]+)$", t, re.M))
srv = {}
for h in ("kiln:time_to_first_token_seconds", "kiln:request_queue_time_seconds"):
    s = m(1, h + "_sum") - m(0, h + "_sum"); n = m(1, h + "_count") - m(0, h + "_count")
    srv[h.split(":")[1]] = round(1000 * s / n, 1) if n else None
print(f"workers={w}: {r['completed']} ok, {round(r['output_tok_s'])} tok/s; client TTFT ms", {k: round(v) for k, v in r["ttft_ms"].items()},
      "TPOT", {k: round(v, 2) for k, v in r["tpot_ms"].items()}, "; server-side means (ms):", srv)
PY
  stop_server
done
tar czf $OUT/run_e.tgz -C $OUT r
