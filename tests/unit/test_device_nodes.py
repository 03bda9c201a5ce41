"""The device nodes and their /dev/char links, made after a load and removed after an unload
(no kernel needed: the driver's /proc and /sys files are written into a HOST_ROOT tree, as
the loaded driver shows them; there is no GPU here, so its files stand in for one)."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest

from nvdriver.errors import BusyError
from nvdriver.kmod.devices import make_device_nodes
from nvdriver.kmod.unloading import unload, unload_new
from tests.unit.test_kmod import config_for, driver_proc, fake_module, write_rmmod

CAPS_MAJOR = 237
# /proc/driver/nvidia/capabilities/mig/{config,monitor} as nv-caps.c writes them: the
# minor, the mode in decimal (0400 and 0444), whether the node may be made.
MIG_CONFIG = "DeviceFileMinor: 1\nDeviceFileMode: 256\nDeviceFileModify: 1\n"
MIG_MONITOR = "DeviceFileMinor: 2\nDeviceFileMode: 292\nDeviceFileModify: 1\n"


def loaded_driver(root: Path, *, mig: tuple[str, str] | None = (MIG_CONFIG, MIG_MONITOR)) -> None:
    """A loaded driver with one GPU (minor 0), nvidia-uvm, nvidia-modeset and, unless
    `mig` is None, MIG's capability files and the nvidia-caps major."""
    driver_proc(root, 0)
    fake_module(root, "nvidia", 2, ("nvidia_modeset", "nvidia_uvm"))
    fake_module(root, "nvidia_uvm", 0)
    fake_module(root, "nvidia_modeset", 0)
    (root / "dev").mkdir(exist_ok=True)
    if mig is not None:
        devices = root / "proc" / "devices"
        devices.write_text(devices.read_text().replace("\n\n", f"\n{CAPS_MAJOR} nvidia-caps\n\n"))
        caps = root / "proc" / "driver" / "nvidia" / "capabilities" / "mig"
        caps.mkdir(parents=True)
        (caps / "config").write_text(mig[0])
        (caps / "monitor").write_text(mig[1])


def char(path: Path) -> tuple[int, int, int, int, int]:
    """A character device's major, minor, permission bits, owner and group."""
    st = path.lstat()
    assert stat.S_ISCHR(st.st_mode), path
    return (
        os.major(st.st_rdev),
        os.minor(st.st_rdev),
        stat.S_IMODE(st.st_mode),
        st.st_uid,
        st.st_gid,
    )


def links(dev: Path) -> dict[str, str]:
    """/dev/char: each link's name and target."""
    return {p.name: os.readlink(p) for p in (dev / "char").iterdir() if p.is_symlink()}


def everything(dev: Path) -> set[str]:
    return {str(p.relative_to(dev)) for p in dev.rglob("*")}


def test_every_node_made_has_its_dev_char_link_relative_as_udev_makes_them(
    tmp_path: Path,
) -> None:
    loaded_driver(tmp_path)
    dev = tmp_path / "dev"
    made = make_device_nodes(config_for(tmp_path), ("NVreg_DeviceFileMode=0660",))
    assert {str(p.relative_to(dev)) for p in made} == {
        "nvidiactl",
        "nvidia0",
        "nvidia-modeset",
        "nvidia-uvm",
        "nvidia-uvm-tools",
        "nvidia-caps/nvidia-cap1",
        "nvidia-caps/nvidia-cap2",
    }
    assert links(dev) == {
        "195:255": "../nvidiactl",
        "195:0": "../nvidia0",
        "195:254": "../nvidia-modeset",
        "508:0": "../nvidia-uvm",
        "508:1": "../nvidia-uvm-tools",
        f"{CAPS_MAJOR}:1": "../nvidia-caps/nvidia-cap1",
        f"{CAPS_MAJOR}:2": "../nvidia-caps/nvidia-cap2",
    }
    for name in links(dev):  # each leads to the node of its numbers (what systemd reads)
        st = (dev / "char" / name).stat()
        assert f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}" == name
    assert char(dev / "nvidia-modeset") == (195, 254, 0o660, 0, 0)
    assert make_device_nodes(config_for(tmp_path), ()) == []  # all there already


