"""The image and the seed's workflow on the host, with a real engine (tests/container.py).

The repository's Dockerfile is built (the stand-in driver as an NVIDIA .run, and
Debian's real 535.261.03 packages), `nvidia-driver update --kernel K` runs in a
container of it against the local Flatcar mirror, and `docker commit` makes the image a
node runs. What is checked is that committed image as `docker save` wrote it, read with
tarfile: its entrypoint, the package in its store, no linked proprietary module in any
layer, what the NVIDIA Container Toolkit looks for in its root, and no private key.
The image is run on a real kernel by tests/vm (the QEMU guest).
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import gzip
import hashlib
import io
import json
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import IO

import pytest

from nvdriver.driver import package as pkg
from tests.conftest import need
from tests.container import (
    STANDIN_FIRMWARE,
    CommittedImage,
    CommittedImages,
    Engine,
    Variant,
    build_image,
    update_container,
)
from tests.flatcar_mirror import FlatcarMirror, serve_mirror
from tests.integration.test_signing import signing_key

__all__ = ["signing_key"]

VARIANTS: tuple[Variant, ...] = ("standin", "real")
# Where the NVIDIA Container Toolkit (libnvidia-container) looks in the driver root:
# binaries in the usual bin directories, libraries through the root's ld.so.cache in the
# multiarch or lib64 directory, the GSP firmware under lib/firmware/nvidia/<version>/.
TOOLKIT_BIN_DIRS = ("usr/bin", "usr/sbin", "bin", "sbin")
TOOLKIT_LIB_DIRS = ("usr/lib/x86_64-linux-gnu", "usr/lib64", "lib/x86_64-linux-gnu", "lib64")
TOOLKIT_LIBS = ("libnvidia-ml.so.1", "libcuda.so.1")
HOST_FIRMWARE = Path("/usr/lib/firmware/nvidia")  # Debian's firmware-nvidia-gsp, here


class SavedImage:
    """A `docker save` tar (open `outer`): its config, and its layers flattened as the
    engine does (whiteouts applied), readable through the image's own symlinks."""

    def __init__(self, outer: tarfile.TarFile) -> None:
        self._outer = outer
        [entry] = json.load(self._extract("manifest.json"))
        self.tags: list[str] = entry["RepoTags"]
        self.config = json.load(self._extract(entry["Config"]))
        self.layers: list[str] = entry["Layers"]
        self.files: dict[str, tuple[str, tarfile.TarInfo]] = {}
        for layer in self.layers:
            with self._layer(layer) as members:
                for member in members:
                    name = _norm(member.name)
                    parent, base = name.rpartition("/")[::2]
                    if base == ".wh..wh..opq":
                        self._drop(parent, keep_itself=True)
                    elif base.startswith(".wh."):
                        self._drop(f"{parent}/{base[4:]}".lstrip("/"))
                    else:
                        self.files[name] = (layer, member)

    def _extract(self, name: str) -> IO[bytes]:
        f = self._outer.extractfile(name)
        assert f is not None, name
        return f

    def _layer(self, name: str) -> tarfile.TarFile:
        return tarfile.open(fileobj=self._extract(name))

    def _drop(self, path: str, *, keep_itself: bool = False) -> None:
        for name in [n for n in self.files if n.startswith(f"{path}/") or n == path]:
            if not (keep_itself and name == path):
                del self.files[name]

    def all_members(self) -> Iterator[tarfile.TarInfo]:
        """Every member of every layer, deleted ones included."""
        for layer in self.layers:
            with self._layer(layer) as members:
                yield from members.getmembers()

    def resolve(self, path: str) -> str:
        """`path` with the image's symlinks followed inside the image (as the toolkit
        follows them under the driver root)."""
        parts = [p for p in path.split("/") if p]
        done: list[str] = []
        hops = 0
        while parts:
            part = parts.pop(0)
            if part == ".":
                continue
            if part == "..":
                done = done[:-1]
                continue
            found = self.files.get("/".join([*done, part]))
            if found is not None and found[1].issym():
                hops += 1
                assert hops < 40, f"symlink loop at {path}"
                target = found[1].linkname
                parts = [p for p in target.split("/") if p] + parts
                done = [] if target.startswith("/") else done
                continue
            done.append(part)
        return "/".join(done)

    def member(self, path: str) -> tarfile.TarInfo | None:
        found = self.files.get(self.resolve(path))
        return found[1] if found else None

    def read(self, path: str) -> bytes:
        layer, member = self.files[self.resolve(path)]
        with self._layer(layer) as members:
            f = members.extractfile(member)
            assert f is not None, path
            return f.read()


@contextlib.contextmanager
def saved_image(path: Path) -> Iterator[SavedImage]:
    with tarfile.open(path) as outer:
        yield SavedImage(outer)


def _norm(name: str) -> str:
    return str(PurePosixPath("/", name)).lstrip("/")


@pytest.fixture(scope="module")
def opened() -> Iterator[Callable[[Path], SavedImage]]:
    """`opened(tar)`: the saved image at `tar`, opened once for the module's tests."""
    with contextlib.ExitStack() as stack:
        images: dict[Path, SavedImage] = {}

        def get(tar: Path) -> SavedImage:
            if tar not in images:
                images[tar] = stack.enter_context(saved_image(tar))
            return images[tar]

        yield get


