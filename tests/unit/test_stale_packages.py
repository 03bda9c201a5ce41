"""A package that does not fit the running kernel's ABI is moved aside as stale and
replaced once; there is no build loop (issue 19). The guest proves it on real kernels
(tests/vm/test_kernel_abi.py); here the rule is checked where a kernel cannot exist: the
kernel's refusal at load is simulated (this machine cannot load modules)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from nvdriver import builder, lifecycle
from nvdriver.config import Config
from nvdriver.driver import package as pkg
from nvdriver.driver.build import BuildOutput
from nvdriver.driver.source import DriverSource, Flavour
from nvdriver.errors import DriverError, KernelAbiRefused
from nvdriver.host import KernelIdentity
from nvdriver.kmod.abi import RunningAbi
from nvdriver.kmod.tree import ModuleTree
from tests.packaging import FAKE_RELEASE, KERNEL, fake_build, host_build_tree
from tests.unit.test_init_without_package import node_without_package

VERSION = "535.999.01"


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Config:
    node_without_package(tmp_path, monkeypatch)
    return Config.from_env(dict(os.environ))


def running_kernel(config: Config, **crcs: int) -> KernelIdentity:
    symbols = {**dict(KERNEL.symbols), **crcs}
    return KernelIdentity.running(config).with_abi(KERNEL.vermagic, symbols)


def package_in(store: Path, kernel: KernelIdentity, work: Path, tag: str | None = None):
    build = dataclasses.replace(fake_build(work, kernel=kernel), driver_version=VERSION)
    return pkg.write_package(store, build, tag=tag)


def plan_of(package: pkg.Package) -> lifecycle.DriverPlan:
    tree = ModuleTree(Path("/nonexistent"), package.manifest.kernel_release)
    return lifecycle.DriverPlan(VERSION, Flavour.PROPRIETARY, package.path, tree, ("nvidia",), {})


def refused(plan: lifecycle.DriverPlan) -> None:
    """What loading.load raises when the kernel refuses nvidia.ko for a CRC."""
    raise KernelAbiRefused("The kernel refused nvidia for its kernel ABI (disagrees ...).")


def test_a_package_the_kernel_refuses_is_stale_and_the_next_one_loads(
    config: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel = running_kernel(config)
    bad = package_in(config.precompiled_dir, kernel, tmp_path / "a")
    good = package_in(config.node_precompiled_dir, kernel, tmp_path / "b")
    asked: list[frozenset[Path]] = []

    def prepare(config: Config, refused: frozenset[Path] = frozenset()) -> lifecycle.DriverPlan:
        asked.append(frozenset(refused))
        return plan_of(good)

    monkeypatch.setattr(lifecycle, "_prepare", prepare)
    loaded: list[Path] = []

    def load(plan: lifecycle.DriverPlan) -> None:
        if plan.package == bad.path:
            refused(plan)
        loaded.append(plan.package)

    result = lifecycle._load_fitting(config, plan_of(bad), load)
    assert result.package == good.path and loaded == [good.path]
    assert asked == [frozenset({bad.path})]
    assert not bad.path.exists()
    assert [p.name.endswith(".stale") for p in bad.path.parent.iterdir()] == [True]


def test_a_second_refusal_is_an_error_not_a_build_loop(
    config: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel = running_kernel(config)
    first = package_in(config.precompiled_dir, kernel, tmp_path / "a")
    second = package_in(config.node_precompiled_dir, kernel, tmp_path / "b")
    prepared: list[object] = []

    def prepare(config: Config, refused: frozenset[Path] = frozenset()) -> lifecycle.DriverPlan:
        prepared.append(refused)
        return plan_of(second)

    monkeypatch.setattr(lifecycle, "_prepare", prepare)
    with pytest.raises(DriverError, match="no build loop") as e:
        lifecycle._load_fitting(config, plan_of(first), refused)
    assert e.value.exit_code == 1 and str(first.path) in e.value.message
    assert len(prepared) == 1
    assert not first.path.exists() and not second.path.exists()  # both stale, kept aside


def building(monkeypatch: pytest.MonkeyPatch, kernel: KernelIdentity) -> list[object]:
    """Make the developer container's build (the one step that cannot exist here: no
    Flatcar release ships this machine's kernel) a plain-file package of `kernel`'s ABI;
    the list gets an entry per build."""
    builds: list[object] = []

    def build(config, source, flavour, work: Path, target) -> tuple[BuildOutput, str]:
        builds.append(config)
        output = fake_build(work / "fake", kernel=kernel)
        return dataclasses.replace(output, driver_version=VERSION), FAKE_RELEASE

    monkeypatch.setattr(builder, "_in_developer_container", build)
    return builds


def test_a_fresh_build_that_does_not_fit_stops_without_building_again(
    config: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The developer container's tree is not the running kernel's ABI (the node's build
    tree says another CRC for _printk): the built package is refused once, no loop."""
    kernel = running_kernel(config)
    host_build_tree(config.host("/lib/modules"), running_kernel(config, _printk=0x12345678))
    builds = building(monkeypatch, kernel)
    source = DriverSource.from_config(config)
    running = RunningAbi(config, kernel.release)
    with pytest.raises(DriverError, match="does not fit the running kernel") as e:
        lifecycle._find_package(config, running, source, Flavour.PROPRIETARY)
    assert "_printk" in e.value.message and len(builds) == 1
    store = config.node_precompiled_dir / kernel.release
    assert [p.name.endswith(".stale") for p in store.iterdir()] == [True]


def test_a_package_for_another_abi_is_stale_and_the_right_one_is_built_once(
    config: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The image's package was made on another ABI of this release (the node's build tree
    says another CRC for _printk): moved aside before anything is loaded, the right one
    is built once into the node's store; the next start uses it, nothing built."""
    kernel = running_kernel(config)
    host_build_tree(config.host("/lib/modules"), kernel)
    other = running_kernel(config, _printk=dict(kernel.symbols)["_printk"] ^ 0x5A5A5A5A)
    bad = package_in(config.precompiled_dir, other, tmp_path / "bad")
    builds = building(monkeypatch, kernel)
    source = DriverSource.from_config(config)

    def find() -> pkg.Package:
        running = RunningAbi(config, kernel.release)
        return lifecycle._find_package(config, running, source, Flavour.PROPRIETARY)

    first = find()
    assert first.path.parent == config.node_precompiled_dir / kernel.release
    assert first.manifest.kernel == kernel and len(builds) == 1
    assert not bad.path.exists()
    assert [p.name.endswith(".stale") for p in bad.path.parent.iterdir()] == [True]
    assert find() == first and len(builds) == 1
