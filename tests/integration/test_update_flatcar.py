"""`nvidia-driver update --kernel K` end to end against a local Flatcar mirror.

The mirror (tests/flatcar_mirror.py) is Flatcar's format made from a Debian
root with gcc and the installed kernel's headers: releases feed, GPT image with
ROOT on partition 9, bzip2, DIGESTS, signatures by a throw-away key. The tool
resolves the release, downloads and verifies the image, mounts it (loop device,
overlay), builds in it with chroot and packs. Nothing is mocked.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from nvdriver.driver import package as pkg
from nvdriver.host import KernelIdentity, KernelTree
from nvdriver.kmod.modversions import read_symvers
from tests.conftest import TOOL, run_tool, standin_env
from tests.flatcar_mirror import (
    TREE_UTS_VERSION,
    make_bad_digest_variant,
    make_corrupt_variant,
    make_no_root_partition_variant,
    make_truncated_variant,
    make_wrong_key_variant,
    serve_mirror,
)
from tests.leftovers import ours
from tests.standin.tree import make_standin_source

VERSION = "535.999.01"


@pytest.fixture(scope="module")
def standin(tmp_path_factory) -> Path:
    return make_standin_source(
        tmp_path_factory.mktemp("src") / f"nvidia-{VERSION}", version=VERSION
    )


@pytest.fixture
def env(tmp_path, standin, flatcar_mirror_server) -> dict[str, str]:
    return {
        **flatcar_mirror_server.env(),
        **standin_env(tmp_path, standin, VERSION),
        "HOST_ROOT": str(tmp_path / "host"),
    }


def assert_clean(tmp_path: Path) -> None:
    assert ours(tmp_path) == {"loops": [], "mounts": []}
    work = tmp_path / "cache" / "work"
    assert not work.exists() or list(work.iterdir()) == []


def cached_images(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "cache").rglob("*.bin"))


def test_update_for_a_kernel_builds_in_its_developer_container(
    env,
    tmp_path,
    flatcar_mirror_server,
    kernel_build,
    kernel_release,
):
    result = run_tool("update", "--kernel", kernel_release, env=env)
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.strip())
    m = pkg.verify(path)
    # The identity comes from the developer container's kernel tree, Flatcar's kind:
    # another build than the kernel installed here (another UTS_VERSION in the
    # /proc/version line, information only), with its release, vermagic and CRCs.
    booted = KernelIdentity.from_build_tree(KernelTree.from_dir(kernel_build).output)
    assert m.kernel_release == booted.release == kernel_release
    assert m.kernel_version != booted.version and TREE_UTS_VERSION in m.kernel_version
    symvers = read_symvers(kernel_build / "Module.symvers")
    assert m.kernel_symbols and all(symvers[n] == crc for n, crc in m.kernel_symbols)
    assert "4152.2.3" in result.stderr, "the newest release with this kernel is used"
    assert (m.driver_version, m.flavour) == (VERSION, "proprietary")
    # The developer container's linker travels in the package, for linking on any node.
    assert m.linker_files is not None and m.linker_files["program"] in dict(m.files)
    assert not (tmp_path / "cache" / "toolchain").exists()
    assert_clean(tmp_path)
    image_requests = len(flatcar_mirror_server.requests_for("flatcar_developer_container.bin.bz2"))
    assert image_requests >= 1

    again = run_tool("update", "--kernel", kernel_release, "-t", "again", env=env)
    assert again.returncode == 0, again.stderr
    assert (
        len(flatcar_mirror_server.requests_for("flatcar_developer_container.bin.bz2"))
        == image_requests
    )
    assert_clean(tmp_path)


def cached_release(tmp_path: Path, version: str) -> Path:
    """A cached developer container of `version` (its content does not matter to prune)."""
    directory = tmp_path / "cache" / "flatcar" / "amd64-usr" / version
    directory.mkdir(parents=True)
    (directory / "flatcar_developer_container.bin").write_bytes(b"image")
    return directory


def on_flatcar(tmp_path: Path, running: str, following: str) -> None:
    """The host runs Flatcar `running`; `following` is recorded as the next release."""
    (tmp_path / "host" / "host-etc").mkdir(parents=True)
    (tmp_path / "host" / "host-etc" / "os-release").write_text(f"ID=flatcar\nVERSION={running}\n")
    record = {"version": following, "channel": "stable", "kernel": None}
    (tmp_path / "cache" / "next-release.json").write_text(json.dumps(record))


def test_a_build_prunes_the_developer_containers_of_other_releases_not_packages(
    env, tmp_path, kernel_release
):
    """Build ahead adds a developer container per release to the kubelet's disk: after a
    build only the running, the next and the just used release's stay."""
    running, older, following = (
        cached_release(tmp_path, v) for v in ("4081.2.9", "3975.2.2", "4230.2.1")
    )
    on_flatcar(tmp_path, "4081.2.9", "4230.2.1")
    other_kernel = tmp_path / "precompiled" / "6.1.0-old" / "nvidia-old.tar.gz"
    other_kernel.parent.mkdir(parents=True)
    other_kernel.write_bytes(b"a package of another kernel")

    result = run_tool("update", "--kernel", kernel_release, env=env)

    assert result.returncode == 0, result.stderr
    assert running.is_dir() and following.is_dir()
    assert not older.exists(), "the developer container of an older release was kept"
    assert [p.parent.name for p in cached_images(tmp_path)] == sorted(
        ["4081.2.9", "4152.2.3", "4230.2.1"]  # 4152.2.3: the one just used
    )
    assert other_kernel.exists(), "packages are pruned by `packages prune` only"
    assert_clean(tmp_path)


