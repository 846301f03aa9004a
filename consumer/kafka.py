"""The Kafka edge: the consumer, the dead-letter producer, and Kafka errors in our terms.

Every consumer call runs on one dedicated thread (the poll thread), so librdkafka's
rebalance callbacks, pause/resume and commits never race each other; the asyncio side
reaches it through `KafkaSource.call`. One exception: `close()` at shutdown runs on its own
"kafka-close" thread (so that an unreachable coordinator cannot hold the exit), and the
final revoke and commit callbacks run there, while the poll thread is idle: nothing else
calls the consumer by then.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import math
import re
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Any, NamedTuple, Protocol, TypeVar

from confluent_kafka import (
    Consumer,
    IsolationLevel,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicCollection,
    TopicPartition,
)
from confluent_kafka.admin import AclOperation, AdminClient, OffsetSpec

from consumer.errors import ConfigError, DlqRecordTooLarge
from consumer.librdkafka import (
    DLQ_PRODUCER,
    METADATA_REFRESH_MS,
    admin_settings,
    allowed,
    consumer_settings,
    producer_settings,
    sasl_mechanism,
)
from consumer.logs import RateLimit, partitions_text
from consumer.offsets import NOTE_MAX_CHARS, NOTE_MIN_CHARS, Finished, decode_note

__all__ = [
    "METADATA_REFRESH_MS",
    "TP",
    "DeadLetterProducer",
    "KafkaMessage",
    "KafkaSource",
    "Partitions",
    "group_refused",
    "is_fatal",
    "login_refused",
    "make_producer",
    "partition_end",
    "topic_not_there",
    "topic_refused",
]

log = logging.getLogger(__name__)
# A down broker makes librdkafka call error_cb several times a second: one line per broker
# per 10 s is enough to see it (the suppressed count is appended to the next line).
log.addFilter(RateLimit(10.0))
# A throttled client is throttled on every request: one line per broker a minute.
throttle_log = logging.getLogger(f"{__name__}.throttle")
throttle_log.addFilter(RateLimit(60.0))
THROTTLE_TOLD_S = 0.5
"""The shortest throttle a broker imposes that is logged (`KafkaSource._on_throttle`)."""

_LATEST: Callable[[], Any] = OffsetSpec.latest  # untyped upstream
_EARLIEST: Callable[[], Any] = OffsetSpec.earliest
DOWN_TOLD_AFTER_S = 5.0
"""The shortest time without brokers whose end is logged (`KafkaSource._brokers_seen`)."""
RESET_ASK_S = 1.0  # the lookups after offset resets (`_tell_resets`), all together
COMMIT_SILENCE_S = 8.0  # an unanswered commit this old means Kafka is not answering
LOGIN_REFUSED_STOP_S = 60.0
"""A login the brokers refuse this long after start-up stops the worker (exit 1): its
credentials and certificates are read once, at start-up, so a rotated Secret (a new
KAFKA_SASL_PASSWORD_FILE, client certificate or CA) took a restart nobody made. The pod
stayed live, unready ("not connected to Kafka") and delivered nothing (review "rotate57").
Long enough for a rotation done in two steps (the brokers first, then the Secret)."""
_NOT_A_REFUSAL = ("Broker transport failure", "Timed out", "timed out")
"""librdkafka reports a SASL handshake cut by the network as an authentication error too."""
_CERTIFICATE_REFUSED = ("alert bad certificate", "alert unknown ca", "certificate required",
                        "certificate expired", "certificate revoked", "certificate unknown")
"""TLS alerts by which brokers refuse the client's certificate: under TLS 1.3 librdkafka
reports them as a transport failure ("Receive failed: ... alert bad certificate"), and a
refused certificate was waited for as an outage (review "diff57")."""
SYNC_PROBE_S = 2.0
"""Before a synchronous commit (a revoke's), the group coordinator must answer a committed
offsets request within this: librdkafka's synchronous commit has no bound of its own
(`KafkaSource.commit`)."""
ANSWER_SLICE_S = 0.005  # poll slices while a commit awaits its answer (see _poll_first)
LEAVE_WAIT_S = 3.0  # at close, the revoke and LeaveGroup after unsubscribe wait at most this
LEAVE_SEND_S = 0.3  # ... and, once revoked, this long for the LeaveGroup to go out
FETCHLESS_S = 12.0
"""How long after its assignment a partition of a steady group may show librdkafka's
fetch_state "none" or "stopped" (no fetcher started) before it is assigned again: two
statistics reports at least, and a healthy partition, paused or idle, is "active" within
its first second."""
_NOT_FETCHING = frozenset({"none", "stopped"})

# librdkafka refuses an oversized record locally and the broker with the same code; a
# topic whose segment.bytes is below the record (its max.message.bytes above) answers
# RECORD_LIST_TOO_LARGE: retried, the same bytes were refused for ever (review "big43").
_TOO_LARGE = (KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE)
# A source topic the brokers answer with these is not there for this consumer: a typo in
# KAFKA_TOPICS, a topic not created yet, or an ACL that hides it.
_NOT_THERE = (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError.TOPIC_AUTHORIZATION_FAILED)

T = TypeVar("T")
TP = tuple[str, int]

_OFFSET_RESET = re.compile(
    r"(?:^|\]: )([A-Za-z0-9._-]+) \[([0-9]+)\]: offset reset \(at offset ([0-9]+)[ ,)]")
"""librdkafka's WARNING when a fetch position was out of range and `auto.offset.reset`
moved it (`rdkafka_offset.c`): "[thrd:main]: <topic> [<partition>]: offset reset (at
offset 20 (leader epoch -1), broker 1) to offset BEGINNING ..." (the thread's name left out
with `log.thread.name=false`). Its only trace: the consumer hands over no error for it."""

WATCHED_LOG_LEVEL = 4
"""librdkafka logs the offset reset at syslog level 4 (warning): the source consumer logs at
least that much, whatever `log_level` says; `_ResetWatch` passes on only what was asked."""
_PYTHON_LEVEL = (logging.CRITICAL,) * 3 + (logging.ERROR, logging.WARNING, logging.INFO,
                                           logging.INFO, logging.DEBUG)
"""confluent-kafka's mapping of librdkafka's syslog levels 0-7 to Python's."""


class _ResetWatch:
    """The consumer's `logger`: notes each offset reset librdkafka logs, then logs it.

    Why: a partition whose position fell out of its log (retention or delete-records
    removed the backlog of a partition paused through an outage, or the committed offset
    of one not read for days) goes on from the log's start, and the offsets between were
    never handed over: events lost unseen, with nothing but this line to tell, and that
    line rate-limited with the topic's others (review "topo53"). Seen here, before the
    logger's filters; called on the thread that polls (confluent-kafka serves librdkafka's
    log queue in `consume`/`poll`). With a `log_level` under 4 raised for the watch, the
    warning-and-above levels the raise let in (below `floor`) are not passed on; DEBUG and
    INFO lines (`KAFKA_DEBUG`) are.
    """

    __slots__ = ("_floor", "_logger", "_seen")

    def __init__(self, logger: Any, seen: Callable[[TP, int], None],
                 floor: int = logging.NOTSET) -> None:
        self._logger = logger
        self._seen = seen
        self._floor = floor

    def log(self, level: int, msg: str, *args: Any) -> None:
        if len(args) == 3 and args[0] == "OFFSET" and isinstance(args[2], str):
            found = _OFFSET_RESET.search(args[2])
            if found is not None:
                self._seen((found[1], int(found[2])), int(found[3]))
        # Only the levels the raise let in are held back: `KAFKA_DEBUG`'s lines (librdkafka
        # logs at 7 with `debug` set, whatever `log_level` says) still pass (review
        # "diff53b").
        if not logging.WARNING <= level < self._floor:
            self._logger.log(level, msg, *args)


