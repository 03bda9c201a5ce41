"""A package that a build node pushed and a node pulled from the registry loads on the
real kernel in a guest (issue 12, point 4).

The guest has no network to the host (tests/vm), so the registry runs on the host and
the node's pull runs there too, into the node store that the guest then shares; in
the guest `load` finds the pulled package in that store (with its origin record),
links and loads it. The build node is `update --kernel K --push` of the stand-in driver
in the Flatcar developer container of the local mirror: another build of K than the
guest boots (another UTS_VERSION), as on Flatcar, so the pull and the load match the
package by its kernel ABI, never by /proc/version (issue 19).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from nvdriver import registry
from nvdriver.config import Config
from nvdriver.driver import package as pkg
from nvdriver.kmod.abi import RunningAbi
from tests.conftest import need, run_tool, standin_env
from tests.flatcar_mirror import TREE_UTS_VERSION, serve_mirror
from tests.integration.conftest_mirror import Mirrors
from tests.registry import make_key, serve_registry, tools_missing
from tests.standin.tree import make_standin_source

from .conftest import Guest

VERSION = "535.999.04"


def test_a_package_pulled_from_the_registry_loads_in_the_guest(
    guest: Guest, mirrors: Mirrors, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    need(not tools_missing(), f"missing {', '.join(tools_missing())}")
    source = make_standin_source(tmp_path / "src", version=VERSION, flavours=("kernel",))
    key = make_key(tmp_path / "keys", "fleet")
    node = standin_env(tmp_path / "node", source, VERSION)
    with serve_registry(tmp_path / "registry") as reg:
        builder = {
            **standin_env(tmp_path / "builder", source, VERSION),
            **reg.env(),
            "PRECOMPILED_SIGNING_KEY": str(key.secret),
            "HOST_ROOT": str(tmp_path / "builder-host"),
        }
        with serve_mirror(mirrors(guest.kernel)) as mirror:
            built = run_tool(
                "update",
                "--kernel",
                guest.kernel,
                "--push",
                reg.reference,
                env={**builder, **mirror.env()},
            )
        assert built.returncode == 0, built.stderr
        m = pkg.read_manifest(Path(built.stdout.strip()))
        env = {**node, **reg.env(), "PRECOMPILED_TRUSTED_KEYS": str(key.public)}
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        config = Config.from_env(env)
        fit = RunningAbi(config, m.kernel_release).fit  # this machine's /lib/modules/K
        wanted = registry.Wanted(m.kernel_release, fit, VERSION, m.flavour, None)
        pulled = registry.pull(
            config, registry.Reference.parse(reg.reference), wanted, config.node_precompiled_dir
        )
    origin = json.loads(Path(f"{pulled.path}.origin.json").read_text())
    assert origin["origin"] == "registry"

    log = tmp_path / "load.log"
    script = tmp_path / "load.sh"
    script.write_text(
        f"{sys.executable} -m nvdriver.cli load 2>{log}; echo load_rc=$?\n"
        "awk '$1 ~ /^nvidia/ {print $1}' /proc/modules | sort | paste -sd, - | sed 's/^/loaded=/'\n"
        "echo version=$(cat /sys/module/nvidia/version)\n"
        f"{sys.executable} -m nvdriver.cli unload 2>>{log}; echo unload_rc=$?\n"
    )
    result = guest(
        ["bash", str(script)],
        env={**node, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        shares={str(tmp_path): tmp_path},
        timeout=400,
    )
    text = log.read_text() if log.exists() else ""
    facts = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    assert facts.get("load_rc") == "0", text + result.console[-2000:]
    assert f"Using the precompiled package {pulled.path}" in text
    assert TREE_UTS_VERSION in pulled.manifest.kernel_version, "another build than the guest's"
    assert "symbol CRCs agree with the running kernel's" in text, text
    assert facts["loaded"] == "nvidia,nvidia_modeset,nvidia_uvm"
    assert facts["version"] == VERSION
    assert facts["unload_rc"] == "0", text
