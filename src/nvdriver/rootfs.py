"""The driver root at /run/nvidia/driver and the GPU Operator's status files.

The container's root file system is bound (recursively) at /run/nvidia/driver
so that the container toolkit and the Operator's validator find the driver's
user space there. /sys is made unbindable first and then private, as NVIDIA's
driver container does, so that sysfs' own submounts are not bound along.

Two files under /run/nvidia/validations speak to the GPU Operator (docs/paths.md):
the readiness file `.driver-ctr-ready`, YAML `KEY: true|false` lines that the
Operator's validator unmarshals into a map of booleans, and `.driver-daemons-status`,
`NotReady` from the start of `init` and `Ready` while the driver's daemons run, which
the Operator's startup probe requires when it exists. Each is written atomically.
All are context managers: leaving the block unmounts and removes the files
(`load` keeps the mount, for the driver's GSP firmware, until `unload`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

from nvdriver import mounts
from nvdriver.atomic import TEMP_PREFIX, write_atomically
from nvdriver.config import Config
from nvdriver.errors import DriverError
from nvdriver.host import resolve_in
from nvdriver.kmod.loaded import LoadedModule
from nvdriver.run import run, which

log = logging.getLogger(__name__)

DRIVER_ROOT = "/run/nvidia/driver"
READY_FILE = "/run/nvidia/validations/.driver-ctr-ready"
DAEMONS_STATUS_FILE = "/run/nvidia/validations/.driver-daemons-status"
DAEMONS_NOT_READY = "NotReady"
DAEMONS_READY = "Ready"
# Where the driver's GSP firmware is, as the host's kernel sees it (firmware_class.path).
FIRMWARE_DIR = f"{DRIVER_ROOT}/lib/firmware"
NVIDIA_SMI_TIMEOUT = 120.0


@contextlib.contextmanager
def exposed_root(config: Config, container_root: Path, *, keep: bool = False) -> Iterator[Path]:
    """Bind `container_root` recursively at /run/nvidia/driver for a `with` block.

    Unmounted when the block ends; with `keep` only when it fails (`load` leaves
    the root bound for the loaded driver's firmware, `unload` removes it).
    """
    sysfs = container_root / "sys"
    # A file system of its own (sysfs has its own device): no mount table needed to tell.
    if os.path.ismount(sysfs):
        mounts.set_propagation(sysfs, "runbindable")
        mounts.set_propagation(sysfs, "private")
    with mounts.propagated_bind(container_root, config.host(DRIVER_ROOT), keep=keep) as target:
        yield target


def find_program(container_root: Path, name: str) -> Path | None:
    """The driver root's program `name` (nvidia-smi, nv-fabricmanager), if it has one; its
    links resolved inside the root (Debian's /usr/bin/nvidia-smi is an absolute
    alternatives link)."""
    if container_root == Path("/"):
        return which(name)
    found = [
        resolve_in(container_root, container_root / d / name)
        for d in ("usr/bin", "bin", "usr/sbin", "sbin")
    ]
    return next((p for p in found if p.is_file() and os.access(p, os.X_OK)), None)


def find_nvidia_smi(container_root: Path) -> Path | None:
    return find_program(container_root, "nvidia-smi")


def check_nvidia_smi(container_root: Path) -> None:
    """Run the driver root's nvidia-smi, when it has one: the Operator's startup probe."""
    smi = find_nvidia_smi(container_root)
    if smi is None:
        log.info("There is no nvidia-smi in %s; the readiness check skips it", container_root)
        return
    run(
        [smi],
        timeout=NVIDIA_SMI_TIMEOUT,
        hint="nvidia-smi must pass before the driver is announced ready; see its message.",
    )


def readiness_text(flags: Mapping[str, bool]) -> str:
    """YAML, one `KEY: true|false` line per flag: the Operator's validator reads the file
    with `yaml.Unmarshal` into a map of booleans (`KEY=value` lines fail there)."""
    return "".join(f"{key}: {'true' if value else 'false'}\n" for key, value in flags.items())


def readiness_flags(config: Config) -> dict[str, bool]:
    """What the readiness file announces: the settings, except that GPUDirect RDMA is
    announced only when nvidia-peermem is loaded.

    The validator checks nvidia-peermem for each component announced true: announced
    without it, the node would never validate, where its GPUs work for all but RDMA.
    """
    flags = config.options.readiness
    rdma = "GPU_DIRECT_RDMA_ENABLED"
    if flags[rdma] and LoadedModule.read(config.host("/sys/module"), "nvidia-peermem") is None:
        log.warning(
            "GPU_DIRECT_RDMA_ENABLED is set but nvidia-peermem is not loaded: the readiness "
            "file says %s: false, and GPUDirect RDMA through nvidia-peermem is not available",
            rdma,
        )
        flags[rdma] = False
    return flags


@contextlib.contextmanager
def ready(config: Config, flags: Mapping[str, bool]) -> Iterator[Path]:
    """The readiness file, written atomically, for a `with` block; removed on the way out."""
    path = config.host(READY_FILE)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        _write_for_the_operator(path, readiness_text(flags).encode())
        log.info("The driver is ready (%s)", path)
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _write_for_the_operator(path: Path, data: bytes) -> None:
    """One of the files the GPU Operator reads, written atomically; a full or read-only
    /run/nvidia is the user's to fix (DriverError), and leaves no temporary file."""
    try:
        write_atomically(path, data)
    except OSError as e:
        raise DriverError(
            f"Cannot write {path}: {e.strerror or e}.",
            hint="/run/nvidia must be the host's, mounted read-write (rshared), with free "
            "space: it is a small tmpfs on the host.",
        ) from e


class DaemonsStatus:
    """The daemons' status file of one `init`: `NotReady`, or `Ready` while they run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, status: str) -> None:
        _write_for_the_operator(self.path, status.encode())
        log.info("Daemons: %s (%s)", status, self.path)

    @contextlib.contextmanager
    def ready(self) -> Iterator[None]:
        """`Ready` for a `with` block entered once the daemons run; `NotReady` again when
        it ends, before the shutdown stops them."""
        self.write(DAEMONS_READY)
        try:
            yield
        finally:
            try:
                self.write(DAEMONS_NOT_READY)
            except DriverError as e:  # the file goes at the end of init in any case
                log.warning("Could not mark the daemons not ready: %s", e)


@contextlib.contextmanager
def daemons_status(config: Config) -> Iterator[DaemonsStatus]:
    """The daemons' status file, `NotReady` from the start (replacing what a killed run
    left), for a `with` block; removed on the way out."""
    path = config.host(DAEMONS_STATUS_FILE)
    path.parent.mkdir(parents=True, exist_ok=True)
    status = DaemonsStatus(path)
    try:
        status.write(DAEMONS_NOT_READY)
        yield status
    finally:
        path.unlink(missing_ok=True)


def remove_daemons_status(config: Config) -> None:
    """What a killed `init` left of the daemons' status (`unload`: no daemon runs now)."""
    path = config.host(DAEMONS_STATUS_FILE)
    if path.is_file():
        log.info("Removing the stale %s", path)
        path.unlink(missing_ok=True)


def remove_stale(config: Config) -> None:
    """What a killed run left: the bind mount, the readiness file, its temporary files."""
    try:
        mounts.unmount_tree(config.host(DRIVER_ROOT))
    except DriverError as e:
        log.warning("Could not unmount the stale %s: %s", DRIVER_ROOT, e)
    ready_file = config.host(READY_FILE)
    for p in (
        [ready_file, *ready_file.parent.glob(f"{TEMP_PREFIX}*")]
        if ready_file.parent.is_dir()
        else []
    ):
        with contextlib.suppress(FileNotFoundError):
            if p.is_file():
                log.info("Removing the stale %s", p)
                os.unlink(p)