@pytest.fixture(params=VARIANTS)
def committed(
    request: pytest.FixtureRequest,
    kernel: str,
    committed_images: CommittedImages,
    opened: Callable[[Path], SavedImage],
) -> tuple[CommittedImage, SavedImage]:
    """The committed image of each variant for each kernel under test, and its tar."""
    image = committed_images(kernel, request.param)
    return image, opened(image.tar)


def test_the_committed_image_runs_init(committed: tuple[CommittedImage, SavedImage]) -> None:
    image, tar = committed
    assert tar.tags == [image.name]
    assert tar.config["config"]["Entrypoint"] == ["nvidia-driver", "init"]
    assert not tar.config["config"].get("Cmd"), tar.config["config"]["Cmd"]


def test_the_committed_image_holds_the_package_and_no_linked_module(
    committed: tuple[CommittedImage, SavedImage], tmp_path: Path
) -> None:
    image, tar = committed
    source = f"usr/src/nvidia-{image.driver_version}"
    assert image.package.startswith(f"/{source}/kernel/precompiled/{image.kernel}/")
    package = tmp_path / image.kernel / PurePosixPath(image.package).name
    package.parent.mkdir()
    package.write_bytes(tar.read(image.package))
    manifest = pkg.verify(package)
    assert (manifest.kernel_release, manifest.driver_version) == (
        image.kernel,
        image.driver_version,
    )
    # Split modules are stored unlinked: no nvidia.ko or nvidia-modeset.ko in the package,
    with tarfile.open(package) as members:
        names = {PurePosixPath(m.name).name for m in members}
    assert not names & {"nvidia.ko", "nvidia-modeset.ko"}, sorted(names)
    # and no NVIDIA module at all in any layer (deleted files included).
    modules = [m.name for m in tar.all_members() if fnmatch.fnmatch(m.name, "*/nvidia*.ko*")]
    assert modules == []


def test_the_toolkit_finds_the_driver_in_the_image_root(
    committed: tuple[CommittedImage, SavedImage],
) -> None:
    """What `/run/nvidia/driver` exposes (the image's root): nvidia-smi, the libraries in
    the root's ld.so.cache, the GSP firmware of this driver version."""
    image, tar = committed

    def regular(dirs: Iterable[str], name: str) -> str:
        paths = [f"{d}/{name}" for d in dirs if (m := tar.member(f"{d}/{name}")) and m.isreg()]
        assert paths, f"{name} is in none of {', '.join(dirs)}"
        return paths[0]

    smi = regular(TOOLKIT_BIN_DIRS, "nvidia-smi")
    ld_cache = tar.read("etc/ld.so.cache")
    for lib in TOOLKIT_LIBS:
        path = regular(TOOLKIT_LIB_DIRS, lib)
        assert tar.read(path)[:4] == b"\x7fELF", path
        assert lib.encode() in ld_cache, f"{lib} is not in the root's ld.so.cache"
    firmware_dir = f"lib/firmware/nvidia/{image.driver_version}"
    firmware = sorted(
        PurePosixPath(n).name
        for n in tar.files
        if n.startswith(tar.resolve(firmware_dir) + "/") and n.endswith(".bin")
    )
    assert [f for f in firmware if f.startswith("gsp_")], firmware
    if image.variant == "real":
        assert tar.read(smi)[:4] == b"\x7fELF"  # NVIDIA's binary, through Debian's links
        host = HOST_FIRMWARE / image.driver_version
        need(host.is_dir(), f"{host} (firmware-nvidia-gsp={image.driver_version}-1)")
        assert firmware == sorted(p.name for p in host.glob("*.bin"))
        for name in firmware:
            got = hashlib.sha256(tar.read(f"{firmware_dir}/{name}")).hexdigest()
            assert got == hashlib.sha256((host / name).read_bytes()).hexdigest(), name
    else:
        assert firmware == sorted(STANDIN_FIRMWARE)
        for name in firmware:
            assert tar.read(f"{firmware_dir}/{name}").startswith(b"stand-in GSP firmware")


# -- the private key of `update --sign` (stand-in image, one kernel)


