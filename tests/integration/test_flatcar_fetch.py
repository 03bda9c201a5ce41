"""Fetching the developer container from a local HTTP server: verification, resumption,
cache reuse, and nothing left behind by any failure."""

from __future__ import annotations

import bz2
import contextlib
import hashlib
import http.server
import json
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from nvdriver import unpack
from nvdriver.config import Config
from nvdriver.errors import DriverError, IntegrityError
from nvdriver.flatcar import fetch, release, space
from nvdriver.flatcar.download import RetryPolicy
from nvdriver.flatcar.release import FlatcarRelease, resolve
from nvdriver.log import Progress
from nvdriver.run import run, which
from tests.conftest import need

RELEASE = FlatcarRelease("4230.2.3", "stable", "amd64-usr")
BASE = f"/stable/{RELEASE.board}/{RELEASE.version}/"
BZ2 = BASE + fetch.COMPRESSED_NAME
FAST = RetryPolicy(attempts=4, initial_delay=0.01, timeout=10)
MiB = 1 << 20


class Mirror(http.server.ThreadingHTTPServer):
    """Serves `files`; can cut a transfer short once and ignore Range requests."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.heads: list[str] = []
        self.if_range: list[str | None] = []
        self.cut_once: dict[str, int] = {}
        self.ignore_range = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{{channel}}"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: Mirror

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        srv = self.server
        srv.heads.append(self.path)
        body = srv.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()

    def do_GET(self) -> None:
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range")))
        body = srv.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        etag = f'"{hashlib.sha256(body).hexdigest()[:16]}"'
        srv.if_range.append(self.headers.get("If-Range"))
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        same = self.headers.get("If-Range") in (None, etag)
        if match and same and not srv.ignore_range:
            start = int(match[1])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("ETag", etag)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        cut = srv.cut_once.pop(self.path, None)
        if cut is not None and cut > start:
            self.wfile.write(body[start:cut])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body[start:])


@pytest.fixture
def mirror() -> Iterator[Mirror]:
    server = Mirror()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


class Gpg:
    """A throw-away GnuPG home with one signing key."""

    def __init__(self, home: Path, name: str) -> None:
        self.home = home
        home.mkdir(mode=0o700)
        self._gpg("--quick-gen-key", name, "ed25519", "sign", "never")
        self.public = home / "public.asc"
        self._gpg("--armor", "--output", str(self.public), "--export", name)

    def _gpg(self, *args: str) -> None:
        run(
            ["gpg", "--batch", "--homedir", self.home, "--pinentry-mode", "loopback",
             "--passphrase", "", "--yes", *args],
            timeout=60,
        )  # fmt: skip

    def fingerprint(self) -> str:
        """The key's fingerprint, as gpg lists it for machines (--with-colons)."""
        out = run(["gpg", "--batch", "--homedir", self.home, "--with-colons", "--list-keys"]).stdout
        return next(line.split(":")[9] for line in out.splitlines() if line.startswith("fpr:"))

    def clearsign(self, text: str) -> bytes:
        (self.home / "in").write_text(text)
        self._gpg("--clearsign", "--output", str(self.home / "out"), str(self.home / "in"))
        return (self.home / "out").read_bytes()

    def detach_sign(self, data: bytes) -> bytes:
        (self.home / "in").write_bytes(data)
        self._gpg("--detach-sign", "--output", str(self.home / "out"), str(self.home / "in"))
        return (self.home / "out").read_bytes()

    def close(self) -> None:
        run(["gpgconf", "--homedir", self.home, "--kill", "gpg-agent"], check=False)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gpg, Gpg]]:
    need(which("gpg") is not None and which("gpgv") is not None, "gpg and gpgv are needed")
    base = tmp_path_factory.mktemp("gpg")
    trusted, other = Gpg(base / "trusted", "trusted test key"), Gpg(base / "other", "other key")
    try:
        yield trusted, other
    finally:
        trusted.close()
        other.close()


