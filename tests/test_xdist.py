"""The suite under pytest-xdist (tools/test: `-n 2 --dist loadgroup`): the tests of one
kernel run in one worker and the two kernels in different workers (tests/conftest.py
`xdist_group`); the suite still runs without xdist. An inner pytest runs
tests/xdist_probe.py, whose tests record their worker."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from tests import conftest, kernels

ROOT = Path(__file__).resolve().parents[1]


def probe(tmp_path: Path, *options: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    out = tmp_path / "workers"
    out.touch()
    # Not this run's worker (under tools/test the outer pytest is an xdist worker too).
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST_")}
    env["XDIST_PROBE_OUT"] = str(out)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
         f"--basetemp={tmp_path / 'bt'}", *options, "tests/xdist_probe.py"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return result, out.read_text().splitlines()


def test_each_kernels_tests_run_in_one_worker_and_the_kernels_in_two(tmp_path: Path) -> None:
    conftest.need(
        len(kernels.kernels_under_test()) >= 2, "kernels of two series (tests/kernels.py)"
    )
    result, lines = probe(tmp_path, "-n", "2", "--dist", "loadgroup")
    assert result.returncode == 0, result.stdout + result.stderr
    workers: dict[str, set[str]] = defaultdict(set)
    for kernel, _, worker in (line.split() for line in lines):
        workers[kernel].add(worker)
    assert len(lines) == 3 * len(kernels.kernels_under_test()) + 4, lines
    per_kernel = [workers[k] for k in kernels.kernels_under_test()]
    assert all(len(w) == 1 for w in per_kernel), workers
    assert set.union(*per_kernel) == {"gw0", "gw1"}, workers


@pytest.mark.parametrize("options", [("-p", "no:xdist"), ("-n", "0")], ids=["no-xdist", "n0"])
def test_the_suite_runs_without_xdist(tmp_path: Path, options: tuple[str, ...]) -> None:
    result, lines = probe(tmp_path, *options)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PytestUnknownMarkWarning" not in result.stdout, result.stdout
    assert {line.split()[2] for line in lines} == {"none"}, lines


RELEASES = ["6.1.0-57-amd64", "6.12.118+deb12-amd64", "6.12-missing"]


@pytest.mark.parametrize(
    ("nodeid", "scope"),
    [
        ("tests/vm/test_guest.py::test_boots[6.1.0-57-amd64]", "kernel-6.1.0-57-amd64"),
        ("tests/vm/test_guest.py::test_boots[6.12.118+deb12-amd64]", "kernel-6.12.118+deb12-amd64"),
        ("tests/i/test_image.py::test_init[6.1.0-57-amd64-real]", "kernel-6.1.0-57-amd64"),
        ("tests/a.py::test_b[standin-6.12.118+deb12-amd64-2]", "kernel-6.12.118+deb12-amd64"),
        ("tests/a.py::test_b[6.12-missing]", "kernel-6.12"),
        ("tests/a.py::test_b[6.1.0-57-amd64]@kernel-x", "kernel-6.1.0-57-amd64"),
        ("tests/a.py::Class::test_b[real]", "tests/a.py"),
        ("tests/a.py::test_b[6.1.0-57]", "tests/a.py"),
        ("tests/a.py::test_b", "tests/a.py"),
    ],
)  # fmt: skip
def test_the_unit_of_work_is_the_kernel_named_by_the_parameters_else_the_file(
    nodeid: str, scope: str
) -> None:
    assert conftest.xdist_scope(nodeid, RELEASES) == scope
