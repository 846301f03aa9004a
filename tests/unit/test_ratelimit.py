"""Unit tests for consumer.ratelimit: GCRA reservations against a fake clock."""

from __future__ import annotations

import asyncio
import itertools
import random

import pytest

from consumer.ratelimit import (
    AdaptiveLimiter,
    jitter_slack,
    partition_share,
    safe_rate,
)
from tests.rolling import max_in_window


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now



def simulate(limiter: AdaptiveLimiter, clock: FakeClock, count: int, *,
             gaps: random.Random | None = None) -> list[float]:
    """Callers reserve; each sends at now + wait. Optional random idle gaps between callers."""
    sends = []
    for _ in range(count):
        if gaps is not None and gaps.random() < 0.3:
            clock.now += gaps.expovariate(1.0) * 5
        sends.append(clock.now + limiter.reserve())
    return sends


def test_safe_rate() -> None:
    # Paced over the period plus the jitter slack: 0.3 s of a minute.
    assert safe_rate(600, 60.0, 1) == pytest.approx(599 / 60.3)
    # A burst is capped at half the budget, and the burst is taken out of the rate.
    assert safe_rate(600, 60.0, 600) == pytest.approx(300 / 60.3)
    assert safe_rate(10, 1.0, 20) == pytest.approx(5 / 1.3)
    # A replica's share: its part of the limit minus its own burst.
    assert safe_rate(600, 60.0, 1, 0.5) == pytest.approx(299 / 60.3)
    assert safe_rate(600, 60.0, 1, 0.0) == 0.0


def test_a_tiny_share_still_sends() -> None:
    """Owning 1 of 1,000 partitions leaves under one request of budget after the burst: the
    replica sends at half its budget rather than never (review "mutate52": only a drain test
    caught its loss, indirectly)."""
    assert safe_rate(600, 60.0, 10, 0.001) > 0
    assert safe_rate(600, 60.0, 10, 0.001) <= 0.001 * 600 / 60


@pytest.mark.parametrize(("period", "slack"), [(60.0, 0.3), (600.0, 3.0), (5.0, 0.3),
                                               (1.0, 0.3)])
def test_jitter_slack_is_a_share_of_the_period_but_never_under_a_floor(
        period: float, slack: float) -> None:
    assert jitter_slack(period) == pytest.approx(slack)


def test_requests_delayed_by_up_to_the_slack_still_fit_every_window() -> None:
    """The reason for the slack: slots due on schedule but delivered late by a varying
    delay (network, a paused event loop) bunch up at the server, and must still fit."""
    limit, period = 100, 5.0
    clock = FakeClock()
    limiter = AdaptiveLimiter(limit, period, 1, clock=clock)
    rng = random.Random(7)
    due = []
    for _ in range(1000):
        due.append(clock.now + limiter.reserve())
        clock.now = max(clock.now, due[-1])
    slack = jitter_slack(period)
    arrivals = [t + rng.choice((0.0, slack)) for t in due]  # worst case: on time or late
    assert max_in_window(arrivals, period) <= limit


@pytest.mark.parametrize(("owned", "total", "share"), [
    (0, 12, 0.0), (3, 12, 0.25), (12, 12, 1.0), (13, 12, 1.0), (1, 0, 0.0), (-1, 4, 0.0),
])
def test_partition_share(owned: int, total: int, share: float) -> None:
    assert partition_share(owned, total) == share


@pytest.mark.parametrize(("limit", "period", "burst"), [
    (600, 60.0, 1), (600, 60.0, 10), (600, 60.0, 100), (600, 60.0, 600), (5, 1.0, 1),
    (5, 1.0, 5), (100, 10.0, 3),
])
def test_no_rolling_window_exceeds_the_limit(limit: int, period: float, burst: int) -> None:
    clock = FakeClock()
    limiter = AdaptiveLimiter(limit, period, burst, clock=clock)
    back_to_back = simulate(limiter, clock, 5000)
    assert max_in_window(back_to_back, period) <= limit
    clock2 = FakeClock()
    limiter2 = AdaptiveLimiter(limit, period, burst, clock=clock2)
    with_idle = simulate(limiter2, clock2, 5000, gaps=random.Random(limit + burst))
    assert max_in_window(with_idle, period) <= limit


