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

Healthy nodes that are not plain pass too, each saying what it did not test and why:
- GPUs bound to another driver (vfio-pci for VMs, nouveau) are named and not counted;
  only the GPUs bound to `nvidia` (or to none, which the driver should have) must be seen.
- A GPU with MIG enabled has its MIG devices listed (`nvidia-smi -L`); CUDA enumerates a
  MIG device only when CUDA_VISIBLE_DEVICES names it, one per process (NVIDIA's MIG user
  guide, "CUDA Device Enumeration"), so the vector add is skipped on that GPU, saying so,
  unless CUDA_VISIBLE_DEVICES=MIG-UUID names one of its devices for this run.
- A GPU in exclusive-process compute mode whose one context another process holds
  (cuCtxCreate: CUDA_ERROR_DEVICE_UNAVAILABLE) is "in use", not a failure; a GPU in
  prohibited mode is skipped.
CUDA's devices are matched to nvidia-smi's GPUs by UUID (cuDeviceGetUuid_v2).

Exit 7 when there is no GPU (none on the PCI bus, none left to the driver, or cuInit says
CUDA_ERROR_NO_DEVICE); every other failure is exit 1 and names the call and CUDA's error
name.
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
from nvdriver.host import PciDevice, nvidia_gpus, resolve_in
from nvdriver.pattern import Pattern
from nvdriver.rootfs import DRIVER_ROOT, NVIDIA_SMI_TIMEOUT, find_nvidia_smi
from nvdriver.run import run

log = logging.getLogger(__name__)

SMI_FIELDS = (
    "index",
    "name",
    "pci.bus_id",
    "driver_version",
    "uuid",
    "mig.mode.current",  # Enabled, Disabled, or [N/A] where the GPU has no MIG
    "compute_mode",  # Default, Exclusive_Process, Prohibited
)
# `nvidia-smi -L`: no CSV query lists MIG devices; this listing is where NVIDIA's MIG user
# guide takes the MIG-UUIDs for CUDA_VISIBLE_DEVICES from. A GPU's line, then its MIG
# devices' (the UUID MIG-GPU-<uuid>/<gi>/<ci> before R470, MIG-<uuid> since).
_SMI_GPU_LINE = Pattern(r"^GPU (?P<index>\d+): .*\(UUID: (?P<uuid>GPU-[^)]+)\)$")
_SMI_MIG_LINE = Pattern(r"^\s+MIG .*Device\s+\d+: \(UUID: (?P<uuid>MIG-[^)]+)\)$")
NVIDIA_DRIVER = "nvidia"  # the kernel driver name GPUs are bound to
LIBRARY_DIRS = ("usr/lib64", f"usr/lib/{platform.machine()}-linux-gnu")
# libcuda.so.1 opens the PTX JIT by this name: loaded first from the driver root, the
# name is taken and libcuda uses the root's copy, of its own version.
PTX_JIT = "libnvidia-ptxjitcompiler.so.1"
KERNEL = "vector_add"
ELEMENTS = 1 << 18  # 1 MiB per vector: many blocks, a fraction of a second to check
BLOCK = 256
CUDA_ERROR_NO_DEVICE = 100
# cuda.h: "requested CUDA device is unavailable at the current time. Devices are often
# unavailable due to use of CU_COMPUTEMODE_EXCLUSIVE_PROCESS or CU_COMPUTEMODE_PROHIBITED."
CUDA_ERROR_DEVICE_UNAVAILABLE = 46
CU_DEVICE_ATTRIBUTE_COMPUTE_MODE = 20
COMPUTE_MODES = {0: "Default", 2: "Prohibited", 3: "Exclusive_Process"}  # CUcomputemode
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
    "cuDeviceGetUuid_v2": (_c.c_char_p, _c.c_int),  # CUuuid: 16 bytes
    "cuDeviceGetAttribute": (_P(_c.c_int), _c.c_int, _c.c_int),
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
class CudaDevice:
    ordinal: int
    name: str
    uuid: str  # the 16 bytes as 8-4-4-4-12 hex digits, without GPU- or MIG-
    compute_mode: str


@dataclasses.dataclass(frozen=True)
class CudaReport:
    driver_version: int
    devices: tuple[CudaDevice, ...]


class DeviceUnavailable(DriverError):
    """CUDA_ERROR_DEVICE_UNAVAILABLE: another process has the one context an
    exclusive-process GPU allows (or the GPU allows none)."""


def _bare(uuid: str) -> str:
    """A UUID without its GPU- or MIG- prefix, as CUDA's 16 bytes print."""
    return uuid.removeprefix("GPU-").removeprefix("MIG-").lower()


