"""The whole job, on this machine, in a few minutes (after `tools/setup`).

1. On the host: `nvidia-driver update --kernel K` builds the stand-in NVIDIA driver
   (tests/standin) in Flatcar's developer container, fetched and verified from a
   local Flatcar mirror (tests/flatcar_mirror.py) served on 127.0.0.1, and packs it.
   K is the newest installed kernel of the 6.12 series, else of 6.1 (discovered).
2. In a QEMU guest booted with that real kernel K (tests/vm/guest.py): `nvidia-driver
   init` finds the package, links and loads the driver, binds the driver root at
   /run/nvidia/driver, starts (a stand-in) nvidia-persistenced and writes the
   readiness file; `nvidia-driver status` shows it; a SIGTERM unloads it all.

Progress lines come as it works (the guest's and init's own as they are written);
the last lines say what was proven, each with its evidence. Exit 0 when all was.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.conftest import TOOL, standin_env
from tests.flatcar_mirror import MirrorUnavailable, build_mirror, serve_mirror
from tests.kernels import preferred_kernel
from tests.standin.tree import make_standin_source
from tests.vm.follow import following
from tests.vm.guest import GuestError, missing_requirements, run_in_guest
from tests.vm.scenario import LIB, PERSISTENCED

VERSION = "535.999.01"

GUEST = r"""
set -u
source {lib}
progress() {{ echo "$*" >>$LOGS/progress.log; }}
progress "booted kernel $(uname -r); starting nvidia-driver init"
say kernel "$(uname -r)"
start_init $LOGS/init.log
wait_ready 300; say ready_rc $?
say modules "$(nvidia_modules)"
say mount "$(findmnt -n -o TARGET,SOURCE,FSTYPE /run/nvidia/driver | head -n 1)"
say readiness "$(paste -sd, $READY)"
say persistenced "$(persistenced_running)"
progress "ready; running nvidia-driver status"
nv status >$LOGS/status.txt 2>&1; say status_rc $?
sed 's/^/status | /' $LOGS/status.txt >>$LOGS/progress.log
progress "sending SIGTERM to init (pid $INIT_PID)"
stop_init TERM; say init_rc $INIT_RC
state after
say after_proc "$(grep -c '^nvidia' /proc/modules)"
progress "init exited $INIT_RC"
"""


def step(text: str) -> None:
    print(f"demo: {text}", flush=True)


def stream(argv: list[str], env: Mapping[str, str], prefix: str) -> tuple[int, str]:
    """Run `argv`, printing its stderr (its log) as it comes; its exit status and stdout."""
    with subprocess.Popen(
        argv, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        assert proc.stderr is not None and proc.stdout is not None
        for line in proc.stderr:
            print(f"{prefix}{line.rstrip()}", flush=True)
        out = proc.stdout.read()
    return proc.returncode, out


def proofs(
    facts: dict[str, str], kernel: str, package: Path, logs: Path
) -> Iterator[tuple[bool, str]]:
    """(proven, claim with its evidence) for each thing the demo set out to show."""
    init_log = (
        (logs / "init.log").read_text(errors="replace") if (logs / "init.log").exists() else ""
    )
    status = (
        (logs / "status.txt").read_text(errors="replace") if (logs / "status.txt").exists() else ""
    )
    yield (
        facts.get("kernel") == kernel,
        f"the guest ran the real kernel {kernel}: uname -r = {facts.get('kernel')}",
    )
    used = f"Using the precompiled package {package}" in init_log
    linked = "Linked and installed" in init_log
    yield (
        used and linked,
        (
            f"init took the package built on the host ({package.name}) and linked it on the node: "
            f"init's log {'says so' if used and linked else 'does not say so'}"
        ),
    )
    modules = facts.get("modules", "")
    yield (
        modules.startswith("nvidia,") and "nvidia_uvm" in modules,
        f"the driver is loaded: /proc/modules has {modules or 'no NVIDIA module'}",
    )
    yield (
        facts.get("mount", "").startswith("/run/nvidia/driver"),
        f"the driver root is exposed: findmnt: {facts.get('mount') or 'not mounted'}",
    )
    yield (
        facts.get("ready_rc") == "0" and bool(facts.get("readiness")),
        (
            "readiness written: /run/nvidia/validations/.driver-ctr-ready = "
            + (facts.get("readiness") or "absent")
        ),
    )
    yield (
        facts.get("persistenced") == "yes",
        f"nvidia-persistenced (stand-in) runs: {facts.get('persistenced')}",
    )
    shown = next((line.strip() for line in status.splitlines() if line.startswith("modules:")), "")
    yield (
        facts.get("status_rc") == "0" and "nvidia" in shown,
        f'status shows it: exit {facts.get("status_rc")}, "{shown}"',
    )
    after = {k: facts.get(f"after_{k}") for k in ("modules", "mounted", "ready", "daemons", "lock")}
    clean = after == {"modules": "", "mounted": "no", "ready": "no", "daemons": "0", "lock": "no"}
    yield (
        facts.get("init_rc") == "0" and clean and facts.get("after_proc") == "0",
        (
            f"SIGTERM unloaded it all: init exit {facts.get('init_rc')}; after: NVIDIA modules "
            f"{after['modules'] or 'none'}, root mounted {after['mounted']}, "
            f"readiness {after['ready']}, daemons {after['daemons']}, lock {after['lock']}"
        ),
    )


def main() -> int:
    missing = missing_requirements()
    kernel = preferred_kernel()
    if missing or kernel is None:
        step(
            "cannot boot a guest here: "
            + "; ".join(missing or ["no 6.12 or 6.1 kernel with headers"])
        )
        step("run tools/setup (as root) first")
        return 1
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nvidia-driver-demo-")))
        step(f"kernel {kernel} (the newest installed of the series Flatcar stable runs, else 6.1)")
        step(f"the local Flatcar mirror with {kernel}'s developer container (built once, cached)")
        try:
            mirror = build_mirror(kernel)
        except MirrorUnavailable as e:
            step(f"cannot build the local Flatcar mirror: {e}")
            return 1
        source = make_standin_source(work / "src", version=VERSION)
        env = {**standin_env(work, source, VERSION), "HOST_ROOT": str(work / "host")}
        server = stack.enter_context(serve_mirror(mirror))
        step(f"serving it on {server.url}; on the host: nvidia-driver update --kernel {kernel}")
        argv = [str(TOOL), "update", "--kernel", kernel]
        inherited = {
            k: v for k, v in os.environ.items() if k not in ("DRIVER_VERSION", "HOST_ROOT")
        }
        rc, out = stream(argv, {**inherited, **env, **server.env()}, "update | ")
        if rc != 0:
            step(f"update exited {rc}")
            return 1
        package = Path(out.strip())
        step(f"update exited 0: package {package}")
        images = list((work / "cache" / "flatcar").rglob("*.bin"))
        for image in images:
            image.unlink()
        step(
            f"removed the developer container ({len(images)} image): loading needs only the package"
        )

        (work / "bin").mkdir()
        (work / "bin" / "nvidia-persistenced").write_text(PERSISTENCED)
        (work / "bin" / "nvidia-persistenced").chmod(0o755)
        (work / "params").mkdir()
        logs = work / "logs"
        logs.mkdir()
        (logs / "demo.sh").write_text(GUEST.format(lib=shlex.quote(str(LIB))))
        guest_env = {
            "PY": sys.executable,
            "LOGS": str(logs),
            "DRIVER_VERSION": VERSION,
            "NVIDIA_DRIVER_SOURCE": str(source),
            "PRECOMPILED_DIR": env["PRECOMPILED_DIR"],
            "NVIDIA_DRIVER_CACHE": env["NVIDIA_DRIVER_CACHE"],
            "NVIDIA_MODULE_PARAMS_DIR": str(work / "params"),
            "PATH": f"{work / 'bin'}:/usr/sbin:/usr/bin:/sbin:/bin",
        }
        step(f"booting {kernel} in a QEMU guest (the host's / read-only, {work} shared)")
        try:
            with (
                following(logs / "progress.log", lambda s: print(f"guest  | {s}", flush=True)),
                following(logs / "init.log", lambda s: print(f"init   | {s}", flush=True)),
            ):
                result = run_in_guest(
                    ["bash", str(logs / "demo.sh")],
                    kernel=kernel,
                    env=guest_env,
                    shares={str(work): work},
                    timeout=900,
                )
        except GuestError as e:
            step(f"the guest failed: {e}")
            return 1
        facts = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
        print(flush=True)
        step("what this run proved")
        results = list(proofs(facts, kernel, package, logs))
        for ok, claim in results:
            print(f"  [{'ok' if ok else 'NOT SHOWN'}] {claim}", flush=True)
        if result.returncode != 0 or not all(ok for ok, _ in results):
            step(f"guest script exit {result.returncode}; stderr tail:\n{result.stderr[-2000:]}")
            return 1
        step("all shown; the work directory is removed")
        return 0


if __name__ == "__main__":
    sys.exit(main())
