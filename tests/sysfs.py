"""Synthetic sysfs PCI trees: the GPUs a node would show, for tests on a host without any.

A GPU cannot exist on the test machine, so its /sys/bus/pci/devices entry is
written here the way the kernel lays it out (hex ids with a 0x prefix, the
`driver` link into /sys/bus/pci/drivers).
"""

from __future__ import annotations

from pathlib import Path

# Real device ids (supported-gpus.json, open-gpu-kernel-modules' README).
V100 = 0x1DB4  # Tesla V100-PCIE-16GB (Volta)
T4 = 0x1EB8  # Tesla T4 (Turing)
A100 = 0x20B0  # NVIDIA A100-SXM4-40GB (Ampere)
H100 = 0x2330  # NVIDIA H100 80GB HBM3 (Hopper)
GH200 = 0x2342  # NVIDIA GH200 120GB (Grace Hopper)
P100 = 0x15F8  # Tesla P100-PCIE-16GB (Pascal)
GTX680 = 0x1180  # GeForce GTX 680 (Kepler, legacy branch 470)


def pci_device(
    host: Path,
    address: str,
    device: int,
    *,
    vendor: int = 0x10DE,
    pci_class: int = 0x030200,
    subsystem: tuple[int, int] | None = (0x10DE, 0x1212),
    driver: str | None = None,
) -> Path:
    """Write /sys/bus/pci/devices/ADDRESS under `host`, bound to `driver` if given."""
    dev = host / "sys" / "devices" / "pci0000:00" / address
    dev.mkdir(parents=True)
    (dev / "vendor").write_text(f"0x{vendor:04x}\n")
    (dev / "device").write_text(f"0x{device:04x}\n")
    (dev / "class").write_text(f"0x{pci_class:06x}\n")
    if subsystem is not None:
        (dev / "subsystem_vendor").write_text(f"0x{subsystem[0]:04x}\n")
        (dev / "subsystem_device").write_text(f"0x{subsystem[1]:04x}\n")
    if driver is not None:
        drivers = host / "sys" / "bus" / "pci" / "drivers" / driver
        drivers.mkdir(parents=True, exist_ok=True)
        (dev / "driver").symlink_to(f"../../../bus/pci/drivers/{driver}")
    devices = host / "sys" / "bus" / "pci" / "devices"
    devices.mkdir(parents=True, exist_ok=True)
    (devices / address).symlink_to(f"../../../devices/pci0000:00/{address}")
    return dev


def gpus(host: Path, *devices: int, driver: str | None = None) -> None:
    """One GPU per device id, at 0000:0N:00.0."""
    for n, device in enumerate(devices, 1):
        pci_device(host, f"0000:{n:02x}:00.0", device, driver=driver)
