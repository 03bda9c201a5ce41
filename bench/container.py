"""Container-to-ready of the committed image, against a floor container, in one guest run.

One QEMU guest (tests/vm/guest.py) boots the kernel with the guest's own dockerd
started as tests/vm/test_container.py starts it (tests/vm/engine.sh: a data root on a
disk that has the committed stand-in image loaded already, `tests.container.engine_disk`),
and runs, `--rounds` times (median reported), each with the same flags and mounts as the
README's `docker run` (`--privileged --pid=host --network none`, the contract's mounts):

- the engine alone: `docker run -d --entrypoint touch` of the same image, to a marker
  file in the shared `/run/nvidia` (what the engine costs to start any container);
- the floor container: `docker run -d --entrypoint bash` of the same image with a
  script that does only what bench/lifecycle.py's floor does for the package committed
  in the image: untar it, the `ld -r` links with the linker it carries and the image's
  core objects, `modprobe -a` of the prerequisites, the `insmod`s; then it touches the
  marker. Timed from `docker run` to the marker (and, for the record, to its exit);
- ours: `docker run -d` of the committed stand-in image (its entrypoint `init`, the
  seed's workflow: tests/container.py) to the readiness file on the guest's side; then
  `docker stop` (not timed), which unloads the driver.

Between runs the node is put back (no container, no NVIDIA module, no driver root or
readiness file, empty node store and cache), so every round is a first start on a
node that has just pulled the image (with `--kept-scan`, the cache keeps the scan of the
host's modules, read once first, untimed, with the image's own interpreter: a node that
has started on this kernel before, as at every reboot after the first; kmod/abi.py); one
untimed `docker run` of `true` comes first, so that no row pays the engine's first start.
Both timed rows poll for their file the same way (engine.sh `until_true`, every 0.2 s),
and the engine's own cost is in both: the difference is what `init` costs beyond the
floor's work.

Prints the medians, the difference and the ratio to the floor container, ours split
by the time stamps of init's own log (`docker run` to its first line: the engine and
the interpreter; from there to ready, and of that the package lookup with its kernel
ABI check), every round's values, the exit codes seen and the guest's kernel (a run
that did not reach readiness shows here, not as an assertion: a bench prints numbers).

Run: .venv/bin/python -m bench.container [--rounds N] [--kernel RELEASE] [--kept-scan]
[--json FILE]
(as root; the committed image is taken from the tests' cache, or made once with a
private dockerd on this machine: tests/container.py).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import shlex
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench.lifecycle import KEEP_SCAN, floor_script
from tests.container import CommittedImage, Engine, committed_image, engine, engine_disk
from tests.kernels import preferred_kernel
from tests.standin.tree import make_standin_source
from tests.vm.conftest import Guest
from tests.vm.follow import following
from tests.vm.scenario import facts_of
from tests.vm.test_container import ENGINE, LIFECYCLE

TARGET_S = 1.5  # container-to-ready <= the floor container + this
GUEST_MEMORY_MB = 4096  # the layers are on the disk; containerd and the stores on tmpfs
MARK = "/run/nvidia/.bench-container-mark"  # the floor's and the engine's end, shared

GUEST = r"""
set -u
source "$LIFECYCLE"; source "$ENGINE"
progress() { echo "$*" >>"$LOGS/progress.log"; }
run=(--privileged --pid=host --network none "${DRIVER_MOUNTS[@]}")
floor=$(cat "$LOGS/floor.sh")

# reset_node: no container, no NVIDIA module, no root, no readiness, empty stores.
reset_node() {
    local m d
    $DOCKER rm -f nvidia-driver nvidia-driver-floor nvidia-driver-engine >/dev/null 2>&1
    umount -R /run/nvidia/driver 2>/dev/null
    for m in nvidia_drm nvidia_peermem nvidia_modeset nvidia_uvm nvidia; do
        rmmod "$m" 2>/dev/null
    done
    rm -rf /run/nvidia/validations /run/nvidia/nvidia-driver.pid "$MARK"
    umount "$NODE_STORE" && mount -t tmpfs -o mode=0711 tmpfs "$NODE_STORE"
    if [ "$KEPT" = yes ]; then  # all of the cache but the kept scan of the host's modules
        find /var/cache/nvidia-driver -mindepth 1 -maxdepth 1 ! -name kernel-abi \
            -exec rm -rf {} +
    else
        umount /var/cache/nvidia-driver
        mount -t tmpfs -o mode=0711 tmpfs /var/cache/nvidia-driver
    fi
}

