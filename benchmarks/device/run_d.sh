#!/usr/bin/env bash
# Device run D (carrying .whl): run C's serving benchmark again, after a short warm-up load on the same server
# (run C's server was the machine's first Triton user: its first requests paid the kernels' JIT compilation).
source benchmarks/device/common.sh
start_server $R/serve.log
timeout 60 $B serve --num-prompts 64 --max-concurrency 64 --input-len 1000 --output-len 16 \
  --output-json $R/serve_warm.json > $R/serve_warm.log 2>&1
python3 -c "import json;r=json.load(open('$R/serve_warm.json'));print('warm-up load: TTFT',r['ttft_ms'])"
serve_c64 serve; stop_server
tar czf $OUT/run_d.tgz -C $OUT r
