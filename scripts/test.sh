#!/usr/bin/env bash
# Set up (first run only) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# convert the bundled GGUF once up front, so no test pays for it inside its own time limit
.venv/bin/python -c "from kiln.models.default_model import default_model_dir; print('default model:', default_model_dir())"
exec .venv/bin/python -m pytest -q -ra "$@"
