"""The /dev/nvidia* device nodes and their /dev/char links: made after a load, removed
after an unload, only those this program made.

nvidia.ko registers its character devices but creates no nodes; on a node
without udev rules for them (and in a container, whose /dev is a copy) CUDA
finds none. The numbers (docs/paths.md, "Device nodes"; nvidia-modprobe):
/dev/nvidiactl is 195:255, /dev/nvidiaN is 195:N (N the GPU's "Device Minor" in
/proc/driver/nvidia/gpus/*/information), /dev/nvidia-modeset 195:254 while
nvidia-modeset is loaded, /dev/nvidia-uvm and /dev/nvidia-uvm-tools minors 0 and 1
of the major /proc/devices gives nvidia-uvm. MIG's /dev/nvidia-caps/nvidia-capM: one
per file of /proc/driver/nvidia/capabilities/mig/ (config, monitor), whose
`DeviceFileMinor`, `DeviceFileMode` (decimal) and `DeviceFileModify` lines the driver
writes, of the major of `nvidia-caps` in /proc/devices, owned by root (nv-caps.c, nv-reg.h:
DeviceFileUID/GID are the GPU nodes' only).

The GPU nodes' mode, owner and group follow the loaded driver's
/proc/driver/nvidia/params (DeviceFileMode/UID/GID, as nvidia-modprobe reads
them), else the NVreg_ parameters of nvidia.conf; ModifyDeviceFiles=0
(DeviceFileModify: 0 for a capability) makes no node.

Every node present gets its link /dev/char/MAJOR:MINOR -> ../NAME, relative as
udev and nvidia-modprobe make them: systemd re-applies a container's device
access from those links at every `daemon-reload` (cgroup v2, the systemd cgroup
driver: Flatcar's containerd and Docker), and a node without one is dropped
from every running container ("Failed to initialize NVML: Unknown Error",
docs/troubleshooting.md). Links are made for nodes others made too (without
touching those nodes), as nvidia-modprobe does.

What was made is recorded in /run/nvidia/device-nodes.json (host-shared, gone at
a reboot with /dev itself), each with its inode, so that `unload`, in this
container or the next, removes exactly those of the modules no longer loaded and
leaves a node or link someone else made, or made again since, where it is.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal, NamedTuple, cast

from nvdriver.atomic import write_atomically
from nvdriver.config import Config
from nvdriver.host import read_optional
from nvdriver.kmod.loaded import loaded_modules
from nvdriver.kmod.params import param_value
from nvdriver.pattern import Pattern

log = logging.getLogger(__name__)

NVIDIA_MAJOR = 195
CTL_MINOR = 255
MODESET_MINOR = 254
RECORD = "/run/nvidia/device-nodes.json"
CAPS_DIR = "nvidia-caps"
MIG_CAPS = ("config", "monitor")
_MINOR_RE = Pattern(r"^Device Minor:\s*(\d+)\s*$", re.MULTILINE)
_FIELD_RE = Pattern(r"^(\w+):\s*(-?\d+)\s*$", re.MULTILINE)

Kind = Literal["node", "link", "dir"]


class Access(NamedTuple):
    """Who may open a node, and whether the driver lets it be made (ModifyDeviceFiles)."""

    mode: int = 0o666
    uid: int = 0
    gid: int = 0
    modify: bool = True


class DeviceNode(NamedTuple):
    """A node the loaded driver needs, as nvidia-modprobe would make it."""

    name: str  # under /dev: nvidia0, nvidia-caps/nvidia-cap1
    major: int
    minor: int
    module: str  # the sysfs name of the module that serves it
    access: Access = Access()

    @property
    def rdev(self) -> int:
        return os.makedev(self.major, self.minor)

    @property
    def char_link(self) -> str:
        """Its link under /dev: char/MAJOR:MINOR."""
        return f"char/{self.major}:{self.minor}"

    @property
    def link_target(self) -> str:
        """The link's target, relative to /dev/char (as udev writes them)."""
        return f"../{self.name}"


