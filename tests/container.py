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
  127.0.0.1, `make_standin_run`) and ``real`` (DRIVER_SOURCE=debian, Debian's
  535.261.03 packages).
- `committed_image(engine, kernel, variant)`: the seed's `update` in a container of that
  image against the local Flatcar mirror of `kernel`, committed with entrypoint `init`
  and saved with `docker save`; the tar is cached, keyed by every input.

Session fixtures (tests/conftest.py imports them, so one engine serves the whole session):
`docker_engine`, and `committed_images` (`committed_images(kernel, variant)`), which
starts the engine only when the cache lacks the image.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import functools
import hashlib
import http.server
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Literal

import pytest

from nvdriver.driver import package as pkg
from tests.flatcar_mirror import (
    FlatcarMirror,
    MirrorServer,
    _locked,
    apt_source_lines,
    build_mirror,
    host_suite,
    serve_mirror,
)
from tests.leftovers import loops_of, ours
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


class EngineError(RuntimeError):
    """containerd or dockerd did not start, or a docker command failed; with the output."""


@dataclasses.dataclass(frozen=True)
class CommittedImage:
    """The image `docker commit` made of the seed's `update` container, saved to a tar.

    `tar` is the output of `docker save name` (load it with `docker load -i tar`; the tar
    is in the shared cache: read it, never change it). `name` is the repository:tag the
    tar carries. Its entrypoint is `nvidia-driver init` with no command; its image store
    (PRECOMPILED_DIR, under NVIDIA_DRIVER_SOURCE) holds the package `update` made for
    `kernel`, at `package` (a path inside the image). `built` is a copy on this machine
    of what that update made: `precompiled/KERNEL/PACKAGE` and, under `cache`, the linker
    it saved from the developer container (read them, never change them); `log` is the
    update's stderr.
    """

    tar: Path
    name: str
    kernel: str
    variant: Variant
    driver_version: str
    package: str
    built: Path
    log: str

    @property
    def built_package(self) -> Path:
        return _built_package(self.built, self.kernel, self.package)


def committed_packages(variant: Variant, kernel: str | None = None) -> list[Path]:
    """The packages of the cached committed images of `variant` (of `kernel`, else of
    every kernel): the copies `committed_image` keeps beside each image, for the benches."""
    tag = "*" if kernel is None else _tag(kernel)
    return sorted(CACHE.glob(f"committed-{variant}-{tag}-*.built/precompiled/*/*.tar.gz"))


def _built_package(built: Path, kernel: str, package: str) -> Path:
    """Where the copy of the update's package lies: the store layout, KERNEL/PACKAGE."""
    return built / "precompiled" / kernel / PurePosixPath(package).name


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
def engine(data_root: Path | None = None) -> Iterator[Engine]:
    """Start containerd and dockerd under a temporary directory; at the end remove every
    container, stop both and delete the directory (nothing stays mounted or running).
    dockerd's images and layers are under `data_root` when given (it stays), else in
    the directory."""
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
                f"--data-root={data_root or root / 'data'}",
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


def base_key() -> str:
    """The base image's inputs: the host's sources and suite, the packages, mmdebstrap."""
    mmdebstrap = subprocess.run(
        ["mmdebstrap", "--version"], capture_output=True, text=True, check=True
    ).stdout.strip()
    return _digest("base", 1, apt_source_lines(), host_suite(), first_run_packages(), mmdebstrap)


def base_image(eng: Engine) -> str:
    """The base image, imported into `eng`: a minbase Debian of the host's own suite and
    sources (all their components: the `debian` driver source needs contrib, non-free and
    non-free-firmware), cached as a tar keyed by its recipe."""
    sources = apt_source_lines()
    suite = host_suite()
    packages = first_run_packages()
    key = base_key()
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


