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

from tests.conftest import need

from .guest import GuestResult, missing_requirements, run_in_guest

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
