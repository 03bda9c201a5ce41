"""Saving the build root's linker: a build root without one is a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

from nvdriver.driver.build import BuildRoot
from nvdriver.driver.toolchain import save_linker
from nvdriver.errors import DriverError


def test_a_build_root_without_ld_is_a_driver_error_naming_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "usr" / "bin").mkdir(parents=True)
    with pytest.raises(DriverError, match=f"The build root {root} has no ld on its PATH") as e:
        save_linker(BuildRoot(root), tmp_path / "cache", "GNU ld (GNU Binutils) 2.42")
    assert e.value.exit_code == 1
    assert not (tmp_path / "cache").exists()
