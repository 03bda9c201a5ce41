"""The instance lock: one `init` (or load/unload) at a time, and who holds it.

/run/nvidia/nvidia-driver.pid is flock'ed and holds the holder's pid. The
kernel drops a flock when its holder dies, so a killed run leaves at most a
file with a stale pid that the next run simply takes over. `update` does not
take the lock: while an instance runs, it sends its log lines to that
instance's output too (as the seed's `tee` did), so they show in its log.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from nvdriver import log as logsetup
from nvdriver.config import Config
from nvdriver.errors import AlreadyRunningError, DriverError
from nvdriver.host import read_optional

log = logging.getLogger(__name__)

LOCK_FILE = "/run/nvidia/nvidia-driver.pid"


def _read_pid(path: Path) -> int | None:
    text = read_optional(path)
    return int(text) if text and text.isdigit() else None


@contextlib.contextmanager
def instance_lock(config: Config) -> Iterator[Path]:
    """Hold the instance lock for a `with` block; AlreadyRunningError (exit 4) if taken."""
    path = config.host(LOCK_FILE)
    while True:
        fd = _open_lock(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            pid = holder(config)
            raise AlreadyRunningError(
                f"Another nvidia-driver instance{f' (pid {pid})' if pid else ''} "
                f"holds the lock {path}.",
                hint="Only one may run: stop that one first (SIGTERM unloads the driver "
                "cleanly), or leave it running.",
            ) from None
        # The holder before us may have removed the file between our open and flock:
        # then we hold a lock on a file nobody else sees; take the new one instead.
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as e:  # the flock holds; only the pid for others to read is missing
            log.warning("Could not write our pid into the lock file %s: %s", path, e.strerror)
        log.debug("Holding the lock %s", path)
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.close(fd)


def _open_lock(path: Path) -> int:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise DriverError(
            f"Cannot create the instance lock {path}: {e.strerror}.",
            hint="/run/nvidia must be a writable directory shared with the host "
            "(mounted from the host's /run/nvidia).",
        ) from e


def holder(config: Config) -> int | None:
    """The pid of the process holding the instance lock, or None when nobody does.

    Read from /proc/locks (the lock file's device and inode) rather than by
    trying the lock: trying would make an `init` starting at that moment fail.
    """
    path = config.host(LOCK_FILE)
    try:
        st = path.stat()
        table = config.host("/proc/locks").read_text()
    except OSError:
        return None
    wanted = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in table.splitlines():
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:2146369 0 EOF"; waiters have "->" after "1:".
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == wanted:
            return int(fields[4]) if fields[4].isdigit() else _read_pid(path)
    return None


def _is_our_stderr(path: Path) -> bool:
    """Whether `path` (another process's output) is the file our stderr writes to."""
    try:
        theirs, ours = os.stat(path), os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):  # a stderr without a file descriptor (a test's capture)
        return False
    return (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)


@contextlib.contextmanager
def mirror_to_running_instance(config: Config) -> Iterator[int | None]:
    """While a `with` block runs, also send our log lines to the running instance's log.

    Yields the instance's pid, or None when none runs (or its output cannot be opened).
    A child of the instance (its build ahead, watch.py) writes to that output already:
    its lines are not sent twice.
    """
    pid = holder(config)
    if pid is None or pid == os.getpid():
        yield None
        return
    output = config.host(f"/proc/{pid}/fd/2")
    if _is_our_stderr(output):
        yield pid
        return
    try:
        stream = open(output, "a", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115
    except OSError as e:
        log.debug("Cannot write to the log of the running instance (pid %d): %s", pid, e)
        yield None
        return
    handler = logsetup.add_stream(stream)
    log.info("Sending this command's log to the running nvidia-driver instance (pid %d) too", pid)
    try:
        yield pid
    finally:
        logging.getLogger(logsetup.LOGGER_NAME).removeHandler(handler)
        with contextlib.suppress(OSError):
            stream.close()
