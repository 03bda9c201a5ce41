"""A stand-in for NVIDIA's driver source tree, small enough to build in seconds.

`kernel/` here mimics the kernel module sources of NVIDIA's .run package (the
``kernel`` and ``kernel-open`` directories): the same Makefile interface
(``make SYSSRC=... SYSOUT=... modules nv-linux.o nv-modeset-linux.o``), the
same Kbuild structure, the same outputs (nvidia, nvidia-uvm, nvidia-modeset,
nvidia-drm; nv-linux.o and nv-modeset-linux.o for linking on a node), and the
same split of nvidia.ko and nvidia-modeset.ko into a kernel interface layer
and a precompiled, OS-agnostic core object (``nv-kernel.o_binary``,
``nv-modeset-kernel.o_binary``). The cores are compiled here from `core/`,
without kernel headers, as NVIDIA ships them.

`make_standin_source` writes such a tree; `build_standin` builds it against a
kernel build directory; `link_module` links a module as a node would;
`build_holder` builds a module that keeps nvidia.ko in use.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from nvdriver.driver.build import MODULE_COMMON

HERE = Path(__file__).resolve().parent
KERNEL_TEMPLATE = HERE / "kernel"
CORE_SOURCES = HERE / "core"
EXTRA_MODULES = HERE / "extra"
HOLDER_SOURCES = HERE / "holder"

DEFAULT_VERSION = "535.999.01"
FLAVOURS = ("kernel", "kernel-open")
HOLDER_MODULE = "nvidia_standin_holder"

# The modules the tree builds (without peermem), in NVIDIA's load order.
MODULES = ("nvidia", "nvidia-uvm", "nvidia-modeset", "nvidia-drm")
# Core source -> where the precompiled object goes in the tree.
CORES = {
    "nv-kernel.c": "nvidia/nv-kernel.o_binary",
    "nv-modeset-kernel.c": "nvidia-modeset/nv-modeset-kernel.o_binary",
}
# The interface files the Makefile's %-linux.o rule makes, with their cores.
INTERFACES = {
    "nvidia": ("nv-linux.o", "nvidia/nv-kernel.o_binary"),
    "nvidia-modeset": ("nv-modeset-linux.o", "nvidia-modeset/nv-modeset-kernel.o_binary"),
}

# How the cores are compiled: no kernel headers, no libc, code fit for a
# kernel module (kernel code model, no red zone, no FPU/SIMD registers, no
# stack protector, no unwind tables), indirect branches through the kernel's
# retpoline thunks as in NVIDIA's binaries (which reference
# __x86_indirect_thunk_*).
CORE_CFLAGS_X86_64 = (
    "-c",
    "-O2",
    "-std=gnu11",
    "-nostdinc",
    "-ffreestanding",
    "-fno-builtin",
    "-fno-pic",
    "-fno-pie",
    "-fno-common",
    "-fno-strict-aliasing",
    "-mcmodel=kernel",
    "-mno-red-zone",
    "-mno-mmx",
    "-mno-sse",
    "-mno-sse2",
    "-mno-3dnow",
    "-mno-avx",
    "-mno-80387",
    "-mno-fp-ret-in-387",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables",
    "-fno-jump-tables",
    "-fcf-protection=none",
    "-mindirect-branch=thunk-extern",
    "-mindirect-branch-register",
    "-Wall",
    "-Werror",
)

_VERSION_RE = re.compile(r"^[0-9]+\.[0-9]+(\.[0-9]+)?$")
# The line of the top Kbuild that carries the driver version (as NVIDIA's).
_KBUILD_VERSION_LINE = re.compile(r'^(ccflags-y \+= -DNV_VERSION_STRING=\\")[^\\"]*(\\")$', re.M)
_BUILD_OUTPUTS = shutil.ignore_patterns(
    "*.o",
    "*.ko",
    "*.mod",
    "*.mod.c",
    "*.o_binary",
    ".*.cmd",
    "Module.symvers",
    "modules.order",
    "nv_compiler.h",
    "conftest",
    "__pycache__",
)


class StandinError(RuntimeError):
    """Building or linking the stand-in failed; the message has the output's tail."""


def _run(cmd: Sequence[str | os.PathLike[str]], *, timeout: float = 300) -> str:
    argv = [os.fspath(c) for c in cmd]
    proc = subprocess.run(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-40:])
        raise StandinError(f"{' '.join(argv)} exited with status {proc.returncode}:\n{tail}")
    return proc.stdout


def compile_core(
    source: Path,
    output: Path,
    *,
    version: str,
    open_flavour: bool = False,
    cc: str = "gcc",
) -> Path:
    """Compile one stand-in core (`core/*.c`) to a relocatable object, like an .o_binary."""
    machine = platform.machine()
    if machine not in ("x86_64", "amd64"):
        raise StandinError(f"the stand-in cores are only set up for x86_64, not {machine}")
    cmd = [
        cc,
        *CORE_CFLAGS_X86_64,
        f"-I{KERNEL_TEMPLATE / 'common' / 'inc'}",
        f'-DNV_VERSION_STRING="{version}"',
    ]
    if open_flavour:
        cmd.append("-DNV_STANDIN_OPEN")
    output.parent.mkdir(parents=True, exist_ok=True)
    _run([*cmd, "-o", str(output), str(source)])
    return output


