"""The build's progress report (driver/build.py `_make`): it counts the objects while
kbuild runs, and kbuild's temporary directories (`.tmp_PID` of its try-run and of
NVIDIA's conftest) come and go under the count."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nvdriver.driver import build


def test_a_directory_gone_while_the_objects_are_counted_is_not_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("a.o", "sub/b.o", "sub/c.c", ".tmp_2252/conftest.o"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    scandir = os.scandir

    def vanishing(path: str = ".") -> object:
        if str(path).endswith(".tmp_2252"):  # listed, then removed by kbuild
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", vanishing)
    assert build.count_objects(tmp_path) == 2
