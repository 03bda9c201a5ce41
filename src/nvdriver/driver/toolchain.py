"""The linker that links modules on the node.

The interface objects must be linked with the linker that built them (FACTS:
the seed copied binutils out of the developer container). After a build in a
developer root, its `ld` and the shared libraries it needs are saved under
NVIDIA_DRIVER_CACHE/toolchain/<id>/, where <id> names the linker's
identification as the package manifest records it; `init` runs that copy
through the saved dynamic loader, so it works outside the developer root.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import shutil
from pathlib import Path

from nvdriver.atomic import TEMP_PREFIX, replace_directory
from nvdriver.driver.build import BuildRoot
from nvdriver.errors import DriverError
from nvdriver.host import resolve_in
from nvdriver.run import run

log = logging.getLogger(__name__)

_LDD_RE = re.compile(r"^\s*(?:(\S+)\s+=>\s+)?(/\S+)\s+\(0x[0-9a-f]+\)\s*$")


@dataclasses.dataclass(frozen=True)
class Linker:
    """How to run `ld`: argv prefix plus its identification (`ld --version`, first line)."""

    argv: tuple[str, ...]
    ident: str


def toolchain_dir(cache: Path, ident: str) -> Path:
    return cache / "toolchain" / hashlib.sha256(ident.encode()).hexdigest()[:16]


def save_linker(build_root: BuildRoot, cache: Path, ident: str) -> Path:
    """Copy the build root's `ld`, its libraries and the dynamic loader into the cache."""
    assert build_root.root is not None
    dest = toolchain_dir(cache, ident)
    if (dest / "ident").is_file() and (dest / "ident").read_text() == ident:
        return dest
    inner_ld = build_root.tool("ld")
    if inner_ld is None:
        raise DriverError(
            f"The build root {build_root.root} has no ld on its PATH, so its linker cannot be "
            "saved for linking on the node.",
            hint="Use a Flatcar developer container (it ships binutils) for the build.",
        )
    ld = resolve_in(build_root.root, Path(inner_ld))
    tmp = dest.with_name(TEMP_PREFIX + dest.name)  # a killed run's is removed here (build lock)
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "lib").mkdir(parents=True)
    shutil.copy2(ld, tmp / "ld")
    out = run(build_root.argv(["ldd", build_root.inside(ld)])).stdout
    loader = None
    for line in out.splitlines():
        m = _LDD_RE.match(line)
        if not m:
            continue
        name, path = m.groups()
        lib = resolve_in(build_root.root, Path(path))
        target = tmp / "lib" / (name if name and "/" not in name else Path(path).name)
        shutil.copy2(lib, target)
        if name is None:
            loader = target
    if loader is None:
        raise DriverError(
            f"`ldd {inner_ld}` in {build_root.root} names no dynamic loader, so its linker "
            "cannot be saved for linking on the node.",
            hint="Use a Flatcar developer container (a dynamically linked ld) for the build.",
        )
    (tmp / "loader").symlink_to(Path("lib") / loader.name)
    (tmp / "ident").write_text(ident)
    replace_directory(tmp, dest)
    log.info("Saved the developer container's linker (%s) to %s", ident, dest)
    return dest


def linker_for(cache: Path, ident: str) -> Linker:
    """The saved linker that matches `ident`, else this container's `ld` (warning if it differs)."""
    saved = toolchain_dir(cache, ident)
    if (saved / "ident").is_file() and (saved / "ident").read_text() == ident:
        argv = (str(saved / "loader"), "--library-path", str(saved / "lib"), str(saved / "ld"))
        return Linker(argv, ident)
    local = next(iter(run(["ld", "--version"]).stdout.splitlines()), "").strip()
    if local != ident:
        log.warning(
            "Linking with %s; the package was built with %s and no copy of that linker is "
            "saved in %s",
            local,
            ident,
            cache / "toolchain",
        )
    return Linker(("ld",), local)
