"""A new driver version on a node whose loaded driver is in use (issue 20, point 3): `init`
checks "in use" before it stops anything, waits (a log line, the wait recorded for
`status`, the old daemons left running) until the driver is free, then swaps; a bound
(DRIVER_BUSY_TIMEOUT) ends the wait with exit 3, a signal ends it cleanly.

The node is a HOST_ROOT tree: /sys/module as the kernel shows the old driver, /proc with the
processes that hold it (their open /dev/nvidia* files and cgroups). The old driver's
persistence daemon is a real process (its pid file is ours) whose exit drops its reference
in the tree, as the kernel would; rmmod is a stand-in (this machine cannot unload modules).
The package steps of `_prepare` (find, link, plan) are replaced: they are not what is
tested here, and a kernel cannot be loaded. The guest proves it on real kernels
(tests/vm/test_busy_driver.py).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from nvdriver import daemons, fabric, handover, lifecycle, signals, status
from nvdriver.config import Config, Options
from nvdriver.driver import link
from nvdriver.driver.source import Flavour
from nvdriver.errors import BusyError, Interrupted, UsageError
from nvdriver.kmod import users
from nvdriver.kmod.loaded import loaded_modules
from nvdriver.kmod.users import Container, container_of, holders
from tests.unit.test_kmod import fake_module, write_rmmod

OLD = "535.999.01"
NEW = "550.999.02"
HOLDER_PID = 4242
DOCKER_ID = "a" * 64
POD_UID = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
# The references one open file of NVIDIA's character devices holds: chrdev_open takes one on
# the cdev's owner and one on the file operations' owner (fs/char_dev.c), both nvidia.ko.
PER_FILE = 2


class Node:
    """The host tree with the old driver loaded, its daemon, and a process holding it."""

    def __init__(self, root: Path, daemon: subprocess.Popen[bytes]) -> None:
        self.root = root
        self.daemon = daemon
        self.rmmod_calls = root / "rmmod.calls"

    def config(self, **env: str) -> Config:
        container = str(self.root.parent / "container")
        return Config.from_env({"HOST_ROOT": str(self.root), "CONTAINER_ROOT": container, **env})

    def holder_exits(self) -> None:
        """The holder closes /dev/nvidiactl: its reference goes, and so does its /proc entry."""
        for p in (self.root / "proc" / str(HOLDER_PID)).rglob("*"):
            if p.is_symlink() or p.is_file():
                p.unlink()
        refcnt = self.root / "sys/module/nvidia/refcnt"
        refcnt.write_text(f"{int(refcnt.read_text()) - PER_FILE}\n")

    def daemon_alive(self) -> bool:
        return self.daemon.poll() is None


def process(root: Path, pid: int, command: str, cgroup: str, *devices: str) -> None:
    d = root / "proc" / str(pid)
    (d / "fd").mkdir(parents=True)
    (d / "comm").write_text(f"{command}\n")
    (d / "cgroup").write_text(cgroup)
    for n, device in enumerate(devices, 3):
        (d / "fd" / str(n)).symlink_to(device)


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Node]:
    root = tmp_path / "host"
    (root / "proc").mkdir(parents=True)
    (root / "proc" / "version").write_text("Linux version 6.1.0-test (gcc) #1 SMP\n")
    # nvidia: nvidia-uvm and nvidia-modeset, the daemon's /dev/nvidiactl and the holder's.
    fake_module(root, "nvidia", 2 + 2 * PER_FILE, ("nvidia_modeset", "nvidia_uvm"), version=OLD)
    fake_module(root, "nvidia_uvm", 0, version=OLD)
    fake_module(root, "nvidia_modeset", 0, version=OLD)
    process(
        root,
        HOLDER_PID,
        "python3",
        f"0::/system.slice/docker-{DOCKER_ID}.scope\n",
        "/dev/nvidiactl",
    )
    # The old persistence daemon: alive, in our pid file; its exit drops its reference.
    refcnt = root / "sys/module/nvidia/refcnt"
    script = (
        f"trap 'echo $(($(cat {refcnt}) - {PER_FILE})) >{refcnt}; rm -f {root}/proc/$$/fd/3; "
        "exit 0' TERM; "
        "echo ready; "
        "while :; do sleep 0.1; done"
    )
    daemon = subprocess.Popen(["bash", "-c", script], stdout=subprocess.PIPE)
    assert daemon.stdout is not None and daemon.stdout.readline() == b"ready\n"
    process(root, daemon.pid, "nvidia-persistenc", "0::/system.slice/docker-b.scope\n")
    (root / "proc" / str(daemon.pid) / "fd" / "3").symlink_to("/dev/nvidiactl")
    # Its state as the kernel shows it: exited (a zombie: our child) is not running.
    (root / "proc" / str(daemon.pid) / "stat").symlink_to(f"/proc/{daemon.pid}/stat")
    pidfile = tmp_path / "persistenced.pid"
    pidfile.write_text(f"{daemon.pid}\n")
    monkeypatch.setattr(daemons, "PERSISTENCED_PID", pidfile)
    monkeypatch.setattr(fabric, "FM_PID", tmp_path / "fm.pid")
    monkeypatch.setattr(fabric, "NVLSM_PID", tmp_path / "nvlsm.pid")
    write_rmmod(root, root)
    monkeypatch.setenv("PATH", f"{root}:{os.environ['PATH']}")
    try:
        yield Node(root, daemon)
    finally:
        daemon.kill()
        daemon.wait()


@pytest.fixture
def new_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    """`_prepare`'s package steps for the new version: found and linked (not tested here)."""
    monkeypatch.setattr(
        lifecycle,
        "_choose",
        lambda config: (
            types.SimpleNamespace(version=NEW),
            types.SimpleNamespace(flavour=Flavour.PROPRIETARY),
        ),
    )
    monkeypatch.setattr(lifecycle, "_remove_stale", lambda config, version: None)
    package = types.SimpleNamespace(path=Path("/nonexistent/new.tar.gz"))
    monkeypatch.setattr(lifecycle, "_find_package", lambda *a, **k: package)
    monkeypatch.setattr(link, "link_package", lambda *a, **k: None)
    monkeypatch.setattr(lifecycle, "_plan", lambda *a, **k: types.SimpleNamespace(params={}))
    monkeypatch.setattr(lifecycle, "set_firmware_path", lambda *a, **k: None)


