"""Fetch, verify and cache the Flatcar developer container of a release.

One pass over the network: the `.bz2` is streamed, hashed (SHA-512, checked
against the signed DIGESTS), decompressed in parallel (`lbzip2`, else the
stdlib) and written sparse by `dd conv=sparse` (the image is 6 GiB, mostly
zeros; unpack.py) into a temporary file beside its final name. Python moves only the
compressed stream: lbzip2 writes straight into dd, so the decompressed
gigabytes never cost the interpreter a copy or a check. Only a verified image is renamed into
place, with a `.verified` stamp beside it; a partial or failed file is
removed on every exit path, signals included. An interrupted transfer
resumes with a `Range` request: the hash and the decompressor just go on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO

from nvdriver.atomic import atomic_file, write_atomically
from nvdriver.config import Config
from nvdriver.errors import DriverError, IntegrityError
from nvdriver.flatcar import gpg, space
from nvdriver.flatcar.download import (
    DEFAULT_RETRY,
    Download,
    RangeIgnored,
    RetryPolicy,
    UrlNotFound,
    read_url,
)
from nvdriver.flatcar.release import VERSION_RE, FlatcarRelease, release_base_url
from nvdriver.log import Progress
from nvdriver.pattern import Pattern
from nvdriver.unpack import Decompressor, decompressor, sparse_writer

log = logging.getLogger(__name__)

IMAGE_NAME = "flatcar_developer_container.bin"
COMPRESSED_NAME = IMAGE_NAME + ".bz2"
STAMP_SUFFIX = ".verified"
PARTIAL_PREFIX = ".partial-"
# How much of the download (compressed) between two starts of the image's writeback.
WRITEBACK_EVERY = 16 << 20
SHA512_RE = Pattern(r"^[0-9a-f]{128}$")


def developer_container_url(config: Config, release: FlatcarRelease) -> str:
    return f"{release_base_url(config, release)}/{COMPRESSED_NAME}"


def cache_path(config: Config, release: FlatcarRelease) -> Path:
    """The final name of the image: `<cache>/flatcar/<board>/<version>/…bin`."""
    return config.cache_dir / "flatcar" / release.board / release.version / IMAGE_NAME


def cached_versions(config: Config) -> dict[str, list[Path]]:
    """Per board, the cache's release directories (as `cache_path` lays them out)."""
    boards = config.cache_dir / "flatcar"
    return {
        board.name: sorted(d for d in board.iterdir() if d.is_dir() and VERSION_RE.match(d.name))
        for board in (sorted(boards.iterdir()) if boards.is_dir() else [])
        if board.is_dir()
    }


@dataclasses.dataclass(frozen=True)
class Digests:
    """A Flatcar `.DIGESTS` file: per hash algorithm, the hex digest of each file name."""

    sections: Mapping[str, Mapping[str, str]]

    @classmethod
    def from_text(cls, text: str, *, source: str) -> Digests:
        """Parse `# <ALGO> HASH` sections of `<hex>  <name>` lines."""
        sections: dict[str, dict[str, str]] = {}
        current: dict[str, str] | None = None
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line:
                continue
            header = re.fullmatch(r"#\s*(\w+)\s+HASH", line)
            if header:
                current = sections.setdefault(header[1].upper(), {})
                continue
            if line.startswith("#"):
                continue
            fields = line.split()
            if current is None or len(fields) != 2:
                raise IntegrityError(
                    f"{source} is malformed at line {number}: {line[:80]!r}.",
                    hint="Expected '# SHA512 HASH' sections of '<hex>  <file>' lines.",
                )
            current[fields[1].lstrip("*")] = fields[0].lower()
        return cls(sections=sections)

    def sha512(self, name: str, *, source: str) -> str:
        digest = self.sections.get("SHA512", {}).get(name)
        if digest is None or not SHA512_RE.match(digest):
            raise IntegrityError(
                f"{source} lists no SHA-512 digest of {name}.",
                hint="The mirror may serve another release's files; nothing was downloaded.",
            )
        return digest


