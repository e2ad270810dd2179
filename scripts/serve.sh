#!/usr/bin/env bash
# Set up (first run only) and start the server in the foreground on the bundled default model.
# Configuration: the seed's environment variables (see docs/configuration.md) or `kiln serve --help` flags.
# Stop it with Ctrl-C, or from another shell with: bash scripts/stop_server.sh
# The supervisor's pid goes to $FD_LOG_DIR/kiln.pid (FD_LOG_DIR default ./log, from where this was run), the
# same file scripts/start_server.sh writes, and is removed when the server exits.
set -euo pipefail
KILN_CALLER_DIR=$PWD
cd "$(dirname "$0")/.."
. scripts/common.sh
bash scripts/setup.sh
PID_FILE=$(kiln_pid_file)
mkdir -p "$(dirname "$PID_FILE")"
if OLD=$(kiln_running_pid "$PID_FILE"); then
  echo "serve.sh: Kiln is already running (pid $OLD); stop it first: bash scripts/stop_server.sh" >&2
  exit 1
fi
if [ -n "${FD_LOG_DIR:-}" ] && [ "${FD_LOG_DIR#/}" = "$FD_LOG_DIR" ]; then
  export FD_LOG_DIR="$KILN_CALLER_DIR/$FD_LOG_DIR"      # the server runs from the repository root
elif [ -z "${FD_LOG_DIR:-}" ]; then
  export FD_LOG_DIR="$KILN_CALLER_DIR/log"
fi
say "starting kiln serve (the first start converts the bundled model, then loads it; it says when it is ready)"
# Not exec'd: this shell stays to remove the pid file when the server exits. The server runs as a job of its
# own (set -m: its own process group, which stop_server.sh may kill as a whole; and SIGINT is not ignored in
# it, as it would be in a background job without job control); Ctrl-C and SIGTERM/SIGHUP sent here are passed on.
PID=
trap '[ -n "$PID" ] && kill -INT "$PID" 2>/dev/null' INT
trap '[ -n "$PID" ] && kill -TERM "$PID" 2>/dev/null' TERM HUP
trap '[ -n "$PID" ] && [ "$(cat "$PID_FILE" 2>/dev/null)" = "$PID" ] && rm -f "$PID_FILE"' EXIT
set -m
.venv/bin/kiln serve "$@" &
PID=$!
set +m
echo "$PID" > "$PID_FILE"
set +e
while :; do
  wait "$PID"
  CODE=$?
  kill -0 "$PID" 2>/dev/null || break     # wait was only interrupted by a signal
done
exit "$CODE"
