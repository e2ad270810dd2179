#!/usr/bin/env bash
# Device run AP (one short call, ~2 minutes, carrying .whl; any card): the twelfth session's last ~300 s of device
# time after starts that found no machine. The card's clocks and power, then the decode8 grid with the 64-token tiles
# over 2 warps and 32 over 1 (sm_90 SASS: 20-24% fewer warp instructions a token than the default's 64 over 4).
source benchmarks/device/common.sh
gpu_state; date -u
decode8_grid
gpu_state
