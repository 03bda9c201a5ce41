"""init's wait builds ahead: on a real kernel with the stand-in driver loaded, a Flatcar
update that update_engine stages starts a low-priority build at once, and SIGTERM
ends that build before init unloads the driver.

The system bus is a real dbus-daemon in the guest at /run/dbus/system_bus_socket;
what cannot exist here is update_engine (Flatcar's): the stand-in service of
tests/buildahead.py answers GetStatus on that bus. The build's child is the stand-in
for `nvidia-driver update` (NVIDIA_DRIVER_TEST_BUILD_AHEAD_COMMAND) that records how it
was started and waits for its SIGTERM; the real builds ahead are `update`'s tests.
"""

from __future__ import annotations

import datetime
import json
import signal
from pathlib import Path

from tests.buildahead import IDLE, NEED_REBOOT, ROOT, bus_config, write_status

from .conftest import Guest
from .scenario import Driver, expect, scenario

STAGED = "4230.2.3"


def test_init_builds_ahead_for_a_staged_update_at_low_priority_and_stops_it_first(
    guest: Guest, standin: Driver, tmp_path: Path
) -> None:
    (tmp_path / "bus.conf").write_text(bus_config(Path("/run/dbus/system_bus_socket")))
    write_status(tmp_path / "ue.json", IDLE, "0.0.0")
    write_status(tmp_path / "staged.json", NEED_REBOOT, STAGED)
    body = rf"""
    cd {ROOT}
    mkdir -p /run/dbus
    dbus-daemon --nofork --nopidfile --config-file=$LOGS/bus.conf 2>$LOGS/dbus.log &
    for i in $(seq 300); do [ -S /run/dbus/system_bus_socket ] && break; sleep 0.1; done
    # The stand-in's state on the guest's tmpfs: a file replaced on the 9p share was
    # once read torn by the guest (NULs in the JSON: the share's cache, not our code).
    cp $LOGS/ue.json $LOGS/staged.json /run/
    "$PY" -m tests.buildahead update-engine /run/dbus/system_bus_socket /run/ue.json \
        >$LOGS/ue.out 2>$LOGS/update-engine.log &
    for i in $(seq 600); do grep -q ready $LOGS/ue.out && break; sleep 0.1; done
    say update_engine "$(cat $LOGS/ue.out)"
    start_init $LOGS/init.log BUILD_AHEAD=on BUILD_AHEAD_INTERVAL=1000000000 \
        BUILD_AHEAD_STAGED_POLL=0.5 PYTHONPATH={ROOT} \
        "NVIDIA_DRIVER_TEST_BUILD_AHEAD_COMMAND=$PY -m tests.buildahead child" \
        BUILD_AHEAD_TEST_RECORD=$LOGS/children.jsonl BUILD_AHEAD_TEST_CHILD=sleep
    wait_ready; say ready_rc $?
    wait_for '[ "$(cat /run/ue.calls 2>/dev/null || echo 0)" -ge 2 ]' 30; say asked_rc $?
    say children_idle "$(cat $LOGS/children.jsonl 2>/dev/null | wc -l)"
    mv /run/staged.json /run/ue.json
    wait_for '[ -s $LOGS/children.jsonl ]' 30; say child_rc $?
    pid=$(sed -n 's/^{{"pid": \([0-9]*\),.*/\1/p' $LOGS/children.jsonl | head -n 1)
    say child_nice "$(awk '{{print $19}}' /proc/$pid/stat)"
    say child_io "$(ionice -p $pid)"
    say init_io "$(ionice -p $INIT_PID)"
    say during_modules "$(nvidia_modules)"
    stop_init TERM; say init_rc $INIT_RC
    say child_gone "$([ -d /proc/$pid ] && echo no || echo yes)"
    state after
    """
    facts, explain = scenario(guest, standin, tmp_path, body)
    expect(
        facts,
        {
            "update_engine": "ready",
            "ready_rc": "0",
            "asked_rc": "0",
            "children_idle": "0",  # IDLE: nothing to build
            "child_rc": "0",
            "child_nice": "19",
            "child_io": "idle",
            "during_modules": "nvidia,nvidia_uvm,nvidia_modeset,nvidia_drm",  # untouched
            "init_rc": "0",
            "child_gone": "yes",
            "after_modules": "",
            "after_mounted": "no",
            "after_ready": "no",
        },
        explain,
    )
    records = [json.loads(line) for line in (tmp_path / "children.jsonl").read_text().splitlines()]
    assert [r.get("argv") for r in records if "argv" in r] == [
        ["update", "--store", "node", f"--flatcar-version={STAGED}", "-m", "1"]
    ], explain
    assert facts["init_io"] != "idle", explain  # init itself keeps its priority
    # SIGTERM reached the build (it cleans up), and init waited for it before it went on
    # to shut the driver down.
    (terminated,) = [r["time"] for r in records if r.get("terminated") == signal.SIGTERM]
    log = (tmp_path / "init.log").read_text()
    assert f"Stopping the build ahead (pid {records[0]['pid']}) first" in log, explain
    assert terminated <= _logged_at(log, "Caught SIGTERM") <= _logged_at(log, "Unloading")


def _logged_at(text: str, message: str) -> float:
    """The time of the first log line with `message` (text format: ISO time first)."""
    line = next(line for line in text.splitlines() if message in line)
    stamp = line.split()[0].replace("Z", "+00:00")
    return datetime.datetime.fromisoformat(stamp).timestamp()
