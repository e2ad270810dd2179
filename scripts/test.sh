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
# one pytest worker a core, at most 4 (KILN_TEST_WORKERS overrides; 0 runs in one process); a test file stays on
# one worker (--dist loadfile), so a module's server starts once
cores=$(.venv/bin/python -c "from kiln.threads import usable_cores; print(usable_cores())")
workers=${KILN_TEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}
[ "$workers" -le 1 ] && workers=0
say "running the test suite (pytest, $workers workers; about 9 minutes on 2 CPU cores with AVX2 only)"
exec .venv/bin/python -m pytest -q -ra --durations=15 -n "$workers" --dist loadfile "$@"
