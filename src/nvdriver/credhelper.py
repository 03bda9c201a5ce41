"""Docker credential helpers: the registry credentials that clouds hand out.

ECR, GAR and ACR tokens expire within hours, so a fleet does not write them into an
auth file: the auth file names a helper (`credHelpers: {HOST: NAME}`, or `credsStore:
NAME` for every registry) and `docker-credential-NAME get` prints the current ones. The
protocol (docker/docker-credential-helpers): the server's address on stdin, on success
`{"ServerURL": ..., "Username": ..., "Secret": ...}` on stdout (Username `<token>`: the
secret is an identity token, a refresh token for the registry's token service); on
failure a message on stdout and a non-zero status, "credentials not found in native
keychain" when the helper has nothing for that server.

What a helper prints is never logged nor put into a message: its stdout may hold the
secret. Its stderr tail goes into the error (helpers write their diagnostics there).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from nvdriver.errors import DriverError
from nvdriver.run import RunError, run

PREFIX = "docker-credential-"
NOT_FOUND = "credentials not found"  # "... in native keychain", the protocol's words
IDENTITY_TOKEN = "<token>"
TIMEOUT = 60.0  # a cloud helper asks its cloud's API


class HelperError(DriverError):
    """A credential helper is missing, failed or answered nonsense."""


def get(
    name: str, server: str, source: str, env: Mapping[str, str] | None = None
) -> tuple[str, str] | None:
    """(username, secret) of `server` from `docker-credential-NAME`, None when it has none;
    `source` says where the helper was named (for the message); `env`: what it gets of our
    environment (Config.credential_helper_environment)."""
    program = PREFIX + name
    hint = (
        f"Install {program} into the image (or mount it and put it on PATH), fix {source}, or "
        "set PRECOMPILED_REGISTRY_USERNAME/PASSWORD."
    )
    if not name or "/" in name:
        raise HelperError(
            f"The credential helper name {name!r} of {source} is not valid.", hint=hint
        )
    try:
        result = run([program, "get"], input=server, env=env, check=False, timeout=TIMEOUT)
    except RunError as e:  # could not be started
        raise HelperError(
            f"The credential helper {program} named by {source} is not installed (not on PATH).",
            hint=hint,
        ) from e
    if result.returncode != 0:
        if NOT_FOUND in result.stdout:
            return None
        stderr = " ".join(result.stderr.split())[-300:]
        status = "timed out" if result.returncode < 0 else f"exited with status {result.returncode}"
        raise HelperError(
            f"The credential helper {program} named by {source} failed for {server}: {status}"
            + (f" ({stderr})." if stderr else "."),
            hint=hint,
        )
    try:
        answer = json.loads(result.stdout)
        username, secret = answer["Username"], answer["Secret"]
        if not isinstance(username, str) or not isinstance(secret, str):
            raise TypeError
    except (ValueError, KeyError, TypeError) as e:  # never echo what it printed
        raise HelperError(
            f"The credential helper {program} named by {source} printed no credentials for "
            f'{server} (expected {{"Username": ..., "Secret": ...}}).',
            hint=hint,
        ) from e
    return username, secret
