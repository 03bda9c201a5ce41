"""How NVIDIA's modules are unloaded: the one place that runs `rmmod`.

NVIDIA's rule: a module may go only when every reference on it comes from
another NVIDIA module that goes with it; anything else (a process with
/dev/nvidia* open, a foreign module) means the driver is in use, and then
nothing is unloaded at all. GDRCopy's `gdrdrv` uses nvidia too; as NVIDIA's
container does, it goes first, with the driver, when nothing uses it itself.
A failed load is undone here too.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from types import MappingProxyType

from nvdriver.config import Config
from nvdriver.driver.source import MODULE_ORDER
from nvdriver.errors import BusyError, DriverError
from nvdriver.host import read_optional
from nvdriver.kmod.loaded import LoadedModule, loaded_modules, loaded_names, sysfs_name
from nvdriver.run import RunError, run

log = logging.getLogger(__name__)

# Modules of others that hold nvidia and go with it when they are unused themselves.
GOES_WITH_NVIDIA = ("gdrdrv",)
# rmmod order: every module before the modules it uses.
UNLOAD_ORDER = (*GOES_WITH_NVIDIA, *reversed(MODULE_ORDER))
_NONE: Mapping[str, int] = MappingProxyType({})


def busy_reasons(loaded: Sequence[LoadedModule], daemons: Mapping[str, int] = _NONE) -> list[str]:
    """Why this set of modules cannot be unloaded together (empty: it can).

    A module's references must all come from modules of the set (its holders
    among them: nvidia-uvm and nvidia-modeset hold nvidia, nvidia-drm holds
    nvidia-modeset) or, where `daemons` counts them, from the driver's own daemons'
    open devices (by module: they are stopped with the driver); any other reference
    is a user: an open /dev/nvidia*, a foreign module.
    """
    names = {m.name for m in loaded}
    reasons = []
    for m in loaded:
        ours = sum(1 for h in m.holders if h in names)
        theirs = daemons.get(m.name, 0)
        if m.refcnt > ours + theirs:
            others = [h for h in m.holders if h not in names]
            users = f" (used by {', '.join(others)})" if others else ""
            daemon_refs = f" and {theirs} from the driver's daemons" if theirs else ""
            reasons.append(
                f"{m.name} has {m.refcnt} reference(s), {ours} of them from NVIDIA modules"
                f"{daemon_refs}{users}"
            )
    return reasons


def check_unused(config: Config, daemons: Mapping[str, int] = _NONE) -> list[LoadedModule]:
    """The NVIDIA modules loaded, in unload order; BusyError (exit 3) when one has a user
    other than NVIDIA's modules and the references `daemons` counts (`busy_reasons`)."""
    loaded = loaded_modules(config, UNLOAD_ORDER)
    if reasons := busy_reasons(loaded, daemons):
        raise BusyError(
            "The NVIDIA driver is in use, nothing was unloaded: " + "; ".join(reasons) + ".",
            hint="Stop the GPU workloads (processes with /dev/nvidia* open, modules using "
            "nvidia), then run `nvidia-driver unload` again.",
        )
    return loaded


def unload(config: Config) -> list[str]:
    """Unload every NVIDIA module with one rmmod, or none when the driver is in use.

    Returns the modules unloaded. Raises BusyError (exit 3) without touching
    anything when a module has a user outside the set.
    """
    loaded = check_unused(config)
    if not loaded:
        log.info("No NVIDIA kernel module is loaded")
        return []
    by_name = {m.name: m for m in loaded}
    names = [sysfs_name(n) for n in UNLOAD_ORDER if sysfs_name(n) in by_name]
    log.info("Unloading %s", ", ".join(names))
    try:
        run(["rmmod", *names])
    except RunError as e:
        left = [m.name for m in loaded_modules(config, UNLOAD_ORDER)]
        raise DriverError(
            f"Unloading the NVIDIA modules failed; still loaded: {', '.join(left) or 'none'}. "
            f"{e.message}",
            hint="Something took the driver while it was being unloaded; stop it and run "
            "`nvidia-driver unload` again.",
        ) from e
    return names


def unload_new(config: Config, nvidia_before: set[str], host_before: set[str]) -> None:
    """Undo a failed load: rmmod the NVIDIA modules loaded since, then the host modules
    loaded for them, each once nothing uses it any more. Never raises."""
    new = {m.name for m in loaded_modules(config)} - nvidia_before
    names = [sysfs_name(n) for n in UNLOAD_ORDER if sysfs_name(n) in new]
    if names:
        log.info("Unloading %s again", ", ".join(names))
        run(["rmmod", *names], check=False)
    left = [m.name for m in loaded_modules(config) if m.name not in nvidia_before]
    if left:
        log.error("Could not unload %s again after the failure", ", ".join(left))
        return
    # Host modules (drm, video, ...): the users of one go before it, so repeat
    # while some became unused.
    pending = sorted(loaded_names(config) - host_before)
    sys_module = config.host("/sys/module")
    while pending:
        unused = [n for n in pending if read_optional(sys_module / n / "refcnt") == "0"]
        if not unused:
            break
        run(["rmmod", *unused], check=False)
        still = sorted(loaded_names(config) - host_before)
        if still == pending:
            break
        pending = still
