"""OpenPGP verification of Flatcar release artifacts with `gpgv`.

The trusted key is an armored public key file (FLATCAR_SIGNING_KEY); it is
dearmored into a throw-away keyring, so nothing is imported into any user's
GnuPG home and only that key can make a signature good. A clear-signed file
is verified and its *signed* text returned (never the raw file, which may
carry unsigned text around the signed part); a detached signature can be
checked over a stream while it downloads.

A signature the key does not verify is refused (exit 5) with what an operator needs:
which key file is configured, its fingerprints (from `gpg --show-keys --with-colons`),
which key made the signature (gpgv's status lines), and what to do: Flatcar rotates
its image signing key, and an image built with an old copy no longer verifies new
releases.

gpgv exits 0 for a signature by an expired or a revoked key too, so its exit status
alone is not the verdict: the status lines are (`accepted`). A revoked key's signature
is refused for every role. An expired key's is a matter of the key's role: Flatcar
lets its signing subkeys expire yearly, and an old release stays signed by the subkey
of its year, so the Flatcar role accepts it (with a log line naming the key); a
fleet's packages are pulled to be loaded now, and a fleet key that expired is no
longer the fleet's word, so the fleet role refuses it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from nvdriver.config import Config
from nvdriver.errors import DriverError, IntegrityError
from nvdriver.flatcar.pipes import FedChild, fed_child
from nvdriver.run import run

log = logging.getLogger(__name__)

# Where the driver image keeps its copy of Flatcar's image signing key.
DEFAULT_SIGNING_KEY = Path("/usr/share/nvidia-driver/flatcar-image-signing-key.asc")
ARMOR_HEADER = b"-----BEGIN PGP PUBLIC KEY BLOCK-----"
GPG_TIMEOUT = 60.0


def signing_key(config: Config) -> Path:
    """The trusted public key file: FLATCAR_SIGNING_KEY, else the image's copy."""
    key = config.signing_key or DEFAULT_SIGNING_KEY
    if not key.is_file():
        raise DriverError(
            f"The Flatcar signing key {key} does not exist: downloads cannot be verified.",
            hint="Set FLATCAR_SIGNING_KEY to an armored copy of Flatcar's image signing key.",
        )
    return key


def _valid_signers(status: str) -> list[str]:
    """Fingerprints from `VALIDSIG` lines of gpgv's machine-readable status output."""
    return [
        line.split()[2]
        for line in status.splitlines()
        if line.startswith("[GNUPG:] VALIDSIG ") and len(line.split()) > 2
    ]


def _signer(status: str, keyword: str) -> str:
    """Who made the signature of a `keyword` status line (`EXPKEYSIG KEYID UID...`), for a
    message: the key id, the user id and the signing key's fingerprint (VALIDSIG)."""
    words = next(
        (line.split(maxsplit=3)[2:] for line in status.splitlines()
         if line.startswith(f"[GNUPG:] {keyword} ")),
        [],
    )  # fmt: skip
    keyid = words[0] if words else "unknown"
    uid = f" ({words[1]})" if len(words) > 1 else ""
    fprs = _valid_signers(status)
    return f"key {keyid}{uid}" + (f", fingerprint {fprs[0]}" if fprs else "")


def parse_status(status: str) -> dict[str, list[str]]:
    """gpgv's `[GNUPG:] KEYWORD ARGS...` status lines: the first arguments per keyword."""
    found: dict[str, list[str]] = {}
    for line in status.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "[GNUPG:]":
            found.setdefault(words[1], words[2:])
    return found


def parse_fingerprints(colons: str) -> list[str]:
    """The primary keys' fingerprints of `gpg --show-keys --with-colons` output (an
    `fpr` record, field 10, right after each `pub` record)."""
    fingerprints, after_pub = [], False
    for line in colons.splitlines():
        fields = line.split(":")
        if fields[0] == "fpr" and after_pub and len(fields) > 9:
            fingerprints.append(fields[9])
        after_pub = fields[0] == "pub"
    return fingerprints


