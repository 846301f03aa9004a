"""The worker loop: poll, intake, back-pressure, rebalance and shutdown. The decisions per
event are the handler's; the intake only routes them and keeps the batch's bookkeeping.

    poll ─▶ Handler.screen ─┬─ Dropped: finished and counted at once (per polled batch)
                            └─ Handler.decide ─▶ Scheduler (per-user order)
                                 ─▶ Handler.handle ─▶ outcome
    outcome ─▶ Commits.finish ─▶ commit (periodic, when idle, on revoke, on shutdown)
    (a dead letter the DLQ guard counted waits in `guard_hold` until the guard moved past it)

What each collaborator owns: `handler.Handler` takes one event to its outcome;
`commits.Commits` owns offsets, the in-flight window and commit bookkeeping;
`scheduling.Scheduler` runs events per ordering key; the `Source` (Kafka) is injected,
so the loop runs against an in-memory source in unit tests.

Thread rule: this class lives on the event loop. Source calls run on the source's poll
thread (`Source.call`, one call at a time). The callbacks the source makes (assign,
revoke, lost, stats, commit results, offset resets) run on that poll thread and touch only
what is safe there: `Commits` and `Lag` (each locks), `Metrics` and `Health` (thread-safe), and
`SourceTopics` (locks; its rule is in `topicwatch`), and
`LogResets` (locks; its rule is in `logresets`), and
`assigned`, `paused`, `_reshare_due`, `_reshare_at`, `_fresh`, which both
threads read and write only under `_parts_lock`. `_reshare`, and the state only it uses
(`_reshare_delay`), are the poll thread's alone, and so is `_commit_refused_at`
(`_commit`, `_on_committed`, `_on_assign`).
At exit, `KafkaSource.close` runs librdkafka's `close()` on a "kafka-close" thread, so
the final revoke's callbacks run there, while the poll thread is idle and the loop only
waits for it (a close that outlasts its timeout leaves them running there as the process
ends). Anything involving in-flight events hops to the loop: a revoke hands its settling
coroutine to the loop with `run_coroutine_threadsafe` (the loop is free: it is awaiting
the `Source.call` that raised the callback), and that coroutine also forgets the
partitions' messages waiting in the overflow and lets go of their held dead letters
(`guard_hold`; loop-only state); `stop()` uses
`call_soon_threadsafe`.

The poll loop never sleeps on behalf of a delivery: a full window pauses partitions (or,
when deliveries are fast, lets polled messages wait in the overflow: `consumer.overflow`)
and polling goes on, so the group never evicts a slow worker.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, TypeVar

from consumer import codec
from consumer.calls import FAMILIES, state_written
from consumer.commits import TP, Commits
from consumer.config import REVOKE_MARGIN_S, Settings, redact_userinfo
from consumer.deadletter import DlqGuard, GuardHold, iso_ms, message_headers
from consumer.delivery import UserpilotClient
from consumer.errors import DlqGuardTripped, Retry, Stop
from consumer.filtering import Drop
from consumer.handler import (
    DeadLettered,
    DeadLetterSink,
    Delivered,
    Duplicate,
    Event,
    Handler,
    Outcome,
    SchemaSource,
    TrackClient,
)
from consumer.health import Health
from consumer.kafka import (
    COMMIT_SILENCE_S,
    DeadLetterProducer,
    KafkaMessage,
    KafkaSource,
    Partitions,
    is_fatal,
    partition_end,
    unreadable,
)
from consumer.keyless import KeylessOrder, decided_user
from consumer.lag import Lag
from consumer.logresets import LogResets
from consumer.logs import RateLimit, offset_ranges, partitions_text
from consumer.metrics import Children, Metrics
from consumer.offsets import Finished
from consumer.overflow import Overflow
from consumer.policy import Gate, GateState, RetryPolicy
from consumer.ratelimit import partition_share
from consumer.reach import dlq_policy_now
from consumer.registry import UNKNOWN_GRACE_S, Registry
from consumer.routing import Send
from consumer.scheduling import ChainKey, Scheduler
from consumer.sharedlimit import SharedLimiter
from consumer.sharedstate import SharedState, build_shared_state
from consumer.signals import stop_signals
from consumer.stalls import STALL_S, StallWatch
from consumer.topicwatch import MISSING_TOPIC_CHECK_S, SourceTopics

__all__ = ["Callbacks", "Source", "SourceFactory", "Worker", "fair_holds", "fair_margin",
           "fair_share", "resume_level"]

log = logging.getLogger(__name__)
# A partition held for one hot user is let go once its chain is down to CHAIN_RESUME and held
# again at CHAIN_MAX: with one busy user (a bot, a load test) that is several times a second,
# and each logged a line. One per topic per 30 s (the count of the rest appended); the gauge
# userpilot_partitions_held_for_one_user says it as it happens.
hold_log = logging.getLogger(f"{__name__}.hold")
hold_log.addFilter(RateLimit(30.0))
# A message error librdkafka hands over again and again (a batch it cannot decompress is
# fetched anew every fetch backoff): one line per error text every 30 s, not 2 a second.
kafka_log = logging.getLogger(f"{__name__}.kafka")
kafka_log.addFilter(RateLimit(30.0))

T = TypeVar("T")

POLL_BATCH = 500
LARGE_EVENT_BYTES = 64 * 1024  # Signal's documented limit for one event
WINDOW_BYTES_MAX = 192 * 1024 * 1024
"""The bytes of the raw events in flight, at most (each kept for a possible dead letter),
once one above LARGE_EVENT_BYTES was taken: WORKER_MAX_IN_FLIGHT counts events, and with
~1 MB events (Kafka's default limit, over Signal's) three full windows peaked at 520-556 MB
of RSS against the chart's 512 Mi limit: OOM-killed, the same backlog again at each restart
(review "mem43"). Measured, RSS grows ~1.13 × the raw bytes in flight."""
OVERFLOW_POLLS = 4  # the overflow holds at most this many of the largest polls
FULL_POLL_PAUSE_S = 0.002  # between polls while window and overflow are both full
SCHEMA_WAIT = "schema"
"""The window of events taken before their schema was known (`_backpressure`): of their
own, so that a registry outage while a new schema version arrives holds only the
partitions carrying it, not the replica."""
POLL_TIMEOUT_S = 0.1
WAKE_SHARE = 10
"""A full window's loop waits for 1/WAKE_SHARE of it to finish (or POLL_TIMEOUT_S)."""
_UNASKED = -2  # `_intake`: a partition's last offset not asked for yet in this slice
_DEFER: Any = object()  # `_take`: not taken (SCHEMA_WAIT window full, or a chain at CHAIN_MAX)
CHAIN_MAX = 16
"""Events of one user (one ordering chain) taken into the window at once. A user's events
go out one after another, so more of them only take the window from everyone else: one
user's 600-event backlog held ~420 of the worker's 200 places and overflow, and the users
of every other partition waited for it (45 s instead of 4, review "soak26"). At the limit
the next event of that chain waits in the overflow with the rest of its partition, which
pauses, until the chain is down to CHAIN_RESUME."""
CHAIN_RESUME = CHAIN_MAX // 2
HOT_STALL_S = 2.0
"""A held chain none of whose events finished for this long is stuck (its first event in
retries, or waiting for a schema the registry withholds): its partition is let go, and that
chain holds it no more until it is down to CHAIN_RESUME. Held for as long as the chain was
stuck, one user's failing event stopped every other user of its partition (up to the retry
budget, 15 minutes; review "hot26"), where before the bound only that user waited."""
DEAD_LETTERS_NAMED = 100_000
"""This run's latest dead letters the worker remembers (~200 bytes each, measured) to name, after a
DLQ guard trip, the time from which they were never committed (`_name_void_dead_letters`)."""
GUARD_HOLD_MAX_S = 60.0
"""The longest a dead letter's commit waits for the DLQ guard (`GuardHold`) while the worker
is busy and fewer than WORKER_DLQ_WINDOW outcomes follow it: a trickle of events with one
user's answers slow, say. A bad deploy trips the guard well within it."""
INTAKE_TURN_SENDS = 8
"""Events to send taken per turn of the event loop. Each starts a task whose first step
(building and writing its request, ~0.2 ms) runs in the next turn; taking a whole window at
once (200 when acknowledged commits free it) made turns of 10-50 ms, during which no answer
of the 64 requests in flight was read: connections were held 34 ms for the sandbox's 20 and
delivery at 20 ms ran at 1,330-1,620 events/s. With 8 per turn, turns over 5 ms fell from 56 %
to 6 % of the loop's time and the same backlog went at 1,700-1,800 events/s (README,
"Performance")."""
INTAKE_TURN_S = 0.02
"""... or taken in this long (events to send only): one turn of large events (~880 KB, a
third of a CPU-second each to map) froze the loop for 2-4 s at the chart's CPU limit and
13 s at half of it, so answers waiting in the sockets went unread, Redis's among them
("redis claim failed: TimeoutError" against a Redis answering in 14 ms: events sent
unchecked, some twice; review "limits57"). Typical events take ~0.2 ms: 8 fit many times."""
INTAKE_TURN_MESSAGES = 128  # ... and messages (drops: ~20 µs each) while any is in flight
FIRST_STEP_TURNS = 4
"""Turns of the event loop a batch's new events get before the main loop's bookkeeping and
next poll, so their requests are written first: the event's first step (to the limiter's
lane), the lane's hand-off of a slot, the step to the HTTP client, and the client's write
(aiohttp writes in a task of its own). The next poll, started earlier, woke the poll thread
whose Python code then shared the GIL with these steps. At 50 events/s, alternating per
batch in one run, intake to write p50 0.99 ms with none, 0.88-0.89 with 2, 3 or 4 (RESULTS.md,
"Round 17")."""
FIRST_STEP_MAX_IN_FLIGHT = INTAKE_TURN_SENDS
"""... only while at most this many events are in flight: a delivery's latency counts at low
traffic. Draining a backlog (the window full, each poll bringing the few messages its
acknowledgements freed) the turns cost 10-15 % of delivery's rate at 20 ms."""
FINAL_COMMIT_WAIT_S = 3.0  # at shutdown, for the last commit's acknowledgement
STOP_AFTER_DRAIN_S = 18.0
"""After the drain (WORKER_SHUTDOWN_GRACE_SECONDS from the stop), the rest of a stop shares
this much: the final commit, leaving the group, the DLQ's flush. The chart's
terminationGracePeriodSeconds is that grace + 20 s, 2 s left for the process to exit. Each
bounded alone (3 + 15 + 10 s), they added up to 28 s: killed mid-stop (review "budgets43")."""
STOP_STEP_MIN_S = 0.2  # ... each step gets at least this much once the budget is spent
RATES_EVERY_S = 1.0  # the rate-share gauge follows 429 recovery and the Redis fallback
PAUSED_LAG_EVERY_S = 5.0  # a paused partition's lag, from the broker (librdkafka's stats
# interval): its high watermark comes only with fetches, which a paused partition has none of
# (nor one whose fetches no broker answers: `Lag.unfetched`)
PAUSED_LAG_TIMEOUT_S = 1.0  # ... all of them within this
CLOSE_TIMEOUT_S = 15.0  # leaving the group while Kafka answers (revoke settles first)
CLOSE_DOWN_TIMEOUT_S = 2.0  # ... while it does not
RESHARE_TIMEOUT_S = 2.0  # a metadata call on the poll thread: well under max.poll.interval
NOTES_TIMEOUT_S = 2.0  # reading a new partition's commit note, on the poll thread
NOTES_RETRY_S = 1.0  # ... tried again this much later when the coordinator did not answer
NOTES_TRIES = 5  # ... this many times in all
RETRY_LOG_EVERY_S = 30.0  # one log line per retry cause at most this often
RESHARE_RETRY_S = 1.0  # after a failed partition count, asked again this much later ...
RESHARE_RETRY_MAX_S = 60.0  # ... doubling to this (each try may hold the poll thread 2 s)
UNKNOWN_SHARE = 0.05
"""The share of the token's limit taken while the partition count has never been read:
at 1.0 (the whole limit) each replica whose count failed sent as if alone, and three of
them drew 42 × 429 (review "redis26"). A twentieth, the floor a 429 storm leaves, keeps
up to 20 replicas within the limit and still delivers until the count comes."""
DLQ_POLICY_TIMEOUT_S = 5.0  # a running worker's read of the DLQ topic's cleanup.policy
DRY_AFTER_S = 1.0  # partitions let in past a held one and still silent: nothing to read
DRY_FOR_S = 30.0  # ... until a message of theirs arrives, or this long (then probed again)