class Made(NamedTuple):
    """A node, link or directory this program made under /dev, and how to know it again."""

    path: str  # relative to /dev
    kind: Kind
    module: str  # removed once this module is unloaded
    inode: int
    ctime_ns: int  # with the inode: a node made again at the same path is another one
    detail: str = ""  # a node's "MAJOR:MINOR", a link's target

    @classmethod
    def of(cls, path: Path, name: str, kind: Kind, module: str, detail: str = "") -> Made:
        """What was just made at `path` (/dev/`name`)."""
        st = path.lstat()
        return cls(name, kind, module, st.st_ino, st.st_ctime_ns, detail)

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> Made | None:
        try:
            kind = str(data["kind"])
            if kind not in ("node", "link", "dir"):
                return None
            return cls(
                path=str(data["path"]),
                kind=cast(Kind, kind),
                module=str(data["module"]),
                inode=int(str(data["inode"])),
                ctime_ns=int(str(data["ctime_ns"])),
                detail=str(data.get("detail", "")),
            )
        except (KeyError, ValueError):
            return None

    def is_there(self, dev: Path) -> bool:
        """Whether what is at the path now is still the one made (not removed, not made
        again by someone else since: tmpfs reuses inode numbers at once, so a node made
        again has the same inode but another ctime; so does one someone chmod'ed, which
        is theirs now too). A directory's ctime changes with its entries: its inode only."""
        try:
            st = (dev / self.path).lstat()
        except OSError:
            return False
        if st.st_ino != self.inode:
            return False
        if self.kind != "dir" and st.st_ctime_ns != self.ctime_ns:
            return False
        if self.kind == "node":
            return stat.S_ISCHR(st.st_mode) and _numbers(st.st_rdev) == self.detail
        if self.kind == "link":
            return stat.S_ISLNK(st.st_mode) and os.readlink(dev / self.path) == self.detail
        return stat.S_ISDIR(st.st_mode)


def _numbers(rdev: int) -> str:
    return f"{os.major(rdev)}:{os.minor(rdev)}"


def char_majors(proc_devices: str) -> dict[str, int]:
    """The character device majors of /proc/devices, by name."""
    majors: dict[str, int] = {}
    in_char = False
    for line in proc_devices.splitlines():
        if line.strip().endswith("devices:"):
            in_char = line.strip() == "Character devices:"
            continue
        number, _, name = line.strip().partition(" ")
        if in_char and number.isdigit() and name:
            majors[name.strip()] = int(number)
    return majors


def gpu_minors(config: Config) -> list[int]:
    """The minors of the GPUs nvidia.ko drives, from /proc/driver/nvidia/gpus/*/information."""
    gpus = config.host("/proc/driver/nvidia/gpus")
    minors = []
    for info in sorted(gpus.glob("*/information")) if gpus.is_dir() else []:
        if (m := _MINOR_RE.search(read_optional(info) or "")) is not None:
            minors.append(int(m.group(1)))
    return sorted(minors)


def _fields(text: str | None) -> dict[str, int]:
    """`Key: number` lines (/proc/driver/nvidia/params, a capability's file)."""
    return {m.group(1): int(m.group(2)) for m in _FIELD_RE.finditer(text or "")}


def _number(value: str | None, default: int) -> int:
    """A module parameter's integer as the kernel reads it (0x hex, leading 0 octal)."""
    if value is None:
        return default
    try:
        return int(value, 16 if value.lower().startswith("0x") else 8 if value[:1] == "0" else 10)
    except ValueError:
        return default


def _gpu_access(config: Config, nvidia_params: Sequence[str]) -> Access:
    """The GPU nodes' ModifyDeviceFiles and DeviceFileMode/UID/GID: the loaded driver's (its
    params file, in decimal, as nvidia-modprobe reads it), else nvidia.conf's, else the
    driver's defaults."""
    loaded = _fields(read_optional(config.host("/proc/driver/nvidia/params")))

    def value(key: str, default: int) -> int:
        if key in loaded:
            return loaded[key]
        return _number(param_value(nvidia_params, f"NVreg_{key}"), default)

    return Access(
        mode=value("DeviceFileMode", 0o666) & 0o7777,
        uid=value("DeviceFileUID", 0),
        gid=value("DeviceFileGID", 0),
        modify=value("ModifyDeviceFiles", 1) != 0,
    )


