"""Packages shared through an OCI registry: the distribution API, spoken directly.

Why no library: the API a package needs is six requests (GET/HEAD a manifest or a
blob, POST+PUT a blob upload, PUT a manifest) plus the token dance, which `http.client`
and `ssl` do in a few hundred lines; the image gains no dependency and no byte. PyPI's
`oras` (with `requests`, `jsonschema`, ~7 MB) sent its blob PUT without credentials
against a registry with basic auth over TLS (FACTS), and the `skopeo`/`oras` binaries
are 20-40 MB each.

A package is an OCI image manifest of artifact type ARTIFACT_TYPE: the OCI empty
config, a layer with the package file and a layer with its detached OpenPGP signature
by the fleet's key (trust.py), and annotations naming what it is for. A pull resolves
the tag, computes the manifest's digest from its bytes and fetches by that digest; the
annotations must name the kernel asked for before any blob is fetched; each blob is
checked against its descriptor (digest and size) while it streams into a temporary
file in the store; the signature is checked with gpgv before the package is opened;
the package is verified and its own manifest checked again; only then does it appear
under its name (an atomic rename). Any failure leaves nothing in the store.

Credentials (PRECOMPILED_REGISTRY_USERNAME/PASSWORD, else the Docker-style auth file:
its credential helpers (credhelper.py), then its `auths`) are read when the registry
first asks for them, never kept in Config (logged under --debug) and never logged.

A rollout wave (every node pulling at once) meets throttled and stumbling registries:
429, 5xx and broken connections are tried again with jittered backoff within the
budget PRECOMPILED_REGISTRY_RETRY_BUDGET (backoff.py), and a blob cut mid-way resumes
with a Range request from the byte reached.

Older registries (Harbor before 2.8, Artifactory, Nexus) refuse the OCI 1.1 form of an
artifact (`artifactType` and the empty config); a push they refuse so is made again in
the form ORAS falls back to (the config's media type is the artifact type, no
`artifactType`), and a pull reads both.
"""

from __future__ import annotations

import base64
import collections.abc
import contextlib
import dataclasses
import datetime
import hashlib
import http.client
import io
import json
import logging
import re
import ssl
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from nvdriver import backoff, credhelper, fleet, trust
from nvdriver.atomic import atomic_file
from nvdriver.config import REGISTRY_REF_RE, REGISTRY_RETRY_BUDGET, Config
from nvdriver.driver import package as pkg
from nvdriver.driver.package import Manifest, Package
from nvdriver.errors import DriverError, IntegrityError, UsageError
from nvdriver.host import KernelIdentity
from nvdriver.kmod.abi import Fit

log = logging.getLogger(__name__)

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
ARTIFACT_TYPE = "application/vnd.nvidia-driver.package.v1"
PACKAGE_LAYER = "application/vnd.nvidia-driver.package.v1.tar"
SIGNATURE_LAYER = "application/vnd.nvidia-driver.package.signature.v1.pgp"
EMPTY_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY = b"{}"
TITLE = "org.opencontainers.image.title"
CREATED = "org.opencontainers.image.created"
ANNOTATION = "org.nvidia-driver."
DRIVER_VERSION = ANNOTATION + "driver-version"
FLAVOUR = ANNOTATION + "flavour"
KERNEL_RELEASE = ANNOTATION + "kernel-release"
# The kernel ABI the package was built for (docs/package.md): its vermagic, the CRCs of
# the kernel symbols its modules import (compact JSON, {"name": "crc"}), and their digest.
KERNEL_VERMAGIC = ANNOTATION + "kernel-vermagic"
KERNEL_SYMBOLS = ANNOTATION + "kernel-symbols"
KERNEL_ABI_SHA256 = ANNOTATION + "kernel-abi-sha256"
PACKAGE_TAG = ANNOTATION + "tag"

TIMEOUT = 60.0
CHUNK = 1 << 20
MAX_MANIFEST = 4 << 20
MAX_SIGNATURE = 64 << 10
MAX_PACKAGE = 8 << 30
MAX_REDIRECTS = 3
# What a client that does not say who it is sends to a token service (distribution's
# token spec wants a client_id with a refresh token).
CLIENT_ID = "nvidia-driver"
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_TAG_BAD = re.compile(r"[^A-Za-z0-9_.-]")


