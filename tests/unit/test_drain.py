"""The drain (SIGTERM, revoke) over in-memory fakes: it starts no new request, waits only
for what is under way, takes no slot of the budget for events it stops, and leaves no
messageId claim behind (found by a review of the halt; each test fails without its fix)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping, Sequence

import pytest
from prometheus_client import CollectorRegistry

from consumer import codec
from consumer.calls import FAMILIES, Call
from consumer.commits import TP as TP_
from consumer.errors import DlqRecordTooLarge, Refused, Rejected
from consumer.health import Health
from consumer.metrics import ENDPOINTS, Metrics
from consumer.offsets import Finished, decode_note
from consumer.ratelimit import AdaptiveLimiter
from consumer.sharedstate import SharedState
from consumer.worker import Callbacks, Worker
from tests.unit.test_dedup import MemoryStore
from tests.unit.test_handler import metric
from tests.unit.test_handler_dedup import make as make_deduplicated
from tests.unit.test_worker import (
    SCHEMA_ID,
    TOPIC,
    FakeClient,
    FakeDlq,
    FakeSource,
    Message,
    Run,
    SlowClient,
    codec_seq,
    drive,
    known_schema,
    log_of,
    make,
    settings,
    track,
    until,
)

TP = (TOPIC, 0)


class SlowCompany(FakeClient):
    """The company identify takes 0.3 s; `company_on_wire` is set meanwhile."""

    def __init__(self) -> None:
        super().__init__()
        self.company_on_wire = False

    async def send(self, call: Call) -> int:
        if call.endpoint == "company_identify":
            self.company_on_wire = True
            await asyncio.sleep(0.3)
        return await super().send(call)


def group_event() -> bytes:
    event = {"type": "group", "userId": "u1", "groupId": "acme", "traits": {"name": "Acme"},
             "context": {"consent": {"analytics": True}}, "messageId": "m-1",
             "timestamp": "2026-11-26T10:00:00.000Z"}
    return codec.encode(SCHEMA_ID, codec.to_record(event))


def test_a_group_half_sent_when_the_drain_starts_is_finished_not_cut() -> None:
    """A SIGTERM while a group's company identify was on the wire stopped its association
    at the halt: the next owner sent the company identify again with the same messageId."""
    store = MemoryStore()
    log = log_of(group_event())
    paths: list[str] = []
    for restart in (False, True):
        client = SlowCompany()
        run, _, _ = make_deduplicated(log, store, WORKER_SHUTDOWN_GRACE_SECONDS="20")
        run.worker.client = run.worker.handler.client = client

        async def scenario(source: FakeSource, restart: bool = restart,
                           client: SlowCompany = client) -> None:
            if restart:
                await until(lambda: source.committed().get(TP) == 1, "the commit")
            else:
                await until(lambda: client.company_on_wire, "the company identify on the wire")

        assert drive(run, scenario) == 0
        paths += [call.path for call in client.calls]
    assert paths == ["/v1/companies/identify", "/v1/identify"]


class CountingLimiter(AdaptiveLimiter):
    """Counts the slots handed out after `halted_at` is set."""

    halted_at: float | None = None
    after_halt = 0

    async def acquire(self, want: int = 1) -> float:
        waited = await super().acquire()
        if CountingLimiter.halted_at is not None:
            CountingLimiter.after_halt += 1
        return waited


def test_events_waiting_for_the_limiter_take_no_slot_once_the_drain_starts() -> None:
    """Events queued on the limiter when a drain began each took their slot (a Redis
    GCRA slot when shared) and only then stopped at the halt, while the drain waited for
    the requests on the wire: budget spent on nothing."""
    log = {TP: [Message(TOPIC, 0, i, f"u{i}".encode(), track(f"u{i}", i)) for i in range(40)]}
    client = SlowClient(1.0)
    s = settings(USERPILOT_ENSURE_USER="false", USERPILOT_RATE_LIMIT="5",
                 USERPILOT_RATE_PERIOD_SECONDS="1", USERPILOT_RATE_BURST="1",
                 WORKER_SHUTDOWN_GRACE_SECONDS="20")
    CountingLimiter.halted_at, CountingLimiter.after_halt = None, 0
    shared = SharedState(limiters={family: CountingLimiter(s.rate_limit, s.rate_period_s,
                                                           s.rate_burst)
                                   for family in FAMILIES})
    metrics = Metrics(CollectorRegistry())
    made: list[FakeSource] = []

    def source(cb: Callbacks) -> FakeSource:
        made.append(FakeSource(cb, log))
        return made[-1]

    worker = Worker(s, metrics, Health(metrics), client=client, registry=known_schema(),
                    dlq=FakeDlq(), source=source, shared=shared)
    run = Run(worker, client, FakeDlq(), known_schema(), made)

    async def scenario(src: FakeSource) -> None:
        await until(lambda: client.started >= 2, "two requests on the wire")
        CountingLimiter.halted_at = time.monotonic()

    started = time.monotonic()
    assert drive(run, scenario) == 0
    assert CountingLimiter.after_halt == 0, f"{CountingLimiter.after_halt} slots for nothing"
    assert time.monotonic() - started < 5


class SlowAckDlq(FakeDlq):
    """The record is handed over at once; the broker's acknowledgement takes a second."""

    def __init__(self, shared_records: list[object]) -> None:
        super().__init__()
        self.handed: list[object] = shared_records

    async def send(self, topic: str, *, key: bytes | None, value: bytes | None,
                   headers: list[tuple[str, bytes | None]],
                   placement: bytes | None = None) -> None:
        self.handed.append(value)
        await asyncio.sleep(1.0)
        await super().send(topic, key=key, value=value, headers=headers)


