"""Scenarios on a real kernel with the stand-in driver: its packages (built on the host),
a script run in a guest with lifecycle.sh sourced, the KEY=VALUE facts it reports.

The stand-in nvidia-persistenced daemonizes, writes its pid file and holds
/dev/nvidiactl open (a reference on nvidia.ko), as the real one does.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tests.conftest import TOOL

from .guest import GuestResult

if TYPE_CHECKING:  # conftest (the fixtures) imports this module
    from .conftest import Guest

VERSION = "535.999.01"
LIB = Path(__file__).with_name("lifecycle.sh")

PERSISTENCED = r"""#!/bin/bash
# Stand-in nvidia-persistenced: daemonizes, holds /dev/nvidiactl open, writes its pid file.
dir=/var/run/nvidia-persistenced
mkdir -p "$dir"
echo "$*" >"$dir/args"
[ -e /dev/nvidiactl ] || mknod /dev/nvidiactl c 195 255
setsid bash -c '
  exec 3</dev/nvidiactl
  trap "rm -f '"$dir"'/nvidia-persistenced.pid; exit 0" TERM
  echo $$ >'"$dir"'/nvidia-persistenced.pid
  while :; do sleep 1 3<&- & wait $!; done
' </dev/null >/dev/null 2>&1 &
"""


@dataclasses.dataclass(frozen=True)
class Driver:
    """Packages of a driver for the guest's kernel, and what the guest needs to use them."""

    work: Path  # shared with the guest (same path)
    env: dict[str, str]  # the CLI's environment in the guest
    shares: dict[str, Path]


def update_package(env: dict[str, str], kernel_build: Path) -> None:
    unset = ("HOST_ROOT", "KERNEL_MODULE_TYPE", "DRIVER_VERSION")
    full = {k: v for k, v in os.environ.items() if k not in unset}
    result = subprocess.run(
        [str(TOOL), "update", "--kernel-source", str(kernel_build)],
        env={**full, **env},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def guest_env(work: Path, source: Path, precompiled: Path, version: str) -> dict[str, str]:
    return {
        "PY": sys.executable,
        "DRIVER_VERSION": version,
        "NVIDIA_DRIVER_SOURCE": str(source),
        "PRECOMPILED_DIR": str(precompiled),
        "NVIDIA_MODULE_PARAMS_DIR": str(work / "params"),
        "PATH": f"{work / 'bin'}:/usr/sbin:/usr/bin:/sbin:/bin",
    }


def scenario(
    guest: Guest,
    driver: Driver,
    logs: Path,
    body: str,
    *,
    timeout: float = 500,
) -> tuple[dict[str, str], str]:
    """Run `body` (bash, with lifecycle.sh sourced) in a guest; its KEY=VALUE facts and a
    description of the run for failure messages."""
    script = logs / "scenario.sh"
    script.write_text(f"set -u\nsource {LIB}\n{body}\n")
    result = guest(
        ["bash", str(script)],
        env={**driver.env, "LOGS": str(logs)},
        shares={**driver.shares, str(logs): logs},
        timeout=timeout,
    )
    return facts_of(result.stdout), explain_run(result, logs)


def facts_of(text: str) -> dict[str, str]:
    """The KEY=VALUE lines (`say`) of a scenario's output."""
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line[:40])


def explain_run(result: GuestResult, logs: Path) -> str:
    parts = [f"exit {result.returncode}", "--- stdout ---", result.stdout]
    parts += ["--- stderr (tail) ---", result.stderr[-4000:]]
    for log in sorted(logs.glob("*.log")):
        parts += [f"--- {log.name} ---", log.read_text(errors="replace")[-4000:]]
    parts += ["--- console (tail) ---", result.console[-3000:]]
    return "\n".join(parts)


def expect(facts: dict[str, str], expected: dict[str, str], explain: str) -> None:
    got = {k: facts.get(k) for k in expected}
    assert got == expected, explain
