"""KERNEL_MODULE_TYPE=auto: the flavour the GPUs on the bus need, by the driver's own GPU list.

The GPUs are synthetic sysfs entries with real device ids (no GPU exists
here); the GPU list is an excerpt of the real supported-gpus.json of 535.261.03
(tests/unit/data/README.md names its source).
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest

from nvdriver import status
from nvdriver.config import Config
from nvdriver.driver.flavour import FlavourChoice, SupportedGpus, choose_flavour
from nvdriver.driver.source import DriverSource, Flavour
from nvdriver.errors import DriverError, UnsupportedError
from nvdriver.host import nvidia_gpus
from tests.sysfs import A100, GH200, GTX680, H100, P100, T4, V100, gpus, pci_device

LIST_535 = Path(__file__).with_name("data") / "supported-gpus-535.261.03.json"


def driver_source(root: Path, version: str, flavours: tuple[str, ...]) -> Path:
    """A driver source tree as far as the flavour choice reads it: Makefiles and the version."""
    for d in flavours:
        (root / d).mkdir(parents=True)
        (root / d / "Makefile").write_text("# NVIDIA's\n")
        (root / d / "Kbuild").write_text(f"NV_VERSION_STRING := {version}\n")
    return root


def node(
    tmp_path: Path,
    *devices: int,
    version: str = "535.261.03",
    gpu_list: Path | None = LIST_535,
    flavours: tuple[str, ...] = ("kernel", "kernel-open"),
    module_type: str = "auto",
) -> tuple[Config, DriverSource]:
    host = tmp_path / "host"
    host.mkdir(parents=True)
    gpus(host, *devices)
    source = driver_source(tmp_path / f"nvidia-{version}", version, flavours)
    if gpu_list is not None:  # where NVIDIA's .run tree and the driver image have it
        (source / "supported-gpus").mkdir()
        shutil.copy(gpu_list, source / "supported-gpus" / "supported-gpus.json")
    config = Config.from_env(
        {
            "HOST_ROOT": str(host),
            "NVIDIA_DRIVER_SOURCE": str(source),
            "CONTAINER_ROOT": str(tmp_path / "container"),
            "KERNEL_MODULE_TYPE": module_type,
            "PRECOMPILED_DIR": str(tmp_path / "precompiled"),
        }
    )
    return config, DriverSource.from_config(config)


def choose(config: Config, source: DriverSource) -> FlavourChoice:
    return choose_flavour(config, source, nvidia_gpus(config))


def test_the_gpu_ids_are_read_from_sysfs(tmp_path: Path) -> None:
    config, _ = node(tmp_path, V100, A100)
    pci_device(config.host_root, "0000:10:00.0", 0x1234, vendor=0x8086)  # not NVIDIA
    pci_device(config.host_root, "0000:11:00.0", 0x22BC, pci_class=0x040300)  # NVIDIA audio
    found = nvidia_gpus(config)
    assert [(g.address, g.device, g.subsystem_device) for g in found] == [
        ("0000:01:00.0", V100, 0x1212),
        ("0000:02:00.0", A100, 0x1212),
    ]


@pytest.mark.parametrize(
    ("devices", "version", "flavour", "why"),
    [
        # Volta: listed without kernelopen.
        ((V100,), "535.261.03", Flavour.PROPRIETARY, "Tesla V100-PCIE-16GB cannot run the open"),
        ((V100,), "570.195.03", Flavour.PROPRIETARY, "Tesla V100-PCIE-16GB cannot run the open"),
        # Pascal likewise.
        ((P100,), "570.195.03", Flavour.PROPRIETARY, "Tesla P100-PCIE-16GB cannot run the open"),
        # The T4 is not in 535.261.03's list: unknown, so not open.
        ((T4,), "570.195.03", Flavour.PROPRIETARY, "10de:1eb8) is not listed"),
        # Every GPU can run open: the branch decides (open from 560).
        ((A100,), "535.261.03", Flavour.PROPRIETARY, "branch 535 defaults to proprietary"),
        ((A100, H100), "570.195.03", Flavour.OPEN, "branch 570 defaults to open"),
        ((H100,), "535.261.03", Flavour.PROPRIETARY, "branch 535 defaults to proprietary"),
        # Grace Hopper takes open on every branch.
        ((GH200,), "535.261.03", Flavour.OPEN, "NVIDIA GH200 120GB: Grace Hopper"),
        # A mix of old and new: proprietary.
        ((A100, V100), "570.195.03", Flavour.PROPRIETARY, "V100-PCIE-16GB cannot run the open"),
        # A Kepler GPU no flavour of this branch drives does not decide.
        ((GTX680, A100), "570.195.03", Flavour.OPEN, "GeForce GTX 680: only an older"),
    ],
)
def test_auto_takes_the_flavour_the_gpus_need(
    tmp_path: Path, devices: tuple[int, ...], version: str, flavour: Flavour, why: str
) -> None:
    config, source = node(tmp_path, *devices, version=version)
    choice = choose(config, source)
    assert (choice.flavour, choice.warning) == (flavour, None)
    assert why in choice.reason
    assert choice.gpu_list == source.root / "supported-gpus" / "supported-gpus.json"


def test_grace_hopper_beside_volta_has_no_flavour_exit_6(tmp_path: Path) -> None:
    config, source = node(tmp_path, GH200, V100)
    with pytest.raises(UnsupportedError, match="GH200 120GB need the open modules") as e:
        choose(config, source)
    assert e.value.exit_code == 6 and "V100-PCIE-16GB cannot run them" in e.value.message


def test_without_the_gpu_list_volta_never_gets_open_modules_and_it_is_said(
    tmp_path: Path,
) -> None:
    config, source = node(tmp_path, V100, version="570.195.03", gpu_list=None)
    choice = choose(config, source)
    assert choice.flavour is Flavour.PROPRIETARY and choice.gpu_list is None
    assert choice.warning is not None
    assert "supported-gpus.json is not in" in choice.warning
    assert str(source.root / "supported-gpus" / "supported-gpus.json") in choice.warning

    (config.host_root / "proc").mkdir()
    (config.host_root / "proc" / "version").write_text("Linux version 6.12.102-flatcar\n")
    report = status.collect(config)
    assert report["driver"]["flavour"] == "proprietary"
    assert report["driver"]["supported_gpus"] is None
    assert report["driver"]["warning"] == choice.warning
    text = status.render(report)
    assert "gpu list:     not found" in text and "warning:      The driver's supported" in text


def test_grace_hopper_gets_open_modules_even_without_the_list(tmp_path: Path) -> None:
    config, source = node(tmp_path, GH200, gpu_list=None)
    choice = choose(config, source)
    assert choice.flavour is Flavour.OPEN and choice.warning is not None


def test_no_gpu_takes_the_branch_default(tmp_path: Path) -> None:
    config, source = node(tmp_path, version="570.195.03")
    assert choose(config, source).flavour is Flavour.OPEN
    config, source = node(tmp_path / "old")
    assert choose(config, source).flavour is Flavour.PROPRIETARY


def test_debian_and_installed_run_places_of_the_list_are_found(tmp_path: Path) -> None:
    config, source = node(tmp_path, V100, version="570.195.03", gpu_list=None)
    container = config.options.container_root
    debian = container / "usr/share/doc/nvidia-driver/supported-gpus.json.gz"
    debian.parent.mkdir(parents=True)
    debian.write_bytes(gzip.compress(LIST_535.read_bytes()))
    choice = choose(config, source)
    assert (choice.flavour, choice.gpu_list, choice.warning) == (Flavour.PROPRIETARY, debian, None)
    installed = container / "usr/share/doc/NVIDIA_GLX-1.0/supported-gpus/supported-gpus.json"
    installed.parent.mkdir(parents=True)
    shutil.copy(LIST_535, installed)
    assert choose(config, source).gpu_list == installed  # the .run's place comes first


def test_an_image_without_the_needed_flavour_is_exit_6(tmp_path: Path) -> None:
    config, source = node(tmp_path, V100, version="570.195.03", flavours=("kernel-open",))
    with pytest.raises(UnsupportedError, match="need the proprietary kernel modules"):
        choose(config, source)


def test_asking_for_open_on_volta_is_obeyed_with_a_warning(tmp_path: Path) -> None:
    config, source = node(tmp_path, V100, module_type="open")
    choice = choose(config, source)
    assert choice.flavour is Flavour.OPEN
    assert choice.warning is not None and "Tesla V100-PCIE-16GB" in choice.warning


def test_subsystem_ids_pick_their_own_entry(tmp_path: Path) -> None:
    listing = SupportedGpus.read(LIST_535)
    config, _ = node(tmp_path)
    pci_device(config.host_root, "0000:01:00.0", A100, subsystem=(0x10DE, 0x1450))
    pci_device(config.host_root, "0000:02:00.0", A100, subsystem=(0x10DE, 0x9999))
    pg509, sxm4 = nvidia_gpus(config)
    assert (c := listing.chip(pg509)) is not None and c.name == "NVIDIA A100-PG509-200"
    assert (c := listing.chip(sxm4)) is not None and c.name == "NVIDIA A100-SXM4-40GB"


def test_a_malformed_list_is_an_error_naming_it(tmp_path: Path) -> None:
    bad = tmp_path / "supported-gpus.json"
    bad.write_bytes(b"\xff\xfe not json")
    config, source = node(tmp_path / "n", V100, gpu_list=bad)
    with pytest.raises(DriverError, match=r"supported-gpus\.json is unreadable or malformed"):
        choose(config, source)
