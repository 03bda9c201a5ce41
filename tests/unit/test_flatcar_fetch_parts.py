"""The pieces of the developer container fetch: DIGESTS, the sparse writer (dd), bz2, the stamp."""

from __future__ import annotations

import bz2
import ctypes
import errno
import hashlib
import os
from pathlib import Path

import pytest

from nvdriver import unpack
from nvdriver.config import Config
from nvdriver.errors import IntegrityError
from nvdriver.flatcar import fetch
from nvdriver.flatcar.download import RetryPolicy
from nvdriver.flatcar.release import FlatcarRelease

NAME = "flatcar_developer_container.bin.bz2"
SHA512 = "a" * 128

FLATCAR_DIGESTS = f"""# MD5 HASH
{"b" * 32}  {NAME}
# SHA1 HASH
{"c" * 40}  {NAME}
# SHA512 HASH
{SHA512}  {NAME}
"""


def test_digests_take_the_sha512_section() -> None:
    digests = fetch.Digests.from_text(FLATCAR_DIGESTS, source="x.DIGESTS")
    assert digests.sha512(NAME, source="x") == SHA512
    assert digests.sections["MD5"][NAME] == "b" * 32


def test_digests_accept_binary_marker_and_upper_case_hex() -> None:
    text = f"# SHA512 HASH\n{'A' * 128} *{NAME}\n"
    assert fetch.Digests.from_text(text, source="x").sha512(NAME, source="x") == SHA512


def test_digests_without_the_file_are_an_integrity_error() -> None:
    digests = fetch.Digests.from_text(FLATCAR_DIGESTS.replace(NAME, "other.bz2"), source="x")
    with pytest.raises(IntegrityError, match="no SHA-512 digest of"):
        digests.sha512(NAME, source="x.DIGESTS")


def test_digests_without_a_sha512_section_are_an_integrity_error() -> None:
    digests = fetch.Digests.from_text(f"# MD5 HASH\n{'b' * 32}  {NAME}\n", source="x")
    with pytest.raises(IntegrityError):
        digests.sha512(NAME, source="x")


@pytest.mark.parametrize("text", ["not a digest file\n", f"# SHA512 HASH\n{SHA512}\n"])
def test_malformed_digests_are_an_integrity_error(text: str) -> None:
    with pytest.raises(IntegrityError, match="malformed"):
        fetch.Digests.from_text(text, source="x.DIGESTS")


def test_digest_of_wrong_length_is_rejected() -> None:
    digests = fetch.Digests.from_text(f"# SHA512 HASH\n{'a' * 64}  {NAME}\n", source="x")
    with pytest.raises(IntegrityError):
        digests.sha512(NAME, source="x")


def _image(block: int) -> bytes:
    """Data, a long run of zeros, data again, and trailing zeros."""
    return (
        os.urandom(3 * block + 17)
        + bytes(40 * block)
        + b"x" * 5
        + bytes(block - 5)
        + os.urandom(100)
        + bytes(9 * block)
    )


@pytest.mark.parametrize("piece", [1000, 65536, 3 << 20])
def test_sparse_writer_keeps_content_and_makes_holes(tmp_path: Path, piece: int) -> None:
    data = _image(unpack.SPARSE_BLOCK)
    path = tmp_path / "out"
    with path.open("wb") as out, unpack.sparse_writer(out.fileno()) as writer:
        for i in range(0, len(data), piece):
            writer.write(data[i : i + piece])
        assert writer.finish() == len(data)
    assert path.read_bytes() == data
    assert path.stat().st_blocks * 512 < len(data) // 4


def test_sparse_writer_reports_the_error_dd_met(tmp_path: Path) -> None:
    # /dev/full fails every write with ENOSPC, as a full cache file system does.
    with (
        open("/dev/full", "wb") as out,
        unpack.sparse_writer(out.fileno()) as writer,
        pytest.raises(OSError) as info,
    ):
        writer.write(os.urandom(4 << 20))  # more than the pipe holds
        writer.finish()
    assert info.value.errno == errno.ENOSPC


