"""The seed's container workflow, last step, on a real kernel: the committed image
(tests/container.py: `docker build`, `docker run … update`, `docker commit` with the
entrypoint `init`, `docker save`, all on the host) runs in the QEMU guest's own dockerd
the way the README runs it on Flatcar: `--privileged --pid=host` with the documented
mounts.

One boot per kernel for every scenario of this file. The guest's dockerd starts on a
disk whose data root has the images loaded already (`engine_disk`: loaded on the host,
where it takes seconds; `docker load` in the guest took minutes per image under TCG):
the node as it is after a pull. The scenarios run one after the other on that node,
which is put back between them (no container, no module, empty stores). The guest's
kernel traces every exec and module load (tracefs), so "no compiler ran" and "no second
load" are what the kernel saw, not what a log claims.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

from tests.container import CommittedImages, Engine, build_image, engine_disk
from tests.integration.conftest_mirror import Mirrors

from .conftest import Guest
from .guest import PROJECT, GuestResult
from .scenario import explain_run, facts_of
from .serve_mirror import mirror_json

LIFECYCLE = Path(__file__).with_name("lifecycle.sh")
ENGINE = Path(__file__).with_name("engine.sh")
# The images' layers are unpacked on tmpfs, and the build on the node adds the developer
# container's image to the node's cache.
GUEST_MEMORY_MB = 8192
COMPILERS = r"^(cc|c89|c99|gcc|gcc-[0-9.]+|cc1|cc1plus|as|make|gmake|x86_64-linux-gnu-gcc.*)$"
# The linker a package carries runs through its own dynamic loader: the exec the kernel
# sees (driver/toolchain.py); a node's own `ld` would be one of `ld`, `ld.bfd`.
PACKED_LINKER = r"^ld-linux[-.a-z0-9_]*\.so\.[0-9]+$"

# Each scenario is the body of a bash function run in a subshell, with IMAGE (the image
# to run) and OUT (its own shared directory: `say` facts go to OUT/facts, logs to OUT).

# The committed stand-in image: `docker run -d`, restart under a workload, stop.
STANDIN = r"""
start_trace || exit 1
run=(--privileged --pid=host --network none "${DRIVER_MOUNTS[@]}")
source_in_image=$($DOCKER inspect --format '{{range .Config.Env}}{{println .}}{{end}}' \
    "$IMAGE" | sed -n 's/^NVIDIA_DRIVER_SOURCE=//p')
t=$(now)
$DOCKER run -d --name nvidia-driver "${run[@]}" "$IMAGE" >&2 || exit 1
until_true '[ -e $READY ]' 300 nvidia-driver; say ready_rc $?
say run_to_ready_s $(since $t)
say modules "$(nvidia_modules)"
say mounted "$(is_mounted)"
say root_is_image "$([ -d /run/nvidia/driver$source_in_image ] && echo yes || echo no)"
say used_package "$($DOCKER logs nvidia-driver 2>&1 | grep -c 'Using the precompiled package')"
say compilers "$(trace_execs | grep -E "$COMPILERS" | paste -sd, -)"
say linked "$(trace_execs | grep -cE "$PACKED_LINKER")"
trace_execs >$OUT/execs.log
text=$(text_address)

# A GPU workload on the node: holds nvidia.ko through /dev/nvidiactl.
sleep infinity 3</dev/nvidiactl &
workload=$!
t=$(now)
$DOCKER restart -t 120 nvidia-driver >&2
until_true '[ "$($DOCKER logs nvidia-driver 2>&1 | grep -c "is up; waiting")" = 2 ]' 300 \
    nvidia-driver; say restart_rc $?
say restart_to_ready_s $(since $t)
say restarted_ready "$([ -e $READY ] && echo yes || echo no)"
say restarted_modules "$(nvidia_modules)"
say restarted_mounted "$(is_mounted)"
say same_text "$([ "$(text_address)" = "$text" ] && echo yes || echo no)"
say kept_log "$($DOCKER logs nvidia-driver 2>&1 | grep -c 'loaded already')"
say busy_log "$($DOCKER logs nvidia-driver 2>&1 | grep -c 'The NVIDIA driver is in use')"
say nvidia_loads "$(trace_loads nvidia)"

kill $workload; wait $workload 2>/dev/null
t=$(now)
$DOCKER stop -t 120 nvidia-driver >&2
say stop_s $(since $t)
say exit_code "$(exit_code nvidia-driver)"
state after
say lost_events "$(lost_events)"
"""

# The committed image of the real driver on a node without a GPU.
REAL = r"""
$DOCKER run -d --name nvidia-driver --privileged --pid=host --network none \
    "${DRIVER_MOUNTS[@]}" "$IMAGE" >&2 || exit 1
