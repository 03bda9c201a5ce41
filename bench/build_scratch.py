"""What building on disk costs against building in memory: the build's scratch.

Runs `nvidia-driver update --kernel K` (fetch once, then: mount the developer
container, build the stand-in driver in it, pack) against the local Flatcar mirror,
`--rounds` times in each of two ways, alternating, the image cached:

- the baseline: a tmpfs with no size limit mounted at `NVIDIA_DRIVER_CACHE/work`, so the
  overlay's upper layer (everything the build writes) is in memory, as before the
  scratch moved to disk (flatcar/image.py);
- ours: the scratch on the disk of the cache (`NVIDIA_DRIVER_CACHE/work`, the default).

Prints each round, the medians and ours against the baseline.

Run (as root): .venv/bin/python -m bench.build_scratch [--rounds N] [--kernel RELEASE]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import TOOL, standin_env
from tests.flatcar_mirror import build_mirror, default_kernel_release, serve_mirror
from tests.standin.tree import make_standin_source

STANDIN_VERSION = "535.999.01"


def update(env: dict[str, str], kernel: str, tag: str) -> float:
    start = time.monotonic()
    proc = subprocess.run(
        [str(TOOL), "update", "--kernel", kernel, "--tag", tag],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        sys.exit(f"update failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.monotonic() - start


@contextlib.contextmanager
def tmpfs_at(path: Path) -> Iterator[None]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "bench-scratch", path], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", path], check=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--kernel", default=default_kernel_release())
    args = parser.parse_args()
    mirror = build_mirror(args.kernel)
    with tempfile.TemporaryDirectory(dir=Path.home() / ".cache", prefix="bench-scratch-") as t:
        work = Path(t)
        source = make_standin_source(
            work / "src" / f"nvidia-{STANDIN_VERSION}", version=STANDIN_VERSION
        )
        env = standin_env(work, source, STANDIN_VERSION)
        env["HOST_ROOT"] = str(work / "host")
        base = {k: v for k, v in os.environ.items() if k != "DRIVER_VERSION"}
        times: dict[str, list[float]] = {"tmpfs": [], "disk": []}
        with serve_mirror(mirror) as server:
            full = {**base, **env, **server.env()}
            fetched = update(full, args.kernel, "fetch")
            print(f"first update (fetch and build): {fetched:.1f} s")
            for i in range(args.rounds):
                with tmpfs_at(work / "cache" / "work"):
                    times["tmpfs"].append(update(full, args.kernel, f"tmpfs{i}"))
                times["disk"].append(update(full, args.kernel, f"disk{i}"))
                print(f"round {i + 1}: tmpfs {times['tmpfs'][-1]:.2f} s, "
                      f"disk {times['disk'][-1]:.2f} s", flush=True)  # fmt: skip
    tmpfs, disk = (statistics.median(times[k]) for k in ("tmpfs", "disk"))
    print(f"{'':<52} {'median':>8}")
    print(f"{'baseline: scratch on an unbounded tmpfs (before)':<52} {tmpfs:7.2f}s")
    print(f"{'ours: scratch on the cache disk':<52} {disk:7.2f}s  {disk / tmpfs:.2f}x the baseline")
    return 0


if __name__ == "__main__":
    sys.exit(main())
