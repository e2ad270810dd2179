#!/usr/bin/env bash
# The next device call (carrying .whl; BUDGET_S as the call allows): on an H200, issue 10's figures (run_as.sh,
# ~570 s); on an H100, run MOE (run_moe.sh: mixtures of experts on a GPU, checked and timed).
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  exec bash benchmarks/device/run_as.sh
fi
exec bash benchmarks/device/run_moe.sh