def _watched(settings: dict[str, Any], seen: Callable[[TP, int], None]) -> None:
    """Wrap the consumer's logger in a `_ResetWatch`, raising `log_level` to the reset's."""
    if settings.get("logger") is None:
        return
    floor = logging.NOTSET
    try:
        asked = int(str(settings.get("log_level", 6)).strip())
    except ValueError:
        asked = 6  # librdkafka refuses it: the consumer is never made
    if 0 <= asked < WATCHED_LOG_LEVEL:
        settings["log_level"] = WATCHED_LOG_LEVEL
        floor = _PYTHON_LEVEL[asked]
    settings["logger"] = _ResetWatch(settings["logger"], seen, floor)


class Partitions(NamedTuple):
    """What the brokers say of the source topics (`KafkaSource.partitions`)."""

    total: int  # partitions of the topics that answered
    missing: dict[str, str]  # topic: the brokers' reason it is not there


class KafkaMessage(Protocol):
    """The parts of confluent_kafka.Message the worker reads (a stub stands in for tests)."""

    def topic(self) -> str | None: ...
    def partition(self) -> int | None: ...
    def offset(self) -> int | None: ...
    def key(self) -> bytes | None: ...
    def value(self) -> bytes | None: ...
    def headers(self) -> Any: ...
    def timestamp(self) -> tuple[int, int]: ...
    def error(self) -> KafkaError | None: ...


def _config_error(exc: KafkaException, what: str) -> ConfigError:
    return ConfigError(f"{what}: librdkafka refused the configuration: {exc.args[0]}")




