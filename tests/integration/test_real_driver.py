"""The real NVIDIA 535 proprietary sources (Debian's), built against the installed headers.

Slow: the build takes minutes on 2 cores. What it proves: our build and our
link on the node give the module NVIDIA's own Makefile gives.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from nvdriver.config import Config
from nvdriver.driver import package as pkg
from nvdriver.driver.build import build_modules
from nvdriver.driver.link import link_package
from nvdriver.driver.source import DriverSource
from nvdriver.host import KernelTree

pytestmark = pytest.mark.slow


def modinfo(ko: Path, field: str) -> str:
    return subprocess.run(
        ["modinfo", "-F", field, str(ko)], check=True, capture_output=True, text=True
    ).stdout.strip()


def undefined(ko: Path) -> set[str]:
    out = subprocess.run(["nm", "-u", str(ko)], check=True, capture_output=True, text=True).stdout
    return {line.split()[-1] for line in out.splitlines() if line.strip()}


def test_real_535_links_to_the_module_nvidias_makefile_builds(
    tmp_path, real_proprietary_source, kernel_build, kernel_release
):
    config = Config.from_env({"NVIDIA_DRIVER_SOURCE": str(real_proprietary_source)})
    source = DriverSource.from_config(config)
    assert source.version.startswith("535.")
    work = tmp_path / "work"
    work.mkdir()
    output = build_modules(
        source, "proprietary", KernelTree.from_dir(kernel_build), work, jobs=config.max_threads
    )
    package = pkg.write_package(tmp_path / "precompiled", output, tag=None)
    assert pkg.verify(package.path).kernel_release == kernel_release
    moddir = link_package(package.path, source, tmp_path / "opt" / source.version)

    linked = moddir / "nvidia.ko"
    makefile_built = output.tree / "nvidia.ko"
    vermagic = modinfo(linked, "vermagic")
    assert vermagic.split()[0] == kernel_release
    assert vermagic == modinfo(makefile_built, "vermagic")
    assert undefined(linked) == undefined(makefile_built)
    assert modinfo(linked, "version") == source.version
    for name in ("nvidia-uvm", "nvidia-modeset", "nvidia-drm"):
        assert modinfo(moddir / f"{name}.ko", "vermagic") == vermagic
    assert "nvidia" in modinfo(moddir / "nvidia-modeset.ko", "depends").split(",")
    assert "nvidia" in modinfo(moddir / "nvidia-uvm.ko", "depends").split(",")
    assert (moddir / "modules.dep").read_text().count("nvidia") >= 4
