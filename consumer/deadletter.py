"""Dead-letter records and the guard that stops a bad deploy from emptying the topic.

A DLQ record keeps the original key, value and headers, and adds the Kafka Connect
`__connect.errors.*` context headers (so tools that read Connect DLQs work on ours) plus
this worker's own `userpilot.*` headers. Its timestamp is the time it was written, as
Connect's DLQ reporter does, and the original record's is kept in
`userpilot.original.timestamp`: with the original's, Kafka's time retention deleted the
dead letter of an event older than the DLQ's retention minutes after the source offset
was committed (a backlog after a long stop), and the event existed nowhere. Response
bodies and messages are redacted (the token and a proxy's credentials masked, even when a
gateway echoes the request) and truncated.

A dead letter too large for the DLQ (its value near the source topic's limit, plus our
headers, over the producer's `message.max.bytes` or the DLQ topic's limit) is written
without its value: `userpilot.error.value_omitted=true`, the value's SHA-256 and size,
and the source coordinates in the Connect headers, so `replay` fetches the original from
the source topic while it is retained (consumer.dlqfetch). The partition moves on.
"""

from __future__ import annotations

import bisect
import hashlib
import hmac
import itertools
import logging
import operator
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Generic, Protocol, TypeVar

from consumer.answers import BODY_LIMIT
from consumer.logs import RateLimit
from consumer.redaction import redact

__all__ = [
    "BODY_LIMIT",
    "HEADERS_OMITTED",
    "KEY_OMITTED",
    "ORIGINAL_TIMESTAMP",
    "VALUE_OMITTED",
    "VALUE_SHA256",
    "VALUE_SIZE",
    "DlqGuard",
    "DlqRecord",
    "Failure",
    "GuardHold",
    "Header",
    "dead_letter_record",
    "dlq_headers",
    "header_value",
    "message_headers",
    "normalize_headers",
    "origin_topic",
    "producer_limit",
    "record_size",
    "replay_count",
    "replay_seal",
    "sealed_replay_count",
    "source_of",
    "value_omitted",
    "without_originals",
    "without_value",
]

CONNECTOR_NAME = "userpilot-delivery-worker"
REPLAY_COUNT = "userpilot.replay.count"
REPLAY_SEAL = "userpilot.replay.seal"  # `replay_seal`: the count is replay's own
ORIGINAL_TIMESTAMP = "userpilot.original.timestamp"  # ms since the epoch, as Kafka's
VALUE_OMITTED = "userpilot.error.value_omitted"
VALUE_SHA256 = "userpilot.error.value_sha256"
VALUE_SIZE = "userpilot.error.value_size"
KEY_OMITTED = "userpilot.error.key_omitted"
HEADERS_OMITTED = "userpilot.error.headers_omitted"
# librdkafka's message.max.bytes default; the broker's default topic limit is 1,048,588.
PRODUCER_MAX_BYTES = 1_000_000
# Record framing on top of key, value and headers, over-estimated (librdkafka's v2
# maximum is well under 100 bytes; a batch adds 61).
RECORD_OVERHEAD = 256
HEADER_OVERHEAD = 10

Header = tuple[str, bytes | None]
"""A Kafka header; a null value stays None (Kafka tells a null header value from an empty one)."""


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
    at: float | None = None  # wall time it was dead-lettered (`replay --since/--until`)
    call: str = ""  # the request that failed (`ensure_user POST /v1/identify`); "" if none
    worker: str = ""  # the worker run that wrote it (`Handler.instance`): `replay --skip-void`


