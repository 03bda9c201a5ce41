"""A second node's package: pulled from the registry, against compiled at boot.

The part of start-to-ready that differs between a node that finds its package in the
registry and one that compiles it; the rest (link, load, the daemon) is the same for
both and measured by bench/lifecycle.py in a guest. In one script, on one machine:

- **compile at boot**: `nvidia-driver update --kernel K` with a fresh cache (what a
  node does after a reboot into a kernel it has no package for: fetch and verify the
  Flatcar developer container, mount it, build the stand-in driver (tests/standin)
  with the developer container's compiler, pack), against the local Flatcar mirror
  (tests/flatcar_mirror.py) served on 127.0.0.1; and once more with the developer
  container already cached (a node that compiled for this release before);
- **from the registry**: `registry.pull` into a fresh node store from Debian's
  `docker-registry` on 127.0.0.1 with basic auth and TLS (tests/registry.py): resolve
  the tag, fetch by digest, blob checks, `gpgv` of the fleet signature, every member
  verified, renamed into place; in a child process, its interpreter start included.

- **a throttled registry** (issue 21): the same pulls through the fault proxy of
  tests/registry.py, healthy (the baseline) and throttled as in a rollout wave: the
  first two requests of each pull answered 429 with `Retry-After: 1`; the client waits
  as asked (1-1.25 s each, jittered) and the pull succeeds.

Prints the medians and the ratios compile/pull and throttled/healthy. The stand-in's
package is small (its modules are tiny); a real 535 package is ~50 MB, whose pull the
network bounds.
Run (root: loop devices): .venv/bin/python -m bench.registry [--rounds N] [--real]
[--pulls-only] (--pulls-only: no compile, a plain-file package of tests/packaging.py:
the pull rows only, in seconds)
(--real: the real NVIDIA 535 sources, Debian's nvidia-kernel-source, instead of the
stand-in: minutes per build, so only the compile with no developer container cached)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nvdriver import registry
from nvdriver.config import Config
from nvdriver.driver import package as pkg
from nvdriver.driver.source import DriverSource
from nvdriver.host import KernelIdentity
from tests.flatcar_mirror import build_mirror, default_kernel_release, serve_mirror
from tests.packaging import fake_build
from tests.registry import FaultProxy, Registry, make_key, serve_registry
from tests.standin.tree import make_standin_source

VERSION = "535.999.01"
TOOL = Path(sys.executable).parent / "nvidia-driver"

PULL = """
import os, sys, time
from pathlib import Path
from nvdriver import log, registry
from nvdriver.config import Config
from nvdriver.driver import package as pkg
start = time.monotonic()
log.setup("text")
config = Config.from_env(dict(os.environ))
m = pkg.read_manifest(Path(sys.argv[1]))
wanted = registry.Wanted(m.kernel, m.driver_version, m.flavour, m.tag)
ref = registry.Reference.parse(os.environ["PRECOMPILED_REGISTRY"])
registry.pull(config, ref, wanted, config.node_precompiled_dir)
print(time.monotonic() - start)
"""


def compile_at_boot(
    env: dict[str, str], kernel: str, cache: Path, store: Path
) -> tuple[float, Path]:
    full = {
        **os.environ,
        **env,
        "NVIDIA_DRIVER_CACHE": str(cache),
        "PRECOMPILED_DIR": str(store),
        "NODE_PRECOMPILED_DIR": str(store),
    }
    start = time.monotonic()
    proc = subprocess.run(
        [str(TOOL), "update", "--kernel", kernel], env=full, capture_output=True, text=True
    )
    elapsed = time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(f"update failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return elapsed, Path(proc.stdout.strip())


def pull(env: dict[str, str], package: Path, store: Path) -> tuple[float, float]:
    """(seconds of the child, interpreter start included; seconds of the pull alone)."""
    full = {**os.environ, **env, "NODE_PRECOMPILED_DIR": str(store), "LOG_FORMAT": "text"}
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", PULL, str(package)],
        env=full,
        check=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    return time.monotonic() - start, float(proc.stdout.strip().splitlines()[-1])


def throttled_against_healthy(
    reg: Registry, env: dict[str, str], package: Path, work: Path, rounds: int
) -> tuple[float, float]:
    """Median seconds of a pull through the proxy, healthy and throttled (see above)."""
    healthy, throttled = [], []
    with FaultProxy(reg) as proxy:
        proxied = {**env, "PRECOMPILED_REGISTRY": proxy.reference}
        for i in range(rounds):
            proxy.fault = None
            healthy.append(pull(proxied, package, work / f"healthy-{i}")[0])
            proxy.fault, proxy.times = "429", 2
            first = len(proxy.seen)
            seconds, _ = pull(proxied, package, work / f"throttled-{i}")
            statuses = [status for *_, status in proxy.seen[first:]]
            assert statuses.count(429) == 2, statuses
            throttled.append(seconds)
            print(f"pull through the proxy {i + 1}: healthy {healthy[-1]:.2f} s, "
                  f"throttled {throttled[-1]:.2f} s", flush=True)  # fmt: skip
    return statistics.median(healthy), statistics.median(throttled)


def pulls_only(rounds: int) -> int:
    """The pull rows alone: a plain-file package, no compile."""
    base = Path.home() / ".cache"
    with tempfile.TemporaryDirectory(dir=base) as tmp:
        work = Path(tmp)
        key = make_key(work, "fleet")
        kernel = KernelIdentity("6.12.0-bench", "Linux version 6.12.0-bench (bench) #1")
        build = fake_build(work / "build", kernel=kernel, size=20 << 20)
        package = pkg.write_package(work / "store", build, tag=None).path
        env = {
            "PRECOMPILED_TRUSTED_KEYS": str(key.public),
            "PRECOMPILED_SIGNING_KEY": str(key.secret),
        }
        with serve_registry(work / "registry") as reg:
            env |= {**reg.env(), "PRECOMPILED_REGISTRY": reg.reference}
            os.environ.update(env)  # the registry module reads the credentials at use
            registry.push(
                Config.from_env(env),
                pkg.Package(package, pkg.read_manifest(package)),
                registry.Reference.parse(reg.reference),
            )
            h, t = throttled_against_healthy(reg, env, package, work, max(rounds, 3))
            size = package.stat().st_size / 1024
    print(f"package: {size:.0f} KiB (plain files)")
    print(f"pull through the proxy, healthy registry:              {h:.2f} s (1x)")
    print(f"pull through the proxy, throttled (429 x2, Retry-After 1 s): {t:.2f} s "
          f"({t / h:.1f}x)")  # fmt: skip
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--real", action="store_true", help="the real NVIDIA 535 sources (minutes per build)"
    )
    parser.add_argument("--pulls-only", action="store_true", help="no compile (seconds)")
    args = parser.parse_args()
    if args.pulls_only:
        return pulls_only(args.rounds)
    kernel = default_kernel_release()
    mirror = build_mirror(kernel)
    print(f"kernel {kernel}, Flatcar {mirror.version} (local mirror), cores: {os.cpu_count()}")
    base = Path.home() / ".cache"
    with tempfile.TemporaryDirectory(dir=base) as tmp, serve_mirror(mirror) as server:
        work = Path(tmp)
        if args.real:
            from tests.conftest import unpack_debian_source

            source = unpack_debian_source("proprietary")
            version = DriverSource.from_config(
                Config.from_env({"NVIDIA_DRIVER_SOURCE": str(source)})
            ).version
        else:
            source = make_standin_source(work / f"nvidia-{VERSION}", version=VERSION)
            version = VERSION
        print(f"driver: {'the real NVIDIA' if args.real else 'the stand-in'} {version}")
        key = make_key(work, "fleet")
        env = {
            **server.env(),
            "DRIVER_VERSION": version,
            "NVIDIA_DRIVER_SOURCE": str(source),
            "HOST_ROOT": str(work / "host"),
            "PRECOMPILED_TRUSTED_KEYS": str(key.public),
            "PRECOMPILED_SIGNING_KEY": str(key.secret),
        }
        cold, warm, pulls = [], [], []
        with serve_registry(work / "registry") as reg:
            env |= {**reg.env(), "PRECOMPILED_REGISTRY": reg.reference}
            package = None
            for i in range(args.rounds):
                cache = work / f"cache-{i}"
                seconds, package = compile_at_boot(env, kernel, cache, work / f"built-{i}")
                cold.append(seconds)
                if not args.real:  # the real compile's minutes dwarf the fetch's seconds
                    seconds, _ = compile_at_boot(env, kernel, cache, work / f"built-warm-{i}")
                    warm.append(seconds)
                print(f"round {i + 1}: compile {cold[-1]:.1f} s cold {warm[-1:]} warm", flush=True)
            assert package is not None
            os.environ.update(env)  # the registry module reads the credentials at use
            registry.push(
                Config.from_env(env),
                pkg.Package(package, pkg.read_manifest(package)),
                registry.Reference.parse(reg.reference),
            )
            for i in range(max(args.rounds, 3)):
                pulls.append(pull(env, package, work / f"node-{i}"))
                print(f"pull {i + 1}: {pulls[-1][0]:.2f} s", flush=True)
            healthy, throttled = throttled_against_healthy(
                reg, env, package, work, max(args.rounds, 3)
            )
            size = package.stat().st_size / 1024
    c = statistics.median(cold)
    p, alone = statistics.median(t for t, _ in pulls), statistics.median(a for _, a in pulls)
    print(f"package: {size:.0f} KiB")
    print(f"compile at boot, developer container not cached: {c:.1f} s ({c / p:.0f}x the pull)")
    if warm:
        w = statistics.median(warm)
        print(f"compile at boot, developer container cached:     {w:.1f} s ({w / p:.0f}x)")
    print(f"pull from the registry (auth+TLS, verified):    {p:.2f} s ({alone:.2f} s without")
    print("  the interpreter's start and imports)")
    print(f"pull through the proxy, healthy registry:      {healthy:.2f} s (1x)")
    print(f"pull through the proxy, throttled (429 x2, Retry-After 1 s): {throttled:.2f} s "
          f"({throttled / healthy:.1f}x)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
