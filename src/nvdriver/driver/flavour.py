"""Which kernel module flavour to build and load: KERNEL_MODULE_TYPE, `auto` decided by the GPUs.

The rules (docs/configuration.md, "The driver and the kernel"): the proprietary modules are
required for Maxwell, Pascal and Volta; the open ones need GSP (Turing and
newer) and are NVIDIA's default from branch 560; Grace Hopper and Blackwell
require the open ones; a mix of old and new GPUs takes the proprietary ones.

Which GPU is which comes from the driver's own `supported-gpus.json`: a GPU
whose entry lists the feature `kernelopen` can run the open modules, a GPU
listed without it cannot. The file is looked for where NVIDIA's `.run` has it
(`supported-gpus/supported-gpus.json` in the unpacked tree, installed as
/usr/share/doc/NVIDIA_GLX-1.0/supported-gpus/supported-gpus.json) and where
Debian's `nvidia-driver` package ships it (gzip'd,
/usr/share/doc/nvidia-driver/supported-gpus.json.gz); the driver image puts it
beside the module sources, NVIDIA_DRIVER_SOURCE/supported-gpus/supported-gpus.json,
as the `.run` tree does. Without the file the open modules are never guessed
for a GPU that might be Pascal or Volta: `auto` takes the proprietary ones
and says so (log and `status`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from nvdriver.config import Config
from nvdriver.driver.source import DriverSource, Flavour
from nvdriver.errors import DriverError, UnsupportedError
from nvdriver.host import PciDevice

# The branch from which NVIDIA's installer defaults to the open modules.
OPEN_DEFAULT_BRANCH = 560
# Grace Hopper (GH200: 0x2342, 0x2348) and Blackwell and later (device ids from 0x2900:
# B200 0x2901, GB200 0x2941, RTX PRO 6000 0x2bb5, B300 0x3182 in open-gpu-kernel-modules'
# README) are driven by the open modules only.
GRACE_HOPPER_IDS = frozenset({0x2342, 0x2348})
FIRST_BLACKWELL_ID = 0x2900
OPEN_FEATURE = "kernelopen"


def supported_gpus_paths(config: Config) -> list[Path]:
    """Where supported-gpus.json may be, in the order they are tried."""
    root = config.options.container_root
    return [
        config.driver_source / "supported-gpus" / "supported-gpus.json",
        root / "usr/share/doc/NVIDIA_GLX-1.0/supported-gpus/supported-gpus.json",
        root / "usr/share/doc/nvidia-driver/supported-gpus.json.gz",
    ]


class Chip(NamedTuple):
    """One entry of supported-gpus.json."""

    device: int
    name: str
    features: frozenset[str]
    subsystem_vendor: int | None = None
    subsystem_device: int | None = None
    legacy_branch: str | None = None  # driven only by an older branch (e.g. "470.xx")


class SupportedGpus(NamedTuple):
    """The driver's list of the GPUs it supports and their features."""

    path: Path
    chips: tuple[Chip, ...]

    @classmethod
    def read(cls, path: Path) -> SupportedGpus:
        try:
            data = path.read_bytes()
            if path.suffix == ".gz":
                import gzip  # Debian's gzip'd list; NVIDIA's .run has it plain

                data = gzip.decompress(data)
            chips = tuple(
                Chip(
                    device=int(c["devid"], 16),
                    name=str(c.get("name", "")),
                    features=frozenset(c.get("features", ())),
                    subsystem_vendor=int(c["subvendorid"], 16) if "subvendorid" in c else None,
                    subsystem_device=int(c["subdevid"], 16) if "subdevid" in c else None,
                    legacy_branch=c.get("legacybranch"),
                )
                for c in json.loads(data)["chips"]
            )
        except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise DriverError(
                f"The driver's GPU list {path} is unreadable or malformed ({e}).",
                hint="Put NVIDIA's own supported-gpus.json there (from the driver's .run), "
                "or set KERNEL_MODULE_TYPE to open or proprietary.",
            ) from None
        return cls(path, chips)

    @classmethod
    def find(cls, config: Config) -> SupportedGpus | None:
        path = next((p for p in supported_gpus_paths(config) if p.is_file()), None)
        return None if path is None else cls.read(path)

    def chip(self, gpu: PciDevice) -> Chip | None:
        """The entry of `gpu`: the one of its subsystem ids, else the one of its device id."""
        same = [c for c in self.chips if c.device == gpu.device]
        exact = [
            c
            for c in same
            if (c.subsystem_vendor, c.subsystem_device)
            == (gpu.subsystem_vendor, gpu.subsystem_device)
        ]
        generic = [c for c in same if c.subsystem_device is None]
        return next(iter(exact + generic + same), None)


def requires_open(gpu: PciDevice) -> bool:
    """Grace Hopper and Blackwell (and later): no proprietary module drives them."""
    return gpu.device in GRACE_HOPPER_IDS or gpu.device >= FIRST_BLACKWELL_ID


class FlavourChoice(NamedTuple):
    """The flavour, why, and the GPU list it was decided with (None: none was found)."""

    flavour: Flavour
    reason: str
    gpu_list: Path | None
    warning: str | None = None  # something the log and `status` must show


