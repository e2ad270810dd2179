#!/usr/bin/env bash
# Device run Z2 (one call, ~2 minutes, carrying .whl; any card), after run Z: the RoPE-with-cache kernel test with
# its float32 tolerance of one rounding of the rotation's terms; the engine at batch 1 with the decode partition rule
# that run Z's figures chose (one-tile partitions while at most 16), at 128 in / 256 out and at ~4k context, w8a16
# with and without the int8 LM head, and w8a8-fp8 with it.
source benchmarks/device/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date -u
timeout 100 python3 -m pytest -q -p no:cacheprovider -W ignore --tb=line tests/kernels/test_kernels.py \
  -k "rope or decode" 2>&1 | grep -E "^E |Error|passed|failed" | cut -c1-300 | head -6
b1 w8a16 --quantization w8a16
b1 w8a16-head --quantization w8a16 --quantize-lm-head
b1 fp8-head --quantization w8a8-fp8 --quantize-lm-head
timeout 60 $L --batch-size 1 --input-len 3968 --output-len 128 --max-num-seqs 8 --output-json $R/b1_4k.json \
  --quantization w8a16 > $R/b1_4k.log 2>&1
echo "b1 4k context: $(j $R/b1_4k.json output_tok_s decode_ms_per_step)"
