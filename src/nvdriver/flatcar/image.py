"""Mount a developer container image as a writable root for a chroot build.

The image stays untouched: its ROOT partition is attached read-only through
a loop device (`losetup --find`, never a fixed device), mounted read-only,
and covered by an overlay whose upper layer lives on a tmpfs — no `dd`, no
`resize2fs`. Every step is a context manager that undoes itself on every
exit path. All mount points live under one work directory, itself a private
bind mount, so that nothing propagates to the host and `cleanup_stale` can
tell our leftovers (after a SIGKILL) from anything else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from nvdriver.errors import DriverError, Interrupted
from nvdriver.host import resolve_in
from nvdriver.run import RunError, run

log = logging.getLogger(__name__)

TOOL_TIMEOUT = 120.0
ROOT_PARTITION_NUMBER = 9
ROOT_PARTITION_NAME = "ROOT"
# Mount points under the work directory: what each one is makes it ours.
LOWER = "lower"
SCRATCH = "scratch"
ROOT = "root"
SYSTEM_BINDS = ("/proc", "/sys", "/dev")
_HELD_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
T = TypeVar("T")


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
        timeout=TOOL_TIMEOUT,
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
def _signals_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP back; they are delivered when the block ends."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _release(action: Callable[[], object]) -> None:
    """Run a cleanup step that a signal cannot cut short; the signal is raised after it."""
    interrupted: BaseException | None = None
    done = False
    while not done:
        try:
            with _signals_held():
                action()
                done = True
        except (KeyboardInterrupt, Interrupted) as e:
            interrupted = e  # arrived before the step ran, or right after it
    if interrupted is not None:
        raise interrupted


@contextlib.contextmanager
def _undone_by(action: Callable[[], object], what: str) -> Iterator[None]:
    """Run `action` when the block ends; after a failure, a failing `action` is only logged."""
    try:
        yield
    except BaseException:
        try:
            _release(action)
        except DriverError as e:
            log.error("Could not %s: %s", what, e)
        raise
    _release(action)


@contextlib.contextmanager
def _acquired(acquire: Callable[[], T], release: Callable[[T], object], what: str) -> Iterator[T]:
    """Acquire a resource and register its release with signals held, so that no signal
    can fall between the two; the resource is released when the block ends."""
    with contextlib.ExitStack() as stack:
        with _signals_held():
            value = acquire()
            stack.enter_context(_undone_by(lambda: release(value), f"{what} {value}"))
        yield value


@contextlib.contextmanager
def loop_device(image: Path, *, offset: int, size: int, read_only: bool = True) -> Iterator[Path]:
    """A free loop device onto `size` bytes of `image` from `offset`, detached on exit."""
    cmd: list[str | Path] = ["losetup", "--find", "--show"]
    if read_only:
        cmd.append("--read-only")
    cmd += ["--offset", str(offset), "--sizelimit", str(size), image]

    def attach() -> Path:
        result = run(
            cmd,
            timeout=TOOL_TIMEOUT,
            hint="Loop devices are needed to mount the developer container: run the container "
            "privileged (or with CAP_SYS_ADMIN and the loop devices).",
        )
        return Path(result.stdout.strip())

    def detach(device: Path) -> None:
        run(["losetup", "--detach", device], timeout=TOOL_TIMEOUT)

    with _acquired(attach, detach, "detach") as device:
        log.debug("Attached %s to %s", image, device)
        yield device


def _umount(where: Path, *, recursive: bool = False) -> None:
    if recursive:
        # A recursive bind starts out a peer of its source's mounts: unmounting its
        # submounts then would unmount the host's. As a slave it is safe to take apart.
        run(["mount", "--make-rslave", where], timeout=TOOL_TIMEOUT, check=False)
    run(["umount", *(["--recursive"] if recursive else []), where], timeout=TOOL_TIMEOUT)


@contextlib.contextmanager
def mount(
    what: str | Path,
    where: Path,
    *,
    fstype: str | None = None,
    options: Sequence[str] = (),
    flags: Sequence[str] = (),
    recursive: bool = False,
) -> Iterator[Path]:
    """`mount [-t fstype] [-o options] [flags] what where`, unmounted on exit.

    `recursive` unmounts submounts too (for `--rbind`).
    """
    where.mkdir(parents=True, exist_ok=True)
    cmd: list[str | Path] = ["mount", *flags]
    if fstype:
        cmd += ["-t", fstype]
    if options:
        cmd += ["-o", ",".join(options)]

    def attach() -> Path:
        run([*cmd, what, where], timeout=TOOL_TIMEOUT)
        return where

    with _acquired(attach, lambda _: _umount(where, recursive=recursive), "unmount"):
        yield where


def _propagation(path: Path) -> tuple[str, str]:
    """The mount point that holds `path` and its propagation (shared, private, ...)."""
    result = run(
        ["findmnt", "--json", "--target", path, "--output", "TARGET,PROPAGATION"],
        timeout=TOOL_TIMEOUT,
    )
    try:
        entry = json.loads(result.stdout)["filesystems"][0]
        return str(entry["target"]), str(entry["propagation"])
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise DriverError(f"Could not read the mount of {path} from findmnt: {e}.") from e


@contextlib.contextmanager
def private_tree(directory: Path) -> Iterator[Path]:
    """Make `directory` a private mount (bound onto itself): mounts below do not propagate.

    Refused on a shared mount: the bind itself would propagate to its peers (the host,
    for a `Bidirectional` volume) and outlive us there.
    """
    target, propagation = _propagation(directory)
    if "shared" in propagation.split(","):
        raise DriverError(
            f"The work directory {directory} is on a shared mount ({target}): mounts made "
            "there would propagate to other mount namespaces, the host's among them.",
            hint="Use a work directory on a private mount (the container's own file system), "
            "or run the build in a mount namespace of its own "
            "(unshare --mount --propagation slave).",
        )
    with mount(directory, directory, flags=["--bind"], recursive=True):
        run(["mount", "--make-private", directory], timeout=TOOL_TIMEOUT)
        yield directory


@contextlib.contextmanager
def bind(source: Path, target: Path, *, read_only: bool = False) -> Iterator[Path]:
    """A recursive bind of `source` at `target`; a slave, so unmounting never propagates back."""
    if not source.exists():
        raise DriverError(f"Cannot bind {source} into the developer container: it does not exist.")
    if source.is_dir():
        target.mkdir(parents=True, exist_ok=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.touch(exist_ok=True)
    with mount(source, target, flags=["--rbind"], recursive=True):
        run(["mount", "--make-rslave", target], timeout=TOOL_TIMEOUT)
        if read_only:
            run(["mount", "-o", "remount,bind,ro", target], timeout=TOOL_TIMEOUT)
        yield target


def _overlay_path(path: Path) -> str:
    text = os.fspath(path)
    if any(c in text for c in ",:\\\n"):
        raise DriverError(f"{text} cannot be used in overlay options: pick a simpler path.")
    return text


@contextlib.contextmanager
def overlay(lower: Path, where: Path, *, scratch: Path, size: str | None = None) -> Iterator[Path]:
    """A writable view of `lower` at `where`; writes go to a tmpfs at `scratch` and vanish."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(
            mount("tmpfs", scratch, fstype="tmpfs", options=[f"size={size}"] if size else [])
        )
        upper, work = scratch / "upper", scratch / "work"
        upper.mkdir()
        work.mkdir()
        options = [
            f"lowerdir={_overlay_path(lower)}",
            f"upperdir={_overlay_path(upper)}",
            f"workdir={_overlay_path(work)}",
        ]
        yield stack.enter_context(mount("overlay", where, fstype="overlay", options=options))


