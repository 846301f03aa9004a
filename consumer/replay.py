"""`replay`: dead-lettered events back onto their original topic, filtered and counted.

The replayer is a consumer group of its own on the DLQ, one per selection of filters
(`default_group`): it reads up to the end offsets seen at start, re-publishes what passes
the filters (acks=all) and commits, so a run can be stopped and resumed and a second run
of the same selection replays nothing twice, while another selection still sees every
record. Each replay increments
`userpilot.replay.count`; an event at the limit is reported, not replayed again. An event
dead-lettered twice (a crash between the DLQ's acknowledgement and the commit, a partition
lost while Kafka was unreachable: the next owner re-reads it) has two dead letters of the
same source record and bytes; a run replays the first and counts the second (`SeenSources`).
`decide` is pure; `run_replay` is the Kafka loop (its own consumer and producer).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from confluent_kafka import (
    OFFSET_INVALID,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from consumer import codec, dlqfetch
from consumer.config import Settings, timeout_seconds
from consumer.deadletter import (
    KEY_OMITTED,
    ORIGINAL_TIMESTAMP,
    REPLAY_COUNT,
    REPLAY_SEAL,
    VALUE_SHA256,
    Header,
    header_value,
    message_headers,
    origin_topic,
    replay_count,
    replay_seal,
    source_of,
    value_omitted,
)
from consumer.errors import ConfigError, DeadLetter
from consumer.kafka import make_producer
from consumer.librdkafka import consumer_settings
from consumer.metrics import DEAD_LETTER_REASONS
from consumer.registry import Registry
from consumer.signals import stop_signals
from consumer.stdout import json_line, stdout_gone

__all__ = [
    "CALLS", "Filters", "SeenSources", "Source", "Summary", "add_arguments", "decide",
    "default_group", "failed_call", "main", "replay_headers", "run_replay", "shown_key",
    "source_event",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Filters:
    """Which dead letters to replay; empty means all."""

    reasons: frozenset[str] = frozenset()
    statuses: frozenset[str] = frozenset()
    since: datetime | None = None
    until: datetime | None = None
    from_offset: int | None = None
    to_offset: int | None = None
    partitions: frozenset[int] = frozenset()
    max_replays: int = 3
    calls: frozenset[str] = frozenset()  # the failed call's purpose (`CALLS`)
    topics: frozenset[str] = frozenset()  # the source topic the dead letter came from
    # Dead letters left out (`--skip-void`): (the worker run that wrote them, source topic,
    # partition, offset ranges); after a DLQ guard trip, the events the workers read again.
    skip_void: frozenset[tuple[str, str, int, tuple[tuple[int, int], ...]]] = frozenset()
    # Dead letters left out by their record key (`--skip-keys`): a deleted user's (GDPR).
    skip_keys: frozenset[bytes] = frozenset()


CALLS = ("track", "ensure_user", "identify", "company_identify", "associate_company")
"""What `userpilot.error.call` starts with: the purpose of the request that failed. A Track
event's are `track` and `ensure_user`; an identify's `identify`; a group's the other two."""


def failed_call(headers: Sequence[Header] | None) -> str:
    """The purpose of the request a dead letter's event failed at ("" when none)."""
    raw = (header_value(headers, "userpilot.error.call") or b"").decode("utf-8", "replace")
    return raw.split(" ", 1)[0]


@dataclass
class Summary:
    replayed: int = 0
    skipped_by_filter: int = 0
    over_limit: int = 0
    no_origin: int = 0
    restored: int = 0  # value-less dead letters whose original was fetched back
    gone: int = 0  # ... whose original the source topic no longer holds
    mismatch: int = 0  # ... whose original's hash differs (not replayed)
    unpublishable: int = 0  # the origin topic refuses the record itself (too large)
    doubled: int = 0  # a second dead letter of an event this run replayed (not replayed)
    over_limit_offsets: list[str] = field(default_factory=list)
    unrestored_offsets: list[str] = field(default_factory=list)
    unpublishable_offsets: list[str] = field(default_factory=list)
    doubled_offsets: list[str] = field(default_factory=list)
    no_origin_offsets: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"replayed": self.replayed, "skipped_by_filter": self.skipped_by_filter,
                "over_limit": self.over_limit, "no_origin": self.no_origin,
                "restored": self.restored, "gone": self.gone, "mismatch": self.mismatch,
                "unpublishable": self.unpublishable, "doubled": self.doubled}


_COORDINATOR_NOT_READY = frozenset({
    KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
    KafkaError.COORDINATOR_NOT_AVAILABLE, KafkaError._WAIT_COORD,
})


def _committed(consumer: Consumer, parts: list[TopicPartition], within_s: float = 30.0,
               stopping: Callable[[], bool] = lambda: False) -> list[TopicPartition] | None:
    """The replay group's committed offsets, asked again while the group's coordinator is
    not ready (a broker just started or moved the coordinator: NOT_COORDINATOR and kin,
    which librdkafka does not retry for this call). Stopping on it, a replay right after a
    broker restart failed with "Kafka failed (Not coordinator)" (seen on CI's first use of
    a fresh broker). None when `stopping` (Ctrl-C) came during the wait: it was ignored
    for up to 30 s."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return list(consumer.committed(parts, 10))
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            waiting = isinstance(err, KafkaError) and (
                err.code() in _COORDINATOR_NOT_READY or err.retriable())
            if not waiting or time.monotonic() >= deadline:
                raise
            for _ in range(5):
                if stopping():
                    return None
                time.sleep(0.1)


_REFUSED_READS = frozenset({KafkaError.TOPIC_AUTHORIZATION_FAILED,
                            KafkaError.GROUP_AUTHORIZATION_FAILED})
"""Message errors that end a replay: no read of the DLQ comes while they last."""


class ReplayStuck(KafkaException):
    """Records the origin topic did not take for a reason that may pass (the broker down,
    a timeout): the run stops there, named, so the next run starts at them. Carries the
    run's `summary` (what was replayed, and refused for good, before it)."""

    def __init__(self, message: str, summary: Summary) -> None:
        super().__init__(message)
        self.summary = summary


def _when(headers: Sequence[Header] | None, timestamp_ms: int | None) -> datetime | None:
    """When the record was dead-lettered: its own header; for records written before that
    header existed, the last attempt, else the record's timestamp (the source event's)."""
    for name in ("userpilot.error.dead_lettered_at", "userpilot.error.last_attempt"):
        raw = header_value(headers, name)
        if raw:
            try:
                when = datetime.fromisoformat(raw.decode())
            except ValueError:
                continue
            return when if when.tzinfo else when.replace(tzinfo=UTC)
    if timestamp_ms:
        try:
            return datetime.fromtimestamp(timestamp_ms / 1000, UTC)
        except (ValueError, OverflowError, OSError):
            # Past year 9999 (a producer's clock, milliseconds taken for microseconds):
            # no time, rather than a replay that stops on this record every run (review
            # "dlq40").
            return None
    return None