class RefusedToken(FakeClient):
    async def send(self, call: Call) -> int:
        raise Refused("HTTP 401: token refused", status=401)


def test_with_userpilot_refusing_the_drain_still_waits_for_a_dlq_record_under_way() -> None:
    """With the gate closed a drain waited for nothing: a DLQ record awaiting its broker
    acknowledgement was cut, so its offset was neither committed nor named in the commit's
    note, and the restarted worker dead-lettered the event again (two records for one
    poison message). The track event before it waits out the refused token: the next
    owner reads the note and sends only that one."""
    log: Mapping[tuple[str, int], list[Message]] = {TP: [
        Message(TOPIC, 0, 0, b"u1", track("u1", 1)),
        Message(TOPIC, 0, 1, b"u2", b"not avro")]}
    handed: list[object] = []
    first = make(dict(log), registry=known_schema(), USERPILOT_ENSURE_USER="false",
                 WORKER_SHUTDOWN_GRACE_SECONDS="20")
    dlq = SlowAckDlq(handed)
    first.worker.dlq = first.worker.handler.dlq = dlq
    first.worker.client = first.worker.handler.client = RefusedToken()

    async def refused(source: FakeSource) -> None:
        await until(lambda: first.worker.gate.state != "up" and len(handed) == 1,
                    "the gate closed and the record handed over")

    assert drive(first, refused) == 0
    assert first.source.committed().get(TP) == 0  # held by the refused event
    finished = decode_note(first.source.notes[-1].get(TP, ""), 0)

    class NextOwner(FakeSource):
        def finished_ahead(self, parts: Sequence[TP_], timeout_s: float
                           ) -> tuple[dict[TP_, Finished], list[TP_]]:
            self.ahead = {TP: finished}
            return super().finished_ahead(parts, timeout_s)

    second = make(dict(log), registry=known_schema(), source_type=NextOwner,
                  USERPILOT_ENSURE_USER="false")
    second.worker.dlq = second.worker.handler.dlq = SlowAckDlq(handed)

    async def caught_up(source: FakeSource) -> None:
        await until(lambda: source.committed().get(TP) == 2, "the commit past the end")

    assert drive(second, caught_up) == 0
    assert handed == [b"not avro"], f"{len(handed)} DLQ records for one poison message"
    assert [codec_seq(body) for body in second.client.bodies] == [1]


class SlowRelease(MemoryStore):
    """A release takes 1 s to reach Redis (waiting for a pooled connection)."""

    async def release(self, key: str, owner: str) -> None:
        await asyncio.sleep(1.0)
        await super().release(key, owner)


