"""The kernels installed on this machine, as the tests see them (never hard-coded).

A kernel *pair* is a release K with a readable image `/boot/vmlinuz-K`, its
modules (`/lib/modules/K/modules.dep`, what a guest boots with) and its headers
(`/lib/modules/K/build/Makefile`, what a build compiles against). The tests that
boot or build for a kernel run once per kernel *series* (major.minor): on the
newest pair of each series, so that an old kernel left behind by an upgrade
(6.1.0-56 beside 6.1.0-57) does not double the run for nothing.

CI must cover the series the project supports (README, "Layout", "Kernels"):
Debian 12's default 6.1 and 6.12, the series Flatcar stable runs. `CI_SERIES`
names them; under `CI` a missing one is a failure, not a skip (tests/conftest.py
`kernel`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

BOOT_DIR = Path("/boot")
MODULES_DIR = Path("/lib/modules")

CI_SERIES = ("6.1", "6.12")
"""The kernel series CI must find as pairs (image and headers): .ci/install-deps installs them."""


def version_key(release: str) -> list[tuple[int, int | str]]:
    """Natural order of kernel releases: 6.1.0-57 < 6.1.0-100 < 6.12.117."""
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", release) if p]


def series(release: str) -> str:
    """The series (major.minor) of a release: 6.12.117+deb12-amd64 -> 6.12."""
    match = re.match(r"(\d+)\.(\d+)", release)
    if match is None:
        raise ValueError(f"not a kernel release: {release!r}")
    return f"{match.group(1)}.{match.group(2)}"


def bootable(release: str) -> bool:
    """An image a guest can boot, with the modules it needs."""
    image = BOOT_DIR / f"vmlinuz-{release}"
    return os.access(image, os.R_OK) and (MODULES_DIR / release / "modules.dep").is_file()


def has_headers(release: str) -> bool:
    return (MODULES_DIR / release / "build" / "Makefile").is_file()


def header_kernels() -> list[str]:
    """Releases whose build tree is installed, oldest first."""
    found = [d.name for d in MODULES_DIR.iterdir()] if MODULES_DIR.is_dir() else []
    return sorted((r for r in found if has_headers(r)), key=version_key)


def kernel_pairs() -> list[str]:
    """Releases with image, modules and headers, oldest first."""
    return [r for r in header_kernels() if bootable(r)]


def kernels_under_test() -> list[str]:
    """The newest pair of each series, oldest series first."""
    newest: dict[str, str] = {}
    for release in kernel_pairs():  # ascending: a later one of a series replaces an earlier
        newest[series(release)] = release
    return sorted(newest.values(), key=version_key)


def missing_ci_series(releases: list[str]) -> list[str]:
    """The series of `CI_SERIES` that none of `releases` belongs to."""
    have = {series(r) for r in releases}
    return [s for s in CI_SERIES if s not in have]


def preferred_kernel() -> str | None:
    """The kernel a demo or a benchmark boots: the newest pair of the newest series CI
    covers (6.12, the series Flatcar stable runs), else of the next (6.1); else None."""
    newest = {series(r): r for r in kernels_under_test()}
    return next((newest[s] for s in reversed(CI_SERIES) if s in newest), None)
