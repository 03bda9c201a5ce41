"""Feeding a child process (lbzip2, gpgv) through a pipe while we download."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Protocol

from nvdriver.run import spawn

PIPE_SIZE = 1 << 20


class Process(Protocol):
    """What we need of a child started by `run.spawn`."""

    def wait(self, timeout: float | None = None) -> int: ...

    def kill(self) -> None: ...


def set_pipe_size(fd: int) -> None:
    """Larger pipes: fewer, larger reads and writes (best effort, Linux only)."""
    with contextlib.suppress(OSError, AttributeError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)


class FedChild:
    """A child that reads our data on its stdin; its stderr is kept for error messages."""

    def __init__(self, proc: Process, stdin: int, errors: IO[bytes]) -> None:
        self.proc = proc
        self._stdin: int | None = stdin
        self._errors = errors

    @property
    def input(self) -> int:
        """The pipe into the child: another child's stdout, so that its output goes straight in."""
        if self._stdin is None:
            raise ValueError("the input was closed")
        return self._stdin

    def write(self, data: bytes) -> None:
        """Write all of `data`; BrokenPipeError when the child stopped reading."""
        view = memoryview(data)
        while view:
            view = view[os.write(self.input, view) :]

    def close_input(self) -> None:
        """End the child's input (idempotent)."""
        if self._stdin is not None:
            fd, self._stdin = self._stdin, None
            os.close(fd)

    def stderr(self) -> str:
        self._errors.seek(0)
        return self._errors.read().decode(errors="replace").strip()


@contextlib.contextmanager
def fed_child(
    cmd: Sequence[str | Path], *, stdout: int | IO[bytes] | None = None
) -> Iterator[FedChild]:
    """Start `cmd` with a pipe from us on its stdin; on exit its input ends, then it is stopped."""
    with contextlib.ExitStack() as stack:
        errors: IO[bytes] = stack.enter_context(tempfile.TemporaryFile())
        read_end, write_end = os.pipe()
        set_pipe_size(write_end)
        try:
            proc = stack.enter_context(spawn(cmd, stdin=read_end, stdout=stdout, stderr=errors))
        except BaseException:
            os.close(write_end)
            raise
        finally:
            os.close(read_end)
        child = FedChild(proc, write_end, errors)
        stack.callback(child.close_input)
        yield child