class KafkaSource:
    """A consumer-group member with manual commits and cooperative-sticky assignment."""

    def __init__(
        self,
        conf: dict[str, Any],
        topics: Sequence[str],
        *,
        on_assign: Callable[[list[TP]], None],
        on_revoke: Callable[[list[TP]], None],
        on_lost: Callable[[list[TP]], None],
        on_stats: Callable[[dict[str, Any]], None] | None = None,
        on_committed: Callable[[list[tuple[TP, int]], list[TP]], None] | None = None,
        on_refetch: Callable[[list[TP]], None] | None = None,
        on_reset: Callable[[TP, int, bool | None], None] | None = None,
        stats_interval_ms: int = 5000,
    ) -> None:
        settings: dict[str, Any] = consumer_settings(conf)
        # The high watermarks' client (`high_watermarks`), made on first use: the
        # consumer's own settings in a producer's shape, as `reach` makes its admin clients.
        self._marks_settings = admin_settings(conf)
        self._marks: AdminClient | None = None
        _watched(settings, self._reset_seen)
        # Statistics are always on: their broker states clear "not connected" on recovery
        # even when no message and no commit comes back (an idle topic).
        settings["statistics.interval.ms"] = stats_interval_ms
        settings["stats_cb"] = self._on_stats_raw
        settings["error_cb"] = self._on_error
        settings["throttle_cb"] = self._on_throttle
        settings["on_commit"] = self._on_commit
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kafka-poll")
        self._topics = list(topics)
        self._on_assign = on_assign
        self._on_revoke = on_revoke
        self._on_lost = on_lost
        self._on_committed = on_committed
        self._brokers_up = True
        self._down_since: float | None = None  # when the brokers were last found down
        self._commit_waiting_since: float | None = None  # oldest unanswered async commit
        self._answered = False  # a commit acknowledged offsets during this consume
        # When each asynchronous commit not answered yet was sent, and its partitions,
        # oldest first: answers come in order, one per commit (poll thread).
        self._sent_async: collections.deque[tuple[float, list[TP]]] = collections.deque()
        self._assigned_at = 0.0  # the last assignment: Kafka answered then (`_assigned`)
        self._paused: set[TP] = set()  # paused by `pause`, not resumed since (poll thread)
        self.abandoned = False  # close() gave up: exit the process without destroying it
        # The longest note commits carry: lowered (halved) each time the broker refuses
        # one as too large (offset.metadata.max.bytes), 0 once notes are off altogether.
        self.note_limit = NOTE_MAX_CHARS
        self.fatal: KafkaError | None = None
        self._out_of_resources: str | None = None  # librdkafka's _CRIT_SYS_RESOURCE text
        # The brokers' refusal of the worker's login, and since when, until a broker is up
        # again (`_on_error`; poll thread). Not with OAUTHBEARER: librdkafka fetches its
        # tokens anew itself, and an identity provider's outage (its token refused once
        # expired) stopped every replica, a crash loop (review "diff57").
        self._refused: tuple[float, str] | None = None
        self._stops_on_refusal = sasl_mechanism(conf) != "OAUTHBEARER"
        self._stats_cb = on_stats
        self._on_refetch = on_refetch
        self._on_reset = on_reset
        # Offset resets librdkafka logged during the current call (`_ResetWatch`), told
        # once it returns (`_tell_resets`): a client call inside its log callback is not
        # allowed.
        self._noted_resets: list[tuple[TP, int]] = []
        # Partitions assigned and not seen fetching since (statistics), since when, and those
        # to assign again at the next consume (`_watch_fetchers`; poll thread).
        self._unstarted: dict[TP, float] = {}
        self._refetch: list[TP] = []
        try:
            self._consumer = Consumer(settings)
        except KafkaException as exc:
            raise _config_error(exc, "consumer") from None

    @property
    def fatal_error(self) -> str | None:
        """librdkafka's fatal error, if one happened, or a login the brokers have refused
        for LOGIN_REFUSED_STOP_S: the worker must stop."""
        if self.fatal is not None:
            return self.fatal.str()
        if self._out_of_resources is not None:
            return (f"Kafka's client could not make a thread or socket it needs "
                    f"({self._out_of_resources}): the process is at a system limit (threads: "
                    "ulimit -u or the container's pids limit; descriptors: ulimit -n); "
                    "raise it")
        refused = self._refused
        if refused is not None and time.monotonic() - refused[0] >= LOGIN_REFUSED_STOP_S:
            return (f"the brokers have refused the worker's login for "
                    f"{LOGIN_REFUSED_STOP_S:.0f} s ({refused[1]}); credentials and "
                    "certificates are read at start-up, so the worker exits for its restart "
                    "to read the current ones (a rotated KAFKA_SASL_PASSWORD_FILE, "
                    "KAFKA_SSL_* file or Secret); if they are wrong, fix the KAFKA_SASL_* or "
                    "KAFKA_SSL_* settings")
        return None

    @property
    def connected(self) -> bool:
        """Kafka reachable, as far as we can tell within seconds.

        Not after librdkafka's "all brokers down" or statistics (every 5 s) without a broker
        UP, until a fetch, a commit acknowledgement or the statistics show one again; and not
        while a commit has gone unanswered for COMMIT_SILENCE_S (a hung broker keeps its
        connections open, so only the missing answer tells).
        """
        waiting = self._commit_waiting_since
        if waiting is not None and time.monotonic() - waiting > COMMIT_SILENCE_S:
            return False
        return self._brokers_up

    def _brokers_seen(self, up: bool) -> None:
        """Poll thread: whether Kafka answers, as a callback or a fetch just told; the end
        of an outage is logged with how long it lasted. Every other dependency said it
        answered again; Kafka's last line stayed "1/1 brokers are down" (review "logs56")."""
        if up and self._down_since is not None:
            lasted = time.monotonic() - self._down_since
            if lasted >= DOWN_TOLD_AFTER_S:  # not a start-up's first statistics
                log.warning("kafka: the brokers answer again (after %.0f s); reading and "
                            "committing go on", lasted)
            self._down_since = None
        if up:
            self._refused = None
        elif not up and self._down_since is None:
            self._down_since = time.monotonic()
        self._brokers_up = up

    def _on_error(self, err: KafkaError) -> None:
        if err.code() == KafkaError._ALL_BROKERS_DOWN:
            self._brokers_seen(False)
        if is_fatal(err):
            self.fatal = err
        if err.code() == KafkaError._CRIT_SYS_RESOURCE and self._out_of_resources is None:
            # A thread or socket the client could not make: it never recovers alone (no
            # assignment, a WARNING every 10 s for good, review "env60"). A stop names it.
            self._out_of_resources = err.str()
        # Keyed by the broker the line names ("host:port/id: Connect to ... failed (after
        # 3ms ...)"), so the rate limit holds however the details vary.
        text = err.str()
        where, sep, rest = text.partition(": ")
        if not sep or "/" not in where:
            where, rest = err.name(), text
        if login_refused(err) and self._stops_on_refusal:
            # Until a broker is up: a network error of another broker (one bootstrap
            # address gone) restarted the clock, and the worker never stopped (review
            # "diff57"). An outage after the refusal still stops it; its restart waits.
            if self._refused is None:
                self._refused = (time.monotonic(), text)
            log.error("kafka %s: the brokers refuse the worker's login: %s (the worker stops "
                      "if no broker takes it for %.0f s, for its restart to read its "
                      "credentials anew)", where, rest, LOGIN_REFUSED_STOP_S)
            return
        log.warning("kafka %s: %s", where, rest)

    @staticmethod
    def _on_throttle(event: Any) -> None:
        """A broker throttled the consumer (a client quota on its client id or principal).
        A quota below what the worker needs starved its fetches: nothing consumed for
        minutes, readiness green and no line at all, a fetch answered empty every second
        (review "sizes59"). Said, once a minute per broker."""
        _told_throttle(event, "consumer", "consumer_byte_rate",
                       "limits its fetches and commits; raise the quota, or expect delivery "
                       "no faster than it allows")

    def _on_stats_raw(self, raw: str) -> None:
        stats = json.loads(raw)
        brokers = [b for b in stats.get("brokers", {}).values() if b.get("nodeid", -1) >= 0]
        if brokers:
            # librdkafka's own view: a reachable cluster has a broker in state UP.
            self._brokers_seen(any(b.get("state") == "UP" for b in brokers))
        self._watch_fetchers(stats)
        if self._stats_cb is not None:
            self._stats_cb(stats)

    def _watch_fetchers(self, stats: dict[str, Any]) -> None:
        """Queue for a new assignment the partitions librdkafka has not fetched since they
        were assigned here: their fetch_state still "none" (a partition new to the process)
        or "stopped" (one owned before, revoked, given back) FETCHLESS_S after the
        assignment, in a steady group. Any other state once seen (fetching, asking for an
        offset) clears the partition for this assignment.

        Why: librdkafka asks for the committed offsets of a new assignment before it fetches;
        answered NOT_COORDINATOR for the whole request (the coordinator moving, a broker
        fenced for an instant), it never asks again and never fetches (librdkafka#5586): the
        partitions stalled for good behind a ready replica, with no lag series for any alert
        (review "broker49", reproduced through a proxy answering so in "stuck49"). Counted
        per assignment, not from offsets the statistics carry over from an earlier one: a
        partition given back was missed (review "diff49c"). Assigned again, their committed
        offsets are asked for anew."""
        if not self._unstarted:
            return
        cgrp = stats.get("cgrp") or {}
        steady = cgrp.get("state") == "up" and cgrp.get("join_state") == "steady"
        topics = stats.get("topics") or {}
        now = time.monotonic()
        for tp, since in list(self._unstarted.items()):
            part = ((topics.get(tp[0]) or {}).get("partitions") or {}).get(str(tp[1]))
            if part is None:
                continue
            if part.get("fetch_state") not in _NOT_FETCHING:
                del self._unstarted[tp]
            elif steady and now - since >= FETCHLESS_S and tp not in self._refetch:
                self._refetch.append(tp)

    def _assign_again(self) -> None:
        """Assign again the partitions `_watch_fetchers` queued and still assigned, without
        an offset (the committed one is asked for anew); paused ones stay paused. Outside
        the rebalance callbacks: the worker's own state is the partitions' as before."""
        queued, self._refetch = self._refetch, []
        try:
            owned = {(tp.topic, tp.partition) for tp in self._consumer.assignment()}
        except KafkaException:
            return
        parts = [tp for tp in queued if tp in owned]
        if not parts:
            return
        try:
            self._consumer.incremental_unassign([TopicPartition(t, p) for t, p in parts])
            self._consumer.incremental_assign([TopicPartition(t, p) for t, p in parts])
            paused = [TopicPartition(t, p) for t, p in parts if (t, p) in self._paused]
            if paused:
                self._consumer.pause(paused)
        except KafkaException as exc:
            log.warning("assigning %s again failed (%s); asking again", partitions_text(parts), exc)
            return
        now = time.monotonic()
        for tp in parts:
            self._unstarted[tp] = now  # a new assignment: watched again
        log.warning("librdkafka never started fetching %s (its committed offsets were refused "
                    "when it was assigned, librdkafka#5586): assigned again",
                    partitions_text(parts))
        if self._on_refetch is not None:
            self._on_refetch(parts)

    def _on_commit(self, err: KafkaError | None, parts: list[TopicPartition]) -> None:
        """Commit results, served during consume: acknowledged offsets go to the worker."""
        # one result a commit
        sent_at, sent = self._sent_async.popleft() if self._sent_async else (0.0, [])
        if err is not None and err.code() != KafkaError._NO_OFFSET:
            log.warning("offset commit failed (%s); the next commit covers it", named(err))
        if err is None or err.code() >= 0 or err.code() == KafkaError._NO_OFFSET:
            # The coordinator answered (a broker error code is an answer too); local
            # errors (waiting for the coordinator, transport, timeout) are not.
            self._brokers_seen(True)
            # The clock goes on from the next commit still out: cleared, a coordinator that
            # answered one commit and then hung while another was out went unnoticed (the
            # worker sends no commit while one is outstanding), ready for a minute or more
            # (review "rebal44"). Not from before the last assignment, Kafka's answer too.
            self._commit_waiting_since = (
                max(self._sent_async[0][0], self._assigned_at) if self._sent_async else None)
        elif not self._sent_async and sent_at < self._assigned_at:
            # The last commit out, sent before the assignment (Kafka's answer since), failed
            # locally: kept, its clock made a quiet replica whose partitions went elsewhere
            # unready for good, no later commit to clear it (review "probes43").
            self._commit_waiting_since = None
        self._notes_now_refused((tp.error.code() for tp in parts or [] if tp.error is not None),
                                (len(tp.metadata or "") for tp in parts or []))
        done = [((tp.topic, tp.partition), tp.offset) for tp in parts or []
                if tp.error is None and tp.offset >= 0]
        failed = [(tp.topic, tp.partition) for tp in parts or []
                  if tp.error is not None or (err is not None and tp.offset >= 0)]
        if err is not None:
            done = []
            if not parts:
                # A failure naming no partition (librdkafka does not promise to name them):
                # that commit's are requested again. Acknowledged as nothing, it stayed
                # outstanding, and no commit followed it until a rebalance (review
                # "core41", suspected).
                failed = sent
        if done:
            # Offsets acknowledged: the window may have freed (see `consume`). Not for an
            # error answer: the offsets are requested again, and returning at once would
            # repeat the commit at the coordinator's round trip (a rebalance in progress).
            self._answered = True
        if self._on_committed is not None:
            self._on_committed(done, failed)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a consumer call on the poll thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- everything below runs on the poll thread -------------------------------------
    def subscribe(self) -> None:
        self._consumer.subscribe(
            self._topics,
            on_assign=lambda _c, parts: self._assigned([(p.topic, p.partition) for p in parts]),
            on_revoke=lambda _c, parts: self._taken(parts, self._on_revoke),
            on_lost=lambda _c, parts: self._taken(parts, self._on_lost),
        )

    def _taken(self, parts: list[TopicPartition], then: Callable[[list[TP]], None]) -> None:
        """Partitions revoked or lost: no longer watched for a fetch (`_watch_fetchers`)."""
        taken = [(p.topic, p.partition) for p in parts]
        for tp in taken:
            self._unstarted.pop(tp, None)
        self._forget_resets(taken)
        self._refetch.clear()  # a rebalance under way: asked again at the next report
        then(taken)

    def _assigned(self, parts: list[TP]) -> None:
        """An assignment is the coordinator's answer (to the JoinGroup and SyncGroup): Kafka
        answers. A commit that only met local errors through an outage longer than the
        session left `connected` False after the rejoin, and its partitions' offsets were
        released with the session, so no later commit's answer cleared it: a quiet replica
        stayed unready, and read no commit notes before taking its partitions' messages
        (review "probes43")."""
        self._assigned_at = time.monotonic()
        for tp in parts:
            self._unstarted[tp] = self._assigned_at
        self._forget_resets(parts)
        self._refetch.clear()  # a rebalance under way: asked again at the next report
        # A commit still out (partitions kept through a cooperative rebalance) is timed from
        # now: cleared, no commit followed it while it was out, and a coordinator that hung
        # then went unnoticed (review "diff44").
        self._commit_waiting_since = self._assigned_at if self._sent_async else None
        self._brokers_seen(True)
        self._on_assign(parts)

    def consume(self, max_messages: int, timeout_s: float) -> list[Message]:
        """Up to `max_messages`, returning as soon as at least one is there.

        `Consumer.consume(n, timeout)` waits for all n or the timeout, which adds up to the
        whole timeout of latency at low traffic; one blocking `poll` then a non-blocking
        `consume` gets the first message at once and whatever else is ready. Also at once,
        with no message, when a commit's acknowledgement was served: it may have freed the
        window (waiting on for a message held a full window's acknowledgement back 0.1 s).
        """
        self._answered = False
        messages = self._consume(max_messages, timeout_s)
        if self._noted_resets:
            self._tell_resets()
        if self._refetch:
            # After the poll, which served any rebalance callback pending (a revoke clears
            # the queue, `_taken`): an unassign made while the group awaits the revoke's
            # answer is taken as that answer, and the partition went to another member
            # while this one still drained it (review "whole49").
            self._assign_again()
        return messages

    def _reset_seen(self, tp: TP, at: int) -> None:
        self._noted_resets.append((tp, at))

    def _forget_resets(self, parts: Sequence[TP]) -> None:
        """Resets noted before a revoke, loss or new assignment served in the same call are
        of a previous ownership: told after it, one named a position another owner had
        moved past, and the worker counted the offsets between as lost (review
        "mutate53")."""
        if self._noted_resets:
            gone = set(parts)
            self._noted_resets = [(tp, at) for tp, at in self._noted_resets if tp not in gone]

    def _tell_resets(self) -> None:
        """Each offset reset librdkafka logged: `on_reset(tp, at, beyond_end)`, on the poll
        thread, before the batch holding the messages fetched since is taken (messages
        fetched before it may be in it too, below `at`). `beyond_end`: `at` lies past the
        log's end, asked now (the log was replaced by a shorter one), rather than before
        its start (retention or delete-records removed offsets from `at` on); None when the
        broker did not say within its share of `RESET_ASK_S`."""
        noted, self._noted_resets = self._noted_resets, []
        if self._on_reset is None:
            return
        # At most a second of the poll thread however many reset together (hundreds of
        # partitions of a topic retention overtook): those not answered count as unknown.
        ends = self.high_watermarks([tp for tp, _ in noted], RESET_ASK_S)
        for tp, at in noted:
            end = ends.get(tp, -1)
            self._on_reset(tp, at, at > end if end >= 0 else None)

    def _consume(self, max_messages: int, timeout_s: float) -> list[Message]:
        messages = self._consumer.consume(max_messages, 0)
        if not messages:
            if self._answered:
                return []
            first = self._poll_first(timeout_s)
            if first is None:
                return []
            messages = [first]
            if max_messages > 1:
                messages.extend(self._consumer.consume(max_messages - 1, 0))
        if messages:
            self._brokers_seen(True)
        return messages

    def _poll_first(self, timeout_s: float) -> Message | None:
        """One blocking poll; while commits await their answers, in short slices that end
        once one acknowledges offsets.

        Why: librdkafka serves the commit callback inside `poll` but keeps waiting for a
        message until the timeout. With the window full every partition is paused, so no
        message comes, and the acknowledgement that frees the window would wait out the
        whole poll timeout (0.1 s). Counted, not just the oldest: commits overlap (one
        answered, the next still out). An error answer does not end it: its offsets are
        requested again, and ending at once would repeat a refused commit at the
        coordinator's round trip (~190 a second during a rebalance, against 10).
        """
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if not self._sent_async:
                return self._consumer.poll(max(0.0, left))
            message = self._consumer.poll(max(0.0, min(left, ANSWER_SLICE_S)))
            if message is not None or self._answered or left <= ANSWER_SLICE_S:
                return message

    def pause(self, parts: Sequence[TP]) -> None:
        if parts:
            self._consumer.pause([TopicPartition(t, p) for t, p in parts])
            self._paused.update(parts)

    def resume(self, parts: Sequence[TP]) -> None:
        """Resume fetching `parts`; those this source had paused are woken (`_wake`)."""
        if not parts:
            return
        self._consumer.resume([TopicPartition(t, p) for t, p in parts])
        paused = [tp for tp in parts if tp in self._paused]
        self._paused.difference_update(parts)
        if paused:
            self._wake(paused)

    def _wake(self, parts: Sequence[TP]) -> None:
        """Seek each resumed partition with messages left to fetch to its own position:
        that wakes librdkafka's fetcher at once.

        Why: librdkafka's broker thread sleeps up to a second while every partition it
        fetches is paused, and a resume does not wake it; a seek does (its fetch start).
        Each window that filled and paused the replica stopped fetching for ~0.9 s after
        the resume: a fresh worker at 20 ms answers sent its first window, then nothing for
        0.9 s (tests/bench/RESULTS.md, "Round 37"). The position is the offset the resume
        fetches from anyway (the pause emptied the fetched queue), so nothing is handed over
        twice or skipped. Without the leader epoch `position` gives: with it, each seek
        asked the leader to validate it (a request per partition per resume), and a log
        found shorter sent the partition to its end instead of `auto.offset.reset`. The
        price (accepted): should librdkafka reset a paused partition's offset after an
        unclean leader election (its epoch check runs while paused, and leaves the
        position as it was), the seek puts it back there, and records between the
        truncation and that position can be skipped.

        Only partitions this source paused (a seek would throw away what an unpaused one
        prefetched) and with messages left before the high watermark last fetched: a seek
        clears the position until the next message is handed over, and a caught-up
        partition would lose the position the commit past transaction markers needs
        (`positions`). A partition without a position (nothing handed over since its
        assignment) is not sought either: it is fetched with the others its broker serves,
        or at that thread's next wake.
        """
        for tp, high in self._fetched(parts):
            if tp.offset < high:
                with contextlib.suppress(KafkaException):  # taken away meanwhile
                    self._consumer.seek(TopicPartition(tp.topic, tp.partition, tp.offset))

    def _notes_now_refused(self, codes: Iterable[int], lengths: Iterable[int] = ()) -> bool:
        """A broker whose `offset.metadata.max.bytes` is below a note refuses the commit:
        notes are cut to half the refused one's length from then on, and left out below
        NOTE_MIN_CHARS (cut, a note still names the ranges nearest the committed offset,
        where the finished events behind a stuck one lie). `codes`: the commit's error
        codes; `lengths`: its notes' lengths. True when notes were refused (the caller may
        commit again, with the shorter notes)."""
        if self.note_limit == 0 or KafkaError.OFFSET_METADATA_TOO_LARGE not in set(codes):
            return False
        longest = max((n for n in lengths if n), default=self.note_limit)
        limit = min(self.note_limit, longest) // 2
        self.note_limit = limit if limit >= NOTE_MIN_CHARS else 0
        if self.note_limit:
            log.warning("the broker refused commit metadata of %d characters as too large "
                        "(offset.metadata.max.bytes); notes of finished offsets are cut to "
                        "%d characters", longest, self.note_limit)
        else:
            log.warning("the broker refused commit metadata as too large "
                        "(offset.metadata.max.bytes); committing without notes of finished "
                        "offsets: a new owner of a partition may send events again")
        return True

    def finished_ahead(self, parts: Sequence[TP], timeout_s: float
                       ) -> tuple[dict[TP, Finished], list[TP]]:
        """What the group's last commits named finished above their offsets (their notes),
        per partition, and the partitions the coordinator did not answer for within
        `timeout_s` (the caller may ask again; until then their events above the commit
        would be sent again). Partitions without a note are in neither."""
        if not parts:
            return {}, []
        try:
            answer = self._consumer.committed([TopicPartition(t, p) for t, p in parts],
                                              timeout=timeout_s)
        except KafkaException as exc:
            log.warning("could not read the committed offsets' notes (%s); asking again",
                        exc)
            return {}, list(parts)
        out: dict[TP, Finished] = {}
        unanswered: list[TP] = []
        for tp in answer:
            if tp.error is not None:
                unanswered.append((tp.topic, tp.partition))
            elif tp.offset >= 0 and tp.metadata:
                try:
                    finished = decode_note(tp.metadata, tp.offset)
                except Exception as exc:  # one partition's note never stops the others
                    log.warning("ignoring the commit note of %s[%d] (%s)", tp.topic,
                                tp.partition, exc)
                    continue
                if finished:
                    out[(tp.topic, tp.partition)] = finished
        return out, unanswered

    def commit(self, offsets: dict[TP, int], *, wait: bool = True,
               notes: dict[TP, str] | None = None) -> bool:
        """Commit explicit offsets (next offset to read per partition), each with its note
        (`offsets.encode_note`) as the commit's metadata; True when done.

        `wait=False` sends the commit and returns: the poll loop never stalls on the
        coordinator's round trip; its result arrives through `on_committed`. `wait=True`
        blocks until the coordinator answers, which is unbounded while Kafka is down: only
        the rebalance callbacks use it, only while the source is connected, and only once
        the coordinator answered within SYNC_PROBE_S (the worker asks `answering` first).
        A commit refused during a rebalance (illegal generation, rebalance in progress, coordinator
        moving) is not an error of the worker: the offsets stay uncommitted and the next
        commit, or the revoke, covers them.
        """
        if not offsets:
            return True
        # Notes over the limit are left out (the worker encodes within it; a note encoded
        # before the limit fell goes without, and the worker records the same rule).
        notes = {tp: note for tp, note in (notes or {}).items()
                 if note and len(note) <= self.note_limit}
        parts = [TopicPartition(t, p, o, metadata=notes[(t, p)]) if notes.get((t, p))
                 else TopicPartition(t, p, o) for (t, p), o in offsets.items()]
        try:
            if wait:
                answer = self._consumer.commit(offsets=parts, asynchronous=False)
                failed = [tp for tp in answer or [] if tp.error is not None]
                if failed:
                    if notes and self._notes_now_refused(
                            (tp.error.code() for tp in failed if tp.error is not None),
                            (len(note) for note in notes.values())):
                        return self.commit(offsets, wait=True, notes=notes)
                    log.warning("offset commit refused for %s; the next commit covers it",
                                ", ".join(f"{tp.topic}[{tp.partition}]: {named(tp.error)}"
                                          for tp in failed if tp.error is not None))
                    return False
            else:
                self._consumer.commit(offsets=parts, asynchronous=True)
                sent_at = time.monotonic()
                self._sent_async.append((sent_at, list(offsets)))
                if self._commit_waiting_since is None:
                    self._commit_waiting_since = sent_at
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            if isinstance(err, KafkaError) and err.code() == KafkaError._NO_OFFSET:
                return True
            if isinstance(err, KafkaError) and is_fatal(err):
                raise
            if (wait and notes and isinstance(err, KafkaError)
                    and self._notes_now_refused([err.code()],
                                                (len(note) for note in notes.values()))):
                return self.commit(offsets, wait=True, notes=notes)
            log.warning("offset commit not done (%s); the next commit covers it",
                        named(err) if isinstance(err, KafkaError) else exc)
            return False
        return True

    def answering(self, parts: Sequence[TP]) -> bool:
        """The group coordinator answers a request for the first of `parts`' committed
        offset within SYNC_PROBE_S. `connected` is only as fresh as the last served
        callback, and a revoke's drain serves none for up to WORKER_SHUTDOWN_GRACE_SECONDS:
        a cluster that stopped answering meanwhile (connections open, nothing answered)
        held the synchronous commit, so the rebalance callback and the poll thread, for the
        whole outage (3 min 45 s measured; readiness green for a minute, SIGTERM not served,
        review "lifecycle47"). Asked on the callback's own thread: a commit made from
        another thread while the callback waits is not answered at all (review "order47").
        Not a metadata request: `list_topics` inside a callback clears confluent-kafka's
        record of the poll it runs in, and the next callback of that poll aborted the
        process (`CallState_get: Assertion cs != NULL`); `committed` does not touch it."""
        if not parts:
            return True
        topic, partition = parts[0]
        try:
            self._consumer.committed([TopicPartition(topic, partition)], timeout=SYNC_PROBE_S)
        except KafkaException:
            log.warning("Kafka did not answer within %g s: the revoke's commit is sent "
                        "without waiting for its answer (the partitions' next owner may "
                        "read from the commit before)", SYNC_PROBE_S)
            return False
        return True

    def partitions(self, timeout_s: float = 10.0) -> Partitions:
        """Total partitions of the source topics (for this replica's rate share), and the
        topics the brokers say they do not have or will not describe to this consumer."""
        total = 0
        missing: dict[str, str] = {}
        for topic in self._topics:
            meta = self._consumer.list_topics(topic, timeout=timeout_s)
            info = meta.topics.get(topic)
            if info is None:
                continue
            if info.error is None:
                total += len(info.partitions)
            elif info.error.code() in _NOT_THERE:
                missing[topic] = info.error.str()
        return Partitions(total, missing)

    def positions(self, parts: Sequence[TP]) -> dict[TP, int]:
        """The consumer's position (the next offset to hand over) of each partition that has
        one. librdkafka moves it past what it never hands over: transaction markers and the
        records of aborted transactions. Local: no broker call.

        Never past the log's end as last fetched (librdkafka's cached high watermark): a
        position is left out while that is unknown, and cut to it otherwise. A topic
        deleted and created again kept the old log's position (review "kafka18")."""
        return {(tp.topic, tp.partition): min(tp.offset, high)
                for tp, high in self._fetched(parts)}

    def _fetched(self, parts: Sequence[TP]) -> list[tuple[TopicPartition, int]]:
        """Each partition's position (with its leader epoch) and the high watermark last
        fetched, for those that have both. Local: no broker call."""
        try:
            answer = self._consumer.position([TopicPartition(t, p) for t, p in parts])
        except KafkaException:
            return []
        out: list[tuple[TopicPartition, int]] = []
        for tp in answer or []:
            if tp.error is not None or tp.offset < 0:
                continue
            try:
                _, high = self._consumer.get_watermark_offsets(tp, cached=True)
            except KafkaException:
                continue
            if high is not None and high >= 0:
                out.append((tp, high))
        return out

    def high_watermarks(self, parts: Sequence[TP], timeout_s: float) -> dict[TP, int]:
        """The brokers' high watermark (next offset; the last stable one, the worker reading
        committed records only) of each partition, asked now (not librdkafka's cached
        figure), all at once within `timeout_s`: -1 for one that did not answer (no
        leader, not there).

        Through a client of its own (an admin client: one ListOffsets per leader, each
        partition's answer apart): asked through the consumer, the request waited behind
        the consumer's own fetch, which a broker holds up to fetch.wait.max.ms while its
        partitions have nothing new; three lookups in four timed out, the paused
        partitions' lag went stale and librdkafka logged a WARNING about timed-out requests
        on a healthy cluster (review "logs56")."""
        return self._offsets(parts, timeout_s, _LATEST)

    def low_watermarks(self, parts: Sequence[TP], timeout_s: float) -> dict[TP, int]:
        """The brokers' low watermark (the log's first offset) of each partition, as
        `high_watermarks` asks: where a partition nothing was committed for is read from."""
        return self._offsets(parts, timeout_s, _EARLIEST)

    def _offsets(self, parts: Sequence[TP], timeout_s: float,
                 spec: Callable[[], Any]) -> dict[TP, int]:
        """One ListOffsets of `spec` per leader for `parts`; -1 for one not answered."""
        if not parts:
            return {}
        out = {tp: -1 for tp in parts}
        try:
            asked = self._admin().list_offsets(
                {TopicPartition(topic, partition): spec()
                 for topic, partition in out},
                isolation_level=IsolationLevel.READ_COMMITTED,
                request_timeout=max(timeout_s, 0.001))
        except (KafkaException, ValueError, TypeError):
            return out
        self._answers(list(asked.values()), timeout_s)
        for tp, future in asked.items():
            if future.done() and future.exception() is None:
                offset = int(future.result().offset)
                out[(tp.topic, tp.partition)] = offset if offset >= 0 else -1
        return out

    def readable(self, topics: Sequence[str], timeout_s: float) -> set[str]:
        """Those of `topics` the brokers' ACLs let the worker's principal read now, by the
        authorized operations they report within `timeout_s` (a topic whose operations say
        nothing, or that did not answer, is left out). A topic refused (Describe without
        Read) and then granted while idle brought no message to tell it: it stayed counted
        missing, the alert firing (review "sasl55")."""
        if not topics:
            return set()
        try:
            asked = self._admin().describe_topics(
                TopicCollection(list(topics)), request_timeout=max(timeout_s, 0.001),
                include_authorized_operations=True)
        except (KafkaException, ValueError, TypeError):
            return set()
        self._answers(list(asked.values()), timeout_s)
        return {topic for topic, future in asked.items()
                if future.done() and future.exception() is None
                and allowed(future.result().authorized_operations, AclOperation.READ)}

    def _admin(self) -> AdminClient:
        """The lookups' admin client (`high_watermarks`, `readable`), made on first use."""
        if self._marks is None:
            self._marks = AdminClient(dict(self._marks_settings))
        return self._marks

    def _answers(self, futures: list[Any], timeout_s: float) -> None:
        """Wait up to `timeout_s` for the admin client's answers, then serve its log lines
        (KAFKA_DEBUG's, a broker's failures): they wait in its queue until polled; never
        polled, none was logged and the queue grew (review "diff56")."""
        wait_futures(futures, timeout=timeout_s)
        self._admin().poll(0)

    def serve(self, timeout_s: float) -> None:
        """Serve callbacks (commit results, rebalances, errors) for up to `timeout_s`.

        Only while every assigned partition is paused (shutdown): a message returned here
        is not handed to the worker; its offset was never taken, so it is not committed and
        the next owner reads it again.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._consumer.poll(min(left, 0.1))

    def close(self, timeout_s: float) -> bool:
        """Leave the group (revoke callback, last commit); False if that took too long.

        librdkafka's close waits for the coordinator, unboundedly while Kafka is down
        (minutes measured). It runs on a daemon thread and is abandoned after `timeout_s`:
        the group then notices the member's absence after `session.timeout.ms`, and the
        process must exit without destroying the consumer (see `abandoned`).
        """
        done = threading.Event()
        leave_by = time.monotonic() + min(LEAVE_WAIT_S, timeout_s / 2)

        def close() -> None:
            try:
                if self.fatal is None:  # a fenced member cannot unsubscribe; close() still runs
                    try:
                        self._leave(leave_by)
                    except Exception as exc:
                        log.warning("leaving the group before close failed (%s)", exc)
                self._consumer.close()
                self._marks = None
            except Exception as exc:
                log.warning("consumer close failed (%s)", exc)
            finally:
                done.set()

        try:
            threading.Thread(target=close, name="kafka-close", daemon=True).start()
        except RuntimeError as exc:  # "can't start new thread": at the process's limit
            log.warning("consumer close skipped (%s): the group reassigns the partitions "
                        "after session.timeout.ms", exc)
            self.abandoned = True
            return False
        if done.wait(timeout_s):
            return True
        self.abandoned = True
        # Not always an outage: a rebalance waiting out a dead member's session holds the
        # leave as long (review "crash56": "Kafka unreachable" with Kafka up).
        log.warning("leaving the consumer group did not finish within %.0f s (Kafka "
                    "unreachable, or a rebalance waiting for a member that left without a "
                    "word); exiting anyway: the group reassigns the partitions after "
                    "session.timeout.ms", timeout_s)
        return False

    def _leave(self, until: float) -> None:
        """Unsubscribe and serve the revoke before `close()`: librdkafka's close alone
        did not always send LeaveGroup (a member stopped during or just after a
        cooperative rebalance), so the group waited session.timeout.ms for it, every
        other member's commits were refused meanwhile, and without Redis the next owners
        re-sent what those members had delivered (review zombie19: 56-128 duplicates in
        rapid scaling). Messages served here are not taken: the next owner reads them.
        A static member (`group.instance.id`) leaves too, deliberately: a Deployment's
        next pod has another name, and would wait out the session for the partitions."""
        self._consumer.unsubscribe()
        left_at: float | None = None
        while time.monotonic() < until:
            self._consumer.poll(0.05)
            if left_at is None and not self._consumer.assignment():
                left_at = time.monotonic()  # revoked: a few more polls send the leave
            if left_at is not None and time.monotonic() - left_at >= LEAVE_SEND_S:
                return

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)


def is_fatal(err: KafkaError) -> bool:
    """A fatal error, after which that client refuses everything: flagged so, or
    librdkafka's `_FATAL` code, which a fenced static member's messages and commits carry
    with `fatal()` False (review zombie19: a replica whose group.instance.id another pod
    took ran on, unready, never restarted). A consumer's stops the worker; a DLQ
    producer's gets a new producer (`DeadLetterProducer`)."""
    return bool(err.fatal()) or err.code() == KafkaError._FATAL