def decide(headers: Sequence[Header] | None, partition: int, offset: int,
           timestamp_ms: int | None, filters: Filters) -> str:
    """'replay', 'filtered', 'over_limit' or 'no_origin' for one DLQ record. Pure."""
    if filters.partitions and partition not in filters.partitions:
        return "filtered"
    if filters.from_offset is not None and offset < filters.from_offset:
        return "filtered"
    if filters.to_offset is not None and offset > filters.to_offset:
        return "filtered"
    if filters.reasons:
        reason = _text(header_value(headers, "userpilot.error.reason"))
        if reason not in filters.reasons:
            return "filtered"
    if filters.statuses:
        status = _text(header_value(headers, "userpilot.error.status"))
        if status not in filters.statuses:
            return "filtered"
    if filters.calls and failed_call(headers) not in filters.calls:
        return "filtered"
    if filters.topics and origin_topic(headers) not in filters.topics:
        return "filtered"
    if filters.skip_void:
        source = source_of(headers)
        worker = _text(header_value(headers, "userpilot.error.worker"))
        if source is not None and worker and any(
                (run, topic, part) == (worker, *source[:2])
                and any(low <= source[2] <= high for low, high in ranges)
                for run, topic, part, ranges in filters.skip_void):
            return "filtered"
    if filters.since is not None or filters.until is not None:
        when = _when(headers, timestamp_ms)
        if when is None:
            return "filtered"
        if filters.since is not None and when < filters.since:
            return "filtered"
        if filters.until is not None and when > filters.until:
            return "filtered"
    if origin_topic(headers) is None:
        return "no_origin"  # none, or not a topic name (`origin_topic`)
    if replay_count(headers) >= filters.max_replays:
        return "over_limit"
    return "replay"


def _text(raw: bytes | None) -> str:
    """A header's text. A foreign record's header need not be UTF-8: a bare decode raised,
    and every rerun stopped on the same record (review replay25)."""
    return (raw or b"").decode("utf-8", "replace")


Source = tuple[str, int, int, bytes]
"""A dead letter's event: its source topic, partition and offset, and its value's SHA-256."""


def source_event(headers: Sequence[Header] | None, value: bytes | None) -> Source | None:
    """What makes two dead letters one event: the same source record (topic, partition,
    offset) with the same bytes; None without coordinates. The bytes too: a topic deleted
    and created again numbers its offsets from 0 again, and another event dead-lettered at
    the same coordinates was skipped as a copy (review "diff24"). A value-less dead letter
    gives its original's hash."""
    where = source_of(headers)
    if where is None:
        return None
    if value_omitted(headers):
        raw = header_value(headers, VALUE_SHA256) or b""
        try:
            digest = bytes.fromhex(raw.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            digest = raw  # compared as written
    else:
        digest = hashlib.sha256(value or b"").digest()
    return (sys.intern(where[0]), where[1], where[2], digest)


class SeenSources:
    """The events (`source_event`) this run replayed, the latest `limit` of them: a later
    dead letter of one of them is a second copy of the same event.

    Bounded (about 350 bytes an entry, 35 MB at the default): the copies of one event are
    written seconds to minutes apart, by the replica that lost it and the one that re-read
    it, so a window of the latest records finds them; a copy written more than `limit`
    replayed records after the first, or in a later run, is replayed again (README).
    """

    __slots__ = ("_limit", "_seen")

    def __init__(self, limit: int = 100_000) -> None:
        self._limit = limit
        # event → the DLQ partition and offset of its first dead letter
        self._seen: OrderedDict[Source, tuple[int, int]] = OrderedDict()

    def before(self, source: Source | None) -> tuple[int, int] | None:
        """The DLQ partition and offset of the dead letter of `source` this run replayed,
        or None (always for a dead letter without coordinates)."""
        return None if source is None else self._seen.get(source)

    def add(self, source: Source | None, at: tuple[int, int]) -> None:
        """`source`'s dead letter at `at` (DLQ partition, offset) is being replayed."""
        if source is None:
            return
        self._seen[source] = at
        if len(self._seen) > self._limit:
            self._seen.popitem(last=False)


def default_group(dlq_topic: str, filters: Filters) -> str:
    """The replayer's consumer group when `--group` is not given: one per selection.

    A run commits every record it read, including those its filters skipped; with one group
    for every selection, `--reason a` would commit past the `b` records and a later
    `--reason b` would never see them. So each selection (the filters, not the replay
    limit) keeps its own progress: the same selection resumed or run twice replays nothing
    twice, and another selection still sees every record. Unfiltered: `userpilot-replay.<dlq>`.
    """
    base = f"userpilot-replay.{dlq_topic}"
    # `--skip-keys` and `--skip-void` only leave records out, and those they skip are meant
    # to be passed for good: part of the selection, each new list started it over from the
    # DLQ's start, sending again what the routine replay had sent, and the routine replay
    # never passed the void ones, sent twice by its next run (reviews "diff48c", "replay51").
    selection = replace(filters, max_replays=0, skip_keys=frozenset(), skip_void=frozenset())
    if selection == Filters(max_replays=0):
        return base
    text = json.dumps({
        "reasons": sorted(selection.reasons), "statuses": sorted(selection.statuses),
        # The same instant however its zone was written: one group.
        "since": selection.since.astimezone(UTC).isoformat() if selection.since else None,
        "until": selection.until.astimezone(UTC).isoformat() if selection.until else None,
        "from_offset": selection.from_offset, "to_offset": selection.to_offset,
        "partitions": sorted(selection.partitions),
        # Only when given: the groups of the selections made before --call existed stay.
        **({"calls": sorted(selection.calls)} if selection.calls else {}),
        **({"topics": sorted(selection.topics)} if selection.topics else {})},
        sort_keys=True)
    return f"{base}.{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def replay_headers(headers: Sequence[Header] | None, *, secret: bytes | None = None,
                   topic: str = "", value: bytes | None = None) -> list[Header]:
    """Original headers without the error context, replay count incremented and, with the
    `secret`, sealed for `topic` and `value` (`deadletter.replay_seal`)."""
    count = replay_count(headers) + 1
    kept = [(k, v) for k, v in (headers or ())
            if not k.startswith("__connect.errors.") and not k.startswith("userpilot.error.")
            and k not in (REPLAY_COUNT, REPLAY_SEAL)]
    out = [*kept, (REPLAY_COUNT, str(count).encode())]
    if secret is not None:
        out.append((REPLAY_SEAL, replay_seal(secret, topic, value, count)))
    return out


def _topic(text: str) -> str:
    """A source topic as `KAFKA_TOPICS` names one (blanks around it dropped)."""
    name = text.strip()
    if not name:
        raise argparse.ArgumentTypeError("name a source topic, e.g. --topic signal.events")
    return name


def _time(text: str) -> datetime:
    """An ISO 8601 time, in UTC: a time whose UTC instant is past year 9999 (or before 1),
    `9999-12-31T23:59:59-23:00`, raised OverflowError in the run, after Kafka answered: a
    traceback (review "cli42")."""
    if "W" in text.upper():
        # Python reads `2026-W48-1` as that Monday's midnight, and `--until` then left out
        # the whole day it names, as for a calendar date before review "ops29" (review
        # "replay44"): said, not guessed (a week without its day is a week, not a day).
        raise argparse.ArgumentTypeError(
            f"{text!r} is an ISO week date: write the calendar date, e.g. 2026-11-23")
    written = text.strip()
    period = _PERIOD.fullmatch(written)
    if period is not None and period["hour"] is None and period["zone"]:
        # A date with its zone: Python reads `2026-12-01+01:00` as 01:00 (the sign taken
        # for the time's start) and `2026-12-01Z` as midnight read naive (review "ops45"):
        # the day's midnight in that zone, written out, read as any time with a zone.
        written = f"{period['date']}T00:00{period['zone']}"
    try:
        if period is None and _DATE_THEN_SIGN.match(written):
            # A date, then a zone _PERIOD does not take (`+05:30:15`): Python would read
            # it as a time of day (review "diff45").
            raise ValueError(written)
        zone = _ZONE_AFTER_TIME.search(written) if _TIME.search(written) else None
        if zone is not None and (zone["second"] or int(zone["minute"] or 0) > 59):
            # Python takes +05:75 for +06:15, and a zone's seconds as written (reviews
            # "diff45b", "diff45c"): a zone is hours and minutes.
            raise ValueError(written)
        value = datetime.fromisoformat(re.sub(r"[Zz]$", "+00:00", written))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO 8601 time: e.g. 2026-12-01T09:30:00Z or 2026-12-01"
        ) from None
    try:
        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    except OverflowError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is outside the years 0001-9999 in UTC") from None


