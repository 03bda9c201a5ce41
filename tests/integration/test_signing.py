"""`update --sign KEY`: modules signed with the kernel's sign-file, split modules signed
although they are stored unlinked (the signature is appended after linking on the node)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from nvdriver.driver import package as pkg
from nvdriver.driver import toolchain
from nvdriver.driver.link import link_package
from nvdriver.driver.source import DriverSource
from nvdriver.driver.toolchain import Linker
from nvdriver.errors import IntegrityError
from nvdriver.host import in_container
from tests.conftest import run_tool, standin_env
from tests.standin.tree import make_standin_source

VERSION = "535.999.02"


@pytest.fixture(scope="module")
def signing_key(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A throw-away key and certificate in one PEM file, as sign-file takes them; on a
    mount of its own, as a key must be given in a container (this machine may be one:
    a key on its root mount would be refused, tests/unit/test_sign_key.py)."""
    d = tmp_path_factory.mktemp("key")
    if in_container():
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "keys", d], check=True)
    try:
        yield _make_key(d)
    finally:
        if in_container():
            subprocess.run(["umount", "--lazy", d], check=True)


def _make_key(d: Path) -> Path:
    key = d / "signing.pem"
    subprocess.run(
        [
            "openssl", "req", "-new", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=nvidia-driver test signer/", "-outform", "PEM",
            "-keyout", str(key), "-out", str(d / "cert.pem"),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    key.write_text(key.read_text() + (d / "cert.pem").read_text())
    return key


def modinfo(ko: Path, field: str) -> str:
    out = subprocess.run(["modinfo", "-F", field, str(ko)], check=True, capture_output=True)
    return out.stdout.decode().strip()


def test_signed_package_links_to_signed_modules(tmp_path, signing_key, kernel_build):
    source = make_standin_source(tmp_path / f"nvidia-{VERSION}", version=VERSION)
    env = standin_env(tmp_path, source, VERSION)
    result = run_tool(
        "update", "--kernel-source", str(kernel_build), "--sign", str(signing_key), env=env
    )
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.strip())
    manifest = pkg.verify(path)
    assert manifest.signing == {"hash": "sha512", "signer": "nvidia-driver test signer"}
    split = [e for e in manifest.modules if e.core is not None]
    assert split and all(e.signature and e.linked_sha256 for e in split)
    assert "nvidia.ko" not in dict(manifest.files), "a linked proprietary module is never packed"

    moddir = link_package(path, DriverSource(source, VERSION), tmp_path / "opt" / VERSION)
    for name in ("nvidia", "nvidia-uvm", "nvidia-modeset", "nvidia-drm"):
        ko = moddir / f"{name}.ko"
        assert modinfo(ko, "signer") == "nvidia-driver test signer", name
        assert modinfo(ko, "sig_hashalgo") == "sha512"
        assert ko.read_bytes().endswith(b"~Module signature appended~\n")


def _odd_ld(tmp_path: Path) -> Path:
    """A linker that adds a section: it stands in for one that links differently."""
    odd = tmp_path / "odd" / "ld"
    odd.parent.mkdir()
    odd.write_text('#!/bin/sh\nexec /usr/bin/ld --build-id=sha1 "$@"\n')
    odd.chmod(0o755)
    return odd


def test_a_signed_package_links_with_the_linker_it_carries_whatever_ld_the_node_has(
    tmp_path, signing_key, kernel_build, monkeypatch
):
    """A second node's `ld` (first on its PATH here) links differently: the package's own
    linker gives the bytes that were signed, so the signature holds there too."""
    source = make_standin_source(tmp_path / f"nvidia-{VERSION}", version=VERSION)
    env = standin_env(tmp_path, source, VERSION)
    result = run_tool(
        "update", "--kernel-source", str(kernel_build), "-s", str(signing_key), env=env
    )
    assert result.returncode == 0, result.stderr
    package = Path(result.stdout.strip())
    m = pkg.verify(package)
    assert m.linker_files is not None
    assert {n for n, _ in m.files} >= {m.linker_files["program"], m.linker_files["loader"]}
    monkeypatch.setenv("PATH", f"{_odd_ld(tmp_path).parent}:{os.environ['PATH']}")
    moddir = link_package(package, DriverSource(source, VERSION), tmp_path / "opt" / VERSION)
    assert modinfo(moddir / "nvidia.ko", "signer") == "nvidia-driver test signer"


def test_a_signature_is_never_appended_to_a_different_link(
    tmp_path, signing_key, kernel_build, monkeypatch
):
    source = make_standin_source(tmp_path / f"nvidia-{VERSION}", version=VERSION)
    env = standin_env(tmp_path, source, VERSION)
    result = run_tool(
        "update", "--kernel-source", str(kernel_build), "-s", str(signing_key), env=env
    )
    assert result.returncode == 0, result.stderr
    odd = Linker((str(_odd_ld(tmp_path)),), "odd ld")
    # link.py imports it where it links (a tree whose proof holds needs no linker).
    monkeypatch.setattr(toolchain, "packed_linker", lambda entry, members, ident: odd)
    base = tmp_path / "opt" / VERSION
    with pytest.raises(IntegrityError, match="did not reproduce"):
        link_package(Path(result.stdout.strip()), DriverSource(source, VERSION), base)
    assert not (base / "lib").exists()


def test_a_missing_key_is_a_clear_error(tmp_path, kernel_build):
    source = make_standin_source(tmp_path / f"nvidia-{VERSION}", version=VERSION)
    env = standin_env(tmp_path, source, VERSION)
    result = run_tool("update", "--kernel-source", str(kernel_build), "-s", "/nope.pem", env=env)
    assert result.returncode == 1
    assert "The signing key /nope.pem does not exist" in result.stderr
    assert not list((tmp_path / "precompiled").rglob("*.tar.gz"))
