"""Which Flatcar release ships a kernel.

For the running kernel the host says so itself (its os-release, mounted into the
container at /host-etc/os-release): several releases share one kernel (an LTS
and a stable one, say), and only the host knows which of them it runs. The
container's own /etc/os-release is the image's (Debian, say): it is read only
when the host's is not mounted, which is right outside a container and is
warned about inside one. For another kernel (`update --kernel X`) the
channel's releases feed is searched and the newest release with that kernel
wins, whatever the order of the feed's keys. A release named by its version
(`update --flatcar-version V`) and the channel's next release (`update --next`)
come with the kernel the feed lists for them (`NamedRelease`): which kernel tree of
the developer container to build against, before anything is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from nvdriver.config import BOARDS, CHANNELS, FLATCAR_VERSION_RE, Config
from nvdriver.errors import DriverError, UnsupportedError, UsageError
from nvdriver.host import in_container

if TYPE_CHECKING:  # download (http.client, ssl, email) is imported only to read the feed
    from nvdriver.flatcar.download import RetryPolicy

log = logging.getLogger(__name__)

VERSION_RE = FLATCAR_VERSION_RE
# The minor number of a Flatcar version names its channel: 3975.2.1 is stable.
CHANNEL_OF_MINOR = {"0": "alpha", "1": "beta", "2": "stable", "3": "lts"}
# Host files, each at its documented mount first (host /etc/os-release at
# /host-etc/os-release, host /etc/flatcar at /host-etc/flatcar, host /usr/share/flatcar
# at /host-usr/share/flatcar), then where it is when the program runs on the host.
HOST_OS_RELEASE = "/host-etc/os-release"
OS_RELEASE = "/etc/os-release"
FLATCAR_RELEASE = ("/host-usr/share/flatcar/release", "/usr/share/flatcar/release")
UPDATE_CONF = (
    "/host-etc/flatcar/update.conf",
    "/host-usr/share/flatcar/update.conf",
    "/etc/flatcar/update.conf",
    "/usr/share/flatcar/update.conf",
)


@dataclasses.dataclass(frozen=True)
class FlatcarRelease:
    """A Flatcar release: where its artifacts live is `{channel}/{board}/{version}`."""

    version: str
    channel: str
    board: str

    def __post_init__(self) -> None:
        if not VERSION_RE.match(self.version):
            raise UsageError(
                f"Flatcar version {self.version!r} is malformed: expected a version like 4230.2.3."
            )
        if self.channel not in CHANNELS:
            raise UsageError(
                f"Flatcar channel {self.channel!r} is not valid: "
                f"expected one of {', '.join(CHANNELS)}."
            )
        if self.board not in BOARDS:
            raise UsageError(
                f"Flatcar board {self.board!r} is not valid: expected one of {', '.join(BOARDS)}."
            )

    @classmethod
    def from_version(
        cls, version: str, board: str, *, channel: str | None = None
    ) -> FlatcarRelease:
        """The release `version`; its channel is `channel`, else the one its minor number names."""
        implied = channel_of_version(version)
        if channel is not None and implied is not None and channel != implied:
            log.warning(
                "Flatcar %s is a %s release but the channel is set to %s: using %s",
                version,
                implied,
                channel,
                channel,
            )
        chosen = channel or implied
        if chosen is None:
            raise UsageError(
                f"The channel of Flatcar {version} cannot be told from its version.",
                hint="Set FLATCAR_CHANNEL to stable, beta, alpha or lts.",
            )
        return cls(version=version, channel=chosen, board=board)


def channel_of_version(version: str) -> str | None:
    """The channel a version's minor number names (0 alpha, 1 beta, 2 stable, 3 lts)."""
    parts = version.split(".")
    return CHANNEL_OF_MINOR.get(parts[1]) if len(parts) == 3 else None


def version_key(version: str) -> tuple[int, ...]:
    """Sort key for versions: numeric, so that 4230.2.10 is newer than 4230.2.9."""
    return tuple(int(p) for p in version.split("."))


