"""Where a package comes from: a kernel tree given directly, or the Flatcar developer
container of the release that ships the kernel (fetched, verified, mounted, chrooted)."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

from nvdriver import fleet
from nvdriver.buildlock import build_lock, remove_stale_locked, workdir
from nvdriver.config import Config
from nvdriver.driver import package as pkg
from nvdriver.driver.build import BuildOutput, BuildRoot, build_modules
from nvdriver.driver.package import Package
from nvdriver.driver.sign import check_key, sign_build
from nvdriver.driver.source import DriverSource, Flavour
from nvdriver.driver.toolchain import collect_linker
from nvdriver.errors import DriverError, UsageError
from nvdriver.flatcar import image, release
from nvdriver.host import KernelIdentity, KernelTree, resolve_in
from nvdriver.kmod import peermem
from nvdriver.run import run

log = logging.getLogger(__name__)

# Inside the developer root (its overlay, whose writes land in the work dir under the
# cache, on disk: flatcar/image.py): where the driver tree is built.
BUILD_DIR = "/var/tmp/nvidia-driver-build"
# The container's own resolver configuration (not the host's: the container may run
# with a network of its own), bound into the developer root for `--emerge-sources`.
RESOLV_CONF = Path("/etc/resolv.conf")


def make_package(
    config: Config,
    source: DriverSource,
    flavour: Flavour,
    *,
    into: Path,
    target: release.NamedRelease | None = None,
) -> Package:
    """Build and pack the `flavour` package of `source` for `config.kernel` (default: the
    running kernel), or for the kernel of the Flatcar release `target`, into the store
    directory `into`. The caller chose the source and the flavour, once per command
    (lifecycle._choose), and the store (`update`: the image's unless --store node;
    `init` and `load`: the node's)."""
    if config.sign_key is not None:  # before anything is fetched or built
        check_key(config.sign_key)
    with build_lock(config):
        remove_stale_locked(config)
        used: set[str] = set()
        with workdir(config, "build") as work:
            if config.kernel_source is not None:
                output = _from_kernel_tree(config, source, flavour, work)
            else:
                output, version = _in_developer_container(config, source, flavour, work, target)
                used.add(version)
            package = pkg.write_package(into, output, tag=config.tag)
        # Build ahead adds a developer container per release: keep the disk from filling.
        fleet.prune_developer_containers(config, also_keep=used)
        return package


def _from_kernel_tree(
    config: Config, source: DriverSource, flavour: str, work: Path
) -> BuildOutput:
    assert config.kernel_source is not None
    tree = KernelTree.from_dir(config.kernel_source)
    identity = KernelIdentity.from_build_tree(tree.output)
    if config.kernel is not None and config.kernel != identity.release:
        raise UsageError(
            f"--kernel {config.kernel} does not match the kernel tree {tree.output}, "
            f"which is {identity.release}.",
            hint="Give the kernel tree of the kernel you ask for, or drop --kernel.",
        )
    output = _build(config, source, flavour, tree, work, BuildRoot())
    return dataclasses.replace(output, linker_files=collect_linker(BuildRoot(), work / "linker"))


def _in_developer_container(
    config: Config,
    source: DriverSource,
    flavour: str,
    work: Path,
    target: release.NamedRelease | None,
) -> tuple[BuildOutput, str]:
    """Build in the developer container of `target`'s release against the kernel tree
    the feed names for it, or (no target) of the release that ships `config.kernel`
    (default: the running kernel) against that kernel's tree; returns the output and
    the release's version."""
    kernel = None if target is not None else config.kernel or release.running_kernel()
    flatcar = target.release if target is not None else release.resolve(config, kernel)
    from nvdriver.flatcar.fetch import fetch_developer_container  # http, ssl: only to build

    dev_image = fetch_developer_container(config, flatcar)
    binds = (
        {"/etc/resolv.conf": RESOLV_CONF} if config.emerge_sources and RESOLV_CONF.is_file() else {}
    )
    running = kernel is not None and kernel == release.running_kernel()
    if running and config.options.gpu_direct_rdma and peermem.mofed_present(config):
        # NVIDIA's Kbuild and conftest look for MOFED's tree here (kmod/peermem.py): then
        # nvidia-peermem is built with its peer-memory symbols. Only for the running
        # kernel: MOFED's tree is built for that one.
        binds["/usr/src/ofa_kernel"] = config.host(peermem.OFA_KERNEL)
        log.info("Building nvidia-peermem against MOFED's %s", config.host(peermem.OFA_KERNEL))
    with image.developer_root(dev_image, work / "mnt", binds) as root:
        build_root = BuildRoot(root)
        if kernel is None:
            assert target is not None
            tree = _release_kernel_tree(root, target.kernel, flatcar.version)
        elif config.emerge_sources:
            tree = _emerged_kernel_tree(build_root, kernel, config.network_environment())
        else:
            tree = _developer_kernel_tree(root, kernel, flatcar.version)
        build_dir = resolve_in(root, Path(BUILD_DIR))
        build_dir.mkdir(parents=True)
        output = _build(config, source, flavour, tree, build_dir, build_root)
        # Keep what the package needs: the overlay (and the build dir) vanish on unmount.
        kept = _kept(output, work / "out")
        linker = collect_linker(build_root, work / "out" / "linker")
        return dataclasses.replace(kept, linker_files=linker), flatcar.version


def _kept(output: BuildOutput, dest: Path) -> BuildOutput:
    """A copy of the build's artifacts and linker scripts under `dest`."""
    shutil.copytree(output.tree, dest / "tree", symlinks=True)
    scripts = []
    for i, script in enumerate(output.ld_scripts):
        (dest / "lds" / str(i)).mkdir(parents=True)
        scripts.append(Path(shutil.copy2(script, dest / "lds" / str(i) / script.name)))
    (dest / "signatures").mkdir()
    artifacts = tuple(
        dataclasses.replace(
            a,
            path=dest / "tree" / a.path.relative_to(output.tree),
            signature=a.signature and Path(shutil.copy2(a.signature, dest / "signatures")),
        )
        for a in output.artifacts
    )
    return dataclasses.replace(
        output, tree=dest / "tree", artifacts=artifacts, ld_scripts=tuple(scripts)
    )


# Releases up to 3115.0.0 kept modules in /usr/lib64/modules (docs/paths.md, "Inside the
# developer container").
MODULE_DIRS = ("/lib/modules", "/usr/lib/modules", "/usr/lib64/modules")


def _kernel_trees(root: Path) -> dict[str, Path]:
    """Each kernel release of the developer root that has a tree (a `build` or `source`
    link in /lib/modules/RELEASE), with that directory (a path inside the root)."""
    trees: dict[str, Path] = {}
    for modules in MODULE_DIRS:
        directory = resolve_in(root, Path(modules))
        for entry in sorted(directory.iterdir()) if directory.is_dir() else []:
            candidate = Path(modules) / entry.name
            # `build` is an absolute link (to /usr/src/linux-headers-...): resolved inside
            # the root, never on the host, which may lack those headers (a container does).
            if entry.name not in trees and any(
                resolve_in(root, candidate / link).exists() for link in ("build", "source")
            ):
                trees[entry.name] = candidate
    return trees


def _developer_kernel_tree(root: Path, kernel: str, version: str) -> KernelTree:
    """The prepared kernel tree of the developer container: /lib/modules/KERNEL/build."""
    trees = _kernel_trees(root)
    if kernel in trees:
        return KernelTree.from_dir(trees[kernel], root=root)
    present = sorted(
        p.name
        for m in MODULE_DIRS[:2]
        if (d := resolve_in(root, Path(m))).is_dir()
        for p in d.iterdir()
    )
    raise DriverError(
        f"The Flatcar {version} developer container has no kernel tree for {kernel} "
        f"(it has: {', '.join(present) or 'none'}).",
        hint="Check that the kernel release belongs to this Flatcar release; releases "
        "before the developer container shipped kernel trees need --emerge-sources.",
    )


def _release_kernel_tree(root: Path, kernel: str | None, version: str) -> KernelTree:
    """The kernel tree of a release named by its version: the one whose upstream version
    is the feed's `kernel` (`6.12.54` for /lib/modules/6.12.54-flatcar), or the only one
    when the feed names none. The package's identity then comes from that tree."""
    trees = _kernel_trees(root)
    matching = [r for r in trees if kernel is None or release.upstream_kernel(r) == kernel]
    if len(matching) == 1:
        log.info("Flatcar %s: building for its kernel %s", version, matching[0])
        return KernelTree.from_dir(trees[matching[0]], root=root)
    wanted = f"kernel {kernel} (its releases feed's)" if kernel else "one kernel"
    raise DriverError(
        f"The Flatcar {version} developer container has no single kernel tree for {wanted} "
        f"(it has: {', '.join(sorted(trees)) or 'none'}).",
        hint="Check the release version and FLATCAR_RELEASES_FEED; give the kernel with "
        "--kernel RELEASE instead when the release ships several.",
    )


def _emerged_kernel_tree(build_root: BuildRoot, kernel: str, network: dict[str, str]) -> KernelTree:
    """The old way (flatcar/Flatcar#106, #140, #300): emerge coreos-sources, then prepare
    /usr/src/linux with the kernel's own configuration. Needs network in the chroot (and
    `network`, the proxies of config.NETWORK)."""
    assert build_root.root is not None
    root = build_root.root
    hint = "emerge needs network access from the node and a release that still offers binpkgs."
    run(build_root.argv(["emerge-gitclone"]), env=network, hint=hint)
    run(build_root.argv(["emerge", "-gKq", "coreos-sources"]), env=network, hint=hint)
    linux = resolve_in(root, Path("/usr/src/linux"))
    for candidate in (f"/usr/lib64/modules/{kernel}/build/.config", f"/usr/boot/config-{kernel}"):
        config = resolve_in(root, Path(candidate))
        if config.is_file():
            shutil.copyfile(config, linux / ".config")
            break
    else:
        raise DriverError(
            f"No kernel configuration for {kernel} in the developer container after "
            "emerging coreos-sources.",
            hint="Use a Flatcar release whose developer container ships the kernel tree.",
        )
    run(build_root.argv(["make", "-C", "/usr/src/linux", "olddefconfig", "modules_prepare"]))
    return KernelTree.from_dir(Path("/usr/src/linux"), root=root)


def _build(
    config: Config,
    source: DriverSource,
    flavour: str,
    tree: KernelTree,
    build_dir: Path,
    build_root: BuildRoot,
) -> BuildOutput:
    try:
        output = build_modules(
            source, flavour, tree, build_dir, jobs=config.max_threads, build_root=build_root
        )
    except DriverError:
        _keep_build_log(config, build_dir / "build.log", tree.output.name)
        raise
    if config.sign_key is not None:
        output = sign_build(output, tree, config.sign_key, build_dir / "signing", build_root)
    return output


def _keep_build_log(config: Config, log_file: Path, kernel: str) -> None:
    if log_file.is_file():
        dest = config.cache_dir / "logs" / f"build-{kernel}.log"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(log_file, dest)
        log.error("The build log is kept at %s", dest)