# to_mark KEY NAME ARGS...: `docker run -d --name NAME ARGS` to the marker (KEY_R, also
# in $last), to its exit (KEY_exit_R), its exit code (KEY_rc_R), what it left loaded
# (KEY_modules_R); then the node is put back.
to_mark() {
    local key=$1 name=$2 t
    shift 2
    last=n/a
    t=$(now)
    $DOCKER run -d --name "$name" "$@" >/dev/null || return 1
    until_true '[ -e $MARK ]' 300 "$name"; rc=$?
    last=$(since $t)
    say "${key}_ready_rc_$r" $rc
    say "${key}_$r" "$last"
    say "${key}_rc_$r" "$($DOCKER wait "$name")"
    say "${key}_exit_$r" "$(since $t)"
    say "${key}_modules_$r" "$(nvidia_modules)"
    $DOCKER logs "$name" >"$LOGS/$key-$r.log" 2>&1
    reset_node
}

say kernel "$(uname -r)"
t=$(now); start_engine || exit 1; last=$(since $t); say engine_s "$last"
progress "kernel $(uname -r), $(nproc) CPUs; containerd and dockerd up in $last s; $IMAGE"
$DOCKER run --rm "${run[@]}" --entrypoint true "$IMAGE"; say warmup_rc $?
reset_node
if [ "$KEPT" = yes ]; then
    t=$(now)
    $DOCKER run --rm "${run[@]}" --entrypoint /opt/nvidia-driver/bin/python "$IMAGE" \
        -c "$KEEP_SCAN"
    say kept_rc $?; say kept_scan "$(since $t)"
    progress "every host module read into the node's kept scan (untimed): $(since $t) s"
fi
for r in $(seq $ROUNDS); do
    to_mark engine nvidia-driver-engine "${run[@]}" --entrypoint touch "$IMAGE" "$MARK"
    progress "round $r: engine alone (touch): $last s"
    to_mark floor nvidia-driver-floor "${run[@]}" --entrypoint bash "$IMAGE" -c "$floor"
    progress "round $r: floor container (untar, ld -r, insmod): $last s"

    t=$(now); say ours_start_$r "$t"
    $DOCKER run -d --name nvidia-driver "${run[@]}" "$IMAGE" >/dev/null
    until_true '[ -e $READY ]' 300 nvidia-driver; rc=$?
    last=$(since $t)
    say ours_ready_rc_$r $rc
    say ours_$r "$last"
    say ours_modules_$r "$(nvidia_modules)"
    $DOCKER stop -t 120 nvidia-driver >/dev/null
    rc=$(exit_code nvidia-driver); say ours_rc_$r "$rc"
    say ours_left_$r "$(nvidia_modules)"
    $DOCKER logs nvidia-driver >"$LOGS/ours-$r.log" 2>&1
    reset_node
    progress "round $r: ours (the committed image's init): $last s (stop: exit $rc)"
done
"""


def container_floor(image: CommittedImage) -> str:
    """bench/lifecycle.py's floor for the package committed in `image`, with the paths the
    container sees: the package where the image holds it, the core objects under the
    image's NVIDIA_DRIVER_SOURCE (expanded by the script, in the container)."""
    # floor_script reads the package's manifest and the driver tree's layout on this
    # machine: the copy of the committed package, and a stand-in tree of the same version
    # (the image's is the same generator's, make_standin_run).
    with tempfile.TemporaryDirectory(prefix="nvidia-driver-bench-src-") as tmp:
        source = make_standin_source(Path(tmp) / "src", version=image.driver_version)
        text = floor_script(image.built_package, source, stop_at_nvidia=False)
    for host, inside in (
        (f"{image.built_package}", shlex.quote(image.package)),
        (f"{source}/", '"$NVIDIA_DRIVER_SOURCE"/'),
    ):
        if host not in text:
            raise RuntimeError(f"the floor script names no {host}:\n{text}")
        text = text.replace(host, inside)
    return f"set -u\n{text}touch {MARK}\n"