def test_an_interrupted_download_resumes(env, tmp_path, flatcar_mirror_server, kernel_release):
    flatcar_mirror_server.close_after("flatcar_developer_container.bin.bz2", 20 << 20, times=2)
    result = run_tool("update", "--kernel", kernel_release, env=env)
    assert result.returncode == 0, result.stderr
    ranges = [
        r.range for r in flatcar_mirror_server.requests_for("flatcar_developer_container.bin.bz2")
    ]
    assert any(r and not r.startswith("bytes=0-") for r in ranges), ranges
    assert_clean(tmp_path)


@pytest.mark.parametrize(
    ("variant", "code", "message"),
    [
        (make_bad_digest_variant, 5, "changed or damaged"),
        (make_corrupt_variant, 5, "does not match its signed digest"),
        (make_wrong_key_variant, 5, "which the configured Flatcar signing key"),
        (make_truncated_variant, 5, "did not decompress (truncated or corrupt)"),
    ],
)
def test_bad_downloads_are_refused_and_nothing_is_cached(
    tmp_path,
    env,
    flatcar_mirror,
    kernel_release,
    variant,
    code,
    message,
):
    bad = variant(flatcar_mirror, tmp_path / "variant")
    with serve_mirror(bad) as server:
        result = run_tool(
            "update",
            "--kernel",
            kernel_release,
            env={**env, **server.env(), "FLATCAR_SIGNING_KEY": str(flatcar_mirror.signing_key)},
        )
    assert result.returncode == code, result.stderr
    assert message.lower() in result.stderr.lower()
    assert "Traceback" not in result.stderr
    assert cached_images(tmp_path) == []
    assert list((tmp_path / "cache").rglob("*partial*")) == []
    assert (
        not (tmp_path / "precompiled").exists()
        or pkg.PackageStore(tmp_path / "precompiled").package_files() == []
    )
    assert_clean(tmp_path)


def test_an_image_without_partition_9_is_a_clear_error(
    tmp_path, env, flatcar_mirror, kernel_release
):
    bad = make_no_root_partition_variant(flatcar_mirror, tmp_path / "variant")
    with serve_mirror(bad) as server:
        result = run_tool("update", "--kernel", kernel_release, env={**env, **server.env()})
    assert result.returncode != 0
    assert "partition 9" in result.stderr or "ROOT" in result.stderr
    assert "Traceback" not in result.stderr
    assert_clean(tmp_path)


def test_a_feed_without_the_kernel_is_unsupported(env, tmp_path):
    result = run_tool("update", "--kernel", "6.99.1-flatcar", env=env)
    assert result.returncode == 6
    assert "6.99.1" in result.stderr and "stable" in result.stderr
    assert env["FLATCAR_RELEASES_FEED"] in result.stderr
    assert_clean(tmp_path)


