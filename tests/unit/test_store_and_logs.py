"""`packages prune`, `packages list`, and the json log format, through the CLI."""

from __future__ import annotations

import dataclasses
import datetime
import fcntl
import json
import os
from pathlib import Path

from nvdriver import fleet
from nvdriver.atomic import TEMP_PREFIX
from nvdriver.driver import package as pkg
from tests.conftest import run_tool
from tests.packaging import KERNEL, fake_build

# The kernel this test runs on: prune keeps its packages (never a hard-coded release).
RUNNING = KERNEL._replace(release=os.uname().release)


def record_next(cache: Path, version: str, kernel_release: str | None) -> None:
    """The next-release record as `update --next` writes it."""
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "next-release.json").write_text(
        json.dumps(
            {
                "version": version,
                "channel": "stable",
                "kernel": kernel_release and kernel_release.split("-", 1)[0],
                "kernel_release": kernel_release,
                "checked": "2026-12-02T03:00:00+00:00",
                "source": "feed",
            }
        )
    )


def prune_env(tmp_path: Path, store: Path, cache: Path) -> dict[str, str]:
    """A node on Flatcar 4152.2.3 with the image's store `store` and the cache `cache`."""
    return {
        "DRIVER_VERSION": "535.261.03",
        "PRECOMPILED_DIR": str(store),
        "NVIDIA_DRIVER_CACHE": str(cache),
        "NODE_PRECOMPILED_DIR": str(tmp_path / "node-store"),
        "HOST_ROOT": str(host_on_flatcar(tmp_path, "4152.2.3")),
    }


def test_prune_keeps_the_running_and_the_next_releases_packages_only(tmp_path):
    store = tmp_path / "precompiled"
    current = pkg.write_package(store, fake_build(tmp_path / "a", kernel=RUNNING), tag=None)
    next_kernel = KERNEL._replace(release="6.1.0-100-amd64")
    ahead = pkg.write_package(store, fake_build(tmp_path / "b", kernel=next_kernel), tag=None)
    other_kernel = KERNEL._replace(release="6.1.0-98-amd64")
    other = pkg.write_package(store, fake_build(tmp_path / "o", kernel=other_kernel), tag=None)
    old_build = dataclasses.replace(
        fake_build(tmp_path / "c", kernel=RUNNING), driver_version="535.100.01"
    )
    old = pkg.write_package(store, old_build, tag=None)
    temp = current.path.parent / (TEMP_PREFIX + "crashed")
    temp.write_bytes(b"half")
    failed = current.path.parent / "nvidia-535.261.03-open.tar.gz.20260101T000000.failed"
    failed.write_bytes(b"bad")
    kept_origin = fleet.origin_path(ahead.path)
    kept_origin.write_text('{"origin": "registry", "reference": "r/p@sha256:00"}')
    orphan = fleet.origin_path(ahead.path.with_name("nvidia-535.261.03-open.tar.gz"))
    orphan.write_text('{"origin": "registry"}')
    cache = tmp_path / "cache"
    record_next(cache, "4230.2.1", next_kernel.release)

    env = prune_env(tmp_path, store, cache)
    result = run_tool("packages", "prune", env=env)
    assert result.returncode == 0, result.stderr
    assert not old.path.exists() and not temp.exists() and not failed.exists()
    assert not other.path.exists(), "a package of a kernel neither running nor next goes"
    assert current.path.exists(), "this driver's package for the running kernel stays"
    assert ahead.path.exists(), "the package built ahead for the next release stays"
    assert kept_origin.exists() and not orphan.exists()
    assert sorted(line.split("\t")[1] for line in result.stdout.splitlines()) == sorted(
        [str(old.path), str(other.path), str(temp), str(failed), str(orphan)]
    )

    listed = json.loads(run_tool("packages", "list", "--json", env=env).stdout)["packages"]
    assert sorted((r["kernel_release"], r["origin"]["origin"]) for r in listed) == sorted(
        [(RUNNING.release, "image"), (next_kernel.release, "registry")]
    )


