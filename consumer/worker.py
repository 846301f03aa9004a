"""The worker: one event's story from Kafka to Userpilot and back to a committed offset.

poll ─▶ decode ─▶ route ─┬─ drop ─────────────────────────────────────▶ finished
                         └─ send ─▶ window (per-user order) ─▶ gate ─▶ limiter ─▶ POST
                                     │                                            │
                                     └─ dead-letter (acked by the broker) ◀── permanent
finished offsets ─▶ highest contiguous offset per partition ─▶ commit (periodic,
on revoke after a bounded drain, on SIGTERM after draining in-flight work).

The poll loop never sleeps on behalf of a delivery: a full window pauses partitions and
polling goes on, so the group never evicts a slow worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from consumer import codec
from consumer.config import Settings
from consumer.deadletter import DlqGuard, Failure, dlq_headers, normalize_headers
from consumer.delivery import UserpilotClient
from consumer.errors import (
    ConnectionFailed,
    DeadLetter,
    DlqGuardTripped,
    Pause,
    RateLimited,
    Retry,
    Stop,
    Timeout,
    UndecodableEvent,
    WorkerError,
)
from consumer.filtering import Drop
from consumer.health import Health
from consumer.kafka import TP, DeadLetterProducer, KafkaMessage, KafkaSource
from consumer.logs import event_fields
from consumer.metrics import Metrics
from consumer.offsets import PartitionOffsets
from consumer.policy import Attempts, Gate, GateState, RetryPolicy
from consumer.ratelimit import AdaptiveLimiter, partition_share
from consumer.registry import Registry
from consumer.routing import Send, route
from consumer.scheduling import Scheduler

__all__ = ["Work", "Worker"]

log = logging.getLogger(__name__)

POLL_BATCH = 500
POLL_TIMEOUT_S = 0.1
PAUSE_AFTER_S = 1.0


@dataclass(slots=True, eq=False)
class Work:
    """One Kafka message on its way through the pipeline."""

    topic: str
    partition: int
    offset: int
    ordering_key: Hashable
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] | None
    timestamp_ms: int | None
    message_id: str | None = None
    send: Send | None = None
    failure: DeadLetter | None = None
    event_time: str | None = None
    decoded: bool = False
    on_wire: bool = False  # an HTTP request or a DLQ produce of it is under way
    attempts: Attempts = field(default_factory=Attempts)


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


class Worker:
    """Wires the stages together; every stage is its own module."""

    def __init__(
        self, settings: Settings, metrics: Metrics, health: Health, *,
        client: UserpilotClient | None = None,
        registry: Registry | None = None,
        dlq: DeadLetterProducer | None = None,
    ) -> None:
        self.s = settings
        self.m = metrics
        self.health = health
        self.client = client or UserpilotClient(
            settings.track_url, settings.headers(), timeout_s=settings.request_timeout_s,
            max_connections=settings.max_connections,
        )
        self.registry = registry or Registry(
            settings.registry_url,
            settings.registry_auth.reveal() if settings.registry_auth else None,
        )
        health.add_check(self.registry.problem)  # a frozen registry turns readiness off
        self.dlq = dlq or DeadLetterProducer(settings.kafka_config())
        self.limiter = AdaptiveLimiter(settings.rate_limit, settings.rate_period_s,
                                       settings.rate_burst)
        self.gate = Gate(on_change=self._gate_changed)  # probes: 0.5 s doubling to 5 s
        self.policy = RetryPolicy(
            self.gate, max_attempts=settings.retry_max_attempts,
            budget_s=settings.retry_budget_s, on_retry=self._count_retry,
            backoff_multiplier_s=settings.retry_backoff_s,
            backoff_max_s=settings.retry_backoff_max_s,
        )
        self.guard = DlqGuard(settings.dlq_max_ratio, settings.dlq_window,
                              settings.dlq_max_consecutive)
        self.offsets: dict[TP, PartitionOffsets] = {}
        self.committed: dict[TP, int] = {}  # acknowledged by the coordinator
        self._requested: dict[TP, int] = {}  # sent, maybe not acknowledged yet
        self.assigned: set[TP] = set()
        self.paused: set[TP] = set()
        self.partitions_total = 0
        self._reshare_due = False
        # Label lookups cost more than the increments: cache the children on the hot path.
        self._consumed: dict[str, Any] = {}
        self._drops: dict[Drop, Any] = {}
        self.fatal: WorkerError | BaseException | None = None
        self._stopping: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.scheduler: Scheduler[Work] | None = None
        self.source: KafkaSource | None = None
        metrics.declare_event_names(sorted({r.event_name for r in settings.mappings.rules}))
        metrics.declare_consent_categories(list(settings.consent.categories))
        metrics.declare_topics(settings.topics)

    # -- lifecycle ----------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the worker to drain and exit (SIGTERM, tests)."""
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)

    async def run(self) -> int:
        """Consume until stopped; returns the process exit code."""
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            # Outside the main thread (tests) there are no signal handlers: stop() is used.
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                self._loop.add_signal_handler(sig, self._stopping.set)
        self.scheduler = Scheduler(self._process, self.s.max_in_flight, self._crash)
        conf = {**self.s.kafka_config(), "group.id": self.s.group_id}
        self.source = KafkaSource(
            conf, self.s.topics, on_assign=self._on_assign, on_revoke=self._on_revoke,
            on_lost=self._on_lost, on_stats=self._on_stats, on_committed=self._on_committed,
        )
        source = self.source
        await source.call(source.subscribe)
        log.info("consuming %s as group %s, delivering to %s", ",".join(self.s.topics),
                 self.s.group_id, self.s.track_url)
        last_commit = time.monotonic()
        try:
            while not self._stopping.is_set():
                room = await self._backpressure()
                messages = await source.call(source.consume, room, POLL_TIMEOUT_S)
                self.health.beat()
                self.health.set_connected(source.connected)
                if source.fatal is not None:
                    raise Stop(f"fatal Kafka error: {source.fatal.str()}")
                if self._reshare_due:
                    # Not inside the rebalance callback: a blocking client call nested in a
                    # callback breaks confluent-kafka's per-thread call state (it aborts).
                    self._reshare_due = False
                    await source.call(self._reshare)
                for message in messages:
                    self._take(message)
                # Periodically, and at once when caught up (an idle poll): a drained backlog
                # should not wait for the timer to be committed.
                if not messages or time.monotonic() - last_commit >= self.s.commit_interval_s:
                    await source.call(self._commit_now, None, False)
                    last_commit = time.monotonic()
        except Stop as exc:
            self.fatal = exc
        finally:
            await self._shutdown()
        if isinstance(self.fatal, DlqGuardTripped):
            return 3
        return 1 if self.fatal is not None else 0

    async def _shutdown(self) -> None:
        assert self.source is not None and self.scheduler is not None
        source = self.source
        self.health.set_stopping()
        await source.call(source.pause, sorted(self.assigned))
        # While Userpilot is down or refusing us nothing can finish: don't wait for it.
        grace = self.s.shutdown_grace_s if self.gate.state == "up" else 0.0
        left = await self._settle(None, grace)
        if left:
            log.warning("shutdown: %d events not sent yet stay uncommitted; they are "
                        "delivered after the restart", left)
        try:
            await source.call(self._commit_now, None)
        except Exception:
            log.exception("final commit failed; the next owner re-delivers from the last commit")
        await source.call(source.close)
        source.shutdown()
        unacked = self.dlq.close()
        if unacked:
            log.error("%d dead-letter records unacknowledged at exit (offsets not committed)",
                      unacked)
        await self.client.aclose()
        log.info("stopped; committed %s", {f"{t}[{p}]": o for (t, p), o in
                                            sorted(self.committed.items())})

    async def _settle(self, parts: Sequence[TP] | None, grace: float) -> int:
        """Let requests already on the wire finish (bounded), abandon the rest.

        An event waiting for the limiter, the gate or a retry has not reached Userpilot:
        abandoning it costs nothing (its offset stays uncommitted and it is consumed again),
        while waiting for it would hold a rebalance or a shutdown for minutes at 10
        requests/s. Only an event whose request or DLQ record is under way is waited for,
        so that it is not sent twice.
        """
        assert self.scheduler is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while (any(job.on_wire for job in self.scheduler.current(parts))
               and loop.time() < deadline):
            await self.scheduler.wait_change(min(0.05, deadline - loop.time()))
        return await self.scheduler.cancel(parts)

    def _crash(self, exc: BaseException) -> None:
        self.fatal = exc
        if self._stopping is not None:
            self._stopping.set()

    # -- intake -------------------------------------------------------------------------
    def _take(self, message: KafkaMessage) -> None:
        err = message.error()
        if err is not None:
            log.warning("kafka: %s", err.str())
            if err.fatal():
                raise Stop(f"fatal Kafka error: {err.str()}")
            return
        topic, partition, offset = message.topic(), message.partition(), message.offset()
        assert topic is not None and partition is not None and offset is not None
        tp = (topic, partition)
        tracker = self.offsets.get(tp)
        if tracker is None:  # a message of a partition revoked meanwhile
            return
        tracker.started(offset)
        counter = self._consumed.get(topic)
        if counter is None:
            counter = self._consumed[topic] = self.m.events_consumed.labels(topic)
        counter.inc()
        ts_type, ts = message.timestamp()
        key = message.key()
        work = Work(topic, partition, offset, key if key else (topic, partition, offset), key,
                    message.value(), normalize_headers(message.headers()),
                    ts if ts_type else None)
        if self._decode(work, fetch=False):
            self._dispatch(work)
        else:
            self._submit(work)  # schema not cached yet: fetch it off the poll path

    def _decode(self, work: Work, *, fetch: bool) -> bool:
        """Decode and route; False when the writer schema must be fetched first."""
        try:
            schema_id, _ = codec.split_wire(work.value)
            if not fetch and self.registry.cached(schema_id) is None:
                return False
            event = codec.decode(work.value, self._lookup)
        except UndecodableEvent as exc:
            work.failure = exc
            work.decoded = True
            return True
        work.decoded = True
        work.message_id = event.get("messageId")
        work.event_time = event.get("timestamp")
        decision = route(event, self.s.consent, self.s.mappings)
        if isinstance(decision, Drop):
            self._dropped(work, decision)
        else:
            work.send = decision
        return True

    def _lookup(self, schema_id: int) -> Mapping[str, Any]:
        cached = self.registry.cached(schema_id)
        if cached is None:
            raise KeyError(schema_id)
        return cached

    def _dropped(self, work: Work, drop: Drop) -> None:
        counter = self._drops.get(drop)
        if counter is None:
            counter = self._drops[drop] = self.m.events_dropped.labels(
                drop.reason, drop.category or "")
        counter.inc()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("dropped (%s%s)", drop.reason,
                      f": {drop.category}" if drop.category else "",
                      extra=event_fields(work.topic, work.partition, work.offset,
                                         work.message_id))

    def _dispatch(self, work: Work) -> None:
        if work.send is None and work.failure is None:
            self._finish(work)
            return
        self._submit(work)

    def _submit(self, work: Work) -> None:
        tracker = self.offsets.get((work.topic, work.partition))
        if tracker is not None:
            tracker.sent(work.offset)
        assert self.scheduler is not None
        self.scheduler.submit(work)

    async def _fetch_schema(self, work: Work) -> None:
        delay = 0.5
        while True:
            try:
                schema_id, _ = codec.split_wire(work.value)
                await asyncio.to_thread(self.registry.writer_schema, schema_id)
                break
            except (KeyError, UndecodableEvent):
                break  # _decode turns it into an undecodable dead letter
            except Exception as exc:
                log.warning("schema registry unavailable (%s); retrying in %.1f s",
                            type(exc).__name__, delay,
                            extra=event_fields(work.topic, work.partition, work.offset, None))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
        self._decode(work, fetch=True)

    # -- delivery -----------------------------------------------------------------------
    async def _process(self, work: Work) -> None:
        if not work.decoded:
            await self._fetch_schema(work)
        failure = work.failure
        if work.send is not None:
            send = work.send
            try:
                await self.policy.run(lambda: self._attempt(work, send), work.attempts,
                                      before_send=self._wait_for_limiter)
            except DeadLetter as exc:
                failure = exc
            except Retry as exc:
                failure = exc  # type: ignore[assignment]
            else:
                self.m.delivered.labels(send.event_name).inc()
                age = _event_age(work.event_time)
                if age is not None:
                    self.m.event_age.observe(age)
                self.guard.record_success()
                self._finish(work)
                return
        if failure is None:
            self._finish(work)
            return
        await self._dead_letter(work, failure)

    async def _wait_for_limiter(self) -> None:
        waited = await self.limiter.acquire()
        self.m.limiter_wait.observe(waited)

    async def _attempt(self, work: Work, send: Send) -> None:
        start = time.perf_counter()
        work.on_wire = True
        try:
            await self.client.track(send.body)
            self.m.responses.labels("202").inc()
        except Timeout:
            self.m.responses.labels("timeout").inc()
            raise
        except ConnectionFailed:
            self.m.responses.labels("connection_error").inc()
            raise
        except (Retry, Pause, DeadLetter) as exc:
            self.m.responses.labels(str(exc.status)).inc()
            if isinstance(exc, RateLimited):
                self.limiter.slow_down()
                self.m.rate_limit_rps.set(self.limiter.rate)
            raise
        finally:
            work.on_wire = False
            self.m.delivery_latency.observe(time.perf_counter() - start)

    def _count_retry(self, exc: Retry | Pause) -> None:
        cause = exc.cause if isinstance(exc, Retry) else "misconfigured"
        self.m.retries.labels(cause).inc()

    def _gate_changed(self, state: GateState, detail: str) -> None:
        self.health.set_integration_up(state != "misconfigured")

    async def _dead_letter(self, work: Work, exc: WorkerError) -> None:
        reason = ("retries_exhausted" if isinstance(exc, Retry)
                  else getattr(exc, "reason", "dead_letter"))
        fields = event_fields(work.topic, work.partition, work.offset, work.message_id)
        if not self.guard.allow_dead_letter():
            self.m.dlq_guard_tripped.set(1)
            log.critical("DLQ guard tripped: %s. Not dead-lettering and stopping: this looks "
                         "like a broken deploy or configuration, not bad events. Offsets from "
                         "here on stay uncommitted.", self.guard.tripped_reason, extra=fields)
            if not isinstance(self.fatal, DlqGuardTripped):
                self._crash(DlqGuardTripped(self.guard.tripped_reason or "DLQ guard"))
            return
        failure = Failure(
            reason=reason, exception_class=type(exc).__name__, message=str(exc),
            status=getattr(exc, "status", None), body=getattr(exc, "body", ""),
            attempts=work.attempts.count, first_attempt=work.attempts.first_wall,
            last_attempt=work.attempts.last_wall,
        )
        headers = dlq_headers(work.headers, topic=work.topic, partition=work.partition,
                              offset=work.offset, failure=failure,
                              secrets=[self.s.api_key.reveal()])
        delay = 0.5
        work.on_wire = True  # from here a cancelled job could leave a DLQ record behind
        while True:
            try:
                await self.dlq.send(self.s.dlq_topic, key=work.key, value=work.value,
                                    headers=headers, timestamp_ms=work.timestamp_ms)
                break
            except Exception as exc2:
                log.error("dead-letter produce failed (%s); retrying in %.1f s", exc2, delay,
                          extra=fields)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
        self.m.dead_lettered.labels(reason).inc()
        log.warning("dead-lettered (%s): %s", reason, exc, extra=fields)
        self._finish(work)

    def _finish(self, work: Work) -> None:
        tracker = self.offsets.get((work.topic, work.partition))
        if tracker is not None:
            tracker.finished(work.offset)

    # -- back-pressure and commits --------------------------------------------------------
    def _uncommitted(self) -> int:
        return sum(tracker.at_risk for tracker in self.offsets.values())

    async def _backpressure(self) -> int:
        """Pause or resume partitions; returns how many messages may be taken now.

        The window counts events to be sent, from intake until their offset is committed,
        so a crash re-sends at most WORKER_MAX_IN_FLIGHT events per replica. Dropped events
        are not counted: dropped again after a crash, they duplicate nothing.
        """
        assert self.source is not None and self.scheduler is not None
        source = self.source
        limit = self.s.max_in_flight
        pending = self._uncommitted()
        if pending >= limit // 2:
            await source.call(self._commit_now, None, False)
            pending = self._uncommitted()
        if pending >= limit and not self.paused:
            # A pause purges librdkafka's prefetched messages and costs a refetch (~300 ms
            # measured), so first wait a little for deliveries to free the window; pause
            # only for stalls (outages, slow Userpilot). Heartbeats do not need polling.
            deadline = time.monotonic() + PAUSE_AFTER_S
            while True:
                await source.call(self._commit_now, None, True)
                pending = self._uncommitted()
                if pending < limit or time.monotonic() >= deadline:
                    break
                await self.scheduler.wait_change(deadline - time.monotonic())
        if pending >= limit and len(self.paused) < len(self.assigned):
            parts = sorted(self.assigned - self.paused)
            await source.call(source.pause, parts)
            self.paused.update(parts)
        elif self.paused and pending <= limit // 2:
            parts = sorted(self.paused & self.assigned)
            await source.call(source.resume, parts)
            self.paused.clear()
        self.m.paused_partitions.set(len(self.paused))
        self.m.in_flight.set(self.scheduler.in_flight)
        return max(1, min(POLL_BATCH, limit - pending))

    def _commit_now(self, parts: Sequence[TP] | None, wait: bool = True) -> None:
        """Commit finished offsets (runs on the poll thread).

        `wait=False` pipelines the commit: the window frees only when the coordinator's
        acknowledgement is served by a later poll (`_on_committed`), so a crash still
        re-delivers at most WORKER_MAX_IN_FLIGHT events.
        """
        assert self.source is not None
        todo: dict[TP, int] = {}
        known = self.committed if wait else self._requested
        for tp in (parts if parts is not None else list(self.offsets)):
            tracker = self.offsets.get(tp)
            offset = tracker.committable() if tracker else None
            if offset is not None and known.get(tp) != offset:
                todo[tp] = offset
        if not todo:
            return
        if not self.source.commit(todo, wait=wait):
            return
        self._requested.update(todo)
        if wait:
            self._on_committed(list(todo.items()), [])

    def _on_committed(self, done: list[tuple[TP, int]], failed: list[TP]) -> None:
        for tp in failed:
            self._requested.pop(tp, None)  # send it again next time
        for tp, offset in done:
            if offset <= self.committed.get(tp, -1):
                continue
            self.committed[tp] = offset
            tracker = self.offsets.get(tp)
            if tracker is not None:
                tracker.committed(offset)
                self.m.committed_offset.labels(tp[0], str(tp[1])).set(offset)

    # -- rebalance callbacks (poll thread) ----------------------------------------------
    def _on_assign(self, parts: list[TP]) -> None:
        assert self.source is not None
        self.m.rebalances.labels("assign").inc()
        for tp in parts:
            self.offsets[tp] = PartitionOffsets()
            self.committed.pop(tp, None)
            self._requested.pop(tp, None)
        self.assigned.update(parts)
        self._reshare_due = True
        self.health.set_assigned(True)
        log.info("assigned %s (now %d partitions)", _fmt(parts), len(self.assigned))

    def _reshare(self) -> None:
        assert self.source is not None
        try:
            self.partitions_total = self.source.partition_count() or self.partitions_total
        except Exception as exc:
            log.warning("could not read partition count (%s); keeping the previous share", exc)
        share = partition_share(len(self.assigned), self.partitions_total)
        self.limiter.set_share(share)
        self.m.rate_limit_rps.set(self.limiter.rate)

    def _on_revoke(self, parts: list[TP]) -> None:
        self.m.rebalances.labels("revoke").inc()
        self._release(parts, commit=True)
        log.info("revoked %s", _fmt(parts))

    def _on_lost(self, parts: list[TP]) -> None:
        self.m.rebalances.labels("lost").inc()
        self._release(parts, commit=False)
        log.warning("lost %s (no commit: another member may own them)", _fmt(parts))

    def _release(self, parts: list[TP], *, commit: bool) -> None:
        assert self._loop is not None and self.scheduler is not None
        scheduler = self.scheduler
        budget = self.s.shutdown_grace_s

        async def drain() -> None:
            wait = budget if commit and self.gate.state == "up" else 0.0
            left = await self._settle(parts, wait)
            if left:
                log.info("revoke: %d events of %s not sent yet; the next owner delivers "
                         "them", left, _fmt(parts))

        if scheduler.pending(parts):
            asyncio.run_coroutine_threadsafe(drain(), self._loop).result(budget + 30)
        if commit:
            try:
                self._commit_now(parts)
            except Exception:
                log.exception("commit on revoke failed")
        for tp in parts:
            self.offsets.pop(tp, None)
            self.m.forget_partition(tp[0], tp[1])
        self.assigned.difference_update(parts)
        self.paused.difference_update(parts)
        self._reshare_due = True

    def _on_stats(self, stats: dict[str, Any]) -> None:
        for topic, info in stats.get("topics", {}).items():
            for pid, pinfo in info.get("partitions", {}).items():
                tp = (topic, int(pid))
                if tp not in self.assigned:
                    continue
                # Offsets are committed explicitly, never stored: consumer_lag_stored is
                # always -1 here, consumer_lag (high watermark - committed) is the figure.
                lag = pinfo.get("consumer_lag", -1)
                if isinstance(lag, int) and lag >= 0:
                    self.m.consumer_lag.labels(topic, pid).set(lag)


def _fmt(parts: Sequence[TP]) -> str:
    return ",".join(f"{t}[{p}]" for t, p in sorted(parts)) or "nothing"
