"""The firmware search path, so that the kernel finds GSP firmware in the driver root."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from nvdriver.config import Config
from nvdriver.host import read_optional
from nvdriver.kmod.params import param_value

log = logging.getLogger(__name__)

FIRMWARE_PARAM = "/sys/module/firmware_class/parameters/path"


def set_firmware_path(config: Config, firmware_dir: str, nvidia_params: Sequence[str]) -> None:
    """Let the kernel find the open modules' GSP firmware in the driver root.

    Written only when the path is unset (the host's own choice wins) and the
    firmware is not turned off with NVreg_EnableGpuFirmware=0.
    """
    if param_value(nvidia_params, "NVreg_EnableGpuFirmware") == "0":
        log.info("GPU firmware is disabled (NVreg_EnableGpuFirmware=0); not setting its path")
        return
    param = config.host(FIRMWARE_PARAM)
    current = read_optional(param)
    if current is None:
        log.warning("The kernel has no %s; GSP firmware must be in /lib/firmware", FIRMWARE_PARAM)
        return
    if current:
        log.info("The firmware search path is already %s; leaving it", current)
        return
    param.write_text(firmware_dir)
    log.info("Set the firmware search path to %s", firmware_dir)
