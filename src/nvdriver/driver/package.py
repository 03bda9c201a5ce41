"""The precompiled package (docs/package.md).

One file per (driver version, flavour, tag) under <store>/<kernel-release>/, in one of
two stores of the same layout (`stores`): the image's (PRECOMPILED_DIR) and the node's
(NODE_PRECOMPILED_DIR). Each package is
a gzip'd tar whose first member is `manifest.json`. The manifest names the kernel
by what the kernel checks at load (release, vermagic, the CRCs of the kernel symbols
the modules import; the full `/proc/version` only as information), the toolchain and
the linker the package carries, every module and the SHA-256 of every member.
Proprietary modules are stored unlinked (interface object only); linking with NVIDIA's
core object happens on the node, with the carried linker (driver/toolchain.py).

Which package fits the running kernel is kmod/abi.py's verdict; one that does not
(another build of the same release with another ABI) is moved aside as stale.

Reading a package hashes every member on the way and refuses absolute paths,
`..`, links, devices and members the manifest does not list; a package that
fails is moved aside and never used.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import re
import tarfile
import zlib
from collections.abc import Callable, Collection, Iterator
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any, NamedTuple, cast

from nvdriver.atomic import TEMP_PREFIX, atomic_file
from nvdriver.config import KERNEL_RELEASE_RE, Config
from nvdriver.errors import DriverError, IntegrityError
from nvdriver.host import KernelIdentity
from nvdriver.kmod.abi import Fit
from nvdriver.pattern import Pattern

if TYPE_CHECKING:  # driver.build (subprocess, the compiler's world) is for `update` only
    import datetime

    from nvdriver.driver.build import BuildOutput

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
# Format 1 matched kernels by the full /proc/version line and carried no linker.
OLD_FORMATS = {1: "it matched kernels by /proc/version and records no symbol CRCs"}
MANIFEST = "manifest.json"
SUFFIX = ".tar.gz"
FAILED_SUFFIX = ".failed"  # failed verification
STALE_SUFFIX = ".stale"  # does not fit the running kernel's ABI (or the kernel refused it)
CHUNK = 1 << 20
_NAME_RE = Pattern(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


class ModuleEntry(NamedTuple):
    name: str
    file: str  # a member: a finished .ko, or the interface object of a split module
    core: str | None = None  # the core object, relative to the driver's flavour dir
    core_sha256: str | None = None
    signature: str | None = None  # a member: appended to the module once linked
    linked_sha256: str | None = None  # what linking must give for the signature to hold


class Manifest(NamedTuple):
    driver_version: str
    flavour: str
    kernel_release: str
    kernel_version: str
    compiler: str
    linker: str
    modules: tuple[ModuleEntry, ...]
    ld_scripts: tuple[str, ...]
    files: tuple[tuple[str, str], ...]  # (member, sha256)
    created: str
    tag: str | None = None
    signing: dict[str, str] | None = None
    kernel_vermagic: str | None = None
    kernel_symbols: tuple[tuple[str, int], ...] = ()  # (name, CRC) of imported kernel symbols
    linker_files: dict[str, Any] | None = None  # toolchain.LinkerFiles.manifest_entry()
    format: int = FORMAT_VERSION

    @property
    def kernel(self) -> KernelIdentity:
        return KernelIdentity(
            self.kernel_release, self.kernel_version, self.kernel_vermagic, self.kernel_symbols
        )

    def to_json(self) -> str:
        obj: dict[str, Any] = self._asdict()
        obj["modules"] = [m._asdict() for m in self.modules]
        obj["files"] = dict(self.files)
        obj["kernel_symbols"] = {name: f"0x{crc:08x}" for name, crc in self.kernel_symbols}
        return json.dumps(obj, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, origin: Path) -> Manifest:
        """Parse and validate a manifest; anything unexpected is an integrity failure."""
        try:
            obj = json.loads(text)
            if obj["format"] in OLD_FORMATS:
                raise IntegrityError(
                    f"The package {origin} was made by an older nvidia-driver (package format "
                    f"{obj['format']}: {OLD_FORMATS[obj['format']]}); this one reads format "
                    f"{FORMAT_VERSION} only.",
                    hint="Make it again with this image: nvidia-driver update (or let init "
                    "build it); `nvidia-driver packages prune` removes the old one.",
                )
            if obj["format"] != FORMAT_VERSION:
                raise ValueError(f"format {obj['format']} (this program reads {FORMAT_VERSION})")
            files = obj["files"]
            if not isinstance(files, dict):
                raise TypeError("files is not an object")
            for name, digest in files.items():
                _check_member_name(name)
                if not re.fullmatch(r"[0-9a-f]{64}", digest):
                    raise ValueError(f"bad sha256 for {name}")
            m = cls(
                driver_version=str(obj["driver_version"]),
                flavour=str(obj["flavour"]),
                kernel_release=str(obj["kernel_release"]),
                kernel_version=str(obj["kernel_version"]),
                compiler=str(obj["compiler"]),
                linker=str(obj["linker"]),
                modules=tuple(ModuleEntry(**e) for e in obj["modules"]),
                ld_scripts=tuple(str(s) for s in obj["ld_scripts"]),
                files=tuple(sorted(files.items())),
                created=str(obj["created"]),
                tag=obj.get("tag"),
                signing=obj.get("signing"),
                kernel_vermagic=obj["kernel_vermagic"],
                kernel_symbols=tuple(
                    sorted((str(n), int(c, 16)) for n, c in obj["kernel_symbols"].items())
                ),
                linker_files=obj.get("linker_files"),
            )
            if m.kernel_vermagic is not None and not isinstance(m.kernel_vermagic, str):
                raise TypeError("kernel_vermagic is not a string")
            if not KERNEL_RELEASE_RE.fullmatch(m.kernel_release):
                raise ValueError(f"bad kernel release {m.kernel_release!r}")
            listed = dict(m.files)
            signatures = [e.signature for e in m.modules if e.signature is not None]
            linker = _linker_members(m.linker_files)
            for name in [e.file for e in m.modules] + list(m.ld_scripts) + signatures + linker:
                if name not in listed:
                    raise ValueError(f"{name} is not among the files")
        except (ValueError, KeyError, TypeError) as e:
            raise IntegrityError(
                f"The package {origin} has an invalid manifest: {e}.",
                hint="Remove it (nvidia-driver packages prune) and build again.",
            ) from e
        return m


class Package(NamedTuple):
    path: Path
    manifest: Manifest

    @property
    def size(self) -> int:
        return self.path.stat().st_size


def _linker_members(entry: dict[str, Any] | None) -> list[str]:
    """The members the carried linker's manifest entry names (ValueError when malformed)."""
    if entry is None:
        return []
    names = [entry["program"], entry["loader"], *entry["libraries"]]
    if not all(isinstance(n, str) for n in names):
        raise ValueError("linker_files names a member that is not a string")
    return [str(n) for n in names]


