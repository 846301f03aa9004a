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

__all__ = ["Permit", "PermitPool"]


class PermitPool:
    """`size` permits; waiters served urgent first, then by lowest `order`, then arrival."""

    __slots__ = ("_free", "_seq", "_waiters", "size")

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("a permit pool needs at least one permit")
        self.size = size
        self._free = size
        self._waiters: list[tuple[int, int, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

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
    `Hold`): taken before each attempt's rate slot, given back after its answer. Records
    how long the last acquisition waited (`userpilot_connection_wait_seconds`)."""

    __slots__ = ("_order", "_pool", "_urgent", "waited")

    def __init__(self, pool: PermitPool, *, urgent: bool = False, order: int = 0) -> None:
        self._pool = pool
        self._urgent = urgent
        self._order = order
        self.waited = 0.0

    async def acquire(self) -> None:
        start = time.perf_counter()
        await self._pool.acquire(self._urgent, self._order)
        self.waited = time.perf_counter() - start

    def release(self) -> None:
        self._pool.release()
