"""A real OCI registry for tests: Debian's `docker-registry` (distribution 2.8) on
127.0.0.1 with htpasswd basic auth and TLS by a throw-away CA, plus a fault proxy.

`serve_registry(work)` starts `docker-registry serve CONFIG`, waits until `/v2/`
answers (401: auth is on), yields a `Registry` and stops it. `FaultProxy(registry)`
listens on 127.0.0.1 with the same certificate, forwards every request to the
registry and, when its `fault` is set, breaks one kind of answer the way a broken
network or a hostile registry would (FAULTS). Fleet keys: `make_key(dir, name)`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import http.client
import http.server
import json
import shutil
import socket
import ssl
import struct
import subprocess
import tempfile
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path

USER = "fleet-builder"
PASSWORD = "s3cret-Pa55word-for-tests"
REPOSITORY = "fleet/nvidia-driver"
EMPTY_CONFIG = "application/vnd.oci.empty.v1+json"

# What the proxy can do to an answer (None: forward it unchanged).
FAULTS = ("cut", "garbage-manifest", "flip", "404", "429", "503", "reset", "refuse-1.1")


def tools_missing() -> list[str]:
    return [t for t in ("docker-registry", "htpasswd", "openssl", "gpg") if not shutil.which(t)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(*argv: str | Path, **kwargs: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(a) for a in argv], check=True, capture_output=True, **kwargs)  # type: ignore[call-overload,no-any-return]


@dataclasses.dataclass(frozen=True)
class Tls:
    ca: Path
    cert: Path
    key: Path


def make_tls(work: Path) -> Tls:
    """A throw-away CA and a server certificate for IP 127.0.0.1 signed by it."""
    work.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert = (work / n for n in ("ca.key", "ca.pem", "s.key", "s.csr", "s.pem"))
    _run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
         "/CN=nvidia-driver test CA", "-keyout", ca_key, "-out", ca)  # fmt: skip
    _run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
         "-keyout", key, "-out", csr)  # fmt: skip
    ext = work / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
    _run("openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
         "-days", "2", "-extfile", ext, "-out", cert)  # fmt: skip
    return Tls(ca, cert, key)


@dataclasses.dataclass(frozen=True)
class Key:
    """An OpenPGP key made for a test: its armored secret and public key files."""

    secret: Path
    public: Path
    fingerprint: str


def make_key(work: Path, name: str) -> Key:
    """A fresh ed25519 signing key, exported armored into `work`.

    The GnuPG home is a short directory of its own: gpg-agent's socket lives in it
    (no /run/user here), and a socket path longer than 107 bytes (a deep pytest
    tmp_path under xdist) makes `--quick-gen-key` fail."""
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fleet-gpg-", dir="/tmp") as home:
        gpg = ["gpg", "--batch", "--homedir", home, "--passphrase", ""]
        try:
            _run(*gpg, "--quick-gen-key", f"{name} <{name}@fleet.test>", "ed25519", "sign", "never")
            colons = _run(*gpg, "--with-colons", "--list-keys").stdout.decode()
            fpr = next(line.split(":")[9] for line in colons.splitlines() if line.startswith("fpr"))
            secret, public = work / f"{name}.secret.asc", work / f"{name}.public.asc"
            secret.write_bytes(_run(*gpg, "--pinentry-mode", "loopback", "--armor",
                                    "--export-secret-keys", fpr).stdout)  # fmt: skip
            public.write_bytes(_run(*gpg, "--armor", "--export", fpr).stdout)
        finally:
            subprocess.run(["gpgconf", "--homedir", home, "--kill", "all"], check=False)
    return Key(secret, public, fpr)


def _tls_context(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


def wait_for_v2(port: int, ca: Path, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + 30
    while True:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=2, context=_tls_context(ca))
        try:
            conn.request("GET", "/v2/")
            status = conn.getresponse().status
            if status in (200, 401):
                return
        except OSError:
            pass
        finally:
            conn.close()
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"docker-registry exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the registry on port {port} did not answer /v2/ within 30 s")
        time.sleep(0.1)


@dataclasses.dataclass(frozen=True)
class Registry:
    port: int
    tls: Tls
    storage: Path
    log: Path

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def reference(self) -> str:
        return f"{self.host}/{REPOSITORY}"

    def env(self, *, user: str = USER, password: str = PASSWORD) -> dict[str, str]:
        return {
            "PRECOMPILED_REGISTRY_CA": str(self.tls.ca),
            "PRECOMPILED_REGISTRY_USERNAME": user,
            "PRECOMPILED_REGISTRY_PASSWORD": password,
        }


@contextlib.contextmanager
def serve_registry(work: Path) -> Iterator[Registry]:
    """docker-registry with htpasswd auth and TLS on a free port of 127.0.0.1."""
    work.mkdir(parents=True, exist_ok=True)
    tls = make_tls(work / "tls")
    htpasswd = work / "htpasswd"
    htpasswd.write_bytes(_run("htpasswd", "-Bbn", USER, PASSWORD).stdout)
    storage = work / "storage"
    config = work / "config.yml"
    log = work / "registry.log"
    # The port is free when chosen but another process (another xdist worker's server)
    # may bind it before docker-registry does: then it exits and another port is tried.
    for attempt in range(1, 4):
        port = free_port()
        config.write_text(
            "version: 0.1\n"
            "log:\n  level: info\n"
            f"storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: 127.0.0.1:{port}\n"
            f"  tls:\n    certificate: {tls.cert}\n    key: {tls.key}\n"
            f"auth:\n  htpasswd:\n    realm: nvidia-driver-tests\n    path: {htpasswd}\n"
        )
        with log.open("wb") as out:
            proc = subprocess.Popen(
                ["docker-registry", "serve", str(config)], stdout=out, stderr=subprocess.STDOUT
            )
        try:
            wait_for_v2(port, tls.ca, proc)
            break
        except RuntimeError:
            _stop_registry(proc)
            if attempt == 3 or "address already in use" not in log.read_text(errors="replace"):
                raise
    try:
        yield Registry(port, tls, storage, log)
    finally:
        _stop_registry(proc)


def _stop_registry(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def sent_and_acked(sock: socket.socket) -> None:
    """Wait until the peer's kernel has all we sent (a RST makes it drop what it has not
    acknowledged: the cut would come before the bytes, not after them)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        unacked = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
        if not unacked:
            return
        time.sleep(0.01)