def _retire(producer: Producer) -> None:
    """Drop what a producer a fatal error stopped still holds (the sends waiting on it have
    failed already, `DeadLetterProducer._recover`), then the producer itself."""
    try:
        producer.purge()
        producer.poll(0)
    except Exception:  # a fatal instance may refuse even that; nothing is left to save
        log.debug("DLQ producer: the retired instance did not purge", exc_info=True)


_UNREADABLE = (KafkaError._BAD_MSG, KafkaError._NOT_IMPLEMENTED, KafkaError._BAD_COMPRESSION)


def unreadable(err: KafkaError) -> bool:
    """A message error saying the client could not read a record batch: a CRC check
    failed, a magic byte it does not know, a codec that failed. With a corrupt batch,
    librdkafka then took a garbage offset for its next position, found it out of range
    and started the partition over from its start (review "design59", a real broker)."""
    return bool(err.code() in _UNREADABLE)


def partition_end(err: KafkaError) -> bool:
    """The end of a partition reached (`KAFKA_ENABLE_PARTITION_EOF=true`): news, not a fault.
    Logged as one, it was a WARNING each time a partition caught up (review "kafka34")."""
    return bool(err.code() == KafkaError._PARTITION_EOF)


def named(err: KafkaError) -> str:
    """Kafka's error as the runbooks name it, with its text: `GROUP_AUTHORIZATION_FAILED:
    Broker: Group authorization failed` (the text alone matched no name the README's
    UserpilotCommitsFailing section gives, review "logs56")."""
    return f"{err.name()}: {err.str()}"


