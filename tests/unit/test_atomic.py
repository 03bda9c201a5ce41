"""Files and trees appear under their final name whole or not at all, and durably:
the data is flushed before the rename and the directory after it."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from nvdriver import atomic
from nvdriver.flatcar import fetch


def record_syncs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Every fsync and rename, in order, with the path it was for; both still happen
    (the real calls run): a spy, not a stand-in."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        events.append(("rename", os.fspath(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def synced_in_order(events: list[tuple[str, str]], final: Path) -> None:
    """The final name is renamed to only after a file was flushed, and its directory after."""
    rename = events.index(("rename", str(final)))
    assert any(e == "fsync" for e, _ in events[:rename])
    assert ("fsync", str(final.parent)) in events[rename + 1 :]


def test_a_file_appears_whole_with_its_mode_and_the_directory_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    final = tmp_path / "out"
    final.write_bytes(b"old")
    events = record_syncs(monkeypatch)
    with atomic.atomic_file(final) as f:
        f.write(b"new contents")
        assert final.read_bytes() == b"old"  # not yet: only when the block ends
    assert final.read_bytes() == b"new contents"
    assert stat.S_IMODE(final.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    synced_in_order(events, final)


def test_a_failing_write_leaves_the_old_file_and_no_temporary_one(tmp_path: Path) -> None:
    final = tmp_path / "out"
    final.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="half way"), atomic.atomic_file(final) as f:
        f.write(b"half")
        raise RuntimeError("half way")
    assert final.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_interrupt_leaves_no_temporary_file(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), atomic.atomic_file(tmp_path / "out", prefix=".x-"):
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_the_verification_stamp_is_written_through_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = record_syncs(monkeypatch)
    path = tmp_path / "image.bin.verified"
    stamp = fetch.Stamp("a" * 128, "4230.2.3", "amd64-usr", 4, "u", "2026-01-01T00:00:00+00:00")
    stamp.write(path)
    assert fetch.Stamp.from_file(path) == stamp
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    synced_in_order(events, path)


def tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def contents(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("place", [lambda t: t / "staging" / "tree", lambda t: t / "new-tree"])
def test_a_tree_replaces_a_full_one_flushed_and_leaves_nothing_aside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, place: Callable[[Path], Path]
) -> None:
    final = tree(tmp_path / "final", {"a.ko": b"old", "sub/b": b"old"})
    new = tree(place(tmp_path), {"a.ko": b"new", "modules.dep": b"dep"})
    events = record_syncs(monkeypatch)
    atomic.replace_directory(new, final)
    assert contents(final) == {"a.ko": b"new", "modules.dep": b"dep"}
    assert not new.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(atomic.OLD_PREFIX)]
    flushed = {path for event, path in events if event == "fsync"}
    assert {str(new / "a.ko"), str(new / "modules.dep"), str(new)} <= flushed  # before
    synced_in_order(events, final)


def test_a_tree_goes_where_there_was_none(tmp_path: Path) -> None:
    new = tree(tmp_path / "new", {"x": b"1"})
    final = tmp_path / "lib" / "modules" / "6.12.0"
    atomic.replace_directory(new, final)
    assert contents(final) == {"x": b"1"}
