"""init without a package and without a way to build one fails clearly, leaving nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from nvdriver import cli
from tests.standin.tree import make_standin_source


def test_init_without_package_or_build_fails_clearly_with_exit_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    host = tmp_path / "host"
    host.mkdir()
    (host / "proc").symlink_to("/proc")
    source = make_standin_source(tmp_path / "src", version="535.999.01", flavours=("kernel",))
    env = {
        "HOST_ROOT": str(host),
        "DRIVER_VERSION": "535.999.01",
        "NVIDIA_DRIVER_SOURCE": str(source),
        "PRECOMPILED_DIR": str(tmp_path / "precompiled"),
        "NVIDIA_DRIVER_CACHE": str(tmp_path / "cache"),
        "FLATCAR_RELEASES_FEED": str(tmp_path / "no-feed.json"),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cli.main(["init"]) == 1
    text = capsys.readouterr().err
    assert "There is no precompiled package for kernel" in text
    assert "no-feed.json" in text  # why the build was not possible
    assert "nvidia-driver update" in text  # what to do
    assert not (host / "run" / "nvidia" / "nvidia-driver.pid").exists()
    assert not (host / "opt" / "nvidia" / "535.999.01" / "lib").exists()
