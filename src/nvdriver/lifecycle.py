"""The order of the steps of each command: init, load, unload, update, packages.

`init` acquires each resource in a `with` block of one ExitStack (the lock, the
daemons' status file, the bind mount, the loaded modules, the daemons, the readiness
file) and waits; a signal unwinds the stack in reverse, which is the shutdown. A
failure or a signal in the middle of a step unwinds the same way, so nothing is left
half done; what a SIGKILLed run left is removed by the next run: its mount and readiness
file before anything else, its staging trees and a killed build's leftovers before the
package is looked up, or, when the restart adopts the driver its predecessor loaded (see
`_adopted`), once the driver is ready again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from nvdriver import daemons, fabric, lock, rootfs, signals
from nvdriver.atomic import TEMP_PREFIX, write_atomically
from nvdriver.config import Config, Options
from nvdriver.driver import proof
from nvdriver.driver.flavour import FlavourChoice, choose_flavour
from nvdriver.driver.proof import FileIdentity
from nvdriver.driver.source import DriverSource, Flavour
from nvdriver.errors import DriverError, IntegrityError, Interrupted, KernelAbiRefused
from nvdriver.host import KernelIdentity, nvidia_gpus
from nvdriver.kmod import loading, peermem
from nvdriver.kmod.firmware import set_firmware_path
from nvdriver.kmod.loaded import LoadedModule, loaded_flavour, loaded_modules, sysfs_name
from nvdriver.kmod.params import read_params
from nvdriver.kmod.tree import ModuleTree, wanted_modules

# What only a start that reads a package, a shutdown or `update` and `packages` call (the
# package's format and tar, the ABI check, the link, the build lock, the handover) is
# imported where it is called: a restart that adopts the loaded driver imports none of it
# (tests/unit/test_imports.py).
if TYPE_CHECKING:
    from nvdriver.driver.package import Package, PackageStore
    from nvdriver.kmod.abi import RunningAbi

log = logging.getLogger(__name__)

__all__ = [
    "init",
    "load",
    "prune_packages",
    "unload",
    "update",
    "verify_packages",
]


def _pause_at(options: Options, step: str) -> None:
    """Test hook: stop at `step` until a signal (NVIDIA_DRIVER_TEST_PAUSE_AT)."""
    if options.hooks.pause_at == step:
        log.warning("Pausing at step %s (NVIDIA_DRIVER_TEST_PAUSE_AT)", step)
        while True:
            signals.sleep()


class _Unwinding(contextlib.ExitStack):
    """An ExitStack whose unwinding a signal does not cut in half (it is held till the end)."""

    def __exit__(self, *exc: Any) -> bool:
        with signals.deferred():
            return bool(super().__exit__(*exc))


def _module_base(config: Config, version: str) -> Path:
    """The private module tree: on the container's own disk (Flatcar's /lib/modules is
    read-only), so under CONTAINER_ROOT and never under HOST_ROOT."""
    return config.own("/opt/nvidia") / version


def _remove_stale(config: Config, version: str) -> None:
    """What a killed run left behind: bind mount, readiness file, staging trees (ours: the
    instance lock is held), and a dead build's work dirs and temp files (unless a build runs).
    """
    rootfs.remove_stale(config)
    _sweep(config, version)


def _sweep(config: Config, version: str) -> None:
    """A killed run's staging and old trees, and a dead build's work dirs and temp files
    (unless a build runs): what a build or a link could have left."""
    from nvdriver.buildlock import remove_stale_builds
    from nvdriver.driver import link

    link.remove_stale(_module_base(config, version))
    remove_stale_builds(config)


def _sweep_after_ready(config: Config, version: str) -> None:
    """The sweep of a restart that adopted the driver, once it is ready: off the path to
    readiness, and never a reason to fail the running driver (logged). Called with the
    stop signals held (`init`): a stopped `init` leaves nothing of a killed one."""
    try:
        _sweep(config, version)
    except (DriverError, OSError) as e:
        log.error("Could not remove what a killed run left (the driver runs on): %s", e)


class DriverPlan(NamedTuple):
    """What `init` and `load` load: the linked tree, which modules, with which parameters."""

    version: str
    flavour: Flavour
    package: Path
    tree: ModuleTree
    modules: tuple[str, ...]
    params: Mapping[str, Sequence[str]]


def _choose(config: Config) -> tuple[DriverSource, FlavourChoice]:
    """The driver source and the flavour for this node's GPUs, decided once per command."""
    source = DriverSource.from_config(config)
    choice = choose_flavour(config, source, nvidia_gpus(config))
    log.info("Kernel modules: %s (%s)", choice.flavour, choice.reason)
    if choice.warning:
        log.warning("%s", choice.warning)
    return source, choice


