"""Writer-schema lookups for the event loop: one at a time per schema id, shared by every
event waiting for it, on a thread of their own (the registry's client is synchronous)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

__all__ = ["FIRST_RETRY_S", "MAX_RETRY_S", "SharedFetches"]

FIRST_RETRY_S = 0.5
"""The wait after an id's first failed lookup (the registry away); doubling, up to ..."""
MAX_RETRY_S = 30.0


class SharedFetches:
    """Writer-schema lookups for the event loop: one at a time per schema id, shared by
    every event waiting for it, on a thread of their own.

    Why not `asyncio.to_thread` per event: asyncio's default pool (6 threads on 2 cores) is
    also where aiohttp resolves Userpilot's host name. Events of a new schema, each waiting
    up to the registry's timeout behind one fetch lock, filled it while the registry hung:
    new connections to Userpilot timed out resolving, the outage gate closed and delivery
    stopped for schemas already cached, reported as Userpilot's outage (review "schema16").
    """

    def __init__(self, lookup: Callable[[int], Mapping[str, Any]],
                 permanent: tuple[type[BaseException], ...] = (KeyError,)) -> None:
        self._lookup = lookup
        self._permanent = permanent
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="schema-fetch")
        self._running: dict[int, asyncio.Future[Mapping[str, Any]]] = {}
        # Per id whose last lookup failed (the registry away): when the next may start,
        # and the wait it followed. The events waiting for one id share these: each on its
        # own clock, taken from polled batches a few ms apart, a registry answering 429 got
        # a request per waiting event per round (137 in 2.4 s for 100 events, review
        # "reg44"), not one per id.
        self._backoff: dict[int, tuple[float, float]] = {}
        # Set (and replaced) when a lookup succeeds: the registry answers again, and events
        # sleeping out a backoff start at once, not up to 30 s later (review "diff44").
        self._answered: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None

    def retry_in(self, schema_id: int) -> float:
        """Seconds until the next lookup of `schema_id` may start (0: at once)."""
        backoff = self._backoff.get(schema_id)
        if backoff is None:
            return 0.0
        return max(0.0, backoff[0] - asyncio.get_running_loop().time())

    async def writer_schema(self, schema_id: int) -> Mapping[str, Any]:
        """`lookup(schema_id)`, joining a lookup of the same id under way, or waiting for
        the id's next attempt after a failed one; raises as the lookup."""
        if schema_id not in self._running:
            wait = self.retry_in(schema_id)
            if wait > 0:
                loop = asyncio.get_running_loop()
                if self._answered is None or self._answered[0] is not loop:
                    self._answered = (loop, asyncio.Event())
                # asyncio.timeout, not wait_for: on 3.11 wait_for can drop a cancellation
                # (a revoke's, or a caller's own deadline) landing as the registry answers
                # again, and the task went on (review "diff51b").
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._answered[1].wait()
        fetch = self._running.get(schema_id)
        if fetch is None:
            loop = asyncio.get_running_loop()
            fetch = loop.run_in_executor(self._pool, self._lookup, schema_id)
            self._running[schema_id] = fetch
            fetch.add_done_callback(functools.partial(self._done, schema_id, loop.time()))
        # One waiter cancelled (a revoke) must not cancel the others' lookup.
        return await asyncio.shield(fetch)

    def _done(self, schema_id: int, started: float,
              fetch: asyncio.Future[Mapping[str, Any]]) -> None:
        self._running.pop(schema_id, None)
        if fetch.cancelled():
            return
        failed = fetch.exception()  # retrieved: its waiters may all be gone
        if failed is None:
            # The registry answers: no id waits out a backoff it earned while it did not
            # (an event of another id held 30 s after the registry was back, review
            # "diff44").
            self._backoff.clear()
            if self._answered is not None:
                self._answered[1].set()
                self._answered = None
            return
        if isinstance(failed, self._permanent):
            self._backoff.pop(schema_id, None)
            return
        now = fetch.get_loop().time()
        due, waited = self._backoff.get(schema_id, (0.0, FIRST_RETRY_S / 2))
        if started - due > waited:
            # Started long after the last was due: an outage of its own. From the lookup's
            # start, not its failure: a lookup that hung its timeout restarted the wait at
            # 0.5 s every round (review "diff44").
            waited = FIRST_RETRY_S / 2
        wait = min(waited * 2, MAX_RETRY_S)
        self._backoff[schema_id] = (now + wait, wait)

    def close(self) -> None:
        """Lookups not started are dropped; one under way ends within the registry's
        timeout (`RestClient`), as the process's exit waits for its thread."""
        self._pool.shutdown(wait=False, cancel_futures=True)