def _skip_void(text: str) -> tuple[str, str, int, tuple[tuple[int, int], ...]]:
    """`WORKER/TOPIC:PARTITION@OFFSETS`, OFFSETS as `5,7-9` (a topic name holds none of
    `/`, `:`, `@`; a worker's name, `host-pid-tag`, no `/`)."""
    refused = argparse.ArgumentTypeError(
        f"{text!r} is not WORKER/TOPIC:PARTITION@OFFSETS, e.g. "
        "worker-0-12-a1b2c3/events:0@1234,1240-1250 (as a DLQ guard trip names them)")
    where, _, offsets = text.strip().rpartition("@")
    worker, _, place = where.partition("/")
    topic, _, partition = place.rpartition(":")
    if not (worker and topic and partition.isascii() and partition.isdigit() and offsets):
        raise refused
    ranges = []
    for item in offsets.split(","):
        low, dash, high = item.partition("-")
        if not (low.isascii() and low.isdigit() and (not dash or (high.isascii()
                                                                  and high.isdigit()))):
            raise refused
        if dash and int(high) < int(low):  # matching nothing, it would skip nothing
            raise argparse.ArgumentTypeError(
                f"{text!r}: the range {item} runs backwards; write it {high}-{low}")
        ranges.append((int(low), int(high) if dash else int(low)))
    return worker, topic, int(partition), tuple(sorted(ranges))


def _until(text: str) -> datetime:
    """`_time`, where a time written to the day, hour or minute means the end of that
    period: `--until 2026-12-01` read as its midnight left out the whole day it names
    (review "ops29"), and so did `2026-12-01Z` (its zone written) and `…T09` the rest of
    that hour (review "ops45"). Written to the second or finer, it is that instant."""
    value = _time(text)
    period = _PERIOD.fullmatch(text.strip())
    if period is None or period["second"] is not None:
        return value
    step = (timedelta(days=1) if period["hour"] is None
            else timedelta(hours=1) if period["minute"] is None else timedelta(minutes=1))
    try:
        return value + step - timedelta(milliseconds=1)  # Kafka's resolution
    except OverflowError:  # 9999-12-31: to the end of time (it raised; review "cli42")
        return datetime.max.replace(tzinfo=UTC)


_PERIOD = re.compile(
    r"(?P<date>[0-9]{4}-?[0-9]{2}-?[0-9]{2})"
    r"(?:[Tt ](?P<hour>[0-9]{2})(?::?(?P<minute>[0-9]{2})(?::?(?P<second>[0-9]{2}))?)?)?"
    r"(?P<zone>[Zz]|[+-][0-9]{2}(?::?[0-9]{2})?)?")
"""How much of a time `--until` was given: `second` (anything finer too) unmatched means
the end of the day, hour or minute written."""


_DATE_THEN_SIGN = re.compile(r"[0-9]{4}-?[0-9]{2}-?[0-9]{2}[+-]")
_TIME = re.compile(r"[0-9][Tt ][0-9]")  # a date, then a time
_ZONE_AFTER_TIME = re.compile(
    r"[+-][0-9]{2}(?::?(?P<minute>[0-9]{2}))?(?::?(?P<second>[0-9]{2})(?:[.,][0-9]+)?)?$")


def _reason(text: str) -> str:
    """A dead-letter reason as the headers spell it: a misspelt one (`bad-request`)
    matched no record and the run ended "0 replayed" without a word (review "ops29")."""
    reason = text.strip().lower()
    if reason not in DEAD_LETTER_REASONS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a dead-letter reason: one of {', '.join(DEAD_LETTER_REASONS)}")
    return reason