def test_mig_capability_nodes_take_the_mode_the_driver_writes_and_stay_roots(
    tmp_path: Path,
) -> None:
    loaded_driver(tmp_path)
    dev = tmp_path / "dev"
    params = ("NVreg_DeviceFileMode=0660", "NVreg_DeviceFileUID=1000", "NVreg_DeviceFileGID=44")
    make_device_nodes(config_for(tmp_path), params)
    assert char(dev / "nvidia0") == (195, 0, 0o660, 1000, 44)
    # DeviceFileUID/GID are the GPU nodes' only (nv-reg.h); the capabilities are root's.
    assert char(dev / "nvidia-caps" / "nvidia-cap1") == (CAPS_MAJOR, 1, 0o400, 0, 0)
    assert char(dev / "nvidia-caps" / "nvidia-cap2") == (CAPS_MAJOR, 2, 0o444, 0, 0)
    assert stat.S_IMODE((dev / "nvidia-caps").stat().st_mode) == 0o755


def test_the_loaded_drivers_parameters_decide_over_the_file(tmp_path: Path) -> None:
    """A driver loaded before (a restart that keeps it) has the parameters it was loaded
    with; /proc/driver/nvidia/params shows them, in decimal."""
    loaded_driver(tmp_path, mig=None)
    (tmp_path / "proc" / "driver" / "nvidia" / "params").write_text(
        "ModifyDeviceFiles: 1\nDeviceFileUID: 0\nDeviceFileGID: 44\nDeviceFileMode: 432\n"
    )
    make_device_nodes(config_for(tmp_path), ("NVreg_DeviceFileMode=0666",))
    assert char(tmp_path / "dev" / "nvidia0") == (195, 0, 0o660, 0, 44)


def test_nodes_the_driver_may_not_make_are_not_made_but_others_nodes_are_linked(
    tmp_path: Path,
) -> None:
    monitor_unmodifiable = MIG_MONITOR.replace("DeviceFileModify: 1", "DeviceFileModify: 0")
    loaded_driver(tmp_path, mig=(MIG_CONFIG, monitor_unmodifiable))
    dev = tmp_path / "dev"
    os.mknod(dev / "nvidia0", stat.S_IFCHR | 0o600, os.makedev(195, 0))  # the admin's
    made = make_device_nodes(config_for(tmp_path), ("NVreg_ModifyDeviceFiles=0",))
    # ModifyDeviceFiles=0 covers the GPU nodes; the capability's own line covers it.
    assert [str(p.relative_to(dev)) for p in made] == ["nvidia-caps/nvidia-cap1"]
    assert not (dev / "nvidia-caps" / "nvidia-cap2").exists()
    assert char(dev / "nvidia0") == (195, 0, 0o600, 0, 0)  # untouched
    assert links(dev) == {"195:0": "../nvidia0", f"{CAPS_MAJOR}:1": "../nvidia-caps/nvidia-cap1"}