@dataclasses.dataclass(frozen=True)
class KeyRole:
    """Whose key a keyring holds, for the messages of a refused signature: what the key
    is called, and what an operator does about a signer it lacks or a bad signature."""

    label: str
    no_key_hint: str
    bad_hint: str
    other_hint: str
    # Whether a good signature by a key that has since expired counts (module docstring).
    expired_key_ok: bool = False
    revoked_hint: str = "A revoked key signs nothing that is used; nothing from it was used."
    expired_hint: str = "An expired key signs nothing that is used; nothing from it was used."


FLATCAR = KeyRole(
    label="Flatcar signing key",
    no_key_hint="Flatcar signs its releases with a key it rotates: rebuild the driver "
    "image so that it fetches Flatcar's current image signing key, or set "
    "FLATCAR_SIGNING_KEY to a mounted copy of the current key (check its "
    "fingerprint against Flatcar's published one).",
    bad_hint="Nothing from it was used; check the mirror at FLATCAR_RELEASE_URL.",
    other_hint="The file was changed or not signed with the trusted key "
    "(FLATCAR_SIGNING_KEY); nothing from it was used.",
    # Flatcar's signing subkeys expire yearly; an old release keeps its year's signature.
    expired_key_ok=True,
    revoked_hint="Flatcar revoked the key that signed this release: nothing from it was "
    "used. Use a release signed by a current key (a newer one of the channel).",
)


@dataclasses.dataclass(frozen=True)
class Keyring:
    """A throw-away keyring (`path`, for `gpgv --keyring`) made of one key file (`key`)."""

    path: Path
    key: Path
    role: KeyRole = FLATCAR

    def fingerprints(self) -> list[str]:
        """The key file's primary fingerprints; empty when gpg cannot list them."""
        with tempfile.TemporaryDirectory(prefix="nvdriver-gpg-") as tmp:
            result = run(
                ["gpg", "--batch", "--no-options", "--homedir", tmp, "--with-colons",
                 "--show-keys", self.key],
                timeout=GPG_TIMEOUT,
                check=False,
            )  # fmt: skip
        return parse_fingerprints(result.stdout) if result.returncode == 0 else []

    def rejection(self, source: str, status: str, stderr: str) -> IntegrityError:
        """Why gpgv refused the signature of `source`, from its status lines: signed by
        a key that the configured key file lacks, or a signature that does not match."""
        lines = parse_status(status)
        fprs = ", ".join(self.fingerprints()) or "none that gpg can read"
        named = f"the configured {self.role.label} {self.key} (fingerprint {fprs})"
        no_key = lines.get("NO_PUBKEY")  # with ERRSIG: the signer is not in the keyring
        if no_key:
            return IntegrityError(
                f"The signature of {source} is by key {no_key[0]}, which {named} does not "
                "hold: it cannot be verified and nothing from it was used.",
                hint=self.role.no_key_hint,
            )
        if "BADSIG" in lines:
            return IntegrityError(
                f"The signature of {source} by key {lines['BADSIG'][0]} does not match its "
                f"content ({named}): it was changed on the way or at its source.",
                hint=self.role.bad_hint,
            )
        return IntegrityError(
            f"The signature of {source} is not good ({named}): {stderr.strip() or 'gpgv failed'}",
            hint=self.role.other_hint,
        )

    def accepted(self, source: str, status: str) -> None:
        """Raise IntegrityError unless gpgv's status lines (of a run that exited 0) say the
        signature is good by a key this role accepts: never a revoked key's, an expired
        key's only where the role allows it, and never one without GOODSIG otherwise."""
        lines = parse_status(status)
        named = f"the configured {self.role.label} {self.key}"
        if "REVKEYSIG" in lines:
            raise IntegrityError(
                f"The signature of {source} is by {_signer(status, 'REVKEYSIG')}, which "
                f"{named} marks as revoked: it is refused and nothing from it was used.",
                hint=self.role.revoked_hint,
            )
        if "EXPKEYSIG" in lines:
            if self.role.expired_key_ok:
                log.info(
                    "%s: signed by %s, which has expired since (accepted: %s)",
                    source,
                    _signer(status, "EXPKEYSIG"),
                    self.role.label,
                )
                return
            raise IntegrityError(
                f"The signature of {source} is by {_signer(status, 'EXPKEYSIG')}, which "
                f"has expired ({named}): it is refused and nothing from it was used.",
                hint=self.role.expired_hint,
            )
        if "GOODSIG" not in lines:
            found = ", ".join(lines) or "no status"
            raise IntegrityError(
                f"The signature of {source} is not a good signature by a valid key of {named} "
                f"(gpgv said: {found}): it is refused and nothing from it was used.",
                hint=self.role.other_hint,
            )


