"""Unit tests for consumer.sharedlimit: mode switches over a scripted store.

The budget's exactness is tested against a real Redis in
tests/integration/test_redis_limit.py; here: when it falls back, what it tells Redis on
the way back (debt, hold-off), and that the local limiter takes over full.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from consumer.errors import SharedStateUnavailable
from consumer.ratelimit import AdaptiveLimiter, safe_rate
from consumer.sharedlimit import SharedLimiter, budget_key


class ScriptedStore:
    """Grants every slot at once while up; raises while down; records every call."""

    timeout_s = 0.01

    def __init__(self, failure: str = "ConnectionError") -> None:
        self.up = True
        self.failure = failure
        self.calls: list[dict[str, Any]] = []

    async def gcra(self, key: str, **kwargs: Any) -> tuple[int, float]:
        self.calls.append({"key": key, **kwargs})
        if not self.up:
            raise SharedStateUnavailable(f"redis gcra failed: {self.failure}")
        return 1, 0.0


def _limiter(store: ScriptedStore, switches: list[bool]) -> SharedLimiter:
    local = AdaptiveLimiter(600, 1.0, 1)
    local.set_share(0.5)
    return SharedLimiter(store, "k", 600, 1.0, 1, fallback=local, probe_every_s=0.05,
                         on_fallback=switches.append)


def test_budget_key_names_family_and_digest_only() -> None:
    assert budget_key("abc123", "identify") == "userpilot:rl:identify:abc123"


def test_shared_rate_is_the_whole_token_and_slow_down_halves_it() -> None:
    limiter = _limiter(ScriptedStore(), [])
    assert limiter.rate == pytest.approx(safe_rate(600, 1.0, 1))
    limiter.slow_down()
    assert limiter.rate == pytest.approx(safe_rate(600, 1.0, 1) / 2)
    assert limiter.interval_s == pytest.approx(2 / safe_rate(600, 1.0, 1))


def test_share_rate_adds_up_to_the_token_across_replicas_on_the_shared_budget() -> None:
    """Each replica reported the whole token's rate: the dashboard's sum showed N times
    the limit. On the shared budget the gauge is the partition share of the token's rate;
    on the fallback it is what the replica uses."""
    store = ScriptedStore()
    replicas = [_limiter(store, []) for _ in range(2)]  # each owns half the partitions
    token = safe_rate(600, 1.0, 1)
    assert sum(r.share_rate for r in replicas) == pytest.approx(token)
    replicas[0].slow_down()
    assert replicas[0].share_rate == pytest.approx(token / 4)
    fallen = _limiter(store, [])
    store.up = False

    async def main() -> None:
        await fallen.acquire()

    asyncio.run(main())
    assert fallen.on_fallback
    assert fallen.share_rate == pytest.approx(fallen.local.rate)


def test_falls_back_at_once_holds_then_returns_with_debt_and_holdoff() -> None:
    store, switches = ScriptedStore(), list[bool]()
    limiter = _limiter(store, switches)

    async def main() -> None:
        await limiter.acquire()
        assert not limiter.on_fallback
        store.up = False
        waited = await limiter.acquire()
        assert limiter.on_fallback and switches == [True]
        # The local limiter started full after the lookahead: no instant send.
        assert waited >= limiter.lookahead_s
        for _ in range(3):
            await limiter.acquire()
        assert limiter.rate == pytest.approx(limiter.local.rate)
        store.up = True
        await asyncio.sleep(0.06)
        await limiter.acquire()

    asyncio.run(main())
    assert switches == [True, False]
    back = store.calls[-1]
    assert back["debt"] >= 4  # every local send of the last period
    assert back["holdoff_us"] == round(limiter.holdoff_s * 1e6)
    # ... sent over the span the debt counts (the period and the look-ahead): Redis fills
    # what the budget left unused of it first.
    assert back["span_us"] > 0
    assert all(c["debt"] == 0 and c["holdoff_us"] == 0 for c in store.calls[:2])
    # Every probe of the episode names one debt record, which Redis applies once.
    episode = {c["debt_key"] for c in store.calls[2:]}
    assert len(episode) == 1 and episode.pop().startswith("k:debt:")
    assert all(c["debt_key"] is None for c in store.calls[:2])


def test_each_fallback_episode_has_its_own_debt_record() -> None:
    store, switches = ScriptedStore(), list[bool]()
    limiter = _limiter(store, switches)

    async def main() -> None:
        for _ in range(2):
            store.up = False
            await limiter.acquire()
            store.up = True
            await asyncio.sleep(0.06)
            await limiter.acquire()

    asyncio.run(main())
    assert switches == [True, False, True, False]
    records = [c["debt_key"] for c in store.calls if c["debt_key"] is not None]
    assert len(set(records)) == 2


def test_probes_redis_at_most_every_probe_interval_on_the_fallback() -> None:
    store, switches = ScriptedStore(), list[bool]()
    limiter = _limiter(store, switches)
    store.up = False

    async def main() -> None:
        for _ in range(20):
            await limiter.acquire()

    asyncio.run(main())
    # 20 local sends take ~40 ms + the initial hold: a handful of probes, not 20.
    assert 1 <= len(store.calls) <= 6
    assert switches == [True]


def test_slow_down_costs_more_budget_per_request_but_not_more_burst() -> None:
    store = ScriptedStore()
    local = AdaptiveLimiter(600, 60.0, 10)
    limiter = SharedLimiter(store, "k", 600, 60.0, 10, fallback=local)

    async def main() -> None:
        await limiter.acquire()
        limiter.slow_down()
        await limiter.acquire()

    asyncio.run(main())
    full, slowed = store.calls
    assert slowed["interval_us"] == pytest.approx(2 * full["interval_us"], abs=1)
    assert slowed["tolerance_us"] == full["tolerance_us"]
    assert full["tolerance_us"] == pytest.approx(9 * full["interval_us"], abs=10)


def test_an_idle_family_leaves_the_fallback_once_redis_answers() -> None:
    """Review soak18: the way back was only inside `acquire`; a family with nothing to
    send stayed on the fallback (its gauge at 1) with Redis long back, and the "Redis
    unreachable" alert fired. A probe asks Redis, reserving nothing."""
    store, switches = ScriptedStore(), list[bool]()
    limiter = _limiter(store, switches)

    async def main() -> None:
        store.up = False
        await limiter.acquire()
        assert limiter.on_fallback
        await limiter.probe()  # not due yet: no call
        calls = len(store.calls)
        assert calls == 1
        await asyncio.sleep(0.06)
        await limiter.probe()  # due, Redis still down: stays
        assert limiter.on_fallback and len(store.calls) == calls + 1
        store.up = True
        await asyncio.sleep(0.06)
        await limiter.probe()
        assert not limiter.on_fallback

    asyncio.run(main())
    assert switches == [True, False]
    back = store.calls[-1]
    assert back["reserve"] is False and back["holdoff_us"] > 0 and back["debt"] >= 1