def validate(config: Config) -> dict[str, Any]:
    gpus, others = _gpus_of_the_driver(config)
    root = driver_root(config)
    rows = nvidia_smi(config, root)
    if len(rows) != len(gpus):
        raise DriverError(
            f"nvidia-smi sees {len(rows)} GPU(s), the PCI bus has {len(gpus)} for the driver: "
            + ", ".join(g.address for g in gpus)
            + ".",
            hint="A GPU the driver does not drive: check the kernel log (dmesg) for NVRM lines.",
        )
    log.info("nvidia-smi sees %d GPU(s): %s", len(rows), ", ".join(r["name"] for r in rows))
    # The MIG devices of each MIG-enabled GPU (its UUID: their MIG-UUIDs).
    mig: dict[str, list[str]] = {r["uuid"]: [] for r in rows if r["mig.mode.current"] == "Enabled"}
    if mig:
        listed = mig_devices(config, root)
        mig = {gpu: listed.get(gpu, []) for gpu in mig}
    cuda = Cuda(config, root)
    try:
        report = cuda.devices()
    except NoGpuError:
        if len(mig) < len(rows):
            raise
        report = CudaReport(cuda.driver_version(), ())  # every GPU is MIG: none enumerated
    visible = config.environment.get("CUDA_VISIBLE_DEVICES")
    devices, skipped = _match(rows, mig, report.devices, visible)
    for device in report.devices:
        devices[device.uuid].update(_vector_add_or_why_not(cuda, device))
    result: dict[str, Any] = {
        "gpus": rows,
        "cuda": {"driver_version": report.driver_version, "devices": list(devices.values())},
    }
    if skipped:
        result["skipped"] = skipped
    if others:
        result["other_gpus"] = [{"address": g.address, "driver": g.driver} for g in others]
    return result


def _gpus_of_the_driver(config: Config) -> tuple[list[PciDevice], list[PciDevice]]:
    """The GPUs of the PCI bus the driver should have (bound to nvidia, or to nothing yet),
    and those bound to another driver (vfio-pci for VMs, nouveau), which are named only."""
    gpus = nvidia_gpus(config)
    if not gpus:
        raise NoGpuError(
            "There is no NVIDIA GPU on the PCI bus (vendor 0x10de, class VGA or 3D): "
            "nothing to validate.",
            hint="Run validate on a GPU node.",
        )
    ours = [g for g in gpus if g.driver in (None, NVIDIA_DRIVER)]
    others = [g for g in gpus if g not in ours]
    named = ", ".join(f"{g.address} ({g.driver})" for g in others)
    if not ours:
        raise NoGpuError(
            f"Every NVIDIA GPU on the PCI bus is bound to another driver: {named}: "
            "nothing for the NVIDIA driver to validate.",
            hint="GPUs bound to vfio-pci are passed through to virtual machines; validate "
            "runs where the nvidia driver has GPUs.",
        )
    if others:
        log.info("Not validating GPUs bound to another driver: %s", named)
    return ours, others


def _match(
    rows: list[dict[str, str]],
    mig: dict[str, list[str]],
    cuda: tuple[CudaDevice, ...],
    visible: str | None,
) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """CUDA's devices matched to nvidia-smi's GPUs and MIG devices by UUID (an entry per
    CUDA device), and each GPU CUDA does not show with why (a failure where none holds)."""
    known = {_bare(r["uuid"]): r for r in rows}
    owner = {_bare(m): gpu for gpu, devices in mig.items() for m in devices}
    strangers = [d for d in cuda if d.uuid not in known and d.uuid not in owner]
    if strangers:
        raise DriverError(
            f"CUDA sees {len(cuda)} device(s), nvidia-smi {len(rows)} GPU(s) of the driver; "
            "unknown to nvidia-smi: " + ", ".join(f"{d.name} ({d.uuid})" for d in strangers) + ".",
            hint="Check CUDA_VISIBLE_DEVICES and the kernel log (dmesg) for NVRM lines.",
        )
    seen = {d.uuid for d in cuda}
    skipped = []
    for row in rows:
        uuid = row["uuid"]
        if _bare(uuid) in seen:
            continue
        if uuid in mig:
            tested = [m for m in mig[uuid] if _bare(m) in seen]
            if not tested:
                skipped.append(_mig_skipped(row, mig[uuid]))
            continue
        if visible is not None:
            why = f"hidden by CUDA_VISIBLE_DEVICES={visible}"
            log.info("GPU %s (%s): no vector add: %s", row["index"], row["name"], why)
            skipped.append({"gpu": row["index"], "uuid": uuid, "reason": why})
            continue
        raise DriverError(
            f"CUDA does not see GPU {row['index']} ({row['name']}, {uuid}), which nvidia-smi "
            f"sees; CUDA sees {len(cuda)} device(s).",
            hint="Check CUDA_VISIBLE_DEVICES and the kernel log (dmesg) for NVRM lines.",
        )
    devices: dict[str, dict[str, Any]] = {}
    for d in cuda:
        entry: dict[str, Any] = (
            {"name": d.name, "uuid": known[d.uuid]["uuid"]}
            if (d.uuid in known)
            else {"name": d.name, "uuid": f"MIG-{d.uuid}", "gpu": owner[d.uuid]}
        )
        devices[d.uuid] = entry
    return devices, skipped