@dataclasses.dataclass(frozen=True)
class Stamp:
    """What was verified about a cached image; without it the image is never used."""

    sha512: str
    version: str
    board: str
    size: int
    url: str
    verified_at: str

    @classmethod
    def from_file(cls, path: Path) -> Stamp | None:
        try:
            data = json.loads(path.read_text())
            stamp = cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})
        except (OSError, ValueError, TypeError, KeyError):
            return None
        return stamp if isinstance(stamp.size, int) else None

    def write(self, path: Path) -> None:
        """Write atomically; a killed write leaves a partial file that the next fetch removes."""
        text = json.dumps(dataclasses.asdict(self), indent=2) + "\n"
        write_atomically(path, text.encode(), prefix=PARTIAL_PREFIX)


def stamp_path(image: Path) -> Path:
    return image.with_name(image.name + STAMP_SUFFIX)


def cached_image(image: Path, release: FlatcarRelease) -> Stamp | None:
    """The stamp of a finished, verified image of `release`, or None (and nothing left)."""
    stamp = Stamp.from_file(stamp_path(image))
    try:
        size = image.stat().st_size
    except FileNotFoundError:
        size = None
    if (
        stamp is not None
        and stamp.version == release.version
        and stamp.board == release.board
        and stamp.size == size
    ):
        return stamp
    if size is not None or stamp_path(image).exists():
        log.info("Discarding %s: it has no valid verification stamp", image)
    image.unlink(missing_ok=True)
    stamp_path(image).unlink(missing_ok=True)
    return None


def _fed(dec: Decompressor, data: bytes | None) -> IntegrityError | None:
    """Feed `data` to `dec` (None: finish it); its refusal returned, not raised."""
    try:
        if data is None:
            dec.finish()
        else:
            dec.feed(data)
    except IntegrityError as e:
        return e
    return None


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Serialize fetches of one release (an `init` and an `update` at once)."""
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _remove_leftovers(directory: Path) -> None:
    """Partial files of a run that was killed (we hold the lock: no one else writes)."""
    for leftover in directory.glob(f"{PARTIAL_PREFIX}*"):
        log.info("Removing %s, left over by an interrupted download", leftover)
        leftover.unlink(missing_ok=True)


def _no_space(
    directory: Path, error: OSError, partial: IO[bytes], download: Download
) -> DriverError:
    """A message for ENOSPC/EDQUOT naming the directory and about how much space it needs."""
    written = os.fstat(partial.fileno()).st_blocks * 512
    free = os.statvfs(directory).f_bavail * os.statvfs(directory).f_frsize
    needed = written
    if download.total and download.done:
        needed = written * download.total // download.done
    mib = 1 << 20
    return DriverError(
        f"The cache directory {directory} is full ({os.strerror(error.errno or 0)}): "
        f"{written // mib} MiB of the developer container were written, it needs about "
        f"{needed // mib} MiB in all and {free // mib} MiB are free besides the part written.",
        hint="Free space there or point NVIDIA_DRIVER_CACHE at a larger file system; "
        "the partial file was removed.",
    )


@dataclasses.dataclass(frozen=True)
class _Verification:
    """What the download must match: a signed SHA-512, or a detached signature to check."""

    sha512: str | None
    signature: bytes | None
    source: str


def _verification(url: str, ring: gpg.Keyring, policy: RetryPolicy) -> _Verification:
    """The SHA-512 from the clear-signed DIGESTS, or the detached `.sig` when those are missing."""
    digests_url = f"{url}.DIGESTS.asc"
    try:
        signed = read_url(digests_url, policy=policy)
    except UrlNotFound:
        log.info("%s does not exist: verifying with the detached signature", digests_url)
    else:
        text = gpg.verify_clearsigned(signed, ring, source=digests_url)
        digests = Digests.from_text(text, source=digests_url)
        return _Verification(digests.sha512(COMPRESSED_NAME, source=digests_url), None, digests_url)
    sig_url = f"{url}.sig"
    try:
        return _Verification(None, read_url(sig_url, policy=policy), sig_url)
    except UrlNotFound as e:
        raise IntegrityError(
            f"Neither {digests_url} nor {sig_url} exists: {url} cannot be verified.",
            hint="Check FLATCAR_RELEASE_URL: a mirror must carry the signatures too.",
        ) from e


def _download_once(
    url: str,
    final: Path,
    check: _Verification,
    ring: gpg.Keyring,
    *,
    threads: int,
    policy: RetryPolicy,
    label: str,
) -> tuple[str, int]:
    """One attempt of the single pass; returns the SHA-512 of the .bz2 and the image's size."""
    download = Download(url, policy=policy)
    with contextlib.ExitStack() as stack:
        # Renamed to `final` when the block ends normally: only once verified.
        partial = stack.enter_context(atomic_file(final, prefix=PARTIAL_PREFIX))
        try:
            sink = stack.enter_context(sparse_writer(partial.fileno()))
            dec = stack.enter_context(decompressor(sink, url, threads=threads))
            verifier = (
                stack.enter_context(
                    gpg.detached_verifier(check.signature, ring, source=check.source)
                )
                if check.signature is not None
                else None
            )
            hasher = hashlib.sha512()
            progress = Progress(label)
            written_back = 0
            # A download that does not decompress is read to its end all the same: only
            # its digest (or signature) tells a changed file from a truncated release.
            broken: IntegrityError | None = None
            for chunk in download:
                hasher.update(chunk)
                if verifier is not None:
                    verifier.update(chunk)
                broken = broken or _fed(dec, chunk)
                if download.done - written_back >= WRITEBACK_EVERY:
                    sink.start_writeback()
                    written_back = download.done
                progress.total = download.total
                progress.update(download.done)
            progress.update(download.done, force=True)
            broken = broken or _fed(dec, None)
            if verifier is not None:
                verifier.finish()
            digest = hasher.hexdigest()
            if check.sha512 is not None and digest != check.sha512:
                raise IntegrityError(
                    f"{url} does not match its signed digest in {check.source}: "
                    f"SHA-512 {digest}, expected {check.sha512}.",
                    hint="The download was changed or damaged on the way; nothing was cached.",
                ) from broken
            if broken is not None:
                raise broken
            size = sink.finish()
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise _no_space(final.parent, e, partial, download) from e
            raise DriverError(f"Could not write {final}: {e}.") from e
    return digest, size


