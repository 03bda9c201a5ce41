"""init without a package and without a way to build one fails clearly, leaving nothing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from nvdriver import builder, cli, host, lifecycle, status
from nvdriver.config import Config
from nvdriver.driver.source import DriverSource
from nvdriver.host import PciDevice
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
        "DRIVER_VERSION": "535.999.01",
        "NVIDIA_DRIVER_SOURCE": str(source),
        "PRECOMPILED_DIR": str(tmp_path / "precompiled"),
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
    assert "no-feed.json" in text  # why the build was not possible
    assert "nvidia-driver update" in text  # what to do
    assert not (host / "run" / "nvidia" / "nvidia-driver.pid").exists()
    assert not (host / "opt" / "nvidia" / "535.999.01" / "lib").exists()


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