class RegistryError(DriverError):
    """The registry could not be used (down, refused credentials, no such tag, a cut
    connection): nothing says the package is bad, so the fallback is a build (exit 1)."""


@dataclasses.dataclass(frozen=True)
class Reference:
    """HOST[:PORT]/REPO[/...]: where a fleet keeps its packages."""

    host: str  # with the port, as the auth file and the Host header name it
    repository: str

    @classmethod
    def parse(cls, text: str, name: str = "PRECOMPILED_REGISTRY") -> Reference:
        match = REGISTRY_REF_RE.fullmatch(text)
        if not match:
            raise UsageError(
                f"{name}={text!r} is malformed: expected HOST[:PORT]/REPOSITORY "
                "(lower-case repository path, no scheme, no tag).",
                hint=f"Fix {name}, e.g. registry.example:5000/fleet/nvidia-driver.",
            )
        return cls(match["host"], match["repo"])

    def __str__(self) -> str:
        return f"{self.host}/{self.repository}"


def artifact_tag(driver_version: str, kernel_release: str, flavour: str, tag: str | None) -> str:
    """`<driver>-<kernel-release>-<flavour>[-<package tag>]`, every character an OCI tag
    may not hold (`+` of Debian's releases) as `_`, at most 128 characters."""
    raw = f"{driver_version}-{kernel_release}-{flavour}" + (f"-{tag}" if tag else "")
    return _TAG_BAD.sub("_", raw)[:128]


def kernel_annotations(kernel: KernelIdentity) -> dict[str, str]:
    symbols = {name: f"{crc:08x}" for name, crc in kernel.symbols}
    return {
        KERNEL_RELEASE: kernel.release,
        KERNEL_VERMAGIC: kernel.vermagic or "",
        KERNEL_SYMBOLS: json.dumps(symbols, separators=(",", ":"), sort_keys=True),
        KERNEL_ABI_SHA256: kernel.abi_digest,
    }


def kernel_of(annotations: Mapping[str, str], where: str) -> KernelIdentity:
    """The kernel ABI an artifact's annotations name; IntegrityError when they are
    malformed or their digest does not match them."""
    try:
        symbols = json.loads(annotations.get(KERNEL_SYMBOLS, ""))
        if not isinstance(symbols, dict):
            raise TypeError("not an object")
        kernel = KernelIdentity(annotations.get(KERNEL_RELEASE, ""), "").with_abi(
            annotations.get(KERNEL_VERMAGIC) or None,
            {str(k): int(str(v), 16) for k, v in symbols.items()},
        )
    except (ValueError, TypeError) as e:
        raise IntegrityError(
            f"The package {where} names its kernel ABI in malformed annotations: {e}."
        ) from e
    if kernel.abi_digest != annotations.get(KERNEL_ABI_SHA256):
        raise IntegrityError(
            f"The package {where} names a kernel ABI whose digest is not the annotated "
            f"{KERNEL_ABI_SHA256.removeprefix(ANNOTATION)}."
        )
    return kernel


@dataclasses.dataclass(frozen=True)
class Credentials:
    username: str
    password: str = dataclasses.field(repr=False)

    @property
    def identity_token(self) -> bool:
        """A credential helper's `<token>` user: the password is a refresh token, good only
        for the registry's token service (Bearer), not for Basic."""
        return self.username == credhelper.IDENTITY_TOKEN

    def basic(self) -> str:
        pair = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(pair).decode()


