"""One registry repository over HTTP(S): the distribution API's requests, spoken directly.

Redirects are followed (plain http only with PRECOMPILED_REGISTRY_PLAIN_HTTP), a 401 is
answered as its challenge asks (auth.py), and 429, 5xx and broken connections are tried
again with jittered backoff within the budget PRECOMPILED_REGISTRY_RETRY_BUDGET
(backoff.py); a blob cut mid-way resumes with a Range request from the byte reached, and
each blob is checked against its descriptor (digest and size) while it streams.
"""

from __future__ import annotations

import collections.abc
import contextlib
import hashlib
import http.client
import json
import logging
import re
import ssl
import urllib.parse
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO

from nvdriver import backoff
from nvdriver.config import REGISTRY_RETRY_BUDGET, Config
from nvdriver.errors import DriverError, IntegrityError
from nvdriver.registry.artifact import MANIFEST_TYPE, MAX_MANIFEST, Descriptor
from nvdriver.registry.auth import Credentials, authorization, credentials
from nvdriver.registry.errors import FORM_REFUSED, FormRefused, RegistryError, TransientError
from nvdriver.registry.reference import Reference

log = logging.getLogger(__name__)

TIMEOUT = 60.0
CHUNK = 1 << 20
MAX_REDIRECTS = 3


