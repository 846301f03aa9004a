"""Client-side limiter for Userpilot's per-token limit, shared by the whole deployment.

GCRA with a reservation per request: a caller reserves the next emission slot and sleeps
until it, so waiting never blocks the poll loop (only the delivery task waits) and
callers are served in arrival order.

Userpilot counts requests in a rolling window per token, so the emission interval is set
so that no window can exceed the limit even with the burst and with jitter between the
moment a slot is due and the moment Userpilot counts the request (network latency that
varies, an event loop or a GC pause that releases due slots together):

    rate = (share × limit - burst) / (period + slack),  slack = max(0.5 % of period, 0.3 s)

Requests sent by the schedule over ``period + slack`` may then arrive within one ``period``
and still fit. A percentage alone left a compressed window (5 s in the tests) with half a
request of slack: 25 ms of jitter, which a loaded CI machine exceeded (429s seen).

Replicas share the token without talking to each other: each takes the share of the
limit proportional to the partitions it owns (`partition_share`), recomputed on every
rebalance. On 429 the rate halves, at most once per recovery period, and grows back by half
again each period without one.
"""

from __future__ import annotations

import asyncio
import contextvars
import heapq
import itertools
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

__all__ = [
    "AdaptiveLimiter",
    "PriorityLane",
    "effective_burst",
    "jitter_slack",
    "partition_share",
    "safe_rate",
]

JITTER_MARGIN = 0.005
"""Slack for arrival jitter, as a fraction of the period (0.3 s of a 60 s period)..."""
MIN_JITTER_S = 0.3
"""...and at least this much, whatever the period (what compressed test windows need)."""

EPSILON_S = 1e-9
"""Waits shorter than this are float rounding, not a slot in the future."""


def jitter_slack(period_s: float) -> float:
    """Seconds added to the period when pacing: bunched-up arrivals still fit the window."""
    return max(JITTER_MARGIN * period_s, MIN_JITTER_S)


def _due_in(tat: float, tolerance: float, now: float) -> float:
    """Seconds until the slot at `tat` (with the burst `tolerance`) may be used; 0 when it
    may be now, including waits that are only float rounding (n × interval against
    interval summed n times)."""
    wait = tat - tolerance - now
    return wait if wait > EPSILON_S else 0.0


def safe_rate(limit: int, period_s: float, burst: int, share: float = 1.0) -> float:
    """Requests per second for one replica owning `share` of the limit.

    A GCRA sender puts at most rate × T + burst requests in any window T. Each replica
    keeps its own burst inside its own share, so N replicas together stay within
    Σ (share_i × limit − burst) + N × burst = limit in every rolling window.
    """
    if share <= 0:
        return 0.0
    budget = share * limit
    usable = budget - effective_burst(limit, burst, share)
    if usable <= 0:  # a share of under two requests per period: best effort
        usable = budget * 0.5
    return usable / (period_s + jitter_slack(period_s))


