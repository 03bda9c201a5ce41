"""Who made a package: a detached OpenPGP signature by the fleet's key.

A package is kernel code that nodes link and load as root. A registry digest proves
only that the bytes are the ones a tag points at, and anyone who may push can point
the tag; so a pushed package carries a detached, armored signature made with `gpg` at
push time (PRECOMPILED_SIGNING_KEY, an armored secret key), and a node checks it with
`gpgv` against the keys it trusts (PRECOMPILED_TRUSTED_KEYS) before the package is
opened. No signature, a signer the node does not trust, a bad signature, or a good one by
a fleet key that has been revoked or has expired (gpgv accepts those): refused.

The secret key is imported only into a throw-away GnuPG home under the system's
temporary directory, removed (with its agent stopped) right after signing: it is never
written into a package, an artifact layer, the cache or a log.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

from nvdriver.config import Config
from nvdriver.errors import DriverError, IntegrityError, UsageError
from nvdriver.flatcar import gpg
from nvdriver.run import RunError, run

SECRET_HEADER = b"-----BEGIN PGP PRIVATE KEY BLOCK-----"

FLEET = gpg.KeyRole(
    label="fleet keys (PRECOMPILED_TRUSTED_KEYS)",
    no_key_hint="The package was signed by a key this node does not trust (or pushed by "
    "someone else): it was not unpacked. Add the fleet's public key to "
    "PRECOMPILED_TRUSTED_KEYS if the signer is yours, or push again from a build node "
    "that has the fleet's signing key.",
    bad_hint="The package does not match its signature: it was changed after signing. It "
    "was not unpacked; push it again from a build node.",
    other_hint="Only packages signed by a key of PRECOMPILED_TRUSTED_KEYS are used; it was "
    "not unpacked.",
    revoked_hint="The fleet key that signed the package was revoked: the package was not "
    "unpacked. Push it again from a build node that signs with the fleet's current key, and "
    "keep the revoked key's revocation in PRECOMPILED_TRUSTED_KEYS.",
    expired_hint="The fleet key that signed the package has expired: the package was not "
    "unpacked. Extend the key's expiry (gpg --quick-set-expire) and give the nodes the "
    "updated public key (PRECOMPILED_TRUSTED_KEYS), or push again signed with a current key.",
)


def check_signing_key(key: Path, name: str = "PRECOMPILED_SIGNING_KEY") -> Path:
    """An armored secret key file, checked before anything is built (exit 2 otherwise)."""
    try:
        head = key.read_bytes()[:4096].lstrip()
    except OSError as e:
        raise UsageError(
            f"{name}={str(key)!r} cannot be read: {e.strerror}.",
            hint=f"Mount the fleet's armored secret key and point {name} at it.",
        ) from e
    if not head.startswith(SECRET_HEADER):
        raise UsageError(
            f"{name}={str(key)!r} is not an armored OpenPGP secret key "
            f"(it does not start with {SECRET_HEADER.decode()}).",
            hint="Export it with `gpg --armor --export-secret-keys KEYID` (no passphrase).",
        )
    return key


@contextlib.contextmanager
def _gnupg_home() -> Iterator[str]:
    """A GnuPG home removed after use, its agent (which holds the imported key) stopped."""
    with tempfile.TemporaryDirectory(prefix="nvdriver-sign-") as home:
        try:
            yield home
        finally:
            run(["gpgconf", "--homedir", home, "--kill", "all"], check=False, timeout=30.0)


def sign(package: Path, secret_key: Path) -> bytes:
    """The detached, armored signature of `package` by the key in `secret_key`."""
    check_signing_key(secret_key)
    with _gnupg_home() as home:
        base = ["gpg", "--batch", "--no-options", "--homedir", home, "--pinentry-mode", "loopback"]
        out = Path(home) / "package.asc"
        try:
            run([*base, "--quiet", "--import", secret_key], timeout=gpg.GPG_TIMEOUT)
            run(
                [*base, "--passphrase", "", "--armor", "--detach-sign", "--output", out, package],
                timeout=gpg.GPG_TIMEOUT,
            )
        except RunError as e:
            raise DriverError(
                f"Signing {package.name} with PRECOMPILED_SIGNING_KEY {secret_key} failed: "
                f"{e.stderr.strip().splitlines()[-1] if e.stderr.strip() else e.message}",
                hint="The key must be an OpenPGP secret key without a passphrase that can sign.",
            ) from e
        return out.read_bytes()


def trusted_keys(config: Config) -> Path:
    """PRECOMPILED_TRUSTED_KEYS; without it no package from a registry is used."""
    key = config.trusted_keys
    if key is None:
        raise DriverError(
            "PRECOMPILED_TRUSTED_KEYS is not set: packages from a registry are kernel code "
            "and are used only when signed by a key the node trusts.",
            hint="Set PRECOMPILED_TRUSTED_KEYS to the fleet's armored public key file.",
        )
    if not key.is_file():
        raise DriverError(
            f"PRECOMPILED_TRUSTED_KEYS={str(key)!r} is not a file.",
            hint="Mount the fleet's armored public key file(s) and point the setting at it.",
        )
    return key


def verify(path: Path, signature: bytes, trusted: Path, *, source: str) -> None:
    """IntegrityError unless `signature` is a good signature of `path` by a trusted key.

    gpgv reads the file as a stream, before anything opens it as a package.
    """
    if not signature.lstrip().startswith(b"-----BEGIN PGP SIGNATURE-----"):
        raise IntegrityError(f"The signature of {source} is not an armored OpenPGP signature.")
    with (
        gpg.keyring(trusted, FLEET) as ring,
        gpg.detached_verifier(signature, ring, source=source) as verifier,
        path.open("rb") as f,
    ):
        while chunk := f.read(1 << 20):
            verifier.update(chunk)
        verifier.finish()