@contextlib.contextmanager
def keyring(key: Path, role: KeyRole = FLATCAR) -> Iterator[Keyring]:
    """A temporary keyring that holds only `key` (armored or binary; one key or several)
    for `gpgv --keyring`."""
    with tempfile.TemporaryDirectory(prefix="nvdriver-gpg-") as tmp:
        ring = Path(tmp) / "trusted.gpg"
        try:
            armored = key.read_bytes().lstrip().startswith(ARMOR_HEADER)
        except OSError as e:
            raise DriverError(f"Could not read the signing key {key}: {e.strerror}.") from e
        if armored:
            run(
                ["gpg", "--batch", "--no-options", "--homedir", tmp, "--dearmor",
                 "--output", ring, key],
                timeout=GPG_TIMEOUT,
                hint=f"Is {key} an armored OpenPGP public key?",
            )  # fmt: skip
        else:
            shutil.copyfile(key, ring)
        yield Keyring(ring, key, role)


def _gpgv(ring: Keyring, home: str) -> list[str | Path]:
    return ["gpgv", "--homedir", home, "--keyring", ring.path, "--status-fd", "1"]


def verify_clearsigned(signed: bytes, ring: Keyring, *, source: str) -> str:
    """The signed text of a clear-signed document; IntegrityError unless its signature is good."""
    with tempfile.TemporaryDirectory(prefix="nvdriver-gpgv-") as tmp:
        signed_file = Path(tmp) / "signed.asc"
        signed_file.write_bytes(signed)
        output = Path(tmp) / "signed.txt"
        result = run(
            [*_gpgv(ring, tmp), "--output", output, signed_file], timeout=GPG_TIMEOUT, check=False
        )
        if result.returncode != 0:
            raise ring.rejection(source, result.stdout, result.stderr)
        ring.accepted(source, result.stdout)
        log.debug("%s: good signature by %s", source, ", ".join(_valid_signers(result.stdout)))
        return output.read_text(errors="replace")


class StreamVerifier:
    """Checks a detached signature over bytes fed to it as they arrive (gpgv reads stdin)."""

    def __init__(self, gpgv: FedChild, status: IO[bytes], source: str, ring: Keyring) -> None:
        self._gpgv = gpgv
        self._status = status
        self._source = source
        self._ring = ring

    def update(self, data: bytes) -> None:
        try:
            self._gpgv.write(data)
        except BrokenPipeError:
            self.finish()
            raise IntegrityError(
                f"gpgv stopped reading before the end of {self._source}."
            ) from None

    def finish(self) -> None:
        """Raise IntegrityError unless the signature over everything fed is good."""
        self._gpgv.close_input()
        failed = self._gpgv.proc.wait(timeout=GPG_TIMEOUT) != 0
        self._status.seek(0)
        status = self._status.read().decode(errors="replace")
        if failed:
            raise self._ring.rejection(
                f"the detached signature {self._source}", status, self._gpgv.stderr()
            )
        self._ring.accepted(f"the detached signature {self._source}", status)
        log.debug("%s: good signature by %s", self._source, ", ".join(_valid_signers(status)))


@contextlib.contextmanager
def detached_verifier(signature: bytes, ring: Keyring, *, source: str) -> Iterator[StreamVerifier]:
    """A `StreamVerifier` of `signature` (the bytes of `source`, a `.sig` file)."""
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="nvdriver-gpgv-"))
        sig_file = Path(tmp) / "data.sig"
        sig_file.write_bytes(signature)
        status: IO[bytes] = stack.enter_context(tempfile.TemporaryFile())
        gpgv = stack.enter_context(fed_child([*_gpgv(ring, tmp), sig_file, "-"], stdout=status))
        yield StreamVerifier(gpgv, status, source, ring)
