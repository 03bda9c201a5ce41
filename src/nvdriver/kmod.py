"""Kernel modules: prerequisites, parameters, loading from the private tree, unloading.

NVIDIA's modules are installed into a private tree (/opt/nvidia/VERSION, see
driver/link.py) and loaded with `modprobe -d` from there. modprobe then sees
only that tree, so the host modules they need (`drm`, `video`, ...: whatever
their `depends` and `softdep` name) are loaded first from the host's own tree.

Unloading follows NVIDIA's rule: a module may go only when every reference on
it comes from another NVIDIA module that goes with it; anything else (a
process with /dev/nvidia* open, a foreign module) means the driver is in use,
and then nothing is unloaded at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import platform
import re
import shlex
import stat
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from nvdriver import signals
from nvdriver.config import Config
from nvdriver.driver.source import MODULE_ORDER
from nvdriver.errors import BusyError, DriverError, NoGpuError, UsageError
from nvdriver.host import read_optional
from nvdriver.run import RunError, run

log = logging.getLogger(__name__)

# Loaded first, as NVIDIA's own driver container does; built into some kernels.
PREREQUISITES = ("i2c_core", "ipmi_msghandler", "ipmi_devintf")
# Always loaded when the package has them; nvidia-drm and nvidia-peermem only on request.
BASE_MODULES = ("nvidia", "nvidia-uvm", "nvidia-modeset")
# rmmod order: every module before the modules it uses.
UNLOAD_ORDER = tuple(reversed(MODULE_ORDER))
NO_GPU_LINE = "NVRM: No NVIDIA GPU found."

_PARAM_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def sysfs_name(module: str) -> str:
    """`nvidia-uvm` is `nvidia_uvm` in /sys/module and /proc/modules."""
    return module.replace("-", "_")


# --- what is loaded ----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LoadedModule:
    """A module as /sys/module shows it."""

    name: str  # the sysfs name, nvidia_uvm
    refcnt: int
    holders: tuple[str, ...]  # modules that use this one
    version: str | None
    srcversion: str | None

    @classmethod
    def read(cls, sys_module: Path, name: str) -> LoadedModule | None:
        """The module `name` if it is a loaded module (not built in, not absent)."""
        path = sys_module / sysfs_name(name)
        try:
            refcnt = int((path / "refcnt").read_text())
        except (OSError, ValueError):
            return None
        holders_dir = path / "holders"
        holders = (
            tuple(sorted(p.name for p in holders_dir.iterdir())) if holders_dir.is_dir() else ()
        )
        return cls(
            name=sysfs_name(name),
            refcnt=refcnt,
            holders=holders,
            version=read_optional(path / "version"),
            srcversion=read_optional(path / "srcversion"),
        )


def loaded_modules(config: Config, names: Sequence[str] = MODULE_ORDER) -> list[LoadedModule]:
    """The NVIDIA modules now loaded, in load order."""
    sys_module = config.host("/sys/module")
    return [m for n in names if (m := LoadedModule.read(sys_module, n)) is not None]


def loaded_flavour(config: Config) -> str | None:
    """The flavour of the loaded nvidia.ko, from the first line of /proc/driver/nvidia/version
    ("NVIDIA UNIX Open Kernel Module for x86_64 ..." or "NVIDIA UNIX x86_64 Kernel Module ...")."""
    text = read_optional(config.host("/proc/driver/nvidia/version"))
    if not text:
        return None
    return "open" if "Open Kernel Module" in text.splitlines()[0] else "proprietary"


def busy_reasons(loaded: Sequence[LoadedModule]) -> list[str]:
    """Why this set of modules cannot be unloaded together (empty: it can).

    A module's references must all come from modules of the set (its holders
    among them: nvidia-uvm and nvidia-modeset hold nvidia, nvidia-drm holds
    nvidia-modeset); any other reference is a user: an open /dev/nvidia*, a
    daemon, a foreign module.
    """
    names = {m.name for m in loaded}
    reasons = []
    for m in loaded:
        ours = sum(1 for h in m.holders if h in names)
        if m.refcnt > ours:
            others = [h for h in m.holders if h not in names]
            users = f" (used by {', '.join(others)})" if others else ""
            reasons.append(
                f"{m.name} has {m.refcnt} reference(s), {ours} of them from NVIDIA modules{users}"
            )
    return reasons


def unload(config: Config) -> list[str]:
    """Unload every NVIDIA module with one rmmod, or none when the driver is in use.

    Returns the modules unloaded. Raises BusyError (exit 3) without touching
    anything when a module has a user outside the set.
    """
    loaded = loaded_modules(config)
    if not loaded:
        log.info("No NVIDIA kernel module is loaded")
        return []
    reasons = busy_reasons(loaded)
    if reasons:
        raise BusyError(
            "The NVIDIA driver is in use, nothing was unloaded: " + "; ".join(reasons) + ".",
            hint="Stop the GPU workloads (processes with /dev/nvidia* open, modules using "
            "nvidia), then run `nvidia-driver unload` again.",
        )
    by_name = {m.name: m for m in loaded}
    names = [sysfs_name(n) for n in UNLOAD_ORDER if sysfs_name(n) in by_name]
    log.info("Unloading %s", ", ".join(names))
    try:
        run(["rmmod", *names])
    except RunError as e:
        left = [m.name for m in loaded_modules(config)]
        raise DriverError(
            f"Unloading the NVIDIA modules failed; still loaded: {', '.join(left) or 'none'}. "
            f"{e.message}",
            hint="Something took the driver while it was being unloaded; stop it and run "
            "`nvidia-driver unload` again.",
        ) from e
    return names


# --- module parameters -------------------------------------------------------


def read_params(params_dir: Path, module: str) -> tuple[str, ...]:
    """The parameters of `module` from `params_dir/<module>.conf`, as modprobe arguments.

    The file holds `key=value` lines or modprobe.d `options <module> key=value ...`
    lines; `#` starts a comment line. Values with blanks are quoted (`key="a b"`).
    """
    path = params_dir / f"{module}.conf"
    if not path.is_file():
        return ()
    params: list[str] = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError as e:
            raise _bad_params(path, number, raw, str(e)) from None
        if tokens and tokens[0] == "options":
            if len(tokens) < 2 or sysfs_name(tokens[1]) != sysfs_name(module):
                raise _bad_params(path, number, raw, f"an options line must name {module}")
            tokens = tokens[2:]
        for token in tokens:
            key, sep, value = token.partition("=")
            if not _PARAM_KEY_RE.match(key):
                raise _bad_params(path, number, raw, f"{key!r} is not a parameter name")
            if sep and re.search(r"\s", value):
                value = f'"{value}"'
            params.append(f"{key}{sep}{value}")
    return tuple(params)


def _bad_params(path: Path, number: int, line: str, why: str) -> UsageError:
    return UsageError(
        f"{path} line {number} ({line.strip()!r}) is malformed: {why}.",
        hint="Write one key=value per line, or a modprobe.d line `options MODULE key=value ...`.",
    )


def param_value(params: Sequence[str], key: str) -> str | None:
    """The last value given for `key` (as the kernel applies them), unquoted."""
    value = None
    for p in params:
        k, _, v = p.partition("=")
        if k == key:
            value = v.strip('"')
    return value


# --- modules of the private tree ---------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModuleTree:
    """The private module tree: `modprobe -d base` finds `base/lib/modules/KERNEL`."""

    base: Path
    kernel: str

    @property
    def directory(self) -> Path:
        return self.base / "lib" / "modules" / self.kernel

    def path(self, module: str) -> Path:
        return self.directory / f"{module}.ko"

    def modules(self) -> list[str]:
        """The NVIDIA modules installed here, in load order."""
        return [m for m in MODULE_ORDER if self.path(m).is_file()]

    def info(self, module: str, field: str) -> list[str]:
        """One `modinfo` field of an installed module (one entry per occurrence)."""
        out = run(["modinfo", "-F", field, self.path(module)]).stdout
        return [line.strip() for line in out.splitlines() if line.strip()]

    def host_dependencies(self, modules: Sequence[str]) -> tuple[list[str], list[str]]:
        """Modules of the host that `modules` need and that are not in this tree: those
        they link against (`depends`) and those they want first (`softdep` pre).

        `modprobe -d` sees only this tree, so these are loaded from the host's first.
        """
        ours = {sysfs_name(m) for m in self.modules()}
        depends: list[str] = []
        softdeps: list[str] = []
        for module in modules:
            for line in self.info(module, "depends"):
                depends += line.split(",")
            for line in self.info(module, "softdep"):
                # "pre: a b post: c": the modules before the first "post:" (some
                # modules separate them with commas).
                pre = line.split("post:")[0].replace("pre:", " ").replace(",", " ")
                softdeps += pre.split()

        def host_only(names: list[str], taken: list[str]) -> list[str]:
            found: list[str] = []
            for n in map(sysfs_name, names):
                if n and n not in ours and n not in found and n not in taken:
                    found.append(n)
            return found

        required = host_only(depends, [])
        return required, host_only(softdeps, required)

    def matches_loaded(self, loaded: Sequence[LoadedModule]) -> bool:
        """Whether the loaded NVIDIA modules are these very modules (version and srcversion)."""
        if not loaded:
            return False
        for m in loaded:
            module = next((n for n in self.modules() if sysfs_name(n) == m.name), None)
            if module is None or m.srcversion is None:
                return False
            if self.info(module, "srcversion") != [m.srcversion]:
                return False
            version = self.info(module, "version")
            if version and [m.version] != version:
                return False
        return True


def wanted_modules(
    tree: ModuleTree, params: Mapping[str, Sequence[str]], peermem: bool
) -> list[str]:
    """Which modules to load: the base ones, nvidia-drm when it has parameters
    (`modeset=1`), nvidia-peermem for GPUDirect RDMA."""
    asked = set(BASE_MODULES)
    if params.get("nvidia-drm"):
        asked.add("nvidia-drm")
    if peermem:
        asked.add("nvidia-peermem")
    available = tree.modules()
    missing = sorted(asked - set(available) - {"nvidia-drm", "nvidia-peermem"} - {"nvidia-modeset"})
    if "nvidia" not in available or missing:
        raise DriverError(
            f"The module tree {tree.directory} lacks {', '.join(missing or ['nvidia'])}.",
            hint="The package is incomplete; rebuild it (nvidia-driver update).",
        )
    for optional in ("nvidia-drm", "nvidia-peermem"):
        if optional in asked and optional not in available:
            log.warning("%s is asked for but the package has no such module; skipping", optional)
    return [m for m in available if m in asked]


# --- the kernel log ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KmsgRecord:
    level: int
    sequence: int
    message: str


def parse_kmsg_record(data: bytes) -> KmsgRecord | None:
    """One /dev/kmsg record: `prio,seq,usec,flags[,...];message` then ` KEY=value` lines."""
    head, sep, rest = data.decode(errors="replace").partition(";")
    fields = head.split(",")
    if not sep or len(fields) < 3:
        return None
    try:
        prio, seq = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    message = rest.split("\n", 1)[0]
    # Non-printable bytes come escaped as \xNN.
    message = re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)), message)
    return KmsgRecord(level=prio & 7, sequence=seq, message=message)


class KernelLog:
    """The kernel's messages from now on, read from /dev/kmsg without blocking."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            if not stat.S_ISFIFO(os.fstat(self.fd).st_mode):  # a pipe has no past to skip
                os.lseek(self.fd, 0, os.SEEK_END)  # skip what was logged before
        except OSError as e:
            log.debug("Cannot read the kernel log %s: %s", path, e)
            self.close()

    def read(self) -> list[str]:
        """The messages logged since the last read (or since opening)."""
        messages: list[str] = []
        while self.fd is not None:
            try:
                data = os.read(self.fd, 8192)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.EPIPE:  # records overwritten before we read them
                    continue
                raise
            if not data:
                break
            if (record := parse_kmsg_record(data)) is not None:
                messages.append(record.message)
        return messages

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> KernelLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- loading ------------------------------------------------------------------