class SlowFirst(FakeClient):
    """The first request sent takes 0.6 s; which user it is for is up to the scheduler."""

    first: str | None = None

    async def send(self, call: Call) -> int:
        if self.first is None:
            self.first = json.loads(call.body)["user_id"]
            await asyncio.sleep(0.6)
        return await super().send(call)


def test_a_drain_does_not_cut_a_claims_release_short() -> None:
    """A halted event releasing its claim was cancelled mid-release when the last request
    on the wire ended: the claim stayed for the next owner to wait out.

    One user's request is on the wire for 0.6 s; the other waits a second for the limiter,
    is halted there, and its release takes 1 s, so it outlasts the request on the wire."""
    store = SlowRelease()
    log = {TP: [Message(TOPIC, 0, 0, b"a", track("a", 1)),
                Message(TOPIC, 0, 1, b"b", track("b", 1))]}
    run, _, dedup = make_deduplicated(log, store, USERPILOT_RATE_LIMIT="1",
                                      USERPILOT_RATE_BURST="1",
                                      USERPILOT_RATE_PERIOD_SECONDS="1",
                                      WORKER_SHUTDOWN_GRACE_SECONDS="20")
    client = SlowFirst()
    run.worker.client = run.worker.handler.client = client
    waiting: list[str] = []

    async def scenario(source: FakeSource) -> None:
        await until(lambda: client.first is not None, "the first request")
        other = "b" if client.first == "a" else "a"
        waiting.append(dedup.key("track", f"{other}-1"))
        await until(lambda: str(store.values.get(waiting[0], "")).startswith("c:"),
                    f"{other}'s claim")
        await asyncio.sleep(0.1)

    assert drive(run, scenario) == 0
    assert waiting and waiting[0] not in store.values, "the halted event's claim left behind"


class Pool(FakeClient):
    """Userpilot answering after `delay` s through `size` connections, as the real client
    (`UserpilotClient`: a request waits for a free one); counts the requests that went."""

    def __init__(self, delay: float, size: int) -> None:
        super().__init__()
        self.delay = delay
        self.started = 0
        self.connections = asyncio.Semaphore(size)

    async def send(self, call: Call) -> int:
        async with self.connections:
            self.started += 1
            await asyncio.sleep(self.delay)
            return await super().send(call)


def test_a_request_waiting_for_a_connection_is_not_under_way() -> None:
    """With more events in flight than connections, a drain waited for the ones queued for
    a connection as if on the wire: they went out after the halt, were cut at the drain's
    deadline once Userpilot had them, kept their claims, and the next owner sent them
    again (review "scale17"). Now they stop unsent and hand their claims on."""
    store = MemoryStore()
    log = {TP: [Message(TOPIC, 0, i, f"u{i}".encode(), track(f"u{i}", i)) for i in range(6)]}
    run, _, _ = make_deduplicated(log, store, USERPILOT_MAX_CONNECTIONS="2",
                                  WORKER_SHUTDOWN_GRACE_SECONDS="0.5")
    client = Pool(0.3, 2)
    run.worker.client = run.worker.handler.client = client

    async def scenario(source: FakeSource) -> None:
        await until(lambda: client.started == 2, "two requests on the wire")
        await asyncio.sleep(0.05)  # the other four queue for a connection

    assert drive(run, scenario) == 0
    assert client.started == 2, "no request started after the halt"
    # Which two got the connections first is the event loop's order, not the log's (CI
    # saw offsets 1 and 2): the commit and its note name exactly the two sent.
    assert len(client.bodies) == 2
    offset, note = run.source.stored[TP]
    named = decode_note(note, offset)
    sent = {json.loads(body)["metadata"]["seq"] for body in client.bodies}
    finished = {o for o in range(6) if o < offset or named.covers(o)}
    assert finished == sent, (offset, note, sent)
    # Only the two sent are requests in the latency histogram, not the four cut at the pool.
    reg = run.worker.m.registry
    counts = [metric(reg, "userpilot_delivery_latency_seconds_count", endpoint=endpoint)
              for endpoint in ENDPOINTS]
    assert sum(counts) == 2, counts
    # The two sent waited for no connection; the four cut at the pool are not recorded.
    assert metric(reg, "userpilot_connection_wait_seconds_count", endpoint="track") == 2
    assert metric(reg, "userpilot_connection_wait_seconds_sum", endpoint="track") < 0.2
    # The four never sent hand their messageIds on: only the two delivered are recorded.
    assert sorted(store.values.values()) == ["d", "d"]


