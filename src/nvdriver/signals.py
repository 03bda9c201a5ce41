"""Signals become exceptions so that every `with` block unwinds on the way out.

And the one way to hold them back: `deferred()` around a step that must not be
cut in half (taking a mount and registering its release, unloading what a failed
load loaded, unwinding an ExitStack). A signal that arrives meanwhile is
recorded and delivered, to the handler in place before the block, when the
block ends. The handlers are swapped rather than the signal mask blocked: a
blocked mask is per thread, so a signal the kernel hands to another thread
would still run the main thread's handler in the middle of the step, and
children started in the block would inherit the mask.

And the one way to wait for them: `sleep()`. `signal.pause()` and `time.sleep()`
miss a signal that arrives after Python last looked for one and before the wait
starts (the handler runs only when the wait ends: never, for pause); `sleep()`
waits on the wakeup pipe that Python's C handler writes each signal to.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
import time
from collections.abc import Iterator
from types import FrameType
from typing import Any

from nvdriver.errors import Interrupted

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _raise(signum: int, frame: FrameType | None) -> None:
    # Raise once: further signals while unwinding must not interrupt the cleanup.
    for s in HANDLED:
        signal.signal(s, signal.SIG_IGN)
    raise Interrupted(signum)


def install() -> None:
    for s in HANDLED:
        signal.signal(s, _raise)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGTERM, SIGINT and SIGHUP back for the block; deliver the first one after it.

    Outside the main thread it does nothing: Python runs signal handlers in the
    main thread only, so no signal can interrupt another thread's step.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous: dict[signal.Signals, Any] = {}
    try:
        for s in HANDLED:
            previous[s] = signal.signal(s, lambda signum, frame: pending.append(signum))
        yield
    finally:
        for s, handler in previous.items():
            # None: a handler not set from Python; the default is the closest to it.
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        if pending:
            # The handler in place decides what the signal does: raise, be ignored, or kill.
            signal.raise_signal(pending[0])


def sleep(seconds: float | None = None) -> None:
    """Wait `seconds` (None: until a signal) or until SIGTERM, SIGINT or SIGHUP arrives,
    which then goes to the handler in place (install()'s raises Interrupted).

    No signal is missed however close it comes to the start of the wait, whichever
    thread the kernel hands it to: Python's own C handler writes every signal to a
    wakeup pipe, which select() waits on; one that came before the pipe was set has
    its handler run before the wait (pthread_sigmask checks for signals on return).
    Main thread only (signal.set_wakeup_fd).
    """
    deadline = None if seconds is None else time.monotonic() + seconds
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    previous = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, ())  # runs the handlers of those that came
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return
            readable, _, _ = select.select([read_end], [], [], left)
            if readable:  # the handler has run as select returned; one that does not raise:
                os.read(read_end, 64)  # wait on
    finally:
        signal.set_wakeup_fd(previous)
        os.close(read_end)
        os.close(write_end)