def _load_host_modules(config: Config, names: Sequence[str], *, required: bool) -> None:
    """Load modules of the host's own module tree that are not loaded yet.

    Prerequisites are best effort (some kernels build them in or lack them);
    the modules the NVIDIA modules link against are required.
    """
    sys_module = config.host("/sys/module")
    missing = [n for n in names if not (sys_module / n).exists()]
    if not missing:
        return
    log.info("Loading the host's %s", ", ".join(missing))
    result = run(
        ["modprobe", "-a", *missing],
        check=required,
        hint="The NVIDIA modules need these modules of the host's kernel: make the host's "
        "/lib/modules visible to the container.",
    )
    if result.returncode != 0:
        log.warning("Could not load all of %s: %s", ", ".join(missing), result.stderr.strip())


def load(
    config: Config,
    tree: ModuleTree,
    modules: Sequence[str],
    params: Mapping[str, Sequence[str]],
) -> list[str]:
    """Load `modules` from `tree` in order with their parameters; return those loaded now.

    Modules already loaded are left alone. When one fails, every module this
    call loaded is unloaded again (no half-loaded set) and the error quotes the
    kernel's log: NoGpuError when the kernel says there is no NVIDIA GPU.
    """
    before = {m.name for m in loaded_modules(config)}
    host_before = _loaded_names(config)
    try:
        prerequisites = list(PREREQUISITES)
        if platform.machine() in ("x86_64", "amd64"):
            prerequisites.append("video")
        depends, softdeps = tree.host_dependencies(modules)
        _load_host_modules(config, prerequisites + softdeps, required=False)
        _load_host_modules(config, depends, required=True)
        for module in modules:
            if sysfs_name(module) not in {m.name for m in loaded_modules(config)}:
                _modprobe(config, tree, module, params.get(module, ()))
    except BaseException:
        with signals.deferred():
            _unload_new(config, before, host_before)
        raise
    now = [m.name for m in loaded_modules(config) if m.name not in before]
    if now:
        log.info("Loaded %s", ", ".join(now))
    return now