def test_the_worker_probes_an_idle_fallback_every_second() -> None:
    """The worker's once-a-second tick starts the probe: no traffic needed."""
    from prometheus_client import CollectorRegistry

    from consumer.calls import FAMILIES
    from consumer.health import Health
    from consumer.metrics import Metrics
    from consumer.sharedstate import SharedState
    from consumer.worker import Callbacks, Worker
    from tests.unit.test_worker import (
        TOPIC,
        FakeClient,
        FakeDlq,
        FakeRegistry,
        FakeSource,
        Run,
        drive,
        settings,
        until,
    )

    probed: list[bool] = []

    class Fallen(SharedLimiter):
        async def probe(self) -> None:
            probed.append(self.on_fallback)

    store = ScriptedStore()
    store.up = False
    fallen = Fallen(store, "k", 600, 1.0, 1, fallback=AdaptiveLimiter(600, 1.0, 1),
                    probe_every_s=0.05)
    asyncio.run(fallen.acquire())
    assert fallen.on_fallback
    metrics = Metrics(CollectorRegistry())
    made: list[FakeSource] = []

    def source(cb: Callbacks) -> FakeSource:
        made.append(FakeSource(cb, {(TOPIC, 0): []}))
        return made[-1]

    client, dlq, registry = FakeClient(), FakeDlq(), FakeRegistry()
    worker = Worker(settings(), metrics, Health(metrics), client=client, registry=registry,
                    dlq=dlq, source=source,
                    shared=SharedState(limiters=dict.fromkeys(FAMILIES, fallen)))

    async def scenario(_source: FakeSource) -> None:
        await until(lambda: bool(probed), "a probe of the idle fallback", timeout=5)

    assert drive(Run(worker, client, dlq, registry, made), scenario) == 0
    assert probed[0] is True


