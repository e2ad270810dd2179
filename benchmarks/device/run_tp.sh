#!/usr/bin/env bash
# Device run TP (issue 13; one call of the device tool on a machine of N GPUs, repository root, carrying .whl):
#   N=2 bash benchmarks/device/run_tp.sh        (N: MP_NUM, default 2; the GPUs visible must be >= N)
# 1. interconnect (nvidia-smi topo -m); 2. CPU-side TP tests on the GPUs' host (gloo) and greedy agreement of
# MP_NUM=N with MP_NUM=1 on a Llama-3-8B-shaped checkpoint (random weights, written once); 3. batch-1 decode and
# 4. 1000 x (in 1000 / out 1000) offline, MP_NUM=1 and N, with the ratio (targets: >= 1.6x and >= 1.7x at N=2);
# 5. a Llama-3-70B shape at batch 1 against the floor of its per-GPU weight bytes (target: >= 80% of the HBM
# bandwidth in --hbm-gbs), and 6. served at concurrency 64. Logs under $OUT/r, packed in run_tp.tgz.
# Not run yet (written 2026-12-05 without GPUs).
source benchmarks/device/common.sh
N=${N:-2}
HBM_GBS=${HBM_GBS:-3350}  # H100 SXM HBM3 (H200: 4800)
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
nvidia-smi topo -m | tee $R/topo.txt
echo "GPUs visible: $(python3 -c 'import torch;print(torch.cuda.device_count())'), MP_NUM=$N"

timeout 300 python3 -m pytest -q -p no:cacheprovider -W ignore tests/parity/test_tensor_parallel.py 2>&1 | tail -3
[ -f /tmp/m8w/config.json ] || $B write-checkpoint --preset llama3-8b --out /tmp/m8w > /dev/null
timeout 400 python3 benchmarks/tp_parity.py --model /tmp/m8w --mp-num $N --out $R/tp_parity.json > $R/tp_parity.log 2>&1
tail -1 $R/tp_parity.log

ratio() { python3 -c "import json,sys;a,b=(json.load(open(f)) for f in sys.argv[1:3]);k=sys.argv[3];print(f'{k}: MP_NUM=1 {a[k]:.4g}, MP_NUM=$N {b[k]:.4g}, x{b[k]/a[k]:.2f}')" "$@"; }
for n in 1 $N; do
  timeout 120 $L --batch-size 1 --input-len 128 --output-len 256 --max-num-seqs 8 --mp-num $n \
    --output-json $R/b1_tp$n.json > $R/b1_tp$n.log 2>&1
done
ratio $R/b1_tp1.json $R/b1_tp$N.json decode_tok_s
for n in 1 $N; do
  timeout 400 $B throughput --preset llama3-8b --num-prompts 1000 --input-len 1000 --output-len 1000 --mp-num $n \
    --output-json $R/t1000_tp$n.json > $R/t1000_tp$n.log 2>&1
done
ratio $R/t1000_tp1.json $R/t1000_tp$N.json output_tok_s

# 70B shape (dummy weights: a checkpoint is not needed for speed); the floor of a decode step is one read of a
# GPU's share of the weights at the HBM bandwidth
timeout 300 $B latency --preset llama3-70b --batch-size 1 --input-len 128 --output-len 128 --max-num-seqs 8 \
  --mp-num $N --iters 2 --output-json $R/b1_70b_tp$N.json > $R/b1_70b_tp$N.log 2>&1
python3 - $R/b1_70b_tp$N.json $N $HBM_GBS <<'PY'
import json, sys
import torch
from kiln.engine.tp import weight_bytes_per_rank
from kiln.entrypoints.bench import PRESETS
from kiln.models.config import ModelConfig
r, n, hbm = json.load(open(sys.argv[1])), int(sys.argv[2]), float(sys.argv[3])
per_gpu = weight_bytes_per_rank(ModelConfig.from_dict(PRESETS["llama3-70b"]), n, torch.bfloat16, None)
floor_ms = per_gpu / (hbm * 1e9) * 1e3
print(f"70B shape, MP_NUM={n}, batch 1: {r['decode_ms_per_step']:.2f} ms/step; floor {floor_ms:.2f} ms "
      f"({per_gpu / 2**30:.1f} GiB per GPU at {hbm:.0f} GB/s): {100 * floor_ms / r['decode_ms_per_step']:.0f}% of it")
PY

[ -d /tmp/m70 ] || $B write-checkpoint --preset llama3-70b --out /tmp/m70 --no-weights > /dev/null
MP_NUM=$N KILN_LOAD_FORMAT=dummy MODEL_DIR=/tmp/m70 BATCH_SIZE=64 MAX_SEQ_LEN=2048 MAX_DEC_LEN=1024 GRPC_PORT=-1 \
  serve_bg $R/serve_70b_tp$N.log
for i in $(seq 300); do
  python3 -c "import urllib.request as u;u.urlopen('http://127.0.0.1:8110/v2/health/ready')" 2>/dev/null && break
  sleep 1
done
echo "70B server ready after ${i}s"; grep -E "memory plan|KV cache:" $R/serve_70b_tp$N.log
serve_c64 serve_70b_tp$N
stop_server
tar czf $OUT/run_tp.tgz -C $OUT r
