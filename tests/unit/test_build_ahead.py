"""Building ahead while `init` waits: update_engine's staged release read over a real
system bus (dbus-daemon), and the watcher's low-priority child builds.

What cannot exist here is update_engine (Flatcar's): a stand-in service on the real bus
answers GetStatus (tests/buildahead.py). The build's child is a stand-in for
`nvidia-driver update` (NVIDIA_DRIVER_TEST_BUILD_AHEAD_COMMAND) that records how it was
started; the real `update --next` / `--flatcar-version` are tested with the releases
themselves. `init` cannot reach its wait on this machine (it loads kernel modules), so
the watcher's loop runs as `init` runs it: signals installed, settings from the
environment, in a process of its own that the test signals.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import logging
import os
import platform
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nvdriver import signals, staged, watch
from nvdriver.config import Config
from nvdriver.errors import ExitCode, Interrupted, UsageError
from nvdriver.flatcar import release
from tests.buildahead import (
    DENY_UPDATE_ENGINE,
    ROOT,
    UpdateEngine,
    read_records,
    short_root,
    system_bus,
    update_engine,
    wait_for,
)

STAGED = "4230.2.3"
# ioprio_get(2): IOPRIO_WHO_PROCESS, the class in the bits above IOPRIO_CLASS_SHIFT.
IOPRIO_GET = {"x86_64": 252, "aarch64": 31}
IOPRIO_WHO_PROCESS, IOPRIO_CLASS_SHIFT, IOPRIO_CLASS_IDLE = 1, 13, 3


@pytest.fixture
def host_root() -> Iterator[Path]:
    with short_root() as root:
        yield root


def config_for(root: Path, **env: str) -> Config:
    return Config.from_env({"HOST_ROOT": str(root), **env})


# --- staged.py: update_engine's status ---------------------------------------------------


def test_the_staged_release_is_read_from_update_engine_on_the_system_bus(
    host_root: Path,
) -> None:
    engine = staged.UpdateEngine(config_for(host_root))
    with update_engine(host_root) as service:
        status = engine.status()
        assert status is not None
        assert (status.current_operation, status.staged) == ("UPDATE_STATUS_IDLE", None)
        service.stage(STAGED)
        assert engine.status() == staged.Status(
            last_checked_time=1764640000,
            progress=1.0,
            current_operation="UPDATE_STATUS_UPDATED_NEED_REBOOT",
            new_version=STAGED,
            new_size=123456789,
        )
        assert engine.staged() == STAGED
        wait_for(lambda: service.calls == 3, "the service to count its answers")


def test_no_bus_no_update_engine_or_denied_is_none_with_the_reason_logged_once(
    host_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Not Flatcar, the mount missing, a policy that refuses us: never an error."""
    caplog.set_level(logging.DEBUG, logger="nvdriver")
    engine = staged.UpdateEngine(config_for(host_root))
    assert engine.staged() is None and engine.staged() is None
    infos = [r for r in caplog.records if r.levelno == logging.INFO]
    assert len(infos) == 1 and "system bus is not mounted at" in infos[0].getMessage()
    assert str(host_root / "run/dbus/system_bus_socket") in infos[0].getMessage()

    caplog.clear()
    with system_bus(host_root):  # a bus without update_engine: another system than Flatcar
        assert engine.staged() is None
    assert "org.freedesktop.DBus.Error.ServiceUnknown" in caplog.text

    caplog.clear()
    with (
        system_bus(host_root, extra_policy=DENY_UPDATE_ENGINE) as socket,
        contextlib.closing(UpdateEngine(socket, host_root / "state.json")),
    ):
        assert engine.staged() is None
    assert "org.freedesktop.DBus.Error.AccessDenied" in caplog.text

    caplog.clear()
    (host_root / "run/dbus/system_bus_socket").write_text("")  # not a socket
    assert engine.staged() is None
    assert "Connection refused" in caplog.text


# --- the settings -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "env",
    [
        {"BUILD_AHEAD": "sometimes"},
        {"BUILD_AHEAD_INTERVAL": "0"},
        {"BUILD_AHEAD_INTERVAL": "six hours"},
        {"BUILD_AHEAD_INTERVAL": "inf"},
        {"BUILD_AHEAD_STAGED_POLL": "-60"},
        {"BUILD_AHEAD_THREADS": "0"},
        {"BUILD_AHEAD_THREADS": "1.5"},
    ],
)
def test_a_malformed_build_ahead_setting_is_a_usage_error_naming_it(env: dict[str, str]) -> None:
    with pytest.raises(UsageError) as e:
        Config.from_env(env)
    assert e.value.exit_code == ExitCode.USAGE
    assert next(iter(env)) in e.value.message