def test_an_idle_family_notices_redis_gone_without_traffic() -> None:
    """Review ops35: a replica started while Redis was down, or idle when it went down,
    asked Redis nothing: no warning, the fallback gauge at 0 for as long as it had nothing
    to send, and the alert silent. Its probe asks Redis once `probe_every_s` passed."""
    store, switches = ScriptedStore(), list[bool]()
    limiter = _limiter(store, switches)

    async def main() -> None:
        store.up = False
        await limiter.probe()  # just made: not due
        assert store.calls == [] and not limiter.on_fallback
        await asyncio.sleep(0.06)
        await limiter.probe()
        assert limiter.on_fallback and store.calls[-1]["reserve"] is False
        store.up = True
        await asyncio.sleep(0.06)
        await limiter.probe()
        assert not limiter.on_fallback
        asked = len(store.calls)
        await limiter.probe()  # asked just now: not again
        assert len(store.calls) == asked

    asyncio.run(main())
    assert switches == [True, False]


def test_the_look_ahead_is_never_shorter_than_one_interval_nor_a_microsecond() -> None:
    """Review diff40: slowed by 429s to its 5 % floor, an interval (20 base intervals) was
    longer than the look-ahead (10): Redis reserved past what the fallback's hold assumed.
    Review config40: past ~2e7 requests a second both rounded under a microsecond and no
    slot was ever reserved."""
    clock = [0.0]
    local = AdaptiveLimiter(600, 1.0, 1, clock=lambda: clock[0])
    limiter = SharedLimiter(ScriptedStore(), "k", 600, 1.0, 1, fallback=local)
    base = 1 / safe_rate(600, 1.0, 1)
    assert limiter.lookahead_s == pytest.approx(10 * base)
    for _ in range(12):  # a 429 every recovery step, each cut after a step of growth
        clock[0] += 10.0
        local.slow_down()
    assert local.factor == pytest.approx(0.05)
    assert limiter.interval_s == pytest.approx(20 * base)
    assert limiter.lookahead_s == pytest.approx(limiter.interval_s)
    fast = SharedLimiter(ScriptedStore(), "k", 10_000_000, 0.01, 1,
                         fallback=AdaptiveLimiter(10_000_000, 0.01, 1))
    assert fast.lookahead_s >= 1e-6


def test_requests_sent_on_the_fallback_are_counted_in_bounded_memory() -> None:
    """Review leak44: one float per request sent on the fallback, kept for the debt span:
    at the largest rate a day-long Redis outage held ~320 MB per family. Counted in
    buckets: at most LOCAL_SEND_BUCKETS entries, the count never under the requests sent
    within the span, over by at most one bucket's."""
    from consumer.sharedlimit import LOCAL_SEND_BUCKETS

    now = [1000.0]
    local = AdaptiveLimiter(10_000_000, 86_400.0, 1, clock=lambda: now[0])
    limiter = SharedLimiter(ScriptedStore(), "k", 10_000_000, 86_400.0, 1, fallback=local,
                            clock=lambda: now[0])
    span = limiter._debt_span_s
    sent: list[float] = []
    for _ in range(200_000):  # 200,000 requests over two spans
        now[0] += 2 * span / 200_000
        limiter._count_local_send()
        sent.append(now[0])
        if len(sent) % 20_000 == 0:
            within = sum(1 for at in sent if at >= now[0] - span)
            counted = limiter._recent_local_sends()
            assert within <= counted <= within + 200_000 / 2 / LOCAL_SEND_BUCKETS + 1
    assert len(limiter._local_sends) <= LOCAL_SEND_BUCKETS + 1
    now[0] += 2 * span
    assert limiter._recent_local_sends() == 0 and not limiter._local_sends


