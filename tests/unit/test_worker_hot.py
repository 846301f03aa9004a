"""The bound on one user's events in the window (`worker.CHAIN_MAX`), with real stalls.

Review hot26: a chain stuck at its head (a user's retries, a schema the registry withholds)
with CHAIN_MAX of its user's later events behind it held its whole partition (every other
user on it) for as long as the head was stuck; only that user may wait (test_worker_stuck,
README "The notes matter here"). Held no longer than HOT_STALL_S without progress."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from consumer import codec
from consumer.worker import CHAIN_MAX
from tests.unit.test_worker import (
    SCHEMA_ID,
    TOPIC,
    FakeRegistry,
    FakeSource,
    Message,
    codec_seq,
    drive,
    known_schema,
    make,
    track,
    until,
)
from tests.unit.test_worker_stuck import HeldUser

FOLLOWERS = 40  # the stuck user's later events, each followed by another user's event


def _log(first: bytes) -> dict[tuple[str, int], list[Message]]:
    messages = [Message(TOPIC, 0, 0, b"stuck", first)]
    offset = 1
    for i in range(1, FOLLOWERS + 1):
        messages.append(Message(TOPIC, 0, offset, b"stuck", track("stuck", offset)))
        offset += 1
        messages.append(Message(TOPIC, 0, offset, f"u{i}".encode(), track(f"u{i}", offset)))
        offset += 1
    return {(TOPIC, 0): messages,
            (TOPIC, 1): [Message(TOPIC, 1, i, f"v{i}".encode(), track(f"v{i}", 1000 + i))
                         for i in range(20)]}


def _others(bodies: list[bytes]) -> int:
    return sum(1 for b in bodies if b'"user_id":"u' in b)


def test_a_user_stuck_in_retries_with_a_backlog_does_not_stop_its_partitions_other_users(
) -> None:
    client = HeldUser()  # Userpilot holds "stuck…"'s request (a retry loop, up to 900 s)
    run = make(_log(track("stuck", 0)), registry=known_schema(), client=client,
               USERPILOT_ENSURE_USER="false")

    async def scenario(source: FakeSource) -> None:
        try:
            await until(lambda: _others(client.bodies) == FOLLOWERS,
                        "partition 0's other users, while one user is stuck", 5)
        finally:
            client.release.set()
        await until(lambda: source.committed().get((TOPIC, 0)) == 2 * FOLLOWERS + 1,
                    "everything", 10)

    assert drive(run, scenario) == 0


class WithheldSchema(FakeRegistry):
    """The registry is down for schema id 8 (a new version) until `back`."""

    def __init__(self) -> None:
        super().__init__()
        self.back = False

    def writer_schema(self, schema_id: int) -> Mapping[str, Any]:
        if schema_id == 8:
            if not self.back:
                raise ConnectionError("registry down")
            self._known[8] = codec.SCHEMA
            return codec.SCHEMA
        return super().writer_schema(schema_id)


def test_a_schema_the_registry_withholds_does_not_stop_its_partitions_other_users() -> None:
    registry = WithheldSchema()
    registry.writer_schema(SCHEMA_ID)
    first = codec.encode(8, codec.to_record({
        "type": "track", "event": "Feature Used", "userId": "stuck", "properties": {"seq": 0},
        "context": {"consent": {"analytics": True}}, "timestamp": "2026-11-26T10:00:00.000Z",
        "messageId": "stuck-0"}))
    run = make(_log(first), registry=registry, USERPILOT_ENSURE_USER="false")

    async def scenario(source: FakeSource) -> None:
        try:
            await until(lambda: _others(run.client.bodies) == FOLLOWERS,
                        "partition 0's other users, while the registry is down", 5)
        finally:
            registry.back = True
        await until(lambda: source.committed().get((TOPIC, 0)) == 2 * FOLLOWERS + 1,
                    "everything", 15)

    assert drive(run, scenario) == 0
    stuck = [codec_seq(b) for b in run.client.bodies if b'"user_id":"stuck' in b]
    assert stuck == sorted(stuck)


def test_a_hot_partition_released_below_chain_resume_is_not_starved_by_the_others_backlog(
) -> None:
    """After its hot chain is down to CHAIN_RESUME the partition is no longer held, but it
    stays paused until the whole window is down to `resume_level`: while the other
    partitions' backlog keeps the window above that, nothing resumes it."""
    others = 1500
    log = {(TOPIC, 0): [Message(TOPIC, 0, i, b"hot", track("hot", i)) for i in range(30)]
           + [Message(TOPIC, 0, i, f"u{i}".encode(), track(f"u{i}", i)) for i in range(30, 60)]}
    for p in (1, 2, 3):
        log[(TOPIC, p)] = [Message(TOPIC, p, i, f"p{p}-{i}".encode(), track(f"p{p}-{i}", i))
                           for i in range(others)]
    from tests.unit.test_worker import SlowClient

    run = make(log, registry=known_schema(), USERPILOT_ENSURE_USER="false",
               client=SlowClient(0.02), WORKER_MAX_IN_FLIGHT="40")
    seen: dict[str, int] = {}

    async def scenario(source: FakeSource) -> None:
        def done0() -> bool:
            if source.committed().get((TOPIC, 0)) == 60:
                seen.setdefault("others_when_p0_done",
                                sum(source.committed().get((TOPIC, p), 0) for p in (1, 2, 3)))
                return True
            return False
        await until(lambda: done0() or False, "partition 0", 60)
        await until(lambda: all(source.committed().get((TOPIC, p)) == others
                                for p in (1, 2, 3)), "the others", 60)

    assert drive(run, scenario) == 0
    # Partition 0 (60 events) should not wait for the others' 4,500.
    assert seen["others_when_p0_done"] < 3 * others // 2, seen


