#!/usr/bin/env bash
# Device run F (2026-12-05 session 2; one call, repository root, carrying .whl): the first GPU run after the CPU-only
# session. Correctness of everything that changed since the last GPU run (kernel tests at real shapes, greedy
# parity with transformers, the never-run CUDA branch of w8a8_linear), then issue 11's cold serving figures.
source benchmarks/device/common.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; git rev-parse --short HEAD 2>/dev/null
X=""; python3 -c "import xdist" 2>/dev/null && X="-n 8"
timeout 170 python3 -m pytest -q -p no:cacheprovider -W ignore $X tests/kernels 2>&1 | tail -4
timeout 100 python3 benchmarks/gpu_parity.py --out $R/parity.json > $R/parity.log 2>&1; tail -2 $R/parity.log
timeout 60 python3 - <<'PY'
import torch
from kiln.quantization import ops as q
torch.manual_seed(0)
for scheme in ("w8a8-int8", "w8a8-fp8"):
    dt = q.code_dtype(scheme)
    w = torch.randn(6144, 4096) * 0.02
    qw, ws = q.quantize_weight(w, dt)
    for m in (1, 16, 17, 64, 256):
        x = torch.randn(m, 4096).bfloat16()
        ref = q.w8a8_linear(x.float(), qw, ws, None)          # CPU reference path (same codes)
        try:
            y = q.w8a8_linear(x.cuda(), qw.cuda(), ws.cuda(), None).float().cpu()
            err = ((y - ref).norm() / ref.norm()).item()
            print(f"w8a8 {scheme} M={m}: rel err vs CPU {err:.2e}")
        except Exception as e:
            print(f"w8a8 {scheme} M={m}: FAILED {type(e).__name__}: {str(e)[:200]}")
PY
COLD_TIMEOUT=150 bash benchmarks/device/run_serving.sh cold 2>&1 | grep -v "^tar"
tar czf $OUT/run_f.tgz -C $OUT r
