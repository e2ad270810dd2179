#!/usr/bin/env bash
# Device run X2 (run X trimmed to the session's last ~250 s of device time, carrying .whl, ~2 minutes): decode
# attention at batch 1 per partition and tile (benchmarks/decode_b1_bench.py), the engine at batch 1 (w8a16) with
# one-tile partitions (KILN_DECODE_MIN_TILES=1) and with the GEMV's first weights loaded before the PDL wait
# (KILN_W8_GEMV_EARLY=1), each against the default.
source benchmarks/device/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date -u
timeout 60 python3 benchmarks/decode_b1_bench.py --ctx 128 384 4096 2>&1 | tail -4
b1 w8a16 --quantization w8a16
(export KILN_DECODE_MIN_TILES=1; b1 w8a16-part1 --quantization w8a16)
(export KILN_W8_GEMV_EARLY=1; b1 w8a16-early --quantization w8a16)
