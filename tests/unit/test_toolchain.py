"""Packing the build root's linker: a build root without one is a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

from nvdriver.driver.build import BuildRoot
from nvdriver.driver.toolchain import collect_linker, packed_linker
from nvdriver.errors import DriverError
from nvdriver.run import run


def test_a_build_root_without_ld_is_a_driver_error_naming_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "usr" / "bin").mkdir(parents=True)
    with pytest.raises(DriverError, match=f"The build root {root} has no ld on its PATH") as e:
        collect_linker(BuildRoot(root), tmp_path / "linker")
    assert e.value.exit_code == 1
    assert not (tmp_path / "linker").exists()


def test_this_containers_linker_is_collected_with_its_loader_and_libraries(tmp_path: Path) -> None:
    """A build without a developer root (--kernel-source) packs this container's own ld."""
    files = collect_linker(BuildRoot(), tmp_path / "linker")
    members = files.members()
    assert f"linker/{files.loader}" in members and "linker/ld" in members
    assert all(path.is_file() for path in members.values())
    entry = files.manifest_entry()
    assert entry["loader"] == f"linker/{files.loader}"
    assert entry["program"] == "linker/ld"


def test_the_packed_linker_runs_through_its_own_loader(tmp_path: Path) -> None:
    files = collect_linker(BuildRoot(), tmp_path / "linker")
    linker = packed_linker(files.manifest_entry(), tmp_path, "GNU ld (wanted)")
    assert linker.argv[0] == str(tmp_path / "linker" / files.loader)
    out = run([*linker.argv, "--version"]).stdout
    assert out.startswith("GNU ld")
