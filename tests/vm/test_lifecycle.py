"""init, load, unload and status on a real kernel (QEMU guest), with the stand-in driver.

The packages are built on the host once per session (`nvidia-driver update
--kernel-source` of the guest's kernel); each test boots one guest and runs a
scenario script in it (lifecycle.sh has its helpers) that reports facts as
KEY=VALUE lines. Few boots, several checks each: a boot and a CLI call cost
seconds under TCG.

The stand-in nvidia-persistenced daemonizes, writes its pid file and holds
/dev/nvidiactl open (a reference on nvidia.ko), as the real one does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nvdriver.config import Config
from nvdriver.driver.source import DriverSource
from tests.real_build import RealBuild

from .conftest import Guest
from .scenario import VERSION, Driver, expect, guest_env, scenario
from .test_container import ENGINE, PACKED_LINKER

ORDER = "nvidia,nvidia_uvm,nvidia_modeset,nvidia_drm"
TAINT_FORCED_MODULE = 1 << 1  # Documentation/admin-guide/tainted-kernels.rst, "F"


# --- the stand-in -----------------------------------------------------------------


def test_init_loads_serves_and_shuts_down_cleanly_on_sigterm(
    guest: Guest, standin: Driver, tmp_path: Path
) -> None:
    body = r"""
    start_init $LOGS/init.log
    wait_ready; say ready_rc $?
    say order "$(nvidia_modules)"
    say dwords "$(cat /sys/module/nvidia/parameters/NVreg_RegistryDwords)"
    say firmware "$(cat /sys/module/nvidia/parameters/NVreg_EnableGpuFirmware)"
    say mode "$(cat /sys/module/nvidia/parameters/NVreg_DeviceFileMode)"
    say drm_modeset "$(cat /sys/module/nvidia_drm/parameters/modeset)"
    say fw_path "$(cat /sys/module/firmware_class/parameters/path)"
    say daemon_args "$(cat /var/run/nvidia-persistenced/args)"
    say daemon "$(persistenced_running)"
    say mounted "$(is_mounted)"
    say bound_etc "$([ -f /run/nvidia/driver/etc/os-release ] && echo yes || echo no)"
    say sys_submounts "$(findmnt -rn -o TARGET | grep -c '^/run/nvidia/driver/sys/')"
    say readiness "$(paste -sd, $READY)"
    say lock_pid "$(cat $LOCK)"
    say init_pid "$INIT_PID"
    nv status --json >$LOGS/status.json; say status_rc $?
    nv init 2>$LOGS/second.log; say second_rc $?
    nv update --kernel-source /nonexistent-kernel-tree 2>$LOGS/update.log; say update_rc $?
    stop_init TERM; say init_rc $INIT_RC
    state after
    say mirrored "$(grep -c 'nonexistent-kernel-tree' $LOGS/init.log)"
    """
    facts, explain = scenario(guest, standin, tmp_path, body)
    expect(
        facts,
        {
            "ready_rc": "0",
            "order": ORDER,
            "dwords": "RMFoo=1;Bar=0x10",
            "firmware": "0",
            "mode": "432",  # 0660
            "drm_modeset": "Y",
            "fw_path": "",  # NVreg_EnableGpuFirmware=0: the firmware path is left alone
            "daemon_args": "--persistence-mode",
            "daemon": "yes",
            "mounted": "yes",
            "bound_etc": "yes",
            "sys_submounts": "0",  # /sys was made unbindable: its submounts stay out
            "readiness": "GDRCOPY_ENABLED: false,GDS_ENABLED: false,GPU_DIRECT_RDMA_ENABLED: false",
            "lock_pid": facts.get("init_pid", "?"),
            "status_rc": "0",
            "second_rc": "4",
            "update_rc": "1",
            "init_rc": "0",
            "after_modules": "",
            "after_mounted": "no",
            "after_ready": "no",
            "after_daemons": "0",
            "after_lock": "no",
        },
        explain,
    )
    assert int(facts["mirrored"]) >= 1, explain  # update's error shows in init's log
    assert "holds the lock" in (tmp_path / "second.log").read_text(), explain

    status = json.loads((tmp_path / "status.json").read_text())
    assert status["instance"]["pid"] == int(facts["init_pid"])
    assert [(m["name"], m["version"]) for m in status["modules"]] == [
        (n, VERSION) for n in ORDER.split(",")
    ]
    refcnt = {m["name"]: m["refcnt"] for m in status["modules"]}
    assert refcnt["nvidia_uvm"] == 0 and refcnt["nvidia_modeset"] == 1  # held by nvidia_drm
    assert status["persistenced"]["pid"] is not None
    assert status["driver_root_mounted"] is True
    assert status["readiness"] == {
        "GDRCOPY_ENABLED": "false",
        "GDS_ENABLED": "false",
        "GPU_DIRECT_RDMA_ENABLED": "false",
    }
    assert status["driver"]["flavour"] == "proprietary"
    assert [p["fits_kernel"] for p in status["packages"]] == [True, True]


def test_a_driver_in_use_is_never_unloaded_and_a_restart_keeps_it(
    guest: Guest, standin: Driver, tmp_path: Path
) -> None:
    body = r"""
    nv load 2>$LOGS/load.log; say load_rc $?
    before=$(text_address)
    nv load 2>$LOGS/load-again.log; say again_rc $?
    say again_kept "$([ "$(text_address)" = "$before" ] && echo yes || echo no)"
    find "$PRECOMPILED_DIR" -name '*.tar.gz' -exec touch {} +  # another file: relink it
    nv load 2>$LOGS/load-touched.log; say touched_rc $?
    say touched_kept "$([ "$(text_address)" = "$before" ] && echo yes || echo no)"
    insmod $HOLDER; say holder_rc $?
    nv unload 2>$LOGS/unload-busy.log; say busy_rc $?
    say busy_modules "$(nvidia_modules)"
    state busy
    start_init $LOGS/init.log
    wait_ready; say ready_rc $?
    say kept "$([ "$(text_address)" = "$before" ] && echo yes || echo no)"
    say daemon "$(persistenced_running)"
    stop_init TERM; say shutdown_rc $INIT_RC
    state held
    rmmod nvidia_standin_holder; say rmmod_rc $?
    nv unload 2>$LOGS/unload.log; say unload_rc $?
    state after
    """
    facts, explain = scenario(guest, standin, tmp_path, body)
    expect(
        facts,
        {
            "load_rc": "0",
            "again_rc": "0",
            "again_kept": "yes",
            "touched_rc": "0",
            "touched_kept": "yes",
            "holder_rc": "0",
            "busy_rc": "3",
            "busy_modules": ORDER,
            "busy_mounted": "yes",  # a driver in use keeps its root (firmware, toolkit)
            "ready_rc": "0",
            "kept": "yes",  # same package loaded already: no unload and reload
            "daemon": "yes",
            "shutdown_rc": "3",
            "held_modules": ORDER,
            "held_mounted": "no",
            "held_ready": "no",
            # In use: checked before any daemon stops, so persistenced (and on an NVSwitch
            # board the fabric manager) keep serving the work; `unload` stops it later.
            "held_daemons": "1",
            "rmmod_rc": "0",
            "unload_rc": "0",
            "after_modules": "",
        },
        explain,
    )
    busy = (tmp_path / "unload-busy.log").read_text()
    assert "in use" in busy and "nvidia_standin_holder" in busy, explain
    # The same package's modules loaded already: no unpack, verify or link (no `ld` run),
    # straight to readiness; a package file that changed since is linked again.
    linked = "Linked and installed"
    assert linked in (tmp_path / "load.log").read_text(), explain
    for again in ("load-again.log", "init.log"):
        log = (tmp_path / again).read_text()
        assert "nothing to link" in log and linked not in log, f"{again}\n{explain}"
    touched = (tmp_path / "load-touched.log").read_text()
    assert linked in touched and "keeping them" in touched, explain


def test_a_killed_init_is_cleaned_up_by_the_next_one(
    guest: Guest, standin: Driver, tmp_path: Path
) -> None:
    body = r"""
    base=/opt/nvidia/$DRIVER_VERSION
    for step in locked linked loaded mounted persistenced; do
        mkdir -p $base && mkdir -p $base/.staging-left-by-a-crash
        # The paused run's log is the guest's own, copied to the share once it is killed:
        # twice on 6.12 the line before the pause never reached the 9p share while init sat
        # paused, and the wait for it timed out (the other logs stay on the share).
        start_init /run/killed-$step.log NVIDIA_DRIVER_TEST_PAUSE_AT=$step
        wait_log /run/killed-$step.log "Pausing at step $step"; say ${step}_paused $?
        stop_init KILL
        cp /run/killed-$step.log $LOGS/
        start_init $LOGS/next-$step.log
        wait_ready; say ${step}_ready $?
        stop_init TERM; say ${step}_rc $INIT_RC
        state ${step}_after
        say ${step}_staging "$(ls -A $base | grep -c '^\.staging-')"
        say ${step}_loops "$(losetup -n -l | wc -l)"
    done
    # SIGTERM in the middle of a step (not while waiting): non-zero, all undone.
    start_init /run/term.log NVIDIA_DRIVER_TEST_PAUSE_AT=mounted
    wait_log /run/term.log "Pausing at step mounted"
    stop_init TERM; say term_rc $INIT_RC
    cp /run/term.log $LOGS/
    state term_after
    """
    facts, explain = scenario(guest, standin, tmp_path, body, timeout=900)
    expected: dict[str, str] = {}
    for step in ("locked", "linked", "loaded", "mounted", "persistenced"):
        expected |= {
            f"{step}_paused": "0",
            f"{step}_ready": "0",
            f"{step}_rc": "0",
            f"{step}_after_modules": "",
            f"{step}_after_mounted": "no",
            f"{step}_after_ready": "no",
            f"{step}_after_daemons": "0",
            f"{step}_after_lock": "no",
            f"{step}_staging": "0",
            f"{step}_loops": "0",
        }
    expected |= {
        "term_rc": "1",
        "term_after_modules": "",
        "term_after_mounted": "no",
        "term_after_ready": "no",
        "term_after_daemons": "0",
        "term_after_lock": "no",
    }
    expect(facts, expected, explain)
    # The run after a kill at "persistenced" found the same driver and the daemon running.
    assert "keeping them" in (tmp_path / "next-persistenced.log").read_text(), explain


def test_load_switches_flavour_sets_firmware_path_and_fails_cleanly_without_gpu(
    guest: Guest, standin: Driver, tmp_path: Path
) -> None:
    body = r"""
    NVIDIA_MODULE_PARAMS_DIR=$WORK/nogpu-params nv load 2>$LOGS/nogpu.log; say nogpu_rc $?
    say nogpu_modules "$(nvidia_modules)"
    say nogpu_host_modules "$(grep -cE '^(ipmi_devintf|ipmi_msghandler|video) ' /proc/modules)"
    export NVIDIA_MODULE_PARAMS_DIR=$WORK/plain-params
    KERNEL_MODULE_TYPE=proprietary nv load 2>$LOGS/proprietary.log; say proprietary_rc $?
    say proprietary_kind "$(head -n1 /proc/driver/nvidia/version | grep -c 'Open Kernel')"
    say proprietary_fw "$(cat /sys/module/firmware_class/parameters/path)"
    KERNEL_MODULE_TYPE=open nv load 2>$LOGS/open.log; say open_rc $?
    say open_kind "$(head -n1 /proc/driver/nvidia/version | grep -c 'Open Kernel')"
    say open_modules "$(nvidia_modules)"
    say open_fw "$(cat /sys/module/firmware_class/parameters/path)"
    nv unload 2>$LOGS/unload.log; say unload_rc $?
    state after
    """
    facts, explain = scenario(guest, standin, tmp_path, f"WORK={standin.work}\n{body}")
    expect(
        facts,
        {
            "nogpu_rc": "7",
            "nogpu_modules": "",
            "nogpu_host_modules": "0",  # what this run loaded for nvidia went again
            "proprietary_rc": "0",
            "proprietary_kind": "0",
            "proprietary_fw": "/run/nvidia/driver/lib/firmware",  # every flavour
            "open_rc": "0",
            "open_kind": "1",  # the proprietary modules were unloaded, the open ones loaded
            "open_modules": "nvidia,nvidia_uvm,nvidia_modeset",  # no nvidia-drm unless asked
            "open_fw": "/run/nvidia/driver/lib/firmware",
            "unload_rc": "0",
            "after_modules": "",
        },
        explain,
    )
    nogpu = (tmp_path / "nogpu.log").read_text()
    assert "NVRM: No NVIDIA GPU found." in nogpu, explain


# --- the real driver --------------------------------------------------------------


@pytest.mark.slow
def test_real_535_load_without_gpu_exits_7_and_leaves_nothing_loaded(
    guest: Guest, real_535: RealBuild, tmp_path: Path
) -> None:
    """The real nvidia.ko, built in the developer container of the guest's kernel and
    linked on the node with the linker its package carries (its loader's exec, counted in
    the guest's trace), is taken by the kernel and ends in exit 7."""
    assert real_535.kernel == guest.kernel
    version = DriverSource.from_config(
        Config.from_env({"NVIDIA_DRIVER_SOURCE": str(real_535.source)})
    ).version
    (tmp_path / "params").mkdir()
    (tmp_path / "bin").mkdir()
    env = guest_env(tmp_path, real_535.source, real_535.precompiled, version)
    env["NVIDIA_DRIVER_CACHE"] = str(real_535.cache)
    env.update(ENGINE=str(ENGINE), PACKED_LINKER=PACKED_LINKER)
    driver = Driver(tmp_path, env, {})
    body = r"""
    source "$ENGINE"; start_trace || exit 1
    nv load 2>$LOGS/load.log; say load_rc $?
    say modules "$(nvidia_modules)"
    say lock "$([ -e $LOCK ] && echo yes || echo no)"
    say tainted "$(cat /proc/sys/kernel/tainted)"
    say packed_linker "$(trace_execs | grep -cE "$PACKED_LINKER")"
    say lost "$(lost_events)"
    """
    facts, explain = scenario(guest, driver, tmp_path, body, timeout=900)
    expect(facts, {"load_rc": "7", "modules": "", "lock": "no", "lost": "0"}, explain)
    assert int(facts["packed_linker"]) >= 1, "the split modules linked by the package's ld"
    # The kernel took the module as it is, not forced (taint F: "bad vermagic").
    assert int(facts["tainted"]) & TAINT_FORCED_MODULE == 0, explain
    message = (tmp_path / "load.log").read_text()
    assert "NVRM: No NVIDIA GPU found." in message, explain
    assert "Nothing was left loaded" in message, explain
