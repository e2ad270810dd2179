#!/usr/bin/env bash
# Device run O (one call, up to BUDGET_S seconds (default 570), carrying .whl): issue 10's offline figures on an
# H200 (random Llama-3-8B shape), then issue 11's remaining serving ones, most wanted first, each part only if the
# time left allows it: 1000 x 1000 w8a8-fp8 + fp8 cache (target >= 18,000 out tok/s; batch <= 1,024: an H200's
# 8-bit cache holds about twice the H100's), the batch-256 step with FP8 (<= 11.5 ms), batch 1 W8A16 (>= 450
# tok/s) and bf16 with and without programmatic dependent launch (KILN_PDL=0: off; on by default), batch 1 FP8,
# the decode8 grid with the int8 Q.K^T experiment, 1000 x 1000 bf16 + fp8 cache and w8a8-int8 + int8 cache, then
# the three APIs at concurrency 64 (TPOT within 10%) and 1,000 requests all at once (bf16, >= 10,500 out tok/s).
# On an H100 (whose offline figures runs K-M have), only the batch-1 PDL A/B, the decode8 grid, the APIs and the burst
# (run O ran this branch on the tree of b51baad, PDL then off by default).
source benchmarks/device/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date -u
# b1_pdl_ab: batch-1 W8A16 and bf16 with programmatic dependent launch (the default on sm_90+ since run O on an H100:
# +3.7-3.9%) and without it (KILN_PDL=0), on this card
b1_pdl_ab() {
  b1 w8a16 --quantization w8a16
  (export KILN_PDL=0; b1 w8a16-nopdl --quantization w8a16)
  [ $(left) -gt 60 ] && b1 bf16 && (export KILN_PDL=0; b1 bf16-nopdl)
}
decode8() {  # the 8-bit decode grid, with the int8 cache's int8 Q.K^T experiment (config's 4th field)
  [ $(left) -gt 150 ] || return 0
  timeout 100 python3 benchmarks/kernels/bench_kernels.py --sweep --only decode8 --json $R/decode8.json \
    > $R/decode8.log 2>&1
  grep -E "best decode8|cfg=\(128, 4, 2|failed" $R/decode8.log | cut -c1-160
}
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  t1000 fp8-kvfp8 --quantization w8a8-fp8 --kv-cache-dtype fp8 --max-num-seqs 1024
  [ $(left) -gt 40 ] && b256 fp8-kvfp8 --quantization w8a8-fp8 --kv-cache-dtype fp8
  [ $(left) -gt 120 ] && b1_pdl_ab
  [ $(left) -gt 40 ] && b1 fp8 --quantization w8a8-fp8
  decode8
  t1000 bf16-kvfp8 --kv-cache-dtype fp8 --max-num-seqs 1024
  t1000 int8-kv8 --quantization w8a8-int8 --kv-cache-dtype int8 --max-num-seqs 1024
else  # an H100 (runs K-M measured its offline figures): what no run has measured yet, first
  b1_pdl_ab
  decode8
fi
[ $(left) -gt 200 ] && bash benchmarks/device/run_serving.sh apis 2>&1 | grep -v "^tar"
[ $(left) -gt 250 ] && COLD_TIMEOUT=220 bash benchmarks/device/run_serving.sh burst 2>&1 | grep -v "^tar"
tar czf $OUT/run_o.tgz -C $OUT r
