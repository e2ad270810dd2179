#!/usr/bin/env bash
# Device run AK (one call, up to BUDGET_S seconds (default 570), carrying .whl; an H200 preferred, any card): the
# tenth session's last change on a GPU, then issue 10's H200 figures with every change since the eighth session.
# 1. tests/kernels/test_w8a8.py at every shape (~55 s on an H100): the producers' quantization, the int8 gate/up
#    epilogue in the SwiGLU kernel (built at the end of the tenth session, never run on a GPU), the padding.
# 2. batch-256 step, w8a8-int8 + int8 cache, the fusion on / off (KILN_FUSE_INPUT_QUANT; run AF on an H100 before
#    the int8 epilogue moved: 13.24 / 13.37 ms).
# 3. 1000 x 1000, w8a8-fp8 + fp8 cache, the defaults (auto reserve, rows padded to 128; run AH on an H100: 12,740).
# 4. on an H200 only: the batch-256 fp8 step, the int8 1000 x 1000, the 8-bit decode grid (issue 10's targets).
source benchmarks/device/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date -u
timeout 150 python3 -m pytest -q -p no:cacheprovider -W ignore --tb=line -rf tests/kernels/test_w8a8.py 2>&1 \
  | grep -E "^FAILED|passed|failed" | cut -c1-200 | head -12
for f in 1 0; do
  KILN_FUSE_INPUT_QUANT=$f b256 int8-kv8-fuse$f --quantization w8a8-int8 --kv-cache-dtype int8
done
t1000 fp8-kvfp8 --quantization w8a8-fp8 --kv-cache-dtype fp8 --max-num-seqs 1024
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  b256 fp8-kvfp8 --quantization w8a8-fp8 --kv-cache-dtype fp8
  t1000 int8-kv8 --quantization w8a8-int8 --kv-cache-dtype int8 --max-num-seqs 1024
  timeout 60 python3 benchmarks/kernels/bench_kernels.py --sweep --only decode8 > $R/decode8.log 2>&1
  grep -E "decode8|best" $R/decode8.log | tail -6 | cut -c1-200
fi
tar czf $OUT/run_ak.tgz -C $OUT r