def _names(gpus: Sequence[PciDevice], gpu_list: SupportedGpus | None) -> str:
    def one(g: PciDevice) -> str:
        chip = gpu_list.chip(g) if gpu_list else None
        return f"{g} {chip.name}" if chip and chip.name else str(g)

    return ", ".join(one(g) for g in gpus)


def choose_flavour(
    config: Config, source: DriverSource, gpus: Sequence[PciDevice]
) -> FlavourChoice:
    """KERNEL_MODULE_TYPE, or for `auto` the flavour these GPUs need (see the module's rules).

    Raises UnsupportedError (exit 6) when no flavour the image ships drives these GPUs.
    """
    gpu_list = SupportedGpus.find(config)
    path = gpu_list.path if gpu_list else None
    missing = (
        None
        if gpu_list
        else "The driver's supported-gpus.json is not in "
        + ", ".join(map(str, supported_gpus_paths(config)))
        + ": which GPUs can run the open modules is unknown."
    )
    wanted = config.kernel_module_type
    if wanted != "auto":
        flavour = Flavour(wanted)
        source.flavour_dir(flavour)  # raises if absent
        warning = None
        if flavour is Flavour.OPEN and gpu_list:
            no_open = [
                g for g in gpus if (c := gpu_list.chip(g)) and OPEN_FEATURE not in c.features
            ]
            if no_open:
                warning = (
                    f"KERNEL_MODULE_TYPE=open, but {_names(no_open, gpu_list)} "
                    f"{'is' if len(no_open) == 1 else 'are'} listed in {path} without "
                    "open-module support; the kernel will refuse it (exit 6)."
                )
        return FlavourChoice(flavour, f"KERNEL_MODULE_TYPE={wanted}", path, warning)

    branch = int(source.version.split(".")[0])
    legacy = [g for g in gpus if gpu_list and (c := gpu_list.chip(g)) and c.legacy_branch]
    current = [g for g in gpus if g not in legacy]
    note = (
        f" ({_names(legacy, gpu_list)}: only an older driver branch drives "
        f"{'it' if len(legacy) == 1 else 'them'})"
        if legacy
        else ""
    )
    if not current:
        default = Flavour.OPEN if branch >= OPEN_DEFAULT_BRANCH else Flavour.PROPRIETARY
        reason = f"no NVIDIA GPU this driver drives{note}: the default of branch {branch}"
        return _available(source, default, reason, path, missing, required=False)

    needs_open = [g for g in current if requires_open(g)]
    if gpu_list is None:
        if needs_open:
            reason = f"{_names(needs_open, None)}: Grace Hopper or Blackwell, open modules only"
            return _available(source, Flavour.OPEN, reason, None, missing, required=True)
        reason = (
            "no supported-gpus.json to tell which GPUs can run the open modules; the "
            "proprietary ones drive every GPU before Blackwell"
        )
        return _available(
            source,
            Flavour.PROPRIETARY,
            reason,
            None,
            f"{missing} KERNEL_MODULE_TYPE=auto takes the proprietary modules; set "
            "KERNEL_MODULE_TYPE=open for Turing and newer GPUs.",
            required=True,
        )

    unlisted = [g for g in current if g not in needs_open and gpu_list.chip(g) is None]
    no_open = [
        g
        for g in current
        if g not in needs_open and (c := gpu_list.chip(g)) and OPEN_FEATURE not in c.features
    ]
    if needs_open and (no_open or unlisted):
        new, old = _names(needs_open, gpu_list), _names(no_open + unlisted, gpu_list)
        raise UnsupportedError(
            f"No kernel module flavour drives all GPUs of this node: {new} need the open "
            f"modules, {old} cannot run them (by {path}).",
            hint="Set KERNEL_MODULE_TYPE to the flavour of the GPUs that matter, or move "
            "the others to another node.",
        )
    if needs_open:
        reason = f"{_names(needs_open, gpu_list)}: Grace Hopper or Blackwell, open modules only"
        return _available(source, Flavour.OPEN, reason + note, path, None, required=True)
    if no_open or unlisted:
        parts = []
        if no_open:
            parts.append(f"{_names(no_open, gpu_list)} cannot run the open modules")
        if unlisted:
            parts.append(f"{_names(unlisted, gpu_list)} is not listed")
        reason = f"{'; '.join(parts)} (by {path}){note}"
        return _available(source, Flavour.PROPRIETARY, reason, path, None, required=True)
    default = Flavour.OPEN if branch >= OPEN_DEFAULT_BRANCH else Flavour.PROPRIETARY
    reason = (
        f"every GPU can run the open modules (by {path}){note}; branch {branch} defaults to "
        f"{default}"
    )
    return _available(source, default, reason, path, None, required=False)


def _available(
    source: DriverSource,
    flavour: Flavour,
    reason: str,
    path: Path | None,
    warning: str | None,
    *,
    required: bool,
) -> FlavourChoice:
    """The choice, if the image ships that flavour; a preference gives way to what it ships."""
    available = source.flavours()
    if flavour in available:
        return FlavourChoice(flavour, reason, path, warning)
    if required:
        raise UnsupportedError(
            f"These GPUs need the {flavour} kernel modules ({reason}), and the driver source "
            f"{source.root} has none.",
            hint=f"Use a driver image that ships the {flavour} modules.",
        )
    other = available[0]
    return FlavourChoice(other, f"{reason}; the image ships only {other}", path, warning)
