"""The kernel's log (/dev/kmsg): what the kernel said while a module loaded."""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger(__name__)


class KmsgRecord(NamedTuple):
    level: int
    sequence: int
    message: str


def parse_kmsg_record(data: bytes) -> KmsgRecord | None:
    """One /dev/kmsg record: `prio,seq,usec,flags[,...];message` then ` KEY=value` lines."""
    head, sep, rest = data.decode(errors="replace").partition(";")
    fields = head.split(",")
    if not sep or len(fields) < 3:
        return None
    try:
        prio, seq = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    message = rest.split("\n", 1)[0]
    # Non-printable bytes come escaped as \xNN.
    message = re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)), message)
    return KmsgRecord(level=prio & 7, sequence=seq, message=message)


class KernelLog:
    """The kernel's messages from now on, read from /dev/kmsg without blocking."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            if not stat.S_ISFIFO(os.fstat(self.fd).st_mode):  # a pipe has no past to skip
                os.lseek(self.fd, 0, os.SEEK_END)  # skip what was logged before
        except OSError as e:
            log.debug("Cannot read the kernel log %s: %s", path, e)
            self.close()

    def read(self) -> list[str]:
        """The messages logged since the last read (or since opening)."""
        messages: list[str] = []
        while self.fd is not None:
            try:
                data = os.read(self.fd, 8192)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.EPIPE:  # records overwritten before we read them
                    continue
                raise
            if not data:
                break
            if (record := parse_kmsg_record(data)) is not None:
                messages.append(record.message)
        return messages

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> KernelLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