until_true '! running nvidia-driver' 600 nvidia-driver; say exited_rc $?
say exit_code "$(exit_code nvidia-driver)"
state after
"""

# The image as `docker build` made it: `init` builds from the mirror on the node's 127.0.0.1.
BUILD = r"""
(cd "$PROJECT" && exec "$PY" -m tests.vm.serve_mirror $OUT/mirror.json $OUT/mirror.args) &
until_true '[ -s $OUT/mirror.args ]' 120 || exit 1
mapfile -t mirror_env <$OUT/mirror.args
start_trace || exit 1
t=$(now)
$DOCKER run -d --name nvidia-driver --privileged --pid=host --network host \
    "${mirror_env[@]}" "${DRIVER_MOUNTS[@]}" "$IMAGE" init >&2 || exit 1
until_true '[ -e $READY ]' 1200 nvidia-driver; say ready_rc $?
say run_to_ready_s $(since $t)
say modules "$(nvidia_modules)"
say mounted "$(is_mounted)"
say compiled "$(trace_execs | grep -cE "$COMPILERS")"
say node_packages "$(find $NODE_STORE -name '*.tar.gz' -path "*/$(uname -r)/*" | wc -l)"
say image_packages "$($DOCKER exec nvidia-driver sh -c \
    'find "${PRECOMPILED_DIR:-$NVIDIA_DRIVER_SOURCE/kernel/precompiled}" -name "*.tar.gz" \
    2>/dev/null | wc -l')"
$DOCKER stop -t 120 nvidia-driver >&2
say exit_code "$(exit_code nvidia-driver)"
state after
say kept_packages "$(find $NODE_STORE -name '*.tar.gz' | wc -l)"
say lost_events "$(lost_events)"
"""

SCENARIOS = {"standin": STANDIN, "real": REAL, "build": BUILD}

NODE_SCRIPT = r"""
set -u
source "$LIFECYCLE"; source "$ENGINE"
COMPILERS='%(compilers)s'
PACKED_LINKER='%(packed_linker)s'
trap 'say memory_used_mb $(free -m | awk "/^Mem:/ {print \$3 + \$5}")' EXIT

# scenario NAME IMAGE: body_NAME in a subshell, its facts in $LOGS/NAME/facts, its
# stderr and the container's log beside them; then the node is put back.
scenario() {
    local out=$LOGS/$1
    mkdir -p "$out"
    (OUT=$out IMAGE=$2 "body_$1") >"$out/facts" 2>"$out/scenario.log"
    $DOCKER logs nvidia-driver >"$out/container.log" 2>&1
    reset_node
}

# reset_node: no container, no workload, no driver, empty stores: a node just booted.
reset_node() {
    local m d
    $DOCKER rm -f nvidia-driver >/dev/null 2>&1
    pkill -f 'sleep infinity'; pkill -f tests.vm.serve_mirror
    umount -R /run/nvidia/driver 2>/dev/null
    for m in nvidia_drm nvidia_peermem nvidia_modeset nvidia_uvm nvidia; do
        rmmod "$m" 2>/dev/null
    done
    rm -rf /run/nvidia/validations /run/nvidia/nvidia-driver.pid
    for d in "$NODE_STORE" /var/cache/nvidia-driver; do
        umount "$d" && mount -t tmpfs -o mode=0711 tmpfs "$d"
    done
}

%(bodies)s
t=$(now); start_engine || exit 1; say engine_s $(since $t)
$DOCKER images >&2
%(runs)s
"""


@dataclasses.dataclass(frozen=True)
class Node:
    """The guest's run of every scenario; `facts(name)` and `explain(name)` of each."""

    result: GuestResult
    logs: Path

    def facts(self, name: str) -> dict[str, str]:
        path = self.logs / name / "facts"
        return facts_of(path.read_text() if path.is_file() else "")

    def explain(self, name: str) -> str:
        scenario = explain_run(self.result, self.logs / name)
        engine = [
            f"--- {p.name} ---\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted(self.logs.glob("*.log"))
        ]
        return "\n".join([scenario, *engine])


@pytest.fixture(scope="module")
def node(
    guest_kernel: str,
    committed_images: CommittedImages,
    docker_engine: Engine,
    mirrors: Mirrors,
    tmp_path_factory: pytest.TempPathFactory,
) -> Node:
    """Every scenario of SCENARIOS run on one boot of `guest_kernel` (timings printed)."""
    logs = tmp_path_factory.mktemp("node")
    mirror = mirrors(guest_kernel)  # its developer root has the guest kernel's headers
    committed = {v: committed_images(guest_kernel, v) for v in ("standin", "real")}
    uncommitted = build_image(docker_engine, "standin", mirror.signing_key)
    disk = logs / "docker.img"
    engine_disk(docker_engine, list(committed.values()), [uncommitted], disk)
    (logs / "build").mkdir()
    (logs / "build" / "mirror.json").write_text(mirror_json(mirror))
    images = {
        "standin": committed["standin"].name,
        "real": committed["real"].name,
        "build": uncommitted,
    }
    script = logs / "node.sh"
    script.write_text(
        NODE_SCRIPT
        % {
            "compilers": COMPILERS,
            "packed_linker": PACKED_LINKER,
            "bodies": "\n".join(f"body_{n}() {{\n{b}}}\n" for n, b in SCENARIOS.items()),
            "runs": "\n".join(f"scenario {n} {images[n]}" for n in SCENARIOS),
        }
    )
    try:
        result = Guest(guest_kernel)(
            ["bash", str(script)],
            env={
                "LOGS": str(logs),
                "PY": sys.executable,
                "PROJECT": str(PROJECT),
                "LIFECYCLE": str(LIFECYCLE),
                "ENGINE": str(ENGINE),
                "DOCKER_DISK": "/dev/vda",
            },
            shares={str(logs): logs},
            timeout=3000,
            memory_mb=GUEST_MEMORY_MB,
            disks=(disk,),
        )
    finally:
        disk.unlink()  # gigabytes: not left for pytest's tmp rotation
    node = Node(result, logs)
    timings = facts_of(result.stdout)
    for name in SCENARIOS:
        timings.update({f"{name}.{k}": v for k, v in node.facts(name).items() if k.endswith("_s")})
    print(timings)
    return node


def test_committed_standin_image_runs_restarts_and_stops(node: Node) -> None:
    """`docker run -d` of the committed stand-in image: the committed package is linked
    and loaded, no compiler runs, the root and the readiness file appear on the node's
    side. With a GPU workload holding the driver, `docker restart` keeps the modules (the
    old container finds the driver in use, the new one finds its package loaded); after
    the workload, `docker stop` unloads everything and the container exits 0."""
    facts, explain = node.facts("standin"), node.explain("standin")
    assert facts.get("ready_rc") == "0", explain
    assert facts["lost_events"] == "0", "the kernel's trace dropped events: it proves nothing"
    assert facts["modules"] == "nvidia,nvidia_uvm,nvidia_modeset", explain
    assert (facts["mounted"], facts["root_is_image"]) == ("yes", "yes"), explain
    assert facts["used_package"] == "1", explain
    assert facts["compilers"] == "", f"a compiler ran: {facts['compilers']}\n{explain}"
    assert int(facts["linked"]) >= 1, "the trace saw no link with the package's own linker"
    restart = {k: facts.get(k) for k in ("restart_rc", "restarted_ready", "restarted_mounted")}
    assert restart == {"restart_rc": "0", "restarted_ready": "yes", "restarted_mounted": "yes"}, (
        explain
    )
    assert facts["restarted_modules"] == facts["modules"], explain
    assert (facts["same_text"], facts["nvidia_loads"]) == ("yes", "1"), "reloaded\n" + explain
    assert (facts["busy_log"], facts["kept_log"]) == ("1", "1"), explain
    keys = ("exit_code", "after_modules", "after_mounted", "after_ready")
    after = {k: facts.get(k) for k in keys}
    assert after == {
        "exit_code": "0",
        "after_modules": "",
        "after_mounted": "no",
        "after_ready": "no",
    }, explain


def test_committed_real_image_exits_7_without_a_gpu(node: Node) -> None:
    """The committed image of the real 535.261.03 driver on a node without a GPU: the
    kernel refuses nvidia.ko (ENODEV), `init` exits 7 and leaves no NVIDIA module."""
    facts, explain = node.facts("real"), node.explain("real")
    assert facts.get("exited_rc") == "0", explain
    assert facts["exit_code"] == "7", explain
    assert (facts["after_modules"], facts["after_mounted"]) == ("", "no"), explain


def test_uncommitted_image_builds_from_the_mirror_into_the_node_store(node: Node) -> None:
    """`init` of the image as `docker build` made it (no package; its entrypoint is
    `nvidia-driver`, so the command is `init`): with the local Flatcar
    mirror on the node's 127.0.0.1 (`--network host`), it fetches the developer container,
    builds in it inside the running container, loads, and puts the package into the
    node's store (a host directory), which outlives the container."""
    facts, explain = node.facts("build"), node.explain("build")
    assert facts.get("ready_rc") == "0", explain
    assert facts["lost_events"] == "0", "the kernel's trace dropped events: it proves nothing"
    assert int(facts["compiled"]) >= 1, "no compiler ran: nothing was built\n" + explain
    assert facts["modules"] == "nvidia,nvidia_uvm,nvidia_modeset", explain
    assert facts["mounted"] == "yes", explain
    stores = {k: facts[k] for k in ("node_packages", "image_packages", "kept_packages")}
    assert stores == {"node_packages": "1", "image_packages": "0", "kept_packages": "1"}, explain
    assert (facts["exit_code"], facts["after_modules"]) == ("0", ""), explain
