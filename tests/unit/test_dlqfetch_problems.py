"""`dlqfetch.fetch_original`: the broker's "not there" is `gone`; no answer is not (review
"replay17": one timeout was reported as retention and committed past for good)."""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from consumer import dlqfetch


class FakeConsumer:
    """Watermarks (or the error getting them), then what one poll returns."""

    watermarks: Any = (0, 10)
    polled: Any = None

    def __init__(self, conf: dict[str, Any]) -> None:
        self.conf = conf

    def get_watermark_offsets(self, tp: Any, timeout: float) -> tuple[int, int]:
        if isinstance(self.watermarks, Exception):
            raise self.watermarks
        low, high = self.watermarks
        return low, high

    def assign(self, parts: Any) -> None:
        pass

    def poll(self, timeout: float) -> Any:
        return self.polled

    def close(self) -> None:
        pass


class Polled:
    def __init__(self, offset: int, error: KafkaError | None = None) -> None:
        self._offset, self._error = offset, error

    def error(self) -> KafkaError | None:
        return self._error

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes:
        return b"k"

    def value(self) -> bytes:
        return b"v"

    def headers(self) -> None:
        return None


@pytest.mark.parametrize(("watermarks", "polled", "problem"), [
    (KafkaException(KafkaError(KafkaError._TIMED_OUT)), None, "unanswered"),
    (KafkaException(KafkaError(KafkaError._TRANSPORT)), None, "unanswered"),
    (KafkaException(KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART)), None, "gone"),
    ((5, 10), None, "gone"),  # below the log's start: retention took it
    ((0, 10), None, "unanswered"),  # no record within the timeout
    ((0, 10), Polled(4, KafkaError(KafkaError._TRANSPORT)), "unanswered"),
    ((0, 10), Polled(4, KafkaError(KafkaError.OFFSET_OUT_OF_RANGE)), "gone"),
    ((0, 10), Polled(6), "gone"),  # compacted away: a later offset came back
    ((0, 10), Polled(4), None),
])
def test_only_the_brokers_word_that_it_is_not_there_is_gone(
        monkeypatch: pytest.MonkeyPatch, watermarks: Any, polled: Any,
        problem: str | None) -> None:
    monkeypatch.setattr(FakeConsumer, "watermarks", watermarks)
    monkeypatch.setattr(FakeConsumer, "polled", polled)
    monkeypatch.setattr(dlqfetch, "Consumer", FakeConsumer)
    found = dlqfetch.fetch_original({}, "events", 0, 4, timeout_s=0.1)
    assert found.problem == problem
    if problem is None:
        assert found.value == b"v"
