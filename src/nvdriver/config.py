"""Settings from the environment, then flags (docs/configuration.md), validated once.

The result is a frozen `Config`; nothing else reads `os.environ`. What a child process
gets of our environment is named here too (`child_environment`): a minimal one, so that
no setting and no secret (PRECOMPILED_REGISTRY_PASSWORD) reaches a tool by accident.

Every path the program uses is one of three kinds (docs: the container contract):

* the kernel's (/proc, /sys, /dev) and the host's, shared by a documented mount
  (/run/nvidia, /host-etc/os-release, /host-etc/flatcar, /host-usr/share/flatcar):
  built with `Config.host()`, under HOST_ROOT (default /; tests point it at a tree);
* the container's own root file system (the private module tree /opt/nvidia):
  built with `Config.own()`, under CONTAINER_ROOT, the root bound at
  /run/nvidia/driver (default /); never under HOST_ROOT;
* the node store, the cache, the image store and the driver source: settings
  (NODE_PRECOMPILED_DIR, NVIDIA_DRIVER_CACHE, PRECOMPILED_DIR, NVIDIA_DRIVER_SOURCE).

Paths that another program fixes (nvidia-persistenced's and nv-fabricmanager's pid
files, the resolver configuration a build copies) are container-own module constants
of the module that uses them (`daemons.PERSISTENCED_PID`, `fabric.FM_PID`,
`builder.RESOLV_CONF`); unit tests patch those.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, NamedTuple

from nvdriver.errors import UsageError
from nvdriver.pattern import Pattern

# Seconds each program may run before it is killed (run.py; NVIDIA_DRIVER_TIMEOUTS changes
# them). modprobe of nvidia on a node with many GPUs takes tens of seconds; rmmod and
# depmod take a second when healthy.
TIMEOUTS: dict[str, float] = {"modprobe": 300.0, "rmmod": 60.0, "depmod": 120.0, "ld": 300.0}

# What a child process gets of our environment, and nothing else (run.py starts every
# child with it): PATH, where the tools are (the image's; a test puts stand-ins first),
# and LC_ALL=C, so that what we parse or match in a tool's output ("No such device",
# `ld --version`) does not depend on the container's language. gpg needs no HOME: it is
# always given its own --homedir. A caller adds what one program needs, by these names:
CHILD_INHERITS = ("PATH",)
CHILD_FIXED = {"LC_ALL": "C"}
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# emerge in the developer container fetches sources: the proxies a node is given.
NETWORK = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")
# nvidia-smi (validate.py) searches the driver root's libraries, then ours.
LIBRARY_PATH = "LD_LIBRARY_PATH"
# A Docker credential helper (credhelper.py) asks its cloud: what their SDKs read (the
# home with their config files, their credentials and regions, the proxies), never ours.
CREDENTIAL_HELPER = ("HOME", "DOCKER_CONFIG", *NETWORK)
CREDENTIAL_HELPER_PREFIXES = ("AWS_", "GOOGLE_", "CLOUDSDK_", "AZURE_")


def process_environment() -> dict[str, str]:
    """Our whole environment, for `Config.from_env` (the CLI) and nothing else."""
    return dict(os.environ)


def child_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a child: CHILD_INHERITS of ours, CHILD_FIXED, then `extra` (what
    that one program needs, named by the caller; it may still set its own LC_ALL)."""
    ours = {name: os.environ[name] for name in CHILD_INHERITS if name in os.environ}
    return {"PATH": DEFAULT_PATH, **ours, **CHILD_FIXED, **(extra or {})}


DRIVER_VERSION_RE = Pattern(r"^\d+\.\d+(\.\d+)?$")
# 6.1.0-56-amd64, 6.12.102-flatcar, 6.12.113+deb12-amd64: a version, then a suffix
# of safe characters (never a path separator or whitespace).
KERNEL_RELEASE_RE = Pattern(r"^\d+\.\d+(\.\d+)?([-+~._][A-Za-z0-9._+~-]*)?$")
TAG_RE = Pattern(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
FLATCAR_VERSION_RE = Pattern(r"^\d+\.\d+\.\d+$")
STORES = ("image", "node")
# HOST[:PORT]/REPO[/...] (an OCI repository: lower-case path components; no scheme, no tag).
_REPO_PART = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
REGISTRY_REF_RE = Pattern(
    r"^(?P<host>(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)*"
    r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?)"
    rf"/(?P<repo>{_REPO_PART}(?:/{_REPO_PART})*)$"
)
MODULE_TYPES = ("auto", "open", "proprietary")
CHANNELS = ("stable", "beta", "alpha", "lts")
BOARDS = ("amd64-usr", "arm64-usr")
LOG_FORMATS = ("text", "json")
BUILD_AHEAD_MODES = ("auto", "on", "off")
FABRIC_MANAGER_MODES = ("auto", "off")

