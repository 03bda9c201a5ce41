"""`nvidia-driver validate`: the seed's sample workloads on every GPU of the PCI bus.

The seed proved a node by hand with `nvidia-smi` and the CUDA samples' vectorAdd; this
does both without a compiler or a CUDA toolkit in the image. Three views must agree:
the PCI bus (sysfs), the driver root's `nvidia-smi` (its CSV query output) and the
CUDA driver API: `libcuda.so.1` through ctypes initialises, counts the devices and, on
each, adds two vectors with a small PTX kernel shipped with the program
(data/vector_add.ptx, built for the GPU by the driver's JIT), and the sum is checked
element by element. Nothing is changed on the GPU: no settings, no reset.

The driver root is /run/nvidia/driver when a driver container exposes one (where the
GPU Operator's validator and the container toolkit look), else CONTAINER_ROOT (`/`: a
driver installed in this file system). Its nvidia-smi runs with the root's library
directories (the validator's: usr/lib64, usr/lib/<arch>-linux-gnu) on its library
path, and libcuda.so.1 is loaded from them, else found by the default search: the
driver's own libraries are tested, not another copy. Links are resolved inside the
root (Debian's alternatives links are absolute).

Exit 7 when there is no GPU (none on the PCI bus, or cuInit says CUDA_ERROR_NO_DEVICE);
every other failure is exit 1 and names the call and CUDA's error name.
"""

from __future__ import annotations

import array
import contextlib
import csv
import ctypes
import dataclasses
import importlib.resources
import io
import logging
import platform
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nvdriver.config import Config
from nvdriver.errors import DriverError, NoGpuError
from nvdriver.host import nvidia_gpus, resolve_in
from nvdriver.rootfs import DRIVER_ROOT, NVIDIA_SMI_TIMEOUT, find_nvidia_smi
from nvdriver.run import run

log = logging.getLogger(__name__)

SMI_FIELDS = ("index", "name", "pci.bus_id", "driver_version", "uuid")
LIBRARY_DIRS = ("usr/lib64", f"usr/lib/{platform.machine()}-linux-gnu")
# libcuda.so.1 opens the PTX JIT by this name: loaded first from the driver root, the
# name is taken and libcuda uses the root's copy, of its own version.
PTX_JIT = "libnvidia-ptxjitcompiler.so.1"
KERNEL = "vector_add"
ELEMENTS = 1 << 18  # 1 MiB per vector: many blocks, a fraction of a second to check
BLOCK = 256
CUDA_ERROR_NO_DEVICE = 100
OUTPUT_TAIL_LINES = 20

_c = ctypes
_P = ctypes.POINTER
# The driver API's signatures (cuda.h), so that every argument has its C width.
SIGNATURES: dict[str, tuple[Any, ...]] = {
    "cuGetErrorName": (_c.c_int, _P(_c.c_char_p)),
    "cuGetErrorString": (_c.c_int, _P(_c.c_char_p)),
    "cuInit": (_c.c_uint,),
    "cuDriverGetVersion": (_P(_c.c_int),),
    "cuDeviceGetCount": (_P(_c.c_int),),
    "cuDeviceGet": (_P(_c.c_int), _c.c_int),
    "cuDeviceGetName": (_c.c_char_p, _c.c_int, _c.c_int),
    "cuCtxCreate_v2": (_P(_c.c_void_p), _c.c_uint, _c.c_int),
    "cuCtxDestroy_v2": (_c.c_void_p,),
    "cuCtxSynchronize": (),
    "cuModuleLoadData": (_P(_c.c_void_p), _c.c_char_p),
    "cuModuleUnload": (_c.c_void_p,),
    "cuModuleGetFunction": (_P(_c.c_void_p), _c.c_void_p, _c.c_char_p),
    "cuMemAlloc_v2": (_P(_c.c_uint64), _c.c_size_t),
    "cuMemFree_v2": (_c.c_uint64,),
    "cuMemcpyHtoD_v2": (_c.c_uint64, _c.c_void_p, _c.c_size_t),
    "cuMemcpyDtoH_v2": (_c.c_void_p, _c.c_uint64, _c.c_size_t),
    "cuLaunchKernel": (
        _c.c_void_p,
        *(_c.c_uint,) * 7,  # grid x, y, z; block x, y, z; shared memory bytes
        _c.c_void_p,
        _P(_c.c_void_p),
        _P(_c.c_void_p),
    ),
}


@dataclasses.dataclass(frozen=True)
class CudaReport:
    driver_version: int
    devices: tuple[str, ...]


