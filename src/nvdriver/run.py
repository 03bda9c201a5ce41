"""The one way to run a program.

No shell, the command line logged, stderr captured (its tail goes into the
error), a timeout, one typed error. Long-lived children go through `spawn`,
a context manager that terminates the child on every exit path.
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

from nvdriver.errors import DriverError

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

STDERR_TAIL_LINES = 20


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


def _text(data: str | bytes | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


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
    error message. A timeout kills the child and raises RunError.
    """
    argv = [os.fspath(c) for c in cmd]
    log.debug("+ %s", shlex.join(argv))
    full_env = None if env is None else {**os.environ, **env}
    try:
        result = subprocess.run(
            argv,
            cwd=cwd,
            env=full_env,
            input=input,
            stdout=subprocess.PIPE if capture else stdout,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as e:
        raise RunError(argv, 127, f"{argv[0]}: command not found", hint=hint) from e
    except subprocess.TimeoutExpired as e:
        raise RunError(argv, None, _text(e.stderr), hint=hint) from e
    if check and result.returncode != 0:
        raise RunError(argv, result.returncode, result.stderr or "", hint=hint)
    return result


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
) -> Iterator[subprocess.Popen[bytes]]:
    """Start a child for the duration of a `with` block; terminate it on the way out.

    With `process_group` the child leads a group of its own and the whole group
    (make and its compilers) is terminated.
    """
    argv = [os.fspath(c) for c in cmd]
    log.debug("+ %s &", shlex.join(argv))
    full_env = None if env is None else {**os.environ, **env}
    try:
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=full_env,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            start_new_session=process_group,
        )
    except FileNotFoundError as e:
        raise RunError(argv, 127, f"{argv[0]}: command not found") from e
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
            proc.wait()


def which(program: str) -> Path | None:
    """Find `program` on PATH."""
    for d in os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin").split(os.pathsep):
        candidate = Path(d) / program
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None
