"""`nvidia-driver validate`: the driver works for the GPUs on the PCI bus.

Three views must agree: the PCI bus (sysfs), `nvidia-smi` (its CSV query
output), and the CUDA driver API (`libcuda.so.1` through ctypes: initialise,
count and name the devices, and move a small buffer to one device and back).
Nothing is changed on the GPU: no settings, no reset.
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import dataclasses
import io
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nvdriver.config import Config
from nvdriver.errors import DriverError, NoGpuError
from nvdriver.host import nvidia_gpus
from nvdriver.rootfs import NVIDIA_SMI_TIMEOUT, find_nvidia_smi
from nvdriver.run import run

log = logging.getLogger(__name__)

SMI_FIELDS = ("index", "name", "pci.bus_id", "driver_version", "uuid")
ROUNDTRIP_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class CudaReport:
    driver_version: int
    devices: tuple[str, ...]
    roundtrip_bytes: int


def validate(config: Config) -> dict[str, Any]:
    gpus = nvidia_gpus(config)
    if not gpus:
        raise NoGpuError(
            "There is no NVIDIA GPU on the PCI bus (vendor 0x10de, class VGA or 3D): "
            "nothing to validate.",
            hint="Run validate on a GPU node.",
        )
    smi = find_nvidia_smi(config.options.container_root)
    if smi is None:
        raise DriverError(
            f"There is no nvidia-smi in {config.options.container_root}.",
            hint="The driver image must ship NVIDIA's user space (nvidia-smi, libcuda).",
        )
    query: list[str | Path] = [
        smi,
        f"--query-gpu={','.join(SMI_FIELDS)}",
        "--format=csv,noheader,nounits",
    ]
    text = run(query, timeout=NVIDIA_SMI_TIMEOUT).stdout
    rows = [
        dict(zip(SMI_FIELDS, (f.strip() for f in r), strict=True))
        for r in csv.reader(io.StringIO(text))
        if r
    ]
    if len(rows) != len(gpus):
        raise DriverError(
            f"nvidia-smi sees {len(rows)} GPU(s), the PCI bus has {len(gpus)}: "
            + ", ".join(g.address for g in gpus)
            + ".",
            hint="A GPU the driver does not drive: check the kernel log (dmesg) for NVRM lines.",
        )
    cuda = cuda_check()
    if len(cuda.devices) != len(gpus):
        raise DriverError(
            f"CUDA sees {len(cuda.devices)} device(s), the PCI bus has {len(gpus)}.",
            hint="Check CUDA_VISIBLE_DEVICES and the kernel log (dmesg) for NVRM lines.",
        )
    return {
        "gpus": rows,
        "cuda": {
            "driver_version": cuda.driver_version,
            "devices": list(cuda.devices),
            "roundtrip_bytes": cuda.roundtrip_bytes,
        },
    }


class _Cuda:
    """The few CUDA driver API calls the check needs; every failure names the call."""

    def __init__(self) -> None:
        try:
            self.lib = ctypes.CDLL("libcuda.so.1")
        except OSError as e:
            raise DriverError(
                f"The CUDA driver library libcuda.so.1 cannot be loaded: {e}.",
                hint="The driver image must ship NVIDIA's user space (libcuda).",
            ) from e

    def __call__(self, name: str, *args: Any) -> None:
        status = getattr(self.lib, name)(*args)
        if status != 0:
            text = ctypes.c_char_p()
            self.lib.cuGetErrorString(status, ctypes.byref(text))
            what = text.value.decode() if text.value else f"error {status}"
            raise DriverError(f"CUDA {name} failed: {what}.")

    @contextlib.contextmanager
    def context(self, device: ctypes.c_int) -> Iterator[None]:
        ctx = ctypes.c_void_p()
        self("cuCtxCreate_v2", ctypes.byref(ctx), 0, device)
        try:
            yield
        finally:
            self.lib.cuCtxDestroy_v2(ctx)

    @contextlib.contextmanager
    def allocation(self, size: int) -> Iterator[ctypes.c_uint64]:
        pointer = ctypes.c_uint64()
        self("cuMemAlloc_v2", ctypes.byref(pointer), ctypes.c_size_t(size))
        try:
            yield pointer
        finally:
            self.lib.cuMemFree_v2(pointer)


def cuda_check() -> CudaReport:
    cuda = _Cuda()
    cuda("cuInit", 0)
    version, count = ctypes.c_int(), ctypes.c_int()
    cuda("cuDriverGetVersion", ctypes.byref(version))
    cuda("cuDeviceGetCount", ctypes.byref(count))
    names = []
    for i in range(count.value):
        device, name = ctypes.c_int(), ctypes.create_string_buffer(256)
        cuda("cuDeviceGet", ctypes.byref(device), i)
        cuda("cuDeviceGetName", name, len(name), device)
        names.append(name.value.decode())
    moved = 0
    if count.value:
        device = ctypes.c_int()
        cuda("cuDeviceGet", ctypes.byref(device), 0)
        sent = bytes(range(256)) * (ROUNDTRIP_BYTES // 256)
        back = ctypes.create_string_buffer(ROUNDTRIP_BYTES)
        with cuda.context(device), cuda.allocation(ROUNDTRIP_BYTES) as pointer:
            cuda("cuMemcpyHtoD_v2", pointer, sent, ctypes.c_size_t(ROUNDTRIP_BYTES))
            cuda("cuMemcpyDtoH_v2", back, pointer, ctypes.c_size_t(ROUNDTRIP_BYTES))
        if back.raw != sent:
            raise DriverError("CUDA copied 1 MiB to GPU 0 and back, and it came back different.")
        moved = ROUNDTRIP_BYTES
    return CudaReport(version.value, tuple(names), moved)