def test_a_send_within_the_span_stays_in_the_debt_when_the_span_shrinks() -> None:
    """Review diff44: a bucket dropped by its first send and the span's width now, while it
    was filled as wide as the span was then (a 429 slow-down recovering shrinks it), lost
    sends still within the span: the debt carried back to Redis was under."""
    from consumer.sharedlimit import LOCAL_SEND_BUCKETS

    now = [1000.0]
    local = AdaptiveLimiter(600, 60.0, 1, clock=lambda: now[0])
    limiter = SharedLimiter(ScriptedStore(), "k", 600, 60.0, 1, fallback=local,
                            clock=lambda: now[0])
    for _ in range(20):  # 429s: the factor at its floor, the look-ahead (and span) wider
        now[0] += 10.0
        limiter.slow_down()
    assert limiter._debt_span_s > 61.5
    start = now[0]
    sends = [start, start + 0.06]  # one bucket (narrower than the span's 1024th then)
    assert sends[1] - start < limiter._debt_span_s / LOCAL_SEND_BUCKETS
    for at in sends:
        now[0] = at
        limiter._count_local_send()
    now[0] = start + 61.0  # the factor grew back: the span ~61 s again
    span = limiter._debt_span_s
    now[0] = start + span + (span / LOCAL_SEND_BUCKETS + 0.06) / 2
    within = sum(1 for at in sends if at >= now[0] - span)
    assert within == 1 and limiter._recent_local_sends() >= within


class FarStore(ScriptedStore):
    """Answers after `round_trip` seconds with up to `count` slots, the first at once."""

    round_trip = 0.05

    async def gcra(self, key: str, **kwargs: Any) -> tuple[int, float]:
        self.calls.append({"key": key, **kwargs})
        await asyncio.sleep(self.round_trip)
        return kwargs.get("count", 1), 0.0


def test_a_far_redis_reserves_slots_in_a_row_and_lets_stale_ones_go() -> None:
    """Review "redis48": one call per slot held a replica to one request per round trip.
    A call far longer than an interval reserves what the caller wants (up to the
    look-ahead's 10); the next calls take them without Redis. A slot no caller came for
    until it was past is let go: spent at its time in Redis's schedule, sent late it would
    fall beside the next fresh one. So are the held slots on a 429."""
    store = FarStore()
    limiter = SharedLimiter(store, "k", 600, 1.0, 1, probe_every_s=0.05)  # ~1.7 ms apart

    async def main() -> list[int]:
        calls = []
        await limiter.acquire()  # learns the round trip: one slot
        calls.append(len(store.calls))
        await limiter.acquire(want=50)
        calls.append(len(store.calls))
        for _ in range(9):
            await limiter.acquire()
        calls.append(len(store.calls))
        await limiter.acquire(want=3)
        calls.append(len(store.calls))
        await asyncio.sleep(0.2)  # both held slots pass unclaimed
        await limiter.acquire()
        calls.append(len(store.calls))
        await limiter.acquire(want=3)
        limiter.slow_down()
        await limiter.acquire()
        calls.append(len(store.calls))
        return calls

    calls = asyncio.run(main())
    assert [c["count"] for c in store.calls] == [1, 10, 3, 1, 3, 1]
    # The nine after the ten took held slots; the one after the idle spell asked Redis, as
    # did the one after the 429.
    assert calls == [1, 2, 2, 3, 4, 6], calls


def test_a_held_slot_is_not_sent_late() -> None:
    """Review "diff48a": held slots were handed out up to a round trip after their time,
    next to the other replicas' fresh slots (21 in a window of 20 through a 0.3 s link)."""
    from consumer.sharedlimit import HELD_SLACK_S

    store = FarStore()
    store.round_trip = 0.2
    limiter = SharedLimiter(store, "k", 6, 1.0, 1, probe_every_s=0.05)  # 0.26 s apart

    async def main() -> int:
        await limiter.acquire()  # learns the round trip
        await limiter.acquire(want=3)  # and holds two slots 0.26 and 0.52 s ahead
        await asyncio.sleep(0.26 + 4 * HELD_SLACK_S)  # the first held one is past
        before = len(store.calls)
        await limiter.acquire()  # the second, still ahead
        return len(store.calls) - before

    assert asyncio.run(main()) == 0
    assert len(limiter._held) == 0


