"""A private Docker engine and the images of the seed's workflow, for the image tests.

NVIDIA's documented Flatcar workflow is: build the driver image, `docker run ... update`
(the kernel modules are built in Flatcar's developer container and packed), `docker
commit --change 'ENTRYPOINT ["nvidia-driver","init"]'`, then run the committed image on
the node. This module does the host side of it with a real engine:

- `engine()`: `containerd` and `dockerd` (Debian's docker.io, no bridge network) with
  their own data root, exec root and sockets under a temporary directory, stopped and
  removed at the end. `Engine.docker(...)` runs /usr/bin/docker (the client that
  matches that dockerd) against it.
- `base_image(engine)`: `mmdebstrap --variant=minbase` of the host's own Debian sources
  (no registry is reachable here), already carrying the packages the Dockerfile's first
  RUN installs, `docker import`ed; its tar is cached under ~/.cache/nvidia-driver-tests.
  It keeps its apt sources: the Dockerfile's `apt-get update` needs them.
- `build_image(engine, variant)`: the repository's Dockerfile, unchanged, in its two
  driver sources: ``standin`` (DRIVER_SOURCE=nvidia, a stand-in NVIDIA .run served on
  127.0.0.1, tests/standin_run.py) and ``real`` (DRIVER_SOURCE=debian, Debian's
  535.261.03 packages).
- `committed_image(engine, kernel, variant)`: the seed's `update` in a container of that
  image against the local Flatcar mirror of `kernel`, committed with entrypoint `init`
  and saved with `docker save`; the tar is cached, keyed by every input.

Session fixtures (tests/conftest.py imports them, so one engine serves the whole session):
`docker_engine`, and `committed_images` (`committed_images(kernel, variant)`), which
starts the engine only when the cache lacks the image.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import pytest

from tests.flatcar_mirror import (
    FlatcarMirror,
    _locked,
    apt_source_lines,
    build_mirror,
    host_suite,
    serve_mirror,
)
from tests.real_build import product_digest

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
CACHE = Path.home() / ".cache" / "nvidia-driver-tests" / "images"
# The client that matches Debian's dockerd (/usr/local/bin/docker may be another one).
DOCKER = Path("/usr/bin/docker")
ENGINE_PROGRAMS = (Path("/usr/bin/containerd"), Path("/usr/sbin/dockerd"), DOCKER)

Variant = Literal["standin", "real"]
STANDIN_VERSION = "535.999.01"
REAL_VERSION = "535.261.03"
VERSIONS: dict[Variant, str] = {"standin": STANDIN_VERSION, "real": REAL_VERSION}

# What `docker run` needs here for loop mounts in place of --privileged, which this VM
# refuses ("unable to apply caps": the host lacks CAP_SYS_MODULE). README, "Plain Docker".
LOOP_FLAGS = (
    "--cap-add",
    "SYS_ADMIN",
    "--cap-add",
    "MKNOD",
    "--device-cgroup-rule",
    "b 7:* rmw",
    "--device-cgroup-rule",
    "c 10:237 rmw",
)
CACHE_MOUNT = "/var/cache/nvidia-driver"  # NVIDIA_DRIVER_CACHE's default
KEY_MOUNT = "/keys/flatcar-image-signing-key.asc"


class EngineError(RuntimeError):
    """containerd or dockerd did not start, or a docker command failed; with the output."""


@dataclasses.dataclass(frozen=True)
class CommittedImage:
    """The image `docker commit` made of the seed's `update` container, saved to a tar.

    `tar` is the output of `docker save name` (load it with `docker load -i tar`; the tar
    is in the shared cache: read it, never change it). `name` is the repository:tag the
    tar carries. Its entrypoint is `nvidia-driver init` with no command; its image store
    (PRECOMPILED_DIR, under NVIDIA_DRIVER_SOURCE) holds the package `update` made for
    `kernel`, at `package` (a path inside the image).
    """

    tar: Path
    name: str
    kernel: str
    variant: Variant
    driver_version: str
    package: str


class Engine:
    """A running private dockerd; `docker(...)` talks to it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.host = f"unix://{root / 'docker.sock'}"

    def env(self) -> dict[str, str]:
        """The client's environment: this engine, its own client config, the classic
        builder (whose `--network host` needs no entitlement)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        env.update(
            DOCKER_HOST=self.host,
            DOCKER_CONFIG=str(self.root / "client"),
            DOCKER_BUILDKIT="0",
        )
        return env

    def docker(
        self, *args: str | os.PathLike[str], check: bool = True, timeout: float = 1800
    ) -> subprocess.CompletedProcess[str]:
        """`docker ARGS` against this engine; EngineError with its output when it fails
        and `check` is set."""
        argv = [str(DOCKER), *map(str, args)]
        proc = subprocess.run(
            argv, env=self.env(), capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and proc.returncode != 0:
            raise EngineError(
                f"{' '.join(argv)} exited with status {proc.returncode}:\n"
                f"{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
            )
        return proc

    def has_image(self, name: str) -> bool:
        return self.docker("image", "inspect", name, check=False).returncode == 0

    def remove_containers(self) -> None:
        ids = self.docker("ps", "-aq").stdout.split()
        if ids:
            self.docker("rm", "-f", *ids)


def missing_engine() -> list[str]:
    """What this machine lacks to run the engine (empty: it can)."""
    missing = [str(p) for p in ENGINE_PROGRAMS if not os.access(p, os.X_OK)]
    if os.geteuid() != 0:
        missing.append("root")
    return missing


def _start(argv: list[str], logfile: Path) -> subprocess.Popen[bytes]:
    with logfile.open("wb") as out:
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )


def _stop(proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_for(what: str, ready: Callable[[], bool], proc: subprocess.Popen[bytes], log_: Path):
    deadline = time.monotonic() + 120
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log_.read_text(errors="replace")[-4000:]
            raise EngineError(f"{what} did not start (status {proc.poll()}):\n{tail}")
        time.sleep(0.2)


def _remove_tree(root: Path) -> None:
    """Unmount whatever is still mounted under `root` (deepest first), then delete it."""
    mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    for target in sorted((m for m in mounts if m.startswith(f"{root}/")), reverse=True):
        subprocess.run(["umount", "-l", target], check=False)
    shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def engine() -> Iterator[Engine]:
    """Start containerd and dockerd under a temporary directory; at the end remove every
    container, stop both and delete the directory (nothing stays mounted or running)."""
    root = Path(tempfile.mkdtemp(prefix="nvd-docker-", dir="/tmp"))
    with contextlib.ExitStack() as stack:
        stack.callback(_remove_tree, root)
        config = root / "containerd.toml"
        config.write_text(
            "version = 2\n"
            f'root = "{root}/containerd"\n'
            f'state = "{root}/containerd-state"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[grpc]\n  address = "{root}/containerd.sock"\n'
            f'[plugins."io.containerd.internal.v1.opt"]\n  path = "{root}/containerd-opt"\n'
        )
        containerd = _start(
            ["/usr/bin/containerd", "--config", str(config)], root / "containerd.log"
        )
        stack.callback(_stop, containerd)
        _wait_for(
            "containerd",
            lambda: (root / "containerd.sock").is_socket(),
            containerd,
            root / "containerd.log",
        )
        (root / "daemon.json").write_text("{}\n")
        dockerd = _start(
            [
                "/usr/sbin/dockerd",
                f"--config-file={root / 'daemon.json'}",
                f"--containerd={root / 'containerd.sock'}",
                f"--data-root={root / 'data'}",
                f"--exec-root={root / 'exec'}",
                f"--pidfile={root / 'dockerd.pid'}",
                f"--host=unix://{root / 'docker.sock'}",
                "--storage-driver=overlay2",
                "--bridge=none",
                "--iptables=false",
                "--ip-forward=false",
                "--ip-masq=false",
                "--userland-proxy=false",
            ],
            root / "dockerd.log",
        )
        stack.callback(_stop, dockerd)
        eng = Engine(root)
        _wait_for(
            "dockerd",
            lambda: eng.docker("version", check=False, timeout=30).returncode == 0,
            dockerd,
            root / "dockerd.log",
        )
        stack.callback(eng.remove_containers)
        yield eng


def _digest(*parts: object) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else json.dumps(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _tag(text: str) -> str:
    """`text` as a docker tag ([A-Za-z0-9_.-]): a kernel release's '+' becomes '_'."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)