def _count(text: str) -> int:
    """A number of at least 0 (an offset, a partition, a replay count): a negative one
    selected nothing, or named every record over the limit, without a word."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative: give 0 or more")
    return value


def _status(text: str) -> str:
    """An HTTP status as the DLQ header spells it: "abc" or " 42" matched no record, and
    the run exited 0 with every record skipped by the filter (review "replay26")."""
    status = text.strip()
    if not status:
        return status  # dead letters without one: timeouts, connection errors
    if not (len(status) == 3 and status.isdigit() and 100 <= int(status) <= 599):
        raise argparse.ArgumentTypeError(f"{text!r} is not an HTTP status (100-599)")
    return status


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="dlq_topic", required=True, help="the dead-letter topic")
    p.add_argument("--reason", type=_reason, action="append", default=[],
                   help="only this userpilot.error.reason (repeatable): "
                   + ", ".join(DEAD_LETTER_REASONS))
    p.add_argument("--status", type=_status, action="append", default=[],
                   help="only this HTTP status (repeatable; \"\" for dead letters without "
                   "one: timeouts, connection errors, and undecodable or invalid events; "
                   "add --reason to narrow it)")
    p.add_argument("--call", action="append", default=[], choices=CALLS,
                   help="only events that failed at this call (repeatable): --call track "
                   "--call ensure_user replays Track events only, leaving out identify and "
                   "group events whose traits a later identify may have replaced")
    p.add_argument("--topic", action="append", default=[], type=_topic,
                   help="only dead letters of this source topic (repeatable): with one DLQ "
                   "for several topics, the one whose cause was fixed")
    p.add_argument("--since", type=_time, help="dead-lettered at or after (ISO 8601)")
    p.add_argument("--until", type=_until, help="dead-lettered at or before (ISO 8601; a "
                   "date, hour or minute: up to the end of it; a bare date is UTC)")
    p.add_argument("--partition", type=_count, action="append", default=[],
                   help="only this DLQ partition (repeatable)")
    p.add_argument("--from-offset", type=_count, help="first DLQ offset to consider")
    p.add_argument("--to-offset", type=_count, help="last DLQ offset to consider")
    p.add_argument("--skip-keys", metavar="FILE", default=None,
                   help="leave out the dead letters keyed by the ids in FILE (one a line, "
                        "read as delete-users reads them), or whose event's userId is one "
                        "(needs SCHEMA_REGISTRY_URL): a deleted user's (GDPR)")
    p.add_argument("--skip-keys-json", metavar="FILE", default=None,
                   help="as --skip-keys, the ids one JSON string a line (the file given "
                        "to delete-users --json)")
    p.add_argument("--skip-void", type=_skip_void, action="append", default=[],
                   metavar="WORKER/TOPIC:PARTITION@OFFSETS",
                   help="leave out the dead letters WORKER wrote of those events (repeatable; "
                   "OFFSETS like 5,7-9): after a DLQ guard trip, those the fixed workers "
                   "read again, as the worker's CRITICAL line names them")
    p.add_argument("--max-replays", type=_count, default=None,
                   help="replay limit per event (default: $WORKER_REPLAY_MAX or 3)")
    p.add_argument("--group", default=None,
                   help="replayer consumer group (default: userpilot-replay.<dlq topic>, "
                        "plus a digest of the selecting filters when any is given: not "
                        "--skip-keys, --skip-keys-json or --max-replays)")
    p.add_argument("--timeout", type=timeout_seconds, default=10.0,
                   help="seconds to wait for Kafka to answer before starting (default 10)")
    p.add_argument("--all", action="store_true", dest="from_start",
                   help="with --dry-run: list from the start of the DLQ, whatever earlier "
                        "replays of this selection committed (e.g. every dead letter of a "
                        "user before deleting them)")
    p.add_argument("--dry-run", action="store_true",
                   help="list what would be replayed; send and commit nothing")
    p.add_argument("--show-event", action="store_true",
                   help="with --dry-run: each line carries its event as canonical JSON "
                        "(`event`, decoded through SCHEMA_REGISTRY_URL); `explain` reads "
                        "such lines")


def run_replay(
    conf: dict[str, Any], dlq_topic: str, group: str, filters: Filters, *, dry_run: bool,
    report: Callable[[dict[str, Any]], None],
    stopping: Callable[[], bool] = lambda: False, secret: bytes | None = None,
    from_start: bool = False, event_of: Callable[[bytes | None], dict[str, Any]] | None = None,
    user_of: Callable[[bytes | None], str | None] | None = None,
) -> Summary:
    """Read the DLQ up to its end offsets at start; re-publish what `decide` allows.

    `from_start` (dry runs only): from each partition's first record, whatever the group
    committed, to list every dead letter (a user's, before a GDPR deletion), not only what
    this selection has not replayed yet.

    `event_of` (dry runs, `--show-event`): each listed record's event as canonical JSON,
    under `event`, the form `explain` reads.

    Checkpointed per polled batch: what was produced is flushed (acknowledged by the
    broker), then the DLQ position past it is committed, so a run stopped at any point
    (`stopping`, SIGINT/SIGTERM in the CLI, or an error) resumes where it stopped and
    replays nothing twice. It used to commit once at the end: an interrupted run had
    published records the next run published again.
    """
    # The worker consumer's shape (`consumer_settings`, what `check-config` validates):
    # from the raw settings, a KAFKA_MAX_POLL_INTERVAL_MS under librdkafka's own 45 s
    # session was refused here while `run` took it (review config25).
    consumer = Consumer(consumer_settings({
        **conf, "group.id": group, "enable.auto.commit": False,
        "auto.offset.reset": "earliest", "enable.partition.eof": False,
    }))
    producer = None if dry_run else replay_producer(conf)
    summary = Summary()
    seen = SeenSources()
    checkpoint: Callable[[], None] | None = None  # once there is a position to commit
    try:
        meta = consumer.list_topics(dlq_topic, timeout=10)
        info = meta.topics.get(dlq_topic)
        if info is None or info.error is not None:
            raise ConfigError(f"dead-letter topic {dlq_topic!r} does not exist")
        parts = [TopicPartition(dlq_topic, p) for p in sorted(info.partitions)]
        absent = sorted(filters.partitions - set(info.partitions))
        if absent:
            # Nothing could match it: a run that exits 0 with every record "skipped by the
            # filter" reads as "nothing to replay" (review "replay26").
            raise ConfigError(
                f"--partition {', '.join(map(str, absent))}: dead-letter topic {dlq_topic!r} "
                f"has partitions 0-{len(parts) - 1}")
        if from_start and not dry_run:
            raise ValueError("from_start lists: a replay from the start would send again "
                             "what earlier runs replayed")
        known = [] if from_start else _committed(consumer, parts, stopping=stopping)
        if known is None:
            return summary  # interrupted before anything was read
        committed = {tp.partition: tp.offset for tp in known}
        if not from_start and all(offset < 0 for offset in committed.values()):
            # Kafka keeps a group's offsets for offsets.retention.minutes (7 days by
            # default) after its last commit: a selection run again after that starts
            # over, and what it replayed then goes out again (review "replay35").
            print(f"replay: no progress recorded for this selection (group {group!r}): "
                  "reading the dead-letter topic from its first record; if this selection "
                  "ran more than the brokers' offsets.retention.minutes ago (7 days by "
                  "default), what it replayed then is replayed again: look with --dry-run "
                  "first", file=sys.stderr)
        ends: dict[int, int] = {}
        starts: list[TopicPartition] = []
        for tp in parts:
            low, high = consumer.get_watermark_offsets(tp, timeout=10)
            start = committed.get(tp.partition, OFFSET_INVALID)
            start = low if start < 0 else max(start, low)
            if start < high:
                ends[tp.partition] = high
                starts.append(TopicPartition(dlq_topic, tp.partition, start))
        if not starts:
            return summary
        consumer.assign(starts)
        sent: dict[tuple[int, int], dict[str, Any]] = {}  # produced, awaiting the answer
        answers: dict[tuple[int, int], KafkaError | None] = {}
        # origin topic -> (its partition count, None when unknown; when it was asked)
        counts: dict[str, tuple[int | None, float]] = {}

        def partitions_of(topic: str) -> int | None:
            """An origin topic's partition count, asked once per run; when it could not
            be read (None: the record goes where the partitioner puts it), asked again
            COUNT_RETRY_S later. A failed lookup was kept for the whole run: one metadata
            timeout sent every record after it where librdkafka's partitioner put it."""
            known = counts.get(topic)
            if producer is not None and (known is None or (
                    known[0] is None and time.monotonic() - known[1] >= COUNT_RETRY_S)):
                try:
                    meta = producer.list_topics(topic, timeout=10).topics.get(topic)
                except KafkaException:
                    meta = None
                count = (len(meta.partitions) if meta is not None and meta.error is None
                         and meta.partitions else None)
                if count is None and known is None:
                    log.warning("partition count of %r not readable: its records go where "
                                "the partitioner puts them until it is (asked again every "
                                "%g s)", topic, COUNT_RETRY_S)
                known = counts[topic] = (count, time.monotonic())
            return None if known is None else known[0]

        position = {tp.partition: tp.offset for tp in starts}  # past what was handled
        committed_at = dict(position)

        def commit_handled() -> None:
            """Wait for the origin topic's answers, then commit each partition past what
            was published (or refused for good: counted, named), up to a record refused
            for a reason that may pass, which the next run starts at (ReplayStuck)."""
            if producer is None:
                return  # a dry run commits nothing: the run after it must see every record
            if sent:
                # Until every record has its answer (`message.timeout.ms` bounds it): after
                # a fixed 30 s a record a slow broker took later was named "no answer",
                # and the next run published it again (review "replay42"). A stop cuts
                # the wait short: what is still unanswered may land (README).
                left = producer.flush(30)
                deadline = time.monotonic() + REPLAY_ANSWER_MS / 1000 + 10
                while left and not stopping() and time.monotonic() < deadline:
                    left = producer.flush(1)
            stuck: dict[int, tuple[int, str]] = {}
            for p, off in sorted(sent):
                # Taken out one by one: a report that raises leaves the rest to the
                # checkpoint after it, none reported twice.
                line = sent.pop((p, off))
                err = answers.pop((p, off), _UNANSWERED)
                where = f"{dlq_topic}[{p}]@{off}"
                if p in stuck:
                    continue  # after a stuck record: read again by the next run
                if err is None:
                    summary.replayed += 1
                    report(line)
                elif err is not _UNANSWERED and err.code() in _REFUSED_FOR_GOOD:
                    summary.unpublishable += 1
                    summary.unpublishable_offsets.append(f"{where} ({err.str()})")
                else:
                    reason = "no answer" if err is _UNANSWERED else err.str()
                    stuck[p] = (off, f"{where}: {reason}")
            for p, (off, _) in stuck.items():
                position[p] = min(position[p], off)
            if position != committed_at:
                consumer.commit(
                    offsets=[TopicPartition(dlq_topic, p, o) for p, o in position.items()],
                    asynchronous=False)
                committed_at.update(position)
            if stuck:
                raise ReplayStuck(
                    "the origin topic did not take " + "; ".join(
                        text for _, text in sorted(stuck.values())), summary)

        checkpoint = commit_handled

        def expired() -> None:
            """Retention may delete what was there at the start: the consumer resets past
            the end offsets read then, nothing more comes, and the loop never finished.
            Asked of the broker only when a poll brought nothing."""
            for p, end in ends.items():
                if position[p] < end:
                    low, _ = consumer.get_watermark_offsets(TopicPartition(dlq_topic, p),
                                                            timeout=10)
                    # Or the consumer is past the end already: the last offsets were a
                    # transaction's marker (or aborted records), never handed over, and
                    # the loop waited for them for ever, every run again (review replay25).
                    at = consumer.position([TopicPartition(dlq_topic, p)])[0].offset
                    if low >= end or at >= end:
                        position[p] = end

        while any(position[p] < ends[p] for p in ends) and not stopping():
            messages = consumer.consume(500, 1.0)
            if not messages:
                expired()
            for msg in messages:
                if stopping():
                    break
                err = msg.error()
                if err is not None:
                    if err.fatal() or err.code() in _REFUSED_READS:
                        # librdkafka says it once: passed over, the run waited for records
                        # that never came, for ever (review "sasl55").
                        raise ReplayStuck(
                            f"Kafka refused to read the DLQ topic {dlq_topic!r} "
                            f"({err.str()}): allow the principal Read on the topic and on "
                            f"the group {group!r}", summary)
                    continue
                p, off = msg.partition(), msg.offset()
                if p is None or off is None or p not in ends or off >= ends[p]:
                    continue
                line = _replay_one(msg, p, off, dlq_topic, filters, conf, summary, dry_run,
                                   seen, event_of, user_of)
                if line is not None:
                    if "_record" not in line:  # a copy of an event this run took
                        report(line)
                    elif producer is None:  # a dry run: what would be published
                        line.pop("_record")
                        summary.replayed += 1
                        report(line)
                    else:
                        _publish(producer, line, msg, (p, off), sent, answers, secret,
                                 partitions_of)
                position[p] = off + 1  # only once handled: an error leaves it to be read again
            commit_handled()
        return summary
    except BaseException:
        # What was handled before the error is published: keep it from being replayed
        # again (what the origin did not take is read again).
        if checkpoint is not None:
            with contextlib.suppress(Exception):
                checkpoint()
        raise
    finally:
        consumer.close()


COUNT_RETRY_S = 5.0
"""How long an origin topic's unreadable partition count stands before it is asked again."""


def replay_producer(conf: Mapping[str, Any]) -> Producer:
    """The producer replay publishes with: the worker's settings (`conf`) with replay's own.

    One record per batch, as the DLQ producer: the origin topic's max.message.bytes is
    checked per batch, and large originals fetched back for value-less dead letters would
    be refused together, every run again. The local limit is the broker's to enforce:
    librdkafka's 1,000,000 refused a source record the topic holds (up to 1,048,588).
    """
    own = {k: v for k, v in conf.items() if k not in _REPLAY_OWN}
    return make_producer(own, **{
        # A dead letter of a topic deleted since was published into a topic the broker
        # created for it, counted replayed, and read by no one (review "replay17"): a
        # topic that does not exist is refused for good instead (unpublishable), within
        # 5 s (librdkafka's 30 s for a new topic's metadata to propagate outlasted the
        # batch's flush, so it read as "no answer").
        "allow.auto.create.topics": False,
        "topic.metadata.propagation.max.ms": 5000,
        "batch.num.messages": 1,
        # A record's answer within a minute (librdkafka's 300 s by default): the batch's
        # commit waits for every answer (`commit_handled`). Replay's own, whatever the
        # KAFKA_* settings say (0, "never", stalled a run for ever; review "diff42"); and
        # no lingering, which librdkafka refuses at or past that timeout.
        "message.timeout.ms": REPLAY_ANSWER_MS, "linger.ms": 0,
        "message.max.bytes": max(int(conf.get("message.max.bytes", 0)), REPLAY_MAX_BYTES)})


_REPLAY_OWN = frozenset({"message.timeout.ms", "delivery.timeout.ms", "topic.message.timeout.ms",
                         "linger.ms", "queue.buffering.max.ms"})
"""Producer settings replay sets itself, under every name librdkafka takes for them."""
REPLAY_ANSWER_MS = 60_000
"""The replay producer's `message.timeout.ms`: a record not acknowledged within it is
reported failed (and the run stops at it)."""
REPLAY_MAX_BYTES = 64 * 1024 * 1024
"""The replay producer's local record limit: the origin topic's own limit decides."""
_REFUSED_FOR_GOOD = frozenset({
    KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_RECORD, KafkaError.RECORD_LIST_TOO_LARGE,
    # The origin topic is gone or its name invalid: no rerun changes that.
    KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC, KafkaError.TOPIC_EXCEPTION})
_UNANSWERED: Any = object()


def _publish(producer: Producer, line: dict[str, Any], msg: Message, at: tuple[int, int],
             sent: dict[tuple[int, int], dict[str, Any]],
             answers: dict[tuple[int, int], KafkaError | None],
             secret: bytes | None = None,
             partitions: Callable[[str], int | None] = lambda _: None) -> None:
    """Produce one record to its origin; its answer lands in `answers` under `at` (the
    DLQ coordinates). Written now: with the original's timestamp, a record older than the
    origin topic's retention would be deleted again at once (the original's time travels
    in ORIGINAL_TIMESTAMP).

    To the partition it came from while the origin topic still has it (`partitions`: its
    count, None when unknown): librdkafka's partitioner is not the Java client's, so a
    keyed event written by a Java producer came back beside another partition's users,
    out of order with its own user's live events (review replay25)."""
    key, value, headers, partition = line.pop("_record")
    ts_type, ts = msg.timestamp()
    out = replay_headers(headers, secret=secret, topic=line["to"], value=value)
    if ts_type and ts and header_value(out, ORIGINAL_TIMESTAMP) is None:
        out.append((ORIGINAL_TIMESTAMP, str(ts).encode()))  # written before the header

    def delivered(err: KafkaError | None, _msg: Message) -> None:
        answers[at] = err

    sent[at] = line
    record: dict[str, Any] = {"key": key, "value": value, "headers": out,
                              "on_delivery": delivered}
    count = partitions(line["to"]) if partition is not None else None
    if partition is not None and count is not None and 0 <= partition < count:
        record["partition"] = partition
    try:
        try:
            producer.produce(line["to"], **record)
        except BufferError:
            producer.flush(30)
            producer.produce(line["to"], **record)
    except KafkaException as exc:  # refused before sending (too large for the producer)
        err = exc.args[0] if exc.args else None
        answers[at] = err if isinstance(err, KafkaError) else KafkaError(
            KafkaError._FAIL, str(exc))
    except BufferError as exc:  # still full, the queue emptied: larger than all of it
        # A traceback ended the run here (review "pass56").
        answers[at] = KafkaError(KafkaError._QUEUE_FULL, f"{exc}: the record is larger than "
                                 "the producer's queue (KAFKA_QUEUE_BUFFERING_MAX_KBYTES)")
    producer.poll(0)


def _replay_one(msg: Message, p: int, off: int, dlq_topic: str, filters: Filters,
                conf: dict[str, Any], summary: Summary, dry_run: bool,
                seen: SeenSources | None = None,
                event_of: Callable[[bytes | None], dict[str, Any]] | None = None,
                user_of: Callable[[bytes | None], str | None] | None = None,
                ) -> dict[str, Any] | None:
    """One DLQ record: counted as filtered, over the limit or unrestorable (None), the
    report line of its replay, with the record to publish under `_record`, or (without
    `_record`) the line of a second dead letter of an event this run took (`doubled_of`)."""
    headers = message_headers(msg)
    ts_type, ts = msg.timestamp()
    verdict = decide(headers, p, off, ts if ts_type else None, filters)
    where = f"{dlq_topic}[{p}]@{off}"
    if (verdict != "filtered" and filters.skip_keys
            and _skipped(msg, headers, conf, filters.skip_keys, user_of, where, summary)):
        verdict = "filtered"
    if verdict == "filtered":
        summary.skipped_by_filter += 1
        return None
    if verdict == "replay" and origin_topic(headers) == dlq_topic:
        # Named as its own origin (an edited or foreign record): "replayed" into the DLQ it
        # was read from, counted replayed and read again by the next run (review "replay51").
        verdict = "no_origin"
    if verdict in ("over_limit", "no_origin"):
        if verdict == "over_limit":
            summary.over_limit += 1
            summary.over_limit_offsets.append(where)
        else:
            summary.no_origin += 1
            summary.no_origin_offsets.append(where)
        if not dry_run:
            return None
        # Listed with its key, never replayed: `--dry-run --all` is how an operator finds
        # a deleted user's dead letters (README, GDPR), and these were on stderr only, by
        # their coordinates (review "replay35").
        return {"dlq": where, "to": _text(header_value(headers, "__connect.errors.topic"))
                or None, "dry_run": True,
                "reason": _text(header_value(headers, "userpilot.error.reason")),
                "call": failed_call(headers) or None, **_key_of(msg, headers, conf),
                **failure_of(headers), "not_replayable": verdict,
                **_shown_event(event_of, headers, msg.value(), where, summary)}
    source = None if seen is None else source_event(headers, msg.value())
    before = None if seen is None else seen.before(source)
    origin = _text(header_value(headers, "__connect.errors.topic"))  # text: `decide`
    # Read from the dead letter itself: a restored original's headers may not carry them.
    reason = _text(header_value(headers, "userpilot.error.reason"))
    call = failed_call(headers) or None
    failure = failure_of(headers)
    if before is not None:
        summary.doubled += 1
        earlier = f"{dlq_topic}[{before[0]}]@{before[1]}"
        summary.doubled_offsets.append(f"{where} (the same event as {earlier})")
        # A line of its own, key included: `--dry-run --all` is how an operator finds a
        # deleted user's dead letters (README, GDPR), and this copy's key was on stderr
        # only, without its key (review "replay29").
        return {"dlq": where, "to": origin, "dry_run": dry_run, "reason": reason,
                "call": call, **_key_of(msg, headers, conf), **failure,
                "doubled_of": earlier,
                **_shown_event(event_of, headers, msg.value(), where, summary)}
    key, value = msg.key(), msg.value()
    came = source_of(headers)  # the dead letter's own: a restored original's may lack them
    if value_omitted(headers):
        # Written without its value (too large for the DLQ): the original comes
        # from the source topic by its coordinates, checked against the hash.
        found = dlqfetch.restore(conf, key, value, headers)
        if found == "unanswered":  # may pass: stop here, the next run starts at it
            raise ReplayStuck(f"{where}: its original could not be read from the source "
                              "topic (no answer)", summary)
        if isinstance(found, str):
            if found == "no_origin":
                summary.no_origin += 1
            elif found == "gone":
                summary.gone += 1
            else:
                summary.mismatch += 1
            summary.unrestored_offsets.append(f"{where} ({found})")
            return None
        first = header_value(headers, ORIGINAL_TIMESTAMP)
        key, value, headers = found.key, found.value, list(found.headers or ())
        if first is not None and header_value(headers, ORIGINAL_TIMESTAMP) is None:
            headers.append((ORIGINAL_TIMESTAMP, first))
        summary.restored += 1
    # The key names the event's user when its producer keyed by userId (`produce` does):
    # how an operator finds a deleted user's dead letters to leave them out (README, GDPR).
    line: dict[str, Any] = {"dlq": where, "to": origin, "dry_run": dry_run,
                            "reason": reason, "call": call, "key": shown_key(key),
                            **failure,
                            **_shown_event(event_of, headers, value, where, summary)}
    line["_record"] = (key, value, headers,
                       came[1] if came is not None and came[0] == origin else None)
    if seen is not None:
        seen.add(source, (p, off))
    return line


def _shown_event(event_of: Callable[[bytes | None], dict[str, Any]] | None,
                 headers: Sequence[Header], value: bytes | None, where: str,
                 summary: Summary) -> dict[str, Any]:
    """`--show-event`: the record's event as canonical JSON (`event`, with the fields read
    from invalid UTF-8 or lone surrogates: `event_cut`, `event_surrogated`), or why not
    (`event_unreadable`): the runbook's "explain the events" had no way to get a dead
    letter's event out of its Avro bytes (review "dlq48"). A registry that does not answer
    stops the listing (each record waited out its timeout, and the outage read as
    undecodable records, exit 0; review "diff48b")."""
    if event_of is None:
        return {}
    if value_omitted(headers) and not value:
        return {"event_unreadable": "written without its value (too large for the DLQ)"}
    try:
        return event_of(value)
    except Unreadable as exc:  # an undecodable dead letter is listed all the same
        return {"event_unreadable": str(exc)[:MESSAGE_SHOWN]}
    except Exception as exc:
        raise ReplayStuck(f"{where}: its event could not be read: {exc}", summary) from None


def _skipped(msg: Message, headers: Sequence[Header], conf: Mapping[str, Any],
             skip: frozenset[bytes], user_of: Callable[[bytes | None], str | None] | None,
             where: str, summary: Summary) -> bool:
    """`--skip-keys`: the dead letter's record key, or its event's `userId` (a keyless
    producer's: matched by key alone, its identify was replayed, review "diff48c"), is one
    of `skip`. For a dead letter written without its key or value, the source event's,
    read by its coordinates; one that cannot be read now stops the run (left in, a later
    restore could replay it)."""
    key, value = msg.key(), msg.value()
    if key is not None and key in skip:  # decided: no fetch of the original
        return True
    key_gone = header_value(headers, KEY_OMITTED) == b"true"
    if key_gone or value_omitted(headers):
        found = dlqfetch.verified_original(conf, headers)
        if found == "unanswered":
            raise ReplayStuck(f"{where}: its original could not be read from the source "
                              "topic (no answer), which --skip-keys needs", summary)
        if isinstance(found, dlqfetch.Fetched):
            key = found.key if key_gone else key
            value = found.value if value_omitted(headers) else value
    if key is not None and key in skip:
        return True
    try:
        user = user_of(value) if user_of is not None and value else None
    except Exception as exc:  # the registry's (`_user_reader`): the run stops there
        raise ReplayStuck(f"{where}: its event could not be read: {exc}", summary) from None
    return user is not None and user.encode("utf-8", "surrogatepass") in skip


def _key_of(msg: Message, headers: Sequence[Header], conf: Mapping[str, Any]
            ) -> dict[str, Any]:
    """A line's key for a record not replayed: its own, or for a dead letter written without
    it (the DLQ refused it even without its value), the source event's, read by its
    coordinates as a replay restores it. Listed as `null`, a deleted user's dead letter
    over the replay limit was not found by `--dry-run --all` (README, GDPR; review
    "replay44"). When the source cannot give it, `key_omitted` says why (`gone`,
    `unanswered`, `mismatch`, `no_origin`). A consumer per such record: they are rare."""
    if header_value(headers, KEY_OMITTED) != b"true":
        return {"key": shown_key(msg.key())}
    found = dlqfetch.verified_original(conf, headers)
    if not isinstance(found, dlqfetch.Fetched):
        # `unanswered` too: said as such (the source may answer next time), not as gone;
        # `mismatch`: another record at those coordinates, whose key would name another
        # user (review "diff44").
        return {"key": None, "key_omitted": found}
    return {"key": shown_key(found.key)}


_NUMBER = re.compile(r"[0-9]{1,9}")  # ASCII digits only: int() refuses "²", isdigit() not
MESSAGE_SHOWN = 300
"""Characters of a dead letter's error message a report line shows (the header has more)."""


def failure_of(headers: Sequence[Header] | None) -> dict[str, Any]:
    """What a report line says of the failure, from the dead letter's headers: a dry run
    listed reason and call only, and deciding what to replay meant reading the DLQ again
    for the status, the attempts, the time and the message with its x-request-id (review
    "ops29")."""
    status = _text(header_value(headers, "userpilot.error.status"))
    attempts = _text(header_value(headers, "userpilot.error.attempts"))
    message = _text(header_value(headers, "__connect.errors.exception.message"))
    return {
        "status": int(status) if _NUMBER.fullmatch(status) else None,
        "attempts": int(attempts) if _NUMBER.fullmatch(attempts) else None,
        "dead_lettered_at": _text(header_value(headers, "userpilot.error.dead_lettered_at"))
        or None,
        "message": message[:MESSAGE_SHOWN] + ("…" if len(message) > MESSAGE_SHOWN else "")
        or None,
    }


KEY_SHOWN = 256
"""Bytes of a record's key a report line shows: a user id fits; a 1.2 MB key printed whole
made a 1.2 MB line per record (review "poison24")."""


def shown_key(key: bytes | None) -> str | None:
    """The key as a report line shows it: text, cut past KEY_SHOWN bytes with its size."""
    if not key:
        return None
    if len(key) <= KEY_SHOWN:
        return key.decode("utf-8", "replace")
    return f"{key[:KEY_SHOWN].decode('utf-8', 'ignore')}… ({len(key)} bytes)"


def _stdout_json(doc: Mapping[str, Any]) -> bool:
    """Print one JSON line; False when nobody reads stdout any more (`| head`, `| less`
    quit).

    stdout then goes to /dev/null (Python's own advice), so the flush at exit cannot raise
    again. Raised through the run, it had published a batch and committed none of it: the
    next run sent it all again (review "dlq33"). A stdout that cannot encode the line (an
    ASCII or Latin-1 locale, a `josé` key) gets it with JSON's escapes: raised, it did the
    same (review "replay41")."""
    try:
        try:
            # Flushed: buffered (no PYTHONUNBUFFERED), a full disk or a closed pipe showed
            # only at exit, after the whole selection, as exit 120 (review "diff50c").
            print(json_line(doc), file=sys.stdout, flush=True)  # one line whatever a key holds
        except UnicodeEncodeError:
            print(json.dumps(doc), file=sys.stdout, flush=True)
    except OSError:
        # Or a full disk under `> replay.log` (ENOSPC, EIO): raised, the batch published
        # was committed by none, and the next run sent it again (review "cli50").
        stdout_gone()
        return False
    return True


def _user_reader(settings: Settings, registry: Registry | None = None
                 ) -> Callable[[bytes | None], str | None]:
    """A dead letter's value → its event's `userId` (None when its bytes cannot be read);
    a registry that does not answer raises (`_shown_event`'s rule: the run stops)."""
    event_of = _event_reader(settings, registry)

    def user_of(value: bytes | None) -> str | None:
        try:
            user = event_of(value)["event"].get("userId")
        except Unreadable:
            return None
        return user if isinstance(user, str) else None

    return user_of


def _skip_keys(path: str | None, *, as_json: bool = False) -> frozenset[bytes]:
    """`--skip-keys FILE`: the ids, as `delete-users` reads them (one a line, exactly as
    written, a byte order mark's both forms; `--skip-keys-json`: one JSON string a line, as
    `delete-users --json` reads them: read one a line, `"carol"` kept its quotes and matched
    nothing, review "whole48"), as the record keys `produce` writes."""
    if path is None:
        return frozenset()
    from consumer.gdpr import quoted_ids, read_json_ids, read_user_ids

    option = "--skip-keys-json" if as_json else "--skip-keys"
    try:
        with open(path, encoding="utf-8") as stream:  # as delete-users opens it
            ids = (read_json_ids if as_json else read_user_ids)(stream)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{option} {path!r}: cannot read it ({exc})") from None
    except ConfigError as exc:
        raise ConfigError(f"{option} {path!r}: {exc}") from None
    if not ids:
        raise ConfigError(f"{option} {path!r} holds no id (one a line)")
    if not as_json:
        count, said = quoted_ids(ids, "--skip-keys-json")
        if count:  # a key in quotes skips only a key holding them (review "gdpr54")
            log.warning("%s %r: %s", option, path, said)
    return frozenset(user_id.encode("utf-8", "surrogatepass") for user_id in ids)


def _registry(settings: Settings) -> Registry:
    """The worker's registry client, from its settings (auth, proxy)."""
    return Registry(
        settings.registry_url,
        settings.registry_auth.reveal() if settings.registry_auth else None,
        proxy=settings.registry_proxy.reveal() if settings.registry_proxy else None)


def _event_reader(settings: Settings, registry: Registry | None = None
                  ) -> Callable[[bytes | None], dict[str, Any]]:
    """A dead letter's value → its event as canonical JSON (what `explain` reads), through
    the worker's registry client (its settings, auth and proxy)."""
    if registry is None:
        registry = _registry(settings)

    def event_of(value: bytes | None) -> dict[str, Any]:
        try:
            event = codec.decode(value, registry.writer_schema)
            shown = {key: item for key, item in event.items() if item is not None}
        except DeadLetter as exc:  # the record's own fault (its bytes, its schema)
            raise Unreadable(registry.redact(f"{type(exc).__name__}: {exc}")) from None
        except Exception as exc:  # the registry's (an outage), never the record's
            # Redacted: a gateway's error page may echo the request's Authorization.
            raise RuntimeError(registry.redact(
                f"the schema registry did not answer ({type(exc).__name__}: {exc})"[:500])
            ) from None
        line: dict[str, Any] = {"event": shown}
        # What `run` knows and canonical JSON cannot carry: ids read as U+FFFD are refused
        # (`routing`), and `explain` refuses them too when told (review "diff48b").
        if event.cut:
            line["event_cut"] = sorted(event.cut)
        if event.surrogated:
            line["event_surrogated"] = {field: sorted(texts)
                                        for field, texts in event.surrogated.items()}
        return line

    return event_of


class Unreadable(Exception):
    """`--show-event`: a dead letter whose event cannot be read from its own bytes."""


def _print_summary(summary: Summary, dry_run: bool, interrupted: bool,
                   stdout_gone: bool = False) -> None:
    """The summary line on stdout; on stderr when nobody reads stdout any more: after
    `| head` a run had replayed and committed a whole batch (up to 500 records) while the
    reader saw two lines, and its counts went to /dev/null (review "dlq48")."""
    doc = {"summary": summary.as_dict(), "dry_run": dry_run, "interrupted": interrupted}
    if stdout_gone or not _stdout_json(doc):  # or gone just now, at this very line
        print(json_line(doc), file=sys.stderr)
    for item in summary.over_limit_offsets[:50]:
        print(f"over replay limit (not replayed): {item}", file=sys.stderr)
    for item in summary.unrestored_offsets[:50]:
        print(f"value-less dead letter not restorable (not replayed): {item}", file=sys.stderr)
    for item in summary.unpublishable_offsets[:50]:
        print(f"refused by its origin topic (not replayed): {item}", file=sys.stderr)
    for item in summary.no_origin_offsets[:50]:
        # Counted only, it was skipped without a word (review "replay35").
        print(f"no origin topic in its headers (not a dead letter of this worker; not "
              f"replayed): {item}", file=sys.stderr)
    took = "listed above by this dry run" if dry_run else "replayed in this run"
    for item in summary.doubled_offsets[:50]:
        print(f"second dead letter of an event {took} (not replayed): {item}",
              file=sys.stderr)
    if summary.unpublishable:
        print("some records were refused by their origin topic for good (too large, the "
              "topic gone): they stay in the DLQ; fix the topic, then replay them by "
              "--partition and --from-offset/--to-offset", file=sys.stderr)
    if summary.over_limit:
        # This selection's progress is past them: the same selection with a higher limit
        # reads on from there and replays none of them (review replay25).
        print("some events reached the replay limit (--max-replays): they stay in the DLQ; "
              "to replay them anyway, name them by --partition and --from-offset/"
              "--to-offset with a higher --max-replays (the same selection again starts "
              "past them)", file=sys.stderr)


def main(args: argparse.Namespace) -> int:
    from consumer.config import load_settings

    if args.from_start and not args.dry_run:
        raise ConfigError("--all lists every dead letter and needs --dry-run: replayed "
                          "from the start, what earlier runs replayed would be sent again")
    if args.show_event and not args.dry_run:
        raise ConfigError("--show-event lists events and needs --dry-run")
    if args.show_event and not os.environ.get("SCHEMA_REGISTRY_URL", "").strip():
        raise ConfigError("--show-event needs SCHEMA_REGISTRY_URL: the events are Avro, "
                          "decoded by the schema their producer registered")
    skipping = args.skip_keys is not None or args.skip_keys_json is not None
    if skipping and not os.environ.get("SCHEMA_REGISTRY_URL", "").strip():
        raise ConfigError("--skip-keys needs SCHEMA_REGISTRY_URL: a dead letter without a key "
                          "(a keyless producer's) is matched by its event's userId")
    if not os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip():
        raise ConfigError("replay needs KAFKA_BOOTSTRAP_SERVERS")
    if (args.from_offset is not None and args.to_offset is not None
            and args.from_offset > args.to_offset):
        raise ConfigError(f"--from-offset {args.from_offset} is past --to-offset "
                          f"{args.to_offset}: nothing could be selected")
    if args.since is not None and args.until is not None and args.since > args.until:
        raise ConfigError(f"--since {args.since.isoformat()} is after --until "
                          f"{args.until.isoformat()}: nothing could be selected")
    # The worker's own settings: same KAFKA_* pass-through (secrets, service links) and
    # the validated WORKER_REPLAY_MAX; what replay does not use may be left unset.
    settings = load_settings(os.environ, offline=True)
    from consumer.logs import configure_command_logging, error_line

    configure_command_logging(settings.log_format, settings.log_secrets())
    max_replays = settings.replay_max if args.max_replays is None else args.max_replays
    filters = Filters(
        # As the headers spell them (snake_case reasons, bare status codes): `Bad_Request`
        # or " 429" would otherwise match nothing, and name a group of their own.
        reasons=frozenset(r.strip().lower() for r in args.reason),
        statuses=frozenset(args.status), since=args.since,
        until=args.until, from_offset=args.from_offset, to_offset=args.to_offset,
        partitions=frozenset(args.partition), max_replays=max_replays,
        calls=frozenset(args.call), topics=frozenset(args.topic),
        skip_void=frozenset(args.skip_void),
        skip_keys=(_skip_keys(args.skip_keys)
                   | _skip_keys(args.skip_keys_json, as_json=True)),
    )
    conf: dict[str, Any] = settings.kafka_config()
    from consumer import reach

    # A dry run builds no producer: a read-only principal needs no producer id (diff58b).
    problem = reach.kafka(conf, args.timeout, [args.dlq_topic], producer_id=not args.dry_run)
    if problem is not None:
        # As every command's last word: one JSON line when the logs are JSON (review "ops36").
        # Escaped: it may quote another party (an OIDC endpoint's body; review "diff52a"),
        # in text format only (the JSON line escapes it itself, review "diff53c").
        error_line(f"nothing was replayed: {problem}", os.environ, quoted=True)
        return 1
    group = args.group or default_group(args.dlq_topic, filters)

    # Ctrl-C or SIGTERM: stop after the record at hand, publish and commit what was handled
    # (a traceback and records the next run would replay again, before). So does a closed
    # stdout: the reader went away.
    stop = threading.Event()
    unread: list[bool] = []

    def report(line: dict[str, Any]) -> None:
        if not unread and not _stdout_json(line):
            unread.append(True)
            stop.set()

    for sig in stop_signals():
        signal.signal(sig, lambda _sig, _frame: stop.set())
    try:
        secret = settings.replay_secret()
        if secret is None and not args.dry_run:
            print("warning: USERPILOT_API_KEY is not set: the replayed records are not "
                  "sealed as replay's, so the DLQ guard counts those that fail again (set "
                  "it to the workers' token)", file=sys.stderr)
        # One registry client for both (its schema cache, one fetch per schema id).
        schemas = (_registry(settings) if args.show_event or filters.skip_keys else None)
        summary = run_replay(conf, args.dlq_topic, group, filters, dry_run=args.dry_run,
                             report=report, stopping=stop.is_set, secret=secret,
                             from_start=args.from_start,
                             event_of=_event_reader(settings, schemas) if args.show_event
                             else None,
                             user_of=_user_reader(settings, schemas) if filters.skip_keys
                             else None)
    except ReplayStuck as stuck:
        _print_summary(stuck.summary, args.dry_run, stop.is_set(), bool(unread))
        error_line(f"replay stopped: {stuck.args[0]}; " + (
            "the listing stopped there: a dry run replays and commits nothing; run it again"
            if args.dry_run else
            "the records before it are replayed and committed, a rerun starts at it"),
            os.environ)
        return 1
    _print_summary(summary, args.dry_run, stop.is_set(), bool(unread))
    if stop.is_set():
        why = "stdout was closed" if unread else "interrupted"
        print(f"{why}: a dry run commits nothing; run it again to see every record"
              if args.dry_run else
              f"{why}: what was replayed is committed; run again to go on",
              file=sys.stderr)
        return 130
    # Not replayed and not to be read again by this selection: the caller must know (a
    # value-less dead letter whose original is gone or changed exited 0, review "dlq33").
    return 1 if summary.unpublishable or summary.unrestored_offsets else 0
