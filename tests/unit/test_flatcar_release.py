"""Which Flatcar release ships a kernel: the host's own version, else the channel's feed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nvdriver import host as host_module
from nvdriver.config import Config
from nvdriver.errors import DriverError, ExitCode, UnsupportedError, UsageError
from nvdriver.flatcar import release
from nvdriver.flatcar.release import FlatcarRelease, resolve

RUNNING = "6.12.102-flatcar"


def _entry(kernel: str | None, channel: str = "stable") -> dict[str, object]:
    software: dict[str, list[str]] = {"containerd": ["2.1.5"], "systemd": ["257"]}
    if kernel is not None:
        software["kernel"] = [kernel]
    return {
        "channel": channel,
        "architectures": ["amd64", "arm64"],
        "release_date": "2026-08-13 15:48:35 +0000",
        "major_software": software,
        "release_notes": "...",
    }


@pytest.fixture
def host(tmp_path: Path) -> Path:
    root = tmp_path / "host"
    root.mkdir()
    return root


@pytest.fixture(autouse=True)
def running_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(release, "running_kernel", lambda: RUNNING)


def _config(host: Path, feed: Path | str, **env: str) -> Config:
    base = {
        "HOST_ROOT": str(host),
        "FLATCAR_RELEASES_FEED": str(feed),
        "FLATCAR_BOARD": "amd64-usr",
    }
    return Config.from_env({**base, **env})


def _write_feed(tmp_path: Path, channel: str, feed: object) -> Path:
    path = tmp_path / f"releases-{channel}.json"
    path.write_text(json.dumps(feed))
    return path


def _feed_template(tmp_path: Path) -> str:
    return str(tmp_path / "releases-{channel}.json")


def _write(host: Path, path: str, text: str) -> None:
    file = host / path.lstrip("/")
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(text)


def test_other_kernel_picks_the_newest_release_whatever_the_key_order(
    tmp_path: Path, host: Path
) -> None:
    feed = {
        "4230.2.9": _entry("6.12.50"),
        "current": _entry("6.12.50"),
        "4230.2.10": _entry("6.12.50"),
        "4230.2.2": _entry("6.12.50"),
        "4152.2.3": _entry("6.6.95"),
    }
    _write_feed(tmp_path, "stable", feed)
    config = _config(host, _feed_template(tmp_path))
    assert resolve(config, "6.12.50-flatcar") == FlatcarRelease("4230.2.10", "stable", "amd64-usr")


def test_current_key_is_skipped(tmp_path: Path, host: Path) -> None:
    feed = {"current": _entry("6.12.50"), "4230.2.1": _entry("6.6.95")}
    _write_feed(tmp_path, "stable", feed)
    with pytest.raises(UnsupportedError):
        resolve(_config(host, _feed_template(tmp_path)), "6.12.50-flatcar")


def test_no_match_is_unsupported_naming_kernel_channel_and_feed(tmp_path: Path, host: Path) -> None:
    feed_path = _write_feed(tmp_path, "beta", {"4300.1.0": _entry("6.12.60")})
    config = _config(host, _feed_template(tmp_path), FLATCAR_CHANNEL="beta")
    with pytest.raises(UnsupportedError) as info:
        resolve(config, "6.1.0-flatcar")
    assert int(info.value.exit_code) == 6
    message = str(info.value)
    assert "6.1.0-flatcar" in message
    assert "beta" in message
    assert str(feed_path) in message


def test_feed_channel_comes_from_update_conf(tmp_path: Path, host: Path) -> None:
    _write_feed(tmp_path, "lts", {"4081.3.5": _entry("6.6.95", "lts")})
    _write(
        host,
        "/host-etc/flatcar/update.conf",
        "SERVER=https://public.update.flatcar-linux.net\nGROUP=lts\n",
    )
    _write(host, "/etc/flatcar/update.conf", "GROUP=stable\n")  # not the host's: ignored
    config = _config(host, _feed_template(tmp_path))
    assert resolve(config, "6.6.95-flatcar") == FlatcarRelease("4081.3.5", "lts", "amd64-usr")


@pytest.mark.parametrize(
    "files",
    [
        # Flatcar's default (host /usr/share/flatcar) when the node's /etc/flatcar has none.
        {"/host-usr/share/flatcar/update.conf": "GROUP=beta\n", "/etc/os-release": "ID=x\n"},
        # The node's own choice beats the default.
        {
            "/host-etc/flatcar/update.conf": "GROUP=beta\n",
            "/host-usr/share/flatcar/update.conf": "GROUP=stable\n",
        },
        # Run on the host itself (no container): the host's paths as they are.
        {"/usr/share/flatcar/update.conf": "GROUP=beta\n"},
    ],
    ids=["host-usr-default", "host-etc-over-default", "outside-a-container"],
)
def test_update_conf_is_read_from_the_documented_mounts_first(
    tmp_path: Path, host: Path, files: dict[str, str]
) -> None:
    _write_feed(tmp_path, "beta", {"4300.1.1": _entry("6.12.60", "beta")})
    for path, text in files.items():
        _write(host, path, text)
    config = _config(host, _feed_template(tmp_path))
    assert resolve(config, "6.12.60-flatcar") == FlatcarRelease("4300.1.1", "beta", "amd64-usr")


def test_feed_channel_defaults_to_stable(tmp_path: Path, host: Path) -> None:
    _write_feed(tmp_path, "stable", {"4230.2.1": _entry("6.12.50")})
    config = _config(host, _feed_template(tmp_path))
    assert resolve(config, "6.12.50-flatcar").channel == "stable"


def test_explicit_channel_beats_update_conf(tmp_path: Path, host: Path) -> None:
    _write_feed(tmp_path, "alpha", {"4400.0.0": _entry("6.12.70", "alpha")})
    _write(host, "/host-etc/flatcar/update.conf", "GROUP=stable\n")
    config = _config(host, _feed_template(tmp_path), FLATCAR_CHANNEL="alpha")
    assert resolve(config, "6.12.70-flatcar") == FlatcarRelease("4400.0.0", "alpha", "amd64-usr")


def test_running_kernel_uses_the_hosts_own_version(tmp_path: Path, host: Path) -> None:
    # The feed would say otherwise: the host's version wins for the running kernel.
    _write_feed(tmp_path, "stable", {"4230.2.9": _entry("6.12.102")})
    _write(
        host,
        "/host-etc/os-release",
        'NAME="Flatcar Container Linux by Kinvolk"\nID=flatcar\nVERSION=4081.3.5\n',
    )
    config = _config(host, _feed_template(tmp_path))
    assert resolve(config) == FlatcarRelease("4081.3.5", "lts", "amd64-usr")
    assert resolve(config, RUNNING) == FlatcarRelease("4081.3.5", "lts", "amd64-usr")


def test_the_hosts_os_release_is_not_hidden_by_the_images(tmp_path: Path, host: Path) -> None:
    """In the container /etc/os-release is the image's (Debian): an LTS node read through
    it looked like no Flatcar at all, and its kernel was looked up in the stable feed
    (exit 6 for an LTS kernel, or a stable release that shares the kernel)."""
    _write_feed(tmp_path, "stable", {"4230.2.9": _entry("6.12.102")})
    _write(host, "/host-etc/os-release", "ID=flatcar\nVERSION=4081.3.5\n")
    _write(host, "/etc/os-release", 'ID=debian\nVERSION="12 (bookworm)"\n')
    assert resolve(_config(host, _feed_template(tmp_path))) == FlatcarRelease(
        "4081.3.5", "lts", "amd64-usr"
    )


@pytest.fixture
def in_container(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run as in a container: a /.dockerenv (container-own: the constant is patched)."""
    marker = tmp_path / ".dockerenv"
    marker.touch()
    monkeypatch.setattr(host_module, "CONTAINER_MARKERS", (marker,))