def package_name(driver_version: str, flavour: str, tag: str | None) -> str:
    return f"nvidia-{driver_version}-{flavour}{'-' + tag if tag else ''}{SUFFIX}"


def _check_member_name(name: str) -> None:
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or not name or name.startswith("./"):
        raise ValueError(f"unsafe member name {name!r}")


def _hostile(member: tarfile.TarInfo) -> str | None:
    """Why `member` must not be extracted, or None when it is a plain safe file or dir."""
    name = PurePosixPath(member.name)
    if name.is_absolute():
        return f"member {member.name!r} has an absolute path"
    if ".." in name.parts:
        return f"member {member.name!r} leaves the destination with '..'"
    if member.issym() or member.islnk():
        link = member.linkname
        target = os.path.normpath(os.path.join(name.parent, link) if member.issym() else link)
        if os.path.isabs(link) or target == ".." or target.startswith("../"):
            return f"member {member.name!r} is a link to {link!r} outside the package"
        return f"member {member.name!r} is a link; packages hold plain files only"
    if member.isdev() or member.isfifo():
        return f"member {member.name!r} is a device or fifo"
    if not (member.isfile() or member.isdir()):
        return f"member {member.name!r} has an unsupported type"
    return None


def write_package(store_dir: Path, build: BuildOutput, *, tag: str | None) -> Package:
    """Pack a build atomically: a temporary name in the same directory, fsync, rename."""
    kernel_dir = store_dir / build.kernel.release
    kernel_dir.mkdir(parents=True, exist_ok=True)
    members: dict[str, Path] = {}
    modules = []
    for a in build.artifacts:
        members[a.path.name] = a.path
        core_sha = None
        if a.core is not None:
            core_sha = sha256_file(build.tree / a.core)
        signature = None
        if a.signature is not None:
            signature = f"signatures/{a.module}.ko.sig"
            members[signature] = a.signature
        modules.append(
            ModuleEntry(a.module, a.path.name, a.core, core_sha, signature, a.linked_sha256)
        )
    ld_scripts = []
    for i, script in enumerate(build.ld_scripts):
        name = f"lds/{i}-{script.name}"
        members[name] = script
        ld_scripts.append(name)
    if build.linker_files is not None:
        members.update(build.linker_files.members())
    manifest = Manifest(
        driver_version=build.driver_version,
        flavour=build.flavour,
        kernel_release=build.kernel.release,
        kernel_version=build.kernel.version,
        kernel_vermagic=build.kernel.vermagic,
        kernel_symbols=build.kernel.symbols,
        linker_files=build.linker_files.manifest_entry() if build.linker_files else None,
        compiler=build.compiler,
        linker=build.linker,
        modules=tuple(modules),
        ld_scripts=tuple(ld_scripts),
        files=tuple(sorted((n, sha256_file(p)) for n, p in members.items())),
        created=_now().isoformat(timespec="seconds"),
        tag=tag,
        signing=build.signing,
    )
    final = kernel_dir / package_name(build.driver_version, build.flavour, tag)
    try:
        with (
            atomic_file(final) as out,
            tarfile.open(fileobj=out, mode="w:gz", compresslevel=6) as tar,
        ):
            _add_bytes(tar, MANIFEST, manifest.to_json().encode())
            for name, path in sorted(members.items()):
                info = tar.gettarinfo(str(path), arcname=name)
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                info.mode = 0o644
                with path.open("rb") as f:
                    tar.addfile(info, f)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise DriverError(
            f"No space left in {kernel_dir} to write the package {final.name}: {e.strerror}.",
            hint=f"Free space in {store_dir} (nvidia-driver packages prune) and run again.",
        ) from e
    log.info("Packed %s", final)
    return Package(final, manifest)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _now() -> datetime.datetime:
    import datetime

    return datetime.datetime.now(datetime.timezone.utc)


