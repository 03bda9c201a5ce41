"""The firmware search path, so that the kernel finds GSP firmware in the driver root."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from nvdriver.config import Config
from nvdriver.errors import DriverError
from nvdriver.host import read_optional
from nvdriver.kmod.params import param_value

log = logging.getLogger(__name__)

FIRMWARE_PARAM = "/sys/module/firmware_class/parameters/path"


def _firmware_off(value: str | None) -> bool:
    """NVreg_EnableGpuFirmware's mode, its low four bits, is 0: "disabled"
    (nv-firmware-registry.h; 0x12, the default, is mode 2 with a policy bit)."""
    try:
        return value is not None and int(value, 0) & 0xF == 0
    except ValueError:
        return False  # not a number: the kernel refuses the parameter itself


def set_firmware_path(config: Config, firmware_dir: str, nvidia_params: Sequence[str]) -> None:
    """Let the kernel find the GSP firmware in the driver root, for every flavour.

    The open modules always run on GSP firmware, the proprietary ones too on
    Hopper and later GPUs; NVIDIA's container sets the path for both. Not when
    NVreg_EnableGpuFirmware's mode (low four bits) is 0: the firmware is off. A
    path the host set is kept, with a warning: the firmware must be found there.
    A path that cannot be written is an error, not a driver that fails later at
    its first open with "No firmware image found".
    """
    enable = param_value(nvidia_params, "NVreg_EnableGpuFirmware")
    if _firmware_off(enable):
        log.info("GPU firmware is off (NVreg_EnableGpuFirmware=%s); not setting its path", enable)
        return
    param = config.host(FIRMWARE_PARAM)
    current = read_optional(param)
    if current is None:
        log.warning("The kernel has no %s; GSP firmware must be in /lib/firmware", FIRMWARE_PARAM)
        return
    if current == firmware_dir:
        log.info("The firmware search path is %s already", firmware_dir)
        return
    if current:
        log.warning(
            "The firmware search path is set to %s already; keeping it: the GSP firmware must be "
            "there, not in %s",
            current,
            firmware_dir,
        )
        return
    try:
        param.write_text(firmware_dir)
    except OSError as e:
        raise DriverError(
            f"Cannot set the firmware search path: writing {firmware_dir} to {param} failed "
            f"({e.strerror or e}): the driver would not find its GSP firmware.",
            hint="Run the container privileged with /sys writable, or set the path on the host "
            "beforehand, or turn GSP firmware off with NVreg_EnableGpuFirmware=0 in nvidia.conf "
            "(only for GPUs that can run without it: not with the open modules, not on Hopper "
            "or later).",
        ) from e
    log.info("Set the firmware search path to %s", firmware_dir)
