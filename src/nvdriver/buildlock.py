"""The build lock (one build at a time per cache) and what killed builds left.

Apart from builder.py, which compiles: `init` and `load` sweep a dead build's work dirs
and temp packages at each start, and must not load the compiler's world to do it
(issue 22: the start path imports what it calls, nothing more).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from nvdriver.config import Config
from nvdriver.driver.package import stores
from nvdriver.errors import DriverError

log = logging.getLogger(__name__)


def work_base(config: Config) -> Path:
    return config.cache_dir / "work"


@contextlib.contextmanager
def workdir(config: Config, purpose: str) -> Iterator[Path]:
    """A scratch directory under the cache (host disk, not the container's layer)."""
    import tempfile  # with `random`: a start only sweeps (remove_stale_builds)

    base = work_base(config)
    base.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"{purpose}-{os.getpid()}-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _open_lock(config: Config) -> IO[str]:
    """The build lock's file; an unusable cache is the user's to fix (NVIDIA_DRIVER_CACHE)."""
    try:
        config.cache_dir.mkdir(parents=True, exist_ok=True)
        return (config.cache_dir / "build.lock").open("w")
    except OSError as e:
        raise DriverError(
            f"Cannot use the cache directory {config.cache_dir} (NVIDIA_DRIVER_CACHE): "
            f"{e.strerror}.",
            hint="Point NVIDIA_DRIVER_CACHE at a writable directory on the node's disk.",
        ) from e


@contextlib.contextmanager
def _lock(config: Config, *, wait: bool) -> Iterator[bool]:
    """Hold the build lock for a `with` block; without `wait`, yield False if it is taken."""
    with _open_lock(config) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                yield False
                return
            log.info("Another build is running with the cache %s; waiting for it", config.cache_dir)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield True


@contextlib.contextmanager
def build_lock(config: Config) -> Iterator[None]:
    """One build at a time per cache: a second `update` waits (two builds would only
    thrash the node). The lock also guards what builds share: the work dirs under the
    cache and the temporary package files of the store; only its holder removes them."""
    with _lock(config, wait=True):
        yield


def remove_stale_locked(config: Config) -> None:
    """Undo what killed builds left: temp packages, mounts and loop devices of the work
    dirs, the dirs. Only under the build lock: then every one of them belongs to a dead run.
    """
    for store in stores(config):
        store.remove_temp_files()
    base = work_base(config)
    for d in base.iterdir() if base.is_dir() else []:
        if d.is_dir():
            from nvdriver.flatcar import image  # mounts, loop devices: only after a killed build

            image.cleanup_stale(d, backing_dir=config.cache_dir)
            shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def builds_idle(config: Config) -> Iterator[bool]:
    """Hold the build lock for a `with` block unless a build holds it; yield whether held.

    Whoever wants to remove build leftovers outside a build (`init`, `load`, `packages
    prune`) does it only when this yields True: a running build owns the work dirs and
    temp files, and if it dies the next build, which takes the lock first, removes them.
    Nothing is waited for: a start must not wait for a build it may not need.
    """
    with contextlib.ExitStack() as stack:
        try:
            held = stack.enter_context(_lock(config, wait=False))
        except DriverError as e:  # a read-only cache: no build can run with it either
            log.debug("Not cleaning up after old builds: %s", e)
            held = False
        else:
            if not held:
                log.info(
                    "A build is running with the cache %s; leaving its files", config.cache_dir
                )
        yield held


def remove_stale_builds(config: Config) -> None:
    """What killed builds left, removed unless a build is running (see `builds_idle`)."""
    with builds_idle(config) as idle:
        if idle:
            remove_stale_locked(config)
