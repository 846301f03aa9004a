"""Writer-schema lookups for the event loop: one at a time per schema id, shared by every
event waiting for it, on a thread of their own (the registry's client is synchronous)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

__all__ = ["SharedFetches"]


class SharedFetches:
    """Writer-schema lookups for the event loop: one at a time per schema id, shared by
    every event waiting for it, on a thread of their own.

    Why not `asyncio.to_thread` per event: asyncio's default pool (6 threads on 2 cores) is
    also where aiohttp resolves Userpilot's host name. Events of a new schema, each waiting
    up to the registry's timeout behind one fetch lock, filled it while the registry hung:
    new connections to Userpilot timed out resolving, the outage gate closed and delivery
    stopped for schemas already cached, reported as Userpilot's outage (review "schema16").
    """

    def __init__(self, lookup: Callable[[int], Mapping[str, Any]]) -> None:
        self._lookup = lookup
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="schema-fetch")
        self._running: dict[int, asyncio.Future[Mapping[str, Any]]] = {}

    async def writer_schema(self, schema_id: int) -> Mapping[str, Any]:
        """`lookup(schema_id)`, joining a lookup of the same id under way; raises as it."""
        fetch = self._running.get(schema_id)
        if fetch is None:
            fetch = asyncio.get_running_loop().run_in_executor(
                self._pool, self._lookup, schema_id)
            self._running[schema_id] = fetch
            fetch.add_done_callback(functools.partial(self._done, schema_id))
        # One waiter cancelled (a revoke) must not cancel the others' lookup.
        return await asyncio.shield(fetch)

    def _done(self, schema_id: int, fetch: asyncio.Future[Mapping[str, Any]]) -> None:
        self._running.pop(schema_id, None)
        if not fetch.cancelled():
            fetch.exception()  # retrieved: its waiters may all be gone

    def close(self) -> None:
        """Lookups not started are dropped; one under way ends within the registry's
        timeout (`RestClient`), as the process's exit waits for its thread."""
        self._pool.shutdown(wait=False, cancel_futures=True)