def iso_ms(ts: float) -> str:
    """A wall time as the DLQ's time headers write it (UTC, milliseconds): the form
    `replay --since/--until` read, and the worker's guard-trip line quotes."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


def _iso(ts: float | None) -> bytes:
    return b"" if ts is None else iso_ms(ts).encode()


log = logging.getLogger(__name__)
log.addFilter(RateLimit(30.0))

_headers_of = operator.methodcaller("headers")
"""`message.headers()` through the checked call path. Written as a method call, CPython
3.11 specialises the call site once it is warm (PRECALL_NO_KW_METHOD_DESCRIPTOR_NOARGS),
and that path does not check for a C function returning a result *with* an exception set:
confluent-kafka's header list with a key that is not UTF-8 then came back half-built, and
reading it crashed the process (SIGSEGV) in a worker that had read a few messages before
(review "poison21"'s SystemError showed only in a fresh process). Called once per message:
confluent-kafka caches that list, and a second call returns it without the error."""


class _Headed(Protocol):
    def topic(self) -> str | None: ...
    def partition(self) -> int | None: ...
    def offset(self) -> int | None: ...
    def headers(self) -> Any: ...


def message_headers(message: _Headed) -> list[Header]:
    """A Kafka message's headers; none (with a warning, at most one a topic every 30 s)
    when the client cannot read them.

    Why: confluent-kafka decodes header keys as strict UTF-8, and a key that is not (any
    byte-level producer may write one) raises SystemError from `headers()`. Uncaught, one
    such message stopped the worker, on every restart (review "poison21"), or crashed it
    (see `_headers_of`). The event
    itself is readable: it goes on without headers (a DLQ record read so has no origin,
    and replay reports it)."""
    try:
        return normalize_headers(_headers_of(message))
    except Exception as exc:
        log.warning("%s: headers left out at partition %s offset %s: the Kafka client "
                    "cannot read them (%s; a header key that is not UTF-8?)",
                    message.topic(), message.partition(), message.offset(),
                    type(exc).__name__)
        return []


def normalize_headers(raw: object) -> list[Header]:
    """Kafka headers (list of pairs, or a dict) as (str, bytes | None) pairs; str values
    encoded, a null value kept None."""
    items: Any = raw.items() if isinstance(raw, dict) else (raw or [])
    out: list[Header] = []
    for key, value in items:
        if isinstance(value, str):
            value = value.encode()
        out.append((str(key), None if value is None else bytes(value)))
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
        # Never below 0: a producer's "-5" took five more replays to reach the limit.
        return max(0, int(raw.decode())) if raw else 0
    except ValueError:
        return 0


def replay_seal(secret: bytes, topic: str, value: bytes | None, count: int) -> bytes:
    """What `replay` writes beside the count it publishes: an HMAC (keyed by the write
    token, `Settings.replay_secret`) of the count, the topic and the value. The DLQ guard
    leaves replayed events out (they come as a block); on the count alone, any producer or
    pipeline copying headers turned the guard off (review "kafka18")."""
    digest = hashlib.sha256(value or b"").digest()
    message = b"%d\0%s\0%s" % (count, topic.encode(), digest)
    return hmac.new(secret, message, "sha256").hexdigest()[:32].encode()


def sealed_replay_count(headers: Sequence[Header] | None, topic: str, value: bytes | None,
                        secret: bytes) -> int:
    """`replay_count` when `replay` wrote it for this topic and value (its seal holds);
    else 0."""
    count = replay_count(headers)
    if count <= 0:
        return 0
    seal = header_value(headers, REPLAY_SEAL)
    if seal is None or not hmac.compare_digest(seal, replay_seal(secret, topic, value, count)):
        return 0
    return count


def _cut_utf8(text: str) -> str:
    """`text` within BODY_LIMIT bytes of UTF-8 (1 KiB, as README says), never cutting a
    character: cut at 1,024 characters, a body of CJK text took 3 KiB (review "replay42")."""
    if len(text) * 4 <= BODY_LIMIT:
        return text
    return text.encode("utf-8", "replace")[:BODY_LIMIT].decode("utf-8", "ignore")


def dlq_headers(
    original: Sequence[Header] | None, *, topic: str, partition: int, offset: int,
    failure: Failure, secrets: Iterable[str] = (), timestamp_ms: int | None = None,
) -> list[Header]:
    """Original headers (minus stale error headers) plus the error context, and the
    original record's `timestamp_ms` (`ORIGINAL_TIMESTAMP`).

    `secrets` (the token) are masked in the body and message before they are truncated;
    a fragment of one at the end of a body truncated upstream is masked too. The replay
    count and original time stay, sealed or not: `replay` without the token, or after a
    rotation, writes records the worker cannot verify, and their count is what bounds
    replaying a poison event (review diff28).
    """
    kept = [
        (k, v) for k, v in (original or ())
        if not k.startswith("__connect.errors.") and not k.startswith("userpilot.error.")
    ]
    secrets = list(secrets)
    body = _cut_utf8(redact(failure.body, secrets))
    said = f"{failure.call}: {failure.message}" if failure.call else failure.message
    message = _cut_utf8(redact(said, secrets))
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
        ("__connect.errors.exception.message", message.encode("utf-8", "replace")),
        # No Java stack here; Connect's first stacktrace line is "class: message". Text
        # quoted from an answer or an event is encoded with "replace": a lone surrogate
        # in it stopped the worker here (review "poison21").
        ("__connect.errors.exception.stacktrace",
         f"{failure.exception_class}: {message}".encode("utf-8", "replace")),
        ("userpilot.error.reason", failure.reason.encode()),
        ("userpilot.error.status", b"" if failure.status is None
         else str(failure.status).encode()),
        ("userpilot.error.call", failure.call.encode("utf-8", "replace")),
        ("userpilot.error.body", body.encode("utf-8", "replace")),
        ("userpilot.error.attempts", str(failure.attempts).encode()),
        ("userpilot.error.first_attempt", _iso(failure.first_attempt)),
        ("userpilot.error.last_attempt", _iso(failure.last_attempt)),
        ("userpilot.error.dead_lettered_at", _iso(failure.at)),
        ("userpilot.error.worker", failure.worker.encode("utf-8", "replace")),
    ]
    if header_value(kept, REPLAY_COUNT) is None:
        added.append((REPLAY_COUNT, b"0"))
    if (timestamp_ms is not None and timestamp_ms >= 0
            and header_value(kept, ORIGINAL_TIMESTAMP) is None):
        # A replayed record carries its first original's time already: kept, not replaced.
        # 0 is a time (replay stamped the dead-lettering time for it); a negative one is
        # none: it was written as "-1" (review "clock53").
        added.append((ORIGINAL_TIMESTAMP, str(timestamp_ms).encode()))
    return kept + added


@dataclass(frozen=True)
class DlqRecord:
    """One record to produce to the DLQ, as plain data."""

    key: bytes | None
    value: bytes | None
    headers: list[Header]

    @property
    def size(self) -> int:
        return record_size(self.key, self.value, self.headers)

    @property
    def value_omitted(self) -> bool:
        return value_omitted(self.headers)


def record_size(key: bytes | None, value: bytes | None, headers: Sequence[Header]) -> int:
    """Bytes a record takes against `message.max.bytes`, over-estimated (framing included)."""
    return (RECORD_OVERHEAD + len(key or b"") + len(value or b"")
            + sum(len(k.encode()) + len(v or b"") + HEADER_OVERHEAD for k, v in headers))


def producer_limit(conf: Mapping[str, Any], topic_limit: int | None = None) -> int:
    """The largest record the DLQ accepts: the producer's `message.max.bytes` (librdkafka
    refuses bigger ones locally), its whole queue (`queue.buffering.max.kbytes`: a value
    larger is refused "Queue full" however long it waits, and the dead letter held its
    partition for good while `/readyz` blamed the brokers, review "pass56") and, when
    known, the DLQ topic's `max.message.bytes`."""
    limit = _setting(conf, "message.max.bytes", PRODUCER_MAX_BYTES)
    queue = _setting(conf, "queue.buffering.max.kbytes", 0)
    if queue > 0:
        limit = min(limit, queue * 1024)
    return min(limit, topic_limit) if topic_limit else limit