def test_init_waits_for_a_driver_in_use_leaving_its_daemon_then_swaps_when_it_is_free(
    node: Node,
    new_driver: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = node.config()
    seen: list[dict[str, object]] = []

    def sleep(seconds: float | None = None) -> None:
        report = status.collect(config)
        seen.append(
            {
                "daemon": node.daemon_alive(),
                "rmmod": node.rmmod_calls.exists(),
                "report": report,
                "text": status.render(report),
            }
        )
        if len(seen) == 2:
            node.holder_exits()

    monkeypatch.setattr(signals, "sleep", sleep)
    caplog.set_level(logging.INFO, logger="nvdriver")
    lifecycle._prepare(config)

    assert len(seen) == 2  # it waited, and looked again until the holder was gone
    for look in seen:
        assert look["daemon"] is True and look["rmmod"] is False  # nothing stopped meanwhile
    report = seen[0]["report"]
    assert isinstance(report, dict)
    waiting = report["instance"]["waiting"]
    assert (waiting["pid"], waiting["loaded"], waiting["wanted"]) == (
        os.getpid(),
        OLD,
        f"{NEW} (proprietary)",
    )
    assert waiting["until"] is None  # no bound by default
    holder = report["users"]["processes"]
    assert [(p["pid"], p["command"], p["devices"]) for p in holder] == [
        (HOLDER_PID, "python3", ["/dev/nvidiactl"])
    ]
    assert holder[0]["container"] == {"runtime": "docker", "id": DOCKER_ID, "pod_uid": None}
    text = seen[0]["text"]
    assert f"pid {HOLDER_PID} (python3) in docker container {DOCKER_ID[:12]}" in str(text)
    assert f"to be free to replace it with {NEW}" in str(text)
    waits = [r.getMessage() for r in caplog.records if "is in use; waiting" in r.getMessage()]
    assert len(waits) == 1 and f"pid {HOLDER_PID} (python3)" in waits[0], waits
    # Free: the daemon stopped, then one rmmod; the record is gone.
    assert not node.daemon_alive()
    assert node.rmmod_calls.read_text() == "nvidia_modeset nvidia_uvm nvidia\n"
    assert handover.read_record(config) is None
    assert status.collect(config)["instance"]["waiting"] is None


def test_the_wait_logs_a_line_every_minute_and_reads_every_process_only_then(
    node: Node, new_driver: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = [1000.0]
    looks = [0]

    def sleep(seconds: float | None = None) -> None:
        assert seconds == handover.POLL
        clock[0] += seconds
        looks[0] += 1
        if clock[0] >= 1000.0 + 150:  # two and a half minutes
            node.holder_exits()

    scans = [0]

    def counted(config: Config) -> list[users.Holder]:
        scans[0] += 1
        return holders(config)

    monkeypatch.setattr(handover, "clock", lambda: clock[0])
    monkeypatch.setattr(signals, "sleep", sleep)
    monkeypatch.setattr(users, "holders", counted)
    caplog.set_level(logging.INFO, logger="nvdriver")
    lifecycle._prepare(node.config())
    waits = [r for r in caplog.records if "is in use; waiting" in r.getMessage()]
    assert [w.getMessage().split("waiting (")[1].split(" s")[0] for w in waits] == [
        "0",
        "60",
        "120",
    ]
    assert looks[0] == 75
    # Every process's open files are read at the start, for each log line and once the
    # refcounts say the driver may be free; the looks in between read /sys/module only.
    assert scans[0] == 4


def test_the_bound_ends_the_wait_with_exit_3_and_nothing_stopped(
    node: Node, new_driver: None
) -> None:
    config = node.config(DRIVER_BUSY_TIMEOUT="0.3")
    with pytest.raises(BusyError) as e:
        lifecycle._prepare(config)
    assert e.value.exit_code == 3
    assert "waited 0 s (DRIVER_BUSY_TIMEOUT)" in e.value.message
    assert f"pid {HOLDER_PID} (python3)" in e.value.message
    assert "DRIVER_BUSY_TIMEOUT" in (e.value.hint or "")
    assert node.daemon_alive() and not node.rmmod_calls.exists()
    assert handover.read_record(config) is None


def test_load_does_not_wait_and_stops_nothing_when_the_driver_is_in_use(
    node: Node, new_driver: None
) -> None:
    """Today's `unload_modules` raised only after the daemons were stopped."""
    with pytest.raises(BusyError, match="`load` does not wait"):
        lifecycle._prepare(node.config(), wait=False)
    assert node.daemon_alive() and not node.rmmod_calls.exists()


def test_a_signal_ends_the_wait_cleanly(node: Node, new_driver: None) -> None:
    config = node.config()
    previous = {s: signal.getsignal(s) for s in signals.HANDLED}
    signals.install()
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM))
    try:
        timer.start()
        with pytest.raises(Interrupted):
            lifecycle._prepare(config)
    finally:
        timer.cancel()
        for s, handler in previous.items():
            signal.signal(s, handler)
    assert node.daemon_alive() and not node.rmmod_calls.exists()
    assert handover.read_record(config) is None