def test_a_stop_during_a_revokes_drain_gets_what_is_left_of_one_grace() -> None:
    """A SIGTERM while a revoke's drain ran got a whole grace more after it: 1.5-2x the
    configured grace in all, past the pod's termination grace with a slow Userpilot
    (review "scale17"). The shutdown's grace counts from the stop."""
    log = {(TOPIC, p): [Message(TOPIC, p, 0, f"u{p}".encode(), track(f"u{p}", p))]
           for p in (0, 1)}
    client = SlowClient(30.0)  # a request Userpilot never answers in time
    run = make(log, registry=known_schema(), client=client, USERPILOT_ENSURE_USER="false",
               WORKER_SHUTDOWN_GRACE_SECONDS="3")
    stopped: list[float] = []

    async def scenario(source: FakeSource) -> None:
        await until(lambda: client.started == 2, "both requests on the wire")
        source.revoke_next = [(TOPIC, 0)]
        await asyncio.sleep(0.5)  # the revoke's drain waits for partition 0's request
        stopped.append(time.monotonic())

    assert drive(run, scenario) == 0
    took = time.monotonic() - stopped[0]
    assert took < 3 + 1.0, f"exit {took:.1f} s after the stop, grace 3 s"


def test_the_wait_for_a_connection_is_measured_apart_from_the_request() -> None:
    """`userpilot_connection_wait_seconds`: with one connection and 0.3 s answers, the
    second event waits ~0.3 s for it, which delivery_latency alone cannot tell from a slow
    Userpilot (review "slowup20")."""
    log = {TP: [Message(TOPIC, 0, i, f"u{i}".encode(), track(f"u{i}", i)) for i in range(2)]}
    client = Pool(0.3, 1)
    run = make(log, registry=known_schema(), client=client, USERPILOT_ENSURE_USER="false",
               USERPILOT_MAX_CONNECTIONS="1")

    async def scenario(source: FakeSource) -> None:
        await until(lambda: source.committed().get(TP) == 2, "both delivered")

    assert drive(run, scenario) == 0
    reg = run.worker.m.registry
    assert metric(reg, "userpilot_connection_wait_seconds_count", endpoint="track") == 2
    assert 0.2 < metric(reg, "userpilot_connection_wait_seconds_sum", endpoint="track") < 2.0


class RefusingDlq(FakeDlq):
    """The DLQ refuses every record at once: by default as an ACL does
    (TOPIC_AUTHORIZATION_FAILED), or with `error` (e.g. a topic too small for any record)."""

    def __init__(self, error: Exception | None = None) -> None:
        super().__init__()
        self.tries = 0
        self.error = error or RuntimeError("TOPIC_AUTHORIZATION_FAILED: denied")

    async def send(self, topic: str, *, key: bytes | None, value: bytes | None,
                   headers: list[tuple[str, bytes | None]],
                   placement: bytes | None = None) -> None:
        self.tries += 1
        raise self.error


def test_a_revoke_does_not_wait_for_a_dead_letter_between_its_produce_attempts() -> None:
    """Asleep before its next attempt, a dead letter is not under way: the drain waited the
    whole grace for it at each rebalance while the DLQ refused everything (review
    "commits42")."""
    log = {**log_of(b"\x00not avro", partition=0),
           **log_of(track("u2", 1), partition=1, key=b"u2")}
    run = make(log, registry=known_schema(), USERPILOT_ENSURE_USER="false",
               WORKER_SHUTDOWN_GRACE_SECONDS="6")
    dlq = RefusingDlq()
    run.worker.dlq = run.worker.handler.dlq = dlq
    took: list[float] = []

    async def scenario(source: FakeSource) -> None:
        await until(lambda: dlq.tries >= 1, "a refused dead letter")
        await asyncio.sleep(0.1)  # in its back-off sleep (0.5 s, doubling)
        started = time.monotonic()
        source.revoke_next = [TP]
        await until(lambda: TP not in run.worker.assigned, "the revoke", timeout=20)
        took.append(time.monotonic() - started)

    assert drive(run, scenario) == 0
    assert took[0] < 2.0, f"the revoke waited {took[0]:.1f} s"
    assert all(commit.get(TP, 0) == 0 for commit in run.source.commits)  # the next owner's