def first_run_packages(dockerfile: Path = DOCKERFILE) -> list[str]:
    """The packages of the Dockerfile's first `apt-get install` (the programs the tool runs):
    the base image carries them already, so the first RUN installs nothing new."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    match = re.search(r"apt-get install ([^&;|]*)", text)
    if match is None:
        raise EngineError(f"{dockerfile}: no apt-get install")
    return sorted(w for w in match.group(1).split() if not w.startswith("-"))


def base_image(eng: Engine) -> str:
    """The base image, imported into `eng`: a minbase Debian of the host's own suite and
    sources (all their components: the `debian` driver source needs contrib, non-free and
    non-free-firmware), cached as a tar keyed by its recipe."""
    sources = apt_source_lines()
    suite = host_suite()
    packages = first_run_packages()
    mmdebstrap = subprocess.run(
        ["mmdebstrap", "--version"], capture_output=True, text=True, check=True
    ).stdout.strip()
    key = _digest("base", 1, sources, suite, packages, mmdebstrap)
    tar = CACHE / f"base-{key}.tar"
    with _locked(CACHE / f"base-{key}.lock"):
        if not tar.is_file():
            started = time.monotonic()
            tmp = tar.with_name(f".tmp-{tar.name}-{os.getpid()}")
            try:
                subprocess.run(
                    [
                        "mmdebstrap",
                        "--variant=minbase",
                        "--include=" + ",".join(packages),
                        '--aptopt=Acquire::Check-Valid-Until "false"',
                        "--format=tar",
                        suite,
                        str(tmp),
                        "-",
                    ],
                    input="\n".join(sources) + "\n",
                    capture_output=True,
                    text=True,
                    check=True,
                    timeout=1800,
                )
                tmp.rename(tar)
            except subprocess.CalledProcessError as e:
                raise EngineError(f"mmdebstrap failed:\n{e.stderr[-4000:]}") from e
            finally:
                tmp.unlink(missing_ok=True)
            log.warning("base image (mmdebstrap): %.1f s", time.monotonic() - started)
    name = f"nvidia-driver-test-base:{key}"
    if not eng.has_image(name):
        started = time.monotonic()
        eng.docker("import", tar, name)
        log.warning("base image (docker import): %.1f s", time.monotonic() - started)
    return name


def committed_image(eng: Engine, kernel: str, variant: Variant) -> CommittedImage:
    """The committed image of `variant` for `kernel`: from the cache when every input is
    unchanged (Dockerfile, the program's code, the base image's recipe, the driver, the
    kernel's Flatcar mirror), else built, updated, committed and saved now."""
    raise NotImplementedError(eng, kernel, variant)


CommittedImages = Callable[[str, Variant], CommittedImage]


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[Engine]:
    """One private engine for the whole session (skips, or fails under CI, without one)."""
    from tests.conftest import need  # deferred: tests.conftest imports this module

    missing = missing_engine()
    need(not missing, f"a container engine: {', '.join(missing)} (.ci/install-deps)")
    with engine() as eng:
        yield eng


_unused = (FlatcarMirror, build_mirror, serve_mirror, product_digest)