def sha256_file(path: Path) -> str:
    import hashlib  # OpenSSL's library: not loaded by a start whose tree's proof holds

    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(path: Path) -> Manifest:
    """The manifest alone (the first member): cheap, for listing. Not a verification."""
    try:
        with tarfile.open(path, mode="r|gz") as tar:
            member = tar.next()
            if member is None or member.name != MANIFEST or not member.isfile():
                raise IntegrityError(f"The package {path} does not start with {MANIFEST}.")
            f = tar.extractfile(member)
            assert f is not None
            return Manifest.from_json(f.read(), path)
    except DriverError:
        raise
    except (tarfile.TarError, OSError, EOFError, ValueError, zlib.error) as e:
        raise IntegrityError(f"The package {path} cannot be read: {e}.") from e


class _Gunzip:
    """A package's tar stream, decompressed a megabyte of the file at a time (Python's gzip
    reads 8 KiB at a time: thousands of trips through Python for NVIDIA's modules). zlib
    checks the gzip trailer, the CRC-32 and length of what was decompressed, at the end
    (`zlib.error`); a truncated file is an EOFError, anything after the one gzip member a
    ValueError: a changed byte anywhere in the file is caught, even after the last member."""

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file
        self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)  # a gzip header and trailer
        self._out = memoryview(b"")

    def read(self, size: int) -> bytes:
        """Up to `size` bytes (tarfile's stream reads its buffer size); b"" at the end."""
        while not self._out and not self._inflate.eof:
            data = self._file.read(CHUNK)
            if not data:
                raise EOFError("the gzip stream ends before its end")
            self._out = memoryview(self._inflate.decompress(data))
            if self._inflate.eof and (self._inflate.unused_data or self._file.read(1)):
                raise ValueError("there is data after the gzip stream")
        chunk, self._out = self._out[:size], self._out[size:]
        return bytes(chunk)