def effective_burst(limit: int, burst: int, share: float = 1.0) -> int:
    """The burst a replica may use: its share of the token's burst, at most half its budget.

    Replicas' bursts then add up to at most the token's, and the rate formula in
    `safe_rate` subtracts exactly this burst, so every rolling window stays in the limit.
    """
    return max(1, min(int(burst * share), int(share * limit // 2)))


def partition_share(owned: int, total: int) -> float:
    """This replica's share of the token's limit: owned partitions ÷ all partitions."""
    if total <= 0 or owned <= 0:
        return 0.0
    return min(1.0, owned / total)


class AdaptiveLimiter:
    """Async GCRA limiter whose rate follows the partition share and 429 feedback."""

    def __init__(
        self,
        limit: int,
        period_s: float,
        burst: int = 1,
        *,
        clock: Callable[[], float] = time.monotonic,
        min_factor: float = 0.05,
        recover_ratio: float = 1.5,
        recover_every_s: float = 10.0,
    ) -> None:
        self._limit = limit
        self._period = period_s
        self._burst = burst
        self._clock = clock
        self._share = 1.0
        self._factor = 1.0
        self._min_factor = min_factor
        self._recover_ratio = recover_ratio
        self._recover_every = recover_every_s
        self._cut_at = -1e18  # the last halving: at most one per recovery period
        self._grown_at = -1e18  # where the recovery's periods are counted from
        self._tat = clock()
        self._lock: asyncio.Lock | None = None

    @property
    def rate(self) -> float:
        """Current requests per second for this replica (0 when it owns nothing)."""
        return safe_rate(self._limit, self._period, self._burst, self._share) * self._factor

    def set_share(self, share: float) -> None:
        """Take a new share of the deployment-wide limit (after a rebalance).

        A changed share starts with its burst spent: it comes back only as the replica
        idles. `safe_rate`'s sum holds for bursts spent under one set of shares; across a
        rebalance a replica's burst spent at its old share was still in the window when the
        newcomers spent theirs, full at start: 59 requests in a 5 s window of 50 (three
        replicas, burst 25, review "budget52"). Nothing changes at the default burst of 1."""
        share = max(0.0, min(1.0, share))
        if share == self._share:
            return
        self._share = share
        spacing = self._spacing()
        if spacing is not None:
            self._tat = max(self._tat, self._clock() + spacing[1])

    def slow_down(self) -> None:
        """Userpilot said 429: halve the rate, at most once per recovery period
        (`recover_every_s`); each whole period without a 429 grows it back by
        `recover_ratio`.

        Why once per period: the 429s of the next seconds answer requests sent before the
        cut, and Userpilot's window refuses until it refills whatever the rate now. Halved
        once a second, a 15 s spell of 429s (13 of them) cut the rate to its 5 % floor, and
        the additive recovery (+5 % every 10 s) took ~200 s back to the limit: half the
        token's budget unused for three minutes (review "recovery21"). Now that spell
        halves twice and the rate is back 40 s after it; a client sharing the token still
        finds its share (a cut every period while the 429s go on, no growth meanwhile)."""
        now = self._clock()
        self._recover(now)  # what the periods before this 429 earned
        self._grown_at = now  # growing needs a whole period without one
        if now - self._cut_at >= self._recover_every:
            self._factor = max(self._min_factor, self._factor / 2)
            self._cut_at = now

    def _recover(self, now: float) -> None:
        if self._factor < 1.0:
            steps = int((now - self._grown_at) // self._recover_every)
            if steps > 0:
                self._factor = self._grown(steps)
                self._grown_at += steps * self._recover_every

    def _grown(self, steps: int) -> float:
        if steps > 64:  # far past full; the power would overflow nothing but is pointless
            return 1.0
        return min(1.0, self._factor * self._recover_ratio ** steps)

    def factor_at(self, now: float) -> float:
        """The slow-down factor `now`, recovery included, without changing any state."""
        if self._factor >= 1.0:
            return self._factor
        return self._grown(max(0, int((now - self._grown_at) // self._recover_every)))

    @property
    def share(self) -> float:
        """This replica's share of the deployment-wide limit (its partitions' share)."""
        return self._share

    @property
    def share_rate(self) -> float:
        """Requests per second of this replica's share now, 429 recovery included (the
        gauge); reads only, so a stale slow-down never shows after it recovered."""
        return safe_rate(self._limit, self._period, self._burst, self._share) * self.factor_at(
            self._clock())

    @property
    def factor(self) -> float:
        """The 429 slow-down factor now (1.0 = full rate), after any recovery due."""
        self._recover(self._clock())
        return self._factor

    def peek(self) -> float:
        """Seconds until the next slot, without reserving it (0 when it is free now)."""
        now = self._clock()
        self._recover(now)
        spacing = self._spacing()
        if spacing is None:
            return 1.0
        return _due_in(max(self._tat, now), spacing[1], now)

    def hold(self, delay_s: float) -> None:
        """No slot before ``now + delay_s + one interval``, and no burst on top.

        For taking over from another limiter (the shared budget) whose requests may still
        fill the current window: starting with a full bucket keeps every window that spans
        the switch within the limit.
        """
        now = self._clock()
        spacing = self._spacing()
        if spacing is None:
            return
        interval, tolerance = spacing
        self._tat = max(self._tat, now + delay_s + interval + tolerance)

    def reserve(self) -> float:
        """Reserve the next slot; returns how many seconds to wait before sending."""
        now = self._clock()
        self._recover(now)
        spacing = self._spacing()
        if spacing is None:
            return 1.0  # own no partitions: nothing should be sending; re-check shortly
        interval, tolerance = spacing
        tat = max(self._tat, now)
        self._tat = tat + interval
        return _due_in(tat, tolerance, now)

    def _spacing(self) -> tuple[float, float] | None:
        """(interval at the current rate, burst tolerance) in seconds; None at rate 0.

        The tolerance is the burst's at the share's full rate, as `SharedLimiter`'s: at the
        slowed rate a 429 doubled it, and a sender flat out had half its burst due at once,
        the instant Userpilot said "too many" (one replica put 632-1,061 requests in a 60 s
        window through a spell of 429s at bursts of 150-300); recovering, it shrank, and
        the sender went silent for tens of seconds (review "rate42").
        """
        rate = self.rate
        if rate <= 0:
            return None
        full = safe_rate(self._limit, self._period, self._burst, self._share)
        return 1.0 / rate, (effective_burst(self._limit, self._burst, self._share) - 1) / full

    async def acquire(self, want: int = 1) -> float:
        """Wait for a slot; returns the seconds waited (for the limiter-wait metric). `want`
        (the caller's waiters) matters only to the shared budget (`SharedLimiter`).

        Callers queue on a lock and only the head reserves, so at most one slot is ever
        booked ahead: a new share or a 429 slow-down applies from the very next request.
        """
        if self._lock is None:
            self._lock = asyncio.Lock()
        start = self._clock()
        async with self._lock:
            while True:
                wait = self.reserve()
                if self.rate > 0:
                    if wait > 0:
                        await asyncio.sleep(wait)
                    return self._clock() - start
                await asyncio.sleep(wait)


class _Acquires(Protocol):
    def acquire(self, want: int = 1) -> Awaitable[float]: ...


class PriorityLane:
    """Hands one limiter's slots to its waiters, urgent ones first, then in intake order.

    Why: an identify *event* and the ensure-user identify in front of a user's Track share
    the identify budget. In plain arrival order, with the identify backlog saturating its
    limit, the ensure-user waits behind every queued identify event while the user's Tracks
    (another family, with budget to spare) wait behind it: measured, Track fell to 40-65 %
    of its limit. Urgent callers take the next slot instead; the budget itself is the
    limiter's, unchanged (every slot still comes from ``limiter.acquire``).

    Among waiters of the same urgency the lowest `order` goes first (the worker passes
    its intake sequence, so per partition the lowest offset): the committable offset is
    the lowest unfinished one, and an event served out of intake order (one that reached
    the lane late, after a schema fetch or a retry) holds the whole in-flight window
    while every later event finishes. Equal orders are served in arrival order.

    One pump task acquires a slot while anyone waits and gives it to the most urgent
    waiter still waiting; a slot whose waiter left meanwhile is wasted, never exceeded.
    """

    __slots__ = ("_clock", "_limiter", "_pump", "_seq", "_waiters")

    def __init__(self, limiter: _Acquires, clock: Callable[[], float] = time.monotonic) -> None:
        self._limiter = limiter
        self._clock = clock
        self._waiters: list[tuple[int, int, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self._pump: asyncio.Task[None] | None = None

    async def acquire(self, urgent: bool = False, order: int = 0) -> float:
        """Wait for a slot of the limiter (urgent first, then lowest `order`); returns the
        seconds waited."""
        start = self._clock()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (0 if urgent else 1, order, next(self._seq), future))
        if self._pump is None or self._pump.done():
            # A context of its own: started from an event's task, it copied that event's
            # `logs.CURRENT_EVENT`, and its lines named that event for as long as it ran
            # (review "diff31").
            self._pump = asyncio.create_task(self._run(), context=contextvars.Context())
        try:
            await future
        finally:
            if not future.done():
                future.cancel()  # left the queue: the pump skips it
        return self._clock() - start

    async def _run(self) -> None:
        while any(not f.done() for *_, f in self._waiters):
            try:
                # How many wait: a far Redis reserves that many slots in one call.
                await self._limiter.acquire(sum(1 for *_, f in self._waiters if not f.done()))
            except Exception as exc:  # hand the failure to one waiter, keep serving others
                self._grant(exc)
                continue
            self._grant(None)

    def _grant(self, error: Exception | None) -> None:
        while self._waiters:
            *_, future = heapq.heappop(self._waiters)
            if future.done():
                continue
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)
            return