def _modprobe(config: Config, tree: ModuleTree, module: str, params: Sequence[str]) -> None:
    with KernelLog(config.host("/dev/kmsg")) as klog:
        log.info("Loading %s%s", module, f" ({' '.join(params)})" if params else "")
        try:
            run(["modprobe", "-d", tree.base, module, *params])
        except RunError as e:
            raise load_error(module, e.stderr, klog.read()) from e


def load_error(module: str, stderr: str, kernel_log: Sequence[str]) -> DriverError:
    """The error for a failed load, quoting what the kernel said about it."""
    nvrm = [line for line in kernel_log if "NVRM" in line or module.split("-")[0] in line]
    quoted = nvrm[-5:] or list(kernel_log[-5:])
    said = f" The kernel logged: {' | '.join(quoted)}" if quoted else ""
    no_gpu = next((line for line in kernel_log if NO_GPU_LINE in line), None)
    if no_gpu is not None or ("No such device" in stderr and module == "nvidia"):
        return NoGpuError(
            f"The kernel refused {module}: no NVIDIA GPU ({no_gpu or 'ENODEV'}). "
            "Nothing was left loaded.",
            hint="This machine has no NVIDIA GPU the driver supports; the modules themselves "
            "are valid for this kernel.",
        )
    detail = stderr.strip().splitlines()[-1] if stderr.strip() else "modprobe failed"
    return DriverError(
        f"Loading {module} failed: {detail}.{said} Nothing was left loaded.",
        hint="See the kernel log (dmesg) for the whole story.",
    )


