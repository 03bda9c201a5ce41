"""Signatures by keys that were good once: gpgv exits 0 for a signature by a revoked or an
expired key, and only its status lines tell. Real gpg and gpgv, with throw-away keys made
here: one revoked after it signed (its revocation certificate, which gpg writes at key
generation, imported), one that signed while valid and has expired since (made and used
at a faked system time in the past)."""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from nvdriver import trust
from nvdriver.errors import ExitCode, IntegrityError
from nvdriver.flatcar import gpg

# A time when the expiring keys were valid: made at PAST, valid one day, used at SIGNED.
PAST = "20200101T000000"
SIGNED = "20200101T120000"


@dataclasses.dataclass(frozen=True)
class Signed:
    """A file, its armored detached signature, and the signer's public key file."""

    path: Path
    signature: bytes
    public: Path
    fingerprint: str  # of the key that signed (the subkey where one signs)


@contextlib.contextmanager
def gnupg_home() -> Iterator[Path]:
    # Short path under /tmp: gpg-agent's socket path has a length limit.
    home = Path(tempfile.mkdtemp(prefix="trust-gpg-", dir="/tmp"))
    try:
        yield home
    finally:
        subprocess.run(["gpgconf", "--homedir", home, "--kill", "all"], check=False)
        shutil.rmtree(home, ignore_errors=True)


def gpg_run(home: Path, *args: str | Path, at: str | None = None) -> str:
    faked = ["--faked-system-time", at] if at else []
    argv: list[str | Path] = ["gpg", "--batch", "--homedir", home, "--pinentry-mode", "loopback"]
    argv += ["--passphrase", "", *faked, *args]
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def fingerprints(home: Path) -> list[str]:
    colons = gpg_run(home, "--with-colons", "--list-keys")
    return [line.split(":")[9] for line in colons.splitlines() if line.startswith("fpr:")]


def signed(tmp: Path, name: str, *, expiring: str | None = None, revoked: bool = False) -> Signed:
    """A file signed by a new key `name`. `expiring`: "primary" (a signing primary key) or
    "subkey" (a certify-only primary key that never expires, and a signing subkey, as
    Flatcar's), valid for a day in 2020 and used then. `revoked`: the key is revoked
    after the signature, and the public key file carries the revocation."""
    data = tmp / f"{name}.tar.gz"
    data.write_bytes(b"a package of kernel code\n")
    uid = f"{name} <{name}@fleet.test>"
    at = PAST if expiring else None
    with gnupg_home() as home:
        if expiring == "subkey":
            gpg_run(home, "--quick-gen-key", uid, "ed25519", "cert", "never", at=at)
            gpg_run(home, "--quick-add-key", fingerprints(home)[0], "ed25519", "sign", "1d", at=at)
        else:
            gpg_run(home, "--quick-gen-key", uid, "ed25519", "sign", "1d" if at else "never", at=at)
        signature = tmp / f"{name}.asc"
        gpg_run(home, "--armor", "--detach-sign", "-o", signature, data, at=SIGNED if at else None)
        primary = fingerprints(home)[0]
        if revoked:
            certificate = (home / "openpgp-revocs.d" / f"{primary}.rev").read_text()
            (home / "revoke.asc").write_text(certificate.replace(":-----BEGIN", "-----BEGIN"))
            gpg_run(home, "--import", home / "revoke.asc")
        public = tmp / f"{name}.public.asc"
        public.write_text(gpg_run(home, "--armor", "--export", primary))
        return Signed(data, signature.read_bytes(), public, fingerprints(home)[-1])


def verify_fleet(s: Signed) -> None:
    trust.verify(s.path, s.signature, s.public, source=s.path.name)


def verify_flatcar(s: Signed) -> None:
    with (
        gpg.keyring(s.public) as ring,
        gpg.detached_verifier(s.signature, ring, source=s.path.name) as verifier,
    ):
        verifier.update(s.path.read_bytes())
        verifier.finish()


@pytest.fixture(autouse=True)
def _gpg() -> None:
    if shutil.which("gpg") is None or shutil.which("gpgv") is None:
        pytest.skip("needs gpg and gpgv")


def test_a_package_signed_by_a_fleet_key_revoked_since_is_refused_naming_the_key(
    tmp_path: Path,
) -> None:
    s = signed(tmp_path, "fleet", revoked=True)
    with pytest.raises(IntegrityError) as e:
        verify_fleet(s)
    assert e.value.exit_code == ExitCode.INTEGRITY
    assert f"fingerprint {s.fingerprint}" in e.value.message
    assert "fleet <fleet@fleet.test>" in e.value.message
    assert "revoked" in e.value.message and "nothing from it was used" in e.value.message
    assert e.value.hint is not None and "current key" in e.value.hint


@pytest.mark.parametrize("expiring", ["primary", "subkey"])
def test_a_package_signed_by_a_fleet_key_that_expired_since_is_refused_naming_the_key(
    tmp_path: Path, expiring: str
) -> None:
    s = signed(tmp_path, "fleet", expiring=expiring)
    with pytest.raises(IntegrityError, match="has expired") as e:
        verify_fleet(s)
    assert f"fingerprint {s.fingerprint}" in e.value.message
    assert e.value.hint is not None and "--quick-set-expire" in e.value.hint


def test_flatcar_artifacts_of_an_expired_subkey_verify_but_a_revoked_keys_do_not(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Flatcar's signing subkeys expire yearly and an old release keeps its year's
    signature; a revoked key is never trusted."""
    caplog.set_level("INFO")
    old = signed(tmp_path, "flatcar-2020", expiring="subkey")
    verify_flatcar(old)
    assert f"fingerprint {old.fingerprint}, which has expired since" in caplog.text
    revoked = signed(tmp_path, "flatcar-revoked", revoked=True)
    with pytest.raises(IntegrityError, match="revoked") as e:
        verify_flatcar(revoked)
    assert f"fingerprint {revoked.fingerprint}" in e.value.message