def _find_package(
    config: Config,
    running: RunningAbi,
    source: DriverSource,
    flavour: Flavour,
    refused: Collection[Path] = (),
) -> Package:
    """The package that fits the running kernel (kmod/abi.py) from the image's store, else
    the node's, else the registry; built into the node's store when none has one (and a
    build is possible). Packages that do not fit are moved aside as stale; `refused` ones
    (the kernel refused them in this run) are passed over."""
    from nvdriver.driver import package as pkg

    version = source.version
    searched = pkg.stores(config)
    for store in searched:
        found = store.find(
            running.release, version, flavour, config.tag, running.fit, stale=True, refused=refused
        )
        if found is not None:
            log.info(
                "Using the precompiled package %s from the %s's store: %s",
                found.path,
                store.kind,
                running.fit(found.manifest.kernel),
            )
            return found
    where = " or ".join(str(s.root) for s in searched)
    refused_by_registry = None
    if config.registry is not None:
        try:
            return _pull(config, running, version, flavour)
        except DriverError as e:
            refused_by_registry = e
    log.info(
        "No precompiled package for kernel %s (driver %s, %s) in %s; building one into %s",
        running.release,
        version,
        flavour,
        where + (f" or the registry {config.registry}" if config.registry else ""),
        config.node_precompiled_dir,
    )
    from nvdriver import builder, trust  # the compiler's world: only when there is no package

    pushes = config.registry is not None and config.registry_push
    if pushes and config.fleet_signing_key is not None:
        trust.check_signing_key(config.fleet_signing_key)  # exit 2 before anything is built
    try:
        package = builder.make_package(
            config._replace(kernel=None),
            source,
            flavour,
            into=config.node_precompiled_dir,
        )
    except DriverError as e:
        # A refused registry package that nothing could replace is the integrity failure
        # it was (exit 5): someone pushed a bad or untrusted package under this tag.
        error = IntegrityError if isinstance(refused_by_registry, IntegrityError) else DriverError
        also = (
            f" The registry {config.registry} had no usable package either: "
            f"{refused_by_registry.message}"
            if refused_by_registry is not None
            else ""
        )
        raise error(
            f"There is no precompiled package for kernel {running.release} (driver {version}, "
            f"{flavour}) in {where}, and building one failed: {e.message}{also}",
            hint=(f"{e.hint} " if e.hint else "")
            + "Or make the package with `nvidia-driver update` where the kernel tree or the "
            "Flatcar developer container is available, and put it into PRECOMPILED_DIR "
            "or NODE_PRECOMPILED_DIR"
            + (" or push it to the registry (update --push)." if config.registry else "."),
        ) from e
    _check_built(running, package)
    if pushes:
        assert config.registry is not None
        _push_built(config, package, config.registry)
    return package


def _check_built(running: RunningAbi, package: Package) -> None:
    """A package just built for this node must fit it; when the developer container's tree
    is not this kernel's ABI, building again would give the same: stop, no build loop."""
    from nvdriver.driver import package as pkg

    verdict = running.fit(package.manifest.kernel)
    if verdict.fits:
        return
    pkg.move_aside(package.path, pkg.STALE_SUFFIX)
    raise DriverError(
        f"The package just built for kernel {running.release} ({package.path.name}) does not "
        f"fit the running kernel: {verdict}. The developer container's kernel tree is not "
        "the running kernel's; building again would give the same package, so nothing is "
        "loaded.",
        hint="Check that the host runs the Flatcar release its /etc/os-release names (a "
        "kernel replaced outside Flatcar's updates has no developer container), or give a "
        "package built for this kernel in PRECOMPILED_DIR, NODE_PRECOMPILED_DIR or the registry.",
    )