# Lines of init's log (their UTC time stamps) that split ours: its first line (any), the
# line before the package lookup (the kernel ABI check), the package chosen, the readiness.
FIRST = ""
CHOOSING = "Kernel modules:"
CHOSEN = "Using the precompiled package"
READY = "The driver is ready"


def init_timeline(logs: Path, facts: dict[str, str], rounds: int) -> None:
    """Add to `facts`, per round, from the container's log: `docker run` to init's first
    log line (ours_to_log_R: the engine's start and the interpreter's), that line to the
    readiness (ours_log_to_ready_R), and the choice of the package (ours_choosing_R)."""
    for r in range(1, rounds + 1):
        path = logs / f"ours-{r}.log"
        start = facts.get(f"ours_start_{r}")
        if start is None or not path.is_file():
            continue
        stamps: dict[str, float] = {}
        for line in path.read_text(errors="replace").splitlines():
            try:
                stamp = datetime.datetime.strptime(line[:24], "%Y-%m-%dT%H:%M:%S.%fZ")
            except ValueError:
                continue
            seconds = stamp.replace(tzinfo=datetime.timezone.utc).timestamp()
            for key in (FIRST, CHOOSING, CHOSEN, READY):
                if key in line:
                    stamps.setdefault(key, seconds)
        spans = {
            "to_log": (None, FIRST),
            "log_to_ready": (FIRST, READY),
            "choosing": (CHOOSING, CHOSEN),
        }
        for name, (begin, end) in spans.items():
            b = float(start) if begin is None else stamps.get(begin)
            e = stamps.get(end)
            if b is not None and e is not None:
                facts[f"ours_{name}_{r}"] = f"{e - b:.2f}"


def rounds_of(facts: dict[str, str], key: str, rounds: int) -> list[float]:
    return [float(facts[f"{key}_{r}"]) for r in range(1, rounds + 1) if f"{key}_{r}" in facts]


def median(facts: dict[str, str], key: str, rounds: int) -> float | None:
    values = rounds_of(facts, key, rounds)
    return statistics.median(values) if values else None


def codes(facts: dict[str, str], key: str, rounds: int) -> str:
    return ",".join(facts.get(f"{key}_{r}", "?") for r in range(1, rounds + 1))


def loaded(facts: dict[str, str], key: str, rounds: int) -> str:
    """The modules each round saw (`nvidia_modules`), once when every round saw the same."""
    seen = [facts.get(f"{key}_{r}", "?") or "none" for r in range(1, rounds + 1)]
    return f"{seen[0]} (every round)" if len(set(seen)) == 1 else " / ".join(seen)


