"""Developer-container fetch: ours against the seed's pipeline, in one script.

Serves the local Flatcar mirror (tests/flatcar_mirror.py; its developer
container is 1.2 GiB) on 127.0.0.1, then times, on the same machine and
server, alternately:

- the seed: `curl -Ls URL | bzip2 -dq > file`, `dd` 3000 MiB of zeros onto
  it, `losetup -c`, `e2fsck -f`, `resize2fs` (unverified, one core);
- ours: `fetch_developer_container` (one pass: download, SHA-512, lbzip2,
  sparse write, signature of DIGESTS checked), run in a child process so that
  its peak RSS is its own.

Prints the median times, the ratio (seed / ours) and our peak RSS.
Run: .venv/bin/python -m bench.fetch [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.flatcar_mirror import build_mirror, default_kernel_release, serve_mirror

SEED_EXTRA_MIB = 3000
ROOT_PARTITION_START = 4096 * 512

OURS = """
import json, os, resource, sys, time
from pathlib import Path
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
print(json.dumps({"seconds": elapsed, "python_peak_kib": int(hwm), "image": str(image)}))
"""


def seed(url: str, work: Path) -> float:
    """The seed's pipeline, timed end to end."""
    image = work / "flatcar_developer_container.bin"
    start = time.monotonic()
    subprocess.run(
        ["bash", "-c", f"curl -Ls {shlex.quote(url)} | bzip2 -dq > {shlex.quote(str(image))}"],
        check=True,
    )
    zeros = f"dd if=/dev/zero bs=1M count={SEED_EXTRA_MIB} status=none"
    subprocess.run(["bash", "-c", f"{zeros} >> {shlex.quote(str(image))}"], check=True)
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
    return time.monotonic() - start


def ours(env: dict[str, str], version: str, work: Path) -> tuple[float, int, int]:
    """Our fetch in a child: (seconds, Python's peak RSS KiB, peak RSS KiB of the whole tree)."""
    full = {**os.environ, **env, "NVIDIA_DRIVER_CACHE": str(work / "cache")}
    proc = subprocess.Popen(
        [sys.executable, "-c", OURS, version], env=full, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"our fetch failed ({proc.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    return float(result["seconds"]), int(result["python_peak_kib"]), usage.ru_maxrss


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    mirror = build_mirror(default_kernel_release())
    bz2_mib = mirror.image.stat().st_size / (1 << 20)
    print(
        f"developer container: {mirror.image_size / (1 << 30):.2f} GiB image, {bz2_mib:.0f} MiB bz2"
    )
    print(f"cores: {os.cpu_count()}")
    seeds, mine, peaks = [], [], []
    with serve_mirror(mirror) as server:
        for i in range(args.rounds):
            with tempfile.TemporaryDirectory(dir=Path.home() / ".cache") as tmp:
                seeds.append(seed(server.image_url, Path(tmp)))
            with tempfile.TemporaryDirectory(dir=Path.home() / ".cache") as tmp:
                seconds, python_kib, tree_kib = ours(server.env(), mirror.version, Path(tmp))
                mine.append(seconds)
                peaks.append((python_kib, tree_kib))
            print(f"round {i + 1}: seed {seeds[-1]:.1f} s, ours {mine[-1]:.1f} s", flush=True)
    s, o = statistics.median(seeds), statistics.median(mine)
    python_peak = max(p for p, _ in peaks) / 1024
    tree_peak = max(t for _, t in peaks) / 1024
    print(f"seed pipeline (curl | bzip2 -dq, dd {SEED_EXTRA_MIB} MiB, resize2fs): {s:.1f} s")
    print(f"ours (one pass, verified, lbzip2, sparse): {o:.1f} s")
    print(f"ratio seed/ours: {s / o:.2f}x (target >= 2.5x)")
    print(
        f"our peak RSS: {python_peak:.0f} MiB (Python), {tree_peak:.0f} MiB "
        "(largest process of ours, lbzip2 included) (target < 150 MB)"
    )
    return 0


if __name__ == "__main__":
    shutil.which("curl") or sys.exit("bench: curl is needed for the seed's pipeline")
    sys.exit(main())