class Client:
    """One registry repository over HTTPS (HTTP only with PRECOMPILED_REGISTRY_PLAIN_HTTP):
    anonymous first, then what the registry's 401 challenge asks for (Basic, or a Bearer
    token from its realm, fetched with the basic credentials or an identity token).
    Throttled (429), failed (5xx) and broken requests are tried again within the budget
    of `retry`, which all requests of one client (one pull, one push) share."""

    def __init__(
        self,
        ref: Reference,
        *,
        creds: Credentials | collections.abc.Callable[[], Credentials | None] | None,
        ca: Path | None = None,
        plain_http: bool = False,
        retry: backoff.Policy | None = None,
    ) -> None:
        self.ref = ref
        self._creds = creds
        self._scheme = "http" if plain_http else "https"
        self._auth: str | None = None
        self.retries = backoff.Retries(retry or backoff.Policy(budget=REGISTRY_RETRY_BUDGET))
        self._tls = ssl.create_default_context()
        if ca is not None:
            try:
                self._tls.load_verify_locations(cafile=str(ca))
            except (OSError, ssl.SSLError) as e:
                raise DriverError(
                    f"The registry CA {ca} (PRECOMPILED_REGISTRY_CA) cannot be loaded: {e}.",
                    hint="It must be a PEM file of the CA certificate(s) of the registry.",
                ) from e

    @classmethod
    def for_config(cls, config: Config, ref: Reference) -> Client:
        return cls(
            ref,
            creds=lambda: credentials(config, ref.host, config.environment),
            ca=config.registry_ca,
            plain_http=config.registry_plain_http,
            retry=backoff.Policy(budget=config.registry_retry_budget),
        )

    def _credentials(self) -> Credentials | None:
        """The credentials, looked up (a credential helper run) when first needed."""
        if callable(self._creds):
            self._creds = self._creds()
        return self._creds

    # --- the transport

    def _connection(self, scheme: str, netloc: str) -> http.client.HTTPConnection:
        if scheme == "https":
            return http.client.HTTPSConnection(netloc, timeout=TIMEOUT, context=self._tls)
        if self._scheme != "http":
            raise RegistryError(f"The registry sent us to plain http://{netloc}; refused.")
        return http.client.HTTPConnection(netloc, timeout=TIMEOUT)

    @contextlib.contextmanager
    def _open(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        body: bytes | Path | None = None,
        auth: bool = True,
    ) -> Iterator[http.client.HTTPResponse]:
        """One request (following redirects), its response open for the block."""
        with contextlib.ExitStack() as stack:
            for _ in range(MAX_REDIRECTS + 1):
                parts = urllib.parse.urlsplit(url)
                conn = self._connection(parts.scheme, parts.netloc)
                stack.callback(conn.close)
                sent = dict(headers or {})
                if auth and self._auth and parts.netloc == self.ref.host:
                    sent["Authorization"] = self._auth
                data: bytes | IO[bytes] | None
                if isinstance(body, Path):
                    data = stack.enter_context(body.open("rb"))
                    sent["Content-Length"] = str(body.stat().st_size)
                else:
                    data = body
                    if body is not None:
                        sent["Content-Length"] = str(len(body))
                path = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
                try:
                    conn.request(method, path, body=data, headers=sent)
                    resp = conn.getresponse()
                except (OSError, http.client.HTTPException) as e:
                    raise _transport_error(e) from e
                location = resp.getheader("Location")
                if resp.status in (301, 302, 303, 307, 308) and method in ("GET", "HEAD"):
                    if not location:
                        raise RegistryError(f"HTTP {resp.status} without a Location.")
                    url = urllib.parse.urljoin(url, location)
                    continue
                yield resp
                return
            raise RegistryError(f"More than {MAX_REDIRECTS} redirects.")

    def _url(self, path: str) -> str:
        return f"{self._scheme}://{self.ref.host}/v2/{self.ref.repository}/{path}"

    @contextlib.contextmanager
    def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        body: bytes | Path | None = None,
    ) -> Iterator[http.client.HTTPResponse]:
        """A request, authorized as the registry's challenge asks when it answers 401, and
        tried again (429, 5xx, a broken connection) within the budget; the answer open
        for the block."""
        with contextlib.ExitStack() as stack:
            yield self._answer(stack, method, url, headers, body)

    def _answer(
        self,
        stack: contextlib.ExitStack,
        method: str,
        url: str,
        headers: Mapping[str, str] | None,
        body: bytes | Path | None,
    ) -> http.client.HTTPResponse:
        """The first answer that is neither a challenge nor a failure worth another try,
        its connection closed with `stack`."""
        challenged, attempt = False, 0
        while True:
            after: float | None = None
            with contextlib.ExitStack() as this:
                try:
                    resp = this.enter_context(self._open(method, url, headers=headers, body=body))
                except TransientError as e:
                    failure, error = e.kind, RegistryError(e.message)
                else:
                    if resp.status == 401 and not challenged:
                        challenge = resp.getheader("WWW-Authenticate") or ""
                        resp.read()
                        this.close()
                        self._auth = authorization(challenge, self._credentials(), self._open)
                        challenged = True
                        continue
                    if resp.status == 401:
                        raise RegistryError(
                            f"The registry refused the credentials (HTTP 401{_errors(resp)}).",
                            hint="Check PRECOMPILED_REGISTRY_USERNAME/PASSWORD or the auth "
                            "file (REGISTRY_AUTH_FILE) and its credential helper.",
                        )
                    if resp.status != 429 and resp.status < 500:
                        stack.push(this.pop_all())
                        return resp
                    failure = f"HTTP {resp.status}"
                    after = backoff.retry_after(resp.getheader("Retry-After"))
                    error = RegistryError(f"HTTP {resp.status} {resp.reason}{_errors(resp)}")
            attempt += 1
            self._retry(error, failure, attempt, after, f"{method} {url}")

    def _retry(
        self, error: RegistryError, failure: str, attempt: int, after: float | None, what: str
    ) -> None:
        """Wait before trying `what` again, or raise `error` with what failed how often."""
        why_not = self.retries.wait(failure, attempt, after)
        if why_not is not None:
            raise RegistryError(
                f"{error.message.rstrip('.')}; gave up ({why_not}; {self.retries.summary()}).",
                hint="PRECOMPILED_REGISTRY_RETRY_BUDGET sets how long a node keeps trying.",
            ) from error
        log.debug("%s: %s; trying again (%d)", what, failure, attempt)

    # --- the API

    def has_blob(self, digest: str) -> bool:
        with self.request("HEAD", self._url(f"blobs/{digest}")) as resp:
            resp.read()
            return resp.status == 200

    def push_blob(self, digest: str, body: bytes | Path) -> None:
        """Upload a blob unless the registry has it (monolithic: POST, then PUT ?digest=)."""
        if self.has_blob(digest):
            return
        with self.request("POST", self._url("blobs/uploads/")) as resp:
            resp.read()
            _expect(resp, 202, "starting a blob upload")
            location = resp.getheader("Location") or ""
        url = urllib.parse.urljoin(self._url("blobs/uploads/"), location)
        url += ("&" if "?" in url else "?") + urllib.parse.urlencode({"digest": digest})
        headers = {"Content-Type": "application/octet-stream"}
        with self.request("PUT", url, headers=headers, body=body) as resp:
            resp.read()
            _expect(resp, 201, f"uploading the blob {digest}")

    def push_manifest(self, tag: str, manifest: bytes) -> str:
        headers = {"Content-Type": MANIFEST_TYPE}
        with self.request(
            "PUT", self._url(f"manifests/{tag}"), headers=headers, body=manifest
        ) as r:
            errors = _error_list(r)
            if r.status != 201:
                refused = r.status in (400, 415) and {c for c, _ in errors} & FORM_REFUSED
                raise (FormRefused if refused else RegistryError)(
                    f"HTTP {r.status} {r.reason} while storing the manifest {tag}"
                    f"{_describe(errors)}."
                )
        return "sha256:" + hashlib.sha256(manifest).hexdigest()

    def get_manifest(self, reference: str) -> bytes:
        headers = {"Accept": MANIFEST_TYPE}
        with self.request("GET", self._url(f"manifests/{reference}"), headers=headers) as resp:
            if resp.status == 404:
                resp.read()
                raise RegistryError(f"There is no package tagged {reference} (HTTP 404).")
            _expect(resp, 200, f"fetching the manifest {reference}")
            data = _read_limited(resp, MAX_MANIFEST, f"the manifest {reference}")
        return data

    def fetch_blob(self, descriptor: Descriptor, out: IO[bytes]) -> None:
        """Stream a blob into `out`, checked against its descriptor's size and digest; a
        connection that breaks mid-way is resumed (Range) from the byte reached."""
        h, got, attempt = hashlib.sha256(), 0, 0
        url = self._url(f"blobs/{descriptor.digest}")
        while True:
            start = got
            headers = {"Range": f"bytes={got}-"} if got else {}
            with self.request("GET", url, headers=headers) as resp:
                skip = _resumed_at(resp, got, descriptor)
                try:
                    got = self._stream(resp, descriptor, h, out, got, skip)
                    break
                except TransientError as e:
                    got, error, failure = e.reached, RegistryError(e.message), e.kind
            attempt = 1 if got > start else attempt + 1  # progress: a new run of failures
            self._retry(error, failure, attempt, None, f"GET {url} from byte {got}")
        if "sha256:" + h.hexdigest() != descriptor.digest:
            raise IntegrityError(
                f"The blob {descriptor.digest} has the SHA-256 {h.hexdigest()}: its bytes are "
                "not the ones the manifest names."
            )

    @staticmethod
    def _stream(
        resp: http.client.HTTPResponse,
        descriptor: Descriptor,
        h: hashlib._Hash,
        out: IO[bytes],
        got: int,
        skip: int,
    ) -> int:
        """Copy the answer's body into `out` from the byte `got` (its first `skip` bytes are
        ones `out` has: a server that ignored the Range); the bytes reached."""
        while True:
            try:  # the network's failures; the disk's (a full store) go on as they are
                chunk = resp.read(min(CHUNK, descriptor.size - got + skip + 1))
            except (OSError, http.client.HTTPException) as e:
                error = _transport_error(e)
                raise TransientError(
                    f"The connection broke after {got} of {descriptor.size} bytes of the "
                    f"blob {descriptor.digest} ({error.message})",
                    error.kind if isinstance(error, TransientError) else "connection broke",
                    reached=got,
                ) from e
            if not chunk and got < descriptor.size:  # http.client: b"" at an early close
                raise TransientError(
                    f"The connection broke after {got} of {descriptor.size} bytes of the "
                    f"blob {descriptor.digest} (it closed early)",
                    "connection cut",
                    reached=got,
                )
            if not chunk:
                return got
            if skip:
                dropped = min(skip, len(chunk))
                chunk, skip = chunk[dropped:], skip - dropped
            got += len(chunk)
            if got > descriptor.size:
                raise IntegrityError(
                    f"The blob {descriptor.digest} is larger than its descriptor's "
                    f"{descriptor.size} bytes."
                )
            h.update(chunk)
            out.write(chunk)


