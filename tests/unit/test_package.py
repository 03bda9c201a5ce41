"""The precompiled package: packing, verification, matching, refusing hostile archives."""

from __future__ import annotations

import gzip
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from nvdriver.atomic import TEMP_PREFIX
from nvdriver.driver import package as pkg
from nvdriver.errors import DriverError, ExitCode, IntegrityError
from nvdriver.host import KernelIdentity
from nvdriver.kmod.abi import Fit
from tests.conftest import need
from tests.packaging import KERNEL, fake_build, hostile_package


@pytest.fixture
def store(tmp_path):
    return tmp_path / "precompiled"


@pytest.fixture
def packed(tmp_path, store):
    return pkg.write_package(store, fake_build(tmp_path / "b"), tag=None)


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


def test_package_records_kernel_toolchain_and_every_member_hash(packed, store):
    assert packed.path == store / KERNEL.release / "nvidia-535.261.03-proprietary.tar.gz"
    m = pkg.read_manifest(packed.path)
    assert m.kernel == KERNEL
    assert m.compiler.startswith("gcc-12") and m.linker.startswith("GNU ld")
    assert [e.name for e in m.modules] == ["nvidia", "nvidia-uvm"]
    assert m.modules[0].core == "nvidia/nv-kernel.o_binary"
    assert m.modules[0].core_sha256 is not None
    names = {n for n, _ in m.files}
    assert names == {"nv-linux.o", "nvidia-uvm.ko", "lds/0-module.lds"}
    assert pkg.verify(packed.path) == m
    with tarfile.open(packed.path) as tar:
        assert tar.getnames()[0] == "manifest.json"


@pytest.mark.parametrize("where", [0.3, 0.5, 0.8, -30])
def test_one_flipped_byte_fails_verification_and_moves_the_package_aside(packed, where):
    data = bytearray(packed.path.read_bytes())
    offset = int(len(data) * where) if where > 0 else len(data) + int(where)
    data[offset] ^= 0x01
    packed.path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError) as e:
        pkg.verify(packed.path)
    assert e.value.exit_code == ExitCode.INTEGRITY
    assert not packed.path.exists()
    aside = list(packed.path.parent.glob("*.failed"))
    assert len(aside) == 1


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda d: d[:-8], id="the gzip trailer cut off"),
        pytest.param(lambda d: d[:-8] + bytes([d[-8] ^ 1]) + d[-7:], id="its CRC-32 changed"),
        pytest.param(lambda d: d[:-1] + bytes([d[-1] ^ 1]), id="its length changed"),
        pytest.param(lambda d: d + b"\0" * 512, id="zeros after the gzip stream"),
        pytest.param(lambda d: d + gzip.compress(b"more"), id="a second gzip member"),
    ],
)
def test_a_package_whose_gzip_trailer_or_end_is_not_its_own_fails_verification(packed, change):
    """The members are read through zlib a megabyte at a time (package.py `_Gunzip`): the
    trailer's CRC-32 and length are still checked, and nothing may follow the one member."""
    packed.path.write_bytes(change(packed.path.read_bytes()))
    with pytest.raises(IntegrityError, match="cannot be read"):
        pkg.verify(packed.path)
    assert not packed.path.exists()


def test_a_changed_member_hash_in_the_manifest_fails(tmp_path, store):
    build = fake_build(tmp_path / "b")
    p = pkg.write_package(store, build, tag=None)
    # Rewrite the package with one member changed but the same manifest.
    (build.tree / "nvidia-uvm.ko").write_bytes(b"evil")
    manifest = pkg.read_manifest(p.path)
    with tarfile.open(p.path, "w:gz") as tar:
        raw = manifest.to_json().encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(raw)
        import io

        tar.addfile(info, io.BytesIO(raw))
        for name, path in [
            ("nv-linux.o", build.tree / "nv-linux.o"),
            ("nvidia-uvm.ko", build.tree / "nvidia-uvm.ko"),
            ("lds/0-module.lds", build.ld_scripts[0]),
        ]:
            tar.add(path, arcname=name)
    work = tmp_path / "work"
    work.mkdir()
    with (
        pytest.raises(IntegrityError, match=r"nvidia-uvm\.ko has the wrong SHA-256"),
        pkg.unpacked(p.path, work),
    ):
        pytest.fail("a member was handed out before verification")
    assert files_under(work) == []