def _setting(conf: Mapping[str, Any], key: str, default: int) -> int:
    """A whole-number librdkafka setting from `conf` (`default` when unset or not one)."""
    try:
        return int(conf.get(key, default))
    except (TypeError, ValueError):
        return default


def value_omitted(headers: Sequence[Header] | None) -> bool:
    """True for a DLQ record written without the event's value (it was too large)."""
    return header_value(headers, VALUE_OMITTED) == b"true"


def origin_topic(headers: Sequence[Header] | None) -> str | None:
    """The topic the dead letter came from, when its header could name one: text, and no
    NUL, which the Kafka client refuses with a ValueError of its own (not a KafkaError): a
    foreign or edited dead letter stopped every replay run at that record (review
    "dlq41"). Other names Kafka refuses it refuses per record, as refused for good."""
    raw = header_value(headers, "__connect.errors.topic")
    # Nor longer than Kafka's 249 characters: past 512 bytes the client refused it with a
    # RuntimeError of its own (review "replay41").
    if not raw or b"\x00" in raw or len(raw) > 249:
        return None
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return None


def source_of(headers: Sequence[Header] | None) -> tuple[str, int, int] | None:
    """(topic, partition, offset) the dead letter came from, from its Connect headers."""
    topic = origin_topic(headers)
    partition = header_value(headers, "__connect.errors.partition")
    offset = header_value(headers, "__connect.errors.offset")
    if topic is None or partition is None or offset is None:
        return None
    try:
        found = topic, int(partition.decode()), int(offset.decode())
    except (UnicodeDecodeError, ValueError):
        return None
    # Coordinates Kafka can hold (32-bit partition, 64-bit offset): an edited header out
    # of range raised from the Kafka client and stopped every replay at this record
    # (review "dlq40").
    if not (0 <= found[1] < 2**31 and 0 <= found[2] < 2**63):
        return None
    return found