def _mig_caps(config: Config, major: int) -> list[DeviceNode]:
    """MIG's config and monitor nodes, as the driver's capability files describe them."""
    nodes = []
    for cap in MIG_CAPS:
        text = read_optional(config.host("/proc/driver/nvidia/capabilities/mig") / cap)
        fields = _fields(text)
        minor = fields.get("DeviceFileMinor", -1)
        if minor < 0:
            continue
        access = Access(
            mode=fields.get("DeviceFileMode", 0o444) & 0o777,
            modify=fields.get("DeviceFileModify", 1) != 0,
        )
        nodes.append(DeviceNode(f"{CAPS_DIR}/nvidia-cap{minor}", major, minor, "nvidia", access))
    return nodes


def wanted_nodes(config: Config, nvidia_params: Sequence[str] = ()) -> list[DeviceNode]:
    """The nodes the loaded driver needs: control, one per GPU, nvidia-modeset's, UVM's,
    MIG's capabilities; each while its module is loaded."""
    loaded = {m.name for m in loaded_modules(config)}
    gpu = _gpu_access(config, nvidia_params)
    nodes = [DeviceNode("nvidiactl", NVIDIA_MAJOR, CTL_MINOR, "nvidia", gpu)]
    nodes += [DeviceNode(f"nvidia{n}", NVIDIA_MAJOR, n, "nvidia", gpu) for n in gpu_minors(config)]
    if "nvidia_modeset" in loaded:
        nodes.append(
            DeviceNode("nvidia-modeset", NVIDIA_MAJOR, MODESET_MINOR, "nvidia_modeset", gpu)
        )
    majors = char_majors(read_optional(config.host("/proc/devices")) or "")
    if (uvm := majors.get("nvidia-uvm")) is not None:
        nodes += [
            DeviceNode("nvidia-uvm", uvm, 0, "nvidia_uvm", gpu),
            DeviceNode("nvidia-uvm-tools", uvm, 1, "nvidia_uvm", gpu),
        ]
    if (caps := majors.get("nvidia-caps")) is not None:
        nodes += _mig_caps(config, caps)
    return nodes


# --- what was made: the record ----------------------------------------------------


def _read_record(config: Config) -> list[Made]:
    """What this program made (any run, any container), as recorded; [] when none."""
    text = read_optional(config.host(RECORD))
    if not text:
        return []
    try:
        entries = json.loads(text)
    except ValueError:
        log.warning("%s is not JSON; forgetting it", config.host(RECORD))
        return []
    made = [Made.from_json(e) for e in entries if isinstance(e, dict)]
    return [m for m in made if m is not None]


def _write_record(config: Config, made: Sequence[Made]) -> None:
    """Record `made` (or remove the record when nothing is left). Never raises: without
    a record the nodes stay after an unload, which is logged."""
    path = config.host(RECORD)
    try:
        if not made:
            path.unlink(missing_ok=True)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        data = json.dumps([m._asdict() for m in made], indent=1) + "\n"
        write_atomically(path, data.encode())
    except OSError as e:
        log.warning(
            "Cannot record the device nodes made in %s (%s): unload will leave them", path, e
        )


# --- making -----------------------------------------------------------------------


def _is_node(path: Path, node: DeviceNode) -> bool:
    try:
        st = path.lstat()
    except OSError:
        return False
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == node.rdev


def _make_dir(dev: Path, name: str, record: list[Made]) -> None:
    """/dev/NAME as a directory (mode 0755, root's, as nvidia-modprobe makes nvidia-caps);
    recorded when made, to go with nvidia (every NVIDIA module goes with or before it)."""
    path = dev / name
    if path.is_dir():
        return
    path.mkdir(mode=0o755)
    path.chmod(0o755)  # mkdir applies the umask
    record.append(Made.of(path, name, "dir", "nvidia"))


def _make_node(dev: Path, node: DeviceNode, record: list[Made]) -> bool:
    """Make `node` unless it is there; True when made. A node of an earlier load that has
    other numbers now (nvidia-uvm's major is dynamic) is made again; anything else that
    is in the way is left, with a warning."""
    path = dev / node.name
    if _is_node(path, node) or not node.access.modify:
        return False
    if os.path.lexists(path):
        earlier = next((m for m in record if m.path == node.name and m.kind == "node"), None)
        if earlier is None:
            log.warning("%s is not char device %d:%d; left as it is", path, node.major, node.minor)
            return False
        log.info("%s is char %s of an earlier load: making it again", path, earlier.detail)
        path.unlink()
        record.remove(earlier)
        stale = f"char/{earlier.detail}"
        for link in [m for m in record if m.kind == "link" and m.path == stale]:
            (dev / link.path).unlink()
            record.remove(link)
    if "/" in node.name:
        _make_dir(dev, node.name.rpartition("/")[0], record)
    os.mknod(path, stat.S_IFCHR | node.access.mode, node.rdev)
    os.chmod(path, node.access.mode)  # mknod applies the umask
    os.chown(path, node.access.uid, node.access.gid)
    record.append(Made.of(path, node.name, "node", node.module, _numbers(node.rdev)))
    return True


