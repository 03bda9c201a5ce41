"""Lines a guest appends to a file on a share, printed on the host as they come.

`run_in_guest` returns the command's stdout only once the guest has powered off;
a demo or a benchmark that runs for minutes shows its progress through a file on a
read-write share instead (mounted with cache=mmap: the guest's writes reach the
host's file at once).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

POLL_SECONDS = 0.2


@contextlib.contextmanager
def following(path: Path, emit: Callable[[str], None]) -> Iterator[None]:
    """Call `emit` with each complete line appended to `path` while the block runs (and
    with what is left when it ends)."""
    stop = threading.Event()

    def follow() -> None:
        offset, partial = 0, b""
        while True:
            finished = stop.is_set()
            try:
                with path.open("rb") as f:
                    f.seek(offset)
                    data = f.read()
            except FileNotFoundError:
                data = b""
            offset += len(data)
            *lines, partial = (partial + data).split(b"\n")
            for line in lines:
                emit(line.decode(errors="replace"))
            if finished:
                if partial:
                    emit(partial.decode(errors="replace"))
                return
            stop.wait(POLL_SECONDS)

    thread = threading.Thread(target=follow, name=f"follow {path.name}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
