#!/usr/bin/env bash
# Device run AY (one call, up to BUDGET_S seconds (default 560), carrying .whl; the H100 half of run_next.sh in the
# sixteenth session): prompt logprobs (OpenAI echo + logprobs, built on CPU this session) on a GPU. Their tests and
# the request totals' on CUDA, gpu_parity.py (now with prompt logprobs against transformers' log-softmax, in
# 512-token chunks and in one-token chunks beside decodes, which run on the decode CUDA graphs), then what scoring
# costs: 256 prompts of 1,000 tokens, one new token, without prompt logprobs and with 1 and 5 top logprobs a position
# (bench throughput --prompt-logprobs; the LM head then runs over every prompt row).
source benchmarks/device/common.sh
BUDGET_S=${BUDGET_S:-560}
gpu_state; date -u
timeout 200 python3 -m pytest -q -p no:cacheprovider -W ignore --tb=short -rf tests/unit/test_prompt_logprobs.py \
  tests/unit/test_request_totals.py 2>&1 | grep -E "Error|^FAILED|passed|failed" | head
timeout 200 python3 benchmarks/gpu_parity.py --out $R/parity.json > $R/parity.log 2>&1; tail -1 $R/parity.log | cut -c1-2000
score_runs 100
gpu_state; echo "left: $(left) s"
tar czf $OUT/run_ay.tgz -C $OUT r