def parse_env_file(text: str) -> dict[str, str]:
    """`KEY=value` lines (os-release, update.conf, version.txt): comments and quotes removed."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def _env_file(path: Path) -> dict[str, str] | None:
    """The values of an env file; None when it does not exist, an error when it is unreadable."""
    try:
        return parse_env_file(path.read_text(errors="replace"))
    except FileNotFoundError:
        return None
    except OSError as e:
        raise DriverError(f"Could not read {path}: {e.strerror}.") from e


def _read_env_file(path: Path) -> dict[str, str]:
    return _env_file(path) or {}


@dataclasses.dataclass(frozen=True)
class OsRelease:
    """The host's os-release: which file was read (None: neither exists), and its values."""

    path: Path | None
    values: Mapping[str, str]

    @property
    def is_flatcar(self) -> bool:
        return self.values.get("ID") in ("flatcar", "coreos")


def host_os_release(config: Config) -> OsRelease:
    """The host's os-release: HOST_ROOT/host-etc/os-release, else HOST_ROOT/etc/os-release.

    Inside a container the second one is the image's own, which makes a Flatcar node look
    like another system: that is warned about, naming the mount that is missing.
    """
    mounted = config.host(HOST_OS_RELEASE)
    values = _env_file(mounted)
    if values is not None:
        return OsRelease(mounted, values)
    own = config.host(OS_RELEASE)
    if in_container():
        log.warning(
            "The host's os-release is not mounted at %s; reading %s, which in a container "
            "is the image's: the host's Flatcar release cannot be told from it. Mount it: "
            "-v /etc/os-release:%s:ro",
            HOST_OS_RELEASE,
            own,
            HOST_OS_RELEASE,
        )
    values = _env_file(own)
    return OsRelease(None if values is None else own, values or {})


def host_version(config: Config, os_release: OsRelease | None = None) -> str | None:
    """The host's Flatcar version (os-release VERSION, else FLATCAR_RELEASE_VERSION of
    Flatcar's release file), or None when the host is not Flatcar. `os_release`: the one
    the caller read already (`host_os_release`)."""
    osr = os_release or host_os_release(config)
    path = osr.path
    version = osr.values.get("VERSION") if osr.is_flatcar else None
    for candidate in FLATCAR_RELEASE if version is None else ():
        path = config.host(candidate)
        version = _read_env_file(path).get("FLATCAR_RELEASE_VERSION")
        if version is not None:
            break
    if version is not None and not VERSION_RE.match(version):
        raise DriverError(
            f"{path} names Flatcar version {version!r}: expected a version like 4230.2.3.",
            hint="Use --kernel to look the release up in the releases feed instead.",
        )
    return version


def host_channel(config: Config) -> str | None:
    """The channel the host updates from (`GROUP=` of update.conf) if it is a known one."""
    for path in UPDATE_CONF:
        group = _read_env_file(config.host(path)).get("GROUP")
        if group is None:
            continue
        if group in CHANNELS:
            return group
        log.info("%s: GROUP=%s is not a public channel; ignoring it", config.host(path), group)
    return None


def channel(config: Config) -> str:
    """FLATCAR_CHANNEL, else the host's update group, else stable."""
    return config.flatcar_channel or host_channel(config) or "stable"


def feed_url(config: Config, channel: str) -> str:
    return config.releases_feed.replace("{channel}", channel)


def release_base_url(config: Config, release: FlatcarRelease) -> str:
    """Where the release's artifacts live: `{release_url}/{board}/{version}`."""
    base = config.release_url.replace("{channel}", release.channel).rstrip("/")
    return f"{base}/{release.board}/{release.version}"


