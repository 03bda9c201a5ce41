"""The one subprocess wrapper: a fixed locale, and timeouts that end hung programs.

The tools here are small shell scripts on PATH standing in for modprobe and rmmod
(loading modules needs a kernel and a GPU this machine does not give).
"""

from __future__ import annotations

import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from nvdriver import run as runmod
from nvdriver.run import RunError, run
from tests.conftest import run_tool

# Like a gettext-translated tool: the message's language follows LC_ALL, else
# LC_MESSAGES, else LANG; LANGUAGE wins unless the locale is C (GNU gettext's rule).
LOCALIZED_MODPROBE = r"""#!/bin/sh
locale=${LC_ALL:-${LC_MESSAGES:-$LANG}}
case "$locale" in
  ""|C|C.*|POSIX) lang=en ;;
  *) lang=${LANGUAGE:-$locale} ;;
esac
case "$lang" in
  de*) echo "modprobe: FEHLER: 'nvidia': Kein passendes Gerät gefunden" >&2 ;;
  *) echo "modprobe: ERROR: could not insert 'nvidia': No such device" >&2 ;;
esac
exit 1
"""

# An rmmod stuck like one waiting on a module that never lets go; it ignores SIGTERM.
HANGING_RMMOD = """#!/bin/sh
trap '' TERM
echo "rmmod: started" >&2
while :; do sleep 1; done
"""


def tool(bin_dir: Path, name: str, script: str) -> Path:
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text(script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def german(monkeypatch, tmp_path):
    """A container whose language is German, with the stand-in tools first on PATH."""
    bin_dir = tmp_path / "bin"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("LANG", "de_DE.UTF-8")
    monkeypatch.setenv("LANGUAGE", "de")
    monkeypatch.setenv("LC_MESSAGES", "de_DE.UTF-8")
    monkeypatch.delenv("LC_ALL", raising=False)
    return bin_dir


def test_a_parsed_tool_answers_in_the_c_locale_whatever_the_containers_language(german):
    tool(german, "modprobe", LOCALIZED_MODPROBE)
    with pytest.raises(RunError) as e:
        run(["modprobe", "nvidia"])
    assert "No such device" in e.value.stderr
    assert "Kein passendes" not in e.value.stderr


def test_a_caller_can_still_choose_a_locale(german):
    tool(german, "modprobe", LOCALIZED_MODPROBE)
    result = run(["modprobe", "nvidia"], check=False, env={"LC_ALL": "de_DE.UTF-8"})
    assert "Kein passendes Gerät" in result.stderr


def test_modprobe_rmmod_depmod_and_ld_have_default_timeouts_through_wrappers():
    assert {p: runmod.default_timeout([p, "x"]) for p in ("modprobe", "rmmod", "depmod", "ld")} == (
        runmod.TIMEOUTS
    )
    assert runmod.default_timeout(["/usr/sbin/rmmod", "nvidia"]) == runmod.TIMEOUTS["rmmod"]
    assert runmod.default_timeout(["chroot", "/root", "ld", "--version"]) == runmod.TIMEOUTS["ld"]
    packed = ["/s/linker/lib/ld-linux.so.2", "--library-path", "/s/linker/lib", "/s/linker/ld"]
    assert runmod.default_timeout(packed) == runmod.TIMEOUTS["ld"]
    assert runmod.default_timeout(["make", "-C", "tree"]) is None


def test_a_hung_rmmod_is_killed_after_its_timeout(german, monkeypatch):
    tool(german, "rmmod", HANGING_RMMOD)
    monkeypatch.setattr(runmod, "_timeouts", {**runmod.TIMEOUTS, "rmmod": 1.0})
    start = time.monotonic()
    with pytest.raises(RunError, match="timed out") as e:
        run(["rmmod", "nvidia"])
    assert time.monotonic() - start < 1.0 + runmod.KILL_GRACE
    assert e.value.returncode is None and "rmmod: started" in e.value.stderr
    start = time.monotonic()
    result = run(["rmmod", "nvidia"], check=False)  # undoing a failed load never raises
    assert result.returncode < 0 and "timed out after 1 s" in result.stderr
    assert time.monotonic() - start < 1.0 + runmod.KILL_GRACE


def loaded_nvidia_host(host: Path) -> Path:
    """A HOST_ROOT where sysfs shows nvidia loaded and unused."""
    module = host / "sys" / "module" / "nvidia"
    (module / "holders").mkdir(parents=True)
    (module / "refcnt").write_text("0\n")
    (host / "proc").mkdir()
    (host / "proc" / "version").write_text("Linux version 6.1.0-99-amd64 (x@y)\n")
    return host


def test_unload_with_a_hung_rmmod_ends_with_exit_1_and_says_so(german, tmp_path):
    tool(german, "rmmod", HANGING_RMMOD)
    env = {
        "PATH": os.environ["PATH"],
        "HOST_ROOT": str(loaded_nvidia_host(tmp_path / "host")),
        "NVIDIA_DRIVER_TIMEOUTS": "rmmod=1",
    }
    start = time.monotonic()
    result = run_tool("unload", env=env)
    assert time.monotonic() - start < 30
    assert result.returncode == 1, result.stderr
    assert "rmmod nvidia timed out" in result.stderr
    assert "did not finish within 1 s" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("value", ["rmmod", "rmmod=0", "rmmod=soon", "insmod=5", "ld=inf"])
def test_malformed_timeouts_are_a_usage_error_naming_the_variable(value):
    result = run_tool("status", env={"NVIDIA_DRIVER_TIMEOUTS": value})
    assert result.returncode == 2
    assert f"NVIDIA_DRIVER_TIMEOUTS={value!r} is malformed" in result.stderr


def test_a_child_gets_the_minimal_environment_and_no_secret(monkeypatch):
    monkeypatch.setenv("PRECOMPILED_REGISTRY_PASSWORD", "s3cret")
    monkeypatch.setenv("LANG", "de_DE.UTF-8")
    monkeypatch.setenv("PATH", f"/somewhere:{os.environ['PATH']}")
    minimal = ["LC_ALL=C", f"PATH={os.environ['PATH']}"]
    assert sorted(run(["env"]).stdout.splitlines()) == minimal
    with runmod.spawn(["env"], stdout=subprocess.PIPE) as proc:
        assert sorted(proc.communicate()[0].decode().splitlines()) == minimal
    # What one program needs, its caller names.
    named = run(["env"], env={"GNUPGHOME": "/g"}).stdout.splitlines()
    assert sorted(named) == ["GNUPGHOME=/g", *minimal]


def test_a_child_reads_dev_null_unless_fed(tmp_path):
    """Not our stdin (a terminal, a pipe a supervisor holds): a tool that asks reads EOF."""
    read_end, write_end = os.pipe()
    saved = os.dup(0)
    os.dup2(read_end, 0)
    try:
        assert run(["readlink", "/proc/self/fd/0"]).stdout.strip() == "/dev/null"
        assert run(["cat"], input="fed\n").stdout == "fed\n"
        with runmod.spawn(["readlink", "/proc/self/fd/0"], stdout=subprocess.PIPE) as proc:
            assert proc.communicate()[0].strip() == b"/dev/null"
    finally:
        os.dup2(saved, 0)
        for fd in (saved, read_end, write_end):
            os.close(fd)