def make_standin_source(
    dest: Path,
    *,
    version: str = DEFAULT_VERSION,
    flavours: tuple[str, ...] = FLAVOURS,
    peermem: bool = False,
    cc: str = "gcc",
) -> Path:
    """Write a stand-in driver source tree at `dest`, laid out like NVIDIA's unpacked .run.

    For each flavour (``kernel``: proprietary, ``kernel-open``: open), writes
    ``dest/<flavour>/`` with the Makefile, the Kbuild (its ``NV_VERSION_STRING``
    line set to `version`), the module directories and the compiled cores
    ``nvidia/nv-kernel.o_binary`` and ``nvidia-modeset/nv-modeset-kernel.o_binary``.
    Both flavours have the same sources; only the core's identification string
    differs ("NVIDIA UNIX Open Kernel Module for x86_64" for ``kernel-open``).
    With `peermem`, the tree also has ``nvidia-peermem/``. Returns `dest`.
    """
    if not _VERSION_RE.match(version):
        raise ValueError(f"not a driver version: {version!r}")
    unknown = set(flavours) - set(FLAVOURS)
    if unknown:
        raise ValueError(f"unknown flavours {sorted(unknown)}; known: {FLAVOURS}")
    dest.mkdir(parents=True, exist_ok=True)
    for flavour in flavours:
        tree = dest / flavour
        shutil.copytree(KERNEL_TEMPLATE, tree, ignore=_BUILD_OUTPUTS, dirs_exist_ok=True)
        if peermem:
            shutil.copytree(
                EXTRA_MODULES / "nvidia-peermem",
                tree / "nvidia-peermem",
                ignore=_BUILD_OUTPUTS,
                dirs_exist_ok=True,
            )
        kbuild = tree / "Kbuild"
        text, n = _KBUILD_VERSION_LINE.subn(
            lambda m: f"{m.group(1)}{version}{m.group(2)}", kbuild.read_text()
        )
        if n != 1:
            raise StandinError(f"{kbuild}: expected one NV_VERSION_STRING line, found {n}")
        kbuild.write_text(text)
        for source, binary in CORES.items():
            compile_core(
                CORE_SOURCES / source,
                tree / binary,
                version=version,
                open_flavour=flavour == "kernel-open",
                cc=cc,
            )
    return dest


def kernel_release(kernel_build: Path) -> str:
    """The release (``uname -r``) a kernel build directory builds for (UTS_RELEASE)."""
    header = kernel_build / "include" / "generated" / "utsrelease.h"
    m = re.search(r'UTS_RELEASE\s+"([^"]+)"', header.read_text())
    if m is None:
        raise StandinError(f"no UTS_RELEASE in {header}")
    return m.group(1)


def kernel_cc(kernel_build: Path) -> str | None:
    """The compiler named by the kernel's CONFIG_CC_VERSION_TEXT, if it is on PATH."""
    config = kernel_build / ".config"
    if not config.is_file():
        return None
    m = re.search(r'^CONFIG_CC_VERSION_TEXT="([^" ]+)', config.read_text(), re.M)
    if m is None or shutil.which(m.group(1)) is None:
        return None
    return m.group(1)


def module_lds(kernel_build: Path) -> Path | None:
    """The kernel's module linker script: arch/x86/module.lds (Debian), scripts/module.lds."""
    for rel in ("arch/x86/module.lds", "scripts/module.lds"):
        if (kernel_build / rel).is_file():
            return kernel_build / rel
    return None


def make_command(tree: Path, kernel_build: Path, *, jobs: int | None = None) -> list[str]:
    """The command line that builds a tree as a driver container does."""
    return [
        "make",
        "-C",
        str(tree),
        f"SYSSRC={kernel_build}",
        f"SYSOUT={kernel_build}",
        "-j",
        str(jobs or os.cpu_count() or 1),
        "modules",
        "nv-linux.o",
        "nv-modeset-linux.o",
    ]


def build_standin(tree: Path, kernel_build: Path, *, jobs: int | None = None) -> str:
    """Build a stand-in tree (one flavour's directory) against `kernel_build`; return the log."""
    return _run(make_command(tree, kernel_build, jobs=jobs))


def link_module(output: Path, interface: Path, core: Path, lds: Path | None) -> Path:
    """Link a module as on a node: ``ld -r -T module.lds -o X.ko nv-*-linux.o core.o_binary``.

    On Linux 6.11+ the interface object also takes the tree's .module-common.o (its
    vermagic), as driver/build.py merges it into the interface objects it packs.
    """
    script = ["-T", str(lds)] if lds is not None else []
    common = interface.parent / MODULE_COMMON
    extra = [str(common)] if common.is_file() else []
    output.parent.mkdir(parents=True, exist_ok=True)
    _run(["ld", "-r", *script, "-o", str(output), str(interface), *extra, str(core)])
    return output


def build_holder(
    dest: Path, kernel_build: Path, nvidia_symvers: Path, name: str = HOLDER_MODULE
) -> Path:
    """Build the holder module (named `name`: `nvidia_standin_holder`, or `gdrdrv` to
    stand in for GDRCopy's module) in `dest`; return its .ko.

    `nvidia_symvers` is the Module.symvers of a built stand-in tree (it gives
    the versions of nvidia's exported symbols); the module depends on nvidia.
    """
    shutil.copytree(HOLDER_SOURCES, dest, ignore=_BUILD_OUTPUTS, dirs_exist_ok=True)
    cmd = [
        "make",
        "-C",
        str(dest),
        f"KDIR={kernel_build}",
        f"NVIDIA_SYMVERS={nvidia_symvers.resolve()}",
        f"HOLDER_NAME={name}",
    ]
    cc = kernel_cc(kernel_build)
    if cc is not None:
        cmd.append(f"CC={cc}")
    _run([*cmd, "modules"])
    ko = dest / f"{name}.ko"
    if not ko.is_file():
        raise StandinError(f"building the holder module gave no {ko}")
    return ko
