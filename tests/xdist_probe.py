"""Run by tests/test_xdist.py in an inner pytest (the name keeps it out of the suite's
own collection): each test records which xdist worker ran it, for which kernel."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.mark.parametrize("n", range(3))
def test_records_its_worker(kernel: str, n: int) -> None:
    out = Path(os.environ["XDIST_PROBE_OUT"])
    with out.open("a") as f:
        f.write(f"{kernel} {n} {os.environ.get('PYTEST_XDIST_WORKER', 'none')}\n")


@pytest.mark.parametrize("n", range(4))
def test_without_a_kernel(n: int) -> None:
    out = Path(os.environ["XDIST_PROBE_OUT"])
    with out.open("a") as f:
        f.write(f"- {n} {os.environ.get('PYTEST_XDIST_WORKER', 'none')}\n")
