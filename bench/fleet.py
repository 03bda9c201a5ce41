"""A node's start-to-ready after a Flatcar update's reboot: with its package built ahead,
against the same node compiling at boot (the baseline, measured in the same guest run).

On the host (tests/vm/reboot.py `build_ahead`): the local fleet mirror (two releases,
tests/flatcar_mirror.py), `update --store node --next` while the node "runs" the older
release. Then one QEMU guest boots the next release's kernel, says it runs the next
release, and measures `init` from its start to the readiness file (stand-in driver):

- built ahead: the node's store holds the package (`--rounds`, median);
- compiling at boot: an empty node store and cache, the fleet mirror served on the
  guest's 127.0.0.1: `init` downloads and verifies the developer container, builds in
  it, packs, links and loads (`--compile-rounds`, median; each round starts with an
  empty cache, as a node that has just booted a release it never built for).

Prints both, the ratio, and what the guest's kernel saw (compiler execs per run). A run
that did not reach readiness shows in its exit codes, not as an assertion.

Run (as root: loop devices, QEMU): .venv/bin/python -m bench.fleet [--rounds 3]
[--compile-rounds 1] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from tests.flatcar_mirror import build_fleet_mirror, fleet_kernels
from tests.vm.follow import following
from tests.vm.guest import PROJECT, run_in_guest
from tests.vm.reboot import FUNCTIONS, build_ahead
from tests.vm.serve_mirror import mirror_json

GUEST = r"""
for r in $(seq $ROUNDS); do
    boot_to_ready ahead_$r; stop_init TERM; say ahead_stop_rc_$r $INIT_RC
done
(cd "$PROJECT" && exec "$PY" -m tests.vm.serve_mirror $LOGS/mirror.json $LOGS/mirror.args) &
mirror=$!
for i in $(seq 600); do [ -s $LOGS/mirror.args ] && break; sleep 0.2; done
while read -r option; do
    case $option in --env=*) export "${option#--env=}" ;; esac
done <$LOGS/mirror.args
export FLATCAR_SIGNING_KEY=$SIGNING_KEY  # the host's path: no container here
progress "the fleet mirror is served on the guest's $FLATCAR_RELEASE_URL"
for r in $(seq $COMPILE_ROUNDS); do
    export NODE_PRECOMPILED_DIR=/var/lib/bench-node-$r NVIDIA_DRIVER_CACHE=/var/cache/bench-$r
    boot_to_ready compile_$r 2400; stop_init TERM; say compile_stop_rc_$r $INIT_RC
    rm -rf $NVIDIA_DRIVER_CACHE  # the guest's memory
done
kill $mirror
"""


def median(facts: dict[str, str], key: str, rounds: int) -> float | None:
    values = [float(facts[f"{key}_{r}_s"]) for r in range(1, rounds + 1) if f"{key}_{r}_s" in facts]
    return statistics.median(values) if values else None


def summary(facts: dict[str, str], key: str, rounds: int) -> str:
    def each(field: str) -> str:
        return ",".join(facts.get(f"{key}_{r}_{field}", "?") for r in range(1, rounds + 1))

    return f"ready exit {each('ready_rc')}, compiler execs {each('compiled')}"


def table(facts: dict[str, str], rounds: int, compile_rounds: int) -> list[str]:
    ahead, compiled = median(facts, "ahead", rounds), median(facts, "compile", compile_rounds)

    def secs(value: float | None) -> str:
        return f"{value:8.1f} s" if value is not None else "     n/a  "

    ratio = f"{ahead / compiled:.3f}x" if ahead is not None and compiled else "-"
    return [
        f"{'start-to-ready after the reboot (init)':<58} {'median':>10}",
        f"{'compiling at boot (empty store, mirror on 127.0.0.1)':<58} {secs(compiled)}"
        f"   baseline; {summary(facts, 'compile', compile_rounds)}",
        f"{'package built ahead (update --store node --next)':<58} {secs(ahead)}"
        f"   {ratio} of the baseline; {summary(facts, 'ahead', rounds)}",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.fleet", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="boots with the package built ahead")
    parser.add_argument("--compile-rounds", type=int, default=1, help="boots that compile")
    parser.add_argument("--json", type=Path, help="also write the raw facts here")
    args = parser.parse_args(argv)
    kernels = fleet_kernels()
    if kernels is None:
        print(
            "bench: the fleet needs kernel pairs of two series (tests/kernels.py)", file=sys.stderr
        )
        return 1
    fleet = build_fleet_mirror(*kernels)
    work = Path(tempfile.mkdtemp(prefix="nvidia-driver-bench-fleet-"))
    print(
        f"bench: Flatcar {fleet.running.version} ({kernels[0]}) -> {fleet.next.version} "
        f"({kernels[1]}); work in {work}",
        flush=True,
    )
    print("bench: update --store node --next on the host (the developer container)", flush=True)
    node = build_ahead(work, fleet)
    logs = work / "logs"
    logs.mkdir()
    (logs / "mirror.json").write_text(mirror_json(fleet.running))
    script = logs / "bench.sh"
    script.write_text(FUNCTIONS + GUEST)
    env = {
        **node.env,
        "LOGS": str(logs),
        "RELEASE": fleet.next.version,
        "ROUNDS": str(args.rounds),
        "COMPILE_ROUNDS": str(args.compile_rounds),
        "PROJECT": str(PROJECT),
        "SIGNING_KEY": str(fleet.running.signing_key),
    }
    print(f"bench: booting {kernels[1]} in a guest (QEMU)", flush=True)
    with following(logs / "progress.log", lambda line: print(f"guest | {line}", flush=True)):
        result = run_in_guest(
            ["bash", str(script)],
            kernel=kernels[1],
            env=env,
            shares={str(work): work},
            timeout=3000 * max(1, args.compile_rounds),
            memory_mb=8192,
        )
    facts = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line[:40])
    if args.json:
        args.json.write_text(json.dumps(facts, indent=2) + "\n")
    print(f"bench: guest exit {result.returncode}; logs in {logs}")
    for line in table(facts, args.rounds, args.compile_rounds):
        print(line)
    return 0 if result.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
