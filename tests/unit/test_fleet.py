"""Building ahead: a release named by its version, the channel's next release, the kernel
tree of a named release's developer container, the next-release record that `status`
shows, and the flags that name what to build for."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from nvdriver import fleet, status
from nvdriver.builder import _release_kernel_tree
from nvdriver.config import Config
from nvdriver.driver import package as pkg
from nvdriver.errors import DriverError, UnsupportedError, UsageError
from nvdriver.flatcar import release
from tests.conftest import run_tool
from tests.packaging import KERNEL, fake_build

RUNNING = "6.1.0-57-flatcar"  # what the host "runs" here (release.running_kernel patched)


def _entry(kernel: str | None) -> dict[str, object]:
    software = {"kernel": [kernel]} if kernel else {"systemd": ["257"]}
    return {"channel": "stable", "major_software": software}


FEED = {
    "current": _entry("6.12.54"),
    "4230.2.1": _entry("6.12.54"),
    "4152.2.2": _entry("6.1.0"),
    "4152.2.3": _entry("6.1.0"),
    "4152.2.10": _entry("6.1.0"),  # newer than the host, same kernel: nothing to build
    "4081.2.0": _entry("6.6.95"),
    "4199.2.0": _entry(None),  # no kernel listed: never the next release
}


@pytest.fixture(autouse=True)
def running_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(release, "running_kernel", lambda: RUNNING)


def _host(tmp_path: Path, version: str | None, group: str | None = None) -> Path:
    host = tmp_path / "host"
    (host / "host-etc" / "flatcar").mkdir(parents=True, exist_ok=True)
    if version is not None:
        (host / "host-etc" / "os-release").write_text(f"ID=flatcar\nVERSION={version}\n")
    if group is not None:
        (host / "host-etc" / "flatcar" / "update.conf").write_text(f"GROUP={group}\n")
    return host


def _config(tmp_path: Path, version: str | None, feed: object = FEED, **env: str) -> Config:
    for channel in ("stable", "beta"):
        (tmp_path / f"releases-{channel}.json").write_text(json.dumps(feed))
    base = {
        "HOST_ROOT": str(_host(tmp_path, version, env.pop("GROUP", None))),
        "FLATCAR_RELEASES_FEED": str(tmp_path / "releases-{channel}.json"),
        "FLATCAR_BOARD": "amd64-usr",
        "NVIDIA_DRIVER_CACHE": str(tmp_path / "cache"),
        "PRECOMPILED_DIR": str(tmp_path / "precompiled"),
        "NODE_PRECOMPILED_DIR": str(tmp_path / "node-store"),
    }
    return Config.from_env({**base, **env})


def test_a_named_release_comes_with_its_feeds_kernel(tmp_path: Path) -> None:
    named = release.release_by_version(_config(tmp_path, "4152.2.3"), "4230.2.1")
    assert named == release.NamedRelease(
        release.FlatcarRelease("4230.2.1", "stable", "amd64-usr"), "6.12.54"
    )


@pytest.mark.parametrize("version", ["4199.2.0", "4000.2.7"])
def test_a_release_without_a_kernel_in_the_feed_leaves_it_to_the_developer_container(
    tmp_path: Path, version: str, caplog: pytest.LogCaptureFixture
) -> None:
    published = tmp_path / "mirror" / "amd64-usr" / version
    published.mkdir(parents=True)
    (published / "version.txt").write_text(f"FLATCAR_VERSION={version}\n")
    config = _config(tmp_path, None, FLATCAR_RELEASE_URL=str(tmp_path / "mirror"))
    named = release.release_by_version(config, version)
    assert (named.release.version, named.kernel) == (version, None)
    assert "kernel tree decides" in caplog.text


def test_a_release_neither_in_the_feed_nor_published_is_unsupported(tmp_path: Path) -> None:
    config = _config(tmp_path, None, FLATCAR_RELEASE_URL=str(tmp_path / "mirror"))
    with pytest.raises(UnsupportedError) as e:
        release.release_by_version(config, "4000.2.7")
    assert "no Flatcar stable release 4000.2.7" in e.value.message
    assert str(tmp_path / "mirror" / "amd64-usr" / "4000.2.7" / "version.txt") in e.value.message


def test_next_is_the_newest_newer_release_with_another_kernel(tmp_path: Path) -> None:
    named = release.next_release(_config(tmp_path, "4152.2.3"))
    assert named is not None
    assert (named.release.version, named.release.channel, named.kernel) == (
        "4230.2.1",
        "stable",
        "6.12.54",
    )


def test_next_takes_the_channel_of_update_conf(tmp_path: Path) -> None:
    beta = {"4230.1.0": _entry("6.12.40"), "4152.1.9": _entry("6.1.0")}
    named = release.next_release(_config(tmp_path, "4152.2.3", beta, GROUP="beta"))
    assert named is not None and named.release == release.FlatcarRelease(
        "4230.1.0", "beta", "amd64-usr"
    )


def test_next_is_none_on_the_newest_release(tmp_path: Path) -> None:
    assert release.next_release(_config(tmp_path, "4230.2.1")) is None
    # Newer releases with the running kernel only: nothing to build either.
    same = {"4152.2.3": _entry("6.1.0"), "4152.2.10": _entry("6.1.0")}
    assert release.next_release(_config(tmp_path, "4152.2.3", same)) is None


def test_next_on_a_host_that_is_not_flatcar_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="host-etc/os-release"):
        release.next_release(_config(tmp_path, None))


def _tree(root: Path, kernel: str) -> None:
    output = root / "usr" / "src" / f"linux-headers-{kernel}"
    (output / "include").mkdir(parents=True)
    (output / "Makefile").write_text("# a kernel build tree\n")
    modules = root / "lib" / "modules" / kernel
    modules.mkdir(parents=True)
    (modules / "build").symlink_to(f"/usr/src/linux-headers-{kernel}")


def test_the_named_releases_tree_is_the_one_of_the_feeds_kernel(tmp_path: Path) -> None:
    _tree(tmp_path, "6.12.54-flatcar")
    _tree(tmp_path, "6.6.95-flatcar")
    (tmp_path / "lib" / "modules" / "6.12.54-old").mkdir()  # modules only, no tree
    tree = _release_kernel_tree(tmp_path, "6.12.54", "4230.2.1")
    assert tree.output == tmp_path / "usr" / "src" / "linux-headers-6.12.54-flatcar"


def test_without_a_feed_kernel_the_only_tree_is_taken(tmp_path: Path) -> None:
    _tree(tmp_path, "6.12.54-flatcar")
    tree = _release_kernel_tree(tmp_path, None, "4230.2.1")
    assert tree.output.name == "linux-headers-6.12.54-flatcar"


@pytest.mark.parametrize("kernel", [None, "6.12.99"])
def test_no_single_tree_is_a_clear_error_naming_them(tmp_path: Path, kernel: str | None) -> None:
    _tree(tmp_path, "6.12.54-flatcar")
    _tree(tmp_path, "6.6.95-flatcar")
    with pytest.raises(DriverError) as e:
        _release_kernel_tree(tmp_path, kernel, "4230.2.1")
    assert "6.12.54-flatcar, 6.6.95-flatcar" in e.value.message
    assert "4230.2.1" in e.value.message


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--flatcar-version", "4230.2.1", "--next"], "--flatcar-version and --next"),
        (["--next", "-k", "6.12.54-flatcar"], "--next and --kernel"),
        (["--flatcar-version", "4230.2.1", "--kernel-source", "/x"], "--kernel-source"),
        (["--next", "--emerge-sources"], "--next and --emerge-sources"),
    ],
)
def test_contradicting_targets_are_usage_errors_naming_both(argv: list[str], named: str) -> None:
    result = run_tool("update", *argv, env={"NVIDIA_DRIVER_CACHE": "/nonexistent"})
    assert result.returncode == 2, result.stderr
    assert named in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("version", ["4230.2", "4230.2.1-rc", "../4230.2.1"])
def test_a_malformed_flatcar_version_is_exit_2(version: str) -> None:
    result = run_tool("update", "--flatcar-version", version)
    assert result.returncode == 2
    assert f"--flatcar-version={version!r} is malformed" in result.stderr


def test_next_with_nothing_newer_exits_0_and_prints_nothing(tmp_path: Path) -> None:
    config = _config(tmp_path, "4230.2.1")
    env = {
        "HOST_ROOT": str(config.host_root),
        "FLATCAR_RELEASES_FEED": config.releases_feed,
        "NVIDIA_DRIVER_CACHE": str(config.cache_dir),
        "DRIVER_VERSION": "535.261.03",
    }
    result = run_tool("update", "--next", env=env)
    assert (result.returncode, result.stdout) == (0, ""), result.stderr
    assert "Nothing to build ahead" in result.stderr
    assert not (config.cache_dir / fleet.NEXT_RECORD).exists()


def test_status_shows_the_running_and_the_next_release_with_their_packages(
    tmp_path: Path,
) -> None:
    config = _config(tmp_path, "4152.2.3")
    host = config.host_root
    (host / "proc").mkdir()
    (host / "proc" / "version").write_text("Linux version x (b@h) #1 SMP\n")
    running = KERNEL._replace(release=os.uname().release)
    following = KERNEL._replace(release="6.12.54-flatcar")
    in_image = pkg.write_package(
        config.precompiled_dir, fake_build(tmp_path / "a", kernel=running), tag=None
    )
    built = pkg.write_package(
        config.node_precompiled_dir, fake_build(tmp_path / "b", kernel=following), tag=None
    )
    pulled = pkg.write_package(
        config.node_precompiled_dir, fake_build(tmp_path / "c", kernel=following), tag="p"
    )
    pulled_from = {"origin": "registry", "reference": "r.example/p@sha256:ab", "tag": "t"}
    fleet.write_origin(pulled.path, pulled_from)
    target = release.NamedRelease(
        release.FlatcarRelease("4230.2.1", "stable", "amd64-usr"), "6.12.54"
    )
    fleet.write_next(config, target, following)

    releases = status.collect(config)["releases"]
    assert releases["running"]["version"] == "4152.2.3"
    assert releases["running"]["kernel_release"] == running.release
    assert [(p["path"], p["store"], p["origin"]) for p in releases["running"]["packages"]] == [
        (str(in_image.path), "image", {"origin": "image"})
    ]
    following_release = releases["next"]
    assert {k: following_release[k] for k in ("version", "kernel", "kernel_release", "source")} == {
        "version": "4230.2.1",
        "kernel": "6.12.54",
        "kernel_release": "6.12.54-flatcar",
        "source": "feed",
    }
    assert sorted(
        (p["path"], p["origin"]["origin"]) for p in following_release["packages"]
    ) == sorted([(str(built.path), "built here"), (str(pulled.path), "registry")])
    assert releases["staged"] is None
    assert "next release: Flatcar 4230.2.1, kernel 6.12.54-flatcar, 2 package(s)" in (
        status.render(status.collect(config))
    )

    # After the reboot into 4230.2.1 the record is the running release, not the next.
    (host / "host-etc" / "os-release").write_text("ID=flatcar\nVERSION=4230.2.1\n")
    assert status.collect(config)["releases"]["next"] is None