@pytest.fixture
def on_the_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host_module, "CONTAINER_MARKERS", (tmp_path / "no-marker",))


def test_without_the_mount_etc_os_release_is_read_quietly_on_the_host(
    host: Path, on_the_host: None, caplog: pytest.LogCaptureFixture
) -> None:
    _write(host, "/etc/os-release", "ID=flatcar\nVERSION=4081.3.5\n")
    assert resolve(_config(host, "/nonexistent/{channel}.json")).version == "4081.3.5"
    assert "not mounted" not in caplog.text


def test_without_the_mount_a_container_warns_naming_it(
    tmp_path: Path, host: Path, in_container: None, caplog: pytest.LogCaptureFixture
) -> None:
    _write(host, "/etc/os-release", "ID=debian\nVERSION=12\n")
    _write_feed(tmp_path, "stable", {"4230.2.9": _entry("6.12.102")})
    assert resolve(_config(host, _feed_template(tmp_path))).version == "4230.2.9"
    assert "The host's os-release is not mounted at /host-etc/os-release" in caplog.text
    assert "-v /etc/os-release:/host-etc/os-release:ro" in caplog.text


@pytest.mark.parametrize("path", ["/host-usr/share/flatcar/release", "/usr/share/flatcar/release"])
def test_running_kernel_version_from_flatcars_release_file(host: Path, path: str) -> None:
    """Without a Flatcar os-release (the image's own, say): Flatcar's release file, at
    its mount, else where it is on the host itself."""
    _write(host, "/etc/os-release", "ID=debian\n")
    _write(host, path, "FLATCAR_RELEASE_VERSION=4230.2.3\nFLATCAR_RELEASE_BOARD=amd64-usr\n")
    config = _config(host, "/nonexistent/{channel}.json")
    assert resolve(config) == FlatcarRelease("4230.2.3", "stable", "amd64-usr")


