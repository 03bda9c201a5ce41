"""The real NVIDIA 535 proprietary driver (Debian's sources) on each kernel under test.

Slow: one build per kernel, the node's way (`update --kernel K` in the Flatcar
developer container of the local mirror for K: tests/real_build.py), shared with
the guest test that loads it (tests/vm/test_lifecycle.py). What it proves: the
real driver builds in the developer container of either kernel series, and our
link on the node, with the linker saved from that container, gives modules that
the kernel accepts: its vermagic, every symbol they need exported by the kernel
or by the driver's own modules, with the kernel's symbol CRCs (what the kernel's
module loader checks; the guest test then loads nvidia.ko for real).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from nvdriver.config import Config
from nvdriver.driver import package as pkg
from nvdriver.driver.link import link_package
from nvdriver.driver.source import DriverSource
from nvdriver.host import KernelIdentity, KernelTree
from nvdriver.kmod.modversions import read_symvers
from tests.real_build import RealBuild

pytestmark = pytest.mark.slow

MODULES = ("nvidia", "nvidia-uvm", "nvidia-modeset", "nvidia-drm")


def modinfo(ko: Path, field: str) -> str:
    return subprocess.run(
        ["modinfo", "-F", field, str(ko)], check=True, capture_output=True, text=True
    ).stdout.strip()


def nm(ko: Path, *flags: str) -> list[list[str]]:
    out = subprocess.run(["nm", *flags, str(ko)], check=True, capture_output=True, text=True)
    return [line.split() for line in out.stdout.splitlines() if line.strip()]


def modversions(ko: Path) -> dict[str, int]:
    """symbol -> CRC of the module's __versions table (what it was built against)."""
    out = subprocess.run(
        ["modprobe", "--dump-modversions", str(ko)], check=True, capture_output=True, text=True
    ).stdout
    return {sym: int(crc, 16) for crc, sym in (line.split() for line in out.splitlines())}


def kernel_exports(build: Path) -> dict[str, int]:
    """symbol -> CRC of everything the kernel and its modules export (Module.symvers)."""
    exports = {}
    for line in (build / "Module.symvers").read_text().splitlines():
        crc, sym = line.split("\t")[:2]
        exports[sym] = int(crc, 16)
    return exports


def identity(kernel: str) -> KernelIdentity:
    return KernelIdentity.from_build_tree(KernelTree.from_dir(Path("/lib/modules") / kernel).output)


def test_update_builds_the_real_535_driver_in_the_developer_container(
    real_535: RealBuild, kernel: str
) -> None:
    m = pkg.verify(real_535.package)
    assert m.driver_version.startswith("535.")
    assert (m.kernel_release, m.flavour) == (kernel, "proprietary")
    # Built in the mirror's developer container: another build of the kernel (another
    # UTS_VERSION), with the booted kernel's release, vermagic and CRCs (Module.symvers
    # of the kernel's own headers on this machine).
    assert m.kernel_release == identity(kernel).release
    assert m.kernel_version != identity(kernel).version
    symvers = read_symvers(Path("/lib/modules") / kernel / "build" / "Module.symvers")
    assert len(m.kernel_symbols) > 100
    assert all(symvers[name] == crc for name, crc in m.kernel_symbols)
    assert {e.name for e in m.modules} >= set(MODULES)
    assert real_535.package.parent == real_535.precompiled / kernel
    # The developer container's linker travels with the package for the node's link.
    assert m.linker_files is not None and m.linker_files["program"] in dict(m.files)
    assert "Building NVIDIA proprietary" in real_535.log


def test_the_node_link_gives_modules_the_kernel_accepts(
    real_535: RealBuild, kernel: str, tmp_path: Path
) -> None:
    source = DriverSource.from_config(
        Config.from_env({"NVIDIA_DRIVER_SOURCE": str(real_535.source)})
    )
    moddir = link_package(
        real_535.package, source, tmp_path / "opt" / source.version, release=kernel
    )
    kos = {name: moddir / f"{name}.ko" for name in MODULES}
    vermagic = modinfo(kos["nvidia"], "vermagic")
    assert vermagic.split()[0] == kernel
    assert {modinfo(ko, "vermagic") for ko in kos.values()} == {vermagic}
    assert modinfo(kos["nvidia"], "version") == source.version
    assert "nvidia" in modinfo(kos["nvidia-modeset"], "depends").split(",")
    assert "nvidia" in modinfo(kos["nvidia-uvm"], "depends").split(",")
    assert (moddir / "modules.dep").read_text().count("nvidia") >= 4

    exports = kernel_exports(Path("/lib/modules") / kernel / "build")
    ours = {
        row[-1].removeprefix("__ksymtab_")
        for ko in kos.values()
        for row in nm(ko, "--defined-only")
        if row[-1].startswith("__ksymtab_")
    }
    for name, ko in kos.items():
        needed = {row[-1] for row in nm(ko, "--undefined-only")}
        assert needed, name
        # Without NVIDIA's core object linked in, nvidia.ko would need its rm_* symbols.
        assert needed - exports.keys() - ours == set(), name
        crcs = modversions(ko)
        assert crcs, f"{name} has no symbol versions"
        wrong = {s: c for s, c in crcs.items() if s in exports and exports[s] != c}
        assert wrong == {}, f"{name} was built against other CRCs than {kernel}'s"
