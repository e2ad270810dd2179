#!/usr/bin/env bash
# Start Kiln in the background, the seed's way: every setting comes from the environment (the seed's variable
# names, see docs/configuration.md), extra arguments are passed to `kiln serve` as flags, and the output goes
# to $FD_LOG_DIR/console.log (FD_LOG_DIR defaults to ./log; server.log and requests.log are written there too).
#
#   bash scripts/start_server.sh [kiln serve flags...]
#
# It waits until the service reports ready (or has died: then it prints the end of the log and exits 1).
#   KILN_START_WAIT   seconds to wait for ready (default 600; 0: return at once)
#   KILN_BIN          the kiln command to run; else KILN_PYTHON -m kiln.entrypoints.cli when KILN_PYTHON is
#                     set; else `kiln` on PATH; else python3 -m kiln.entrypoints.cli
# Stop it with: bash scripts/stop_server.sh [timeout_s]
set -u
. "$(dirname "$0")/common.sh"

FD_LOG_DIR=${FD_LOG_DIR:-log}
export FD_LOG_DIR
WAIT=${KILN_START_WAIT:-600}
mkdir -p "$FD_LOG_DIR" || { echo "start_server.sh: cannot create FD_LOG_DIR=$FD_LOG_DIR" >&2; exit 1; }
PID_FILE=$(kiln_pid_file)
CONSOLE="$FD_LOG_DIR/console.log"

if OLD=$(kiln_running_pid "$PID_FILE"); then
    echo "start_server.sh: Kiln is already running (pid $OLD); stop it first: bash scripts/stop_server.sh" >&2
    exit 1
fi
rm -f "$PID_FILE"

if [ -n "${KILN_BIN:-}" ]; then
    CMD=("$KILN_BIN" serve)
elif [ -n "${KILN_PYTHON:-}" ]; then
    CMD=("$KILN_PYTHON" -m kiln.entrypoints.cli serve)
elif command -v kiln >/dev/null 2>&1; then
    CMD=(kiln serve)
else
    CMD=("${KILN_PYTHON:-python3}" -m kiln.entrypoints.cli serve)
fi

touch "$CONSOLE"
START_LINE=$(($(wc -l < "$CONSOLE") + 1))
# A session of its own: the service's processes form one process group, which stop_server.sh signals
# (like Ctrl-C in a terminal) and, past its timeout, kills.
setsid "${CMD[@]}" "$@" >> "$CONSOLE" 2>&1 < /dev/null &
PID=$!
echo "$PID" > "$PID_FILE"
echo "Kiln starting (pid $PID); logs: $CONSOLE, $FD_LOG_DIR/server.log, $FD_LOG_DIR/requests.log"

[ "$WAIT" = "0" ] && exit 0
SECONDS=0
while [ "$SECONDS" -lt "$WAIT" ]; do
    if ! kill -0 "$PID" 2>/dev/null; then
        wait "$PID" 2>/dev/null
        CODE=$?
        echo "start_server.sh: Kiln exited during start-up (exit code $CODE):" >&2
        tail -n +"$START_LINE" "$CONSOLE" | tail -n 20 >&2
        rm -f "$PID_FILE"
        exit 1
    fi
    if tail -n +"$START_LINE" "$CONSOLE" | grep -q "Kiln is ready"; then
        tail -n +"$START_LINE" "$CONSOLE" | grep "Kiln is ready" | tail -n 1 | sed 's/^.*kiln.serve: //'
        exit 0
    fi
    sleep 1
done
echo "start_server.sh: Kiln (pid $PID) is not ready after ${WAIT} s; it keeps starting in the background (see $CONSOLE)" >&2
exit 1
