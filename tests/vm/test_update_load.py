"""A package made by `update --kernel K` in the Flatcar developer container (local
mirror) links with the saved linker and loads on the real kernel K in a guest, for
each kernel under test (the mirror carries that kernel's headers)."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.conftest import run_tool, standin_env
from tests.flatcar_mirror import serve_mirror
from tests.integration.conftest_mirror import Mirrors
from tests.standin.tree import make_standin_source

from .conftest import Guest

VERSION = "535.999.03"


def test_a_developer_container_package_loads_on_its_kernel(
    guest: Guest, mirrors: Mirrors, tmp_path: Path
) -> None:
    flatcar_mirror = mirrors(guest.kernel)  # its developer root has the guest kernel's headers
    assert flatcar_mirror.kernel_release == guest.kernel
    source = make_standin_source(tmp_path / "src", version=VERSION)
    env = standin_env(tmp_path, source, VERSION)
    with serve_mirror(flatcar_mirror) as server:
        built = run_tool(
            "update",
            "--kernel",
            guest.kernel,
            env={**env, **server.env(), "HOST_ROOT": str(tmp_path / "host")},
        )
    assert built.returncode == 0, built.stderr
    assert list((tmp_path / "cache" / "toolchain").glob("*/ld"))
    # The developer container image is not needed to load: only the package, the
    # driver's core objects and the saved linker.
    for image in (tmp_path / "cache" / "flatcar").rglob("*.bin"):
        image.unlink()

    script = tmp_path / "load.sh"
    script.write_text(
        f"{sys.executable} -m nvdriver.cli load 2>{tmp_path}/load.log; echo load_rc=$?\n"
        "awk '$1 ~ /^nvidia/ {print $1}' /proc/modules | sort | paste -sd, - | sed 's/^/loaded=/'\n"
        "echo version=$(cat /sys/module/nvidia/version)\n"
        f"{sys.executable} -m nvdriver.cli unload 2>>{tmp_path}/load.log; echo unload_rc=$?\n"
        "echo left=$(grep -c '^nvidia' /proc/modules)\n"
    )
    result = guest(
        ["bash", str(script)],
        env={**env, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        shares={str(tmp_path): tmp_path},
        timeout=400,
    )
    log = (tmp_path / "load.log").read_text() if (tmp_path / "load.log").exists() else ""
    facts = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    assert facts.get("load_rc") == "0", log + result.console[-2000:]
    assert facts["loaded"] == "nvidia,nvidia_modeset,nvidia_uvm"
    assert facts["version"] == VERSION
    assert (facts["unload_rc"], facts["left"]) == ("0", "0"), log
    assert "Linking with" not in log, "the saved linker of the developer container is used"
