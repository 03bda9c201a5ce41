"""What the host is: the kernel's identity, a kernel build tree, the GPUs on the PCI bus."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

from nvdriver.config import Config
from nvdriver.errors import DriverError
from nvdriver.pattern import Pattern

NVIDIA_VENDOR = 0x10DE
# PCI display controllers: 0x0300xx VGA, 0x0302xx 3D.
DISPLAY_CLASSES = (0x0300, 0x0302)
# NVSwitches: PCI_CLASS_BRIDGE_OTHER, the class NVIDIA's nvidia-nvswitch driver binds
# (kernel-open/nvidia/linux_nvswitch.c, export_nvswitch.h PCI_CLASS_BRIDGE_NVSWITCH).
NVSWITCH_CLASS = 0x0680

_DEFINE_RE = Pattern(r'^#define\s+(\w+)\s+"(.*)"\s*$', re.MULTILINE)

# Files that container engines put into a container's root: Docker and Podman.
# Container-own paths, never under HOST_ROOT; tests patch this constant.
CONTAINER_MARKERS = (Path("/.dockerenv"), Path("/run/.containerenv"))


def in_container() -> bool:
    """Whether this program runs in a container (a marker of CONTAINER_MARKERS exists):
    then its own /etc is the image's, and its root file system what `docker commit` keeps."""
    return any(marker.exists() for marker in CONTAINER_MARKERS)


def read_optional(path: Path) -> str | None:
    """A small file's text, stripped (sysfs, procfs, pid files); None when unreadable
    (missing, a directory, not text)."""
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


class KernelIdentity(NamedTuple):
    """A kernel as a package is made for it, by what the kernel checks at load: the release
    (`uname -r`), the vermagic and the CRCs of the kernel symbols the package's modules
    import (CONFIG_MODVERSIONS). `version`, the full `/proc/version` line, is information
    only: Flatcar's kernel tree is another build than the kernel it boots, with another
    build time in that line (docs/package.md, "Which package fits a kernel").

    The running kernel's identity (`running`) has no vermagic or CRCs: they are evidence
    read from the host's modules when a package is checked (kmod/abi.py).
    """

    release: str
    version: str
    vermagic: str | None = None
    symbols: tuple[tuple[str, int], ...] = ()  # (name, CRC), sorted by name

    def with_abi(self, vermagic: str | None, symbols: Mapping[str, int]) -> KernelIdentity:
        return self._replace(vermagic=vermagic, symbols=tuple(sorted(symbols.items())))

    @property
    def abi_digest(self) -> str:
        """The SHA-256 of the vermagic and every CRC: equal digests, equal kernel ABI."""
        import hashlib  # OpenSSL's library: loaded only by what hashes (not a restart)

        lines = [self.vermagic or "", *(f"{crc:08x} {name}" for name, crc in self.symbols)]
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()

    @classmethod
    def running(cls, config: Config) -> KernelIdentity:
        path = config.host("/proc/version")
        try:
            version = path.read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            why = e.strerror if isinstance(e, OSError) else "it is not text"
            raise DriverError(
                f"Cannot read the running kernel's version from {path}: {why}.",
                hint="The container needs the host's /proc (HOST_ROOT, if set, must be the "
                "host's root with its /proc).",
            ) from e
        if not version.startswith("Linux version "):
            raise DriverError(
                f"{path} does not hold a kernel version (expected 'Linux version ...').",
                hint="The container needs the host's /proc (HOST_ROOT, if set, must be the "
                "host's root with its /proc).",
            )
        return cls(release=os.uname().release, version=version)

    @classmethod
    def from_build_tree(cls, output: Path) -> KernelIdentity:
        """The `/proc/version` a kernel will print, from its build tree's generated headers.

        init/version.c prints "Linux version " UTS_RELEASE " (" LINUX_COMPILE_BY "@"
        LINUX_COMPILE_HOST ") (" LINUX_COMPILER ") " UTS_VERSION; older trees keep
        UTS_VERSION in compile.h, newer ones in utsversion.h.
        """
        generated = output / "include" / "generated"
        defines: dict[str, str] = {}
        for name in ("utsrelease.h", "compile.h", "utsversion.h"):
            path = generated / name
            if path.exists():
                defines.update(_DEFINE_RE.findall(path.read_text()))
        needed = ("UTS_RELEASE", "LINUX_COMPILE_BY", "LINUX_COMPILE_HOST", "LINUX_COMPILER")
        missing = [k for k in (*needed, "UTS_VERSION") if k not in defines]
        if missing:
            raise DriverError(
                f"The kernel tree {output} lacks {', '.join(missing)} in include/generated/.",
                hint="Point at a prepared kernel build tree (the /lib/modules/KERNEL/build "
                "of that kernel), not a bare source tree.",
            )
        version = (
            f"Linux version {defines['UTS_RELEASE']} ({defines['LINUX_COMPILE_BY']}@"
            f"{defines['LINUX_COMPILE_HOST']}) ({defines['LINUX_COMPILER']}) "
            f"{defines['UTS_VERSION']}"
        )
        return cls(release=defines["UTS_RELEASE"], version=version)


