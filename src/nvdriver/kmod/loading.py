"""Loading NVIDIA's modules from the private tree, all or none, then nvidia-peermem.

The host modules they need come first from the host's own tree (see `tree`);
a failure unloads again what this load added (see `unloading`) and becomes
the error `refusal` makes of the kernel's words. nvidia-peermem is not part of the
all or none: it loads after the others, and its failure is a warning (see `peermem`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence

from nvdriver import signals
from nvdriver.config import Config
from nvdriver.errors import BusyError
from nvdriver.host import nvidia_gpus
from nvdriver.kmod.devices import make_device_nodes
from nvdriver.kmod.kmsg import KernelLog
from nvdriver.kmod.loaded import loaded_modules, loaded_names, sysfs_name
from nvdriver.kmod.peermem import PEERMEM, load_peermem
from nvdriver.kmod.refusal import load_error
from nvdriver.kmod.tree import ModuleTree
from nvdriver.kmod.unloading import unload, unload_new
from nvdriver.run import RunError, run

log = logging.getLogger(__name__)

# Loaded first, as NVIDIA's own driver container does; built into some kernels.
PREREQUISITES = ("i2c_core", "ipmi_msghandler", "ipmi_devintf")


def _load_host_modules(config: Config, names: Sequence[str], *, required: bool) -> None:
    """Load modules of the host's own module tree that are not loaded yet.

    Prerequisites are best effort (some kernels build them in or lack them);
    the modules the NVIDIA modules link against are required.
    """
    sys_module = config.host("/sys/module")
    missing = [n for n in names if not (sys_module / n).exists()]
    if not missing:
        return
    log.info("Loading the host's %s", ", ".join(missing))
    result = run(
        ["modprobe", "-a", *missing],
        check=required,
        hint="The NVIDIA modules need these modules of the host's kernel: make the host's "
        "/lib/modules visible to the container.",
    )
    if result.returncode != 0:
        log.warning("Could not load all of %s: %s", ", ".join(missing), result.stderr.strip())


def load(
    config: Config,
    tree: ModuleTree,
    modules: Sequence[str],
    params: Mapping[str, Sequence[str]],
) -> list[str]:
    """Load `modules` from `tree` in order with their parameters; return those loaded now.

    Modules already loaded are left alone. When one fails, every module this
    call loaded is unloaded again (no half-loaded set) and the error quotes the
    kernel's log (see `refusal`). Then the missing /dev/nvidia* nodes are made, and
    then nvidia-peermem, when asked for, is loaded: its failure is only a warning.
    """
    before = {m.name for m in loaded_modules(config)}
    host_before = loaded_names(config)
    base = [m for m in modules if m != PEERMEM]
    try:
        # All loaded already (a restart): their host modules are too, and asking modinfo
        # for them costs a process per module and field.
        if any(sysfs_name(m) not in before for m in base):
            _load_host_dependencies(config, tree, base)
        for module in base:
            if sysfs_name(module) not in {m.name for m in loaded_modules(config)}:
                _modprobe(config, tree, module, params.get(module, ()))
    except BaseException:
        with signals.deferred():
            unload_new(config, before, host_before)
        raise
    make_device_nodes(config, params.get("nvidia", ()))
    if PEERMEM in modules and sysfs_name(PEERMEM) not in before:
        # Its own host modules (MOFED's ib_core, where it was built against MOFED) are
        # best effort: without them it fails, and says so.
        depends, softdeps = tree.host_dependencies([PEERMEM])
        _load_host_modules(config, softdeps + depends, required=False)
        load_peermem(config, tree, params.get(PEERMEM, ()))
    now = [m.name for m in loaded_modules(config) if m.name not in before]
    if now:
        log.info("Loaded %s", ", ".join(now))
    return now


def _load_host_dependencies(config: Config, tree: ModuleTree, modules: Sequence[str]) -> None:
    prerequisites = list(PREREQUISITES)
    if os.uname().machine in ("x86_64", "amd64"):
        prerequisites.append("video")
    depends, softdeps = tree.host_dependencies(modules)
    _load_host_modules(config, prerequisites + softdeps, required=False)
    _load_host_modules(config, depends, required=True)


def _modprobe(config: Config, tree: ModuleTree, module: str, params: Sequence[str]) -> None:
    with KernelLog(config.host("/dev/kmsg")) as klog:
        log.info("Loading %s%s", module, f" ({' '.join(params)})" if params else "")
        try:
            run(["modprobe", "-d", tree.base, module, *params])
        except RunError as e:
            raise load_error(module, e.stderr, klog.read(), nvidia_gpus(config)) from e


@contextlib.contextmanager
def driver_loaded(
    config: Config,
    tree: ModuleTree,
    modules: Sequence[str],
    params: Mapping[str, Sequence[str]],
) -> Iterator[list[str]]:
    """Load the driver for the duration of a `with` block.

    Leaving the block normally (a shutdown) unloads every NVIDIA module (BusyError
    when in use). Leaving it with an error undoes only what this block loaded:
    modules that were loaded before (a restart of the same driver) stay; with a
    BusyError (the driver found in use at shutdown) nothing is undone.
    """
    before = {m.name for m in loaded_modules(config)}
    host_before = loaded_names(config)
    loaded_now = load(config, tree, modules, params)
    try:
        yield loaded_now
    except BusyError:
        raise
    except BaseException:
        if loaded_now:
            unload_new(config, before, host_before)
        raise
    unload(config)
