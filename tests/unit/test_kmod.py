"""Module parameters, the refcount rule, the kernel log and load errors (no kernel needed)."""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Sequence
from pathlib import Path

import pytest

from nvdriver.config import Config
from nvdriver.errors import BusyError, DriverError, NoGpuError, UnsupportedError, UsageError
from nvdriver.host import PciDevice, nvidia_gpus
from nvdriver.kmod.devices import make_device_nodes
from nvdriver.kmod.firmware import set_firmware_path
from nvdriver.kmod.kmsg import KernelLog, KmsgRecord, parse_kmsg_record
from nvdriver.kmod.loaded import LoadedModule, loaded_flavour, loaded_modules
from nvdriver.kmod.params import param_value, read_params
from nvdriver.kmod.refusal import load_error
from nvdriver.kmod.tree import ModuleTree, wanted_modules
from nvdriver.kmod.unloading import busy_reasons, unload
from tests.sysfs import A100, GTX680, V100, gpus


def config_for(root: Path) -> Config:
    return Config.from_env({"HOST_ROOT": str(root)})


def fake_module(
    root: Path,
    name: str,
    refcnt: int,
    holders: tuple[str, ...] = (),
    version: str | None = "535.999.01",
) -> None:
    d = root / "sys" / "module" / name
    (d / "holders").mkdir(parents=True)
    (d / "refcnt").write_text(f"{refcnt}\n")
    for h in holders:
        (d / "holders" / h).mkdir()
    if version is not None:
        (d / "version").write_text(version + "\n")
        (d / "srcversion").write_text("ABCDEF0123456789\n")


def mod(name: str, refcnt: int, *holders: str) -> LoadedModule:
    return LoadedModule(name, refcnt, holders, None, None)


# --- parameters ----------------------------------------------------------------


def test_params_from_key_value_lines_and_options_lines(tmp_path: Path) -> None:
    (tmp_path / "nvidia.conf").write_text(
        "# comment\n"
        "\n"
        "NVreg_EnableGpuFirmware=0\n"
        'options nvidia NVreg_RegistryDwords="RMFoo=1;Bar=2" NVreg_DeviceFileMode=0660\n'
        '  NVreg_Note="with blanks"  \n'
        "NVreg_Flag\n"
    )
    assert read_params(tmp_path, "nvidia") == (
        "NVreg_EnableGpuFirmware=0",
        "NVreg_RegistryDwords=RMFoo=1;Bar=2",
        "NVreg_DeviceFileMode=0660",
        'NVreg_Note="with blanks"',
        "NVreg_Flag",
    )


def test_params_options_line_may_name_the_module_with_underscores(tmp_path: Path) -> None:
    (tmp_path / "nvidia-drm.conf").write_text("options nvidia_drm modeset=1 fbdev=1\n")
    assert read_params(tmp_path, "nvidia-drm") == ("modeset=1", "fbdev=1")


def test_no_params_file_means_no_params(tmp_path: Path) -> None:
    assert read_params(tmp_path, "nvidia-uvm") == ()


@pytest.mark.parametrize(
    "text",
    [
        "options nvidia-uvm uvm_perf_prefetch_enable=0\n",  # another module's line
        "options\n",
        "bad-key=1\n",
        "=1\n",
        'NVreg_X="unterminated\n',
    ],
)
def test_malformed_params_are_a_usage_error_naming_file_and_line(tmp_path: Path, text: str) -> None:
    (tmp_path / "nvidia.conf").write_text("NVreg_Ok=1\n" + text)
    with pytest.raises(UsageError, match=r"nvidia\.conf line 2"):
        read_params(tmp_path, "nvidia")


def test_param_value_takes_the_last_one_unquoted() -> None:
    params = ("NVreg_EnableGpuFirmware=1", 'NVreg_EnableGpuFirmware="0"', "other=2")
    assert param_value(params, "NVreg_EnableGpuFirmware") == "0"
    assert param_value(params, "missing") is None


# --- the refcount rule ------------------------------------------------------------