class KernelTree(NamedTuple):
    """A prepared kernel build tree: `source` (SYSSRC) and `output` (SYSOUT) may differ."""

    source: Path
    output: Path

    @classmethod
    def from_dir(cls, path: Path, *, root: Path | None = None) -> KernelTree:
        """A build dir, or a /lib/modules/KERNEL dir holding `build` (and `source`).

        Distribution headers split the tree: the output dir (generated headers,
        .config) and the source dir (include/linux/...). The source is found as
        /lib/modules/KERNEL/source, a `source` link in the output dir (O= builds),
        or the `include <dir>/Makefile` line of the output dir's Makefile (Debian).
        `path` lies under `root` (a developer root) whose absolute links are
        resolved inside it.
        """
        output = resolve_in(root, path)
        sources = [path / "source"]  # O= builds link their source tree
        if resolve_in(root, path / "build").is_dir():  # /lib/modules/KERNEL
            output = resolve_in(root, path / "build")
            sources.insert(0, path / "source")
            sources.append(path / "build" / "source")
        elif path.name == "build":
            sources.insert(0, path.parent / "source")
        if not (output / "Makefile").is_file() or not (output / "include").is_dir():
            raise DriverError(
                f"The kernel tree {path} is missing or not a kernel build tree "
                "(no Makefile and include/).",
                hint="Pass the /lib/modules/KERNEL/build directory of the target kernel.",
            )
        found = [r for c in sources if (r := resolve_in(root, c)) != output and r.is_dir()]
        if found:
            return cls(source=found[0], output=output)
        # Debian's output dir has a Makefile of one line: include <source>/Makefile.
        first = (output / "Makefile").read_text(errors="replace").strip().splitlines()[:1]
        m = re.fullmatch(r"include\s+(\S+)/Makefile", first[0].strip()) if first else None
        source = resolve_in(root, Path(m.group(1))) if m else output
        return cls(source=source if source.is_dir() else output, output=output)

    def linker_scripts(self) -> list[Path]:
        """The module linker scripts present, in the order NVIDIA's Makefile looks for them."""
        candidates = [
            self.source / "scripts/module-common.lds",
            self.source / "arch/x86/kernel/module.lds",
            self.output / "arch/x86/module.lds",
            self.output / "arch/arm64/module.lds",
            self.output / "scripts/module.lds",
        ]
        seen: list[Path] = []
        for c in candidates:
            if c.is_file() and c not in seen:
                seen.append(c)
        return seen

    def config_value(self, key: str) -> str | None:
        """A value of the kernel's .config (quotes removed), or None."""
        config = self.output / ".config"
        if not config.is_file():
            return None
        for line in config.read_text(errors="replace").splitlines():
            if line.startswith(f"{key}="):
                return line.split("=", 1)[1].strip().strip('"')
        return None


class PciDevice(NamedTuple):
    address: str
    vendor: int
    device: int
    pci_class: int
    subsystem_vendor: int | None = None
    subsystem_device: int | None = None
    driver: str | None = None  # the driver bound to it (nvidia, nouveau, vfio-pci), if any

    @property
    def is_nvidia_gpu(self) -> bool:
        return self.vendor == NVIDIA_VENDOR and (self.pci_class >> 8) in DISPLAY_CLASSES

    @property
    def is_nvswitch(self) -> bool:
        return self.vendor == NVIDIA_VENDOR and (self.pci_class >> 8) == NVSWITCH_CLASS

    @property
    def pci_id(self) -> str:
        """`10de:2330`, as the kernel and lspci -n write it."""
        return f"{self.vendor:04x}:{self.device:04x}"

    def __str__(self) -> str:
        return f"{self.address} (PCI ID {self.pci_id})"


def _hex(path: Path) -> int | None:
    text = read_optional(path)
    try:
        return int(text, 16) if text else None
    except ValueError:
        return None


def pci_devices(config: Config) -> list[PciDevice]:
    """Every device on the PCI bus, from sysfs, with the driver each is bound to (the name
    of its `driver` link)."""
    root = config.host("/sys/bus/pci/devices")
    found = []
    if not root.is_dir():
        return []
    for dev in sorted(root.iterdir()):
        vendor, device, pci_class = (_hex(dev / f) for f in ("vendor", "device", "class"))
        if vendor is None or device is None or pci_class is None:
            continue
        try:
            driver: str | None = Path(os.readlink(dev / "driver")).name
        except OSError:
            driver = None
        found.append(
            PciDevice(
                address=dev.name,
                vendor=vendor,
                device=device,
                pci_class=pci_class,
                subsystem_vendor=_hex(dev / "subsystem_vendor"),
                subsystem_device=_hex(dev / "subsystem_device"),
                driver=driver,
            )
        )
    return found


def nvidia_gpus(config: Config) -> list[PciDevice]:
    """NVIDIA GPUs on the PCI bus (vendor 0x10de, class VGA or 3D)."""
    return [d for d in pci_devices(config) if d.is_nvidia_gpu]


def nvswitches(config: Config) -> list[PciDevice]:
    """NVIDIA NVSwitches on the PCI bus (vendor 0x10de, class 0x0680): an HGX/DGX board
    whose GPUs need the fabric manager before CUDA can use them."""
    return [d for d in pci_devices(config) if d.is_nvswitch]


def resolve_in(root: Path | None, path: Path) -> Path:
    """`path` with its symlinks resolved as seen from inside `root` (a chroot).

    Absolute link targets and absolute `path`s are taken relative to `root`; the
    result never leaves it. Without a root this is `Path.resolve()`.
    """
    if root is None:
        return path.resolve()
    inner = path.relative_to(root) if path.is_relative_to(root) else path
    parts = list(Path("/", inner).parts[1:])
    current = root
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            current = current.parent if current != root else root
            continue
        candidate = current / part
        if candidate.is_symlink():
            hops += 1
            if hops > 40:
                raise DriverError(f"Too many symbolic links under {root} resolving {path}.")
            target = Path(os.readlink(candidate))
            if target.is_absolute():
                current = root
                parts = list(target.parts[1:]) + parts
            else:
                parts = list(target.parts) + parts
            continue
        current = candidate
    return current
