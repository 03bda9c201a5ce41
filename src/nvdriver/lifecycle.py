"""The order of the steps of each command: update, packages, status, and (later) init."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from nvdriver.config import Config
from nvdriver.driver import package as pkg
from nvdriver.driver.build import build_modules
from nvdriver.driver.package import Package, PackageStore
from nvdriver.driver.source import DriverSource, resolve_flavour
from nvdriver.errors import DriverError, UsageError
from nvdriver.host import KernelIdentity, KernelTree, nvidia_gpus

log = logging.getLogger(__name__)


class NotImplementedYet(DriverError):
    def __init__(self, what: str) -> None:
        super().__init__(f"{what} is not implemented yet.")


@contextlib.contextmanager
def workdir(config: Config, purpose: str) -> Iterator[Path]:
    """A scratch directory under the cache (host disk, not the container's layer)."""
    base = config.cache_dir / "work"
    base.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"{purpose}-{os.getpid()}-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def update(config: Config) -> Package:
    """Build and pack the precompiled package for a kernel; load nothing."""
    if config.sign_key is not None:
        raise NotImplementedYet("Signing modules (--sign)")
    if config.kernel_source is None:
        raise NotImplementedYet(
            "Building inside the Flatcar developer container (give --kernel-source DIR)"
        )
    source = DriverSource.from_config(config)
    flavour = resolve_flavour(config, source, nvidia_gpus(config))
    tree = KernelTree.from_dir(config.kernel_source)
    identity = KernelIdentity.from_build_tree(tree.output)
    if config.kernel is not None and config.kernel != identity.release:
        raise UsageError(
            f"--kernel {config.kernel} does not match the kernel tree {tree.output}, "
            f"which is {identity.release}.",
            hint="Give the kernel tree of the kernel you ask for, or drop --kernel.",
        )
    store = PackageStore(config.precompiled_dir)
    store.remove_temp_files()
    with workdir(config, "build") as work:
        try:
            output = build_modules(source, flavour, tree, work, jobs=config.max_threads)
        except DriverError:
            _keep_build_log(config, work / "build.log", identity.release)
            raise
        return pkg.write_package(config.precompiled_dir, output, tag=config.tag)


def _keep_build_log(config: Config, log_file: Path, kernel: str) -> None:
    if log_file.is_file():
        dest = config.cache_dir / "logs" / f"build-{kernel}.log"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(log_file, dest)
        log.error("The build log is kept at %s", dest)


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

