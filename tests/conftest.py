"""Fixtures shared by the test suites: kernels, driver sources, the CLI."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.container import CommittedImages, EngineError, committed_images, docker_engine
from tests.flatcar_mirror import _locked
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
# The product's default cache: a test gives every command a cache of its own.
MACHINE_CACHE = Path("/var/cache/nvidia-driver")


@pytest.fixture(autouse=True)
def _machine_cache_untouched() -> Iterator[None]:
    """No test writes into this machine's own cache (a Config made without
    NVIDIA_DRIVER_CACHE would): it would outlive the test and be shared by all."""
    before = MACHINE_CACHE.exists()
    yield
    assert before or not MACHINE_CACHE.exists(), f"a test made {MACHINE_CACHE}"


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


def xdist_scope(nodeid: str, releases: list[str]) -> str:
    """The unit of work of a test under pytest-xdist (tools/test: `-n 2 --dist loadgroup`,
    `pytest_xdist_make_scheduler`): ``kernel-K`` for a test whose parameters name the
    kernel release K of `releases` (the `kernel` fixture's, or a module's kernel
    parameter, or `K-missing` for a missing CI series), so each kernel's guests,
    committed images and session fixtures are made by one worker while the other kernel
    runs beside it; for any other test its file, so a module's fixtures are made once.

    From the test's id, not an `xdist_group` mark: pytest-xdist 3.8 groups by a suffix
    it writes to `item._nodeid`, which pytest 9 no longer reads (`nodeid` is `_id`)."""
    path, _, rest = nodeid.partition("::")
    rest = rest.rsplit("@", 1)[0] if rest.rfind("@") > rest.rfind("]") else rest
    params = rest[rest.find("[") + 1 : -1] if rest.endswith("]") else ""
    parts = params.split("-")
    for release in sorted(releases, key=len, reverse=True):
        n = len(release.split("-"))
        if any("-".join(parts[i : i + n]) == release for i in range(len(parts) - n + 1)):
            return f"kernel-{release.removesuffix('-missing')}"
    return path


def _xdist_releases() -> list[str]:
    releases = kernels_under_test()
    return [*releases, *header_kernels(), *(f"{s}-missing" for s in missing_ci_series(releases))]


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: absent under -p no:xdist
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`--dist loadgroup` with the groups of `xdist_scope`: by kernel, else by file."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    releases = _xdist_releases()

    class ByKernel(LoadScopeScheduling):  # type: ignore[misc]  # xdist is untyped
        def _split_scope(self, nodeid: str) -> str:
            return xdist_scope(nodeid, releases)

        def _assign_work_unit(self, node: Any) -> None:
            # The kernels first, whatever their size: one to each worker at the start
            # (the longest units: guests under TCG), the rest to whichever is free.
            kernels = [s for s in self.workqueue if s.startswith("kernel-")]
            for scope in reversed(kernels):
                self.workqueue.move_to_end(scope, last=False)
            super()._assign_work_unit(node)

    return ByKernel(config, log)


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
    # Locked: a second process (an xdist worker, another checkout) that finds the entry
    # incomplete waits for the first instead of deleting the tree it is unpacking.
    with _locked(dest.with_name(dest.name + ".lock")):
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
