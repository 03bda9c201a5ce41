"""What the start path's imports cost, against the interpreter's own start (issue 22).

Every `nvidia-driver` command starts a fresh interpreter; what it imports before doing
anything is paid at every start, restart and `status`. The baseline is `python -c pass`
(the interpreter alone, its site-packages included); each row is a child interpreter
that imports what a command imports, timed from outside, median of `--rounds`:

- `init, up to its first step`: `nvidia-driver init`, the container's command line, up to
  the call of `lifecycle.init` (its imports, the command line, the configuration);
- `status --help`: the installed command up to argparse's help;
- `import nvdriver.lifecycle`: what `init` and `load` import before their first step
  (cli.py imports it once the command line is parsed);
- `import nvdriver.status`: what `status` imports.

With `--before REV` (a git revision of this repository, e.g. `main`), each row is timed
for that revision's `src` too (extracted into a temporary directory), in the same run,
interleaved: before and after on one machine. Each source is imported once before the
timing with bytecode writing on (an image compiles its bytecode when it installs the
package): what is timed is the import, not the compiler.
The last column is the child's own `-X importtime` total of the row's nvdriver modules
(the sum of the top-level nvdriver imports' cumulative times), median of as many runs.

    .venv/bin/python -m bench.imports [--rounds N] [--before REV]
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

TOOL = Path(sys.executable).parent / "nvidia-driver"
REPO = Path(__file__).resolve().parents[1]
PY = sys.executable

BASELINE = [PY, "-c", "pass"]
# `nvidia-driver init` (the command line the container gives) up to the call of init's
# first step, which ends it: its imports, the command line, the configuration, the log.
UP_TO_INIT = (
    "import sys, nvdriver.lifecycle\n"
    "nvdriver.lifecycle.init = lambda config: sys.exit(0)\n"
    "from nvdriver.cli import main\n"
    "sys.argv = ['nvidia-driver', 'init']\n"
    "main()\n"
)
ROWS = {
    "nvidia-driver init, up to its first step": [PY, "-c", UP_TO_INIT],
    "nvidia-driver status --help": [PY, str(TOOL), "status", "--help"],
    "import nvdriver.lifecycle (init, load)": [PY, "-c", "import nvdriver.lifecycle"],
    "import nvdriver.status (status)": [PY, "-c", "import nvdriver.status"],
}


def environment(source: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if source is not None:
        env["PYTHONPATH"] = str(source)
    return env


def wall(argv: list[str], env: dict[str, str]) -> float:
    started = time.monotonic()
    subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, check=True)
    return time.monotonic() - started


def importtime_ms(argv: list[str], env: dict[str, str]) -> float:
    """The cumulative import time of the top-level nvdriver modules, by `-X importtime`."""
    result = subprocess.run(
        [argv[0], "-X", "importtime", *argv[1:]],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        check=True,
    )
    total = 0
    for line in result.stderr.splitlines():
        fields = line.split("|")
        # A top-level import has one space before its name; what it pulled in, more.
        if len(fields) == 3 and fields[2].startswith(" nvdriver"):
            total += int(fields[1])
    return total / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--before", metavar="REV", help="a git revision to compare with")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-imports-") as tmp:
        sources: dict[str, Path | None] = {"": None}
        if args.before is not None:
            sources = {"before": checkout(args.before, Path(tmp)), "after": None}
        measure(sources, args.rounds)


def checkout(rev: str, work: Path) -> Path:
    """The `src` of revision `rev` of this repository, extracted under `work`."""
    archive = subprocess.run(
        ["git", "archive", rev, "src"], cwd=REPO, capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", work], input=archive, check=True)
    return work / "src"


def measure(sources: dict[str, Path | None], rounds: int) -> None:
    for argv in ROWS.values():  # bytecode written, and the page cache warm
        for source in sources.values():
            wall(argv, environment(source))
    baseline: list[float] = []
    times: dict[tuple[str, str], list[float]] = {}
    imports: dict[tuple[str, str], list[float]] = {}
    for _ in range(rounds):
        baseline.append(wall(BASELINE, environment(None)))
        for row, argv in ROWS.items():
            for label, source in sources.items():
                times.setdefault((row, label), []).append(wall(argv, environment(source)))
                imports.setdefault((row, label), []).append(
                    importtime_ms(argv, environment(source))
                )
    base = statistics.median(baseline)
    print(f"{'':48} {'':6} {'median':>9} {'x pass':>7} {'beyond':>9} {'-X importtime':>14}")
    print(f"{'python -c pass (the baseline)':48} {'':6} {base * 1000:7.1f}ms")
    for row in ROWS:
        for label in sources:
            median = statistics.median(times[row, label])
            imported = statistics.median(imports[row, label])
            print(
                f"{row:48} {label:6} {median * 1000:7.1f}ms {median / base:6.2f}x "
                f"{(median - base) * 1000:7.1f}ms {imported:12.1f}ms"
            )
    print(f"rounds: {rounds}; machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