@pytest.fixture(scope="module")
def image() -> bytes:
    """8 MiB, mostly zeros, with ~2 MiB of incompressible data (so the .bz2 is ~2 MiB)."""
    data = bytearray(8 * MiB)
    data[0 : MiB + 12345] = os.urandom(MiB + 12345)
    data[6 * MiB : 7 * MiB] = os.urandom(MiB)
    data[-3:] = b"end"
    return bytes(data)


@pytest.fixture(scope="module")
def compressed(image: bytes) -> bytes:
    # Two streams, as parallel compressors write them.
    half = len(image) // 2
    return bz2.compress(image[:half]) + bz2.compress(image[half:])


def digests(data: bytes, name: str = fetch.COMPRESSED_NAME) -> str:
    return (
        f"# MD5 HASH\n{hashlib.md5(data).hexdigest()}  {name}\n"
        f"# SHA1 HASH\n{hashlib.sha1(data).hexdigest()}  {name}\n"
        f"# SHA512 HASH\n{hashlib.sha512(data).hexdigest()}  {name}\n"
    )


def publish(mirror: Mirror, signer: Gpg, data: bytes, *, digests_of: bytes | None = None) -> None:
    mirror.files[BZ2] = data
    mirror.files[BZ2 + ".DIGESTS.asc"] = signer.clearsign(digests(digests_of or data))
    mirror.files[BZ2 + ".sig"] = signer.detach_sign(digests_of or data)


def config(mirror: Mirror, tmp_path: Path, key: Path) -> Config:
    return Config.from_env(
        {
            "FLATCAR_RELEASE_URL": mirror.url,
            "NVIDIA_DRIVER_CACHE": str(tmp_path / "cache"),
            "FLATCAR_SIGNING_KEY": str(key),
            "FLATCAR_BOARD": RELEASE.board,
        },
        max_threads=2,
    )