def _pull(config: Config, running: RunningAbi, version: str, flavour: Flavour) -> Package:
    """The package from the registry (PRECOMPILED_REGISTRY), pulled into the node's store;
    a failure is logged in one line (registry, reference, reason) and raised."""
    from nvdriver import registry  # http, ssl: only with a registry

    assert config.registry is not None
    ref = registry.Reference.parse(config.registry)
    wanted = registry.Wanted(running.release, running.fit, version, flavour, config.tag)
    try:
        return registry.pull(config, ref, wanted, config.node_precompiled_dir)
    except DriverError as e:
        log.warning(
            "Registry %s: not using %s:%s: %s",
            config.registry,
            ref,
            wanted.artifact_tag,
            " ".join(e.message.split()),
        )
        raise


def _push_built(config: Config, package: Package, reference: str) -> None:
    """Share what this node built (PRECOMPILED_REGISTRY_PUSH): the fleet compiles once.
    A failed push is logged; the node has its package and goes on."""
    from nvdriver import registry  # http, ssl: only with a registry

    try:
        registry.push(config, package, registry.Reference.parse(reference))
    except DriverError as e:
        log.error("Could not share %s: %s", package.path.name, e)


def _prepare(
    config: Config,
    refused: Collection[Path] = (),
    chosen: tuple[DriverSource, FlavourChoice] | None = None,
    *,
    wait: bool = True,
) -> DriverPlan:
    """Find (or build) the package, link it into the private tree; unload other drivers.

    Modules already loaded from this very package (same version and srcversion)
    are kept: a restarted container must not disturb running GPU work. When an earlier
    run loaded them from this package's linked tree (its stamp), nothing is relinked.
    Other modules in use are never touched: with `wait` (init) they are waited for until
    they are free (handover.py), else it is exit 3 at once; their daemons are stopped only
    when the driver is free. `refused`: packages the kernel refused in this run (see
    `_load_fitting`); `chosen`: the source and flavour, when the caller has chosen them
    already.
    """
    from nvdriver.driver import link
    from nvdriver.kmod.abi import RunningAbi

    options = config.options
    source, choice = chosen if chosen is not None else _choose(config)
    version, flavour = source.version, choice.flavour
    kernel = KernelIdentity.running(config)
    _remove_stale(config, version)
    running = RunningAbi(config, kernel.release)
    package = _find_package(config, running, source, flavour, refused)
    base = _module_base(config, version)
    tree = ModuleTree(base, kernel.release)
    loaded = loaded_modules(config)
    kept = _loaded_from(config, tree, package, loaded)
    if not kept:
        link.link_package(package.path, source, base, release=kernel.release)
    _pause_at(options, "linked")

    plan = _plan(config, version, flavour, package.path, tree)
    if kept:  # loaded from this very tree: nothing to compare or unload
        loaded = []
    same_flavour = loaded_flavour(config) in (None, flavour)
    if loaded and same_flavour and tree.matches_loaded(loaded):
        log.info(
            "The modules of this package are loaded already (%s); keeping them",
            ", ".join(m.name for m in loaded),
        )
    elif loaded:
        log.info(
            "Other NVIDIA modules are loaded (%s); unloading them first",
            ", ".join(f"{m.name} {m.version or ''}".strip() for m in loaded),
        )
        from nvdriver import handover  # with who holds the driver: only when one may
        from nvdriver.kmod.unloading import unload as unload_modules

        # Before anything is stopped: the old daemons serve the work that holds the driver.
        handover.wait_until_free(config, f"{version} ({flavour})", wait=wait)
        fabric.stop(config)  # it holds the NVSwitches: before the modules go
        daemons.stop_persistenced(config)
        unload_modules(config)
    set_firmware_path(config, rootfs.FIRMWARE_DIR, plan.params.get("nvidia", ()))
    return plan


