"""The stand-in modules load, count references and unload in a real kernel.

Boots each kernel under test in QEMU (TCG) with a busybox initramfs holding the
node-linked nvidia.ko and nvidia-modeset.ko, the Kbuild-built nvidia-uvm.ko
and nvidia-drm.ko, and the holder module; about 10 s.
"""

from __future__ import annotations

import gzip
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import need

from .tree import (
    DEFAULT_VERSION,
    HOLDER_MODULE,
    INTERFACES,
    build_holder,
    build_standin,
    link_module,
    make_standin_source,
    module_lds,
)

pytestmark = pytest.mark.vm

GUEST_SCRIPT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
echo 1 > /proc/sys/kernel/printk
cd /m
insmod nvidia.ko NVreg_StandinNoGpu=1; echo "nogpu_rc=$?"
dmesg | grep -q 'NVRM: No NVIDIA GPU found.' && echo "nogpu_logged=1"
insmod nvidia.ko NVreg_RegistryDwords='RMFoo=1;Bar=0x10' NVreg_EnableGpuFirmware=0
echo "load_rc=$?"
echo "version=$(cat /sys/module/nvidia/version)"
echo "fw=$(cat /sys/module/nvidia/parameters/NVreg_EnableGpuFirmware)"
echo "dwords=$(cat /sys/module/nvidia/parameters/NVreg_RegistryDwords)"
echo "proc=$(head -n 1 /proc/driver/nvidia/version)"
dmesg | grep -q 'NVRM: RegistryDwords: Bar=0x10' && echo "dwords_logged=1"
grep -q '^195 nvidia-frontend$' /proc/devices && echo "chrdev=1"
grep -q ' nvidia-uvm$' /proc/devices || echo "uvm_chrdev_before=0"
insmod nvidia-uvm.ko && insmod nvidia-modeset.ko && insmod nvidia-drm.ko modeset=1
echo "deps_rc=$?"
grep -q ' nvidia-uvm$' /proc/devices && echo "uvm_chrdev=1"
echo "drm_modeset=$(cat /sys/module/nvidia_drm/parameters/modeset)"
for m in nvidia nvidia_uvm nvidia_modeset nvidia_drm; do
  echo "refcnt_$m=$(cat /sys/module/$m/refcnt)"
done
insmod HOLDER.ko; echo "holder_rc=$?"
echo "held_refcnt=$(cat /sys/module/nvidia/refcnt)"
rmmod nvidia_drm nvidia_modeset nvidia_uvm
rmmod nvidia 2>/dev/null; echo "rmmod_held_rc=$?"
rmmod HOLDER; rmmod nvidia; echo "rmmod_rc=$?"
test -e /sys/module/nvidia; echo "gone=$?"
echo "END"
poweroff -f
"""


def _vm_busybox() -> str | None:
    """The static busybox, where qemu and cpio are here too."""
    busybox = shutil.which("busybox")
    if not (shutil.which("qemu-system-x86_64") and shutil.which("cpio") and busybox):
        return None
    # The initramfs has no libc: busybox must be static.
    if (
        shutil.which("file")
        and b"statically linked"
        not in subprocess.run(["file", "-L", busybox], capture_output=True, check=False).stdout
    ):
        return None
    return busybox


BUSYBOX = _vm_busybox()


def test_load_refcount_unload(tmp_path: Path, kernel: str) -> None:
    """On each kernel under test (the `kernel` fixture: image and headers)."""
    need(BUSYBOX is not None, "needs qemu, cpio, static busybox")
    assert BUSYBOX is not None
    busybox = BUSYBOX
    kernel_build = Path("/lib/modules") / kernel / "build"
    vmlinuz = Path("/boot") / f"vmlinuz-{kernel}"
    tree = make_standin_source(tmp_path / "src", flavours=("kernel",)) / "kernel"
    build_standin(tree, kernel_build)

    root = tmp_path / "root"
    mods = root / "m"
    mods.mkdir(parents=True)
    for sub in ("bin", "proc", "sys", "dev"):
        (root / sub).mkdir(exist_ok=True)
    for module, (interface, core) in INTERFACES.items():
        link_module(mods / f"{module}.ko", tree / interface, tree / core, module_lds(kernel_build))
    for module in ("nvidia-uvm", "nvidia-drm"):
        shutil.copy2(tree / f"{module}.ko", mods)
    shutil.copy2(build_holder(tmp_path / "holder", kernel_build, tree / "Module.symvers"), mods)
    shutil.copy2(busybox, root / "bin" / "busybox")
    init = root / "init"
    init.write_text(GUEST_SCRIPT.replace("HOLDER", HOLDER_MODULE))
    init.chmod(0o755)

    files = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    archive = subprocess.run(
        ["cpio", "-o", "-H", "newc", "--quiet"],
        input="\n".join(files).encode(),
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout
    initrd = tmp_path / "initrd.gz"
    initrd.write_bytes(gzip.compress(archive, compresslevel=1))

    proc = subprocess.run(
        [
            "qemu-system-x86_64",
            *("-accel", "tcg", "-cpu", "max,la57=off", "-m", "1024", "-smp", "1"),
            *("-nic", "none", "-nographic", "-no-reboot"),
            *("-kernel", str(vmlinuz), "-initrd", str(initrd)),
            *("-append", "console=ttyS0 quiet panic=-1"),
        ],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=180,
        check=False,
    )
    lines = [line.strip() for line in proc.stdout.splitlines()]
    assert "END" in lines, proc.stdout[-3000:]
    got = dict(line.split("=", 1) for line in lines if re.match(r"^\w+=", line))
    expected = {
        "nogpu_rc": "19",  # ENODEV, and nothing loaded
        "nogpu_logged": "1",
        "load_rc": "0",
        "version": DEFAULT_VERSION,
        "fw": "0",
        "dwords": "RMFoo=1;Bar=0x10",
        "dwords_logged": "1",
        "chrdev": "1",
        "uvm_chrdev_before": "0",
        "deps_rc": "0",
        "uvm_chrdev": "1",
        "drm_modeset": "Y",
        "refcnt_nvidia": "2",  # nvidia-uvm and nvidia-modeset
        "refcnt_nvidia_uvm": "0",
        "refcnt_nvidia_modeset": "1",  # nvidia-drm
        "refcnt_nvidia_drm": "0",
        "holder_rc": "0",
        "held_refcnt": "3",
        "rmmod_held_rc": "1",
        "rmmod_rc": "0",
        "gone": "1",
    }
    assert {k: got.get(k) for k in expected} == expected, proc.stdout[-3000:]
    assert got["proc"].startswith(
        f"NVRM version: NVIDIA UNIX x86_64 Kernel Module  {DEFAULT_VERSION}"
    )
