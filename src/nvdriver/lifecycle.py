"""The order of the steps of each command: update, packages, status, and (later) init."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path

from nvdriver import builder
from nvdriver.builder import NotImplementedYet
from nvdriver.config import Config
from nvdriver.driver import package as pkg
from nvdriver.driver.package import Package, PackageStore
from nvdriver.errors import DriverError

log = logging.getLogger(__name__)

__all__ = ["NotImplementedYet", "prune_packages", "update", "verify_packages"]


def update(config: Config) -> Package:
    """Build and pack the precompiled package for a kernel; load nothing."""
    return builder.make_package(config)


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    good: list[Path]
    bad: list[tuple[Path, str]]


def verify_packages(config: Config) -> VerifyReport:
    """Verify every package of the store; failed ones are moved aside."""
    store = PackageStore(config.precompiled_dir)
    good, bad = [], []
    for path in store.package_files():
        try:
            pkg.verify(path)
            good.append(path)
        except DriverError as e:
            bad.append((path, e.message))
    return VerifyReport(good, bad)


def prune_packages(config: Config, keep_kernels: set[str]) -> list[Path]:
    """Remove leftovers, failed packages and packages of other driver versions.

    Packages of other kernels of this driver version stay: they may be built ahead
    for the next Flatcar release. Kernels in `keep_kernels` are never touched.
    """
    store = PackageStore(config.precompiled_dir)
    removed = list(store.leftovers())
    good, bad = store.packages()
    removed += [p for p, _ in bad]
    removed += [
        p.path
        for p in good
        if config.driver_version is not None
        and p.manifest.driver_version != config.driver_version
        and p.manifest.kernel_release not in keep_kernels
    ]
    for p in removed:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    for d in store.root.iterdir() if store.root.is_dir() else []:
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()
    return removed