def _load_fitting(
    config: Config, plan: DriverPlan, load_plan: Callable[[DriverPlan], object]
) -> DriverPlan:
    """Load `plan`; when the kernel refuses its modules for their ABI (a CRC or the
    vermagic: a package made on another build of this release that the node could not
    tell apart beforehand), move the package aside as stale and load the next one found
    (another store's, the registry's, or a build) once. A second refusal is an error:
    no build loop. Returns the plan that loaded."""
    try:
        load_plan(plan)
        return plan
    except KernelAbiRefused as e:
        why = e.message
    # Imported after a refusal only: a restart that adopts reads no package.
    from nvdriver.driver import package as pkg

    pkg.move_aside(plan.package, pkg.STALE_SUFFIX)
    log.warning(
        "The kernel refused the modules of %s: %s It is stale for this kernel; looking "
        "for another package (once).",
        plan.package,
        why,
    )
    refused = plan.package
    again = _prepare(config, refused={refused})
    try:
        load_plan(again)
    except KernelAbiRefused as e:
        pkg.move_aside(again.package, pkg.STALE_SUFFIX)
        raise DriverError(
            f"The kernel refused the modules of {again.package} too, after refusing "
            f"{refused}: {e.message} Not trying another package (no build loop).",
            hint="The packages and the developer container do not match the running kernel's "
            "ABI; see `nvidia-driver status` for each package's verdict.",
        ) from e
    return again


def _plan(
    config: Config, version: str, flavour: Flavour, package: Path, tree: ModuleTree
) -> DriverPlan:
    """Which modules of the linked tree to load, with their parameters."""
    params = {m: read_params(config.module_params_dir, m) for m in tree.modules()}
    modules = wanted_modules(tree, params, config.options.gpu_direct_rdma)
    return DriverPlan(version, flavour, package, tree, tuple(modules), params)


# In the linked tree: which package it was linked from and what the kernel showed once
# its modules were loaded (written after each successful load).
_LOADED_STAMP = ".loaded-from.json"
_STAMP_FORMAT = 2


