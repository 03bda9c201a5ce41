"""The reboot proof (issue 12, point 3): a package built ahead on the host for the next
Flatcar release, while the node runs the older one, is what `init` uses after the node
boots the next release's kernel: no compiler runs, no developer container is fetched,
no build directory is made, and the driver is ready (tests/vm/reboot.py).

One guest boot: the next release's kernel (the newest series under test), whatever
kernel the other guest tests run on.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.flatcar_mirror import FleetMirror

from .conftest import Guest, require_guest
from .reboot import FUNCTIONS, build_ahead
from .scenario import explain_run, facts_of

BODY = r"""
boot_to_ready boot
say modules "$(nvidia_modules)"
say work_dirs "$(find $NVIDIA_DRIVER_CACHE/work -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)"
say images "$(find $NVIDIA_DRIVER_CACHE/flatcar -type f 2>/dev/null | wc -l)"
nv status --json >$LOGS/status.json; say status_rc $?
stop_init TERM; say init_rc $INIT_RC
say after_modules "$(nvidia_modules)"
"""


def test_after_the_reboot_the_package_built_ahead_is_used_without_a_compile(
    fleet_mirror: FleetMirror, tmp_path: Path
) -> None:
    require_guest()
    following = fleet_mirror.next
    node = build_ahead(tmp_path, fleet_mirror)
    logs = tmp_path / "logs"
    logs.mkdir()
    script = logs / "reboot.sh"
    script.write_text(FUNCTIONS + BODY)
    result = Guest(following.kernel_release)(
        ["bash", str(script)],
        env={**node.env, "LOGS": str(logs), "RELEASE": following.version},
        shares={str(tmp_path): tmp_path},
        timeout=600,
    )
    facts = facts_of(result.stdout)
    explain = explain_run(result, logs)
    print({k: v for k, v in facts.items() if k.endswith("_s")})
    assert facts.get("boot_ready_rc") == "0", explain
    assert facts["boot_lost"] == "0", "the kernel's trace dropped events: it proves nothing"
    assert facts["boot_compiled"] == "0", "a compiler ran at boot\n" + explain
    assert (facts["work_dirs"], facts["images"]) == ("0", "0"), explain
    assert facts["modules"] == "nvidia,nvidia_uvm,nvidia_modeset", explain
    init_log = (logs / "boot.log").read_text()
    assert f"Using the precompiled package {node.package} from the node's store" in init_log
    assert "building one" not in init_log, explain
    releases = json.loads((logs / "status.json").read_text())["releases"]
    assert releases["running"]["version"] == following.version
    assert releases["running"]["kernel_release"] == following.kernel_release
    assert [(p["path"], p["origin"]) for p in releases["running"]["packages"]] == [
        (str(node.package), {"origin": "built here"})
    ]
    assert releases["next"] is None, "the node runs the release it built ahead for"
    assert (facts["init_rc"], facts["after_modules"]) == ("0", ""), explain