class FaultProxy:
    """An HTTPS proxy in front of `registry` that breaks answers on demand.

    fault "cut": every answer of a package blob stops before its end (the connection is
    closed): the first after half its bytes, a resumed one (206) before its first byte;
    "garbage-manifest": every manifest GET answers 200 with bytes that are not JSON;
    "flip": one byte in the middle of a package blob is changed; "404": every manifest
    GET answers 404; "429": every request answers 429 Too Many Requests with
    `Retry-After: retry_after`; "503": every request answers 503; "reset": a package
    blob's answer stops after half its bytes with a TCP reset; "refuse-1.1": a manifest
    PUT of the OCI 1.1 form (`artifactType`, or the empty config) answers 400
    MANIFEST_INVALID, as Harbor before 2.8, Artifactory and Nexus do. With `times` set,
    the fault strikes that many times, then the proxy forwards. The registry itself
    stays intact. `seen`: (method, path, Range header, status) of every answer.
    """

    def __init__(self, registry: Registry, package_digest: str | None = None) -> None:
        self.registry = registry
        self.fault: str | None = None
        self.times: int | None = None
        self.retry_after = "1"
        self.seen: list[tuple[str, str, str | None, int]] = []
        self.package_digest = package_digest
        self._lock = threading.Lock()
        proxy = self

        def strikes(applies: bool) -> bool:
            """Whether the fault strikes this answer (counted against `times`)."""
            with proxy._lock:
                if not applies or proxy.times == 0:
                    return False
                if proxy.times is not None:
                    proxy.times -= 1
                return True

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _answer(self, status: int, data: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                proxy.seen.append((self.command, self.path, self.headers.get("Range"), status))

            def _refuses(self, body: bytes | None) -> bool:
                """Whether the fault answers this request itself (the registry not asked)."""
                fault = proxy.fault
                if fault in ("429", "503") and strikes(True):
                    code = "TOOMANYREQUESTS" if fault == "429" else "UNAVAILABLE"
                    headers = {"Retry-After": proxy.retry_after} if fault == "429" else {}
                    error = json.dumps({"errors": [{"code": code, "message": "try later"}]})
                    self._answer(int(fault), error.encode(), headers)
                    return True
                if fault == "refuse-1.1" and self.command == "PUT" and "/manifests/" in self.path:
                    manifest = json.loads(body or b"{}")
                    config = manifest.get("config", {}).get("mediaType")
                    oci_1_1 = "artifactType" in manifest or config == EMPTY_CONFIG
                    if strikes(oci_1_1):
                        refusal = {"code": "MANIFEST_INVALID", "message": "manifest invalid"}
                        self._answer(400, json.dumps({"errors": [refusal]}).encode(), {})
                        return True
                return False

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if self._refuses(body):
                    return
                upstream = http.client.HTTPSConnection(
                    "127.0.0.1", registry.port, timeout=30, context=_tls_context(registry.tls.ca)
                )
                # The client's Host stays: the registry's Locations then point back here.
                headers = dict(self.headers.items())
                upstream.request(self.command, self.path, body=body, headers=headers)
                resp = upstream.getresponse()
                data = resp.read()
                upstream.close()
                status, fault = resp.status, proxy.fault
                is_manifest = "/manifests/" in self.path and self.command == "GET"
                is_package = (
                    proxy.package_digest is not None
                    and self.path.endswith(f"/blobs/{proxy.package_digest}")
                    and self.command == "GET"
                )
                if fault == "404" and strikes(is_manifest):
                    status, data = 404, b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}'
                elif fault == "garbage-manifest" and strikes(is_manifest and status == 200):
                    data = b"\x00garbage, not a manifest" * 10
                elif fault == "flip" and strikes(is_package and status == 200):
                    middle = len(data) // 2
                    data = data[:middle] + bytes([data[middle] ^ 0x01]) + data[middle + 1 :]
                self.send_response(status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("content-length", "connection", "transfer-encoding"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                proxy.seen.append((self.command, self.path, self.headers.get("Range"), status))
                if fault in ("cut", "reset") and strikes(is_package and status in (200, 206)):
                    self.wfile.write(data[: len(data) // 2] if status == 200 else b"")
                    self.wfile.flush()
                    self.close_connection = True
                    if fault == "reset":  # SO_LINGER 0: close() sends a RST, not a FIN
                        sent_and_acked(self.connection)
                        linger = struct.pack("ii", 1, 0)
                        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                        self.connection.close()
                    else:
                        self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _forward

        class Server(http.server.ThreadingHTTPServer):
            def handle_error(self, request: object, client_address: object) -> None:
                pass  # a connection the proxy broke on purpose

        self.server = Server(("127.0.0.1", 0), Handler)
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(str(registry.tls.cert), str(registry.tls.key))
        self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def reference(self) -> str:
        return f"127.0.0.1:{self.port}/{REPOSITORY}"

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def dead_port() -> int:
    """A port of 127.0.0.1 where nothing listens (registry down)."""
    return free_port()
