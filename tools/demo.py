"""Build and pack the stand-in driver for the installed kernel headers, then list it."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.standin.tree import kernel_build_dirs, make_standin_source

VERSION = "535.999.01"


def main() -> int:
    builds = kernel_build_dirs()
    if not builds:
        print("demo: no kernel headers under /lib/modules/*/build", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="nvidia-driver-demo-"))
    source = make_standin_source(work / f"nvidia-{VERSION}", version=VERSION)
    env = {
        **os.environ,
        "DRIVER_VERSION": VERSION,
        "NVIDIA_DRIVER_SOURCE": str(source),
        "PRECOMPILED_DIR": str(work / "precompiled"),
        "NVIDIA_DRIVER_CACHE": str(work / "cache"),
    }
    tool = str(Path(sys.executable).parent / "nvidia-driver")
    for argv in (
        ["update", "--kernel-source", str(builds[-1])],
        ["packages", "verify"],
        ["packages", "list"],
    ):
        print(f"$ nvidia-driver {' '.join(argv)}", flush=True)
        rc = subprocess.run([tool, *argv], env=env).returncode
        if rc != 0:
            return rc
    print(f"demo: everything is under {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
