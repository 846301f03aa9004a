"""The handler's connections: USERPILOT_MAX_CONNECTIONS per endpoint family, taken before
the family's rate slot (review "slowup20"; each test fails with one pool taken after the
slot)."""

from __future__ import annotations

import asyncio
import time

from consumer import codec
from consumer.calls import Call
from consumer.errors import ServerError
from tests.unit.test_handler import metric
from tests.unit.test_worker import (
    SCHEMA_ID,
    TOPIC,
    FakeClient,
    FakeSource,
    Message,
    drive,
    known_schema,
    make,
    track,
    until,
)

TP = (TOPIC, 0)


class SlowThenFast(FakeClient):
    """Answers take `slow_s` until `fast_at` (monotonic), then none; records when each
    request went out."""

    def __init__(self, slow_s: float) -> None:
        super().__init__()
        self.slow_s = slow_s
        self.fast_at = float("inf")
        self.sent: list[float] = []

    async def send(self, call: Call) -> int:
        now = time.monotonic()
        self.sent.append(now)
        if now < self.fast_at:
            await asyncio.sleep(self.slow_s)
        return await super().send(call)


def busiest(times: list[float], span: float) -> int:
    """The most requests that went out within any `span` seconds."""
    times = sorted(times)
    most = start = 0
    for end, at in enumerate(times):
        while at - times[start] > span:
            start += 1
        most = max(most, end - start + 1)
    return most


def test_after_a_slow_spell_requests_leave_at_the_limiters_pace_not_in_a_burst() -> None:
    """Answers slower than the pool carries (2 connections, 0.6 s: 3.3 a second against a
    limit of 20): events took their rate slots, queued for a connection, and went out
    together the moment Userpilot sped up, over the token's window (429s). A slot is now
    taken only by a request holding a connection."""
    log = {TP: [Message(TOPIC, 0, i, f"u{i}".encode(), track(f"u{i}", i)) for i in range(40)]}
    client = SlowThenFast(0.6)
    run = make(log, registry=known_schema(), client=client, USERPILOT_ENSURE_USER="false",
               USERPILOT_RATE_LIMIT="20", USERPILOT_RATE_PERIOD_SECONDS="1",
               USERPILOT_RATE_BURST="1", USERPILOT_MAX_CONNECTIONS="2")

    async def scenario(source: FakeSource) -> None:
        await until(lambda: len(client.sent) >= 6, "the slow spell")
        client.fast_at = time.monotonic()
        await until(lambda: source.committed().get(TP) == 40, "every event delivered")

    assert drive(run, scenario) == 0
    after = [at for at in client.sent if at >= client.fast_at]
    # 20 a second: at most 5 (+ the burst of 1) in any quarter second.
    assert busiest(after, 0.25) <= 7, (
        f"{busiest(after, 0.25)} requests within 0.25 s at a limit of 20 a second")


def identify(user: str, seq: int) -> bytes:
    event = {"type": "identify", "userId": user, "traits": {"seq": seq},
             "context": {"consent": {"analytics": True}}, "messageId": f"{user}-i{seq}",
             "timestamp": "2026-11-26T10:00:00.000Z"}
    return codec.encode(SCHEMA_ID, codec.to_record(event))


class SlowTrack(FakeClient):
    """Track answers take a second; identify answers come at once."""

    def __init__(self) -> None:
        super().__init__()
        self.identified: list[float] = []

    async def send(self, call: Call) -> int:
        if call.family == "track":
            await asyncio.sleep(1.0)
        else:
            self.identified.append(time.monotonic())
        return await super().send(call)


