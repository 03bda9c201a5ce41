"""Mount a developer container image as a writable root for a chroot build.

The image stays untouched: its ROOT partition is attached read-only through
a free loop device (asked of /dev/loop-control, never a fixed device; its node
made when a container's /dev lacks it: `mounts.free_loop_device`), mounted read-only,
and covered by an overlay — no `dd`, no `resize2fs`. The overlay's upper layer (all a
build writes) is a directory on the disk of the work directory, under the cache: never
memory, which a node's jobs need (a tmpfs with no bound is half the RAM, unswappable).
Where that file system cannot hold an overlay's upper layer (an overlayfs itself: a
container's own layer; NFS), a tmpfs bounded at `FALLBACK_TMPFS_SIZE` takes its place.
Every step is a context manager of `nvdriver.mounts` that undoes itself on
every exit path. All mount points live under one work directory, itself a
private bind mount, so that nothing propagates to the host and
`cleanup_stale` can tell our leftovers (after a SIGKILL) from anything else.
What is Flatcar's is here: the partition table, the layout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

from nvdriver import mounts
from nvdriver.errors import DriverError
from nvdriver.host import resolve_in
from nvdriver.run import RunError, run

log = logging.getLogger(__name__)

ROOT_PARTITION_NUMBER = 9
ROOT_PARTITION_NAME = "ROOT"
# Mount points under the work directory: what each one is makes it ours.
LOWER = "lower"
SCRATCH = "scratch"
SCRATCH_TMPFS = "scratch-tmpfs"
ROOT = "root"
# The bound of the tmpfs used where the work directory's file system refuses to be an
# overlay's upper layer (docs/troubleshooting.md, "The build's scratch").
FALLBACK_TMPFS_SIZE = "4g"
SYSTEM_BINDS = ("/proc", "/sys", "/dev")


@dataclasses.dataclass(frozen=True)
class Partition:
    """A partition of a disk image; `start` and `size` are in bytes."""

    number: int
    start: int
    size: int
    name: str
    type: str

    @classmethod
    def from_sfdisk(cls, entry: object, *, device: str, sector_size: int) -> Partition:
        """One entry of `sfdisk --json`'s `partitions` (start and size in sectors)."""
        if not isinstance(entry, dict):
            raise ValueError("a partition is not an object")
        node, start, size = entry.get("node"), entry.get("start"), entry.get("size")
        if not isinstance(node, str) or not isinstance(start, int) or not isinstance(size, int):
            raise ValueError(f"partition {entry!r} lacks node, start or size")
        suffix = node.removeprefix(device).removeprefix("p")
        if not suffix.isdigit():
            raise ValueError(f"partition {node!r} is not numbered after {device!r}")
        if start < 0 or size <= 0:
            raise ValueError(f"partition {node!r} has start {start} and size {size}")
        return cls(
            number=int(suffix),
            start=start * sector_size,
            size=size * sector_size,
            name=str(entry.get("name", "")),
            type=str(entry.get("type", "")).lower(),
        )


def partitions(image: Path) -> tuple[Partition, ...]:
    """The partitions of a disk image, from `sfdisk --json`."""
    result = run(
        ["sfdisk", "--json", image],
        timeout=mounts.TOOL_TIMEOUT,
        hint=f"{image} should be a Flatcar developer container (a GPT disk image).",
    )
    try:
        table = json.loads(result.stdout)["partitiontable"]
        sector_size = int(table.get("sectorsize", 512))
        return tuple(
            Partition.from_sfdisk(entry, device=table["device"], sector_size=sector_size)
            for entry in table.get("partitions", [])
        )
    except (ValueError, KeyError, TypeError) as e:
        raise DriverError(f"Could not read the partition table of {image}: {e}.") from e


def root_partition(image: Path) -> Partition:
    """The ROOT partition (number 9) of a Flatcar developer container."""
    found = partitions(image)
    for part in found:
        if part.name == ROOT_PARTITION_NAME:
            return part
    for part in found:
        if part.number == ROOT_PARTITION_NUMBER:
            return part
    listed = ", ".join(f"{p.number} {p.name!r}" for p in found) or "none"
    raise DriverError(
        f"{image} has no ROOT partition (partition {ROOT_PARTITION_NUMBER}); "
        f"its partitions: {listed}.",
        hint="It is not a Flatcar developer container: remove it from the cache "
        "(NVIDIA_DRIVER_CACHE) so that it is downloaded again.",
    )


@contextlib.contextmanager
def developer_root(
    image: Path, workdir: Path, binds: Mapping[str, Path] | None = None
) -> Iterator[Path]:
    """The developer container's root tree, writable (its writes under `workdir`, on
    disk), with /proc, /sys, /dev and `binds` (path inside → host path) bound in;
    everything unmounted on exit (the caller removes `workdir`)."""
    part = root_partition(image)
    workdir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        stack.enter_context(mounts.private_tree(workdir))
        device = stack.enter_context(mounts.loop_device(image, offset=part.start, size=part.size))
        lower = stack.enter_context(mounts.mount(device, workdir / LOWER, options=["ro"]))
        root = stack.enter_context(_writable(lower, workdir))
        for inside, source in [*((p, Path(p)) for p in SYSTEM_BINDS), *(binds or {}).items()]:
            stack.enter_context(mounts.bind(source, resolve_in(root, Path(inside))))
        log.info("Mounted the developer container %s at %s", image, root)
        yield root


@contextlib.contextmanager
def _writable(lower: Path, workdir: Path) -> Iterator[Path]:
    """The overlay of `lower` at `workdir/root`, its upper layer on `workdir`'s disk, or
    on a bounded tmpfs where that file system refuses (the kernel says so in its log:
    "not supported as upperdir")."""
    with contextlib.ExitStack() as stack:
        try:
            root = stack.enter_context(
                mounts.overlay(lower, workdir / ROOT, scratch=workdir / SCRATCH)
            )
        except RunError as e:
            log.warning(
                "The file system of %s cannot hold the build's writes (an overlay's upper "
                "layer): %s. Using a tmpfs of at most %s instead; point NVIDIA_DRIVER_CACHE "
                "at a directory of the host's disk (ext4, xfs, btrfs) to build on disk.",
                workdir,
                e,
                FALLBACK_TMPFS_SIZE,
            )
            root = stack.enter_context(
                mounts.overlay(
                    lower,
                    workdir / ROOT,
                    scratch=workdir / SCRATCH_TMPFS,
                    tmpfs_size=FALLBACK_TMPFS_SIZE,
                )
            )
        yield root


def cleanup_stale(workdir: Path, *, backing_dir: Path | None = None) -> None:
    """Remove what a killed run left: mounts under `workdir`, the writes of its overlay
    (on disk), and unused loop devices whose backing file is under `backing_dir` (the
    image cache). Call it before `developer_root`, holding the lock that keeps other runs
    from using `workdir`."""
    mounts.unmount_under(workdir)
    shutil.rmtree(workdir / SCRATCH, ignore_errors=True)
    if backing_dir is not None:
        mounts.detach_loops_backed_by(backing_dir)
