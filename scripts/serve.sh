#!/usr/bin/env bash
# Set up (first run only) and start the server in the foreground on the bundled default model.
# Configuration: the seed's environment variables (see docs/configuration.md) or `kiln serve --help` flags.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/kiln serve "$@"