def test_without_a_next_release_prune_keeps_the_running_kernels_packages_only(tmp_path):
    store = tmp_path / "precompiled"
    current = pkg.write_package(store, fake_build(tmp_path / "a", kernel=RUNNING), tag=None)
    ahead_kernel = KERNEL._replace(release="6.1.0-100-amd64")
    ahead = pkg.write_package(store, fake_build(tmp_path / "b", kernel=ahead_kernel), tag=None)
    cache = tmp_path / "cache"
    # A record the node has booted past (its version is the host's now) keeps nothing.
    record_next(cache, "4152.2.3", ahead_kernel.release)
    env = prune_env(tmp_path, store, cache)
    result = run_tool("packages", "prune", env=env)
    assert result.returncode == 0, result.stderr
    assert current.path.exists() and not ahead.path.exists()


def test_list_verify_and_prune_cover_both_stores_and_name_each(tmp_path):
    """The image's store (PRECOMPILED_DIR) and the node's (NODE_PRECOMPILED_DIR)."""
    image_store, node_store = tmp_path / "image-store", tmp_path / "node-store"
    in_image = pkg.write_package(image_store, fake_build(tmp_path / "a", kernel=RUNNING), tag=None)
    in_node = pkg.write_package(node_store, fake_build(tmp_path / "b", kernel=RUNNING), tag=None)
    old_build = dataclasses.replace(fake_build(tmp_path / "c"), driver_version="535.100.01")
    old_in_node = pkg.write_package(node_store, old_build, tag=None)
    broken = node_store / KERNEL.release / "nvidia-535.261.03-open.tar.gz"
    broken.write_bytes(b"not a package")
    env = {
        "DRIVER_VERSION": "535.261.03",
        "PRECOMPILED_DIR": str(image_store),
        "NODE_PRECOMPILED_DIR": str(node_store),
        "NVIDIA_DRIVER_CACHE": str(tmp_path / "cache"),
    }
    listed = json.loads(run_tool("packages", "list", "--json", env=env).stdout)
    assert sorted((r["store"], r["path"]) for r in listed["packages"]) == sorted(
        [
            ("image", str(in_image.path)),
            ("node", str(in_node.path)),
            ("node", str(old_in_node.path)),
        ]
    )
    assert listed["unreadable"] == [{"path": str(broken), "store": "node"}]
    text = run_tool("packages", "list", env=env).stdout
    assert f"\timage\t{in_image.path}" in text and f"\tnode\t{in_node.path}" in text

    verified = run_tool("packages", "verify", env=env)
    assert verified.returncode == 5
    assert f"ok\timage\t{in_image.path}" in verified.stdout
    assert f"ok\tnode\t{in_node.path}" in verified.stdout
    assert f"FAILED\tnode\t{broken}" in verified.stdout

    pruned = run_tool("packages", "prune", env=env)
    assert pruned.returncode == 0, pruned.stderr
    assert not old_in_node.path.exists(), "another driver version goes, from the node's store too"
    assert in_image.path.exists() and in_node.path.exists()


def cached_image(cache: Path, version: str, board: str = "amd64-usr") -> Path:
    """A developer container in the cache's layout (its content does not matter to prune)."""
    image = cache / "flatcar" / board / version / "flatcar_developer_container.bin"
    image.parent.mkdir(parents=True)
    image.write_bytes(b"image")
    (image.parent / (image.name + ".verified")).write_text("{}")
    return image.parent


def host_on_flatcar(tmp_path: Path, version: str) -> Path:
    host = tmp_path / "host"
    (host / "host-etc").mkdir(parents=True)
    (host / "host-etc" / "os-release").write_text(f"ID=flatcar\nVERSION={version}\n")
    return host


