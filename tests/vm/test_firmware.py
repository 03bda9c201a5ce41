"""The GSP firmware is found through /run/nvidia/driver when the modules load (QEMU guest).

The real driver reads `nvidia/<version>/gsp_*.bin` with request_firmware when a
GPU is first opened (RmInitAdapter): during the load when nvidia-drm's modeset
opens it, else when nvidia-persistenced does. The kernel looks in
firmware_class.path first, which `init` and `load` point at
/run/nvidia/driver/lib/firmware, and resolves it in the mount namespace of the
init process (the host's). The stand-in nvidia.ko reads the file at load
(NVreg_StandinGspFirmware=1) and fails without it, so a load sees the firmware
only when the container root was bound before the modules were loaded.

The firmware lies only in the container root (a tmpfs directory of the guest),
never under /lib/firmware: the kernel can have found it through the path alone.
"""

from __future__ import annotations

from pathlib import Path

from .conftest import Guest
from .scenario import Driver, expect, scenario

FIRMWARE_PARAM = "/sys/module/firmware_class/parameters/path"

# A container root with the firmware (SIZE bytes, a size no other file has) and
# the parameters that make the stand-in need it: lines of the scenario script.
SETUP = r"""
FW=nvidia/$DRIVER_VERSION/gsp_ga10x.bin
say host_fw "$([ -e /lib/firmware/$FW ] && echo yes || echo no)"
ROOT=/tmp/container-root
mkdir -p $ROOT/lib/firmware/${FW%/*} $ROOT/etc
head -c $SIZE /dev/urandom >$ROOT/lib/firmware/$FW
mkdir -p /tmp/params-gsp /tmp/params-gsp-off
echo NVreg_StandinGspFirmware=1 >/tmp/params-gsp/nvidia.conf
echo modeset=1 >/tmp/params-gsp/nvidia-drm.conf
printf 'NVreg_StandinGspFirmware=1\nNVreg_EnableGpuFirmware=0\n' >/tmp/params-gsp-off/nvidia.conf
export CONTAINER_ROOT=$ROOT NVIDIA_MODULE_PARAMS_DIR=/tmp/params-gsp
fw_path() { cat /sys/module/firmware_class/parameters/path; }
# found SIZE: how often the stand-in read a firmware file of SIZE bytes
found() { dmesg | grep -c "NVRM: GSP firmware $FW: $1 bytes"; }
"""


def _run(guest: Guest, driver: Driver, logs: Path, body: str) -> tuple[dict[str, str], str]:
    return scenario(guest, driver, logs, f"SIZE=4099\n{SETUP}\n{body}")


def test_gsp_firmware_is_found_through_the_driver_root_by_load_and_init(
    guest: Guest, standin: Driver, tmp_path: Path
) -> None:
    body = r"""
    KERNEL_MODULE_TYPE=proprietary nv load 2>$LOGS/load.log; say load_rc $?
    say load_fw_path "$(fw_path)"
    say load_found "$(found $SIZE)"
    say load_modules "$(nvidia_modules)"
    say load_mounted "$(is_mounted)"  # stays bound: a later first open reads the firmware too
    nv unload 2>$LOGS/unload.log; say unload_rc $?
    state unloaded

    start_init $LOGS/init.log KERNEL_MODULE_TYPE=open
    wait_ready; say init_ready $?
    say init_found "$(found $SIZE)"
    stop_init TERM; say init_rc $INIT_RC
    state after

    # As in a container: the CLI in its own mount namespace. The kernel resolves
    # the path in the init process's namespace, so the bind must propagate
    # there: it does from a shared /run/nvidia (the Operator's Bidirectional
    # mount), it does not from a private one.
    mkdir -p /run/nvidia && mount --bind /run/nvidia /run/nvidia && mount --make-shared /run/nvidia
    unshare --mount --propagation private "$PY" -m nvdriver.cli load 2>$LOGS/private.log
    say private_rc $?
    say private_modules "$(nvidia_modules)"
    unshare --mount --propagation unchanged "$PY" -m nvdriver.cli load 2>$LOGS/shared.log
    say shared_rc $?
    say shared_found "$(found $SIZE)"
    nv unload 2>$LOGS/unload-shared.log; say unload_shared_rc $?
    """
    facts, explain = _run(guest, standin, tmp_path, body)
    expect(
        facts,
        {
            "host_fw": "no",
            "load_rc": "0",
            "load_fw_path": "/run/nvidia/driver/lib/firmware",  # proprietary too
            "load_found": "1",
            "load_modules": "nvidia,nvidia_uvm,nvidia_modeset,nvidia_drm",
            "load_mounted": "yes",
            "unload_rc": "0",
            "unloaded_modules": "",
            "unloaded_mounted": "no",
            "init_ready": "0",
            "init_found": "2",
            "init_rc": "0",
            "after_modules": "",
            "after_mounted": "no",
            "private_rc": "1",
            "private_modules": "",
            "shared_rc": "0",
            "shared_found": "3",
            "unload_shared_rc": "0",
        },
        explain,
    )
    private = (tmp_path / "private.log").read_text()
    assert "RmFetchGspRmImages: No firmware image found" in private, explain
    assert "Traceback" not in private, explain


def test_firmware_off_a_preset_path_and_a_read_only_sys_are_respected(
    guest: Guest, standin: Driver, tmp_path: Path
) -> None:
    body = rf"""
    NVIDIA_MODULE_PARAMS_DIR=/tmp/params-gsp-off nv load 2>$LOGS/off.log; say off_rc $?
    say off_fw_path "$(fw_path)"
    say off_found "$(found $SIZE)"
    nv unload 2>$LOGS/unload-off.log; say unload_off_rc $?

    # /sys read-only (in a mount namespace of its own): the path cannot be set
    KERNEL_MODULE_TYPE=open unshare --mount sh -c \
        'mount -o remount,bind,ro /sys && exec "$PY" -m nvdriver.cli load' 2>$LOGS/ro.log
    say ro_rc $?
    say ro_fw_path "$(fw_path)"
    say ro_modules "$(nvidia_modules)"

    mkdir -p /tmp/host-firmware/${{FW%/*}}
    head -c 5003 /dev/urandom >/tmp/host-firmware/$FW
    printf /tmp/host-firmware >{FIRMWARE_PARAM}
    nv load 2>$LOGS/preset.log; say preset_rc $?
    say preset_fw_path "$(fw_path)"
    say preset_found "$(found 5003)"
    nv unload 2>$LOGS/unload-preset.log; say unload_preset_rc $?
    """
    facts, explain = _run(guest, standin, tmp_path, body)
    expect(
        facts,
        {
            "host_fw": "no",
            "off_rc": "0",
            "off_fw_path": "",  # NVreg_EnableGpuFirmware=0: the path is left alone
            "off_found": "0",
            "unload_off_rc": "0",
            "ro_rc": "1",
            "ro_fw_path": "",
            "ro_modules": "",
            "preset_rc": "0",
            "preset_fw_path": "/tmp/host-firmware",  # the host's choice is kept
            "preset_found": "1",
            "unload_preset_rc": "0",
        },
        explain,
    )
    read_only = (tmp_path / "ro.log").read_text()
    assert FIRMWARE_PARAM in read_only and "Traceback" not in read_only, explain
    preset = (tmp_path / "preset.log").read_text()
    warned = [line for line in preset.splitlines() if " warning " in line]
    assert any("/tmp/host-firmware" in line for line in warned), explain
