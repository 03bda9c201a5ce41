"""The firmware search path (firmware_class.path) as `init` and `load` set it, on a fake sysfs.

The guest tests (tests/vm/test_firmware.py) prove the same against a real
kernel, a read-only /sys among them; these cover parameter values and
messages that a guest run does not.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from nvdriver.config import Config
from nvdriver.kmod import firmware as kmod

OURS = "/run/nvidia/driver/lib/firmware"


def param_file(root: Path, value: str) -> Path:
    param = root / kmod.FIRMWARE_PARAM.lstrip("/")
    param.parent.mkdir(parents=True)
    param.write_text(value)
    return param


def set_path(root: Path, *params: str) -> None:
    kmod.set_firmware_path(Config.from_env({"HOST_ROOT": str(root)}), OURS, params)


@pytest.mark.parametrize(
    ("value", "written"),
    [
        ("0", False),
        ("0x10", False),  # mode 0 (disabled) with a policy bit
        ('"0"', False),
        ("1", True),
        ("0x12", True),  # the driver's default: mode 2
        ("2", True),
        ("junk", True),  # not a number: the kernel refuses it, not a reason to skip the path
    ],
)
def test_the_path_is_set_unless_the_firmware_mode_is_disabled(
    tmp_path: Path, value: str, written: bool
) -> None:
    param = param_file(tmp_path, "\n")
    set_path(tmp_path, "NVreg_DeviceFileMode=0660", f"NVreg_EnableGpuFirmware={value}")
    assert param.read_text() == (OURS if written else "\n")


def test_a_preset_path_is_kept_with_a_warning_and_our_own_without(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    param = param_file(tmp_path, "/host/firmware\n")
    with caplog.at_level(logging.INFO, logger="nvdriver"):
        set_path(tmp_path)
    assert param.read_text() == "/host/firmware\n"
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "/host/firmware" in warning.getMessage()

    caplog.clear()
    param.write_text(OURS + "\n")
    with caplog.at_level(logging.INFO, logger="nvdriver"):
        set_path(tmp_path)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
