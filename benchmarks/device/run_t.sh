#!/usr/bin/env bash
# Device run T (one call, carrying .whl): run S (the nucleus search's timing, ~40 s), then on an H200 only, issue
# 11's serving targets (run N, BUDGET_S seconds, default 520). On an H100 it stops after run S.
bash benchmarks/device/run_s.sh
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  BUDGET_S=${BUDGET_S:-520} bash benchmarks/device/run_n.sh
fi
