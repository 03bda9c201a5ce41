"""The real NVIDIA 535 proprietary driver built for a kernel: what the slow tests take.

Three slow tests need it: the build in the developer container
(tests/integration/test_real_driver.py), its link on the node (same file) and its load
in a guest that has no GPU (tests/vm/test_lifecycle.py). The tests take it from the
update that the committed real image is made of (tests/conftest.py `real_builds`):
`update --kernel K` in a container of the image, as a node runs it, built once per
kernel for both.

`build_real_535` builds it on this machine instead, `nvidia-driver update --kernel K`
with HOST_ROOT, in the Flatcar developer container of the local mirror for K, for the
benchmarks (bench/), which run without a container engine. Its result is kept under
~/.cache/nvidia-driver-tests/real-535-<key>, where the key is every input of the
build: the Debian source tarball, the mirror (its developer root holds K's headers and
the toolchain) and the product's own code (every file of the installed `nvdriver`
package). A changed input builds anew.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import nvdriver
from tests.flatcar_mirror import FlatcarMirror, serve_mirror

RESULT = "result.json"


@dataclasses.dataclass(frozen=True)
class RealBuild:
    kernel: str
    source: Path  # the unpacked Debian tree given as NVIDIA_DRIVER_SOURCE
    precompiled: Path  # PRECOMPILED_DIR: the one package
    cache: Path  # NVIDIA_DRIVER_CACHE (the image is removed: a node that only got the package)
    package: Path
    log: str  # the update's stderr

    def env(self) -> dict[str, str]:
        """The environment that finds this build's package and linker."""
        return {
            "NVIDIA_DRIVER_SOURCE": str(self.source),
            "PRECOMPILED_DIR": str(self.precompiled),
            "NVIDIA_DRIVER_CACHE": str(self.cache),
        }


class RealBuildFailed(AssertionError):
    """The update failed or left mounts or work behind: every test that needs it fails."""


def product_digest() -> str:
    """A digest of every file of the installed product (its code is an input of the build)."""
    h = hashlib.sha256()
    root = Path(nvdriver.__file__).resolve().parent
    for path in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        h.update(f"{path.relative_to(root)}\0".encode() + path.read_bytes() + b"\0")
    return h.hexdigest()


def _leftovers(work: Path) -> list[str]:
    """Mount points under `work` (/proc/self/mounts) and entries of its cache's work dir."""
    targets = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    found = [t for t in targets if t.startswith(str(work))]
    base = work / "cache" / "work"
    return found + ([str(p) for p in base.iterdir()] if base.is_dir() else [])


def build_real_535(kernel: str, mirror: FlatcarMirror, source: Path, cache_dir: Path) -> RealBuild:
    """The build for `kernel` from the cache, else made now and cached; RealBuildFailed
    when the update fails or leaves something behind (a failed build is not kept)."""
    from tests.conftest import run_tool  # deferred: tests.conftest imports this module

    # source.name holds the tarball's digest, the mirror's directory its inputs' hash.
    inputs = [kernel, mirror.root.parent.name, source.name, product_digest()]
    key = hashlib.sha256(json.dumps(inputs).encode()).hexdigest()[:16]
    final = cache_dir / f"real-535-{key}"
    if not (final / RESULT).is_file():
        work = final.with_name(f"{final.name}.tmp{os.getpid()}")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        env = {
            "NVIDIA_DRIVER_SOURCE": str(source),
            "PRECOMPILED_DIR": str(work / "precompiled"),
            "NVIDIA_DRIVER_CACHE": str(work / "cache"),
            "HOST_ROOT": str(work / "host"),
            "KERNEL_MODULE_TYPE": "proprietary",
        }
        with serve_mirror(mirror) as server:
            result = run_tool("update", "--kernel", kernel, env={**env, **server.env()})
        if result.returncode != 0:
            raise RealBuildFailed(
                f"update --kernel {kernel} of the real driver exited {result.returncode}:\n"
                + result.stderr[-4000:]
            )
        leftovers = _leftovers(work)
        if leftovers:
            raise RealBuildFailed(f"update --kernel {kernel} left behind: {leftovers}")
        # Loading needs the package (it carries its linker), not the developer container.
        for image in (work / "cache").rglob("*.bin"):
            image.unlink()
        package = Path(result.stdout.strip()).relative_to(work)
        (work / RESULT).write_text(json.dumps({"package": str(package), "log": result.stderr}))
        shutil.rmtree(final, ignore_errors=True)
        work.rename(final)
    saved = json.loads((final / RESULT).read_text())
    return RealBuild(
        kernel,
        source,
        final / "precompiled",
        final / "cache",
        final / saved["package"],
        saved["log"],
    )
