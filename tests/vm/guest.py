"""Run a command as root on a real Linux kernel in a throw-away QEMU guest.

The host machine of the tests lacks CAP_SYS_MODULE, so anything that loads
kernel modules (or needs a real kernel's helpers) runs in a guest booted with
one of the host's installed Debian kernels under TCG:

* the initramfs is busybox-static plus the virtio/9p/overlay modules of the
  kernel (decompressed, dependencies from ``modules.dep``) and ``init.sh``;
  it is built once and cached under ``~/.cache/nvidia-driver-tests/``;
* the guest's ``/`` is the host's ``/`` (read-only 9p) under an overlay with a
  tmpfs upper, so writes anywhere succeed and vanish at power-off, and the
  kernel's helpers (``/sbin/modprobe``, firmware) see the host's files;
* ``/proc``, ``/sys`` (+ cgroup2), ``/dev`` (devtmpfs, devpts, shm), ``/tmp``
  and ``/run`` are fresh: the HOST'S /tmp IS NOT VISIBLE in the guest.  A test
  that needs a host directory (e.g. pytest's ``tmp_path``) passes it in
  ``shares``: it is mounted read-write at the same absolute path;
* the command runs as root with a clean environment (PATH, HOME=/root, USER,
  LOGNAME, LANG=C.UTF-8) plus ``env``; stdin is /dev/null; its stdout and
  stderr come back separately over two virtio-serial ports;
* the kernel boots one CPU, and init brings the others (``smp``) online before the
  command (see ``KERNEL_COMMAND_LINE``);
* the kernel console (serial) is captured: ``GuestResult.console``.

Calls of the project's Python use the venv interpreter by absolute path
(``/work/main/.venv/bin/python``): pyenv shims cost seconds each under TCG.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import lzma
import os
import re
import shlex
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.kernels import BOOT_DIR, MODULES_DIR, bootable, version_key

BUSYBOX_CANDIDATES = (Path("/bin/busybox"), Path("/usr/bin/busybox"))
QEMU = "qemu-system-x86_64"
INIT_SCRIPT = Path(__file__).with_name("init.sh")

# Modules the guest's stage 1 needs (by module name; built-in ones are skipped).
GUEST_MODULES = (
    "virtio_pci",
    "virtio_console",
    "9pnet_virtio",
    "9p",
    "overlay",
)
_MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CONSOLE_TAIL_CHARS = 4000


class GuestError(RuntimeError):
    """The guest could not be started or did not report an exit status."""


class GuestTimeout(GuestError):
    """The guest ran past its timeout and was killed."""


@dataclass(frozen=True)
class GuestResult:
    returncode: int
    stdout: str
    stderr: str
    console: str
    """The guest kernel's serial console (kernel messages, init's own log)."""

    def check(self) -> GuestResult:
        """Return self, or raise GuestError when the command failed."""
        if self.returncode != 0:
            raise GuestError(
                f"guest command exited {self.returncode}\n"
                f"--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}\n"
                f"--- console tail ---\n{_tail(self.console)}"
            )
        return self


def available_kernels() -> list[str]:
    """Kernel releases a guest can boot (a readable /boot/vmlinuz-K and its
    /lib/modules/K/modules.dep), oldest first (natural version order)."""
    releases = [image.name[len("vmlinuz-") :] for image in BOOT_DIR.glob("vmlinuz-*")]
    return sorted((r for r in releases if bootable(r)), key=version_key)


def newest_kernel() -> str:
    kernels = available_kernels()
    if not kernels:
        raise GuestError(f"no kernel: no {BOOT_DIR}/vmlinuz-K with {MODULES_DIR}/K/modules.dep")
    return kernels[-1]


def find_busybox() -> Path:
    """The static busybox binary (package busybox-static)."""
    for path in BUSYBOX_CANDIDATES:
        if path.is_file() and _is_static_elf(path):
            return path
    raise GuestError("no statically linked busybox (install busybox-static)")


def missing_requirements() -> list[str]:
    """What this machine lacks to boot a guest (empty: all there)."""
    missing = []
    if shutil.which(QEMU) is None:
        missing.append(f"{QEMU} (package qemu-system-x86)")
    if not available_kernels():
        missing.append(f"a kernel ({BOOT_DIR}/vmlinuz-K with {MODULES_DIR}/K; linux-image-amd64)")
    try:
        find_busybox()
    except GuestError as exc:
        missing.append(str(exc))
    return missing


def _is_static_elf(path: Path) -> bool:
    """True for an ELF executable without a program interpreter (PT_INTERP)."""
    with path.open("rb") as f:
        head = f.read(64)
        if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
            return False  # only 64-bit little-endian (x86-64) is used here
        (phoff,) = struct.unpack_from("<Q", head, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(
        struct.unpack_from("<I", table, i * phentsize)[0] != 3  # PT_INTERP
        for i in range(phnum)
    )


# --- initramfs -------------------------------------------------------------


def _module_name(relpath: str) -> str:
    base = relpath.rsplit("/", 1)[-1]
    for suffix in _MODULE_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def guest_module_files(kernel: str, names: Iterable[str] = GUEST_MODULES) -> list[Path]:
    """The module files for ``names`` and their dependencies, in load order.

    Modules built into the kernel (``modules.builtin``) are left out."""
    moddir = MODULES_DIR / kernel
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        if ":" not in line:
            continue
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
        by_name[_module_name(mod)] = mod
    builtin_file = moddir / "modules.builtin"
    builtin = (
        {_module_name(x) for x in builtin_file.read_text().split()}
        if builtin_file.is_file()
        else set()
    )

    order: list[str] = []

    def visit(mod: str, stack: tuple[str, ...]) -> None:
        if mod in order or mod in stack:
            return
        for dep in deps.get(mod, []):
            visit(dep, (*stack, mod))
        order.append(mod)

    for name in names:
        key = name.replace("-", "_")
        if key in by_name:
            visit(by_name[key], ())
        elif key not in builtin:
            raise GuestError(
                f"module {name} of kernel {kernel} is neither in modules.dep nor built in"
            )
    return [moddir / mod for mod in order]


def _decompressed(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko.zst"):
        zstd = shutil.which("zstd")
        if zstd is None:
            raise GuestError(f"{path} is zstd-compressed and there is no zstd (package zstd)")
        return subprocess.run(
            [zstd, "-dc", "--", str(path)], check=True, capture_output=True
        ).stdout
    return data


class _Cpio:
    """A tiny writer of the "newc" cpio format the kernel unpacks."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 1

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        self._ino += 1
        header = b"070701" + b"".join(b"%08X" % v for v in fields)
        self._parts.append(header + encoded + b"\0" * (-(len(header) + len(encoded)) % 4))
        self._parts.append(data + b"\0" * (-len(data) % 4))

    def directory(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        blob = b"".join(self._parts)
        return blob + b"\0" * (-len(blob) % 512)


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nvidia-driver-tests"


def build_initramfs(kernel: str) -> Path:
    """The (cached) initramfs for ``kernel``; rebuilt when its inputs change."""
    busybox = find_busybox()
    init = INIT_SCRIPT.read_bytes()
    modules = guest_module_files(kernel)
    key = hashlib.sha256()
    key.update(kernel.encode() + b"\0" + init)
    for path in (busybox, *modules):
        st = path.stat()
        key.update(f"\0{path}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    target = _cache_dir() / f"initramfs-{kernel}-{key.hexdigest()[:16]}.cpio"
    if target.is_file():
        return target

    cpio = _Cpio()
    for d in ("bin", "dev", "proc", "sys", "modules", "host", "rw", "newroot"):
        cpio.directory(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    cpio.file("init", init, 0o755)
    names = []
    for path in modules:
        name = _module_name(path.name) + ".ko"
        names.append(name)
        cpio.file(f"modules/{name}", _decompressed(path))
    cpio.file("modules/load.list", "".join(f"{n}\n" for n in names).encode())

    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".initramfs-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(cpio.finish())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return target


# --- running ---------------------------------------------------------------


def _tail(text: str, chars: int = _CONSOLE_TAIL_CHARS) -> str:
    return text if len(text) <= chars else "...\n" + text[-chars:]


def _read(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def _command_script(argv: list[str], env: dict[str, str], cwd: str) -> str:
    lines = ["# generated by tests/vm/guest.py"]
    for name, value in env.items():
        if not _ENV_NAME.fullmatch(name):
            raise ValueError(f"invalid environment variable name: {name!r}")
        lines.append(f"export {name}={shlex.quote(value)}")
    lines.append(f"cd {shlex.quote(cwd)} || exit 125")
    lines.append("exec " + " ".join(shlex.quote(a) for a in argv))
    return "\n".join(lines) + "\n"


# Host directories the guest covers with fresh file systems.
HIDDEN_IN_GUEST = (Path("/tmp"), Path("/run"))
PROJECT = Path(__file__).resolve().parents[2]


def _with_project(shares: dict[str, Path]) -> dict[str, Path]:
    """`shares`, plus the project's checkout (and its venv) when it lies where the guest
    mounts a fresh file system: a CI clone under /tmp must stay visible."""
    hidden = any(PROJECT.is_relative_to(d) for d in HIDDEN_IN_GUEST)
    covered = any(PROJECT.is_relative_to(Path(g)) for g in shares)
    return {**shares, str(PROJECT): PROJECT} if hidden and not covered else shares


def _share_list(shares: dict[str, Path]) -> Iterator[tuple[str, Path, str]]:
    """(tag, host dir, guest path) per share, parents before children."""
    items = sorted(shares.items(), key=lambda kv: (len(Path(kv[0]).parts), kv[0]))
    for i, (guest_path, host_dir) in enumerate(items):
        if not guest_path.startswith("/") or any(c in guest_path for c in "\n\t "):
            raise ValueError(f"share path must be absolute, without blanks: {guest_path!r}")
        if "," in str(host_dir):
            raise ValueError(f"qemu cannot share a path with a comma: {host_dir}")
        if not Path(host_dir).is_dir():
            raise ValueError(f"share {guest_path}: {host_dir} is not a directory")
        yield f"share{i}", Path(host_dir), guest_path


# The guest's kernel patches its own code when a static key flips (text_poke_bp: an int3
# at each site while it patches). Under TCG with two vCPUs, a vCPU can still run the int3
# after the patch is done, and the kernel dies of "Oops: int3". A CI guest on 6.12 did,
# in kmem_cache_alloc_noprof at a site of memcg_kmem_online_key, which dockerd's first
# memory cgroup enables. So the keys that the tests would flip while both vCPUs run are
# left alone or flipped at boot, while one CPU runs (seen: a guest's jump-label sites
# read from /proc/kcore before and after the container scenarios):
# - cgroup.memory=nokmem,nosocket,nobpf and cgroup_disable=cpuset: each container's
#   cgroup would flip memcg_kmem_online_key, memcg_sockets_enabled_key,
#   memcg_bpf_enabled_key and cpusets_enabled_key (the page allocator's). No test needs
#   kernel memory accounted to cgroups or a cpuset; dockerd runs without that controller.
# - trace_event=...: the events tests/vm/engine.sh `start_trace` reads are enabled at boot
#   (their keys, and sched_switch's for the command-line record); it only clears the
#   buffer.
# - maxcpus=1: the initcalls flip keys too, the late ones after the other CPUs started. A
#   CI guest on 6.12 died 3 s into its boot, in sched_clock_cpu right after
#   "sched_clock: Marking stable" (sched_clock_running, __sched_clock_stable). So the
#   kernel boots one CPU, and the guest's init brings the others online after the last
#   initcall, before the command (init.sh): the command still gets `smp` CPUs.
# - no_ipi_broadcast=1: bringing a CPU online flips apic_use_ipi_shorthand (sites in
#   native_send_call_func_ipi and apic_send_IPI_allbutself) once the CPU runs; this keeps
#   it off. Nothing else in the kernel's text changes then but the lock prefixes, which
#   the first bring-up patches before the CPU starts (test_guest.py reads the text).
KERNEL_COMMAND_LINE = " ".join(
    (
        "console=ttyS0 panic=-1 rdinit=/init maxcpus=1 no_ipi_broadcast=1",
        "cgroup.memory=nokmem,nosocket,nobpf cgroup_disable=cpuset",
        "trace_event=sched:sched_process_exec,module:module_load",
    )
)


def run_in_guest(
    argv: list[str],
    *,
    kernel: str | None = None,
    env: dict[str, str] | None = None,
    shares: dict[str, Path] | None = None,
    cwd: str | None = None,
    timeout: float = 600,
    memory_mb: int = 3072,
    smp: int = 2,
    disks: Iterable[Path] = (),
) -> GuestResult:
    """Boot ``kernel`` (default: the newest installed) and run ``argv`` in it as root.

    ``env`` is added to the guest's clean environment.  ``shares`` maps a guest
    path to a host directory mounted read-write at that path; keys are normally
    the host path itself (``{str(tmp_path): tmp_path}``) since the guest sees the
    host's tree read-only at the same paths.  ``cwd`` defaults to ``/``.
    ``disks`` are raw disk images attached as virtio disks (/dev/vda, /dev/vdb, ...;
    ``modprobe virtio_blk`` first): the guest may write to them, the files stay as they
    were (QEMU's snapshot mode keeps the writes in a temporary file).

    Returns the command's exit status, its stdout and stderr, and the kernel
    console.  Raises GuestTimeout after ``timeout`` seconds (boot included) and
    GuestError when the guest reports no exit status (boot failure, panic).
    """
    if not argv:
        raise ValueError("argv must not be empty")
    release = kernel or newest_kernel()
    vmlinuz = BOOT_DIR / f"vmlinuz-{release}"
    if not vmlinuz.is_file():
        raise GuestError(f"no kernel image {vmlinuz}")
    qemu = shutil.which(QEMU)
    if qemu is None:
        raise GuestError(f"{QEMU} not found (package qemu-system-x86)")
    initramfs = build_initramfs(release)
    share_list = list(_share_list(_with_project(shares or {})))

    with tempfile.TemporaryDirectory(prefix="vmguest-") as tmp:
        work = Path(tmp)
        if "," in str(work):
            raise GuestError(f"temporary directory path has a comma: {work}")
        ctl = work / "ctl"
        ctl.mkdir()
        (ctl / "cmd.sh").write_text(_command_script(argv, env or {}, cwd or "/"))
        (ctl / "shares").write_text("".join(f"{tag} {path}\n" for tag, _, path in share_list))
        out, err, console = work / "stdout", work / "stderr", work / "console.log"

        cmd = [
            qemu,
            "-accel", "tcg",
            "-cpu", "max,la57=off",
            "-m", str(memory_mb),
            "-smp", str(smp),
            "-nic", "none",
            "-nographic",
            "-no-reboot",
            "-monitor", "none",
            "-serial", f"file:{console}",
            "-kernel", str(vmlinuz),
            "-initrd", str(initramfs),
            "-append", KERNEL_COMMAND_LINE,
            "-virtfs",
            "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
            "-virtfs",
            f"local,path={ctl},mount_tag=vmctl,security_model=none,multidevs=remap",
            "-device", "virtio-serial-pci,id=vser",
            "-chardev", f"file,id=gout,path={out}",
            "-device", "virtserialport,bus=vser.0,chardev=gout,name=stdout",
            "-chardev", f"file,id=gerr,path={err}",
            "-device", "virtserialport,bus=vser.0,chardev=gerr,name=stderr",
        ]  # fmt: skip
        for tag, host_dir, _ in share_list:
            cmd += [
                "-virtfs",
                f"local,path={host_dir},mount_tag={tag},security_model=none,multidevs=remap",
            ]
        for disk in disks:
            if "," in str(disk):
                raise ValueError(f"qemu cannot attach a path with a comma: {disk}")
            cmd += ["-drive", f"file={disk},if=virtio,format=raw,snapshot=on,cache=unsafe"]

        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        try:
            qemu_output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise GuestTimeout(
                f"guest ({release}) still running after {timeout:g} s, killed: {shlex.join(argv)}\n"
                f"--- console tail ---\n{_tail(_read(console))}\n"
                f"--- stderr tail ---\n{_tail(_read(err), 2000)}"
            ) from None
        finally:
            if proc.poll() is None:  # interrupted (e.g. Ctrl-C): never leave qemu behind
                proc.kill()
                proc.wait()

        console_text = _read(console)
        status = _read(ctl / "status").strip()
        if not status.lstrip("-").isdigit():
            raise GuestError(
                f"guest ({release}) reported no exit status (qemu exit {proc.returncode}): "
                f"{shlex.join(argv)}\n"
                f"--- qemu output ---\n{_tail(qemu_output.decode(errors='replace'), 2000)}\n"
                f"--- console tail ---\n{_tail(console_text)}\n"
                f"--- stderr tail ---\n{_tail(_read(err), 2000)}"
            )
        return GuestResult(
            returncode=int(status),
            stdout=_read(out),
            stderr=_read(err),
            console=console_text,
        )