def _loaded_names(config: Config) -> set[str]:
    """Every loaded module's name (from /proc/modules, machine-readable)."""
    try:
        text = config.host("/proc/modules").read_text()
    except OSError:
        return set()
    return {line.split()[0] for line in text.splitlines() if line.strip()}


def _unload_new(config: Config, nvidia_before: set[str], host_before: set[str]) -> None:
    """Undo a failed load: rmmod the NVIDIA modules loaded since, then the host modules
    loaded for them, each once nothing uses it any more. Never raises."""
    new = {m.name for m in loaded_modules(config)} - nvidia_before
    names = [sysfs_name(n) for n in UNLOAD_ORDER if sysfs_name(n) in new]
    if names:
        log.info("Unloading %s again", ", ".join(names))
        run(["rmmod", *names], check=False)
    left = [m.name for m in loaded_modules(config) if m.name not in nvidia_before]
    if left:
        log.error("Could not unload %s again after the failure", ", ".join(left))
        return
    # Host modules (drm, video, ...): the users of one go before it, so repeat
    # while some became unused.
    pending = sorted(_loaded_names(config) - host_before)
    sys_module = config.host("/sys/module")
    while pending:
        unused = [n for n in pending if read_optional(sys_module / n / "refcnt") == "0"]
        if not unused:
            break
        run(["rmmod", *unused], check=False)
        still = sorted(_loaded_names(config) - host_before)
        if still == pending:
            break
        pending = still