STANDIN_RUN = r"""#!/bin/sh
# A stand-in for NVIDIA-Linux-x86_64-@VERSION@.run (tests/container.py): the options of
# NVIDIA's installer that the Dockerfile passes, and the stand-in driver as its payload.
set -eu
name=NVIDIA-Linux-x86_64-@VERSION@
payload() { sed '1,/^__PAYLOAD__$/d' "$0" | base64 -d | tar -xz "$@"; }
extract=0 kernel_module=1
for arg in "$@"; do
    case "$arg" in
        -x|--extract-only) extract=1 ;;
        --no-kernel-module) kernel_module=0 ;;
        -s|--silent|--no-nouveau-check|--no-nvidia-modprobe|--no-rpms|--no-backup) ;;
        --no-check-for-alternate-installs|--no-libglx-indirect|--no-install-libglvnd) ;;
        --x-prefix=*|--x-module-path=*|--x-library-path=*|--x-sysconfig-path=*) ;;
        *) echo "$name.run: unrecognized option: '$arg'" >&2; exit 1 ;;
    esac
done
if [ "$extract" = 1 ]; then
    if [ -e "$name" ]; then echo "$name.run: $name exists" >&2; exit 1; fi
    mkdir "$name"
    payload -C "$name"
    exit 0
fi
if [ "$kernel_module" = 1 ]; then
    echo "$name.run: the stand-in builds no kernel module: pass --no-kernel-module" >&2
    exit 1
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
payload -C "$tmp"
lib=/usr/lib/x86_64-linux-gnu
install -D -m 0755 -t /usr/bin "$tmp/nvidia-smi" "$tmp/nvidia-persistenced"
install -D -m 0755 -t "$lib" "$tmp/libnvidia-ml.so.@VERSION@" "$tmp/libcuda.so.@VERSION@"
ln -sf "libnvidia-ml.so.@VERSION@" "$lib/libnvidia-ml.so.1"
ln -sf "libcuda.so.@VERSION@" "$lib/libcuda.so.1"
install -D -m 0644 -t /usr/lib/firmware/nvidia/@VERSION@ "$tmp"/firmware/*.bin
ldconfig
exit 0
__PAYLOAD__
"""

# The stand-in's user space: what the container toolkit looks for, without a GPU. The
# libraries answer as NVIDIA's do on a machine whose driver sees no GPU.
# The stand-in nvidia-smi answers as NVIDIA's does by whether the driver is loaded: it passes
# (the readiness check) while the stand-in nvidia module is live, and fails with NVIDIA's
# message and status 9 otherwise. It stands in for a GPU, which cannot exist here.
STANDIN_SMI = """#!/bin/sh
if [ "$(cat /sys/module/nvidia/initstate 2>/dev/null)" = live ]; then
    echo "NVIDIA-SMI stand-in: driver $(cat /sys/module/nvidia/version 2>/dev/null) loaded"
    exit 0
fi
echo "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver." >&2
exit 9
"""
STANDIN_LIBS = {
    "libcuda": "int cuInit(unsigned int flags) { (void)flags; return 100; }\n",
    "libnvidia-ml": "int nvmlInit_v2(void) { return 9; }\n",
}
STANDIN_FIRMWARE = ("gsp_ga10x.bin", "gsp_tu10x.bin")
GPU_LIST = ROOT / "tests" / "unit" / "data" / "supported-gpus-535.261.03.json"


def make_standin_run(dest: Path, version: str = STANDIN_VERSION) -> Path:
    """`dest/<version>/NVIDIA-Linux-x86_64-<version>.run`, laid out as DRIVER_BASE_URL
    serves NVIDIA's: a shell script with the stand-in driver as its payload (kernel/ and
    kernel-open/ of tests/standin, supported-gpus/, firmware/, LICENSE, the stand-in
    nvidia-smi, nvidia-persistenced, libcuda and libnvidia-ml) that installs the user
    space like NVIDIA's installer (`--no-kernel-module`) or unpacks (`--extract-only`)."""
    from tests.standin.tree import make_standin_source  # deferred: it imports nvdriver
    from tests.vm.scenario import PERSISTENCED  # deferred: it imports tests.conftest

    name = f"NVIDIA-Linux-x86_64-{version}"
    with tempfile.TemporaryDirectory() as tmp:
        tree = make_standin_source(Path(tmp) / name, version=version)
        (tree / "supported-gpus").mkdir()
        shutil.copy(GPU_LIST, tree / "supported-gpus" / "supported-gpus.json")
        (tree / "firmware").mkdir()
        for firmware in STANDIN_FIRMWARE:
            (tree / "firmware" / firmware).write_text(f"stand-in GSP firmware {version}\n")
        (tree / "LICENSE").write_text("The stand-in driver of the nvidia-driver tests.\n")
        for program, text in (("nvidia-smi", STANDIN_SMI), ("nvidia-persistenced", PERSISTENCED)):
            (tree / program).write_text(text)
            (tree / program).chmod(0o755)
        for lib, source in STANDIN_LIBS.items():
            c = Path(tmp) / f"{lib}.c"
            c.write_text(source)
            soname = f"{lib}.so.1"
            subprocess.run(
                [
                    "gcc",
                    "-shared",
                    "-fPIC",
                    f"-Wl,-soname,{soname}",
                    "-o",
                    tree / f"{lib}.so.{version}",
                    c,
                ],
                check=True,
            )
        payload = subprocess.run(
            ["tar", "-C", tree, "--sort=name", "--owner=0", "--group=0", "-cz", "."],
            capture_output=True,
            check=True,
        ).stdout
    run = dest / version / f"{name}.run"
    run.parent.mkdir(parents=True, exist_ok=True)
    encoded = base64.encodebytes(payload).decode()
    run.write_text(STANDIN_RUN.replace("@VERSION@", version) + encoded)
    return run


