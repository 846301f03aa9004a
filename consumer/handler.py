"""One event, from its Kafka bytes to one outcome: Delivered, Dropped, DeadLettered or
Duplicate.

    decide (decode + route, pure, total) ─┬─ Drop ───────────────────────────▶ Dropped
                                          ├─ DeadLetter ─▶ dead_letter ───────▶ DeadLettered
                                          └─ Send ─▶ dedup claim (Redis, messageId)
                                              ├─ already delivered ────────────▶ Duplicate
                                              └─ deliver: each call of the event in order
                                                  (ensure-user identify first when needed),
                                                  each through the gate, its family's
                                                  limiter and retries (re-claim before
                                                  each request)
                                                  ├─ every call 2xx ─▶ confirm ─▶ Delivered
                                                  └─ permanent / given up ─▶ release ─▶ DeadLettered

`decide` is total: an exception raised while decoding, routing or mapping one event
becomes that event's dead letter (`UndecodableEvent`, or `MappingError` for anything
else), so no event can stop a partition. Only the DLQ guard (`DlqGuardTripped`) escapes
`handle`: it stops the worker.

Where new steps go: a per-event step before sending (deduplication) belongs in `handle`
between `decide` and `_deliver`; one request goes out in `_send_call`, through the
limiter of its endpoint family (`limiter_for`). An event's `CallPlan` lives on the
`Event`, so calls already answered are not sent again when the event is handled again.

Deduplication (with REDIS_URL, events with a messageId; `consumer.dedup` has the state
machine): `_dedup_claim` before the limiter (a duplicate costs no budget), `_dedup_reclaim`
right before each request of the event (renews the claim, notices a delivery by another
owner), `_dedup_confirm` after every call answered 2xx, `_dedup_release` when the event is
dead-lettered or abandoned (revoke, shutdown) before any request of it started. The id is
recorded under its event type's endpoint (`dedup_endpoint`) and re-claimed before each of
its calls; the owner is this process + the record. An event of several calls (a group)
notes each accepted call but its last (`_dedup_progress`), and an owner taking its claim
over resumes after them (`_dedup_resume`).

Thread rule: everything here runs on the event loop. `Event.on_wire` is read by the
worker (same loop) to decide what a revoke or shutdown must wait for, and `halt` is called
by it (same loop). The one exception, `waiting_for_schemas`, is read by the probe server's
thread, under its own lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Collection, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from consumer import codec
from consumer.calls import FAMILIES, Call, CallPlan, KnownUsers, visible
from consumer.company_order import CompanyOrder, Write
from consumer.config import Settings
from consumer.deadletter import (
    DlqGuard,
    DlqWritable,
    Failure,
    dead_letter_record,
    producer_limit,
    sealed_replay_count,
    without_originals,
    without_value,
)
from consumer.dedup import BusyWait, Deduplicator
from consumer.dedup import Outcome as Claim
from consumer.errors import (
    AlreadyDelivered,
    ConnectionFailed,
    DeadLetter,
    DlqGuardTripped,
    DlqRecordTooLarge,
    MappingError,
    Pause,
    ProxyRefused,
    RateLimited,
    Retry,
    SharedStateUnavailable,
    Timeout,
    UndecodableEvent,
)
from consumer.filtering import DROP_TOMBSTONE, Drop, drop_reason, envelope_drop
from consumer.logs import CURRENT_EVENT, RateLimit, event_fields
from consumer.metrics import Children, Metrics, status_label
from consumer.permits import Permit, PermitPool
from consumer.policy import Attempts, RetryPolicy
from consumer.ratelimit import PriorityLane
from consumer.redaction import redact
from consumer.registry import SchemaNotKnownYet
from consumer.routing import Send, route
from consumer.schemafetch import SharedFetches
from consumer.sharedstate import Limiter
from consumer.stalls import StallWatch

__all__ = [
    "DeadLetterSink",
    "DeadLettered",
    "Delivered",
    "Dropped",
    "Duplicate",
    "Event",
    "Handler",
    "Outcome",
    "SchemaNotCached",
    "SchemaSource",
    "TrackClient",
]

log = logging.getLogger(__name__)
# Every event waiting for the registry retries on its own: one line per cause per 30 s (the
# count of the rest appended), not one per event per retry (~400 lines every 30 s with
# full windows, review "faults23"). The registry client logs the outage and its end.
schema_log = logging.getLogger(f"{__name__}.schema")
schema_log.addFilter(RateLimit(30.0))
# Likewise each dead letter a DLQ refuses retries on its own: one line per cause per 30 s,
# not ~120 an hour for each event (a window of them: half a million lines a day while an
# ACL refused the topic, review "longrun47"), and a DLQ too small even for the bare record
# went through all three forms again on each retry (review "whole47"). Readiness and
# userpilot_dlq_unwritable say it.
dlq_log = logging.getLogger(f"{__name__}.dlq")
dlq_log.addFilter(RateLimit(30.0))
# One WARNING per dead letter came in floods: 50 lines in 49 ms after the guard's CRITICAL
# line, which they buried, and a bad stream under the guard's ratio wrote one per event
# for ever (review "night53"). One line per reason per 10 s, the count of the rest
# appended; each dead letter's details are in its DLQ record and the metrics count all.
dead_log = logging.getLogger(f"{__name__}.dead")
dead_log.addFilter(RateLimit(10.0))

LOG_TEXT_LIMIT = 1024
"""Characters of an error's text in one log line (the DLQ's header keeps as many bytes)."""


def _cut(text: str) -> str:
    if len(text) <= LOG_TEXT_LIMIT:
        return text
    return f"{text[:LOG_TEXT_LIMIT]}… ({len(text) - LOG_TEXT_LIMIT} more characters)"


async def _off_the_wire(event: Event, delay: float) -> None:
    """Sleep between a dead letter's produce attempts, not under way meanwhile: a revoke's or
    a shutdown's drain waits for what is under way, and waited the whole grace (25 s) for
    a DLQ refusing every record (an ACL, a compacted topic), at each rebalance (review
    "commits42"). Cut in its sleep, the event is dead-lettered again by the next owner (a
    failed produce that landed after all, a timeout, is then written twice: replay's
    duplicate, never a loss)."""
    event.on_wire, event.asleep = False, True
    try:
        await asyncio.sleep(delay)
    finally:
        event.on_wire, event.asleep = True, False


URGENT: frozenset[str] = frozenset({"ensure_user", "associate_company"})
"""Call purposes another call of the same user waits for: they take their family's next
connection permit and rate slot before queued events."""


class TrackClient(Protocol):
    """Sends one call; returns on 2xx, raises the classified error otherwise
    (`delivery.UserpilotClient`)."""

    async def send(self, call: Call) -> int: ...
    async def aclose(self) -> None: ...


class SchemaSource(Protocol):
    """Writer schemas by id (`registry.Registry`); `writer_schema` may block on I/O."""

    evictions: int  # schemas let go so far (copies of them are stale)

    def cached(self, schema_id: int) -> Mapping[str, Any] | None: ...
    def writer_schema(self, schema_id: int) -> Mapping[str, Any]: ...


class DeadLetterSink(Protocol):
    """Writes a dead letter and returns once the broker acknowledged it
    (`kafka.DeadLetterProducer`)."""

    async def send(self, topic: str, *, key: bytes | None, value: bytes | None,
                   headers: list[tuple[str, bytes | None]],
                   placement: bytes | None = None) -> None: ...
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
    headers: list[tuple[str, bytes | None]] | None
    timestamp_ms: int | None
    decision: Send | Drop | DeadLetter | None = None  # None: schema not fetched yet
    message_id: str | None = None
    cut_id: bool = False  # its messageId was read from invalid UTF-8: no dedup key
    event_time: str | None = None
    on_wire: bool = False  # an HTTP request or a DLQ produce of it is under way
    asleep: bool = False  # its dead letter waits between produce attempts: nothing of it
    # is under way then, a half-sent group's neither
    parked: bool = False  # the DLQ guard tripped on it: nothing of it follows before the
    # restart (a drain waited its whole grace for a half-sent group, review "stop44")
    requesting: bool = False  # ... an HTTP request (Userpilot down: not waited for)
    dlq_since: float | None = None  # monotonic: its current DLQ produce went out then
    requested: bool = False  # a request of its current call had a connection: it may have
    # reached Userpilot (its messageId claim is then kept when it is abandoned)
    dedup_owner: str | None = None  # set while this event holds its messageId's claim
    # (or asked for it while Redis was unreachable: asked again before each request)
    unchecked: bool = False  # a request of it went out without the duplicate check
    attempts: Attempts = field(default_factory=Attempts)
    plan: CallPlan | None = None  # the calls of a Send, resumed where a failure stopped
    intake: int = 0  # the worker's intake sequence (from 1): lower goes first in a limiter's
    # queue, and the DLQ guard reads outcomes in this order
    generation: int = 0  # its partition's tracker when taken (`Commits.take`)
    waits: object = None  # its ordering waits (`keyless.UserWaits`), from intake
    writes: tuple[Write, ...] | None = None  # its company writes in line (`CompanyOrder`);
    # None until placed, once decided and numbered

    @property
    def fields(self) -> dict[str, Any]:
        return event_fields(self.topic, self.partition, self.offset, self.message_id)

    @property
    def half_sent(self) -> bool:
        """A call of the event was accepted and another is to follow (a group whose company
        identify was accepted): a drain neither halts nor abandons it."""
        plan = self.plan
        return plan is not None and plan.started and not plan.done

    @property
    def dead_letter_on_wire(self) -> bool:
        """Its DLQ record (or Redis confirm) is on the wire, not an HTTP request: a drain
        waits for it while Kafka answers, whatever Userpilot does."""
        return self.on_wire and not self.requesting

    @property
    def under_way(self) -> bool:
        """Something of it may have reached Userpilot or the DLQ and the rest should follow:
        a request, DLQ record or confirm on the wire, or a half-sent event. A drain waits
        for these, not for one asleep before its next DLQ attempt (review "diff42")."""
        return (self.on_wire or self.half_sent) and not (self.asleep or self.parked)


@dataclass(frozen=True, slots=True)
class Delivered:
    """Userpilot accepted every call of the event (any 2xx)."""

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
    counted: bool = True
    """The DLQ guard counted it (not a sealed replay): its commit waits (`GuardHold`)."""
    at: float = 0.0
    """Its `userpilot.error.dead_lettered_at` (wall clock): what `replay --until` reads."""


@dataclass(frozen=True, slots=True)
class Duplicate:
    """Not sent: its messageId was already delivered to this endpoint (Redis record)."""

    endpoint: str


Outcome = Delivered | Dropped | DeadLettered | Duplicate

EARLIER_SCHEMA_WAIT_S = 5.0
"""How long after an event was taken with its schema still to fetch a later company write
waits for it to be decided, so that its own company write keeps its place (the registry's
own bound on a call, as `keyless.UNRESOLVED_WAIT_S`)."""

SHARED_RECHECK_S = 60.0
"""How long a replica trusts, on its own, a user it learned from Redis another replica had
identified: then it asks Redis again (one read per user a minute). Trusted for the whole
TTL, a user `delete-users` removed from the shared record got Tracks attributed to no one
for up to a day from every replica that had learned it so (review "users41")."""

RELEASE_TIMEOUT_S = 1.0
"""Bound on the release of an abandoned event's claim (a revoke or shutdown waits for it);
past it the claim simply expires after its TTL."""


def _note_ids(event: Event, decoded: codec.Event) -> None:
    """The decoded event's messageId and timestamp on `event`, for dedup and log lines."""
    message_id = decoded.get("messageId")
    # A blank or invisible id identifies nothing: as a dedup key every such event after the
    # first would be skipped as its duplicate. Nor is one read from invalid UTF-8 as U+FFFD
    # a key (`cut_id`; its log lines still show it): `order-\xe2\x82` and `order-\xe2\x84`
    # (two ids cut inside a character) were one, and the second was never sent (review
    # "redis42").
    event.message_id = (message_id if isinstance(message_id, str)
                        and visible(message_id) else None)
    event.cut_id = "messageId" in decoded.cut
    event.event_time = decoded.get("timestamp")