def validate(config: Config) -> dict[str, Any]:
    gpus = nvidia_gpus(config)
    if not gpus:
        raise NoGpuError(
            "There is no NVIDIA GPU on the PCI bus (vendor 0x10de, class VGA or 3D): "
            "nothing to validate.",
            hint="Run validate on a GPU node.",
        )
    root = driver_root(config)
    rows = nvidia_smi(config, root)
    if len(rows) != len(gpus):
        raise DriverError(
            f"nvidia-smi sees {len(rows)} GPU(s), the PCI bus has {len(gpus)}: "
            + ", ".join(g.address for g in gpus)
            + ".",
            hint="A GPU the driver does not drive: check the kernel log (dmesg) for NVRM lines.",
        )
    log.info("nvidia-smi sees %d GPU(s): %s", len(rows), ", ".join(r["name"] for r in rows))
    cuda = Cuda(config, root)
    report = cuda.devices()
    if len(report.devices) != len(gpus):
        raise DriverError(
            f"CUDA sees {len(report.devices)} device(s), the PCI bus has {len(gpus)}.",
            hint="Check CUDA_VISIBLE_DEVICES and the kernel log (dmesg) for NVRM lines.",
        )
    for ordinal, name in enumerate(report.devices):
        vector_add(cuda, ordinal, name)
    return {
        "gpus": rows,
        "cuda": {
            "driver_version": report.driver_version,
            "devices": [{"name": name, KERNEL: "passed"} for name in report.devices],
        },
    }


def driver_root(config: Config) -> Path:
    """/run/nvidia/driver when a driver container exposes it, else CONTAINER_ROOT."""
    exposed = config.host(DRIVER_ROOT)
    root = exposed if exposed.is_dir() else config.options.container_root
    log.info("Validating the driver root %s", root)
    return root


def driver_library(root: Path, soname: str) -> Path | None:
    """`soname` in the root's library directories, its links resolved inside the root."""
    for d in LIBRARY_DIRS:
        path = resolve_in(root, root / d / soname)
        if path.is_file():
            return path
    return None


def nvidia_smi(config: Config, root: Path) -> list[dict[str, str]]:
    """The GPUs the root's nvidia-smi sees, with the root's libraries on its path."""
    smi = find_nvidia_smi(root)
    if smi is None:
        exposed = root == config.host(DRIVER_ROOT)
        raise DriverError(
            f"There is no nvidia-smi in the driver root {root}.",
            hint="Is the driver container running (nvidia-driver init)? It binds its root there."
            if exposed
            else "The driver image must ship NVIDIA's user space (nvidia-smi, libcuda).",
        )
    found = [driver_library(root, s) for s in ("libnvidia-ml.so.1", "libcuda.so.1")]
    dirs = [str(p.parent) for p in found if p is not None]
    dirs += [str(root / d) for d in LIBRARY_DIRS if (root / d).is_dir()]
    dirs += config.library_path()  # then ours
    query: list[str | Path] = [
        smi,
        f"--query-gpu={','.join(SMI_FIELDS)}",
        "--format=csv,noheader,nounits",
    ]
    result = run(
        query,
        check=False,
        env={"LD_LIBRARY_PATH": ":".join(dict.fromkeys(dirs))},
        timeout=NVIDIA_SMI_TIMEOUT,
    )
    if result.returncode != 0:
        said = (result.stdout + result.stderr).strip().splitlines()[-OUTPUT_TAIL_LINES:]
        raise DriverError(
            f"{smi} exited with status {result.returncode}:\n" + "\n".join(said),
            hint="nvidia-smi must see the GPUs: check that the driver is loaded "
            "(nvidia-driver status) and the kernel log (dmesg) for NVRM lines.",
        )
    return [
        dict(zip(SMI_FIELDS, (f.strip() for f in r), strict=True))
        for r in csv.reader(io.StringIO(result.stdout))
        if r
    ]


