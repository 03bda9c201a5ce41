"""Mounts, binds, overlays and loop devices: the primitives every caller uses.

Each resource is a context manager that undoes itself on every exit path. It
is taken and its release registered with signals deferred (`_acquired`), so
that no signal can land between the two and leave a mount that nothing will
unmount; a release that a signal would cut short is retried before the signal
is raised (`_release`). What is mounted is read from `findmnt --json` and
`losetup --json`, never from text meant for people, which is also how a
killed run's leftovers are found and removed (`unmount_under`,
`detach_loops_backed_by`).

What every start and restart does on its way to readiness (whether the driver root is
mounted, its lazy unmount, /sys' propagation, the driver root's bind) is done in this
process: the kernel's own table (`/proc/self/mountinfo`, what findmnt reads) and the
mount(2) and umount2(2) system calls, as mkosi's sandbox makes its mounts. A `mount`
process costs more than the change it makes: 0.1-0.2 s each on a slow node, five of them
on a restart's path.

Two kinds of recursive bind: `bind` is a slave of its source, for a private
tree (a build root) whose unmount must never propagate back to the source's
mounts; `propagated_bind` stays a peer, for a tree that must appear on the
host through a shared mount (a `Bidirectional` volume) and leave it again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import stat
from collections.abc import Callable, Iterator, Sequence
from errno import EACCES, EPERM
from pathlib import Path
from typing import NamedTuple, TypeVar

from nvdriver import signals
from nvdriver.errors import DriverError, Interrupted
from nvdriver.run import RunError, run

log = logging.getLogger(__name__)

TOOL_TIMEOUT = 120.0
T = TypeVar("T")


# --- taking and releasing, signals deferred -----------------------------------------------


def _release(action: Callable[[], object]) -> None:
    """Run a cleanup step that a signal cannot cut short; the signal is raised after it."""
    interrupted: BaseException | None = None
    done = False
    while not done:
        try:
            with signals.deferred():
                action()
                done = True
        except (KeyboardInterrupt, Interrupted) as e:
            interrupted = e  # arrived before the step ran, or right after it
    if interrupted is not None:
        raise interrupted


@contextlib.contextmanager
def _undone_by(action: Callable[[], object], what: str, *, keep: bool = False) -> Iterator[None]:
    """Run `action` when the block ends (with `keep`: only when it fails); after a failure,
    a failing `action` is only logged."""
    try:
        yield
    except BaseException:
        try:
            _release(action)
        except DriverError as e:
            log.error("Could not %s: %s", what, e)
        raise
    if not keep:
        _release(action)


@contextlib.contextmanager
def _acquired(
    acquire: Callable[[], T], release: Callable[[T], object], what: str, *, keep: bool = False
) -> Iterator[T]:
    """Acquire a resource and register its release with signals deferred, so that no
    signal can fall between the two; the resource is released when the block ends
    (with `keep`: only when it fails, so that it outlives a command that succeeded)."""
    with contextlib.ExitStack() as stack:
        with signals.deferred():
            value = acquire()
            stack.enter_context(_undone_by(lambda: release(value), f"{what} {value}", keep=keep))
        yield value


# --- loop devices ---------------------------------------------------------------------------


# The loop devices are this machine's real ones (losetup and mount act on them): not
# under HOST_ROOT. In a container /dev may be a copy taken when it started, without the
# nodes of loop devices the kernel made since; the kernel's sysfs knows them all.
DEV = Path("/dev")
LOOP_CONTROL = DEV / "loop-control"
LOOP_CTL_GET_FREE = 0x4C82  # <linux/loop.h>
SYS_BLOCK = Path("/sys/devices/virtual/block")
SYS_MISC = Path("/sys/devices/virtual/misc")
ATTACH_ATTEMPTS = 3
_LOOP_HINT = (
    "Loop devices are needed to mount the developer container: run the container "
    "privileged (--privileged gives CAP_MKNOD and the device rule b 7:* rwm), and load the "
    "loop module on the host (modprobe loop)."
)


def _device_node(node: Path, sysfs_dir: Path) -> Path:
    """`node`, made (a block or char device, from `sysfs_dir/dev`, "major:minor") when the
    container's /dev lacks it."""
    if node.exists():
        return node
    kind = stat.S_IFBLK if sysfs_dir.parent == SYS_BLOCK else stat.S_IFCHR
    try:
        major, _, minor = (sysfs_dir / "dev").read_text().strip().partition(":")
        os.mknod(node, 0o660 | kind, os.makedev(int(major), int(minor)))
    except FileExistsError:  # another process made it meanwhile
        pass
    except (OSError, ValueError) as e:
        why = e.strerror if isinstance(e, OSError) else f"{sysfs_dir}/dev is malformed"
        raise DriverError(f"Cannot make the device node {node}: {why}.", hint=_LOOP_HINT) from e
    log.info("Made the device node %s (missing from this /dev)", node)
    return node