class SchemaNotCached(Exception):
    """The writer schema must be fetched from the registry (off the poll path) first."""

    def __init__(self, schema_id: int) -> None:
        super().__init__(schema_id)
        self.schema_id = schema_id


def _registry_failure(exc: BaseException) -> str:
    """A registry failure for the log: its type, and the HTTP status when it answered one
    (a 401/403 after a credential rotation must be told from an outage)."""
    status = getattr(exc, "http_status_code", None)
    return f"{type(exc).__name__}, HTTP {status}" if status else type(exc).__name__


_UTC_SUFFIX = re.compile(r"[Zz]$")
MAX_EVENT_AGE_S = 10 * 365 * 86400
"""Older "timestamps" are a device clock at 1970 or a placeholder (`0001-01-01`), not an
age: one such event put 6.4e10 s into the histogram's `_sum` (review "clock53")."""


def _event_age(timestamp: str | None) -> float | None:
    """Seconds since an RFC 3339 timestamp (`Z` or `z`, as `replay --since` takes); None
    without a zone, unreadable, or older than `MAX_EVENT_AGE_S`."""
    if not timestamp:
        return None
    try:
        when = datetime.fromisoformat(_UTC_SUFFIX.sub("+00:00", timestamp))
    except ValueError:
        return None
    if when.tzinfo is None:
        return None
    age = time.time() - when.timestamp()
    return None if age > MAX_EVENT_AGE_S else max(0.0, age)


# A dead letter not acknowledged for this long makes the worker unready (and alerts): its
# partition cannot move on meanwhile.
DLQ_UNWRITABLE_AFTER_S = 10.0


