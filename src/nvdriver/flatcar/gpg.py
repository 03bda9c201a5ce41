"""OpenPGP verification of Flatcar release artifacts with `gpgv`.

The trusted key is an armored public key file (FLATCAR_SIGNING_KEY); it is
dearmored into a throw-away keyring, so nothing is imported into any user's
GnuPG home and only that key can make a signature good. A clear-signed file
is verified and its *signed* text returned (never the raw file, which may
carry unsigned text around the signed part); a detached signature can be
checked over a stream while it downloads.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from nvdriver.config import Config
from nvdriver.errors import DriverError, IntegrityError
from nvdriver.flatcar.pipes import FedChild, fed_child
from nvdriver.run import RunError, run

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


@contextlib.contextmanager
def keyring(key: Path) -> Iterator[Path]:
    """A temporary keyring that holds only `key` (armored or binary) for `gpgv --keyring`."""
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
        yield ring


def _gpgv(ring: Path, home: str) -> list[str | Path]:
    return ["gpgv", "--homedir", home, "--keyring", ring, "--status-fd", "1"]


def verify_clearsigned(signed: bytes, ring: Path, *, source: str) -> str:
    """The signed text of a clear-signed document; IntegrityError unless its signature is good."""
    with tempfile.TemporaryDirectory(prefix="nvdriver-gpgv-") as tmp:
        signed_file = Path(tmp) / "signed.asc"
        signed_file.write_bytes(signed)
        output = Path(tmp) / "signed.txt"
        try:
            result = run([*_gpgv(ring, tmp), "--output", output, signed_file], timeout=GPG_TIMEOUT)
        except RunError as e:
            raise IntegrityError(
                f"The signature of {source} is not good: {e.stderr.strip() or e}",
                hint="The file was changed or not signed with the trusted key "
                "(FLATCAR_SIGNING_KEY); nothing from it was used.",
            ) from e
        log.debug("%s: good signature by %s", source, ", ".join(_valid_signers(result.stdout)))
        return output.read_text(errors="replace")


class StreamVerifier:
    """Checks a detached signature over bytes fed to it as they arrive (gpgv reads stdin)."""

    def __init__(self, gpgv: FedChild, status: IO[bytes], source: str) -> None:
        self._gpgv = gpgv
        self._status = status
        self._source = source

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
        if self._gpgv.proc.wait(timeout=GPG_TIMEOUT) != 0:
            raise IntegrityError(
                f"The detached signature {self._source} does not match the download: "
                f"{self._gpgv.stderr()}",
                hint="The file was changed or not signed with the trusted key "
                "(FLATCAR_SIGNING_KEY); nothing from it was used.",
            )
        self._status.seek(0)
        signers = _valid_signers(self._status.read().decode(errors="replace"))
        log.debug("%s: good signature by %s", self._source, ", ".join(signers))


@contextlib.contextmanager
def detached_verifier(signature: bytes, ring: Path, *, source: str) -> Iterator[StreamVerifier]:
    """A `StreamVerifier` of `signature` (the bytes of `source`, a `.sig` file)."""
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="nvdriver-gpgv-"))
        sig_file = Path(tmp) / "data.sig"
        sig_file.write_bytes(signature)
        status: IO[bytes] = stack.enter_context(tempfile.TemporaryFile())
        gpgv = stack.enter_context(fed_child([*_gpgv(ring, tmp), sig_file, "-"], stdout=status))
        yield StreamVerifier(gpgv, status, source)
