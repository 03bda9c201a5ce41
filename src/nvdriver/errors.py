"""Error types and the exit codes of docs/commands.md ("Exit codes").

Every failure a user can cause or meet is one of these: the CLI prints the
message (and the hint) and exits with the code, never a traceback unless
`--debug` is given.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    FAILED = 1
    USAGE = 2
    BUSY = 3
    ALREADY_RUNNING = 4
    INTEGRITY = 5
    UNSUPPORTED = 6
    NO_GPU = 7


class DriverError(Exception):
    """A failure with a message for people and a documented exit code."""

    exit_code: ExitCode = ExitCode.FAILED

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} {self.hint}" if self.hint else self.message


class UsageError(DriverError):
    exit_code = ExitCode.USAGE


class BusyError(DriverError):
    exit_code = ExitCode.BUSY


class AlreadyRunningError(DriverError):
    exit_code = ExitCode.ALREADY_RUNNING


class IntegrityError(DriverError):
    exit_code = ExitCode.INTEGRITY


class UnsupportedError(DriverError):
    exit_code = ExitCode.UNSUPPORTED


class NoGpuError(DriverError):
    exit_code = ExitCode.NO_GPU


class KernelAbiRefused(DriverError):
    """The kernel refused a module for its ABI: a symbol's CRC ("disagrees about version
    of symbol") or the vermagic ("version magic", ENOEXEC). The package was made on
    another build of this kernel release; nothing was left loaded (exit 1)."""


class Interrupted(BaseException):
    """A signal (SIGTERM, SIGINT, SIGHUP) arrived; `with` blocks unwind on the way out.

    Not a DriverError, as KeyboardInterrupt is not an Exception: the many places that
    log a DriverError and go on must not swallow a signal (init once caught the SIGTERM
    that came while it read os-release as a malformed-release warning, then ignored
    every further signal and never stopped). The CLI reports it as an error, exit 1.
    """

    exit_code = ExitCode.FAILED
    hint: str | None = None

    def __init__(self, signum: int) -> None:
        import signal

        self.message = f"interrupted by {signal.Signals(signum).name}"
        super().__init__(self.message)
        self.signum = signum
