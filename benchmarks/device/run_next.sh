#!/usr/bin/env bash
# The next device call after the fourteenth session (carrying .whl; BUDGET_S as the call allows): on an H200, issue
# 10's figures (run_as.sh, ~570 s); on an H100, run AV (run_av.sh, ~4 minutes: the swapped bf16 tile checked on the
# GPU and timed in the engine), whose answer decides KILN_SKINNY_SWAP's default on any card.
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  exec bash benchmarks/device/run_as.sh
fi
exec bash benchmarks/device/run_av.sh