def test_references_from_the_drivers_own_modules_do_not_make_it_busy() -> None:
    loaded = [
        mod("nvidia", 2, "nvidia_modeset", "nvidia_uvm"),
        mod("nvidia_uvm", 0),
        mod("nvidia_modeset", 1, "nvidia_drm"),
        mod("nvidia_drm", 0),
    ]
    assert busy_reasons(loaded) == []


@pytest.mark.parametrize(
    ("loaded", "culprit"),
    [
        # a process has /dev/nvidiactl open
        ([mod("nvidia", 3, "nvidia_modeset", "nvidia_uvm"), mod("nvidia_uvm", 0)], "nvidia has 3"),
        # a foreign module uses nvidia
        (
            [mod("nvidia", 2, "nvidia_uvm", "nvidia_standin_holder"), mod("nvidia_uvm", 0)],
            "used by nvidia_standin_holder",
        ),
        # a CUDA process holds nvidia-uvm
        ([mod("nvidia", 1, "nvidia_uvm"), mod("nvidia_uvm", 1)], "nvidia_uvm has 1"),
        # a display client holds nvidia-drm
        ([mod("nvidia_modeset", 1, "nvidia_drm"), mod("nvidia_drm", 2)], "nvidia_drm has 2"),
        # nvidia-drm is held by nvidia-modeset's user but not loaded with it: counts as a user
        ([mod("nvidia_modeset", 1, "nvidia_drm")], "nvidia_modeset has 1"),
    ],
)
def test_any_other_reference_makes_the_driver_busy(
    loaded: list[LoadedModule], culprit: str
) -> None:
    reasons = busy_reasons(loaded)
    assert len(reasons) == 1 and culprit in reasons[0]


def write_rmmod(bin_dir: Path, root: Path) -> Path:
    """A stand-in rmmod that records its arguments and removes the fake sysfs entries."""
    calls = bin_dir / "rmmod.calls"
    script = bin_dir / "rmmod"
    script.write_text(
        f'#!/bin/sh\necho "$*" >>{calls}\nfor m in "$@"; do rm -rf {root}/sys/module/$m; done\n'
    )
    script.chmod(0o755)
    return calls


