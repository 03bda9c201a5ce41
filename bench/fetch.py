"""Developer-container fetch: ours against its peers and the decode floor, in one script.

Builds (once; cached) a local Flatcar mirror whose developer container is
realistic: a 6 GiB image holding a little over 2 GiB of real content (the
Debian developer root, its compiler, libraries and kernel headers, padded with
copies of its header trees: `build_mirror(content_bytes=...)`), so that its
`.bz2` is about as large as Flatcar's (~500 MB). Serves it on 127.0.0.1 and
times, round after round, on the same machine and server:

- the seed: `curl | bzip2 -dq > file`, `dd` 3000 MiB of zeros onto it,
  `losetup -c`, `e2fsck -f`, `resize2fs` (unverified, one core);
- Flatcar's own: download to a file (`curl -o`), then
  `lbzcat | cp --sparse=always`, then `sync` of the image (two passes, unverified);
- a verified one-pass shell pipeline:
  `curl | tee fifo | lbzip2 -dc | cp --sparse=always`, `sync` of the image,
  `sha512sum < fifo`, then `gpgv` of DIGESTS.asc and the SHA-512 compared with the
  signed one;
- the decode floor: `lbzip2 -dc` of the local `.bz2` to /dev/null (the
  transfer floor too, `curl -o /dev/null`, which bounds a throttled set);
- ours: `fetch_developer_container` (one pass: download, SHA-512, lbzip2
  into `dd conv=sparse`, DIGESTS' signature checked, the image flushed to
  disk), in a child process so that its peak RSS is its own.

The peers `sync` their image as ours `fsync`s it: a fetch that leaves gigabytes in the
page cache has not finished writing them, and the next thing the node does (loop-mount
the image, build) waits for them or loses them in a crash. `--dense` builds the image
the other way round: about 2.2 GiB of content in a 2.9 GiB image (few holes), the shape
of an independent measurement that found ours behind its peers.

Then the same with the server throttled to 50 MiB/s (a network rather than
the page cache; `--speeds` chooses the sets, `--rows` the rows). Prints the
medians, the ratios of each row to ours and our peak RSS. Run (as root: the
seed uses a loop device):

    .venv/bin/python -m bench.fetch [--rounds N] [--seed-rounds N] [--speeds loopback,50]
        [--rows seed,flatcar,...] [--small | --dense] [--json FILE]

`--small` uses the tests' unpadded mirror (quick, for developing the bench).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tests.flatcar_mirror import FlatcarMirror, build_mirror, default_kernel_release, serve_mirror

MiB = 1 << 20
GiB = 1 << 30
CONTENT_BYTES = int(2.05 * GiB)  # Flatcar's developer container: a few GiB of content
IMAGE_BYTES = 6 * GiB  # ... in a 6 GiB image
DENSE_CONTENT_BYTES = int(2.2 * GiB)  # --dense: little room left, few holes
DENSE_IMAGE_BYTES = int(2.9 * GiB) // 512 * 512
SEED_EXTRA_MIB = 3000
ROOT_PARTITION_START = 4096 * 512

OURS = """
import json, os, resource, sys, time
from nvdriver import log
from nvdriver.config import Config
from nvdriver.flatcar.fetch import fetch_developer_container
from nvdriver.flatcar.release import FlatcarRelease
log.setup("text")
config = Config.from_env(dict(os.environ))
start = time.monotonic()
image = fetch_developer_container(config, FlatcarRelease(sys.argv[1], "stable", "amd64-usr"))
elapsed = time.monotonic() - start
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"seconds": elapsed, "python_kib": int(hwm), "child_kib": children}))
"""

# The verified one-pass pipeline a careful shell script would use.
VERIFIED_SHELL = r"""
set -euo pipefail
url=$1 image=$2 keyring=$3 name=$(basename "$1")
mkfifo "$image.fifo"
sha512sum < "$image.fifo" | cut -d' ' -f1 > "$image.sha512" &
hashing=$!
curl -fsS "$url" | tee "$image.fifo" | lbzip2 -dc | cp --sparse=always /dev/stdin "$image"
sync "$image"
wait $hashing
curl -fsS -o "$image.DIGESTS.asc" "$url.DIGESTS.asc"
gpgv --quiet --keyring "$keyring" --output "$image.DIGESTS" "$image.DIGESTS.asc" 2>/dev/null
signed=$(awk -v name="$name" '/^# /{s=($2=="SHA512")} s && $2==name {print $1}' \
    "$image.DIGESTS")
