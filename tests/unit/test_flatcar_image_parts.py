"""Partition table parsing and chroot-style path resolution, without mounting anything."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest

from nvdriver.errors import DriverError
from nvdriver.flatcar import image as img
from nvdriver.host import resolve_in

SFDISK = {
    "partitiontable": {
        "label": "gpt",
        "device": "dev1.bin",
        "unit": "sectors",
        "sectorsize": 512,
        "partitions": [
            {"node": "dev1.binp1", "start": 2048, "size": 100, "type": "X", "name": "EFI"},
            {
                "node": "dev1.binp9",
                "start": 4096,
                "size": 12582912,
                "type": "0FC63DAF-8483-4772-8E79-3D69D8477DE4",
                "name": "ROOT",
            },
        ],
    }
}


@pytest.fixture
def sfdisk(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    table: dict[str, object] = json.loads(json.dumps(SFDISK))

    def fake_run(cmd: list[object], **kwargs: object) -> types.SimpleNamespace:
        return types.SimpleNamespace(stdout=json.dumps(table), returncode=0)

    monkeypatch.setattr(img, "run", fake_run)
    return table


def test_root_partition_from_sfdisk_json_in_bytes(sfdisk: dict[str, object]) -> None:
    part = img.root_partition(Path("dev1.bin"))
    # Flatcar's layout: partition 9 at LBA 4096, 6 GiB.
    assert part == img.Partition(
        number=9,
        start=2097152,
        size=6 << 30,
        name="ROOT",
        type="0fc63daf-8483-4772-8e79-3d69d8477de4",
    )


def test_partition_9_without_a_name_is_the_root(sfdisk: dict[str, object]) -> None:
    parts = sfdisk["partitiontable"]["partitions"]  # type: ignore[index]
    del parts[1]["name"]
    assert img.root_partition(Path("dev1.bin")).number == 9


def test_no_root_partition_names_the_image_and_its_partitions(sfdisk: dict[str, object]) -> None:
    sfdisk["partitiontable"]["partitions"].pop()  # type: ignore[index]
    with pytest.raises(DriverError, match=r"x\.bin has no ROOT partition.*1 'EFI'"):
        img.root_partition(Path("x.bin"))


def test_malformed_sfdisk_output_is_a_clear_error(sfdisk: dict[str, object]) -> None:
    sfdisk["partitiontable"]["partitions"][0]["start"] = "2048"  # type: ignore[index]
    with pytest.raises(DriverError, match=r"partition table of dev1\.bin"):
        img.root_partition(Path("dev1.bin"))


def test_sector_size_is_honoured(sfdisk: dict[str, object]) -> None:
    sfdisk["partitiontable"]["sectorsize"] = 4096  # type: ignore[index]
    assert img.root_partition(Path("dev1.bin")).start == 4096 * 4096


def test_resolve_in_keeps_absolute_and_dotdot_links_inside(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "usr/lib").mkdir(parents=True)
    (root / "lib").symlink_to("usr/lib")
    (root / "abs").symlink_to("/usr/lib")
    (root / "up").symlink_to("../../../../..")
    assert resolve_in(root, Path("/lib/modules")) == root / "usr/lib/modules"
    assert resolve_in(root, Path("/abs/x")) == root / "usr/lib/x"
    assert resolve_in(root, Path("/up/etc")) == root / "etc"
    assert resolve_in(root, Path("/proc")) == root / "proc"


def test_resolve_in_refuses_symlink_loops(tmp_path: Path) -> None:
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    with pytest.raises(DriverError, match="Too many symbolic links"):
        resolve_in(tmp_path, Path("/a/x"))
