"""What it costs a start to judge a package by the running kernel's ABI (issue 19).

A node decides whether a package fits its kernel by the package's vermagic and symbol
CRCs against the running kernel's (kmod/abi.py), read from a mounted build tree
(`Module.symvers`) or, on Flatcar, from the `__versions` of the host's own modules.
The baseline is the rule it replaced: the package's manifest read and its full
`/proc/version` compared (wrong on Flatcar, but what a start used to pay). The last row is
what every command after the first few on a kernel pays: the scan kept in the node's cache
(`kernel-abi/`) by the commands before, here by one that read every module.

    .venv/bin/python -m bench.kernel_abi [PACKAGE] [--rounds N]

PACKAGE: a package of a kernel installed here (its `/lib/modules/K` is read); by default
the newest committed real 535 package of the test cache, else a stand-in package built
now against the oldest kernel's headers. Prints each row's median and its ratio to the
baseline, and how many of the package's CRCs each way could check.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from nvdriver.config import Config
from nvdriver.driver.package import read_manifest
from nvdriver.kmod.abi import SCAN_BUDGET, Fit, RunningAbi
from tests.conftest import CACHE, TOOL, standin_env
from tests.kernels import header_kernels
from tests.standin.tree import make_standin_source


def default_package(work: Path) -> Path:
    real = sorted(CACHE.glob("images/committed-real-*.built/precompiled/*/*.tar.gz"))
    if real:
        return real[-1]
    kernel = header_kernels()[0]
    source = make_standin_source(work / "src", version="535.999.09")
    env = standin_env(work, source, "535.999.09")
    out = subprocess.run(
        [str(TOOL), "update", "--kernel-source", f"/lib/modules/{kernel}/build"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(out.stdout.strip())


def host(work: Path, kernel: str, *, tree: bool) -> Config:
    """A HOST_ROOT with the kernel's own modules (and, with `tree`, its build tree), this
    machine's /proc, and a node cache of its own."""
    root = work / ("tree" if tree else "modules")
    moddir = root / "lib" / "modules" / kernel
    moddir.mkdir(parents=True, exist_ok=True)
    for name in ("kernel", "modules.dep", *(("build",) if tree else ())):
        if not (moddir / name).exists():
            (moddir / name).symlink_to(Path("/lib/modules") / kernel / name)
    if not (root / "proc").exists():
        (root / "proc").symlink_to("/proc")
    return Config.from_env({"HOST_ROOT": str(root), "NVIDIA_DRIVER_CACHE": str(root / "cache")})


def timed(rounds: int, step: Callable[[], Fit | bool]) -> tuple[float, Fit | bool]:
    times, result = [], None
    for _ in range(rounds):
        started = time.monotonic()
        result = step()
        times.append(time.monotonic() - started)
    assert result is not None
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", nargs="?", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-abi-") as tmp:
        work = Path(tmp)
        package = args.package or default_package(work)
        m = read_manifest(package)
        kernel = m.kernel_release
        proc_version = Path("/proc/version").read_text().strip()
        print(f"package {package.name} for {kernel}: {len(m.kernel_symbols)} symbol CRCs")

        def baseline() -> bool:
            return read_manifest(package).kernel_version == proc_version

        def judged(config: Config, budget: float, *, keep: bool = False) -> Callable[[], Fit]:
            return lambda: RunningAbi(config, kernel, budget=budget, keep=keep).fit(
                read_manifest(package).kernel
            )

        kept = host(work, kernel, tree=False)
        RunningAbi(kept, kernel, budget=float("inf")).crcs(["-"])  # every module, kept

        rows: list[tuple[str, Callable[[], Fit | bool]]] = [
            ("baseline: manifest + /proc/version compare", baseline),
            ("build tree (Module.symvers)", judged(host(work, kernel, tree=True), SCAN_BUDGET)),
            (
                f"host modules only, {SCAN_BUDGET:.0f} s budget (Flatcar)",
                judged(host(work, kernel, tree=False), SCAN_BUDGET),
            ),
            (
                "host modules only, every module read",
                judged(host(work, kernel, tree=False), float("inf")),
            ),
            ("host modules only, kept by earlier commands", judged(kept, SCAN_BUDGET, keep=True)),
        ]
        base = None
        for label, step in rows:
            seconds, result = timed(args.rounds, step)
            base = base or seconds
            checked = f", {result.checked} CRCs checked" if isinstance(result, Fit) else ""
            print(f"{label:52s} {seconds:8.3f} s  {seconds / base:8.1f}x{checked}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
