"""One event, from its Kafka bytes to one outcome: Delivered, Dropped or DeadLettered.

    decide (decode + route, pure, total) ─┬─ Drop ───────────────────────────▶ Dropped
                                          ├─ DeadLetter ─▶ dead_letter ───────▶ DeadLettered
                                          └─ Send ─▶ deliver (gate, limiter, retries)
                                                      ├─ 2xx ──────────────────▶ Delivered
                                                      └─ permanent / given up ─▶ DeadLettered

`decide` is total: an exception raised while decoding, routing or mapping one event
becomes that event's dead letter (`UndecodableEvent`, or `MappingError` for anything
else), so no event can stop a partition. Only the DLQ guard (`DlqGuardTripped`) escapes
`handle`: it stops the worker.

Where new steps go: a per-event step before sending (deduplication, an ensure-user
identify) belongs in `handle` between `decide` and `_deliver`; a limiter per endpoint
family is chosen in `limiter_for`.

Thread rule: everything here runs on the event loop. `Event.on_wire` is read by the
worker (same loop) to decide what a revoke or shutdown must wait for.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from consumer import codec
from consumer.config import Settings
from consumer.deadletter import (
    DlqGuard,
    DlqWritable,
    Failure,
    dead_letter_record,
    producer_limit,
    without_value,
)
from consumer.errors import (
    ConnectionFailed,
    DeadLetter,
    DlqGuardTripped,
    DlqRecordTooLarge,
    MappingError,
    Pause,
    RateLimited,
    Retry,
    Timeout,
    UndecodableEvent,
)
from consumer.filtering import Drop
from consumer.logs import event_fields
from consumer.metrics import Metrics
from consumer.policy import Attempts, RetryPolicy
from consumer.routing import Send, route
from consumer.sharedstate import Limiter

__all__ = [
    "DeadLetterSink",
    "DeadLettered",
    "Delivered",
    "Dropped",
    "Event",
    "Handler",
    "Outcome",
    "SchemaNotCached",
    "SchemaSource",
    "TrackClient",
]

log = logging.getLogger(__name__)


class TrackClient(Protocol):
    """Sends one request body; returns on 2xx, raises the classified error otherwise
    (`delivery.UserpilotClient`)."""

    async def track(self, body: bytes) -> None: ...
    async def aclose(self) -> None: ...


class SchemaSource(Protocol):
    """Writer schemas by id (`registry.Registry`); `writer_schema` may block on I/O."""

    def cached(self, schema_id: int) -> Mapping[str, Any] | None: ...
    def writer_schema(self, schema_id: int) -> Mapping[str, Any]: ...


class DeadLetterSink(Protocol):
    """Writes a dead letter and returns once the broker acknowledged it
    (`kafka.DeadLetterProducer`)."""

    async def send(self, topic: str, *, key: bytes | None, value: bytes | None,
                   headers: list[tuple[str, bytes]], timestamp_ms: int | None) -> None: ...
    def close(self, timeout_s: float = 10.0) -> int: ...


@dataclass(slots=True, eq=False)
class Event:
    """One Kafka message on its way to an outcome (what the scheduler runs)."""

    topic: str
    partition: int
    offset: int
    ordering_key: Hashable
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] | None
    timestamp_ms: int | None
    decision: Send | Drop | DeadLetter | None = None  # None: schema not fetched yet
    message_id: str | None = None
    event_time: str | None = None
    on_wire: bool = False  # an HTTP request or a DLQ produce of it is under way
    attempts: Attempts = field(default_factory=Attempts)

    @property
    def fields(self) -> dict[str, Any]:
        return event_fields(self.topic, self.partition, self.offset, self.message_id)


@dataclass(frozen=True, slots=True)
class Delivered:
    """Userpilot accepted the call (any 2xx)."""

    event_name: str
    attempts: int


@dataclass(frozen=True, slots=True)
class Dropped:
    """Deliberately not sent (anonymous, no consent, unmapped, unsupported type)."""

    drop: Drop


@dataclass(frozen=True, slots=True)
class DeadLettered:
    """Written to the DLQ (acknowledged by the broker) with the reason in its headers."""

    reason: str
    error: Exception


Outcome = Delivered | Dropped | DeadLettered


class SchemaNotCached(Exception):
    """The writer schema must be fetched from the registry (off the poll path) first."""

    def __init__(self, schema_id: int) -> None:
        super().__init__(schema_id)
        self.schema_id = schema_id


def _event_age(timestamp: str | None) -> float | None:
    if not timestamp:
        return None
    try:
        when = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, time.time() - when.timestamp())


# A dead letter not acknowledged for this long makes the worker unready (and alerts): its
# partition cannot move on meanwhile.
DLQ_UNWRITABLE_AFTER_S = 10.0


class Handler:
    """Takes events to outcomes; every collaborator is given, none is built here."""

    def __init__(
        self, settings: Settings, metrics: Metrics, *, client: TrackClient,
        registry: SchemaSource, dlq: DeadLetterSink, limiters: Callable[[str], Limiter],
        policy: RetryPolicy, guard: DlqGuard,
    ) -> None:
        self.s = settings
        self.m = metrics
        self.client = client
        self.registry = registry
        self.dlq = dlq
        self.limiters = limiters
        self.policy = policy
        self.guard = guard
        self.dlq_writable = DlqWritable(DLQ_UNWRITABLE_AFTER_S)  # readiness reads it
        # Label lookups cost more than the increments: cache the children on the hot path.
        self._drops: dict[Drop, Any] = {}
        self._delivered: dict[str, Any] = {}
        self._accepted = metrics.responses.labels("202")

    # -- decide: pure and total ---------------------------------------------------------
    def decide(self, event: Event) -> bool:
        """Decode and route from cached schemas; False when the schema must be fetched.

        Sets `event.decision`. Any exception of decode, route or mapping dead-letters the
        event (UndecodableEvent as it is, anything else as MappingError).
        """
        try:
            decoded = codec.decode(event.value, self._cached_schema)
            event.message_id = decoded.get("messageId")
            event.event_time = decoded.get("timestamp")
            event.decision = route(decoded, self.s.consent, self.s.mappings)
        except SchemaNotCached:
            return False
        except DeadLetter as exc:
            event.decision = exc
        except Exception as exc:
            event.decision = MappingError(exc)
        return True

    def _cached_schema(self, schema_id: int) -> Mapping[str, Any]:
        # Raised through codec.decode untouched (it maps only KeyError): the wire header is
        # parsed once per decode, and the fetch happens in `handle`, off the poll path.
        cached = self.registry.cached(schema_id)
        if cached is None:
            raise SchemaNotCached(schema_id)
        return cached

    async def _fetch_schema(self, event: Event) -> None:
        """Wait until the registry answers for this event's schema id, then decide."""
        delay = 0.5
        while not self.decide(event):
            try:
                schema_id, _ = codec.split_wire(event.value)
                await asyncio.to_thread(self.registry.writer_schema, schema_id)
            except (KeyError, UndecodableEvent) as exc:
                event.decision = UndecodableEvent(f"unknown schema id ({exc})")
                return
            except Exception as exc:
                log.warning("schema registry unavailable (%s); retrying in %.1f s",
                            type(exc).__name__, delay, extra=event.fields)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    # -- handle ---------------------------------------------------------------------------
    async def handle(self, event: Event) -> Outcome:
        """The event's outcome; raises DlqGuardTripped when it must not be dead-lettered."""
        if event.decision is None:
            await self._fetch_schema(event)
        decision = event.decision
        if isinstance(decision, Drop):
            return self.dropped(event, decision)
        if isinstance(decision, DeadLetter):
            return await self._dead_letter(event, decision)
        assert isinstance(decision, Send)
        try:
            await self._deliver(event, decision)
        except (DeadLetter, Retry) as exc:
            return await self._dead_letter(event, exc)
        counter = self._delivered.get(decision.event_name)
        if counter is None:
            counter = self._delivered[decision.event_name] = self.m.delivered.labels(
                decision.event_name)
        counter.inc()
        age = _event_age(event.event_time)
        if age is not None:
            self.m.event_age.observe(age)
        self.guard.record_success()
        return Delivered(decision.event_name, event.attempts.count)

    def dropped(self, event: Event, drop: Drop) -> Dropped:
        counter = self._drops.get(drop)
        if counter is None:
            counter = self._drops[drop] = self.m.events_dropped.labels(
                drop.reason, drop.category or "")
        counter.inc()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("dropped (%s%s)", drop.reason,
                      f": {drop.category}" if drop.category else "", extra=event.fields)
        return Dropped(drop)

    # -- deliver ------------------------------------------------------------------------
    def limiter_for(self, send: Send) -> Limiter:
        """The limiter of the endpoint family `send` goes to (one family today: track)."""
        return self.limiters("track")

    async def _deliver(self, event: Event, send: Send) -> None:
        limiter = self.limiter_for(send)

        async def wait_for_limiter() -> None:
            self.m.limiter_wait.observe(await limiter.acquire())

        await self.policy.run(lambda: self._attempt(event, send, limiter), event.attempts,
                              before_send=wait_for_limiter)

    async def _attempt(self, event: Event, send: Send, limiter: Limiter) -> None:
        start = time.perf_counter()
        event.on_wire = True
        try:
            await self.client.track(send.body)
            self._accepted.inc()
        except Timeout:
            self.m.responses.labels("timeout").inc()
            raise
        except ConnectionFailed:
            self.m.responses.labels("connection_error").inc()
            raise
        except (Retry, Pause, DeadLetter) as exc:
            self.m.responses.labels(str(exc.status)).inc()
            if isinstance(exc, RateLimited):
                limiter.slow_down()
                self.m.rate_limit_rps.set(limiter.rate)
            raise
        finally:
            event.on_wire = False
            self.m.delivery_latency.observe(time.perf_counter() - start)

    # -- dead-letter --------------------------------------------------------------------
    async def _dead_letter(self, event: Event, exc: DeadLetter | Retry) -> DeadLettered:
        reason = "retries_exhausted" if isinstance(exc, Retry) else exc.reason
        if not self.guard.allow_dead_letter():
            self.m.dlq_guard_tripped.set(1)
            log.critical("DLQ guard tripped: %s. Not dead-lettering and stopping: this looks "
                         "like a broken deploy or configuration, not bad events. Offsets from "
                         "here on stay uncommitted.", self.guard.tripped_reason,
                         extra=event.fields)
            raise DlqGuardTripped(self.guard.tripped_reason or "DLQ guard")
        failure = Failure(
            reason=reason, exception_class=type(exc).__name__, message=str(exc),
            status=exc.status, body=exc.body, attempts=event.attempts.count,
            first_attempt=event.attempts.first_wall, last_attempt=event.attempts.last_wall,
        )
        record = dead_letter_record(
            key=event.key, value=event.value, headers=event.headers,
            timestamp_ms=event.timestamp_ms, topic=event.topic, partition=event.partition,
            offset=event.offset, failure=failure,
            max_bytes=producer_limit(self.s.kafka_config()), secrets=[self.s.api_key.reveal()])
        delay = 0.5
        event.on_wire = True  # from here a cancelled job could leave a DLQ record behind
        token = self.dlq_writable.started()
        try:
            while True:
                try:
                    await self.dlq.send(self.s.dlq_topic, key=record.key, value=record.value,
                                        headers=record.headers, timestamp_ms=record.timestamp_ms)
                    break
                except DlqRecordTooLarge as too_large:
                    if record.value_omitted:
                        # Even the value-less record is refused (a DLQ topic with a tiny
                        # max.message.bytes): the DLQ is unwritable until it is fixed.
                        self.dlq_writable.failed(str(too_large))
                        log.error("dead letter refused even without its value (%s); "
                                  "retrying in %.1f s", too_large, delay, extra=event.fields)
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, 30.0)
                        continue
                    # Retrying the same bytes can never succeed: once more without the
                    # value (replay fetches it from the source topic by its coordinates).
                    log.warning("dead letter too large for the DLQ (%s); writing it without "
                                "its value", too_large, extra=event.fields)
                    record = without_value(record, producer_limit(self.s.kafka_config()))
                except Exception as produce_error:
                    self.dlq_writable.failed(str(produce_error))
                    log.error("dead-letter produce failed (%s); retrying in %.1f s",
                              produce_error, delay, extra=event.fields)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 30.0)
        finally:
            self.dlq_writable.finished(token)
        self.m.dead_lettered.labels(reason).inc()
        log.warning("dead-lettered (%s): %s", reason, exc, extra=event.fields)
        return DeadLettered(reason, exc)