def _decompress(tmp_path: Path, compressed: bytes, piece: int) -> bytes:
    """Feed `compressed` to a Bz2Decompressor in pieces; what it wrote."""
    path = tmp_path / "out"
    with path.open("wb") as out, unpack.sparse_writer(out.fileno()) as writer:
        dec = unpack.Bz2Decompressor(writer, "http://x/y.bz2")
        for i in range(0, len(compressed), piece):
            dec.feed(compressed[i : i + piece])
        dec.finish()
        writer.finish()
    return path.read_bytes()


def test_bz2_decompressor_handles_several_streams(tmp_path: Path) -> None:
    parts = [os.urandom(5000), bytes(1 << 22), b"tail"]
    compressed = b"".join(bz2.compress(p) for p in parts)
    data = _decompress(tmp_path, compressed, 777)
    assert hashlib.sha256(data).digest() == hashlib.sha256(b"".join(parts)).digest()


def test_bz2_decompressor_reports_truncation(tmp_path: Path) -> None:
    compressed = bz2.compress(os.urandom(10000))
    with pytest.raises(IntegrityError, match=r"http://x/y.bz2 did not decompress"):
        _decompress(tmp_path, compressed[: len(compressed) // 2], 1 << 20)


def test_bz2_decompressor_reports_garbage(tmp_path: Path) -> None:
    with pytest.raises(IntegrityError, match="did not decompress"):
        _decompress(tmp_path, b"this is not bzip2 data at all", 1 << 20)


def _config(tmp_path: Path, url: str = "https://{channel}.release.example") -> Config:
    return Config.from_env({"NVIDIA_DRIVER_CACHE": str(tmp_path), "FLATCAR_RELEASE_URL": url})


def test_url_and_cache_path() -> None:
    config = _config(Path("/cache"))
    rel = FlatcarRelease("4081.3.5", "lts", "arm64-usr")
    assert fetch.developer_container_url(config, rel) == (
        "https://lts.release.example/arm64-usr/4081.3.5/flatcar_developer_container.bin.bz2"
    )
    assert fetch.cache_path(config, rel) == Path(
        "/cache/flatcar/arm64-usr/4081.3.5/flatcar_developer_container.bin"
    )


def test_image_without_a_stamp_is_discarded(tmp_path: Path) -> None:
    rel = FlatcarRelease("4230.2.3", "stable", "amd64-usr")
    image = fetch.cache_path(_config(tmp_path), rel)
    image.parent.mkdir(parents=True)
    image.write_bytes(b"half")
    assert fetch.cached_image(image, rel) is None
    assert not image.exists()


def test_stamp_of_another_size_is_not_trusted(tmp_path: Path) -> None:
    rel = FlatcarRelease("4230.2.3", "stable", "amd64-usr")
    image = tmp_path / "img.bin"
    image.write_bytes(b"1234")
    stamp = fetch.Stamp(SHA512, rel.version, rel.board, 4, "u", "2026-01-01T00:00:00+00:00")
    stamp.write(fetch.stamp_path(image))
    assert fetch.cached_image(image, rel) == stamp
    image.write_bytes(b"12345")
    assert fetch.cached_image(image, rel) is None
    assert not image.exists() and not fetch.stamp_path(image).exists()


def test_retry_delay_grows_exponentially_up_to_a_cap() -> None:
    policy = RetryPolicy(initial_delay=1, max_delay=5)
    assert [policy.delay(n) for n in range(1, 6)] == [1, 2, 4, 5, 5]


def test_start_writeback_reaches_the_kernel_and_keeps_the_content(tmp_path: Path) -> None:
    """The writeback started while dd writes is the kernel's sync_file_range: it accepts
    the call for the image (0) and refuses a closed descriptor (EBADF), so the binding's
    arguments arrive as the system call's; what dd wrote is unchanged by it."""
    start = unpack.sync_file_range()
    assert start is not None, "the C library has no sync_file_range"
    content = os.urandom(1 << 20) + bytes(1 << 20)
    path = tmp_path / "image"
    with path.open("wb") as out, unpack.sparse_writer(out.fileno()) as writer:
        writer.write(content)
        assert start(out.fileno()) == 0
        writer.start_writeback()
        writer.finish()
    assert path.read_bytes() == content
    read_end, write_end = os.pipe()
    os.close(read_end)
    os.close(write_end)
    assert start(write_end) == -1
    assert ctypes.get_errno() == errno.EBADF
