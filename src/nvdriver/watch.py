"""Keeping a node ahead of Flatcar updates while `init` waits.

`init` has nothing to do once the driver is up but wait for its signal; meanwhile
it builds the package for the node's next Flatcar release into the node's store,
so that the reboot into that release finds it and loads without a compile:

* every BUILD_AHEAD_INTERVAL seconds (the first time after a random delay in
  [0, interval), then interval * uniform(0.8, 1.2): a fleet started together does
  not ask the releases feed at once) a child `nvidia-driver update --store node
  --next` builds for the newest release of the node's channel;
* every BUILD_AHEAD_STAGED_POLL seconds update_engine is asked (staged.py); a
  release it has staged for the reboot is built at once, `update --store node
  --flatcar-version=V`, once per release (a failed build is tried again after the
  next interval).

In `init` rather than in a second container: this process holds the instance
lock, knows the loaded driver and has the node's mounts; a second container would
need the same privileges and mounts a second time, and Flatcar without Kubernetes
gets it from the one unit.

The child runs at the lowest CPU and I/O priority (`ionice -c 3` idle class,
`nice -n 19`) with -m BUILD_AHEAD_THREADS build jobs, so that it never competes
with GPU work, and its output goes to init's log. It never touches the loaded
driver: `update` builds and packs, it loads nothing. A failed child is logged,
never fatal. The signals of nvdriver.signals still end the wait: a sleep is
cut short by them, and a running child is terminated first (SIGTERM to its process
group; `update` removes its mounts on the way out) and waited for.
"""

from __future__ import annotations

import logging
import random
import sys
import time
from typing import NoReturn

from nvdriver import fleet, run, signals, staged
from nvdriver.config import Config
from nvdriver.errors import DriverError, Interrupted
from nvdriver.flatcar import release

log = logging.getLogger(__name__)

# Seconds a child `update` gets to clean up (unmount its developer container, remove its
# work directory) after SIGTERM before it is killed; part of init's stop budget.
CHILD_STOP_TIMEOUT = 60.0
# The wrappers that lower the child's priority: util-linux's ionice (the idle I/O class:
# disk time only when no one else wants it) and coreutils' nice.
LOW_PRIORITY = ("ionice", "-c", "3", "nice", "-n", "19")


def enabled(config: Config) -> bool:
    """BUILD_AHEAD: on, off, or auto (on when the host is Flatcar)."""
    mode = config.options.build_ahead
    if mode != "auto":
        return mode == "on"
    try:
        return release.host_version(config) is not None
    except DriverError as e:  # a malformed release file: no reason to stop a loaded driver
        log.warning("%s Not building ahead (BUILD_AHEAD=auto).", e.message)
        return False


def update_command(config: Config, *args: str) -> list[str]:
    """The child's command line: `nvidia-driver update --store node ARGS -m N` at low
    priority, run with our own interpreter (the image's venv) unless a test stands in."""
    options = config.options
    program = options.hooks.build_ahead_command or (sys.executable, "-m", "nvdriver.cli")
    debug = ("--debug",) if config.debug else ()
    return [
        *LOW_PRIORITY,
        *program,
        "update",
        *debug,
        "--store",
        "node",
        *args,
        "-m",
        str(options.build_ahead_threads),
    ]


def build(config: Config, *args: str) -> bool:
    """Run one build ahead to its end; whether it succeeded. A signal terminates the
    child (run.spawn) and goes on to the caller."""
    argv = update_command(config, *args)
    log.info("Building ahead: %s", " ".join(args))
    started = time.monotonic()
    try:
        # Our own program: it reads its settings from the environment ours came from.
        with run.spawn(
            argv,
            env=config.environment,
            process_group=True,
            terminate_timeout=CHILD_STOP_TIMEOUT,
        ) as child:
            try:
                status = child.wait()
            except Interrupted:  # spawn terminates it on the way out, and waits
                log.info("Stopping the build ahead (pid %d) first", child.pid)
                raise
    except run.RunError as e:  # ionice, nice or the program missing
        log.error("Building ahead could not start: %s", e.message)
        return False
    seconds = time.monotonic() - started
    if status != 0:
        log.error(
            "Building ahead (%s) failed with status %d after %.0f s; trying again later",
            " ".join(args),
            status,
            seconds,
        )
        return False
    log.info("Built ahead (%s) in %.0f s", " ".join(args), seconds)
    return True


def staged_built(config: Config, version: str) -> None:
    """After the package for the release update_engine staged was built: say so, and let
    the next-release record say where the release was learnt."""
    fleet.learnt_from(config, version, "update_engine")
    log.info("The package for the staged Flatcar %s is ready for the reboot", version)


class Watcher:
    """The schedule of the builds ahead; `run` never returns (a signal ends it)."""

    def __init__(
        self,
        config: Config,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.interval = config.options.build_ahead_interval
        self.staged_poll = config.options.build_ahead_staged_poll
        self.rng = rng or random.Random()
        self.update_engine = staged.UpdateEngine(config)
        self.handled: set[str] = set()  # staged releases built (or refused): not again
        self.retry_at: dict[str, float] = {}

    def first_delay(self) -> float:
        """Seconds before the first feed-driven build: in [0, interval)."""
        return self.rng.random() * self.interval

    def next_delay(self) -> float:
        """Seconds between two feed-driven builds: interval * uniform(0.8, 1.2)."""
        return self.interval * self.rng.uniform(0.8, 1.2)

    def run(self) -> NoReturn:
        now = time.monotonic()
        feed_at = now + self.first_delay()
        staged_at = now
        log.info(
            "Building ahead for the next Flatcar release: first look at the releases feed "
            "in %.0f s, then about every %g s; update_engine every %g s",
            feed_at - now,
            self.interval,
            self.staged_poll,
        )
        while True:
            now = time.monotonic()
            if now >= staged_at:
                staged_at = now + self.staged_poll
                self._staged(now)
            if now >= feed_at:
                build(self.config, "--next")
                feed_at = time.monotonic() + self.next_delay()
            signals.sleep(max(0.0, min(feed_at, staged_at) - time.monotonic()))

    def _staged(self, now: float) -> None:
        version = self.update_engine.staged()
        if version is None or version in self.handled or now < self.retry_at.get(version, now):
            return
        if not release.VERSION_RE.match(version):  # the host's word, into a command line
            log.warning(
                "update_engine staged %r, which is not a Flatcar version; ignoring it", version
            )
            self.handled.add(version)
            return
        log.info("Flatcar %s is staged for the next boot (update_engine)", version)
        if build(self.config, f"--flatcar-version={version}"):
            self.handled.add(version)
            self.retry_at.pop(version, None)
            staged_built(self.config, version)
        else:
            self.retry_at[version] = time.monotonic() + self.next_delay()


def wait(config: Config) -> NoReturn:
    """init's wait: build ahead when BUILD_AHEAD says so, else only wait for a signal."""
    if not enabled(config):
        log.info(
            "Not building ahead (BUILD_AHEAD=%s%s)",
            config.options.build_ahead,
            ": the host is not Flatcar" if config.options.build_ahead == "auto" else "",
        )
        while True:
            signals.sleep()
    Watcher(config).run()