def _mig_skipped(row: dict[str, str], devices: list[str]) -> dict[str, Any]:
    """Why the vector add skips a MIG-enabled GPU, with its MIG devices."""
    if devices:
        why = (
            "MIG is enabled: CUDA enumerates a MIG device only when CUDA_VISIBLE_DEVICES "
            "names it, one per process; to test one, run validate with "
            f"CUDA_VISIBLE_DEVICES={devices[0]}"
        )
    else:
        why = (
            "MIG is enabled with no MIG devices: nothing CUDA can use until GPU and compute "
            "instances are created (nvidia-smi mig -cgi PROFILES -C, or the MIG manager)"
        )
    log.info("GPU %s (%s): no vector add: %s", row["index"], row["name"], why)
    return {"gpu": row["index"], "uuid": row["uuid"], "reason": why, "mig_devices": devices}


def _vector_add_or_why_not(cuda: Cuda, device: CudaDevice) -> dict[str, str]:
    """The vector add on `device`, or why an exclusive-process or prohibited GPU that
    another process uses (or no process may use) was not tested: in use, not a failure."""
    if device.compute_mode == "Prohibited":
        why = "compute mode Prohibited: no process may create a context on it"
        log.info("GPU %d (%s): no vector add: %s", device.ordinal, device.name, why)
        return {KERNEL: "skipped", "reason": why}
    try:
        vector_add(cuda, device.ordinal, device.name)
    except DeviceUnavailable:
        if device.compute_mode != "Exclusive_Process":
            raise
        why = (
            "in use: its compute mode is Exclusive_Process and another process holds its "
            "one context (nvidia-smi shows which)"
        )
        log.info("GPU %d (%s): no vector add: %s", device.ordinal, device.name, why)
        return {KERNEL: "in use", "reason": why}
    return {KERNEL: "passed"}


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
    result = _run_smi(
        config, root, smi, f"--query-gpu={','.join(SMI_FIELDS)}", "--format=csv,noheader,nounits"
    )
    return [
        dict(zip(SMI_FIELDS, (f.strip() for f in r), strict=True))
        for r in csv.reader(io.StringIO(result.stdout))
        if r
    ]


def mig_devices(config: Config, root: Path) -> dict[str, list[str]]:
    """The MIG devices (their MIG-UUIDs) of each GPU, by the GPU's UUID (`nvidia-smi -L`)."""
    smi = find_nvidia_smi(root)
    assert smi is not None  # nvidia_smi found it
    devices: dict[str, list[str]] = {}
    gpu: list[str] | None = None
    for line in _run_smi(config, root, smi, "-L").stdout.splitlines():
        if m := _SMI_GPU_LINE.match(line):
            gpu = devices.setdefault(m["uuid"], [])
        elif (m := _SMI_MIG_LINE.match(line)) and gpu is not None:
            gpu.append(m["uuid"])
    return devices


def _run_smi(config: Config, root: Path, smi: Path, *args: str) -> Any:
    """The root's nvidia-smi with the root's libraries on its path; an error when it fails."""
    found = [driver_library(root, s) for s in ("libnvidia-ml.so.1", "libcuda.so.1")]
    dirs = [str(p.parent) for p in found if p is not None]
    dirs += [str(root / d) for d in LIBRARY_DIRS if (root / d).is_dir()]
    dirs += config.library_path()  # then ours
    result = run(
        [smi, *args],
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
    return result


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
        if status == CUDA_ERROR_DEVICE_UNAVAILABLE:
            raise DeviceUnavailable(f"CUDA {name} failed: {self.error(status)}.")
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

    def driver_version(self) -> int:
        """The CUDA version of the driver (12020: 12.2); needs no device."""
        version = ctypes.c_int()
        self("cuDriverGetVersion", ctypes.byref(version))
        return version.value

    def devices(self) -> CudaReport:
        self("cuInit", 0)
        version, count = self.driver_version(), ctypes.c_int()
        self("cuDeviceGetCount", ctypes.byref(count))
        devices = []
        for i in range(count.value):
            device, name = ctypes.c_int(), ctypes.create_string_buffer(256)
            uuid, mode = ctypes.create_string_buffer(16), ctypes.c_int()
            self("cuDeviceGet", ctypes.byref(device), i)
            self("cuDeviceGetName", name, len(name), device)
            self("cuDeviceGetUuid_v2", uuid, device)
            self(
                "cuDeviceGetAttribute", ctypes.byref(mode), CU_DEVICE_ATTRIBUTE_COMPUTE_MODE, device
            )
            h = uuid.raw.hex()
            devices.append(
                CudaDevice(
                    ordinal=i,
                    name=name.value.decode(),
                    uuid=f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}",
                    compute_mode=COMPUTE_MODES.get(mode.value, str(mode.value)),
                )
            )
        major, minor = divmod(version, 1000)
        log.info("CUDA %d.%d (libcuda) sees %d device(s)", major, minor // 10, count.value)
        return CudaReport(version, tuple(devices))

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
