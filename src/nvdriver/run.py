"""The one way to run a program.

No shell, the command line logged, stderr captured (its tail goes into the
error), a timeout, one typed error. One place starts a process (`_start`): `spawn`,
a context manager that terminates the child on every exit path, and `run`, built on
it, which waits for the child's end.

Every child gets a minimal environment (config.child_environment: PATH and LC_ALL=C,
plus what the caller names for that one program) and /dev/null as stdin unless the
caller feeds it: nothing of ours (settings, registry credentials) reaches a tool by
accident, and no child waits on a terminal. LC_ALL=C: what we parse or match in a
tool's output ("No such device", `ld --version`) must not depend on the container's
language. The programs a start or a shutdown waits for (modprobe, rmmod, depmod, ld)
have a timeout by default (TIMEOUTS; NVIDIA_DRIVER_TIMEOUTS changes them): a hung
rmmod must end in an error, not in a shutdown that never ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from nvdriver.config import TIMEOUTS, child_environment
from nvdriver.errors import DriverError

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

STDERR_TAIL_LINES = 20

__all__ = ["TIMEOUTS", "RunError", "default_timeout", "run", "set_timeouts", "spawn", "which"]

# How long a killed child gets to go; one stuck in the kernel (D state) is left behind.
KILL_GRACE = 5.0
_timeouts = dict(TIMEOUTS)


def set_timeouts(overrides: Mapping[str, float]) -> None:
    """Change the default timeouts of programs of TIMEOUTS (from NVIDIA_DRIVER_TIMEOUTS)."""
    unknown = set(overrides) - set(TIMEOUTS)
    if unknown:
        raise ValueError(f"no default timeout for {', '.join(sorted(unknown))}")
    _timeouts.update(TIMEOUTS)
    _timeouts.update(overrides)


def default_timeout(argv: Sequence[str]) -> float | None:
    """The timeout of the first word of `argv` that is a program of TIMEOUTS.

    The first word may be a wrapper (`chroot ROOT ld`, the loader of the linker a package carries).
    """
    for word in argv:
        limit = _timeouts.get(os.path.basename(word))
        if limit is not None:
            return limit
    return None


class RunError(DriverError):
    """A program exited non-zero (or could not be started, or timed out)."""

    def __init__(
        self,
        cmd: Sequence[PathLike],
        returncode: int | None,
        stderr: str,
        *,
        hint: str | None = None,
    ) -> None:
        self.cmd = [os.fspath(c) for c in cmd]
        self.returncode = returncode
        self.stderr = stderr
        tail = "\n".join(stderr.rstrip().splitlines()[-STDERR_TAIL_LINES:])
        status = "timed out" if returncode is None else f"exited with status {returncode}"
        message = f"{shlex.join(self.cmd)} {status}"
        if tail:
            message += f":\n{tail}"
        super().__init__(message, hint=hint)


def _text(data: bytes | None) -> str:
    return (data or b"").decode(errors="replace")


def run(
    cmd: Sequence[PathLike],
    *,
    check: bool = True,
    capture: bool = True,
    cwd: PathLike | None = None,
    env: Mapping[str, str] | None = None,
    input: str | None = None,
    stdout: int | IO[Any] | None = None,
    timeout: float | None = None,
    hint: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `cmd`, return its result; raise RunError if it fails and `check` is set.

    With `capture` (the default) stdout and stderr are returned as text; without
    it stdout goes to `stdout` (or ours) and stderr is still captured for the
    error message. `input` is written to its stdin (else /dev/null); `env` adds to the
    minimal environment. After `timeout` (default: `default_timeout`) the child is killed
    and logged; then RunError, or without `check` a result with a negative status.
    """
    argv = [os.fspath(c) for c in cmd]
    limit = timeout if timeout is not None else default_timeout(argv)
    with spawn(
        argv,
        cwd=cwd,
        env=env,
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE if capture else stdout,
        stderr=subprocess.PIPE,
        terminate_timeout=0.0,  # a signal (Interrupted) or ^C: the child does not outlive us
        hint=hint,
    ) as proc:
        try:
            raw_out, raw_err = proc.communicate(
                None if input is None else input.encode(), timeout=limit
            )
        except subprocess.TimeoutExpired:
            log.error("%s did not finish within %.0f s; killing it", shlex.join(argv), limit)
            killed_out, killed_err = (_text(b) for b in _kill(proc))
            if check:
                raise RunError(argv, None, killed_err, hint=hint) from None
            return subprocess.CompletedProcess(
                argv,
                proc.returncode or -signal.SIGKILL,
                killed_out,
                f"{killed_err}\ntimed out after {limit:.0f} s",
            )
    out, err = _text(raw_out) if capture else None, _text(raw_err)
    if check and proc.returncode != 0:
        raise RunError(argv, proc.returncode, err, hint=hint)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def _kill(proc: subprocess.Popen[bytes]) -> tuple[bytes, bytes]:
    """SIGKILL the child and collect its output; one that does not die is left behind
    (a process in uninterruptible sleep would otherwise hang us as well)."""
    proc.kill()
    try:
        out, err = proc.communicate(timeout=KILL_GRACE)
    except subprocess.TimeoutExpired:
        log.error("%s (pid %d) did not exit after SIGKILL; leaving it", proc.args, proc.pid)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        return b"", b""
    return out or b"", err or b""


@contextlib.contextmanager
def spawn(
    cmd: Sequence[PathLike],
    *,
    cwd: PathLike | None = None,
    env: Mapping[str, str] | None = None,
    stdin: int | IO[Any] | None = subprocess.DEVNULL,
    stdout: int | IO[Any] | None = None,
    stderr: int | IO[Any] | None = None,
    terminate_timeout: float = 5.0,
    process_group: bool = False,
    hint: str | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """Start a child for the duration of a `with` block; terminate it on the way out.

    The child's environment is the minimal one (config.child_environment) plus `env`;
    its stdin /dev/null unless `stdin` is given. With `process_group` the child leads a
    group of its own and the whole group (make and its compilers) is terminated.
    """
    argv = [os.fspath(c) for c in cmd]
    log.debug("+ %s", shlex.join(argv))
    try:
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=child_environment(env),
            stdin=subprocess.DEVNULL if stdin is None else stdin,
            stdout=stdout,
            stderr=stderr,
            start_new_session=process_group,
        )
    except FileNotFoundError as e:
        raise RunError(argv, 127, f"{argv[0]}: command not found", hint=hint) from e
    try:
        yield proc
    finally:
        _stop(proc, terminate_timeout, process_group)


def _stop(proc: subprocess.Popen[bytes], timeout: float, group: bool) -> None:
    def send(sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)

    if proc.poll() is None or group:
        send(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            send(signal.SIGKILL)
            try:
                proc.wait(timeout=KILL_GRACE)
            except subprocess.TimeoutExpired:
                log.error("%s (pid %d) did not exit after SIGKILL; leaving it", proc.args, proc.pid)


def which(program: str) -> Path | None:
    """Find `program` on the PATH our children get."""
    for d in child_environment()["PATH"].split(os.pathsep):
        candidate = Path(d) / program
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None