def test_a_slow_family_does_not_hold_the_other_familys_connections() -> None:
    """One pool for both families: Track requests held its only connection for a second
    each, and the identify events behind them (other users) waited their turn."""
    values = [track(f"t{i}", i) for i in range(3)] + [identify(f"i{i}", i) for i in range(3)]
    log = {TP: [Message(TOPIC, 0, i, f"k{i}".encode(), value)
                for i, value in enumerate(values)]}
    client = SlowTrack()
    run = make(log, registry=known_schema(), client=client, USERPILOT_ENSURE_USER="false",
               USERPILOT_MAX_CONNECTIONS="1")
    started: list[float] = []

    async def scenario(source: FakeSource) -> None:
        started.append(time.monotonic())
        await until(lambda: len(client.identified) == 3, "the identify calls", timeout=10)
        await until(lambda: source.committed().get(TP) == 6, "everything delivered",
                    timeout=10)

    assert drive(run, scenario) == 0
    waited = max(client.identified) - started[0]
    assert waited < 0.8, f"identify calls waited {waited:.1f} s behind Track's connection"
    reg = run.worker.m.registry
    assert metric(reg, "userpilot_connection_wait_seconds_count", endpoint="identify") == 3


def test_a_backlog_at_the_rate_limit_is_limiter_wait_not_connection_wait() -> None:
    """Permits are held while their requests wait for rate slots: the events behind them
    waited for the limiter, yet `userpilot_connection_wait_seconds` reported it, telling
    operators to raise USERPILOT_MAX_CONNECTIONS (review "permits21")."""
    log = {TP: [Message(TOPIC, 0, i, f"u{i}".encode(), track(f"u{i}", i)) for i in range(30)]}
    run = make(log, registry=known_schema(), USERPILOT_ENSURE_USER="false",
               USERPILOT_RATE_LIMIT="40", USERPILOT_RATE_PERIOD_SECONDS="1",
               USERPILOT_RATE_BURST="1", USERPILOT_MAX_CONNECTIONS="4")

    async def scenario(source: FakeSource) -> None:
        await until(lambda: source.committed().get(TP) == 30, "every event delivered")

    assert drive(run, scenario) == 0
    reg = run.worker.m.registry
    connection = metric(reg, "userpilot_connection_wait_seconds_sum", endpoint="track")
    limiter = metric(reg, "userpilot_rate_limiter_wait_seconds_sum", endpoint="track")
    assert connection < 0.05, f"{connection:.2f} s of connection wait, answers instant"
    assert limiter > 5.0, f"{limiter:.2f} s of limiter wait for 30 events at 40 a second"


class FailingSpell(FakeClient):
    """The first `failures` requests answer 503; records when each request went out and
    what it was answered."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures
        self.sent: list[tuple[float, bool]] = []

    async def send(self, call: Call) -> int:
        ok = len(self.sent) >= self.failures
        self.sent.append((time.monotonic(), ok))
        if not ok:
            raise ServerError("HTTP 503")
        return await super().send(call)


def test_the_outage_probe_does_not_queue_behind_permit_holders_waiting_for_slots() -> None:
    """Review "rate21": when the gate closed (ten failures in a row), every request already
    holding a connection permit took a rate slot at the limiter's pace before it looked at
    the gate; the probe queued behind them (~50 here, ~7 s at 7 a second). Their waits are
    now cut short the moment the gate closes, and the probe goes out at its due time."""
    log = {TP: [Message(TOPIC, 0, i, f"u{i}".encode(), track(f"u{i}", i)) for i in range(80)]}
    client = FailingSpell(10)
    run = make(log, registry=known_schema(), client=client, USERPILOT_ENSURE_USER="false",
               USERPILOT_RATE_LIMIT="10", USERPILOT_RATE_PERIOD_SECONDS="1",
               USERPILOT_RATE_BURST="1", USERPILOT_MAX_CONNECTIONS="64")

    async def scenario(source: FakeSource) -> None:
        await until(lambda: any(ok for _, ok in client.sent), "the probe's success",
                    timeout=20)

    assert drive(run, scenario) == 0
    closed = client.sent[9][0]  # the tenth failure closed the gate
    probe = next(at for at, ok in client.sent if ok)
    # The probe is due 0.4-0.6 s after the gate closed, then takes one slot (~0.14 s).
    assert probe - closed < 1.5, f"the probe went out {probe - closed:.1f} s after the outage"
