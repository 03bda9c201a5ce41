"""A restart with the same package's modules loaded adopts them (issue 22, point 3): `init`
re-binds the root, starts the daemons and writes readiness without looking for or
reading a package; what a killed run or build left is swept once the driver is ready.
Any mismatch between the tree's stamp and what is loaded is the full start.

The first start is `init`'s own steps up to the loaded modules with a package that links
for real (`ld -r`, `depmod`); the kernel's part cannot run here (no CAP_SYS_MODULE, no
mount: tests/vm does them in a guest), so the modules "loaded" are the linked tree's,
shown in a /sys/module of the host tree with the srcversion `modinfo` reads from them, and
the bind mount, the module load and persistenced are replaced by steps that note
themselves in the list of events. The stores, the package, the proof, the stamp, the
sweep and the readiness file are real.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import os
import shutil
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType

import pytest

from nvdriver import daemons, lifecycle, rootfs, watch
from nvdriver.atomic import TEMP_PREFIX
from nvdriver.config import Config
from nvdriver.driver import link, proof
from nvdriver.driver import package as pkg
from nvdriver.kmod import loading, unloading
from nvdriver.kmod.loaded import sysfs_name
from nvdriver.kmod.tree import ModuleTree
from tests.packaging import package_for_running_kernel
from tests.unit.test_imports import NOT_ON_A_RESTART
from tests.unit.test_init_without_package import node_without_package


class Node:
    """A node whose first `init` linked the package and "loaded" its modules."""

    def __init__(self, config: Config, package: pkg.Package, plan: lifecycle.DriverPlan) -> None:
        self.config = config
        self.package = package
        self.plan = plan
        self.events: list[str] = []

    def note(self, event: str) -> None:
        self.events.append(event)

    @property
    def ready_file(self) -> Path:
        return self.config.host(rootfs.READY_FILE)

    @property
    def staging(self) -> Path:
        """What a link killed half-way leaves beside the tree."""
        return self.plan.tree.base / ".staging-left-by-a-crash"

    @property
    def temp_package(self) -> Path:
        """What a build killed while it wrote its package leaves in the store."""
        return self.config.node_precompiled_dir / "some-kernel" / f"{TEMP_PREFIX}pkg"

    def leave_leftovers(self) -> None:
        self.staging.mkdir()
        self.temp_package.parent.mkdir(parents=True, exist_ok=True)
        self.temp_package.write_bytes(b"half a package")

    def leftovers(self) -> list[Path]:
        return [p for p in (self.staging, self.temp_package) if p.exists()]

    def show_loaded(self, srcversion: dict[str, str]) -> None:
        """/sys/module as the kernel shows the modules loaded, with these srcversions."""
        for name, value in srcversion.items():
            d = self.config.host("/sys/module") / sysfs_name(name)
            d.mkdir(parents=True, exist_ok=True)
            (d / "refcnt").write_text("0\n")
            (d / "srcversion").write_text(value + "\n")
            (d / "version").write_text(self.package.manifest.driver_version + "\n")


# The stand-in's linked modules are no kernel modules: `modinfo` reads no srcversion from
# them. What it would read is this module's name, upper-cased and padded (23 characters
# as the kernel's); the full start compares the loaded modules with it (tree.fields).
def srcversion_of(module: str) -> str:
    return module.upper().replace("-", "").ljust(23, "0")


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Node]:
    node_without_package(tmp_path, monkeypatch)
    config = Config.from_env(dict(os.environ))
    package = package_for_running_kernel(config, tmp_path / "build")

    def modinfo(tree: ModuleTree, module: str) -> dict[str, list[str]]:
        assert tree.path(module).is_file()
        return {"srcversion": [srcversion_of(module)], "version": [package.manifest.driver_version]}

    monkeypatch.setattr(ModuleTree, "fields", modinfo)
    plan = lifecycle._prepare(config)  # verified, linked, depmod'ed, its proof recorded
    node = Node(config, package, plan)
    node.show_loaded({m: srcversion_of(m) for m in plan.modules})
    lifecycle._stamp_loaded(config, plan)  # as init does once its modules are loaded
    yield node


@pytest.fixture
def run_init(node: Node, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> Node:
    """`init` with the kernel's and the mount's steps noting themselves; the wait notes
    what is there at that moment and returns (a stop: the shutdown unwinds as usual)."""

    @contextlib.contextmanager
    def exposed_root(*args: object, **kwargs: object) -> Iterator[Path]:
        node.note("root bound")
        yield node.config.host(rootfs.DRIVER_ROOT)

    @contextlib.contextmanager
    def driver_loaded(*args: object) -> Iterator[list[str]]:
        node.note("modules loaded")
        yield []

    @contextlib.contextmanager
    def persistenced(config: Config) -> Iterator[None]:
        node.note("persistenced")
        yield

    sweep = lifecycle._sweep

    def noted_sweep(config: Config, version: str) -> None:
        node.note("sweep" + (" (ready)" if node.ready_file.exists() else ""))
        sweep(config, version)

    def wait(config: Config) -> None:
        node.note("waiting" + (" (ready)" if node.ready_file.exists() else ""))

    monkeypatch.setattr(rootfs, "exposed_root", exposed_root)
    monkeypatch.setattr(loading, "driver_loaded", driver_loaded)
    monkeypatch.setattr(daemons, "persistenced", persistenced)
    monkeypatch.setattr(lifecycle, "_sweep", noted_sweep)
    monkeypatch.setattr(watch, "wait", wait)
    caplog.set_level(logging.INFO, logger="nvdriver")
    monkeypatch.setattr(logging.getLogger("nvdriver"), "propagate", True)
    return node


def no_package_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any look into a store or a package fails the test."""

    def forbidden(*args: object, **kwargs: object) -> object:
        raise AssertionError("the restart read a package or searched a store")

    monkeypatch.setattr(pkg.PackageStore, "find", forbidden)
    monkeypatch.setattr(pkg.PackageStore, "packages", forbidden)
    monkeypatch.setattr(pkg, "read_manifest", forbidden)
    monkeypatch.setattr(link, "read_manifest", forbidden)
    monkeypatch.setattr(link, "link_package", forbidden)
    monkeypatch.setattr(tarfile, "open", forbidden)
    monkeypatch.setattr(proof.Proof, "holds", forbidden)  # it takes the manifest


