"""A start with a package this node verified before, against one that verifies it (issue 22).

`init` and `load` link the package for the running kernel into the private module tree.
The first time, that is the whole work: every member hashed while extracted, NVIDIA's
core object hashed, `ld -r` with the carried linker, `depmod`. Once the tree's proof
holds (driver/proof.py), a start only stats the package, its core objects and the tree,
and reads the package's manifest. Both rows run `link.link_package` on this machine
(native speed), with the real 535.261.03 package the test bed built (tests/real_build.py,
the committed real image) and Debian's nvidia-kernel-source for its core object; median
of `--rounds`:

- **verify and link** (the baseline): the tree's proof removed before each round;
- **proof holds**: the same call again, the tree and its proof in place.

    .venv/bin/python -m bench.verified_once [--rounds N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from nvdriver.config import Config
from nvdriver.driver import proof
from nvdriver.driver.link import link_package
from nvdriver.driver.package import read_manifest
from nvdriver.driver.source import DriverSource
from tests.conftest import unpack_debian_source
from tests.container import committed_packages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    packages = committed_packages("real")
    if not packages:
        sys.exit("No real 535 package: run the real-driver tests first (tests/real_build.py).")
    package = packages[-1]
    release = read_manifest(package).kernel_release
    source = DriverSource.from_config(
        Config.from_env({"NVIDIA_DRIVER_SOURCE": str(unpack_debian_source("proprietary"))})
    )
    full, trusted = [], []
    with tempfile.TemporaryDirectory(prefix="bench-verified-") as tmp:
        base = Path(tmp) / source.version
        for _ in range(args.rounds):
            started = time.monotonic()
            tree = link_package(package, source, base, release=release)
            full.append(time.monotonic() - started)
            started = time.monotonic()
            assert link_package(package, source, base, release=release) == tree
            trusted.append(time.monotonic() - started)
            (tree / proof.PROOF).unlink()
    size = package.stat().st_size / 2**20
    base_s, ours = statistics.median(full), statistics.median(trusted)
    print(f"package: {package} ({size:.1f} MiB), kernel {release}")
    print(f"{'verify and link (the baseline)':34} {base_s * 1000:9.1f} ms")
    print(f"{'proof holds':34} {ours * 1000:9.1f} ms   {ours / base_s:.3f}x the baseline")
    print(f"rounds: {args.rounds}")


if __name__ == "__main__":
    main()
