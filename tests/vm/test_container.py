"""The seed's container workflow, last step, on a real kernel: the committed image
(tests/container.py: `docker build`, `docker run … update`, `docker commit` with the
entrypoint `init`, `docker save`, all on the host) is `docker load`ed into the QEMU
guest's own dockerd and run the way the README runs it on Flatcar: `--privileged
--pid=host` with the documented mounts.

One boot per kernel and image: the engine's start and the `docker load` cost tens of
seconds under TCG. The guest's kernel traces every exec and module load (tracefs), so
"no compiler ran" and "no second load" are what the kernel saw, not what a log claims.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.container import CommittedImages, Engine, build_image
from tests.integration.conftest_mirror import Mirrors

from .conftest import Guest
from .guest import PROJECT
from .scenario import explain_run
from .serve_mirror import mirror_json

LIFECYCLE = Path(__file__).with_name("lifecycle.sh")
ENGINE = Path(__file__).with_name("engine.sh")
# The stand-in's modules are small, the image is not: its layers are unpacked on tmpfs
# (and a build on the node adds the developer container's image to the node's cache).
GUEST_MEMORY_MB = 6144
BUILD_GUEST_MEMORY_MB = 8192
COMPILERS = r"^(cc|c89|c99|gcc|gcc-[0-9.]+|cc1|cc1plus|as|make|gmake|x86_64-linux-gnu-gcc.*)$"
LINKERS = r"^(ld|ld\.bfd|x86_64-linux-gnu-ld(\.bfd)?)$"


def run_scenario(
    guest: Guest, logs: Path, image: Path, body: str, *, memory_mb: int = GUEST_MEMORY_MB
) -> tuple[dict[str, str], str]:
    """Boot the guest, start the engine, load `image`, run `body`; its KEY=VALUE facts."""
    script = logs / "container.sh"
    script.write_text(
        "set -u\n"
        f"source {LIFECYCLE}\nsource {ENGINE}\n"
        "trap 'say memory_used_mb $(free -m | awk \"/^Mem:/ {print \\$3 + \\$5}\")' EXIT\n"
        "t=$(now); start_engine || exit 1; say engine_s $(since $t)\n"
        f"t=$(now); load_image {image} || exit 1; say load_s $(since $t)\n"
        f"{body}\n"
    )
    result = guest(
        ["bash", str(script)],
        env={"LOGS": str(logs), "PY": sys.executable, "PROJECT": str(PROJECT)},
        shares={str(logs): logs},
        timeout=1500,
        memory_mb=memory_mb,
    )
    facts = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line[:40])
    return facts, explain_run(result, logs)


def test_committed_standin_image_runs_restarts_and_stops(
    guest: Guest, committed_images: CommittedImages, tmp_path: Path
) -> None:
    """`docker run -d` of the committed stand-in image: the committed package is linked
    and loaded, no compiler runs, the root and the readiness file appear on the node's
    side. With a GPU workload holding the driver, `docker restart` keeps the modules (the
    old container finds the driver in use, the new one finds its package loaded); after
    the workload, `docker stop` unloads everything and the container exits 0."""
    image = committed_images(guest.kernel, "standin").tar
    body = r"""
    start_trace || exit 1
    run=(--privileged --pid=host --network none "${DRIVER_MOUNTS[@]}")
    t=$(now)
    $DOCKER run -d --name nvidia-driver "${run[@]}" "$IMAGE" >&2 || exit 1
    until_true '[ -e $READY ]' 300 nvidia-driver; say ready_rc $?
    say run_to_ready_s $(since $t)
    say modules "$(nvidia_modules)"
    say mounted "$(is_mounted)"
    say root_is_image "$([ -d /run/nvidia/driver$NVIDIA_SOURCE_IN_IMAGE ] && echo yes || echo no)"
    say used_package "$($DOCKER logs nvidia-driver 2>&1 | grep -c 'Using the precompiled package')"
    say compilers "$(trace_execs | grep -E "$COMPILERS" | paste -sd, -)"
    say linked "$(trace_execs | grep -cE "$LINKERS")"
    trace_execs >$LOGS/execs.log
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
    $DOCKER logs nvidia-driver >$LOGS/container.log 2>&1
    """
    facts, explain = run_scenario(
        guest,
        tmp_path,
        image,
        f"COMPILERS='{COMPILERS}'\nLINKERS='{LINKERS}'\n"
        "NVIDIA_SOURCE_IN_IMAGE=$($DOCKER inspect --format "
        "'{{range .Config.Env}}{{println .}}{{end}}' \"$IMAGE\" "
        "| sed -n 's/^NVIDIA_DRIVER_SOURCE=//p')\n" + body,
    )
    print({k: v for k, v in facts.items() if k.endswith(("_s", "_mb")) or k == "storage_driver"})
    assert facts.get("ready_rc") == "0", explain
    assert facts["lost_events"] == "0", "the kernel's trace dropped events: it proves nothing"
    assert facts["modules"] == "nvidia,nvidia_uvm,nvidia_modeset", explain
    assert (facts["mounted"], facts["root_is_image"]) == ("yes", "yes"), explain
    assert facts["used_package"] == "1", explain
    assert facts["compilers"] == "", f"a compiler ran: {facts['compilers']}\n{explain}"
    assert int(facts["linked"]) >= 1, "no linker ran: the trace saw no link of the package"
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


def test_committed_real_image_exits_7_without_a_gpu(
    guest: Guest, committed_images: CommittedImages, tmp_path: Path
) -> None:
    """The committed image of the real 535.261.03 driver on a node without a GPU: the
    kernel refuses nvidia.ko (ENODEV), `init` exits 7 and leaves no NVIDIA module."""
    image = committed_images(guest.kernel, "real").tar
    body = r"""
    $DOCKER run -d --name nvidia-driver --privileged --pid=host --network none \
        "${DRIVER_MOUNTS[@]}" "$IMAGE" >&2 || exit 1
    until_true '! running nvidia-driver' 600 nvidia-driver; say exited_rc $?
    say exit_code "$(exit_code nvidia-driver)"
    state after
    $DOCKER logs nvidia-driver >$LOGS/container.log 2>&1
    """
    facts, explain = run_scenario(guest, tmp_path, image, body)
    assert facts.get("exited_rc") == "0", explain
    assert facts["exit_code"] == "7", explain
    assert (facts["after_modules"], facts["after_mounted"]) == ("", "no"), explain


@pytest.fixture
def uncommitted_standin(
    docker_engine: Engine, mirrors: Mirrors, guest: Guest, tmp_path: Path
) -> Path:
    """The stand-in image as `docker build` makes it (no package), saved for the guest."""
    name = build_image(docker_engine, "standin", mirrors(guest.kernel).signing_key)
    tar = tmp_path / "image.tar"
    docker_engine.docker("save", "-o", tar, name)
    return tar


def test_uncommitted_image_builds_from_the_mirror_into_the_node_store(
    guest: Guest, mirrors: Mirrors, uncommitted_standin: Path, tmp_path: Path
) -> None:
    """`init` of the image as `docker build` made it (no package; its entrypoint is
    `nvidia-driver`, so the command is `init`): with the local Flatcar
    mirror on the node's 127.0.0.1 (`--network host`), it fetches the developer container,
    builds in it inside the running container, loads, and puts the package into the
    node's store (a host directory), which outlives the container."""
    mirror = mirrors(guest.kernel)  # its developer root has the guest kernel's headers
    image = uncommitted_standin
    (tmp_path / "mirror.json").write_text(mirror_json(mirror))
    body = r"""
    (cd "$PROJECT" && exec "$PY" -m tests.vm.serve_mirror $LOGS/mirror.json $LOGS/mirror.args) &
    until_true '[ -s $LOGS/mirror.args ]' 120 || exit 1
    mapfile -t mirror_env <$LOGS/mirror.args
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
    $DOCKER logs nvidia-driver >$LOGS/container.log 2>&1
    """
    facts, explain = run_scenario(
        guest,
        tmp_path,
        image,
        f"COMPILERS='{COMPILERS}'\n" + body,
        memory_mb=BUILD_GUEST_MEMORY_MB,
    )
    print({k: v for k, v in facts.items() if k.endswith(("_s", "_mb")) or k == "storage_driver"})
    assert facts.get("ready_rc") == "0", explain
    assert facts["lost_events"] == "0", "the kernel's trace dropped events: it proves nothing"
    assert int(facts["compiled"]) >= 1, "no compiler ran: nothing was built\n" + explain
    assert facts["modules"] == "nvidia,nvidia_uvm,nvidia_modeset", explain
    assert facts["mounted"] == "yes", explain
    stores = {k: facts[k] for k in ("node_packages", "image_packages", "kept_packages")}
    assert stores == {"node_packages": "1", "image_packages": "0", "kept_packages": "1"}, explain
    assert (facts["exit_code"], facts["after_modules"]) == ("0", ""), explain