def _link_node(dev: Path, node: DeviceNode, record: list[Made]) -> bool:
    """Make /dev/char/MAJOR:MINOR -> ../NAME unless a link there leads to the node already;
    True when made. A link that leads nowhere or elsewhere is replaced (nvidia-modprobe
    does the same); a file that is not a link is left, with a warning."""
    link = dev / node.char_link
    if os.path.lexists(link):
        try:
            if os.path.samestat(link.stat(), (dev / node.name).stat()):
                return False
        except OSError:
            pass  # dangling
        if not link.is_symlink():
            log.warning("%s is not a link; left as it is", link)
            return False
        log.info("%s leads to %s, not to %s: replacing it", link, os.readlink(link), node.name)
        link.unlink()
        record[:] = [m for m in record if not (m.path == node.char_link and m.kind == "link")]
    _make_dir(dev, "char", record)
    os.symlink(node.link_target, link)
    record.append(Made.of(link, node.char_link, "link", node.module, node.link_target))
    return True


def make_device_nodes(config: Config, nvidia_params: Sequence[str]) -> list[Path]:
    """Make the missing /dev/nvidia* nodes and every node's /dev/char link; return the
    nodes made. Never raises: a node or link that cannot be made (no CAP_MKNOD, a
    read-only /dev) is logged."""
    dev = config.host("/dev")
    record = [m for m in _read_record(config) if m.is_there(dev)]
    before = list(record)
    nodes, links = [], []
    for node in wanted_nodes(config, nvidia_params):
        path = dev / node.name
        try:
            if _make_node(dev, node, record):
                nodes.append(path)
        except OSError as e:
            log.warning("Cannot make %s (char %d:%d): %s", path, node.major, node.minor, e)
            continue
        if not _is_node(path, node):
            if not node.access.modify:
                log.info("%s: the driver's parameters say not to make it", path)
            continue
        try:
            if _link_node(dev, node, record):
                links.append(dev / node.char_link)
        except OSError as e:
            log.warning("Cannot link %s to %s: %s", dev / node.char_link, path, e)
    if record != before:
        _write_record(config, record)
    if nodes:
        log.info("Made %s", ", ".join(str(p) for p in nodes))
    if links:
        log.info("Made the links %s", ", ".join(str(p) for p in links))
    return nodes


# --- removing ---------------------------------------------------------------------

_REMOVAL_ORDER: dict[Kind, int] = {"link": 0, "node": 1, "dir": 2}


def _removal_order(made: Made) -> tuple[int, int]:
    """Links before their nodes, nodes before their directories, inner directories first."""
    return (_REMOVAL_ORDER[made.kind], -made.path.count("/"))


def remove_device_nodes(config: Config) -> list[Path]:
    """Remove what `make_device_nodes` made for modules that are no longer loaded; return
    what was removed. A node or link made again by someone else since stays, and so does
    a directory that holds others' files. Never raises."""
    record = _read_record(config)
    if not record:
        return []
    dev = config.host("/dev")
    loaded = {m.name for m in loaded_modules(config)}
    keep: list[Made] = []
    removed = []
    for made in sorted(record, key=_removal_order):
        path = dev / made.path
        if made.module in loaded:
            keep.append(made)
        elif not made.is_there(dev):
            log.info("%s is not the one made here any more: left as it is", path)
        else:
            try:
                path.rmdir() if made.kind == "dir" else path.unlink()
            except OSError as e:
                if made.kind == "dir":
                    log.info("%s is not empty (%s): left as it is", path, e.strerror)
                else:
                    log.warning("Cannot remove %s: %s", path, e)
                    keep.append(made)
                continue
            removed.append(path)
    _write_record(config, keep)
    if removed:
        log.info("Removed %s", ", ".join(str(p) for p in removed))
    return removed
