#!/usr/bin/env bash
# Device run AT (one call, up to BUDGET_S seconds (default 570), carrying .whl; the fourteenth session's first call):
# on an H200, issue 10's figures (run_as.sh, unchanged). On an H100, issue 11's serving figures, which no GPU has
# re-measured since runs K-P (2026-12-06) while the sampler (no sync, no full sort), programmatic dependent launch
# and the 8-bit decode changed under them: the three APIs at concurrency 64 (TPOT within 10%; run P: native
# 11.24 ms against OpenAI 10.20 before the stop-id mask's sync was removed), the first request after ready, then
# the cold 4 and 8 req/s loads (bf16) if the time allows.
source benchmarks/device/common.sh
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  exec bash benchmarks/device/run_as.sh
fi
gpu_state; date -u
[ $(left) -gt 200 ] && bash benchmarks/device/run_serving.sh apis 2>&1 | grep -v "^tar"
[ $(left) -gt 80 ] && first_request
[ $(left) -gt 230 ] && COLD_TIMEOUT=$(( $(left) > 460 ? 220 : ($(left) - 20) / 2 )) \
  bash benchmarks/device/run_serving.sh rates 2>&1 | grep -v "^tar"
grep -h "after ready" $R/*.log 2>/dev/null | cut -c1-300 | sort | uniq -c | sort -rn | head -6
gpu_state; echo "left: $(left) s"
tar czf $OUT/run_at.tgz -C $OUT r