@contextlib.contextmanager
def serve_directory(root: Path) -> Iterator[str]:
    """Serve `root` over HTTP on 127.0.0.1 (an ephemeral port); yields the base URL."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        h.update(f"{path.relative_to(root)}\0".encode() + path.read_bytes() + b"\0")
    return h.hexdigest()


def image_inputs_digest(variant: Variant, signing_key: Path) -> str:
    """Every input of a built image: the Dockerfile, the program, the recipe (this file),
    the driver (the stand-in's sources, or Debian's version), the signing key."""
    driver = _tree_digest(ROOT / "tests" / "standin") if variant == "standin" else REAL_VERSION
    return _digest(
        DOCKERFILE.read_bytes(),
        DOCKERIGNORE.read_bytes(),
        Path(__file__).read_bytes(),
        product_digest(),
        (ROOT / "pyproject.toml").read_bytes(),
        variant,
        driver,
        signing_key.read_bytes(),
    )


def build_image(eng: Engine, variant: Variant, signing_key: Path) -> str:
    """The repository's Dockerfile built in `eng` (`docker build --network host`) from a
    context of the program's wheel and `signing_key` (image-inputs/, as the README says);
    the stand-in's .run is served on 127.0.0.1. Returns the image's name."""
    base = base_image(eng)
    name = f"nvidia-driver-test:{variant}-{image_inputs_digest(variant, signing_key)}"
    if eng.has_image(name):
        return name
    args = {"BASE_IMAGE": base, "DRIVER_VERSION": VERSIONS[variant]}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        context = tmp / "context"
        inputs = context / "image-inputs"
        inputs.mkdir(parents=True)
        shutil.copy(DOCKERIGNORE, context / ".dockerignore")
        shutil.copy(signing_key, inputs / "flatcar-image-signing-key.asc")
        # Locked: pip builds in the checkout (build/, src/*.egg-info), which two xdist
        # workers building their images at once would write together.
        with _locked(CACHE / f"wheel-{_digest(str(ROOT))}.lock"):
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "wheel",
                    "-q",
                    "--wheel-dir",
                    inputs / "wheelhouse",
                    ROOT,
                ],
                check=True,
                capture_output=True,
            )
        if variant == "standin":
            make_standin_run(tmp / "driver")
            args["DRIVER_SOURCE"] = "nvidia"
            args["DRIVER_BASE_URL"] = stack.enter_context(serve_directory(tmp / "driver"))
        else:
            args["DRIVER_SOURCE"] = "debian"
        started = time.monotonic()
        eng.docker(
            "build",
            "--network",
            "host",
            "-f",
            DOCKERFILE,
            "-t",
            name,
            *(f"--build-arg={k}={v}" for k, v in args.items()),
            context,
        )
        log.warning("docker build %s: %.1f s", variant, time.monotonic() - started)
    return name


@dataclasses.dataclass(frozen=True)
class Updated:
    """A finished `docker run ... update` container (removed when its block ends)."""

    name: str
    result: subprocess.CompletedProcess[str]
    seconds: float

    @property
    def package(self) -> str:
        """The package path `update` printed (a path inside the container)."""
        lines = self.result.stdout.split()
        return lines[-1] if lines else ""

    def explain(self) -> str:
        return (
            f"update exited with status {self.result.returncode}\n--- stdout ---\n"
            f"{self.result.stdout[-3000:]}\n--- stderr ---\n{self.result.stderr[-6000:]}"
        )


def developer_cache(mirror: FlatcarMirror) -> Path:
    """The host directory mounted as NVIDIA_DRIVER_CACHE for `mirror`'s updates: the
    developer container is downloaded once, as on a node whose cache is a host mount."""
    path = CACHE / f"developer-cache-{mirror.root.parent.name}"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def update_container(
    eng: Engine,
    image: str,
    kernel: str,
    server: MirrorServer,
    *,
    dev: bool = True,
    run_args: tuple[str, ...] = (),
    update_args: tuple[str, ...] = (),
    create: Callable[[str], None] | None = None,
) -> Iterator[Updated]:
    """`nvidia-driver update --kernel KERNEL` in a container of `image`, as the seed runs
    it: `--network host` (the mirror is on 127.0.0.1), the loop-mount flags of this VM
    (LOOP_FLAGS, with `-v /dev:/dev` unless `dev` is false), the documented os-release and
    cache mounts. The container is kept until the block ends (to `docker commit` it).
    With `create`, the container is created, `create(name)` runs, then it is started."""
    name = f"nvd-update-{os.getpid()}-{time.monotonic_ns()}"
    env = {k: v for k, v in server.env().items() if k != "FLATCAR_SIGNING_KEY"}
    argv = [
        "--name",
        name,
        "--network",
        "host",
        *LOOP_FLAGS,
        *(["-v", "/dev:/dev"] if dev else []),
        "-v",
        "/etc/os-release:/host-etc/os-release:ro",
        "-v",
        f"{developer_cache(server.mirror)}:{CACHE_MOUNT}",
        *(f"--env={k}={v}" for k, v in sorted(env.items())),
        *run_args,
        image,
        "update",
        "--kernel",
        kernel,
        *update_args,
    ]
    # One update at a time per developer cache: `committed_image` checks that an update
    # left no loop device of its cache (another cache's loops are told apart by their
    # files: `loops_of`).
    cache = developer_cache(server.mirror)
    with _locked(cache.with_name(f"{cache.name}.lock")):
        try:
            started = time.monotonic()
            if create is None:
                result = eng.docker("run", *argv, check=False, timeout=3600)
            else:
                eng.docker("create", *argv)
                create(name)
                result = eng.docker("start", "--attach", name, check=False, timeout=3600)
            yield Updated(name, result, time.monotonic() - started)
        finally:
            eng.docker("rm", "--force", name, check=False)


def _base_and_image_key(variant: Variant, signing_key: Path) -> str:
    return _digest(base_key(), image_inputs_digest(variant, signing_key))


def committed_image(
    kernel: str, variant: Variant, get_engine: Callable[[], Engine]
) -> CommittedImage:
    """The committed image of `variant` for `kernel`: from the cache when every input is
    unchanged (the base image's recipe, the Dockerfile, the program's code, this recipe,
    the driver, the kernel's Flatcar mirror), else made now in `get_engine()` (called only
    then): `build_image`, `update --kernel KERNEL` in a container of it, `docker commit
    --change 'ENTRYPOINT ["nvidia-driver","init"]' --change 'CMD []'`, `docker save`.
    EngineError when a step fails (nothing is cached then)."""
    mirror = build_mirror(kernel)
    key = _digest(
        "committed",
        _base_and_image_key(variant, mirror.signing_key),
        kernel,
        mirror.root.parent.name,
    )
    stem = CACHE / f"committed-{variant}-{_tag(kernel)}-{key}"
    tar, meta, built = (stem.with_name(f"{stem.name}{s}") for s in (".tar", ".json", ".built"))
    name = f"nvidia-driver:{variant}-{_tag(kernel)}"
    with _locked(stem.with_name(f"{stem.name}.lock")):
        # The metadata is written last: with it, the tar and the copy are complete.
        if not meta.is_file():
            eng = get_engine()
            timings: dict[str, float] = {}
            started = time.monotonic()
            image = build_image(eng, variant, mirror.signing_key)
            timings["build"] = time.monotonic() - started
            with (
                serve_mirror(mirror) as server,
                update_container(eng, image, kernel, server) as updated,
            ):
                timings["update"] = updated.seconds
                if updated.result.returncode != 0 or not updated.package:
                    raise EngineError(updated.explain())
                left = _left_behind(developer_cache(mirror))
                if left:
                    raise EngineError(f"update left behind {left}:\n{updated.explain()}")
                started = time.monotonic()
                eng.docker(
                    "commit",
                    "--change",
                    'ENTRYPOINT ["nvidia-driver","init"]',
                    "--change",
                    "CMD []",
                    updated.name,
                    name,
                )
                _copy_out(eng, updated, kernel, built)
            tmp = tar.with_name(f".tmp-{tar.name}-{os.getpid()}")
            try:
                eng.docker("save", "--output", tmp, name)
                timings["commit_and_save"] = time.monotonic() - started
                tmp.rename(tar)
            finally:
                tmp.unlink(missing_ok=True)
            info = {
                "name": name,
                "package": updated.package,
                "driver_version": VERSIONS[variant],
                "timings": timings,
                "bytes": tar.stat().st_size,
                "log": updated.result.stderr,
            }
            meta.write_text(json.dumps(info, indent=1) + "\n")
            log.warning("committed image %s: %s", name, info)
            _prune(stem)
    info = json.loads(meta.read_text())
    return CommittedImage(
        tar=tar,
        name=info["name"],
        kernel=kernel,
        variant=variant,
        driver_version=info["driver_version"],
        package=info["package"],
        built=built,
        log=info["log"],
    )


def _left_behind(cache: Path) -> list[str]:
    """What an update with `cache` mounted at CACHE_MOUNT left on this machine: loop devices
    or mounts of the cache, entries of its work directory."""
    work = cache / "work"
    return [
        *loops_of(cache, CACHE_MOUNT),
        *ours(cache, f"{CACHE_MOUNT}/")["mounts"],
        *map(str, work.iterdir() if work.is_dir() else ()),
    ]


def _prune(stem: Path) -> None:
    """Remove the cached committed images of the same variant and kernel made from other
    inputs (an older program): each is about a GB, and this machine's cache is kept."""
    prefix, key = stem.name.rsplit("-", 1)
    same = re.compile(rf"{re.escape(prefix)}-([0-9a-f]{{{len(key)}}})\.(tar|json|built)")
    for other in stem.parent.iterdir():
        match = same.fullmatch(other.name)
        if match and match[1] != key:
            log.warning("removing the stale committed image %s", other)
            shutil.rmtree(other) if other.is_dir() else other.unlink()