def table(facts: dict[str, str], rounds: int) -> list[str]:
    def seconds(value: float | None) -> str:
        return f"{value:7.2f} s" if value is not None else "    n/a  "

    def per_round(key: str) -> str:
        return ", ".join(f"{v:.1f}" for v in rounds_of(facts, key, rounds)) or "n/a"

    floor, ours = median(facts, "floor", rounds), median(facts, "ours", rounds)
    difference, ratio, met = "      -  ", "     - ", ""
    if floor is not None and ours is not None:
        difference, ratio = f"{ours - floor:+7.2f} s", f"{ours / floor:6.2f}x"
        met = ": met" if ours - floor <= TARGET_S else ": not met"
    return [
        f"{'':<42} {'floor container':>15}  {'ours':>9}  {'difference':>10}  {'ratio':>7}  target",
        f"{'container-to-ready, committed stand-in':<42} {seconds(floor):>15}  {seconds(ours)}  "
        f"{difference:>10}  {ratio}  <= floor container + {TARGET_S} s{met}",
        f"{'engine alone (docker run of touch)':<42} "
        f"{seconds(median(facts, 'engine', rounds)):>15}",
        f"{'floor container to its exit':<42} {seconds(median(facts, 'floor_exit', rounds)):>15}",
        f"{'ours: docker run to init first log line':<42} {'':>15}  "
        f"{seconds(median(facts, 'ours_to_log', rounds))}",
        f"{'ours: init first log line to ready':<42} {'':>15}  "
        f"{seconds(median(facts, 'ours_log_to_ready', rounds))}",
        f"{'  of which choosing the package (ABI)':<42} {'':>15}  "
        f"{seconds(median(facts, 'ours_choosing', rounds))}",
        f"rounds (s): floor container {per_round('floor')} (to exit {per_round('floor_exit')});"
        f" ours {per_round('ours')}; engine alone {per_round('engine')}",
        f"exit codes: ours ready/stop {codes(facts, 'ours_ready_rc', rounds)}/"
        f"{codes(facts, 'ours_rc', rounds)}, floor marker/exit "
        f"{codes(facts, 'floor_ready_rc', rounds)}/{codes(facts, 'floor_rc', rounds)}, "
        f"engine marker/exit {codes(facts, 'engine_ready_rc', rounds)}/"
        f"{codes(facts, 'engine_rc', rounds)}, warm-up {facts.get('warmup_rc', '?')}",
        f"modules at ready: ours {loaded(facts, 'ours_modules', rounds)}; "
        f"floor {loaded(facts, 'floor_modules', rounds)}; "
        f"after ours' docker stop: {loaded(facts, 'ours_left', rounds)}",
        f"guest kernel {facts.get('kernel', '?')}; the guest's containerd and dockerd started "
        f"in {facts.get('engine_s', '?')} s",
        *(
            [
                f"every host module read into the kept scan first: {facts['kept_scan']} s "
                f"(exit {facts.get('kept_rc', '?')})"
            ]
            if "kept_scan" in facts
            else []
        ),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.container", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kernel", help="kernel release to boot (default: newest 6.12, else 6.1)")
    parser.add_argument("--json", type=Path, help="also write the raw facts here")
    parser.add_argument(
        "--kept-scan",
        action="store_true",
        help="first (untimed) read every host module into the node's cache, and keep it "
        "between rounds, as a node has after its first starts on a kernel",
    )
    args = parser.parse_args(argv)
    kernel = args.kernel or preferred_kernel()
    if kernel is None:
        print("bench: no kernel pair (image, modules, headers) of 6.12 or 6.1", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="nvidia-driver-bench-"))
    logs = work / "logs"
    logs.mkdir()
    disk = work / "docker.img"
    print(f"bench: kernel {kernel}; work in {work}", flush=True)

    print("bench: the committed stand-in image (tests' cache) and a disk of it", flush=True)
    with contextlib.ExitStack() as stack:
        started: list[Engine] = []

        def get_engine() -> Engine:  # a private dockerd on this machine, once
            if not started:
                started.append(stack.enter_context(engine()))
            return started[0]

        image = committed_image(kernel, "standin", get_engine)
        (logs / "floor.sh").write_text(container_floor(image))
        engine_disk(get_engine(), [image], [], disk)

    script = logs / "bench.sh"
    script.write_text(GUEST)
    print(f"bench: booting {kernel} in a guest (QEMU), {image.name}", flush=True)
    try:
        with following(logs / "progress.log", lambda line: print(f"guest | {line}", flush=True)):
            result = Guest(kernel)(
                ["bash", str(script)],
                env={
                    "LOGS": str(logs),
                    "PY": sys.executable,
                    "LIFECYCLE": str(LIFECYCLE),
                    "ENGINE": str(ENGINE),
                    "DOCKER_DISK": "/dev/vda",
                    "IMAGE": image.name,
                    "ROUNDS": str(args.rounds),
                    "MARK": MARK,
                    "KEPT": "yes" if args.kept_scan else "no",
                    "KEEP_SCAN": KEEP_SCAN,
                },
                shares={str(logs): logs},
                timeout=3000,
                memory_mb=GUEST_MEMORY_MB,
                disks=(disk,),
            )
    finally:
        disk.unlink()  # gigabytes
    facts = facts_of(result.stdout)
    init_timeline(logs, facts, args.rounds)
    if args.json:
        args.json.write_text(json.dumps(facts, indent=2) + "\n")
    print(f"bench: guest exit {result.returncode}; logs in {logs}")
    if result.returncode != 0:
        print(result.stderr[-3000:], file=sys.stderr)
    for line in table(facts, args.rounds):
        print(line)
    return 0 if result.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