def test_the_fallback_lines_name_their_budget(caplog: pytest.LogCaptureFixture) -> None:
    """Review "night53": the track and identify budgets fell back and came back together,
    in two identical lines that said nothing of which was which."""
    store = ScriptedStore()
    local = AdaptiveLimiter(600, 1.0, 1)
    limiter = SharedLimiter(store, "k", 600, 1.0, 1, fallback=local, probe_every_s=0.01,
                            name="identify")

    async def main() -> None:
        store.up = False
        await limiter.acquire()
        store.up = True
        await asyncio.sleep(0.02)
        await limiter.probe()

    with caplog.at_level(logging.WARNING, logger="consumer.sharedlimit"):
        asyncio.run(main())
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(" (", 1)[0] for line in lines] == ["shared rate budget"] * 2, lines
    assert all(line.startswith("shared rate budget (identify) ") for line in lines), lines


@pytest.mark.parametrize(("failure", "says"), [
    ("ConnectionError", "until Redis answers again"),
    ("AuthenticationError", "REDIS_URL is read at start-up: after rotating its password or "
                            "user, restart the pods"),
])
def test_the_fallback_line_says_what_ends_it(
        caplog: pytest.LogCaptureFixture, failure: str, says: str) -> None:
    """Review "rotate57": a REDIS_URL password rotated at Redis was refused from then on,
    while the line (and the runbook) said the replica returns once Redis answers: it
    answered, refusing, until a restart read the new password."""
    store = ScriptedStore(failure)
    store.up = False
    limiter = SharedLimiter(store, "k", 600, 1.0, 1, fallback=AdaptiveLimiter(600, 1.0, 1))
    with caplog.at_level(logging.WARNING, logger="consumer.sharedlimit"):
        asyncio.run(limiter.acquire())
    (line,) = [r.getMessage() for r in caplog.records]
    assert says in line, line


def test_a_refusal_within_an_outage_says_so_once(caplog: pytest.LogCaptureFixture) -> None:
    """Review "diff57": Redis first not answering, then refusing the rotated password (a
    restart): the episode's only line said "until Redis answers again"."""
    store = ScriptedStore("TimeoutError")
    store.up = False
    limiter = SharedLimiter(store, "k", 600, 1.0, 1, fallback=AdaptiveLimiter(600, 1.0, 1),
                            probe_every_s=0.0)

    async def main() -> None:
        await limiter.acquire()
        store.failure = "AuthenticationError"
        for _ in range(3):
            await limiter.probe()

    with caplog.at_level(logging.WARNING, logger="consumer.sharedlimit"):
        asyncio.run(main())
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "until Redis answers again" in lines[0]
    assert "refuses the worker's credentials" in lines[1] and "restart the pods" in lines[1]


class StallingStore(ScriptedStore):
    """Times out (Redis busy past REDIS_TIMEOUT_SECONDS) the calls numbered in `stalls`."""

    def __init__(self, stalls: set[int]) -> None:
        super().__init__()
        self.stalls = stalls

    async def gcra(self, key: str, **kwargs: Any) -> tuple[int, float]:
        self.calls.append({"key": key, **kwargs})
        if len(self.calls) in self.stalls:
            raise SharedStateUnavailable("redis gcra failed: TimeoutError", timed_out=True)
        return 1, 0.0


def test_one_timed_out_call_among_answers_is_asked_again_two_in_a_row_fall_back() -> None:
    """Review "slow55": one gcra call timing out switched to the fallback, and the return
    held every replica off the shared budget for 2.5 s: a Redis stalling 0.35 s every 5 s
    made delivery 2.7 times slower than a Redis that is down. Asked again at once, one
    stall costs one call; two in a row are a Redis away: the fallback, as before."""
    store, switches = StallingStore({2}), list[bool]()
    limiter = _limiter(store, switches)

    async def main(acquires: int) -> None:
        for _ in range(acquires):
            await limiter.acquire()

    asyncio.run(main(3))
    assert switches == [] and not limiter.on_fallback
    assert len(store.calls) == 4  # the stalled one asked again

    store, switches = StallingStore({2, 3}), list[bool]()
    limiter = _limiter(store, switches)
    asyncio.run(main(2))
    assert switches == [True] and limiter.on_fallback
