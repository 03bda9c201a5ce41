"""A faithful local Flatcar release mirror for tests, and an HTTP server for it.

`build_mirror(kernel_release)` builds (once; cached) what Flatcar publishes for a
release, but with a developer root made from this host's Debian packages, so that
the developer container holds real compilers and the real kernel headers of a
kernel that runs here:

    <root>/<board>/<version>/flatcar_developer_container.bin.bz2   (+ .sig, .DIGESTS,
                                                                      .DIGESTS.asc, .DIGESTS.sig)
    <root>/<board>/<version>/version.txt                           (+ the same four)
    <root>/releases-json/releases-<channel>.json                   (the releases feed)

The image is a raw GPT disk in Flatcar's "container" layout (flatcar/scripts
build_library/disk_layout.json and disk_util): partitions 1-8 are "blank", which
disk_util never writes into the table, so the table holds one entry, number 9,
label ROOT, type 0fc63daf-8483-4772-8e79-3d69d8477de4, from LBA 4096, with an
ext4 file system made like disk_util's (`-b 4096 -i 4096 -I 256`, label ROOT,
`errors=remount-ro`); the disk GUID is 00000000-0000-0000-0000-000000000001 and
the disk size is a multiple of 258048 sectors. Signatures and digests follow
flatcar/scripts ci-automation (sign_artifacts, create_digests), made with a
throw-away key (an ed25519 certification key with an ed25519 signing subkey, like
Flatcar's buildbot key), generated per cache entry, plus a second "wrong" key.

`serve_mirror(mirror)` serves it on 127.0.0.1 (Range, HEAD, fault injection).
The `make_*_variant` functions write hostile copies of a mirror for failure tests.

Cache: ~/.cache/nvidia-driver-tests/flatcar-mirror/ (or $FLATCAR_MIRROR_CACHE):
`roots/<hash>/` the developer root (kernel release, headers version, suite,
packages), `mirrors/<hash>/` the published tree and keys (root hash, image size,
versions); both built in a temporary directory and renamed into place under a
lock, so parallel test processes build once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import email.utils
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO

from tests.kernels import header_kernels, kernels_under_test

log = logging.getLogger(__name__)

SCRIPT_VERSION = 5  # bump to invalidate every cache entry

DEFAULT_VERSION = "4152.2.3"
DEFAULT_BOARD = "amd64-usr"
IMAGE_NAME = "flatcar_developer_container.bin.bz2"
VERSION_TXT = "version.txt"
DEVROOT_PACKAGES = ("gcc-12", "gcc", "make", "binutils", "libc6-dev", "libelf-dev", "kmod", "bc")

SECTOR = 512
FS_BLOCK = 4096
ROOT_PARTITION = 9
ROOT_LABEL = "ROOT"
ROOT_TYPE_GUID = "0fc63daf-8483-4772-8e79-3d69d8477de4"
ROOT_START_LBA = 4096  # disk_layout.json part_alignment; byte 2097152
DISK_ALIGNMENT = 258048  # disk_layout.json disk_alignment, in sectors
DISK_GUID = "00000000-0000-0000-0000-000000000001"
GPT_RESERVED_SECTORS = 34
DEFAULT_FREE_BYTES = 512 * 1024 * 1024  # free space left in ROOT by default

CHANNELS = {"0": "alpha", "1": "beta", "2": "stable", "3": "lts"}
VERSION_RE = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")
KERNEL_RE = re.compile(r"^\d+\.\d+[A-Za-z0-9.+~_-]*$")

SIGNING_UID = "Flatcar Test Buildbot (Throw-away Builds) <buildbot@flatcar-mirror.invalid>"
WRONG_UID = "Not Flatcar (Wrong Key) <wrong@flatcar-mirror.invalid>"


class MirrorUnavailable(RuntimeError):
    """This machine cannot build the mirror (not root, a tool or the headers missing)."""


class MirrorBuildError(RuntimeError):
    """Building the mirror failed on a machine that should be able to."""


# --------------------------------------------------------------------------- host facts


def cache_base() -> Path:
    explicit = os.environ.get("FLATCAR_MIRROR_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "nvidia-driver-tests" / "flatcar-mirror"


def default_kernel_release() -> str:
    """$FLATCAR_MIRROR_KERNEL, else the running kernel if its headers are here, else the newest."""
    wanted = os.environ.get("FLATCAR_MIRROR_KERNEL")
    if wanted:
        return wanted
    releases = header_kernels()
    if not releases:
        raise MirrorUnavailable("no kernel headers here: no /lib/modules/*/build")
    running = os.uname().release
    return running if running in releases else releases[-1]


def kernel_upstream(kernel_release: str) -> str:
    """What Flatcar's feed lists for a kernel: the release cut at the first '-'."""
    return kernel_release.split("-", 1)[0]


def channel_of(version: str) -> str:
    match = VERSION_RE.match(version)
    if not match:
        raise ValueError(f"not a Flatcar version: {version!r}")
    return CHANNELS.get(match.group(2)[-1], "stable")


def _run(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    input: bytes | None = None,
    timeout: float = 900,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    args = [os.fspath(c) for c in cmd]
    proc = subprocess.run(
        args,
        input=input,
        capture_output=True,
        timeout=timeout,
        cwd=cwd,
        env=dict(env) if env is not None else None,
        check=False,
    )
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).decode(errors="replace")[-4000:]
        raise MirrorBuildError(f"{' '.join(args)} exited {proc.returncode}:\n{tail}")
    return proc


def headers_package_version(kernel_release: str) -> str:
    """The version of `linux-headers-K`: installed here, else apt's candidate."""
    package = f"linux-headers-{kernel_release}"
    proc = subprocess.run(
        ["dpkg-query", "-W", "-f", "${db:Status-Status} ${Version}", package],
        capture_output=True,
        text=True,
        check=False,
    )
    status, _, version = proc.stdout.strip().partition(" ")
    if proc.returncode == 0 and status == "installed" and version:
        return version
    proc = subprocess.run(
        ["apt-cache", "policy", package], capture_output=True, text=True, check=False
    )
    match = re.search(r"^\s*Candidate:\s*(\S+)", proc.stdout, re.MULTILINE)
    if not match or match.group(1) == "(none)":
        raise MirrorUnavailable(f"{package} is neither installed nor offered by apt here")
    return match.group(1)


