"""The driver's daemons: started after the modules load, stopped before they unload.

nvidia-persistenced here; nv-fabricmanager and nvlsm (fabric.py) by the same rules.
Each daemon forks into the background and writes its pid file; it is stopped
by that pid file (SIGTERM, then up to 5 s for it to go), so a daemon that a
killed run left behind is found and stopped as well.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

from nvdriver.config import Config
from nvdriver.errors import BusyError, DriverError
from nvdriver.host import read_optional
from nvdriver.run import PathLike, run, which

log = logging.getLogger(__name__)

PERSISTENCED = "nvidia-persistenced"
# Where the daemon writes its pid: its own fixed path in the container's file system
# (never under HOST_ROOT, nor CONTAINER_ROOT: the daemon knows neither). Tests patch it.
PERSISTENCED_PID = Path("/var/run/nvidia-persistenced/nvidia-persistenced.pid")
STOP_TIMEOUT = 5.0
START_TIMEOUT = 30.0
POLL = 0.1


def _alive(config: Config, pid: int) -> bool:
    """Whether `pid` runs (a zombie does not count: it has exited)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = config.host(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    # "pid (comm) S ...": the state follows the last ')'.
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def running_pid(config: Config, pidfile: Path) -> int | None:
    """The pid in `pidfile` when that process is alive (never ours, never init)."""
    text = read_optional(pidfile)
    if not text or not text.isdigit():
        return None
    pid = int(text)
    if pid <= 1 or pid == os.getpid() or not _alive(config, pid):
        return None
    return pid


class Daemon(NamedTuple):
    """A daemon that forks into the background and writes its pid file at a path it fixes
    (nvidia-persistenced, nv-fabricmanager, nvlsm): found, and stopped, by that file."""

    name: str
    pidfile: Path


def start_daemon(config: Config, daemon: Daemon, argv: Sequence[PathLike]) -> int | None:
    """Run `argv`, which forks the daemon, unless it runs already; its pid, once its pid
    file names a live process (None, with a warning, when none did within 5 s)."""
    if (pid := running_pid(config, daemon.pidfile)) is not None:
        log.info("%s is already running (pid %d)", daemon.name, pid)
        return pid
    log.info("Starting %s", daemon.name)
    run(argv, timeout=START_TIMEOUT)
    deadline = time.monotonic() + STOP_TIMEOUT
    while (pid := running_pid(config, daemon.pidfile)) is None and time.monotonic() < deadline:
        time.sleep(POLL)
    if pid is None:
        log.warning("%s started but wrote no pid file %s", daemon.name, daemon.pidfile)
    else:
        log.info("%s runs as pid %d", daemon.name, pid)
    return pid


def stop_daemon(config: Config, daemon: Daemon) -> None:
    """SIGTERM the daemon of the pid file and wait up to 5 s for it to exit."""
    pidfile = daemon.pidfile
    pid = running_pid(config, pidfile)
    if pid is not None:
        log.info("Stopping %s (pid %d)", daemon.name, pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while _alive(config, pid):
            if time.monotonic() >= deadline:
                raise DriverError(
                    f"{daemon.name} (pid {pid}) did not exit within {STOP_TIMEOUT:g} s "
                    "of SIGTERM; the driver stays loaded.",
                    hint=f"See why it hangs (its log), kill it (kill -9 {pid}) and run "
                    "`nvidia-driver unload`.",
                )
            time.sleep(POLL)
    try:
        pidfile.unlink()
    except FileNotFoundError:
        pass
    except OSError as e:  # not ours to fix here: the daemon is stopped, that is what counts
        log.warning("Could not remove the pid file %s: %s", pidfile, e.strerror)


@contextlib.contextmanager
def running(
    config: Config, daemon: Daemon, start: Callable[[], object], *, keep: bool = False
) -> Iterator[None]:
    """`daemon`, started by `start()`, for the duration of a `with` block.

    Leaving the block normally (a shutdown) stops the daemon, unless `keep` (`load`
    leaves it to `unload`); leaving it with an error stops it only if this block
    started it (a restart adopts a running one), and never for a BusyError: a driver in
    use keeps its daemons.
    """
    adopted = running_pid(config, daemon.pidfile) is not None
    try:
        start()
        yield
    except BusyError:
        log.warning("The driver is in use: leaving %s running", daemon.name)
        raise
    except BaseException:
        if not adopted:
            try:
                stop_daemon(config, daemon)
            except DriverError as e:
                log.error("%s", e)
        raise
    if not keep:
        stop_daemon(config, daemon)


def _persistenced() -> Daemon:
    return Daemon(PERSISTENCED, PERSISTENCED_PID)  # read at each call: tests patch the path


def start_persistenced(config: Config) -> bool:
    """Start nvidia-persistenced unless it runs; False when it is not installed."""
    binary = which(PERSISTENCED)
    if binary is None and running_pid(config, PERSISTENCED_PID) is None:
        log.info("%s is not installed; running without it", PERSISTENCED)
        return False
    start_daemon(config, _persistenced(), [binary or PERSISTENCED, "--persistence-mode"])
    return True


def stop_persistenced(config: Config) -> None:
    """SIGTERM the daemon of the pid file and wait up to 5 s for it to exit."""
    stop_daemon(config, _persistenced())


def persistenced(config: Config) -> contextlib.AbstractContextManager[None]:
    """nvidia-persistenced for the duration of a `with` block (see `running`)."""
    return running(config, _persistenced(), lambda: start_persistenced(config))