# --- firmware --------------------------------------------------------------------

FIRMWARE_PARAM = "/sys/module/firmware_class/parameters/path"


def _firmware_off(value: str | None) -> bool:
    """NVreg_EnableGpuFirmware's mode, its low four bits, is 0: "disabled"
    (nv-firmware-registry.h; 0x12, the default, is mode 2 with a policy bit)."""
    try:
        return value is not None and int(value, 0) & 0xF == 0
    except ValueError:
        return False  # not a number: the kernel refuses the parameter itself


def set_firmware_path(config: Config, firmware_dir: str, nvidia_params: Sequence[str]) -> None:
    """Let the kernel find the GSP firmware in the driver root, for every flavour.

    The open modules always run on GSP firmware, the proprietary ones too on
    Hopper and later GPUs; NVIDIA's container sets the path for both. Not when
    NVreg_EnableGpuFirmware's mode (low four bits) is 0: the firmware is off. A
    path the host set is kept, with a warning: the firmware must be found there.
    A path that cannot be written is an error, not a driver that fails later at
    its first open with "No firmware image found".
    """
    enable = param_value(nvidia_params, "NVreg_EnableGpuFirmware")
    if _firmware_off(enable):
        log.info("GPU firmware is off (NVreg_EnableGpuFirmware=%s); not setting its path", enable)
        return
    param = config.host(FIRMWARE_PARAM)
    current = read_optional(param)
    if current is None:
        log.warning("The kernel has no %s; GSP firmware must be in /lib/firmware", FIRMWARE_PARAM)
        return
    if current == firmware_dir:
        log.info("The firmware search path is %s already", firmware_dir)
        return
    if current:
        log.warning(
            "The firmware search path is set to %s already; keeping it: the GSP firmware must be "
            "there, not in %s",
            current,
            firmware_dir,
        )
        return
    try:
        param.write_text(firmware_dir)
    except OSError as e:
        raise DriverError(
            f"Cannot set the firmware search path: writing {firmware_dir} to {param} failed "
            f"({e.strerror or e}): the driver would not find its GSP firmware.",
            hint="Run the container privileged with /sys writable, or set the path on the host "
            "beforehand, or turn GSP firmware off with NVreg_EnableGpuFirmware=0 in nvidia.conf "
            "(only for GPUs that can run without it: not with the open modules, not on Hopper "
            "or later).",
        ) from e
    log.info("Set the firmware search path to %s", firmware_dir)


@contextlib.contextmanager
def driver_loaded(
    config: Config,
    tree: ModuleTree,
    modules: Sequence[str],
    params: Mapping[str, Sequence[str]],
) -> Iterator[list[str]]:
    """Load the driver for the duration of a `with` block.

    Leaving the block normally (a shutdown) unloads every NVIDIA module (BusyError
    when in use). Leaving it with an error undoes only what this block loaded:
    modules that were loaded before (a restart of the same driver) stay.
    """
    before = {m.name for m in loaded_modules(config)}
    host_before = _loaded_names(config)
    loaded_now = load(config, tree, modules, params)
    try:
        yield loaded_now
    except BaseException:
        if loaded_now:
            _unload_new(config, before, host_before)
        raise
    unload(config)
