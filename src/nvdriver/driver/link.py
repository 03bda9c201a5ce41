"""Linking modules from a package and installing them into the private module tree.

Split modules are linked here, on the node: `ld -d -r -T module.lds -o nvidia.ko
nv-linux.o nv-kernel.o_binary` (the interface object already holds nvidia.mod.o),
with the linker that built the interface, which the package carries
(driver/toolchain.py): a signed package's modules come out byte for byte as signed,
on any node. The tree is
/opt/nvidia/VERSION/lib/modules/KERNEL (Flatcar's /lib/modules is read-only),
staged beside its final place, `depmod -b`'d, given its proof (driver/proof.py),
then swapped in. A later start whose package, core objects and tree are those of
the proof uses the tree as it is: nothing is verified, linked or depmod'ed again.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from nvdriver.atomic import OLD_PREFIX, replace_directory
from nvdriver.driver import proof
from nvdriver.driver.package import Manifest, read_manifest, sha256_file, unpacked
from nvdriver.driver.proof import FileIdentity
from nvdriver.driver.source import DriverSource
from nvdriver.errors import DriverError, IntegrityError
from nvdriver.run import run

log = logging.getLogger(__name__)


def link_package(
    package: Path,
    source: DriverSource,
    base: Path,
    *,
    release: str | None = None,
) -> Path:
    """Verify `package`, link and install its modules under `base`; return the module dir.

    The package is verified completely before any member is used; with `release`, it
    must have been built for that kernel release (whether it fits the running kernel's
    ABI was decided before: kmod/abi.py), and the tree linked from it before is used
    as it is when its proof holds. The tree at `base/lib/modules/KERNEL` is replaced
    only once the new one is complete.
    """
    try:
        if release is not None and (proven := _proven_tree(package, source, base, release)):
            return proven
        return _link_package(package, source, base, release=release)
    except OSError as e:  # a read-only or full disk under /opt/nvidia
        raise DriverError(
            f"Cannot write the module tree under {base}: {e.strerror}"
            + (f" ({e.filename})" if e.filename else "")
            + ".",
            hint="The container's /opt/nvidia (under CONTAINER_ROOT) must be a writable directory "
            "with free space (a few hundred MiB).",
        ) from e


def _proven_tree(package: Path, source: DriverSource, base: Path, release: str) -> Path | None:
    """The tree linked from `package` on this node before, when its proof holds."""
    moddir = base / "lib" / "modules" / release
    recorded = proof.recorded(moddir)
    if recorded is None or not recorded.is_of(package):  # a stat: before reading anything
        return None
    try:
        manifest = read_manifest(package)
        cores = _cores(source, manifest)
    except DriverError:
        return None  # the full verification says what is wrong with it
    if manifest.kernel_release != release or not recorded.holds(package, manifest, cores, moddir):
        return None
    log.info(
        "Using %s as linked from %s, verified on this node before (its proof holds)",
        moddir,
        package,
    )
    return moddir


def _cores(source: DriverSource, manifest: Manifest) -> list[Path]:
    """NVIDIA's core objects the package's split modules link with, from the driver image."""
    return [source.flavour_dir(manifest.flavour) / e.core for e in manifest.modules if e.core]


def _identity(path: Path) -> FileIdentity | None:
    try:
        return FileIdentity.of(path)
    except OSError:
        return None  # the verification says what is wrong with it


def _link_package(
    package: Path,
    source: DriverSource,
    base: Path,
    *,
    release: str | None,
) -> Path:
    from nvdriver.driver.toolchain import packed_linker  # a tree whose proof holds needs none

    base.mkdir(parents=True, exist_ok=True)
    verified = _identity(package)  # taken before verifying: it must still hold after
    with (
        _CoreDigests(package, source) as digests,
        _staging(base) as staging,
        unpacked(package, staging) as (manifest, members),
    ):
        if release is not None and manifest.kernel_release != release:
            raise DriverError(
                f"The package {package} is for kernel {manifest.kernel_release}, not for "
                f"{release}.",
                hint="Build a package for this kernel: nvidia-driver update.",
            )
        release = manifest.kernel_release
        ld = packed_linker(manifest.linker_files, members, manifest.linker).argv
        moddir = staging / "lib" / "modules" / release
        moddir.mkdir(parents=True)
        flavour_dir = source.flavour_dir(manifest.flavour)
        order = []
        cores: dict[Path, FileIdentity | None] = {}
        for entry in manifest.modules:
            out = moddir / f"{entry.name}.ko"
            if entry.core is None:
                shutil.copyfile(members / entry.file, out)
            else:
                core = flavour_dir / entry.core
                cores[core] = digests.identity(core)
                _check_core(package, manifest, core, entry.core_sha256, digests.digest(core))
                scripts = [str(members / s) for s in manifest.ld_scripts]
                run(link_command(ld, scripts, str(out), str(members / entry.file), str(core)))
                if entry.signature is not None:
                    _append_signature(package, out, members / entry.signature, entry.linked_sha256)
            order.append(out.name)
        (moddir / "modules.order").write_text("".join(f"{name}\n" for name in order))
        run(["depmod", "-b", staging, release])
        _record_proof(package, verified, manifest, cores, moddir)
        final = base / "lib" / "modules" / release
        replace_directory(moddir, final)
        log.info("Linked and installed %s into %s", ", ".join(order), final)
        return final


def _record_proof(
    package: Path,
    verified: FileIdentity | None,
    manifest: Manifest,
    cores: dict[Path, FileIdentity | None],
    moddir: Path,
) -> None:
    """Write the tree's proof, unless the package or a core object changed while it was
    read (or is gone): then the next start verifies again."""
    try:
        now = proof.observe(package, FileIdentity.of(package), manifest, list(cores), moddir)
    except OSError:
        now = None
    before = {str(core): identity for core, identity in cores.items()}
    if now is None or now.identity != verified or now.cores != before:
        log.warning("%s changed while it was verified; not recording its proof", package)
        return
    proof.record(now, moddir)


def link_command(
    ld: Sequence[str], scripts: Sequence[str], out: str, interface: str, core: str
) -> list[str]:
    """The one link of a split module: packing (to sign) and the node must run the same."""
    return [*ld, "-d", "-r", *(a for s in scripts for a in ("-T", s)), "-o", out, interface, core]


class _CoreDigests:
    """The SHA-256 of NVIDIA's core objects that the package's manifest names, computed in a
    thread while the package is verified and unpacked (hashlib and zlib let go of the
    interpreter's lock: a second CPU hashes the tens of megabytes of `nv-kernel.o_binary`
    meanwhile). What the verified manifest names that this did not hash (or could not read)
    is hashed when it is checked, as before; each core's identity is taken before its hash,
    for the proof."""

    def __init__(self, package: Path, source: DriverSource) -> None:
        self._identities: dict[Path, FileIdentity | None] = {}
        self._digests: dict[Path, str] = {}
        try:
            manifest = read_manifest(package)  # the verification below decides on it
        except DriverError:
            manifest = None
        self._thread = threading.Thread(
            target=self._hash, args=([] if manifest is None else _cores(source, manifest),)
        )

    def __enter__(self) -> _CoreDigests:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.join()

    def _hash(self, cores: list[Path]) -> None:
        for core in cores:
            self._identities[core] = _identity(core)
            with contextlib.suppress(OSError):
                self._digests[core] = sha256_file(core)

    def identity(self, core: Path) -> FileIdentity | None:
        self._thread.join()
        return self._identities[core] if core in self._identities else _identity(core)

    def digest(self, core: Path) -> str | None:
        self._thread.join()
        return self._digests.get(core)


def _check_core(
    package: Path, manifest: Manifest, core: Path, digest: str | None, hashed: str | None
) -> None:
    """The interface must be linked with the very core object it was built against (its
    SHA-256 `hashed` already, or now)."""
    if not core.is_file():
        raise IntegrityError(
            f"NVIDIA's core object {core} is missing; the package {package} needs it.",
            hint="Use the driver image of version " + manifest.driver_version + ".",
        )
    if digest is not None and (hashed or sha256_file(core)) != digest:
        raise IntegrityError(
            f"NVIDIA's core object {core} differs from the one the package {package} "
            "was built with.",
            hint="Rebuild the package with this driver image (nvidia-driver update).",
        )


def _append_signature(package: Path, module: Path, signature: Path, expected: str | None) -> None:
    """Sign the freshly linked module with the signature made at packing time.

    The signature covers the module as the packer linked it: linking here must
    give the very same bytes, which needs the same linker (saved from the build).
    """
    if sha256_file(module) != expected:
        raise IntegrityError(
            f"Linking {module.name} here did not reproduce the module that was signed when "
            f"the package {package} was made, so its signature cannot be used.",
            hint="The package carries no copy of the linker that built it (made by a build "
            "without one); build a package here (nvidia-driver update).",
        )
    with module.open("ab") as out:
        out.write(signature.read_bytes())


@contextlib.contextmanager
def _staging(base: Path) -> Iterator[Path]:
    import tempfile  # with `random`: only when a tree is linked

    path = Path(tempfile.mkdtemp(prefix=".staging-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def remove_stale(base: Path) -> None:
    """Remove staging and old trees that a killed run left under `base`."""
    if not base.is_dir():
        return
    for p in list(base.iterdir()) + list((base / "lib" / "modules").glob(f"{OLD_PREFIX}*")):
        if p.name.startswith((".staging-", OLD_PREFIX)):
            shutil.rmtree(p, ignore_errors=True)