def _copy_out(eng: Engine, updated: Updated, kernel: str, dest: Path) -> None:
    """Copy the package `updated` made (`docker cp` from its container; it carries its
    linker) to `dest`, the image's `built`, beside an empty NVIDIA_DRIVER_CACHE: what a
    second node has that never built anything."""
    shutil.rmtree(dest, ignore_errors=True)
    package = _built_package(dest, kernel, updated.package)
    package.parent.mkdir(parents=True)
    eng.docker("cp", f"{updated.name}:{updated.package}", package)
    pkg.verify(package)
    (dest / "cache").mkdir()


CommittedImages = Callable[[str, Variant], CommittedImage]


def engine_disk(eng: Engine, committed: list[CommittedImage], names: list[str], disk: Path) -> None:
    """A raw ext4 disk image at `disk` holding a docker data root with the images
    `committed` (from their cached tars) and `names` (saved from `eng`) already loaded:
    mounted at /var/lib/docker in the QEMU guest, its dockerd starts with them. Loading
    them there instead costs minutes under TCG (`docker load` unpacks every layer twice
    and hashes it); here it takes seconds. The engine that fills it is a second one of
    the same dockerd, on a loop mount of the disk."""
    size = sum(image.tar.stat().st_size for image in committed) * 2 + (2 << 30)
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nvd-disk-")))
        with disk.open("wb") as f:
            f.truncate(size)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", disk], check=True)
        mnt = tmp / "mnt"
        mnt.mkdir()
        subprocess.run(["mount", "-o", "loop", disk, mnt], check=True)
        stack.callback(lambda: subprocess.run(["umount", "-d", mnt], check=True))
        tars = [image.tar for image in committed]
        if names:
            tars.append(tmp / "saved.tar")
            eng.docker("save", "--output", tars[-1], *names)
        with engine(data_root=mnt) as filler:
            for tar in tars:
                filler.docker("load", "--input", tar)


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[Engine]:
    """One private engine for the whole session (skips, or fails under CI, without one)."""
    from tests.conftest import need  # deferred: tests.conftest imports this module

    missing = missing_engine()
    need(not missing, f"a container engine: {', '.join(missing)} (.ci/install-deps)")
    with engine() as eng:
        yield eng


@pytest.fixture(scope="session")
def committed_images(request: pytest.FixtureRequest) -> CommittedImages:
    """`committed_images(kernel, variant)`: the seed's committed image (`committed_image`),
    made once per inputs; the session's engine starts only when one must be made."""
    return lambda kernel, variant: committed_image(
        kernel, variant, lambda: request.getfixturevalue("docker_engine")
    )