def test_a_hot_held_partition_revoked_and_assigned_again_is_consumed_to_its_end() -> None:
    from tests.unit.test_worker_reassign import Reassigning

    tp = (TOPIC, 0)
    messages = [Message(TOPIC, 0, i, b"stuck", track("stuck", i)) for i in range(30)]
    messages += [Message(TOPIC, 0, i, f"u{i}".encode(), track(f"u{i}", i)) for i in range(30, 40)]
    client = HeldUser()
    run = make({tp: list(messages)}, registry=known_schema(), client=client,
               source_type=Reassigning, USERPILOT_ENSURE_USER="false")

    def held() -> float | None:
        return run.worker.m.registry.get_sample_value("userpilot_partitions_held_for_one_user")

    async def scenario(source: FakeSource) -> None:
        await until(lambda: tp in source.paused, "the hot partition held and paused")
        await until(lambda: held() == 1, "the held partition counted")
        assert isinstance(source, Reassigning)
        source.revoke_next = [tp]
        await until(lambda: tp not in run.worker.assigned, "revoked", 10)
        await until(lambda: held() == 0, "a revoked partition no longer counted")
        client.release.set()
        source.assign_next = {tp: list(messages)}
        await until(lambda: source.committed().get(tp) == 40, "everything after re-assign", 15)

    assert drive(run, scenario) == 0


# ---------------------------------------------------------------- stuck chains (review flow41)
# A stuck user's later events are taken past CHAIN_MAX so its partition goes on; stuck chains
# together may hold at most half the window (`Worker._stuck_max`), past it their partitions
# are held again. Unbounded, a stuck user's backlog filled the window and every partition
# stopped behind it: for good when Userpilot refused that user's every event.

WINDOW = 20
STUCK_BACKLOG = 3 * WINDOW  # one user's events, the first held by Userpilot


def test_a_stuck_users_backlog_larger_than_the_window_does_not_stop_the_other_partitions(
) -> None:
    log = {
        (TOPIC, 0): [Message(TOPIC, 0, i, b"stuck", track("stuck", i))
                     for i in range(STUCK_BACKLOG)],
        (TOPIC, 1): [],
    }
    client = HeldUser()
    run = make(log, registry=known_schema(), client=client,
               WORKER_MAX_IN_FLIGHT=str(WINDOW), USERPILOT_ENSURE_USER="false")

    async def scenario(source: FakeSource) -> None:
        # The stuck user's chain is marked stuck after HOT_STALL_S without progress.
        await asyncio.sleep(3)
        # Then other users' events arrive on partition 1.
        source.log[(TOPIC, 1)].extend(
            Message(TOPIC, 1, i, f"v{i}".encode(), track(f"v{i}", 1000 + i)) for i in range(60))
        try:
            # Partition 1's 60 users have nothing to do with the stuck user.
            await until(lambda: source.committed().get((TOPIC, 1)) == 60,
                        "partition 1 delivered while one user of partition 0 is stuck", 15)
        finally:
            client.release.set()

    assert drive(run, scenario) == 0


def test_an_outage_with_one_users_backlog_filling_a_small_window_dead_letters_nothing(
) -> None:
    """Review diff41c: a rule that took an event alone in its attempts with the window full
    as failing on its own (tried this round, withdrawn) dead-lettered every event of an
    outage with a window of one event, or one user's backlog filling a small window. An
    event's failures count only after deliveries since its previous attempt: it waits, and
    the gate closes."""
    from consumer.errors import ServerError
    from tests.unit.test_worker import FakeClient

    class Down(FakeClient):
        async def send(self, call: Any) -> int:
            raise ServerError("HTTP 503", status=503)

    log = {(TOPIC, 0): [Message(TOPIC, 0, i, b"u1", track("u1", i)) for i in range(40)]}
    run = make(log, registry=known_schema(), client=Down(), WORKER_MAX_IN_FLIGHT="16",
               USERPILOT_ENSURE_USER="false", USERPILOT_RETRY_MAX_ATTEMPTS="2")

    async def scenario(source: FakeSource) -> None:
        await until(lambda: run.worker.gate.state == "outage", "the gate closed", 10)
        await asyncio.sleep(1.5)
        assert run.dlq.records == []

    assert drive(run, scenario) == 0