def key_fragments(pem: Path) -> list[bytes]:
    """Byte sequences that only the private key has: lines of its PEM body, and a run
    of its DER encoding (what a copy in any other form would still contain)."""
    text = pem.read_text()
    m = re.search(r"-----BEGIN PRIVATE KEY-----\n(.*?)-----END PRIVATE KEY-----", text, re.S)
    assert m, f"{pem} has no private key"
    lines = m.group(1).split()
    der = base64.b64decode("".join(lines))
    return [lines[1].encode(), lines[len(lines) // 2].encode(), der[100:164]]


def holds_any(path: Path, fragments: list[bytes]) -> list[str]:
    """Where `fragments` occur in the tar at `path`: in each of its members, and, the
    same way, in the members of every tar or gzip'd tar among them (layers hold the
    packages, which are tar.gz). One member is in memory at a time."""
    found: list[str] = []

    def scan_tar(name: str, tar: tarfile.TarFile) -> None:
        for member in tar:
            f = tar.extractfile(member) if member.isreg() else None
            if f is not None:
                scan(f"{name}:{member.name}", f.read())

    def scan(name: str, data: bytes) -> None:
        if any(f in data for f in fragments):
            found.append(name)
        if data[:2] == b"\x1f\x8b":
            with contextlib.suppress(OSError, EOFError):
                scan(f"{name} (gunzip)", gzip.decompress(data))
        elif data[257:262] == b"ustar":
            with (
                contextlib.suppress(tarfile.TarError),
                tarfile.open(fileobj=io.BytesIO(data)) as inner,
            ):
                scan_tar(name, inner)

    with tarfile.open(path) as tar:
        scan_tar(path.name, tar)
    return found


def test_the_key_search_finds_a_key_where_there_is_one(signing_key: Path, tmp_path: Path) -> None:
    """The search of the next test can fail: a key packed as a package would be (in a
    tar.gz inside a layer tar inside the saved image) is found, PEM and DER alike."""
    fragments = key_fragments(signing_key)
    der = tmp_path / "key.der"
    der.write_bytes(base64.b64decode("".join(signing_key.read_text().split("-----")[2].split())))
    packed = tmp_path / "package.tar.gz"
    with tarfile.open(packed, "w:gz") as t:
        t.add(der, "key.der")
    layer = tmp_path / "layer.tar"
    with tarfile.open(layer, "w") as t:
        t.add(packed, "usr/src/package.tar.gz")
    image = tmp_path / "image.tar"
    with tarfile.open(image, "w") as t:
        t.add(layer, "abc/layer.tar")
    assert "image.tar:abc/layer.tar:usr/src/package.tar.gz (gunzip):key.der" in holds_any(
        image, fragments
    )
    assert holds_any(packed, key_fragments(signing_key)[:2]) == []  # PEM lines: not in DER


@pytest.fixture(scope="module")
def standin_image(docker_engine: Engine, flatcar_mirror: FlatcarMirror) -> str:
    return build_image(docker_engine, "standin", flatcar_mirror.signing_key)


def test_a_signed_update_commits_no_private_key(
    docker_engine: Engine,
    standin_image: str,
    flatcar_mirror: FlatcarMirror,
    kernel_release: str,
    signing_key: Path,
    tmp_path: Path,
) -> None:
    with (
        serve_mirror(flatcar_mirror) as server,
        update_container(
            docker_engine,
            standin_image,
            kernel_release,
            server,
            run_args=("-v", f"{signing_key}:/keys/module-signing.pem:ro"),
            update_args=("--sign", "/keys/module-signing.pem"),
        ) as updated,
    ):
        assert updated.result.returncode == 0, updated.explain()
        docker_engine.docker("commit", updated.name, "nvidia-driver-test:signed")
    saved = tmp_path / "signed.tar"
    try:
        docker_engine.docker("save", "--output", saved, "nvidia-driver-test:signed")
    finally:
        docker_engine.docker("rmi", "nvidia-driver-test:signed")
    package = tmp_path / kernel_release / PurePosixPath(updated.package).name
    package.parent.mkdir()
    with saved_image(saved) as image:
        package.write_bytes(image.read(updated.package))
    assert pkg.verify(package).signing == {"hash": "sha512", "signer": "nvidia-driver test signer"}
    assert holds_any(saved, key_fragments(signing_key)) == []


def test_a_key_on_the_containers_own_layer_is_refused(
    docker_engine: Engine,
    standin_image: str,
    flatcar_mirror: FlatcarMirror,
    kernel_release: str,
    signing_key: Path,
) -> None:
    """`docker commit` would keep it: exit 2, the reason, nothing built."""

    def copy_key(name: str) -> None:
        docker_engine.docker("cp", signing_key, f"{name}:/root/module-signing.pem")

    with (
        serve_mirror(flatcar_mirror) as server,
        update_container(
            docker_engine,
            standin_image,
            kernel_release,
            server,
            update_args=("--sign", "/root/module-signing.pem"),
            create=copy_key,
        ) as updated,
    ):
        assert updated.result.returncode == 2, updated.explain()
        assert "docker commit" in updated.result.stderr, updated.explain()
        assert updated.result.stdout == ""
        assert server.requests_for("flatcar_developer_container.bin.bz2") == []


def test_update_needs_no_dev_mount_for_its_loop_device(
    docker_engine: Engine, standin_image: str, flatcar_mirror: FlatcarMirror, kernel_release: str
) -> None:
    """Without `-v /dev:/dev` the container's /dev is a snapshot from its start: the loop
    device `update` asks /dev/loop-control for has no node there until it makes one."""
    with (
        serve_mirror(flatcar_mirror) as server,
        update_container(
            docker_engine, standin_image, kernel_release, server, dev=False
        ) as updated,
    ):
        assert updated.result.returncode == 0, updated.explain()
        assert updated.package.endswith(".tar.gz"), updated.explain()
