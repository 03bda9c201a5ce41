"""Who uses the loaded NVIDIA driver: processes with /dev/nvidia* open, their containers, and
modules that use it.

This decides whether the driver is in use before any of its daemons stops (handover.py:
init's stop, `unload`, a swap to another driver), and names the users for people: the log
of an `init` that waits for a driver in use, and `status`. `unloading.busy_reasons`
applies the kernel's rule once more after the daemons stopped. It reads /proc only (every
process is visible with `--pid=host`): a process's open files (`/proc/PID/fd`, as the
holder's mount namespace names them; the container toolkit gives containers the host's
/dev/nvidia* names) and its cgroup (`/proc/PID/cgroup`), from which the container runtime
and the Kubernetes pod are read.

Our own daemons (nvidia-persistenced, the fabric manager) hold the driver too; they are
stopped before an unload, so they are not users that make it busy. A reference that no
visible process or module explains (a /dev/dri client of nvidia-drm, a process this
container cannot read) still does. What this cannot see: a hidden process holding a file of
a module whose files our daemons hold too (the references per file are not fixed: see
`_unexplained`); the kernel's rule after the daemons' stop still keeps that driver loaded.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Collection, Iterable, Sequence

from nvdriver.config import Config
from nvdriver.host import read_optional
from nvdriver.kmod.loaded import LoadedModule
from nvdriver.pattern import Pattern

DEVICE_PREFIX = "/dev/nvidia"

# The cgroup path forms of containers, with the systemd and the cgroupfs drivers (cgroup v1
# lines `N:controllers:PATH`, v2 `0::PATH`): Docker `docker-ID.scope`, `/docker/ID`;
# containerd `cri-containerd-ID.scope`, `/kubepods/.../ID`; CRI-O `crio-ID.scope`.
_SCOPE_RE = Pattern(r"(?:^|/)(docker|cri-containerd|crio)-([0-9a-f]{64})\.scope(?:/|$)")
_DOCKER_RE = Pattern(r"(?:^|/)docker/([0-9a-f]{64})(?:/|$)")
_KUBEPODS_ID_RE = Pattern(r"(?:^|/)kubepods(?:/[^/]+)*/pod[0-9a-f-]+/([0-9a-f]{64})(?:/|$)")
# The pod's UID: `pod<uid>` (cgroupfs) or `kubepods-<qos>-pod<uid with _>.slice` (systemd).
_POD_RE = Pattern(
    r"(?:^|/|-)pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})"
)
_RUNTIMES = {"docker": "docker", "cri-containerd": "containerd", "crio": "cri-o"}


@dataclasses.dataclass(frozen=True)
class Container:
    """The container a process runs in, as its cgroup path says."""

    runtime: str  # docker, containerd, cri-o; "kubernetes" when only the pod is known
    id: str | None
    pod_uid: str | None

    def __str__(self) -> str:
        what = f"{self.runtime} container {self.id[:12]}" if self.id else self.runtime
        return what + (f" of pod {self.pod_uid}" if self.pod_uid else "")


def container_of(cgroup: str) -> Container | None:
    """The container of a process from its /proc/PID/cgroup text, or None (the host's)."""
    for line in cgroup.splitlines():
        path = line.split(":", 2)[-1]
        pod = _POD_RE.search(path)
        pod_uid = pod.group(1).replace("_", "-") if pod else None
        if m := _SCOPE_RE.search(path):
            return Container(_RUNTIMES[m.group(1)], m.group(2), pod_uid)
        if m := _DOCKER_RE.search(path):
            return Container("docker", m.group(1), pod_uid)
        if m := _KUBEPODS_ID_RE.search(path):
            return Container("kubernetes", m.group(1), pod_uid)
        if pod_uid is not None:
            return Container("kubernetes", None, pod_uid)
    return None


@dataclasses.dataclass(frozen=True)
class Holder:
    """A process with NVIDIA device files open."""

    pid: int
    command: str
    devices: tuple[str, ...]  # the /dev/nvidia* files it has open, one per open descriptor
    container: Container | None
    parent: int = 0  # its parent's pid (0: unknown)

    def __str__(self) -> str:
        where = f" in {self.container}" if self.container else ""
        return f"pid {self.pid} ({self.command}){where}: {', '.join(sorted(set(self.devices)))}"

    def as_json(self) -> dict[str, object]:
        c = self.container
        return {
            "pid": self.pid,
            "command": self.command,
            "devices": sorted(set(self.devices)),
            "container": None if c is None else dataclasses.asdict(c),
        }


def _open_devices(fd_dir: str) -> tuple[str, ...]:
    devices = []
    try:
        names = os.listdir(fd_dir)
    except OSError:  # gone, or not ours to read
        return ()
    for name in names:
        try:
            target = os.readlink(os.path.join(fd_dir, name))
        except OSError:
            continue
        if target.startswith(DEVICE_PREFIX):
            devices.append(target.removesuffix(" (deleted)"))
    return tuple(devices)


def holders(config: Config) -> list[Holder]:
    """Every process with a /dev/nvidia* file open, by pid."""
    proc = config.host("/proc")
    try:
        pids = sorted(int(n) for n in os.listdir(proc) if n.isdigit())
    except OSError:
        return []
    found = []
    for pid in pids:
        devices = _open_devices(str(proc / str(pid) / "fd"))
        if not devices:
            continue
        command = read_optional(proc / str(pid) / "comm") or "?"
        cgroup = read_optional(proc / str(pid) / "cgroup") or ""
        parent = _parent(read_optional(proc / str(pid) / "stat") or "")
        found.append(Holder(pid, command, devices, container_of(cgroup), parent))
    return found


def _parent(stat: str) -> int:
    """The parent's pid from /proc/PID/stat: the field after the state, which follows the
    command in parentheses (which may itself hold spaces and parentheses)."""
    fields = stat.rpartition(")")[2].split()
    return int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else 0


@dataclasses.dataclass(frozen=True)
class Users:
    """Who uses a set of loaded NVIDIA modules, our own daemons apart."""

    processes: tuple[Holder, ...]
    modules: tuple[str, ...]  # modules from elsewhere that use the driver (a holder, gdrdrv)
    unseen: int  # references that no visible process or module explains

    @property
    def busy(self) -> bool:
        return bool(self.processes or self.modules or self.unseen)

    def __str__(self) -> str:
        parts = [str(h) for h in self.processes]
        parts += [f"module {m}" for m in self.modules]
        if self.unseen:
            parts.append(
                f"{self.unseen} reference(s) that no process here shows (a /dev/dri client "
                "of nvidia-drm, or a process this container cannot see)"
            )
        return "; ".join(parts) or "nobody"

    def as_json(self) -> dict[str, object]:
        return {
            "processes": [h.as_json() for h in self.processes],
            "modules": list(self.modules),
            "unseen_references": self.unseen,
        }


def device_modules(device: str) -> tuple[str, ...]:
    """The modules whose references an open NVIDIA device file holds: nvidia-uvm's own;
    /dev/nvidia-modeset nvidia.ko's (its frontend serves the minor) and nvidia-modeset's;
    every other /dev/nvidia* (nvidiactl, nvidiaN, nvidia-nvswitch*, nvidia-caps/*)
    nvidia.ko's."""
    name = device.removeprefix(DEVICE_PREFIX)
    if name.startswith("-uvm"):
        return ("nvidia_uvm",)
    return ("nvidia", "nvidia_modeset") if name == "-modeset" else ("nvidia",)


def _references(loaded: Sequence[LoadedModule]) -> tuple[tuple[str, ...], dict[str, int]]:
    """The modules from elsewhere that use `loaded`, and per module of `loaded` the
    references that are not those of the NVIDIA modules among themselves: open files."""
    names = {m.name for m in loaded}
    modules = tuple(sorted({h for m in loaded for h in m.holders if h not in names}))
    opened = {m.name: m.refcnt - len(m.holders) for m in loaded if m.refcnt > len(m.holders)}
    return modules, opened


def _unexplained(opened: dict[str, int], devices: Iterable[str]) -> int:
    """The references of `opened` on modules none of whose device files is among `devices`.

    How many references one open file holds is the kernel's and the driver's business:
    chrdev_open takes one on the cdev's owner and one on the file operations' owner
    (fs/char_dev.c: two per file where a driver sets both, as NVIDIA's do, and the stand-in
    does), NVIDIA's frontend may take its own. So a module whose files a visible process
    has open explains all its references; one with references and no file open anywhere
    has a user nobody here sees."""
    covered = {m for d in devices for m in device_modules(d)}
    return sum(n for m, n in opened.items() if m not in covered)


def driver_users(
    config: Config, loaded: Sequence[LoadedModule], ours: Collection[int] = ()
) -> Users:
    """Who uses `loaded` (the NVIDIA modules loaded now), apart from the processes `ours`
    (our daemons, which go before an unload).

    Each open file of a /dev/nvidia* device holds references on the modules behind it;
    each module that uses one holds one. References on a module no visible process (ours
    included) has a file of are counted as unseen (`_unexplained`). A child of one of
    `ours` is ours too: a fork shares its parent's open files (a daemon's `sleep`, a
    forked worker).
    """
    modules, opened = _references(loaded)
    found = holders(config)
    mine = {*ours, os.getpid()}
    others = tuple(h for h in found if h.pid not in mine and h.parent not in mine)
    unseen = _unexplained(opened, (d for h in found for d in h.devices))
    return Users(others, modules, unseen)
