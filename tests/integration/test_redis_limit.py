"""The shared budget against a real redis-server: exact in every rolling window, any skew,
fallback when Redis stops mid-run without overshoot, and recovery.

Budgets are compressed (20 per 3 s; the 0.5 % jitter margin is then 15 ms) so each test
runs in seconds; the window check uses the times at which ``acquire`` returned (the moment
a request would be sent).
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from consumer.ratelimit import AdaptiveLimiter
from consumer.redisstore import RedisStore, token_digest
from consumer.sharedlimit import SharedLimiter, budget_key
from tests.integration.redis_fixtures import StoppableRedis

LIMIT = 20
PERIOD = 3.0


def max_in_window(times: list[float], period: float) -> int:
    """The most sends in any rolling window of ``period`` (closed at both ends)."""
    times = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while times[lo] < t - period:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


@pytest.fixture
def key() -> str:
    return budget_key(token_digest(f"token-{uuid.uuid4()}"), "track")


def _limiter(url: str, key: str, share: float, switches: list[bool] | None = None
             ) -> SharedLimiter:
    store = RedisStore(url, timeout_s=0.2)
    local = AdaptiveLimiter(LIMIT, PERIOD, 1)
    local.set_share(share)
    return SharedLimiter(store, key, LIMIT, PERIOD, 1, fallback=local, probe_every_s=0.5,
                         on_fallback=None if switches is None else switches.append)


async def _run(limiter: SharedLimiter, stop_at: float, sends: list[float],
               tasks: int = 4) -> None:
    async def one() -> None:
        while True:
            await limiter.acquire()
            now = time.monotonic()
            if now >= stop_at:
                return
            sends.append(now)

    await asyncio.gather(*(one() for _ in range(tasks)))


def test_many_clients_share_one_exact_budget(redis_url: str, key: str) -> None:
    async def main() -> list[list[float]]:
        limiters = [_limiter(redis_url, key, 1 / 5) for _ in range(5)]
        sends: list[list[float]] = [[] for _ in limiters]
        stop = time.monotonic() + 3 * PERIOD
        await asyncio.gather(*(_run(lim, stop, s) for lim, s in zip(limiters, sends,
                                                                       strict=True)))
        return sends

    sends = asyncio.run(main())
    everything = [t for s in sends for t in s]
    assert max_in_window(everything, PERIOD) <= LIMIT
    # Saturated: the window is nearly full (rate = (limit - burst) × 0.995 / period).
    assert len(everything) >= 0.9 * LIMIT * 3
    assert all(s for s in sends), "every client got slots"


def test_skewed_use_one_hot_client_takes_what_the_others_leave(redis_url: str,
                                                                key: str) -> None:
    async def main() -> tuple[list[float], list[float]]:
        hot, idle = _limiter(redis_url, key, 1 / 3), _limiter(redis_url, key, 1 / 3)
        hot_sends: list[float] = []
        idle_sends: list[float] = []
        stop = time.monotonic() + 3 * PERIOD

        async def trickle() -> None:
            while time.monotonic() < stop:
                await idle.acquire()
                idle_sends.append(time.monotonic())
                await asyncio.sleep(0.5)

        await asyncio.gather(_run(hot, stop, hot_sends, tasks=8), trickle())
        return hot_sends, idle_sends

    hot_sends, idle_sends = asyncio.run(main())
    assert max_in_window(hot_sends + idle_sends, PERIOD) <= LIMIT
    # The hot client gets far more than its partition share (1/3 of 20 per 2 s).
    assert len(hot_sends) >= 0.75 * LIMIT * 3
    assert idle_sends


@pytest.mark.parametrize("outage", ["killed", "frozen"])
def test_fallback_when_redis_stops_and_recovery_without_overshoot(
    stoppable_redis: StoppableRedis, key: str, outage: str
) -> None:
    """Redis goes away mid-run: killed and restarted empty (its state is lost, calls are
    refused), or frozen with SIGSTOP and resumed with its state (calls time out)."""
    down, up = ((stoppable_redis.stop, stoppable_redis.start) if outage == "killed"
                else (stoppable_redis.pause, stoppable_redis.resume))

    async def main() -> tuple[list[float], list[list[bool]], list[float]]:
        switches: list[list[bool]] = [[], [], []]
        limiters = [_limiter(stoppable_redis.url, key, 1 / 3, sw) for sw in switches]
        sends: list[float] = []
        marks: list[float] = []
        stop = time.monotonic() + 5 * PERIOD

        async def chaos() -> None:
            await asyncio.sleep(1.5 * PERIOD)
            marks.append(time.monotonic())
            await asyncio.to_thread(down)
            await asyncio.sleep(1.5 * PERIOD)
            await asyncio.to_thread(up)
            marks.append(time.monotonic())

        await asyncio.gather(chaos(), *(_run(lim, stop, sends, tasks=3) for lim in limiters))
        return sends, switches, marks

    sends, switches, marks = asyncio.run(main())
    assert max_in_window(sends, PERIOD) <= LIMIT
    assert all(sw == [True, False] for sw in switches), switches
    down_at, up_at = marks
    assert any(down_at + 0.5 < t < up_at for t in sends), "fallback kept sending"
    assert any(t > up_at + 1.0 for t in sends), "shared budget resumed"