DEFAULT_RELEASE_URL = "https://{channel}.release.flatcar-linux.net"
DEFAULT_RELEASES_FEED = "https://www.flatcar.org/releases-json/releases-{channel}.json"


def _check(name: str, value: str, pattern: Pattern, expected: str) -> str:
    if not pattern.fullmatch(value):
        raise UsageError(
            f"{name}={value!r} is malformed: expected {expected}.",
            hint=f"Fix {name} in the container's environment or command line.",
        )
    return value


def _choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise UsageError(
            f"{name}={value!r} is not valid: expected one of {', '.join(choices)}.",
            hint=f"Fix {name} in the container's environment or command line.",
        )
    return value


def validate_driver_version(value: str, name: str = "DRIVER_VERSION") -> str:
    return _check(name, value, DRIVER_VERSION_RE, "a version like 535.261.03")


def validate_kernel_release(value: str, name: str = "--kernel") -> str:
    return _check(
        name, value, KERNEL_RELEASE_RE, "a kernel release like 6.12.102-flatcar (as `uname -r`)"
    )


def default_board() -> str:
    return "arm64-usr" if os.uname().machine in ("aarch64", "arm64") else "amd64-usr"


# Where `init` can be told to stop (NVIDIA_DRIVER_TEST_PAUSE_AT), for tests that kill it there.
PAUSE_STEPS = ("locked", "linked", "loaded", "mounted", "persistenced")


class Hooks(NamedTuple):
    """The test hooks: the only settings that exist for the tests, all here
    (docs/configuration.md, "Test hooks"). Each is a point a test cannot reach from
    outside the program: a step inside `init` to be killed at, and the build ahead's
    child, which is our own interpreter (not looked up in PATH).

    pause_at (NVIDIA_DRIVER_TEST_PAUSE_AT): a step of PAUSE_STEPS where `init` stops
    until a signal. build_ahead_command (NVIDIA_DRIVER_TEST_BUILD_AHEAD_COMMAND): the
    command line that stands in for `nvidia-driver` in the build's child, so that tests
    can watch a child of their own.
    """

    pause_at: str | None = None
    build_ahead_command: tuple[str, ...] | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Hooks:
        pause_at = env.get("NVIDIA_DRIVER_TEST_PAUSE_AT") or None
        if pause_at is not None and pause_at not in PAUSE_STEPS:
            raise UsageError(
                f"NVIDIA_DRIVER_TEST_PAUSE_AT={pause_at!r} is not a step: expected one of "
                f"{', '.join(PAUSE_STEPS)}."
            )
        command = env.get("NVIDIA_DRIVER_TEST_BUILD_AHEAD_COMMAND")
        return cls(
            pause_at=pause_at,
            build_ahead_command=tuple(shlex.split(command)) if command else None,
        )


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