@pytest.fixture(params=["lbzip2", "stdlib"])
def decompressor(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "lbzip2":
        need(which("lbzip2") is not None, "lbzip2 is not installed")
    if request.param == "stdlib":
        monkeypatch.setattr(unpack, "which", lambda program: None)
    return str(request.param)


def cache_files(cfg: Config) -> list[str]:
    """Everything in the cache but the lock file."""
    return sorted(
        str(p.relative_to(cfg.cache_dir))
        for p in cfg.cache_dir.rglob("*")
        if p.is_file() and p.name != ".lock"
    )


def refused(cfg: Config, match: str | None = None) -> IntegrityError:
    """Fetching fails verification: exit 5, and nothing but the lock file in the cache."""
    with pytest.raises(IntegrityError, match=match) as info:
        fetch.fetch_developer_container(cfg, RELEASE, policy=FAST)
    assert int(info.value.exit_code) == 5
    assert cache_files(cfg) == []
    return info.value


def test_fetch_verifies_writes_sparse_and_reuses_the_cache(
    mirror: Mirror, keys: tuple[Gpg, Gpg], image: bytes, compressed: bytes, tmp_path: Path,
    decompressor: str,
) -> None:  # fmt: skip
    trusted, _ = keys
    publish(mirror, trusted, compressed)
    cfg = config(mirror, tmp_path, trusted.public)

    path = fetch.fetch_developer_container(cfg, RELEASE, policy=FAST)

    assert path == fetch.cache_path(cfg, RELEASE)
    assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(image).digest()
    assert path.stat().st_blocks * 512 < 4 * MiB  # holes where the image is zeros
    stamp = fetch.Stamp.from_file(fetch.stamp_path(path))
    assert stamp is not None
    assert stamp.sha512 == hashlib.sha512(compressed).hexdigest()
    assert stamp.version == RELEASE.version and stamp.size == len(image)
    assert cache_files(cfg) == sorted(
        str(p.relative_to(cfg.cache_dir)) for p in (path, fetch.stamp_path(path))
    )

    requests = len(mirror.requests)
    assert fetch.fetch_developer_container(cfg, RELEASE, policy=FAST) == path
    assert len(mirror.requests) == requests  # no request at all


def _children() -> dict[str, int]:
    """Our child processes, by name."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            text = stat.read_text()
            if int(text[text.rindex(")") + 2 :].split()[1]) == os.getpid():
                found[text[text.index("(") + 1 : text.rindex(")")]] = int(stat.parent.name)
    return found


def _fds(pid: int | str) -> dict[int, str]:
    """What the open file descriptors of `pid` point to (one listing them is gone when read)."""
    links = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            links[int(fd)] = os.readlink(f"/proc/{pid}/fd/{fd}")
    return links


def test_the_decompressed_image_never_passes_through_python(
    mirror: Mirror, keys: tuple[Gpg, Gpg], image: bytes, compressed: bytes, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    need(which("lbzip2") is not None, "lbzip2 is not installed")
    trusted, _ = keys
    publish(mirror, trusted, compressed)
    cfg = config(mirror, tmp_path, trusted.public)
    seen: list[tuple[str, dict[int, str], dict[int, str]]] = []
    update = Progress.update

    def look(self: Progress, done: int, *, force: bool = False) -> None:
        """While the download runs: lbzip2's output pipe, who holds it, where it goes."""
        children = _children()
        if "lbzip2" in children and not seen:
            pipe = _fds(children["lbzip2"])[1]
            seen.append((pipe, _fds("self"), _fds(children["dd"]) if "dd" in children else {}))
        update(self, done, force=force)

    monkeypatch.setattr(Progress, "update", look)
    path = fetch.fetch_developer_container(cfg, RELEASE, policy=FAST)

    assert seen, "no lbzip2 seen during the download"
    pipe, ours, dd = seen[0]
    assert pipe.startswith("pipe:")
    # Not open in this process: no decompressed byte can reach Python. dd reads it
    # and writes the partial image.
    assert pipe not in ours.values()
    assert dd and dd[0] == pipe and Path(dd[1]).name.startswith(fetch.PARTIAL_PREFIX)
    assert path.read_bytes() == image


def test_interrupted_download_resumes_with_a_range_request(
    mirror: Mirror, keys: tuple[Gpg, Gpg], image: bytes, compressed: bytes, tmp_path: Path,
    decompressor: str,
) -> None:  # fmt: skip
    trusted, _ = keys
    publish(mirror, trusted, compressed)
    cut = len(compressed) * 2 // 3
    mirror.cut_once[BZ2] = cut
    cfg = config(mirror, tmp_path, trusted.public)

    path = fetch.fetch_developer_container(cfg, RELEASE, policy=FAST)

    assert path.read_bytes() == image
    ranges = [r for p, r in mirror.requests if p == BZ2]
    assert ranges[0] is None
    assert len(ranges) == 2
    assert ranges[1] is not None
    resumed_at = int(ranges[1].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= cut
    # Resumed only if the file is still the same one (its ETag).
    assert mirror.if_range[-1] == f'"{hashlib.sha256(compressed).hexdigest()[:16]}"'


def test_server_ignoring_range_means_a_clean_restart(
    mirror: Mirror, keys: tuple[Gpg, Gpg], image: bytes, compressed: bytes, tmp_path: Path,
    decompressor: str,
) -> None:  # fmt: skip
    trusted, _ = keys
    publish(mirror, trusted, compressed)
    mirror.cut_once[BZ2] = len(compressed) // 2
    mirror.ignore_range = True
    cfg = config(mirror, tmp_path, trusted.public)

    path = fetch.fetch_developer_container(cfg, RELEASE, policy=FAST)

    assert path.read_bytes() == image
    assert [r is None for p, r in mirror.requests if p == BZ2] == [True, False, True]
    assert len(cache_files(cfg)) == 2


def test_digest_mismatch_is_exit_5_and_caches_nothing(
    mirror: Mirror, keys: tuple[Gpg, Gpg], compressed: bytes, tmp_path: Path, decompressor: str
) -> None:
    trusted, _ = keys
    # A well-formed archive, but not the one the signed DIGESTS describe.
    publish(mirror, trusted, bz2.compress(b"something else" * 1000), digests_of=compressed)
    cfg = config(mirror, tmp_path, trusted.public)

    refused(cfg, "does not match its signed digest")


def test_tampered_download_is_exit_5_and_caches_nothing(
    mirror: Mirror, keys: tuple[Gpg, Gpg], compressed: bytes, tmp_path: Path, decompressor: str
) -> None:
    trusted, _ = keys
    publish(mirror, trusted, compressed)
    tampered = bytearray(compressed)
    tampered[len(tampered) // 2] ^= 0xFF
    mirror.files[BZ2] = bytes(tampered)
    cfg = config(mirror, tmp_path, trusted.public)

    # The flipped byte breaks a bzip2 block too: the digest, not the decompressor, speaks.
    got, expected = hashlib.sha512(tampered).hexdigest(), hashlib.sha512(compressed).hexdigest()
    error = refused(
        cfg, f"does not match its signed digest in .*: SHA-512 {got}, expected {expected}"
    )
    assert "did not decompress" in str(error.__cause__)


def test_digests_signed_by_another_key_are_exit_5(
    mirror: Mirror, keys: tuple[Gpg, Gpg], compressed: bytes, tmp_path: Path
) -> None:
    trusted, other = keys
    publish(mirror, other, compressed)
    cfg = config(mirror, tmp_path, trusted.public)

    error = refused(cfg, r"signature of .*DIGESTS\.asc is by key")
    # What an operator needs when Flatcar has rotated its key: which key file is
    # configured, its fingerprint, the signer's key, and what to do.
    assert str(trusted.public) in error.message
    assert trusted.fingerprint() in error.message
    assert other.fingerprint()[-16:] in error.message  # gpgv names the signer by key id
    assert error.hint is not None and "FLATCAR_SIGNING_KEY" in error.hint
    assert "rebuild the driver image" in error.hint
    assert [p for p, _ in mirror.requests if p == BZ2] == []  # never downloaded


def test_digests_changed_after_signing_are_exit_5_and_say_so(
    mirror: Mirror, keys: tuple[Gpg, Gpg], compressed: bytes, tmp_path: Path
) -> None:
    trusted, _ = keys
    publish(mirror, trusted, compressed)
    signed = mirror.files[BZ2 + ".DIGESTS.asc"]
    mirror.files[BZ2 + ".DIGESTS.asc"] = signed.replace(b"# MD5 HASH", b"# MD6 HASH")
    cfg = config(mirror, tmp_path, trusted.public)

    error = refused(cfg, r"does not match its content")
    assert trusted.fingerprint() in error.message


def test_detached_signature_when_digests_are_missing(
    mirror: Mirror, keys: tuple[Gpg, Gpg], image: bytes, compressed: bytes, tmp_path: Path,
    decompressor: str,
) -> None:  # fmt: skip
    trusted, _ = keys
    publish(mirror, trusted, compressed)
    del mirror.files[BZ2 + ".DIGESTS.asc"]
    mirror.cut_once[BZ2] = len(compressed) // 3  # the signature check survives a resume
    cfg = config(mirror, tmp_path, trusted.public)

    path = fetch.fetch_developer_container(cfg, RELEASE, policy=FAST)

    assert path.read_bytes() == image


def test_detached_signature_of_another_key_is_exit_5(
    mirror: Mirror, keys: tuple[Gpg, Gpg], compressed: bytes, tmp_path: Path, decompressor: str
) -> None:
    trusted, other = keys
    publish(mirror, other, compressed)
    del mirror.files[BZ2 + ".DIGESTS.asc"]
    cfg = config(mirror, tmp_path, trusted.public)

    error = refused(cfg, "detached signature .* is by key")
    assert str(trusted.public) in error.message and trusted.fingerprint() in error.message


def test_no_signature_at_all_is_exit_5(
    mirror: Mirror, keys: tuple[Gpg, Gpg], compressed: bytes, tmp_path: Path
) -> None:
    trusted, _ = keys
    mirror.files[BZ2] = compressed
    cfg = config(mirror, tmp_path, trusted.public)

    refused(cfg, "cannot be verified")


def test_truncated_bz2_fails_to_decompress_and_caches_nothing(
    mirror: Mirror, keys: tuple[Gpg, Gpg], compressed: bytes, tmp_path: Path, decompressor: str
) -> None:
    trusted, _ = keys
    # Correctly signed, but the archive itself ends early.
    publish(mirror, trusted, compressed[: len(compressed) - 1000])
    cfg = config(mirror, tmp_path, trusted.public)

    refused(cfg, "did not decompress")


def test_missing_release_names_the_url(
    mirror: Mirror, keys: tuple[Gpg, Gpg], compressed: bytes, tmp_path: Path
) -> None:
    trusted, _ = keys
    publish(mirror, trusted, compressed)
    del mirror.files[BZ2]
    cfg = config(mirror, tmp_path, trusted.public)

    with pytest.raises(DriverError, match=re.escape(BZ2) + " does not exist"):
        fetch.fetch_developer_container(cfg, RELEASE, policy=FAST)
    assert cache_files(cfg) == []


def test_unreachable_server_names_the_url(keys: tuple[Gpg, Gpg], tmp_path: Path) -> None:
    trusted, _ = keys
    closed = Mirror()  # bound, then closed: nothing listens on its port
    closed.server_close()
    cfg = config(closed, tmp_path, trusted.public)
    with pytest.raises(DriverError, match=r"Could not download http://127\.0\.0\.1:\d+/stable/"):
        fetch.fetch_developer_container(cfg, RELEASE, policy=FAST)


def test_interrupt_midway_removes_the_partial_file(
    mirror: Mirror, keys: tuple[Gpg, Gpg], compressed: bytes, tmp_path: Path,
    decompressor: str, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    trusted, _ = keys
    publish(mirror, trusted, compressed)
    cfg = config(mirror, tmp_path, trusted.public)

    def interrupt(self: object, done: int, *, force: bool = False) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(Progress, "update", interrupt)
    with pytest.raises(KeyboardInterrupt):
        fetch.fetch_developer_container(cfg, RELEASE, policy=FAST)
    assert cache_files(cfg) == []


def test_leftover_partial_of_a_killed_run_is_removed(
    mirror: Mirror, keys: tuple[Gpg, Gpg], compressed: bytes, tmp_path: Path
) -> None:
    trusted, _ = keys
    publish(mirror, trusted, compressed)
    cfg = config(mirror, tmp_path, trusted.public)
    final = fetch.cache_path(cfg, RELEASE)
    final.parent.mkdir(parents=True)
    (final.parent / ".partial-killed").write_bytes(b"x" * 1000)
    final.write_bytes(b"unverified")  # no stamp: never trusted

    fetch.fetch_developer_container(cfg, RELEASE, policy=FAST)

    assert cache_files(cfg) == sorted(
        str(p.relative_to(cfg.cache_dir)) for p in (final, fetch.stamp_path(final))
    )


@contextlib.contextmanager
def small_cache(cfg: Config, size: str) -> Iterator[None]:
    cfg.cache_dir.mkdir()
    run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", cfg.cache_dir])
    try:
        yield
    finally:
        run(["umount", cfg.cache_dir])


def test_too_little_space_is_refused_before_the_download_naming_bytes_and_directory(
    mirror: Mirror, keys: tuple[Gpg, Gpg], compressed: bytes, tmp_path: Path
) -> None:
    need(os.geteuid() == 0, "mounting a small tmpfs needs root")
    trusted, _ = keys
    publish(mirror, trusted, compressed)
    cfg = config(mirror, tmp_path, trusted.public)
    with small_cache(cfg, "4m"):
        directory = fetch.cache_path(cfg, RELEASE).parent
        with pytest.raises(DriverError, match="Not enough space") as info:
            fetch.fetch_developer_container(cfg, RELEASE, policy=FAST)
        message = str(info.value)
        free = space.free_bytes(cfg.cache_dir)
        assert str(directory) in message
        assert f"needs about {space.EXPANSION * len(compressed)} bytes" in message
        assert f"and {free} bytes" in message and 0 < free <= 4 * MiB
        assert "packages prune" in (info.value.hint or "")
        assert mirror.heads == [BZ2]
        assert [path for path, _ in mirror.requests if path == BZ2] == []  # never fetched
        assert cache_files(cfg) == []


def test_without_a_size_from_the_server_the_documented_need_is_checked(
    mirror: Mirror, keys: tuple[Gpg, Gpg], compressed: bytes, tmp_path: Path
) -> None:
    need(os.geteuid() == 0, "mounting a small tmpfs needs root")
    trusted, _ = keys
    publish(mirror, trusted, compressed)
    cfg = config(mirror, tmp_path, trusted.public)
    closed = Mirror()  # a server that cannot be reached for the HEAD request
    closed.server_close()
    url = closed.url.replace("{channel}", "stable") + BZ2.removeprefix("/stable")
    assert space.compressed_size(url, FAST) is None
    with small_cache(cfg, "4m"), pytest.raises(DriverError, match="does not say its size") as e:
        space.require_room_for_developer_container(url, cfg.cache_dir, FAST)
    assert f"needs about {space.UNKNOWN_NEED} bytes" in str(e.value)


def test_full_disk_is_a_clear_error_naming_the_cache(
    mirror: Mirror,
    keys: tuple[Gpg, Gpg],
    compressed: bytes,
    tmp_path: Path,
    decompressor: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The space check is an estimate: an image that decompresses to more than it said
    still meets a full disk, and the fetch reports that."""
    need(os.geteuid() == 0, "mounting a small tmpfs needs root")
    monkeypatch.setattr(space, "EXPANSION", 0)
    trusted, _ = keys
    publish(mirror, trusted, compressed)
    cfg = config(mirror, tmp_path, trusted.public)
    cfg.cache_dir.mkdir()
    run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", cfg.cache_dir])
    try:
        with pytest.raises(DriverError, match="is full") as info:
            fetch.fetch_developer_container(cfg, RELEASE, policy=FAST)
        message = str(info.value)
        assert str(fetch.cache_path(cfg, RELEASE).parent) in message
        assert re.search(r"needs about \d+ MiB", message)
        assert cache_files(cfg) == []
    finally:
        run(["umount", cfg.cache_dir])


def test_releases_feed_over_http(mirror: Mirror, tmp_path: Path) -> None:
    entry = {"channel": "beta", "major_software": {"kernel": ["6.12.60"]}}
    mirror.files["/releases-beta.json"] = json.dumps(
        {"current": entry, "4300.1.0": entry, "4300.1.1": entry}
    ).encode()
    feed = mirror.url.replace("/{channel}", "/releases-{channel}.json")
    cfg = Config.from_env(
        {"FLATCAR_RELEASES_FEED": feed, "FLATCAR_CHANNEL": "beta", "HOST_ROOT": str(tmp_path)}
    )
    assert resolve(cfg, "6.12.60-flatcar").version == "4300.1.1"


def test_unreachable_releases_feed_names_the_url(tmp_path: Path) -> None:
    closed = Mirror()
    closed.server_close()
    feed = closed.url.replace("/{channel}", "/releases-{channel}.json")
    cfg = Config.from_env({"FLATCAR_RELEASES_FEED": feed, "HOST_ROOT": str(tmp_path)})
    with pytest.raises(DriverError, match=r"Could not download http://.*/releases-stable\.json"):
        release.load_feed(release.feed_url(cfg, "stable"), policy=FAST)
