"""`validate`: exit 7 without a GPU; with one, nvidia-smi and CUDA must agree with the bus.

There is no GPU on this machine: where a test needs one, it is a fake sysfs
device under HOST_ROOT and a stand-in nvidia-smi, said so in the test. The real
check (nvidia-smi and libcuda on an H-class GPU) runs on a GPU machine.
"""

from __future__ import annotations

import ctypes.util
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import need, run_tool

FAKE_LIBCUDA = Path(__file__).parent / "data" / "fake_libcuda.c"


def fake_gpu(root: Path, address: str = "0000:17:00.0") -> None:
    """A GPU as sysfs shows one (mocked: there is no GPU here)."""
    dev = root / "sys/bus/pci/devices" / address
    dev.mkdir(parents=True)
    (dev / "vendor").write_text("0x10de\n")
    (dev / "device").write_text("0x2335\n")
    (dev / "class").write_text("0x030200\n")


def fake_smi(root: Path) -> dict[str, str]:
    """A stand-in nvidia-smi that sees one GPU (mocked: there is no GPU here); the env."""
    smi = root / "root/usr/bin/nvidia-smi"
    smi.parent.mkdir(parents=True)
    smi.write_text("#!/bin/sh\necho '0, NVIDIA H200, 00000000:17:00.0, 535.261.03, GPU-1'\n")
    smi.chmod(0o755)
    return {"HOST_ROOT": str(root / "host"), "CONTAINER_ROOT": str(root / "root")}


def test_no_gpu_on_the_bus_is_exit_7(tmp_path):
    (tmp_path / "sys/bus/pci/devices").mkdir(parents=True)
    result = run_tool("validate", env={"HOST_ROOT": str(tmp_path)})
    assert result.returncode == 7
    assert "no NVIDIA GPU on the PCI bus" in result.stderr


def test_nvidia_smi_missing_a_gpu_of_the_bus_fails(tmp_path):
    fake_gpu(tmp_path / "host")
    fake_gpu(tmp_path / "host", "0000:18:00.0")
    result = run_tool("validate", env=fake_smi(tmp_path))
    assert result.returncode == 1
    assert "nvidia-smi sees 1 GPU(s), the PCI bus has 2" in result.stderr


@pytest.mark.skipif(ctypes.util.find_library("cuda") is not None, reason="a CUDA driver is here")
def test_without_libcuda_the_cuda_check_fails_clearly(tmp_path):
    fake_gpu(tmp_path / "host")
    result = run_tool("validate", env=fake_smi(tmp_path))
    assert result.returncode == 1
    assert "libcuda.so.1 cannot be loaded" in result.stderr


@pytest.fixture(scope="module")
def fake_libcuda(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory of a stand-in libcuda.so.1 (mocked: there is no GPU here)."""
    need(shutil.which("gcc") is not None, "gcc builds the stand-in libcuda")
    lib = tmp_path_factory.mktemp("cuda") / "libcuda.so.1"
    subprocess.run(
        ["gcc", "-shared", "-fPIC", "-Wall", "-Werror", "-o", lib, FAKE_LIBCUDA], check=True
    )
    return lib.parent


def test_a_gpu_that_nvidia_smi_and_cuda_see_validates(tmp_path, fake_libcuda):
    fake_gpu(tmp_path / "host")
    env = {**fake_smi(tmp_path), "LD_LIBRARY_PATH": str(fake_libcuda)}
    result = run_tool("validate", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "gpus": [
            {
                "index": "0",
                "name": "NVIDIA H200",
                "pci.bus_id": "00000000:17:00.0",
                "driver_version": "535.261.03",
                "uuid": "GPU-1",
            }
        ],
        "cuda": {"driver_version": 12020, "devices": ["NVIDIA H200"], "roundtrip_bytes": 1 << 20},
    }


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ({"FAKE_CUDA_CORRUPT": "1"}, "came back different"),
        ({"FAKE_CUDA_DEVICES": "2"}, "CUDA sees 2 device(s), the PCI bus has 1"),
        ({"FAKE_CUDA_DEVICES": "0"}, "CUDA sees 0 device(s), the PCI bus has 1"),
    ],
)
def test_cuda_disagreeing_with_the_bus_or_losing_data_fails(tmp_path, fake_libcuda, fault, message):
    fake_gpu(tmp_path / "host")
    env = {**fake_smi(tmp_path), "LD_LIBRARY_PATH": str(fake_libcuda), **fault}
    result = run_tool("validate", env=env)
    assert result.returncode == 1
    assert message in result.stderr
    assert result.stdout == ""