def test_explicit_channel_overrides_the_version_digit(host: Path) -> None:
    _write(host, "/host-etc/os-release", "ID=flatcar\nVERSION=4230.2.3\n")
    config = _config(host, "/nonexistent/{channel}.json", FLATCAR_CHANNEL="beta")
    assert resolve(config).channel == "beta"


def test_non_flatcar_host_falls_back_to_the_feed(tmp_path: Path, host: Path) -> None:
    _write(host, "/host-etc/os-release", "ID=debian\nVERSION=12\n")
    _write_feed(tmp_path, "stable", {"4230.2.9": _entry("6.12.102")})
    config = _config(host, _feed_template(tmp_path))
    assert resolve(config).version == "4230.2.9"


def test_malformed_host_version_is_a_clear_error(host: Path) -> None:
    _write(host, "/host-etc/os-release", "ID=flatcar\nVERSION=latest\n")
    with pytest.raises(DriverError, match=r"os-release.*'latest'"):
        resolve(_config(host, "/nonexistent/{channel}.json"))


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"4230.2.1": "text"}', "entry of 4230.2.1 is not an object"),
        ('{"4230.2.1": {"major_software": {"kernel": "6.12.1"}}}', "not a list"),
        ('{"latest": {}}', "'latest' is not a release version"),
    ],
)
def test_malformed_feed_is_a_clear_error_naming_it(
    tmp_path: Path, host: Path, content: str, match: str
) -> None:
    feed = tmp_path / "releases-stable.json"
    feed.write_text(content)
    with pytest.raises(DriverError, match=match) as info:
        resolve(_config(host, _feed_template(tmp_path)), "6.12.1-flatcar")
    assert str(feed) in str(info.value)
    assert info.value.exit_code == ExitCode.FAILED


def test_missing_feed_file_is_a_clear_error(tmp_path: Path, host: Path) -> None:
    with pytest.raises(DriverError, match="does not exist") as info:
        resolve(_config(host, _feed_template(tmp_path)), "6.12.1-flatcar")
    assert "releases-stable.json" in str(info.value)


def test_entries_without_a_kernel_are_skipped(tmp_path: Path, host: Path) -> None:
    _write_feed(tmp_path, "stable", {"4230.2.1": _entry(None), "4230.2.2": _entry("6.12.1")})
    assert resolve(_config(host, _feed_template(tmp_path)), "6.12.1-flatcar").version == "4230.2.2"


@pytest.mark.parametrize(
    ("version", "channel"),
    [("4400.0.0", "alpha"), ("4372.1.0", "beta"), ("4230.2.3", "stable"), ("4081.3.5", "lts")],
)
def test_version_minor_digit_names_the_channel(version: str, channel: str) -> None:
    assert FlatcarRelease.from_version(version, "arm64-usr").channel == channel


def test_release_validates_its_fields() -> None:
    with pytest.raises(UsageError):
        FlatcarRelease("4230.2", "stable", "amd64-usr")
    with pytest.raises(UsageError):
        FlatcarRelease("4230.2.3", "edge", "amd64-usr")
    with pytest.raises(UsageError):
        FlatcarRelease("4230.2.3", "stable", "x86_64")


def test_version_sort_is_numeric() -> None:
    assert max(["4230.2.9", "4230.2.10", "999.9.9"], key=release.version_key) == "4230.2.10"


def test_env_file_parsing_strips_quotes_and_comments() -> None:
    text = "# comment\nNAME=\"Flatcar Container Linux\"\nVERSION='4230.2.3'\n\nBROKEN\nID=flatcar\n"
    assert release.parse_env_file(text) == {
        "NAME": "Flatcar Container Linux",
        "VERSION": "4230.2.3",
        "ID": "flatcar",
    }