[ -n "$signed" ] && [ "$signed" = "$(cat "$image.sha512")" ]
"""


def sh(script: str, *args: str) -> None:
    subprocess.run(["bash", "-c", script, "bench", *args], check=True)


def seed(url: str, work: Path, mirror: FlatcarMirror) -> None:
    """The seed's pipeline, end to end."""
    image = work / "flatcar_developer_container.bin"
    sh('curl -fsS "$1" | bzip2 -dq > "$2"', url, str(image))
    zeros = f"dd if=/dev/zero bs=1M count={SEED_EXTRA_MIB} status=none"
    sh(f'{zeros} >> "$1"', str(image))
    loop = subprocess.run(
        ["losetup", "--find", "--show", "--offset", str(ROOT_PARTITION_START), str(image)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    try:
        subprocess.run(["losetup", "-c", loop], check=True)
        subprocess.run(["e2fsck", "-f", "-y", "-q", loop], check=False, capture_output=True)
        subprocess.run(["resize2fs", "-f", loop], check=True, capture_output=True)
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)


def flatcar(url: str, work: Path, mirror: FlatcarMirror) -> None:
    """Flatcar's documented way: download, then decompress to a sparse file (then `sync`
    of the image: durable, as ours is)."""
    bz2 = work / "flatcar_developer_container.bin.bz2"
    sh('curl -fsS -o "$2" "$1" && lbzcat "$2" | cp --sparse=always /dev/stdin "$3" && sync "$3"',
       url, str(bz2), str(work / "flatcar_developer_container.bin"))  # fmt: skip


def verified_shell(url: str, work: Path, mirror: FlatcarMirror) -> None:
    image = work / "flatcar_developer_container.bin"
    sh(VERIFIED_SHELL, url, str(image), str(mirror.signing_keyring))


def decode_floor(url: str, work: Path, mirror: FlatcarMirror) -> None:
    """Decompressing the local file, output thrown away: what no fetch can beat."""
    sh('lbzip2 -dc "$1" > /dev/null', str(mirror.image))


def transfer_floor(url: str, work: Path, mirror: FlatcarMirror) -> None:
    """The download alone, thrown away: what no fetch can beat on a slow network."""
    sh('curl -fsS -o /dev/null "$1"', url)


class Ours:
    """`fetch_developer_container` in a child process; keeps the peak RSS of each run."""

    def __init__(self, env: dict[str, str], version: str) -> None:
        self.env = env
        self.version = version
        self.peaks: list[tuple[int, int]] = []  # (Python, largest child), KiB
        self.allocated = 0  # bytes of the image that are not holes

    def __call__(self, url: str, work: Path, mirror: FlatcarMirror) -> None:
        env = {**os.environ, **self.env, "NVIDIA_DRIVER_CACHE": str(work / "cache")}
        with (work / "stderr").open("w+") as errors:
            proc = subprocess.run(
                [sys.executable, "-c", OURS, self.version],
                env=env,
                stdout=subprocess.PIPE,
                stderr=errors,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                errors.seek(0)
                raise SystemExit(f"our fetch failed ({proc.returncode}):\n{errors.read()[-3000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        image = next((work / "cache").rglob("flatcar_developer_container.bin"))
        self.allocated = image.stat().st_blocks * 512
        self.peaks.append((int(result["python_kib"]), int(result["child_kib"])))


Row = Callable[[str, Path, FlatcarMirror], None]


def timed(row: Row, url: str, mirror: FlatcarMirror) -> float:
    """One run of `row` in a fresh directory beside the cache; flushed before the next."""
    with tempfile.TemporaryDirectory(dir=Path.home() / ".cache", prefix="bench-fetch-") as tmp:
        os.sync()
        start = time.monotonic()
        row(url, Path(tmp), mirror)
        elapsed = time.monotonic() - start
    os.sync()
    return elapsed


def measure(
    rows: dict[str, Row], url: str, mirror: FlatcarMirror, rounds: int, seed_rounds: int
) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in rows}
    for i in range(rounds):
        for name, row in rows.items():
            if name == "seed" and i >= seed_rounds:
                continue
            times[name].append(timed(row, url, mirror))
        done = ", ".join(f"{n} {t[-1]:.1f} s" for n, t in times.items() if len(t) > i)
        print(f"  round {i + 1}: {done}", flush=True)
    return times


LABELS = {
    "seed": f"the seed (curl | bzip2 -dq, dd {SEED_EXTRA_MIB} MiB, resize2fs)",
    "flatcar": "Flatcar's own (curl -o, then lbzcat | cp --sparse=always; sync), unverified",
    "verified_shell": "verified (curl | tee | lbzip2 -dc | cp --sparse; sync; sha512sum, gpgv)",
    "transfer_floor": "transfer floor (curl -o /dev/null)",
    "decode_floor": "decode floor (lbzip2 -dc local file > /dev/null)",
    "ours": "ours (fetch_developer_container: verified, lbzip2 -> dd conv=sparse, fsync)",
}


def report(title: str, times: dict[str, list[float]]) -> dict[str, float]:
    medians = {name: statistics.median(t) for name, t in times.items() if t}
    ours = medians["ours"]
    print(f"\n{title} (median of {len(times['ours'])}):")
    print(f"  {'row':76} {'seconds':>8} {'row/ours':>9}")
    for name, seconds in medians.items():
        print(f"  {LABELS[name]:76} {seconds:8.1f} {seconds / ours:8.2f}x")
    for floor in ("decode_floor", "transfer_floor"):
        if floor in medians:
            print(f"  ours / {floor.replace('_', ' ')}: {ours / medians[floor]:.3f}")
    return medians


def speed(text: str) -> int | None:
    """`loopback` (None: as fast as the server goes) or MiB/s."""
    return None if text == "loopback" else int(text) * MiB


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed-rounds", type=int, help="rounds of the seed (default: --rounds)")
    parser.add_argument(
        "--speeds",
        default="loopback,50",
        help="server speeds: 'loopback' or MiB/s, comma-separated",
    )
    parser.add_argument("--rows", default=",".join(LABELS), help="rows to run, comma-separated")
    layout = parser.add_mutually_exclusive_group()
    layout.add_argument("--small", action="store_true", help="the tests' unpadded mirror")
    layout.add_argument(
        "--dense", action="store_true", help="2.2 GiB of content in a 2.9 GiB image"
    )
    parser.add_argument("--json", type=Path, help="write the times there too")
    args = parser.parse_args()
    seed_rounds = args.rounds if args.seed_rounds is None else args.seed_rounds
    speeds = args.speeds.split(",")
    for text in speeds:
        speed(text)  # ValueError now rather than after the first set
    if args.small:
        mirror = build_mirror(default_kernel_release())
    elif args.dense:
        mirror = build_mirror(
            default_kernel_release(),
            content_bytes=DENSE_CONTENT_BYTES,
            image_size=DENSE_IMAGE_BYTES,
        )
    else:
        mirror = build_mirror(
            default_kernel_release(), content_bytes=CONTENT_BYTES, image_size=IMAGE_BYTES
        )
    bz2_mib = mirror.image.stat().st_size / MiB
    print(f"developer container: {mirror.image_size / GiB:.2f} GiB image, {bz2_mib:.0f} MiB bz2")
    print(f"cores: {os.cpu_count()}, load average: {os.getloadavg()[0]:.2f}", flush=True)
    results: dict[str, dict[str, list[float]]] = {}
    with serve_mirror(mirror) as server:
        ours = Ours(server.env(), mirror.version)
        every: dict[str, Row] = {
            "seed": seed,
            "flatcar": flatcar,
            "verified_shell": verified_shell,
            "transfer_floor": transfer_floor,
            "decode_floor": decode_floor,
            "ours": ours,
        }
        rows = {name: every[name] for name in args.rows.split(",")}
        for text in speeds:
            title = "loopback" if text == "loopback" else f"throttled to {text} MiB/s"
            server.throttle(speed(text))
            print(f"{title}:", flush=True)
            results[title] = measure(rows, server.image_url, mirror, args.rounds, seed_rounds)
        server.throttle(None)
    for title, times in results.items():
        report(title, times)
    print(f"\nthe image holds {ours.allocated / GiB:.2f} GiB of data (not holes)")
    python_peak = max(p for p, _ in ours.peaks) / 1024
    child_peak = max(c for _, c in ours.peaks) / 1024
    print(
        f"our peak RSS: {python_peak:.0f} MiB (Python), {child_peak:.0f} MiB (largest child,"
        f" lbzip2), {python_peak + child_peak:.0f} MiB together (target < 150 MB)"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "image_bytes": mirror.image_size,
                    "bz2_bytes": mirror.image.stat().st_size,
                    "data_bytes": ours.allocated,
                    "times": results,
                    "peaks_kib": ours.peaks,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    for tool in ("curl", "lbzip2", "bzip2", "gpgv", "losetup", "resize2fs"):
        shutil.which(tool) or sys.exit(f"bench: {tool} is needed")
    sys.exit(main())