def test_a_driver_held_only_by_its_daemon_is_swapped_at_once(
    node: Node, new_driver: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    node.holder_exits()
    monkeypatch.setattr(signals, "sleep", lambda s=None: pytest.fail("waited"))
    lifecycle._prepare(node.config())
    assert not node.daemon_alive()
    assert node.rmmod_calls.read_text() == "nvidia_modeset nvidia_uvm nvidia\n"


def test_references_no_process_shows_keep_the_driver_busy(node: Node) -> None:
    """References on a module whose files nobody visible has open: a user this container
    cannot see. A module whose files a visible process has open explains all of its own
    (how many one file holds is the kernel's business)."""
    node.holder_exits()
    config = node.config()
    refcnt = node.root / "sys/module/nvidia/refcnt"
    refcnt.write_text(f"{int(refcnt.read_text()) + 3}\n")  # more on nvidia: its file is open
    assert not handover.users(config, loaded_modules(config)).busy
    # A process hidden from this container holds /dev/nvidia-uvm.
    (node.root / "sys/module/nvidia_uvm/refcnt").write_text(f"{PER_FILE}\n")
    users = handover.users(config, loaded_modules(config))
    assert users.busy and users.unseen == PER_FILE and not users.processes
    assert "no process here shows" in str(users)


def test_a_child_of_our_daemon_sharing_its_files_is_not_a_user(node: Node) -> None:
    """A fork shares its parent's open files (no reference more): the old daemon's child
    with the daemon's /dev/nvidiactl is not a user; any other process with it open is."""
    node.holder_exits()
    child = 4343
    process(node.root, child, "sleep", "0::/system.slice/docker-b.scope\n", "/dev/nvidiactl")
    (node.root / "proc" / str(child) / "stat").write_text(
        f"{child} (sl) e(p) S {node.daemon.pid} {child} {child} 0 -1\n"
    )
    config = node.config()
    users = handover.users(config, loaded_modules(config))
    assert not users.busy, users
    (node.root / "proc" / str(child) / "stat").write_text(f"{child} (sleep) S 1 {child}\n")
    users = handover.users(config, loaded_modules(config))
    assert [h.pid for h in users.processes] == [child] and users.unseen == 0


def test_a_module_using_the_driver_is_named(node: Node) -> None:
    node.holder_exits()
    fake_module(node.root, "nvidia_standin_holder", 0)
    (node.root / "sys/module/nvidia/holders/nvidia_standin_holder").mkdir()
    refcnt = node.root / "sys/module/nvidia/refcnt"
    refcnt.write_text(f"{int(refcnt.read_text()) + 1}\n")
    users = handover.users(node.config(), loaded_modules(node.config()))
    assert users.busy and users.modules == ("nvidia_standin_holder",) and users.unseen == 0


@pytest.mark.parametrize(
    ("cgroup", "container"),
    [
        # Docker, systemd cgroup driver (Flatcar's default) and cgroupfs
        (f"0::/system.slice/docker-{DOCKER_ID}.scope\n", Container("docker", DOCKER_ID, None)),
        (f"0::/docker/{DOCKER_ID}\n", Container("docker", DOCKER_ID, None)),
        # containerd under the kubelet, systemd driver: the pod's UID with underscores
        (
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod"
            f"{POD_UID.replace('-', '_')}.slice/cri-containerd-{DOCKER_ID}.scope\n",
            Container("containerd", DOCKER_ID, POD_UID),
        ),
        # CRI-O, systemd driver
        (
            f"0::/kubepods.slice/kubepods-pod{POD_UID.replace('-', '_')}.slice/"
            f"crio-{DOCKER_ID}.scope\n",
            Container("cri-o", DOCKER_ID, POD_UID),
        ),
        # the kubelet's cgroupfs driver, cgroup v1 lines
        (
            f"12:devices:/kubepods/burstable/pod{POD_UID}/{DOCKER_ID}\n"
            f"0::/kubepods/burstable/pod{POD_UID}/{DOCKER_ID}\n",
            Container("kubernetes", DOCKER_ID, POD_UID),
        ),
        # a host process
        ("0::/user.slice/user-1000.slice/session-2.scope\n", None),
        ("0::/init.scope\n", None),
    ],
)
def test_the_container_of_a_holder_is_read_from_its_cgroup(
    cgroup: str, container: Container | None
) -> None:
    assert container_of(cgroup) == container


def test_holders_are_processes_with_nvidia_devices_open(tmp_path: Path) -> None:
    process(tmp_path, 10, "cuda-app", "0::/init.scope\n", "/dev/nvidia0", "/dev/nvidia-uvm")
    process(tmp_path, 11, "bash", "0::/init.scope\n", "/dev/null", "/dev/nvidia-fake (deleted)")
    process(tmp_path, 12, "editor", "0::/init.scope\n", "/home/x/notes")
    found = holders(Config.from_env({"HOST_ROOT": str(tmp_path)}))
    assert [(h.pid, sorted(h.devices)) for h in found] == [
        (10, ["/dev/nvidia-uvm", "/dev/nvidia0"]),
        (11, ["/dev/nvidia-fake"]),
    ]


@pytest.mark.parametrize(
    ("value", "bound"), [("", None), ("none", None), ("0", 0.0), ("3600", 3600.0)]
)
def test_the_bound_is_seconds_none_or_zero(value: str, bound: float | None) -> None:
    assert Options.from_env({"DRIVER_BUSY_TIMEOUT": value}).busy_timeout == bound


@pytest.mark.parametrize("value", ["-1", "soon", "inf"])
def test_a_bad_bound_is_a_usage_error(value: str) -> None:
    with pytest.raises(UsageError, match="DRIVER_BUSY_TIMEOUT"):
        Options.from_env({"DRIVER_BUSY_TIMEOUT": value})