def _unpack(path: Path, dest: Path | None) -> Manifest:
    """Read every member once, hashing it, writing it under `dest` when given; check all."""
    try:
        # Not tarfile's own gzip stream: it checks neither the CRC nor the length at the end.
        with path.open("rb", buffering=0) as file:
            gz = _Gunzip(file)
            with tarfile.open(fileobj=cast("IO[bytes]", gz), mode="r|", bufsize=CHUNK) as tar:
                manifest, seen = _members(tar, path, dest)
            while gz.read(CHUNK):
                pass
    except DriverError:
        raise
    except (tarfile.TarError, OSError, EOFError, ValueError, zlib.error) as e:
        raise IntegrityError(f"The package {path} cannot be read: {e}.") from e
    if manifest is None:
        raise IntegrityError(f"The package {path} is empty.")
    expected = dict(manifest.files)
    for name, digest in expected.items():
        if seen.get(name) != digest:
            what = "is missing" if name not in seen else "has the wrong SHA-256"
            raise IntegrityError(f"The package {path} failed verification: {name} {what}.")
    return manifest


def _members(
    tar: tarfile.TarFile, path: Path, dest: Path | None
) -> tuple[Manifest | None, dict[str, str]]:
    """The manifest (the first member) and each other member's SHA-256, written under
    `dest` when given; a member that is hostile or not listed once is an IntegrityError."""
    manifest: Manifest | None = None
    seen: dict[str, str] = {}
    for member in tar:
        if manifest is None:
            if member.name != MANIFEST or not member.isfile():
                raise IntegrityError(f"The package {path} does not start with {MANIFEST}.")
            f = tar.extractfile(member)
            assert f is not None
            manifest = Manifest.from_json(f.read(), path)
            continue
        if reason := _hostile(member):
            raise IntegrityError(
                f"The package {path} is refused: {reason}.",
                hint="Packages are made by `nvidia-driver update`; do not use this file.",
            )
        if member.isdir():
            continue
        if member.name not in dict(manifest.files) or member.name in seen:
            raise IntegrityError(
                f"The package {path} has a member its manifest does not list once: {member.name!r}."
            )
        src = tar.extractfile(member)
        assert src is not None
        seen[member.name] = _copy_hashing(src, dest / member.name if dest else None)
    return manifest, seen


def _copy_hashing(src: IO[bytes], dest: Path | None) -> str:
    """The member's SHA-256, written to `dest` on the way. Reading it may fail as a bad
    package does (the caller's IntegrityError); writing `dest` fails as a full or read-only
    disk does, which says nothing about the package (DriverError: it is not moved aside)."""
    import hashlib

    h = hashlib.sha256()
    out = None if dest is None else _create(dest)
    try:
        while chunk := src.read(CHUNK):
            h.update(chunk)
            view = memoryview(chunk)
            while out is not None and view:
                try:
                    view = view[out.write(view) or 0 :]
                except OSError as e:
                    raise _cannot_extract(out.name, e) from e
    finally:
        if out is not None:
            out.close()  # unbuffered: nothing is left to write
    return h.hexdigest()


def _create(dest: Path) -> io.FileIO:
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        return io.FileIO(dest, "xb")
    except OSError as e:
        raise _cannot_extract(dest, e) from e


def _cannot_extract(dest: object, error: OSError) -> DriverError:
    return DriverError(
        f"Cannot extract the package into {Path(str(dest)).parent}: {error.strerror}.",
        hint="The directory must be writable and have free space; the package is not at fault.",
    )


def verify(path: Path, *, keep_failed: bool = True) -> Manifest:
    """Verify every member's SHA-256; on failure move the package aside (unless not
    `keep_failed`: a download that its caller removes) and raise."""
    try:
        return _unpack(path, None)
    except IntegrityError:
        if keep_failed:
            move_aside(path)
        raise


@contextlib.contextmanager
def unpacked(path: Path, workdir: Path) -> Iterator[tuple[Manifest, Path]]:
    """Verify and extract into a fresh directory, removed on exit; nothing used before all
    members are verified. A failing package is moved aside."""
    import shutil
    import tempfile

    dest = Path(tempfile.mkdtemp(prefix="unpack-", dir=workdir))
    try:
        try:
            manifest = _unpack(path, dest)
        except IntegrityError:
            move_aside(path)
            raise
        yield manifest, dest
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def move_aside(path: Path, suffix: str = FAILED_SUFFIX) -> Path | None:
    """Rename a failed (or, with STALE_SUFFIX, a stale) package so that it is never picked
    again (kept for inspection; `packages prune` removes it)."""
    if not path.exists() or path.name.endswith((FAILED_SUFFIX, STALE_SUFFIX)):
        return None
    stamp = _now().strftime("%Y%m%dT%H%M%S")
    aside = path.with_name(f"{path.name}.{stamp}{suffix}")
    with contextlib.suppress(OSError):
        os.replace(path, aside)
        what = "stale" if suffix == STALE_SUFFIX else "failed"
        log.warning("Moved the %s package %s aside to %s", what, path, aside.name)
        return aside
    return None