def free_loop_device() -> Path:
    """The node of a free loop device, from /dev/loop-control (LOOP_CTL_GET_FREE, which
    makes a new device when all are taken); the node is made when /dev lacks it."""
    control = _device_node(LOOP_CONTROL, SYS_MISC / "loop-control")
    try:
        fd = os.open(control, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise DriverError(f"Cannot open {control}: {e.strerror}.", hint=_LOOP_HINT) from e
    try:
        number = fcntl.ioctl(fd, LOOP_CTL_GET_FREE)
    except OSError as e:
        raise DriverError(
            f"{control} has no free loop device: {e.strerror}.", hint=_LOOP_HINT
        ) from e
    finally:
        os.close(fd)
    return _device_node(DEV / f"loop{number}", SYS_BLOCK / f"loop{number}")


@contextlib.contextmanager
def loop_device(image: Path, *, offset: int, size: int, read_only: bool = True) -> Iterator[Path]:
    """A free loop device onto `size` bytes of `image` from `offset`, detached on exit.

    The device is chosen here and named to losetup (not `losetup --find`, which fails
    when the free device has no node in a container's /dev); another process may take it
    first, so choosing and attaching are tried again, ATTACH_ATTEMPTS times in all.
    """
    options: list[str | Path] = ["--read-only"] if read_only else []
    options += ["--offset", str(offset), "--sizelimit", str(size)]

    def attach() -> Path:
        attempt = 1
        while True:
            device = free_loop_device()
            try:
                run(["losetup", *options, device, image], timeout=TOOL_TIMEOUT, hint=_LOOP_HINT)
                return device
            except RunError as e:
                if attempt >= ATTACH_ATTEMPTS:
                    raise
                attempt += 1
                log.info("Could not attach %s (%s); trying another loop device", device, e)

    def detach(device: Path) -> None:
        run(["losetup", "--detach", device], timeout=TOOL_TIMEOUT)

    with _acquired(attach, detach, "detach") as device:
        log.debug("Attached %s to %s", image, device)
        yield device


class LoopDevice(NamedTuple):
    """An attached loop device as `losetup --json` lists it."""

    name: str
    back_file: str  # " (deleted)" removed: the name the file had
    back_inode: int | None
    back_device: str  # "major:minor" of the backing file's file system, or ""

    @classmethod
    def from_losetup(cls, entry: object) -> LoopDevice | None:
        """One entry of `losetup --json`'s `loopdevices`; None for one without a name."""
        if not isinstance(entry, dict) or not entry.get("name"):
            return None
        inode = str(entry.get("back-ino") or "")
        return cls(
            name=str(entry["name"]),
            back_file=str(entry.get("back-file") or "").removesuffix(" (deleted)"),
            back_inode=int(inode) if inode.isdigit() else None,
            back_device=str(entry.get("back-maj:min") or "").strip(),
        )

    def backed_by_file_under(self, directory: Path) -> bool:
        """Whether the backing file is (or was, before it was deleted) a file under `directory`."""
        if self.back_file and is_under(Path(self.back_file), directory):
            return True
        if self.back_inode is None or not self.back_device:
            return False
        for path in directory.rglob("*"):
            with contextlib.suppress(OSError):
                st = path.stat()
                device = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
                if path.is_file() and (st.st_ino, device) == (self.back_inode, self.back_device):
                    return True
        return False


def parse_losetup(text: str) -> tuple[LoopDevice, ...]:
    """The devices of `losetup --json --list` output (empty output: none attached)."""
    devices = json.loads(text or '{"loopdevices": []}').get("loopdevices", [])
    return tuple(d for d in map(LoopDevice.from_losetup, devices) if d is not None)


def loop_devices() -> tuple[LoopDevice, ...]:
    """Every attached loop device."""
    result = run(
        ["losetup", "--json", "--list", "--output", "NAME,BACK-FILE,BACK-INO,BACK-MAJ:MIN"],
        timeout=TOOL_TIMEOUT,
    )
    return parse_losetup(result.stdout)


# --- the mount table ------------------------------------------------------------------------


class Mount(NamedTuple):
    """A mount as `findmnt --json` lists it."""

    target: Path
    source: str
    propagation: frozenset[str]  # "shared", "private", "slave", "unbindable"

    @classmethod
    def from_findmnt(cls, entry: object) -> Mount:
        if not isinstance(entry, dict) or not isinstance(entry.get("target"), str):
            raise ValueError(f"a mount without a target: {entry!r}")
        return cls(
            target=Path(entry["target"]),
            source=str(entry.get("source") or ""),
            propagation=frozenset(str(entry.get("propagation") or "").split(",")) - {""},
        )


def parse_findmnt(text: str) -> tuple[Mount, ...]:
    """The mounts of `findmnt --json` output, in its order (a mount before its submounts)."""
    try:
        filesystems = json.loads(text)["filesystems"]
        return tuple(Mount.from_findmnt(f) for f in filesystems)
    except (ValueError, KeyError, TypeError) as e:
        raise DriverError(f"Could not read the mount table from findmnt: {e}.") from e


def _findmnt(*args: str | Path) -> tuple[Mount, ...]:
    cmd = ["findmnt", "--json", "--output", "TARGET,SOURCE,PROPAGATION", *args]
    result = run(cmd, timeout=TOOL_TIMEOUT, check=False)
    if result.returncode == 1 and not result.stdout.strip():
        return ()  # findmnt's "nothing found"
    if result.returncode != 0:
        raise RunError(cmd, result.returncode, result.stderr)
    return parse_findmnt(result.stdout)


def mount_table(tab_file: Path | None = None) -> tuple[Mount, ...]:
    """Every mount of this mount namespace (or of a mountinfo-format `tab_file`)."""
    return _findmnt("--list", *(() if tab_file is None else ("--tab-file", tab_file)))


def mount_holding(path: Path, table: Sequence[Mount]) -> Mount | None:
    """The mount of `table` (`mount_table`) that `path` (absolute, links resolved) is on:
    the deepest mount point at or above it, the last one mounted there when several are.
    Unlike `holding_mount`, `path` need not exist here (`table` may be another's)."""
    found = None
    for m in table:
        if is_under(path, m.target) and (
            found is None or len(m.target.parts) >= len(found.target.parts)
        ):
            found = m
    return found


def is_under(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


MOUNTINFO = Path("/proc/self/mountinfo")


def _unescape(field: bytes) -> str:
    """A mountinfo path: the kernel writes space, tab, newline and backslash as \\ooo."""
    return os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), field))