def credentials(config: Config, host: str, env: Mapping[str, str]) -> Credentials | None:
    """From PRECOMPILED_REGISTRY_USERNAME/PASSWORD, else the auth file: the credential
    helper `credHelpers.HOST`, else the one of `credsStore` (when it has some for `host`),
    else the entry for `host` (`auths.HOST.auth` = base64 of USER:PASSWORD, or
    `username`/`password`), else none."""
    user, password = (
        env.get("PRECOMPILED_REGISTRY_USERNAME"),
        env.get("PRECOMPILED_REGISTRY_PASSWORD"),
    )
    if user and password is not None:
        return Credentials(user, password)
    path = config.registry_auth_file
    if path is None or not path.is_file():
        return None
    try:
        document = json.loads(path.read_text())
        auths = document.get("auths", {})
    except (OSError, ValueError, AttributeError) as e:
        raise DriverError(
            f"The registry auth file {path} cannot be read: {getattr(e, 'strerror', e)}.",
            hint='It must be a Docker-style config.json ({"auths": {HOST: {"auth": ...}}}).',
        ) from e
    helpers = document.get("credHelpers")
    for helper, source in (
        (helpers.get(host) if isinstance(helpers, dict) else None, f"credHelpers of {path}"),
        (document.get("credsStore"), f"credsStore of {path}"),
    ):
        if isinstance(helper, str):
            found = credhelper.get(helper, host, source, config.credential_helper_environment())
            if found is not None:
                return Credentials(*found)
    for key in (host, f"https://{host}", f"http://{host}"):
        entry = auths.get(key) if isinstance(auths, dict) else None
        if not isinstance(entry, dict):
            continue
        if isinstance(entry.get("auth"), str):
            try:
                name, sep, secret = base64.b64decode(entry["auth"]).decode().partition(":")
            except ValueError:
                sep = ""
            if not sep:
                raise DriverError(
                    f"The registry auth file {path} has a malformed auth entry for {host}.",
                    hint="`auth` must be base64 of USER:PASSWORD.",
                )
            return Credentials(name, secret)
        if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
            return Credentials(entry["username"], entry["password"])
    return None


def _challenge(header: str) -> tuple[str, dict[str, str]]:
    """`Bearer realm="...",service="...",scope="..."` → ("bearer", {realm, service, scope})."""
    scheme, _, rest = header.strip().partition(" ")
    params = dict(re.findall(r'(\w+)="([^"]*)"', rest))
    return scheme.lower(), params


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
                        self._auth = self._authorize(challenge)
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

    def _authorize(self, challenge: str) -> str:
        scheme, params = _challenge(challenge)
        creds = self._credentials()
        if creds is None and scheme != "bearer":
            raise RegistryError(
                "The registry asks for credentials (HTTP 401) and none are configured.",
                hint="Set PRECOMPILED_REGISTRY_USERNAME and PRECOMPILED_REGISTRY_PASSWORD, or "
                "give a Docker-style auth file (REGISTRY_AUTH_FILE).",
            )
        if scheme == "basic" and creds is not None and not creds.identity_token:
            return creds.basic()
        if scheme == "basic":
            raise RegistryError(
                "The registry asks for Basic credentials (HTTP 401) and the credential helper "
                "gave an identity token, which only a token service (Bearer) takes.",
                hint="Configure a helper that gives a user name and password for this registry.",
            )
        if scheme != "bearer" or "realm" not in params:
            raise RegistryError(f"The registry's challenge is not understood: {scheme!r}.")
        fields = [(k, params[k]) for k in ("service", "scope") if k in params]
        if creds is not None and creds.identity_token:
            # OAuth2 refresh-token grant of distribution's token spec: POST, in the body.
            form = [("grant_type", "refresh_token"), ("client_id", CLIENT_ID), *fields]
            form.append(("refresh_token", creds.password))
            body = urllib.parse.urlencode(form).encode()
            headers = {"Content-Type": "application/x-www-form-urlencoded"}
            opened = self._open("POST", params["realm"], headers=headers, body=body, auth=False)
        else:
            query = urllib.parse.urlencode(fields)
            realm = params["realm"] + ("&" if "?" in params["realm"] else "?") + query
            basic = {"Authorization": creds.basic()} if creds else {}
            opened = self._open("GET", realm, headers=basic, auth=False)
        with opened as resp:
            if resp.status != 200:
                raise RegistryError(
                    f"The registry's token service refused us (HTTP {resp.status}).",
                    hint="Check PRECOMPILED_REGISTRY_USERNAME/PASSWORD or the auth file.",
                )
            try:
                answer = json.loads(resp.read(MAX_MANIFEST))
                token = answer.get("token") or answer["access_token"]
            except (ValueError, KeyError, AttributeError) as e:
                raise RegistryError("The registry's token service sent no token.") from e
        return f"Bearer {token}"

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


