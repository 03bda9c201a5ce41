"""Retries that survive a fleet's rollout wave: bounded, jittered, within a time budget.

After a Flatcar update every node of a fleet reboots and pulls its package at about the
same time. A registry that throttles (429) or stumbles (5xx, a connection reset) under
that load must slow the nodes down, not send each of them to a 480 MB download and a
compile. So a failed request is tried again after a wait that doubles with each failure
and is jittered (the nodes must not come back in step), never sooner than the server's
`Retry-After`, at most `Policy.attempts` times in a row, and only while the operation's
budget lasts; then the caller gives up with `Retries.summary()`: what failed, how often.

`clock`, `sleep` and `rand` are module attributes so that a test can run the waits on a
virtual clock (tests/integration/test_registry.py) instead of sleeping.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import email.utils
import random
import time

clock = time.monotonic
sleep = time.sleep
rand = random.random


@dataclasses.dataclass(frozen=True)
class Policy:
    """`budget`: seconds one operation (a pull, a push) may spend, waits included, before
    it gives up; `attempts`: tries of one request at most; the n-th wait is jittered
    between half and all of `base`·2^(n-1), at most `cap`."""

    budget: float
    attempts: int = 6
    base: float = 1.0
    cap: float = 30.0

    def __post_init__(self) -> None:
        if self.budget < 0 or self.attempts < 1 or self.base <= 0 or self.cap < self.base:
            raise ValueError(f"{self} is not a usable retry policy")


def retry_after(value: str | None) -> float | None:
    """Seconds from a `Retry-After` header: delay-seconds or an HTTP-date (RFC 9110)."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, (when - datetime.datetime.now(datetime.timezone.utc)).total_seconds())


class Retries:
    """The retries of one operation: its budget, started now, and what failed so far."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.start = clock()
        self.failures: collections.Counter[str] = collections.Counter()

    def wait(self, failure: str, attempt: int, after: float | None = None) -> str | None:
        """Count `failure`, the `attempt`-th in a row of one request, and sleep before the
        next try; or, without sleeping, why there is none (the attempts or the budget are
        spent, or the server asks for a wait beyond the budget)."""
        self.failures[failure] += 1
        p = self.policy
        if attempt >= p.attempts:
            return f"{attempt} tries in a row failed"
        span = min(p.cap, p.base * 2 ** (attempt - 1))
        delay = span / 2 + rand() * span / 2
        if after is not None:  # never sooner than asked; spread the wave behind it
            delay = max(delay, after * (1 + rand() / 4))
        left = p.budget - (clock() - self.start)
        if after is not None and after > left:
            return f"the registry asks for a wait of {after:.0f} s, beyond the budget"
        if delay > left:
            return f"the retry budget of {p.budget:.0f} s is spent"
        sleep(delay)
        return None

    def summary(self) -> str:
        """`HTTP 429 3 times, connection reset once in 42 s`."""
        counts = ", ".join(
            f"{what} {'once' if n == 1 else f'{n} times'}"
            for what, n in self.failures.most_common()
        )
        return f"{counts} in {clock() - self.start:.0f} s"