def test_sustained_rate_uses_almost_all_of_the_limit() -> None:
    clock = FakeClock()
    limiter = AdaptiveLimiter(600, 60.0, 1, clock=clock)
    sends = simulate(limiter, clock, 5000)
    # 5,000 requests at ~596.0/min take ~503 s: not over-throttled.
    assert sends[-1] - sends[0] == pytest.approx(4999 / safe_rate(600, 60.0, 1))
    assert max_in_window(sends, 60.0) >= 590


def test_sends_are_in_arrival_order() -> None:
    clock = FakeClock()
    limiter = AdaptiveLimiter(600, 60.0, 5, clock=clock)
    sends = simulate(limiter, clock, 200)
    assert sends == sorted(sends)


@pytest.mark.parametrize("burst", [1, 5, 50])
def test_burst_goes_at_once_then_paces(burst: int) -> None:
    clock = FakeClock()
    limiter = AdaptiveLimiter(600, 60.0, burst, clock=clock)
    waits = [limiter.reserve() for _ in range(burst + 3)]
    assert waits[:burst] == [0.0] * burst
    interval = 1 / safe_rate(600, 60.0, burst)
    assert waits[burst:] == pytest.approx([interval, 2 * interval, 3 * interval])


def test_idle_time_refills_the_burst_but_not_beyond() -> None:
    clock = FakeClock()
    limiter = AdaptiveLimiter(600, 60.0, 4, clock=clock)
    for _ in range(4):
        limiter.reserve()
    clock.now += 3600
    waits = [limiter.reserve() for _ in range(5)]
    assert waits[:4] == pytest.approx([0.0] * 4, abs=1e-9)
    assert waits[4] > 0


@pytest.mark.parametrize("share", [1.0, 0.5, 0.25, 0.1])
def test_share_scales_the_rate(share: float) -> None:
    clock = FakeClock()
    limiter = AdaptiveLimiter(600, 60.0, 1, clock=clock)
    limiter.set_share(share)
    assert limiter.rate == pytest.approx(safe_rate(600, 60.0, 1, share))
    assert limiter.rate <= safe_rate(600, 60.0, 1) * share
    sends = simulate(limiter, clock, 1000)
    assert (sends[-1] - sends[0]) == pytest.approx(999 / limiter.rate)
    assert max_in_window(sends, 60.0) <= 600 * share + 1


@pytest.mark.parametrize(("raw", "effective"), [(-1.0, 0.0), (2.0, 1.0), (0.3, 0.3)])
def test_share_is_clamped(raw: float, effective: float) -> None:
    limiter = AdaptiveLimiter(600, 60.0, clock=FakeClock())
    limiter.set_share(raw)
    assert limiter.rate == pytest.approx(safe_rate(600, 60.0, 1, effective))


@pytest.mark.parametrize(("shares", "burst"), [
    ((0.5, 0.5), 1), ((0.25, 0.75), 1), ((0.5, 0.5), 20), ((0.25, 0.25, 0.5), 30),
    ((0.5, 0.5), 600), ((0.1,) * 10, 100),
])
def test_replicas_with_shares_stay_under_the_shared_limit(
    shares: tuple[float, ...], burst: int
) -> None:
    """Replicas never talk; together they must still respect the token's limit."""
    all_sends: list[float] = []
    for share in shares:
        clock = FakeClock()
        limiter = AdaptiveLimiter(600, 60.0, burst, clock=clock)
        limiter.set_share(share)
        all_sends += simulate(limiter, clock, int(3000 * share))
    assert max_in_window(all_sends, 60.0) <= 600


def test_burst_is_scaled_by_the_share() -> None:
    clock = FakeClock()
    limiter = AdaptiveLimiter(600, 60.0, 20, clock=clock)
    limiter.set_share(0.25)
    clock.now += 60  # a new share's burst comes back as the replica idles (below)
    waits = [limiter.reserve() for _ in range(6)]
    assert waits[:5] == [0.0] * 5
    assert waits[5] > 0


