# A container engine in the QEMU guest, for test_container.py: Debian's containerd
# and dockerd with their storage on tmpfs, no bridge network (README, "Layout",
# "Kernels"). Sourced after lifecycle.sh (say, stuck) by a script that runs as
# root in the guest.
#
# Expects: LOGS (a shared directory for logs); DOCKER_DISK (optional): a block device
# with dockerd's data root to mount at /var/lib/docker instead of an empty tmpfs.

DOCKER=/usr/bin/docker # the client next to dockerd, not a newer one earlier in PATH
export DOCKER_HOST=unix:///run/docker.sock

# The documented mounts and flags of the driver container (README, DESIGN: the host
# contract); $NODE_STORE is the node's package store on the guest's side.
NODE_STORE=/var/lib/nvidia-driver
DRIVER_MOUNTS=(
    -v /run/nvidia:/run/nvidia:rshared
    -v /etc/os-release:/host-etc/os-release:ro
    -v /etc/flatcar:/host-etc/flatcar:ro
    -v /usr/share/flatcar:/host-usr/share/flatcar:ro
    -v /lib/modules:/lib/modules:ro
    -v /dev:/dev
    -v "$NODE_STORE":/var/lib/nvidia-driver
    -v /var/cache/nvidia-driver:/var/cache/nvidia-driver
    -v /etc/nvidia-driver/modules:/drivers:ro
)

now() { date +%s.%N; }
# since START: seconds from START to now, one decimal.
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# until_true TEST SECONDS [CONTAINER]: poll `eval TEST`; give up early when CONTAINER
# has stopped (checked every 5 s: each docker call costs under TCG); on failure print
# the diagnostics of the engine and CONTAINER.
until_true() {
    local i
    for ((i = 0; i < $2 * 5; i++)); do
        eval "$1" && return 0
        if [ -n "${3:-}" ] && ((i % 25 == 24)) && ! running "$3"; then
            eval "$1" && return 0
            echo "container $3 stopped (exit code $(exit_code "$3")) before: $1" >&2
            engine_diagnostics "$3" >&2
            return 1
        fi
        sleep 0.2
    done
    echo "timed out after $2 s waiting for: $1" >&2
    engine_diagnostics "${3:-}" >&2
    return 1
}

# engine_diagnostics [CONTAINER]: the engine's state and where its processes wait.
engine_diagnostics() {
    local p
    echo "--- processes ---"
    ps -eo pid,ppid,stat,etimes,wchan:20,args | grep -v ' \[' | tail -n 40
    for p in $(pgrep -x 'containerd|dockerd|nvidia-driver|python3|docker'); do stuck "$p"; done
    if [ -n "${1:-}" ]; then
        echo "--- docker ps -a ---"
        timeout 20 $DOCKER ps -a
        echo "--- docker logs $1 (tail) ---"
        timeout 20 $DOCKER logs "$1" 2>&1 | tail -n 60
    fi
    echo "--- dockerd.log (tail) ---"
    tail -n 20 "$LOGS/dockerd.log"
}

# start_engine: containerd, then dockerd, storage on fresh tmpfs mounts. The guest's
# mounts are private (no systemd): make them shared as on a systemd host, so that
# `-v /run/nvidia:/run/nvidia:rshared` propagates the driver root back to the guest.
start_engine() {
    local d
    mount --make-rshared /
    # The guest's / is an overlay: what needs a disk's file system (overlay2's layers,
    # a build's overlay on the developer container) gets a fresh tmpfs, the node's disk.
    for d in /var/lib/containerd "$NODE_STORE" /var/cache/nvidia-driver; do
        mkdir -p "$d" && mount -t tmpfs -o mode=0711 tmpfs "$d" || return 1
    done
    mkdir -p /var/lib/docker
    if [ -n "${DOCKER_DISK:-}" ]; then
        # A disk whose data root has the images loaded already (tests/container.py).
        modprobe virtio_blk && until_true "[ -b $DOCKER_DISK ]" 60 &&
            mount "$DOCKER_DISK" /var/lib/docker || return 1
    else
        mount -t tmpfs -o mode=0711 tmpfs /var/lib/docker || return 1
    fi
    mkdir -p /run/nvidia /etc/flatcar /usr/share/flatcar /etc/nvidia-driver/modules
    containerd >"$LOGS/containerd.log" 2>&1 &
    until_true '[ -S /run/containerd/containerd.sock ]' 60 || return 1
    dockerd --containerd /run/containerd/containerd.sock --host "$DOCKER_HOST" \
        --bridge=none --iptables=false --ip-forward=false --ip-masq=false \
        >"$LOGS/dockerd.log" 2>&1 &
    until_true '$DOCKER version >/dev/null 2>&1' 120 || return 1
    say storage_driver "$($DOCKER info --format '{{.Driver}}')"
}

# load_image TAR: `docker load`; the image's name in IMAGE.
load_image() {
    local out
    out=$($DOCKER load -i "$1") || return 1
    echo "$out" >&2
    IMAGE=$(sed -n 's/^Loaded image: //p; s/^Loaded image ID: //p' <<<"$out" | tail -n 1)
    [ -n "$IMAGE" ]
}

# exit_code CONTAINER: its exit code (docker inspect: JSON-free template of one field).
exit_code() { $DOCKER inspect --format '{{.State.ExitCode}}' "$1"; }
running() { [ "$($DOCKER inspect --format '{{.State.Running}}' "$1")" = true ]; }

# Kernel tracing of every exec and module load from now on (tracefs): what ran in
# the guest, containers included, however short-lived.
start_trace() {
    local t=/sys/kernel/tracing
    mountpoint -q $t || mount -t tracefs tracefs $t || return 1
    echo 0 >$t/tracing_on
    echo 16384 >$t/buffer_size_kb
    : >$t/trace
    echo 1 >$t/events/sched/sched_process_exec/enable
    echo 1 >$t/events/module/module_load/enable
    echo 1 >$t/tracing_on
}
# trace_execs: the base names of the files exec'd since start_trace, sorted, unique.
trace_execs() {
    sed -n 's/.*sched_process_exec: filename=\([^ ]*\).*/\1/p' /sys/kernel/tracing/trace |
        sed 's#.*/##' | sort -u
}
# trace_loads MODULE: how often MODULE was loaded since start_trace.
trace_loads() { grep -c "module_load: $1\b" /sys/kernel/tracing/trace; }
# lost_events: events the ring buffer dropped (then the trace proves nothing).
lost_events() { awk '/^overrun:/ { n += $2 } END { print n + 0 }' /sys/kernel/tracing/per_cpu/cpu*/stats; }
