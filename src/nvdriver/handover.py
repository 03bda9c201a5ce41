"""A loaded driver in use that `init` must replace: wait until it is free, never break it.

Changing the image to another driver version (or flavour) on a node with GPU work running
finds the old driver loaded and in use. Unloading it is impossible without ending that
work, and exiting would only crash-loop the container (a DaemonSet restarts it) while the
old driver's daemons are gone. So `init` checks "in use" before it stops anything, and
while the driver is in use it waits: readiness stays absent, the old daemons keep running,
a line every LOG_EVERY seconds names who holds the driver (kmod/users.py), and the wait
is recorded in WAIT_FILE for `status`. Once nobody but our daemons holds it, the caller
swaps (stops the daemons, unloads, loads the new driver). DRIVER_BUSY_TIMEOUT bounds the
wait (then exit 3, nothing stopped); a signal ends it like any other step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

from nvdriver import daemons, fabric, signals
from nvdriver.atomic import write_atomically
from nvdriver.config import Config
from nvdriver.errors import BusyError
from nvdriver.host import read_optional
from nvdriver.kmod.loaded import LoadedModule, loaded_modules
from nvdriver.kmod.unloading import UNLOAD_ORDER
from nvdriver.kmod.users import Users, driver_users

log = logging.getLogger(__name__)

# What a waiting `init` waits for (JSON), on the host's shared /run/nvidia: `status` reads it.
WAIT_FILE = "/run/nvidia/nvidia-driver.waiting"
# Seconds between two looks at the driver's refcounts, and between two log lines (each
# naming the users: a look at every process's open files).
POLL = 2.0
LOG_EVERY = 60.0
# A module attribute, so that a test can run the wait on a virtual clock.
clock = time.monotonic


def _our_daemons(config: Config) -> set[int]:
    """The pids of the daemons that go before an unload (they hold the driver themselves)."""
    pidfiles = (daemons.PERSISTENCED_PID, fabric.FM_PID, fabric.NVLSM_PID)
    return {p for f in pidfiles if (p := daemons.running_pid(config, f)) is not None}


def users(config: Config, loaded: list[LoadedModule]) -> Users:
    """Who holds `loaded`, our daemons apart."""
    return driver_users(config, loaded, ours=_our_daemons(config))


def _version(loaded: list[LoadedModule]) -> str:
    return next((m.version for m in loaded if m.name == "nvidia" and m.version), "?")


@contextlib.contextmanager
def _recorded(config: Config, record: dict[str, Any]) -> Iterator[None]:
    path = config.host(WAIT_FILE)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(record).encode())
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def read_record(config: Config) -> dict[str, Any] | None:
    """What the running `init` waits for (WAIT_FILE), or None when it does not wait."""
    text = read_optional(config.host(WAIT_FILE))
    try:
        record = json.loads(text) if text else None
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def wait_until_free(config: Config, wanted: str, *, wait: bool = True) -> None:
    """Return once nobody but our daemons holds the loaded driver (at once when nobody
    does); BusyError (exit 3) when DRIVER_BUSY_TIMEOUT passes first, or at once without
    `wait`, having stopped nothing. `wanted`: what replaces it, for people."""
    loaded = loaded_modules(config, UNLOAD_ORDER)
    now = users(config, loaded)
    if not now.busy:
        return
    bound = config.options.busy_timeout if wait else 0
    old = _version(loaded)
    if bound == 0:
        why = "DRIVER_BUSY_TIMEOUT=0: not waiting" if wait else "`load` does not wait"
        raise _busy(old, wanted, now, why)
    started, wall = clock(), time.time()
    record = {
        "pid": os.getpid(),
        "loaded": old,
        "wanted": wanted,
        "since": int(wall),
        "until": None if bound is None else int(wall + bound),
    }
    with _recorded(config, record):
        next_log = started
        while True:
            waited = clock() - started
            if bound is not None and waited >= bound:
                now = users(config, loaded)
                raise _busy(old, wanted, now, f"waited {waited:.0f} s (DRIVER_BUSY_TIMEOUT)")
            if clock() >= next_log:
                log.warning(
                    "The loaded NVIDIA driver %s is in use; waiting (%.0f s so far%s) for it "
                    "to be free before replacing it with %s, its daemons left running. "
                    "Held by: %s",
                    old,
                    waited,
                    f", at most {bound:g} s" if bound is not None else ", no bound",
                    wanted,
                    now,
                )
                next_log += LOG_EVERY
            left = None if bound is None else bound - waited
            signals.sleep(POLL if left is None else max(0.0, min(POLL, left)))
            looked, loaded = loaded, loaded_modules(config, UNLOAD_ORDER)
            # Every process's open files are read again only when the modules changed (a
            # user that closes its files drops references), and for each log line.
            if loaded != looked or clock() >= next_log:
                now = users(config, loaded)
                if not now.busy:
                    log.info(
                        "The NVIDIA driver %s is free after %.0f s; replacing it with %s",
                        old,
                        clock() - started,
                        wanted,
                    )
                    return


def check_free(config: Config) -> None:
    """BusyError (exit 3) when anything but our daemons holds the loaded driver: checked at
    a stop before any daemon stops, so that a driver in use keeps its daemons. The fabric
    manager's stop aborts running CUDA jobs on HGX A100 and fails new launches on later
    boards (docs/fabric-manager.md); persistenced's lets the GPUs' state go."""
    loaded = loaded_modules(config, UNLOAD_ORDER)
    now = users(config, loaded)
    if now.busy:
        raise BusyError(
            f"The NVIDIA driver is in use, nothing was stopped or unloaded (its daemons keep "
            f"running): {_version(loaded)} held by {now}.",
            hint="Stop the GPU work (processes with /dev/nvidia* open, modules using nvidia), "
            "then stop again; Kubernetes: cordon the node and drain or delete its GPU pods.",
        )


def _busy(old: str, wanted: str, now: Users, why: str) -> BusyError:
    return BusyError(
        f"The loaded NVIDIA driver {old} is in use and {why}; it was not replaced with "
        f"{wanted}, and nothing was stopped. Held by: {now}.",
        hint="Stop the GPU work first (Kubernetes: cordon the node and drain or delete its "
        "GPU pods), or raise DRIVER_BUSY_TIMEOUT (`none`: wait until the driver is free).",
    )