@contextlib.contextmanager
def developer_root(
    image: Path,
    workdir: Path,
    binds: Mapping[str, Path] | None = None,
    *,
    scratch_size: str | None = None,
) -> Iterator[Path]:
    """The developer container's root tree, writable (tmpfs overlay), with /proc, /sys,
    /dev and `binds` (path inside → host path) bound in; everything undone on exit."""
    part = root_partition(image)
    workdir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        stack.enter_context(private_tree(workdir))
        device = stack.enter_context(loop_device(image, offset=part.start, size=part.size))
        lower = stack.enter_context(mount(device, workdir / LOWER, options=["ro"]))
        root = stack.enter_context(
            overlay(lower, workdir / ROOT, scratch=workdir / SCRATCH, size=scratch_size)
        )
        for inside, source in [*((p, Path(p)) for p in SYSTEM_BINDS), *(binds or {}).items()]:
            stack.enter_context(bind(source, resolve_in(root, Path(inside))))
        log.info("Mounted the developer container %s at %s", image, root)
        yield root


def _findmnt() -> list[dict[str, str]]:
    result = run(["findmnt", "--json", "--list", "--output", "TARGET,SOURCE"], timeout=TOOL_TIMEOUT)
    filesystems = json.loads(result.stdout or '{"filesystems": []}').get("filesystems", [])
    return [f for f in filesystems if isinstance(f, dict)]


