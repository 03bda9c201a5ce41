"""A node's reboot onto the next Flatcar release, with its package built ahead.

On the host, while the node "runs" the fleet mirror's running release (HOST_ROOT's
os-release says so), `update --store node --next` builds the stand-in driver in the
next release's developer container into the node's store (`build_ahead`). Then a QEMU
guest boots the next release's kernel, its os-release says the next release, and
`init` starts (`GUEST`): the package must be used as it is. The guest's kernel traces
every exec (tracefs), so "no compiler ran" is what the kernel saw; the Flatcar mirror
is a dead port on the guest's 127.0.0.1 and the developer container was removed from
the cache, so a build could not even start without failing.

Shared by tests/vm/test_reboot.py (the proof) and bench/fleet.py (the timing).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from tests.conftest import run_tool, standin_env
from tests.flatcar_mirror import FleetMirror, serve_mirror
from tests.standin.tree import make_standin_source

from .scenario import LIB, PERSISTENCED, VERSION, guest_env
from .test_container import COMPILERS, ENGINE

# Nothing listens there in the guest (it has no network but its own loopback).
DEAD_MIRROR = "http://127.0.0.1:9"


@dataclasses.dataclass(frozen=True)
class AheadNode:
    """What the host built ahead, and the guest's environment for the node after the reboot."""

    work: Path  # shared with the guest at the same path
    package: Path
    env: dict[str, str]


def node_host(root: Path, version: str) -> Path:
    """A HOST_ROOT whose os-release (the documented mount) says Flatcar `version`."""
    (root / "host-etc").mkdir(parents=True, exist_ok=True)
    (root / "host-etc" / "os-release").write_text(f"ID=flatcar\nVERSION={version}\n")
    return root


def build_ahead(work: Path, fleet: FleetMirror) -> AheadNode:
    """`update --store node --next` on the host while it runs `fleet.running`."""
    source = make_standin_source(work / "src", version=VERSION)
    env = standin_env(work, source, VERSION)
    host = node_host(work / "host", fleet.running.version)
    with serve_mirror(fleet.running) as server:
        built = run_tool(
            "update",
            "--store",
            "node",
            "--next",
            env={**env, **server.env(), "HOST_ROOT": str(host)},
        )
    assert built.returncode == 0, built.stderr
    package = Path(built.stdout.strip())
    assert package.parent == work / "node-precompiled" / fleet.next.kernel_release, built.stderr
    # The developer container stays behind on the build host: a build after the reboot
    # would have to download it, from a mirror that is not there.
    shutil.rmtree(work / "cache" / "flatcar")
    (work / "bin").mkdir()
    (work / "bin" / "nvidia-persistenced").write_text(PERSISTENCED)
    (work / "bin" / "nvidia-persistenced").chmod(0o755)
    (work / "params").mkdir()
    guest = {
        **guest_env(work, source, work / "precompiled", VERSION),
        "NODE_PRECOMPILED_DIR": str(work / "node-precompiled"),
        "NVIDIA_DRIVER_CACHE": str(work / "cache"),
        "FLATCAR_RELEASE_URL": DEAD_MIRROR,
        "FLATCAR_RELEASES_FEED": DEAD_MIRROR + "/releases-{channel}.json",
        "FLATCAR_SIGNING_KEY": str(fleet.running.signing_key),
        "COMPILERS": COMPILERS,
    }
    return AheadNode(work, package, guest)


# Bash for the guest (lifecycle.sh's and engine.sh's helpers): the node after its reboot
# into RELEASE; `boot_to_ready KEY` reports KEY_s (init's start to the readiness file),
# KEY_compiled (compiler execs the kernel saw), KEY_lost (dropped trace events), and
# leaves init running in INIT_PID.
FUNCTIONS = f"""
set -u
source {LIB}
source {ENGINE}
mkdir -p /host-etc && printf 'ID=flatcar\\nVERSION=%s\\n' "$RELEASE" >/host-etc/os-release
progress() {{ echo "$*" >>$LOGS/progress.log; }}
boot_to_ready() {{
    start_trace || return 1
    local t=$(now) rc s
    start_init $LOGS/$1.log
    wait_ready "${{2:-300}}"; rc=$?; s=$(since $t)
    say $1_ready_rc $rc
    say $1_s $s
    say $1_compiled "$(trace_execs | grep -cE "$COMPILERS")"
    say $1_lost "$(lost_events)"
    progress "$1: init start-to-ready $s s (ready: exit $rc)"
}}
"""