def _ours(name: str) -> bool:
    """A header the worker writes about the failure, kept when the originals are left out
    (`without_originals` carries the replay count and the original's time itself)."""
    return name.startswith(("__connect.errors.", "userpilot.error."))


def without_value(record: DlqRecord, max_bytes: int | None = None) -> DlqRecord:
    """The record with its value left out (hash, size and a flag in headers instead).

    Also for a record the broker refused as too large (MSG_SIZE_TOO_LARGE) although it
    looked small enough: the DLQ topic's own limit may be lower than the producer's. If
    even that is over `max_bytes` (a huge key or original headers), those go too; the
    original is still fetched whole from the source coordinates.
    """
    if record.value_omitted:
        return record
    value = record.value or b""
    headers = [*record.headers,
               (VALUE_OMITTED, b"true"),
               (VALUE_SHA256, hashlib.sha256(value).hexdigest().encode()),
               (VALUE_SIZE, str(len(value)).encode())]
    slim = replace(record, value=None, headers=headers)
    if max_bytes is None or slim.size <= max_bytes:
        return slim
    return without_originals(slim)


def without_originals(record: DlqRecord) -> DlqRecord:
    """A value-less record with the original key and headers left out too (only ours
    stay); `replay` fetches them back from the source coordinates with the value.

    The replay count and the original's time stay as `replay` reads them (the original's
    time: the source record does not carry it, and replay wrote the dead-lettering time in
    its place, review "diff17b"), one header each: an event's own copies travelled at any
    size and number and kept this last form over any DLQ topic's limit, retried for ever
    (review "diff51b"), and carrying another copy than the one read reset the count that
    bounds replaying a poison event (review "whole51")."""
    if header_value(record.headers, KEY_OMITTED) == b"true":
        return record
    headers: list[Header] = [(k, v) for k, v in record.headers if _ours(k)]
    # Bounded: a count of thousands of digits is over any --max-replays anyway.
    headers.append((REPLAY_COUNT, str(min(replay_count(record.headers), 2**31)).encode()))
    when = header_value(record.headers, ORIGINAL_TIMESTAMP)
    if when and len(when) <= 20 and when.isdigit():
        headers.append((ORIGINAL_TIMESTAMP, when))
    headers += [(KEY_OMITTED, b"true"), (HEADERS_OMITTED, b"true")]
    return replace(record, key=None, headers=headers)


def dead_letter_record(
    *, key: bytes | None, value: bytes | None, headers: Sequence[Header] | None,
    timestamp_ms: int | None, topic: str, partition: int, offset: int, failure: Failure,
    max_bytes: int = PRODUCER_MAX_BYTES, secrets: Iterable[str] = (),
) -> DlqRecord:
    """The DLQ record for one event: its bytes plus error headers, or, when that would be
    over `max_bytes` (see `producer_limit`), the same without its value."""
    record = DlqRecord(key, value, dlq_headers(headers, topic=topic, partition=partition,
                                               offset=offset, failure=failure,
                                               secrets=secrets, timestamp_ms=timestamp_ms))
    if record.size <= max_bytes:
        return record
    return without_value(record, max_bytes)


ERROR_SHOWN = 600
"""Characters of the last DLQ error `/readyz` quotes (a policy problem's fix included)."""


