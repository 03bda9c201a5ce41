"""A package built for another ABI of the running kernel's release is never loaded, and
is replaced once (issue 19), on the real kernel K in a guest, for each kernel under test.

The bad package comes from the mirror's "another ABI" developer container: the same
kernel release, with another CRC for `_printk`, which every NVIDIA module imports (as
when a release rebuilds the same kernel version with another configuration). The
guest's node then:

1. finds it in the image's store, can read the running kernel's CRCs (its build tree),
   so refuses it before loading: moved aside as stale; `load` builds the right one once
   in the developer container of its release (the two-build mirror, served in the
   guest) and loads it; the kernel never saw the bad one;
2. loads again from that package, nothing built;
3. with the evidence hidden (no build tree, no host modules readable), meets another
   copy of the bad package: the kernel's own check refuses it ("disagrees about
   version of symbol"), it is moved aside as stale, and the right one is loaded from the
   node's store, nothing built; a further `load` does not try the stale one again.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tests.conftest import run_tool, standin_env
from tests.flatcar_mirror import ANOTHER_ABI_SYMBOL, build_mirror, serve_mirror
from tests.integration.conftest_mirror import Mirrors
from tests.standin.tree import make_standin_source

from .conftest import Guest
from .guest import PROJECT
from .scenario import explain_run, facts_of
from .serve_mirror import mirror_json
from .test_container import COMPILERS, ENGINE, LIFECYCLE

VERSION = "535.999.05"

SCRIPT = r"""
set -u
source "$LIFECYCLE"; source "$ENGINE"
K=$(uname -r)
for d in "$NODE_PRECOMPILED_DIR" "$NVIDIA_DRIVER_CACHE"; do
    mkdir -p "$d" && mount -t tmpfs tmpfs "$d" || exit 1
done
mkdir -p "$PRECOMPILED_DIR/$K" && cp "$BAD" "$PRECOMPILED_DIR/$K/" || exit 1
(cd "$PROJECT" && exec "$PY" -m tests.vm.serve_mirror "$LOGS/mirror.json" "$LOGS/mirror.args") &
SERVER=$!
for _ in $(seq 600); do [ -s "$LOGS/mirror.args" ] && break; sleep 0.2; done
while read -r opt; do
    case "$opt" in --env=*) export "${opt#--env=}" ;; esac
done <"$LOGS/mirror.args"
export FLATCAR_SIGNING_KEY=$MIRROR_KEY

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
    say load$1_node_packages "$(ls "$NODE_PRECOMPILED_DIR/$K" | grep -c '\.tar\.gz$')"
    nv unload 2>>"$LOGS/load$1.log"; say unload$1_rc $?
    say lost$1 "$(lost_events)"
}

step 1
step 2
kill "$SERVER"
cp "$BAD" "$PRECOMPILED_DIR/$K/"
# No evidence: the host's build tree (through its link) and modules hidden.
mount -t tmpfs tmpfs "/lib/modules/$K/build" && mount -t tmpfs tmpfs "/lib/modules/$K/kernel"
say hidden "$(find "/lib/modules/$K/build/" "/lib/modules/$K/kernel/" -type f | wc -l)"
step 3
step 4
"""


def test_a_package_for_another_abi_is_never_loaded_and_is_replaced_once(
    guest: Guest, mirrors: Mirrors, tmp_path: Path
) -> None:
    good = mirrors(guest.kernel)
    another = build_mirror(guest.kernel, version=good.version, abi="another")
    source = make_standin_source(tmp_path / "src", version=VERSION, flavours=("kernel",))
    with serve_mirror(another) as server:
        made = run_tool(
            "update",
            "--kernel",
            guest.kernel,
            env={
                **standin_env(tmp_path / "bad", source, VERSION),
                **server.env(),
                "HOST_ROOT": str(tmp_path / "host"),
            },
        )
    assert made.returncode == 0, made.stderr
    bad = Path(made.stdout.strip())
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "mirror.json").write_text(mirror_json(good))
    (logs / "scenario.sh").write_text(SCRIPT)
    node = tmp_path / "node"
    env = {
        **standin_env(node, source, VERSION),
        "NODE_PRECOMPILED_DIR": "/var/lib/nvidia-driver",
        "NVIDIA_DRIVER_CACHE": "/var/cache/nvidia-driver",
        "KERNEL_MODULE_TYPE": "proprietary",
        "PY": sys.executable,
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "LOGS": str(logs),
        "BAD": str(bad),
        "SYMBOL": ANOTHER_ABI_SYMBOL,
        "MIRROR_KEY": str(good.signing_key),
        "PROJECT": str(PROJECT),
        "LIFECYCLE": str(LIFECYCLE),
        "ENGINE": str(ENGINE),
        "COMPILERS": COMPILERS,
    }
    result = guest(
        ["bash", str(logs / "scenario.sh")],
        env=env,
        shares={str(tmp_path): tmp_path},
        timeout=1200,
    )
    facts = facts_of(result.stdout)
    explain = explain_run(result, logs)
    log = {n: p.read_text() for n in range(1, 5) if (p := logs / f"load{n}.log").exists()}
    assert facts.get("load1_rc") == "0", explain
    # 1: refused before loading (the kernel never saw it), built once, loaded.
    assert "Not using the package" in log[1] and ANOTHER_ABI_SYMBOL in log[1], log[1]
    assert int(facts["load1_compiled"]) > 0, "the right package was built on the node"
    assert (facts["load1_refusals"], facts["load1_stale"]) == ("0", "1"), explain
    assert facts["load1_modules"] == "nvidia,nvidia_modeset,nvidia_uvm"
    assert facts["load1_node_packages"] == "1" and facts["unload1_rc"] == "0"
    # 2: the built package, nothing compiled.
    assert (facts["load2_rc"], facts["load2_compiled"], facts["load2_refusals"]) == ("0", "0", "0")
    assert "Building NVIDIA" not in log[2]
    # 3: no evidence; the kernel refused the bad copy once; the node's package loaded.
    assert facts["hidden"] == "0", explain
    assert facts["load3_rc"] == "0", log.get(3, "") + explain
    assert "the kernel's own check at load decides" in log[3], log[3]
    assert "The kernel refused the modules of" in log[3], log[3]
    assert (facts["load3_refusals"], facts["load3_stale"], facts["load3_compiled"]) == (
        "1",
        "2",
        "0",
    ), log[3]
    assert facts["load3_modules"] == "nvidia,nvidia_modeset,nvidia_uvm"
    # 4: the stale one is not tried again.
    assert (facts["load4_rc"], facts["load4_refusals"], facts["load4_compiled"]) == ("0", "1", "0")
    assert facts["unload3_rc"] == facts["unload4_rc"] == "0"
    assert {facts[f"lost{n}"] for n in range(1, 5)} == {"0"}, "the trace proves nothing"
