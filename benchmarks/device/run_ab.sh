#!/usr/bin/env bash
# Device run AB (one call, ~5-8 minutes, carrying .whl; any card, an H200 preferred): V's 8-bit codes widened to
# fp16 as loaded (WIDE_V, 2026-12-07 ninth session; unmeasured): sm_90 SASS puts the 8-bit decode loop at 1,344
# (fp8) / 1,535 (int8) instructions a 128-token tile, 954 / 995 with it (the P.V operand's transpose was a byte
# load per code). Its kernel tests (the inline PTX runs only here), the decode8 grid with and without it, the
# batch-256 step with each 8-bit cache default against KILN_DECODE_WIDE_V=1, then 1000 x 1000 w8a8-fp8 + fp8 cache
# with it as time allows (t1000 checks what is left).
source benchmarks/device/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date -u
timeout 150 python3 -m pytest -q -p no:cacheprovider -W ignore --tb=line tests/kernels/test_kernels.py \
  -k "8bit or int8_cache or widen or paged_decode" 2>&1 | grep -E "^E |Error|passed|failed" | cut -c1-300 | head -8
timeout 200 python3 benchmarks/kernels/bench_kernels.py --sweep --only decode8 --json $R/decode8.json \
  > $R/decode8.log 2>&1
grep -E "best decode8|cfg=|failed|default config" $R/decode8.log | cut -c1-170
b256 fp8-kvfp8 --quantization w8a8-fp8 --kv-cache-dtype fp8
(export KILN_DECODE_WIDE_V=1; b256 fp8-kvfp8-wide --quantization w8a8-fp8 --kv-cache-dtype fp8)
b256 int8-kv8 --quantization w8a8-int8 --kv-cache-dtype int8
(export KILN_DECODE_WIDE_V=1; b256 int8-kv8-wide --quantization w8a8-int8 --kv-cache-dtype int8)
(export KILN_DECODE_WIDE_V=1; t1000 fp8-kvfp8-wide --quantization w8a8-fp8 --kv-cache-dtype fp8 --max-num-seqs 1024)
tar czf $OUT/run_ab.tgz -C $OUT r