def login_refused(err: KafkaError) -> bool:
    """An error meaning the brokers refuse the client's settings, which no wait makes pass:
    a SASL login or mechanism refused, a broker certificate not trusted. A TLS handshake the
    other side merely ended is not: librdkafka words every such disconnect "connecting to a
    PLAINTEXT broker listener?", a TLS load balancer without a backend included (review
    final22)."""
    text = err.str()
    if err.code() == KafkaError._AUTHENTICATION:
        return not any(mark in text for mark in _NOT_A_REFUSAL)
    return (err.code() == KafkaError._SSL or "certificate verify failed" in text
            or any(alert in text for alert in _CERTIFICATE_REFUSED))


def topic_not_there(err: KafkaError) -> bool:
    """A consume error saying a subscribed topic does not exist (or is hidden by an ACL)."""
    return err.code() in _NOT_THERE


def topic_refused(err: KafkaError) -> bool:
    """A consume error saying the worker may not read a topic (no Read ACL)."""
    return err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED


def group_refused(err: KafkaError) -> bool:
    """A consume error saying the worker may not join its group (no Read ACL on it)."""
    return err.code() == KafkaError.GROUP_AUTHORIZATION_FAILED


def _told_throttle(event: Any, client: str, byte_rate: str, effect: str) -> None:
    """A broker's throttle of one of the worker's clients, said once a minute per broker
    and client (`throttle_log`) when it is long enough to matter."""
    if event.throttle_time >= THROTTLE_TOLD_S:
        # The client in the template, not an argument: `RateLimit` keys a line by its
        # template and broker, so the consumer's throttle does not hide the producer's.
        throttle_log.warning(
            f"kafka %s/%s: the broker throttles this worker's {client} for %.1f s at a "
            f"time: a client quota ({byte_rate} or request_percentage, on its client.id or "
            f"principal) {effect}", event.broker_name, event.broker_id, event.throttle_time)