def test_a_malformed_feed_is_a_clear_error(env, tmp_path, kernel_release):
    feed = tmp_path / "feed.json"
    feed.write_text('{"4152.2.3": {"major_software": ')
    result = run_tool(
        "update", "--kernel", kernel_release, env={**env, "FLATCAR_RELEASES_FEED": str(feed)}
    )
    assert result.returncode == 1
    assert str(feed) in result.stderr and "Traceback" not in result.stderr


def test_a_cache_too_small_for_the_image_is_refused_before_the_download(
    env, tmp_path, kernel_release, flatcar_mirror_server
):
    cache = tmp_path / "cache"
    cache.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", cache], check=True)
    try:
        result = run_tool("update", "--kernel", kernel_release, env=env)
        assert result.returncode == 1, result.stderr
        assert re.search(
            r"Not enough space in \S+/cache/flatcar/\S+ for the developer container .*: it "
            r"needs about \d+ bytes .* and \d+ bytes \(\d+ MiB\) are free",
            result.stderr,
        ), result.stderr
        image = flatcar_mirror_server.requests_for("flatcar_developer_container.bin.bz2")
        assert [r.method for r in image] == ["HEAD"]
        assert cached_images(tmp_path) == []
        assert list(cache.rglob("*partial*")) == []
    finally:
        subprocess.run(["umount", cache], check=True)
    assert_clean(tmp_path)


def _start(env: dict[str, str], *argv: str) -> subprocess.Popen[bytes]:
    full = {k: v for k, v in os.environ.items() if k not in ("DRIVER_VERSION", "HOST_ROOT")}
    return subprocess.Popen(
        [str(TOOL), *argv], env={**full, **env}, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL
    )


def _children(pid: int) -> list[str]:
    """Names of the processes whose parent is `pid`."""
    names = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm = text[text.index("(") + 1 : text.rindex(")")]
        if int(text[text.rindex(")") + 2 :].split()[1]) == pid:
            names.append(comm)
    return names


# Observable states of a running update, polled: the signal lands while it is there.
STEPS = {
    "download": lambda tmp, pid: bool(list((tmp / "cache").rglob("*partial*"))),
    "mount": lambda tmp, pid: bool(ours(tmp)["mounts"]),
    "compile": lambda tmp, pid: "make" in _children(pid),
}


@pytest.mark.parametrize("step", list(STEPS))
def test_sigterm_at_any_step_leaves_nothing_and_a_rerun_succeeds(
    env,
    tmp_path,
    flatcar_mirror_server,
    kernel_release,
    step,
):
    if step == "download":
        flatcar_mirror_server.throttle(20 << 20)
    proc = _start(env, "update", "--kernel", kernel_release)
    deadline = time.monotonic() + 300
    while not STEPS[step](tmp_path, proc.pid):
        assert proc.poll() is None, f"update ended before reaching {step}"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err.decode()
    assert "interrupted by SIGTERM" in err.decode()
    assert_clean(tmp_path)
    assert "make" not in _children(proc.pid)
    if step == "download":
        assert cached_images(tmp_path) == []
    assert list((tmp_path / "cache").rglob("*partial*")) == []
    assert not (tmp_path / "precompiled").exists() or not list(
        (tmp_path / "precompiled").rglob("*.tar.gz")
    )
    flatcar_mirror_server.reset()
    result = run_tool("update", "--kernel", kernel_release, env=env)
    assert result.returncode == 0, result.stderr
    assert_clean(tmp_path)


def test_emerge_sources_failing_is_clear_and_leaves_nothing(env, tmp_path, kernel_release):
    """The old emerge path needs Gentoo's tools and network: the Debian-made developer
    root has neither, so this proves the strategy runs in the chroot and fails cleanly."""
    older = cached_release(tmp_path, "3975.2.2")
    result = run_tool("update", "--kernel", kernel_release, "--emerge-sources", env=env)
    assert result.returncode == 1
    assert older.is_dir(), "a failed build prunes nothing"
    assert "emerge-gitclone" in result.stderr and "network" in result.stderr
    assert "Traceback" not in result.stderr
    assert_clean(tmp_path)
