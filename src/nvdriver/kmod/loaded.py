"""What is loaded: NVIDIA's modules as /sys/module and /proc show them.

Only reads; loading and unloading are in `loading` and `unloading`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from nvdriver.config import Config
from nvdriver.driver.source import MODULE_ORDER
from nvdriver.host import read_optional


def sysfs_name(module: str) -> str:
    """`nvidia-uvm` is `nvidia_uvm` in /sys/module and /proc/modules."""
    return module.replace("-", "_")


class LoadedModule(NamedTuple):
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


def loaded_names(config: Config) -> set[str]:
    """Every loaded module's name (from /proc/modules, machine-readable)."""
    try:
        text = config.host("/proc/modules").read_text(errors="replace")
    except OSError:
        return set()
    return {line.split()[0] for line in text.splitlines() if line.strip()}
