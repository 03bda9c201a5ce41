"""The GPU Operator's files, the daemon's pid file, init's options."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from nvdriver import daemons, rootfs
from nvdriver.config import Config, Options
from nvdriver.errors import DriverError, UsageError


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Config:
    """HOST_ROOT a tree with this machine's /proc; the daemon's pid file (a container-own
    path, fixed by the daemon) moved to a container tree beside it."""
    (tmp_path / "proc").symlink_to("/proc")
    monkeypatch.setattr(
        daemons, "PERSISTENCED_PID", tmp_path / "container" / "var/run/nvidia-persistenced/x.pid"
    )
    return Config.from_env({"HOST_ROOT": str(tmp_path)})


# --- readiness and mounts -------------------------------------------------------------


def operator_reads(path: Path) -> dict[str, bool]:
    """The readiness file as the GPU Operator's validator reads it: `yaml.Unmarshal` into a
    map of booleans (a value that is not a YAML boolean fails there)."""
    features = yaml.safe_load(path.read_text())
    assert isinstance(features, dict), features
    assert all(isinstance(v, bool) for v in features.values()), features
    return features


def test_readiness_file_is_yaml_the_operator_reads_written_whole_and_removed(
    config: Config,
) -> None:
    flags = {"GDRCOPY_ENABLED": False, "GDS_ENABLED": True, "GPU_DIRECT_RDMA_ENABLED": False}
    with pytest.raises(RuntimeError), rootfs.ready(config, flags) as path:
        assert path == config.host("/run/nvidia/validations/.driver-ctr-ready")
        assert operator_reads(path) == flags
        assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left
        raise RuntimeError("a failure after the driver was announced")
    assert not path.exists()


def peermem_loaded(config: Config) -> None:
    """nvidia-peermem as /sys/module shows a loaded module (no HCA or GPU can exist here)."""
    module = config.host("/sys/module/nvidia_peermem")
    module.mkdir(parents=True)
    (module / "refcnt").write_text("0\n")


@pytest.mark.parametrize(
    ("asked", "loaded", "announced"),
    [(True, True, True), (True, False, False), (False, True, False), (False, False, False)],
)
def test_gpudirect_rdma_is_announced_only_when_asked_and_nvidia_peermem_is_loaded(
    tmp_path: Path, asked: bool, loaded: bool, announced: bool
) -> None:
    """The validator checks nvidia-peermem when the file says true: said without it, the
    node would never validate."""
    env = {"HOST_ROOT": str(tmp_path), "GDS_ENABLED": "true"}
    config = Config.from_env({**env, "GPU_DIRECT_RDMA_ENABLED": "true" if asked else "false"})
    if loaded:
        peermem_loaded(config)
    with rootfs.ready(config, rootfs.readiness_flags(config)) as path:
        assert operator_reads(path) == {
            "GDRCOPY_ENABLED": False,
            "GDS_ENABLED": True,
            "GPU_DIRECT_RDMA_ENABLED": announced,
        }


def test_daemons_status_is_not_ready_then_ready_while_they_run_then_gone(config: Config) -> None:
    path = config.host(rootfs.DAEMONS_STATUS_FILE)
    with pytest.raises(RuntimeError), rootfs.daemons_status(config) as status:
        assert path.read_text() == "NotReady"
        with status.ready():
            assert path.read_text() == "Ready"
            assert [p.name for p in path.parent.iterdir()] == [path.name]  # written whole
        assert path.read_text() == "NotReady"  # the daemons are being stopped
        raise RuntimeError("a failure while init runs")
    assert not path.exists()


def test_stale_readiness_files_are_removed(config: Config) -> None:
    ready = config.host(rootfs.READY_FILE)
    ready.parent.mkdir(parents=True)
    ready.write_text("GDS_ENABLED: false\n")
    (ready.parent / ".tmp-abc").write_text("half")
    (ready.parent / "other-validation").write_text("kept")
    rootfs.remove_stale(config)
    assert sorted(p.name for p in ready.parent.iterdir()) == ["other-validation"]


def test_nvidia_smi_of_the_driver_root_must_pass(tmp_path: Path) -> None:
    rootfs.check_nvidia_smi(tmp_path)  # none there: skipped
    smi = tmp_path / "usr" / "bin" / "nvidia-smi"
    smi.parent.mkdir(parents=True)
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    smi.chmod(0o755)
    with pytest.raises(DriverError, match="NVIDIA-SMI has failed"):
        rootfs.check_nvidia_smi(tmp_path)


# --- the daemon's pid file -------------------------------------------------------------


def write_pidfile(config: Config, pid: int, pidfile: Path | None = None) -> Path:
    pidfile = pidfile or daemons.PERSISTENCED_PID
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    pidfile.write_text(f"{pid}\n")
    return pidfile


def test_the_pid_file_is_the_containers_own_never_under_host_root(config: Config) -> None:
    """nvidia-persistenced writes its pid file in the container's /var/run: a pid file
    under HOST_ROOT (the host's, seen through `-v /:/host`) is not this container's
    daemon and is left alone (it used to be the one read, and its process stopped)."""
    other = subprocess.Popen(["sleep", "60"])
    ours = subprocess.Popen(["sleep", "60"])
    try:
        hosts = write_pidfile(config, other.pid, config.host("/var/run/nvidia-persistenced/x.pid"))
        write_pidfile(config, ours.pid)
        daemons.stop_persistenced(config)
        assert ours.wait(timeout=1) == -signal.SIGTERM
        assert other.poll() is None and hosts.exists()
    finally:
        other.kill()
        other.wait()
        ours.kill()
        ours.wait()


def test_a_pid_file_of_a_dead_process_is_stale(config: Config) -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    pidfile = write_pidfile(config, proc.pid)
    assert daemons.running_pid(config, pidfile) is None
    daemons.stop_persistenced(config)
    assert not pidfile.exists()


def test_stop_sends_sigterm_and_waits(config: Config) -> None:
    proc = subprocess.Popen(["sleep", "60"])
    pidfile = write_pidfile(config, proc.pid)
    assert daemons.running_pid(config, pidfile) == proc.pid
    daemons.stop_persistenced(config)  # our child stays a zombie: that counts as gone
    assert proc.wait(timeout=1) == -signal.SIGTERM
    assert not pidfile.exists()


def test_a_daemon_that_ignores_sigterm_fails_clearly(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(daemons, "STOP_TIMEOUT", 0.5)
    proc = subprocess.Popen(["sh", "-c", "trap '' TERM; echo up; sleep 60"], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
        write_pidfile(config, proc.pid)
        start = time.monotonic()
        with pytest.raises(DriverError, match=rf"pid {proc.pid}\) did not exit within 0.5 s"):
            daemons.stop_persistenced(config)
        assert time.monotonic() - start < 3
    finally:
        proc.kill()
        proc.wait()


def test_without_the_binary_the_daemon_is_skipped(
    config: Config, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with daemons.persistenced(config):
        assert daemons.running_pid(config, daemons.PERSISTENCED_PID) is None


@pytest.mark.parametrize("broken", ["garbage", "directory", "loop"])
def test_a_broken_pid_file_means_no_daemon(config: Config, broken: str) -> None:
    pidfile = daemons.PERSISTENCED_PID
    pidfile.parent.mkdir(parents=True)
    if broken == "garbage":
        pidfile.write_bytes(bytes(range(256)))
    elif broken == "directory":
        pidfile.mkdir()
    else:
        pidfile.symlink_to(pidfile.name)
    assert daemons.running_pid(config, pidfile) is None


def test_our_own_pid_or_init_is_never_taken_for_the_daemon(config: Config) -> None:
    for pid in (os.getpid(), 1, 0):
        assert daemons.running_pid(config, write_pidfile(config, pid)) is None


# --- options ------------------------------------------------------------------------------


def test_options_from_the_operators_environment() -> None:
    options = Options.from_env(
        {"GPU_DIRECT_RDMA_ENABLED": "true", "GDS_ENABLED": "False", "CONTAINER_ROOT": "/rootfs"}
    )
    assert options == Options(container_root=Path("/rootfs"), gpu_direct_rdma=True)
    assert options.readiness == {
        "GDRCOPY_ENABLED": False,
        "GDS_ENABLED": False,
        "GPU_DIRECT_RDMA_ENABLED": True,
    }
    assert Options.from_env({}) == Options()


@pytest.mark.parametrize(
    "env",
    [
        {"GDS_ENABLED": "maybe"},
        {"CONTAINER_ROOT": "relative/root"},
        {"NVIDIA_DRIVER_TEST_PAUSE_AT": "nowhere"},
    ],
)
def test_bad_options_are_usage_errors(env: dict[str, str]) -> None:
    with pytest.raises(UsageError) as e:
        Options.from_env(env)
    assert e.value.exit_code == 2
