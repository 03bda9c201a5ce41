"""Start-to-ready, restart-to-ready and `status` on a real kernel, against a floor
measured in the same guest run.

One QEMU guest (tests/vm/guest.py) boots the kernel and runs, `--rounds` times
(median reported):

- the floor: a plain shell script that does what loading a package must do at
  the least: untar the package, the same `ld -r` links (same linker, same
  linker scripts, same core objects, the commands `link.link_command` gives),
  the host prerequisites' `modprobe` and the `insmod`s, in order;
- start-to-ready: `nvidia-driver init` from its start to the readiness file
  (the stand-in driver, tests/standin), then a SIGTERM (not timed);
- the real NVIDIA 535.261.03 package (tests/real_build.py), link-only: the guest
  has no GPU, so the floor stops at `insmod nvidia.ko`'s ENODEV, and ours is
  `nvidia-driver load` up to its exit 7;
- restart-to-ready: `init` again while the driver is loaded and in use (the
  stand-in holder module holds it, so each SIGTERM'd init keeps the modules
  loaded, exit 3, as when GPU work runs across a container restart), and
  `load` again with the driver loaded;
- `nvidia-driver status` alone, the interpreter's bare start (`python -c pass`)
  and the import of the CLI, to tell our overhead from Python's.

Prints the medians, each ratio to its floor, and the exit codes seen (a run
that did not reach readiness shows here, not as an assertion: a bench prints
numbers). Progress lines come from the guest as it works.

Natively, with no guest (the host's speed; no module is loaded, the run stops where
the kernel would take over): the real package's link path, ours (a first link, which
verifies everything, and a start whose proof holds) against the floor script up to its
last `ld -r`. `--native-only` runs only these rows.

With `--kept-scan`, every host module is first read into the node's cache (untimed: the
kept scan of kmod/abi.py), so the rows show a node that has started on this kernel before
(the first starts after a kernel update read the modules within a 3 s budget each).

With `--before REV`, `init`'s start and restart (and the CLI's import) are also timed with
the program of that git revision (its `src` on PYTHONPATH), in the same guest, each round
right after ours: this machine's speed varies between runs by more than a change makes.

Run: .venv/bin/python -m bench.lifecycle [--rounds N] [--kernel RELEASE] [--no-real]
[--native-only] [--kept-scan] [--before REV] (the real package is built once per kernel and product
version, minutes; it needs what `tests/real_build.py` needs: root, the local Flatcar mirror).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.imports import checkout
from nvdriver.config import Config
from nvdriver.driver.link import link_command
from nvdriver.driver.package import read_manifest
from nvdriver.driver.source import MODULE_ORDER, DriverSource
from nvdriver.kmod.loading import PREREQUISITES
from tests.conftest import CACHE, standin_env, unpack_debian_source
from tests.container import committed_packages
from tests.flatcar_mirror import build_mirror
from tests.kernels import preferred_kernel
from tests.real_build import build_real_535
from tests.standin.tree import build_holder, build_standin, make_standin_source
from tests.vm.follow import following
from tests.vm.guest import run_in_guest
from tests.vm.scenario import LIB, PERSISTENCED, VERSION, update_package

FLOOR_DIR = "/tmp/bench-floor"  # the guest's own tmpfs
BASE_MODULES = ("nvidia", "nvidia-uvm", "nvidia-modeset")  # no nvidia-drm without modeset=1


def floor_script(
    package: Path, source: Path, *, stop_at_nvidia: bool, links_only: bool = False
) -> str:
    """Bash that does the package's untar, links and insmods, nothing else.

    `stop_at_nvidia`: the real driver without a GPU, where `insmod nvidia.ko` fails
    (ENODEV) and the modules that need it cannot follow. `links_only`: up to the last
    `ld -r`, where the kernel would take over (the native rows)."""
    manifest = read_manifest(package)
    flavour_dir = DriverSource.from_config(
        Config.from_env({"NVIDIA_DRIVER_SOURCE": str(source)})
    ).flavour_dir(manifest.flavour)
    w = Path(FLOOR_DIR)
    lines = [f"rm -rf {w} && mkdir -p {w}", shlex.join(["tar", "-xzf", str(package), "-C", str(w)])]
    ld: Sequence[str] = ["ld"]
    if manifest.linker_files is not None:  # the linker the package carries, as the node's
        loader = w / manifest.linker_files["loader"]
        lines.append(shlex.join(["chmod", "+x", str(loader)]))
        ld = [str(loader), "--library-path", str(loader.parent)]
        ld.append(str(w / manifest.linker_files["program"]))
    built: dict[str, Path] = {}
    for entry in manifest.modules:
        if entry.name not in BASE_MODULES:
            continue
        if entry.core is None:
            built[entry.name] = w / entry.file
            continue
        out = w / f"{entry.name}.ko"
        scripts = [str(w / s) for s in manifest.ld_scripts]
        core = str(flavour_dir / entry.core)
        lines.append(shlex.join(link_command(ld, scripts, str(out), str(w / entry.file), core)))
        built[entry.name] = out
    if links_only:
        return "set -e\n" + "\n".join(lines) + "\n"
    prerequisites = [*PREREQUISITES, "video"]
    lines.append(shlex.join(["modprobe", "-a", *prerequisites]) + " 2>/dev/null")
    for name in (m for m in MODULE_ORDER if m in built):
        insmod = shlex.join(["insmod", str(built[name])])
        if stop_at_nvidia and name == "nvidia":
            lines.append(f"{insmod} 2>/dev/null; echo floor_insmod_rc=$? >&2")
            break
        lines.append(insmod)
    return "\n".join(lines) + "\n"


# Ours on the host: a fresh interpreter running the link path `load` and `init` take
# (driver/link.py: verify every member, check the core objects, link with the carried
# linker, depmod, record the proof), up to where the kernel would take over.
NATIVE_LINK = """
import sys
from pathlib import Path
from nvdriver.config import Config
from nvdriver.driver.link import link_package
from nvdriver.driver.source import DriverSource
package, source, base, release = sys.argv[1:]
link_package(Path(package), DriverSource.from_config(Config.from_env(
    {"NVIDIA_DRIVER_SOURCE": source})), Path(base), release=release)