def load_feed(source: str, *, policy: RetryPolicy | None = None) -> dict[str, object]:
    """The releases feed: a JSON object keyed by version. Any other shape is an error."""
    from nvdriver.flatcar.download import DEFAULT_RETRY, UrlNotFound, read_url

    try:
        data = read_url(source, policy=policy or DEFAULT_RETRY)
    except UrlNotFound as e:
        raise DriverError(
            f"The Flatcar releases feed {source} does not exist.",
            hint="Check FLATCAR_RELEASES_FEED and FLATCAR_CHANNEL.",
        ) from e
    try:
        feed = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise DriverError(
            f"The Flatcar releases feed {source} is not valid JSON: {e}.",
            hint="Check FLATCAR_RELEASES_FEED: it must name the releases JSON of a channel.",
        ) from e
    if not isinstance(feed, dict):
        raise DriverError(
            f"The Flatcar releases feed {source} is not a JSON object keyed by version.",
            hint="Check FLATCAR_RELEASES_FEED: it must name the releases JSON of a channel.",
        )
    return feed


def _feed_kernel(source: str, version: str, entry: object) -> str | None:
    """`major_software.kernel[0]` of a feed entry; None if the entry lists no kernel."""
    if not isinstance(entry, Mapping):
        raise DriverError(
            f"The Flatcar releases feed {source} is malformed: "
            f"the entry of {version} is not an object."
        )
    software = entry.get("major_software", {})
    kernels = software.get("kernel", []) if isinstance(software, Mapping) else None
    if not isinstance(kernels, list) or not all(isinstance(k, str) for k in kernels):
        raise DriverError(
            f"The Flatcar releases feed {source} is malformed: "
            f"major_software.kernel of {version} is not a list of versions."
        )
    return kernels[0] if kernels else None


def upstream_kernel(kernel: str) -> str:
    """The upstream version of a Flatcar kernel release: `6.12.102-flatcar` → `6.12.102`."""
    return kernel.split("-", 1)[0]


def release_from_feed(
    feed: Mapping[str, object], kernel: str, *, channel: str, board: str, source: str
) -> FlatcarRelease:
    """The newest release of `feed` that ships `kernel`."""
    wanted = upstream_kernel(kernel)
    matches = [v for v, k in _feed_releases(source, feed).items() if k == wanted]
    if not matches:
        raise UnsupportedError(
            f"No Flatcar {channel} release ships kernel {kernel} "
            f"(looked for {wanted} in {source}).",
            hint="Give the release of a Flatcar kernel, set FLATCAR_CHANNEL to the channel "
            "that ships it, or wait until the feed lists a new release.",
        )
    newest = max(matches, key=version_key)
    if len(matches) > 1:
        log.info(
            "Flatcar releases with kernel %s: %s; using %s", wanted, ", ".join(matches), newest
        )
    return FlatcarRelease(version=newest, channel=channel, board=board)


def running_kernel() -> str:
    return platform.release()


def resolve(
    config: Config, kernel: str | None = None, *, policy: RetryPolicy | None = None
) -> FlatcarRelease:
    """The Flatcar release that ships `kernel` (default: the running one).

    The running kernel's release is the host's own version when the host is
    Flatcar; any other kernel is looked up in the channel's releases feed.
    """
    running = running_kernel()
    kernel = kernel or config.kernel or running
    if kernel == running:
        version = host_version(config)
        if version is not None:
            explicit = config.flatcar_channel
            if explicit is None and channel_of_version(version) is None:
                explicit = channel(config)
            release = FlatcarRelease.from_version(version, config.flatcar_board, channel=explicit)
            log.info("Kernel %s is the host's: Flatcar %s (%s)", kernel, version, release.channel)
            return release
        log.info("The host is not Flatcar: looking kernel %s up in the releases feed", kernel)
    chan = channel(config)
    source = feed_url(config, chan)
    release = release_from_feed(
        load_feed(source, policy=policy),
        kernel,
        channel=chan,
        board=config.flatcar_board,
        source=source,
    )
    log.info("Kernel %s ships with Flatcar %s (%s)", kernel, release.version, release.channel)
    return release


@dataclasses.dataclass(frozen=True)
class NamedRelease:
    """A release to build for, and the upstream kernel version the feed lists for it
    (`6.12.54`); None when the feed does not know the release or lists no kernel: then
    its developer container's only kernel tree decides."""

    release: FlatcarRelease
    kernel: str | None


