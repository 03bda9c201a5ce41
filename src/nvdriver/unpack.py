"""A compressed stream unpacked into a sparse file, its bytes kept out of Python.

Generic, not Flatcar's: the developer container fetch (flatcar/fetch.py) feeds the download
to a decompressor (`lbzip2` on every core, else the stdlib's bz2), whose output `dd
conv=sparse` writes into the file, the aligned all-zero blocks left as holes. lbzip2 writes
into dd itself, so the decompressed gigabytes never pass through the interpreter. Why dd
and these block sizes: README, "The developer container fetch".
"""

from __future__ import annotations

import bz2
import contextlib
import ctypes
import errno
import functools
import logging
import os
from collections.abc import Callable, Iterator
from typing import Protocol

from nvdriver.errors import IntegrityError
from nvdriver.flatcar.pipes import FedChild, fed_child
from nvdriver.run import which

log = logging.getLogger(__name__)

# All-zero blocks of this size (aligned in the file) become holes.
SPARSE_BLOCK = 64 << 10
# The most the stdlib decompressor hands dd at once.
WRITE_BATCH = 1 << 20
_SYNC_FILE_RANGE_WRITE = 2


def _write_error(status: int, stderr: str) -> OSError:
    """dd's failure as the OSError it met: its message ends with strerror (the C locale)."""
    code = next((c for c in errno.errorcode if stderr.endswith(os.strerror(c))), errno.EIO)
    return OSError(code, stderr or f"dd exited with status {status}")


class SparseWriter:
    """`dd conv=sparse` writing its input into the image file, the holes left unwritten.

    The image's bytes take no turn through Python on the lbzip2 path: lbzip2 writes
    into dd's input itself (`input`), and dd skips the aligned all-zero blocks in C.
    A failed write (a full disk) is raised as the OSError dd met.
    """

    def __init__(self, dd: FedChild, out: int) -> None:
        self._dd = dd
        self._out = out

    @property
    def input(self) -> int:
        """The pipe into dd: the stdout to give lbzip2 (then `release_input`)."""
        return self._dd.input

    def release_input(self) -> None:
        """Close our end of dd's input: dd's input then ends when the other writer's does."""
        self._dd.close_input()

    def write(self, data: bytes) -> None:
        try:
            self._dd.write(data)
        except BrokenPipeError:
            self.check()
            raise

    def check(self) -> None:
        """Wait for dd to end (its input ended) and raise what it met."""
        self._dd.close_input()
        status = self._dd.proc.wait()
        if status != 0:
            raise _write_error(status, self._dd.stderr())

    def start_writeback(self) -> None:
        """Start writing what dd has written so far to the disk, without waiting for it.

        The image's gigabytes would otherwise wait in the page cache for the final
        fsync, which then costs seconds after the decode; started as the decode goes,
        the writeback overlaps it (measured: bench/fetch.py). Advisory: an error shows
        in the final fsync, which still flushes everything.
        """
        start = sync_file_range()
        if start is not None:
            start(self._out)

    def finish(self) -> int:
        """Wait for dd, flush the file to disk; returns the image's size.

        Flushed here, not only when the file is renamed into place, so that a disk that
        turns out full on the flush is reported like one that is full on a write.
        """
        self.check()
        os.fsync(self._out)
        return os.fstat(self._out).st_size


@functools.cache
def sync_file_range() -> Callable[[int], int] | None:
    """sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE) of the C library, if it has one
    (looked up at the first fetch, not when the CLI starts)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    call.restype = ctypes.c_int
    return lambda fd: int(call(fd, 0, 0, _SYNC_FILE_RANGE_WRITE))


@contextlib.contextmanager
def sparse_writer(out: int) -> Iterator[SparseWriter]:
    """A `SparseWriter` into the file open at `out`, for the duration of the block.

    dd, with `iflag=fullblock` so that its blocks stay aligned in the file whatever the
    pipe hands it: measured against `cp --sparse=always /dev/stdin` and other block
    sizes behind lbzip2 (README, "The developer container fetch").
    """
    cmd = ["dd", f"bs={SPARSE_BLOCK}", "iflag=fullblock", "conv=sparse", "status=none"]
    with fed_child(cmd, stdout=out) as dd:
        yield SparseWriter(dd, out)


class Decompressor(Protocol):
    def feed(self, data: bytes) -> None: ...

    def finish(self) -> None: ...


def _corrupt(url: str, detail: str) -> IntegrityError:
    return IntegrityError(
        f"{url} did not decompress (truncated or corrupt): {detail}",
        hint="Nothing was cached; the next run downloads it again.",
    )


class Bz2Decompressor:
    """The stdlib decompressor (one core); handles multi-stream files like lbzip2's.

    Without lbzip2 the image's bytes do pass through Python, from bz2 into dd.
    """

    def __init__(self, sink: SparseWriter, url: str) -> None:
        self._sink = sink
        self._url = url
        self._dec = bz2.BZ2Decompressor()
        self._started = False

    def feed(self, data: bytes) -> None:
        while True:
            try:
                # Bounded output: a megabyte of zeros in bzip2 is gigabytes out.
                out = self._dec.decompress(data, max_length=WRITE_BATCH)
            except (OSError, EOFError, ValueError) as e:
                raise _corrupt(self._url, str(e)) from e
            self._started = self._started or bool(data)
            data = b""
            if out:
                self._sink.write(out)
            if self._dec.eof:
                data = self._dec.unused_data
                self._dec = bz2.BZ2Decompressor()
                self._started = False
                if not data:
                    return
            elif self._dec.needs_input:
                return

    def finish(self) -> None:
        if self._started:
            raise _corrupt(self._url, "compressed data ends before the end of a stream")


class Lbzip2Decompressor:
    """`lbzip2 -dc -n N` in a pipe: we write the download in, its output goes to dd."""

    def __init__(self, lbzip2: FedChild, sink: SparseWriter, url: str) -> None:
        self._lbzip2 = lbzip2
        self._sink = sink
        self._url = url

    def feed(self, data: bytes) -> None:
        try:
            self._lbzip2.write(data)
        except BrokenPipeError:
            self.finish()
            raise _corrupt(self._url, "lbzip2 stopped reading") from None

    def finish(self) -> None:
        self._lbzip2.close_input()
        status = self._lbzip2.proc.wait()
        if status != 0:
            # A writer that failed (a full disk) is why lbzip2 failed: its error first.
            self._sink.check()
            message = self._lbzip2.stderr() or f"lbzip2 exited with status {status}"
            raise _corrupt(self._url, message)


@contextlib.contextmanager
def lbzip2_decompressor(
    sink: SparseWriter, url: str, *, threads: int
) -> Iterator[Lbzip2Decompressor]:
    cmd = ["lbzip2", "-dc", "-n", str(threads)]
    with fed_child(cmd, stdout=sink.input) as lbzip2:
        sink.release_input()
        try:
            yield Lbzip2Decompressor(lbzip2, sink, url)
        except BaseException:
            lbzip2.proc.kill()
            raise


@contextlib.contextmanager
def decompressor(sink: SparseWriter, url: str, *, threads: int) -> Iterator[Decompressor]:
    """lbzip2 when it is installed (parallel), else the stdlib's bz2."""
    if which("lbzip2") is not None:
        with lbzip2_decompressor(sink, url, threads=threads) as dec:
            yield dec
    else:
        log.info("lbzip2 is not installed: decompressing on one core")
        yield Bz2Decompressor(sink, url)
