"""The instance lock: one holder, its pid, a stale file taken over, update's log mirrored."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nvdriver import lock
from nvdriver import log as logsetup
from nvdriver.config import Config
from nvdriver.errors import AlreadyRunningError


@pytest.fixture
def config(tmp_path: Path) -> Config:
    (tmp_path / "proc").symlink_to("/proc")  # the real /proc under HOST_ROOT
    return Config.from_env({"HOST_ROOT": str(tmp_path)})


def test_a_second_holder_is_refused_with_exit_4_naming_the_first(config: Config) -> None:
    with lock.instance_lock(config) as path:
        assert path.read_text() == f"{os.getpid()}\n"
        assert lock.holder(config) == os.getpid()
        with (
            pytest.raises(AlreadyRunningError, match=f"pid {os.getpid()}") as e,
            lock.instance_lock(config),
        ):
            pass
        assert e.value.exit_code == 4
    assert not path.exists()
    assert lock.holder(config) is None


def test_a_stale_lock_file_of_a_killed_run_is_taken_over(config: Config) -> None:
    path = config.host(lock.LOCK_FILE)
    path.parent.mkdir(parents=True)
    path.write_text("999999\n")  # no flock on it: its holder is gone
    assert lock.holder(config) is None
    with lock.instance_lock(config):
        assert path.read_text() == f"{os.getpid()}\n"


HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, str(os.getpid()).encode())
print("locked", flush=True)
time.sleep(60)
"""


@pytest.fixture
def our_logger() -> Iterator[None]:
    """Set the package logger up as the CLI does; put it back as it was afterwards."""
    logger = logging.getLogger(logsetup.LOGGER_NAME)
    saved = (list(logger.handlers), logger.propagate, logger.level)
    with open(os.devnull, "w") as devnull:
        logsetup.setup("text", stream=devnull)
        yield
    logger.handlers[:], logger.propagate, logger.level = saved


@pytest.mark.usefixtures("our_logger")
def test_update_logs_into_the_running_instances_output(config: Config, tmp_path: Path) -> None:
    path = config.host(lock.LOCK_FILE)
    path.parent.mkdir(parents=True)
    instance_log = tmp_path / "instance.log"
    with instance_log.open("ab") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, stderr=err, text=True
        )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
        assert lock.holder(config) == proc.pid
        log = logging.getLogger("nvdriver.test")
        with lock.mirror_to_running_instance(config) as pid:
            assert pid == proc.pid
            log.error("building for kernel 6.1.0-56-amd64 failed")
        log.error("after the update")
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 5
    while "failed" not in instance_log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    text = instance_log.read_text()
    assert f"running nvidia-driver instance (pid {proc.pid})" in text
    assert "building for kernel 6.1.0-56-amd64 failed" in text
    assert "after the update" not in text


@pytest.mark.usefixtures("our_logger")
def test_a_child_of_the_instance_logs_each_line_once(
    config: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """init's build ahead (watch.py) runs `update` with init's own output as its stderr:
    mirroring its lines into that output as well would show each of them twice."""
    path = config.host(lock.LOCK_FILE)
    path.parent.mkdir(parents=True)
    instance_log = tmp_path / "instance.log"
    with instance_log.open("a", buffering=1) as shared:
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLD, str(path)],
            stdout=subprocess.PIPE,
            stderr=shared,
            text=True,
        )
        try:
            assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
            monkeypatch.setattr(sys, "stderr", shared)
            logsetup.setup("text", stream=shared)
            with lock.mirror_to_running_instance(config) as pid:
                assert pid == proc.pid
                logging.getLogger("nvdriver.test").error("building for kernel 6.12 failed")
        finally:
            proc.kill()
            proc.wait()
    assert instance_log.read_text().count("building for kernel 6.12 failed") == 1


def test_no_instance_no_mirror(config: Config) -> None:
    with lock.mirror_to_running_instance(config) as pid:
        assert pid is None