def apt_source_lines() -> list[str]:
    """One `deb URI SUITE COMPONENT...` line per repository of this host's apt sources."""
    proc = subprocess.run(
        [
            "apt-get",
            "indextargets",
            "--format",
            "$(REPO_URI) $(RELEASE) $(COMPONENT)",
            "Identifier: Packages",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    repos: dict[tuple[str, str], list[str]] = {}
    for line in proc.stdout.splitlines():
        fields = line.split()
        if len(fields) != 3:
            continue
        components = repos.setdefault((fields[0], fields[1]), [])
        if fields[2] not in components:
            components.append(fields[2])
    if not repos:
        raise MirrorUnavailable("apt lists no repositories here (apt-get indextargets)")
    return [f"deb {uri} {suite} {' '.join(comps)}" for (uri, suite), comps in repos.items()]


def host_suite() -> str:
    for line in Path("/etc/os-release").read_text().splitlines():
        key, _, value = line.partition("=")
        if key == "VERSION_CODENAME" and value:
            return value.strip('"')
    raise MirrorUnavailable("no VERSION_CODENAME in /etc/os-release")


def _apt_hosts(lines: Sequence[str]) -> set[str]:
    hosts = set()
    for line in lines:
        host = urllib.parse.urlsplit(line.split()[1]).hostname
        if host:
            hosts.add(host)
    return hosts


def _check_prerequisites() -> None:
    if os.geteuid() != 0:
        raise MirrorUnavailable("building the Flatcar mirror needs root (mmdebstrap, mkfs -d)")
    tools = (
        "mmdebstrap",
        "sfdisk",
        "mkfs.ext4",
        "gpg",
        "gpgconf",
        "lbzip2",
        "dpkg-query",
        "apt-get",
    )
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        raise MirrorUnavailable(f"missing tools: {', '.join(missing)}")


# --------------------------------------------------------------------------- the result


@dataclasses.dataclass(frozen=True)
class FlatcarMirror:
    """A published release tree. `root` is what the server serves."""

    root: Path
    board: str
    version: str
    kernel_release: str
    channel: str
    older_version: str  # another release in the feed with the same kernel (no artifacts)
    signing_key: Path  # armored public key (what FLATCAR_SIGNING_KEY points at)
    signing_keyring: Path  # the same, binary (for `gpgv --keyring`)
    wrong_key: Path
    wrong_keyring: Path
    signing_secret: Path  # armored secret keys, for re-signing variants
    wrong_secret: Path
    feed: Path
    devroot: Path  # the developer root the image was made from (read-only: shared)
    image_size: int  # bytes of the uncompressed .bin

    @property
    def kernel_upstream(self) -> str:
        return kernel_upstream(self.kernel_release)

    @property
    def release_dir(self) -> Path:
        return self.root / self.board / self.version

    @property
    def image(self) -> Path:
        """The compressed image, `flatcar_developer_container.bin.bz2`."""
        return self.release_dir / IMAGE_NAME

    @property
    def version_txt(self) -> Path:
        return self.release_dir / VERSION_TXT

    def url_path(self, name: str = IMAGE_NAME) -> str:
        """The URL path of an artifact of this release (`/amd64-usr/<version>/<name>`)."""
        return f"/{self.board}/{self.version}/{name}"

    @property
    def feed_url_path(self) -> str:
        return "/" + self.feed.relative_to(self.root).as_posix()


# --------------------------------------------------------------------------- GPG


def _gpg_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["GNUPGHOME"] = str(home)
    env.pop("GPG_AGENT_INFO", None)
    return env


@contextlib.contextmanager
def _gpg_home() -> Iterator[Path]:
    # Short path under /tmp: gpg-agent's socket path has a length limit.
    home = Path(tempfile.mkdtemp(prefix="fm-gpg-", dir="/tmp"))
    home.chmod(0o700)
    try:
        yield home
    finally:
        subprocess.run(
            ["gpgconf", "--homedir", str(home), "--kill", "all"],
            capture_output=True,
            check=False,
        )
        shutil.rmtree(home, ignore_errors=True)


def _gpg(home: Path, *args: str | os.PathLike[str], input: bytes | None = None) -> bytes:
    cmd: list[str | os.PathLike[str]] = [
        "gpg",
        "--batch",
        "--no-tty",
        "--quiet",
        "--homedir",
        home,
        "--pinentry-mode",
        "loopback",
        "--passphrase",
        "",
        *args,
    ]
    return _run(cmd, input=input, env=_gpg_env(home), timeout=120).stdout


def generate_key(dest: Path, name: str, uid: str) -> tuple[Path, Path, Path]:
    """A throw-away key: `<name>.asc` (armored public), `<name>.gpg` (binary public),
    `<name>-secret.asc`. Certification-only ed25519 primary key with an ed25519
    signing subkey, no passphrase, no expiry."""
    dest.mkdir(parents=True, exist_ok=True)
    with _gpg_home() as home:
        _gpg(home, "--quick-gen-key", uid, "ed25519", "cert", "never")
        colons = _gpg(home, "--with-colons", "--list-keys", uid).decode()
        fpr = next(line.split(":")[9] for line in colons.splitlines() if line.startswith("fpr:"))
        _gpg(home, "--quick-add-key", fpr, "ed25519", "sign", "never")
        public, keyring, secret = (
            dest / f"{name}.asc",
            dest / f"{name}.gpg",
            dest / f"{name}-secret.asc",
        )
        public.write_bytes(_gpg(home, "--armor", "--export", fpr))
        keyring.write_bytes(_gpg(home, "--export", fpr))
        secret.write_bytes(_gpg(home, "--armor", "--export-secret-keys", fpr))
        secret.chmod(0o600)
    return public, keyring, secret


class Signer:
    """Signs with a secret key exported by `generate_key` (use as a context manager)."""

    def __init__(self, secret_key: Path) -> None:
        self._secret = secret_key
        self._stack = contextlib.ExitStack()
        self._home: Path | None = None

    def __enter__(self) -> Signer:
        self._home = self._stack.enter_context(_gpg_home())
        _gpg(self._home, "--import", self._secret)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
        self._home = None

    def _h(self) -> Path:
        if self._home is None:
            raise RuntimeError("Signer used outside `with`")
        return self._home

    def detach_sign(self, path: Path, out: Path | None = None) -> Path:
        out = out or path.with_name(path.name + ".sig")
        _unlink(out)
        _gpg(self._h(), "--output", out, "--detach-sign", path)
        return out

    def clearsign(self, path: Path, out: Path | None = None) -> Path:
        out = out or path.with_name(path.name + ".asc")
        _unlink(out)
        _gpg(self._h(), "--output", out, "--clearsign", path)
        return out


def _unlink(path: Path) -> None:
    # Files of a variant may be hard links into the cache: never write through them.
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def digests_text(path: Path, name: str | None = None) -> str:
    """A `.DIGESTS` file as flatcar/scripts create_digests writes it."""
    hashes = [hashlib.md5(), hashlib.sha1(), hashlib.sha512()]
    with path.open("rb") as f:
        while chunk := f.read(4 << 20):
            for h in hashes:
                h.update(chunk)
    base = name or path.name
    return "".join(
        f"# {label} HASH\n{h.hexdigest()}  {base}\n"
        for label, h in zip(("MD5", "SHA1", "SHA512"), hashes, strict=True)
    )


def publish_artifact(signer: Signer, path: Path, *, digests: str | None = None) -> None:
    """Write `X.sig`, `X.DIGESTS`, `X.DIGESTS.asc` and `X.DIGESTS.sig` beside X."""
    signer.detach_sign(path)
    dfile = path.with_name(path.name + ".DIGESTS")
    _unlink(dfile)
    dfile.write_text(digests if digests is not None else digests_text(path))
    signer.clearsign(dfile)
    signer.detach_sign(dfile)


# --------------------------------------------------------------------------- developer root


def _hash(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build_atomically(final: Path, build: Callable[[Path], None]) -> None:
    """Run `build(tmpdir)` and rename tmpdir to `final` (caller holds the lock)."""
    for stale in final.parent.glob(f".tmp-{final.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir(parents=True)
    try:
        build(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _os_release(version: str, board: str) -> str:
    return (
        'NAME="Flatcar Container Linux by Kinvolk"\n'
        "ID=flatcar\n"
        "ID_LIKE=coreos\n"
        f"VERSION={version}\n"
        f"VERSION_ID={version}\n"
        f"BUILD_ID=test-{version}\n"
        "SYSEXT_LEVEL=1.0\n"
        f'PRETTY_NAME="Flatcar Container Linux by Kinvolk {version} (test mirror)"\n'
        'ANSI_COLOR="38;5;75"\n'
        f'FLATCAR_BOARD="{board}"\n'
        f'CPE_NAME="cpe:2.3:o:flatcar-linux:flatcar_linux:{version}:*:*:*:*:*:*:*"\n'
    )


def _build_devroot(
    tmp: Path, kernel_release: str, headers_version: str, version: str, board: str
) -> None:
    rootfs = tmp / "rootfs"
    sources = apt_source_lines()
    suite = host_suite()
    include = [*DEVROOT_PACKAGES, f"linux-headers-{kernel_release}={headers_version}"]
    hook = (
        'rm -f "$1/etc/apt/sources.list" "$1/etc/apt/apt.conf.d/99mmdebstrap"'
        ' "$1/etc/resolv.conf" "$1/etc/hostname";'
        ' rm -rf "$1"/etc/apt/sources.list.d/*'
    )
    started = time.monotonic()
    _run(
        [
            "mmdebstrap",
            "--variant=minbase",
            "--include=" + ",".join(include),
            '--aptopt=Acquire::Check-Valid-Until "false"',
            "--customize-hook=" + hook,
            suite,
            rootfs,
            "-",
        ],
        input=("\n".join(sources) + "\n").encode(),
        timeout=1800,
    )
    log.info("mmdebstrap %s: %.1f s", kernel_release, time.monotonic() - started)
    _drop_kernel_image(rootfs, kernel_release)
    _drop_unused(rootfs)
    build = rootfs / "lib" / "modules" / kernel_release / "build"
    target = os.readlink(build)
    if not (rootfs / target.lstrip("/")).is_dir():
        raise MirrorBuildError(f"{build} -> {target} does not resolve inside the root")
    # No host name from the apt sources may land in the image.
    leaks = []
    for host in _apt_hosts(sources):
        for sub in ("etc/apt", "var/lib/apt", "var/cache/apt"):
            proc = subprocess.run(
                ["grep", "-rIl", "--", host, str(rootfs / sub)], capture_output=True, check=False
            )
            leaks += proc.stdout.decode().split()
    if leaks:
        raise MirrorBuildError(f"apt source host names left in the root: {sorted(set(leaks))}")
    # Flatcar's identity (Debian's own stays in /usr/lib/os-release).
    os_release = rootfs / "etc" / "os-release"
    _unlink(os_release)
    os_release.write_text(_os_release(version, board))
    flatcar = rootfs / "usr" / "share" / "flatcar"
    flatcar.mkdir(parents=True, exist_ok=True)
    (flatcar / "release").write_text(
        f"FLATCAR_RELEASE_VERSION={version}\nFLATCAR_RELEASE_BOARD={board}\n"
        "FLATCAR_RELEASE_APPID={e96281a6-d1af-4bde-9a0a-97b76e56dc57}\n"
    )
    flatcar_tree_layout(rootfs, kernel_release)
    second_build(rootfs, kernel_release)


def _remove(entry: Path) -> None:
    """A file, link or whole directory of the root being built."""
    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


def _drop_kernel_image(rootfs: Path, kernel_release: str) -> None:
    """Remove what a kernel image package put into the root (Debian's 6.12 headers depend
    on linux-image, 6.1's do not): its modules, vmlinuz, System.map and the initrd that
    initramfs-tools made. A build uses the kernel tree only (`build/`); these 140 MB are
    compressed already and would double the 6.12 image's .bz2, and with it every fetch
    of the tests (minutes under TCG in the guest). Both kernels' roots are alike then."""
    moddir = rootfs / "usr" / "lib" / "modules" / kernel_release
    for entry in list(moddir.iterdir()) if moddir.is_dir() else []:
        if entry.name not in ("build", "source"):
            _remove(entry)
    for entry in (rootfs / "boot").glob(f"*-{kernel_release}"):
        entry.unlink()


# What no module build runs or reads, about a third of the root: documentation and
# translations, gcc's link-time optimizer (Flatcar's and Debian's kernels are not built with
# LTO) and the sanitizers' runtimes (user space only).
_UNUSED = (
    "usr/share/doc",
    "usr/share/locale",
    "usr/share/man",
    "usr/share/info",
    "usr/bin/*lto-dump*",
    "usr/lib/gcc/x86_64-linux-gnu/*/lto1",
    "usr/lib/gcc/x86_64-linux-gnu/*/lib*san*",
    "usr/lib/x86_64-linux-gnu/lib*san.so*",
)


def _drop_unused(rootfs: Path) -> None:
    """Remove _UNUSED from the root: every fetch of the tests decompresses what the image
    holds (under TCG in the guest: a minute per 100 MiB of .bz2). Real developer containers
    are larger still; the product reads only the kernel tree and runs the compiler."""
    for pattern in _UNUSED:
        for entry in rootfs.glob(pattern):
            _remove(entry)


# The UTS_VERSION of the developer container's kernel tree: Flatcar builds the tree it ships
# (coreos-modules: `kmake vmlinux modules`, installed by install-extmod-build) apart from
# the kernel it boots (coreos-kernel: a fresh `kmake bzImage` from the same .config) and
# does not fix KBUILD_BUILD_TIMESTAMP, so the booted /proc/version names another build
# time than the tree (docs/package.md, "Which package fits a kernel"). The guest
# boots Debian's kernel, whose UTS_VERSION this never equals; release, vermagic and CRCs
# stay the booted kernel's.
TREE_UTS_VERSION = "#1 SMP PREEMPT_DYNAMIC Sat Nov 28 09:12:34 -00 2026"
# The symbol whose CRC the "another ABI" developer container changes: every NVIDIA
# module (the real ones and the stand-in) imports it, and so do the host's own modules.
ANOTHER_ABI_SYMBOL = "_printk"
ANOTHER_ABI_XOR = 0x5A5A5A5A


def _inside(rootfs: Path, link: Path) -> Path:
    """Where the link `link` (a path under `rootfs`) points, as seen inside the root."""
    target = os.readlink(link)
    if os.path.isabs(target):
        return rootfs / target.lstrip("/")
    return Path(os.path.normpath(link.parent / target))


def module_dir(rootfs: Path, kernel_release: str) -> Path:
    """/usr/lib/modules/KERNEL of a developer root (Debian's /lib is a link to usr/lib)."""
    return rootfs / "usr" / "lib" / "modules" / kernel_release


def flatcar_tree_layout(rootfs: Path, kernel_release: str) -> None:
    """Turn Debian's split headers into Flatcar's kernel tree: /usr/lib/modules/K/build one
    real directory, as scripts/package/install-extmod-build writes it (the source files a
    module build needs, the generated headers, .config, Module.symvers and the host
    programs of scripts/ in one place), and `source -> build`. Debian's layout (an
    `-amd64` output dir of generated files whose Makefile includes the `-common` source
    dir, both reached by absolute links, scripts/ from linux-kbuild) is removed."""
    moddir = module_dir(rootfs, kernel_release)
    output, source = _inside(rootfs, moddir / "build"), _inside(rootfs, moddir / "source")
    merged = moddir / ".build-merged"
    _run(["cp", "-a", f"{source}/.", merged])
    kbuild = set()
    for name in ("scripts", "tools"):  # links into Debian's linux-kbuild package
        link = merged / name
        if link.is_symlink():
            target = _inside(rootfs, source / name)
            kbuild.add(target.parent)
            link.unlink()
            _run(["cp", "-a", target, link])
    for entry in sorted(output.iterdir()):
        if entry.name in ("Makefile", "scripts", "tools"):
            continue  # the output dir's Makefile only includes the source dir's
        _run(["cp", "-a", entry, merged])
    (moddir / "build").unlink()
    (moddir / "source").unlink()
    merged.rename(moddir / "build")
    (moddir / "source").symlink_to("build")
    for gone in (output, source, *kbuild):
        shutil.rmtree(gone)
    for link in (rootfs / "usr" / "src").glob("linux-kbuild-*"):  # Debian's links to it
        link.unlink()


def second_build(rootfs: Path, kernel_release: str) -> None:
    """Give the tree another build's UTS_VERSION (TREE_UTS_VERSION): utsversion.h on trees
    that have it (6.1 keeps it in compile.h)."""
    generated = module_dir(rootfs, kernel_release) / "build" / "include" / "generated"
    pattern = re.compile(r'^(#define\s+UTS_VERSION\s+)"[^"]*"', re.MULTILINE)
    changed = 0
    for name in ("utsversion.h", "compile.h"):
        header = generated / name
        if header.is_file():
            text, n = pattern.subn(rf'\g<1>"{TREE_UTS_VERSION}"', header.read_text())
            header.write_text(text)
            changed += n
    if changed != 1:
        raise MirrorBuildError(f"{generated}: {changed} UTS_VERSION definitions, expected 1")


def another_abi(rootfs: Path, kernel_release: str) -> None:
    """Change the CRC of ANOTHER_ABI_SYMBOL in the tree's Module.symvers, as a rebuild of
    the same kernel version with another configuration changes it: modules built there
    record that CRC, and the booted kernel refuses them ("disagrees about version of
    symbol"). The file is written anew (the root is a hard-linked copy)."""
    symvers = module_dir(rootfs, kernel_release) / "build" / "Module.symvers"
    lines = symvers.read_text().splitlines(keepends=True)
    changed = 0
    for i, line in enumerate(lines):
        fields = line.split("\t")
        if len(fields) > 1 and fields[1] == ANOTHER_ABI_SYMBOL:
            fields[0] = f"0x{int(fields[0], 16) ^ ANOTHER_ABI_XOR:08x}"
            lines[i] = "\t".join(fields)
            changed += 1
    if changed != 1:
        raise MirrorBuildError(f"{symvers}: {ANOTHER_ABI_SYMBOL} found {changed} times")
    symvers.unlink()
    symvers.write_text("".join(lines))


def ensure_devroot(
    kernel_release: str,
    *,
    version: str = DEFAULT_VERSION,
    board: str = DEFAULT_BOARD,
    abi: str = "booted",
) -> tuple[Path, str]:
    """The cached developer root for a kernel release: (path, cache key).

    `abi`: "booted", the tree of the booted kernel's ABI (another build of it, as every
    Flatcar developer container's); "another", the same release with another CRC of one
    imported symbol (`another_abi`), a hard-linked copy of the first.
    """
    if abi == "another":
        base, base_key = ensure_devroot(kernel_release, version=version, board=board)
        key = _hash({"script": SCRIPT_VERSION, "base": base_key, "abi": abi})
        final = cache_base() / "roots" / key
        with _locked(cache_base() / "roots" / f"{key}.lock"):
            if not (final / "complete").exists():

                def derive(tmp: Path) -> None:
                    _run(["cp", "-a", "--link", base, tmp / "rootfs"])
                    another_abi(tmp / "rootfs", kernel_release)
                    (tmp / "complete").write_text(abi + "\n")

                _build_atomically(final, derive)
        return final / "rootfs", key
    if abi != "booted":
        raise ValueError(f"unknown abi {abi!r}")
    _check_prerequisites()
    if not KERNEL_RE.match(kernel_release):
        raise ValueError(f"not a kernel release: {kernel_release!r}")
    headers_version = headers_package_version(kernel_release)
    key = _hash(
        {
            "script": SCRIPT_VERSION,
            "kernel": kernel_release,
            "headers": headers_version,
            "suite": host_suite(),
            "packages": DEVROOT_PACKAGES,
            "version": version,
            "board": board,
        }
    )
    final = cache_base() / "roots" / key
    with _locked(cache_base() / "roots" / f"{key}.lock"):
        if not (final / "complete").exists():
            log.info("building the developer root for %s in %s", kernel_release, final)

            def build(tmp: Path) -> None:
                _build_devroot(tmp, kernel_release, headers_version, version, board)
                (tmp / "complete").write_text(headers_version + "\n")

            _build_atomically(final, build)
    return final / "rootfs", key


# --------------------------------------------------------------------------- image


def _align(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def _tree_bytes(root: Path) -> int:
    """Bytes the tree needs on ext4 with 4 KiB blocks (each inode rounded up)."""
    total = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        total += FS_BLOCK * (1 + len(dirnames) // 128)
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            fast_symlink = stat.S_ISLNK(st.st_mode) and st.st_size <= 60
            total += 0 if fast_symlink else _align(st.st_size, FS_BLOCK)
    return total


def gpt_script(disk_sectors: int, partitions: Sequence[Mapping[str, Any]]) -> str:
    """An sfdisk script for a GPT with Flatcar's disk GUID."""
    lines = ["label: gpt", f"label-id: {DISK_GUID}", "unit: sectors", "first-lba: 34", ""]
    for part in partitions:
        lines.append(
            f"{part['num']} : start={part['start']}, size={part['size']},"
            f' type={part.get("type", ROOT_TYPE_GUID)}, name="{part["name"]}"'
        )
    return "\n".join(lines) + "\n"


def make_disk_image(
    rootfs: Path,
    out: Path,
    *,
    image_size: int | None = None,
    free_bytes: int = DEFAULT_FREE_BYTES,
    partitions: Sequence[Mapping[str, Any]] | None = None,
    fs_partition: int = ROOT_PARTITION,
    fs_label: str = ROOT_LABEL,
) -> int:
    """A sparse raw GPT image in Flatcar's container layout; returns its size in bytes.

    `image_size` (bytes, a multiple of 512) fixes the disk size; by default it is
    the tree plus `free_bytes`, rounded up to Flatcar's 258048-sector alignment.
    ROOT fills the disk from LBA 4096 up to the last 2 MiB boundary before the
    backup GPT. `partitions` replaces the table (for hostile variants); the file
    system then goes into `fs_partition`.
    """
    if image_size is not None and (image_size % SECTOR or image_size < 16 << 20):
        raise ValueError(f"image_size must be a multiple of 512 and >= 16 MiB: {image_size}")
    need = _tree_bytes(rootfs)
    attempt = 0
    while True:
        if image_size is None:
            # ext4 with -i 4096: inode tables take 1/16, 5% reserved, a journal, metadata.
            fs_bytes = int((need * 1.05 + (96 << 20) + free_bytes) / (1 - 1 / 16 - 0.05))
            fs_bytes = int(fs_bytes * (1.5**attempt))
            disk_sectors = _align(
                ROOT_START_LBA + fs_bytes // SECTOR + GPT_RESERVED_SECTORS, DISK_ALIGNMENT
            )
        else:
            disk_sectors = image_size // SECTOR
        root_sectors = (disk_sectors - GPT_RESERVED_SECTORS - ROOT_START_LBA) // 4096 * 4096
        table: list[Mapping[str, Any]] = (
            list(partitions)
            if partitions is not None
            else [
                {
                    "num": ROOT_PARTITION,
                    "start": ROOT_START_LBA,
                    "size": root_sectors,
                    "name": ROOT_LABEL,
                }
            ]
        )
        fs_part = next(p for p in table if p["num"] == fs_partition)
        _unlink(out)
        with out.open("wb") as f:
            f.truncate(disk_sectors * SECTOR)
        _run(
            ["sfdisk", "--quiet", "--wipe", "never", out],
            input=gpt_script(disk_sectors, table).encode(),
        )
        proc = subprocess.run(
            [
                "mkfs.ext4",
                "-q",
                "-F",
                "-T",
                "default",
                "-b",
                str(FS_BLOCK),
                "-i",
                str(FS_BLOCK),
                "-I",
                "256",
                "-L",
                fs_label,
                "-e",
                "remount-ro",
                "-E",
                f"offset={int(fs_part['start']) * SECTOR},nodiscard",
                "-d",
                str(rootfs),
                str(out),
                str(int(fs_part["size"]) * SECTOR // FS_BLOCK),
            ],
            capture_output=True,
            check=False,
        )
        if proc.returncode == 0:
            return disk_sectors * SECTOR
        message = (proc.stdout + proc.stderr).decode(errors="replace")
        if image_size is None and attempt < 3 and "allocate" in message:
            attempt += 1
            continue
        _unlink(out)
        raise MirrorBuildError(f"mkfs.ext4 -d {rootfs} into {out} failed:\n{message[-3000:]}")


def compress(src: Path, dest: Path) -> None:
    """`lbzip2 -c` (all cores), as Flatcar ships its images."""
    _unlink(dest)
    with dest.open("wb") as out:
        proc = subprocess.run(
            ["lbzip2", "-9", "-c", str(src)], stdout=out, stderr=subprocess.PIPE, check=False
        )
    if proc.returncode != 0:
        raise MirrorBuildError(f"lbzip2 {src}: {proc.stderr.decode(errors='replace')}")


def extract_image(bz2: Path, dest: Path) -> Path:
    """Decompress an image to a sparse file (`lbzip2 -dc | cp --sparse=always`)."""
    with subprocess.Popen(["lbzip2", "-dc", str(bz2)], stdout=subprocess.PIPE) as dec:
        proc = subprocess.run(
            ["cp", "--sparse=always", "/dev/stdin", str(dest)],
            stdin=dec.stdout,
            capture_output=True,
            check=False,
        )
        if dec.stdout is not None:
            dec.stdout.close()
    if dec.returncode != 0 or proc.returncode != 0:
        raise MirrorBuildError(f"extracting {bz2} failed: {proc.stderr.decode(errors='replace')}")
    return dest


# --------------------------------------------------------------------------- feed, version.txt


def version_txt(version: str) -> str:
    match = VERSION_RE.match(version)
    if not match:
        raise ValueError(f"not a Flatcar version: {version!r}")
    build, branch, patch = match.groups()
    return (
        f"FLATCAR_BUILD={build}\n"
        f"FLATCAR_BRANCH={branch}\n"
        f"FLATCAR_PATCH={patch}\n"
        f"FLATCAR_VERSION={version}\n"
        f"FLATCAR_VERSION_ID={version}\n"
        'FLATCAR_BUILD_ID="2025-10-21-1342"\n'
        f"FLATCAR_SDK_VERSION={build}.0.0\n"
    )


def split_version(version: str) -> tuple[int, int, int]:
    match = VERSION_RE.match(version)
    if not match:
        raise ValueError(f"not a Flatcar version: {version!r}")
    return int(match.group(1)), int(match.group(2)), int(match.group(3))


def default_older_version(version: str) -> str:
    build, branch, patch = split_version(version)
    return f"{build}.{branch}.{patch - 1}" if patch > 0 else f"{build - 19}.{branch}.4"


def _feed_entry(channel: str, date: str, kernel: str, notes: str) -> dict[str, Any]:
    return {
        "channel": channel,
        "architectures": ["amd64", "arm64"],
        "release_date": date,
        "major_software": {
            "containerd": ["2.0.5"],
            "docker": ["28.0.4"],
            "ignition": ["2.21.0"],
            "kernel": [kernel],
            "systemd": ["256"],
        },
        "release_notes": notes,
    }


def releases_feed(
    version: str, older_version: str, kernel_release: str, channel: str
) -> dict[str, Any]:
    """Flatcar's releases-<channel>.json: `current` plus releases in non-version order.

    `version` and `older_version` share the kernel (cut at the first '-'); the
    older one comes first in the file (the seed took the first match). Decoys:
    a newer release (also `current`) and older ones with other kernels."""
    kernel = kernel_upstream(kernel_release)
    build, branch, _ = split_version(version)
    decoy_kernels = [k for k in ("6.12.54", "6.6.95", "5.15.186", "6.1.999") if k != kernel]
    newer = f"{build + 78}.{branch}.1"
    entries = {
        f"{build - 71}.{branch}.0": _feed_entry(
            channel, "2025-03-04 12:00:00 +0000", decoy_kernels[1], "Older, other kernel."
        ),
        older_version: _feed_entry(
            channel, "2025-09-02 10:11:12 +0000", kernel, "Same kernel, older release."
        ),
        newer: _feed_entry(
            channel, "2026-01-20 09:08:07 +0000", decoy_kernels[0], "Newest, other kernel."
        ),
        version: _feed_entry(
            channel, "2025-10-21 13:42:00 +0000", kernel, "The release with artifacts."
        ),
        f"{build - 150}.{branch}.12": _feed_entry(
            channel, "2024-06-01 08:00:00 +0000", decoy_kernels[2], "Much older."
        ),
    }
    return {"current": entries[newer], **entries}


# --------------------------------------------------------------------------- the mirror


def build_mirror(
    kernel_release: str,
    *,
    version: str = DEFAULT_VERSION,
    board: str = DEFAULT_BOARD,
    image_size: int | None = None,
    older_version: str | None = None,
    content_bytes: int | None = None,
    abi: str = "booted",
) -> FlatcarMirror:
    """Build (or take from the cache) the mirror of `version` for a kernel release.

    Its developer container is Flatcar's kind (`flatcar_tree_layout`, `second_build`):
    the kernel tree is another build than the booted kernel. `abi="another"`: the tree
    has another CRC for a symbol the NVIDIA modules import (`ensure_devroot`).

    `image_size`: the disk size in bytes (a multiple of 512; default: the tree plus
    512 MiB free, rounded up to 258048 sectors). `older_version`: the other release
    in the feed with the same kernel (default: the previous patch release).
    `content_bytes`: for benchmarks, pad the image's file system to about this much
    real content with copies of the root's own header trees (under
    /usr/share/flatcar-mirror-padding), so the .bz2 compresses about like a real one
    (Flatcar's: ~2.2 GiB of content, ~480 MB compressed).
    """
    if not VERSION_RE.match(version):
        raise ValueError(f"not a Flatcar version: {version!r}")
    older = older_version or default_older_version(version)
    channel = channel_of(version)
    devroot, root_key = ensure_devroot(kernel_release, version=version, board=board, abi=abi)
    key = _hash(
        {
            "script": SCRIPT_VERSION,
            "root": root_key,
            "version": version,
            "older": older,
            "board": board,
            "image_size": image_size,
            "content_bytes": content_bytes,
        }
    )
    final = cache_base() / "mirrors" / key
    with _locked(cache_base() / "mirrors" / f"{key}.lock"):
        meta = _load_meta(final)
        if meta is None:
            log.info("building the Flatcar mirror %s in %s", version, final)

            def build(tmp: Path) -> None:
                _build_mirror_tree(
                    tmp,
                    devroot,
                    kernel_release,
                    version,
                    older,
                    board,
                    channel,
                    image_size,
                    content_bytes,
                )

            _build_atomically(final, build)
            meta = _load_meta(final)
            if meta is None:
                raise MirrorBuildError(f"{final}: the fresh build does not check out")
    keys = final / "keys"
    return FlatcarMirror(
        root=final / "mirror",
        board=board,
        version=version,
        kernel_release=kernel_release,
        channel=channel,
        older_version=older,
        signing_key=keys / "signing-key.asc",
        signing_keyring=keys / "signing-key.gpg",
        wrong_key=keys / "wrong-key.asc",
        wrong_keyring=keys / "wrong-key.gpg",
        signing_secret=keys / "signing-key-secret.asc",
        wrong_secret=keys / "wrong-key-secret.asc",
        feed=final / "mirror" / "releases-json" / f"releases-{channel}.json",
        devroot=devroot,
        image_size=int(meta["image_size"]),
    )


def _load_meta(final: Path) -> dict[str, Any] | None:
    """The entry's metadata if it is complete and its image is intact (by size)."""
    try:
        meta: dict[str, Any] = json.loads((final / "meta.json").read_text())
        if (final / meta["bz2"]).stat().st_size != meta["bz2_size"]:
            return None
        return meta
    except (OSError, ValueError, KeyError):
        return None


def _build_mirror_tree(
    tmp: Path,
    devroot: Path,
    kernel_release: str,
    version: str,
    older: str,
    board: str,
    channel: str,
    image_size: int | None,
    content_bytes: int | None = None,
) -> None:
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    keys = tmp / "keys"
    generate_key(keys, "signing-key", SIGNING_UID)
    generate_key(keys, "wrong-key", WRONG_UID)
    timings["keys"] = time.monotonic() - t0

    release = tmp / "mirror" / board / version
    release.mkdir(parents=True)
    raw = tmp / "flatcar_developer_container.bin"
    t0 = time.monotonic()
    tree = _padded_tree(devroot, tmp / "tree", content_bytes) if content_bytes else devroot
    size = make_disk_image(tree, raw, image_size=image_size)
    if tree != devroot:
        shutil.rmtree(tree)
    timings["image"] = time.monotonic() - t0
    t0 = time.monotonic()
    compress(raw, release / IMAGE_NAME)
    timings["compress"] = time.monotonic() - t0
    raw.unlink()
    (release / VERSION_TXT).write_text(version_txt(version))
    t0 = time.monotonic()
    with Signer(keys / "signing-key-secret.asc") as signer:
        publish_artifact(signer, release / IMAGE_NAME)
        publish_artifact(signer, release / VERSION_TXT)
    timings["sign"] = time.monotonic() - t0
    feed = tmp / "mirror" / "releases-json" / f"releases-{channel}.json"
    feed.parent.mkdir(parents=True)
    feed.write_text(json.dumps(releases_feed(version, older, kernel_release, channel), indent=2))
    bz2 = release / IMAGE_NAME
    meta = {
        "bz2": str(bz2.relative_to(tmp)),
        "bz2_size": bz2.stat().st_size,
        "image_size": size,
        "kernel_release": kernel_release,
        "version": version,
        "timings": timings,
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def _padded_tree(rootfs: Path, tree: Path, content_bytes: int) -> Path:
    """A hard-linked copy of `rootfs` padded to about `content_bytes` of content.

    The padding is copies of the root's header trees (the kernel's, /usr/include):
    text, which compresses about as well as the bulk of Flatcar's developer
    container; its binaries alone compress to less than half as well.
    """
    have = _tree_bytes(rootfs)
    if content_bytes <= have:
        return rootfs
    _run(["cp", "-a", "--link", rootfs, tree])
    sources = [p for p in (rootfs / "usr" / "src", rootfs / "usr" / "include") if p.is_dir()]
    if not sources:
        raise MirrorBuildError(f"no header trees to pad {rootfs} with")
    sizes = {src: _tree_bytes(src) for src in sources}
    pad = tree / "usr" / "share" / "flatcar-mirror-padding"
    pad.mkdir(parents=True)
    remaining, i = content_bytes - have, 0
    while remaining > 0:
        src = sources[i % len(sources)]
        shutil.copytree(src, pad / f"{i:05d}-{src.name}", symlinks=True)
        remaining -= sizes[src]
        i += 1
    return tree


# --------------------------------------------------------------------------- the fleet mirror

FLEET_NEXT_VERSION = "4230.2.1"


@dataclasses.dataclass(frozen=True)
class FleetMirror:
    """Two releases of one channel in one published tree, one feed, one signing key:
    `running` (the release a node runs) and `next` (a newer one with another kernel,
    the newest of the feed, so `update --next` picks it). Each is a FlatcarMirror whose
    `root`, `feed` and keys are the fleet's: `serve_mirror(fleet.running)` serves both."""

    running: FlatcarMirror
    next: FlatcarMirror


def fleet_kernels() -> tuple[str, str] | None:
    """(running, next): the kernels under test (tests/kernels.py) of the oldest and the
    newest series, the node's before and after its update; None with fewer than two."""
    kernels = kernels_under_test()
    return (kernels[0], kernels[-1]) if len(kernels) >= 2 else None


def fleet_feed(running: FlatcarMirror, next_version: str, next_kernel: str) -> dict[str, Any]:
    """The channel's feed: the running release (and an older one with its kernel), the
    next release with the other kernel as the newest (and `current`), older decoys with
    other kernels; no release newer than `next_version`."""
    build, branch, _ = split_version(running.version)
    kernel = running.kernel_upstream
    decoys = [k for k in ("6.6.95", "5.15.186") if k not in (kernel, next_kernel)]
    entries = {
        f"{build - 71}.{branch}.0": _feed_entry(
            running.channel, "2025-03-04 12:00:00 +0000", decoys[0], "Older, other kernel."
        ),
        next_version: _feed_entry(
            running.channel, "2026-01-20 09:08:07 +0000", next_kernel, "The next release."
        ),
        running.older_version: _feed_entry(
            running.channel, "2025-09-02 10:11:12 +0000", kernel, "Same kernel, older release."
        ),
        running.version: _feed_entry(
            running.channel, "2025-10-21 13:42:00 +0000", kernel, "The running release."
        ),
    }
    return {"current": entries[next_version], **entries}


def build_fleet_mirror(
    running_kernel: str, next_kernel: str, *, next_version: str = FLEET_NEXT_VERSION
) -> FleetMirror:
    """The fleet mirror of two kernels, made (once; cached) from their single-release
    mirrors: the images are hard links, only the next release's signatures, digests and
    version.txt are made anew (with the running mirror's key)."""
    running = build_mirror(running_kernel)
    following = build_mirror(next_kernel)
    if split_version(next_version) <= split_version(running.version):
        raise ValueError(f"{next_version} is not newer than {running.version}")
    key = _hash(
        {
            "script": SCRIPT_VERSION,
            "running": str(running.root),
            "next": str(following.root),
            "next_version": next_version,
        }
    )
    final = cache_base() / "fleets" / key
    with _locked(cache_base() / "fleets" / f"{key}.lock"):
        if not (final / "complete").exists():
            log.info("building the fleet mirror %s in %s", key, final)

            def build(tmp: Path) -> None:
                _link_tree(running.root.parent / "keys", tmp / "keys")
                _link_tree(running.release_dir, tmp / "mirror" / running.board / running.version)
                release = tmp / "mirror" / following.board / next_version
                release.mkdir(parents=True)
                _link(following.image, release / IMAGE_NAME)
                (release / VERSION_TXT).write_text(version_txt(next_version))
                with Signer(running.signing_secret) as signer:
                    publish_artifact(signer, release / IMAGE_NAME)
                    publish_artifact(signer, release / VERSION_TXT)
                feed = tmp / "mirror" / running.feed.relative_to(running.root)
                feed.parent.mkdir(parents=True)
                feed.write_text(
                    json.dumps(fleet_feed(running, next_version, following.kernel_upstream))
                )
                (tmp / "complete").write_text(key + "\n")

            _build_atomically(final, build)
    keys = final / "keys"
    shared = {
        "root": final / "mirror",
        "feed": final / "mirror" / running.feed.relative_to(running.root),
        **{
            f: keys / getattr(running, f).name
            for f in (
                "signing_key",
                "signing_keyring",
                "wrong_key",
                "wrong_keyring",
                "signing_secret",
                "wrong_secret",
            )
        },
    }
    return FleetMirror(
        running=dataclasses.replace(running, **shared),
        next=dataclasses.replace(
            following, version=next_version, older_version=running.version, **shared
        ),
    )


def _link(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """A hard link (the cache is one file system), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _link_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, copy_function=_link, symlinks=True)


# --------------------------------------------------------------------------- hostile variants


def clone_mirror(mirror: FlatcarMirror, dest: Path) -> FlatcarMirror:
    """A copy of the published tree under `dest` (hard links where possible; every
    later change replaces files, never writes through a link)."""
    root = dest / "mirror"
    if root.exists():
        raise FileExistsError(root)

    _link_tree(mirror.root, root)
    return dataclasses.replace(mirror, root=root, feed=root / mirror.feed.relative_to(mirror.root))


def make_truncated_variant(
    mirror: FlatcarMirror, dest: Path, *, keep: float = 0.5, resign: bool = True
) -> FlatcarMirror:
    """The .bz2 cut to `keep` of its size. With `resign`, its signature and digests
    are made anew (valid), so the failure shows only when decompressing."""
    variant = clone_mirror(mirror, dest)
    data_len = int(mirror.image.stat().st_size * keep)
    _unlink(variant.image)
    with mirror.image.open("rb") as src, variant.image.open("wb") as out:
        _copy_bytes(src, out, data_len)
    if resign:
        with Signer(mirror.signing_secret) as signer:
            publish_artifact(signer, variant.image)
    return variant


def make_corrupt_variant(
    mirror: FlatcarMirror, dest: Path, *, offset: int | None = None
) -> FlatcarMirror:
    """One byte of the .bz2 flipped (default: the middle); signature and digests
    are the original ones, so verification must fail."""
    variant = clone_mirror(mirror, dest)
    size = mirror.image.stat().st_size
    at = size // 2 if offset is None else offset
    _unlink(variant.image)
    shutil.copyfile(mirror.image, variant.image)
    with variant.image.open("r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0xFF]))
    return variant


def make_bad_digest_variant(mirror: FlatcarMirror, dest: Path) -> FlatcarMirror:
    """The .bz2 and its .sig are intact, but the (validly signed) DIGESTS lists
    wrong hashes: a tool that checks DIGESTS must refuse."""
    variant = clone_mirror(mirror, dest)
    good = digests_text(mirror.image)
    bad = re.sub(r"^[0-9a-f]+(?=  )", lambda m: "0" * len(m.group(0)), good, flags=re.MULTILINE)
    with Signer(mirror.signing_secret) as signer:
        publish_artifact(signer, variant.image, digests=bad)
    return variant


def make_wrong_key_variant(mirror: FlatcarMirror, dest: Path) -> FlatcarMirror:
    """Every artifact intact but signed (.sig, .DIGESTS.asc, .DIGESTS.sig) by the wrong key."""
    variant = clone_mirror(mirror, dest)
    with Signer(mirror.wrong_secret) as signer:
        publish_artifact(signer, variant.image)
        publish_artifact(signer, variant.version_txt)
    return variant


def make_no_root_partition_variant(mirror: FlatcarMirror, dest: Path) -> FlatcarMirror:
    """A small, validly signed image whose GPT has no partition 9 and nothing
    labelled ROOT (partitions 1-3 as in Flatcar's base layout, ext4 "USR-A" in 3)."""
    variant = clone_mirror(mirror, dest)
    with tempfile.TemporaryDirectory(dir=dest) as tmpdir:
        tree = Path(tmpdir) / "tree"
        (tree / "lib" / "modules" / mirror.kernel_release).mkdir(parents=True)
        (tree / "etc").mkdir()
        (tree / "etc" / "os-release").write_text(_os_release(mirror.version, mirror.board))
        table = [
            {"num": 1, "start": 4096, "size": 8192, "name": "EFI-SYSTEM",
             "type": "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"},
            {"num": 2, "start": 12288, "size": 4096, "name": "BIOS-BOOT",
             "type": "21686148-6449-6E6F-744E-656564454649"},
            {"num": 3, "start": 16384, "size": 32768, "name": "USR-A"},
        ]  # fmt: skip
        raw = Path(tmpdir) / "image.bin"
        make_disk_image(
            tree, raw, image_size=32 << 20, partitions=table, fs_partition=3, fs_label="USR-A"
        )
        compress(raw, variant.image)
    with Signer(mirror.signing_secret) as signer:
        publish_artifact(signer, variant.image)
    return dataclasses.replace(variant, image_size=32 << 20)


def _copy_bytes(src: BinaryIO, out: BinaryIO, count: int) -> None:
    while count > 0:
        chunk = src.read(min(count, 1 << 20))
        if not chunk:
            break
        out.write(chunk)
        count -= len(chunk)


# --------------------------------------------------------------------------- HTTP server


@dataclasses.dataclass
class RequestRecord:
    method: str
    path: str
    range: str | None
    status: int
    sent: int = 0  # body bytes sent


@dataclasses.dataclass
class _Fault:
    kind: str  # "close", "tamper", "fail", "norange"
    path: str
    value: int
    remaining: int | None  # None: always


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    owner: MirrorServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that hang up early (what the faults provoke) are not errors.
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("mirror server: " + format, *args)

    def do_GET(self) -> None:
        self._serve(head=False)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def _serve(self, *, head: bool) -> None:
        owner = self.server.owner
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        record = RequestRecord(self.command, path, self.headers.get("Range"), 0)
        owner._record(record)
        status = owner._take(path, "fail")
        if status is not None:
            record.status = status
            self.send_error(status)
            return
        file = owner._resolve(path)
        if file is None:
            record.status = 404
            self.send_error(404)
            return
        st = file.stat()
        size = st.st_size
        etag = f'"{size:x}-{st.st_mtime_ns:x}"'
        start, end = 0, size - 1
        status = 200
        wanted = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        ignore = owner._take(path, "norange") is not None if wanted else False
        if wanted and not ignore and (if_range is None or if_range == etag):
            parsed = _parse_range(wanted, size)
            if isinstance(parsed, str):  # unsatisfiable
                record.status = 416
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if parsed is not None:
                start, end = parsed
                status = 206
        length = max(0, end - start + 1)
        record.status = status
        self.send_response(status)
        self.send_header("Content-Type", _content_type(file.name))
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", etag)
        self.send_header("Last-Modified", email.utils.formatdate(st.st_mtime, usegmt=True))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if head or length == 0:
            return
        close_after = owner._take(path, "close")
        tamper = owner._take(path, "tamper")
        rate, chunk_size = owner._rate(path)
        began = time.monotonic()
        sent = 0
        with file.open("rb") as f:
            f.seek(start)
            while sent < length:
                n = min(chunk_size, length - sent)
                if close_after is not None:
                    n = min(n, close_after - sent)
                    if n <= 0:
                        self._hang_up()
                        record.sent = sent
                        return
                chunk = f.read(n)
                if not chunk:
                    break
                if tamper is not None and start + sent <= tamper < start + sent + len(chunk):
                    i = tamper - start - sent
                    chunk = chunk[:i] + bytes([chunk[i] ^ 0xFF]) + chunk[i + 1 :]
                record.sent = sent + len(chunk)  # before the client can see it
                try:
                    self.wfile.write(chunk)
                except OSError:
                    self.close_connection = True
                    record.sent = sent
                    return
                sent += len(chunk)
                if rate:
                    ahead = sent / rate - (time.monotonic() - began)
                    if ahead > 0:
                        time.sleep(ahead)
        if close_after is not None and sent >= close_after:
            self._hang_up()

    def _hang_up(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)


def _parse_range(header: str, size: int) -> tuple[int, int] | str | None:
    """One `bytes=` range -> (start, end); "unsatisfiable"; None to send it all."""
    match = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if not match or (not match.group(1) and not match.group(2)):
        return None  # several ranges or garbage: ignore, send everything (RFC 9110)
    first, last = match.groups()
    if not first:
        suffix = int(last)
        if suffix == 0:
            return "unsatisfiable"
        return max(0, size - suffix), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size:
        return "unsatisfiable"
    if end < start:
        return None
    return start, end


def _content_type(name: str) -> str:
    if name.endswith(".json"):
        return "application/json"
    if name.endswith((".txt", ".asc", ".DIGESTS")):
        return "text/plain; charset=utf-8"
    if name.endswith(".bz2"):
        return "application/x-bzip2"
    return "application/octet-stream"


class MirrorServer:
    """A running server for a mirror; the knobs take effect for the next request.

    Paths for the knobs are URL paths (`/amd64-usr/4152.2.3/...`) or, without a
    leading '/', names of artifacts of the mirror's release (`"version.txt"`).
    `times=None` means every request; a number, that many requests then normal.
    """

    def __init__(self, mirror: FlatcarMirror) -> None:
        self.mirror = mirror
        self._root = mirror.root.resolve()
        self._lock = threading.Lock()
        self._faults: list[_Fault] = []
        self._rates: dict[str | None, int] = {}
        self.requests: list[RequestRecord] = []
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.owner = self
        self.port: int = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            args=(0.05,),
            name="flatcar-mirror-server",
            daemon=True,
        )

    # -- URLs
    @property
    def feed_url(self) -> str:
        return self.url + self.mirror.feed_url_path

    @property
    def image_url(self) -> str:
        return self.url_for(IMAGE_NAME)

    def url_for(self, name: str) -> str:
        return self.url + self._path(name)

    def env(self) -> dict[str, str]:
        """What the tool needs to use this mirror (FLATCAR_CHANNEL left to the test)."""
        return {
            "FLATCAR_RELEASE_URL": self.url,
            "FLATCAR_RELEASES_FEED": self.feed_url,
            "FLATCAR_SIGNING_KEY": str(self.mirror.signing_key),
            "FLATCAR_BOARD": self.mirror.board,
        }

    # -- knobs
    def close_after(self, path: str, nbytes: int, *, times: int | None = 1) -> None:
        """Hang up after sending `nbytes` of the body of a response for `path`."""
        self._add(_Fault("close", self._path(path), nbytes, times))

    def tamper(self, path: str, offset: int, *, times: int | None = None) -> None:
        """Serve the byte at file offset `offset` of `path` inverted."""
        self._add(_Fault("tamper", self._path(path), offset, times))

    def fail(self, path: str, status: int = 404, *, times: int | None = None) -> None:
        """Answer requests for `path` with an error status."""
        self._add(_Fault("fail", self._path(path), status, times))

    def ignore_range(self, path: str, *, times: int | None = None) -> None:
        """Answer Range requests for `path` with the whole file (200), as some servers do."""
        self._add(_Fault("norange", self._path(path), 1, times))

    def throttle(self, bytes_per_second: int | None, path: str | None = None) -> None:
        """Limit the rate of every response (or those for `path`); None lifts it."""
        key = self._path(path) if path is not None else None
        with self._lock:
            if bytes_per_second:
                self._rates[key] = bytes_per_second
            else:
                self._rates.pop(key, None)

    def reset(self) -> None:
        with self._lock:
            self._faults.clear()
            self._rates.clear()
            self.requests.clear()

    def requests_for(self, path: str) -> list[RequestRecord]:
        p = self._path(path)
        with self._lock:
            return [r for r in self.requests if r.path == p]

    # -- lifecycle
    def start(self) -> MirrorServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)

    # -- for the handler
    def _path(self, path: str) -> str:
        return path if path.startswith("/") else self.mirror.url_path(path)

    def _add(self, fault: _Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def _record(self, record: RequestRecord) -> None:
        with self._lock:
            self.requests.append(record)

    def _take(self, path: str, kind: str) -> int | None:
        with self._lock:
            for fault in self._faults:
                if fault.kind == kind and fault.path == path:
                    if fault.remaining is not None:
                        fault.remaining -= 1
                        if fault.remaining <= 0:
                            self._faults.remove(fault)
                    return fault.value
        return None

    def _rate(self, path: str) -> tuple[int | None, int]:
        with self._lock:
            rate = self._rates.get(path, self._rates.get(None))
        if not rate:
            return None, 256 * 1024
        return rate, max(1024, min(256 * 1024, rate // 20))

    def _resolve(self, path: str) -> Path | None:
        candidate = (self._root / path.lstrip("/")).resolve()
        if candidate != self._root and self._root not in candidate.parents:
            return None
        return candidate if candidate.is_file() else None


@contextlib.contextmanager
def serve_mirror(mirror: FlatcarMirror) -> Iterator[MirrorServer]:
    """Serve `mirror.root` on 127.0.0.1 (ephemeral port) until the block ends."""
    server = MirrorServer(mirror).start()
    try:
        yield server
    finally:
        server.stop()
