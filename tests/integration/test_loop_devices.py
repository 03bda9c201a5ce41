"""Loop devices when /dev is a snapshot: a container's /dev is copied when it starts
(Docker's --privileged), so the node of a loop device the kernel makes later is missing
there, and `losetup --find` fails although a free device exists.

For real, nothing mocked: in a mount namespace of its own (`unshare --mount`), a tmpfs is
mounted on /dev holding only what the case names, and the product's own code attaches
and mounts a small ext4 image through a loop device and reads a file from it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import need

ATTACH_AND_READ = r"""
import sys
from pathlib import Path
from nvdriver import mounts

image, mnt = Path(sys.argv[1]), Path(sys.argv[2])
with mounts.loop_device(image, offset=0, size=image.stat().st_size) as device:
    with mounts.mount(device, mnt, options=["ro"]):
        print("device=" + str(device))
        print("content=" + (mnt / "hello.txt").read_text().strip())
print("mounted_after=" + str(mounts.is_mount_point(mnt)))
"""


def sysfs_node(sysfs_dir: str) -> tuple[int, int]:
    major, minor = Path(sysfs_dir, "dev").read_text().strip().split(":")
    return int(major), int(minor)


@pytest.fixture(scope="module")
def ext4_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need(os.geteuid() == 0, "loop devices and mounts need root")
    need(all(shutil.which(t) for t in ("unshare", "mkfs.ext4", "losetup")), "util-linux, e2fs")
    need(Path("/sys/devices/virtual/misc/loop-control").is_dir(), "the loop module is loaded")
    base = tmp_path_factory.mktemp("ext4")
    (base / "tree").mkdir()
    (base / "tree" / "hello.txt").write_text("from the loop device\n")
    image = base / "small.ext4"
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-d", base / "tree", image, "4M"], check=True, capture_output=True
    )
    return image


def attached_to(image: Path) -> list[str]:
    out = subprocess.run(
        ["losetup", "--json", "--list", "--output", "NAME,BACK-FILE"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    devices = json.loads(out or '{"loopdevices": []}')["loopdevices"]
    return [d["name"] for d in devices if d.get("back-file") == str(image)]


@pytest.mark.parametrize(
    "nodes",
    [("loop-control", "null"), ("null",)],
    ids=["snapshot-with-loop-control", "snapshot-without-loop-control"],
)
def test_a_loop_device_attaches_when_dev_lacks_its_node(
    ext4_image: Path, tmp_path: Path, nodes: tuple[str, ...]
) -> None:
    sysfs = {
        "loop-control": "/sys/devices/virtual/misc/loop-control",
        "null": "/sys/devices/virtual/mem/null",
    }
    mknods = " && ".join(
        f"mknod /dev/{name} c {major} {minor}"
        for name in nodes
        for major, minor in [sysfs_node(sysfs[name])]
    )
    setup = f"mount -t tmpfs -o mode=0755 tmpfs /dev && {mknods} && ls /dev >{tmp_path}/before"
    mnt = tmp_path / "mnt"
    result = subprocess.run(
        [
            "unshare", "--mount", "--propagation", "private", "sh", "-c",
            f'{setup} && exec "$0" -c "$1" "$2" "$3"',
            sys.executable, ATTACH_AND_READ, str(ext4_image), str(mnt),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert not any(
        n.startswith("loop") and n != "loop-control"
        for n in (tmp_path / "before").read_text().split()
    )
    facts = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    assert facts["content"] == "from the loop device"
    assert facts["device"].startswith("/dev/loop")
    assert facts["mounted_after"] == "False"
    assert attached_to(ext4_image) == [], "the device is detached on the way out"