IMAGE_STORE = "image"
NODE_STORE = "node"


class PackageStore:
    """One directory per kernel release holding packages; `kind` says which store it is
    (IMAGE_STORE or NODE_STORE), for the people who read listings and logs."""

    def __init__(self, root: Path, kind: str = IMAGE_STORE) -> None:
        self.root = root
        self.kind = kind

    def __str__(self) -> str:
        return f"{self.root} (the {self.kind}'s store)"

    def package_files(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(
            p
            for d in self.root.iterdir()
            if d.is_dir() and KERNEL_RELEASE_RE.fullmatch(d.name)
            for p in d.iterdir()
            if p.is_file() and p.name.endswith(SUFFIX) and _NAME_RE.fullmatch(p.name)
        )

    def packages(self) -> tuple[list[Package], list[tuple[Path, DriverError]]]:
        """Every readable package, and the unreadable ones with why."""
        good, bad = [], []
        for p in self.package_files():
            try:
                good.append(Package(p, read_manifest(p)))
            except DriverError as e:
                bad.append((p, e))
        return good, bad

    def find(
        self,
        release: str,
        driver_version: str,
        flavour: str,
        tag: str | None,
        fit: Callable[[KernelIdentity], Fit],
        *,
        stale: bool = False,
        refused: Collection[Path] = (),
    ) -> Package | None:
        """The package of kernel `release`, driver and flavour that `fit` accepts.

        With a tag, only that tag; without one, an untagged package, else the newest.
        Packages `fit` refuses are logged with its reason and, with `stale` (the verdict
        is on the running kernel), moved aside as stale; `refused` ones are skipped (the
        kernel refused them in this run already).
        """
        kernel_dir = self.root / release
        if not kernel_dir.is_dir():
            return None
        candidates = []
        for p in sorted(kernel_dir.glob(f"*{SUFFIX}")):
            try:
                m = read_manifest(p)
            except DriverError as e:
                log.warning("Ignoring unreadable package %s: %s", p, e)
                continue
            if (
                p in refused
                or m.kernel_release != release
                or m.driver_version != driver_version
                or m.flavour != flavour
                or (tag is not None and m.tag != tag)
            ):
                continue
            verdict = fit(m.kernel)
            if verdict.fits:
                log.debug("Package %s fits: %s", p, verdict)
                candidates.append(Package(p, m))
                continue
            log.warning("Not using the package %s: %s", p, verdict)
            if stale:
                move_aside(p, STALE_SUFFIX)
        if not candidates:
            return None
        candidates.sort(key=lambda pkg: (pkg.manifest.tag is None, pkg.manifest.created))
        return candidates[-1]

    def leftovers(self) -> list[Path]:
        """Temporary files of interrupted writes and packages moved aside."""
        if not self.root.is_dir():
            return []
        return sorted(
            p
            for d in self.root.iterdir()
            if d.is_dir()
            for p in d.iterdir()
            if p.name.startswith(TEMP_PREFIX) or p.name.endswith((FAILED_SUFFIX, STALE_SUFFIX))
        )

    def remove_temp_files(self) -> None:
        """Remove what a crashed write left (a reader never saw it under a package name)."""
        for p in self.leftovers():
            if p.name.startswith(TEMP_PREFIX):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()


def stores(config: Config) -> tuple[PackageStore, ...]:
    """The stores in the order `init` and `load` look: the image's (PRECOMPILED_DIR, filled
    by `update` and kept by `docker commit`: the seed's workflow), then the node's
    (NODE_PRECOMPILED_DIR, a host directory: what is built on the node survives pod
    recreation and image upgrades). One store when both settings name the same directory.
    """
    image = PackageStore(config.precompiled_dir, IMAGE_STORE)
    node = PackageStore(config.node_precompiled_dir, NODE_STORE)
    if os.path.realpath(image.root) == os.path.realpath(node.root):
        return (image,)
    return (image, node)
