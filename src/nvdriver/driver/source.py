"""The driver's kernel module source tree and its flavours (which one to use: flavour.py).

NVIDIA's installer unpacks to /usr/src/nvidia-VERSION with `kernel/` (the
proprietary flavour: interface sources plus closed core objects) and
`kernel-open/`; Debian's source packages hold the same trees under
`modules/nvidia-kernel` and `modules/nvidia-open-kernel`.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import NamedTuple

from nvdriver.config import Config, validate_driver_version
from nvdriver.errors import DriverError, UnsupportedError, UsageError
from nvdriver.pattern import Pattern


class Flavour(str, enum.Enum):
    """The two kernel module flavours NVIDIA ships (a str: manifests and file names use it)."""

    PROPRIETARY = "proprietary"
    OPEN = "open"

    def __str__(self) -> str:
        return self.value


FLAVOURS = tuple(Flavour)
FLAVOUR_DIRS: dict[str, tuple[str, ...]] = {
    Flavour.PROPRIETARY: ("kernel", "modules/nvidia-kernel"),
    Flavour.OPEN: ("kernel-open", "modules/nvidia-open-kernel"),
}
# The modules NVIDIA's Makefile builds when their directory exists, in load order.
MODULE_ORDER = (
    "nvidia",
    "nvidia-uvm",
    "nvidia-modeset",
    "nvidia-drm",
    "nvidia-peermem",
    "nvidia-vgpu-vfio",
)


class SplitModule(NamedTuple):
    """A module linked on the node from an interface object and NVIDIA's core object."""

    name: str
    interface: str  # the Makefile target, e.g. nv-linux.o
    core: str  # relative to the flavour dir, e.g. nvidia/nv-kernel.o_binary


SPLIT_MODULES = {
    "nvidia": SplitModule("nvidia", "nv-linux.o", "nvidia/nv-kernel.o_binary"),
    "nvidia-modeset": SplitModule(
        "nvidia-modeset", "nv-modeset-linux.o", "nvidia-modeset/nv-modeset-kernel.o_binary"
    ),
}

_VERSION_RE = Pattern(r'NV_VERSION_STRING\s*[:?]?=\s*\\?"?([0-9][0-9.]*)')


class DriverSource(NamedTuple):
    root: Path
    version: str

    @classmethod
    def from_config(cls, config: Config) -> DriverSource:
        root = config.driver_source
        if not root.is_dir():
            raise DriverError(
                f"The driver source {root} does not exist.",
                hint="Set NVIDIA_DRIVER_SOURCE to the directory holding kernel/ "
                "(as NVIDIA's installer unpacks to /usr/src/nvidia-VERSION).",
            )
        dirs = [d for f in FLAVOURS if (d := cls._find_flavour_dir(root, f)) is not None]
        if not dirs:
            raise DriverError(
                f"The driver source {root} has neither kernel/ nor kernel-open/.",
                hint="Set NVIDIA_DRIVER_SOURCE to the driver's /usr/src/nvidia-VERSION tree.",
            )
        version = read_version(dirs[0])
        if config.driver_version is not None and config.driver_version != version:
            raise UsageError(
                f"DRIVER_VERSION={config.driver_version} but the driver source {root} "
                f"is version {version}.",
                hint="Set DRIVER_VERSION to the version of the driver in the image.",
            )
        return cls(root=root, version=version)

    @staticmethod
    def _find_flavour_dir(root: Path, flavour: str) -> Path | None:
        for rel in FLAVOUR_DIRS[flavour]:
            if (root / rel / "Makefile").is_file():
                return root / rel
        return None

    def flavours(self) -> list[Flavour]:
        return [f for f in FLAVOURS if self._find_flavour_dir(self.root, f) is not None]

    def flavour_dir(self, flavour: str) -> Path:
        path = self._find_flavour_dir(self.root, flavour)
        if path is None:
            raise UnsupportedError(
                f"The driver source {self.root} has no {flavour} kernel modules "
                f"({' or '.join(FLAVOUR_DIRS[flavour])}).",
                hint="Set KERNEL_MODULE_TYPE to a flavour this driver image ships.",
            )
        return path

    def modules(self, flavour: str) -> list[str]:
        """The modules this flavour's tree builds, in load order."""
        tree = self.flavour_dir(flavour)
        return [m for m in MODULE_ORDER if (tree / m).is_dir()]


def read_version(tree: Path) -> str:
    """The driver version a module tree builds, from NV_VERSION_STRING in Kbuild/version.mk."""
    for name in ("Kbuild", "version.mk", "utils.mk"):
        path = tree / name
        if path.is_file() and (m := _VERSION_RE.search(path.read_text(errors="replace"))):
            return validate_driver_version(m.group(1), f"NV_VERSION_STRING in {path}")
    raise DriverError(
        f"Cannot tell the driver version of {tree}: no NV_VERSION_STRING in Kbuild or version.mk.",
        hint="Point NVIDIA_DRIVER_SOURCE at an unmodified NVIDIA kernel module source tree.",
    )
