"""A package verified and linked on this node is not verified, linked or depmod'ed again
at the next start while its proof holds (driver/proof.py, issue 22); any change to the
package, its core object or the tree is a full verification again, and a package this
node has not verified is always verified completely.

Each start here is `init`'s own step up to the loaded modules (lifecycle._prepare) with
a package that links for real (`ld -r` of the stand-in's core object, `depmod`); what
was hashed is counted at the two hashing functions, what was run from the run wrapper's
log of each command line.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from nvdriver import lifecycle
from nvdriver.config import Config
from nvdriver.driver import link, proof
from nvdriver.driver import package as pkg
from nvdriver.driver.source import DriverSource
from nvdriver.errors import IntegrityError
from tests.packaging import linkable_build, package_for_running_kernel
from tests.unit.test_init_without_package import node_without_package


class Counts:
    """What one start hashed and ran."""

    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        self.caplog = caplog
        self.members = 0  # package members hashed (verification)
        self.files = 0  # files hashed whole (the core object, a linked module)

    def ran(self, program: str) -> int:
        return sum(r.getMessage().startswith(f"+ {program} ") for r in self.caplog.records)


@pytest.fixture
def counts(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> Counts:
    counted = Counts(caplog)
    copy_hashing, sha256_file = pkg._copy_hashing, pkg.sha256_file

    def hash_member(src: IO[bytes], dest: Path | None) -> str:
        counted.members += 1
        return copy_hashing(src, dest)

    def hash_file(path: Path) -> str:
        counted.files += 1
        return sha256_file(path)

    monkeypatch.setattr(pkg, "_copy_hashing", hash_member)
    monkeypatch.setattr(link, "sha256_file", hash_file)
    caplog.set_level(logging.DEBUG, logger="nvdriver")
    # The run wrapper's log of each command line; cli.main (other tests) stops propagation.
    monkeypatch.setattr(logging.getLogger("nvdriver"), "propagate", True)
    return counted


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Config, pkg.Package]]:
    node_without_package(tmp_path, monkeypatch)
    config = Config.from_env(dict(os.environ))
    yield config, package_for_running_kernel(config, tmp_path / "build")


def start(config: Config, counts: Counts) -> lifecycle.DriverPlan:
    """One start up to the loaded modules, with fresh counts."""
    counts.caplog.clear()
    counts.members = counts.files = 0
    return lifecycle._prepare(config)


def tree_files(plan: lifecycle.DriverPlan) -> dict[str, tuple[int, bytes]]:
    d = plan.tree.directory
    return {p.name: (p.stat().st_ino, p.read_bytes()) for p in d.iterdir() if p.is_file()}


def test_the_first_start_verifies_everything_and_the_second_nothing(
    node: tuple[Config, pkg.Package], counts: Counts
) -> None:
    config, package = node
    first = start(config, counts)
    # Every member hashed, the core object and the linked module too; linked, depmod'ed.
    assert counts.members == len(package.manifest.files)
    assert counts.files == 1 and counts.ran("ld -d") == 1 and counts.ran("depmod") == 1
    assert (first.tree.directory / proof.PROOF).is_file()
    linked = tree_files(first)

    second = start(config, counts)
    assert (counts.members, counts.files, counts.ran("ld"), counts.ran("depmod")) == (0, 0, 0, 0)
    assert second.tree == first.tree and second.modules == ("nvidia", "nvidia-uvm")
    assert tree_files(second) == linked  # the very files: not rewritten


def verified_again(config: Config, package: pkg.Package, counts: Counts) -> None:
    """A start verifies the package completely, links and depmods, and the one after
    trusts the new proof."""
    start(config, counts)
    assert counts.members == len(package.manifest.files)
    assert counts.ran("depmod") == 1
    start(config, counts)
    assert (counts.members, counts.ran("depmod")) == (0, 0)


def test_a_package_touched_even_to_its_own_mtime_is_verified_again(
    node: tuple[Config, pkg.Package], counts: Counts
) -> None:
    """Its size, inode and mtime are as before; its ctime is not (mtime can be set back,
    ctime cannot)."""
    config, package = node
    start(config, counts)
    st = package.path.stat()
    os.utime(package.path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert package.path.stat().st_mtime_ns == st.st_mtime_ns
    verified_again(config, package, counts)


def test_a_package_replaced_by_another_is_verified_and_its_tree_relinked(
    node: tuple[Config, pkg.Package], counts: Counts, tmp_path: Path
) -> None:
    """A package new to the node under the same name (pulled, copied, rebuilt)."""
    config, package = node
    first = tree_files(start(config, counts))
    source = DriverSource.from_config(config)
    other = linkable_build(tmp_path / "other", source, package.manifest.kernel)
    assert pkg.write_package(config.precompiled_dir, other, tag=None).path == package.path
    verified_again(config, package, counts)
    now = tree_files(start(config, counts))
    assert now["nvidia-uvm.ko"][1] == (tmp_path / "other" / "nvidia-uvm.ko").read_bytes()
    assert now["nvidia-uvm.ko"] != first["nvidia-uvm.ko"]


def test_a_package_tampered_in_place_with_size_and_mtime_kept_is_refused(
    node: tuple[Config, pkg.Package], counts: Counts
) -> None:
    config, package = node
    start(config, counts)
    st = package.path.stat()
    data = bytearray(package.path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    with package.path.open("r+b") as f:  # the same inode, the same size
        f.write(data)
    os.utime(package.path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(IntegrityError):
        start(config, counts)
    assert not package.path.exists()  # moved aside as failed, never used
    assert [p.name.endswith(".failed") for p in package.path.parent.iterdir()] == [True]


def test_a_truncated_package_is_verified_again_and_refused(
    node: tuple[Config, pkg.Package], counts: Counts
) -> None:
    config, package = node
    start(config, counts)
    os.truncate(package.path, package.path.stat().st_size - 100)
    with pytest.raises(IntegrityError):
        start(config, counts)
    assert not package.path.exists()


@pytest.mark.parametrize("change", ["module", "missing", "added", "proof"])
def test_a_changed_tree_is_linked_again(
    node: tuple[Config, pkg.Package], counts: Counts, change: str
) -> None:
    config, package = node
    tree = start(config, counts).tree.directory
    linked = (tree / "nvidia.ko").read_bytes()
    if change == "module":
        with (tree / "nvidia.ko").open("ab") as f:
            f.write(b"\0")
    elif change == "missing":
        (tree / "modules.dep").unlink()
    elif change == "added":
        (tree / "evil.ko").write_bytes(b"\0")
    else:
        (tree / proof.PROOF).write_text("{not json")
    verified_again(config, package, counts)
    assert (tree / "nvidia.ko").read_bytes() == linked and not (tree / "evil.ko").exists()


def test_a_changed_core_object_is_verified_again(
    node: tuple[Config, pkg.Package], counts: Counts
) -> None:
    """NVIDIA's core object in the driver image: the linked module is made of it."""
    config, _ = node
    start(config, counts)
    core = DriverSource.from_config(config).flavour_dir("proprietary") / "nvidia/nv-kernel.o_binary"
    core.write_bytes(core.read_bytes())  # the same content, rewritten
    start(config, counts)
    assert counts.files == 1 and counts.ran("depmod") == 1


def test_a_proof_copied_with_its_tree_to_another_package_file_is_not_trusted(
    node: tuple[Config, pkg.Package], counts: Counts
) -> None:
    """A package of the same content under a new inode (copied from another node, or the
    tree with its proof copied here) is a package this node has not verified."""
    config, package = node
    start(config, counts)
    copy = package.path.with_name("copy")
    copy.write_bytes(package.path.read_bytes())
    os.replace(copy, package.path)
    verified_again(config, package, counts)