def test_unload_removes_only_what_was_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loaded_driver(tmp_path)
    dev = tmp_path / "dev"
    (dev / "char").mkdir()
    # Someone else's: /dev/nvidiactl without a link, nvidia-modeset with its link, and a
    # link of another device.
    os.mknod(dev / "nvidiactl", stat.S_IFCHR | 0o666, os.makedev(195, 255))
    os.mknod(dev / "nvidia-modeset", stat.S_IFCHR | 0o666, os.makedev(195, 254))
    (dev / "char" / "195:254").symlink_to("../nvidia-modeset")
    (dev / "char" / "1:3").symlink_to("../null")
    theirs = everything(dev)
    config = config_for(tmp_path)
    make_device_nodes(config, ())
    assert links(dev)["195:255"] == "../nvidiactl"  # their node, our link
    # Later someone makes /dev/nvidia0 again: tmpfs gives it our node's inode number
    # again, and another ctime (the kernel's clock ticks in jiffies: wait for one).
    time.sleep(0.05)
    (dev / "nvidia0").unlink()
    os.mknod(dev / "nvidia0", stat.S_IFCHR | 0o666, os.makedev(195, 0))

    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    write_rmmod(tmp_path, tmp_path)
    assert unload(config) == ["nvidia_modeset", "nvidia_uvm", "nvidia"]
    assert everything(dev) == theirs | {"nvidia0"}
    assert not (tmp_path / "run" / "nvidia" / "device-nodes.json").exists()


def test_unload_keeps_what_a_still_loaded_module_needs_and_a_later_unload_removes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A driver held by a process keeps everything; nodes of a driver someone else
    unloaded go at the next `unload`."""
    loaded_driver(tmp_path, mig=None)
    dev = tmp_path / "dev"
    config = config_for(tmp_path)
    make_device_nodes(config, ())
    made = everything(dev)
    fake_module(tmp_path, "nvidia_standin_holder", 0)
    (tmp_path / "sys" / "module" / "nvidia" / "refcnt").write_text("3\n")
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    write_rmmod(tmp_path, tmp_path)
    with pytest.raises(BusyError, match="in use"):
        unload(config)
    assert everything(dev) == made

    for module in ("nvidia_modeset", "nvidia_uvm", "nvidia"):  # an rmmod not ours
        (tmp_path / "sys" / "module" / module / "refcnt").unlink()
    assert unload(config) == []
    assert everything(dev) == set()


def test_a_node_of_an_earlier_load_with_other_numbers_is_made_again_anothers_is_left(
    tmp_path: Path,
) -> None:
    """nvidia-uvm's major is dynamic: after a reload it can differ from our node's."""
    loaded_driver(tmp_path, mig=None)
    dev = tmp_path / "dev"
    config = config_for(tmp_path)
    os.mknod(dev / "nvidia0", stat.S_IFCHR | 0o666, os.makedev(195, 7))  # someone else's
    make_device_nodes(config, ())
    devices = tmp_path / "proc" / "devices"
    devices.write_text(devices.read_text().replace("508 nvidia-uvm", "507 nvidia-uvm"))
    made = make_device_nodes(config, ())
    assert sorted(p.name for p in made) == ["nvidia-uvm", "nvidia-uvm-tools"]
    assert char(dev / "nvidia-uvm")[:2] == (507, 0)
    assert char(dev / "nvidia0")[:2] == (195, 7)  # not ours: left, with a warning
    assert links(dev) == {
        "195:255": "../nvidiactl",
        "195:254": "../nvidia-modeset",
        "507:0": "../nvidia-uvm",
        "507:1": "../nvidia-uvm-tools",
    }
    record = json.loads((tmp_path / "run" / "nvidia" / "device-nodes.json").read_text())
    assert {e["path"]: e["detail"] for e in record if e["kind"] == "node"} == {
        "nvidiactl": "195:255",
        "nvidia-modeset": "195:254",
        "nvidia-uvm": "507:0",
        "nvidia-uvm-tools": "507:1",
    }


def test_undoing_a_load_removes_the_nodes_of_the_modules_it_took_out_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nvidia was loaded before (kept), nvidia-uvm and nvidia-modeset by the load undone."""
    loaded_driver(tmp_path, mig=None)
    (tmp_path / "proc" / "modules").write_text("")
    dev = tmp_path / "dev"
    config = config_for(tmp_path)
    make_device_nodes(config, ())
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    write_rmmod(tmp_path, tmp_path)
    unload_new(config, {"nvidia"}, set())
    assert everything(dev) == {"nvidiactl", "nvidia0", "char", "char/195:255", "char/195:0"}
