"""The private module tree: NVIDIA's linked modules for one kernel, and which to load.

NVIDIA's modules are installed into /opt/nvidia/VERSION (see driver/link.py)
and loaded with `modprobe -d` from there. modprobe then sees only that tree, so
the host modules they need (`drm`, `video`, ...: whatever their `depends` and
`softdep` name) must come from the host's own tree first.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from nvdriver.driver.source import MODULE_ORDER
from nvdriver.errors import DriverError
from nvdriver.kmod.loaded import LoadedModule, sysfs_name
from nvdriver.kmod.modversions import NotAModule, read_modinfo

log = logging.getLogger(__name__)

# Always loaded when the package has them; nvidia-drm and nvidia-peermem only on request.
BASE_MODULES = ("nvidia", "nvidia-uvm", "nvidia-modeset")


class ModuleTree(NamedTuple):
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

    def fields(self, module: str) -> dict[str, list[str]]:
        """The modinfo fields of an installed module, read from its `.modinfo` once: each
        field's non-empty values, as `modinfo -F FIELD` prints them."""
        path = self.path(module)
        try:
            found = read_modinfo(path)
        except (OSError, NotAModule) as e:
            raise DriverError(
                f"Cannot read the module information of {path}: {e}.",
                hint="The linked module tree is damaged; the next start links it again "
                "(nvidia-driver unload, then init or load).",
            ) from e
        return {k: [v.strip() for v in values if v.strip()] for k, values in found.items()}

    def host_dependencies(self, modules: Sequence[str]) -> tuple[list[str], list[str]]:
        """Modules of the host that `modules` need and that are not in this tree: those
        they link against (`depends`) and those they want first (`softdep` pre).

        `modprobe -d` sees only this tree, so these are loaded from the host's first.
        """
        ours = {sysfs_name(m) for m in self.modules()}
        depends: list[str] = []
        softdeps: list[str] = []
        for module in modules:
            fields = self.fields(module)
            for line in fields.get("depends", []):
                depends += line.split(",")
            for line in fields.get("softdep", []):
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
            fields = self.fields(module)
            if fields.get("srcversion", []) != [m.srcversion]:
                return False
            version = fields.get("version", [])
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
