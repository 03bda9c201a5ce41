"""Fixtures shared by the test suites: kernels, driver sources, the CLI."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.container import CommittedImages, EngineError, committed_images, docker_engine
from tests.integration.conftest_mirror import (
    flatcar_mirror,
    flatcar_mirror_server,
    fleet_mirror,
    mirrors,
)
from tests.kernels import header_kernels, kernel_pairs, kernels_under_test, missing_ci_series
from tests.real_build import RealBuild, RealBuildFailed

__all__ = [
    "committed_images",
    "docker_engine",
    "flatcar_mirror",
    "flatcar_mirror_server",
    "fleet_mirror",
    "mirrors",
]

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


@dataclasses.dataclass(frozen=True)
class MissingSeries:
    """A series CI must test that has no kernel pair here."""

    series: str


def kernel_params(releases: list[str]) -> list[Any]:
    """One parameter per kernel release of `releases`; under CI one more, failing, per
    series of CI_SERIES none of them belongs to; outside CI, with none at all, one that
    skips. Never an empty list: pytest skips a test of no parameters, even under CI."""
    params = [pytest.param(r, id=r) for r in releases]
    if os.environ.get("CI"):
        params += [
            pytest.param(MissingSeries(s), id=f"{s}-missing") for s in missing_ci_series(releases)
        ]
    return params or [pytest.param(None, id="no-kernel")]


def kernel_param(value: object, what: str, found: list[str]) -> str:
    """The release of a parameter of `kernel_params`; for a series CI must test and that is
    missing, a failure; with no kernel here (`what`: what is missing), a skip."""
    if isinstance(value, MissingSeries):
        pytest.fail(
            f"CI must provide a {value.series} {what}, found: {', '.join(found) or 'none'} "
            "(install them with .ci/install-deps)"
        )
    need(value is not None, f"no {what}")
    return str(value)


def _kernel_params() -> list[Any]:
    """The kernels under test (tests/kernels.py) as parameters of `kernel_params`."""
    return kernel_params(kernels_under_test())


@pytest.fixture(scope="session", params=_kernel_params())
def kernel(request: pytest.FixtureRequest) -> str:
    """A kernel release to boot and build for; a test that takes it runs once per kernel.

    The rule (tests/kernels.py): the newest pair (`/boot/vmlinuz-K` with
    `/lib/modules/K/build`) of each installed series, discovered when the tests are
    collected, ids = the release. Outside CI a machine with fewer series tests fewer
    (none: skip). Under `CI` every series of `CI_SERIES` (6.1 and 6.12, README,
    "Kernels") must have a pair: a missing one is a failing parameter `<series>-missing`,
    so CI cannot pass on one kernel.
    """
    what = "kernel pair (/boot/vmlinuz-K with /lib/modules/K/build)"
    return kernel_param(request.param, what, kernel_pairs())


@pytest.fixture(scope="session")
def kernel_release() -> str:
    """The one kernel of the tests that do not depend on the series: the oldest with headers."""
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
def real_builds(committed_images: CommittedImages) -> Callable[[str], RealBuild]:
    """`real_builds(K)`: the real 535 driver built for kernel K the way a node builds it,
    `update --kernel K` in a container of the image, in the Flatcar developer container
    of the local mirror for K. That is the update the committed real image is made of
    (tests/container.py), so it is built once and both take it. A failed build fails
    every test that needs it without being tried again."""
    built: dict[str, RealBuild | RealBuildFailed] = {}

    def get(kernel: str) -> RealBuild:
        if kernel not in built:
            source = unpack_debian_source("proprietary")
            try:
                image = committed_images(kernel, "real")
            except EngineError as e:
                built[kernel] = RealBuildFailed(f"the committed real image for {kernel}: {e}")
            else:
                built[kernel] = RealBuild(
                    kernel,
                    source,
                    image.built / "precompiled",
                    image.built / "cache",
                    image.built_package,
                    image.log,
                )
        result = built[kernel]
        if isinstance(result, RealBuildFailed):
            raise result
        return result

    return get


@pytest.fixture
def real_535(kernel: str, real_builds: Callable[[str], RealBuild]) -> RealBuild:
    """The real 535 proprietary driver built for `kernel` (each kernel under test in turn)
    in its Flatcar developer container, shared by every test that takes it."""
    return real_builds(kernel)


def standin_env(work: Path, source: Path, version: str) -> dict[str, str]:
    """The environment that points the tool at a driver source and stores under `work`."""
    return {
        "DRIVER_VERSION": version,
        "NVIDIA_DRIVER_SOURCE": str(source),
        "PRECOMPILED_DIR": str(work / "precompiled"),
        "NODE_PRECOMPILED_DIR": str(work / "node-precompiled"),
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
