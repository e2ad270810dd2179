#!/usr/bin/env bash
# Device run X (one call, carrying .whl, ~2.5 minutes): decode attention at batch 1, partitions and tiles
# (benchmarks/decode_b1_bench.py): run W had it at 7.15 us a layer, the largest of batch 1's small kernels; the
# engine at batch 1 with partitions of one tile (KILN_DECODE_MIN_TILES=1) against two; the GEMV's K split per
# projection (run W: qkv, o and down at 70-84% of the copy rate, ~15 us a layer over it); the GEMV loading its
# first weights before the PDL wait (KILN_W8_GEMV_EARLY=1).
source benchmarks/device/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date -u
timeout 120 python3 benchmarks/decode_b1_bench.py 2>&1 | tail -6
timeout 90 python3 benchmarks/w8_gemv_bench.py --configs default gemv:8,256,1,1 gemv:8,256,2,1 gemv:8,256,8,1 \
  gemv:8,512,2,1 gemv:16,256,2,2 2>&1 | cut -c1-200 | tail -6
b1 w8a16 --quantization w8a16
(export KILN_DECODE_MIN_TILES=1; b1 w8a16-part1 --quantization w8a16)
(export KILN_W8_GEMV_EARLY=1; b1 w8a16-early --quantization w8a16)