def _resumed_at(resp: http.client.HTTPResponse, got: int, descriptor: Descriptor) -> int:
    """How many bytes of the answer to drop: 0 for a 206 that goes on at byte `got`, `got`
    for a whole blob (200: a server that ignores Range); else a RegistryError."""
    if resp.status == 200:
        return got
    if resp.status == 206 and got:
        match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", resp.getheader("Content-Range") or "")
        if match and int(match[1]) == got:
            return 0
        raise RegistryError(
            f"The registry resumed the blob {descriptor.digest} at the wrong place "
            f"(asked for byte {got}, Content-Range {resp.getheader('Content-Range')!r})."
        )
    _expect(resp, 200, f"fetching the blob {descriptor.digest}")
    return 0


def _transport_error(e: BaseException) -> RegistryError:
    """The RegistryError of a failed exchange; a TransientError where another try may
    help (reset, cut, timed out), not where it cannot (refused, an untrusted certificate)."""
    reason = _transport_reason(e)
    if isinstance(e, (ssl.SSLCertVerificationError, ConnectionRefusedError)):
        return RegistryError(reason)
    if isinstance(e, ConnectionResetError):
        kind = "connection reset"
    elif isinstance(e, TimeoutError):
        kind = "timeout"
    elif isinstance(e, (http.client.IncompleteRead, http.client.RemoteDisconnected)):
        kind = "connection cut"
    else:
        kind = type(e).__name__
    return TransientError(reason, kind)


