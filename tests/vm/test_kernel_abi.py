"""A package built for another ABI of the running kernel's release is never loaded, and
is replaced once (issue 19), on the real kernel K in a guest, for each kernel under test.

The bad package comes from the mirror's "another ABI" developer container: the same
kernel release, with another CRC for `_printk`, which every NVIDIA module imports (as
when a release rebuilds the same kernel version with another configuration); the good
one from the two-build developer container (another build of K, its ABI). The guest's
node has the bad one in the image's store and the good one in its own store, and:

1. can read the running kernel's CRCs (its build tree), so refuses the bad one before
   loading (moved aside as stale, a log line naming `_printk`) and loads the good one;
   the kernel never saw the bad one, nothing is compiled;
2. with the evidence hidden (no build tree, no host modules readable), meets another
   copy of the bad package: the kernel's own check refuses it ("disagrees about
   version of symbol"), it is moved aside as stale, and the good one is loaded;
3. a further `load` does not try the stale one again.

That the replacement is built (once) when no store has one is `_find_package`'s part,
proven without a kernel in tests/unit/test_stale_packages.py; a build on the node in the
two-build developer container is the container scenario's (test_container.py, "build").
"""

from __future__ import annotations

import sys
from pathlib import Path

from tests.conftest import run_tool, standin_env
from tests.flatcar_mirror import ANOTHER_ABI_SYMBOL, FlatcarMirror, build_mirror, serve_mirror
from tests.integration.conftest_mirror import Mirrors
from tests.standin.tree import make_standin_source

from .conftest import Guest
from .scenario import explain_run, facts_of
from .test_container import COMPILERS, ENGINE, LIFECYCLE

VERSION = "535.999.05"

SCRIPT = r"""
set -u
source "$LIFECYCLE"; source "$ENGINE"
K=$(uname -r)
mkdir -p "$PRECOMPILED_DIR/$K" && cp "$BAD" "$PRECOMPILED_DIR/$K/" || exit 1

loaded() { awk '$1 ~ /^nvidia/ {print $1}' /proc/modules | sort | paste -sd, -; }
refusals() { dmesg | grep -c "disagrees about version of symbol $SYMBOL"; }
stale() { ls "$PRECOMPILED_DIR/$K" | grep -c '\.stale$'; }
compiled() { trace_execs | grep -cE "$COMPILERS"; }

# step N: `load` (its log in $LOGS/loadN.log), what it did, `unload`.
step() {
    start_trace || exit 1
    nv load 2>"$LOGS/load$1.log"; say load$1_rc $?
    say load$1_modules "$(loaded)"
    say load$1_compiled "$(compiled)"
    say load$1_refusals "$(refusals)"
    say load$1_stale "$(stale)"
    nv unload 2>>"$LOGS/load$1.log"; say unload$1_rc $?
    say lost$1 "$(lost_events)"
}

step 1
cp "$BAD" "$PRECOMPILED_DIR/$K/"
# No evidence: the host's build tree (through its link) and modules hidden, and what step 1
# kept of them in the node's cache (a node whose first start sees no modules).
say kept_before "$(ls "$NVIDIA_DRIVER_CACHE/kernel-abi" 2>/dev/null | paste -sd, -)"
mount -t tmpfs tmpfs "/lib/modules/$K/build" && mount -t tmpfs tmpfs "/lib/modules/$K/kernel"
rm -rf "$NVIDIA_DRIVER_CACHE/kernel-abi"
say hidden "$(find "/lib/modules/$K/build/" "/lib/modules/$K/kernel/" -type f | wc -l)"
step 2
step 3
"""


def build_for(
    kernel: str, mirror: FlatcarMirror, source: Path, work: Path, store: str = "image"
) -> Path:
    """`update --kernel K` of the stand-in in `mirror`'s developer container, into `store`."""
    with serve_mirror(mirror) as server:
        made = run_tool(
            "update",
            "--kernel",
            kernel,
            "--store",
            store,
            env={
                **standin_env(work, source, VERSION),
                **server.env(),
                "HOST_ROOT": str(work / "host"),
            },
        )
    assert made.returncode == 0, made.stderr
    return Path(made.stdout.strip())


def test_a_package_for_another_abi_is_never_loaded_and_is_replaced_once(
    guest: Guest, mirrors: Mirrors, tmp_path: Path
) -> None:
    good_mirror = mirrors(guest.kernel)
    another = build_mirror(guest.kernel, version=good_mirror.version, abi="another")
    source = make_standin_source(tmp_path / "src", version=VERSION, flavours=("kernel",))
    bad = build_for(guest.kernel, another, source, tmp_path / "bad")
    node = tmp_path / "node"
    good = build_for(guest.kernel, good_mirror, source, node, store="node")
    assert good.parent == node / "node-precompiled" / guest.kernel
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "scenario.sh").write_text(SCRIPT)
    env = {
        **standin_env(node, source, VERSION),
        "KERNEL_MODULE_TYPE": "proprietary",
        "PY": sys.executable,
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "LOGS": str(logs),
        "BAD": str(bad),
        "SYMBOL": ANOTHER_ABI_SYMBOL,
        "LIFECYCLE": str(LIFECYCLE),
        "ENGINE": str(ENGINE),
        "COMPILERS": COMPILERS,
    }
    result = guest(
        ["bash", str(logs / "scenario.sh")],
        env=env,
        shares={str(tmp_path): tmp_path},
        timeout=600,
    )
    facts = facts_of(result.stdout)
    explain = explain_run(result, logs)
    log = {n: p.read_text() for n in range(1, 4) if (p := logs / f"load{n}.log").exists()}
    assert facts.get("load1_rc") == "0", explain
    # 1: refused before loading (the kernel never saw it); the good one loaded.
    assert "Not using the package" in log[1] and ANOTHER_ABI_SYMBOL in log[1], log[1]
    assert f"Using the precompiled package {good}" in log[1], log[1]
    assert (facts["load1_refusals"], facts["load1_stale"]) == ("0", "1"), explain
    assert facts["load1_modules"] == "nvidia,nvidia_modeset,nvidia_uvm"
    # 2: no evidence; the kernel refused the bad copy once; the good one loaded.
    assert facts["kept_before"] == f"{guest.kernel}.json", "step 1 kept the vermagic it read"
    assert facts["hidden"] == "0", explain
    assert facts["load2_rc"] == "0", log.get(2, "") + explain
    assert "the kernel's own check at load decides" in log[2], log[2]
    assert "The kernel refused the modules of" in log[2], log[2]
    assert (facts["load2_refusals"], facts["load2_stale"]) == ("1", "2"), log[2]
    assert facts["load2_modules"] == "nvidia,nvidia_modeset,nvidia_uvm"
    # 3: the stale ones are not tried again.
    assert (facts["load3_rc"], facts["load3_refusals"], facts["load3_stale"]) == ("0", "1", "2")
    assert {facts[f"load{n}_compiled"] for n in range(1, 4)} == {"0"}, "nothing is built"
    assert {facts[f"unload{n}_rc"] for n in range(1, 4)} == {"0"}, explain
    assert {facts[f"lost{n}"] for n in range(1, 4)} == {"0"}, "the trace proves nothing"
