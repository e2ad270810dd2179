# Shared by the project's scripts (sourced, not run): talking set-up steps and the pid file of a running Kiln.

# say "what is being done"       prints "[kiln <script>] what is being done..." and starts the step's clock
# done_step                      prints "[kiln <script>] ... done in N s"
# Both go to stderr so that a script's stdout stays for its answer.
KILN_SCRIPT=${KILN_SCRIPT:-$(basename "${BASH_SOURCE[1]:-$0}" .sh)}
say() {
    STEP_START=$SECONDS
    echo "[kiln $KILN_SCRIPT] $*..." >&2
}
done_step() {
    echo "[kiln $KILN_SCRIPT] ... done in $((SECONDS - ${STEP_START:-$SECONDS})) s" >&2
}
# step "what is being done" CMD ARGS...: say it, run CMD with a "still ..." line every 8 s (a quiet pip install
# takes a minute), then done_step; returns CMD's exit code (and reports a failure).
step() {
    local what=$1 pid rc last
    shift
    say "$what"
    "$@" &
    pid=$!
    last=$SECONDS
    while kill -0 "$pid" 2>/dev/null; do
        sleep 1
        if [ $((SECONDS - last)) -ge 8 ] && kill -0 "$pid" 2>/dev/null; then
            echo "[kiln $KILN_SCRIPT] ... still $what ($((SECONDS - STEP_START)) s)" >&2
            last=$SECONDS
        fi
    done
    rc=0
    wait "$pid" || rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "[kiln $KILN_SCRIPT] ... failed (exit code $rc) after $((SECONDS - STEP_START)) s" >&2
        return "$rc"
    fi
    done_step
}

# The pid file every start script writes: $FD_LOG_DIR/kiln.pid, a relative FD_LOG_DIR (default ./log) being
# taken from the directory the script was run in. It holds the pid of the `kiln serve` supervisor.
kiln_pid_file() {
    local dir=${FD_LOG_DIR:-log}
    case "$dir" in
        /*) ;;
        *) dir="$KILN_CALLER_DIR/$dir" ;;
    esac
    echo "$dir/kiln.pid"
}
# the caller's directory (a script that cd's sets KILN_CALLER_DIR=$PWD before it does)
KILN_CALLER_DIR=${KILN_CALLER_DIR:-$PWD}

# kiln_running_pid FILE: prints the pid in FILE and succeeds when it is a live `kiln serve` process
kiln_running_pid() {
    local pid
    pid=$(cat "$1" 2>/dev/null) || return 1
    case "$pid" in ''|*[!0-9]*) return 1 ;; esac
    kiln_live "$pid" || return 1
    # a recycled pid belongs to something else
    tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q "kiln.* serve" || return 1
    echo "$pid"
}

# kiln_live PID: succeeds when PID exists and is not a zombie
kiln_live() {
    kill -0 "$1" 2>/dev/null && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != "Z" ]
}

# kiln_descendants PID: the pids of PID's children, grandchildren, ... (one per line)
kiln_descendants() {
    local child
    for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do
        echo "$child"
        kiln_descendants "$child"
    done
}