@pytest.mark.parametrize("burst", [10, 25, 50])
def test_a_rebalance_after_a_burst_stays_within_the_limit(burst: int) -> None:
    """Review "budget52": without Redis, the first replica (all partitions) spent its burst;
    at the rebalance two newcomers started with theirs full while the first's was still in
    the window: 59 requests in a 5 s window of 50. A changed share starts with its burst
    spent, so every window spanning the rebalance holds the limit; the same holds when a
    replica leaves and the others' shares (and bursts) grow."""
    limit, period = 50, 5.0
    clock = FakeClock()
    first = AdaptiveLimiter(limit, period, burst, clock=clock)
    first.set_share(0.05)  # the worker's share until the first partition count
    first.set_share(1.0)
    clock.now += period  # idle: its whole burst is back
    sends: list[float] = []
    while first.peek() == 0.0:  # it spends all of it (a slot is booked only when due)
        sends.append(clock.now + first.reserve())
    assert len(sends) > 1
    clock.now += 0.5
    joined = [AdaptiveLimiter(limit, period, burst, clock=clock) for _ in range(2)]
    replicas = [first, *joined]
    for limiter in joined:
        limiter.set_share(0.05)
    for limiter in replicas:
        limiter.set_share(1 / 3)
    for step in range(400):  # each replica sends as fast as its limiter lets it
        clock.now += 0.05
        if step == 200:  # one leaves: the others' shares grow
            replicas.pop()
            for limiter in replicas:
                limiter.set_share(1 / 2)
        for limiter in replicas:
            while limiter.peek() == 0.0:
                sends.append(clock.now + limiter.reserve())
    assert max_in_window(sends, period) <= limit
    assert len(sends) > 2 * limit, "they went on sending"


def test_setting_the_same_share_again_keeps_the_burst() -> None:
    """The worker sets the share again at every partition count: an unchanged one must not
    spend the burst each time."""
    clock = FakeClock()
    limiter = AdaptiveLimiter(600, 60.0, 20, clock=clock)
    limiter.set_share(0.5)
    clock.now += 60
    limiter.set_share(0.5)
    assert [limiter.reserve() for _ in range(10)] == [0.0] * 10


def test_share_zero_sends_nothing_and_consumes_nothing() -> None:
    clock = FakeClock()
    limiter = AdaptiveLimiter(600, 60.0, 1, clock=clock)
    limiter.set_share(0.0)
    assert limiter.rate == 0.0
    assert [limiter.reserve() for _ in range(3)] == [1.0, 1.0, 1.0]
    limiter.set_share(1.0)
    assert limiter.reserve() == 0.0


def test_slow_down_halves_once_per_recovery_period_down_to_the_floor() -> None:
    clock = FakeClock()
    limiter = AdaptiveLimiter(600, 60.0, clock=clock, min_factor=0.1, recover_every_s=10.0)
    full = limiter.rate
    limiter.slow_down()
    assert limiter.rate == pytest.approx(full / 2)
    clock.now += 9.9
    limiter.slow_down()  # the same overload (requests sent before the cut), not a new one
    assert limiter.rate == pytest.approx(full / 2)
    clock.now += 0.1
    limiter.slow_down()
    assert limiter.rate == pytest.approx(full / 4)
    for _ in range(20):  # 429s every 5 s: a cut every 10 s, no growth between
        clock.now += 5.0
        limiter.slow_down()
    assert limiter.rate == pytest.approx(full * 0.1)


def test_a_short_spell_of_429s_costs_two_halvings_and_forty_seconds_after_it() -> None:
    """Halved once a second, 15 s of 429s cut the rate to its 5 % floor, and +5 % every
    10 s took ~200 s back to the limit (review "recovery21")."""
    clock = FakeClock()
    limiter = AdaptiveLimiter(600, 60.0, clock=clock)
    full = limiter.rate
    for _ in range(150):  # a 429 every 0.1 s for 15 s
        limiter.slow_down()
        clock.now += 0.1
    assert limiter.rate == pytest.approx(full / 4)
    clock.now += 30.0  # three clean periods after the last 429: 0.25 x 1.5^3
    limiter.reserve()
    assert limiter.rate == pytest.approx(full * 0.84375)
    clock.now += 10.0
    limiter.reserve()
    assert limiter.rate == pytest.approx(full)


