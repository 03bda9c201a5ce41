"""A host system bus with a stand-in update_engine, and stand-ins for the build's child.

The bus is a real `dbus-daemon` with a configuration of its own, listening on
HOST_ROOT/run/dbus/system_bus_socket (where staged.py finds the host's bus). Only
update_engine is a stand-in (it exists on Flatcar only): a service that owns
`com.coreos.update1` and answers `GetStatus` with what its state file says, so a
test can stage an update by writing that file. It counts the calls it answered
(a test waits for the watcher to have asked).

Run as `python -m tests.buildahead ROLE ...` (from the repository root):

* `update-engine SOCKET STATE_FILE`: the stand-in service;
* `child ARGS...`: the stand-in for `nvidia-driver` in the build's child
  (NVIDIA_DRIVER_TEST_BUILD_AHEAD_COMMAND): records its pid and arguments as a JSON line
  in $BUILD_AHEAD_TEST_RECORD, then does what $BUILD_AHEAD_TEST_CHILD says: `ok` (exit
  0), `fail` (exit 1) or `sleep` (until SIGTERM, then records that and exits 143);
* `watch SEED`: the watcher's loop as `init` runs it (signals installed, settings from
  the environment), with its random numbers from SEED; exits 0 when a signal ends it.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

import pytest

ROOT = Path(__file__).resolve().parents[1]
DBUS_DAEMON = "dbus-daemon"
SOCKET = "run/dbus/system_bus_socket"
IDLE = "UPDATE_STATUS_IDLE"
NEED_REBOOT = "UPDATE_STATUS_UPDATED_NEED_REBOOT"

_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
    {extra}
  </policy>
</busconfig>
"""
DENY_UPDATE_ENGINE = '<deny send_destination="com.coreos.update1"/>'


@contextlib.contextmanager
def short_root() -> Iterator[Path]:
    """A host tree under /tmp: a Unix socket's path has at most 107 bytes, which pytest's
    tmp_path under a long test name can exceed."""
    root = Path(tempfile.mkdtemp(prefix="nvd-", dir="/tmp"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def wait_for(condition: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def bus_config(socket: Path, extra_policy: str = "") -> str:
    """dbus-daemon's configuration of a system bus on `socket` that lets anyone own and
    call anything (plus `extra_policy`)."""
    return _CONFIG.format(socket=socket, extra=extra_policy)


@contextlib.contextmanager
def system_bus(host_root: Path, *, extra_policy: str = "") -> Iterator[Path]:
    """A dbus-daemon listening at HOST_ROOT/run/dbus/system_bus_socket; yields the socket."""
    from tests.conftest import need

    need(shutil.which(DBUS_DAEMON) is not None, "dbus-daemon (Debian: dbus-daemon)")
    socket = host_root / SOCKET
    socket.parent.mkdir(parents=True, exist_ok=True)
    config = host_root / "bus.conf"
    config.write_text(bus_config(socket, extra_policy))
    # --print-address: written once the daemon listens (the socket file exists from its
    # bind on, when a connection is still refused).
    proc = subprocess.Popen(
        [DBUS_DAEMON, "--nofork", "--nopidfile", "--print-address", f"--config-file={config}"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        address = proc.stdout.readline() if proc.stdout else ""
        assert address and proc.poll() is None, (
            f"dbus-daemon exited: {proc.stderr.read() if proc.stderr else ''}"
        )
        yield socket
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def write_status(path: Path, operation: str, version: str) -> None:
    """The stand-in update_engine's next GetStatus answer, written whole (a rename)."""
    data = {"last_checked_time": 1764640000, "progress": 1.0, "operation": operation}
    data.update(new_version=version, new_size=123456789)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.rename(path)


class UpdateEngine:
    """The stand-in update_engine on a bus: `stage(version)`, `calls`."""

    def __init__(self, socket: Path, state: Path) -> None:
        self.state = state
        self.set(IDLE, "0.0.0")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.buildahead", "update-engine", str(socket), str(state)],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline() == "ready\n", "the stand-in update_engine did not start"

    def set(self, operation: str, version: str) -> None:
        write_status(self.state, operation, version)

    def stage(self, version: str) -> None:
        self.set(NEED_REBOOT, version)

    @property
    def calls(self) -> int:
        path = self.state.with_suffix(".calls")
        return int(path.read_text() or 0) if path.exists() else 0

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


@contextlib.contextmanager
def update_engine(host_root: Path) -> Iterator[UpdateEngine]:
    """A system bus under `host_root` with the stand-in update_engine on it (IDLE)."""
    with system_bus(host_root) as socket:
        service = UpdateEngine(socket, host_root / "update-engine.json")
        try:
            yield service
        finally:
            service.close()


# --- the roles run as processes ---------------------------------------------------------


def _serve_update_engine(socket: str, state_file: str) -> None:
    from jeepney import MessageType, message_bus, new_error, new_method_return
    from jeepney.io.blocking import open_dbus_connection

    state, calls = Path(state_file), Path(state_file).with_suffix(".calls")
    with open_dbus_connection(bus=f"unix:path={socket}") as conn:
        reply = conn.send_and_get_reply(message_bus.RequestName("com.coreos.update1"))
        assert reply.body == (1,), reply.body  # DBUS_REQUEST_NAME_REPLY_PRIMARY_OWNER
        print("ready", flush=True)
        answered = 0
        while True:
            msg = conn.receive()
            header = msg.header
            if header.message_type != MessageType.method_call:
                continue
            if (header.fields.get(2), header.fields.get(3)) != (  # interface, member
                "com.coreos.update1.Manager",
                "GetStatus",
            ):
                conn.send(new_error(msg, "org.freedesktop.DBus.Error.UnknownMethod"))
                continue
            s = json.loads(state.read_text())
            body = (
                s["last_checked_time"],
                s["progress"],
                s["operation"],
                s["new_version"],
                s["new_size"],
            )
            conn.send(new_method_return(msg, "xdssx", body))
            answered += 1
            calls.write_text(str(answered))


def _child(args: list[str]) -> int:
    record = Path(os.environ["BUILD_AHEAD_TEST_RECORD"])

    def write(**entry: object) -> None:
        with record.open("a") as f:
            f.write(json.dumps({"pid": os.getpid(), "time": time.time(), **entry}) + "\n")

    write(argv=args)
    mode = os.environ.get("BUILD_AHEAD_TEST_CHILD", "ok")
    if mode == "fail":
        return 1
    if mode == "sleep":

        def terminated(signum: int, frame: FrameType | None) -> None:
            write(terminated=signum)
            sys.exit(128 + signum)

        signal.signal(signal.SIGTERM, terminated)
        while True:
            signal.pause()
    return 0


def _watch(seed: int) -> int:
    from nvdriver import log, signals, watch
    from nvdriver.config import Config
    from nvdriver.errors import Interrupted

    signals.install()
    log.setup("text", debug=True)
    try:
        watch.Watcher(Config.from_env(os.environ), rng=random.Random(seed)).run()
    except Interrupted as e:
        print(f"watcher: caught signal {e.signum}", file=sys.stderr, flush=True)
    return 0


def read_records(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


if __name__ == "__main__":
    role, *rest = sys.argv[1:]
    if role == "update-engine":
        _serve_update_engine(*rest)
    elif role == "child":
        sys.exit(_child(rest))
    elif role == "watch":
        sys.exit(_watch(int(rest[0])))
    else:
        sys.exit(f"unknown role {role}")