class Options(NamedTuple):
    """Settings of `init` and `load` that the GPU Operator passes in the environment.

    container_root (CONTAINER_ROOT, default /): the file system bound at
    /run/nvidia/driver. gpu_direct_rdma, gds, gdrcopy (GPU_DIRECT_RDMA_ENABLED,
    GDS_ENABLED, GDRCOPY_ENABLED): what the readiness file announces;
    GPUDirect RDMA also loads nvidia-peermem. hooks: the test hooks (Hooks).

    Building ahead while `init` waits (watch.py): build_ahead (BUILD_AHEAD, auto|on|off;
    auto: on when the host is Flatcar), build_ahead_interval (BUILD_AHEAD_INTERVAL,
    seconds between the feed-driven builds, jittered), build_ahead_staged_poll
    (BUILD_AHEAD_STAGED_POLL, seconds between two looks at update_engine's status),
    build_ahead_threads (BUILD_AHEAD_THREADS, the build's -m).

    busy_timeout (DRIVER_BUSY_TIMEOUT): seconds `init` waits for another driver that is
    loaded and in use to be free before it gives up (exit 3); None: no bound, 0: no wait.
    """

    container_root: Path = Path("/")
    gpu_direct_rdma: bool = False
    gds: bool = False
    gdrcopy: bool = False
    hooks: Hooks = Hooks()
    build_ahead: str = "auto"
    build_ahead_interval: float = 21600.0
    build_ahead_staged_poll: float = 60.0
    build_ahead_threads: int = 1
    fabric_manager: str = "auto"
    fabric_manager_timeout: float = 300.0
    busy_timeout: float | None = None
    fabric_manager_config: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Options:
        hooks = Hooks.from_env(env)
        root = Path(env.get("CONTAINER_ROOT") or "/")
        if not root.is_absolute():
            raise UsageError(f"CONTAINER_ROOT={str(root)!r} is not an absolute path.")
        return cls(
            container_root=root,
            gpu_direct_rdma=_flag(env, "GPU_DIRECT_RDMA_ENABLED"),
            gds=_flag(env, "GDS_ENABLED"),
            gdrcopy=_flag(env, "GDRCOPY_ENABLED"),
            hooks=hooks,
            build_ahead=_choice("BUILD_AHEAD", env.get("BUILD_AHEAD") or "auto", BUILD_AHEAD_MODES),
            build_ahead_interval=_seconds(env, "BUILD_AHEAD_INTERVAL", 21600.0),
            build_ahead_staged_poll=_seconds(env, "BUILD_AHEAD_STAGED_POLL", 60.0),
            build_ahead_threads=_count(env, "BUILD_AHEAD_THREADS", 1),
            fabric_manager=_choice(
                "FABRIC_MANAGER", env.get("FABRIC_MANAGER") or "auto", FABRIC_MANAGER_MODES
            ),
            fabric_manager_timeout=_seconds(env, "FABRIC_MANAGER_TIMEOUT", 300.0),
            busy_timeout=_bound(env, "DRIVER_BUSY_TIMEOUT"),
            fabric_manager_config=_fm_config(env),
        )

    @property
    def readiness(self) -> dict[str, bool]:
        return {
            "GDRCOPY_ENABLED": self.gdrcopy,
            "GDS_ENABLED": self.gds,
            "GPU_DIRECT_RDMA_ENABLED": self.gpu_direct_rdma,
        }


# Seconds a pull or a push keeps trying a throttled or failing registry (backoff.py).
REGISTRY_RETRY_BUDGET = 120.0


FM_CONFIG_PREFIX = "NVFM_CONFIG_"
_FM_KEY_RE = Pattern(r"[A-Za-z][A-Za-z0-9_]*")


