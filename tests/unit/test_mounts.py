"""The mount table from the real `findmnt --json` and loop devices from `losetup --json`
output, without mounting or attaching anything."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from nvdriver import mounts
from nvdriver.errors import DriverError

MOUNTINFO = (
    "22 1 0:21 / / rw,relatime shared:1 - overlay overlay rw\n"
    "30 22 0:25 / /run rw,nosuid - tmpfs tmpfs rw\n"
    "41 30 0:21 / /run/nvidia/driver rw master:3 - overlay overlay rw\n"
    "42 30 0:26 / /run/with\\040blank rw - tmpfs tmpfs rw\n"
)


@pytest.fixture
def mountinfo(tmp_path: Path) -> Path:
    path = tmp_path / "mountinfo"
    path.write_text(MOUNTINFO)
    return path


def test_the_mount_table_comes_from_findmnt_with_escapes_and_propagation(
    mountinfo: Path,
) -> None:
    table = mounts.mount_table(mountinfo)
    assert [(m.target, m.source) for m in table] == [
        (Path("/"), "overlay"),
        (Path("/run"), "tmpfs"),
        (Path("/run/nvidia/driver"), "overlay"),
        (Path("/run/with blank"), "tmpfs"),
    ]
    assert "shared" in table[0].propagation and "shared" not in table[1].propagation
    assert "slave" in table[2].propagation
    assert mounts.is_mount_point(Path("/run/nvidia/driver"), mountinfo)
    assert not mounts.is_mount_point(Path("/run/nvidia"), mountinfo)
    assert mounts.is_mount_point(Path("/run/with blank"), mountinfo)


def test_a_mount_point_is_told_as_findmnt_tells_it() -> None:
    """Whether a path is mounted is read from the kernel's table in this process (every
    start asks): for each of this machine's mounts, and for directories that are none, the
    same answer as the real findmnt."""
    table = mounts.mount_table()
    targets = {m.target for m in table}
    assert len(targets) > 5
    for target in targets:
        assert mounts.is_mount_point(target), target
    for path in (Path("/usr/share"), Path("/etc"), Path("/proc/self/fd")):
        assert mounts.is_mount_point(path) == (path.resolve() in targets), path


def test_an_empty_mount_table_has_no_mounts(tmp_path: Path) -> None:
    empty = tmp_path / "mountinfo"
    empty.write_text("")
    assert mounts.mount_table(empty) == ()


def test_the_mount_holding_a_path_is_the_innermost() -> None:
    assert mounts.holding_mount(Path("/proc/self")).target == Path("/proc")


@pytest.mark.parametrize("text", ["{}", '{"filesystems": [{"source": "x"}]}', "not json"])
def test_findmnt_output_without_a_mount_table_is_a_clear_error(text: str) -> None:
    with pytest.raises(DriverError, match="Could not read the mount table from findmnt"):
        mounts.parse_findmnt(text)


def test_loop_devices_from_losetup_json(tmp_path: Path) -> None:
    text = json.dumps(
        {
            "loopdevices": [
                {"name": "/dev/loop0", "back-file": f"{tmp_path}/a.bin", "back-ino": 12},
                {"name": "/dev/loop1", "back-file": "/x/b.bin (deleted)", "back-ino": "13"},
                {"back-file": "/nameless"},
            ]
        }
    )
    devices = mounts.parse_losetup(text)
    assert [(d.name, d.back_file, d.back_inode) for d in devices] == [
        ("/dev/loop0", f"{tmp_path}/a.bin", 12),
        ("/dev/loop1", "/x/b.bin", 13),
    ]
    assert devices[0].backed_by_file_under(tmp_path)
    assert not devices[1].backed_by_file_under(tmp_path)
    assert mounts.parse_losetup("") == ()  # losetup prints nothing when none is attached


def test_a_loop_device_whose_file_was_renamed_is_found_by_inode(tmp_path: Path) -> None:
    image = tmp_path / "cache" / "image.bin"
    image.parent.mkdir()
    image.write_bytes(b"x")
    st = image.stat()
    device = mounts.LoopDevice(
        name="/dev/loop7",
        back_file="/elsewhere/.partial-abc",  # the name it had when it was attached
        back_inode=st.st_ino,
        back_device=f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}",
    )
    assert device.backed_by_file_under(tmp_path / "cache")
    assert not device.backed_by_file_under(tmp_path / "other")


def test_paths_under_a_directory() -> None:
    assert mounts.is_under(Path("/a/b"), Path("/a"))
    assert mounts.is_under(Path("/a"), Path("/a"))
    assert not mounts.is_under(Path("/ab"), Path("/a"))
