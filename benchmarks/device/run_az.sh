#!/usr/bin/env bash
# Device run AZ (one call, up to BUDGET_S seconds (default 400), carrying .whl): run AY's scoring figures again after
# token_logprobs (kiln/engine/sampler.py: a float32 log-sum-exp less the raw logits, top k on the raw logits, a max
# for k = 1, instead of a [rows, vocab] log-softmax written and read back). The sampler's and prompt logprobs'
# tests on CUDA first.
source benchmarks/device/common.sh
BUDGET_S=${BUDGET_S:-400}
gpu_state; date -u
timeout 150 python3 -m pytest -q -p no:cacheprovider -W ignore --tb=short -rf tests/unit/test_prompt_logprobs.py \
  tests/unit/test_sampling.py 2>&1 | grep -E "Error|^FAILED|passed|failed" | head
score_runs 80
gpu_state; echo "left: $(left) s"