@pytest.mark.parametrize(
    ("mode", "os_release", "expected"),
    [
        ("auto", "ID=flatcar\nVERSION=4230.2.2\n", True),
        ("auto", "ID=debian\nVERSION_ID=12\n", False),
        ("off", "ID=flatcar\nVERSION=4230.2.2\n", False),
        ("on", "ID=debian\nVERSION_ID=12\n", True),
        # A malformed version stops nothing: init keeps waiting, without building ahead.
        ("auto", "ID=flatcar\nVERSION=next\n", False),
    ],
)
def test_build_ahead_auto_is_on_where_the_host_is_flatcar(
    tmp_path: Path, mode: str, os_release: str, expected: bool
) -> None:
    (tmp_path / "host-etc").mkdir()
    (tmp_path / "host-etc" / "os-release").write_text(os_release)
    assert watch.enabled(config_for(tmp_path, BUILD_AHEAD=mode)) is expected


def test_a_signal_while_the_host_release_is_read_is_not_taken_for_a_bad_release_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM arriving during the read (the read stands in for the moment: signals are
    raised wherever Python is) goes on to init, which stops; it once became the warning
    of a malformed os-release, and init never stopped."""
    (tmp_path / "host-etc").mkdir()
    (tmp_path / "host-etc" / "os-release").write_text("ID=flatcar\nVERSION=4230.2.2\n")
    read = release.host_version

    def signalled(config: Config) -> str | None:
        os.kill(os.getpid(), signal.SIGTERM)
        return read(config)

    monkeypatch.setattr(release, "host_version", signalled)
    previous = {s: signal.getsignal(s) for s in signals.HANDLED}
    signals.install()
    try:
        with pytest.raises(Interrupted):
            watch.enabled(config_for(tmp_path, BUILD_AHEAD="auto"))
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def test_the_child_is_nvidia_driver_update_into_the_node_store_at_low_priority(
    tmp_path: Path,
) -> None:
    config = config_for(tmp_path, BUILD_AHEAD_THREADS="3")
    argv = watch.update_command(config, "--next")
    assert argv == [
        "ionice",
        "-c",
        "3",
        "nice",
        "-n",
        "19",
        sys.executable,
        "-m",
        "nvdriver.cli",
        "update",
        "--store",
        "node",
        "--next",
        "-m",
        "3",
    ]


# --- jitter -----------------------------------------------------------------------------


def test_the_first_build_comes_after_a_random_delay_and_then_about_every_interval(
    tmp_path: Path,
) -> None:
    """A fleet started at once must not ask the feed at once: the first delay is spread
    over [0, interval) by seed, later ones over interval * [0.8, 1.2]."""
    config = config_for(tmp_path, BUILD_AHEAD_INTERVAL="600")
    firsts = [watch.Watcher(config, rng=random.Random(seed)).first_delay() for seed in range(200)]
    assert all(0 <= d < 600 for d in firsts)
    assert len(set(firsts)) == 200
    assert min(firsts) < 60 and max(firsts) > 540  # spread over the interval
    later = [watch.Watcher(config, rng=random.Random(s)).next_delay() for s in range(200)]
    assert all(480 <= d <= 720 for d in later) and len(set(later)) == 200
    # Without a seed (as init makes it) two nodes draw differently.
    assert watch.Watcher(config).first_delay() != watch.Watcher(config).first_delay()


# --- the watcher's loop, as init runs it -------------------------------------------------


def _nice_of(pid: int) -> int:
    """/proc/PID/stat field 19 (after the parenthesised command name: the 17th)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[16])


def _ioprio_class(pid: int) -> int:
    number = IOPRIO_GET.get(platform.machine())
    if number is None:
        pytest.skip(f"ioprio_get's syscall number on {platform.machine()} is not known here")
    libc = ctypes.CDLL(None, use_errno=True)
    value = int(libc.syscall(number, IOPRIO_WHO_PROCESS, pid))
    assert value >= 0, os.strerror(ctypes.get_errno())
    return value >> IOPRIO_CLASS_SHIFT


