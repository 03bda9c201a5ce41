"""A start (`load`) and a second `update` while an `update` is in the middle of its build.

Three real `nvidia-driver` processes. The first `update` builds the stand-in driver
(tests/standin) against the installed headers; the stand-in's Makefile is given a
gate (a FIFO): its `modules` rule stops there until the test writes to the FIFO, so
the build is paused at a known point from outside, with nothing in the product
that knows about tests. While it is paused, a `load` and a second `update` start.
Neither may touch what the paused build owns: its work directory under the cache
and the temporary package files of the store. Then the gate opens, and the first
build must finish with an intact package.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nvdriver.atomic import TEMP_PREFIX
from nvdriver.driver import package as pkg
from tests.conftest import TOOL, standin_env
from tests.standin.tree import make_standin_source

VERSION = "535.999.01"
WAITING = "Another build is running with the cache"
TIMEOUT = 300.0


def gated_standin(dest: Path, gate: Path, reached: Path) -> Path:
    """The stand-in source whose `modules` rule waits on the FIFO `gate` while it exists."""
    source = make_standin_source(dest, version=VERSION, flavours=("kernel",))
    makefile = source / "kernel" / "Makefile"
    rule = "  modules clean modules_install:\n"
    text = makefile.read_text()
    assert text.count(rule) == 1, "the stand-in's Makefile changed: adapt the gate"
    wait = (
        f'\t@if [ "$@" = modules ] && [ -p {gate} ]; then touch {reached}; '
        f"cat {gate} >/dev/null; fi\n"
    )
    makefile.write_text(text.replace(rule, rule + wait))
    return source


def wait_for(condition, what: str, procs: dict[str, subprocess.Popen[str]], logs: Path) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        dead = {n: p.returncode for n, p in procs.items() if p.poll() is not None}
        if dead or time.monotonic() > deadline:
            output = "\n".join(f"--- {f.name}\n{f.read_text()}" for f in sorted(logs.glob("*")))
            pytest.fail(f"waiting for {what}: exited {dead}\n{output}")
        time.sleep(0.1)


@pytest.fixture
def processes() -> Iterator[dict[str, subprocess.Popen[str]]]:
    procs: dict[str, subprocess.Popen[str]] = {}
    yield procs
    # SIGTERM first: the tool then stops its build's process group (make waits on the gate,
    # in a session of its own, and would outlive a SIGKILLed tool).
    for p in procs.values():
        if p.poll() is None:
            p.terminate()
    for p in procs.values():
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def test_a_load_and_a_second_update_leave_a_paused_build_alone(
    tmp_path, kernel_build, kernel_release, processes
):
    gate, reached = tmp_path / "gate", tmp_path / "reached"
    os.mkfifo(gate)
    source = gated_standin(tmp_path / f"nvidia-{VERSION}", gate, reached)
    host = tmp_path / "host"
    (host / "proc").mkdir(parents=True)
    (host / "proc" / "version").write_text(f"Linux version {os.uname().release} (test)\n")
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("DRIVER_VERSION", "HOST_ROOT")},
        **standin_env(tmp_path, source, VERSION),
        "HOST_ROOT": str(host),
        "KERNEL_MODULE_TYPE": "proprietary",
        # The `load` finds no package and would build in a developer container: let that
        # fail at once (no Flatcar here) instead of going to the network.
        "FLATCAR_RELEASES_FEED": str(tmp_path / "no-feed.json"),
    }
    logs = tmp_path / "logs"
    logs.mkdir()
    update = [str(TOOL), "update", "--kernel-source", str(kernel_build), "-m", "2"]

    def start(name: str, argv: list[str]) -> None:
        with (logs / name).open("w") as err:
            processes[name] = subprocess.Popen(
                argv, env=env, stdout=subprocess.PIPE, stderr=err, text=True
            )

    start("first", update)
    wait_for(reached.exists, "the first build to reach the gate", processes, logs)
    work = list((tmp_path / "cache" / "work").glob(f"build-{processes['first'].pid}-*"))
    assert len(work) == 1 and (work[0] / "kernel" / "Makefile").is_file()
    # The temp file the build holding the lock is writing (made here: the real one lives
    # for milliseconds; what matters is that nobody but the lock's holder removes it).
    store = tmp_path / "precompiled" / kernel_release
    store.mkdir(parents=True)
    writing = store / f"{TEMP_PREFIX}being-written"
    writing.write_bytes(b"half a package")

    start("load", [str(TOOL), "load"])
    start("second", update)
    for name in ("load", "second"):
        wait_for(
            lambda n=name: WAITING in (logs / n).read_text(), f"{name} to wait", processes, logs
        )
    assert (work[0] / "kernel" / "Makefile").is_file(), "the paused build's work dir was removed"
    assert writing.exists(), "the paused build's temp package was removed"
    assert "A build is running with the cache" in (logs / "load").read_text()

    with gate.open("w"):  # the paused `cat` reads it; closing gives it EOF
        gate.unlink()  # later builds pass the gate's rule without waiting
    out, _ = processes["first"].communicate(timeout=TIMEOUT)
    first_log = (logs / "first").read_text()
    assert processes["first"].returncode == 0, first_log
    package = Path(out.strip())
    assert package.parent == store
    manifest = pkg.verify(package)
    assert (manifest.kernel_release, manifest.driver_version) == (kernel_release, VERSION)

    out, _ = processes["second"].communicate(timeout=TIMEOUT)
    assert processes["second"].returncode == 0, (logs / "second").read_text()
    pkg.verify(Path(out.strip()))
    processes["load"].communicate(timeout=TIMEOUT)
    load_log = (logs / "load").read_text()
    # No package for this host's kernel and no Flatcar to build one in: a clear failure.
    assert processes["load"].returncode == 1, load_log
    assert "building one failed" in load_log and "Traceback" not in load_log
    # Only the holder of the lock removes leftovers: the second build, after the first.
    assert not writing.exists()
    assert list((tmp_path / "cache" / "work").iterdir()) == []
