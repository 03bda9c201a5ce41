# Helpers for the lifecycle scenarios of test_lifecycle.py, sourced by a script
# that runs as root in the QEMU guest. They report facts as KEY=VALUE lines on
# stdout, which the test parses; diagnostics go to stderr.
#
# Expects: PY (the venv's python), LOGS (a shared directory for logs).

READY=/run/nvidia/validations/.driver-ctr-ready
LOCK=/run/nvidia/nvidia-driver.pid
PERSISTENCED_PID=/var/run/nvidia-persistenced/nvidia-persistenced.pid

say() { printf '%s=%s\n' "$1" "$2"; }

# nv ARGS...: the CLI in the foreground; its exit status.
nv() { "$PY" -m nvdriver.cli "$@"; }

# start_init LOG [NAME=VALUE...]: init in the background (stderr appended to
# LOG: `update` appends its lines to the same file); its pid in INIT_PID.
start_init() {
    local log=$1
    shift
    env "$@" "$PY" -m nvdriver.cli init >>"$log" 2>&1 &
    INIT_PID=$!
}

# wait_for TEST SECONDS: poll `eval TEST` while init is alive.
wait_for() {
    local i
    for ((i = 0; i < $2 * 10; i++)); do
        eval "$1" && return 0
        kill -0 "$INIT_PID" 2>/dev/null || { eval "$1"; return; }
        sleep 0.1
    done
    echo "timed out waiting for: $1" >&2
    stuck "$INIT_PID" >&2
    return 1
}

# stuck PID: where PID and its children wait in the kernel (to tell a hang on a
# 9p share from one in our code when a wait times out).
stuck() {
    local p
    for p in "$1" $(cat /proc/"$1"/task/*/children 2>/dev/null); do
        [ -d /proc/"$p" ] || continue
        printf 'pid %s (%s) state %s wchan %s\n' "$p" \
            "$(tr '\0' ' ' </proc/"$p"/cmdline)" \
            "$(awk '/^State:/ {print $2}' /proc/"$p"/status)" "$(cat /proc/"$p"/wchan)"
        cat /proc/"$p"/stack 2>/dev/null | head -n 8
    done
}

wait_ready() { wait_for '[ -e $READY ]' "${1:-120}"; }
wait_log() { wait_for "grep -q -- '$2' '$1'" "${3:-120}"; }

# stop_init SIGNAL [SECONDS]: signal init and wait for it (300 s: longer than its stop
# budget); its exit status in INIT_RC, "stuck" (and where it waits, on stderr) when it
# did not end in time, after which it is killed.
stop_init() {
    kill -"$1" "$INIT_PID"
    if ! wait_for "exited $INIT_PID" "${2:-300}"; then
        kill -KILL "$INIT_PID"
        wait "$INIT_PID"
        INIT_RC=stuck
        return
    fi
    wait "$INIT_PID"
    INIT_RC=$?
}

# exited PID: whether our child PID has ended (a zombie until waited for).
exited() { [ ! -d /proc/"$1" ] || [ "$(awk '/^State:/ {print $2}' /proc/"$1"/status 2>/dev/null)" = Z ]; }

nvidia_modules() { awk '$1 ~ /^nvidia(_uvm|_modeset|_drm|_peermem)?$/ { print $1 }' /proc/modules | tac | paste -sd, -; }
is_mounted() { if findmnt -n /run/nvidia/driver >/dev/null; then echo yes; else echo no; fi; }
text_address() { cat /sys/module/nvidia/sections/.text 2>/dev/null || echo none; }
persistenced_running() {
    local pid
    pid=$(cat $PERSISTENCED_PID 2>/dev/null) || { echo no; return; }
    if kill -0 "$pid" 2>/dev/null; then echo yes; else echo no; fi
}
# Processes whose command line is the stand-in daemon's loop.
daemon_processes() { pgrep -c -f 'exec 3</dev/nvidiactl' || true; }

# state PREFIX: what is loaded, mounted, running, announced.
state() {
    say "$1_modules" "$(nvidia_modules)"
    say "$1_mounted" "$(is_mounted)"
    say "$1_ready" "$([ -e $READY ] && echo yes || echo no)"
    say "$1_daemons" "$(daemon_processes)"
    say "$1_lock" "$([ -e $LOCK ] && echo yes || echo no)"
}
