"""The /dev/nvidia* device nodes, made where no udev (nor nvidia-modprobe) makes them.

nvidia.ko registers its character devices but creates no nodes; on a node
without udev rules for them (and in a container, whose /dev is a copy) CUDA
finds none. The numbers (docs/paths.md, "Device nodes"): /dev/nvidiactl is 195:255,
/dev/nvidiaN is 195:N (N the GPU's "Device Minor" in
/proc/driver/nvidia/gpus/*/information), /dev/nvidia-uvm has the major that
/proc/devices gives nvidia-uvm, minor 0, and /dev/nvidia-uvm-tools minor 1 (as
nvidia-modprobe makes them). Mode, owner and group follow the nvidia module's
NVreg_DeviceFileMode/UID/GID; NVreg_ModifyDeviceFiles=0 leaves /dev alone.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import stat
from collections.abc import Sequence
from pathlib import Path

from nvdriver.config import Config
from nvdriver.host import read_optional
from nvdriver.kmod.params import param_value

log = logging.getLogger(__name__)

NVIDIA_MAJOR = 195
CTL_MINOR = 255
_MINOR_RE = re.compile(r"^Device Minor:\s*(\d+)\s*$", re.MULTILINE)


@dataclasses.dataclass(frozen=True)
class DeviceNode:
    name: str  # under /dev
    major: int
    minor: int


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


def wanted_nodes(config: Config) -> list[DeviceNode]:
    """The nodes the loaded driver needs: control, one per GPU, UVM when it is loaded."""
    nodes = [DeviceNode("nvidiactl", NVIDIA_MAJOR, CTL_MINOR)]
    nodes += [DeviceNode(f"nvidia{n}", NVIDIA_MAJOR, n) for n in gpu_minors(config)]
    uvm = char_majors(read_optional(config.host("/proc/devices")) or "").get("nvidia-uvm")
    if uvm is not None:
        nodes += [DeviceNode("nvidia-uvm", uvm, 0), DeviceNode("nvidia-uvm-tools", uvm, 1)]
    return nodes


def _number(value: str | None, default: int) -> int:
    """A module parameter's integer as the kernel reads it (0x hex, leading 0 octal)."""
    if value is None:
        return default
    try:
        return int(value, 16 if value.lower().startswith("0x") else 8 if value[:1] == "0" else 10)
    except ValueError:
        return default


def make_device_nodes(config: Config, nvidia_params: Sequence[str]) -> list[Path]:
    """Make the missing /dev/nvidia* nodes; return those made. Never raises: a node that
    cannot be made (no CAP_MKNOD, a read-only /dev) is logged."""
    if param_value(nvidia_params, "NVreg_ModifyDeviceFiles") == "0":
        log.info("NVreg_ModifyDeviceFiles=0: not making /dev/nvidia* nodes")
        return []
    mode = _number(param_value(nvidia_params, "NVreg_DeviceFileMode"), 0o666) & 0o7777
    uid = _number(param_value(nvidia_params, "NVreg_DeviceFileUID"), 0)
    gid = _number(param_value(nvidia_params, "NVreg_DeviceFileGID"), 0)
    made = []
    for node in wanted_nodes(config):
        path = config.host("/dev") / node.name
        rdev = os.makedev(node.major, node.minor)
        try:
            if os.path.lexists(path):
                st = path.lstat()
                if not stat.S_ISCHR(st.st_mode) or st.st_rdev != rdev:
                    log.warning(
                        "%s is not char device %d:%d; left as it is", path, node.major, node.minor
                    )
                continue
            os.mknod(path, stat.S_IFCHR | mode, rdev)
            os.chmod(path, mode)  # mknod applies the umask
            os.chown(path, uid, gid)
        except OSError as e:
            log.warning("Cannot make %s (char %d:%d): %s", path, node.major, node.minor, e)
            continue
        made.append(path)
    if made:
        log.info("Made %s", ", ".join(str(p) for p in made))
    return made
