#!/usr/bin/env bash
# Stop the Kiln started by scripts/start_server.sh, gracefully: the whole service gets SIGINT (as Ctrl-C would
# give it): it stops accepting, lets running requests finish, then exits. What is still alive after the
# timeout is killed.
#
#   bash scripts/stop_server.sh [timeout_s]      (default 300; uses $FD_LOG_DIR/kiln.pid, FD_LOG_DIR default ./log)
set -u

TIMEOUT=${1:-300}
case "$TIMEOUT" in
    ''|*[!0-9]*) echo "stop_server.sh: timeout must be a whole number of seconds, got '$TIMEOUT'" >&2; exit 2 ;;
esac
FD_LOG_DIR=${FD_LOG_DIR:-log}
PID_FILE="$FD_LOG_DIR/kiln.pid"

if [ ! -f "$PID_FILE" ]; then
    echo "Kiln is not running (no $PID_FILE)"
    exit 0
fi
PID=$(cat "$PID_FILE")
if [ -z "$PID" ] || ! kill -0 "$PID" 2>/dev/null || ! grep -qa kiln "/proc/$PID/cmdline" 2>/dev/null; then
    echo "Kiln is not running (stale $PID_FILE)"
    rm -f "$PID_FILE"
    exit 0
fi
PGID=$(ps -o pgid= -p "$PID" | tr -d ' ')

alive() {
    if [ "$PGID" = "$PID" ]; then kill -0 -- "-$PGID" 2>/dev/null; else kill -0 "$PID" 2>/dev/null; fi
}

echo "Stopping Kiln (pid $PID), waiting up to ${TIMEOUT} s for running requests"
if [ "$PGID" = "$PID" ]; then kill -INT -- "-$PGID"; else kill -INT "$PID"; fi
SECONDS=0
while alive && [ "$SECONDS" -lt "$TIMEOUT" ]; do
    sleep 1
done
if alive; then
    echo "Kiln did not stop within ${TIMEOUT} s; killing what is left" >&2
    if [ "$PGID" = "$PID" ]; then kill -KILL -- "-$PGID" 2>/dev/null; else kill -KILL "$PID" 2>/dev/null; fi
    sleep 1
fi
rm -f "$PID_FILE"
echo "Kiln stopped"