def test_a_registry_withholding_one_users_new_schema_holds_only_that_users_partition() -> None:
    """The registry is down for schema id 8 only. One user's first event is on it; its later
    events (cached schema) queue behind it in its chain, in the *track* window. Once the chain
    is 'stuck' they fill that window, and partition 1 (cached schema, other users) stops until
    the registry answers: the replica, not only the partition carrying the new schema
    (worker.SCHEMA_WAIT's promise)."""

    registry = WithheldSchema()
    registry.writer_schema(7)
    first = codec.encode(8, codec.to_record({
        "type": "track", "event": "Feature Used", "userId": "x", "properties": {"seq": 0},
        "context": {"consent": {"analytics": True}}, "timestamp": "2026-11-26T10:00:00.000Z",
        "messageId": "x-0"}))
    log = {
        (TOPIC, 0): [Message(TOPIC, 0, 0, b"x", first)]
        + [Message(TOPIC, 0, i, b"x", track("x", i)) for i in range(1, STUCK_BACKLOG)],
        (TOPIC, 1): [],
    }
    run = make(log, registry=registry, WORKER_MAX_IN_FLIGHT=str(WINDOW),
               USERPILOT_ENSURE_USER="false")

    async def scenario(source: FakeSource) -> None:
        await asyncio.sleep(3)  # past HOT_STALL_S
        source.log[(TOPIC, 1)].extend(
            Message(TOPIC, 1, i, f"v{i}".encode(), track(f"v{i}", 1000 + i)) for i in range(60))
        try:
            await until(lambda: source.committed().get((TOPIC, 1)) == 60,
                        "partition 1 (cached schema) delivered while the registry withholds 8",
                        15)
        finally:
            registry.back = True

    assert drive(run, scenario) == 0


class HeldOnce(HeldUser):
    """Holds user "stuck…"'s requests until `release`; after that answers at once."""


def test_a_chain_once_stuck_is_bounded_by_chain_max_again_once_it_recovered() -> None:
    first = 2 * CHAIN_MAX
    log = {(TOPIC, 0): [Message(TOPIC, 0, i, b"stuck", track("stuck", i)) for i in range(first)]}
    client = HeldOnce()
    run = make(log, registry=known_schema(), client=client, USERPILOT_ENSURE_USER="false")
    chain = (TOPIC, 0, b"stuck")
    peak = [0]

    async def watch() -> None:
        while True:
            if run.worker._scheduler is not None:
                peak[0] = max(peak[0], run.worker._scheduler.queued(chain))
            await asyncio.sleep(0.001)

    async def scenario(source: FakeSource) -> None:
        await asyncio.sleep(3)  # its head held past HOT_STALL_S: found stuck
        assert chain in run.worker._stuck
        client.release.set()
        await until(lambda: source.committed().get((TOPIC, 0)) == first, "the first backlog", 10)
        await asyncio.sleep(0.5)
        assert not run.worker._stuck, "pruned once drained"
        # The same user's next backlog, long after it recovered (Userpilot answers it now).
        client.release = asyncio.Event()  # held again so the window shows what it takes
        source.log[(TOPIC, 0)].extend(Message(TOPIC, 0, first + i, b"stuck",
                                              track("stuck", first + i)) for i in range(150))
        peak[0] = 0
        watcher = asyncio.create_task(watch())
        await asyncio.sleep(1)  # under HOT_STALL_S: it is not stuck now
        watcher.cancel()
        client.release.set()
        await until(lambda: source.committed().get((TOPIC, 0)) == first + 150, "the rest", 10)

    assert drive(run, scenario) == 0
    assert peak[0] <= CHAIN_MAX, f"one user's chain took {peak[0]} places of the window"


def test_a_busy_user_held_again_and_again_logs_it_once(caplog: Any, monkeypatch: Any) -> None:
    """Each hold of a partition for one user logged a line: a busy user's partition is let
    go at CHAIN_RESUME and held again at CHAIN_MAX several times a second (review of the
    shutdown run, round 48: five lines in 3.6 s for one user with 16 events in the window)."""
    from consumer import worker
    from consumer.logs import RateLimit
    from tests.unit.test_worker import SlowClient

    limits = [f for f in worker.hold_log.filters if isinstance(f, RateLimit)]
    assert limits, "the line is rate-limited"
    # A fresh one: another test's line within 30 s would hide this one's.
    monkeypatch.setattr(worker.hold_log, "filters", [RateLimit(limits[0].interval)])
    events = 12 * CHAIN_MAX
    log = {(TOPIC, 0): [Message(TOPIC, 0, i, b"busy", track("busy", i)) for i in range(events)]}
    run = make(log, registry=known_schema(), USERPILOT_ENSURE_USER="false",
               client=SlowClient(0.002))

    async def scenario(source: FakeSource) -> None:
        await until(lambda: source.committed().get((TOPIC, 0)) == events, "all", 30)

    with caplog.at_level("INFO", logger="consumer.worker"):
        assert drive(run, scenario) == 0
    held = [r for r in caplog.records if "held: one user has" in r.getMessage()]
    assert len(held) == 1, [r.getMessage() for r in held]
