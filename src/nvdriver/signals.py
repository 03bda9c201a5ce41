"""Signals become exceptions so that every `with` block unwinds on the way out."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from types import FrameType

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
def deferred() -> Iterator[list[int]]:
    """Hold signals during a step that must not be cut in half; re-raise at the end."""
    pending: list[int] = []
    previous = {s: signal.signal(s, lambda n, f: pending.append(n)) for s in HANDLED}
    try:
        yield pending
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if pending:
            _raise(pending[0], None)
