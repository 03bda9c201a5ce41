"""Downloads over HTTP(S) with timeouts, retries and resumption.

Flatcar's release servers and the mirrors that stand in for them are reached
with urllib: a timeout on every socket operation, exponential backoff on
connection errors, and a large download resumed with a `Range` request from
the byte reached, so that an interrupted transfer of hundreds of megabytes
does not start over.
"""

from __future__ import annotations

import dataclasses
import email.message
import http.client
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from nvdriver.errors import DriverError
from nvdriver.pattern import Pattern

log = logging.getLogger(__name__)

USER_AGENT = "nvidia-driver (Flatcar)"
CHUNK_SIZE = 1 << 20

# What a flaky network raises; an HTTP status is handled before these.
NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, OSError)


class UrlNotFound(DriverError):
    """The server answered 404 or 410: the file does not exist there."""


class RangeIgnored(Exception):
    """A resumed request did not continue at the byte asked for: start over."""


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How long to wait for a server and how often to try again."""

    attempts: int = 6
    initial_delay: float = 1.0
    max_delay: float = 30.0
    timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.initial_delay < 0 or self.timeout <= 0:
            raise ValueError(f"{self} is not a usable retry policy")

    def delay(self, failure: int) -> float:
        """Seconds to wait after the `failure`-th consecutive failure (1-based)."""
        return float(min(self.max_delay, self.initial_delay * 2 ** (failure - 1)))


DEFAULT_RETRY = RetryPolicy()


def is_url(source: str) -> bool:
    return urllib.parse.urlsplit(source).scheme in ("http", "https", "file")


def _request(url: str, *, start: int = 0, validator: str | None = None) -> urllib.request.Request:
    headers = {"User-Agent": USER_AGENT}
    if start:
        headers["Range"] = f"bytes={start}-"
        if validator:
            # The rest of *this* file, or (if it changed meanwhile) all of the new one.
            headers["If-Range"] = validator
    return urllib.request.Request(url, headers=headers)


def _http_error(url: str, error: urllib.error.HTTPError) -> DriverError | None:
    """The error to raise for an HTTP status, or None when trying again may help."""
    if error.code in (404, 410):
        return UrlNotFound(f"{url} does not exist (HTTP {error.code}).")
    if error.code == 429 or error.code >= 500:
        return None
    return DriverError(
        f"{url} was refused: HTTP {error.code} {error.reason}.",
        hint="Check FLATCAR_RELEASE_URL / FLATCAR_RELEASES_FEED and any proxy in between.",
    )


def _give_up(url: str, error: BaseException, policy: RetryPolicy) -> DriverError:
    return DriverError(
        f"Could not download {url}: {error} (tried {policy.attempts} times).",
        hint="Check the node's network access to that server, or point "
        "FLATCAR_RELEASE_URL / FLATCAR_RELEASES_FEED at a reachable mirror.",
    )


def _wait(url: str, error: BaseException, failure: int, policy: RetryPolicy) -> None:
    delay = policy.delay(failure)
    log.warning(
        "%s: %s; trying again in %.1f s (%d/%d)", url, error, delay, failure, policy.attempts
    )
    time.sleep(delay)


def read_url(source: str, *, policy: RetryPolicy = DEFAULT_RETRY) -> bytes:
    """The whole content of a small file: an http(s)/file URL, or a local path."""
    if not is_url(source):
        try:
            return Path(source).read_bytes()
        except FileNotFoundError as e:
            raise UrlNotFound(f"{source} does not exist.") from e
        except OSError as e:
            raise DriverError(f"Could not read {source}: {e.strerror}.") from e
    failure = 0
    while True:
        try:
            with urllib.request.urlopen(_request(source), timeout=policy.timeout) as response:
                data: bytes = response.read()
                return data
        except urllib.error.HTTPError as e:
            error = _http_error(source, e)
            if error is not None:
                raise error from e
            last: BaseException = e
        except NETWORK_ERRORS as e:
            if isinstance(e, urllib.error.URLError) and isinstance(e.reason, FileNotFoundError):
                raise UrlNotFound(f"{source} does not exist.") from e
            last = e
        failure += 1
        if failure >= policy.attempts:
            raise _give_up(source, last, policy) from last
        _wait(source, last, failure, policy)


_CONTENT_RANGE_RE = Pattern(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


def _content_start_and_total(
    headers: email.message.Message, status: int | None
) -> tuple[int, int | None]:
    """Where the body begins in the file and the file's size, from the response headers."""
    if status == 206:
        match = _CONTENT_RANGE_RE.match(headers.get("Content-Range", "").strip())
        if not match:
            raise RangeIgnored("206 without a usable Content-Range")
        total = None if match[3] == "*" else int(match[3])
        return int(match[1]), total
    length = headers.get("Content-Length")
    return 0, int(length) if length and length.isdigit() else None


class Download:
    """A large file as a stream of chunks; an interrupted transfer resumes where it stopped.

    `done` counts the bytes delivered and `total` is the size once a response
    said it. If a server answers a resumed request with the whole file (200)
    or another range, iteration raises `RangeIgnored`: the consumer must start
    over with a new `Download`.
    """

    def __init__(
        self, url: str, *, policy: RetryPolicy = DEFAULT_RETRY, chunk_size: int = CHUNK_SIZE
    ) -> None:
        self.url = url
        self.policy = policy
        self.chunk_size = chunk_size
        self.done = 0
        self.total: int | None = None
        self.requests = 0
        self._validator: str | None = None

    def _open(self) -> http.client.HTTPResponse:
        self.requests += 1
        request = _request(self.url, start=self.done, validator=self._validator)
        response: http.client.HTTPResponse = urllib.request.urlopen(
            request, timeout=self.policy.timeout
        )
        try:
            start, total = _content_start_and_total(response.headers, response.status)
            if start != self.done:
                raise RangeIgnored(f"asked to resume at byte {self.done}, got byte {start}")
            if self.done and None not in (total, self.total) and total != self.total:
                raise RangeIgnored(f"the file changed size from {self.total} to {total} bytes")
        except BaseException:
            response.close()
            raise
        if not self.done:
            etag = response.headers.get("ETag")
            strong_etag = etag if etag and not etag.startswith("W/") else None
            self._validator = strong_etag or response.headers.get("Last-Modified")
        if total is not None:
            self.total = total
        if self.done:
            log.info("%s: resumed at byte %d", self.url, self.done)
        return response

    def __iter__(self) -> Iterator[bytes]:
        failure = 0
        last: BaseException
        response: http.client.HTTPResponse | None = None
        try:
            while True:
                try:
                    if response is None:
                        response = self._open()
                    chunk = response.read(self.chunk_size)
                    if not chunk and self.total is not None and self.done < self.total:
                        raise http.client.IncompleteRead(b"", self.total - self.done)
                except urllib.error.HTTPError as e:
                    if e.code == 416:
                        raise RangeIgnored(f"range from byte {self.done} refused") from e
                    error = _http_error(self.url, e)
                    if error is not None:
                        raise error from e
                    chunk, last = b"", e
                except NETWORK_ERRORS as e:
                    chunk, last = b"", e
                else:
                    if not chunk:
                        return
                    failure = 0
                    self.done += len(chunk)
                    yield chunk
                    continue
                if response is not None:
                    response.close()
                    response = None
                failure += 1
                if failure >= self.policy.attempts:
                    raise _give_up(self.url, last, self.policy) from last
                _wait(self.url, last, failure, self.policy)
        finally:
            if response is not None:
                response.close()
