"""Who we are to a registry: credentials, and the Authorization a 401 challenge asks for.

Credentials (PRECOMPILED_REGISTRY_USERNAME/PASSWORD, else the Docker-style auth file:
its credential helpers (credhelper.py), then its `auths`) are read when the registry
first asks for them, never kept in Config (logged under --debug) and never logged.
A challenge is answered with Basic, or with a Bearer token from the registry's token
service (its realm), fetched with the basic credentials or an identity token.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import http.client
import json
import re
import urllib.parse
from collections.abc import Callable, Mapping

from nvdriver import credhelper
from nvdriver.config import Config
from nvdriver.errors import DriverError
from nvdriver.registry.artifact import MAX_MANIFEST
from nvdriver.registry.errors import RegistryError

# What a client that does not say who it is sends to a token service (distribution's
# token spec wants a client_id with a refresh token).
CLIENT_ID = "nvidia-driver"


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


# How the client opens one request (Client._open: method, url, headers=, body=, auth=),
# its answer open for the block.
Opener = Callable[..., contextlib.AbstractContextManager[http.client.HTTPResponse]]


def authorization(challenge: str, creds: Credentials | None, open_: Opener) -> str:
    """The Authorization header that answers the registry's 401 `challenge` (WWW-Authenticate):
    Basic, or a Bearer token from its token service, reached with `open_`."""
    scheme, params = _challenge(challenge)
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
        opened = open_("POST", params["realm"], headers=headers, body=body, auth=False)
    else:
        query = urllib.parse.urlencode(fields)
        realm = params["realm"] + ("&" if "?" in params["realm"] else "?") + query
        basic = {"Authorization": creds.basic()} if creds else {}
        opened = open_("GET", realm, headers=basic, auth=False)
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
