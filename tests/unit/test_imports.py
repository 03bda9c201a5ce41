"""The start path imports only what it calls (issue 22): `nvidia-driver status --help`
loads nothing of the driver, and `init` up to its linked tree nothing of a build, a
registry, the Flatcar feed or the D-Bus client. Each runs the installed command in a
child interpreter under `-X importtime` and reads which modules it imported; a new
top-level import of one of these modules fails here, naming it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nvdriver.config import Config
from nvdriver.run import spawn
from tests.packaging import package_for_running_kernel
from tests.unit.test_init_without_package import node_without_package

TOOL = Path(sys.executable).parent / "nvidia-driver"

# What only `update`, `packages`, a registry, a build or an NVSwitch board needs.
HEAVY = (
    "ssl",
    "http.client",
    "urllib.request",
    "email",
    "concurrent.futures",
    "socket",
    "xml.etree.ElementTree",
    "jeepney",
    "nvdriver.registry",
    "nvdriver.credhelper",
    "nvdriver.builder",
    "nvdriver.driver.build",
    "nvdriver.driver.sign",
    "nvdriver.flatcar.fetch",
    "nvdriver.flatcar.download",
    "nvdriver.flatcar.gpg",
    "nvdriver.flatcar.image",
    "nvdriver.flatcar.release",
    "nvdriver.fleet",
    "nvdriver.trust",
    "nvdriver.staged",
    "nvdriver.watch",
    "nvdriver.unpack",
    "nvdriver.validate",
)


def imported(importtime: str) -> list[str]:
    """The modules of `-X importtime` lines, in the order they were imported."""
    return [
        line.split("|")[2].strip()
        for line in importtime.splitlines()
        if line.startswith("import time:") and not line.rstrip().endswith("| imported package")
    ]


def heavy(modules: list[str]) -> list[str]:
    return [m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY)]


def test_status_help_imports_nothing_of_the_driver() -> None:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", TOOL, "status", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--json" in result.stdout
    modules = imported(result.stderr)
    assert "nvdriver.cli" in modules
    assert [m for m in modules if m.startswith("nvdriver")] == [
        "nvdriver",
        "nvdriver.errors",
        "nvdriver.cli",
        "nvdriver.flags",
    ]
    assert heavy(modules) == []
    assert "subprocess" not in modules and "tarfile" not in modules


def test_init_imports_nothing_of_a_build_up_to_its_linked_tree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`init` with a package for the running kernel, stopped once its tree is linked
    (NVIDIA_DRIVER_TEST_PAUSE_AT): the package was found, verified, linked and depmod'ed."""
    node_without_package(tmp_path, monkeypatch)
    package_for_running_kernel(Config.from_env(dict(os.environ)), tmp_path / "build")
    modules, log = _init_up_to_its_linked_tree()
    assert "Linked and installed" in log
    assert {"nvdriver.lifecycle", "nvdriver.driver.link", "nvdriver.kmod.loading"} <= set(modules)
    assert heavy(modules) == []


# What a start whose linked tree's proof holds (a reboot with the container kept: nothing
# loaded, the tree of the last start still there) needs only to link, to pack, or to take
# the driver over from modules loaded already: `dataclasses` (with `inspect`, `ast`, `dis`),
# `tempfile` (with `random`), `datetime`, `gzip` (a host's compressed modules), the toolchain,
# the handover and what it reads of the driver's users.
NOT_ON_A_PROVEN_START = (
    "dataclasses",
    "inspect",
    "tempfile",
    "random",
    "datetime",
    "gzip",
    "nvdriver.driver.toolchain",
    "nvdriver.handover",
    "nvdriver.kmod.users",
)


def test_a_start_whose_tree_holds_its_proof_imports_nothing_to_link_or_take_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node_without_package(tmp_path, monkeypatch)
    package_for_running_kernel(Config.from_env(dict(os.environ)), tmp_path / "build")
    _init_up_to_its_linked_tree()
    modules, log = _init_up_to_its_linked_tree()
    assert "verified on this node before (its proof holds)" in log
    assert "nvdriver.driver.link" in modules
    offenders = [m for m in modules if m in NOT_ON_A_PROVEN_START]
    assert offenders == [], " ".join(offenders)


def _init_up_to_its_linked_tree() -> tuple[list[str], str]:
    """`init`'s imports and log up to its linked tree (NVIDIA_DRIVER_TEST_PAUSE_AT), where
    it is stopped."""
    env = {**os.environ, "NVIDIA_DRIVER_TEST_PAUSE_AT": "linked"}
    lines = []
    with spawn(
        [sys.executable, "-X", "importtime", TOOL, "init"],
        env=env,
        stderr=subprocess.PIPE,
        terminate_timeout=30,
    ) as proc:
        assert proc.stderr is not None
        for raw in proc.stderr:
            lines.append(raw.decode(errors="replace"))
            if "Pausing at step linked" in lines[-1]:
                break
        else:
            pytest.fail("init did not reach its linked tree:\n" + "".join(lines[-30:]))
    text = "".join(lines)
    log = "".join(line for line in lines if not line.startswith("import time:"))
    return imported(text), log


# What a start needs only when it reads a package or stops: not before a restart that
# adopts the loaded driver is ready (lifecycle imports these where they are called). The
# records of the start path are NamedTuples: `dataclasses` (with `inspect`, `ast` and `dis`)
# costs its import and a compiled `__init__`, `__eq__`, `__repr__`... per class. `shutil`
# (and `tempfile`, which imports it) loads the bz2, lzma and zlib modules. A command given
# alone, as the container gives `init`, is parsed without argparse (with gettext).
NOT_ON_A_RESTART = (
    "dataclasses",
    "inspect",
    "shutil",
    "tempfile",
    "lzma",
    "bz2",
    "gzip",
    "tarfile",
    "hashlib",
    "_hashlib",
    "ctypes",
    "datetime",
    "platform",
    "argparse",
    "gettext",
    "nvdriver.flags",
    "nvdriver.driver.package",
    "nvdriver.driver.link",
    "nvdriver.kmod.abi",
    "nvdriver.buildlock",
    "nvdriver.handover",
    "nvdriver.kmod.users",
)


def test_what_a_restart_imports_leaves_out_the_package_the_link_and_the_shutdown() -> None:
    """`init` imports lifecycle before its first step: a restart that adopts the loaded
    driver reads no package, links nothing and stops nothing on its way to readiness, so
    none of what those need is imported with it (each costs tens of milliseconds under
    emulation: the tar and gzip modules, OpenSSL's library, the ABI scan, the handover).
    The CLI's own work counts too (argparse asked `shutil` for the terminal's width at each
    `add_argument`): the command runs up to the call of `lifecycle.init`, which ends it.
    What init's own steps ask for: tests/unit/test_restart_adopts.py."""
    up_to_init = (
        "import sys, nvdriver.lifecycle\n"
        "nvdriver.lifecycle.init = lambda config: sys.exit(0)\n"
        "from nvdriver.cli import main\n"
        "main(['init'])\n"
    )
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", up_to_init],
        capture_output=True,
        text=True,
        check=True,
    )
    modules = imported(result.stderr)
    assert {"nvdriver.lifecycle", "nvdriver.rootfs", "nvdriver.kmod.loading"} <= set(modules)
    assert [m for m in modules if m in NOT_ON_A_RESTART] == []
