"""`update --sign KEY` in a container: a KEY on the container's own layer is refused
(exit 2), as `docker commit` would keep the private key in the image; a mounted KEY,
or any KEY outside a container, is accepted. The mount table is synthetic mountinfo
text as Docker makes it; the container markers are files under a temp root."""

from __future__ import annotations

from pathlib import Path

import pytest

from nvdriver import cli, host, mounts
from nvdriver.driver import sign
from nvdriver.errors import DriverError, ExitCode, UsageError
from tests.standin.tree import make_standin_source

# /proc/self/mountinfo of `docker run --privileged -v /srv/keys/k.pem:/keys/k.pem:ro
# -v /var/lib/nvidia-driver:/var/lib/nvidia-driver` (overlay root, file bind, dir bind).
DOCKER_MOUNTINFO = """\
1021 865 0:60 / / rw,relatime master:313 - overlay overlay rw,lowerdir=/l/A:/l/B,upperdir=/x/up
1022 1021 0:63 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw
1023 1021 0:64 / /dev rw,nosuid - tmpfs tmpfs rw,size=65536k,mode=755
1030 1021 254:1 /srv/keys/k.pem /keys/k.pem ro,relatime - ext4 /dev/vda1 rw
1031 1021 254:1 /var/lib/nvidia-driver /var/lib/nvidia-driver rw,relatime - ext4 /dev/vda1 rw
1032 1021 254:1 /srv/with\\040space /mnt/with\\040space rw,relatime - ext4 /dev/vda1 rw
1033 1021 254:1 /var/lib/docker/containers/c/hosts /etc/hosts rw,relatime - ext4 /dev/vda1 rw
"""


def mountinfo(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mountinfo"
    path.write_text(text)
    return path


def test_mountinfo_lines_are_read_with_their_escapes(tmp_path: Path) -> None:
    table = mounts.mount_table(mountinfo(tmp_path, DOCKER_MOUNTINFO))
    assert [m.target for m in table][:2] == [Path("/"), Path("/proc")]
    assert table[0].source == "overlay"
    assert (
        table[3].target == Path("/keys/k.pem") and table[3].source == "/dev/vda1[/srv/keys/k.pem]"
    )
    assert table[5].target == Path("/mnt/with space")


def test_the_mount_holding_a_path_is_the_deepest_and_the_last_mounted(tmp_path: Path) -> None:
    table = mounts.mount_table(
        mountinfo(
            tmp_path,
            DOCKER_MOUNTINFO + "1040 1031 0:70 / /var/lib/nvidia-driver rw - tmpfs over rw\n",
        )
    )
    holding = mounts.mount_holding(Path("/var/lib/nvidia-driver/precompiled/x"), table)
    assert holding is not None and holding.source == "over"  # it covers the bind
    assert mounts.mount_holding(Path("/root/key.pem"), table) == table[0]


@pytest.mark.parametrize(
    ("key", "on_layer"),
    [
        ("/keys/k.pem", False),  # the file bind mount
        ("/var/lib/nvidia-driver/k.pem", False),  # a mounted directory
        ("/mnt/with space/k.pem", False),
        ("/root/k.pem", True),  # copied into the container: its own layer
        ("/tmp/k.pem", True),
        ("/keys", True),  # not under the bind of /keys/k.pem
    ],
)
def test_a_key_is_on_the_layer_when_the_root_mount_holds_it(
    key: str, on_layer: bool, tmp_path: Path
) -> None:
    assert sign.on_root_mount(Path(key), mountinfo(tmp_path, DOCKER_MOUNTINFO)) is on_layer


def test_a_link_to_the_layer_from_a_mount_counts_where_it_points(tmp_path: Path) -> None:
    """The kernel opens what the link points at: a link on a mount to a file on the root
    mount is a key on the layer."""
    link = tmp_path / "mounted" / "k.pem"
    link.parent.mkdir()
    link.symlink_to(tmp_path / "layer" / "k.pem")
    table = mountinfo(
        tmp_path,
        "1 0 0:1 / / rw - overlay overlay rw\n"
        f"2 1 0:2 / {tmp_path / 'mounted'} rw - tmpfs tmpfs rw\n",
    )
    assert sign.on_root_mount(link, table)
    assert not sign.on_root_mount(tmp_path / "mounted" / "other.pem", table)


@pytest.fixture
def container(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Markers and mount table of a Docker container, under a temp root: `layer/` is on
    the root mount, `mounted/` a volume; a key file in each."""
    (tmp_path / ".dockerenv").touch()
    monkeypatch.setattr(
        host, "CONTAINER_MARKERS", (tmp_path / ".dockerenv", tmp_path / "run/.containerenv")
    )
    for d in ("layer", "mounted"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "k.pem").write_text("a private key\n")
    table = DOCKER_MOUNTINFO + f"1050 1021 0:80 / {tmp_path / 'mounted'} ro - tmpfs keys ro\n"
    (tmp_path / "mountinfo").write_text(table)
    monkeypatch.setattr(sign, "MOUNTINFO", tmp_path / "mountinfo")
    return tmp_path


def test_in_a_container_a_key_on_its_layer_is_refused_with_why(container: Path) -> None:
    with pytest.raises(UsageError) as info:
        sign.check_key(container / "layer" / "k.pem")
    assert int(info.value.exit_code) == ExitCode.USAGE
    assert "docker commit" in info.value.message and "private key" in info.value.message
    assert info.value.hint is not None and ":ro" in info.value.hint
    sign.check_key(container / "mounted" / "k.pem")  # mounted: accepted


def test_podmans_marker_counts_as_a_container(container: Path) -> None:
    (container / ".dockerenv").unlink()
    (container / "run").mkdir()
    (container / "run/.containerenv").touch()
    with pytest.raises(UsageError):
        sign.check_key(container / "layer" / "k.pem")


def test_outside_a_container_any_key_is_accepted(container: Path) -> None:
    (container / ".dockerenv").unlink()
    sign.check_key(container / "layer" / "k.pem")
    with pytest.raises(DriverError, match="does not exist"):  # but it must exist
        sign.check_key(container / "layer" / "missing.pem")


def test_update_refuses_it_with_exit_2_before_building(
    container: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the CLI: nothing is fetched or built (the cache stays empty)."""
    for name, value in {
        "DRIVER_VERSION": "535.999.01",
        "NVIDIA_DRIVER_SOURCE": str(
            make_standin_source(tmp_path / "src", version="535.999.01", flavours=("kernel",))
        ),
        "NVIDIA_DRIVER_CACHE": str(tmp_path / "cache"),
        "PRECOMPILED_DIR": str(tmp_path / "precompiled"),
        "HOST_ROOT": str(tmp_path / "host"),
    }.items():
        monkeypatch.setenv(name, value)
    key = str(container / "layer" / "k.pem")
    assert cli.main(["update", "--kernel-source", str(tmp_path), "--sign", key]) == 2
    assert not (tmp_path / "cache").exists()
    assert not (tmp_path / "precompiled").exists()
