"""The linker that links split modules on the node, carried in the package.

The interface objects must be linked with the linker that built them (docs/package.md,
"The file": the seed copied binutils out of the developer container), and a signed package's
signature holds only for the bytes that linker gives. So every package carries its
build's `ld`, the shared libraries it needs and the dynamic loader (members under
`linker/`), and every node that gets the package (through the image, the registry or
another node's store) links with that copy, run through its own loader, outside the
developer root: the same bytes everywhere.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from nvdriver.errors import DriverError
from nvdriver.host import resolve_in
from nvdriver.pattern import Pattern
from nvdriver.run import run

if TYPE_CHECKING:  # the compiler's world: `update` builds, a node only links
    from nvdriver.driver.build import BuildRoot

log = logging.getLogger(__name__)

_LDD_RE = Pattern(r"^\s*(?:(\S+)\s+=>\s+)?(/\S+)\s+\(0x[0-9a-f]+\)\s*$")
# Where the linker's files lie in a package (members) and in a collected copy.
LINKER_DIR = "linker"
PROGRAM = "ld"


class Linker(NamedTuple):
    """How to run `ld`: argv prefix plus its identification (`ld --version`, first line)."""

    argv: tuple[str, ...]
    ident: str


class LinkerFiles(NamedTuple):
    """The build's linker as files: the program, its loader and libraries, relative to
    `root` (`ld`, `lib/NAME`); in a package, the same names under LINKER_DIR."""

    root: Path
    program: str
    loader: str
    libraries: tuple[str, ...]

    def members(self) -> dict[str, Path]:
        """Package member name -> file."""
        names = (self.program, *self.libraries)
        return {f"{LINKER_DIR}/{n}": self.root / n for n in names}

    def manifest_entry(self) -> dict[str, object]:
        return {
            "program": f"{LINKER_DIR}/{self.program}",
            "loader": f"{LINKER_DIR}/{self.loader}",
            "libraries": [f"{LINKER_DIR}/{n}" for n in self.libraries],
        }


def collect_linker(build_root: BuildRoot, dest: Path) -> LinkerFiles:
    """Copy the build root's `ld`, its libraries and the dynamic loader to `dest` (outside
    the developer root, which is unmounted after the build)."""
    where = build_root.root or Path("/")
    inner_ld = build_root.tool("ld")
    if inner_ld is None:
        raise DriverError(
            f"The build root {where} has no ld on its PATH, so its linker cannot be "
            "packed for linking on the node.",
            hint="Use a Flatcar developer container (it ships binutils) for the build.",
        )
    ld = resolve_in(build_root.root, Path(inner_ld))
    (dest / "lib").mkdir(parents=True)
    shutil.copy2(ld, dest / PROGRAM)
    out = run(build_root.argv(["ldd", build_root.inside(ld)])).stdout
    loader = None
    libraries = []
    for line in out.splitlines():
        m = _LDD_RE.match(line)
        if not m:
            continue
        name, path = m.groups()
        lib = resolve_in(build_root.root, Path(path))
        target = Path("lib") / (name if name and "/" not in name else Path(path).name)
        shutil.copy2(lib, dest / target)
        libraries.append(str(target))
        if name is None:
            loader = str(target)
    if loader is None:
        raise DriverError(
            f"`ldd {inner_ld}` in {where} names no dynamic loader, so its linker cannot be "
            "packed for linking on the node.",
            hint="Use a Flatcar developer container (a dynamically linked ld) for the build.",
        )
    return LinkerFiles(dest, PROGRAM, loader, tuple(libraries))


def packed_linker(entry: Mapping[str, object] | None, members: Path, ident: str) -> Linker:
    """The linker a package carries (its manifest's `linker_files`, extracted under
    `members`), else this container's `ld` (a package made without one: a warning when
    it is not the linker that built the package)."""
    if entry is not None:
        loader = members / str(entry["loader"])
        loader.chmod(0o755)  # extracted as a plain file
        program = members / str(entry["program"])
        library_path = str(loader.parent)
        return Linker((str(loader), "--library-path", library_path, str(program)), ident)
    local = next(iter(run(["ld", "--version"]).stdout.splitlines()), "").strip()
    if local != ident:
        log.warning(
            "Linking with %s; the package was built with %s and carries no linker", local, ident
        )
    return Linker(("ld",), local)
