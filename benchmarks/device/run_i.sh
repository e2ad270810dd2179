#!/usr/bin/env bash
# Device run I (one call, repository root, carrying .whl): issue 11's cold loads, 4 req/s x 200 and 8 req/s x 400
# Poisson (1000 in / 1000 out), each on a freshly started server with an empty compile cache (kiln bench serve
# --cold), and the names of any kernels compiled after ready in their server logs.
source benchmarks/device/common.sh
nvidia-smi --query-gpu=name --format=csv,noheader; git rev-parse --short HEAD 2>/dev/null
export KILN_LOAD_FORMAT=dummy BATCH_SIZE=256 MAX_SEQ_LEN=2048 MAX_DEC_LEN=1024
COLD_TIMEOUT=${COLD_TIMEOUT:-270} bash benchmarks/device/run_serving.sh rates 2>&1 | grep -v "^tar"
grep -h "after ready" $R/*.server.log | sed 's/.*after ready//' | cut -c1-260 | sort | uniq -c | sort -rn | head -12
tar czf $OUT/run_i.tgz -C $OUT r
