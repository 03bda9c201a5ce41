"""A new driver version on a node whose driver is in use (issue 20, point 3), on a real
kernel: the stand-in at version A loaded (`load`), its persistence daemon running, held by
a process with /dev/nvidiactl open and by the holder module; `init` of version B first with
a bound (exit 3, nothing stopped), then without: it waits (a log line, no readiness, A's
daemon running, `status` naming the holders), and once the holders are gone it swaps
and B is loaded and ready.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import standin_env
from tests.standin.tree import HOLDER_MODULE, make_standin_source

from .conftest import Guest
from .scenario import VERSION, Driver, expect, scenario, update_package

NEW = "550.999.02"


@pytest.fixture(scope="session")
def new_version(tmp_path_factory: pytest.TempPathFactory, guest_kernel: str) -> Path:
    """The stand-in at version NEW (proprietary), packed for the guest's kernel; its work
    directory (source `src`, store `precompiled`)."""
    kernel_build = Path("/lib/modules") / guest_kernel / "build"
    work = tmp_path_factory.mktemp("driver-new")
    source = make_standin_source(work / "src", version=NEW, flavours=("kernel",))
    env = standin_env(work, source, NEW)
    update_package({**env, "KERNEL_MODULE_TYPE": "proprietary"}, kernel_build)
    return work


def test_init_of_another_version_waits_for_the_driver_in_use_then_swaps(
    guest: Guest, standin: Driver, new_version: Path, tmp_path: Path
) -> None:
    body = r"""
    B="DRIVER_VERSION=$NEW NVIDIA_DRIVER_SOURCE=$NEW_WORK/src PRECOMPILED_DIR=$NEW_WORK/precompiled
       NODE_PRECOMPILED_DIR=$NEW_WORK/node-precompiled KERNEL_MODULE_TYPE=proprietary"
    nv load 2>$LOGS/load-a.log; say load_rc $?
    nvidia-persistenced --persistence-mode
    for i in $(seq 100); do [ -s $PERSISTENCED_PID ] && break; sleep 0.1; done
    old_daemon=$(cat $PERSISTENCED_PID)
    alive() { exited "$1" && echo no || echo yes; }
    sleep infinity 3</dev/nvidiactl &
    holder=$!
    say holder_pid $holder
    insmod $HOLDER; say insmod_rc $?

    # A bound: exit 3, nothing stopped.
    start_init $LOGS/bounded.log $B DRIVER_BUSY_TIMEOUT=3
    wait_for "exited $INIT_PID" 300; wait $INIT_PID; say bounded_rc $?
    say bounded_version "$(cat /sys/module/nvidia/version)"
    say bounded_daemon "$(alive $old_daemon)"
    say bounded_ready "$([ -e $READY ] && echo yes || echo no)"

    # No bound: it waits until the holders are gone.
    start_init $LOGS/init.log $B
    wait_log $LOGS/init.log "is in use; waiting" 300; say waiting_rc $?
    nv status --json >$LOGS/status.json; say status_rc $?
    nv status >$LOGS/status.txt 2>&1
    say waiting_version "$(cat /sys/module/nvidia/version)"
    say waiting_daemon "$(alive $old_daemon)"
    say waiting_ready "$([ -e $READY ] && echo yes || echo no)"
    say waiting_file "$([ -e /run/nvidia/nvidia-driver.waiting ] && echo yes || echo no)"
    kill $holder; wait $holder 2>/dev/null
    sleep 6  # a few looks: the holder module still holds it
    say module_held_init "$(alive $INIT_PID)"
    say module_held_version "$(cat /sys/module/nvidia/version)"
    say module_held_daemon "$(alive $old_daemon)"
    say module_held_ready "$([ -e $READY ] && echo yes || echo no)"
    rmmod $HOLDER_MODULE; say rmmod_rc $?
    wait_ready 300; say ready_rc $?
    say new_version "$(cat /sys/module/nvidia/version)"
    say old_daemon_after "$(alive $old_daemon)"
    say new_daemon "$(persistenced_running)"
    say waiting_file_after "$([ -e /run/nvidia/nvidia-driver.waiting ] && echo yes || echo no)"
    stop_init TERM; say init_rc $INIT_RC
    state after
    """
    driver = Driver(
        standin.work,
        {
            **standin.env,
            "NEW": NEW,
            "NEW_WORK": str(new_version),
            "HOLDER_MODULE": HOLDER_MODULE,
        },
        {**standin.shares, str(new_version): new_version},
    )
    facts, explain = scenario(guest, driver, tmp_path, body, timeout=900)
    expect(
        facts,
        {
            "load_rc": "0",
            "insmod_rc": "0",
            "bounded_rc": "3",
            "bounded_version": VERSION,
            "bounded_daemon": "yes",  # today's init stopped it before it found the driver busy
            "bounded_ready": "no",
            "waiting_rc": "0",
            "status_rc": "0",
            "waiting_version": VERSION,
            "waiting_daemon": "yes",
            "waiting_ready": "no",
            "waiting_file": "yes",
            "module_held_init": "yes",
            "module_held_version": VERSION,
            "module_held_daemon": "yes",
            "module_held_ready": "no",
            "rmmod_rc": "0",
            "ready_rc": "0",
            "new_version": NEW,
            "old_daemon_after": "no",  # stopped once the driver was free
            "new_daemon": "yes",
            "waiting_file_after": "no",
            "init_rc": "0",
            "after_modules": "",
            "after_ready": "no",
            "after_daemons": "0",
        },
        explain,
    )
    holder = int(facts["holder_pid"])
    bounded = (tmp_path / "bounded.log").read_text()
    assert "DRIVER_BUSY_TIMEOUT" in bounded and f"pid {holder} (sleep)" in bounded, explain
    status = json.loads((tmp_path / "status.json").read_text())
    users = status["users"]
    assert [(p["pid"], p["command"], p["devices"]) for p in users["processes"]] == [
        (holder, "sleep", ["/dev/nvidiactl"])
    ], explain
    assert users["modules"] == [HOLDER_MODULE], explain
    waiting = status["instance"]["waiting"]
    assert (waiting["loaded"], waiting["wanted"], waiting["until"]) == (
        VERSION,
        f"{NEW} (proprietary)",
        None,
    ), explain
    text = (tmp_path / "status.txt").read_text()
    assert f"pid {holder} (sleep)" in text and f"module {HOLDER_MODULE}" in text, explain
    log = (tmp_path / "init.log").read_text()
    assert f"pid {holder} (sleep)" in log and "is free after" in log, explain
