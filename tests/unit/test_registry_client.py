"""The registry client's pieces that need no registry: the tag rule, references, where
credentials come from, and the bearer-token dance.

Debian's docker-registry (tests/integration/test_registry.py) does basic auth; a
registry with a token service (Docker Hub, GHCR, Harbor) cannot run here, so a small
HTTP server plays one: it answers 401 with a Bearer challenge, hands out a token for
basic credentials at its realm, and serves a manifest for that token only; on TLS (a
throw-away CA, openssl) it plays a registry that sends the client to plain http.
"""

from __future__ import annotations

import base64
import http.server
import json
import re
import shutil
import ssl
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from nvdriver import registry
from nvdriver.config import Config
from nvdriver.errors import DriverError, UsageError
from tests.conftest import need
from tests.registry import Tls, make_tls


def test_the_tag_holds_only_what_an_oci_tag_may_hold() -> None:
    tag = registry.artifact_tag("535.261.03", "6.12.117+deb12-amd64", "open", None)
    assert tag == "535.261.03-6.12.117_deb12-amd64-open"
    assert registry.artifact_tag("1.0", "6.1.0-1", "open", "x" * 200).startswith(
        "1.0-6.1.0-1-open-x"
    )
    assert len(registry.artifact_tag("1.0", "6.1.0-1", "open", "x" * 200)) == 128


@pytest.mark.parametrize(
    "text", ["https://r.example/x", "r.example", "r.example/Upper", "r.example/x:tag", "/x"]
)
def test_a_malformed_reference_is_a_usage_error(text: str) -> None:
    with pytest.raises(UsageError, match="HOST\\[:PORT\\]/REPOSITORY"):
        registry.Reference.parse(text)


def test_a_reference_keeps_the_port_with_the_host() -> None:
    ref = registry.Reference.parse("127.0.0.1:5000/fleet/nvidia-driver")
    assert (ref.host, ref.repository) == ("127.0.0.1:5000", "fleet/nvidia-driver")


def config_with_auth_file(tmp_path: Path, auths: object) -> Config:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"auths": auths}))
    return Config.from_env({"REGISTRY_AUTH_FILE": str(path)})


def test_credentials_from_the_environment_win_over_the_auth_file(tmp_path: Path) -> None:
    config = config_with_auth_file(
        tmp_path, {"r.example:5000": {"username": "file", "password": "f"}}
    )
    env = {"PRECOMPILED_REGISTRY_USERNAME": "env", "PRECOMPILED_REGISTRY_PASSWORD": "e"}
    assert registry.credentials(config, "r.example:5000", env) == registry.Credentials("env", "e")
    assert registry.credentials(config, "r.example:5000", {}) == registry.Credentials("file", "f")
    assert registry.credentials(config, "other:5000", {}) is None


def test_credentials_from_an_auth_entry_and_a_https_key(tmp_path: Path) -> None:
    pair = base64.b64encode(b"user:pa:ss").decode()
    config = config_with_auth_file(tmp_path, {"https://r.example": {"auth": pair}})
    creds = registry.credentials(config, "r.example", {})
    assert creds == registry.Credentials("user", "pa:ss")
    assert "pa:ss" not in repr(creds) and "pa:ss" not in repr(config)


def test_a_malformed_auth_entry_is_a_clear_error(tmp_path: Path) -> None:
    config = config_with_auth_file(tmp_path, {"r.example": {"auth": "bm9jb2xvbg=="}})  # "nocolon"
    with pytest.raises(DriverError, match=r"malformed auth entry for r\.example"):
        registry.credentials(config, "r.example", {})


def test_the_default_auth_file_is_dockers(tmp_path: Path) -> None:
    assert Config.from_env({"HOME": "/h"}).registry_auth_file == Path("/h/.docker/config.json")
    assert Config.from_env({"DOCKER_CONFIG": "/d", "HOME": "/h"}).registry_auth_file == Path(
        "/d/config.json"
    )


