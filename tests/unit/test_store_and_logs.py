"""`packages prune`, `packages list`, and the json log format, through the CLI."""

from __future__ import annotations

import dataclasses
import json

from nvdriver.atomic import TEMP_PREFIX
from nvdriver.driver import package as pkg
from tests.conftest import run_tool
from tests.packaging import KERNEL, fake_build


def test_prune_removes_leftovers_failures_and_other_driver_versions(tmp_path):
    store = tmp_path / "precompiled"
    current = pkg.write_package(store, fake_build(tmp_path / "a"), tag=None)
    ahead_kernel = dataclasses.replace(KERNEL, release="6.1.0-100-amd64")
    ahead = pkg.write_package(store, fake_build(tmp_path / "b", kernel=ahead_kernel), tag=None)
    old_build = dataclasses.replace(fake_build(tmp_path / "c"), driver_version="535.100.01")
    old = pkg.write_package(store, old_build, tag=None)
    temp = current.path.parent / (TEMP_PREFIX + "crashed")
    temp.write_bytes(b"half")
    failed = current.path.parent / "nvidia-535.261.03-open.tar.gz.20260101T000000.failed"
    failed.write_bytes(b"bad")

    env = {"DRIVER_VERSION": "535.261.03", "PRECOMPILED_DIR": str(store)}
    result = run_tool("packages", "prune", env=env)
    assert result.returncode == 0, result.stderr
    assert not old.path.exists() and not temp.exists() and not failed.exists()
    assert current.path.exists(), "this driver's package for this kernel stays"
    assert ahead.path.exists(), "a package built ahead for the next kernel stays"
    assert sorted(line.split("\t")[1] for line in result.stdout.splitlines()) == sorted(
        [str(old.path), str(temp), str(failed)]
    )

    listed = json.loads(run_tool("packages", "list", "--json", env=env).stdout)["packages"]
    assert sorted(r["kernel_release"] for r in listed) == sorted(
        [KERNEL.release, "6.1.0-100-amd64"]
    )


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