class _Stamp(NamedTuple):
    """The loaded stamp: the package as the tree's proof (driver/proof.py) names it (path,
    file identity, manifest digest), the flavour, and each loaded module's srcversion."""

    package: Path
    identity: FileIdentity
    manifest_sha256: str
    flavour: str
    srcversion: Mapping[str, str]

    @classmethod
    def read(cls, tree: ModuleTree) -> _Stamp | None:
        """The stamp in `tree`, or None: none, unreadable, of an older format, or written
        for a tree without a proof (nothing identifies its package strongly enough)."""
        try:
            obj = json.loads((tree.directory / _LOADED_STAMP).read_text())
            if obj["format"] != _STAMP_FORMAT:
                return None
            srcversion = obj["srcversion"]
            if not isinstance(srcversion, dict):
                return None
            return cls(
                package=Path(obj["package"]),
                identity=FileIdentity(**obj["identity"]),
                manifest_sha256=str(obj["manifest_sha256"]),
                flavour=str(obj["flavour"]),
                srcversion={str(k): str(v) for k, v in srcversion.items()},
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def matches_loaded(self, config: Config, flavour: str, loaded: Sequence[LoadedModule]) -> bool:
        """Whether the NVIDIA modules loaded now are those this stamp recorded: the same
        flavour, each with the srcversion the kernel showed when they were loaded."""
        return (
            self.flavour == flavour
            and loaded_flavour(config) in (None, flavour)
            and bool(loaded)
            and all(
                m.srcversion is not None and self.srcversion.get(m.name) == m.srcversion
                for m in loaded
            )
        )


def _stamp_loaded(config: Config, plan: DriverPlan) -> None:
    """Record that the modules now loaded came from `plan.package` through `plan.tree`, so
    that a restart with the same driver loaded adopts them (`_adopted`), or at least skips
    the unpack, verify and relink (`_loaded_from`). The package is named as the tree's
    proof names it; a tree without one (its package changed while it was verified) gets a
    stamp that no restart trusts."""
    recorded = proof.recorded(plan.tree.directory)
    named = recorded is not None and recorded.package == str(plan.package)
    stamp = {
        "format": _STAMP_FORMAT,
        "package": str(plan.package),
        "identity": recorded.identity._asdict() if named and recorded else None,
        "manifest_sha256": recorded.manifest_sha256 if named and recorded else None,
        "flavour": plan.flavour,
        "srcversion": {m.name: m.srcversion for m in loaded_modules(config)},
    }
    path, data = plan.tree.directory / _LOADED_STAMP, json.dumps(stamp).encode()
    with contextlib.suppress(OSError):
        if path.read_bytes() == data:  # a restart that adopted: nothing to write and flush
            return
    write_atomically(path, data)


def _loaded_from(
    config: Config, tree: ModuleTree, package: Package, loaded: Sequence[LoadedModule]
) -> bool:
    """Whether the NVIDIA modules loaded now are the ones an earlier run linked from this
    very package (the same file by its identity, the same manifest, flavour and
    srcversions) and loaded from `tree`.

    Then nothing needs unpacking, verifying or linking (the package was verified when it
    was linked): a restart goes straight to readiness without touching the driver.
    """
    stamp = _Stamp.read(tree)
    try:
        same_file = stamp is not None and FileIdentity.of(package.path) == stamp.identity
    except OSError:
        same_file = False
    if (
        stamp is None
        or not same_file
        or stamp.package != package.path
        or stamp.manifest_sha256 != proof.manifest_digest(package.manifest)
        or not stamp.matches_loaded(config, package.manifest.flavour, loaded)
        or not tree.modules()
    ):
        return False
    log.info(
        "The modules of %s are loaded already (%s); keeping them, nothing to link",
        package.path,
        ", ".join(m.name for m in loaded),
    )
    return True


def _adopted(
    config: Config, version: str, flavour: Flavour, release: str, loaded: Sequence[LoadedModule]
) -> DriverPlan | None:
    """The plan of a restart that adopts the driver an earlier run loaded, or None (then
    the full start: `_prepare`).

    Adopted when the tree's stamp names the package the tree's proof names (file
    identity and manifest digest), the loaded modules are the stamp's (flavour and
    srcversions), the package, the core objects and the tree are the files the proof
    names (a stat of each), and every module to load is loaded. Nothing is read of the
    package and no store is searched: the tree was linked from that package, verified on
    this node, and its modules are the ones the kernel runs.
    """
    tree = ModuleTree(_module_base(config, version), release)
    stamp = _Stamp.read(tree)
    if stamp is None:
        return None
    recorded = proof.recorded(tree.directory)
    why = None
    if not stamp.matches_loaded(config, flavour, loaded):
        why = "the loaded modules are not the ones it loaded"
    elif recorded is None or (recorded.package, recorded.identity, recorded.manifest_sha256) != (
        str(stamp.package),
        stamp.identity,
        stamp.manifest_sha256,
    ):
        why = "its tree has been linked again since"
    elif not recorded.unchanged(stamp.package, tree.directory):
        why = f"{stamp.package}, its core objects or its tree changed"
    if why is None:
        plan = _plan(config, version, flavour, stamp.package, tree)
        names = {m.name for m in loaded}
        missing = [m for m in plan.modules if m != peermem.PEERMEM and sysfs_name(m) not in names]
        if not missing:
            log.info(
                "The modules of %s are loaded already (%s); keeping them, nothing to link "
                "(adopted as the earlier run left them: the package is not read)",
                stamp.package,
                ", ".join(m.name for m in loaded),
            )
            return plan
        why = f"{', '.join(missing)} not loaded"
    log.info("Not adopting the loaded driver (%s); starting in full", why)
    return None


def _adopt_or_prepare(config: Config) -> tuple[DriverPlan, bool]:
    """`init`'s plan, and whether it adopts the driver loaded already (see `_adopted`):
    then only the killed run's mount and readiness file are removed before the root is
    bound again, and the rest of its leftovers once the driver is ready
    (`_sweep_after_ready`). Otherwise the full start (`_prepare`)."""
    chosen = _choose(config)
    source, choice = chosen
    loaded = loaded_modules(config)
    if loaded:
        release = KernelIdentity.running(config).release
        plan = _adopted(config, source.version, choice.flavour, release, loaded)
        if plan is not None:
            rootfs.remove_stale(config)
            set_firmware_path(config, rootfs.FIRMWARE_DIR, plan.params.get("nvidia", ()))
            return plan, True
    return _prepare(config, chosen=chosen), False


def init(config: Config) -> None:
    """Everything `init` does (docs/commands.md, "init"), then wait for a signal and shut
    down in reverse.

    Returns after a clean shutdown; raises when a step fails or is interrupted
    (having undone what it did), or when the shutdown finds the driver in use.
    """
    options = config.options
    with _Unwinding() as stack:
        stack.enter_context(lock.instance_lock(config))
        # The Operator's startup probe holds the pod back while this says NotReady.
        daemons_status = stack.enter_context(rootfs.daemons_status(config))
        _pause_at(options, "locked")
        if options.gpu_direct_rdma:
            peermem.advise(config)
        plan, adopted = _adopt_or_prepare(config)
        # Bound before the modules load: the kernel reads the GSP firmware through it
        # (firmware_class.path) when a GPU is first opened, during the load already
        # when nvidia-drm's modeset opens it.
        stack.enter_context(rootfs.exposed_root(config, options.container_root))
        _pause_at(options, "mounted")
        plan = _load_fitting(
            config,
            plan,
            lambda p: stack.enter_context(
                loading.driver_loaded(config, p.tree, p.modules, p.params)
            ),
        )
        _stamp_loaded(config, plan)
        _pause_at(options, "loaded")
        stack.enter_context(daemons.persistenced(config))
        _pause_at(options, "persistenced")
        # NVSwitch boards: the GPUs are not usable until the fabric is up; readiness waits.
        stack.enter_context(fabric.fabric_manager(config))
        stack.enter_context(daemons_status.ready())  # NotReady again before they stop
        rootfs.check_nvidia_smi(options.container_root)
        try:
            # A stop from here on is the normal one (exit 0), also one that comes while
            # the readiness file is written: held back until it is and its removal is
            # on the stack, and, after a restart that adopted the driver, until what a
            # killed run left is swept.
            with signals.deferred():
                stack.enter_context(rootfs.ready(config, rootfs.readiness_flags(config)))
                log.info(
                    "NVIDIA driver %s (%s) is up; waiting for a signal", plan.version, plan.flavour
                )
                if adopted:
                    _sweep_after_ready(config, plan.version)
            from nvdriver import watch  # the release feed, D-Bus: once the driver is up

            watch.wait(config)  # builds ahead for the next Flatcar release meanwhile
        except Interrupted as e:
            log.info("Caught %s; shutting down", signal.Signals(e.signum).name)
        # Before any daemon stops: a driver in use keeps its modules and daemons (their
        # blocks let a BusyError through untouched) and init exits 3.
        from nvdriver import handover

        handover.check_free(config)
    log.info("Shut down cleanly")


def load(config: Config) -> list[str]:
    """Link, install and load from the package for the running kernel; do not wait.

    The root is bound before the modules as by `init`, and stays bound when the
    load succeeds (`unload` removes it): without nvidia-persistenced the driver
    reads its GSP firmware again at each first open after the last close.
    """
    with lock.instance_lock(config):
        if config.options.gpu_direct_rdma:
            peermem.advise(config)
        plan = _prepare(config, wait=False)  # `load` does not wait for a driver in use
        with rootfs.exposed_root(config, config.options.container_root, keep=True):
            loaded: list[str] = []

            def load_plan(p: DriverPlan) -> None:
                loaded[:] = loading.load(config, p.tree, p.modules, p.params)

            plan = _load_fitting(config, plan, load_plan)
            _stamp_loaded(config, plan)
            # An NVSwitch board's GPUs are unusable without the fabric manager: it stays
            # running, as the root stays bound, until `unload`.
            with fabric.fabric_manager(config, keep=True):
                return loaded


def unload(config: Config) -> None:
    """Unless the driver is in use, stop the daemons (the fabric manager first), unload
    the modules, then unmount the driver root and remove the readiness and daemons' status
    files.

    A driver in use (BusyError, exit 3) keeps all: its daemons (the fabric manager's stop
    would break running CUDA work), and its root bound (the loaded driver reads its GSP
    firmware through it at a GPU's next first open, and the toolkit its files).
    """
    from nvdriver import handover
    from nvdriver.kmod.unloading import unload as unload_modules

    with lock.instance_lock(config):
        handover.check_free(config)  # before any daemon stops: in use, all stays running
        fabric.stop(config)  # first: it holds the NVSwitches
        try:
            daemons.stop_persistenced(config)
        except DriverError as e:
            log.error("%s", e)
        rootfs.remove_daemons_status(config)  # a killed init's: its daemons are gone now
        unload_modules(config)
        rootfs.remove_stale(config)


def update(config: Config) -> Package | None:
    """Build and pack the precompiled package for a kernel into the image's store
    (PRECOMPILED_DIR: `docker commit` keeps it, the seed's workflow), or the node's with
    `--store node`; load nothing, touch no loaded driver; with `--push`, push it.

    The kernel: the running one, `--kernel`, the one of the Flatcar release
    `--flatcar-version` names, or of the channel's next release (`--next`; None when the
    feed has none with another kernel: nothing to do). A release newer than the host's
    is recorded as the next one (fleet.py), for `status` and `packages prune`; when the
    record names its package already (built ahead before), that package is the result.
    """
    from nvdriver import builder, fleet, trust
    from nvdriver.driver import package as pkg
    from nvdriver.flatcar import release

    if config.push is not None and config.fleet_signing_key is not None:
        trust.check_signing_key(config.fleet_signing_key)  # exit 2 before anything is built
    target = None
    if config.next_release:
        target = release.next_release(config)
        if target is None:
            log.info("Nothing to build ahead: the host runs the newest release of its channel")
            return None
    elif config.flatcar_version is not None:
        target = release.release_by_version(config, config.flatcar_version)
    source, choice = _choose(config)
    ahead = target is not None and fleet.is_ahead(config, target)
    into = config.node_precompiled_dir if config.store == pkg.NODE_STORE else config.precompiled_dir
    package = None
    if ahead:
        assert target is not None
        package = fleet.built_ahead(config, target, into, source.version, choice.flavour)
        if package is not None:
            log.info(
                "The package for Flatcar %s is there already: %s",
                target.release.version,
                package.path,
            )
        else:
            fleet.write_next(config, target, None)
    if package is None:
        package = builder.make_package(config, source, choice.flavour, into=into, target=target)
        if ahead:
            assert target is not None
            fleet.write_next(config, target, package.manifest.kernel)
    if config.push is not None:
        from nvdriver import registry  # http, ssl: only to push

        registry.push(config, package, registry.Reference.parse(config.push, "--push"))
    return package


class VerifyReport(NamedTuple):
    good: list[tuple[PackageStore, Path]]
    bad: list[tuple[PackageStore, Path, str]]


def verify_packages(config: Config) -> VerifyReport:
    """Verify every package of both stores; failed ones are moved aside."""
    from nvdriver.driver import package as pkg

    good, bad = [], []
    for store in pkg.stores(config):
        for path in store.package_files():
            try:
                pkg.verify(path)
                good.append((store, path))
            except DriverError as e:
                bad.append((store, path, e.message))
    return VerifyReport(good, bad)


def prune_packages(config: Config) -> list[Path]:
    """Remove, from both stores, leftovers, failed packages, packages of kernels other
    than the running one and the next release's (fleet.kept_kernels), packages of other
    driver versions, origin records without their package, and the developer containers
    of releases other than the running and the next one.

    While a build runs, what it may be using is left alone: temp files, the kernel
    directories it may be about to write into, and the developer containers.
    """
    from nvdriver import fleet
    from nvdriver.buildlock import builds_idle
    from nvdriver.driver import package as pkg

    removed: list[Path] = []
    keep_kernels = fleet.kept_kernels(config)
    with builds_idle(config) as idle:
        for store in pkg.stores(config):
            removed += _prune_store(config, store, keep_kernels, idle=idle)
        if idle:
            removed += fleet.prune_developer_containers(config)
    return removed


def _prune_store(
    config: Config, store: PackageStore, keep_kernels: set[str], *, idle: bool
) -> list[Path]:
    removed = [p for p in store.leftovers() if idle or not p.name.startswith(TEMP_PREFIX)]
    good, bad = store.packages()
    removed += [p for p, _ in bad]
    removed += [
        p.path
        for p in good
        if p.manifest.kernel_release not in keep_kernels
        or (
            config.driver_version is not None and p.manifest.driver_version != config.driver_version
        )
    ]
    for p in removed:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    from nvdriver import fleet

    removed += fleet.remove_orphan_origins(store.root)
    if idle:
        for d in store.root.iterdir() if store.root.is_dir() else []:
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
    return removed
