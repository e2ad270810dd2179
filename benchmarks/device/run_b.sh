#!/usr/bin/env bash
# Device run B (carrying .whl): engine correctness on the GPU, then the benchmark workloads.
# (The server in this run failed to start: fastapi 0.165 imports opentelemetry-api, which was not carried yet.)
source benchmarks/device/common.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 120 python3 benchmarks/gpu_parity.py --out $R/parity.json > $R/parity.log 2>&1; tail -1 $R/parity.log
for s in 8 0; do
  KILN_SKINNY_MAX_T=$s timeout 50 $L --batch-size 1 --input-len 128 --output-len 256 --max-num-seqs 8 \
    --output-json $R/b1_skinny$s.json > $R/b1_skinny$s.log 2>&1
  echo "b1 skinny<=$s: $(j $R/b1_skinny$s.json output_tok_s decode_ms_per_step)"
done
start_server $R/serve.log; serve_c64 serve; stop_server
timeout 150 $B throughput --preset llama3-8b --num-prompts 1000 --input-len 1000 --output-len 1000 \
  --output-json $R/t1000.json > $R/t1000.log 2>&1
echo "1000x1000: $(j $R/t1000.json output_tok_s total_s preemptions kv_blocks)"
timeout 70 $L --batch-size 64 --input-len 512 --output-len 128 --max-num-seqs 64 --iters 1 \
  --gpu-memory-utilization 0.6 --compare-hf --output-json $R/b64.json > $R/b64.log 2>&1
echo "b64: $(j $R/b64.json output_tok_s decode_ms_per_step hf_generate_output_tok_s speedup_vs_hf)"
timeout 170 $B throughput --preset llama3-8b --num-prompts 256 --input-len 512 --output-len 256 --compare-hf \
  --output-json $R/t256.json > $R/t256.log 2>&1
echo "256x512/256: $(j $R/t256.json output_tok_s total_s hf_generate_batch_output_tok_s speedup_vs_hf_generate_batch hf_generate_batch_error)"
tar czf $OUT/run_b.tgz -C $OUT r