"""


def _timed(argv: Sequence[str], env: dict[str, str] | None = None) -> float:
    environment = None if env is None else {**os.environ, **env}
    started = time.monotonic()
    subprocess.run(
        argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment
    )
    return time.monotonic() - started


def native_link_rows(
    package: Path, source: Path, rounds: int, before: Path | None = None
) -> list[str]:
    """The real package's link path on this machine, no guest: the floor script up to its
    last `ld -r` against ours, a first link (the tree's proof absent: everything verified)
    and a start whose proof holds; median of `rounds`, each round in fresh processes. With
    `before` (another revision's `src`), its first link too, interleaved in each round."""
    manifest = read_manifest(package)
    release = manifest.kernel_release
    floor = floor_script(package, source, stop_at_nvidia=True, links_only=True)
    times: dict[str, list[float]] = {
        "floor": [],
        "first": [],
        "proven": [],
        "python": [],
        "first_before": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench-native-") as tmp:
        script = Path(tmp) / "floor.sh"
        script.write_text(floor)
        base = Path(tmp) / "opt"
        ours = [sys.executable, "-c", NATIVE_LINK, str(package), str(source), str(base), release]
        for _ in range(rounds):
            times["floor"].append(_timed(["bash", str(script)]))
            shutil.rmtree(base, ignore_errors=True)
            times["first"].append(_timed(ours))
            times["proven"].append(_timed(ours))
            times["python"].append(_timed([sys.executable, "-c", "pass"]))
            if before is not None:
                shutil.rmtree(base, ignore_errors=True)
                times["first_before"].append(_timed(ours, {"PYTHONPATH": str(before)}))
        shutil.rmtree(FLOOR_DIR, ignore_errors=True)
    m = {k: statistics.median(v) for k, v in times.items() if v}
    size = package.stat().st_size / 2**20
    rows = [
        f"native, real {manifest.driver_version} package ({size:.1f} MiB), kernel "
        f"{release}, median of {rounds}:",
        f"{'  floor: untar, the links (bash)':<46} {m['floor']:7.3f} s",
        f"{'  ours, first link (verify, link, depmod)':<46} {m['first']:7.3f} s  "
        f"{m['first'] / m['floor']:6.2f}x  <= 1.2x floor",
        f"{'  ours, proof holds (a restart)':<46} {m['proven']:7.3f} s  "
        f"{m['proven'] / m['floor']:6.2f}x",
        f"{'  python -c pass':<46} {m['python']:7.3f} s",
    ]
    if before is not None:
        rows.insert(
            3,
            f"{'  ours, first link, before (same run)':<46} {m['first_before']:7.3f} s  "
            f"{m['first_before'] / m['floor']:6.2f}x",
        )
    return rows


GUEST = r"""
set -u
source {lib}
progress() {{ echo "$*" >>$LOGS/progress.log; }}
now() {{ echo "${{EPOCHREALTIME/./}}"; }}  # microseconds
# measure KEY START: say KEY=<seconds since START> and keep it in $last.
measure() {{
    local us=$(($(now) - $2))
    last=$(printf '%d.%06d' $((us / 1000000)) $((us % 1000000)))
    say "$1" "$last"
}}
# to_ready KEY LOG [NAME=VALUE...]: init started (with the environment given) to its
# readiness file (KEY_R, also in $last), then SIGTERM'd (its exit in KEY_stop_rc_R).
to_ready() {{
    local key=$1 log=$2 t
    shift 2
    t=$(now); start_init "$log" "$@"; wait_ready; say ${{key}}_ready_rc_$r $?
    say ${{key}}_launched_$r $t
    measure ${{key}}_$r $t
    stop_init TERM; say ${{key}}_stop_rc_$r $INIT_RC
}}
unload_floor() {{ rmmod nvidia_modeset nvidia_uvm nvidia 2>/dev/null; rm -rf {floor_dir}; }}
real() {{ (export NVIDIA_DRIVER_SOURCE={real_source} PRECOMPILED_DIR={real_store} \
    NVIDIA_DRIVER_CACHE={real_cache} DRIVER_VERSION={real_version}; "$@"); }}

progress "kernel $(uname -r), $(nproc) CPUs, {rounds} rounds"
if [ {kept} = yes ]; then
    t=$(now); $PY -c "$KEEP_SCAN"; measure kept_scan $t
    progress "the host modules' scan kept in the node's cache (every module read): $last s"
fi
for r in $(seq {rounds}); do
    t=$(now); floor_standin; measure floor_standin_$r $t; unload_floor
    progress "round $r: stand-in floor (untar, ld -r, insmod): $last s"
    to_ready init $LOGS/init-$r.log
    progress "round $r: init start-to-ready: $last s (SIGTERM: exit $INIT_RC)"
    if [ -n "$BEFORE" ]; then
        to_ready init_before $LOGS/init-before-$r.log PYTHONPATH=$BEFORE
        progress "round $r: init start-to-ready, before: $last s (SIGTERM: exit $INIT_RC)"
    fi
    if [ {real} = yes ]; then
        t=$(now); floor_real; measure floor_real_$r $t; unload_floor
        progress "round $r: real 535 floor (untar, ld -r, insmod to ENODEV): $last s"
        t=$(now); real nv load 2>>$LOGS/real-load.log; rc=$?; measure real_load_$r $t
        say real_load_rc_$r $rc
        progress "round $r: real 535 load to exit $rc: $last s"
    fi
done

nv load 2>$LOGS/load.log; say preload_rc $?
insmod $HOLDER; say holder_rc $?
progress "driver loaded and held by a module (in use): restarts keep it"
for r in $(seq {rounds}); do
    to_ready restart $LOGS/restart-$r.log
    progress "round $r: init restart-to-ready: $last s (SIGTERM: exit $INIT_RC)"
    if [ -n "$BEFORE" ]; then
        to_ready restart_before $LOGS/restart-before-$r.log PYTHONPATH=$BEFORE
        progress "round $r: init restart-to-ready, before: $last s (SIGTERM: exit $INIT_RC)"
        t=$(now); PYTHONPATH=$BEFORE $PY -c 'import nvdriver.cli'; measure import_before_$r $t
    fi
    t=$(now); nv load 2>>$LOGS/reload.log; rc=$?; measure reload_$r $t; say reload_rc_$r $rc
    progress "round $r: load again: $last s (exit $rc)"
    t=$(now); nv status >/dev/null; rc=$?; measure status_$r $t; say status_rc_$r $rc
    progress "round $r: status: $last s (exit $rc)"
    t=$(now); $PY -c pass; measure python_$r $t
    t=$(now); $PY -c 'import nvdriver.cli'; measure import_$r $t
done
rmmod nvidia_standin_holder; nv unload 2>>$LOGS/load.log; say unload_rc $?
say relinked "$(cat $LOGS/restart-*.log $LOGS/reload.log | grep -c 'Linked and installed')"
"""


# --kept-scan: what the first starts on a kernel leave in the node's cache (kmod/abi.py).
KEEP_SCAN = (
    "import os; from nvdriver.config import Config; from nvdriver.kmod.abi import RunningAbi; "
    "RunningAbi(Config.from_env(dict(os.environ)), os.uname().release, budget=float('inf'))"
    ".crcs(['-'])"
)


def _functions(standin: str, real: str) -> str:
    def fn(name: str, body: str) -> str:
        return f"{name}() {{\n{body}}}\n"

    return fn("floor_standin", standin) + fn("floor_real", real or ":\n")


def median(facts: dict[str, str], key: str, rounds: int) -> float | None:
    values = [float(facts[f"{key}_{r}"]) for r in range(1, rounds + 1) if f"{key}_{r}" in facts]
    return statistics.median(values) if values else None


def codes(facts: dict[str, str], key: str, rounds: int) -> str:
    return ",".join(facts.get(f"{key}_{r}", "?") for r in range(1, rounds + 1))


def before_first_line(facts: dict[str, str], logs: Path, rounds: int) -> list[str]:
    """From each init's launch to its first log line (the interpreter, the imports, the
    command line, the lock), and from there to readiness (init's own steps), medians: where
    a start's and a restart's time goes, read from init's own log."""
    out = []
    for key, log in (
        ("init", "init"),
        ("restart", "restart"),
        ("init_before", "init-before"),
        ("restart_before", "restart-before"),
    ):
        before, own = [], []
        for r in range(1, rounds + 1):
            launched = facts.get(f"{key}_launched_{r}")
            path = logs / f"{log}-{r}.log"
            if launched is None or not path.exists():
                continue
            lines = path.read_text().splitlines()
            first = _stamp(lines[0]) if lines else None
            ready = next((_stamp(x) for x in lines if "The driver is ready" in x), None)
            if first is None or ready is None:
                continue
            before.append(first - int(launched) / 1e6)
            own.append(ready - first)
        if before:
            out.append(
                f"{key}: launch to init's first log line {statistics.median(before):.2f} s, "
                f"first line to ready {statistics.median(own):.2f} s"
            )
    return out


def _stamp(line: str) -> float | None:
    """The time of a text log line (2026-12-07T01:27:01.895Z info ...), seconds."""
    try:
        return (
            datetime.datetime.strptime(line[:24], "%Y-%m-%dT%H:%M:%S.%fZ")
            .replace(tzinfo=datetime.timezone.utc)
            .timestamp()
        )
    except ValueError:
        return None


def table(facts: dict[str, str], rounds: int, real: bool, logs: Path | None = None) -> list[str]:
    def row(name: str, floor: float | None, ours: float | None, target: str) -> str:
        f = f"{floor:7.2f} s" if floor is not None else "      - "
        o = f"{ours:7.2f} s" if ours is not None else "   n/a  "
        ratio = f"{ours / floor:6.2f}x" if floor and ours is not None else "     - "
        return f"{name:<46} {f}  {o}  {ratio}  {target}"

    m = {
        k: median(facts, k, rounds)
        for k in (
            "floor_standin",
            "init",
            "floor_real",
            "real_load",
            "restart",
            "reload",
            "status",
            "python",
            "import",
            "init_before",
            "restart_before",
            "import_before",
        )
    }
    lines = [
        f"{'':<46} {'floor':>9}  {'ours':>9}  {'ratio':>7}  target",
        row("start-to-ready, stand-in (init)", m["floor_standin"], m["init"], "<= 2.0x floor"),
    ]
    if real:
        lines.append(
            row(
                "start-to-exit-7, real 535 link-only (load)",
                m["floor_real"],
                m["real_load"],
                "<= 1.5x floor",
            )
        )
    python = m["python"]
    lines += [
        row("restart-to-ready, driver loaded (init)", None, m["restart"], "<= python + 1 s"),
        *(
            [
                row(
                    "start-to-ready, before (same run)",
                    m["floor_standin"],
                    m["init_before"],
                    "",
                ),
                row("restart-to-ready, before (same run)", None, m["restart_before"], ""),
                row("python -c 'import nvdriver.cli', before", None, m["import_before"], ""),
            ]
            if m["init_before"] is not None
            else []
        ),
        row("load again, driver loaded", None, m["reload"], ""),
        row("status", None, m["status"], ""),
        row("python -c pass (the interpreter's start)", None, python, ""),
        row("python -c 'import nvdriver.cli'", None, m["import"], ""),
    ]
    if "kept_scan" in facts:
        lines.append(f"every host module read into the kept scan first: {facts['kept_scan']} s")
    if logs is not None:
        lines += before_first_line(facts, logs, rounds)
    if python is not None and m["restart"] is not None:
        lines.append(
            f"restart-to-ready beyond the interpreter's start: {m['restart'] - python:.2f} s"
        )
    if python is not None and m["restart_before"] is not None:
        lines.append(
            f"restart-to-ready beyond the interpreter's start, before: "
            f"{m['restart_before'] - python:.2f} s"
        )
    lines.append(
        "exit codes: init ready/stop "
        + f"{codes(facts, 'init_ready_rc', rounds)}/{codes(facts, 'init_stop_rc', rounds)}, "
        + f"restart ready/stop {codes(facts, 'restart_ready_rc', rounds)}/"
        + f"{codes(facts, 'restart_stop_rc', rounds)} (3: kept, in use), "
        + f"load again {codes(facts, 'reload_rc', rounds)}, "
        + f"status {codes(facts, 'status_rc', rounds)}"
        + (f", real load {codes(facts, 'real_load_rc', rounds)} (7: no GPU)" if real else "")
        + f"; relinks on restart: {facts.get('relinked', '?')}"
    )
    if m["init_before"] is not None:
        lines.append(
            "exit codes, before: init ready/stop "
            + f"{codes(facts, 'init_before_ready_rc', rounds)}/"
            + f"{codes(facts, 'init_before_stop_rc', rounds)}, restart ready/stop "
            + f"{codes(facts, 'restart_before_ready_rc', rounds)}/"
            + f"{codes(facts, 'restart_before_stop_rc', rounds)}"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.lifecycle", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kernel", help="kernel release to boot (default: newest 6.12, else 6.1)")
    parser.add_argument("--no-real", action="store_true", help="skip the real 535 package")
    parser.add_argument(
        "--kept-scan",
        action="store_true",
        help="first (untimed) read every host module into the node's cache, as a node has "
        "after its first starts on a kernel",
    )
    parser.add_argument("--json", type=Path, help="also write the raw facts here")
    parser.add_argument(
        "--before",
        metavar="REV",
        help="also time init's start and restart with the program of this git revision, "
        "in the same guest, interleaved (before and after on one machine); with "
        "--native-only, its first link",
    )
    parser.add_argument(
        "--native-only", action="store_true", help="only the real package's native link rows"
    )
    args = parser.parse_args(argv)
    kernel = args.kernel or preferred_kernel()
    if kernel is None:
        print("bench: no kernel pair (image, modules, headers) of 6.12 or 6.1", file=sys.stderr)
        return 1
    # Each program's bytecode compiled here, as an image compiles it when it installs the
    # package: the guest reads the checkout read-only, so stale bytecode would be compiled
    # again at every start there, and timed with it.
    src = Path(__file__).resolve().parents[1] / "src"
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(src)], check=True)
    if args.native_only:
        # The committed real image's package for the kernel when the test bed made one
        # (as bench/verified_once.py takes it), else a build on this machine (minutes).
        source = unpack_debian_source("proprietary")
        committed = committed_packages("real", kernel)
        if committed:
            package = committed[-1]
        else:
            package = build_real_535(kernel, build_mirror(kernel), source, CACHE).package
        earlier = None
        if args.before:
            earlier = checkout(args.before, Path(tempfile.mkdtemp(prefix="bench-before-")))
            subprocess.run([sys.executable, "-m", "compileall", "-q", str(earlier)], check=True)
        print("\n".join(native_link_rows(package, source, args.rounds, earlier)))
        return 0
    work = Path(tempfile.mkdtemp(prefix="nvidia-driver-bench-"))
    print(f"bench: kernel {kernel}; work in {work}", flush=True)
    kernel_build = Path("/lib/modules") / kernel / "build"

    print("bench: building the stand-in package and the holder module on the host", flush=True)
    source = make_standin_source(work / "src", version=VERSION)
    env = {**standin_env(work, source, VERSION), "KERNEL_MODULE_TYPE": "proprietary"}
    update_package(env, kernel_build)
    (package,) = (work / "precompiled").rglob("*.tar.gz")
    holder_src = make_standin_source(work / "holder-src", version=VERSION, flavours=("kernel",))
    build_standin(holder_src / "kernel", kernel_build)
    holder = build_holder(work / "holder", kernel_build, holder_src / "kernel" / "Module.symvers")
    (work / "bin").mkdir()
    (work / "bin" / "nvidia-persistenced").write_text(PERSISTENCED)
    (work / "bin" / "nvidia-persistenced").chmod(0o755)
    (work / "params").mkdir()

    native: list[str] = []
    real_floor, subst = "", {"real": "no", "real_source": "", "real_store": "", "real_cache": ""}
    subst["real_version"] = ""
    if not args.no_real:
        print(
            "bench: the real 535 package (built once per kernel and product: minutes)", flush=True
        )
        built = build_real_535(
            kernel, build_mirror(kernel), unpack_debian_source("proprietary"), CACHE
        )
        real_source = DriverSource.from_config(
            Config.from_env({"NVIDIA_DRIVER_SOURCE": str(built.source)})
        )
        real_floor = floor_script(built.package, built.source, stop_at_nvidia=True)
        native = native_link_rows(built.package, built.source, args.rounds)
        subst = {
            "real": "yes",
            "real_source": shlex.quote(str(built.source)),
            "real_store": shlex.quote(str(built.precompiled)),
            "real_cache": shlex.quote(str(built.cache)),
            "real_version": shlex.quote(real_source.version),
        }
    before = ""
    if args.before:
        (work / "before").mkdir()
        before_src = checkout(args.before, work / "before")
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(before_src)], check=True)
        before = str(before_src)
    logs = work / "logs"
    logs.mkdir()
    script = logs / "bench.sh"
    kept = "yes" if args.kept_scan else "no"
    body = GUEST.format(lib=LIB, floor_dir=FLOOR_DIR, rounds=args.rounds, kept=kept, **subst)
    standin_floor = floor_script(package, source, stop_at_nvidia=False)
    script.write_text(_functions(standin_floor, real_floor) + body)
    guest_env = {
        "PY": sys.executable,
        "LOGS": str(logs),
        "HOLDER": str(holder),
        "DRIVER_VERSION": VERSION,
        "NVIDIA_DRIVER_SOURCE": str(source),
        "PRECOMPILED_DIR": str(work / "precompiled"),
        "NVIDIA_DRIVER_CACHE": str(work / "cache"),
        "NVIDIA_MODULE_PARAMS_DIR": str(work / "params"),
        "KERNEL_MODULE_TYPE": "proprietary",
        "PATH": f"{work / 'bin'}:/usr/sbin:/usr/bin:/sbin:/bin",
        "KEEP_SCAN": KEEP_SCAN,
        "BEFORE": before,
    }
    print(f"bench: booting {kernel} in a guest (QEMU)", flush=True)
    with following(logs / "progress.log", lambda line: print(f"guest | {line}", flush=True)):
        result = run_in_guest(
            ["bash", str(script)],
            kernel=kernel,
            env=guest_env,
            shares={str(work): work},
            timeout=3000,
        )
    facts = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    if args.json:
        args.json.write_text(json.dumps(facts, indent=2) + "\n")
    print(f"bench: guest exit {result.returncode}; logs in {logs}")
    for line in [*table(facts, args.rounds, not args.no_real, logs), *native]:
        print(line)
    return 0 if result.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