class Handler:
    """Takes events to outcomes; every collaborator is given, none is built here."""

    def __init__(
        self, settings: Settings, metrics: Metrics, *, client: TrackClient,
        registry: SchemaSource, dlq: DeadLetterSink, limiters: Callable[[str], Limiter],
        policy: RetryPolicy, guard: DlqGuard, dedup: Deduplicator | None = None,
        budget: Callable[[str], str] = lambda family: family,
        stalls: StallWatch | None = None,
    ) -> None:
        self.s = settings
        # Requests wait out a stall that may have cost this member its partitions.
        self.stalls = stalls or StallWatch(float("inf"), 0.0)
        self.m = metrics
        self.client = client
        self.registry = registry
        self.dlq = dlq
        self.limiters = limiters
        self.budget = budget
        """The rate budget a family draws from (`SharedState.budget`): the gauge's label."""
        self.policy = policy
        self.guard = guard
        self.dedup = dedup
        # USERPILOT_MAX_CONNECTIONS per endpoint family, taken before the family's rate
        # slot (`permits` says why). A request is under way once it has both, not while it
        # waits: with more events in flight than connections, a drain waited for the
        # queued ones, which then went out after the halt and were cut at its deadline,
        # once Userpilot had them: sent again by the next owner, with Redis too (review
        # "scale17"). The client's pool is the families' sum: never waited on here.
        self._connections = {family: PermitPool(settings.max_connections)
                             for family in FAMILIES}
        # Claims are owned per process and record: after a crash the re-reading replica
        # waits for the claim instead of racing the dead process's request.
        self.instance = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.dlq_writable = DlqWritable(DLQ_UNWRITABLE_AFTER_S)  # readiness reads it
        self._replay_secret = settings.replay_secret() or b""
        # A dead letter's text may quote the registry (a missing reference's answer, with
        # the request's Authorization echoed) as well as Userpilot: what no log line shows
        # (it had Userpilot's secrets only, review "secrets18").
        self._secrets = settings.log_secrets()
        self._schema_lock = threading.Lock()  # the probe thread reads the count
        self._halted: set[tuple[str, int]] = set()  # draining partitions (see `halt`)
        self._halt_all = False
        self._schema_waits = 0
        # Per schema id: the waiting event tasks whose last lookup of it failed, and how
        # (`schema_failing`, for readiness; under `_schema_lock`).
        self._schema_failing: dict[int, tuple[int, str]] = {}
        self._fetches = SharedFetches(lambda schema_id: self.registry.writer_schema(schema_id),
                                      permanent=(KeyError, UndecodableEvent))
        # Label lookups cost more than the increments: cache the children on the hot path.
        self._drops: dict[Drop, tuple[Any, Dropped]] = {}
        self._schemas: dict[int, Mapping[str, Any]] = {}  # writer schemas seen cached
        self._evictions_seen = 0
        self._delivered = Children(self.m.delivered)
        self._cut = Children(self.m.metadata_cut)
        self._responses = Children(self.m.responses)
        self._limiter_wait = Children(self.m.limiter_wait)
        self._latency = Children(self.m.delivery_latency)
        self._connection_wait = Children(self.m.connection_wait)
        self._lanes: dict[int, PriorityLane] = {}  # by limiter: one when families share
        self.known = (KnownUsers(settings.ensure_user_cache, settings.ensure_user_ttl_s)
                      if settings.ensure_user else None)
        """Users this replica identified (ensure-user); None when USERPILOT_ENSURE_USER=false."""
        # Ensure-user identifies under way, by user: a user's events on several partitions
        # or topics (keyless producers, a second topic) run side by side, and each decided
        # "needs identify" before the first answer: one identify per event, not per user
        # (review "events31": 2 per user with two topics, 3 with three partitions).
        self._ensuring: dict[str, asyncio.Event] = {}
        # Several users' updates of one company, in intake order (event loop only).
        self.companies = CompanyOrder()
        self._undecided: dict[int, Event] = {}  # taken before their schema came, by intake
        # ... and by when (monotonic) a later company write stops waiting for each to be
        # decided (`_decide_earlier`)
        self._undecided_by: dict[int, float] = {}

    def close(self) -> None:
        """At shutdown, after the events settled: no schema lookup starts any more."""
        self._fetches.close()

    # -- decide: pure and total ---------------------------------------------------------
    def screen(self, value: bytes | None) -> Drop | codec.Event | None:
        """The intake's first look at an event's bytes: its Drop when it is dropped (most
        events on a Signal topic), else the decoded event to pass to `decide`.

        None when only `decide` can tell (schema not cached, undecodable bytes, JSON text
        that fails when read): it repeats the work and records the outcome. Why a separate
        step: a dropped event then needs no `Event`, no task and no per-event bookkeeping;
        the worker finishes its offset and counts it once per polled batch
        (`count_drops`). The decision is `route`'s own first step, so it cannot differ
        (`_head_drop` runs first in `decide` too).
        """
        if value is None:
            return DROP_TOMBSTONE
        try:
            drop = self._head_drop(value)
            if drop is not None:
                return drop
            decoded = codec.decode(value, self._cached_schema)
            return drop_reason(decoded, self.s.consent, self.s.mappings) or decoded
        except Exception:
            return None

    def decide(self, event: Event, decoded: codec.Event | None = None) -> bool:
        """Decode and route from cached schemas; False when the schema must be fetched.

        Sets `event.decision`; `decoded` is `screen`'s result for `event.value`, so it is
        not decoded twice. Any exception of decode, route or mapping dead-letters the
        event (UndecodableEvent as it is, anything else as MappingError).
        """
        if event.value is None:
            event.decision = DROP_TOMBSTONE  # as `screen` decides (debug logging skips it)
            return True
        try:
            if decoded is None:
                drop = self._head_drop(event.value)
                if drop is not None:
                    event.decision = drop
                    if self.debug:  # its debug line names the event: read it whole if it can
                        with contextlib.suppress(Exception):
                            _note_ids(event, codec.decode(event.value, self._cached_schema))
                    return True
                decoded = codec.decode(event.value, self._cached_schema)
            _note_ids(event, decoded)
            event.decision = route(decoded, self.s.consent, self.s.mappings)
        except SchemaNotCached:
            return False
        except DeadLetter as exc:
            event.decision = exc
        except Exception as exc:
            event.decision = MappingError(exc)
        return True

    def _head_drop(self, value: bytes) -> Drop | None:
        """The drop an event's head decides (`codec.envelope_of`: no userId, an unmapped
        name…), before fastavro reads the rest; None when the rest must be read."""
        head = codec.envelope_of(value, self._cached_schema)
        return envelope_drop(head, self.s.mappings) if head is not None else None

    def _cached_schema(self, schema_id: int) -> Mapping[str, Any]:
        # Raised through codec.decode untouched (it maps only KeyError): the wire header is
        # parsed once per decode, and the fetch happens in `handle`, off the poll path.
        # Kept here too: one call less per event.
        cached = self._schemas.get(schema_id)
        if cached is None:
            cached = self.registry.cached(schema_id)
            if cached is None:
                raise SchemaNotCached(schema_id)
            self._keep_schema(schema_id, cached)
        return cached

    def _keep_schema(self, schema_id: int, schema: Mapping[str, Any]) -> None:
        """Keep a copy; all dropped once the registry let any schema go, so this never
        holds more than the registry's bounds (review "bounds49")."""
        evictions = self.registry.evictions
        if evictions != self._evictions_seen:
            self._schemas.clear()
            self._evictions_seen = evictions
        self._schemas[schema_id] = schema

    def halt(self, parts: Iterable[tuple[str, int]] | None) -> None:
        """No new request for events of these partitions (None: all) until `unhalt`: a
        revoke or shutdown is draining them. Event loop only."""
        if parts is None:
            self._halt_all = True
        else:
            self._halted.update(parts)

    def unhalt(self, parts: Iterable[tuple[str, int]] | None) -> None:
        if parts is None:
            self._halt_all = False
        else:
            self._halted.difference_update(parts)

    def _check_halted(self, event: Event) -> None:
        """Before the claim and before each request: an event of a draining partition stops
        here, unsent, as if cancelled (its offset stays uncommitted; the claim of an event
        never sent is released). Not a half-sent event: its next call goes, and the drain
        waits for it."""
        if ((self._halt_all or (event.topic, event.partition) in self._halted)
                and not event.half_sent):
            raise asyncio.CancelledError

    def waiting_for_schemas(self) -> int:
        """Event tasks waiting on the registry now (readiness reads it, from the probe
        thread): one per user chain, not the events queued behind each; the worker's
        SCHEMA_WAIT window counts those."""
        with self._schema_lock:
            return self._schema_waits

    async def _fetch_schema(self, event: Event) -> None:
        """Wait until the registry answers for this event's schema id, then decide.

        Counted while it waits: the registry's fault matters to readiness only while some
        event waits for it (a waiting event taken away by a revoke must not leave the
        replica unready for ever; nothing else would ask the registry again).
        """
        with self._schema_lock:
            self._schema_waits += 1
        try:
            await self._wait_for_schema(event)
        finally:
            with self._schema_lock:
                self._schema_waits -= 1
        self.order_writes(event)  # decided now: its company writes take their place

    def schema_failing(self) -> str | None:
        """For readiness (the probe thread): None unless events wait for a schema id whose
        last lookup failed. Per id, not the registry's last answer: one id answered 500 for
        ever, or without its schema, stalled its partition while readiness followed the
        registry's answers to other ids (review "registry54")."""
        with self._schema_lock:
            if not self._schema_failing:
                return None
            schema_id, (waits, why) = next(iter(self._schema_failing.items()))
            ids = len(self._schema_failing)
        more = f" (and {ids - 1} other ids)" if ids > 1 else ""
        return (f"schema registry gives no schema id {schema_id}{more} ({why}); "
                f"{waits} event{' waits' if waits == 1 else 's wait'} for it")

    def _note_schema_failure(self, schema_id: int, why: str, *, counted: bool) -> None:
        """An event's lookup of `schema_id` failed; `counted`: the event was already."""
        with self._schema_lock:
            waits, _ = self._schema_failing.get(schema_id, (0, ""))
            self._schema_failing[schema_id] = (waits + (0 if counted else 1), why)

    def _forget_schema_failure(self, schema_id: int) -> None:
        """An event counted failing under `schema_id` stopped waiting (decided, or gone)."""
        with self._schema_lock:
            waits, why = self._schema_failing.pop(schema_id, (1, ""))
            if waits > 1:
                self._schema_failing[schema_id] = (waits - 1, why)

    async def _wait_for_schema(self, event: Event) -> None:
        """Until its schema is there; after a failed lookup the next is the id's, shared
        by every event waiting for it (`SharedFetches`: 0.5 s doubling to 30 s). Counted
        failing (`schema_failing`) from its first failed lookup until it stops waiting."""
        failing: int | None = None  # the schema id it is counted failing under
        try:
            while not self.decide(event):
                schema_id = None
                try:
                    schema_id, _ = codec.split_wire(event.value)
                    # Kept at once: read again from the registry's cache, a schema let go
                    # while this waited for its turn was fetched again, and again (review
                    # "diff49b").
                    self._keep_schema(schema_id,
                                      await self._fetches.writer_schema(schema_id))
                except KeyError as exc:
                    event.decision = UndecodableEvent(f"unknown schema id ({exc})")
                    return
                except UndecodableEvent as exc:  # not a Confluent frame, or not Avro
                    event.decision = exc
                    return
                except SchemaNotKnownYet as exc:
                    # The registry answers: readiness is on (a stream of unknown ids would
                    # hold it off), also after an outage this event waited through before
                    # (its failure named the outage while the registry answered; diff58).
                    if failing is not None:
                        self._forget_schema_failure(failing)
                        failing = None
                    wait = self._fetches.retry_in(exc.schema_id)
                    # The id first: one line per id per 30 s (`RateLimit` keys on it).
                    schema_log.warning("schema id %d not known to the registry yet (%s); "
                                       "asking again in %.1f s, dead-lettered if it still says "
                                       "so %g s after it first did (a registry replica behind "
                                       "its leader?)", exc.schema_id, exc.said, wait,
                                       exc.grace_s, extra=event.fields)
                    if wait <= 0:
                        await asyncio.sleep(0.5)  # never at once, never busy
                except Exception as exc:
                    wait = self._fetches.retry_in(schema_id) if schema_id is not None else 0.5
                    why = _registry_failure(exc)
                    if schema_id is not None:
                        self._note_schema_failure(schema_id, why, counted=failing is not None)
                        failing = schema_id
                    schema_log.warning("schema registry unavailable (%s); retrying in %.1f s",
                                       why, wait, extra=event.fields)
                    if schema_id is None or wait <= 0:  # no backoff to wait (never expected):
                        await asyncio.sleep(max(wait, 0.5))  # never at once, never busy
        finally:
            if failing is not None:
                self._forget_schema_failure(failing)

    # -- handle ---------------------------------------------------------------------------
    async def decided(self, event: Event) -> None:
        """Fetch the event's schema if it was not cached at intake, and decide."""
        if event.decision is None:
            await self._fetch_schema(event)

    async def handle(self, event: Event) -> Outcome:
        """The event's outcome; raises DlqGuardTripped when it must not be dead-lettered.

        Lines logged meanwhile name the event (`logs.CURRENT_EVENT`), also those of code
        that does not know it (the retry log, the deduplication store)."""
        token = CURRENT_EVENT.set(event)
        try:
            return await self._handle(event)
        finally:
            CURRENT_EVENT.reset(token)

    async def _handle(self, event: Event) -> Outcome:
        if event.decision is None:
            await self._fetch_schema(event)
        decision = event.decision
        if isinstance(decision, Drop):
            return self.dropped(event, decision)
        if isinstance(decision, DeadLetter):
            return await self._dead_letter(event, decision)
        assert isinstance(decision, Send)
        self._check_halted(event)  # before the claim: a draining partition's events cost
        # no Redis call, and its users' queues empty at once
        endpoint = self.dedup_endpoint(decision)
        if not await self._dedup_claim(event, endpoint):
            return self._duplicate(event, endpoint)
        try:
            await self._dedup_resume(event, decision, endpoint)
            await self._deliver(event, decision)
        except AlreadyDelivered:
            return self._duplicate(event, endpoint)
        except (DeadLetter, Retry) as exc:
            await self._dedup_release(event, endpoint)
            return await self._dead_letter(event, exc)
        except asyncio.CancelledError:
            # Abandoned by a revoke, loss or shutdown: hand the claim on unless a request of
            # it may have reached Userpilot. Then it is kept until its TTL, which another
            # replica waits out; this replica re-reading the same offset re-enters its own
            # claim, so a request cut at a drain's deadline may be sent twice (README).
            if not event.requested:
                await self._dedup_release(event, endpoint)
            raise
        await self._dedup_confirm(event, endpoint)
        self._delivered(decision.event_name).inc()
        # Only `explain` said so: a payload cut at the limits showed nowhere in operation
        # but in the payload itself (review "mappings48"). Not `omitted`: it also lists
        # what a rule or the company id takes by design (a group's `id` trait, review
        # "diff48c"), which an alert on it would have counted.
        if decision.truncated:
            self._cut("truncated").inc()
        if event.unchecked:
            # Delivered only: an event refused (400) or given up after the check was skipped
            # was counted too, against the metric's "delivered" (review "metrics46").
            self.m.dedup_unchecked.labels(endpoint).inc()
        age = _event_age(event.event_time)
        if age is not None:
            self.m.event_age.observe(age)
        self.guard.record_success(event.intake or None)
        return Delivered(decision.event_name, event.attempts.count)

    def undecided(self) -> int:
        """Events taken whose writer schema the registry has not given yet (event loop):
        `userpilot_events_waiting_schema`. Not the SCHEMA_WAIT window, which keeps them
        until their offsets are committed: the gauge read a full window while the registry
        had answered and Userpilot was slow (review "metrics41"); nor every event taken
        undecided, which a user's later events stay until their turn (review "diff41b")."""
        waiting = 0
        for event in self._undecided.values():
            try:
                schema_id, _ = codec.split_wire(event.value)
            except UndecodableEvent:
                continue
            if self.registry.cached(schema_id) is None:
                waiting += 1
        return waiting

    def order_writes(self, event: Event) -> None:
        """A numbered event's company writes join their companies' lines: at intake, or,
        taken while its schema was being fetched, once it is decided."""
        decision = event.decision
        if decision is None:
            self._undecided[event.intake] = event
            self._undecided_by.setdefault(event.intake, time.monotonic() + EARLIER_SCHEMA_WAIT_S)
        elif event.writes is None:
            self._undecided.pop(event.intake, None)
            self._undecided_by.pop(event.intake, None)
            companies = ([c for call in decision.calls if (c := call.written_company)]
                         if isinstance(decision, Send) else ())
            event.writes = (self.companies.place(event.intake, (event.topic, event.partition),
                                                 companies) if companies else ())

    async def _decide_earlier(self, intake: int) -> None:
        """Before a company write: the events taken before it while their schema was being
        fetched are decided (their own tasks decide when they reach the head of their users'
        chains, maybe long after), so their writes are in line. One whose schema is still
        being fetched is waited for, until EARLIER_SCHEMA_WAIT_S after it was taken: not
        waited for, a collector's first event of a new schema version, another user's group
        of the company, was overtaken by a later group of the canonical schema, and the
        company kept the older traits (review "evolve51"). Past that (the registry away),
        later writes go on, and that company's order is not guaranteed."""
        for seq, earlier in list(self._undecided.items()):
            if seq >= intake:
                break
            if self._undecided.get(seq) is not earlier:
                continue  # decided by its own task, or its partition went, while this waited
            if self.decide(earlier):
                self.order_writes(earlier)
                continue
            if await self._schema_of(seq, earlier):
                if self._undecided.get(seq) is earlier and self.decide(earlier):
                    self.order_writes(earlier)
                continue  # else refused for good: dead-lettered by its task, no company
            schema_log.warning(
                "a company write goes before an earlier event whose schema was not fetched "
                "within %.0f s of its intake (%s[%d]@%d): that company's order is not "
                "guaranteed while the registry does not give it", EARLIER_SCHEMA_WAIT_S,
                earlier.topic, earlier.partition, earlier.offset)

    async def _schema_of(self, seq: int, earlier: Event) -> bool:
        """Fetch `earlier`'s writer schema until its wait runs out; True when there is
        nothing more to wait for: the schema came, the registry refused the id for good (the
        event is dead-lettered, writing no company), or the event was decided or taken
        away meanwhile. Asked again after a failed lookup (one registry blip let the later
        write go first, review "diff51a"); failures are the event's own task's to report."""
        left = self._undecided_by.get(seq, 0.0) - time.monotonic()
        if left <= 0:
            return False
        try:
            schema_id, _ = codec.split_wire(earlier.value)
        except UndecodableEvent:
            return True
        # asyncio.timeout, not wait_for: on 3.11 wait_for can drop a revoke's cancellation
        # that lands as the wait ends, and the event went on for a partition gone (diff51a).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(left):
                while self._undecided.get(seq) is earlier:
                    try:
                        self._keep_schema(schema_id, await self._fetches.writer_schema(schema_id))
                        return True
                    except (KeyError, UndecodableEvent):
                        return True
                    except Exception:
                        # `writer_schema` waits out the id's backoff itself; never a busy loop
                        await asyncio.sleep(0.05)
        return self._undecided.get(seq) is not earlier

    def writes_done(self, event: Event) -> None:
        """The event's job ended: its company writes, if any, are not to come."""
        self._undecided.pop(event.intake, None)
        self._undecided_by.pop(event.intake, None)
        if event.writes:
            self.companies.after(event.writes)

    def forget_writes(self, parts: Collection[tuple[str, int]]) -> None:
        """The partitions went: their events' writes, some never run, are not to come."""
        gone = set(parts)
        self._undecided = {seq: e for seq, e in self._undecided.items()
                           if (e.topic, e.partition) not in gone}
        self._undecided_by = {seq: by for seq, by in self._undecided_by.items()
                              if seq in self._undecided}
        self.companies.forget(parts)

    def _duplicate(self, event: Event, endpoint: str) -> Duplicate:
        self.m.duplicates_skipped.labels(endpoint).inc()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("duplicate: messageId already delivered to %s", endpoint,
                      extra=event.fields)
        return Duplicate(endpoint)

    def _drop_outcome(self, drop: Drop) -> tuple[Any, Dropped]:
        """The drop's counter child and its outcome, made once per drop reason."""
        known = self._drops.get(drop)
        if known is None:
            known = self._drops[drop] = (
                self.m.events_dropped.labels(drop.reason, drop.category or ""), Dropped(drop))
        return known

    def dropped(self, event: Event, drop: Drop) -> Dropped:
        """Count one dropped event (an event decided after its schema was fetched)."""
        counter, outcome = self._drop_outcome(drop)
        counter.inc()
        if log.isEnabledFor(logging.DEBUG):
            self.log_dropped(drop, event.fields)
        return outcome

    def count_drops(self, counts: Iterable[tuple[Drop, int]]) -> None:
        """Count a polled batch's dropped events: one increment per drop reason, not one
        per event (each increment takes the metric's lock). Equal drops may come in
        several pairs; their counts add up."""
        for drop, count in counts:
            self._drop_outcome(drop)[0].inc(count)

    @staticmethod
    def log_dropped(drop: Drop, fields: dict[str, Any]) -> None:
        """The debug line of one dropped event (callers check `debug` first)."""
        log.debug("dropped (%s%s)", drop.reason,
                  f": {drop.category}" if drop.category else "", extra=fields)

    @property
    def debug(self) -> bool:
        """Per-event debug lines are wanted (then the worker takes drops one by one)."""
        return log.isEnabledFor(logging.DEBUG)

    # -- deduplication (Redis) ----------------------------------------------------------
    def dedup_endpoint(self, send: Send) -> str:
        """The endpoint an event's messageId is recorded under, one per event type: track
        for track/page, identify for identify, company_identify for group (its first call).
        Not the last call: a group's association is an identify, so a group and an
        identify event with one messageId shared a key and the group was skipped."""
        return send.calls[0].endpoint

    async def _dedup_claim(self, event: Event, endpoint: str) -> bool:
        """Claim the messageId before the limiter; False when it was delivered already.

        Another owner's claim (BUSY) is waited out here, in the event's task: it is
        confirmed (→ duplicate) or released/expired (→ ours). Redis down: delivered as
        without Redis, counted as unchecked.
        """
        if self.dedup is None or not event.message_id or event.cut_id:
            return True
        owner = f"{self.instance}/{event.topic}/{event.partition}/{event.offset}"
        busy = BusyWait()
        while True:
            try:
                claim = await self.dedup.claim(endpoint, event.message_id, owner)
            except asyncio.CancelledError:
                # Cut by a drain while the answer was in transit: the claim may have landed.
                # Released (only if it is ours), or the next owner waits out its TTL.
                event.dedup_owner = owner
                await self._dedup_release(event, endpoint)
                raise
            if claim.outcome is Claim.DUPLICATE:
                return False
            if claim.outcome is Claim.SEND:
                # Degraded too: the claim is asked again before each request, and the
                # delivery confirmed after it. Without an owner neither happened, so an
                # event taken in during a short Redis blip went out unchecked seconds later,
                # with Redis answering and holding its messageId as delivered (review
                # "redis18"); and was never recorded.
                event.dedup_owner = owner
                return True
            await asyncio.sleep(busy.after(claim))

    async def _dedup_resume(self, event: Event, send: Send, endpoint: str) -> None:
        """An event of several calls whose claim this owner took: resume after the calls an
        earlier owner got accepted (a replica killed or partition lost between a group's
        company identify and its association: the identify was sent twice, review
        "scale23"). One Redis read, for such events only."""
        if (self.dedup is None or event.dedup_owner is None or not event.message_id
                or len(send.calls) < 2 or event.plan is not None):
            return
        note = await self.dedup.progress_of(endpoint, event.message_id)
        plan = event.plan = CallPlan(send.calls, self.known)
        for call in plan.resume(note):
            self.m.duplicates_skipped.labels(call.endpoint).inc()
            if log.isEnabledFor(logging.DEBUG):
                log.debug("resumed: %s was accepted before (an earlier owner)", call.endpoint,
                          extra=event.fields)

    async def _dedup_progress(self, event: Event, endpoint: str, note: str) -> None:
        """Note the calls accepted so far before the next call; counted as on the wire and
        shielded (a drain waits for it) like the confirm."""
        if self.dedup is None or event.dedup_owner is None or not event.message_id:
            return
        event.on_wire = True
        try:
            await asyncio.shield(self.dedup.progress(endpoint, event.message_id, note))
        finally:
            event.on_wire = False

    async def _dedup_reclaim(self, event: Event, endpoint: str,
                             permit: Permit | None = None) -> bool:
        """Renew the claim right before a request; True to send now, False when another
        owner holds it (the caller waits for the limiter again). Raises AlreadyDelivered.
        Waiting out another owner's claim, it gives its connection `permit` back (the
        policy's own release is then a no-op if taking it again is cancelled)."""
        if self.dedup is None or event.dedup_owner is None or not event.message_id:
            return True
        claim = await self.dedup.claim(endpoint, event.message_id, event.dedup_owner)
        if claim.outcome is Claim.DUPLICATE:
            event.dedup_owner = None
            raise AlreadyDelivered(endpoint)
        if claim.outcome is Claim.BUSY:
            # Waited out here, asked at `BusyWait`'s pace; then the caller takes a new slot
            # (the one taken is past), and the claim is asked once more before the request.
            if permit is not None:
                permit.release()
            busy = BusyWait()
            while claim.outcome is Claim.BUSY:
                await asyncio.sleep(busy.after(claim))
                claim = await self.dedup.claim(endpoint, event.message_id, event.dedup_owner)
            if claim.outcome is Claim.DUPLICATE:
                event.dedup_owner = None
                raise AlreadyDelivered(endpoint)
            if permit is not None:
                await permit.acquire()
            return False
        if claim.degraded:
            event.unchecked = True  # counted in `_handle` once delivered (once per event)
        return True

    async def _dedup_confirm(self, event: Event, endpoint: str) -> None:
        """Record the delivery. Counted as on the wire (a revoke or shutdown waits for it)
        and shielded from cancellation: a confirm cut short would leave the claim for the
        next owner to wait out and then send again."""
        if self.dedup is None or event.dedup_owner is None or not event.message_id:
            return
        event.on_wire = True
        try:
            await asyncio.shield(self.dedup.confirm(endpoint, event.message_id))
        finally:
            event.on_wire = False
            event.dedup_owner = None

    async def _dedup_release(self, event: Event, endpoint: str) -> None:
        """Give the claim up (bounded: a revoke or shutdown may be waiting for this)."""
        owner, event.dedup_owner = event.dedup_owner, None
        if self.dedup is None or owner is None or not event.message_id:
            return
        # Counted as on the wire (a drain waits for it) and shielded (a cancel arriving
        # anyway ends only this wait): a release cut short leaves the claim for the next
        # owner to wait out, its partition's offset held meanwhile.
        event.on_wire = True
        try:
            async with asyncio.timeout(RELEASE_TIMEOUT_S):  # not wait_for: see `Gate.admit`
                await asyncio.shield(self.dedup.release(endpoint, event.message_id, owner))
        except TimeoutError:
            log.warning("claim not released in time; it expires after its TTL",
                        extra=event.fields)
        finally:
            event.on_wire = False

    # -- deliver ------------------------------------------------------------------------
    def limiter_for(self, call: Call) -> Limiter:
        """The limiter of the endpoint family `call` goes to (track or identify)."""
        return self.limiters(call.family)

    async def _deliver(self, event: Event, send: Send) -> None:
        """Send the event's calls in order; the first that fails ends the event.

        A DeadLetter (or a Retry given up) of any call dead-letters the whole event, with
        the event's own bytes and headers, as for a Track.
        """
        plan = event.plan
        if plan is None:
            plan = event.plan = CallPlan(send.calls, self.known)
        # The claim is renewed before every request of the event, not only its last: a
        # group's company identify (the endpoint the id is recorded under) went out
        # unchecked after a wait for its slot longer than the claim's TTL, while another
        # owner of the same messageId, holding the lapsed claim, sent it too.
        endpoint = self.dedup_endpoint(send)
        while (call := plan.next_call()) is not None:
            user = call.user_id if call.purpose == "ensure_user" else None
            if user is not None:
                under_way = self._ensuring.get(user)
                if under_way is not None:
                    # Another event's identify of this user is on its way: its answer
                    # decides (known: the Track goes; failed: this event sends its own).
                    await under_way.wait()
                    continue
                self._ensuring[user] = asyncio.Event()
            company = call.written_company if event.writes else None
            try:
                left = None if user is None else await self._identified_elsewhere(user)
                if user is not None and left is not None:
                    plan.succeeded(call)  # no request; remembered here too, for what is
                    if self.known is not None:  # left of that identify's TTL, not a new one
                        # ... and for at most SHARED_RECHECK_S: Redis is asked again after
                        # it, so a user `delete-users` removed from the shared record is
                        # identified again within that, not after the TTL (review "users41").
                        self.known.learned(user, left, SHARED_RECHECK_S)
                    self.m.ensure_user_shared.inc()
                    continue
                if company is not None and event.writes:
                    if self._undecided:
                        await self._decide_earlier(event.intake)
                    await self.companies.turn(event.writes, company, event.fields)
                try:
                    await self._send_call(event, call, endpoint)
                except (DeadLetter, Retry) as exc:
                    exc.call = f"{call.purpose} {call.method} {call.path}"
                    raise
                plan.succeeded(call)  # remembered before the waiters wake
                if call.user_id is not None and self.known is not None:
                    await self._note_identified(event, call.user_id)
            finally:
                if user is not None:
                    self._ensuring.pop(user).set()
                if company is not None and event.writes:
                    self.companies.written(event.writes, company)
            if not plan.done:
                # Each call has the whole retry budget, and the attempts a DLQ record
                # reports are those of the call that failed (first_attempt stays the
                # event's first).
                event.attempts.answered = event.attempts.count = event.attempts.refused = 0
                event.attempts.refused_at = None
                # The 429s waited out are the call's, not a credit for the next: kept, an
                # ensure-user's 300 s of 429s let its Track retry 5xx for 420 s against a
                # 100 s budget (review "order44").
                event.attempts.limited_up, event.attempts.limited_since = 0.0, None
                event.requested = False
                if call.purpose != "ensure_user":
                    await self._dedup_progress(event, endpoint, plan.progress_note())
            if call.purpose == "ensure_user":
                self.m.ensure_user_identify.inc()

    async def _identified_elsewhere(self, user_id: str) -> float | None:
        """Ensure-user across replicas and restarts (with Redis): a user some replica
        identified within USERPILOT_ENSURE_USER_TTL_SECONDS is not identified again. Each
        replica kept its own record alone, so a restart or a rolling deploy sent one
        identify per active user again, each taking a slot of the identify budget (10 a
        second) in front of that user's Tracks. Redis failing: the identify is sent. The
        seconds left of that identify's TTL, or None."""
        if self.dedup is None:
            return None
        try:
            return await self.dedup.user_record(user_id, self.s.ensure_user_ttl_s)
        except SharedStateUnavailable:
            # Redis cannot say now: what it said last holds (a user learned from it, asked
            # again after a minute, was identified again during every Redis outage: one
            # identify per active user in front of its Tracks, review "diff41").
            return None if self.known is None else self.known.shared_left(user_id)

    async def _note_identified(self, event: Event, user_id: str) -> None:
        """Userpilot accepted an identify of `user_id`: shared for the other replicas
        (bounded like a release). Counted as on the wire, as the confirm is: a drain
        that cancelled the event here, between the identify's 2xx and its confirm, left
        the next owner to send the identify again (review "diff35")."""
        if self.dedup is None:
            return
        event.on_wire = True
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RELEASE_TIMEOUT_S):
                    await asyncio.shield(
                        self.dedup.note_user(user_id, self.s.ensure_user_ttl_s))
        finally:
            event.on_wire = False

    def _lane(self, limiter: Limiter) -> PriorityLane:
        lane = self._lanes.get(id(limiter))
        if lane is None:
            lane = self._lanes[id(limiter)] = PriorityLane(limiter)
        return lane

    async def _send_call(self, event: Event, call: Call, dedup: str | None = None) -> None:
        """One request: the gate, its family's limiter and the retry policy.

        A call that another call of the same user waits for (the ensure-user identify in
        front of a Track, the company association after a company identify) takes the
        family's next slot before queued events (`PriorityLane`), so a saturated identify
        backlog cannot stall that user's Tracks. Other identify calls are served in the
        worker's intake order (`Event.intake`), lowest offset first, so the committable
        offset moves. Track calls take their limiter directly, in arrival order: the lane's
        pump in front of the Redis-shared budget cost it ~8 points of the limit (measured
        on the hot-partition test), and Track has no urgent calls to let ahead.
        `dedup`: the endpoint whose messageId claim is renewed right before the request.
        """
        limiter = self.limiter_for(call)
        wait = self._limiter_wait(call.family)
        if call.family == "identify":
            # Only identify calls compete with urgent ones (ensure-user, company association);
            # Track calls take the limiter directly, without the lane's pump in between.
            lane = self._lane(limiter)
            urgent = call.purpose in URGENT

            async def acquire() -> float:
                # Same urgency: the event taken first is served first, so the committable
                # offset advances instead of waiting behind later events.
                return await lane.acquire(urgent, event.intake)
        else:
            acquire = limiter.acquire

        permit = Permit(self._connections[call.family], urgent=call.purpose in URGENT,
                        order=event.intake)

        async def wait_for_limiter() -> None:
            # The permit's wait behind holders that waited for slots is this limiter's
            # queue too (`Permit.for_limiter`), so it is counted here.
            self._check_halted(event)  # no slot of the budget for an event that will stop
            wait.observe(await acquire() + permit.for_limiter)
            self._check_halted(event)
            while dedup is not None and not await self._dedup_reclaim(event, dedup, permit):
                wait.observe(await acquire() + permit.for_limiter)
                self._check_halted(event)

        await self.policy.run(lambda: self._attempt(event, call, limiter, permit),
                              event.attempts, before_send=wait_for_limiter, hold=permit,
                              endpoint=call.endpoint)

    async def _attempt(self, event: Event, call: Call, limiter: Limiter,
                       permit: Permit) -> None:
        start = time.perf_counter()
        endpoint = call.endpoint
        sent = False
        requested_before = event.requested
        try:
            # After a stall the group may have given this partition to another replica:
            # asked first (`StallWatch`). A partition halted while this waited for a
            # connection, its slot or the stall's end: unsent, it stops.
            await self.stalls.passable()
            self._check_halted(event)
            event.on_wire = event.requesting = sent = True
            if call.purpose != "ensure_user":
                # Not a Track's ensure-user identify: no request of the messageId's own has
                # gone out, so its claim, kept, only made the next owner wait out its TTL
                # (review "cancel60", as "extremes54" for a 429).
                event.requested = True
            self._connection_wait(endpoint).observe(permit.for_pool)
            permit.sending()
            try:
                status = await self.client.send(call)
            finally:
                permit.sent()
            self._responses(status_label(status), endpoint).inc()
        except Timeout:
            self._responses("timeout", endpoint).inc()
            raise
        except ConnectionFailed:
            self._responses("connection_error", endpoint).inc()
            raise
        except (Retry, Pause, DeadLetter) as exc:
            # No status: an answer that was not HTTP (a malformed status line, a body
            # that does not decode). The proxy's 403 to CONNECT is not Userpilot's: as
            # "403" it read as a refused token on the dashboard.
            self._responses("invalid_response" if exc.status is None
                            else "proxy_refused" if isinstance(exc, ProxyRefused)
                            else status_label(exc.status), endpoint).inc()
            if exc.status is not None and 400 <= exc.status <= 499 and not exc.resent:
                # A 4xx (a 429 too, a proxy's refusal of the tunnel) says the request was
                # not taken: as it was before this attempt. Kept, an event abandoned at a
                # stop during a 429 spell held its claim, and the next owner waited the
                # claim's lifetime for it (10 minutes at the longest timeout, review
                # "extremes54"). Not when the 4xx answered a resend: the request the
                # connection lost may have been taken (review "r54").
                event.requested = requested_before
            if isinstance(exc, RateLimited):
                limiter.slow_down()
                self.m.rate_limit_rps.labels(self.budget(call.family)).set(limiter.share_rate)
            raise
        finally:
            event.on_wire = event.requesting = False
            if sent:
                # Only requests that went out: a drain cancelling the queue recorded its
                # waits as requests (90 at one SIGTERM, review "slowup20").
                self._latency(endpoint).observe(time.perf_counter() - start)

    # -- dead-letter --------------------------------------------------------------------
    async def _dead_letter(self, event: Event, exc: DeadLetter | Retry) -> DeadLettered:
        reason = "retries_exhausted" if isinstance(exc, Retry) else exc.reason
        # A replayed event that fails again says nothing of a deploy: replayed dead letters
        # come as one block, and undecodable ones replayed unchanged stopped the worker
        # every ~50 of them (review "replay17"). WORKER_REPLAY_MAX bounds that loop. Only
        # replay's seal says an event is one (a count alone, any producer could set).
        replayed = sealed_replay_count(event.headers, event.topic, event.value,
                                       self._replay_secret) > 0
        if not replayed:
            already = self.guard.tripped_reason is not None
            if not self.guard.allow_dead_letter(event.intake or None):
                self.m.dlq_guard_tripped.set(1)
                # Once: every event in flight meets the tripped guard on its way out (the
                # same CRITICAL line a hundred times buried the first).
                log.log(logging.DEBUG if already else logging.CRITICAL,
                        "DLQ guard tripped: %s. Not dead-lettering and stopping: this looks "
                        "like a broken deploy or configuration, not bad events. Offsets "
                        "from here on stay uncommitted.", self.guard.tripped_reason,
                        extra=event.fields)
                raise DlqGuardTripped(self.guard.tripped_reason or "DLQ guard")
        failure = Failure(
            reason=reason, exception_class=type(exc).__name__, message=str(exc),
            status=exc.status, body=exc.body, attempts=event.attempts.count,
            first_attempt=event.attempts.first_wall, last_attempt=event.attempts.last_wall,
            at=time.time(), call=exc.call, worker=self.instance,
        )
        record = dead_letter_record(
            key=event.key, value=event.value, headers=event.headers,
            timestamp_ms=event.timestamp_ms, topic=event.topic, partition=event.partition,
            offset=event.offset, failure=failure,
            max_bytes=producer_limit(self.s.kafka_config()), secrets=self._secrets)
        whole = record
        # Where a record without a key goes: beside the user's other dead letters (a
        # keyless event's user; a record cut bare, its original key's partition).
        ordering = event.ordering_key
        placement = event.key or (ordering if isinstance(ordering, bytes) else None)
        delay = 0.5
        event.on_wire = True  # from here a cancelled job could leave a DLQ record behind
        token = self.dlq_writable.started()
        refused: BaseException | None = None  # the DLQ's last refusal of this dead letter
        first_try = time.monotonic()
        try:
            while True:
                try:
                    event.dlq_since = time.monotonic()
                    await self.dlq.send(self.s.dlq_topic, key=record.key, value=record.value,
                                        headers=record.headers, placement=placement)
                    if refused is not None:
                        # The end of the refusal, said: the last line of a DLQ outage was
                        # its ERROR (review "logs56"). Keyed by the refusal, as its lines.
                        dlq_log.warning("dead letter written after the DLQ refused it (%s) "
                                        "for %.0f s; its partition goes on", refused,
                                        time.monotonic() - first_try, extra=event.fields)
                    break
                except DlqRecordTooLarge as too_large:
                    bare = without_originals(record) if record.value_omitted else record
                    if bare is not record:
                        # Refused without its value: its original key and headers are
                        # over the DLQ topic's limit (lower than the producer's, which
                        # the first cut used). Written without them as well; they
                        # stalled the partition for ever (review "replay17").
                        dlq_log.warning("dead letter too large for the DLQ without its "
                                        "value (%s); writing it without its key and "
                                        "headers too", too_large, extra=event.fields)
                        record = bare
                        continue
                    if record.value_omitted:
                        # Even the bare record is refused (a DLQ topic with a tiny
                        # max.message.bytes): the DLQ is unwritable until it is fixed.
                        self.dlq_writable.failed(token, too_large)
                        refused = too_large
                        dlq_log.error("dead letter refused even without its value (%s); "
                                      "retrying in %.1f s", too_large, delay,
                                      extra=event.fields)
                        await _off_the_wire(event, delay)
                        delay = min(delay * 2, 30.0)
                        # Whole again: the operator may have raised the topic's limit
                        # meanwhile. Retried bare, the record lost its value, key and
                        # headers for good although it fitted by then (review "dlq33").
                        record = whole
                        continue
                    # Retrying the same bytes can never succeed: once more without the
                    # value (replay fetches it from the source topic by its coordinates).
                    dlq_log.warning("dead letter too large for the DLQ (%s); writing it "
                                    "without its value", too_large, extra=event.fields)
                    record = without_value(record, producer_limit(self.s.kafka_config()))
                except Exception as produce_error:
                    self.dlq_writable.failed(token, produce_error)
                    refused = produce_error
                    dlq_log.error("dead-letter produce failed (%s); retrying in %.1f s",
                                  produce_error, delay, extra=event.fields)
                    await _off_the_wire(event, delay)
                    delay = min(delay * 2, 30.0)
        finally:
            self.dlq_writable.finished(token)
            event.dlq_since = None  # off the wire: a later Redis call is no dead letter
        self.m.dead_lettered.labels(reason).inc()
        # Cut as the DLQ header is: a schema resolution error quotes both schemas (~15 KB a
        # line, for every event of that schema, review "poison21").
        # Masked before the cut: a secret across it would be left half shown (the log
        # filter masks whole secrets only).
        # Two arguments: the rate limit keys on the template and the first (the reason);
        # a third text argument read as a librdkafka line's, keyed by its first word too
        # (review "diff53b").
        said = _cut(redact(str(exc), self._secrets, edges=False))
        dead_log.warning("dead-lettered (%s): %s", reason,
                         f"{exc.call}: {said}" if exc.call else said, extra=event.fields)
        return DeadLettered(reason, exc, counted=not replayed, at=failure.at or 0.0)
