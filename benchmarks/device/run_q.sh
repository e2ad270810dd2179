#!/usr/bin/env bash
# Device run Q (one call, ~2 min, carrying .whl): where the native API's remaining step time goes (run P: native
# TPOT 11.24 ms against OpenAI's 10.20 at 64 streams). 1. which ops of a steady async step synchronize the host with
# the GPU, per sampling variant; 2. the sampler's host and device time per variant at 64 and 256 rows, 128k vocab.
source benchmarks/device/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date -u
timeout 120 python3 benchmarks/device/sync_check.py 2>&1 | grep -v Warning | tail -40
timeout 120 python3 benchmarks/sampler_bench.py 2>&1 | tail -20
