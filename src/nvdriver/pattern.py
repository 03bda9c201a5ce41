"""Regular expressions compiled at their first use, not when their module is imported.

`re.compile` runs `re`'s parser and compiler, written in Python: 0.1-0.4 ms a pattern
natively, about thirty times that under emulation, and a module's patterns were compiled
at every command's start whether the command matched anything or not (config.py's six
are matched only against the settings that are given). A `Pattern` keeps the text and compiles
it once, the first time it is asked to match (tests/unit/test_pattern.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any


class Pattern:
    """`re.compile(pattern, flags)`, deferred to the first match."""

    __slots__ = ("_compiled", "flags", "pattern")

    def __init__(self, pattern: str, flags: int = 0) -> None:
        self.pattern = pattern
        self.flags = flags
        self._compiled: re.Pattern[str] | None = None

    def __repr__(self) -> str:
        return f"Pattern({self.pattern!r})"

    @property
    def compiled(self) -> re.Pattern[str]:
        if self._compiled is None:
            self._compiled = re.compile(self.pattern, self.flags)
        return self._compiled

    def match(self, text: str) -> re.Match[str] | None:
        return self.compiled.match(text)

    def fullmatch(self, text: str) -> re.Match[str] | None:
        return self.compiled.fullmatch(text)

    def search(self, text: str) -> re.Match[str] | None:
        return self.compiled.search(text)

    def finditer(self, text: str) -> Iterator[re.Match[str]]:
        return self.compiled.finditer(text)

    def findall(self, text: str) -> list[Any]:
        """Strings, or tuples of strings with more than one group (as `re`'s)."""
        return self.compiled.findall(text)

    def sub(self, replacement: str, text: str) -> str:
        return self.compiled.sub(replacement, text)