def _fm_config(env: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """NVFM_CONFIG_<KEY>=<value>: a key of fabricmanager.cfg set to the value (NVIDIA's
    driver container's names), sorted by key; one line each, so no newline in a value."""
    found = []
    for name, value in sorted(env.items()):
        if not name.startswith(FM_CONFIG_PREFIX):
            continue
        key = name[len(FM_CONFIG_PREFIX) :]
        if not _FM_KEY_RE.fullmatch(key) or "\n" in value or "\r" in value:
            raise UsageError(
                f"{name} is not a fabric manager setting: expected NVFM_CONFIG_<KEY>=<value> "
                "with a key of fabricmanager.cfg (letters, digits, _) and a one-line value.",
                hint=f"Fix {name} in the container's environment.",
            )
        found.append((key, value))
    return tuple(found)


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    text = env.get(name, "").strip()
    try:
        value = float(text) if text else default
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise UsageError(
            f"{name}={env[name]!r} is not valid: expected a positive number of seconds.",
            hint=f"Fix {name} in the container's environment.",
        )
    return value


def _bound(env: Mapping[str, str], name: str) -> float | None:
    """Seconds a wait may last: unset, empty or `none` for no bound, 0 for no wait."""
    text = env.get(name, "").strip()
    if text.lower() in ("", "none"):
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise UsageError(
            f"{name}={env[name]!r} is not valid: expected a number of seconds (0: do not "
            "wait) or `none` (no bound).",
            hint=f"Fix {name} in the container's environment.",
        )
    return value


def _flag(env: Mapping[str, str], name: str) -> bool:
    value = env.get(name, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise UsageError(f"{name}={env[name]!r} is not valid: expected true or false.")


def _count(env: Mapping[str, str], name: str, default: int) -> int:
    value = env.get(name) or ""
    if not value:
        return default
    if not value.isdigit() or int(value) < 1:
        raise UsageError(
            f"{name}={value!r} is not valid: expected a positive whole number.",
            hint=f"Fix {name} in the container's environment.",
        )
    return int(value)


if TYPE_CHECKING:  # a TypedDict compiles each annotation at import (every command)
    from typing import TypedDict

    class _RegistrySettings(TypedDict):
        registry: str | None
        registry_push: bool
        registry_ca: Path | None
        registry_auth_file: Path | None
        registry_plain_http: bool
        registry_retry_budget: float
        trusted_keys: Path | None
        fleet_signing_key: Path | None


def _registry_settings(env: Mapping[str, str]) -> _RegistrySettings:
    """The registry's settings of `Config` (credentials are not among them: the registry
    module reads them at use, so that no repr of Config holds them)."""

    def path(name: str) -> Path | None:
        value = env.get(name)
        return Path(value) if value else None

    auth = path("REGISTRY_AUTH_FILE")
    if auth is None and env.get("DOCKER_CONFIG"):
        auth = Path(env["DOCKER_CONFIG"]) / "config.json"
    if auth is None and env.get("HOME"):
        auth = Path(env["HOME"]) / ".docker" / "config.json"
    return {
        "registry": env.get("PRECOMPILED_REGISTRY") or None,
        "registry_push": _flag(env, "PRECOMPILED_REGISTRY_PUSH"),
        "registry_ca": path("PRECOMPILED_REGISTRY_CA"),
        "registry_auth_file": auth,
        "registry_plain_http": _flag(env, "PRECOMPILED_REGISTRY_PLAIN_HTTP"),
        "registry_retry_budget": _seconds(
            env, "PRECOMPILED_REGISTRY_RETRY_BUDGET", REGISTRY_RETRY_BUDGET
        ),
        "trusted_keys": path("PRECOMPILED_TRUSTED_KEYS"),
        "fleet_signing_key": path("PRECOMPILED_SIGNING_KEY"),
    }


def parse_timeouts(
    value: str, name: str = "NVIDIA_DRIVER_TIMEOUTS"
) -> tuple[tuple[str, float], ...]:
    """`modprobe=600,rmmod=30`: seconds per program of run.TIMEOUTS, as (program, seconds)
    pairs (immutable, as the rest of Config; the last one given for a program wins)."""
    timeouts: dict[str, float] = {}
    for item in filter(None, (i.strip() for i in value.split(","))):
        program, _, seconds = item.partition("=")
        try:
            limit = float(seconds)
        except ValueError:
            limit = 0.0
        if program not in TIMEOUTS or not 0 < limit < float("inf"):
            raise UsageError(
                f"{name}={value!r} is malformed at {item!r}: expected PROGRAM=SECONDS, "
                f"comma-separated, PROGRAM one of {', '.join(TIMEOUTS)}.",
                hint=f"Fix {name} in the container's environment, e.g. modprobe=600,rmmod=30.",
            )
        timeouts[program] = limit
    return tuple(sorted(timeouts.items()))


class Config(NamedTuple):
    driver_version: str | None
    kernel_module_type: str
    flatcar_channel: str | None
    flatcar_board: str
    release_url: str
    releases_feed: str
    signing_key: Path | None
    cache_dir: Path
    precompiled_dir: Path
    node_precompiled_dir: Path
    module_params_dir: Path
    driver_source: Path
    host_root: Path
    log_format: str
    # Per program (run.TIMEOUTS) seconds, from NVIDIA_DRIVER_TIMEOUTS.
    timeouts: tuple[tuple[str, float], ...] = ()
    # From flags.
    kernel: str | None = None
    kernel_source: Path | None = None
    emerge_sources: bool = False
    max_threads: int = os.cpu_count() or 1
    accept_license: bool = False
    sign_key: Path | None = None
    tag: str | None = None
    debug: bool = False
    options: Options = Options()
    # Building ahead (issue 12): a named Flatcar release (--flatcar-version), the channel's
    # next release (--next), and the store `update` writes into (--store).
    flatcar_version: str | None = None
    next_release: bool = False
    store: str = "image"
    # The registry (registry/, trust.py): PRECOMPILED_REGISTRY or --pull, --push.
    registry: str | None = None
    push: str | None = None
    registry_push: bool = False
    registry_ca: Path | None = None
    registry_auth_file: Path | None = None
    registry_plain_http: bool = False
    registry_retry_budget: float = REGISTRY_RETRY_BUDGET
    trusted_keys: Path | None = None
    fleet_signing_key: Path | None = None
    # The environment these settings were read from, whole: registry credentials are read
    # from it at use, and our own child (the build ahead) gets it; never shown (repr).
    environment: Mapping[str, str] = MappingProxyType({})

    def __repr__(self) -> str:
        """Every setting but the environment, which holds the registry's credentials."""
        shown = (
            f"{k}={v!r}" for k, v in zip(self._fields, self, strict=True) if k != "environment"
        )
        return f"Config({', '.join(shown)})"

    @classmethod
    def from_env(cls, env: Mapping[str, str], **flags: object) -> Config:
        """Read and validate the environment, then apply flags that were given (not None)."""

        def get(name: str) -> str | None:
            value = env.get(name)
            return value if value else None

        version = get("DRIVER_VERSION")
        if version is not None:
            validate_driver_version(version)
        module_type = _choice(
            "KERNEL_MODULE_TYPE", get("KERNEL_MODULE_TYPE") or "auto", MODULE_TYPES
        )
        channel = get("FLATCAR_CHANNEL")
        if channel is not None:
            _choice("FLATCAR_CHANNEL", channel, CHANNELS)
        board = _choice("FLATCAR_BOARD", get("FLATCAR_BOARD") or default_board(), BOARDS)
        log_format = _choice("LOG_FORMAT", get("LOG_FORMAT") or "text", LOG_FORMATS)

        source = Path(get("NVIDIA_DRIVER_SOURCE") or f"/usr/src/nvidia-{version or 'unknown'}")
        precompiled = Path(get("PRECOMPILED_DIR") or source / "kernel" / "precompiled")
        key = get("FLATCAR_SIGNING_KEY")
        config = cls(
            driver_version=version,
            kernel_module_type=module_type,
            flatcar_channel=channel,
            flatcar_board=board,
            release_url=get("FLATCAR_RELEASE_URL") or DEFAULT_RELEASE_URL,
            releases_feed=get("FLATCAR_RELEASES_FEED") or DEFAULT_RELEASES_FEED,
            signing_key=Path(key) if key else None,
            cache_dir=Path(get("NVIDIA_DRIVER_CACHE") or "/var/cache/nvidia-driver"),
            precompiled_dir=precompiled,
            node_precompiled_dir=Path(
                get("NODE_PRECOMPILED_DIR") or "/var/lib/nvidia-driver/precompiled"
            ),
            module_params_dir=Path(get("NVIDIA_MODULE_PARAMS_DIR") or "/drivers"),
            driver_source=source,
            host_root=Path(get("HOST_ROOT") or "/"),
            log_format=log_format,
            timeouts=parse_timeouts(get("NVIDIA_DRIVER_TIMEOUTS") or ""),
            options=Options.from_env(env),
            **_registry_settings(env),
            environment=dict(env),
        )
        given = {k: v for k, v in flags.items() if v is not None}
        config = config._replace(**given)  # type: ignore[arg-type]
        config.validate_flags()
        return config

    def validate_flags(self) -> None:
        if self.kernel is not None:
            validate_kernel_release(self.kernel)
        if self.max_threads < 1:
            raise UsageError(
                f"--max-threads={self.max_threads} is not valid: expected a positive number."
            )
        if self.tag is not None:
            _check("--tag", self.tag, TAG_RE, "letters, digits, '.', '_' or '-' (64 at most)")
        if self.flatcar_version is not None:
            _check(
                "--flatcar-version",
                self.flatcar_version,
                FLATCAR_VERSION_RE,
                "a Flatcar version like 4230.2.3",
            )
        _choice("--store", self.store, STORES)
        self._check_exclusive()
        self._validate_registry()

    def _check_exclusive(self) -> None:
        """The ways of naming what to build for that contradict each other (exit 2)."""
        given = {
            "--flatcar-version": self.flatcar_version is not None,
            "--next": self.next_release,
            "--kernel": self.kernel is not None,
            "--kernel-source": self.kernel_source is not None,
            "--emerge-sources": self.emerge_sources,
        }
        # --kernel with --kernel-source (the tree must be that kernel's) and --kernel with
        # --emerge-sources are the seed's combinations; a named release brings its own kernel.
        for a, b in (
            ("--flatcar-version", "--next"),
            ("--flatcar-version", "--kernel"),
            ("--flatcar-version", "--kernel-source"),
            ("--flatcar-version", "--emerge-sources"),
            ("--next", "--kernel"),
            ("--next", "--kernel-source"),
            ("--next", "--emerge-sources"),
        ):
            if given[a] and given[b]:
                raise UsageError(
                    f"{a} and {b} cannot be given together.",
                    hint="Give one of --flatcar-version, --next, --kernel (with "
                    "--kernel-source or --emerge-sources if needed).",
                )

    def _validate_registry(self) -> None:
        """A push needs the fleet's signing key: refused before anything is built."""
        expected = "HOST[:PORT]/REPOSITORY (no scheme, no tag; lower-case repository)"
        if self.registry is not None:
            _check("PRECOMPILED_REGISTRY (or --pull)", self.registry, REGISTRY_REF_RE, expected)
        if self.push is not None:
            _check("--push", self.push, REGISTRY_REF_RE, expected)
        pushes = self.push is not None or (self.registry_push and self.registry is not None)
        if pushes and self.fleet_signing_key is None:
            what = "--push" if self.push is not None else "PRECOMPILED_REGISTRY_PUSH=true"
            raise UsageError(
                f"{what} needs PRECOMPILED_SIGNING_KEY: packages are pushed signed by the "
                "fleet's key, which nodes verify (PRECOMPILED_TRUSTED_KEYS).",
                hint="Point PRECOMPILED_SIGNING_KEY at the fleet's armored secret key file.",
            )

    def host(self, path: str | Path) -> Path:
        """A path of the kernel's (/proc, /sys, /dev) or of a host directory shared by a
        documented mount (/run/nvidia, /host-etc, /host-usr/share/flatcar), under HOST_ROOT.

        Never for the container's own files (see `own`): inside the container those are
        not the host's, and a HOST_ROOT that moved them would move them off the container.
        """
        return self.host_root / Path(path).relative_to("/")

    def own(self, path: str | Path) -> Path:
        """A path on the container's own root file system, under CONTAINER_ROOT (the root
        bound at /run/nvidia/driver, default /): the private module tree /opt/nvidia.

        Not under HOST_ROOT: the modules are linked on the container's disk, where the
        host's read-only /lib/modules is not involved, and tests give both roots apart.
        """
        return self.options.container_root / Path(path).relative_to("/")

    def network_environment(self) -> dict[str, str]:
        """What a child that fetches from the network needs of our environment (NETWORK)."""
        return {name: self.environment[name] for name in NETWORK if name in self.environment}

    def credential_helper_environment(self) -> dict[str, str]:
        """What a credential helper needs of our environment (CREDENTIAL_HELPER and the
        cloud SDKs' CREDENTIAL_HELPER_PREFIXES)."""
        return {
            name: value
            for name, value in self.environment.items()
            if name in CREDENTIAL_HELPER or name.startswith(CREDENTIAL_HELPER_PREFIXES)
        }

    def library_path(self) -> list[str]:
        """The directories of our LD_LIBRARY_PATH, in order."""
        return [d for d in self.environment.get(LIBRARY_PATH, "").split(":") if d]

    def require_driver_version(self) -> str:
        if self.driver_version is None:
            raise UsageError(
                "DRIVER_VERSION is not set: expected a version like 535.261.03.",
                hint="The driver image sets it; set it when running from elsewhere.",
            )
        return self.driver_version