REVOKE_DRAIN_SHARE = 0.2
"""A revoke's drain gets WORKER_SHUTDOWN_GRACE_SECONDS, but at most this share of
max.poll.interval.ms (it runs where the consumer does not poll)."""
REVOKE_WAIT_SHARE = 0.5
"""... and the wait for it, its last DLQ records and Redis calls included, at most this."""


def fair_holds(paused: set[TP], wet: set[TP], limit: int, window: dict[TP, int]) -> set[TP]:
    """The paused partitions to keep paused on resume: all but those whose window is within
    `fair_margin` of the emptiest partition with something to read (`wet`): water-filling.

    Why not "every partition below its fair share": a resume frees only a tenth of the
    window, librdkafka serves the resumed partitions' fetches in partition order, and the
    pause that follows discards the fetched messages of the others, so the lowest-numbered
    resumed partition took every freed slot while a higher one waited for minutes. With
    only the emptiest let in, the freed slots rotate over the partitions.
    """
    if len(wet) < 2:
        return set()
    lowest = min(window.get(tp, 0) for tp in wet)
    margin = fair_margin(limit, len(wet))
    return {tp for tp in paused if window.get(tp, 0) >= lowest + margin}


def fair_margin(limit: int, partitions: int) -> int:
    """How far above the emptiest partition's window a partition still counts as empty: an
    eighth of a fair share, so partitions about as empty resume together (few resumes)
    while one with a share's worth waits."""
    return max(1, fair_share(limit, partitions) // 8)


def fair_share(limit: int, partitions: int) -> int:
    """One partition's fair share of the window among `partitions` with a backlog."""
    return max(1, limit // max(1, partitions))


def resume_level(limit: int) -> int:
    """Paused partitions resume once the window is down to this (paused at `limit`).

    Close to the limit, not half of it: the committable offset follows the slowest
    family, so with one family saturated (identify) the window is full of the other's
    finished-but-uncommitted events, and a family with budget to spare (Track) can only
    take new events as fast as the window frees. Waiting for half the window to free
    idled it for seconds per cycle (measured: Track at 65-85 % of its limit while
    identify held 97 %). A tenth of the window keeps pause/resume cycles few.
    """
    return max(0, limit - max(1, limit // 10))


@dataclass(frozen=True)
class Callbacks:
    """What the source calls back, on its poll thread."""

    on_assign: Callable[[list[TP]], None]
    on_revoke: Callable[[list[TP]], None]
    on_lost: Callable[[list[TP]], None]
    on_stats: Callable[[dict[str, Any]], None]
    on_committed: Callable[[list[tuple[TP, int]], list[TP]], None]
    on_refetch: Callable[[list[TP]], None] | None = None
    on_reset: Callable[[TP, int, bool | None], None] | None = None


class Source(Protocol):
    """The consumer-group member the worker polls (`kafka.KafkaSource`, or a fake)."""

    @property
    def connected(self) -> bool: ...
    @property
    def fatal_error(self) -> str | None: ...
    @property
    def note_limit(self) -> int: ...
    async def call(self, fn: Callable[..., T], *args: Any) -> T: ...
    def subscribe(self) -> None: ...
    def consume(self, max_messages: int, timeout_s: float) -> Sequence[KafkaMessage]: ...
    def pause(self, parts: Sequence[TP]) -> None: ...
    def resume(self, parts: Sequence[TP]) -> None: ...
    def commit(self, offsets: dict[TP, int], *, wait: bool = True,
               notes: dict[TP, str] | None = None) -> bool: ...
    def answering(self, parts: Sequence[TP]) -> bool: ...
    def finished_ahead(self, parts: Sequence[TP], timeout_s: float
                       ) -> tuple[dict[TP, Finished], list[TP]]: ...
    def partitions(self, timeout_s: float = 10.0) -> Partitions: ...
    def high_watermarks(self, parts: Sequence[TP], timeout_s: float) -> dict[TP, int]: ...
    def low_watermarks(self, parts: Sequence[TP], timeout_s: float) -> dict[TP, int]: ...
    def readable(self, topics: Sequence[str], timeout_s: float) -> set[str]: ...
    def positions(self, parts: Sequence[TP]) -> dict[TP, int]: ...
    def serve(self, timeout_s: float) -> None: ...
    def close(self, timeout_s: float) -> bool: ...
    def shutdown(self) -> None: ...


SourceFactory = Callable[[Callbacks], Source]


class Settled(NamedTuple):
    """What a drain (`Worker._settle`) abandoned: in all, and of those the requests cut on
    the wire (Userpilot may have them) and the dead letters cut on their way to the DLQ
    (written again by whoever reads them next; Userpilot never had them)."""

    abandoned: int
    cut: int
    cut_dead_letters: int


def kafka_source(settings: Settings) -> SourceFactory:
    """The real source: a KafkaSource for the worker's topics and group."""
    def make(cb: Callbacks) -> Source:
        conf = {**settings.kafka_config(), "group.id": settings.group_id}
        return KafkaSource(conf, settings.topics, on_assign=cb.on_assign,
                           on_revoke=cb.on_revoke, on_lost=cb.on_lost, on_stats=cb.on_stats,
                           on_committed=cb.on_committed, on_refetch=cb.on_refetch,
                           on_reset=cb.on_reset)
    return make


class Worker:
    """Runs the loop; the event path is `Handler`'s, the offsets are `Commits`'."""

    def __init__(
        self, settings: Settings, metrics: Metrics, health: Health, *,
        client: TrackClient | None = None,
        registry: SchemaSource | None = None,
        dlq: DeadLetterSink | None = None,
        source: SourceFactory | None = None,
        shared: SharedState | None = None,
    ) -> None:
        self.s = settings
        self.m = metrics
        self.health = health
        self.client: TrackClient = client or UserpilotClient.for_settings(
            settings, on_resend=lambda endpoint: metrics.requests_resent.labels(endpoint).inc())
        self.dlq: DeadLetterSink = dlq or DeadLetterProducer(
            settings.kafka_config(),
            policy=lambda topic: dlq_policy_now(settings.kafka_config(logger=False), topic,
                                                DLQ_POLICY_TIMEOUT_S))
        # One limiter per endpoint family (Redis-shared with REDIS_URL, else the partition
        # share), and the messageId deduplicator when Redis is configured.
        self.shared = shared or build_shared_state(settings, metrics, FAMILIES)
        self.gate = Gate(on_change=self._gate_changed)  # probes: 0.5 s doubling to 5 s
        policy = RetryPolicy(
            self.gate, max_attempts=settings.retry_max_attempts,
            budget_s=settings.retry_budget_s, on_retry=self._count_retry,
            backoff_multiplier_s=settings.retry_backoff_s,
            backoff_max_s=settings.retry_backoff_max_s,
        )
        schemas = registry or Registry(
            settings.registry_url,
            settings.registry_auth.reveal() if settings.registry_auth else None,
            proxy=settings.registry_proxy.reveal() if settings.registry_proxy else None,
            unknown_grace_s=UNKNOWN_GRACE_S)
        self.registry: SchemaSource = schemas
        # A stall this long may have let the group's session expire (its last heartbeat up
        # to an interval before it); librdkafka tells within a heartbeat of the resume.
        beat = settings.heartbeat_interval_s
        self.stalls = StallWatch(max(settings.session_timeout_s - beat, 2 * STALL_S),
                                 beat + STALL_S)
        self.handler = Handler(
            settings, metrics, client=self.client, registry=schemas,
            dlq=self.dlq, limiters=self.shared.limiter, budget=self.shared.budget,
            policy=policy,
            guard=DlqGuard(settings.dlq_max_ratio, settings.dlq_window,
                           settings.dlq_max_consecutive),
            dedup=self.shared.dedup, stalls=self.stalls,
        )
        if isinstance(schemas, Registry):
            # A frozen registry turns readiness off while events wait for it.
            waiting = self.handler.waiting_for_schemas
            health.add_check(lambda: schemas.problem() if waiting() else None)
        # And one id whose lookups fail while the registry answers others (review
        # "registry54": readiness followed the registry's last answer).
        health.add_check(self.handler.schema_failing)
        # A DLQ that stays unwritable stalls a partition: readiness off, gauge for the alert.
        writable = self.handler.dlq_writable
        health.add_check(writable.problem)
        metrics.dlq_unwritable.set_function(lambda: 1.0 if writable.problem() else 0.0)
        self._make_source = source or kafka_source(settings)
        self.commits = Commits()
        self.lag = Lag(metrics, self.commits)  # the lag gauges (poll thread, own lock)
        self._parts_lock = threading.Lock()
        self.assigned: set[TP] = set()
        self.paused: set[TP] = set()
        self.partitions_total = 0
        self._reshare_due = False
        self._reshare_at = 0.0  # monotonic: not before (a failed count is retried later)
        self._reshare_delay = RESHARE_RETRY_S  # poll thread only
        # Source topics missing or refused, the group refused: gauge, WARNING, readiness.
        self.topics = SourceTopics(settings.topics, settings.group_id, metrics)
        health.add_check(self.topics.problem)
        # Newly assigned, to resume on the loop: librdkafka keeps a partition's pause across
        # a revoke or loss and a later re-assignment (librdkafka#1849).
        self._fresh: list[TP] = []
        # Logs replaced, truncated or cut under the worker (`_on_reset`, the intake).
        self.resets = LogResets(self.commits, metrics)
        # New partitions whose commit notes are not read yet: the reads each has failed and
        # when to try again (event loop only; see `_read_notes`).
        self._inherit_due: dict[TP, tuple[int, float]] = {}
        # When the coordinator last refused a commit, while its refusals last (poll thread
        # only: `_on_committed`, `_commit`, `_on_assign`): the next asynchronous commit
        # waits the commit interval from then, unless partitions were assigned since.
        self._commit_refused_at: float | None = None
        # Per retry cause: when its last line was logged and how many went unlogged since
        # (event loop only; see `_count_retry`).
        self._retry_log: dict[str, tuple[float, int]] = {}
        # Keyless events' order by user (event loop only): see `consumer.keyless`.
        self.keyless = KeylessOrder()
        # Fair intake (event loop only; may name revoked partitions, always intersected with
        # `assigned`): partitions kept paused because they hold their share of the window,
        # and partitions seen with nothing to read.
        self._held: set[TP] = set()
        self._quiet_since = 0.0  # since when polls brought nothing while partitions were held
        self._dry: dict[TP, float] = {}  # until when
        # Messages polled while the window was full, taken before newer ones, and the pace
        # of finished events that sizes them (event loop only): see `consumer.overflow`.
        self.overflow: Overflow[KafkaMessage] = Overflow(settings.max_in_flight,
                                                         OVERFLOW_POLLS * POLL_BATCH)
        # The SCHEMA_WAIT window as of the last `_backpressure`, plus what intake took since,
        # and the partitions whose next message waits (in the overflow, not taken) because
        # that window was full or one of their chains is at CHAIN_MAX (event loop only; see
        # `_backpressure`).
        self._schema_window = 0
        # Past a large event (LARGE_EVENT_BYTES): the raw bytes that may still be taken
        # (WINDOW_BYTES_MAX), and the largest event taken since; None, 0 while none is.
        self._bytes_left: int | None = None
        self._largest = 0
        self._held_back: set[TP] = set()
        # Of those, the ones held for a chain: the chain, its finished count and when that
        # last moved (`_release_hot`); the chains found stuck, which hold nothing until
        # they are down to CHAIN_RESUME.
        self._hot: dict[TP, tuple[ChainKey, int, float]] = {}
        self._stuck: set[ChainKey] = set()
        # Events stuck chains may hold in the window together: taken past CHAIN_MAX so their
        # partitions go on, they filled it, and every partition stopped behind one user
        # whose head could not finish, for good when Userpilot refused that user's every
        # event (its attempts wait for other deliveries to succeed; review "flow41").
        # Past it the chain's partition is held again, as for a hot chain.
        self._stuck_max = max(CHAIN_MAX, settings.max_in_flight // 2)
        self._finished = 0  # events to send that reached their outcome (event loop)
        # Dead letters the DLQ guard counted, committed once it moved past them (event loop).
        # Not capped by the window: a window full of held dead letters with nothing in
        # flight lets them go (idle, below); capped at half of it, a run longer than that
        # was half committed before the trip (review "hold30").
        # This run's dead letters (partition, offset, dead_lettered_at): named at a trip.
        self._dead_letters: collections.deque[tuple[TP, int, float, int]] = collections.deque(
            maxlen=DEAD_LETTERS_NAMED)
        self.guard_hold: GuardHold[tuple[TP, int, int]] = GuardHold(
            max(settings.dlq_window, settings.dlq_max_consecutive), GUARD_HOLD_MAX_S)
        self._consumed = Children(self.m.events_consumed)
        # Event.intake: limiter queues serve in this order, the DLQ guard reads outcomes in it
        self._intake_seq = itertools.count(1)
        self.fatal: BaseException | None = None
        self.kafka_abandoned = False  # the consumer could not leave the group at shutdown
        self._stopping: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_before_run = False  # stop() came before run() had its event loop
        # stop()'s check and run()'s start as one step each: a stop from another thread
        # landing between them was lost (review "threads52", suspected). Re-entrant: a
        # SIGTERM's handler (`cmd_run` routes it to `stop` on the main thread) may run
        # inside run()'s step; a plain lock hung the pod there (review "diff52b").
        self._stop_lock = threading.RLock()
        self._stop_asked: float | None = None  # monotonic time of the first stop()
        # A SIGTERM/SIGINT arrived (any time, the shutdown included): the process must end
        # as soon as it has drained, so no DLQ-guard hold follows (Kubernetes signals once).
        self.signalled = False
        self._scheduler: Scheduler[Event] | None = None
        self._source: Source | None = None
        self._probes: set[asyncio.Task[None]] = set()  # Redis probes of idle fallbacks
        # identify and group events are always sent: their series exist from the start too,
        # or rate() and increase() missed each one's first delivery after every start.
        metrics.declare_event_names(
            sorted({r.event_name for r in settings.mappings.rules} | {"identify", "group"}))
        metrics.declare_consent_categories(list(settings.consent.categories))
        metrics.declare_topics(settings.topics)

    @property
    def committed(self) -> dict[TP, int]:
        """Offsets acknowledged by the group coordinator."""
        return self.commits.committed()

    @property
    def in_flight(self) -> int:
        """Events in the scheduler (queued or running)."""
        return self._scheduler.in_flight if self._scheduler is not None else 0

    # -- lifecycle ----------------------------------------------------------------------
    def stop(self, *, signalled: bool = False) -> None:
        """Ask the worker to drain and exit (SIGTERM, tests); callable from any thread, and
        before `run` (a SIGTERM while the worker starts): then `run` exits at once.
        `signalled`: a SIGTERM/SIGINT asked (recorded in `signalled`: no hold after it)."""
        if signalled:
            self.signalled = True
        if self._stop_asked is None:
            self._stop_asked = time.monotonic()
        with self._stop_lock:
            if self._loop is not None and self._stopping is not None:
                self._loop.call_soon_threadsafe(self._stopping.set)
            else:
                self._stop_before_run = True

    async def run(self) -> int:
        """Consume until stopped; returns the process exit code."""
        with self._stop_lock:
            self._loop = asyncio.get_running_loop()
            self._stopping = asyncio.Event()
            if self._stop_before_run:
                self._stopping.set()
        for sig in stop_signals():
            # Outside the main thread (tests) there are no signal handlers: stop() is used.
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                self._loop.add_signal_handler(sig, functools.partial(self.stop, signalled=True))
        scheduler = self._scheduler = Scheduler(self._run_event, self._crash)
        for limiter in self.shared.distinct():
            limiter.set_share(UNKNOWN_SHARE)  # until the first partition count
        prefetch: asyncio.Future[None] | None = None
        prefetch_stop = threading.Event()
        source = self._source = self._make_source(Callbacks(
            on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost,
            on_stats=self._on_stats, on_committed=self._on_committed,
            on_refetch=self._on_refetch, on_reset=self._on_reset))
        if isinstance(self.registry, Registry):
            # While the group forms, so the first batch is decided at once (see prefetch).
            prefetch = asyncio.ensure_future(
                asyncio.to_thread(self.registry.prefetch, self.s.topics, prefetch_stop))
        await source.call(source.subscribe)
        log.info("consuming %s as group %s, delivering to %s%s", ",".join(self.s.topics),
                 self.s.group_id, self.s.track_url,
                 f" through {redact_userinfo(self.s.proxy.reveal())}" if self.s.proxy else "")
        last_commit = last_noted = paused_lag_at = rates_at = time.monotonic()
        scheduled = 0
        stall_ticks = asyncio.ensure_future(self.stalls.run())
        try:
            while not self._stopping.is_set():
                room = await self._backpressure(source, scheduler, idle=not scheduled)
                # Fewer new messages while more than the overflow's size waits: it drains.
                wanted = room + self.overflow.cap() - self.overflow.free(self._held_back)
                if wanted <= 0:
                    # Window full, overflow at its size: each poll still takes a message
                    # (to serve acknowledgements); pace it instead of spinning.
                    await asyncio.sleep(FULL_POLL_PAUSE_S)
                timeout = await self._poll_wait(source, scheduler, room)
                asked = time.monotonic()
                messages = await source.call(source.consume, max(1, wanted), timeout)
                self.stalls.polled(asked)
                self.health.beat()
                self.health.set_connected(source.connected)
                fatal = source.fatal_error  # read once: a property that may change
                if fatal is not None:
                    raise Stop(f"fatal Kafka error: {fatal}")
                self.resets.collect()  # before this batch's intake: its messages may follow
                with self._parts_lock:
                    # The partition count needs the broker: not while it is unreachable
                    # (a metadata wait on the poll thread is what max.poll.interval.ms
                    # counts); the previous share holds until Kafka answers again.
                    reshare = (self._reshare_due and source.connected
                               and time.monotonic() >= self._reshare_at)
                    if reshare:
                        self._reshare_due = False
                    assigned_now = set(self._fresh) & self.assigned
                    fresh = sorted(assigned_now - self.paused)
                    self._fresh.clear()
                if assigned_now or self._inherit_due:
                    await self._read_notes(source, assigned_now)
                if fresh:
                    # A partition paused for back-pressure when it was taken away would
                    # otherwise never be fetched again.
                    await source.call(source.resume, fresh)
                if reshare:
                    # Not inside the rebalance callback: a blocking client call nested in a
                    # callback breaks confluent-kafka's per-thread call state (it aborts).
                    # Counted on the poll thread, applied here: the limiters belong to
                    # the event loop (a share set from the poll thread could tear a
                    # reservation under way, review struct18).
                    share = await source.call(self._reshare, source)
                    if share is not None:
                        for limiter in self.shared.distinct():
                            limiter.set_share(share)
                if reshare or time.monotonic() - rates_at >= RATES_EVERY_S:
                    rates_at = time.monotonic()
                    self._publish_rates()
                with self._parts_lock:
                    any_paused = bool(self.paused)
                if (any_paused or self.lag.unfetched()) and source.connected and (
                        time.monotonic() - paused_lag_at >= PAUSED_LAG_EVERY_S):
                    paused_lag_at = time.monotonic()
                    await source.call(self._paused_lag, source)
                batch = self._next_batch(messages, room)
                scheduled = position = 0
                while True:
                    more, position = self._intake(batch, position, scheduler)
                    scheduled += more
                    if position >= len(batch):
                        break
                    # A turn of the event loop between slices: see INTAKE_TURN_SENDS.
                    await asyncio.sleep(0)
                    if self._stopping.is_set():
                        # The rest is not taken: it follows every taken offset of its
                        # partition, so it is read again (by the next owner).
                        break
                if scheduled and scheduler.in_flight <= FIRST_STEP_MAX_IN_FLIGHT:
                    await self._first_steps()
                # Every message handed over is taken: the consumer's positions may commit
                # what it never hands over (`Commits.passed`).
                whole = position >= len(batch) and not self.overflow
                self.overflow.note_pace(scheduled, self._finished)
                # Periodically, and at once when caught up (an idle poll): a drained backlog
                # should not wait for the timer to be committed.
                # A note-only change (the offset held by one event while others finish) is
                # committed on the interval only: at 2,000 events/s the head changes every
                # few ms, and committing each change cost ~2 % of delivery's CPU.
                now = time.monotonic()
                note_now = False
                if len(self.guard_hold):
                    note_now = self._held_idle(scheduler, not scheduled and (
                        not self.overflow.free(self._held_back) or not room), source)
                    self._finish_held(functools.partial(self.guard_hold.due, now))
                if note_now or not messages or now - last_commit >= self.s.commit_interval_s:
                    noted = note_now or now - last_noted >= self.s.commit_interval_s
                    await source.call(self._commit, source, None, False, noted, whole)
                    last_commit = time.monotonic()
                    if noted:
                        last_noted = last_commit
        except Stop as exc:
            # Said: the reason (a login refused for a minute, a fenced member) was on no
            # line; the last one read "stopped; committed nothing" (review "diff57").
            log.error("stopping: %s", exc)
            self.fatal = exc
        finally:
            # The prefetch asks no further subject (one per topic, each up to the registry's
            # timeout): it ends during the drain, not after the stop's budget.
            prefetch_stop.set()
            await self._shutdown(source, scheduler)
            stall_ticks.cancel()  # after the drain: its requests ask the watch too
            if prefetch is not None:
                await prefetch  # one request at most, bounded by the registry's timeout
        if isinstance(self.fatal, DlqGuardTripped):
            self._name_void_dead_letters()
            return 3
        return 1 if self.fatal is not None else 0

    async def _shutdown(self, source: Source, scheduler: Scheduler[Event]) -> None:
        self.health.set_stopping()
        with self._parts_lock:
            assigned = sorted(self.assigned)
        await source.call(source.pause, assigned)
        # The grace counts from the stop: a SIGTERM during a revoke's drain got a second
        # whole grace after it, 1.5-2x in all, past the pod's termination grace with a
        # slow Userpilot (review "scale17").
        asked = self._stop_asked if self._stop_asked is not None else time.monotonic()
        grace = max(0.0, self.s.shutdown_grace_s - (time.monotonic() - asked))
        left, cut, cut_dead = await self._settle(scheduler, None, grace)
        self._let_go_held()
        if left - cut - cut_dead:
            log.warning("shutdown: %d events not sent yet stay uncommitted; they are "
                        "delivered by their partition's next reader (this pod restarted, or "
                        "another replica)", left - cut - cut_dead)
        if cut:
            # Said apart: "not sent yet" of requests Userpilot may have taken read as no
            # duplicates to come (review "stop44").
            log.warning("shutdown: %d requests cut on the wire (the grace ended, or "
                        "Userpilot was failing) stay uncommitted; Userpilot may have them, and "
                        "they are sent again by their partition's next reader", cut)
        if cut_dead:
            # Not Userpilot's: counted as its requests, they sent on-call after duplicates
            # that cannot happen (review "broker54").
            log.warning("shutdown: %d dead letters cut on their way to the DLQ (Kafka "
                        "unreachable, or the grace ended) stay uncommitted; they are "
                        "dead-lettered by their partition's next reader (the DLQ may hold "
                        "them twice)", cut_dead)
        end = asked + self.s.shutdown_grace_s + STOP_AFTER_DRAIN_S

        def step(bound: float) -> float:
            """`bound`, or what is left of the stop's budget (at least STOP_STEP_MIN_S)."""
            return max(STOP_STEP_MIN_S, min(bound, end - time.monotonic()))

        try:
            await source.call(self._final_commit, source, step(FINAL_COMMIT_WAIT_S))
        except Exception:
            log.exception("final commit failed; the next owner re-delivers from the last commit")
        # Leaving the group is bounded too: with Kafka down librdkafka would wait minutes.
        closed = await source.call(source.close, step(
            CLOSE_TIMEOUT_S if source.connected else CLOSE_DOWN_TIMEOUT_S))
        self.kafka_abandoned = not closed
        source.shutdown()
        # With Kafka down a pending dead letter cannot be acknowledged: don't wait long. Its
        # offset is not in the final commit either way: written later, the next owner
        # writes it again (`replay` sends such a copy once).
        unacked = self.dlq.close(step(10.0 if source.connected else 1.0))
        if unacked:
            log.error("%d dead-letter records unacknowledged at exit (offsets not committed)",
                      unacked)
        await self.client.aclose()
        self.handler.close()
        # A Redis probe still running could fail after the close and set the fallback
        # gauge zeroed below back to 1 for the guard's hold (review "diff48a").
        probes = list(self._probes)
        for probe in probes:
            probe.cancel()
        await asyncio.gather(*probes, return_exceptions=True)
        await self.shared.close()
        # Nothing is in flight, paused, waiting or held any more: the gauges kept their last
        # values, which the DLQ guard's hold (metrics still served) showed for minutes
        # (reviews "metrics46", "diff46d").
        self.m.in_flight.set(0)
        self.m.paused_partitions.set(0)
        self.m.waiting_schema.set(0)
        self.m.held_for_one_user.set(0)
        # Nor does it send any more: its rate share, kept through the hold, added up with
        # the share of the replica that took its partitions to more than the token's limit
        # on the dashboard (review "ops48"); a fallback it was on is no longer in use.
        for budget in self.shared.limiters:
            self.m.rate_limit_rps.labels(budget).set(0)
            self.m.rate_limiter_fallback.labels(budget).set(0)
        # The partitions held at the stop only: one revoked long before kept the offset
        # this replica last committed, which its next owner has moved past since.
        held = set(assigned)
        # Per topic, offsets by partition: one entry each was a line over 16 KiB with
        # hundreds of partitions, which container runtimes split (review "whole53").
        by_topic: dict[str, dict[int, int]] = {}
        for (t, p), o in sorted(self.committed.items()):
            if (t, p) in held:
                by_topic.setdefault(t, {})[p] = o
        log.info("stopped; committed %s", "; ".join(
            f"{t}: " + ",".join(f"{p}@{o}" for p, o in parts.items())
            for t, parts in by_topic.items()) or "nothing")

    async def _settle(self, scheduler: Scheduler[Event], parts: Sequence[TP] | None,
                      grace: float) -> Settled:
        """Let requests already on the wire finish (bounded), abandon the rest: how many
        were abandoned, and how many of those were cut while under way (requests to
        Userpilot, and dead letters on their way to the DLQ, apart).

        An event waiting for the limiter, the gate or a retry has not reached Userpilot:
        abandoning it costs nothing (its offset stays uncommitted and it is consumed again),
        while waiting for it would hold a rebalance or a shutdown for minutes at 10
        requests/s. Only an event whose request or DLQ record is under way is waited for,
        so that it is not sent twice. No request of these partitions starts meanwhile
        (`Handler.halt`): with steady traffic and a slow Userpilot the next event of each
        user went out as the last finished, so the drain always ran to its deadline and
        then cut requests Userpilot had taken, sent again by the next owner.

        Abandoned events below finished ones hold the committed offset back; the commit's
        note names the finished ones above it, so the next owner sends only the abandoned
        (`offsets.encode_note`).
        """
        # While Userpilot is down or refusing us its requests cannot finish: not waited for
        # (DLQ records and Redis confirms still are). Nor DLQ records while Kafka is
        # unreachable (a loss comes from an outage): the drain held the poll thread for
        # the whole grace, and then cut them anyway. Asked at every turn: a broker that
        # hangs after the drain began is told only once a commit went 8 s unanswered, and
        # read once, the drain waited the whole grace for its dead letters (broker54). And
        # a dead letter unanswered as long is Kafka not answering too: with no commit due
        # (the dead letter holds the offset) nothing else tells a hung broker (diff54a).
        userpilot_up = self.gate.state == "up"
        source = self._source

        def dlq_out(event: Event) -> bool:
            """Its DLQ record on the wire; not a Redis call, which `dead_letter_on_wire`
            counts too: such a call read "dead letters cut" at a shutdown that had none
            (review "limits57")."""
            return event.dead_letter_on_wire and event.dlq_since is not None

        def waited(event: Event) -> bool:
            # Not waited for with Kafka unreachable: a DLQ record (`dlq_out`) alone. A
            # Redis call (a half-sent group's progress note, a confirm) was cut at once
            # too, though the grace was unused and its event would have finished (review
            # "cancel60").
            since = event.dlq_since
            if event.dead_letter_on_wire and since is not None and (
                    (source is not None and not source.connected)
                    or time.monotonic() - since > COMMIT_SILENCE_S):
                return False
            return event.under_way if userpilot_up else event.dead_letter_on_wire

        def cut_now(event: Event, *, dead_letters: bool) -> bool:
            """On the wire, not waited for, and a dead letter's record or not."""
            on_the_wire = event.on_wire or event.half_sent
            return on_the_wire and dlq_out(event) is dead_letters and not waited(event)

        self.handler.halt(parts)
        # Halted first: after a stall, only what the drain waits for goes (a half-sent
        # event's next call). Held for a consume that cannot come while the drain runs (in
        # the rebalance callback, or at shutdown), it waited out the whole grace and was
        # then called cut on the wire (review "diff57b"). A rebalance callback is the
        # group's word after the stall; a stop asks Kafka nothing more.
        self.stalls.release()
        abandoned = scheduler.abandoned
        settled = False
        try:
            # What is not under way goes at once: events waiting for the limiter would each
            # take a slot of the budget (the shared one too) before stopping at the halt.
            # Requests on the wire not waited for (Userpilot down) are cut here: counted
            # as cut, not as "not sent yet" (review "diff44").
            current = list(scheduler.current(parts))
            cut = sum(1 for event in current if cut_now(event, dead_letters=False))
            cut_dead = sum(1 for event in current if cut_now(event, dead_letters=True))
            await scheduler.cancel(parts, keep=waited)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + grace
            while (any(waited(event) for event in scheduler.current(parts))
                   and loop.time() < deadline):
                # The poll loop is held by this drain, not stuck: a grace over the
                # liveness limit (60 s) failed /healthz and the pod was restarted in the
                # middle of the rebalance, cutting what the drain waited for (struct18).
                self.health.beat()
                await scheduler.wait_change(min(0.05, deadline - loop.time()))
            for event in scheduler.current(parts):
                if dlq_out(event):
                    cut_dead += 1
                elif waited(event):
                    cut += 1
            await scheduler.cancel(parts)
            settled = True
            # Counted as they left: those a halt stopped (with their users' later events)
            # left before the cancel.
            return Settled(scheduler.abandoned - abandoned, cut, cut_dead)
        finally:
            if not settled:
                # Cancelled itself (a revoke's wait ran out): the chains kept for their
                # request under way, with their users' later events behind it, went on once
                # the halt was lifted, sending after the hand-over what the next owner
                # sends too (review "design59").
                scheduler.cancel_soon(parts)
            self.handler.unhalt(parts)

    def _name_void_dead_letters(self) -> None:
        """After a trip's final commit: the dead letters this run wrote of events its
        partitions' commits do not cover (at or past the committed offset, and not named
        finished by its note) are of events the fixed workers read and deliver again.
        Replayed as well (the runbook said to replay what the DLQ held), each was sent twice
        (review "dlq33").

        Named by this run (`userpilot.error.worker`) and their source offsets, for `replay
        --skip-void`: named by time (`--until`), or by source offset alone, replay left out
        dead letters that were committed (another partition's written later; one the note
        covers; one another replica wrote of the same event after this one lost its
        partition), and those were never delivered (reviews "dlq41", "diff41b"). A line left
        out makes replay send those events twice, never lose one."""
        covered = self.commits.committed_finished()
        void: dict[TP, list[int]] = {}
        since: float | None = None
        for tp, offset, at, generation in self._dead_letters:
            # Only the partition's current assignment's: what became of an earlier one's
            # is not known here (committed before the partition went, or read again by
            # its next owner). Named, one committed was never replayed (review "diff41c");
            # left out, replay may send one twice.
            if generation != self.commits.latest_generation(tp):
                continue
            if any(offset < base or finished.covers(offset)
                   for base, finished in covered.get(tp, ())):
                continue
            void.setdefault(tp, []).append(offset)
            since = at if since is None else min(since, at)
        if since is None:
            return
        skips = " ".join(f"--skip-void {self.handler.instance}/{tp[0]}:{tp[1]}@"
                         f"{offset_ranges(offsets)}" for tp, offsets in sorted(void.items()))
        log.critical("the dead letters this run wrote since %s of %d events are not committed: "
                     "once the cause is fixed the workers read those events again and deliver "
                     "them, so do not replay them; replay the others: `python -m consumer "
                     "replay --from %s %s` (with every tripped run's --skip-void)",
                     iso_ms(since), sum(len(v) for v in void.values()), self.s.dlq_topic, skips)

    def _crash(self, exc: BaseException) -> None:
        if not isinstance(self.fatal, DlqGuardTripped):
            self.fatal = exc
        if self._stopping is not None:
            self._stopping.set()

    # -- intake (event loop) ------------------------------------------------------------
    def _intake(self, messages: Sequence[KafkaMessage], start: int,
                scheduler: Scheduler[Event]) -> tuple[int, int]:
        """Take one slice of a polled batch, from `messages[start]`: finish the drops at
        once, schedule the rest; returns how many were scheduled (a batch of drops only
        brings nothing to the window) and where the next slice starts (`len(messages)`
        when done).

        A slice ends after INTAKE_TURN_SENDS events to send (or INTAKE_TURN_S spent taking
        them), or INTAKE_TURN_MESSAGES messages while events are in flight, so the event
        loop turns between slices:
        the answers of requests in flight are read between them instead of behind a
        whole window of intake and first steps (see INTAKE_TURN_SENDS). With nothing in
        flight (a backlog of drops) the batch is one slice.

        Most events on a Signal topic are dropped, so a drop costs no `Event`, no task and
        no lock of its own: `Handler.screen` decides it from the decoded envelope (and
        consent), and the batch's drops are finished (`Commits.dropped`: the highest
        offset of each partition's run of drops) and counted (per drop reason, consumed
        per topic) once, at the end of the batch or before that partition's next `take`,
        so `Commits` sees each partition's offsets in order. With debug logging on, every
        event takes the full path, for one line per drop.

        Partition ownership is asked once per partition per slice: it cannot change
        meanwhile (rebalance callbacks run on the poll thread inside a `Source.call`,
        and none is in progress while this synchronous method runs).

        librdkafka hands each offset over once and the worker seeks a partition only to its
        own position (`KafkaSource.resume`), so an offset at or below one already taken
        means the partition's log went back (`LogResets.went_back`).
        """
        handler = self.handler
        screen = None if handler.debug else handler.screen
        resets = self.resets.pending  # empty but after librdkafka reset a partition's offset
        unread = self.resets.unread  # empty but after the client could not read a batch
        held = self._held_back  # empty but while the SCHEMA_WAIT window is full or a chain hot
        deferred: list[KafkaMessage] = []
        # Per partition, the last offset taken (-1: none yet; None: not assigned).
        owned: dict[TP, int | None] = {}
        marks: dict[TP, int] = {}  # per partition, the last dropped offset not recorded yet
        # Drops counted by identity: each reason is one shared object (`filtering`), and an
        # int key spares hashing a dataclass per event; `kinds` maps the ids back.
        drops: dict[int, int] = {}
        kinds: dict[int, Drop] = {}
        taken: dict[str, int] = {}
        # Offsets the previous owner of a partition finished above its commit (its note):
        # finished here at once, like drops. Empty but after a rebalance.
        inherited = self.commits.inherited()
        already = 0
        scheduled = 0
        position = start
        # Where this slice ends; sliced by messages only once something is in flight, so a
        # backlog of drops pays no check per message.
        end = len(messages)
        if scheduler.in_flight:
            end = min(end, start + INTAKE_TURN_MESSAGES)
        turn_ends = time.perf_counter() + INTAKE_TURN_S
        try:
            while position < end:
                message = messages[position]
                position += 1
                err = message.error()
                if err is not None:
                    if partition_end(err):
                        continue
                    kafka_log.warning("kafka: %s", err.str())
                    if is_fatal(err):
                        raise Stop(f"fatal Kafka error: {err.str()}")
                    part, at = message.partition(), message.offset()
                    if part is not None and at is not None and unreadable(err):
                        self.resets.unreadable((message.topic() or "", part), at, err.str())
                    if self.topics.error(err, message.topic()):
                        self._reshare_in(0.0)  # the gauge follows without a rebalance
                    self.topics.group_error(err)
                    continue
                topic, partition, offset = message.topic(), message.partition(), message.offset()
                assert topic is not None and partition is not None and offset is not None
                tp = (topic, partition)
                if held and tp in held:
                    deferred.append(message)  # after a deferred one: its partition waits
                    continue
                last = owned.get(tp, _UNASKED)
                if last == _UNASKED:
                    last = self.commits.high(tp)
                    if last == -1 and inherited:  # the partition's first offset taken
                        done = inherited.get(tp)
                        if done is not None and offset < done.floor:
                            del inherited[tp]
                            self.resets.another_log(tp, offset, done.floor)
                if last is None:
                    owned[tp] = None
                    continue  # a message of a partition revoked meanwhile
                if unread and tp in unread:
                    self.resets.read_past(tp, offset)
                if resets and tp in resets:
                    self.resets.after_reset(tp, last, offset)
                if offset <= last:
                    # A note still being asked for is the old log's: read later, it was
                    # taken for the new log's and skipped its records at those offsets
                    # (review "diff45e").
                    self._inherit_due.pop(tp, None)
                    # The mark is dropped only once recorded: at a `Stop` the batch's
                    # `finally` records it (review "diff59").
                    self.resets.went_back(tp, last, offset, marks.get(tp))
                    marks.pop(tp, None)
                    # The previous owner's note named the old log's offsets: read once per
                    # slice, it skipped the new log's at them as finished, which were then
                    # committed and never sent (review "core40").
                    inherited.pop(tp, None)
                owned[tp] = offset
                if inherited:
                    done = inherited.get(tp)
                    if done is not None and done.covers(offset):
                        marks[tp] = offset
                        already += 1
                        taken[topic] = taken.get(topic, 0) + 1
                        continue
                first = screen(message.value()) if screen is not None else None
                drop = (first if isinstance(first, Drop)
                        else self._take(message, tp, offset, first, marks, scheduler))
                if drop is _DEFER:
                    held.add(tp)
                    deferred.append(message)
                    continue
                if drop is not None:
                    marks[tp] = offset
                    key = id(drop)
                    count = drops.get(key)
                    if count is None:
                        kinds[key] = drop
                        count = 0
                    drops[key] = count + 1
                else:
                    scheduled += 1
                    if scheduled >= INTAKE_TURN_SENDS or time.perf_counter() >= turn_ends:
                        end = position
                    elif scheduled == 1:
                        end = min(end, start + INTAKE_TURN_MESSAGES)
                taken[topic] = taken.get(topic, 0) + 1
        finally:
            if deferred:
                self.overflow.put_back(deferred)
            if marks:
                self.commits.dropped(marks)
            if drops:
                handler.count_drops((kinds[key], count) for key, count in drops.items())
            if already:
                self.m.already_finished.inc(already)
            for topic, count in taken.items():
                self._consumed(topic).inc(count)
            if taken and self.topics.refused and self.topics.read_from(taken):
                self._reshare_in(0.0)
        return scheduled, position

    def _take(self, message: KafkaMessage, tp: TP, offset: int, decoded: codec.Event | None,
              marks: dict[TP, int], scheduler: Scheduler[Event]) -> Any:
        """The full path of one event that `screen` did not drop: an `Event`, decided
        (`decoded` is `screen`'s result, None when it could not tell), then scheduled.

        Returns the Drop instead when the event is dropped after all (debug logging on);
        the batch records it with the others. Events whose schema must be fetched first
        are scheduled too: the fetch happens in their task, off the poll path; but not
        while the SCHEMA_WAIT window is full, nor past CHAIN_MAX events of one chain: then
        `_DEFER`, nothing recorded, and the message waits in the overflow with the rest of
        its partition (`_backpressure`).
        """
        ts_type, ts = message.timestamp()
        key = message.key()
        value = message.value()
        event = Event(tp[0], tp[1], offset, key if key else (tp[0], tp[1], offset), key,
                      value, message_headers(message), ts if ts_type else None)
        if self.handler.decide(event, decoded) and isinstance(event.decision, Drop):
            if self.handler.debug:
                self.handler.log_dropped(event.decision, event.fields)
            return event.decision
        size = len(value) if value is not None else 0
        if size > LARGE_EVENT_BYTES and self._bytes_left is None:
            self._largest = size
            self._bytes_left = WINDOW_BYTES_MAX - self._bytes_in_flight(scheduler)[0]
        if self._bytes_left is not None:
            if size > self._bytes_left and scheduler.in_flight:
                # Waits in the overflow with the rest of its partition; the window counts
                # as full until it fits (`_backpressure`). Unrecorded, the room for one
                # event of the largest size taken brought it back every pass, deferred
                # again, while each poll added a message to the overflow (review "diff43b").
                self._largest = max(self._largest, size)
                return _DEFER
            self._bytes_left -= size
            self._largest = max(self._largest, size)
        if event.decision is not None:
            # Its chain, as `keyless.place` will make it: the Kafka key, else the userId.
            user = key or (decoded.get("userId") if decoded is not None
                           else decided_user(event.decision))
            if user:
                chain = (tp[0], tp[1], user.encode() if isinstance(user, str) else user)
                stuck = chain in self._stuck
                if (scheduler.queued(chain) >= CHAIN_MAX if not stuck
                        else self._stuck_load(scheduler) >= self._stuck_max):
                    if tp not in self._hot and not stuck:
                        hold_log.info("%s[%d] held: one user has %d events in the window, sent one "
                                 "after another; the other partitions go on", tp[0], tp[1],
                                 CHAIN_MAX)
                    self._hot[tp] = (chain, scheduler.finished(chain), time.monotonic())
                    return _DEFER
        if event.decision is None:  # its schema is not known yet
            if self._schema_window >= self.s.max_in_flight:
                return _DEFER
            self._schema_window += 1
        self.keyless.place(event, tp, decoded, lambda: scheduler.barriers(tp[0], tp[1]))
        mark = marks.pop(tp, None)
        if mark is not None:
            self.commits.dropped({tp: mark})
        event.generation = self.commits.take(tp, offset)  # owned: the caller checked
        if self._dry:
            self._dry.pop(tp, None)  # it brings events to send after all
        event.intake = next(self._intake_seq)
        self.handler.order_writes(event)
        self.commits.sending(tp, offset, self._window_family(event))
        scheduler.submit(event)
        return None

    def _draining_window(self, scheduler: Scheduler[Event]) -> dict[TP, int]:
        """Events in the window per partition (`fair_holds`), less those of chains whose
        current event has been in its attempts for HOT_STALL_S: they do not drain while
        their partition is held. Counted, one event in retries (or a stuck user's chain)
        kept its partition paused while the others got even a trickle, and every other
        user of it waited (review "flow42"). On the monotonic clock: a wall clock stepped
        back (NTP) made every event in retries look fresh for as long (review "clock45")."""
        window = self.commits.in_window_by_partition()
        since = time.monotonic() - HOT_STALL_S
        for event in scheduler.current(None):
            first = event.attempts.first_started
            if first is not None and first <= since:
                tp = (event.topic, event.partition)
                stalled = scheduler.queued((event.topic, event.partition, event.ordering_key))
                window[tp] = max(0, window.get(tp, 0) - stalled)
        return window

    def _stuck_load(self, scheduler: Scheduler[Event]) -> int:
        """Events of stuck chains in the window (see `_stuck_max`)."""
        return sum(scheduler.queued(chain) for chain in self._stuck)

    def _release_hot(self, scheduler: Scheduler[Event]) -> None:
        """Let go of the partitions held for a chain (CHAIN_MAX) once it is down to
        CHAIN_RESUME, or once none of its events finished for HOT_STALL_S (stuck)."""
        clock = time.monotonic()
        for tp, (chain, seen, since) in list(self._hot.items()):
            done = scheduler.finished(chain)
            if done != seen:
                self._hot[tp] = (chain, done, clock)
                since = clock
            drained = scheduler.queued(chain) <= CHAIN_RESUME
            if drained or clock - since >= HOT_STALL_S:
                if not drained:
                    self._stuck.add(chain)
                del self._hot[tp]
                self._held_back.discard(tp)
        if self._stuck:
            self._stuck = {c for c in self._stuck if scheduler.queued(c) > CHAIN_RESUME}

    def _window_family(self, event: Event) -> str:
        """The window an event to send counts against: the rate budget of its main request
        (track or identify; one when USERPILOT_RATE_LIMIT_SHARED). Dead letters count as
        track, events still waiting for their schema in SCHEMA_WAIT."""
        decision = event.decision
        if decision is None:
            return SCHEMA_WAIT
        return self.shared.budget(
            decision.calls[-1].family if isinstance(decision, Send) else "track")

    async def _run_event(self, event: Event) -> Outcome | None:
        try:
            if event.waits is not None and self._scheduler is not None:
                await self.keyless.before(event, self.handler.decided, self._scheduler.reached)
            outcome: Outcome | None = await self.handler.handle(event)
        except DlqGuardTripped as exc:
            self._crash(exc)  # not finished: its offset stays uncommitted
            # Hold this user's chain until shutdown cancels it: the user's later events must
            # not be sent before this one, which is consumed again after the restart. Not
            # under way any more, half sent or not: a drain has nothing of it to wait for.
            event.on_wire, event.parked = False, True
            await asyncio.get_running_loop().create_future()
            return None
        finally:
            self.keyless.after(event)
            self.handler.writes_done(event)
        self._finished += 1
        done = ((event.topic, event.partition), event.offset, event.generation)
        now = time.monotonic()
        self.guard_hold.outcome(event.intake)
        # The state the event writes (a user's traits, in its partition; a company's,
        # ordered across this replica's partitions as `CompanyOrder` orders them, and a
        # membership, wherever the later one came from): the dead letters held for the
        # guard whose every state a later write overtook are let go.
        decision = event.decision
        chains = tuple(state if state[0] != "user" else (done[0], state)
                       for state in state_written(decision.calls)
                       ) if isinstance(decision, Send) else ()
        if isinstance(outcome, DeadLettered) and outcome.counted:
            if self.guard_hold.hold(done, now, event.intake, chains):
                self.commits.hold(*done)
            else:  # a later write of its state reached Userpilot already
                self.commits.finish(*done)
            self._dead_letters.append((done[0], done[1], outcome.at, done[2]))
        else:
            self.commits.finish(*done)
            if chains and isinstance(outcome, Delivered | Duplicate):
                # Read again after a crash or a trip, they would reach Userpilot after this
                # event and undo what it set (review "order50"); after a trip too.
                for chain in chains:
                    for item in self.guard_hold.overtaken(chain, event.intake):
                        self.commits.finish(*item)
        self._finish_held(functools.partial(self.guard_hold.due, now))
        return outcome

    def _finish_held(self, release: Callable[[], Sequence[tuple[TP, int, int]]]) -> None:
        """Finish the dead letters `release` lets go of the guard hold (event loop); none
        once the guard tripped, nor is it asked: requests still on the wire finish during
        the shutdown's drain, and each outcome let held dead letters of the tripping run go,
        into the final commit (review "hold30"); taken out of the hold unfinished, a later
        write of the same state in the drain no longer found them (`overtaken`), and the
        restart sent them after it (review "diff50b")."""
        if self.handler.guard.tripped_reason is not None:
            return
        for tp, offset, generation in release():
            self.commits.finish(tp, offset, generation)

    def _held_idle(self, scheduler: Scheduler[Event], idle: bool, source: Source) -> bool:
        """Let go of held dead letters no outcome to come can move the guard past, when
        nothing was taken this turn (`idle`). True: commit with notes now instead.

        Not while a commit can still take finished events out of the window: one on its
        way, or a note naming what finished above the held dead letters (sent now, not at
        the next interval).
        Read as stuck, the successes between a bad deploy's dead letters (one event in
        three good, the window below the guard's horizon) let the dead letters go while
        the commit that named the successes was on its way, and they were committed before
        the guard tripped on the ratio (review "diff43").

        With nothing in flight and no partition paused, none can come before the next poll
        (polls bringing drops only held commits GUARD_HOLD_MAX_S each, review "hold30").
        With the window stuck above its resume level by what is finished and not committed
        (held dead letters are out of it, `Commits.hold`; events finished above them that no
        commit's note names are not), nothing more can be taken, and what is in
        flight never counts past the dead letters taken after it: those go. Held, every
        partition waited GUARD_HOLD_MAX_S, cycle after cycle, while one event was in retries
        elsewhere (review "flow42"). Not while partitions are only paused for back-pressure
        with the window below that: a backlog is waiting behind the pause, and a bad deploy's
        dead letters were committed before the guard tripped (review "diff42")."""
        if not idle:
            return False
        # Per window family (SCHEMA_WAIT's too): what stays in it once everything in flight
        # of that family finished (review "diff42": one family's load less every family's
        # events in flight, and SCHEMA_WAIT left out, kept it held).
        level = resume_level(self.s.max_in_flight)
        left = self.commits.in_window_by_family()
        newest = 0  # the latest intake in flight
        for event in scheduler.jobs():
            family = self._window_family(event)
            left[family] = left.get(family, 0) - 1
            newest = max(newest, event.intake)
        finished = max(left.values(), default=0)  # in the window, waiting for a commit
        if finished and (self.commits.unanswered() or self.commits.due_noted(
                None, pipelined=True, max_chars=source.note_limit)):
            return True
        stuck = finished > level
        if not scheduler.in_flight:
            with self._parts_lock:
                paused = bool(self.paused)
            if not paused or stuck:
                self._let_go_held()
        elif stuck:
            self._finish_held(functools.partial(self.guard_hold.after, newest))
        return False

    def _let_go_held(self, parts: Sequence[TP] | None = None) -> None:
        """An orderly hand-over or an idle worker: no trip can come for the held dead
        letters (of `parts`, or all) before their commit, unless the guard tripped
        already; then they stay unfinished, so the restart meets them again."""
        chosen = None if parts is None else set(parts)
        self._finish_held(functools.partial(
            self.guard_hold.take, None if chosen is None else lambda h: h[0] in chosen))

    def _count_retry(self, exc: Exception) -> None:
        """Count a retry, and log it: at most one line per cause every RETRY_LOG_EVERY_S,
        with its status and x-request-id (Userpilot's support asks for it), and how many
        were not logged since. A Pause is logged by the gate instead."""
        cause = getattr(exc, "cause", "misconfigured")
        self.m.retries.labels(cause).inc()
        if not isinstance(exc, Retry):
            return
        now = time.monotonic()
        last, quiet = self._retry_log.get(cause, (-RETRY_LOG_EVERY_S, 0))
        if now - last < RETRY_LOG_EVERY_S:
            self._retry_log[cause] = (last, quiet + 1)
            return
        self._retry_log[cause] = (now, 0)
        log.warning("retrying: %s%s", exc,
                    f" ({quiet} more {cause} retries since the last such line)" if quiet else "")

    def _gate_changed(self, state: GateState, detail: str) -> None:
        self.health.set_integration_up(state != "misconfigured", detail)

    # -- back-pressure and commits ------------------------------------------------------
    async def _backpressure(self, source: Source, scheduler: Scheduler[Event], *,
                            idle: bool = False) -> int:
        """Pause or resume partitions; returns how many messages may be taken now.

        The window counts events to be sent, from intake until their offset is committed,
        per endpoint family (`_window_family`), so a crash re-sends at most
        WORKER_MAX_IN_FLIGHT events per family and replica. Dropped events are not counted:
        dropped again after a crash, they duplicate nothing. Paused when a family's window
        is at the limit, resumed when every family is at `resume_level` (a tenth below).

        Per family because the committable offset follows the slowest family: with identify
        saturated, finished Tracks wait for the identify events between them, and one
        shared window filled with queued identifies held Track at 93 % of its limit (one
        worker, bench workload 12; 98.7 % with a window per family).

        Fair across partitions: librdkafka hands over one partition's backlog at a time, so
        without this the window holds one partition, whose mix of endpoint families can
        starve one family (measured: a partition with 7 of 60 Track users held Track at
        66 % while identify saturated). On resume only the emptiest partitions are let in
        (`fair_holds`: water-filling), the others stay paused; when those let in bring
        nothing for DRY_AFTER_S (`idle`: the last poll was empty) they count as dry and
        the held partitions resume. A partition is dry until a message of it arrives or
        for DRY_FOR_S.

        Events taken before their schema was known count in a window of their own
        (SCHEMA_WAIT, the same limit): with the registry down they wait, and counted as
        Track they filled the window and paused every partition of every topic, the events
        whose schema was cached included (review "faults25"). At its limit the next such
        event is not taken (`_take`): it waits in the overflow with the rest of its
        partition, the partition pauses, and the others go on, until the window is down to
        `resume_level`. Its limit holds exactly: pausing the partitions holding such events
        let each partition not paused yet bring a poll's worth (8 partitions, 8 × the
        limit), and pausing everything at twice the limit stopped the cached partitions
        again (reviews diff25, diff25b). Once decided, such an event stays in that window
        until committed, so a crash then re-sends at most WORKER_MAX_IN_FLIGHT more.
        """
        limit = self.s.max_in_flight
        fullest, families, schema_window = self._window_load()
        if fullest >= limit // 2:
            # Asynchronous: the acknowledgement frees the window when a later poll serves
            # it. Never a synchronous commit here: with Kafka down it would hold the poll
            # thread (no SIGTERM, no readiness, max.poll.interval.ms exceeded).
            await source.call(self._commit, source, None, False)
            fullest, families, schema_window = self._window_load()
        pending = fullest
        byte_room: int | None = None
        if self._bytes_left is not None:
            held, large = self._bytes_in_flight(scheduler)
            if not scheduler.in_flight or (
                    large <= LARGE_EVENT_BYTES and held + self._largest <= WINDOW_BYTES_MAX):
                # None in flight is large, and one deferred would fit (or nothing is in
                # flight: an event larger than the budget alone is taken, never waits for
                # ever): no longer counted.
                self._bytes_left = None
                self._largest = 0
            else:
                self._bytes_left = WINDOW_BYTES_MAX - held
                byte_room = max(0, self._bytes_left // self._largest)
                if not byte_room:
                    pending = max(pending, limit)  # as full as a window of `limit` events
        self._schema_window = schema_window
        if self._held_back and schema_window <= resume_level(limit):
            # Their waiting messages are taken again; the hot chains' wait for their own.
            self._held_back.intersection_update(self._hot)
        if self._hot or self._stuck:
            # The stuck set too: a chain marked stuck is pruned once it drained, whether or
            # not some partition is held (it kept a recovered user unbounded, review
            # "flow41").
            self._release_hot(scheduler)
        # Partitions whose message waits (SCHEMA_WAIT window, a hot chain): paused, kept so.
        keep = self._held_back
        with self._parts_lock:
            # Paused only once the overflow holds twice its size: with deliveries fast, a
            # full window frees within a poll or two and the overflow bridges it.
            full = (pending >= limit and self.overflow.free(self._held_back)
                    >= 2 * self.overflow.cap())
            now = time.monotonic()
            # A dry partition stays unpaused: a pause discards what librdkafka fetched, and
            # the hot partition's backlog, served first, refilled every freed place, so a
            # quiet partition's new event waited for its dry mark to run out (up to 30 s,
            # review fair19). Its rare messages wait in the overflow; the first one ends
            # its dry mark (`_next_batch`), and the next full window pauses it.
            dry = {tp for tp, until in self._dry.items() if until > now} if full else set()
            to_pause = sorted(self.assigned - self.paused - dry) if full else []
            if keep:
                to_pause = sorted(set(to_pause) | ((keep & self.assigned) - self.paused))
            to_resume: list[TP] = []
            if self.paused and pending <= resume_level(limit):
                if not idle or not self._held:
                    self._quiet_since = now
                elif now - self._quiet_since >= DRY_AFTER_S:
                    # Those let in past the held partitions brought nothing for a while (a
                    # resumed partition's first fetch can take a few polls): dry.
                    for tp in self.assigned - self.paused:
                        self._dry[tp] = now + DRY_FOR_S
                wet = {tp for tp in self.assigned if self._dry.get(tp, 0.0) <= now}
                self._held = fair_holds(self.paused & self.assigned, wet, limit * families,
                                        self._draining_window(scheduler))
                kept = self.paused & keep
                to_resume = sorted((self.paused & self.assigned) - self._held - kept)
                if to_resume:
                    self._quiet_since = now
                self.paused = set(self._held) | kept
            self.paused.update(to_pause)
            paused_count = len(self.paused)
        if to_pause:
            await source.call(source.pause, to_pause)
        if to_resume:
            await source.call(source.resume, to_resume)
        self.m.paused_partitions.set(paused_count)
        self.m.in_flight.set(scheduler.in_flight)
        self.m.waiting_schema.set(self.handler.undecided())
        self.m.held_for_one_user.set(len(self._hot))
        room = max(0, min(POLL_BATCH, limit - pending))
        return room if byte_room is None else min(room, byte_room)

    @staticmethod
    def _bytes_in_flight(scheduler: Scheduler[Event]) -> tuple[int, int]:
        """The raw bytes of the events in flight, and the largest one's: read from the
        scheduler's jobs, so nothing is counted twice or left over."""
        held = large = 0
        for event in scheduler.jobs():
            size = len(event.value) if event.value is not None else 0
            held += size
            large = max(large, size)
        return held, large

    async def _poll_wait(self, source: Source, scheduler: Scheduler[Event], room: int
                         ) -> float:
        """How long the next poll may wait for a message.

        Not at all when messages wait in the overflow and the window has room for them:
        they are taken now (a drained topic's overflow was taken one window per poll
        timeout, its last 15 % at half speed). A full window frees as its events finish
        and their offsets are committed, not as messages arrive. While a commit awaits its
        acknowledgement the poll waits, and `KafkaSource` ends that wait when the
        acknowledgement is served (within milliseconds); otherwise, with events in
        flight, the loop waits here for a tenth of the window to finish (`WAKE_SHARE`),
        commits them and lets the poll wait for that acknowledgement, or not at all when
        nothing was due.
        """
        if not room and scheduler.in_flight and not self.commits.outstanding():
            # A tenth of the window, not each event: the room a finished event frees is
            # too little to take, and woken per event (rate-limited, ~100 a second) the
            # loop turned, committed and polled ~77 times a second; with this, ~45, and
            # 8 % less CPU per delivered event (review "prof26", same runs).
            await scheduler.wait_change(POLL_TIMEOUT_S, self.s.max_in_flight // WAKE_SHARE)
            await source.call(self._commit, source, None, False)
            return POLL_TIMEOUT_S if self.commits.outstanding() else 0.0
        return 0.0 if room and self.overflow.free(self._held_back) else POLL_TIMEOUT_S

    @staticmethod
    async def _first_steps() -> None:
        """FIRST_STEP_TURNS turns of the event loop."""
        for _ in range(FIRST_STEP_TURNS):
            await asyncio.sleep(0)

    # -- overflow: messages polled past a full window (`consumer.overflow`) ---------------

    def _next_batch(self, messages: Sequence[KafkaMessage], room: int
                    ) -> Sequence[KafkaMessage]:
        """What to take now (`Overflow.take`): a partition no longer ours waits for
        nothing; one that brought a message is not dry any more."""
        return self.overflow.take(messages, room, self.commits.owns, self._arrived,
                                  self._held_back)

    def _arrived(self, tp: TP) -> None:
        if self._dry:
            self._dry.pop(tp, None)  # it has something to read after all

    def _window_load(self) -> tuple[int, int, int]:
        """The fullest family's window, how many families have events in it, and the
        SCHEMA_WAIT window (apart: it pauses only the partitions holding its events)."""
        by_family = self.commits.in_window_by_family()
        schema_window = by_family.pop(SCHEMA_WAIT, 0)
        return max(by_family.values(), default=0), max(1, len(by_family)), schema_window

    def _commit(self, source: Source, parts: Sequence[TP] | None, wait: bool,
                note_changes: bool = True, positions: bool = False) -> None:
        """Commit finished offsets (poll thread), each with its note of the offsets finished
        above it (`offsets.encode_note`: the next owner skips them).

        `wait=False` pipelines the commit: the window frees only when the coordinator's
        acknowledgement is served by a later poll (`_on_committed`), so a crash still
        re-delivers at most WORKER_MAX_IN_FLIGHT events. `note_changes`: also partitions whose
        offset did not move but whose note changed (`Commits.due_noted`). `positions`: every
        message handed over was taken, so settled partitions commit up to the consumer's
        position (past transaction markers and aborted records; only the main loop knows).
        """
        if positions:
            settled = self.commits.settled()
            if settled:
                self.commits.passed(source.positions(settled))
        if not wait and self._commit_refused_at is not None and (
                time.monotonic() - self._commit_refused_at < self.s.commit_interval_s):
            # Refused (a group ACL revoked, the coordinator moving): asked again on the
            # interval. On every idle poll, it went ~10 times a second per pod for as long
            # as the refusal lasted (review "sasl55").
            return
        if not wait and self.commits.outstanding():
            # One asynchronous commit at a time; its answer lets the next carry everything
            # finished meanwhile. Catching up, the offset moved on every loop pass: ~170
            # commits a second queued at a coordinator answering ~100, the answer came
            # after 1.3 s instead of 7 ms, and the window (freed only by answers) sat full
            # of finished events: a third of the catch-up speed (review "catchup").
            return
        noted = self.commits.due_noted(parts, pipelined=not wait, notes=note_changes,
                                       max_chars=source.note_limit)
        todo = {tp: offset for tp, (offset, _) in noted.items()}
        notes = {tp: note for tp, (_, note) in noted.items() if note}
        if wait and todo and not source.answering(list(todo)):
            # The coordinator stopped answering while the revoke's drain served no callback
            # (`connected` is that old): waited for, the commit held the poll thread for the
            # whole outage (review "lifecycle47"). Sent without waiting, and recorded as
            # requested: a DLQ guard trip then counts it among the commits that may have
            # landed (review "whole47": unrecorded, its dead letters were named not
            # committed, and `--skip-void` skipped events the next owner never read).
            wait = False
        if not todo or not source.commit(todo, wait=wait, notes=notes):
            return
        # What was sent: a note over the source's limit goes without (the limit may have
        # fallen during a synchronous commit the broker refused), as the source does.
        limit = source.note_limit
        self.commits.requested(todo, {tp: note for tp, note in notes.items()
                                      if len(note) <= limit})
        if wait:
            self._on_committed(list(todo.items()), [])

    async def _read_notes(self, source: Source, assigned: set[TP]) -> None:
        """Read new partitions' commit notes before any of their messages is taken (this
        batch's included). While Kafka is unreachable, once it answers again; a read the
        coordinator did not answer is tried again a second later, NOTES_TRIES times (the
        fetcher needs the same coordinator to start, so their messages rarely come first).
        """
        pending = self._inherit_due
        with self._parts_lock:
            for tp in assigned:
                pending[tp] = (0, 0.0)  # a new assignment is read at once
            for tp in [tp for tp in pending if tp not in self.assigned]:
                del pending[tp]
        now = time.monotonic()
        due = sorted(tp for tp, (_, at) in pending.items() if at <= now)
        if not due or not source.connected:
            return
        unanswered = set(await source.call(self._inherit, source, due))
        retry_at = time.monotonic() + NOTES_RETRY_S
        for tp in due:
            tries = pending[tp][0] + 1
            if tp in unanswered and tries < NOTES_TRIES:
                pending[tp] = (tries, retry_at)
            else:
                del pending[tp]

    def _inherit(self, source: Source, parts: list[TP]) -> list[TP]:
        """Poll thread: what the previous owners' last commits named finished above their
        offsets; the intake skips those offsets (`_intake`). Returns the partitions whose
        notes the coordinator did not give. Not inside the assign callback: a blocking client
        call nested in a callback breaks confluent-kafka's call state."""
        finished, unanswered = source.finished_ahead(parts, NOTES_TIMEOUT_S)
        if finished:
            for tp, other in self.commits.inherit(finished).items():
                del finished[tp]  # not taken: neither skipped nor said to be
                if other is not None:
                    self.resets.another_log(tp, *other)
        if finished:
            log.info("previous owners finished %d events above their commits on %s; they "
                     "are skipped", sum(end - start + 1 for ranges in finished.values()
                                        for start, end in ranges.ranges),
                     partitions_text(sorted(finished)))
        return unanswered

    def _final_commit(self, source: Source, wait_s: float = FINAL_COMMIT_WAIT_S) -> None:
        """The shutdown commit, bounded: sent asynchronously, its acknowledgement awaited
        for at most `wait_s` (partitions are paused: polling returns nothing).
        With Kafka down it is simply not acknowledged; the next owner re-delivers at most
        the window."""
        self._commit(source, None, False)
        deadline = time.monotonic() + wait_s
        # Due at the limit the commits go with: a note the broker made the worker cut (or
        # drop) never matched one encoded whole, and every stop with an unfinished event
        # waited out FINAL_COMMIT_WAIT_S for nothing (review "commits42").
        while (self.commits.due(None, max_chars=source.note_limit) and source.connected
               and time.monotonic() < deadline):
            source.serve(0.1)
            self._commit(source, None, False)  # sent once the one in flight is answered

    def _on_committed(self, done: list[tuple[TP, int]], failed: list[TP]) -> None:
        if failed:
            self._commit_refused_at = time.monotonic()
        elif done:
            self._commit_refused_at = None
        for (topic, partition), offset in self.commits.acknowledged(done, failed):
            self.m.committed_offset.labels(topic, str(partition)).set(offset)
        # Counted: refused for minutes (the coordinator unavailable, a rebalance that never
        # ends), delivery stopped at a full window with the pod ready, one WARNING every
        # 10 s and no series to page on (review "broker54").
        for topic, _ in failed:
            self.m.commit_failures.labels(topic).inc()

    # -- rebalance callbacks (poll thread) ----------------------------------------------
    def _on_refetch(self, parts: list[TP]) -> None:
        """The source assigned these again (librdkafka never fetched them): counted only;
        nothing of theirs was taken, so the worker's state of them stands."""
        self.m.rebalances.labels("refetch").inc(len(parts))

    def _on_reset(self, tp: TP, at: int, beyond_end: bool | None) -> None:
        """Poll thread: librdkafka reset `tp`'s position `at` (see `LogResets.reported`)."""
        with self._parts_lock:
            owned = tp in self.assigned  # not one taken away meanwhile (review "mutate53")
        if owned:
            self.resets.reported(tp, at, beyond_end)

    def _on_assign(self, parts: list[TP]) -> None:
        self.m.rebalances.labels("assign").inc()
        self.commits.assign(parts)
        with self._parts_lock:
            self.assigned.update(parts)
            self._fresh.extend(parts)
            self._reshare_due = True
            self._reshare_at = 0.0  # a new assignment is counted at once, not after a backoff
            count = len(self.assigned)
        self.topics.group_taken()
        # A commit refused as the generation changed (ILLEGAL_GENERATION) does not hold the
        # new generation's commits for the interval: the group took the worker again.
        self._commit_refused_at = None
        self.health.set_assigned(True)
        log.info("assigned %s (now %d partitions)", partitions_text(parts), count)

    def _reshare(self, source: Source) -> float | None:
        """Poll thread: this replica's share of the token's limit, owned ÷ all partitions
        (None: keep the current share). The caller applies it on the event loop.

        A count that fails (or reads 0) is asked again `RESHARE_RETRY_S` later, doubling up
        to `RESHARE_RETRY_MAX_S` (each try may hold the poll thread `RESHARE_TIMEOUT_S`);
        until one succeeds the previous share holds. Before the first success there is no
        total: the share stays `UNKNOWN_SHARE` (set when the worker starts), never set from
        a total of 0 (that is a share of 0, and no delivery would start).
        """
        total = 0
        try:
            counted = source.partitions(RESHARE_TIMEOUT_S)
        except Exception as exc:
            kept = ("keeping the previous share" if self.partitions_total > 0 else
                    f"delivering at {UNKNOWN_SHARE:.0%} of the token's limit until it is read")
            log.warning("could not read partition count (%s); %s, asking again in %g s",
                        exc, kept, self._reshare_delay)
        else:
            total = counted.total
            self.topics.note(counted.missing, self.topics.granted(
                lambda topics: source.readable(topics, RESHARE_TIMEOUT_S)))
        if total > 0:
            self.partitions_total = total
            self._reshare_delay = RESHARE_RETRY_S
            if self.topics.missing:  # looked for again: it may be created any time
                self._reshare_in(MISSING_TOPIC_CHECK_S)
        else:
            self._reshare_in(self._reshare_delay)
            self._reshare_delay = min(RESHARE_RETRY_MAX_S, 2 * self._reshare_delay)
            if self.partitions_total <= 0:
                return None
        with self._parts_lock:
            owned = len(self.assigned)
        return partition_share(owned, self.partitions_total)

    def _reshare_in(self, seconds: float) -> None:
        """Either thread: count the partitions again (`_reshare`) `seconds` from now."""
        with self._parts_lock:
            self._reshare_due = True
            self._reshare_at = time.monotonic() + seconds

    def _on_revoke(self, parts: list[TP]) -> None:
        self.m.rebalances.labels("revoke").inc()
        self._release(parts, commit=True)
        log.info("revoked %s", partitions_text(parts))

    def _on_lost(self, parts: list[TP]) -> None:
        self.m.rebalances.labels("lost").inc()
        self._release(parts, commit=False)
        with self._parts_lock:
            left = len(self.assigned)
        if not left:
            self.health.set_assigned(False, lost=True)  # not ready until assigned again
        log.warning("lost %s (no commit: another member may own them)", partitions_text(parts))

    def _release(self, parts: list[TP], *, commit: bool) -> None:
        """Settle the partitions' in-flight events on the loop, commit, forget them.

        Runs on the poll thread while the loop awaits `Source.call`: the loop is free to
        run the settling coroutine handed to it with `run_coroutine_threadsafe`.
        """
        assert self._loop is not None and self._scheduler is not None
        assert self._source is not None
        scheduler = self._scheduler
        # The drain runs inside librdkafka's rebalance callback, where the consumer does not
        # poll: past max.poll.interval.ms it leaves the group, its commit of what the drain
        # finished is refused, and the next owner sends all of it again (review "topo45").
        # So a share of the interval at most, as Quix Streams budgets it (0.2).
        poll_s = self.s.max_poll_interval_s
        budget = min(self.s.shutdown_grace_s, REVOKE_DRAIN_SHARE * poll_s)
        wait = min(budget + REVOKE_MARGIN_S, REVOKE_WAIT_SHARE * poll_s)

        async def drain() -> None:
            self.overflow.forget(parts)
            self._held_back.difference_update(parts)
            self.resets.forget(parts)
            for tp in parts:
                self._hot.pop(tp, None)
            self._stuck = {c for c in self._stuck if (c[0], c[1]) not in parts}
            try:
                # Lost too (nothing is committed then): requests already on the wire need
                # no Kafka. Cancelled, Userpilot had them all the same, and with Redis their
                # claims stayed unconfirmed, so this replica, given the partitions back,
                # sent them again at once (the claim's owner is the same).
                left, cut, cut_dead = await self._settle(scheduler, parts, budget)
                if left - cut - cut_dead:
                    log.info("revoke: %d events of %s not sent yet; the next owner "
                             "delivers them", left - cut - cut_dead, partitions_text(parts))
                if cut:
                    log.warning("revoke: %d requests of %s cut on the wire (the grace "
                                "ended, or Userpilot was failing); Userpilot may have them, "
                                "and the next owner sends them again", cut, partitions_text(parts))
                if cut_dead:
                    log.warning("revoke: %d dead letters of %s cut on their way to the DLQ "
                                "(Kafka unreachable, or the grace ended); the next owner "
                                "dead-letters them again (the DLQ may hold them twice)",
                                cut_dead, partitions_text(parts))
            finally:
                self._let_go_held(parts)
                self.keyless.forget(parts)  # unresolved events abandoned before they ran
                self.handler.forget_writes(parts)  # and company writes, likewise

        settling = asyncio.run_coroutine_threadsafe(drain(), self._loop)
        try:
            settling.result(wait)
        except concurrent.futures.TimeoutError:
            # Never out of a rebalance callback (it would end the worker): what is unsettled
            # stays uncommitted; the next owner delivers it.
            settling.cancel()
            log.error("revoke: %s not settled in %.0f s; committing what finished",
                      partitions_text(parts), wait)
        if commit:
            try:
                # Synchronous only while Kafka answers: a revoke during an outage (close()
                # at shutdown) must not hang on the coordinator.
                self._commit(self._source, parts, self._source.connected)
            except Exception:
                log.exception("commit on revoke failed")
        self.commits.release(parts)
        for tp in parts:
            self.m.forget_partition(tp[0], tp[1])
        self.lag.forget(parts)
        with self._parts_lock:
            self.assigned.difference_update(parts)
            self.paused.difference_update(parts)
            self._reshare_due = True
            owned = {topic for topic, _ in self.assigned}
        self.topics.forget(owned)

    def _publish_rates(self) -> None:
        """Event loop (the limiters' owner): each family's rate share, for the gauge; a
        family with nothing to send asks Redis whether it is back, or still there
        (`SharedLimiter.probe`), so its gauge and alert follow Redis, not its traffic.
        One series per budget: with USERPILOT_RATE_LIMIT_SHARED the one limiter was shown
        under `track` and `identify` both, summed twice the token's limit (review ops35)."""
        for budget, limiter in self.shared.limiters.items():
            self.m.rate_limit_rps.labels(budget).set(limiter.share_rate)
        for limiter in self.shared.distinct():
            if isinstance(limiter, SharedLimiter):
                probe = asyncio.get_running_loop().create_task(limiter.probe())
                self._probes.add(probe)
                probe.add_done_callback(self._probes.discard)

    def _paused_lag(self, source: Source) -> None:
        """Poll thread: the lag of paused partitions, and of those no fetch answered for
        (`Lag.unfetched`), from the broker (`Lag.paused`)."""
        with self._parts_lock:
            parts = sorted((self.paused | self.lag.unfetched()) & self.assigned)

        def still_paused() -> set[TP]:
            with self._parts_lock:
                return (self.paused | self.lag.unfetched()) & self.assigned

        # One budget for both lookups (the poll thread waits for them; each its own, they
        # held it 2 s every 5, review "diff60"): the high watermarks first, with three
        # quarters of it, the low ones (partitions without a base only) with what is left,
        # a quarter at least. Neither starves the other when its broker does not answer
        # (reviews "diff60b", "diff60c").
        started = time.monotonic()

        def lows(asked: list[TP]) -> dict[TP, int]:
            left = PAUSED_LAG_TIMEOUT_S - (time.monotonic() - started)
            return source.low_watermarks(asked, max(PAUSED_LAG_TIMEOUT_S / 4, left))

        self.lag.paused(
            parts, lambda asked: source.high_watermarks(asked, 3 * PAUSED_LAG_TIMEOUT_S / 4),
            still_paused, lows)

    def _on_stats(self, stats: dict[str, Any]) -> None:
        """Poll thread: librdkafka's statistics, for the owned partitions (`Lag.on_stats`)."""
        with self._parts_lock:
            assigned = set(self.assigned)
            paused = set(self.paused)
        self.lag.on_stats(stats, assigned, paused)