class TokenRegistry:
    """A registry that wants a bearer token from its realm (see the module's docstring)."""

    MANIFEST = b'{"schemaVersion": 2}'

    def __init__(self, tls: Tls | None = None, elsewhere: str | None = None) -> None:
        """Plain http, or TLS with `tls`. Its realm, and the redirect of the manifest
        `to-elsewhere`, lead to `elsewhere` (a base URL; by default itself); the manifest
        `round` redirects to itself until the server's tenth request."""
        self.token_requests: list[tuple[str | None, str]] = []
        self.token_posts: list[tuple[str | None, dict[str, list[str]]]] = []
        self.requests: list[str] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                """The OAuth2 refresh-token grant: an identity token for an access token."""
                length = int(self.headers.get("Content-Length") or 0)
                form = urllib.parse.parse_qs(self.rfile.read(length).decode())
                owner.token_posts.append((self.headers.get("Authorization"), form))
                if self.path == "/token" and form.get("refresh_token") == ["R3FRESH"]:
                    self._answer(200, json.dumps({"access_token": "T0K"}).encode())
                else:
                    self._answer(401, b"{}")

            def do_GET(self) -> None:
                auth = self.headers.get("Authorization")
                owner.requests.append(self.path)
                if self.path.endswith("/manifests/to-elsewhere"):
                    location = f"{owner.elsewhere}/v2/fleet/x/manifests/a-tag"
                    self._answer(302, b"", {"Location": location})
                elif self.path.endswith("/manifests/round") and len(owner.requests) < 10:
                    self._answer(302, b"", {"Location": self.path})
                elif self.path.endswith("/manifests/round"):
                    self._answer(200, owner.MANIFEST)
                elif self.path.startswith("/token?"):
                    owner.token_requests.append((auth, self.path))
                    if auth != "Basic " + base64.b64encode(b"u:p").decode():
                        self._answer(401, b"{}")
                    else:
                        self._answer(200, json.dumps({"token": "T0K"}).encode())
                elif auth == "Bearer T0K":
                    self._answer(200, owner.MANIFEST)
                else:
                    challenge = (
                        f'Bearer realm="{owner.elsewhere}/token",service="reg",'
                        'scope="repository:fleet/x:pull"'
                    )
                    self._answer(401, b"{}", {"WWW-Authenticate": challenge})

            def _answer(self, status: int, body: bytes, headers: dict[str, str] | None = None):
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(tls.cert), str(tls.key))
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = int(self.server.server_address[1])
        scheme = "http" if tls is None else "https"
        self.elsewhere = elsewhere or f"{scheme}://127.0.0.1:{self.port}"

    def __enter__(self) -> TokenRegistry:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    need(shutil.which("openssl") is not None, "openssl (for a throw-away CA) is not installed")
    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def token_registry() -> Iterator[TokenRegistry]:
    with TokenRegistry() as server:
        yield server


def test_a_bearer_challenge_gets_a_token_with_the_basic_credentials(token_registry) -> None:
    ref = registry.Reference.parse(f"127.0.0.1:{token_registry.port}/fleet/x")
    client = registry.Client(ref, creds=registry.Credentials("u", "p"), plain_http=True)
    assert client.get_manifest("a-tag") == TokenRegistry.MANIFEST
    [(auth, path)] = token_registry.token_requests
    assert auth == "Basic " + base64.b64encode(b"u:p").decode()
    assert "service=reg" in path and "scope=repository%3Afleet%2Fx%3Apull" in path
    # The token is kept: the next request needs no second token request.
    assert client.get_manifest("a-tag") == TokenRegistry.MANIFEST
    assert len(token_registry.token_requests) == 1


def test_a_refused_token_request_is_a_registry_error(token_registry) -> None:
    ref = registry.Reference.parse(f"127.0.0.1:{token_registry.port}/fleet/x")
    client = registry.Client(ref, creds=registry.Credentials("u", "wrong"), plain_http=True)
    with pytest.raises(registry.RegistryError, match="token service refused us \\(HTTP 401\\)"):
        client.get_manifest("a-tag")


def test_plain_http_only_when_allowed(tls: Tls, token_registry: TokenRegistry) -> None:
    """Without PRECOMPILED_REGISTRY_PLAIN_HTTP a registry on TLS cannot send the client to
    plain http, neither to its token realm nor by a redirect, even where a plain server
    would answer (`token_registry`: it hands out the token and the manifest); the
    plain-http client of the tests above is the allowed case."""
    with TokenRegistry(tls, elsewhere=f"http://127.0.0.1:{token_registry.port}") as server:
        ref = registry.Reference.parse(f"127.0.0.1:{server.port}/fleet/x")
        client = registry.Client(ref, creds=registry.Credentials("u", "p"), ca=tls.ca)
        plain_realm = f"plain http://127.0.0.1:{token_registry.port}; refused"
        with pytest.raises(registry.RegistryError, match=re.escape(plain_realm)):
            client.get_manifest("a-tag")
        with pytest.raises(registry.RegistryError, match=re.escape(plain_realm)):
            client.get_manifest("to-elsewhere")
    assert token_registry.requests == []
    assert server.requests == ["/v2/fleet/x/manifests/a-tag", "/v2/fleet/x/manifests/to-elsewhere"]