def test_a_restart_with_the_packages_modules_loaded_reads_no_package_and_is_ready(
    run_init: Node, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    node = run_init
    no_package_reading(monkeypatch)
    stamp = node.plan.tree.directory / lifecycle._LOADED_STAMP
    written = stamp.stat()
    lifecycle.init(node.config)
    # The same modules, the same stamp: not written (and flushed) again.
    assert (stamp.stat().st_ino, stamp.stat().st_mtime_ns) == (written.st_ino, written.st_mtime_ns)
    assert node.events == [
        "root bound",
        "modules loaded",
        "persistenced",
        "sweep (ready)",
        "waiting (ready)",
    ]
    # What the guest tests look for (tests/vm: test_lifecycle, test_container).
    assert (
        "loaded already" in caplog.text and "keeping them, nothing to link (adopted" in caplog.text
    )
    assert not node.ready_file.exists()  # the shutdown removed it


def test_a_restart_asks_for_nothing_of_a_package_or_a_shutdown_until_it_is_ready(
    run_init: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """test_imports.py checks what importing lifecycle loads; this, what the restart's own
    steps ask for on their way to readiness (a function's `import` runs at each call, and
    an import of the package format there would load tar, gzip and hashlib at every
    restart). Recorded until the sweep, which runs once the driver is ready."""
    node = run_init
    asked: list[str] = []
    real_import = builtins.__import__

    def recording(
        name: str,
        globals: Mapping[str, object] | None = None,
        locals: Mapping[str, object] | None = None,
        fromlist: Sequence[str] | None = (),
        level: int = 0,
    ) -> ModuleType:
        if not any(event.startswith("sweep") for event in node.events):
            asked.extend([name, *(f"{name}.{n}" for n in fromlist or ())])
        return real_import(name, globals, locals, fromlist or (), level)

    monkeypatch.setattr(builtins, "__import__", recording)
    lifecycle.init(node.config)
    assert "sweep (ready)" in node.events
    assert sorted({m for m in asked if m in NOT_ON_A_RESTART}) == []


def test_the_sweep_of_a_restart_runs_once_the_driver_is_ready(
    run_init: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A killed run's staging tree and a killed build's temp package are still removed by
    the next `init`: after readiness instead of before."""
    node = run_init
    node.leave_leftovers()
    left: list[list[Path]] = []
    monkeypatch.setattr(watch, "wait", lambda config: left.append(node.leftovers()))
    lifecycle.init(node.config)
    assert node.events[-1] == "sweep (ready)"
    assert left == [[]] and node.leftovers() == []


def test_a_failing_sweep_is_logged_and_the_driver_stays_up(
    run_init: Node, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    node = run_init

    def broken(base: Path) -> None:
        raise PermissionError(13, "Permission denied", str(base))

    monkeypatch.setattr(link, "remove_stale", broken)
    lifecycle.init(node.config)
    assert node.events[-2:] == ["sweep (ready)", "waiting (ready)"]
    assert "Could not remove what a killed run left (the driver runs on)" in caplog.text


def full_start_counted(node: Node, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Count the store look-ups (the full start's sign)."""
    found: list[Path] = []
    find = pkg.PackageStore.find

    def counted(store: pkg.PackageStore, *args: object, **kwargs: object) -> pkg.Package | None:
        result = find(store, *args, **kwargs)  # type: ignore[arg-type]
        found.append(store.root)
        return result

    monkeypatch.setattr(pkg.PackageStore, "find", counted)
    return found


@pytest.mark.parametrize(
    "change", ["no stamp", "old stamp", "another package", "package touched", "no tree"]
)
def test_a_stamp_that_does_not_match_is_the_full_start(
    run_init: Node, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, change: str
) -> None:
    """The modules loaded are the tree's; what the stamp says of their package is not what
    is there: the package is looked up (and verified where its proof does not hold), and
    the sweep runs before readiness, as at a first start."""
    node = run_init
    tree = node.plan.tree.directory
    stamp = tree / lifecycle._LOADED_STAMP
    if change == "no stamp":
        stamp.unlink()
    elif change == "old stamp":  # path, size and mtime only: not the package's identity
        st = node.package.path.stat()
        stamp.write_text(
            f'{{"package": "{node.package.path}", "size": {st.st_size}, '
            f'"mtime_ns": {st.st_mtime_ns}, "flavour": "proprietary", "srcversion": {{}}}}'
        )
    elif change == "another package":  # the same content under another inode
        copy = node.package.path.with_name("copy")
        shutil.copyfile(node.package.path, copy)
        os.replace(copy, node.package.path)
    elif change == "package touched":  # its mtime set back: its ctime tells
        st = node.package.path.stat()
        os.utime(node.package.path, ns=(st.st_atime_ns, st.st_mtime_ns))
    else:
        shutil.rmtree(tree)
    node.leave_leftovers()
    found = full_start_counted(node, monkeypatch)
    lifecycle.init(node.config)
    assert found == [node.config.precompiled_dir]
    assert "adopted" not in caplog.text
    assert node.events[0] == "sweep"  # before readiness, before the root is bound
    assert node.events[1:] == ["root bound", "modules loaded", "persistenced", "waiting (ready)"]
    assert node.leftovers() == []
    # The modules loaded are this tree's: kept, not reloaded (the tree's modinfo says so).
    assert "keeping them" in caplog.text and "unloading them" not in caplog.text


def test_modules_of_another_srcversion_are_not_adopted(
    run_init: Node, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Another build of the driver is loaded (by hand, or by another container): the full
    start, which unloads it before loading this package's modules."""
    node = run_init
    node.show_loaded({m: "0123456789ABCDEF0123456" for m in node.plan.modules})
    found = full_start_counted(node, monkeypatch)
    unloaded: list[str] = []
    monkeypatch.setattr(daemons, "stop_persistenced", lambda config: None)
    monkeypatch.setattr(unloading, "unload", lambda config: unloaded.append("unloaded"))
    lifecycle.init(node.config)
    assert found == [node.config.precompiled_dir] and unloaded == ["unloaded"]
    assert "the loaded modules are not the ones it loaded" in caplog.text
    assert node.events[0] == "sweep"


def test_a_module_to_load_that_is_not_loaded_is_the_full_start(
    run_init: Node, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """nvidia-uvm unloaded by hand: the stamp's srcversions hold for what is loaded, but
    a module is to be loaded from the package's tree, so the full start does it."""
    node = run_init
    shutil.rmtree(node.config.host("/sys/module") / "nvidia_uvm")
    found = full_start_counted(node, monkeypatch)
    lifecycle.init(node.config)
    assert found == [node.config.precompiled_dir]
    assert "nvidia-uvm not loaded" in caplog.text