def _feed_releases(source: str, feed: Mapping[str, object]) -> dict[str, str | None]:
    """Each release version of the feed with its kernel (None: the entry lists none)."""
    releases = {}
    for version, entry in feed.items():
        if version == "current":
            continue
        if not VERSION_RE.match(version):
            raise DriverError(
                f"The Flatcar releases feed {source} is malformed: "
                f"{version!r} is not a release version."
            )
        releases[version] = _feed_kernel(source, version, entry)
    return releases


def release_by_version(
    config: Config, version: str, *, policy: RetryPolicy | None = None
) -> NamedRelease:
    """Flatcar `version` (its channel: FLATCAR_CHANNEL, else the one its minor number
    names) and the kernel its channel's feed lists for it.

    A release the feed does not list is not refused here: its artifacts may still be
    published (an older release the feed dropped); the download says if they are not.
    """
    flatcar = FlatcarRelease.from_version(
        version, config.flatcar_board, channel=config.flatcar_channel
    )
    source = feed_url(config, flatcar.channel)
    kernels = _feed_releases(source, load_feed(source, policy=policy))
    kernel = kernels.get(version)
    if version not in kernels:
        _check_published(config, flatcar, source, policy)
        log.warning(
            "Flatcar %s is not in the %s releases feed %s: its developer container's "
            "kernel tree decides the kernel",
            version,
            flatcar.channel,
            source,
        )
    elif kernel is None:
        log.warning(
            "The releases feed %s lists no kernel for Flatcar %s: its developer "
            "container's kernel tree decides the kernel",
            source,
            version,
        )
    else:
        log.info("Flatcar %s (%s) ships kernel %s", version, flatcar.channel, kernel)
    return NamedRelease(flatcar, kernel)


def _check_published(
    config: Config, flatcar: FlatcarRelease, source: str, policy: RetryPolicy | None
) -> None:
    """A release the feed does not list must at least be published (its version.txt):
    a typo in the version is "no such release" (exit 6), not a failed verification."""
    from nvdriver.flatcar.download import DEFAULT_RETRY, UrlNotFound, read_url

    url = f"{release_base_url(config, flatcar)}/version.txt"
    try:
        read_url(url, policy=policy or DEFAULT_RETRY)
    except UrlNotFound as e:
        raise UnsupportedError(
            f"There is no Flatcar {flatcar.channel} release {flatcar.version}: the releases "
            f"feed {source} does not list it and {url} does not exist.",
            hint="Check the version (and FLATCAR_CHANNEL), or use --next for the channel's "
            "next release.",
        ) from e


def next_release(config: Config, *, policy: RetryPolicy | None = None) -> NamedRelease | None:
    """The release this node boots into after its next update: the newest of the host's
    channel (FLATCAR_CHANNEL, else update.conf's GROUP, else the host version's own)
    that is newer than the host's version and whose kernel is not the running one's
    (the same kernel needs no new package). None when the feed has no such release.
    """
    osr = host_os_release(config)
    running = host_version(config, osr)
    if running is None:
        raise UsageError(
            "--next needs the host's Flatcar release, and this host is not Flatcar "
            f"(no Flatcar VERSION in {osr.path or config.host(HOST_OS_RELEASE)}).",
            hint="Mount the host's /etc/os-release at /host-etc/os-release, or name the "
            "release with --flatcar-version.",
        )
    chan = config.flatcar_channel or host_channel(config) or channel_of_version(running)
    chan = chan or "stable"
    source = feed_url(config, chan)
    kernels = _feed_releases(source, load_feed(source, policy=policy))
    current = upstream_kernel(running_kernel())
    newer = [
        v
        for v, k in kernels.items()
        if version_key(v) > version_key(running) and k is not None and k != current
    ]
    if not newer:
        log.info(
            "No Flatcar %s release newer than the host's %s with a kernel other than %s in %s",
            chan,
            running,
            current,
            source,
        )
        return None
    version = max(newer, key=version_key)
    kernel = kernels[version]
    log.info(
        "The next Flatcar %s release after %s is %s, with kernel %s", chan, running, version, kernel
    )
    return NamedRelease(
        FlatcarRelease(version=version, channel=chan, board=config.flatcar_board), kernel
    )
