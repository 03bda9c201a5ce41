"""The driver root, with real mounts: bound at /run/nvidia/driver, it appears on the host
through the shared /run/nvidia volume and leaves it again on the way out, without /sys'
submounts and without unmounting anything of the container's."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from nvdriver import mounts, rootfs
from nvdriver.config import Config
from nvdriver.errors import DriverError
from nvdriver.run import run
from tests.conftest import need


@pytest.fixture(autouse=True)
def _root() -> None:
    need(os.geteuid() == 0, "mounting needs root")


def mounted_under(directory: Path) -> list[str]:
    table = json.loads(run(["findmnt", "--json", "--list", "--output", "TARGET"]).stdout)
    return [m["target"] for m in table["filesystems"] if m["target"].startswith(str(directory))]


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[Path, Path, Config]]:
    """The host's /run/nvidia (a shared tmpfs), the container's view of it (a peer, as a
    Bidirectional volume gives), and a container root whose /sys has a submount."""
    host_run = tmp_path / "host-run-nvidia"
    container_root = tmp_path / "container"
    volume = tmp_path / "host-root" / "run" / "nvidia"
    for d in (host_run, container_root / "sys", volume):
        d.mkdir(parents=True)
    (container_root / "usr" / "bin").mkdir(parents=True)
    (container_root / "usr" / "bin" / "nvidia-smi").write_text("")
    try:
        run(["mount", "-t", "tmpfs", "host-run-nvidia", host_run])
        run(["mount", "--make-shared", host_run])
        run(["mount", "--bind", host_run, volume])
        run(["mount", "-t", "tmpfs", "fake-sysfs", container_root / "sys"])
        (container_root / "sys" / "kernel").mkdir()
        run(["mount", "-t", "tmpfs", "fake-securityfs", container_root / "sys" / "kernel"])
        (container_root / "sys" / "kernel" / "marker").touch()
        yield host_run, container_root, Config.from_env({"HOST_ROOT": str(tmp_path / "host-root")})
    finally:
        for d in (volume, host_run, container_root / "sys"):
            run(["umount", "--recursive", "--lazy", d], check=False)


def test_the_driver_root_appears_on_the_host_and_leaves_it(
    node: tuple[Path, Path, Config],
) -> None:
    host_run, container_root, config = node
    with rootfs.exposed_root(config, container_root) as target:
        assert target == config.host(rootfs.DRIVER_ROOT)
        assert (host_run / "driver" / "usr" / "bin" / "nvidia-smi").exists()  # on the host
        assert mounts.is_mount_point(host_run / "driver")
        # /sys was made unbindable: its submounts are not bound along.
        assert not (target / "sys" / "kernel" / "marker").exists()
    assert mounted_under(host_run) == [str(host_run)]  # gone from the host too
    assert mounted_under(config.host("/run/nvidia")) == [str(config.host("/run/nvidia"))]
    assert (container_root / "sys" / "kernel" / "marker").exists()  # the container's intact


def test_a_failure_inside_unmounts_it_everywhere(node: tuple[Path, Path, Config]) -> None:
    host_run, container_root, config = node
    with pytest.raises(RuntimeError), rootfs.exposed_root(config, container_root):
        raise RuntimeError("nvidia-smi failed")
    assert mounted_under(host_run) == [str(host_run)]


def test_remove_stale_unmounts_what_a_killed_run_left(node: tuple[Path, Path, Config]) -> None:
    host_run, container_root, config = node
    target = config.host(rootfs.DRIVER_ROOT)
    target.mkdir()
    run(["mount", "--rbind", container_root, target])  # as a SIGKILLed init leaves it
    assert mounts.is_mount_point(host_run / "driver")
    rootfs.remove_stale(config)
    assert mounted_under(host_run) == [str(host_run)]


def test_a_refused_mount_change_is_a_clear_error(tmp_path: Path) -> None:
    """The system calls' errors read as the tools' would: what failed and why (a directory
    that is no mount point has no propagation to change; a missing root cannot be bound)."""
    with pytest.raises(DriverError, match=r"Could not make .* private: Invalid argument"):
        mounts.set_propagation(tmp_path, "private")
    missing = pytest.raises(DriverError, match=r"Could not bind .*: No such file or directory")
    with missing, mounts.propagated_bind(tmp_path / "missing", tmp_path / "target"):
        pass
    assert mounted_under(tmp_path) == []