def test_prune_keeps_the_developer_containers_of_the_running_and_the_next_release(tmp_path):
    cache = tmp_path / "cache"
    running = cached_image(cache, "4081.2.9")
    between = cached_image(cache, "4081.2.10")
    older = cached_image(cache, "3975.2.2")
    following = cached_image(cache, "4230.2.1")
    newest = cached_image(cache, "4300.2.0")  # cached, but not the recorded next release
    arm_old, arm_next = (
        cached_image(cache, "3975.2.2", "arm64-usr"),
        cached_image(cache, "4230.2.1", "arm64-usr"),
    )
    record_next(cache, "4230.2.1", None)
    env = {
        "PRECOMPILED_DIR": str(tmp_path / "precompiled"),
        "NODE_PRECOMPILED_DIR": str(tmp_path / "node-store"),
        "NVIDIA_DRIVER_CACHE": str(cache),
        "HOST_ROOT": str(host_on_flatcar(tmp_path, "4081.2.9")),
    }
    result = run_tool("packages", "prune", env=env)
    assert result.returncode == 0, result.stderr
    assert running.is_dir() and following.is_dir() and arm_next.is_dir()
    assert not between.exists() and not older.exists() and not arm_old.exists()
    assert not newest.exists()
    assert sorted(line.split("\t")[1] for line in result.stdout.splitlines()) == sorted(
        str(d) for d in (between, older, newest, arm_old)
    )


def test_prune_leaves_what_a_running_build_may_use(tmp_path):
    """A build holds the build lock (here: the test holds it, as a build would)."""
    store = tmp_path / "precompiled"
    current = pkg.write_package(store, fake_build(tmp_path / "a", kernel=RUNNING), tag=None)
    writing = current.path.parent / (TEMP_PREFIX + "being-written")
    writing.write_bytes(b"half")
    failed = current.path.parent / "nvidia-535.261.03-open.tar.gz.20260101T000000.failed"
    failed.write_bytes(b"bad")
    empty_kernel_dir = store / "6.1.0-101-amd64"  # a build may be about to write into it
    empty_kernel_dir.mkdir()
    cache = tmp_path / "cache"
    old, new = cached_image(cache, "3975.2.2"), cached_image(cache, "4230.2.1")
    env = {
        "DRIVER_VERSION": "535.261.03",
        "PRECOMPILED_DIR": str(store),
        "NODE_PRECOMPILED_DIR": str(tmp_path / "node-store"),
        "NVIDIA_DRIVER_CACHE": str(cache),
        "HOST_ROOT": str(tmp_path / "host"),
    }
    with (cache / "build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = run_tool("packages", "prune", env=env)
    assert result.returncode == 0, result.stderr
    assert "A build is running" in result.stderr
    assert writing.exists() and empty_kernel_dir.is_dir() and old.is_dir() and new.is_dir()
    assert not failed.exists(), "a failed package is never a build's: it goes"
    assert result.stdout.split("\t")[1].strip() == str(failed)


def test_json_log_lines_are_one_object_each_with_time_and_level(tmp_path):
    result = run_tool(
        "update",
        "--kernel-source",
        str(tmp_path / "missing"),
        env={"LOG_FORMAT": "json", "NVIDIA_DRIVER_SOURCE": str(tmp_path)},
    )
    assert result.returncode == 1
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    assert lines and all({"time", "level", "message"} <= set(o) for o in lines)
    assert lines[0]["level"] == "error" and lines[0]["time"].endswith("Z")
    # ISO 8601 in UTC to the millisecond, as datetime writes it (what log shippers parse).
    stamp = datetime.datetime.fromisoformat(lines[0]["time"].replace("Z", "+00:00"))
    assert stamp.tzinfo == datetime.timezone.utc and len(lines[0]["time"]) == len(
        "2026-12-06T19:00:00.000Z"
    )
    assert abs(stamp - datetime.datetime.now(datetime.timezone.utc)) < datetime.timedelta(minutes=5)