class Cuda:
    """The driver API calls the check makes; a failure names the call and CUDA's error."""

    def __init__(self, config: Config, root: Path) -> None:
        self.config = config
        path = driver_library(root, "libcuda.so.1")
        jit = driver_library(root, PTX_JIT) if path else None
        try:
            self.jit = ctypes.CDLL(str(jit)) if jit else None
            self.lib = ctypes.CDLL(str(path) if path else "libcuda.so.1")
        except OSError as e:
            raise DriverError(
                f"The CUDA driver library libcuda.so.1 cannot be loaded: {e}.",
                hint=f"The driver root {root} must have NVIDIA's user space (libcuda) in "
                + " or ".join(LIBRARY_DIRS)
                + ".",
            ) from e
        log.debug("CUDA driver library: %s", path or "libcuda.so.1 (default search)")
        self.functions: dict[str, Any] = {}
        for name, argtypes in SIGNATURES.items():
            try:
                function = getattr(self.lib, name)
            except AttributeError as e:
                raise DriverError(f"The CUDA driver library has no {name}: {e}.") from e
            function.argtypes, function.restype = argtypes, ctypes.c_int
            self.functions[name] = function

    def __call__(self, name: str, *args: Any) -> None:
        status = self.functions[name](*args)
        if status == CUDA_ERROR_NO_DEVICE and name == "cuInit":
            nodes = self.config.host("/dev/nvidia0").exists()
            raise NoGpuError(
                f"CUDA finds no GPU: cuInit returned {self.error(status)}.",
                hint="Check CUDA_VISIBLE_DEVICES and the kernel log (dmesg) for NVRM lines."
                if nodes
                else "There is no /dev/nvidia0: is the driver loaded (nvidia-driver status)?",
            )
        if status != 0:
            raise DriverError(f"CUDA {name} failed: {self.error(status)}.")

    def error(self, status: int) -> str:
        """`CUDA_ERROR_NAME (what it means)`, from the library itself."""
        name, text = ctypes.c_char_p(), ctypes.c_char_p()
        if self.functions["cuGetErrorName"](status, ctypes.byref(name)) != 0 or not name.value:
            return f"error {status}"
        self.functions["cuGetErrorString"](status, ctypes.byref(text))
        return f"{name.value.decode()} ({(text.value or b'?').decode()})"

    def release(self, name: str, handle: Any) -> None:
        """Free a handle on the way out of a block; a failure is logged, not raised over
        the error that may be unwinding."""
        status = self.functions[name](handle)
        if status != 0:
            log.warning("CUDA %s failed: %s", name, self.error(status))

    def devices(self) -> CudaReport:
        self("cuInit", 0)
        version, count = ctypes.c_int(), ctypes.c_int()
        self("cuDriverGetVersion", ctypes.byref(version))
        self("cuDeviceGetCount", ctypes.byref(count))
        names = []
        for i in range(count.value):
            device, name = ctypes.c_int(), ctypes.create_string_buffer(256)
            self("cuDeviceGet", ctypes.byref(device), i)
            self("cuDeviceGetName", name, len(name), device)
            names.append(name.value.decode())
        major, minor = divmod(version.value, 1000)
        log.info("CUDA %d.%d (libcuda) sees %d device(s)", major, minor // 10, count.value)
        return CudaReport(version.value, tuple(names))

    @contextlib.contextmanager
    def context(self, ordinal: int) -> Iterator[None]:
        """A context on device `ordinal`, current for the block."""
        device, ctx = ctypes.c_int(), ctypes.c_void_p()
        self("cuDeviceGet", ctypes.byref(device), ordinal)
        self("cuCtxCreate_v2", ctypes.byref(ctx), 0, device)
        try:
            yield
        finally:
            self.release("cuCtxDestroy_v2", ctx)

    @contextlib.contextmanager
    def module(self, ptx: bytes) -> Iterator[ctypes.c_void_p]:
        """`ptx` (NUL-terminated, as bytes are) JIT-compiled and loaded for the block."""
        module = ctypes.c_void_p()
        self("cuModuleLoadData", ctypes.byref(module), ptx)
        try:
            yield module
        finally:
            self.release("cuModuleUnload", module)

    @contextlib.contextmanager
    def allocation(self, size: int) -> Iterator[ctypes.c_uint64]:
        pointer = ctypes.c_uint64()
        self("cuMemAlloc_v2", ctypes.byref(pointer), size)
        try:
            yield pointer
        finally:
            self.release("cuMemFree_v2", pointer)


def vector_add(cuda: Cuda, ordinal: int, name: str) -> None:
    """c = a + b on device `ordinal` with the shipped kernel; every element checked.

    The operands are exact in 32-bit floats (integers and quarters below 2^21), so
    their sums are too and must come back equal, not merely close.
    """
    a = array.array("f", (float(i) for i in range(ELEMENTS)))
    b = array.array("f", ((ELEMENTS - i) / 4 for i in range(ELEMENTS)))
    c = array.array("f", bytes(4 * ELEMENTS))
    size = 4 * ELEMENTS
    ptx = (importlib.resources.files("nvdriver") / "data" / f"{KERNEL}.ptx").read_bytes()
    with contextlib.ExitStack() as stack:
        stack.enter_context(cuda.context(ordinal))
        module = stack.enter_context(cuda.module(ptx))
        da, db, dc = (stack.enter_context(cuda.allocation(size)) for _ in range(3))
        function = ctypes.c_void_p()
        cuda("cuModuleGetFunction", ctypes.byref(function), module, KERNEL.encode())
        cuda("cuMemcpyHtoD_v2", da, a.buffer_info()[0], size)
        cuda("cuMemcpyHtoD_v2", db, b.buffer_info()[0], size)
        n = ctypes.c_uint32(ELEMENTS)
        args = (ctypes.c_void_p * 4)(*(ctypes.addressof(x) for x in (da, db, dc, n)))
        grid = (ELEMENTS + BLOCK - 1) // BLOCK
        cuda("cuLaunchKernel", function, grid, 1, 1, BLOCK, 1, 1, 0, None, args, None)
        cuda("cuCtxSynchronize")
        cuda("cuMemcpyDtoH_v2", c.buffer_info()[0], dc, size)
    wrong = [i for i, (x, y, z) in enumerate(zip(a, b, c, strict=True)) if x + y != z]
    if wrong:
        i = wrong[0]
        raise DriverError(
            f"The CUDA vector add on GPU {ordinal} ({name}) is wrong: element {i} is "
            f"{c[i]}, expected {a[i]} + {b[i]} = {a[i] + b[i]} "
            f"({len(wrong)} of {ELEMENTS} elements wrong).",
            hint="The GPU computes wrong results: check the kernel log (dmesg) for Xid lines.",
        )
    log.info("GPU %d (%s): vector add of %d elements correct", ordinal, name, ELEMENTS)
