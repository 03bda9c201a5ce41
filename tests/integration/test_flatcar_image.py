"""Mounting a developer container image with real loop devices, mounts and overlays:
the image never changes, and nothing of ours is left attached or mounted — after an
error, a signal, or a SIGKILL followed by `cleanup_stale`."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nvdriver.errors import DriverError
from nvdriver.flatcar import image as img
from nvdriver.run import run, spawn, which
from tests.conftest import need


@pytest.fixture(autouse=True)
def _loop_devices() -> None:
    need(
        os.geteuid() == 0 and Path("/dev/loop-control").exists() and which("sfdisk") is not None,
        "needs root, loop devices and sfdisk",
    )


MiB = 1 << 20
LINUX_FS = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"


def make_image(path: Path, tree: Path, *, number: int = 9, name: str = "ROOT") -> Path:
    """A GPT disk image whose partition `number` holds an ext4 made from `tree`."""
    fs = path.with_suffix(".ext4")
    run(["mkfs.ext4", "-q", "-F", "-T", "default", "-b", "4096", "-L", name, "-d", tree, fs, "16M"])
    start = 2048  # sectors: 1 MiB
    size = fs.stat().st_size
    with open(path, "wb") as f:
        f.truncate(start * 512 + size + MiB)
    script = (
        f"label: gpt\n{path.name}{number} : start={start}, size={size // 512}, "
        f'type={LINUX_FS}, name="{name}"\n'
    )
    run(["sfdisk", "-q", path], input=script)
    with open(path, "r+b") as f, open(fs, "rb") as src:
        f.seek(start * 512)
        while chunk := src.read(MiB):
            f.write(chunk)
    fs.unlink()
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    (root / "usr/lib/modules/6.12.102-flatcar/build").mkdir(parents=True)
    (root / "usr/src").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "etc/os-release").write_text("ID=flatcar\nVERSION=4230.2.3\n")
    (root / "lib").symlink_to("usr/lib")
    (root / "opt").symlink_to("/usr/src")  # absolute: must resolve inside the image
    return root


@pytest.fixture
def disk(tmp_path: Path, tree: Path) -> Path:
    images = tmp_path / "cache"
    images.mkdir()
    return make_image(images / "developer.bin", tree)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def our_loops(directory: Path) -> list[str]:
    devices = json.loads(run(["losetup", "--json", "--list"]).stdout or "{}")
    return [
        d["name"]
        for d in devices.get("loopdevices", [])
        if str(d.get("back-file") or "").startswith(str(directory))
    ]


def our_mounts(directory: Path) -> list[str]:
    mounts = json.loads(run(["findmnt", "--json", "--list", "--output", "TARGET"]).stdout)
    return [m["target"] for m in mounts["filesystems"] if m["target"].startswith(str(directory))]


@pytest.fixture
def leftovers(tmp_path: Path) -> Iterator[None]:
    """Fail if anything of ours is left; clean it up anyway so that other tests are not hurt."""
    yield
    loops, mounts = our_loops(tmp_path), our_mounts(tmp_path)
    if loops or mounts:
        img.cleanup_stale(tmp_path / "work", backing_dir=tmp_path)
    assert (loops, mounts) == ([], [])


def test_root_partition_is_found_by_label_and_number(disk: Path) -> None:
    part = img.root_partition(disk)
    assert (part.number, part.name, part.start) == (9, "ROOT", 2048 * 512)
    assert part.size == 16 * MiB
    assert part.type == LINUX_FS.lower()


def test_developer_root_is_writable_and_leaves_the_image_unchanged(
    tmp_path: Path, disk: Path, leftovers: None
) -> None:
    before = sha256(disk)
    source = tmp_path / "driver-source"
    source.mkdir()
    (source / "Kbuild").write_text("obj-m := nvidia.o\n")
    workdir = tmp_path / "work"

    with img.developer_root(disk, workdir, {"/usr/src/nvidia": source}) as root:
        assert root == workdir / img.ROOT
        assert (root / "etc/os-release").read_text().startswith("ID=flatcar")
        assert (root / "lib/modules/6.12.102-flatcar/build").is_dir()
        assert (root / "proc/self/status").exists()
        assert (root / "dev/null").exists()
        assert (root / "sys/kernel").is_dir()
        assert (root / "usr/src/nvidia/Kbuild").read_text() == "obj-m := nvidia.o\n"
        (root / "usr/src/new-file").write_bytes(os.urandom(4 * MiB))  # into the tmpfs
        (root / "etc/os-release").write_text("changed")
        assert our_loops(tmp_path) and our_mounts(tmp_path)

    assert sha256(disk) == before
    assert our_loops(tmp_path) == [] and our_mounts(tmp_path) == []


def filesystems(directory: Path) -> dict[str, tuple[str, str]]:
    """Each mount at or under `directory`: its type and options."""
    found = json.loads(
        run(["findmnt", "--json", "--list", "--output", "TARGET,FSTYPE,OPTIONS"]).stdout
    )
    return {
        m["target"]: (m["fstype"], m["options"])
        for m in found["filesystems"]
        if m["target"].startswith(str(directory))
    }


def test_the_builds_writes_go_to_the_work_directorys_disk_never_to_memory(
    tmp_path: Path, disk: Path, leftovers: None
) -> None:
    workdir = tmp_path / "work"
    with img.developer_root(disk, workdir, {}) as root:
        (root / "usr/src/object.o").write_bytes(os.urandom(4 * MiB))
        assert str(workdir / img.SCRATCH) not in filesystems(workdir)  # no tmpfs there
        upper = workdir / img.SCRATCH / "upper" / "usr/src/object.o"
        assert upper.stat().st_size == 4 * MiB
        assert os.stat(upper).st_dev == os.stat(tmp_path).st_dev  # the disk under the cache
    assert not (workdir / img.SCRATCH).exists(), "the writes are removed with the overlay"


def test_where_the_disk_cannot_hold_the_writes_a_bounded_tmpfs_does(
    tmp_path: Path, disk: Path, leftovers: None
) -> None:
    """A work directory on an overlayfs (a container's own layer): the kernel refuses it
    as an upper layer, and a tmpfs of FALLBACK_TMPFS_SIZE takes the writes."""
    layer = tmp_path / "layer"
    for d in ("lower", "upper", "work", "merged"):
        (layer / d).mkdir(parents=True)
    merged = layer / "merged"
    options = f"lowerdir={layer / 'lower'},upperdir={layer / 'upper'},workdir={layer / 'work'}"
    run(["mount", "-t", "overlay", "container-layer", "-o", options, merged])
    try:
        workdir = merged / "work"
        with img.developer_root(disk, workdir, {}) as root:
            (root / "usr/src/object.o").write_bytes(os.urandom(MiB))
            tmpfs = filesystems(workdir)[str(workdir / img.SCRATCH_TMPFS)]
            assert tmpfs[0] == "tmpfs"
            assert "size=4194304k" in tmpfs[1].split(",")
        assert list(filesystems(workdir)) == []
    finally:
        run(["umount", merged])


def test_binds_through_absolute_symlinks_stay_inside_the_image(
    tmp_path: Path, disk: Path, leftovers: None
) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "marker").touch()
    with img.developer_root(disk, tmp_path / "work", {"/opt/nvidia": source}) as root:
        # /opt -> /usr/src in the image: the bind lands at <root>/usr/src/nvidia.
        assert (root / "usr/src/nvidia/marker").exists()
    assert not Path("/usr/src/nvidia/marker").exists()


def test_exception_inside_the_block_still_cleans_up(
    tmp_path: Path, disk: Path, leftovers: None
) -> None:
    with (
        pytest.raises(RuntimeError, match="build failed"),
        img.developer_root(disk, tmp_path / "work", {}) as root,
    ):
        assert (root / "etc").is_dir()
        raise RuntimeError("build failed")
    assert our_loops(tmp_path) == [] and our_mounts(tmp_path) == []


def test_image_without_a_root_partition_is_a_clear_error(
    tmp_path: Path, tree: Path, leftovers: None
) -> None:
    other = make_image(tmp_path / "other.bin", tree, number=3, name="OEM")
    with (
        pytest.raises(DriverError, match="has no ROOT partition") as info,
        img.developer_root(other, tmp_path / "work", {}),
    ):
        pass
    assert str(other) in str(info.value)
    assert "3 'OEM'" in str(info.value)


def test_file_that_is_no_disk_image_is_a_clear_error(tmp_path: Path, leftovers: None) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\0" * MiB)
    with pytest.raises(DriverError, match=re.escape(str(junk))):
        img.root_partition(junk)


def test_missing_bind_source_fails_and_cleans_up(
    tmp_path: Path, disk: Path, leftovers: None
) -> None:
    with (
        pytest.raises(DriverError, match="does not exist"),
        img.developer_root(disk, tmp_path / "work", {"/x": tmp_path / "missing"}),
    ):
        pass


@pytest.fixture
def shared_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A shared tmpfs with a submount, like the host's /sys or a Bidirectional volume."""
    shared = tmp_path / "shared"
    shared.mkdir()
    run(["mount", "-t", "tmpfs", "shared-test", shared])
    try:
        run(["mount", "--make-shared", shared])
        (shared / "sub").mkdir()
        run(["mount", "-t", "tmpfs", "shared-sub", shared / "sub"])
        (shared / "sub" / "marker").touch()
        yield shared
    finally:
        run(["umount", "--recursive", "--lazy", shared], check=False)


def test_unbinding_a_shared_source_never_unmounts_its_submounts(
    tmp_path: Path, disk: Path, leftovers: None, shared_tmpfs: Path
) -> None:
    with img.developer_root(disk, tmp_path / "work", {"/mnt/shared": shared_tmpfs}) as root:
        assert (root / "mnt/shared/sub/marker").exists()
    # A bind left a peer of its source would have taken the source's submount with it.
    assert (shared_tmpfs / "sub" / "marker").exists()
    assert our_mounts(tmp_path / "work") == []


def test_work_directory_on_a_shared_mount_is_refused(
    tmp_path: Path, disk: Path, leftovers: None, shared_tmpfs: Path
) -> None:
    with (
        pytest.raises(DriverError, match="is on a shared mount"),
        img.developer_root(disk, shared_tmpfs / "work", {}),
    ):
        pass
    assert our_mounts(shared_tmpfs / "work") == []
    assert our_loops(tmp_path) == []


CHILD = """
import os, signal, sys, time
from pathlib import Path
from nvdriver.errors import Interrupted
from nvdriver.flatcar.image import developer_root

def interrupted(signum, frame):
    raise Interrupted(signum)

signal.signal(signal.SIGTERM, interrupted)
disk, workdir, ready = map(Path, sys.argv[1:4])
with developer_root(disk, workdir, {}) as root:
    (root / "usr/src/object.o").write_bytes(b"x" * 65536)
    ready.write_text(str(root))
    time.sleep(60)
"""


def start_child(tmp_path: Path, disk: Path) -> tuple[Path, Path]:
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD))
    return script, tmp_path / "ready"


