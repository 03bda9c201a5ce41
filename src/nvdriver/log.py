"""Logging: `text` or `json` lines on stderr, with timestamps, and progress lines.

A long step (a download, a compile) reports progress at most every few
seconds; on a terminal it rewrites one line, elsewhere (a container log) it
writes whole lines so that `kubectl logs` shows the step is alive.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import IO, TextIO

LOGGER_NAME = "nvdriver"


def _timestamp(record: logging.LogRecord) -> str:
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        + f".{int(record.msecs):03d}Z"
    )


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record)} {record.levelname.lower():7} {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, object] = {
            "time": _timestamp(record),
            "level": record.levelname.lower(),
            "message": record.getMessage(),
        }
        for key in ("step", "progress", "exit_code", "hint"):
            if hasattr(record, key):
                obj[key] = getattr(record, key)
        if record.exc_info:
            obj["traceback"] = self.formatException(record.exc_info)
        return json.dumps(obj, sort_keys=False)


def setup(fmt: str = "text", *, debug: bool = False, stream: TextIO | None = None) -> None:
    """Configure the package logger once: format, level, destination."""
    logger = logging.getLogger(LOGGER_NAME)
    for h in list(logger.handlers):
        logger.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    logger.propagate = False


def add_stream(stream: IO[str]) -> logging.Handler:
    """Also send our log lines to `stream` (a running `init`'s output); returns the handler."""
    logger = logging.getLogger(LOGGER_NAME)
    formatter = logger.handlers[0].formatter if logger.handlers else TextFormatter()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    logger.addHandler(handler)
    return handler


class Progress:
    """Reports `done/total` of a long step at most every `interval` seconds."""

    def __init__(
        self,
        step: str,
        total: int | None = None,
        *,
        unit: str = "MiB",
        scale: float = 1 << 20,
        interval: float = 3.0,
        logger: logging.Logger | None = None,
    ) -> None:
        self.step = step
        self.total = total
        self.unit = unit
        self.scale = scale
        self.interval = interval
        self.log = logger or logging.getLogger(LOGGER_NAME)
        self.start = time.monotonic()
        self.last = self.start

    def update(self, done: int, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.interval:
            return
        self.last = now
        elapsed = now - self.start
        text = f"{self.step}: {done / self.scale:.1f}"
        if self.total:
            text += f"/{self.total / self.scale:.1f} {self.unit} ({100 * done / self.total:.0f}%)"
        else:
            text += f" {self.unit}"
        if elapsed > 0:
            text += f", {done / self.scale / elapsed:.1f} {self.unit}/s"
        self.log.info(text, extra={"step": self.step, "progress": done})
