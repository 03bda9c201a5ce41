"""init without a package and without a way to build one fails clearly, leaving nothing."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import pytest

from nvdriver import builder, cli, host, lifecycle, status
from nvdriver.config import Config
from nvdriver.driver import package as pkg
from nvdriver.driver.build import BuildOutput
from nvdriver.driver.package import Package
from nvdriver.driver.source import DriverSource, Flavour
from nvdriver.host import KernelIdentity, PciDevice
from nvdriver.kmod.abi import RunningAbi
from tests.packaging import FAKE_RELEASE, fake_build
from tests.standin.tree import make_standin_source


def node_without_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A host tree (this machine's /proc) and a stand-in driver with no package and no
    Flatcar feed to build one from; returns the host tree."""
    root = tmp_path / "host"
    root.mkdir()
    (root / "proc").symlink_to("/proc")
    source = make_standin_source(tmp_path / "src", version="535.999.01", flavours=("kernel",))
    env = {
        "HOST_ROOT": str(root),
        "CONTAINER_ROOT": str(tmp_path / "container"),
        "DRIVER_VERSION": "535.999.01",
        "NVIDIA_DRIVER_SOURCE": str(source),
        "PRECOMPILED_DIR": str(tmp_path / "precompiled"),
        "NODE_PRECOMPILED_DIR": str(tmp_path / "node-store"),
        "NVIDIA_DRIVER_CACHE": str(tmp_path / "cache"),
        "FLATCAR_RELEASES_FEED": str(tmp_path / "no-feed.json"),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return root


def test_init_without_package_or_build_fails_clearly_with_exit_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    host = node_without_package(tmp_path, monkeypatch)
    assert cli.main(["init"]) == 1
    text = capsys.readouterr().err
    assert "There is no precompiled package for kernel" in text
    assert f"in {tmp_path / 'precompiled'} or {tmp_path / 'node-store'}" in text  # both
    assert "no-feed.json" in text  # why the build was not possible
    assert "nvidia-driver update" in text  # what to do
    assert not (host / "run" / "nvidia" / "nvidia-driver.pid").exists()
    assert not (host / "opt" / "nvidia").exists()  # container-own: never under HOST_ROOT
    assert not (tmp_path / "container" / "opt" / "nvidia" / "535.999.01" / "lib").exists()


def test_init_reads_the_driver_source_and_the_gpus_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The package lookup and the build it falls back to share one choice of source and
    flavour: both used to run DriverSource.from_config and nvidia_gpus on their own."""
    calls = {"from_config": 0, "nvidia_gpus": 0}
    nvidia_gpus = host.nvidia_gpus
    from_config = DriverSource.from_config.__func__  # type: ignore[attr-defined]

    def counted_from_config(cls: type[DriverSource], config: Config) -> DriverSource:
        calls["from_config"] += 1
        return from_config(cls, config)  # type: ignore[no-any-return]

    def counted_gpus(config: Config) -> list[PciDevice]:
        calls["nvidia_gpus"] += 1
        return nvidia_gpus(config)

    monkeypatch.setattr(DriverSource, "from_config", classmethod(counted_from_config))
    assert {builder, lifecycle, status} <= set(sys.modules.values())  # imported: patched below
    for module in [m for name, m in sys.modules.items() if name.startswith("nvdriver")]:
        if getattr(module, "nvidia_gpus", None) is nvidia_gpus:
            monkeypatch.setattr(module, "nvidia_gpus", counted_gpus)
    node_without_package(tmp_path, monkeypatch)
    assert cli.main(["init"]) == 1  # no package, and the build cannot find a Flatcar release
    assert calls == {"from_config": 1, "nvidia_gpus": 1}
    # The log says that the flavour was chosen without the driver's GPU list.
    assert "supported-gpus.json is not in" in capsys.readouterr().err


# --- the two stores: the image's (PRECOMPILED_DIR), then the node's (NODE_PRECOMPILED_DIR)


@pytest.fixture
def stores_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Config:
    node_without_package(tmp_path, monkeypatch)
    return Config.from_env(dict(os.environ))


def running_build(config: Config, work: Path) -> BuildOutput:
    """A packable build output for the running kernel and the stand-in's version."""
    return dataclasses.replace(
        fake_build(work, kernel=KernelIdentity.running(config)), driver_version="535.999.01"
    )


def find(config: Config) -> Package:
    source = DriverSource.from_config(config)
    running = RunningAbi(config, KernelIdentity.running(config).release)
    return lifecycle._find_package(config, running, source, Flavour.PROPRIETARY)


def test_a_package_that_init_builds_goes_into_the_nodes_store(
    stores_config: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Built on the node, the package must outlive the container (pod recreation, a new
    image): it goes to the host-mounted node store, not into the image's store. The
    build in the Flatcar developer container cannot run here (a unit test): its step is
    replaced by a build output of plain files; where the package goes is what is tested
    (the real build by init: tests/vm)."""
    built: list[Config] = []

    def developer_container_build(
        config: Config, source: DriverSource, flavour: str, work: Path, target: object
    ) -> tuple[BuildOutput, str]:
        assert target is None, "init builds for the running kernel"
        built.append(config)
        return running_build(config, work / "fake"), FAKE_RELEASE

    monkeypatch.setattr(builder, "_in_developer_container", developer_container_build)
    package = find(stores_config)
    assert len(built) == 1
    assert package.path.parent.parent == stores_config.node_precompiled_dir
    assert pkg.PackageStore(stores_config.precompiled_dir).package_files() == []
    # ... and the next start takes it from there, without a build.
    assert find(stores_config).path == package.path and len(built) == 1


@pytest.mark.parametrize("where", ["image", "node", "both"])
def test_a_package_in_either_store_is_used_without_a_build(
    stores_config: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """The image's store first (the seed's `update` + `docker commit`), then the node's."""

    def no_build(*args: object) -> tuple[BuildOutput, str]:
        raise AssertionError("a package was there: nothing may be built")

    monkeypatch.setattr(builder, "_in_developer_container", no_build)
    stored = {
        name: pkg.write_package(root, running_build(stores_config, tmp_path / name), tag=None)
        for name, root in (
            ("image", stores_config.precompiled_dir),
            ("node", stores_config.node_precompiled_dir),
        )
        if where in (name, "both")
    }
    assert find(stores_config).path == stored["image" if where == "both" else where].path
