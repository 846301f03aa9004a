"""Unit tests for consumer.errors: the tree says what happens next."""

from __future__ import annotations

import pytest

from consumer import errors
from consumer.errors import (
    AlreadyDelivered,
    ConfigError,
    ConnectionFailed,
    DeadLetter,
    Degrade,
    DlqGuardTripped,
    InvalidEvent,
    Misconfigured,
    Pause,
    RateLimited,
    Rejected,
    Retry,
    ServerError,
    SharedStateUnavailable,
    Stop,
    Timeout,
    UndecodableEvent,
    UnreadableBatch,
    WorkerError,
)


@pytest.mark.parametrize(("cls", "parent"), [
    (ConfigError, WorkerError), (DeadLetter, WorkerError), (Retry, WorkerError),
    (Pause, WorkerError), (Stop, WorkerError),
    (UndecodableEvent, DeadLetter), (InvalidEvent, DeadLetter), (Rejected, DeadLetter),
    (RateLimited, Retry), (ServerError, Retry), (Timeout, Retry), (ConnectionFailed, Retry),
    (Misconfigured, Pause), (DlqGuardTripped, Stop), (UnreadableBatch, Stop),
    (Degrade, WorkerError), (SharedStateUnavailable, Degrade), (AlreadyDelivered, WorkerError),
])
def test_tree(cls: type[Exception], parent: type[Exception]) -> None:
    assert cls.__mro__[1] is parent


def test_policies_are_disjoint() -> None:
    policies = (ConfigError, DeadLetter, Retry, Pause, Stop, Degrade, AlreadyDelivered)
    for cls in (getattr(errors, name) for name in errors.__all__):
        if cls is WorkerError:
            continue
        assert sum(issubclass(cls, p) for p in policies) == 1, cls


@pytest.mark.parametrize(("cls", "reason"), [
    (DeadLetter, "dead_letter"), (UndecodableEvent, "undecodable"),
    (InvalidEvent, "invalid_event"), (Rejected, "bad_request"),
])
def test_dead_letter_reasons(cls: type[DeadLetter], reason: str) -> None:
    exc = cls("m", status=400, body="b")
    assert (exc.reason, exc.status, exc.body, str(exc)) == (reason, 400, "b", "m")


@pytest.mark.parametrize(("cls", "cause"), [
    (Retry, "retry"), (RateLimited, "rate_limited"), (ServerError, "server_error"),
    (Timeout, "timeout"), (ConnectionFailed, "connection_error"),
])
def test_retry_causes_and_retry_after(cls: type[Retry], cause: str) -> None:
    exc = cls("m", status=503, retry_after=1.5)
    assert (exc.cause, exc.status, exc.retry_after, exc.body) == (cause, 503, 1.5, "")
    assert cls("m").retry_after is None


def test_pause_carries_status_and_body() -> None:
    exc = Misconfigured("HTTP 401", status=401, body="no")
    assert (exc.status, exc.body, str(exc)) == (401, "no", "HTTP 401")


def test_timeout_is_not_the_builtin() -> None:
    assert not issubclass(Timeout, TimeoutError)
    assert Timeout is not TimeoutError