class DlqWritable:
    """Whether dead letters get written: a record pending longer than `after_s` (refused,
    retried, or unacknowledged) means the DLQ is unwritable. Readiness and the
    `userpilot_dlq_unwritable` gauge read `problem`; the partition of that event is stuck
    meanwhile, so it must not stay silent. Thread-safe (the gauge is read at scrape time).
    """

    def __init__(self, after_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.after_s = after_s
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: dict[int, float] = {}
        self._errors: dict[int, str] = {}  # per pending dead letter, its last failure
        self._next = 0

    def started(self) -> int:
        """A dead letter is about to be produced; returns its token."""
        with self._lock:
            self._next += 1
            self._pending[self._next] = self._clock()
            return self._next

    def failed(self, token: int, error: BaseException | str) -> None:
        """Why dead letter `token` was not written: Kafka's own text (not the KafkaError
        repr, which cut the fix a policy problem names, `kafka-configs.sh …`, at 200
        characters; review "dlqfail44")."""
        if isinstance(error, BaseException):
            said = getattr(error.args[0] if error.args else None, "str", None)
            text = str(said()) if callable(said) else str(error)
        else:
            text = error
        with self._lock:
            if token in self._pending:
                self._errors[token] = text[:ERROR_SHOWN]

    def finished(self, token: int) -> None:
        """The record was acknowledged (or abandoned: a cancelled job); its error goes
        with it. One error for all, a later dead letter merely slow to be acknowledged was
        named by an old one another had (review "diff44")."""
        with self._lock:
            self._pending.pop(token, None)
            self._errors.pop(token, None)

    def problem(self) -> str | None:
        """A readiness check: None while dead letters get written in time. Read under one
        hold of the lock: the probe thread read the wait, then the oldest record, and one
        acknowledged between the two was named "no acknowledgement" without Kafka's own
        text (review "threads46")."""
        with self._lock:
            if not self._pending:
                return None
            oldest = min(self._pending, key=self._pending.__getitem__)
            waited = self._clock() - self._pending[oldest]
            error = self._errors.get(oldest, "")
        if waited <= self.after_s:
            return None
        # Without an error yet: librdkafka retries a retriable refusal (no leader, fewer
        # in-sync replicas than min.insync.replicas) until message.timeout.ms, silently;
        # "no acknowledgement" alone named no cause (review "dlq54").
        return f"DLQ unwritable for {waited:.0f} s ({error or NO_ACK})"


NO_ACK = ("no acknowledgement from the brokers: the DLQ topic's partition has no leader, or "
          "fewer in-sync replicas than its min.insync.replicas; see kafka-topics.sh "
          "--describe --topic <KAFKA_DLQ_TOPIC>")
"""Readiness's cause while a dead letter waits with no error told yet."""


class DlqGuard:
    """Trips when dead letters pass a ratio over a window or a run length (Arroyo's DlqLimit).

    Only outcomes of events that reached delivery or decoding count; filtered drops
    are neither successes nor failures of the integration.

    Both limits read the outcomes in stream order (`seq`: the worker's intake order), not
    in the order they finish. One user's events run one after another while the others'
    run side by side, so at the end of any backlog the last outcomes to finish were that
    user's: one user Userpilot rejects, 5 % of a backlog, made half of the last 100
    finished and stopped healthy replicas as "a broken deploy" (review "kill16"). Around
    an event in the stream, its neighbours are other users' events, as they were produced.
    Without `seq`, outcomes are numbered as they come.
    """

    def __init__(self, max_ratio: float, window: int, max_consecutive: int) -> None:
        self._max_ratio = max_ratio
        self._window = window
        self._max_consecutive = max_consecutive
        # Dead letters by stream position, ascending and each once: the window's count is
        # two bisections, and so is a run's length, since positions p..q are all dead
        # exactly where their places in the list are q - p apart (`_run`). Walking the run
        # and summing the window per dead letter grew with them: with the limits raised to
        # drain a bad run (README), ~5 ms a dead letter at a run of 50,000 (review
        # "scale46"). Other outcomes need no record: a position not dead (good, or not
        # known yet) ends a run and adds nothing to the window. The memory is of dead
        # letters only (a late one still joins the runs beside it, however many good
        # events finished meanwhile): ~36 bytes each, at most 2 × `_keep` of them.
        self._dead: list[int] = []
        self._keep = 2 * max(window, max_consecutive) + 1024
        self._numbered = itertools.count(1)
        self.tripped_reason: str | None = None

    def record_success(self, seq: int | None = None) -> None:
        """Nothing to record (a position not dead ends runs and adds nothing to the
        window); the outcome is numbered when no position is given."""
        self._seq(seq)

    def allow_dead_letter(self, seq: int | None = None) -> bool:
        """Count one more dead letter; False (and trip) if that would pass a limit."""
        if self.tripped_reason is not None:
            return False
        at = self._seq(seq)
        dead = self._dead
        index = bisect.bisect_left(dead, at)
        if index < len(dead) and dead[index] == at:
            return True  # counted already (one outcome per event: never from the worker)
        # The run of dead letters through this one, over adjacent stream positions only:
        # before it, and after it (finished first). A position whose outcome is not known
        # yet (a good event still waiting for Userpilot's answer, while dead letters are
        # decided at intake) ends the run: one bad event in four, with good ones in
        # flight, read as "51 consecutive dead letters" (review "replay17"). When it ends
        # dead after all, its own count joins both sides.
        run = self._run(index, at)
        if run > self._max_consecutive:
            self.tripped_reason = (
                f"{run} consecutive dead letters (limit {self._max_consecutive})")
            return False
        # The window: the `window` stream positions ending at this one, those not known
        # yet (or never counted: drops, duplicates) as not dead.
        low = at - self._window + 1
        if low >= 1:
            count = index - bisect.bisect_left(dead, low) + 1
            size = self._window
            if count / size > self._max_ratio:
                self.tripped_reason = (
                    f"{count} dead letters in the last {size} events, ratio "
                    f"{count / size:.2f} > {self._max_ratio:g}"
                )
                return False
        dead.insert(index, at)  # at the end in the common case: in stream order
        if len(dead) > 2 * self._keep:  # amortised: the oldest positions go
            del dead[:-self._keep]
        return True

    def _run(self, index: int, at: int) -> int:
        """The run of adjacent dead positions `at` would make, `index` its place in `_dead`:
        the run ending at `at` - 1 and the one starting at `at` + 1 joined through it. In a
        sorted list of distinct positions, those from place i to place k are adjacent
        exactly when `dead[k] - dead[i] == k - i`, and the places where it holds are a
        block: each end is one bisection away."""
        dead = self._dead
        before = after = 0
        if index and dead[index - 1] == at - 1:
            k, low, high = index - 1, 0, index - 1
            while low < high:  # the first place of the block ending at k
                mid = (low + high) // 2
                if dead[k] - dead[mid] == k - mid:
                    high = mid
                else:
                    low = mid + 1
            before = index - low
        if index < len(dead) and dead[index] == at + 1:
            low, high = index, len(dead) - 1
            while low < high:  # the last place of the block starting at `index`
                mid = (low + high + 1) // 2
                if dead[mid] - dead[index] == mid - index:
                    low = mid
                else:
                    high = mid - 1
            after = low - index + 1
        return before + 1 + after

    def _seq(self, seq: int | None) -> int:
        return next(self._numbered) if seq is None else seq


T = TypeVar("T")


@dataclass(slots=True, eq=False)
class _Held(Generic[T]):
    """A held dead letter: since when, its stream position, and what the guard has read
    past it: `base` outcomes when held, then every outcome read since (`read_at`, the
    count then) but those from before it in the stream (`late`)."""

    since: float
    seq: int
    item: T
    base: int
    read_at: int
    late: int = 0
    chains: tuple[Hashable, ...] = ()  # the states it writes (`overtaken`)
    pending: set[Hashable] = field(default_factory=set)  # those not written again yet
    gone: bool = False  # let go by `overtaken`, still in the hold order (skipped there)


RECENT_MAX = 1024
"""The latest outcomes `GuardHold.hold` looks through: those past a dead letter that finished
before it are among the events in flight beside it, a window's worth. Counting fewer only
holds it longer; the whole horizon (up to a million) cost ~20 ms of event loop a dead
letter (review "diff43")."""


WRITES_KNOWN = 4096
"""States whose latest write `GuardHold` remembers (~1.8 MB, whatever the ids' length:
`calls.state_written` names a long id by its digest, review "growth52"; 16,384 were ~7 MB,
review "whole50"): minutes of writes at the token's 10 requests a second. A dead letter of
an earlier write comes while the events beside it are in flight, a window's worth, or after
its own retries; one forgotten is held as before this rule."""


class GuardHold(Generic[T]):
    """Dead letters whose offsets wait before they are committed, while the DLQ guard could
    still trip on them (pure; the worker's event loop owns it).

    Committed at once, a bad deploy's dead letters up to the trip were behind the commit:
    each restart of the crash loop dead-lettered ~WORKER_DLQ_MAX_CONSECUTIVE more events
    and committed them, and a night of restarts moved the backlog into the DLQ (review
    "ops29"). Held until the guard has read `horizon` outcomes after it in the stream, or
    the worker is idle and no outcome that counts can come (`Worker._held_idle`, `after`),
    or `max_s` passed, or the partition is
    handed over orderly, or every state it sets was set again by later events that reached
    Userpilot (`overtaken`):
    a trip leaves the others uncommitted, and the restart trips again on
    the same events (their dead letters written again: `replay` sends such a copy once).
    The commit's note names the events finished above them.

    Each outcome costs the held it does not move (those after it in the stream), each
    `due` the first held that could be due (at most RECENT_MAX of them not due yet), not
    all that is held: one count of outcomes read for all, the held in hold order (the
    first are the first due; `now` must not go back between calls, as the worker's
    monotonic clock does not) and by stream position. Walked whole per finished event,
    100,000 held (the guard's limits raised to drain a bad run) cost ~8 ms an event
    (review "scale46").
    """

    def __init__(self, horizon: int, max_s: float) -> None:
        self._horizon = max(1, horizon)
        self._max_s = max_s
        self._held: deque[_Held[T]] = deque()  # in hold order: `since` and `read_at` rise
        # Those with a stream position, by it (`_seqs[i]` is `_placed[i].seq`): an outcome
        # from before them in the stream moves none of them (`outcome`).
        self._seqs: list[int] = []
        self._placed: list[_Held[T]] = []
        self._read = 0  # outcomes the guard read so far
        # The stream positions of the latest outcomes read (0: unknown): those past a dead
        # letter that finished before it was held count for it too (`hold`).
        self._recent: deque[int] = deque(maxlen=min(self._horizon, RECENT_MAX))
        self._chains: dict[Hashable, list[_Held[T]]] = {}  # the held, by chain (`overtaken`)
        self._gone = 0  # entries of `_held` let go by `overtaken`: dropped when met
        # The latest stream position of a write of each state that reached Userpilot, the
        # WRITES_KNOWN latest states' (`hold`, `overtaken`).
        self._written: OrderedDict[Hashable, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._held) - self._gone

    def hold(self, item: T, now: float, seq: int = 0,
             chains: Sequence[Hashable] = ()) -> bool:
        """Hold `item`, the dead letter at stream position `seq` (the intake order), of an
        event writing `chains` (a user's traits, a company's properties, a membership:
        `overtaken`).
        False, not held, when a later write of one of them reached Userpilot already (a
        company's next update waits for this event's company call, not for the event:
        held, it was read again after a trip and undid that update; review "diff50c").

        The events after it that finished first (its dead letter's produce took longer than
        their requests) were read by the guard already: they count as past it. Left out,
        the window's later events all went before it, and with the worker busy elsewhere
        (one user in retries) the dead letter waited `max_s` for outcomes the guard had
        read."""
        pending = {chain for chain in chains if self._written.get(chain, 0) <= seq}
        if seq and chains and not pending:
            return False
        base = sum(1 for read in self._recent if not read or read > seq) if seq else 0
        entry = _Held(now, seq, item, base, self._read, chains=tuple(chains),
                      pending=pending)
        self._held.append(entry)
        for chain in entry.chains:
            self._chains.setdefault(chain, []).append(entry)
        if seq:
            index = bisect.bisect_right(self._seqs, seq)
            self._seqs.insert(index, seq)
            self._placed.insert(index, entry)
        return True

    def outcome(self, seq: int = 0) -> None:
        """One more outcome the guard read, at stream position `seq` (a dead letter's own
        comes before its hold). It moves the guard past the held dead letters before it in
        the stream only: the guard reads in stream order, and a slow user's chain finishing
        late brings outcomes from before a dead letter, which never take the guard past it
        (counted as they finished, they let it go early). 0: position unknown, past all."""
        self._read += 1
        if seq:
            placed = self._placed
            for index in range(bisect.bisect_left(self._seqs, seq), len(placed)):
                placed[index].late += 1  # at or after `seq` in the stream: not moved
        self._recent.append(seq)

    def _past(self, entry: _Held[T]) -> int:
        return entry.base + self._read - entry.read_at - entry.late

    def due(self, now: float) -> list[T]:
        """The held items the guard has moved past, or held `max_s` (oldest held first),
        no longer held."""
        held = self._held
        if not held:
            return []
        # Only those held `horizon` - RECENT_MAX outcomes ago or more can have read
        # `horizon` (`base` is at most the `_recent` window), or held `max_s`: the first.
        read_by = self._read - self._horizon + (self._recent.maxlen or 0)
        out: list[_Held[T]] = []
        kept: list[_Held[T]] = []
        while held and (held[0].read_at <= read_by or now - held[0].since >= self._max_s):
            entry = held.popleft()
            if entry.gone:
                self._gone -= 1
                continue
            if self._past(entry) >= self._horizon or now - entry.since >= self._max_s:
                out.append(entry)
            else:
                kept.append(entry)
        held.extendleft(reversed(kept))
        self._unplace(out)
        return [entry.item for entry in out]

    def overtaken(self, chain: Hashable, seq: int) -> list[T]:
        """The held items writing `chain` before stream position `seq`, whose event that
        writes it again reached Userpilot, and whose every other state was written again
        too: no longer held (a group's company properties set again by another member's
        group leave its own membership to be sent: review "diff50d").

        Held, such a dead letter was read again after a crash or a trip and, accepted then,
        reached Userpilot after the later write: the user kept the older traits (review
        "order50"). Let go, it is committed; its dead letter holds it (replay). Only state
        written again: a bad deploy refusing every identify while Tracks go through still
        meets the same identifies after each restart of its crash loop (review "diff50a").
        Marked, not taken out of the hold order: a scan of it per delivered event cost
        ~7 ms with 100,000 held (review "diff50a"). The write is remembered for a dead
        letter of an earlier write still to come (`hold`)."""
        if seq > self._written.get(chain, 0):
            self._written[chain] = seq
            self._written.move_to_end(chain)
            if len(self._written) > WRITES_KNOWN:
                self._written.popitem(last=False)
        entries = self._chains.get(chain)
        if not entries:
            return []
        out = []
        for entry in entries:
            if entry.seq < seq:
                entry.pending.discard(chain)
                if not entry.pending:
                    out.append(entry)
        if not out:
            return []
        for entry in out:
            entry.gone = True
        self._gone += len(out)
        self._unplace(out)
        return [entry.item for entry in out]

    def _unplace(self, gone: Sequence[_Held[T]]) -> None:
        """`gone` out of the by-position lists: one by one (a bisection each) for a few, in
        one pass for many (one by one, letting 40,000 go at once took ~0.2 s of event loop,
        each removal shifting the rest; review "diff46c"); and out of their chains', one
        pass each (one removal at a time, 40,000 of one chain took 0.2 s)."""
        by_chain: dict[Hashable, set[int]] = {}
        for entry in gone:
            for chain in entry.chains:
                by_chain.setdefault(chain, set()).add(id(entry))
        for chain, ids in by_chain.items():
            rest = [entry for entry in self._chains[chain] if id(entry) not in ids]
            if rest:
                self._chains[chain] = rest
            else:
                del self._chains[chain]
        if len(gone) > 16:
            ids = {id(entry) for entry in gone}
            self._placed = [entry for entry in self._placed if id(entry) not in ids]
            self._seqs = [entry.seq for entry in self._placed]
            return
        for entry in gone:
            if not entry.seq:
                continue
            index = bisect.bisect_left(self._seqs, entry.seq)
            while self._placed[index] is not entry:
                index += 1
            del self._seqs[index], self._placed[index]

    def _remove(self, chosen: Callable[[_Held[T]], bool]) -> list[T]:
        """The held entries `chosen` selects, no longer held (hold order)."""
        out: list[_Held[T]] = []
        kept: deque[_Held[T]] = deque()
        for entry in self._held:
            if not entry.gone:
                (out if chosen(entry) else kept).append(entry)
        if out or self._gone:
            self._held, self._gone = kept, 0
            self._unplace(out)
        return [entry.item for entry in out]

    def after(self, seq: int) -> list[T]:
        """The held items at stream positions past `seq`, no longer held: when nothing past
        `seq` can be taken (the window full) and nothing up to it is to finish, no outcome
        can move the guard past them (`outcome`), and they waited `max_s` each time."""
        return self._remove(lambda entry: entry.seq > seq)

    def take(self, which: Callable[[T], bool] | None = None) -> list[T]:
        """The held items (all, or those `which` selects), no longer held."""
        return self._remove(lambda entry: which is None or which(entry.item))
