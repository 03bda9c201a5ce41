"""Fixtures shared by the test suites: kernels, driver sources, the CLI."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.conftest_mirror import flatcar_mirror, flatcar_mirror_server

__all__ = ["flatcar_mirror", "flatcar_mirror_server"]

CACHE = Path.home() / ".cache" / "nvidia-driver-tests"
DEBIAN_SOURCES = {
    "proprietary": Path("/usr/src/nvidia-kernel.tar.xz"),
    "open": Path("/usr/src/nvidia-open-kernel.tar.xz"),
}
TOOL = Path(sys.executable).parent / "nvidia-driver"


def need(condition: bool, reason: str) -> None:
    """Skip when something of the test bed is missing, but fail in CI, which installs it all."""
    if not condition:
        if os.environ.get("CI"):
            pytest.fail(f"CI must provide this: {reason}")
        pytest.skip(reason)


def header_kernels() -> list[str]:
    """Kernel releases whose build tree is installed, oldest first (never hard-coded)."""
    base = Path("/lib/modules")
    found = (
        [d.name for d in base.iterdir() if (d / "build" / "Makefile").is_file()]
        if base.is_dir()
        else []
    )
    return sorted(
        found, key=lambda r: [int(x) if x.isdigit() else x for x in r.replace("-", ".").split(".")]
    )


@pytest.fixture(scope="session")
def kernel_release() -> str:
    kernels = header_kernels()
    need(bool(kernels), "no kernel headers under /lib/modules/*/build (linux-headers-amd64)")
    return kernels[0]


@pytest.fixture(scope="session")
def kernel_build(kernel_release: str) -> Path:
    return Path("/lib/modules") / kernel_release / "build"


def unpack_debian_source(flavour: str) -> Path:
    """Debian's nvidia-(open-)kernel-source tarball, unpacked once per content under ~/.cache."""
    tarball = DEBIAN_SOURCES[flavour]
    need(tarball.is_file(), f"{tarball} (Debian's nvidia-kernel-source) is not installed")
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()[:16]
    dest = CACHE / f"debian-{flavour}-{digest}"
    if not (dest / ".complete").exists():
        tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
        subprocess.run(["rm", "-rf", tmp], check=True)
        tmp.mkdir(parents=True)
        with tarfile.open(tarball) as tar:
            tar.extractall(tmp, filter="tar") if hasattr(
                tarfile, "data_filter"
            ) else tar.extractall(tmp)
        (tmp / ".complete").touch()
        subprocess.run(["rm", "-rf", dest], check=True)
        tmp.rename(dest)
    return dest


@pytest.fixture(scope="session")
def real_proprietary_source() -> Path:
    """The real 535 proprietary tree in Debian's layout (modules/nvidia-kernel)."""
    return unpack_debian_source("proprietary")


def standin_env(work: Path, source: Path, version: str) -> dict[str, str]:
    """The environment that points the tool at a driver source and stores under `work`."""
    return {
        "DRIVER_VERSION": version,
        "NVIDIA_DRIVER_SOURCE": str(source),
        "PRECOMPILED_DIR": str(work / "precompiled"),
        "NVIDIA_DRIVER_CACHE": str(work / "cache"),
    }


RunTool = Callable[..., subprocess.CompletedProcess[str]]


def run_tool(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed `nvidia-driver` command as a user would, with extra environment."""
    full = {k: v for k, v in os.environ.items() if k not in ("DRIVER_VERSION", "HOST_ROOT")}
    full.update(env or {})
    return subprocess.run([str(TOOL), *argv], env=full, capture_output=True, text=True)


@pytest.fixture
def nvidia_driver() -> RunTool:
    return run_tool