def is_mount_point(path: Path, mountinfo: Path = MOUNTINFO) -> bool:
    """Whether `path` (links resolved) is a mount point of this mount namespace (or of the
    mountinfo-format file `mountinfo`): its fifth field, proc(5)."""
    resolved = os.fspath(path.resolve())
    try:
        with mountinfo.open("rb") as f:
            return any(_unescape(line.split(b" ", 5)[4]) == resolved for line in f)
    except (OSError, IndexError) as e:
        raise DriverError(f"Could not read the mount table {mountinfo}: {e}.") from e


def holding_mount(path: Path) -> Mount:
    """The mount that `path` is on."""
    found = _findmnt("--target", path)
    if not found:
        raise DriverError(f"findmnt found no mount that holds {path}.")
    return found[0]


# <linux/mount.h>
MS_BIND = 0x1000
MS_REC = 0x4000
MS_UNBINDABLE = 1 << 17
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MNT_DETACH = 2
PROPAGATION = {
    "shared": MS_SHARED,
    "slave": MS_SLAVE,
    "private": MS_PRIVATE,
    "unbindable": MS_UNBINDABLE,
}


def _system_call(name: str, what: str, *args: bytes | int | None) -> None:
    """mount(2) or umount2(2) of libc; a failure is a DriverError that says `what` failed."""
    import ctypes  # only where a mount is changed (not `status`)

    libc = ctypes.CDLL(None, use_errno=True)
    call = getattr(libc, name)
    text = ctypes.c_char_p
    call.argtypes = {
        "mount": (text, text, text, ctypes.c_ulong, ctypes.c_void_p),
        "umount2": (text, ctypes.c_int),
    }[name]
    call.restype = ctypes.c_int
    if call(*args) != 0:
        errno = ctypes.get_errno()
        denied = errno in (EPERM, EACCES)
        raise DriverError(
            f"Could not {what}: {os.strerror(errno)}.",
            hint="Mounting needs CAP_SYS_ADMIN: run the container privileged, with the "
            "documented mounts (docs/paths.md)."
            if denied
            else None,
        )


