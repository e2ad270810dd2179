#!/usr/bin/env bash
# Stop the Kiln started by scripts/serve.sh or scripts/start_server.sh (both record the `kiln serve` supervisor's
# pid in $FD_LOG_DIR/kiln.pid; FD_LOG_DIR defaults to ./log, from the directory you run this in), gracefully:
# the supervisor gets SIGTERM, stops accepting, lets running requests finish (up to KILN_SHUTDOWN_TIMEOUT,
# default 300 s), then stops the engine and the other processes. Whatever is still alive after the timeout is
# killed (SIGKILL), so no process is left behind.
#
#   bash scripts/stop_server.sh [timeout_s]     default: KILN_SHUTDOWN_TIMEOUT (300) + 30 s for the engine to stop
#
# A pid file whose process is gone (or is not a Kiln) is reported as stale and removed.
set -u
. "$(dirname "$0")/common.sh"

TIMEOUT=${1:-}
if [ -z "$TIMEOUT" ]; then
    SHUTDOWN=${KILN_SHUTDOWN_TIMEOUT:-300}
    SHUTDOWN=${SHUTDOWN%%.*}
    case "$SHUTDOWN" in ''|*[!0-9]*) SHUTDOWN=300 ;; esac
    TIMEOUT=$((SHUTDOWN + 30))
fi
case "$TIMEOUT" in
    ''|*[!0-9]*) echo "stop_server.sh: timeout must be a whole number of seconds, got '$TIMEOUT'" >&2; exit 2 ;;
esac
PID_FILE=$(kiln_pid_file)

if [ ! -f "$PID_FILE" ]; then
    echo "Kiln is not running (no $PID_FILE)"
    exit 0
fi
if ! PID=$(kiln_running_pid "$PID_FILE"); then
    echo "Kiln is not running: stale pid file $PID_FILE (pid $(head -c 20 "$PID_FILE") is not a running kiln serve); removed it"
    rm -f "$PID_FILE"
    exit 0
fi
# Everything the service started, taken now: once the supervisor is gone its children are no longer its
# children. Its own process group too, when it leads one (start_server.sh and serve.sh start it that way).
PROCS="$PID $(kiln_descendants "$PID" | tr '\n' ' ')"
PGID=$(ps -o pgid= -p "$PID" | tr -d ' ')

# the pids of PROCS and of the supervisor's process group (when it leads one) that are still alive
left() {
    local p
    { for p in $PROCS; do echo "$p"; done
      [ "$PGID" = "$PID" ] && ps -eo pid=,pgid= | awk -v g="$PGID" '$2 == g {print $1}'; } | sort -u | while read -r p; do
        kiln_live "$p" && echo "$p"
    done
}
alive() { [ -n "$(left)" ]; }

echo "Stopping Kiln (pid $PID), waiting up to ${TIMEOUT} s for running requests to finish"
kill -TERM "$PID"
SECONDS=0
while alive && [ "$SECONDS" -lt "$TIMEOUT" ]; do
    sleep 0.5
done
if alive; then
    echo "Kiln did not stop within ${TIMEOUT} s; killing what is left" >&2
    for p in $(left); do kill -KILL "$p" 2>/dev/null; done
    sleep 1
fi
# the script that started it removes the file itself when it can (serve.sh); start_server.sh cannot
if [ "$(cat "$PID_FILE" 2>/dev/null)" = "$PID" ]; then rm -f "$PID_FILE"; fi
echo "Kiln stopped"
