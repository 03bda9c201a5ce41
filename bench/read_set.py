"""How much of the developer container a build reads: the case for decompressing less.

Runs `nvidia-driver update --kernel K` (the code path a node runs: fetch,
verify, mount the image's ROOT on a loop device, build in it, pack) against
the local Flatcar mirror, and meanwhile samples the kernel's block-level
accounting of that loop device (/sys/block/loopN/stat, sectors read): what
the build's file system read from the image, metadata included, with a cold
mount (its page cache is new). Prints that against the image's data (its
non-hole bytes).

Run (as root): .venv/bin/python -m bench.read_set [--real]

`--real` builds the real NVIDIA 535 sources (Debian's nvidia-kernel-source,
as tests/real_build.py does; minutes), else the stand-in driver (seconds).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tests.conftest import TOOL, standin_env, unpack_debian_source
from tests.flatcar_mirror import build_mirror, default_kernel_release, serve_mirror
from tests.standin.tree import make_standin_source

MiB = 1 << 20
STANDIN_VERSION = "535.999.01"
SYS_BLOCK = Path("/sys/block")


def loop_reads() -> dict[str, tuple[str, int]]:
    """Per loop device: its backing file ("" when detached) and the bytes read from it so far.

    The counters live as long as the device, across attachments: the bytes of one
    attachment are a difference.
    """
    found = {}
    for dev in SYS_BLOCK.glob("loop*"):
        try:
            sectors = int((dev / "stat").read_text().split()[2])
        except (OSError, ValueError, IndexError):
            continue
        try:
            backing = (dev / "loop" / "backing_file").read_text().strip()
        except OSError:
            backing = ""
        found[dev.name] = (backing, sectors * 512)
    return found


class Sampler(threading.Thread):
    """Samples the loop devices backed by files under `under` until stopped."""

    def __init__(self, under: Path) -> None:
        super().__init__(daemon=True)
        self.under = str(under)
        self.baseline = {dev: read for dev, (_, read) in loop_reads().items()}
        self.last: dict[str, tuple[str, int]] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.02):
            for dev, (backing, read) in loop_reads().items():
                if backing.startswith(self.under):
                    self.last[dev] = (backing, read - self.baseline.get(dev, 0))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--real", action="store_true", help="the real 535 sources (minutes)")
    parser.add_argument("--kernel", default=default_kernel_release())
    args = parser.parse_args()
    mirror = build_mirror(args.kernel)
    with tempfile.TemporaryDirectory(dir=Path.home() / ".cache", prefix="bench-read-set-") as t:
        work = Path(t)
        if args.real:
            env = {
                "NVIDIA_DRIVER_SOURCE": str(unpack_debian_source("proprietary")),
                "PRECOMPILED_DIR": str(work / "precompiled"),
                "NVIDIA_DRIVER_CACHE": str(work / "cache"),
                "KERNEL_MODULE_TYPE": "proprietary",
            }
        else:
            source = make_standin_source(
                work / "src" / f"nvidia-{STANDIN_VERSION}", version=STANDIN_VERSION
            )
            env = standin_env(work, source, STANDIN_VERSION)
        env["HOST_ROOT"] = str(work / "host")
        full = {k: v for k, v in os.environ.items() if k != "DRIVER_VERSION"}
        sampler = Sampler(work)
        sampler.start()
        with serve_mirror(mirror) as server:
            start = time.monotonic()
            proc = subprocess.run(
                [str(TOOL), "update", "--kernel", args.kernel],
                env={**full, **env, **server.env()},
                capture_output=True,
                text=True,
                check=False,
            )
            elapsed = time.monotonic() - start
        sampler.stop.set()
        sampler.join()
        if proc.returncode != 0:
            sys.exit(f"update failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        image = next((work / "cache").rglob("flatcar_developer_container.bin"))
        data = image.stat().st_blocks * 512
        read = sum(r for _, r in sampler.last.values())
        print(proc.stderr)
        print(f"build of {'the real 535 driver' if args.real else 'the stand-in driver'}")
        print(f"update: {elapsed:.1f} s; loop devices seen: {sorted(sampler.last)}")
        print(f"image: {image.stat().st_size / MiB:.0f} MiB, {data / MiB:.0f} MiB of data")
        print(f"read from ROOT by the build: {read / MiB:.1f} MiB ({100 * read / data:.1f} %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
