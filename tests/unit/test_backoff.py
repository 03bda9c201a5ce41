"""The waits between tries of a throttled or failing registry (backoff.py), on a
virtual clock."""

from __future__ import annotations

import email.utils
import time

import pytest

from nvdriver import backoff


@pytest.fixture
def waits(monkeypatch) -> list[float]:
    now, recorded = [0.0], []

    def sleep(seconds: float) -> None:
        recorded.append(seconds)
        now[0] += seconds

    monkeypatch.setattr(backoff, "clock", lambda: now[0])
    monkeypatch.setattr(backoff, "sleep", sleep)
    return recorded


@pytest.mark.parametrize("jitter,expected", [(0.0, [0.5, 1, 2, 4, 5]), (1.0, [1, 2, 4, 8, 10])])
def test_waits_double_up_to_the_cap_jittered_by_half(
    waits, monkeypatch, jitter: float, expected: list[float]
) -> None:
    monkeypatch.setattr(backoff, "rand", lambda: jitter)
    retries = backoff.Retries(backoff.Policy(budget=1000, attempts=6, base=1, cap=10))
    for attempt in range(1, 6):
        assert retries.wait("HTTP 503", attempt) is None
    assert waits == expected
    assert retries.wait("HTTP 503", 6) == "6 tries in a row failed"
    assert retries.summary() == f"HTTP 503 6 times in {sum(expected):.0f} s"


def test_retry_after_is_a_floor_and_a_wait_beyond_the_budget_is_not_waited(
    waits, monkeypatch
) -> None:
    monkeypatch.setattr(backoff, "rand", lambda: 0.0)
    retries = backoff.Retries(backoff.Policy(budget=30))
    assert retries.wait("HTTP 429", 1, after=20) is None
    assert waits == [20]
    assert retries.wait("HTTP 429", 2, after=20) == (
        "the registry asks for a wait of 20 s, beyond the budget"
    )
    assert retries.wait("connection reset", 1) is None  # 0.5 s of the 10 left
    assert retries.summary() == "HTTP 429 2 times, connection reset once in 20 s"


def test_the_budget_ends_the_tries(waits, monkeypatch) -> None:
    monkeypatch.setattr(backoff, "rand", lambda: 1.0)
    retries = backoff.Retries(backoff.Policy(budget=5, attempts=10))
    assert [retries.wait("timeout", n) for n in (1, 2)] == [None, None]
    assert retries.wait("timeout", 3) == "the retry budget of 5 s is spent"
    assert waits == [1, 2]


def test_retry_after_in_seconds_or_as_a_date() -> None:
    assert backoff.retry_after("7") == 7
    assert backoff.retry_after(None) is None and backoff.retry_after("soon") is None
    later = email.utils.formatdate(time.time() + 60, usegmt=True)
    assert 55 <= (backoff.retry_after(later) or 0) <= 60
    assert backoff.retry_after(email.utils.formatdate(0, usegmt=True)) == 0