class Watching:
    """The watcher process (python -m tests.buildahead watch SEED) and its children's
    records."""

    def __init__(self, root: Path, child: str, **settings: str) -> None:
        seed = settings.pop("SEED", "1")
        self.record = root / "children.jsonl"
        self.log = root / "watcher.log"
        env = {
            **os.environ,
            "HOST_ROOT": str(root),
            "BUILD_AHEAD": "on",
            "BUILD_AHEAD_STAGED_POLL": "0.2",
            "BUILD_AHEAD_THREADS": "1",
            "NVIDIA_DRIVER_TEST_BUILD_AHEAD_COMMAND": f"{sys.executable} -m tests.buildahead child",
            "BUILD_AHEAD_TEST_RECORD": str(self.record),
            "BUILD_AHEAD_TEST_CHILD": child,
            **settings,
        }
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.buildahead", "watch", seed],
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def children(self) -> list[dict[str, object]]:
        return [r for r in read_records(self.record) if "argv" in r]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=120)

    def text(self) -> str:
        return self.log.read_text()


@contextlib.contextmanager
def watching(root: Path, child: str, **settings: str) -> Iterator[Watching]:
    w = Watching(root, child, **settings)
    try:
        yield w
    finally:
        if w.proc.poll() is None:
            w.proc.kill()
            w.proc.wait()


def test_a_staged_update_starts_a_low_priority_build_at_once_and_sigterm_ends_it_first(
    host_root: Path,
) -> None:
    # Seed 1's first feed check is minutes away: only the staged update can start a build.
    assert random.Random(1).random() * 3600 > 300
    with (
        update_engine(host_root) as service,
        watching(host_root, "sleep", BUILD_AHEAD_INTERVAL="3600", SEED="1") as w,
    ):
        wait_for(lambda: service.calls >= 3, "the watcher to ask update_engine")
        assert w.children() == []  # IDLE: nothing to build
        service.stage(STAGED)
        staged_at = time.monotonic()
        wait_for(w.children, "the build's child")
        assert time.monotonic() - staged_at < 10  # at the next poll, not at the interval
        (child,) = w.children()
        assert child["argv"] == [
            "update",
            "--store",
            "node",
            f"--flatcar-version={STAGED}",
            "-m",
            "1",
        ]
        pid = child["pid"]
        assert isinstance(pid, int)
        assert _nice_of(pid) == 19
        assert _ioprio_class(pid) == IOPRIO_CLASS_IDLE
        # ... the child's only: the watcher (init) keeps its own.
        assert _nice_of(w.proc.pid) == os.nice(0)
        assert _ioprio_class(w.proc.pid) != IOPRIO_CLASS_IDLE

        assert w.stop() == 0
        # The child was told to stop (SIGTERM: it cleans up) and was waited for.
        assert [r["terminated"] for r in read_records(w.record) if "terminated" in r] == [15]
        assert not Path(f"/proc/{pid}").exists()
    assert "watcher: caught signal 15" in w.text()


def test_a_staged_release_is_built_once_and_a_failing_child_does_not_stop_the_watcher(
    host_root: Path,
) -> None:
    with update_engine(host_root) as service:
        service.stage(STAGED)
        with watching(host_root, "ok", BUILD_AHEAD_INTERVAL="3600", SEED="1") as w:
            wait_for(w.children, "the build's child")
            calls = service.calls
            wait_for(lambda: service.calls >= calls + 5, "more looks at update_engine")
            assert len(w.children()) == 1  # built: not again for the same release
            assert w.stop() == 0
        assert "The package for the staged Flatcar 4230.2.3 is ready" in w.text()

        (host_root / "children.jsonl").unlink()
        with watching(host_root, "fail", BUILD_AHEAD_INTERVAL="2", SEED="1") as w:

            def staged_builds() -> list[dict[str, object]]:
                return [c for c in w.children() if "--flatcar-version" in str(c["argv"])]

            wait_for(lambda: len(staged_builds()) >= 3, "the staged build to be tried again")
            wait_for(lambda: any("--next" in str(c["argv"]) for c in w.children()), "a feed build")
            assert w.proc.poll() is None  # still watching after each failure
            # Tried again at the next interval (2 s * [0.8, 1.2]), not at every look at
            # update_engine (every 0.2 s).
            times = [float(str(c["time"])) for c in staged_builds()]
            assert all(b - a >= 1.6 for a, b in itertools.pairwise(times)), times
            assert w.stop() == 0
        assert w.text().count("failed with status 1") >= 4
        assert "watcher: caught signal 15" in w.text()


def test_a_staged_version_that_is_not_a_flatcar_version_is_not_built(host_root: Path) -> None:
    """NEW_VERSION is the host's word and goes into a command line: only a version passes."""
    with update_engine(host_root) as service:
        service.stage("--kernel-source=/tmp/x")
        with watching(host_root, "ok", BUILD_AHEAD_INTERVAL="3600", SEED="1") as w:
            wait_for(lambda: service.calls >= 5, "the watcher to ask update_engine")
            assert w.children() == []
            assert w.stop() == 0
        assert w.text().count("which is not a Flatcar version") == 1