class TransientError(RegistryError):
    """A failure another try may cure (a connection reset, cut or timed out): `kind` names
    it for the summary, `reached` is how far a blob came."""

    def __init__(self, message: str, kind: str, *, reached: int = 0) -> None:
        super().__init__(message)
        self.kind = kind
        self.reached = reached


class FormRefused(RegistryError):
    """The registry refused the manifest's form (an OCI 1.1 artifact on an older registry)."""


# The distribution API's error codes of a registry that refuses a manifest's form.
FORM_REFUSED = frozenset({"MANIFEST_INVALID", "UNSUPPORTED"})


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


@dataclasses.dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest}
        obj["size"] = self.size
        if self.annotations:
            obj["annotations"] = dict(self.annotations)
        return obj

    @classmethod
    def from_json(cls, obj: object, limit: int) -> Descriptor:
        if not isinstance(obj, dict):
            raise ValueError("a descriptor is not an object")
        media, digest, size = obj.get("mediaType"), obj.get("digest"), obj.get("size")
        if not isinstance(media, str) or not isinstance(digest, str):
            raise ValueError("a descriptor lacks mediaType or digest")
        if not _DIGEST_RE.fullmatch(digest):
            raise ValueError(f"digest {digest!r} is not sha256:<64 hex>")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= limit:
            raise ValueError(f"size {size!r} of {digest} is not between 0 and {limit}")
        annotations = obj.get("annotations") or {}
        if not isinstance(annotations, dict):
            raise ValueError("annotations are not an object")
        return cls(media, digest, size, {str(k): str(v) for k, v in annotations.items()})


def descriptor_of(media_type: str, data: bytes | Path, **annotations: str) -> Descriptor:
    if isinstance(data, Path):
        return Descriptor(
            media_type, "sha256:" + pkg.sha256_file(data), data.stat().st_size, annotations
        )
    return Descriptor(
        media_type, "sha256:" + hashlib.sha256(data).hexdigest(), len(data), annotations
    )


