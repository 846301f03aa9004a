"""A bounded window of in-flight events, ordered per user, parallel across users.

Events that share an ordering key (topic, partition, user) run one after another, in
partition order, so Userpilot (which stamps receipt time) sees each user's events in
order; different users run concurrently. The window bounds memory and duplicates after
a crash; the worker bounds it (`Commits.in_window_by_family`) and pauses partitions when it is full.

Thread rule: event loop only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Iterable
from typing import Generic, Protocol, TypeVar

__all__ = ["Job", "Scheduler"]

log = logging.getLogger(__name__)

TopicPartition = tuple[str, int]
CANCEL_WAIT_S = 5.0  # for cancelled jobs to end (see `Scheduler.cancel`)


class Job(Protocol):
    """What the scheduler needs to know about a unit of work."""

    topic: str
    partition: int
    offset: int
    ordering_key: Hashable


J = TypeVar("J", bound=Job)

class Scheduler(Generic[J]):
    """Runs jobs with per-key ordering; the window is bounded by the worker (commits)."""

    def __init__(self, run: Callable[[J], Awaitable[object]],
                 on_crash: Callable[[BaseException], None]) -> None:
        self._run = run
        self._on_crash = on_crash
        self._queues: dict[tuple[str, int, Hashable], deque[J]] = {}
        self._tasks: dict[tuple[str, int, Hashable], asyncio.Task[None]] = {}
        self._per_partition: dict[TopicPartition, int] = {}
        self._in_flight = 0
        self._changed = asyncio.Event()
        self.abandoned = 0
        """Jobs that left without finishing (cancelled, halted, or behind a crash), ever."""

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def submit(self, job: J) -> None:
        """Queue a job behind earlier jobs of the same key, or start it now."""
        key = (job.topic, job.partition, job.ordering_key)
        tp = (job.topic, job.partition)
        self._in_flight += 1
        self._per_partition[tp] = self._per_partition.get(tp, 0) + 1
        queue = self._queues.get(key)
        if queue is not None:
            queue.append(job)
            return
        self._queues[key] = deque((job,))
        self._tasks[key] = asyncio.get_running_loop().create_task(self._chain(key))

    def chained(self, topic: str, partition: int, key: Hashable) -> bool:
        """Jobs of this key are queued or running (its chain is not done)."""
        return (topic, partition, key) in self._queues

    async def _chain(self, key: tuple[str, int, Hashable]) -> None:
        queue = self._queues[key]
        task = asyncio.current_task()
        try:
            while queue:
                if task is not None and task.cancelling():
                    # A cancellation some awaited call swallowed (Python 3.11's wait_for
                    # does, in libraries too): the next job must not start.
                    raise asyncio.CancelledError
                job = queue[0]
                try:
                    await self._run(job)
                except asyncio.CancelledError:
                    raise
                except BaseException as exc:  # a bug, not an outcome: stop the worker
                    log.exception("unexpected error on %s[%d]@%d", job.topic, job.partition,
                                  job.offset)
                    self._on_crash(exc)
                    return
                if not queue or queue[0] is not job:
                    return  # abandoned meanwhile: `cancel` counted it already
                queue.popleft()
                self._done(job.topic, job.partition, 1)
        finally:
            leftover = len(queue)
            if leftover:
                self._done(key[0], key[1], leftover)
                self.abandoned += leftover
                queue.clear()
            if self._tasks.get(key) is task:  # not a chain submitted since for this key
                self._queues.pop(key, None)
                self._tasks.pop(key, None)

    def _done(self, topic: str, partition: int, count: int) -> None:
        self._in_flight -= count
        tp = (topic, partition)
        left = self._per_partition.get(tp, 0) - count
        if left > 0:
            self._per_partition[tp] = left
        else:
            self._per_partition.pop(tp, None)
        self._changed.set()

    def current(self, partitions: Iterable[TopicPartition] | None = None) -> list[J]:
        """The job each ordering chain is working on now, for some partitions or all."""
        wanted = None if partitions is None else set(partitions)
        return [queue[0] for key, queue in self._queues.items()
                if queue and (wanted is None or (key[0], key[1]) in wanted)]

    def pending(self, partitions: Iterable[TopicPartition] | None = None) -> int:
        """Jobs not finished, for some partitions or all."""
        if partitions is None:
            return self._in_flight
        return sum(self._per_partition.get(tp, 0) for tp in partitions)

    async def wait_change(self, timeout: float) -> None:
        """Wait until some job finishes, or `timeout` seconds."""
        if timeout <= 0:
            return
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):  # not wait_for: see `Gate.admit`
                await self._changed.wait()

    async def cancel(self, partitions: Iterable[TopicPartition] | None,
                     keep: Callable[[J], bool] | None = None) -> int:
        """Abandon the jobs of these partitions (or all); returns how many were abandoned.
        `keep`: spare the chains whose current job it accepts (with the jobs behind it)."""
        wanted = None if partitions is None else set(partitions)
        victims = {key: task for key, task in self._tasks.items()
                   if (wanted is None or (key[0], key[1]) in wanted)
                   and not (keep is not None and self._queues.get(key)
                            and keep(self._queues[key][0]))}
        abandoned = sum(len(self._queues.get(key, ())) for key in victims)
        for task in victims.values():
            task.cancel()
        if victims:
            # Bounded: a task that swallowed its cancellation ends after its current job
            # (`_chain`), but that job may still wait for Userpilot; a revoke or shutdown
            # must not wait for it (its offset is not committed either way).
            _, stuck = await asyncio.wait(victims.values(), timeout=CANCEL_WAIT_S)
            if stuck:
                log.error("%d cancelled deliveries still running after %.0f s; their events "
                          "stay uncommitted", len(stuck), CANCEL_WAIT_S)
        # A task cancelled before its first step never runs _chain's cleanup, and a stuck
        # one has not yet: do it here (the stuck one then finds its queue empty).
        for key, task in victims.items():
            if self._tasks.get(key) is task:  # not a chain submitted meanwhile
                del self._tasks[key]
                queue = self._queues.pop(key, None)
                if queue:
                    self._done(key[0], key[1], len(queue))
                    self.abandoned += len(queue)
                    queue.clear()
        return abandoned