def _dlq_throttled(event: Any) -> None:
    """A broker throttled the dead-letter producer (a client quota): dead letters were
    acknowledged late, their partitions held behind them and the DLQ read as slow, with no
    line saying why (round 59's "noticed")."""
    _told_throttle(event, "dead-letter producer", "producer_byte_rate",
                   "delays its dead letters, and their partitions' commits wait for them; "
                   "raise the quota")


def make_producer(conf: dict[str, Any], **extra: Any) -> Producer:
    """A producer with acks=all and idempotence: a DLQ record is durable once acked."""
    settings = producer_settings(conf, **extra)
    try:
        return Producer(settings)
    except KafkaException as exc:
        raise _config_error(exc, "producer") from None


REBUILD_EVERY_S = 5.0
"""The DLQ producer is built anew after a fatal error at most this often."""

DLQ_POLICY_CHECK_S = 300.0
"""How often a running worker's DLQ producer reads its topic's cleanup.policy again (only
while dead letters are written), and its partition count."""

DLQ_RECHECK_S = 30.0
"""How soon both are read again while wrong or unknown (a topic found compacted, an
unreadable policy, no partition count yet): a fixed topic is written to soon."""


DLQ_PARTITIONS_ASK_S = 5.0
"""The longest a dead letter waits for the DLQ topic's partition count (`_placed`)."""