def annotations_for(manifest: Manifest) -> dict[str, str]:
    return {
        DRIVER_VERSION: manifest.driver_version,
        FLAVOUR: manifest.flavour,
        **kernel_annotations(manifest.kernel),
        PACKAGE_TAG: manifest.tag or "",
        CREATED: datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def artifact_manifest(
    package: Descriptor,
    signature: Descriptor | None,
    annotations: Mapping[str, str],
    *,
    oci_1_1: bool = True,
) -> bytes:
    """The OCI image manifest of a package artifact (a signature layer unless None: the
    tests push unsigned ones, as an attacker would). `oci_1_1`: `artifactType` and the
    empty config; else the form of OCI 1.0 registries (ORAS's `--image-spec v1.0`): the
    config, still `{}`, has the artifact type as its media type."""
    layers = [package] if signature is None else [package, signature]
    obj: dict[str, Any] = {"schemaVersion": 2, "mediaType": MANIFEST_TYPE}
    if oci_1_1:
        obj["artifactType"] = ARTIFACT_TYPE
    config = descriptor_of(EMPTY_TYPE if oci_1_1 else ARTIFACT_TYPE, EMPTY)
    obj |= {
        "config": config.to_json(),
        "layers": [d.to_json() for d in layers],
        "annotations": dict(annotations),
    }
    return json.dumps(obj, sort_keys=True).encode()


def push_artifact(
    client: Client,
    tag: str,
    package: Descriptor,
    signature: Descriptor | None,
    annotations: Mapping[str, str],
) -> str:
    """Store the manifest under `tag` (its blobs pushed): the OCI 1.1 form, or the OCI 1.0
    form when the registry refuses that one (older Harbor, Artifactory, Nexus); the
    manifest's digest."""
    try:
        return client.push_manifest(tag, artifact_manifest(package, signature, annotations))
    except FormRefused as e:
        log.info("%s refused an OCI 1.1 artifact (%s); pushing the OCI 1.0 form", client.ref, e)
        older = artifact_manifest(package, signature, annotations, oci_1_1=False)
        try:
            return client.push_manifest(tag, older)
        except RegistryError as again:
            raise RegistryError(
                f"{e.message.rstrip('.')} (the OCI 1.1 form); {again.message} (the OCI 1.0 form)"
            ) from again


def push(config: Config, package: Package, ref: Reference) -> str:
    """Sign `package` with the fleet key and push it with its signature; the pushed
    reference `HOST/REPO@sha256:...` (under the tag of `artifact_tag`)."""
    if config.fleet_signing_key is None:
        raise UsageError("Pushing a package needs PRECOMPILED_SIGNING_KEY (the fleet's key).")
    m = package.manifest
    tag = artifact_tag(m.driver_version, m.kernel_release, m.flavour, m.tag)
    signature = trust.sign(package.path, config.fleet_signing_key)
    client = Client.for_config(config, ref)
    layer = descriptor_of(PACKAGE_LAYER, package.path, **{TITLE: package.path.name})
    sig = descriptor_of(SIGNATURE_LAYER, signature, **{TITLE: package.path.name + ".asc"})
    try:
        client.push_blob(descriptor_of(EMPTY_TYPE, EMPTY).digest, EMPTY)
        client.push_blob(layer.digest, package.path)
        client.push_blob(sig.digest, signature)
        digest = push_artifact(client, tag, layer, sig, annotations_for(m))
    except RegistryError as e:
        raise RegistryError(
            f"Pushing {package.path.name} to the registry {ref} (tag {tag}) failed: {e.message}",
            hint=e.hint,
        ) from e
    log.info("Pushed %s to %s:%s (%s@%s)", package.path.name, ref, tag, ref, digest)
    return f"{ref}@{digest}"


@dataclasses.dataclass(frozen=True)
class Wanted:
    """The package a node needs: for this kernel release, fitting its ABI (`fit`: the
    running kernel's verdict, kmod/abi.py), of this driver, flavour and package tag (None:
    untagged)."""

    release: str
    fit: Callable[[KernelIdentity], Fit]
    driver_version: str
    flavour: str
    tag: str | None

    @property
    def artifact_tag(self) -> str:
        return artifact_tag(self.driver_version, self.release, self.flavour, self.tag)


def _parse(data: bytes, where: str) -> tuple[Descriptor, Descriptor | None, dict[str, str]]:
    """The package layer, the signature layer (None when missing) and the annotations of a
    package manifest; IntegrityError for anything else (garbage, another artifact)."""
    try:
        obj = json.loads(data)
        if not isinstance(obj, dict) or obj.get("schemaVersion") != 2:
            raise ValueError("not an OCI manifest of schemaVersion 2")
        if obj.get("mediaType", MANIFEST_TYPE) != MANIFEST_TYPE:
            raise ValueError(f"media type {obj.get('mediaType')!r}")
        config = obj.get("config")
        kind = obj.get("artifactType") or (  # the OCI 1.0 form: the config's media type
            config.get("mediaType") if isinstance(config, dict) else None
        )
        if kind != ARTIFACT_TYPE:
            raise ValueError(f"artifact type {kind!r}, not {ARTIFACT_TYPE}")
        layers = [Descriptor.from_json(d, MAX_PACKAGE) for d in obj.get("layers") or []]
        packages = [d for d in layers if d.media_type == PACKAGE_LAYER]
        signatures = [d for d in layers if d.media_type == SIGNATURE_LAYER]
        if len(packages) != 1 or len(signatures) > 1:
            raise ValueError("not one package layer and at most one signature layer")
        if signatures and signatures[0].size > MAX_SIGNATURE:
            raise ValueError(f"a signature of {signatures[0].size} bytes")
        annotations = obj.get("annotations")
        if not isinstance(annotations, dict):
            raise ValueError("no annotations")
    except (ValueError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise IntegrityError(f"The manifest {where} is not a package artifact: {e}.") from e
    return (
        packages[0],
        (signatures[0] if signatures else None),
        {str(k): str(v) for k, v in annotations.items()},
    )


def _check_annotations(
    annotations: Mapping[str, str], wanted: Wanted, where: str
) -> KernelIdentity:
    """The kernel the annotations name, once they say the package is the one wanted and
    fits this node's kernel ABI; before any blob is fetched."""
    expected = {
        DRIVER_VERSION: wanted.driver_version,
        FLAVOUR: wanted.flavour,
        KERNEL_RELEASE: wanted.release,
        PACKAGE_TAG: wanted.tag or "",
    }
    wrong = [k for k, v in expected.items() if annotations.get(k) != v]
    if wrong:
        got = ", ".join(f"{k.removeprefix(ANNOTATION)}={annotations.get(k)!r}" for k in wrong)
        raise IntegrityError(
            f"The package {where} is not for this node: {got} (wanted driver "
            f"{wanted.driver_version} {wanted.flavour} for kernel {wanted.release})."
        )
    kernel = kernel_of(annotations, where)
    verdict = wanted.fit(kernel)
    if not verdict.fits:
        raise RegistryError(
            f"The package {where} does not fit this node's kernel: {verdict}.",
            hint="A node of this kernel's ABI builds and pushes its own (it replaces this one "
            "under the tag when PRECOMPILED_REGISTRY_PUSH is set).",
        )
    return kernel


def _check_manifest(m: Manifest, wanted: Wanted, kernel: KernelIdentity, where: str) -> None:
    if (m.kernel_release, m.driver_version, m.flavour, m.tag, m.kernel.abi_digest) != (
        wanted.release,
        wanted.driver_version,
        wanted.flavour,
        wanted.tag,
        kernel.abi_digest,
    ):
        raise IntegrityError(
            f"The package {where} is for driver {m.driver_version} {m.flavour} on kernel "
            f"{m.kernel_release} (ABI {m.kernel.abi_digest[:12]}) although its annotations say "
            f"it is for this node (kernel {wanted.release}, ABI {kernel.abi_digest[:12]})."
        )


def pull(config: Config, ref: Reference, wanted: Wanted, store_root: Path) -> Package:
    """Fetch, check and verify the package `wanted` from `ref` into the store `store_root`
    (the node's); IntegrityError when what the registry holds is bad or untrusted,
    RegistryError when the registry cannot be used. Nothing is left behind on failure."""
    trusted = trust.trusted_keys(config)  # before any request: no key, no pull
    client = Client.for_config(config, ref)
    tag = wanted.artifact_tag
    raw = client.get_manifest(tag)
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    where = f"{ref}@{digest} (tag {tag})"
    layer, sig, annotations = _parse(raw, where)
    kernel = _check_annotations(annotations, wanted, where)
    if client.get_manifest(digest) != raw:  # by digest: what the tag pointed at, still
        raise IntegrityError(f"The manifest {where} by digest differs from the one by tag.")
    if sig is None:
        raise IntegrityError(
            f"The package {where} carries no signature: refused (only packages signed by a "
            f"key of PRECOMPILED_TRUSTED_KEYS {trusted} are used)."
        )
    signature = io.BytesIO()
    client.fetch_blob(sig, signature)
    kernel_dir = store_root / wanted.release
    created = not kernel_dir.exists()
    final = kernel_dir / pkg.package_name(wanted.driver_version, wanted.flavour, wanted.tag)
    verified: list[Manifest] = []

    def check(path: Path) -> None:
        trust.verify(path, signature.getvalue(), trusted, source=f"the package {where}")
        try:
            m = pkg.verify(path, keep_failed=False)
        except IntegrityError as e:
            raise IntegrityError(f"The package {where}, signed, fails verification: {e}") from e
        _check_manifest(m, wanted, kernel, where)
        verified.append(m)

    try:
        kernel_dir.mkdir(parents=True, exist_ok=True)
        with atomic_file(final, check=check) as out:
            client.fetch_blob(layer, out)
    except BaseException as e:
        if created:
            with contextlib.suppress(OSError):
                kernel_dir.rmdir()
        if isinstance(e, OSError):  # the store's disk, not the registry
            raise DriverError(
                f"Cannot write the package {where} into {kernel_dir}: {e.strerror or e}.",
                hint="NODE_PRECOMPILED_DIR must be writable and have free space.",
            ) from e
        raise
    fleet.write_origin(
        final,
        {
            "origin": "registry",
            "reference": f"{ref}@{digest}",
            "tag": tag,
            "pulled": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
    )
    log.info("Pulled %s from the registry %s into %s", final.name, where, kernel_dir)
    return Package(final, verified[0])
