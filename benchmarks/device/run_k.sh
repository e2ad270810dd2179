#!/usr/bin/env bash
# Device run K (one call, repository root, carrying .whl; ~8 minutes), most wanted first, after run J's fixes:
#   the kernel tests at every shape (run J: 109 W8A8 failures, fixed since), the 8-bit decode config grid (int8
#   tiles back in q's dtype, fp8 in fp16), batch 1 per weight format (the gate fusion reverted), the first request
#   after ready (HTTP workers warm up now), the batch-256 step with int8 W8A8 (it did not compile before) and
#   FP8, and 1000 x 1000 offline with FP8 weights and an fp8 cache at batch <= 512. run_l.sh holds the serving loads.
source benchmarks/device/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; git rev-parse --short HEAD 2>/dev/null; date -u
kernel_tests
b1 bf16; b1 w8a16 --quantization w8a16; b1 fp8 --quantization w8a8-fp8; b1 int8 --quantization w8a8-int8
first_request
timeout 100 python3 benchmarks/kernels/bench_kernels.py --sweep --only decode8 --json $R/decode8.json > $R/decode8.log 2>&1
grep -E "best decode8|B=256.*cfg=\(128, 4, 2\)|failed" $R/decode8.log | cut -c1-160
b256 fp8-kvfp8 --quantization w8a8-fp8 --kv-cache-dtype fp8; b256 int8-kv8 --quantization w8a8-int8 --kv-cache-dtype int8
b256 kv8 --kv-cache-dtype int8
timeout 170 $B throughput --preset $PRESET --num-prompts 1000 --input-len 1000 --output-len 1000 \
  --quantization w8a8-fp8 --kv-cache-dtype fp8 --max-num-seqs 512 --output-json $R/t1000_fp8.json > $R/t1000_fp8.log 2>&1
echo "1000x1000 w8a8-fp8 + fp8 KV, batch <= 512: $(j $R/t1000_fp8.json output_tok_s total_s preemptions kv_blocks)"
grep -m2 -E "KV cache:|Error" $R/t1000_fp8.log | cut -c1-300
tar czf $OUT/run_k.tgz -C $OUT r
