from __future__ import annotations

import pytest

from consumer.sandbox.ratelimit import Decision, SlidingWindowLimiter


def test_admits_up_to_limit_then_refuses() -> None:
    limiter = SlidingWindowLimiter(limit=3, window=60)
    assert [limiter.acquire("t", 0.0).allowed for _ in range(4)] == [True, True, True, False]


def test_window_rolls_instead_of_resetting_on_bucket_edges() -> None:
    limiter = SlidingWindowLimiter(limit=2, window=60)
    assert limiter.acquire("t", 59.0).allowed
    assert limiter.acquire("t", 59.5).allowed
    # a fixed one-minute bucket would reset at t=60; a rolling window must not
    assert not limiter.acquire("t", 60.5).allowed
    assert not limiter.acquire("t", 118.9).allowed
    assert limiter.acquire("t", 119.0).allowed  # the t=59 admission has expired
    assert not limiter.acquire("t", 119.2).allowed
    assert limiter.acquire("t", 119.5).allowed


def test_refused_requests_do_not_extend_the_penalty() -> None:
    limiter = SlidingWindowLimiter(limit=1, window=10)
    assert limiter.acquire("t", 0.0).allowed
    for now in (1.0, 5.0, 9.9):
        assert not limiter.acquire("t", now).allowed
    assert limiter.acquire("t", 10.0).allowed
    assert limiter.in_window("t", 10.0) == 1


def test_retry_after_is_time_until_oldest_admission_expires() -> None:
    limiter = SlidingWindowLimiter(limit=2, window=60)
    limiter.acquire("t", 0.0)
    limiter.acquire("t", 30.0)
    decision = limiter.acquire("t", 40.0)
    assert not decision.allowed
    assert decision.retry_after_seconds == pytest.approx(20.0)
    assert decision.retry_after_header == "20"


def test_retry_after_header_rounds_up_and_is_at_least_one() -> None:
    assert Decision(False, 0.2).retry_after_header == "1"
    assert Decision(False, 1.01).retry_after_header == "2"


def test_tokens_have_separate_budgets() -> None:
    limiter = SlidingWindowLimiter(limit=1, window=60)
    assert limiter.acquire("a", 0.0).allowed
    assert limiter.acquire("b", 0.0).allowed
    assert not limiter.acquire("a", 1.0).allowed


def test_limit_zero_lifts_the_limit() -> None:
    limiter = SlidingWindowLimiter(limit=0, window=60)
    assert all(limiter.acquire("t", 0.0).allowed for _ in range(10_000))


def test_600_per_minute_default_shape() -> None:
    limiter = SlidingWindowLimiter(limit=600, window=60)
    admitted = sum(limiter.acquire("t", i * 0.05).allowed for i in range(1200))  # 60 s
    assert admitted == 600
    assert limiter.acquire("t", 60.0).allowed  # the first admission at t=0 expired


def test_reconfigure_keeps_history_and_reset_forgets_it() -> None:
    limiter = SlidingWindowLimiter(limit=5, window=60)
    for _ in range(3):
        limiter.acquire("t", 0.0)
    limiter.reconfigure(limit=3, window=60)
    assert not limiter.acquire("t", 1.0).allowed
    limiter.reset()
    assert limiter.acquire("t", 1.0).allowed


def test_window_must_be_positive() -> None:
    with pytest.raises(ValueError):
        SlidingWindowLimiter(limit=1, window=0)
