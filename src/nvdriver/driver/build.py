"""Compiling the kernel interface objects and the plain modules for one kernel.

The build runs NVIDIA's own Makefile on a copy of the flavour's tree (the
image's tree stays clean and read-only), either in this container or in a
developer root entered with chroot, always with SYSSRC/SYSOUT given: `uname -r`
inside is the host's, not the target's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from nvdriver.driver.source import SPLIT_MODULES, DriverSource
from nvdriver.errors import DriverError
from nvdriver.host import KernelIdentity, KernelTree, resolve_in
from nvdriver.kmod.modversions import NotAModule, read_module, read_symvers
from nvdriver.run import RunError, run, spawn, which

if TYPE_CHECKING:  # toolchain needs BuildRoot from here
    from nvdriver.driver.toolchain import LinkerFiles

log = logging.getLogger(__name__)

PROGRESS_INTERVAL = 10.0
# Linux 6.11+ compiles a module's constant modinfo (vermagic, retpoline) once, into
# .module-common.o, and links it into every .ko (scripts/Makefile.modfinal). NVIDIA's
# `%-linux.o` rule links only the .mod.o into an interface object, so without it a
# node-linked nvidia.ko has no vermagic: the kernel refuses it, or with
# CONFIG_MODULE_FORCE_LOAD loads it tainted ("bad vermagic").
MODULE_COMMON = ".module-common.o"
SEARCH_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")


@dataclasses.dataclass(frozen=True)
class BuildRoot:
    """Where the toolchain runs: this container (root None) or a developer root via chroot."""

    root: Path | None = None

    def argv(self, cmd: list[str]) -> list[str]:
        return ["chroot", str(self.root), *cmd] if self.root is not None else cmd

    def inside(self, path: Path) -> str:
        """`path` (a host path under the root) as the toolchain sees it."""
        if self.root is None:
            return str(path)
        return "/" + str(path.relative_to(self.root))

    def tool(self, name: str) -> str | None:
        """`name` on the PATH as the toolchain sees it (links resolved inside the root)."""
        if self.root is None:
            found = which(name)
            return None if found is None else str(found)
        for d in SEARCH_PATH:
            candidate = resolve_in(self.root, Path(d) / name)
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return f"{d}/{name}"
        return None


@dataclasses.dataclass(frozen=True)
class Artifact:
    """One module's build output: a finished .ko, or an interface object plus its core."""

    module: str
    path: Path
    core: str | None = None  # relative to the flavour dir, for split modules
    # Signed split modules: the signature to append after linking on the node, and
    # the SHA-256 the linked module must have for the signature to be valid.
    signature: Path | None = None
    linked_sha256: str | None = None


@dataclasses.dataclass(frozen=True)
class BuildOutput:
    kernel: KernelIdentity
    flavour: str
    driver_version: str
    tree: Path  # the built copy of the flavour dir
    artifacts: tuple[Artifact, ...]
    ld_scripts: tuple[Path, ...]
    compiler: str
    linker: str
    signing: dict[str, str] | None = None
    linker_files: LinkerFiles | None = None  # the build's ld, packed for linking on nodes


def build_modules(
    source: DriverSource,
    flavour: str,
    kernel: KernelTree,
    workdir: Path,
    *,
    jobs: int,
    build_root: BuildRoot | None = None,
) -> BuildOutput:
    """Build `flavour` of `source` for `kernel` in `workdir` (under the build root, if any).

    Proprietary: the interface objects (`nv-linux.o`, `nv-modeset-linux.o`, each
    with its `.mod.o` linked in) and the plain modules. Open: every module finished.
    """
    build_root = build_root or BuildRoot()
    identity = KernelIdentity.from_build_tree(kernel.output)
    modules = source.modules(flavour)
    tree = workdir / "kernel"
    _copy_tree(source.flavour_dir(flavour), tree)

    cc = _compiler(kernel, build_root)
    split = [SPLIT_MODULES[m] for m in modules if flavour == "proprietary" and m in SPLIT_MODULES]
    targets = ["modules", *(s.interface for s in split)]
    cmd = [
        "make",
        "-C",
        build_root.inside(tree),
        f"-j{jobs}",
        f"SYSSRC={build_root.inside(kernel.source)}",
        f"SYSOUT={build_root.inside(kernel.output)}",
        f"CC={cc}",
        *targets,
    ]
    log.info(
        "Building NVIDIA %s %s modules for kernel %s with %d jobs",
        flavour,
        source.version,
        identity.release,
        jobs,
    )
    _make(build_root.argv(cmd), tree, workdir / "build.log")
    common = tree / MODULE_COMMON
    if common.is_file():
        for each in split:
            _link_into(build_root, tree / each.interface, common)

    artifacts = []
    for module in modules:
        if (s := SPLIT_MODULES.get(module)) in split and s is not None:
            artifacts.append(Artifact(module, tree / s.interface, core=s.core))
        else:
            artifacts.append(Artifact(module, tree / f"{module}.ko"))
    for a in artifacts:
        if not a.path.is_file():
            raise DriverError(
                f"The build of {a.module} for kernel {identity.release} produced no {a.path.name}.",
                hint=f"See the build log {workdir / 'build.log'}.",
            )
    return BuildOutput(
        kernel=kernel_abi(identity, kernel, artifacts),
        flavour=flavour,
        driver_version=source.version,
        tree=tree,
        artifacts=tuple(artifacts),
        ld_scripts=tuple(kernel.linker_scripts()),
        compiler=_first_line(build_root.argv([cc, "--version"])),
        linker=_first_line(build_root.argv(["ld", "--version"])),
    )


