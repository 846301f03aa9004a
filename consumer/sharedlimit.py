"""One exact budget per token and endpoint family, shared by every replica through Redis.

Why: the partition share (`consumer.ratelimit`) holds a replica with a hot partition to its
share while the others' shares go unused. Here every replica reserves slots from one GCRA
kept in Redis (`RedisStore.gcra`, one atomic script on Redis's clock), so N replicas
together send at most ``rate × T + burst ≤ limit`` requests in any window T of the period,
whatever the key skew, and any replica may use what the others leave.

Redis unreachable → at once the local limiter at the partition share, and back when Redis
answers again. Neither switch may exceed the limit:

- Into the fallback (at t0): Redis slots are reserved at most `lookahead` ahead, so every
  shared-budget send happens before t0 + lookahead. The local limiter starts *full* after
  that (`AdaptiveLimiter.hold`): in a window spanning the switch the shared part is at most
  ``r·x + burst`` and the local parts at most ``Σ rᵢ·(P − x) ≤ r·(P − x)``.
- Back to Redis (at t1): the replica adds its local sends of the last period to the shared
  budget as debt and holds every replica off for `holdoff` (longer than one probe interval
  plus the timeout), so the other replicas still on the fallback come back and add theirs
  before anyone draws again. A Redis that lost its data (or a flushed or evicted key)
  starts full with every slot that may be reserved ahead counted as spent (see the script).

While on the fallback a replica probes Redis at most every `probe_every_s`, and never
sleeps for a local slot past a due probe.

Not covered (documented): a network partition in which some replicas reach Redis and
others do not: those on the fallback add their shares on top; Userpilot's 429 then slows
them (`slow_down`). Nor a group whose replicas differ in having REDIS_URL (a rolling upgrade
that turns Redis on or off): the README says to scale to 0 for that change.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Protocol

from consumer.errors import SharedStateUnavailable
from consumer.ratelimit import AdaptiveLimiter, effective_burst, safe_rate

__all__ = ["ALL_FAMILIES", "BudgetStore", "SharedLimiter", "budget_key"]

log = logging.getLogger(__name__)
_RESTART_TO_REREAD = ("REDIS_URL is read at start-up: after rotating its password or user, "
                      "restart the pods")

ALL_FAMILIES = "all"
"""The family name when every endpoint shares one budget (USERPILOT_RATE_LIMIT_SHARED)."""
LOOKAHEAD_SLOTS = 10
HELD_SLACK_S = 0.005
"""How late a slot reserved ahead may still be sent (the event loop's wake-up)."""
LOCAL_SEND_BUCKETS = 1024
"""Buckets the debt span is counted in while on the fallback (memory: at most this many)."""
BUDGET_IDLE_TTL_S = 3600.0
"""How long an idle budget key is kept. A missing key costs the first request up to
`lookahead` + one interval (its history is unknown, see `redisstore.GCRA_LUA`), so the key
outlives a quiet hour rather than expiring one period after the last request."""


class BudgetStore(Protocol):
    """What the limiter needs from Redis (`consumer.redisstore.RedisStore`)."""

    @property
    def timeout_s(self) -> float: ...

    async def gcra(
        self, key: str, *, interval_us: int, tolerance_us: int, lookahead_us: int,
        debt: int = 0, debt_key: str | None = None, holdoff_us: int = 0, idle_ttl_ms: int,
        span_us: int = 0, reserve: bool = True, base_interval_us: int = 0, count: int = 1,
    ) -> tuple[int, float]: ...


def budget_key(token_digest: str, family: str) -> str:
    """The Redis key of one token's budget for one endpoint family (never the token)."""
    return f"userpilot:rl:{family}:{token_digest}"


class SharedLimiter:
    """``acquire`` / ``slow_down`` / ``set_share`` / ``rate`` like `AdaptiveLimiter`.

    ``on_fallback(active)`` is called on every switch (for the gauge, counter and log).
    """

    def __init__(
        self, store: BudgetStore, key: str, limit: int, period_s: float, burst: int = 1, *,
        fallback: AdaptiveLimiter | None = None,
        probe_every_s: float = 1.0,
        on_fallback: Callable[[bool], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        name: str = "",
    ) -> None:
        self._store = store
        self._key = key
        # Named in its lines: the track and identify budgets switched together, and two
        # identical lines said nothing of which was which (review "night53").
        self._named = f" ({name})" if name else ""
        self._limit = limit
        self._period = period_s
        self._burst = effective_burst(limit, burst, 1.0)
        self._local = fallback or AdaptiveLimiter(limit, period_s, burst, clock=clock)
        self._probe_every = probe_every_s
        self._on_fallback = on_fallback
        self._clock = clock
        self._fallback_since: float | None = None
        self._refusal_told = False  # this fallback episode's line named Redis's refusal
        self._debt_key = ""
        self._next_probe = 0.0
        self._asked = clock()  # when Redis was last asked (`probe` asks an idle one too)
        # Requests sent on the fallback, counted in buckets of a 1024th of the debt span
        # ([first send, count, last send], oldest first): one float per request held a
        # period's worth, 13 MB an hour and past the chart's memory in a day-long outage
        # at the largest rate (review "leak44"). A bucket partly past the span counts
        # whole: the debt is at most a bucket's requests over, never under.
        self._local_sends: deque[list[float]] = deque()
        self._local_count = 0
        self._lock: asyncio.Lock | None = None
        # Slots Redis reserved in one call beyond the first (`acquire`'s `want`), as local
        # send times, oldest first; and how long the last reservation took.
        self._held: deque[float] = deque()
        self._round_trip = 0.0
        self._callers = 0  # in `acquire`: Track's requests call it directly, one each

    @property
    def local(self) -> AdaptiveLimiter:
        """The partition-share limiter used while Redis is unreachable."""
        return self._local

    @property
    def on_fallback(self) -> bool:
        return self._fallback_since is not None

    @property
    def rate(self) -> float:
        """Requests per second this replica may use now: the whole token's, or its share."""
        if self.on_fallback:
            return self._local.rate
        return safe_rate(self._limit, self._period, self._burst) * self._local.factor

    @property
    def share_rate(self) -> float:
        """This replica's share of the token's rate (the gauge): on the fallback the
        partition share it uses; on the shared budget, where any replica may take up to
        all of it, the same partition share of the token's rate, so the replicas' figures
        add up to the token's limit instead of N times it. 429 recovery included."""
        if self.on_fallback:
            return self._local.share_rate
        return (safe_rate(self._limit, self._period, self._burst) * self._local.share
                * self._local.factor_at(self._clock()))

    @property
    def interval_s(self) -> float:
        rate = safe_rate(self._limit, self._period, self._burst) * self._local.factor
        return 1.0 / rate

    @property
    def lookahead_s(self) -> float:
        """How far ahead a Redis slot may be reserved (bounds the switch to the fallback).

        Never under one interval (slowed by 429s to 20 base intervals, it was over the 10 of
        the look-ahead) nor one µs (the schedule's resolution): shorter, no slot was ever
        near enough to reserve, and past ~2e7 requests a second a ready worker sent
        nothing (review "config40"). The store applies the same floor; here it also sets
        the fallback's hold and the debt span, so both sides keep one promise (review
        "diff40")."""
        return max(LOOKAHEAD_SLOTS * safe_rate(self._limit, self._period, self._burst) ** -1,
                   self.interval_s, 1e-6)

    @property
    def holdoff_s(self) -> float:
        """How long a replica coming back holds every replica off the shared budget."""
        return 2 * self._probe_every + 2 * self._store.timeout_s

    def set_share(self, share: float) -> None:
        """The partition share, used only on the fallback."""
        self._local.set_share(share)

    def slow_down(self) -> None:
        """Userpilot said 429: this replica's requests take twice the budget (AIMD). Slots
        reserved ahead at the old pace are let go (spent, never exceeded)."""
        self._local.slow_down()
        self._held.clear()

    async def acquire(self, want: int = 1) -> float:
        """Wait for a slot; returns the seconds waited. One caller at a time reserves.

        `want`: how many slots the caller's waiters need now. Reserved one per Redis call,
        a replica sent at most one request per round trip: 6.5 a second at 150 ms against
        the default 10, a fifth of a raised limit at 50 ms (review "redis48"). When the last
        call took more than a quarter of an interval, one call reserves up to `want` slots
        in a row (at most the look-ahead's), handed out by the next calls here; callers
        waiting here count as wanting one each."""
        start = self._clock()
        self._callers += 1
        try:
            return await self._acquire(start, max(want, self._callers))
        finally:
            self._callers -= 1

    async def _acquire(self, start: float, want: int) -> float:
        async with self._reserving():
            while True:
                # A slot passed (by more than a loop's wake-up): spent in Redis's schedule at
                # its time, sent now it would fall beside the other replicas' fresh slots (no
                # caller came for it: an idle spell, callers gone). Up to a round trip late,
                # 21 requests fell in a window of 20 (review "diff48a").
                stale = self._clock() - HELD_SLACK_S
                while self._held and self._held[0] < stale:
                    self._held.popleft()
                if self._held:
                    wait = self._held.popleft() - self._clock()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    return self._clock() - start
                now = self._clock()
                if not self.on_fallback or now >= self._next_probe:
                    interval = self.interval_s
                    count = (1 if self._round_trip * 4 <= interval
                             else max(1, min(want, LOOKAHEAD_SLOTS)))
                    delay = await self._try_shared(count=count)
                    if delay is not None:
                        reserved, seconds = delay
                        first = self._clock() + seconds
                        self._held.extend(first + i * interval for i in range(1, reserved))
                        if seconds > 0:
                            await asyncio.sleep(seconds)
                        if reserved:
                            return self._clock() - start
                        continue
                wait = self._local.peek()
                until_probe = max(0.0, self._next_probe - self._clock())
                if self._local.rate <= 0 or wait > until_probe:
                    await asyncio.sleep(max(0.001, min(wait, until_probe)))
                    continue
                wait = self._local.reserve()
                if wait > 0:
                    await asyncio.sleep(wait)
                self._count_local_send()
                return self._clock() - start

    async def probe(self) -> None:
        """On the fallback and due for a probe, with nothing waiting to send: ask Redis
        whether it answers again, reserving nothing (the way back's debt and hold-off
        apply as in `acquire`). Leaving the fallback only when a request came left a
        family without traffic on it for good after Redis was back: its gauge said
        "unreachable", and the alert fired against a healthy Redis (review "soak18")."""
        lock = self._reserving()
        if not self._probe_due() or lock.locked():
            return
        async with lock:
            if self._probe_due():
                await self._try_shared(reserve=False)

    def _probe_due(self) -> bool:
        """On the fallback: its next probe is due. On the shared budget: Redis was not
        asked for `probe_every_s` (nothing to send). A replica started while Redis was down,
        or idle when it went down, said nothing and showed no fallback for as long as it
        had no traffic: the alert stayed silent (review "ops35")."""
        now = self._clock()
        if self.on_fallback:
            return now >= self._next_probe
        return now - self._asked >= self._probe_every

    def _reserving(self) -> asyncio.Lock:
        """One caller at a time reserves (made on first use, inside the event loop)."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    @property
    def _debt_span_s(self) -> float:
        """How far back the local requests a replica coming back owes are counted: a
        period and the look-ahead (what Redis fills with them before owing them ahead)."""
        return self._period + self.lookahead_s

    async def _try_shared(self, reserve: bool = True, count: int = 1
                          ) -> tuple[int, float] | None:
        """One Redis reservation of up to `count` slots; None when Redis failed (and we are
        on the fallback now)."""
        interval = self.interval_s
        # The bucket's capacity is the token's burst at the full rate, whatever this
        # replica's slow-down: a slowed replica's requests cost more, its burst not more.
        tolerance = (self._burst - 1) / safe_rate(self._limit, self._period, self._burst)
        returning = self.on_fallback
        debt = self._recent_local_sends() if returning else 0
        self._asked = asked = self._clock()
        for tries in (1, 2):
            try:
                reserved, seconds = await self._store.gcra(
                    self._key,
                    interval_us=round(interval * 1e6), tolerance_us=round(tolerance * 1e6),
                    lookahead_us=round(self.lookahead_s * 1e6), debt=debt,
                    debt_key=self._debt_key if returning else None,
                    holdoff_us=round(self.holdoff_s * 1e6) if returning else 0,
                    span_us=round(self._debt_span_s * 1e6) if returning else 0,
                    idle_ttl_ms=round(max(self._period + 1.0, BUDGET_IDLE_TTL_S) * 1000),
                    reserve=reserve,
                    base_interval_us=round(
                        1e6 / safe_rate(self._limit, self._period, self._burst)),
                    count=count,
                )
                break
            except SharedStateUnavailable as exc:
                # One call that timed out among answers is asked again at once: switched on
                # it, each of Redis' brief stalls cost the fallback's switch and the
                # return's hold-off of every replica (2.5 s), and delivery went 2.7 times
                # slower than with Redis down (review "slow55"). Taken twice if the first
                # was applied late: spent, never exceeded. A refusal switches at once.
                if tries == 1 and exc.timed_out and not returning:
                    continue
                self._enter_fallback(str(exc), refused=exc.refused)
                return None
        self._round_trip = self._clock() - asked
        if returning:
            self._leave_fallback(debt)
        return reserved, seconds

    def _count_local_send(self) -> None:
        now = self._clock()
        sends = self._local_sends
        if sends and now - sends[-1][0] < self._debt_span_s / LOCAL_SEND_BUCKETS:
            sends[-1][1] += 1
            sends[-1][2] = now
        else:
            sends.append([now, 1, now])
        self._local_count += 1

    def _recent_local_sends(self) -> int:
        horizon = self._clock() - self._debt_span_s
        sends = self._local_sends
        # Gone once its last send is: the span shrinks as a 429 slow-down recovers, and a
        # bucket as wide as the older span held sends still inside the new one (review
        # "diff44").
        while sends and sends[0][2] < horizon:
            self._local_count -= int(sends.popleft()[1])
        return self._local_count

    def _enter_fallback(self, detail: str, refused: bool = False) -> None:
        now = self._clock()
        self._next_probe = now + self._probe_every
        if self._fallback_since is not None:
            if refused and not self._refusal_told:
                # A refusal in an episode that began as an outage (Redis restarted with
                # the rotated password): told once, or the only line said "until Redis
                # answers again" (review "diff57").
                self._refusal_told = True
                log.warning("shared rate budget%s: Redis refuses the worker's credentials "
                            "now (%s): %s", self._named, detail, _RESTART_TO_REREAD)
            return
        self._refusal_told = refused
        self._fallback_since = now
        # Held slots lie within the look-ahead and could be used; let go, the switch's
        # proof above needs nothing new.
        self._held.clear()
        # One record per episode of this replica: its probes carry the running total.
        self._debt_key = f"{self._key}:debt:{uuid.uuid4().hex[:16]}"
        self._local.hold(self.lookahead_s)
        until = (f"until Redis takes the worker's credentials again ({_RESTART_TO_REREAD})"
                 if refused else "until Redis answers again")
        log.warning("shared rate budget%s unavailable (%s): using this replica's partition "
                    "share (%.2f req/s) %s", self._named, detail, self._local.rate, until)
        if self._on_fallback is not None:
            self._on_fallback(True)

    def _leave_fallback(self, debt: int) -> None:
        since = self._fallback_since or self._clock()
        self._fallback_since = None
        self._local_sends.clear()
        self._local_count = 0
        log.warning("shared rate budget%s back after %.1fs on the fallback (%d local "
                    "requests added to it)", self._named, self._clock() - since, debt)
        if self._on_fallback is not None:
            self._on_fallback(False)
