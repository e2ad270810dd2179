#!/usr/bin/env bash
# Device run Y (one call, ~4 minutes, carrying .whl; any card): the batch-1 gate/up GEMV that applies SwiGLU in its
# store (default since 2026-12-07) against SiLU-and-mul as its own kernel (KILN_W8_GEMV_GLU=0), W8A16 and FP8; RoPE
# in the cache write (KILN_FUSED_ROPE=0: its own kernel), W8A16 and bf16;
# run X's A/B knobs (KILN_DECODE_MIN_TILES=1, KILN_W8_GEMV_EARLY=1) and decode attention per partition at batch 1;
# the GEMV, RoPE-with-cache and decode kernel tests (the partitions now merged by their last program) at real shapes
# first.
source benchmarks/device/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date -u
timeout 100 python3 -m pytest -q -p no:cacheprovider -W ignore --tb=line tests/kernels/test_kernels.py \
  tests/kernels/test_triton_backend.py -k "gemv or rope or mixed or decode" 2>&1 | grep -E "^E |Error|passed|failed" | cut -c1-300 | head -6
b1 w8a16 --quantization w8a16
(export KILN_W8_GEMV_GLU=0; b1 w8a16-noglu --quantization w8a16)
(export KILN_FUSED_ROPE=0; b1 w8a16-norope --quantization w8a16)
(export KILN_FUSED_ROPE=0 KILN_W8_GEMV_GLU=0; b1 w8a16-neither --quantization w8a16)
b1 bf16
(export KILN_FUSED_ROPE=0; b1 bf16-norope)
b1 fp8 --quantization w8a8-fp8
(export KILN_W8_GEMV_GLU=0; b1 fp8-noglu --quantization w8a8-fp8)
(export KILN_DECODE_MIN_TILES=1; b1 w8a16-part1 --quantization w8a16)
(export KILN_W8_GEMV_EARLY=1; b1 w8a16-early --quantization w8a16)
timeout 60 python3 benchmarks/decode_b1_bench.py --ctx 128 384 4096 2>&1 | tail -4
b1 w8a16-again --quantization w8a16