def test_unload_refuses_and_touches_nothing_when_in_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_module(tmp_path, "nvidia", 3, ("nvidia_modeset", "nvidia_uvm"))
    fake_module(tmp_path, "nvidia_uvm", 0)
    fake_module(tmp_path, "nvidia_modeset", 0)
    calls = write_rmmod(tmp_path, tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    with pytest.raises(BusyError, match="nothing was unloaded") as e:
        unload(config_for(tmp_path))
    assert e.value.exit_code == 3
    assert not calls.exists()


def test_unload_removes_all_in_one_rmmod_users_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_module(tmp_path, "nvidia", 2, ("nvidia_modeset", "nvidia_uvm"))
    fake_module(tmp_path, "nvidia_uvm", 0)
    fake_module(tmp_path, "nvidia_modeset", 1, ("nvidia_drm",))
    fake_module(tmp_path, "nvidia_drm", 0)
    calls = write_rmmod(tmp_path, tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    names = unload(config_for(tmp_path))
    assert names == ["nvidia_drm", "nvidia_modeset", "nvidia_uvm", "nvidia"]
    assert calls.read_text() == "nvidia_drm nvidia_modeset nvidia_uvm nvidia\n"
    assert unload(config_for(tmp_path)) == []  # nothing loaded: nothing to do


def test_loaded_modules_skip_built_in_and_absent_ones(tmp_path: Path) -> None:
    fake_module(tmp_path, "nvidia", 1, ("nvidia_uvm",))
    fake_module(tmp_path, "nvidia_uvm", 0)
    (tmp_path / "sys" / "module" / "nvidia_drm" / "parameters").mkdir(parents=True)  # no refcnt
    loaded = loaded_modules(config_for(tmp_path))
    assert [(m.name, m.refcnt, m.holders) for m in loaded] == [
        ("nvidia", 1, ("nvidia_uvm",)),
        ("nvidia_uvm", 0, ()),
    ]
    assert loaded[0].version == "535.999.01"


def test_loaded_flavour_from_the_driver_version_line(tmp_path: Path) -> None:
    config = config_for(tmp_path)
    assert loaded_flavour(config) is None
    proc = tmp_path / "proc" / "driver" / "nvidia"
    proc.mkdir(parents=True)
    (proc / "version").write_text(
        "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  535.261.03  Release Build\n"
        "GCC version:  gcc version 12.2.0\n"
    )
    assert loaded_flavour(config) == "open"
    (proc / "version").write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.261.03\n")
    assert loaded_flavour(config) == "proprietary"


def test_an_unused_gdrdrv_goes_first_with_the_driver(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_module(tmp_path, "nvidia", 2, ("gdrdrv", "nvidia_uvm"))
    fake_module(tmp_path, "nvidia_uvm", 0)
    fake_module(tmp_path, "gdrdrv", 0, version=None)
    calls = write_rmmod(tmp_path, tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert unload(config_for(tmp_path)) == ["gdrdrv", "nvidia_uvm", "nvidia"]
    assert calls.read_text() == "gdrdrv nvidia_uvm nvidia\n"


def test_a_gdrdrv_in_use_keeps_the_driver_busy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_module(tmp_path, "nvidia", 1, ("gdrdrv",))
    fake_module(tmp_path, "gdrdrv", 1, version=None)  # a process has /dev/gdrdrv open
    calls = write_rmmod(tmp_path, tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    with pytest.raises(BusyError, match="gdrdrv has 1 reference") as e:
        unload(config_for(tmp_path))
    assert e.value.exit_code == 3 and not calls.exists()


# --- device nodes ------------------------------------------------------------------

PROC_DEVICES = (
    "Character devices:\n  1 mem\n195 nvidia-frontend\n508 nvidia-uvm\n\n"
    "Block devices:\n  7 loop\n509 nvidia-uvm-block-not\n"
)


def driver_proc(root: Path, *minors: int) -> None:
    """/proc as the loaded driver shows it: its GPUs' minors and nvidia-uvm's major."""
    (root / "proc").mkdir(exist_ok=True)
    (root / "proc" / "devices").write_text(PROC_DEVICES)
    for n, minor in enumerate(minors):
        info = root / "proc" / "driver" / "nvidia" / "gpus" / f"0000:0{n + 1}:00.0"
        info.mkdir(parents=True)
        (info / "information").write_text(
            f"Model: \t\t Tesla T4\nBus Location: \t 0000:0{n + 1}:00.0\n"
            f"Device Minor: \t {minor}\nGPU Excluded:\t No\n"
        )


def test_device_nodes_are_made_with_the_numbers_and_mode_of_the_driver(tmp_path: Path) -> None:
    driver_proc(tmp_path, 0, 1)
    (tmp_path / "dev").mkdir()
    made = make_device_nodes(config_for(tmp_path), ("NVreg_DeviceFileMode=0660",))
    nodes = {p.name: os.lstat(p) for p in made}
    assert {n: (os.major(s.st_rdev), os.minor(s.st_rdev)) for n, s in nodes.items()} == {
        "nvidiactl": (195, 255),
        "nvidia0": (195, 0),
        "nvidia1": (195, 1),
        "nvidia-uvm": (508, 0),
        "nvidia-uvm-tools": (508, 1),
    }
    assert all(stat.S_ISCHR(s.st_mode) and stat.S_IMODE(s.st_mode) == 0o660 for s in nodes.values())
    assert make_device_nodes(config_for(tmp_path), ()) == []  # there already


def test_no_device_nodes_when_the_driver_may_not_touch_them(tmp_path: Path) -> None:
    driver_proc(tmp_path, 0)
    (tmp_path / "dev").mkdir()
    assert make_device_nodes(config_for(tmp_path), ("NVreg_ModifyDeviceFiles=0",)) == []
    assert list((tmp_path / "dev").iterdir()) == []


def test_a_dev_that_cannot_take_nodes_is_logged_not_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    driver_proc(tmp_path)
    (tmp_path / "dev").write_text("not a directory\n")
    assert make_device_nodes(config_for(tmp_path), ()) == []
    assert "Cannot make" in caplog.text


# --- which modules -----------------------------------------------------------------


def tree_with(tmp_path: Path, *modules: str) -> ModuleTree:
    tree = ModuleTree(tmp_path / "opt", "6.1.0-56-amd64")
    tree.directory.mkdir(parents=True)
    for m in modules:
        tree.path(m).write_bytes(b"")
    return tree


def test_drm_only_when_configured_peermem_only_for_rdma(tmp_path: Path) -> None:
    tree = tree_with(
        tmp_path, "nvidia", "nvidia-uvm", "nvidia-modeset", "nvidia-drm", "nvidia-peermem"
    )
    assert wanted_modules(tree, {}, peermem=False) == [
        "nvidia",
        "nvidia-uvm",
        "nvidia-modeset",
    ]
    assert wanted_modules(tree, {"nvidia-drm": ("modeset=1",)}, peermem=True) == [
        "nvidia",
        "nvidia-uvm",
        "nvidia-modeset",
        "nvidia-drm",
        "nvidia-peermem",
    ]


def test_a_tree_without_nvidia_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DriverError, match="lacks nvidia"):
        wanted_modules(tree_with(tmp_path, "nvidia-uvm"), {}, peermem=False)


# --- the kernel log and load errors --------------------------------------------------


def test_kmsg_records_are_parsed_with_escapes_and_continuation_lines() -> None:
    record = parse_kmsg_record(
        b"6,1234,5678901,-;NVRM: No NVIDIA GPU found.\\x0a\n SUBSYSTEM=pci\n DEVICE=+pci:0\n"
    )
    assert record == KmsgRecord(level=6, sequence=1234, message="NVRM: No NVIDIA GPU found.\n")
    continued = parse_kmsg_record(b"30,7,1,c;nvidia: loading out-of-tree module\n")
    assert continued is not None and continued.level == 6  # facility 3, level 6
    assert parse_kmsg_record(b"garbage") is None


def test_kernel_log_reads_only_what_comes_after_opening(tmp_path: Path) -> None:
    fifo = tmp_path / "kmsg"
    os.mkfifo(fifo)
    writer = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # keeps the fifo open
    try:
        with KernelLog(fifo) as klog:
            assert klog.read() == []
            os.write(writer, b"3,10,100,-;NVRM: No NVIDIA GPU found.\n")
            assert klog.read() == ["NVRM: No NVIDIA GPU found."]
            assert klog.read() == []
    finally:
        os.close(writer)
    assert KernelLog(tmp_path / "missing").read() == []  # unreadable: no quote, no crash


ENODEV = "modprobe: ERROR: could not insert 'nvidia': No such device\n"


def kmsg(*printks: str) -> list[str]:
    """The messages KernelLog reads for these printk texts: one /dev/kmsg record each,
    newlines inside escaped as the kernel does (NVIDIA logs several lines per call)."""
    records = []
    for n, text in enumerate(printks):
        escaped = text.rstrip("\n").replace("\n", "\\x0a")
        record = parse_kmsg_record(f"3,{n},0,c;{escaped}\n".encode())
        assert record is not None
        records.append(record.message)
    return records


# What 535.261.03 logs (kernel-open/nvidia/nv.c, src/nvidia/.../osapi.c), as the stand-in does.
NOT_PROBED = kmsg(
    "NVRM: The NVIDIA probe routine was not called for 1 device(s).\n",
    "NVRM: This can occur when a driver such as: \nNVRM: nouveau, rivafb, nvidiafb or rivatv "
    "\nNVRM: was loaded and obtained ownership of the NVIDIA device(s).\n",
    "NVRM: No NVIDIA devices probed.\n",
)
NO_GSP = kmsg(
    "NVRM: The NVIDIA GPU 0000:01:00.0 (PCI ID: 10de:1db4)\n"
    "NVRM: installed in this system is not supported by open\n"
    "NVRM: nvidia.ko because it does not include the required GPU\n"
    "NVRM: System Processor (GSP).\n"
    "NVRM: Please see the 'Open Linux Kernel Modules' and 'GSP\n",
    "NVRM: The NVIDIA probe routine failed for 1 device(s).\n",
    "NVRM: None of the NVIDIA devices were initialized.\n",
)
RELEASE = kmsg(
    "NVRM: The NVIDIA GPU 0000:01:00.0 (PCI ID: 10de:1180)\n"
    "NVRM: installed in this system is not supported by the\n"
    "NVRM: NVIDIA 535.261.03 driver release.\n",
    "NVRM: None of the NVIDIA devices were initialized.\n",
)


def host_gpus(tmp_path: Path, *devices: int, driver: str | None = None) -> list[PciDevice]:
    """The GPUs sysfs would show (synthetic: no GPU exists here), as the driver reads them."""
    gpus(tmp_path, *devices, driver=driver)
    return nvidia_gpus(config_for(tmp_path))


def test_no_gpu_on_the_bus_is_exit_7_quoting_the_kernel(tmp_path: Path) -> None:
    error = load_error(
        "nvidia",
        ENODEV,
        ["nvidia: module verification failed", "NVRM: No NVIDIA GPU found."],
        host_gpus(tmp_path),
    )
    assert isinstance(error, NoGpuError) and error.exit_code == 7
    assert "NVRM: No NVIDIA GPU found." in error.message
    assert "Nothing was left loaded" in error.message
    # The kernel log unreadable: sysfs alone says there is no GPU.
    assert load_error("nvidia", ENODEV, [], []).exit_code == 7


@pytest.mark.parametrize(
    ("driver", "advice"),
    [("vfio-pci", "/sys/bus/pci/drivers/vfio-pci/unbind"), ("nouveau", "blacklist=nouveau")],
)
def test_a_gpu_held_by_another_driver_is_exit_1_naming_device_and_driver(
    tmp_path: Path, driver: str, advice: str
) -> None:
    gpus_now = host_gpus(tmp_path, A100, driver=driver)
    for kernel_log in (NOT_PROBED, []):  # with and without the kernel's words
        error = load_error("nvidia", ENODEV, kernel_log, gpus_now)
        assert type(error) is DriverError and error.exit_code == 1
        assert f"0000:01:00.0 (PCI ID 10de:20b0) is bound to {driver}" in error.message
        assert error.hint is not None and advice in error.hint
        assert "0000:01:00.0" in error.hint or driver == "nouveau"


def test_enodev_with_a_free_gpu_and_no_kernel_words_is_not_no_gpu(tmp_path: Path) -> None:
    error = load_error("nvidia", ENODEV, [], host_gpus(tmp_path, A100))
    assert error.exit_code == 1 and "0000:01:00.0 (PCI ID 10de:20b0)" in error.message


def test_open_modules_on_a_gpu_without_gsp_is_exit_6(tmp_path: Path) -> None:
    error = load_error("nvidia", ENODEV, NO_GSP, host_gpus(tmp_path, V100))
    assert isinstance(error, UnsupportedError) and error.exit_code == 6
    assert "cannot drive 0000:01:00.0 (PCI ID 10de:1db4)" in error.message
    assert error.hint is not None and "KERNEL_MODULE_TYPE=proprietary" in error.hint


def test_a_gpu_this_release_does_not_support_is_exit_6(tmp_path: Path) -> None:
    kepler = host_gpus(tmp_path, GTX680)
    error = load_error("nvidia", ENODEV, RELEASE, kepler)
    assert error.exit_code == 6
    assert "535.261.03 does not support 0000:01:00.0 (PCI ID 10de:1180)" in error.message
    # The proprietary driver ignores a legacy GPU and says there is none: not exit 7 either.
    ignored = load_error("nvidia", ENODEV, ["NVRM: No NVIDIA GPU found."], kepler)
    assert ignored.exit_code == 6 and "10de:1180" in ignored.message


def test_other_load_failures_quote_modprobe_and_the_kernel() -> None:
    error = load_error(
        "nvidia-uvm",
        "modprobe: ERROR: could not insert 'nvidia_uvm': Unknown symbol in module\n",
        ["nvidia_uvm: Unknown symbol nvUvmInterfaceFoo (err -2)"],
        [],
    )
    assert not isinstance(error, NoGpuError) and error.exit_code == 1
    assert "Unknown symbol in module" in error.message
    assert "nvUvmInterfaceFoo" in error.message


# --- firmware ------------------------------------------------------------------------


def firmware_param(root: Path, value: str) -> Path:
    param = root / "sys" / "module" / "firmware_class" / "parameters" / "path"
    param.parent.mkdir(parents=True)
    param.write_text(value)
    return param


def test_firmware_path_is_set_only_when_empty(tmp_path: Path) -> None:
    param = firmware_param(tmp_path, "\n")
    set_firmware_path(config_for(tmp_path), "/run/nvidia/driver/lib/firmware", ())
    assert param.read_text() == "/run/nvidia/driver/lib/firmware"
    param.write_text("/host/firmware\n")
    set_firmware_path(config_for(tmp_path), "/run/nvidia/driver/lib/firmware", ())
    assert param.read_text() == "/host/firmware\n"


def test_firmware_path_is_left_alone_when_gpu_firmware_is_off(tmp_path: Path) -> None:
    param = firmware_param(tmp_path, "")
    set_firmware_path(
        config_for(tmp_path), "/run/nvidia/driver/lib/firmware", ("NVreg_EnableGpuFirmware=0",)
    )
    assert param.read_text() == ""


def module_with_modinfo(path: Path, fields: Sequence[str]) -> None:
    """A minimal relocatable ELF64 object at `path` whose `.modinfo` holds `fields`
    ("key=value"), as a linked module carries them."""
    modinfo = b"".join(f.encode() + b"\0" for f in fields)
    shstrtab = b"\0.modinfo\0.shstrtab\0"
    shoff = 64 + len(modinfo) + len(shstrtab)
    header = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header += struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 3, 2)
    table = ((1, 1, 64, len(modinfo)), (10, 3, 64 + len(modinfo), len(shstrtab)))
    sections = bytes(64) + b"".join(
        struct.pack("<IIQQQQIIQQ", name, kind, 0, 0, offset, size, 0, 0, 1, 0)
        for name, kind, offset, size in table
    )
    path.write_bytes(header + modinfo + shstrtab + sections)


def test_host_dependencies_are_depends_and_softdeps_outside_the_tree(tmp_path: Path) -> None:
    """Read from the modules' `.modinfo` (no `modinfo` runs)."""
    tree = tree_with(tmp_path, "nvidia", "nvidia-modeset", "nvidia-drm")
    fields = {
        "nvidia": ["depends=drm,video,wmi", "softdep=pre: ecdh_generic,ecdsa_generic"],
        "nvidia-modeset": ["license=NVIDIA", "depends=nvidia"],
        "nvidia-drm": ["depends=drm_kms_helper,nvidia-modeset,drm,nvidia", "softdep="],
    }
    for module, values in fields.items():
        module_with_modinfo(tree.path(module), values)
    depends, softdeps = tree.host_dependencies(["nvidia", "nvidia-modeset", "nvidia-drm"])
    assert depends == ["drm", "video", "wmi", "drm_kms_helper"]
    assert softdeps == ["ecdh_generic", "ecdsa_generic"]


def test_a_damaged_module_in_the_tree_is_a_clear_error(tmp_path: Path) -> None:
    tree = tree_with(tmp_path, "nvidia", "nvidia-uvm")  # empty files
    tree.path("nvidia-uvm").write_bytes(b"\x7fELF" + bytes(60))
    for module in ("nvidia", "nvidia-uvm"):
        with pytest.raises(DriverError, match="Cannot read the module information of"):
            tree.fields(module)