def test_a_429_after_the_rate_recovered_halves_it_again() -> None:
    clock = FakeClock()
    limiter = AdaptiveLimiter(600, 60.0, clock=clock, recover_every_s=10.0)
    full = limiter.rate
    limiter.slow_down()
    clock.now += 25.0  # grown twice: 0.5 x 1.5 x 1.5, capped at the limit
    assert limiter.factor_at(clock.now) == 1.0
    limiter.slow_down()
    assert limiter.rate == pytest.approx(full / 2)


def test_share_rate_shows_the_recovery_without_waiting_for_a_request() -> None:
    """The gauge kept the halved rate after a 429 until the next 429 or rebalance,
    although the limiter had recovered."""
    clock = FakeClock()
    limiter = AdaptiveLimiter(600, 60.0, clock=clock, recover_ratio=1.5, recover_every_s=10.0)
    limiter.set_share(0.5)
    full = safe_rate(600, 60.0, 1, 0.5)
    assert limiter.share_rate == pytest.approx(full)
    limiter.slow_down()
    assert limiter.share_rate == pytest.approx(full * 0.5)
    clock.now += 10.0  # no request meanwhile
    assert limiter.share_rate == pytest.approx(full * 0.75)
    assert limiter.share_rate == pytest.approx(full * 0.75)  # a read changes nothing
    clock.now += 1000.0
    assert limiter.share_rate == pytest.approx(full)
    limiter.reserve()
    assert limiter.rate == pytest.approx(full)


def test_recover_restores_the_rate_over_time() -> None:
    clock = FakeClock()
    limiter = AdaptiveLimiter(600, 60.0, clock=clock, min_factor=0.1, recover_ratio=1.5,
                              recover_every_s=10.0)
    full = limiter.rate
    for _ in range(5):  # 429s 5 s apart: cut at 0, 10 and 20 s
        limiter.slow_down()
        clock.now += 5.0
    clock.now -= 5.0
    assert limiter.rate == pytest.approx(full * 0.125)
    clock.now += 9.9
    limiter.reserve()
    assert limiter.rate == pytest.approx(full * 0.125)
    clock.now += 0.1
    limiter.reserve()
    assert limiter.rate == pytest.approx(full * 0.1875)
    clock.now += 25.0
    limiter.reserve()
    assert limiter.rate == pytest.approx(full * 0.421875)
    clock.now += 1000.0
    limiter.reserve()
    assert limiter.rate == pytest.approx(full)


def test_slowed_limiter_paces_at_the_lower_rate() -> None:
    clock = FakeClock()
    limiter = AdaptiveLimiter(600, 60.0, clock=clock)
    limiter.reserve()
    limiter.slow_down()
    waits = [limiter.reserve() for _ in range(3)]
    slow_interval = 1 / (safe_rate(600, 60.0, 1) / 2)
    assert waits[2] - waits[1] == pytest.approx(slow_interval)


