"""What a node shows the driver, on a real kernel (QEMU guest) with the stand-in driver:
why the kernel refused nvidia.ko (exit 1, 6 or 7), the /dev/nvidia* nodes, gdrdrv.

The stand-in nvidia.ko logs the real driver's kernel lines for each refusal
(NVreg_StandinRefuse, see tests/standin/kernel/nvidia/nv.c) and fails with
ENODEV as the real one does. The GPUs those lines are about cannot exist in the
guest, so their sysfs entries are synthetic: a tmpfs tree bind-mounted over
/sys/bus/pci/devices for the one command (the only thing mocked).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.standin.tree import build_holder

from .conftest import Guest
from .scenario import Driver, expect, scenario

FAKE_PCI = r"""
# fake_gpu ADDRESS DEVICE [DRIVER]: a synthetic NVIDIA GPU in /tmp/pci (bound to DRIVER).
fake_gpu() {
    local d=/tmp/pci/$1
    mkdir -p "$d"
    echo 0x10de >"$d/vendor"; echo "0x$2" >"$d/device"; echo 0x030200 >"$d/class"
    if [ -n "${3:-}" ]; then mkdir -p "/tmp/pcidrv/$3"; ln -s "/tmp/pcidrv/$3" "$d/driver"; fi
}
# with_gpus CMD...: CMD seeing /tmp/pci as /sys/bus/pci/devices.
with_gpus() {
    local rc
    mount --bind /tmp/pci /sys/bus/pci/devices || return 99
    "$@"; rc=$?
    umount /sys/bus/pci/devices
    rm -rf /tmp/pci /tmp/pcidrv
    return $rc
}
"""


@pytest.fixture(scope="session")
def node_driver(
    tmp_path_factory: pytest.TempPathFactory, guest_kernel: str, standin: Driver
) -> Driver:
    """The stand-in's open package (the session's `standin`), a gdrdrv built against its
    holder tree, parameter sets that make nvidia.ko refuse the load as the real one does."""
    kernel_build = Path("/lib/modules") / guest_kernel / "build"
    work = tmp_path_factory.mktemp("node")
    symvers = standin.work / "holder-src" / "kernel" / "Module.symvers"
    gdrdrv = build_holder(work / "gdrdrv", kernel_build, symvers, "gdrdrv")
    params = {
        "plain": "NVreg_DeviceFileMode=0660\n",
        "nogpu": "NVreg_StandinNoGpu=1\n",
        "held": "NVreg_StandinRefuse=not-probed\n",
        "nogsp": "NVreg_StandinRefuse=no-gsp NVreg_StandinGpuDevice=0x1db4\n",
    }
    for name, text in params.items():
        (work / f"{name}-params").mkdir()
        (work / f"{name}-params" / "nvidia.conf").write_text(text)
    env = {**standin.env, "GDRDRV": str(gdrdrv), "KERNEL_MODULE_TYPE": "open"}
    return Driver(work, env, {**standin.shares, str(work): work})


def test_the_kernels_refusals_become_exit_1_6_7_and_leave_nothing_loaded(
    guest: Guest, node_driver: Driver, tmp_path: Path
) -> None:
    body = r"""
    fake_gpu 0000:01:00.0 20b0 vfio-pci
    NVIDIA_MODULE_PARAMS_DIR=$WORK/held-params with_gpus nv load 2>$LOGS/held.log
    say held_rc $?
    say held_modules "$(nvidia_modules)"
    fake_gpu 0000:01:00.0 1db4
    NVIDIA_MODULE_PARAMS_DIR=$WORK/nogsp-params with_gpus nv load 2>$LOGS/nogsp.log
    say nogsp_rc $?
    say nogsp_modules "$(nvidia_modules)"
    NVIDIA_MODULE_PARAMS_DIR=$WORK/nogpu-params nv load 2>$LOGS/nogpu.log; say nogpu_rc $?
    say nogpu_modules "$(nvidia_modules)"
    """
    facts, explain = scenario(
        guest, node_driver, tmp_path, f"WORK={node_driver.work}\n{FAKE_PCI}\n{body}"
    )
    expect(
        facts,
        {
            "held_rc": "1",
            "held_modules": "",
            "nogsp_rc": "6",
            "nogsp_modules": "",
            "nogpu_rc": "7",
            "nogpu_modules": "",
        },
        explain,
    )
    held = (tmp_path / "held.log").read_text()
    assert "0000:01:00.0 (PCI ID 10de:20b0) is bound to vfio-pci" in held, explain
    assert "/sys/bus/pci/drivers/vfio-pci/unbind" in held, explain
    nogsp = (tmp_path / "nogsp.log").read_text()
    assert "cannot drive 0000:01:00.0 (PCI ID 10de:1db4)" in nogsp, explain
    assert "KERNEL_MODULE_TYPE=proprietary" in nogsp, explain
    assert "NVRM: No NVIDIA GPU found." in (tmp_path / "nogpu.log").read_text(), explain


def test_load_makes_the_device_nodes_and_unload_takes_an_unused_gdrdrv_along(
    guest: Guest, node_driver: Driver, tmp_path: Path
) -> None:
    body = r"""
    export NVIDIA_MODULE_PARAMS_DIR=$WORK/plain-params
    say before "$(ls /dev | grep -c '^nvidia')"
    nv load 2>$LOGS/load.log; say load_rc $?
    uvm=$(awk '$2 == "nvidia-uvm" { printf "%x", $1 }' /proc/devices)
    say ctl "$(stat -c '%F %t:%T %a' /dev/nvidiactl)"
    say gpu0 "$(stat -c '%F %t:%T %a' /dev/nvidia0)"
    nodes=$(stat -c '%t:%T' /dev/nvidia-uvm /dev/nvidia-uvm-tools)
    say uvm "$(echo "$nodes" | sed "s/^$uvm:/UVM:/" | paste -sd, -)"
    insmod $GDRDRV; say gdrdrv_rc $?
    say holders "$(ls /sys/module/nvidia/holders | paste -sd, -)"
    nv unload 2>$LOGS/unload.log; say unload_rc $?
    say after_modules "$(nvidia_modules)"
    say after_gdrdrv "$(grep -c '^gdrdrv ' /proc/modules)"
    """
    facts, explain = scenario(guest, node_driver, tmp_path, f"WORK={node_driver.work}\n{body}")
    expect(
        facts,
        {
            "before": "0",  # the stand-in, like nvidia.ko, creates no nodes itself
            "load_rc": "0",
            "ctl": "character special file c3:ff 660",
            "gpu0": "character special file c3:0 660",
            "uvm": "UVM:0,UVM:1",
            "gdrdrv_rc": "0",
            "holders": "gdrdrv,nvidia_modeset,nvidia_uvm",
            "unload_rc": "0",
            "after_modules": "",
            "after_gdrdrv": "0",
        },
        explain,
    )
