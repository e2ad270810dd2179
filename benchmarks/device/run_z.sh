#!/usr/bin/env bash
# Device run Z (one call, ~2.5 minutes, carrying .whl; any card): decode attention at batch 1 after run Y (a sequence
# whose context fits one partition writes its output directly; the merge takes 4 partitions a step), per partition
# (benchmarks/decode_b1_bench.py), and the engine at batch 1 with two-tile (default) and one-tile partitions
# (KILN_DECODE_MIN_TILES=1) at 128 in / 256 out and at ~4k context; the kernel tests of the decode and RoPE-with-cache
# kernels first. Then the batch-1 GEMV loading each block's weights a step ahead (KILN_W8_GEMV_PREFETCH: the
# projections over 8 layers, and the engine); the LM head in int8 (--quantize-lm-head), and all of them together.
source benchmarks/device/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date -u
timeout 60 python3 -m pytest -q -p no:cacheprovider -W ignore --tb=line tests/kernels/test_kernels.py \
  tests/kernels/test_triton_backend.py tests/kernels/test_variants.py -k "rope or mixed or decode" 2>&1 \
  | grep -E "^E |Error|passed|failed" | cut -c1-300 | head -6
timeout 40 python3 benchmarks/decode_b1_bench.py --ctx 128 384 4096 2>&1 | tail -4
b1 w8a16 --quantization w8a16
(export KILN_DECODE_MIN_TILES=1; b1 w8a16-part1 --quantization w8a16)
for t in 2 1; do
  KILN_DECODE_MIN_TILES=$t timeout 60 $L --batch-size 1 --input-len 3968 --output-len 128 --max-num-seqs 8 \
    --output-json $R/b1_4k_t$t.json --quantization w8a16 > $R/b1_4k_t$t.log 2>&1
  echo "b1 4k context, min tiles $t: $(j $R/b1_4k_t$t.json output_tok_s decode_ms_per_step)"
done
timeout 90 python3 benchmarks/w8_gemv_bench.py --configs default gemv:8,256,4,1,1 gemv:8,512,4,1,1 \
  gemv:8,256,2,1,1 gemv:8,128,4,1,1 2>&1 | tail -6
(export KILN_W8_GEMV_PREFETCH=1; b1 w8a16-prefetch --quantization w8a16)
(export KILN_W8_GEMV_PREFETCH=1 KILN_DECODE_MIN_TILES=1; b1 w8a16-prefetch-part1 --quantization w8a16)
b1 w8a16-head --quantization w8a16 --quantize-lm-head
(export KILN_W8_GEMV_PREFETCH=1 KILN_DECODE_MIN_TILES=1; b1 w8a16-all --quantization w8a16 --quantize-lm-head)
(export KILN_W8_GEMV_PREFETCH=1 KILN_DECODE_MIN_TILES=1; b1 fp8-all --quantization w8a8-fp8 --quantize-lm-head)