def _stop_with_a_dead_letter_between_attempts(run: Run) -> float:
    """Seconds a stop took, asked while the run's one dead letter waits to be tried again
    (the DLQ refusing every record)."""
    dlq = RefusingDlq()
    run.worker.dlq = run.worker.handler.dlq = dlq
    stopped: list[float] = []

    async def scenario(source: FakeSource) -> None:
        await until(lambda: dlq.tries >= 1, "a refused dead letter")
        await asyncio.sleep(0.1)  # in its back-off sleep (0.5 s, doubling)
        stopped.append(time.monotonic())

    assert drive(run, scenario) == 0
    return time.monotonic() - stopped[0]


def test_a_stop_does_not_wait_for_a_dead_letter_between_its_produce_attempts() -> None:
    run = make(log_of(b"\x00not avro"), registry=known_schema(), USERPILOT_ENSURE_USER="false",
               WORKER_SHUTDOWN_GRACE_SECONDS="5")
    took = _stop_with_a_dead_letter_between_attempts(run)
    assert took < 2.0, f"the stop waited {took:.1f} s"


class RejectedAssociation(FakeClient):
    """Company identifies accepted, the association (an identify) rejected: 400."""

    async def send(self, call: Call) -> int:
        if call.endpoint != "company_identify":
            self.calls.append(call)
            raise Rejected("400 bad association", status=400, body="{}")
        return await super().send(call)


def test_a_stop_does_not_wait_for_a_half_sent_groups_dead_letter_between_attempts() -> None:
    """A half-sent group is under way, but not while its dead letter waits to be tried again
    (review "diff42": the first fix cleared only `on_wire`)."""
    client = RejectedAssociation()
    run = make(log_of(group_event()), registry=known_schema(), client=client,
               USERPILOT_ENSURE_USER="false", WORKER_SHUTDOWN_GRACE_SECONDS="5")
    took = _stop_with_a_dead_letter_between_attempts(run)
    assert [call.endpoint for call in client.calls] == ["company_identify", "identify"]
    assert took < 2.0, f"the stop waited {took:.1f} s"


def _numbered_group(n: int) -> bytes:
    event = {"type": "group", "userId": f"u{n}", "groupId": f"acme{n}",
             "traits": {"name": "Acme"}, "context": {"consent": {"analytics": True}},
             "messageId": f"m-{n}", "timestamp": "2026-11-26T10:00:00.000Z"}
    return codec.encode(SCHEMA_ID, codec.to_record(event))


def test_a_guard_trip_on_a_half_sent_group_does_not_hold_the_stop() -> None:
    """Review stop44: the DLQ guard parks the event it tripped on, and a group whose company
    identify was accepted stayed "half sent", under way: the stop's drain waited the whole
    WORKER_SHUTDOWN_GRACE_SECONDS for an event nothing could follow before the restart."""
    client = RejectedAssociation()
    run = make(log_of(_numbered_group(1), _numbered_group(2)), registry=known_schema(),
               client=client, USERPILOT_ENSURE_USER="false", WORKER_SHUTDOWN_GRACE_SECONDS="8",
               WORKER_DLQ_MAX_CONSECUTIVE="1", WORKER_DLQ_GUARD_HOLD_SECONDS="0")

    async def main() -> tuple[int, float]:
        task = asyncio.create_task(run.worker.run())
        await until(lambda: bool(run.made), "the source")
        await until(lambda: run.worker.handler.guard.tripped_reason is not None, "the trip")
        tripped = time.monotonic()
        code = await asyncio.wait_for(task, 30)
        return code, time.monotonic() - tripped

    code, took = asyncio.run(main())
    assert [c.endpoint for c in client.calls][:2] == ["company_identify", "identify"]
    assert code == 3 and took < 3.0, (code, took)