def fetch_developer_container(
    config: Config,
    release: FlatcarRelease,
    *,
    policy: RetryPolicy = DEFAULT_RETRY,
) -> Path:
    """The verified developer container image of `release`, from the cache or downloaded."""
    final = cache_path(config, release)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DriverError(
            f"Could not create the cache directory {final.parent}: {e.strerror}.",
            hint="Check NVIDIA_DRIVER_CACHE: it must be a writable directory.",
        ) from e
    with _locked(final.parent):
        stamp = cached_image(final, release)
        if stamp is not None:
            log.info("Using the cached Flatcar %s developer container %s", release.version, final)
            return final
        _remove_leftovers(final.parent)
        url = developer_container_url(config, release)
        space.require_room_for_developer_container(url, final.parent, policy)
        label = f"Downloading the Flatcar {release.version} developer container"
        log.info("%s from %s", label, url)
        with gpg.keyring(gpg.signing_key(config)) as ring:
            check = _verification(url, ring, policy)
            for attempt in range(1, policy.attempts + 1):
                try:
                    digest, size = _download_once(
                        url,
                        final,
                        check,
                        ring,
                        threads=config.max_threads,
                        policy=policy,
                        label=label,
                    )
                    break
                except RangeIgnored as e:
                    if attempt == policy.attempts:
                        raise DriverError(
                            f"Could not download {url}: the server does not resume ({e}).",
                            hint="Check the network or the mirror at FLATCAR_RELEASE_URL.",
                        ) from e
                    log.warning("%s: %s; starting over", url, e)
        Stamp(
            sha512=digest,
            version=release.version,
            board=release.board,
            size=size,
            url=url,
            verified_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        ).write(stamp_path(final))
        log.info("Verified and cached %s (%d MiB)", final, size >> 20)
    return final
