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


# NVSwitches (open-gpu-kernel-modules src/common/nvswitch/kernel/nvswitch.c, the LR10 and
# LS10 device id lists): class 0x068000, bound by nvidia.ko's nvidia-nvswitch driver
# (kernel-open/nvidia/linux_nvswitch.c binds vendor 0x10de, PCI_CLASS_BRIDGE_OTHER).
NVSWITCH_A100 = 0x1AF1  # LR10, the NVSwitch of HGX A100 boards (NVLink3)
NVSWITCH_H100 = 0x22A3  # LS10, the NVSwitch of HGX H100/H200 boards (NVLink4)
NVSWITCH_CLASS = 0x068000
# ConnectX-7 (pci.ids 15b3:1021), an InfiniBand controller (class 0x0207): NVLink5 switch
# trays are managed through such ports, their VPD marked SW_MNG.
CONNECTX7 = 0x1021
MELLANOX = 0x15B3


def nvswitches(host: Path, *devices: int, driver: str | None = "nvidia-nvswitch") -> list[str]:
    """One NVSwitch per device id, at 0000:8N:00.0; their addresses."""
    addresses = [f"0000:{0x80 + n:02x}:00.0" for n in range(len(devices))]
    for address, device in zip(addresses, devices, strict=True):
        pci_device(host, address, device, pci_class=NVSWITCH_CLASS, driver=driver)
    return addresses


def nvlink5_tray(host: Path, name: str = "mlx5_0", address: str = "0000:c1:00.0") -> Path:
    """An InfiniBand port of an NVLink5 switch tray: /sys/class/infiniband/NAME/device,
    the PCI function, with a VPD (PCI 3.0 layout: ID string, then a read-only section)
    whose vendor field holds SW_MNG, what NVIDIA's driver container looks for."""
    dev = pci_device(
        host, address, CONNECTX7, vendor=MELLANOX, pci_class=0x020700, driver="mlx5_core"
    )
    ident = b"NVIDIA ConnectX-7 switch tray management"
    fields = b"PN\x0aMCX75310AV0\x0aSW_MNG"
    (dev / "vpd").write_bytes(
        bytes([0x82, len(ident), 0]) + ident + bytes([0x90, len(fields), 0]) + fields + b"\x78"
    )
    ib = host / "sys" / "class" / "infiniband" / name
    ib.mkdir(parents=True)
    (ib / "device").symlink_to(f"../../../devices/pci0000:00/{address}")
    return dev


def modules(host: Path, *names: str) -> None:
    """Loaded modules as /sys/module/NAME shows them (their directories)."""
    for name in names:
        (host / "sys" / "module" / name).mkdir(parents=True, exist_ok=True)
