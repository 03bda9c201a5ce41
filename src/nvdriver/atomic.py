"""Files and trees that appear under their final name complete or not at all.

What the driver writes for others to read (a package, the readiness file, a
verification stamp, the developer container image, the module tree) is written
under a temporary name beside its final one, flushed to disk, renamed into place,
and then its directory is flushed too: rename(2) is atomic but not durable, and
after a power cut a rename that only the page cache knew of is gone, or points at
a file whose data never reached the disk. A temporary name starts with a prefix
that the directory's owner removes after a killed run; a reader never sees it
under a final name.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from nvdriver import signals

TEMP_PREFIX = ".tmp-"
# The tree that `replace_directory` moves out of the way, removed right after.
OLD_PREFIX = ".old-"


def _create_beside(final: Path, prefix: str) -> tuple[int, Path]:
    """A new file under a fresh name beside `final`, open for writing (mode 0600), as
    `tempfile.mkstemp` makes it: `tempfile` imports `shutil` and `random`, with their
    compression and hashing modules, at every start that writes its readiness."""
    while True:
        path = final.with_name(f"{prefix}{os.urandom(6).hex()}")
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), path
        except FileExistsError:
            continue


def fsync_directory(directory: Path) -> None:
    """Flush `directory` itself (its entries: what was created, renamed, removed)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(
    final: Path,
    *,
    prefix: str = TEMP_PREFIX,
    mode: int = 0o644,
    check: Callable[[Path], None] | None = None,
) -> Iterator[IO[bytes]]:
    """A file open for writing that appears as `final` when the block ends normally.

    Flushed and fsync'd, given `mode`, passed to `check` (which raises to refuse it: a
    download verified before anyone can see it under its name), renamed over `final`,
    the directory fsync'd; when the block (or any of that) fails, the temporary file is
    removed and the error goes on, so that a full disk leaves nothing behind.
    """
    # Made with signals held, inside the `try`: a SIGTERM right after mkstemp (a test
    # signals the moment the file appears) would otherwise leave it behind.
    tmp: Path | None = None
    try:
        with signals.deferred():
            fd, tmp = _create_beside(final, prefix)
            opened = os.fdopen(fd, "wb")
        with opened as f:
            yield f
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        if check is not None:
            check(tmp)
        os.replace(tmp, final)
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise
    fsync_directory(final.parent)


def write_atomically(final: Path, data: bytes, *, prefix: str = TEMP_PREFIX) -> None:
    """Write `data` to `final` through `atomic_file`."""
    with atomic_file(final, prefix=prefix) as f:
        f.write(data)


def _fsync_tree(top: Path) -> None:
    """Flush every file and directory of a tree (not following links) before it is renamed."""
    for directory, _, files in os.walk(top):
        for name in files:
            path = Path(directory, name)
            if not path.is_symlink() and path.is_file():
                with path.open("rb") as f:
                    os.fsync(f.fileno())
        fsync_directory(Path(directory))


def replace_directory(new: Path, final: Path) -> None:
    """Put the complete tree `new` at `final` (on the same file system), replacing any tree there.

    A directory cannot be renamed over one that is not empty, so the old tree is
    renamed aside first and removed after: there is a moment with no tree at
    `final`, never one with half a tree. A killed run can leave the old tree
    aside under OLD_PREFIX, for the owner of the directory to remove.
    """
    _fsync_tree(new)
    final.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if final.exists():
        old = final.with_name(f"{OLD_PREFIX}{final.name}-{os.getpid()}")
        os.replace(final, old)
    os.replace(new, final)
    fsync_directory(final.parent)
    if new.parent != final.parent:
        fsync_directory(new.parent)
    if old is not None:
        import shutil  # with its compression modules: off the start path

        shutil.rmtree(old, ignore_errors=True)
