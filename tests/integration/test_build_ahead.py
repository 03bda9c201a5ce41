"""Building ahead of a Flatcar update against the local fleet mirror: two releases of
one channel (the running one with the oldest kernel under test, the next with the
newest), one feed, one signing key (tests/flatcar_mirror.py `build_fleet_mirror`).

`update --flatcar-version V` and `update --next` download V's developer container,
find the kernel tree the feed names for V in it and build there (the stand-in driver,
tests/standin); the package's identity comes from that tree. Nothing is mocked.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from nvdriver.driver import package as pkg
from nvdriver.host import KernelIdentity, KernelTree
from nvdriver.kmod.modversions import read_symvers
from tests.conftest import run_tool, standin_env
from tests.flatcar_mirror import IMAGE_NAME, FleetMirror, MirrorServer, serve_mirror
from tests.integration.test_update_flatcar import assert_clean
from tests.packaging import KERNEL, fake_build
from tests.standin.tree import make_standin_source

VERSION = "535.999.04"


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_standin_source(
        tmp_path_factory.mktemp("src") / f"nvidia-{VERSION}", version=VERSION
    )


@pytest.fixture
def server(fleet_mirror: FleetMirror) -> Iterator[MirrorServer]:
    with serve_mirror(fleet_mirror.running) as served:
        yield served


def on_flatcar(tmp_path: Path, version: str) -> Path:
    """A HOST_ROOT whose host runs Flatcar `version` (the documented os-release mount)."""
    host = tmp_path / "host"
    (host / "host-etc").mkdir(parents=True, exist_ok=True)
    (host / "host-etc" / "os-release").write_text(f"ID=flatcar\nVERSION={version}\n")
    (host / "proc").mkdir(exist_ok=True)
    (host / "proc" / "version").write_text("Linux version (the host's) #1 SMP\n")
    return host


def environment(tmp_path: Path, standin: Path, server: MirrorServer, host: str) -> dict[str, str]:
    return {
        **server.env(),
        **standin_env(tmp_path, standin, VERSION),
        "HOST_ROOT": str(on_flatcar(tmp_path, host)),
    }


def fits_the_booted_kernel(kernel: KernelIdentity, kernel_release: str) -> bool:
    """Whether a package's kernel identity fits the kernel installed here, which the guest
    boots: the mirror's developer root is another build of the same Debian headers (another
    UTS_VERSION: docs/package.md, "Which package fits a kernel"), so the release and every
    CRC agree while /proc/version does not."""
    build = Path("/lib/modules") / kernel_release / "build"
    booted = KernelIdentity.from_build_tree(KernelTree.from_dir(build).output)
    symvers = read_symvers(build / "Module.symvers")
    return (
        kernel.release == booted.release
        and kernel.version != booted.version
        and bool(kernel.symbols)
        and all(symvers[name] == crc for name, crc in kernel.symbols)
    )


def image_requests(server: MirrorServer, version: str) -> int:
    return len(server.requests_for(f"/{server.mirror.board}/{version}/{IMAGE_NAME}"))


def test_update_for_a_named_release_builds_for_its_kernel_with_the_trees_identity(
    tmp_path: Path, standin: Path, server: MirrorServer, fleet_mirror: FleetMirror
) -> None:
    running, following = fleet_mirror.running, fleet_mirror.next
    env = environment(tmp_path, standin, server, running.version)
    result = run_tool("update", "--flatcar-version", following.version, env=env)
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.strip())
    assert path.parent == tmp_path / "precompiled" / following.kernel_release, "image store"
    manifest = pkg.verify(path)
    assert fits_the_booted_kernel(manifest.kernel, following.kernel_release)
    assert (manifest.driver_version, manifest.kernel_release) == (
        VERSION,
        following.kernel_release,
    )
    assert f"building for its kernel {following.kernel_release}" in result.stderr
    assert image_requests(server, following.version) >= 1
    assert image_requests(server, running.version) == 0, "only the named release's image"
    # Newer than the host's release: recorded as the next one, with the tree's kernel.
    record = json.loads((tmp_path / "cache" / "next-release.json").read_text())
    assert {k: record[k] for k in ("version", "kernel", "kernel_release", "source")} == {
        "version": following.version,
        "kernel": following.kernel_upstream,
        "kernel_release": following.kernel_release,
        "source": "feed",
    }
    assert_clean(tmp_path)


def test_update_next_builds_ahead_into_the_node_store_which_status_shows_and_prune_keeps(
    tmp_path: Path, standin: Path, server: MirrorServer, fleet_mirror: FleetMirror
) -> None:
    running, following = fleet_mirror.running, fleet_mirror.next
    env = environment(tmp_path, standin, server, running.version)
    result = run_tool("update", "--next", "--store", "node", env=env)
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.strip())
    assert path.parent == tmp_path / "node-precompiled" / following.kernel_release
    assert fits_the_booted_kernel(pkg.verify(path).kernel, following.kernel_release)
    assert f"The next Flatcar stable release after {running.version} is {following.version}" in (
        result.stderr
    )
    assert not (tmp_path / "precompiled").exists(), "nothing in the image's store"

    # The watcher runs `update --next` every interval: the package is there, nothing is
    # fetched or compiled again (the record names the kernel the build found).
    built_at, fetched = path.stat().st_mtime_ns, image_requests(server, following.version)
    again = run_tool("update", "--next", "--store", "node", env=env)
    assert (again.returncode, again.stdout.strip()) == (0, str(path)), again.stderr
    assert f"The package for Flatcar {following.version} is there already" in again.stderr
    assert (path.stat().st_mtime_ns, image_requests(server, following.version)) == (
        built_at,
        fetched,
    )

    report = json.loads(run_tool("status", "--json", env=env).stdout)["releases"]
    assert (report["running"]["version"], report["running"]["packages"]) == (running.version, [])
    assert (report["next"]["version"], report["next"]["kernel_release"]) == (
        following.version,
        following.kernel_release,
    )
    assert [(p["path"], p["store"], p["origin"]) for p in report["next"]["packages"]] == [
        (str(path), "node", {"origin": "built here"})
    ]
    assert report["staged"] is None

    # Prune: the package built ahead and the next release's developer container stay;
    # a package of another kernel and another release's developer container go.
    other_kernel = KERNEL._replace(release="6.1.0-1-amd64")
    other = pkg.write_package(
        tmp_path / "node-precompiled",
        dataclasses.replace(
            fake_build(tmp_path / "o", kernel=other_kernel), driver_version=VERSION
        ),
        tag=None,
    )
    images = tmp_path / "cache" / "flatcar" / running.board
    stale = images / "4081.2.0"
    stale.mkdir(parents=True)
    (stale / "flatcar_developer_container.bin").write_bytes(b"old")
    pruned = run_tool("packages", "prune", env=env)
    assert pruned.returncode == 0, pruned.stderr
    assert path.exists() and (images / following.version).is_dir()
    assert not other.path.exists() and not stale.exists()
    assert_clean(tmp_path)


def test_update_next_on_the_newest_release_has_nothing_to_do(
    tmp_path: Path, standin: Path, server: MirrorServer, fleet_mirror: FleetMirror
) -> None:
    env = environment(tmp_path, standin, server, fleet_mirror.next.version)
    result = run_tool("update", "--next", env=env)
    assert (result.returncode, result.stdout) == (0, ""), result.stderr
    assert "Nothing to build ahead" in result.stderr
    assert image_requests(server, fleet_mirror.next.version) == 0
    assert not (tmp_path / "cache" / "next-release.json").exists()


def test_a_release_that_does_not_exist_is_unsupported(
    tmp_path: Path, standin: Path, server: MirrorServer, fleet_mirror: FleetMirror
) -> None:
    env = environment(tmp_path, standin, server, fleet_mirror.running.version)
    result = run_tool("update", "--flatcar-version", "4300.2.0", env=env)
    assert result.returncode == 6, result.stderr
    assert "There is no Flatcar stable release 4300.2.0" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "cache" / "next-release.json").exists()