class DeadLetterProducer:
    """Produces DLQ records and resolves an awaitable when the broker acknowledged them.

    A record without a key is placed by `placement` (its user): librdkafka spreads keyless
    records at random, so one user's dead letters of a keyless topic (or cut to the bare
    form) landed on several DLQ partitions, and `replay`, reading them partition by
    partition, wrote an older identify after a newer one (review "dlq54"). The partition is
    librdkafka's own for that key (CRC32 modulo the count, `consistent_random`), so a cut
    record lands beside its whole siblings; with another `partitioner` (KAFKA_PARTITIONER)
    records are left to it (keyless ones spread again, diff54a). The count is asked on a
    thread of this producer's, one lookup at a time: on asyncio's default pool a burst of
    dead letters, each waiting for the count, held the threads aiohttp resolves Userpilot's
    host on (diff54a; review "schema16").

    `policy(topic)` names a problem with the DLQ topic's configuration (a compacted topic,
    `reach.dlq_policy_now`), asked again every `check_s` while dead letters are written:
    start-up refuses a compacted DLQ, but one made compacted later took keyed dead letters
    and compaction deleted all but one per user (review "faults31"). While it names one,
    `send` raises it: the dead letter waits, its partition's offset too, and the DLQ is
    reported unwritable (readiness, `UserpilotDlqUnwritable`) until the topic is fixed.

    A fatal error (the idempotent producer's sequence or epoch broken, e.g. after an
    unclean leader election) leaves a librdkafka producer refusing every record for good:
    the dead letters waited, the DLQ read unwritable and readiness stayed off until a
    restart. librdkafka's answer is a new producer instance, so one is built at the next
    dead letter (at most every REBUILD_EVERY_S); the records the old one held fail and
    are written again, as after any DLQ error (review "fatal45")."""

    def __init__(self, conf: dict[str, Any],
                 policy: Callable[[str], str | None] | None = None,
                 check_s: float | None = None,
                 factory: Callable[[], Producer] | None = None) -> None:
        self._factory = factory or (lambda: make_producer(conf, **DLQ_PRODUCER,
                                                          throttle_cb=_dlq_throttled))
        self._producer = self._factory()
        # The producer that reported a fatal error, and the error, until it is replaced (set
        # from the dlq-poll thread or the loop, under `_swap`; acted on in the loop).
        self._fatal: tuple[Producer, str] | None = None
        self._swap = threading.Lock()  # `_fatal` and `_producer` change together
        self._rebuilt_at = -math.inf
        self._loop: asyncio.AbstractEventLoop | None = None  # the sends' loop, once one came
        # Sends awaiting the broker's answer, and the producer each went to (event loop).
        self._waiting: dict[asyncio.Future[None], Producer] = {}
        self._policy = policy
        self._check_s = DLQ_POLICY_CHECK_S if check_s is None else check_s
        self._policy_due = time.monotonic() + self._check_s  # start-up checked it (`reach`)
        self._policy_problem: str | None = None
        self._policy_lock = asyncio.Lock()
        # Per DLQ topic: its partition count (0: unknown) and when to ask again; asked by
        # one lookup at a time (`_placed`), on a thread of its own.
        self._partitions: dict[str, tuple[int, float]] = {}
        self._places = conf.get("partitioner", conf.get("topic.partitioner",
                                                        "consistent_random")) in (
            "consistent", "consistent_random")
        self._counting = asyncio.Lock()
        self._counter = ThreadPoolExecutor(1, thread_name_prefix="dlq-partitions")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="dlq-poll", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        """Serve delivery reports (dlq-poll thread). librdkafka raises a fatal error from
        `poll`, with an error_cb or without: uncaught, it ended this thread, and no dead
        letter was acknowledged again, on that producer or a new one (review "diff45")."""
        while not self._stop.is_set():
            producer = self._producer
            try:
                producer.poll(0.1)
            except KafkaException as exc:
                err = exc.args[0] if exc.args else None
                if isinstance(err, KafkaError) and is_fatal(err):
                    self._fatal_seen(producer, err.str())
                else:
                    log.warning("DLQ producer: %s", err.str() if isinstance(err, KafkaError)
                                else exc)
                self._stop.wait(0.1)
            except Exception:
                log.exception("DLQ producer: serving delivery reports failed")
                self._stop.wait(0.1)

    def _fatal_seen(self, producer: Producer, reason: str) -> None:
        """`producer` reported a fatal error (any thread): the loop replaces it. Tied to
        that producer: seen by the poll thread as a new one took over, an old one's error
        failed the new one's sends (review "diff45b")."""
        with self._swap:
            if (self._stop.is_set() or producer is not self._producer
                    or self._fatal is not None):
                return  # closed, a retired one's, or known already
            self._fatal = (producer, reason)
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the worker stopped
                loop.call_soon_threadsafe(self._recover)

    async def _placed(self, topic: str, placement: bytes) -> int | None:
        """The partition of `topic` librdkafka would give a record keyed `placement`; None
        while its partition count is unknown (then librdkafka places it)."""
        if not self._places:
            return None
        count, due = self._partitions.get(topic, (0, 0.0))
        if time.monotonic() >= due:
            async with self._counting:
                count, due = self._partitions.get(topic, (0, 0.0))
                if time.monotonic() >= due:  # not asked meanwhile by another dead letter
                    count = await asyncio.get_running_loop().run_in_executor(
                        self._counter, self._count, topic)
                    self._partitions[topic] = (count, time.monotonic() + (
                        DLQ_POLICY_CHECK_S if count else DLQ_RECHECK_S))
        return zlib.crc32(placement) % count if count else None

    def _count(self, topic: str) -> int:
        """`topic`'s partition count from the brokers' metadata (0: not known); blocking."""
        try:
            metadata = self._producer.list_topics(topic, DLQ_PARTITIONS_ASK_S)
        except Exception:
            return 0
        found = metadata.topics.get(topic)
        return len(found.partitions) if found is not None and found.error is None else 0

    async def send(
        self, topic: str, *, key: bytes | None, value: bytes | None,
        headers: list[tuple[str, bytes | None]], placement: bytes | None = None,
    ) -> None:
        """Produce and wait for the broker's acknowledgement; raises KafkaException on
        failure. `placement`: for a record without a key, the key whose partition it takes."""
        if self._policy is not None:
            await self._check_policy(topic)
        partition = (await self._placed(topic, placement)
                     if key is None and placement else None)
        loop = self._loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        producer = self._producer

        def delivered(err: KafkaError | None, _msg: Message) -> None:
            def settle() -> None:
                if done.done():
                    return
                if err is None:
                    done.set_result(None)
                    return
                if is_fatal(err):
                    self._fatal_seen(producer, err.str())
                if err.code() in _TOO_LARGE:
                    done.set_exception(DlqRecordTooLarge(f"DLQ refused the record: {err.str()}"))
                elif err.code() == KafkaError._UNKNOWN_PARTITION:
                    self._partitions.pop(topic, None)  # fewer now: asked again
                    done.set_exception(KafkaException(err))
                elif err.code() == KafkaError.INVALID_RECORD:
                    done.set_exception(KafkaException(KafkaError(
                        err.code(), f"{err.str()}: is the DLQ topic compacted? A compacted "
                        "topic refuses a keyless record; set its cleanup.policy=delete")))
                else:
                    done.set_exception(KafkaException(err))
            loop.call_soon_threadsafe(settle)

        # No timestamp: the broker's time of writing (see consumer.deadletter).
        kwargs: dict[str, Any] = {"key": key, "value": value, "headers": headers,
                                  "on_delivery": delivered}
        if partition is not None:
            kwargs["partition"] = partition
        while True:
            if self._fatal is not None:
                self._recover()
            producer = self._producer
            try:
                producer.produce(topic, **kwargs)
                break
            except BufferError:
                await asyncio.sleep(0.05)
            except KafkaException as exc:
                err = exc.args[0] if exc.args else None
                if isinstance(err, KafkaError) and err.code() in _TOO_LARGE:
                    raise DlqRecordTooLarge(f"DLQ refused the record locally: {err.str()}"
                                            ) from None
                if isinstance(err, KafkaError) and is_fatal(err):
                    self._fatal_seen(producer, err.str())
                    if self._recover():
                        continue  # once more, on the new producer
                if isinstance(err, KafkaError) and err.code() == KafkaError._UNKNOWN_PARTITION:
                    self._partitions.pop(topic, None)  # the topic was made anew: asked again
                raise
        self._waiting[done] = producer
        done.add_done_callback(self._answered)
        await done

    def _answered(self, done: asyncio.Future[None]) -> None:
        self._waiting.pop(done, None)

    def _recover(self) -> bool:
        """After a fatal error (event loop): fail the sends the stopped producer holds (it
        never answers them; their dead letters are written again, as after any DLQ error)
        and build a new one; False when none was built (REBUILD_EVERY_S)."""
        if self._stop.is_set():
            return False  # closed: no new producer after close(), and `send` raises
        fatal = self._fatal
        if fatal is None:
            return True
        stopped, reason = fatal
        for done, producer in list(self._waiting.items()):
            if producer is stopped and not done.done():
                done.set_exception(KafkaException(KafkaError(
                    KafkaError._FATAL, f"the DLQ producer stopped: {reason}")))
        return self._rebuild()

    def _rebuild(self) -> bool:
        """A new producer in place of one a fatal error stopped (event loop thread); False
        when the last was built under REBUILD_EVERY_S ago (a fault that makes each new
        producer fatal again is not turned into a loop of new producers)."""
        now = time.monotonic()
        if now - self._rebuilt_at < REBUILD_EVERY_S:
            return False
        self._rebuilt_at = now
        fresh = self._factory()
        with self._swap:
            old, self._producer = self._producer, fresh
            fatal, self._fatal = self._fatal, None
        reason = fatal[1] if fatal is not None else "?"
        log.error("DLQ producer: fatal error (%s); a new producer takes its place, and the "
                  "dead letters the old one had not written are written again", reason)
        # Off the loop: what it still holds is dropped (those sends have failed already).
        threading.Thread(target=_retire, args=(old,), name="dlq-retire", daemon=True).start()
        return True

    async def _check_policy(self, topic: str) -> None:
        """Raise the DLQ topic's configuration problem, read at most every `check_s` (30 s
        while there is one, so a fixed topic is written to soon); an unreadable policy (no
        DescribeConfigs ACL, the brokers away) is no verdict."""
        if time.monotonic() >= self._policy_due:
            async with self._policy_lock:
                if time.monotonic() >= self._policy_due and self._policy is not None:
                    try:
                        problem = await asyncio.to_thread(self._policy, topic)
                    except Exception:
                        # No verdict: the last one stands (a blip read as "fine" let keyed
                        # dead letters into a topic known compacted: review "dlq54"), and
                        # it is asked again soon (a topic the first dead letter creates).
                        self._policy_due = time.monotonic() + min(DLQ_RECHECK_S, self._check_s)
                    else:
                        self._policy_problem = problem
                        self._policy_due = time.monotonic() + (
                            min(DLQ_RECHECK_S, self._check_s) if problem else self._check_s)
        if self._policy_problem is not None:
            raise KafkaException(KafkaError(KafkaError.INVALID_CONFIG, self._policy_problem))

    def close(self, timeout_s: float = 10.0) -> int:
        """Flush and stop; returns the number of records still unacknowledged."""
        self._stop.set()
        self._thread.join()
        self._counter.shutdown(wait=False, cancel_futures=True)
        try:
            return int(self._producer.flush(timeout_s))
        except KafkaException:  # a fatal error: it writes nothing more
            return len(self._producer)
