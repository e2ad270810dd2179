#!/usr/bin/env bash
# Device run A (one call of the device tool, repository root): correctness on the GPU of async scheduling and
# the skinny matmul, the skinny tile sweep, then the A/B engine runs. Logs under $OUT/r, packed in run_a.tgz
# (as run, the logs went to $OUT itself, and only 8 of its files came back).
source benchmarks/device/common.sh
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
timeout 150 python3 -m pytest -q -x -p no:cacheprovider -W ignore -n 8 tests/kernels/test_kernels.py -k "skinny or w8a16" \
  2>&1 | tail -3
timeout 150 python3 -m pytest -q -p no:cacheprovider -W ignore tests/unit/test_async_scheduling.py \
  tests/kernels/test_triton_backend.py 2>&1 | tail -3
timeout 120 python3 benchmarks/gpu_parity.py --out $R/parity.json > $R/parity.log 2>&1; tail -1 $R/parity.log
timeout 150 python3 benchmarks/kernels/bench_kernels.py --only skinny --sweep --json $R/skinny.json \
  > $R/skinny.log 2>&1; grep -E "measured ceilings|best" $R/skinny.log
for v in "off 0" "on 0" "on 8"; do set -- $v
  KILN_SKINNY_MAX_T=$2 timeout 60 $L --batch-size 1 --input-len 128 --output-len 256 --max-num-seqs 8 \
    --async-scheduling $1 --output-json $R/b1_$1_$2.json > $R/b1_$1_$2.log 2>&1
  echo "b1 async=$1 skinny=$2: $(python3 -c "import json;r=json.load(open('$R/b1_$1_$2.json'));print(round(r['output_tok_s'],1),'tok/s',round(r['decode_ms_per_step'],3),'ms/step')")"
done
KILN_SKINNY_MAX_T=8 timeout 60 $L --batch-size 1 --input-len 128 --output-len 256 --max-num-seqs 8 --iters 1 \
  --profile $R/prof_b1.txt > /dev/null 2>&1; head -1 $R/prof_b1.txt
for a in off on; do
  timeout 90 $L --batch-size 256 --input-len 1000 --output-len 200 --max-num-seqs 256 --iters 1 --warmup-iters 0 \
    --async-scheduling $a --profile $R/prof_b256_$a.txt > $R/b256_$a.log 2>&1; head -1 $R/prof_b256_$a.txt
done
for a in off on; do
  timeout 90 $B throughput --preset llama3-8b --num-prompts 256 --input-len 512 --output-len 256 \
    --async-scheduling $a --output-json $R/t256_$a.json > $R/t256_$a.log 2>&1
  echo "256x512/256 async=$a: $(python3 -c "import json;r=json.load(open('$R/t256_$a.json'));print(round(r['output_tok_s']),'tok/s',round(r['total_s'],2),'s, preemptions',r['preemptions'])")"
done
tar czf $OUT/run_a.tgz -C $OUT r