def _transport_reason(e: BaseException) -> str:
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted: {e.verify_message} (PRECOMPILED_REGISTRY_CA?)"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused (nothing listening)"
    if isinstance(e, TimeoutError):
        return f"no answer within {TIMEOUT:.0f} s"
    if isinstance(e, http.client.IncompleteRead):
        return "the connection closed mid-body"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _error_list(resp: http.client.HTTPResponse) -> list[tuple[str, str]]:
    """(code, message) of the distribution API's `{"errors": [{"code", "message"}]}`."""
    try:
        errors = json.loads(resp.read(64 << 10) or b"{}").get("errors") or []
        return [(str(e.get("code")), str(e.get("message"))) for e in errors]
    except (ValueError, AttributeError, OSError, http.client.HTTPException):
        return []


def _describe(errors: list[tuple[str, str]]) -> str:
    text = "; ".join(f"{code}: {message}" for code, message in errors)
    return f", {text}" if text else ""


def _errors(resp: http.client.HTTPResponse) -> str:
    """The distribution API's errors of `resp`, shortly."""
    return _describe(_error_list(resp))


def _expect(resp: http.client.HTTPResponse, status: int, doing: str) -> None:
    if resp.status != status:
        raise RegistryError(f"HTTP {resp.status} {resp.reason} while {doing}{_errors(resp)}.")


def _read_limited(resp: http.client.HTTPResponse, limit: int, what: str) -> bytes:
    try:
        data = resp.read(limit + 1)
    except (OSError, http.client.HTTPException) as e:
        raise RegistryError(f"Reading {what} failed: {_transport_reason(e)}.") from e
    if len(data) > limit:
        raise IntegrityError(f"{what} is larger than {limit} bytes; not a package manifest.")
    return data