class FakeSleep:
    """asyncio.sleep stand-in that moves the fake clock instead of waiting."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.slept: list[float] = []
        self.real = asyncio.sleep

    async def __call__(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.clock.now += seconds
        await self.real(0)


def test_acquire_waits_the_reserved_time(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    sleep = FakeSleep(clock)
    monkeypatch.setattr(asyncio, "sleep", sleep)
    limiter = AdaptiveLimiter(600, 60.0, 1, clock=clock)

    async def main() -> list[float]:
        return [await limiter.acquire() for _ in range(3)]

    waited = asyncio.run(main())
    interval = 1 / safe_rate(600, 60.0, 1)
    assert waited == pytest.approx([0.0, interval, interval])
    assert sleep.slept == pytest.approx([interval, interval])


def test_concurrent_acquires_are_served_in_order_one_slot_apart(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = FakeClock()
    monkeypatch.setattr(asyncio, "sleep", FakeSleep(clock))
    limiter = AdaptiveLimiter(600, 60.0, 1, clock=clock)
    sent: list[tuple[int, float]] = []

    async def caller(i: int) -> None:
        await limiter.acquire()
        sent.append((i, clock.now))

    async def main() -> None:
        await asyncio.gather(*(caller(i) for i in range(5)))

    asyncio.run(main())
    interval = 1 / safe_rate(600, 60.0, 1)
    assert [i for i, _ in sent] == [0, 1, 2, 3, 4]
    times = [t for _, t in sent]
    assert [b - a for a, b in itertools.pairwise(times)] == pytest.approx(
        [interval] * 4)


def test_slow_down_applies_to_the_very_next_acquire(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(asyncio, "sleep", FakeSleep(clock))
    limiter = AdaptiveLimiter(600, 60.0, 1, clock=clock)

    async def main() -> list[float]:
        first = [await limiter.acquire() for _ in range(2)]
        limiter.slow_down()
        return [*first, await limiter.acquire(), await limiter.acquire()]

    waited = asyncio.run(main())
    interval = 1 / safe_rate(600, 60.0, 1)
    # The slot booked before the cut still uses the old interval; the next one is doubled.
    assert waited == pytest.approx([0.0, interval, interval, 2 * interval])


def test_acquire_with_share_zero_rechecks_until_a_share_arrives(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = FakeClock()
    sleep = FakeSleep(clock)
    monkeypatch.setattr(asyncio, "sleep", sleep)
    limiter = AdaptiveLimiter(600, 60.0, clock=clock)
    limiter.set_share(0.0)

    async def main() -> float:
        task = asyncio.get_running_loop().create_task(limiter.acquire())
        while len(sleep.slept) < 3:
            await sleep.real(0)
        limiter.set_share(1.0)
        return await task

    waited = asyncio.run(main())
    assert sleep.slept[:3] == [1.0, 1.0, 1.0]
    assert 3.0 <= waited <= 4.0


def test_peek_does_not_reserve() -> None:
    clock = FakeClock()
    limiter = AdaptiveLimiter(60, 60.0, 1, clock=clock)
    assert limiter.peek() == 0.0
    assert limiter.peek() == 0.0
    assert limiter.reserve() == 0.0
    assert limiter.peek() == pytest.approx(1.0 / limiter.rate)


def test_hold_starts_full_after_the_delay_without_burst() -> None:
    clock = FakeClock()
    limiter = AdaptiveLimiter(600, 60.0, 10, clock=clock)
    interval = 1.0 / limiter.rate
    limiter.hold(2.0)
    sends = simulate(limiter, clock, 50)
    assert sends[0] == pytest.approx(clock.now + 2.0 + interval)
    # No burst on top: every send is one interval after the previous one.
    assert all(b - a == pytest.approx(interval) for a, b in itertools.pairwise(sends))


def test_factor_follows_slow_down_and_recovers() -> None:
    clock = FakeClock()
    limiter = AdaptiveLimiter(600, 60.0, 1, clock=clock, recover_every_s=10.0)
    limiter.slow_down()
    assert limiter.factor == 0.5
    clock.now += 10.0
    assert limiter.factor == pytest.approx(0.75)


# ---------------------------------------------------------------------------- priority lane


def test_priority_lane_serves_urgent_callers_first_then_in_arrival_order() -> None:
    from consumer.ratelimit import PriorityLane

    class Slots:
        """A limiter that grants one slot each time the test releases one."""

        def __init__(self) -> None:
            self.free: asyncio.Queue[None] = asyncio.Queue()
            self.granted = 0

        async def acquire(self, want: int = 1) -> float:
            await self.free.get()
            self.granted += 1
            return 0.0

    async def main() -> tuple[list[str], int]:
        slots = Slots()
        lane = PriorityLane(slots)
        order: list[str] = []

        async def caller(name: str, urgent: bool) -> None:
            await lane.acquire(urgent)
            order.append(name)

        tasks = [asyncio.create_task(caller(n, n.startswith("U"))) for n in ("a", "b", "U1")]
        await asyncio.sleep(0)
        late = asyncio.create_task(caller("U2", True))
        gone = asyncio.create_task(caller("c", False))
        await asyncio.sleep(0)
        gone.cancel()  # a caller that leaves the queue gets no slot
        for _ in range(4):
            slots.free.put_nowait(None)
            await asyncio.sleep(0.01)
        await asyncio.gather(*tasks, late)
        return order, slots.granted

    order, granted = asyncio.run(main())
    assert order == ["U1", "U2", "a", "b"]
    assert granted == 4, "one limiter slot per caller served: the budget is the limiter's"


class _Slots:
    """A limiter whose slots the test hands out one at a time (`free`)."""

    def __init__(self) -> None:
        self.free: asyncio.Queue[None] = asyncio.Queue()

    async def acquire(self, want: int = 1) -> float:
        await self.free.get()
        return 0.0


def test_a_waiter_that_left_the_head_of_the_lane_does_not_stop_its_pump() -> None:
    """Review "mutate52": a waiter that gives up (a gate cut, a revoke, a shutdown) leaves
    its cancelled future in the queue; the next slot granted to it raised in the pump, which
    died, and every other waiter hung until a new caller started one."""
    from consumer.ratelimit import PriorityLane

    async def main() -> list[str]:
        slots = _Slots()
        lane = PriorityLane(slots)
        served: list[str] = []

        async def caller(name: str, order: int) -> None:
            await lane.acquire(False, order)
            served.append(name)

        first = asyncio.create_task(caller("first", 1))
        rest = [asyncio.create_task(caller(n, o)) for n, o in (("second", 2), ("third", 3))]
        await asyncio.sleep(0.01)  # all three queued, the pump waiting for a slot
        first.cancel()
        await asyncio.sleep(0.01)
        for _ in range(2):
            slots.free.put_nowait(None)
        await asyncio.wait_for(asyncio.gather(*rest), 2)
        return served

    assert asyncio.run(main()) == ["second", "third"]


def test_priority_lane_serves_same_urgency_waiters_lowest_order_first() -> None:
    # The committable offset is the lowest unfinished one: an event that reached the lane
    # late (a schema fetch, a retry) but was taken first is served first.
    from consumer.ratelimit import PriorityLane

    async def main() -> list[str]:
        slots = _Slots()
        lane = PriorityLane(slots)
        served: list[str] = []

        async def caller(name: str, order: int, urgent: bool = False) -> None:
            await lane.acquire(urgent, order)
            served.append(name)

        arrivals = [("late-5", 5), ("late-7", 7), ("first-1", 1), ("same-5", 5)]
        tasks = [asyncio.create_task(caller(n, o)) for n, o in arrivals]
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(caller("urgent-9", 9, urgent=True)))
        await asyncio.sleep(0)
        for _ in range(5):
            slots.free.put_nowait(None)
            await asyncio.sleep(0.01)
        await asyncio.gather(*tasks)
        return served

    assert asyncio.run(main()) == ["urgent-9", "first-1", "late-5", "same-5", "late-7"]


@pytest.mark.parametrize("burst", [10, 20, 300])
def test_a_429_releases_no_burst_at_once(burst: int) -> None:
    """The burst's tolerance stays the full rate's: a 429 doubling the interval doubled it,
    and a sender flat out had (burst - 1) / 2 slots due the instant Userpilot said "too
    many" (review "rate42")."""
    clock = FakeClock(1000.0)
    limiter = AdaptiveLimiter(600, 60.0, burst, clock=clock)
    while clock.now < 1010.0:  # saturated for 10 s: callers take every slot
        clock.now += limiter.reserve()
    limiter.slow_down()
    at_once = 0
    while limiter.reserve() == 0.0:
        at_once += 1
    assert at_once <= 1, f"{at_once} requests released at the instant of the 429"


@pytest.mark.parametrize("burst", [150, 300])
def test_a_spell_of_429s_keeps_every_window_within_the_limit(burst: int) -> None:
    """Another sender on the token: a 429 every 5 s for 90 s, then recovery. Every rolling
    60 s stays within 600, and recovery brings no silence longer than a slowed interval."""
    clock = FakeClock(1000.0)
    limiter = AdaptiveLimiter(600, 60.0, burst, clock=clock)
    sends: list[float] = []
    next_429 = 1010.0
    while clock.now < 1300.0:
        if next_429 <= clock.now < 1100.0:
            limiter.slow_down()
            next_429 += 5.0
        clock.now += limiter.reserve()
        sends.append(clock.now)
    assert max_in_window(sends, 60.0) <= 600
    gaps = [b - a for a, b in itertools.pairwise(sends)]
    assert max(gaps) < 5.0, f"silent for {max(gaps):.1f} s"
