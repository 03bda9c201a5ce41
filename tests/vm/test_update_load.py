"""A signed package made by `update --kernel K --sign KEY` in the Flatcar developer
container (local mirror: another build of K than the guest boots) loads on the real
kernel K in a guest, on a second node: a fresh cache and a store that only got the
package, as a node of the fleet gets it from the image, the registry or another node.

That node links with the linker the package carries (its loader's exec is counted in
the guest's trace), the signature it appends holds (the linked module's signer), and
no compiler runs. For each kernel under test (the mirror carries its headers)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from tests.conftest import run_tool, standin_env
from tests.flatcar_mirror import serve_mirror
from tests.integration.conftest_mirror import Mirrors
from tests.integration.test_signing import signing_key  # noqa: F401 (a fixture)
from tests.standin.tree import make_standin_source

from .conftest import Guest
from .scenario import explain_run, facts_of
from .test_container import COMPILERS, ENGINE, LIFECYCLE, PACKED_LINKER

VERSION = "535.999.03"

SCRIPT = r"""
set -u
source "$LIFECYCLE"; source "$ENGINE"
K=$(uname -r)
start_trace || exit 1
nv load 2>"$LOGS/load.log"; say load_rc $?
say loaded "$(awk '$1 ~ /^nvidia/ {print $1}' /proc/modules | sort | paste -sd, -)"
say version "$(cat /sys/module/nvidia/version)"
say signer "$(modinfo -F signer "/opt/nvidia/$DRIVER_VERSION/lib/modules/$K/nvidia.ko")"
say packed_linker "$(trace_execs | grep -cE "$PACKED_LINKER")"
say compiled "$(trace_execs | grep -cE "$COMPILERS")"
say lost "$(lost_events)"
nv unload 2>>"$LOGS/load.log"; say unload_rc $?
say left "$(grep -c '^nvidia' /proc/modules)"
"""


def test_a_signed_developer_container_package_loads_on_another_node(
    guest: Guest,
    mirrors: Mirrors,
    tmp_path: Path,
    signing_key: Path,  # noqa: F811
) -> None:
    flatcar_mirror = mirrors(guest.kernel)  # its developer root has the guest kernel's headers
    assert flatcar_mirror.kernel_release == guest.kernel
    source = make_standin_source(tmp_path / "src", version=VERSION)
    builder = tmp_path / "builder"
    with serve_mirror(flatcar_mirror) as server:
        built = run_tool(
            "update",
            "--kernel",
            guest.kernel,
            "--sign",
            str(signing_key),
            env={
                **standin_env(builder, source, VERSION),
                **server.env(),
                "HOST_ROOT": str(tmp_path / "host"),
            },
        )
    assert built.returncode == 0, built.stderr
    package = Path(built.stdout.strip())
    # The second node: its image store has the package, its cache is empty (no
    # developer container, no linker of a build), its module tree its own.
    node = tmp_path / "node"
    env = standin_env(node, source, VERSION)
    (node / "precompiled" / guest.kernel).mkdir(parents=True)
    shutil.copy2(package, node / "precompiled" / guest.kernel / package.name)
    (node / "cache").mkdir()
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "scenario.sh").write_text(SCRIPT)
    result = guest(
        ["bash", str(logs / "scenario.sh")],
        env={
            **env,
            "PY": sys.executable,
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "LOGS": str(logs),
            "LIFECYCLE": str(LIFECYCLE),
            "ENGINE": str(ENGINE),
            "COMPILERS": COMPILERS,
            "PACKED_LINKER": PACKED_LINKER,
        },
        shares={str(tmp_path): tmp_path},
        timeout=400,
    )
    facts = facts_of(result.stdout)
    explain = explain_run(result, logs)
    assert facts.get("load_rc") == "0", explain
    assert facts["loaded"] == "nvidia,nvidia_modeset,nvidia_uvm"
    assert facts["version"] == VERSION
    assert facts["signer"] == "nvidia-driver test signer", explain
    assert int(facts["packed_linker"]) >= 1, "the split modules linked by the package's ld"
    assert (facts["compiled"], facts["lost"]) == ("0", "0"), explain
    assert (facts["unload_rc"], facts["left"]) == ("0", "0"), explain
    # The node's cache holds the build lock `load` takes to clean up and the kept scan of
    # the host modules (kernel-abi/), nothing to link.
    assert {p.name for p in (node / "cache").iterdir()} == {"build.lock", "kernel-abi"}
