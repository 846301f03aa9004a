"""A worker frozen (SIGSTOP, a paused VM) past its group session: on resume, the requests
that had waited for their rate slot went out before the poll thread heard that the group
had given their partition to another replica, which sent them too (review "freeze57": 2-3
events per freeze without Redis, and a user's older traits written over newer ones)."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

import pytest

from consumer.commits import TP
from tests.unit.test_worker import (
    TOPIC,
    FakeSource,
    Message,
    drive,
    group_of,
    known_schema,
    make,
    track,
    until,
)


@dataclass
class Freezable(FakeSource):
    """A member whose poll thread stops at its next consume while `thawed` is clear, as
    the whole process does under SIGSTOP."""

    thawed: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.thawed.set()

    def consume(self, max_messages: int, timeout_s: float) -> list[Message]:
        self.thawed.wait()
        return super().consume(max_messages, timeout_s)


def test_requests_after_a_freeze_past_the_session_wait_for_the_lost_partitions() -> None:
    tp: TP = (TOPIC, 0)
    log = {tp: [Message(TOPIC, 0, i, f"u{i}".encode(), track(f"u{i}", i)) for i in range(60)]}
    run = make(log, registry=known_schema(), source_type=Freezable,
               USERPILOT_ENSURE_USER="false", USERPILOT_RATE_LIMIT="10",
               USERPILOT_RATE_PERIOD_SECONDS="1", USERPILOT_RATE_BURST="1",
               KAFKA_SESSION_TIMEOUT_MS="3000", KAFKA_HEARTBEAT_INTERVAL_MS="1000")
    after: list[int] = []

    async def scenario(source: FakeSource) -> None:
        assert isinstance(source, Freezable)
        await until(lambda: len(run.client.calls) >= 3, "deliveries under way")
        source.thawed.clear()
        await asyncio.sleep(0.3)  # the poll thread stops at its next consume
        time.sleep(2.5)  # the loop too: frozen past the session (3 s less a heartbeat)
        sent = len(run.client.calls)
        source.lose_next = [tp]  # what librdkafka tells at the first consume after
        source.thawed.set()
        await until(lambda: tp not in run.worker.assigned, "the partition lost", 10)
        await asyncio.sleep(0.5)
        after.append(len(run.client.calls) - sent)

    assert drive(run, scenario) == 0
    assert after == [0], f"{after[0]} requests of the lost partition sent after the freeze"


@pytest.mark.parametrize("then", ["lost", "stopped"])
def test_a_drain_after_a_freeze_does_not_wait_its_grace_for_a_held_call(then: str) -> None:
    """Review "diff57b": a group half-sent when the process froze (its company identify
    answered, its association waiting for a slot); the drain (the partitions lost, or a
    SIGTERM at the resume) waits for that association, and the watch held it for a consume
    that cannot come while the drain runs: the whole grace (6 s here), then "1 requests
    cut on the wire" for a call never sent. The drain is the group's word: it goes."""
    tp: TP = (TOPIC, 0)
    log = {tp: [Message(TOPIC, 0, i, f"u{i}".encode(), group_of(f"u{i}", f"c{i}", i, "p"))
                for i in range(6)]}
    run = make(log, registry=known_schema(), source_type=Freezable,
               USERPILOT_ENSURE_USER="false", USERPILOT_RATE_LIMIT="1",
               USERPILOT_RATE_PERIOD_SECONDS="1", USERPILOT_RATE_BURST="1",
               KAFKA_SESSION_TIMEOUT_MS="3000", KAFKA_HEARTBEAT_INTERVAL_MS="1000",
               WORKER_SHUTDOWN_GRACE_SECONDS="6")
    took: list[float] = []

    async def scenario(source: FakeSource) -> None:
        assert isinstance(source, Freezable)
        await until(lambda: len(run.client.calls) >= 1, "the company identify sent")
        source.thawed.clear()
        await asyncio.sleep(0.2)
        time.sleep(2.5)  # the process frozen past the session (3 s less a heartbeat)
        resumed = time.monotonic()
        if then == "lost":
            source.lose_next = [tp]
            source.thawed.set()
            await until(lambda: tp not in run.worker.assigned, "the partition lost", 30)
        else:
            source.thawed.set()
            run.worker.stop(signalled=True)
            await until(lambda: run.client.closed, "stopped", 30)
        took.append(time.monotonic() - resumed)

    assert drive(run, scenario) == 0
    assert took[0] < 3.0, f"the drain took {took[0]:.1f} s (the grace is 6 s)"
    assert [c.endpoint for c in run.client.calls][:2] == ["company_identify", "identify"]