def _loop_devices() -> list[dict[str, object]]:
    result = run(
        ["losetup", "--json", "--list", "--output", "NAME,BACK-FILE,BACK-INO,BACK-MAJ:MIN"],
        timeout=TOOL_TIMEOUT,
    )
    devices = json.loads(result.stdout or '{"loopdevices": []}').get("loopdevices", [])
    return [d for d in devices if isinstance(d, dict)]


def _is_under(path: str, directory: Path) -> bool:
    return path == os.fspath(directory) or path.startswith(os.fspath(directory) + "/")


def _backed_by(device: Mapping[str, object], directory: Path) -> bool:
    """Whether a loop device's backing file is (or was: deleted) a file under `directory`."""
    back = str(device.get("back-file") or "").removesuffix(" (deleted)")
    if back and _is_under(back, directory):
        return True
    ino, majmin = device.get("back-ino"), str(device.get("back-maj:min") or "").strip()
    if not majmin or ino is None:
        return False
    for path in directory.rglob("*"):
        with contextlib.suppress(OSError):
            st = path.stat()
            device_id = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
            if path.is_file() and str(st.st_ino) == str(ino) and device_id == majmin:
                return True
    return False


def _try(cmd: Sequence[str | Path], what: str) -> bool:
    try:
        run(cmd, timeout=TOOL_TIMEOUT)
    except RunError as e:
        log.warning("Could not %s: %s", what, e)
        return False
    return True


def cleanup_stale(workdir: Path, *, backing_dir: Path | None = None) -> None:
    """Remove what a killed run left: mounts under `workdir` and unused loop devices whose
    backing file is under `backing_dir` (the image cache). Call it before `developer_root`,
    holding the lock that keeps other runs from using `workdir`."""
    workdir = workdir.resolve()
    mounts = _findmnt()
    ours = [m for m in reversed(mounts) if _is_under(str(m.get("target", "")), workdir)]
    for m in ours:  # a bind left a peer of the host's mounts must not unmount those
        _try(["mount", "--make-rslave", m["target"]], f"make {m['target']} a slave")
    for m in ours:  # newest first: submounts before the mounts they sit on
        target = m["target"]
        log.info("Unmounting %s, left over by an interrupted run", target)
        if not _try(["umount", target], f"unmount {target}"):
            _try(["umount", "--lazy", target], f"lazily unmount {target}")
    if backing_dir is None:
        return
    backing_dir = backing_dir.resolve()
    in_use = {str(m.get("source", "")) for m in _findmnt()}
    for device in _loop_devices():
        name = str(device.get("name", ""))
        if not name or not _backed_by(device, backing_dir):
            continue
        if name in in_use:
            log.info("Leaving %s attached: it is mounted", name)
            continue
        log.info(
            "Detaching %s (%s), left over by an interrupted run", name, device.get("back-file")
        )
        _try(["losetup", "--detach", name], f"detach {name}")