def wait_for(path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def test_sigterm_unwinds_the_mounts(tmp_path: Path, disk: Path, leftovers: None) -> None:
    script, ready = start_child(tmp_path, disk)
    with spawn([sys.executable, script, disk, tmp_path / "work", ready]) as proc:
        wait_for(ready)
        assert our_mounts(tmp_path)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 1  # Interrupted, raised through the with block
    assert our_loops(tmp_path) == [] and our_mounts(tmp_path) == []


def test_cleanup_stale_removes_what_a_sigkilled_run_left(
    tmp_path: Path, disk: Path, leftovers: None
) -> None:
    script, ready = start_child(tmp_path, disk)
    workdir = tmp_path / "work"
    with spawn([sys.executable, script, disk, workdir, ready]) as proc:
        wait_for(ready)
        proc.kill()
        proc.wait()
    assert our_loops(tmp_path) and our_mounts(tmp_path)  # SIGKILL: nothing could unwind

    img.cleanup_stale(workdir, backing_dir=disk.parent)

    assert our_loops(tmp_path) == [] and our_mounts(tmp_path) == []
    assert not (workdir / img.SCRATCH).exists(), "the killed build's writes stay on disk"
    # And the next run works.
    with img.developer_root(disk, workdir, {}) as root:
        assert (root / "etc/os-release").exists()


def _attach(path: Path, offset: int = 0) -> str:
    return run(
        ["losetup", "--find", "--show", "--read-only", "--offset", str(offset), path]
    ).stdout.strip()


def test_cleanup_stale_detaches_only_unused_loops_of_the_cache(
    tmp_path: Path, disk: Path, leftovers: None
) -> None:
    part = img.root_partition(disk)
    outside = tmp_path / "elsewhere.bin"
    outside.write_bytes(bytes(MiB))
    stale = _attach(disk)  # attached and unused, as a killed run elsewhere leaves it
    foreign = _attach(outside)  # not backed by the cache: not ours
    mounted = _attach(disk, part.start)  # in use by a mount outside the work directory
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run(["mount", "-o", "ro", mounted, mnt])
    try:
        img.cleanup_stale(tmp_path / "work", backing_dir=disk.parent)
        assert sorted(our_loops(tmp_path)) == sorted([foreign, mounted])
    finally:
        run(["umount", mnt])
        for device in (foreign, mounted, stale):
            run(["losetup", "--detach", device], check=False)


def test_cleanup_stale_with_nothing_to_do(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Nothing of ours attached or mounted, only what sits beside it (a loop device of a
    file in `cache-old`, a mount at `work-old`): cleanup_stale raises nothing, removes
    nothing (not those, not the cache's files), creates nothing (not the work directory),
    runs nothing but the listings of mounts and loop devices, and logs nothing at INFO or above."""
    cache, workdir = tmp_path / "cache", tmp_path / "work"
    cache.mkdir()
    (cache / "image.bin").write_bytes(bytes(MiB))  # cached, not attached
    beside = tmp_path / "cache-old" / "image.bin"
    beside.parent.mkdir()
    beside.write_bytes(bytes(MiB))
    mounted = tmp_path / "work-old"
    mounted.mkdir()
    loop = _attach(beside)
    run(["mount", "-t", "tmpfs", "tmpfs", mounted])
    try:
        files = sorted(tmp_path.rglob("*"))
        caplog.set_level(logging.DEBUG, logger="nvdriver")
        caplog.clear()  # the attach above logs too where an earlier test left DEBUG on
        img.cleanup_stale(workdir, backing_dir=cache)
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO] == []
        commands = [r.getMessage() for r in caplog.records if r.getMessage().startswith("+ ")]
        # Only the listings (findmnt, losetup --list): no umount, no losetup --detach.
        assert commands and all(
            re.match(r"\+ (findmnt|losetup) --json .*--list", c) for c in commands
        )
        assert our_loops(tmp_path) == [loop]
        assert our_mounts(tmp_path) == [str(mounted)]
        assert sorted(tmp_path.rglob("*")) == files
        assert not workdir.exists()
    finally:
        run(["umount", mounted], check=False)
        run(["losetup", "--detach", loop], check=False)