def set_propagation(where: Path, kind: str) -> None:
    """`mount --make-<kind> where`: shared, slave, private, unbindable, or their r-forms."""
    recursive = kind.startswith("r") and kind[1:] in PROPAGATION
    flags = PROPAGATION[kind[1:] if recursive else kind] | (MS_REC if recursive else 0)
    _system_call("mount", f"make {where} {kind}", None, os.fsencode(where), None, flags, None)


# --- mounts ---------------------------------------------------------------------------------


def _umount(where: Path, *, recursive: bool = False) -> None:
    if recursive:
        # A recursive bind starts out a peer of its source's mounts: unmounting its
        # submounts then would unmount the source's. As a slave it is safe to take apart.
        with contextlib.suppress(DriverError):
            set_propagation(where, "rslave")
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

    `recursive` unmounts submounts too (for `--rbind`), as a slave: the unmount
    never propagates. `where` is made a directory unless it is a file (a file's bind).
    """
    if not where.is_file():
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


@contextlib.contextmanager
def private_tree(directory: Path) -> Iterator[Path]:
    """Make `directory` a private mount (bound onto itself): mounts below do not propagate.

    Refused on a shared mount: the bind itself would propagate to its peers (the host,
    for a `Bidirectional` volume) and outlive us there.
    """
    holder = holding_mount(directory)
    if "shared" in holder.propagation:
        raise DriverError(
            f"The work directory {directory} is on a shared mount ({holder.target}): mounts "
            "made there would propagate to other mount namespaces, the host's among them.",
            hint="Use a work directory on a private mount (the container's own file system), "
            "or run the build in a mount namespace of its own "
            "(unshare --mount --propagation slave).",
        )
    with mount(directory, directory, flags=["--bind"], recursive=True):
        set_propagation(directory, "private")
        yield directory


@contextlib.contextmanager
def bind(source: Path, target: Path, *, read_only: bool = False) -> Iterator[Path]:
    """A recursive bind of `source` at `target`; a slave, so unmounting never propagates back."""
    if not source.exists():
        raise DriverError(f"Cannot bind {source} at {target}: it does not exist.")
    if source.is_dir():
        target.mkdir(parents=True, exist_ok=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.touch(exist_ok=True)
    with mount(source, target, flags=["--rbind"], recursive=True):
        set_propagation(target, "rslave")
        if read_only:
            run(["mount", "-o", "remount,bind,ro", target], timeout=TOOL_TIMEOUT)
        yield target


def unmount_tree(where: Path) -> None:
    """Unmount `where` and everything below it, if mounted; lazily, so that processes that
    use it keep their view, and as a peer, so that the unmount propagates where the mount did."""
    if is_mount_point(where):
        log.info("Unmounting %s", where)
        # Detached with every mount below it; the unmount propagates to the peers of each
        # (umount2(2): `umount --recursive --lazy`).
        _system_call("umount2", f"unmount {where}", os.fsencode(where), MNT_DETACH)


@contextlib.contextmanager
def propagated_bind(source: Path, target: Path, *, keep: bool = False) -> Iterator[Path]:
    """A recursive bind of `source` at `target` that propagates to the peers of the mount
    `target` is on (the host, through a shared volume), and is unmounted from them on exit
    (with `keep`: only when the block fails)."""
    target.mkdir(parents=True, exist_ok=True)

    def attach() -> Path:
        log.info("Binding %s at %s", source, target)
        _system_call(
            "mount",
            f"bind {source} at {target}",
            os.fsencode(source),
            os.fsencode(target),
            None,
            MS_BIND | MS_REC,
            None,
        )
        return target

    with _acquired(attach, unmount_tree, "unmount", keep=keep):
        yield target


def _overlay_path(path: Path) -> str:
    text = os.fspath(path)
    if any(c in text for c in ",:\\\n"):
        raise DriverError(f"{text} cannot be used in overlay options: pick a simpler path.")
    return text


@contextlib.contextmanager
def overlay(
    lower: Path, where: Path, *, scratch: Path, tmpfs_size: str | None = None
) -> Iterator[Path]:
    """A writable view of `lower` at `where`; writes go to `scratch` and vanish on exit.

    By default `scratch` is a new directory on the file system that holds it (a disk: a
    build's gigabytes never take the node's memory), removed after the unmount; with
    `tmpfs_size`, a tmpfs of that size mounted there.
    """
    with contextlib.ExitStack() as stack:
        if tmpfs_size is not None:
            stack.enter_context(
                mount("tmpfs", scratch, fstype="tmpfs", options=[f"size={tmpfs_size}"])
            )
        else:  # removed after the unmount (a killed run's: by `cleanup_stale`'s caller)
            import shutil  # with its compression modules: off the start path

            scratch.mkdir(parents=True)
            stack.callback(shutil.rmtree, scratch, ignore_errors=True)
        upper, work = scratch / "upper", scratch / "work"
        upper.mkdir()
        work.mkdir()
        options = [
            f"lowerdir={_overlay_path(lower)}",
            f"upperdir={_overlay_path(upper)}",
            f"workdir={_overlay_path(work)}",
        ]
        yield stack.enter_context(mount("overlay", where, fstype="overlay", options=options))


# --- what a killed run left -----------------------------------------------------------------


def _try(cmd: Sequence[str | Path], what: str) -> bool:
    try:
        run(cmd, timeout=TOOL_TIMEOUT)
    except RunError as e:
        log.warning("Could not %s: %s", what, e)
        return False
    return True


def unmount_under(directory: Path) -> None:
    """Unmount every mount at or below `directory`, newest first (submounts before the
    mounts they sit on), each made a slave first so that nothing propagates."""
    directory = directory.resolve()
    ours = [m.target for m in reversed(mount_table()) if is_under(m.target, directory)]
    for target in ours:  # a bind left a peer of the host's mounts must not unmount those
        try:
            set_propagation(target, "rslave")
        except DriverError as e:  # "Could not make TARGET rslave: REASON."
            log.warning("%s", e.message)
    for target in ours:
        log.info("Unmounting %s, left over by an interrupted run", target)
        if not _try(["umount", target], f"unmount {target}"):
            _try(["umount", "--lazy", target], f"lazily unmount {target}")


def detach_loops_backed_by(directory: Path) -> None:
    """Detach the loop devices whose backing file is under `directory`, unless mounted."""
    directory = directory.resolve()
    in_use = {m.source for m in mount_table()}
    for device in loop_devices():
        if not device.backed_by_file_under(directory):
            continue
        if device.name in in_use:
            log.info("Leaving %s attached: it is mounted", device.name)
            continue
        log.info(
            "Detaching %s (%s), left over by an interrupted run", device.name, device.back_file
        )
        _try(["losetup", "--detach", device.name], f"detach {device.name}")
