"""Fixtures for tests that boot a real kernel in a QEMU guest (see guest.py).

Every test in this directory gets the ``vm`` marker.  The ``guest`` fixture
boots each kernel under test in turn (the ``kernel`` fixture: the newest pair of
each installed series), and skips when qemu, a kernel or busybox-static is
missing, unless the ``CI`` environment variable is set: then it fails, so CI
cannot pass by skipping.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import need, standin_env
from tests.standin.tree import build_holder, build_standin, make_standin_source

from .guest import GuestResult, missing_requirements, run_in_guest
from .scenario import PERSISTENCED, VERSION, Driver, guest_env, update_package

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.vm)


class Guest:
    """``run_in_guest`` bound to one kernel: ``guest(["uname", "-r"])``."""

    def __init__(self, kernel: str) -> None:
        self.kernel = kernel

    def __call__(
        self,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        shares: dict[str, Path] | None = None,
        cwd: str | None = None,
        timeout: float = 600,
        memory_mb: int = 3072,
        smp: int = 2,
        disks: tuple[Path, ...] = (),
    ) -> GuestResult:
        return run_in_guest(
            argv,
            kernel=self.kernel,
            env=env,
            shares=shares,
            cwd=cwd,
            timeout=timeout,
            memory_mb=memory_mb,
            smp=smp,
            disks=disks,
        )


def require_guest() -> None:
    """Skip (fail under CI) when this machine cannot boot a guest."""
    missing = missing_requirements()
    if missing:
        need(False, "cannot boot a QEMU guest, missing: " + "; ".join(missing))


@pytest.fixture(scope="session")
def guest_kernel(kernel: str) -> str:
    """The kernel release the ``guest`` fixture boots: each kernel under test in turn
    (tests/conftest.py ``kernel``), so every guest test runs on every series."""
    require_guest()
    return kernel


@pytest.fixture
def guest(guest_kernel: str) -> Guest:
    return Guest(guest_kernel)


@pytest.fixture(scope="session")
def standin(tmp_path_factory: pytest.TempPathFactory, guest_kernel: str) -> Driver:
    """Both flavours of the stand-in (with nvidia-peermem, loaded only when asked for)
    packed for the guest's kernel, the holder module,
    the stand-in daemon, module parameters."""
    kernel_build = Path("/lib/modules") / guest_kernel / "build"
    assert (kernel_build / "Makefile").is_file(), f"no headers for {guest_kernel}"
    work = tmp_path_factory.mktemp("driver")
    source = make_standin_source(work / "src", version=VERSION, peermem=True)
    build_env = standin_env(work, source, VERSION)
    for flavour in ("proprietary", "open"):
        update_package({**build_env, "KERNEL_MODULE_TYPE": flavour}, kernel_build)

    holder_tree = make_standin_source(work / "holder-src", version=VERSION, flavours=("kernel",))
    build_standin(holder_tree / "kernel", kernel_build)
    holder = build_holder(work / "holder", kernel_build, holder_tree / "kernel" / "Module.symvers")

    (work / "bin").mkdir()
    daemon = work / "bin" / "nvidia-persistenced"
    daemon.write_text(PERSISTENCED)
    daemon.chmod(0o755)
    (work / "params").mkdir()
    (work / "params" / "nvidia.conf").write_text(
        "# module parameters as the GPU Operator's ConfigMap gives them\n"
        "NVreg_EnableGpuFirmware=0\n"
        'options nvidia NVreg_RegistryDwords="RMFoo=1;Bar=0x10" NVreg_DeviceFileMode=0660\n'
    )
    (work / "params" / "nvidia-drm.conf").write_text("modeset=1\n")
    (work / "plain-params").mkdir()
    (work / "nogpu-params").mkdir()
    (work / "nogpu-params" / "nvidia.conf").write_text("NVreg_StandinNoGpu=1\n")
    env = guest_env(work, source, work / "precompiled", VERSION)
    env["HOLDER"] = str(holder)
    return Driver(work, env, {str(work): work})