def test_redirects_end_at_the_limit(tls: Tls) -> None:
    """A registry that redirects in a circle gets MAX_REDIRECTS redirects followed, then
    an error (it would serve the manifest at its tenth request)."""
    with TokenRegistry(tls) as server:
        ref = registry.Reference.parse(f"127.0.0.1:{server.port}/fleet/x")
        client = registry.Client(ref, creds=None, ca=tls.ca)
        with pytest.raises(registry.RegistryError, match=f"More than {registry.MAX_REDIRECTS} "):
            client.get_manifest("round")
    assert server.requests == ["/v2/fleet/x/manifests/round"] * (registry.MAX_REDIRECTS + 1)


def test_an_identity_token_of_a_credential_helper_is_traded_for_a_token(token_registry) -> None:
    """A helper's `<token>` user (ACR's): the secret is a refresh token, POSTed to the
    realm in the body (OAuth2), never sent as Basic."""
    ref = registry.Reference.parse(f"127.0.0.1:{token_registry.port}/fleet/x")
    client = registry.Client(ref, creds=registry.Credentials("<token>", "R3FRESH"), plain_http=True)
    assert client.get_manifest("a-tag") == TokenRegistry.MANIFEST
    [(auth, form)] = token_registry.token_posts
    assert auth is None and token_registry.token_requests == []
    assert form["grant_type"] == ["refresh_token"] and form["service"] == ["reg"]
    assert form["scope"] == ["repository:fleet/x:pull"]


def helper(tmp_path: Path, name: str, script: str) -> None:
    path = tmp_path / f"docker-credential-{name}"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)


def test_a_credential_helper_that_prints_no_json_is_named_and_not_echoed(
    tmp_path: Path, monkeypatch
) -> None:
    helper(tmp_path, "noisy", "echo 'password=hunter2'\n")
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"credHelpers": {"r.example": "noisy"}}))
    with pytest.raises(DriverError) as e:
        registry.credentials(Config.from_env({"REGISTRY_AUTH_FILE": str(config)}), "r.example", {})
    assert "docker-credential-noisy named by credHelpers of" in e.value.message
    assert "printed no credentials for r.example" in e.value.message
    assert "hunter2" not in str(e.value)


def test_a_helper_without_credentials_for_the_host_falls_back_to_the_auths_entry(
    tmp_path: Path, monkeypatch
) -> None:
    helper(
        tmp_path,
        "empty",
        'cat > "$0.asked"; echo "credentials not found in native keychain"; exit 1\n',
    )
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {"credsStore": "empty", "auths": {"r.example": {"username": "u", "password": "p"}}}
        )
    )
    creds = registry.credentials(
        Config.from_env({"REGISTRY_AUTH_FILE": str(config)}), "r.example", {}
    )
    assert creds == registry.Credentials("u", "p")
    assert (tmp_path / "docker-credential-empty.asked").read_text() == "r.example"


def test_a_credential_helper_gets_what_its_cloud_sdk_reads_and_none_of_our_secrets(
    tmp_path: Path, monkeypatch
) -> None:
    """ECR's helper reads AWS_* and ~/.aws, GAR's GOOGLE_*: they get those and HOME, not
    the registry password or anything else of ours."""
    helper(
        tmp_path,
        "cloud",
        'env > "$0.env"; echo \'{"ServerURL":"r.example","Username":"AWS","Secret":"tok"}\'\n',
    )
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps({"credHelpers": {"r.example": "cloud"}}))
    environment = {
        "REGISTRY_AUTH_FILE": str(config_file),
        "HOME": "/root",
        "AWS_REGION": "eu-west-1",
        "GOOGLE_APPLICATION_CREDENTIALS": "/keys/gar.json",
        "PRECOMPILED_SIGNING_KEY": "/keys/fleet.asc",
        "SOME_TOKEN": "s3cret",
    }
    config = Config.from_env(environment)
    assert registry.credentials(config, "r.example", {}) == registry.Credentials("AWS", "tok")
    seen = dict(
        line.split("=", 1)
        for line in (tmp_path / "docker-credential-cloud.env").read_text().splitlines()
    )
    assert seen["AWS_REGION"] == "eu-west-1" and seen["HOME"] == "/root"
    assert seen["GOOGLE_APPLICATION_CREDENTIALS"] == "/keys/gar.json"
    assert "SOME_TOKEN" not in seen and "PRECOMPILED_SIGNING_KEY" not in seen