def test_dead_letters_a_refusing_dlq_retries_log_one_line_per_cause_not_one_each(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review "longrun47": each dead letter the DLQ refused logged every retry, ~120 lines an
    hour per event (half a million a day for a window of them while an ACL refused the
    topic); readiness and userpilot_dlq_unwritable already say it."""
    records = _refused_dead_letters_logged(RefusingDlq(), 2, caplog, monkeypatch)
    lines = [r for r in records if "dead-letter produce failed" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]


def _refused_dead_letters_logged(dlq: RefusingDlq, tries_each: int,
                                 caplog: pytest.LogCaptureFixture,
                                 monkeypatch: pytest.MonkeyPatch) -> list[logging.LogRecord]:
    """The WARNING+ records of 20 undecodable events (20 users) whose dead letters `dlq`
    refuses, once it was tried `tries_each` times per event, the DLQ log's rate limit
    starting a fresh window."""
    from consumer import handler
    from consumer.logs import RateLimit

    monkeypatch.setattr(handler.dlq_log, "filters", [RateLimit(30.0)])
    log = {TP: [Message(TOPIC, 0, i, f"u{i}".encode(), b"\x00not avro") for i in range(20)]}
    run = make(log, registry=known_schema(), USERPILOT_ENSURE_USER="false")
    run.worker.dlq = run.worker.handler.dlq = dlq
    caplog.set_level(logging.WARNING)

    async def scenario(source: FakeSource) -> None:
        await until(lambda: dlq.tries >= 20 * tries_each, "each dead letter refused",
                    timeout=20)

    assert drive(run, scenario) == 0
    return list(caplog.records)


def test_a_dead_letter_written_after_refusals_says_so(
        caplog: pytest.LogCaptureFixture) -> None:
    """Review "logs56": the last line of a DLQ outage was its ERROR; nothing said the stuck
    dead letter was written at last and its partition went on."""

    class RefusingTwice(RefusingDlq):
        async def send(self, topic: str, *, key: bytes | None, value: bytes | None,
                       headers: list[tuple[str, bytes | None]],
                       placement: bytes | None = None) -> None:
            if self.tries < 2:
                await super().send(topic, key=key, value=value, headers=headers,
                                   placement=placement)
            await FakeDlq.send(self, topic, key=key, value=value, headers=headers,
                               placement=placement)

    dlq = RefusingTwice()
    run = make(log_of(b"\x00not avro"), registry=known_schema(), USERPILOT_ENSURE_USER="false")
    run.worker.dlq = run.worker.handler.dlq = dlq
    caplog.set_level(logging.WARNING)

    async def scenario(source: FakeSource) -> None:
        await until(lambda: len(dlq.records) == 1, "the dead letter written", timeout=20)

    assert drive(run, scenario) == 0
    written = [r.getMessage() for r in caplog.records if "dead letter written" in r.getMessage()]
    assert len(written) == 1, written
    assert written[0].startswith("dead letter written after the DLQ refused it "
                                 "(TOPIC_AUTHORIZATION_FAILED: denied) for ")
    assert written[0].endswith("; its partition goes on")


def test_dead_letters_a_too_small_dlq_refuses_log_one_line_per_cause_not_one_each(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review "whole47": each retry tries the whole record, then without its value, then
    bare; the first two steps' warnings were not rate-limited (~240 lines an hour per
    event)."""
    tiny = RefusingDlq(DlqRecordTooLarge("Broker: Message size too large"))
    records = _refused_dead_letters_logged(tiny, 6, caplog, monkeypatch)
    for text in ("too large for the DLQ (", "too large for the DLQ without its value",
                 "refused even without its value"):
        lines = [r for r in records if text in r.getMessage()]
        assert len(lines) == 1, (text, len(lines))


class OneHangs(FakeClient):
    """u1's seq 1 request hangs until `release` is set; the others are answered at once."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.hung = 0

    async def send(self, call: Call) -> int:
        if b'"u1"' in call.body and b'"seq":1' in call.body.replace(b" ", b""):
            self.hung += 1
            await self.release.wait()
        return await super().send(call)


def test_a_revokes_grace_ending_with_a_request_on_the_wire_commits_below_it(
        caplog: pytest.LogCaptureFixture) -> None:
    """Review "coverage60" (a branch no test ran): the revoke's grace ends while u1's request
    is on the wire and later events are finished. The revoke commits the cut event's offset
    (it stays unfinished) with a note naming the later ones finished, and says so."""
    log = {TP: [Message(TOPIC, 0, 0, b"u1", track("u1", 1)),
                Message(TOPIC, 0, 1, b"u2", track("u2", 2)),
                Message(TOPIC, 0, 2, b"u3", track("u3", 3))],
           **log_of(track("u9", 9), partition=1, key=b"u9")}
    client = OneHangs()
    run = make(log, registry=known_schema(), client=client, USERPILOT_ENSURE_USER="false",
               WORKER_SHUTDOWN_GRACE_SECONDS="0.3")

    async def scenario(source: FakeSource) -> None:
        await until(lambda: client.hung == 1 and len(client.bodies) >= 3, "u1 hangs, rest done")
        source.revoke_next = [TP]
        await until(lambda: TP not in run.worker.assigned, "the revoke")
        client.release.set()

    with caplog.at_level(logging.WARNING):
        assert drive(run, scenario) == 0
    offset, note = run.source.stored[TP]
    assert offset == 0, "u1's event was cut on the wire: its offset stays uncommitted"
    finished = decode_note(note, 0)
    assert finished.covers(1) and finished.covers(2), note
    assert any("requests of signal[0] cut on the wire" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_losing_one_of_two_partitions_keeps_the_worker_ready_and_commits_none_of_it() -> None:
    """Review "coverage60": a lost partition (no revoke) is given up without a commit;
    the other goes on and the worker stays ready."""
    log = {**log_of(track("u1", 1)), **log_of(track("u2", 2), partition=1, key=b"u2")}
    run = make(log, registry=known_schema())

    async def scenario(source: FakeSource) -> None:
        await until(lambda: sum(source.committed().values()) == 2, "both committed")
        before = len(source.commits)
        source.lose_next = [TP]
        await until(lambda: TP not in run.worker.assigned, "the loss")
        assert run.worker.health.ready()[0], run.worker.health.ready()
        source.log[TP].append(Message(TOPIC, 0, 1, b"u1", track("u1", 3)))
        source.log[(TOPIC, 1)].append(Message(TOPIC, 1, 1, b"u2", track("u2", 4)))
        await until(lambda: source.committed().get((TOPIC, 1)) == 2, "partition 1 goes on")
        assert all(TP not in c for c in source.commits[before:]), source.commits[before:]

    assert drive(run, scenario) == 0
    assert sorted(codec_seq(b) for b in run.client.bodies) == [1, 2, 4]


class SlowProgress(MemoryStore):
    """A progress note that takes 0.3 s in Redis."""

    def __init__(self) -> None:
        super().__init__()
        self.noting = False

    async def progress(self, key: str, note: str, ttl_ms: int) -> None:
        self.noting = True
        await asyncio.sleep(0.3)
        await super().progress(key, note, ttl_ms)


def test_a_half_sent_group_is_waited_for_with_kafka_unreachable_while_its_note_is_written(
) -> None:
    """Review "cancel60": a drain waits for a half-sent group's next call; with Kafka
    unreachable, one whose progress note was in Redis was cut at once (a Redis call taken
    for a DLQ record, the only thing not waited for then), the grace unused: its
    association was never sent and its claim released."""
    store = SlowProgress()
    run, _, dedup = make_deduplicated(log_of(group_event()), store,
                                      WORKER_SHUTDOWN_GRACE_SECONDS="5")

    async def scenario(source: FakeSource) -> None:
        await until(lambda: store.noting, "the progress note under way")
        source.connected = False  # a broker outage

    assert drive(run, scenario) == 0
    assert [c.path for c in run.client.calls] == ["/v1/companies/identify", "/v1/identify"]
    assert store.values.get(dedup.key("company_identify", "m-1")) == "d"
