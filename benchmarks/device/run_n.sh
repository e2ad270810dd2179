#!/usr/bin/env bash
# Device run N (one call, up to BUDGET_S seconds (default 570), carrying .whl): issue 11's serving targets, meant for
# an H200 (runs K-M were H100s), most wanted first, each part only if the time left allows it:
#   the first request after ready (the bench client now warms its own HTTP stack before the clock), the cold 4 and
#   8 req/s loads (bf16), 8 req/s again with an fp8 cache (at ~140 decoding sequences of ~1,500 tokens, a bf16
#   cache's bytes alone put an H200's step near 10 ms, the TPOT target), then start to ready from a real checkpoint.
# run_o.sh holds issue 10's offline figures and the remaining serving ones.
source benchmarks/device/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date -u
export KILN_LOAD_FORMAT=dummy BATCH_SIZE=256 MAX_SEQ_LEN=2048 MAX_DEC_LEN=1024
[ $(left) -gt 80 ] && first_request
[ $(left) -gt 230 ] && COLD_TIMEOUT=220 bash benchmarks/device/run_serving.sh rates 2>&1 | grep -v "^tar"
[ $(left) -gt 130 ] && COLD_TIMEOUT=$(( $(left) > 200 ? 120 : $(left) - 70 )) bash benchmarks/device/run_serving.sh \
  one rate8_kvfp8 --request-rate 8 --num-prompts 400 --server-env KILN_KV_CACHE_DTYPE=fp8 2>&1 | grep -v "^tar"
[ $(left) -gt 100 ] && bash benchmarks/device/run_serving.sh warm 2>&1 | grep -v "^tar"
grep -h "after ready" $R/*.server.log 2>/dev/null | cut -c1-400 | sort | uniq -c | sort -rn | head -6
tar czf $OUT/run_n.tgz -C $OUT r