def _member(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    return info


@pytest.mark.parametrize(
    ("member", "why"),
    [
        (_member("../escape.ko", tarfile.REGTYPE), "'..'"),
        (_member("a/../../escape.ko", tarfile.REGTYPE), "'..'"),
        (_member("/etc/evil.ko", tarfile.REGTYPE), "absolute path"),
        (_member("link.ko", tarfile.SYMTYPE, "../../../etc/passwd"), "outside the package"),
        (_member("link.ko", tarfile.SYMTYPE, "/etc/passwd"), "outside the package"),
        (_member("hard.ko", tarfile.LNKTYPE, "../x"), "outside the package"),
        (_member("null", tarfile.CHRTYPE), "device"),
        (_member("disk", tarfile.BLKTYPE), "device"),
        (_member("pipe", tarfile.FIFOTYPE), "fifo"),
    ],
)
def test_hostile_members_are_refused_and_nothing_is_written(tmp_path, member, why):
    path = tmp_path / "store" / KERNEL.release / "nvidia-535.261.03-open.tar.gz"
    path.parent.mkdir(parents=True)
    hostile_package(path, member, b"x" * 10)
    work = tmp_path / "work" / "deep"
    work.mkdir(parents=True)
    with pytest.raises(IntegrityError, match=why) as e, pkg.unpacked(path, work):
        pass
    assert e.value.exit_code == ExitCode.INTEGRITY
    assert files_under(tmp_path / "work") == []
    assert not (tmp_path / "escape.ko").exists() and not (tmp_path / "work/escape.ko").exists()
    assert not path.exists(), "a refused package is moved aside"


def test_member_not_in_the_manifest_is_refused(tmp_path):
    path = tmp_path / "p.tar.gz"
    hostile_package(path, _member("extra.ko", tarfile.REGTYPE), b"data")
    with pytest.raises(IntegrityError, match="does not list"):
        pkg.verify(path)


def test_not_a_package_at_all_is_an_integrity_error(tmp_path):
    path = tmp_path / "p.tar.gz"
    path.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(IntegrityError):
        pkg.verify(path)


def accept(kernel: KernelIdentity) -> Fit:
    return Fit(True, "accepted")


def refuse(kernel: KernelIdentity) -> Fit:
    return Fit(False, "another ABI")


def test_find_matches_release_driver_flavour_tag_and_the_fit_verdict(packed, store):
    s = pkg.PackageStore(store)
    release = KERNEL.release
    assert s.find(release, "535.261.03", "proprietary", None, accept) == packed
    assert s.find("6.1.0-98-amd64", "535.261.03", "proprietary", None, accept) is None
    assert s.find(release, "535.261.04", "proprietary", None, accept) is None
    assert s.find(release, "535.261.03", "open", None, accept) is None
    assert s.find(release, "535.261.03", "proprietary", "other-tag", accept) is None
    assert s.find(release, "535.261.03", "proprietary", None, accept, refused={packed.path}) is None
    # The verdict gets the manifest's identity: release, vermagic and symbol CRCs.
    seen: list[KernelIdentity] = []

    def record(kernel: KernelIdentity) -> Fit:
        seen.append(kernel)
        return accept(kernel)

    s.find(release, "535.261.03", "proprietary", None, record)
    assert seen == [KERNEL]


def test_a_package_the_verdict_refuses_is_kept_unless_stale_is_asked(packed, store):
    s = pkg.PackageStore(store)
    assert s.find(KERNEL.release, "535.261.03", "proprietary", None, refuse) is None
    assert packed.path.exists()
    assert s.find(KERNEL.release, "535.261.03", "proprietary", None, refuse, stale=True) is None
    assert not packed.path.exists()
    stale = list(packed.path.parent.glob("*.stale"))
    assert len(stale) == 1 and stale[0].name.startswith(packed.path.name)
    assert s.leftovers() == stale  # packages prune removes it
    assert s.find(KERNEL.release, "535.261.03", "proprietary", None, accept) is None


def test_a_package_of_the_old_format_is_refused_with_a_message_saying_so(tmp_path):
    path = tmp_path / "p.tar.gz"
    hostile_package(path, _member("nv-linux.o", tarfile.REGTYPE), b"x", format=1)
    with pytest.raises(IntegrityError, match=r"older nvidia-driver \(package format 1") as e:
        pkg.read_manifest(path)
    assert "nvidia-driver update" in (e.value.hint or "")


def test_a_tagged_package_is_a_separate_file(tmp_path, store, packed):
    tagged = pkg.write_package(store, fake_build(tmp_path / "t"), tag="rdma")
    assert tagged.path.name == "nvidia-535.261.03-proprietary-rdma.tar.gz"
    s = pkg.PackageStore(store)
    assert s.find(KERNEL.release, "535.261.03", "proprietary", "rdma", accept) == tagged
    assert s.find(KERNEL.release, "535.261.03", "proprietary", None, accept) == packed


def test_disk_full_while_packing_leaves_no_partial_package(tmp_path):
    need(os.geteuid() == 0, "mounting a small tmpfs needs root")
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", small], check=True)
    try:
        with pytest.raises(DriverError, match="No space left") as e:
            pkg.write_package(small, fake_build(tmp_path / "b", size=1 << 20), tag=None)
        assert e.value.exit_code == ExitCode.FAILED
        assert files_under(small) == []
    finally:
        subprocess.run(["umount", small], check=True)


def test_temp_files_of_a_crashed_write_are_invisible_and_removed(packed, store):
    crashed = packed.path.parent / (TEMP_PREFIX + "abc123")
    crashed.write_bytes(b"half a package")
    s = pkg.PackageStore(store)
    good, bad = s.packages()
    assert [p.path for p in good] == [packed.path] and bad == []
    s.remove_temp_files()
    assert not crashed.exists() and packed.path.exists()
