"""Connection permits for one endpoint family: urgent calls first, then in intake order.

Why before the rate slot: a request that took its family's rate slot and then waited for a
connection (answers slower than the pool carries) went out late, together with every other
request queued there once Userpilot sped up: a burst over the token's window, 429s and the
limiter's slow recovery (review "slowup20"). With a permit held first, a slot is only taken
by a request that can go out at once, so requests leave at the limiter's pace.

Why per family: a permit is held while its request waits for its family's slot, so one
shared pool would let a Track backlog hold every permit and pace identify calls (with the
ensure-user identify in front of those very Tracks) at Track's rate.

Why ordered: within the identify family the ensure-user identify and the company
association go before queued identify events (`ratelimit.PriorityLane` orders their slots
the same way); in plain arrival order an urgent call would wait for a permit behind the
whole identify backlog. Among the same urgency, the lowest intake goes first, so the
committable offset moves.

Thread rule: event loop only.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable

__all__ = ["Permit", "PermitPool"]


class PermitPool:
    """`size` permits; waiters served urgent first, then by lowest `order`, then arrival."""

    __slots__ = ("_free", "_full_since", "_full_total", "_seq", "_waiters",
                 "_wire", "clock", "size")

    def __init__(self, size: int, clock: Callable[[], float] = time.perf_counter) -> None:
        if size < 1:
            raise ValueError("a permit pool needs at least one permit")
        self.size = size
        self._free = size
        self._waiters: list[tuple[int, int, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self.clock = clock
        self._wire = 0  # holders whose request is on the wire
        self._full_total = 0.0
        self._full_since: float | None = None

    def full_clock(self) -> float:
        """Seconds so far during which every permit was held by a request on the wire:
        the only time a waiter waits for the pool itself. A permit is held from before the
        rate slot, so the rest of a wait is the rate limiter's queue, not the pool's."""
        if self._full_since is None:
            return self._full_total
        return self._full_total + self.clock() - self._full_since

    def sending(self) -> None:
        """A holder's request went on the wire."""
        self._wire += 1
        if self._wire == self.size:
            self._full_since = self.clock()

    def sent(self) -> None:
        """... and came back (answered, failed or cancelled)."""
        if self._full_since is not None:
            self._full_total += self.clock() - self._full_since
            self._full_since = None
        self._wire -= 1

    @property
    def free(self) -> int:
        """Permits not held now."""
        return self._free

    @property
    def waiting(self) -> int:
        """Callers waiting for a permit (those that gave up are not counted)."""
        return sum(1 for *_, future in self._waiters if not future.done())

    async def acquire(self, urgent: bool = False, order: int = 0) -> None:
        """Take a permit, waiting for one when none is free. A permit released while
        callers wait goes to the most urgent of them (never to a newcomer)."""
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (0 if urgent else 1, order, next(self._seq), future))
        try:
            await future
        except BaseException:
            if future.done() and not future.cancelled():
                # Granted as it was cancelled: the permit is ours to hand on.
                self.release()
            raise

    def release(self) -> None:
        """Give a permit back: to the first waiter still waiting, else to the pool."""
        while self._waiters:
            *_, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_result(None)
                return
        self._free += 1
        if self._free > self.size:
            raise RuntimeError("a permit was released twice")


class Permit:
    """One call's claim on its family's pool, across its attempts (the retry policy's
    `Hold`): taken before each attempt's rate slot, given back after its answer.

    Of its last wait, `for_pool` is the time every permit was on the wire (the pool too
    small: `userpilot_connection_wait_seconds`) and `for_limiter` the rest (holders
    waiting for rate slots: the limiter's queue). `release` is safe to repeat: the handler
    gives the permit back while it sleeps on a busy messageId claim, and the policy's own
    release after that must not give it back twice."""

    __slots__ = ("_order", "_pool", "_urgent", "for_limiter", "for_pool", "held")

    def __init__(self, pool: PermitPool, *, urgent: bool = False, order: int = 0) -> None:
        self._pool = pool
        self._urgent = urgent
        self._order = order
        self.held = False
        self.for_pool = self.for_limiter = 0.0

    async def acquire(self) -> None:
        pool = self._pool
        start, full = pool.clock(), pool.full_clock()
        await pool.acquire(self._urgent, self._order)
        self.held = True
        waited = pool.clock() - start
        self.for_pool = min(waited, pool.full_clock() - full)
        self.for_limiter = waited - self.for_pool

    def release(self) -> None:
        if self.held:
            self.held = False
            self._pool.release()

    def sending(self) -> None:
        self._pool.sending()

    def sent(self) -> None:
        self._pool.sent()