def kernel_abi(
    identity: KernelIdentity, kernel: KernelTree, artifacts: Sequence[Artifact]
) -> KernelIdentity:
    """`identity` with what the kernel will check of these modules: their vermagic and the
    CRCs of the kernel's symbols they import (their `__versions`; those the tree's
    Module.symvers lists: not the symbols the package's modules export to each other)."""
    symvers_path = kernel.output / "Module.symvers"
    symvers = read_symvers(symvers_path) if symvers_path.is_file() else None
    imports: dict[str, int] = {}
    vermagics: set[str] = set()
    for a in artifacts:
        try:
            facts = read_module(a.path)
        except NotAModule as e:
            raise DriverError(
                f"The build's {a.path.name} is not a kernel object: {e}.",
                hint="The driver's Makefile made something else than modules; see its build log.",
            ) from e
        imports.update(facts.versions)
        if facts.vermagic is not None:
            vermagics.add(facts.vermagic)
    if len(vermagics) > 1:
        raise DriverError(
            f"The modules built for kernel {identity.release} disagree about their vermagic: "
            f"{', '.join(sorted(vermagics))}.",
            hint="The kernel tree is inconsistent; use the developer container of the release.",
        )
    kernel_symbols = {n: c for n, c in imports.items() if symvers is None or n in symvers}
    return identity.with_abi(next(iter(vermagics), None), kernel_symbols)


def _link_into(build_root: BuildRoot, obj: Path, extra: Path) -> None:
    """Merge the relocatable object `extra` into `obj` (`ld -r`), in place."""
    merged = obj.with_name(obj.name + ".merged")
    inside = build_root.inside
    run(build_root.argv(["ld", "-r", "-o", inside(merged), inside(obj), inside(extra)]))
    merged.replace(obj)


def _compiler(kernel: KernelTree, build_root: BuildRoot) -> str:
    """The kernel's own compiler (CONFIG_CC_VERSION_TEXT) when present, as NVIDIA's Makefile."""
    text = kernel.config_value("CONFIG_CC_VERSION_TEXT")
    if text:
        wanted = text.split()[0]
        if build_root.tool(wanted) is not None:
            return wanted
        log.warning(
            "The kernel was built with %s, which is not here; using cc (see gpu-operator#564).",
            wanted,
        )
    if build_root.tool("cc") is None:
        raise DriverError(
            "No C compiler (cc) is available to build the kernel modules.",
            hint="Build inside the Flatcar developer container of this kernel's release.",
        )
    return "cc"


def _first_line(cmd: list[str]) -> str:
    return run(cmd).stdout.splitlines()[0].strip()


def _copy_tree(src: Path, dest: Path) -> None:
    """Copy the flavour dir; hard links where possible (the build never writes into sources)."""

    def link_or_copy(s: str, d: str) -> object:
        try:
            os.link(s, d)
            return d
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EACCES):
                raise
            return shutil.copy2(s, d)

    shutil.copytree(src, dest, symlinks=True, copy_function=link_or_copy)


def count_objects(tree: Path) -> int:
    """The object files under `tree` so far, for the progress report. kbuild's temporary
    directories (`.tmp_PID` of its try-run, of NVIDIA's conftest) come and go while the
    tree is walked: os.walk skips one gone (Path.rglob raised FileNotFoundError, which
    ended a build that was going well as an unexpected error)."""
    return sum(1 for _, _, files in os.walk(tree) for name in files if name.endswith(".o"))


def _make(argv: list[str], tree: Path, logfile: Path) -> None:
    """Run make with its output in `logfile`, reporting progress every few seconds."""
    start = time.monotonic()
    last = start
    with (
        logfile.open("wb") as out,
        spawn(argv, stdout=out, stderr=subprocess.STDOUT, process_group=True) as proc,
    ):
        while True:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1.0)
            if proc.returncode is not None:
                break
            now = time.monotonic()
            if now - last >= PROGRESS_INTERVAL:
                last = now
                done = count_objects(tree)
                log.info("building: %d objects after %.0f s", done, now - start)
    if proc.returncode != 0:
        raise RunError(
            argv,
            proc.returncode,
            logfile.read_text(errors="replace"),
            hint=f"The whole build log is {logfile}.",
        )
    log.info("Build finished in %.0f s", time.monotonic() - start)
