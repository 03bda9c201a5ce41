"""How much of the developer container a build reads: the case for decompressing less.

Runs `nvidia-driver update --kernel K` (the code path a node runs: fetch,
verify, mount the image's ROOT on a loop device, build in it, pack) against
the local Flatcar mirror, twice: the first fetches and builds; before the
second (the cached image, another tag) the image's pages are dropped from the
page cache. Meanwhile it samples the kernel's block-level accounting of the
loop device (/sys/block/loopN/stat, sectors read): what the build's file
system read from the image, metadata and read-ahead included, on a cold mount.
After the second build the image's resident pages (mincore(2)) say where those
reads lie in the image; `--pages FILE` writes them as [start, end) byte ranges,
to map onto the bzip2 blocks that a decoder would have to decode to serve them.

Run (as root): .venv/bin/python -m bench.read_set [--real] [--pages FILE]

`--real` builds the real NVIDIA 535 sources (Debian's nvidia-kernel-source,
as tests/real_build.py does; minutes), else the stand-in driver (seconds).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
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
        self.last: dict[str, int] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.02):
            for dev, (backing, read) in loop_reads().items():
                if backing.startswith(self.under):
                    self.last[dev] = read - self.baseline.get(dev, 0)

    def __enter__(self) -> Sampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.join()


def resident_ranges(path: Path) -> list[tuple[int, int]]:
    """The [start, end) byte ranges of `path` that are in the page cache (mincore)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]  # fmt: skip
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = path.stat().st_size
    page = mmap.PAGESIZE
    pages = -(-size // page)
    with path.open("rb") as f:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap")
        try:
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
        finally:
            libc.munmap(addr, size)
    ranges: list[tuple[int, int]] = []
    for i in range(pages):
        if vec[i] & 1:
            if ranges and ranges[-1][1] == i * page:
                ranges[-1] = (ranges[-1][0], (i + 1) * page)
            else:
                ranges.append((i * page, (i + 1) * page))
    return ranges


def update(env: dict[str, str], kernel: str, *extra: str) -> float:
    start = time.monotonic()
    proc = subprocess.run(
        [str(TOOL), "update", "--kernel", kernel, *extra],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        sys.exit(f"update failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.monotonic() - start


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--real", action="store_true", help="the real 535 sources (minutes)")
    parser.add_argument("--kernel", default=default_kernel_release())
    parser.add_argument("--pages", type=Path, help="write the resident ranges there (JSON)")
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
        base = {k: v for k, v in os.environ.items() if k != "DRIVER_VERSION"}
        with serve_mirror(mirror) as server:
            full = {**base, **env, **server.env()}
            with Sampler(work) as first:
                fetched = update(full, args.kernel)
            image = next((work / "cache").rglob("flatcar_developer_container.bin"))
            with image.open("rb") as f:
                os.fsync(f.fileno())
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            before = sum(end - start for start, end in resident_ranges(image))
            with Sampler(work) as second:
                cached = update(full, args.kernel, "--tag", "again")
        ranges = resident_ranges(image)
        data = image.stat().st_blocks * 512
        resident = sum(end - start for start, end in ranges)
        print(f"build of {'the real 535 driver' if args.real else 'the stand-in driver'}")
        print(f"image: {image.stat().st_size / MiB:.0f} MiB, {data / MiB:.0f} MiB of data")
        for name, sampler, seconds in (("fetch and build", first, fetched),
                                       ("build, image cached", second, cached)):  # fmt: skip
            read = sum(sampler.last.values())
            print(f"{name}: {seconds:.1f} s; read from ROOT {read / MiB:.1f} MiB"
                  f" ({100 * read / data:.1f} % of the data)")  # fmt: skip
        print(f"image pages resident after the second build: {resident / MiB:.1f} MiB"
              f" in {len(ranges)} ranges ({before / MiB:.1f} MiB before it)")  # fmt: skip
        if args.pages:
            args.pages.write_text(json.dumps({"image_bytes": image.stat().st_size,
                                              "ranges": ranges}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
