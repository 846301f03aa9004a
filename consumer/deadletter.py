"""Dead-letter records and the guard that stops a bad deploy from emptying the topic.

A DLQ record keeps the original key, value, headers and timestamp, and adds the Kafka
Connect `__connect.errors.*` context headers (so tools that read Connect DLQs work on
ours) plus this worker's own `userpilot.*` headers. Nothing here ever sees the token:
callers pass statuses and bodies, and bodies are truncated.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "BODY_LIMIT",
    "DlqGuard",
    "Failure",
    "Header",
    "dlq_headers",
    "header_value",
    "normalize_headers",
    "replay_count",
]

BODY_LIMIT = 1024
CONNECTOR_NAME = "userpilot-delivery-worker"
REPLAY_COUNT = "userpilot.replay.count"

Header = tuple[str, bytes]


@dataclass(frozen=True)
class Failure:
    """Why an event is dead-lettered, as plain data."""

    reason: str
    exception_class: str
    message: str
    status: int | None = None
    body: str = ""
    attempts: int = 0
    first_attempt: float | None = None
    last_attempt: float | None = None


def _iso(ts: float | None) -> bytes:
    if ts is None:
        return b""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").encode()


def normalize_headers(raw: object) -> list[Header]:
    """Kafka headers (list of pairs, or a dict) as (str, bytes) pairs; str values encoded."""
    items: Any = raw.items() if isinstance(raw, dict) else (raw or [])
    out: list[Header] = []
    for key, value in items:
        if isinstance(value, str):
            value = value.encode()
        out.append((str(key), b"" if value is None else bytes(value)))
    return out


def header_value(headers: Sequence[Header] | None, name: str) -> bytes | None:
    """The last value of a header, or None."""
    found = None
    for key, value in headers or ():
        if key == name:
            found = value
    return found


def replay_count(headers: Sequence[Header] | None) -> int:
    """How many times this event was replayed from the DLQ already."""
    raw = header_value(headers, REPLAY_COUNT)
    try:
        return int(raw.decode()) if raw else 0
    except ValueError:
        return 0


def dlq_headers(
    original: Sequence[Header] | None, *, topic: str, partition: int, offset: int,
    failure: Failure,
) -> list[Header]:
    """Original headers (minus stale error headers) plus the error context."""
    kept = [
        (k, v) for k, v in (original or ())
        if not k.startswith("__connect.errors.") and not k.startswith("userpilot.error.")
    ]
    body = failure.body[:BODY_LIMIT]
    message = failure.message[:BODY_LIMIT]
    added: list[Header] = [
        ("__connect.errors.topic", topic.encode()),
        ("__connect.errors.partition", str(partition).encode()),
        ("__connect.errors.offset", str(offset).encode()),
        ("__connect.errors.connector.name", CONNECTOR_NAME.encode()),
        ("__connect.errors.task.id", b"0"),
        ("__connect.errors.stage", b"VALUE_CONVERTER" if failure.reason == "undecodable"
         else b"TASK_PUT"),
        ("__connect.errors.class.name", b"consumer.worker"),
        ("__connect.errors.exception.class.name", failure.exception_class.encode()),
        ("__connect.errors.exception.message", message.encode()),
        # No Java stack here; Connect's first stacktrace line is "class: message".
        ("__connect.errors.exception.stacktrace",
         f"{failure.exception_class}: {message}".encode()),
        ("userpilot.error.reason", failure.reason.encode()),
        ("userpilot.error.status", b"" if failure.status is None
         else str(failure.status).encode()),
        ("userpilot.error.body", body.encode()),
        ("userpilot.error.attempts", str(failure.attempts).encode()),
        ("userpilot.error.first_attempt", _iso(failure.first_attempt)),
        ("userpilot.error.last_attempt", _iso(failure.last_attempt)),
    ]
    if header_value(kept, REPLAY_COUNT) is None:
        added.append((REPLAY_COUNT, b"0"))
    return kept + added


class DlqGuard:
    """Trips when dead letters pass a ratio over a window or a run length (Arroyo's DlqLimit).

    Only outcomes of events that reached delivery or decoding count; filtered drops
    are neither successes nor failures of the integration.
    """

    def __init__(self, max_ratio: float, window: int, max_consecutive: int) -> None:
        self._max_ratio = max_ratio
        self._max_consecutive = max_consecutive
        self._recent: deque[bool] = deque(maxlen=window)
        self._dead = 0
        self._consecutive = 0
        self.tripped_reason: str | None = None

    def record_success(self) -> None:
        self._push(False)
        self._consecutive = 0

    def allow_dead_letter(self) -> bool:
        """Count one more dead letter; False (and trip) if that would pass a limit."""
        if self.tripped_reason is not None:
            return False
        if self._consecutive + 1 > self._max_consecutive:
            self.tripped_reason = (
                f"{self._consecutive + 1} consecutive dead letters (limit "
                f"{self._max_consecutive})"
            )
            return False
        full = len(self._recent) == self._recent.maxlen
        dead_after = self._dead + 1 - (1 if full and self._recent[0] else 0)
        size_after = len(self._recent) + (0 if full else 1)
        if size_after == self._recent.maxlen and dead_after / size_after > self._max_ratio:
            self.tripped_reason = (
                f"{dead_after} dead letters in the last {size_after} events, ratio "
                f"{dead_after / size_after:.2f} > {self._max_ratio:g}"
            )
            return False
        self._push(True)
        self._consecutive += 1
        return True

    def _push(self, dead: bool) -> None:
        if len(self._recent) == self._recent.maxlen and self._recent[0]:
            self._dead -= 1
        self._recent.append(dead)
        if dead:
            self._dead += 1
