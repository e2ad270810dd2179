#!/usr/bin/env bash
# Set up (first run only) and run the whole test suite; the 15 slowest tests are listed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh
bash scripts/setup.sh
# convert the bundled GGUF once up front, so no test pays for it inside its own time limit (the conversion
# prints its own progress when it has work to do)
.venv/bin/python -c "from kiln.models.default_model import default_model_dir; print('default model:', default_model_dir())"
# no GPU: the Triton kernel tests run in Triton's CPU interpreter (set before anything imports triton)
if ! command -v nvidia-smi >/dev/null 2>&1; then
  export TRITON_INTERPRET=1
fi
say "running the test suite (pytest; about 15 minutes on 2 CPU cores with AVX2 only, less with AVX-512)"
exec .venv/bin/python -m pytest -q -ra --durations=15 "$@"
