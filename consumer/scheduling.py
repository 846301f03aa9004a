"""A bounded window of in-flight events, ordered per user, parallel across users.

Events that share an ordering key (topic, partition, user) run one after another, in
partition order, so Userpilot (which stamps receipt time) sees each user's events in
order; different users run concurrently. A job may also wait for another chain of its
partition (`barriers` taken before it was submitted, `reached`): for the jobs queued there
then, never later ones, so waits follow submission order and cannot form a cycle. The
window bounds memory and duplicates after a crash; the worker bounds it
(`Commits.in_window_by_family`) and pauses partitions when it is full.

Thread rule: event loop only.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Iterable, Iterator
from typing import Generic, Protocol, TypeVar

__all__ = ["Barrier", "ChainKey", "Job", "Scheduler"]

log = logging.getLogger(__name__)

TopicPartition = tuple[str, int]
ChainKey = tuple[str, int, Hashable]
Barrier = tuple[ChainKey, int, int]  # a chain, which run of it, how many of its jobs
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
        self._queues: dict[ChainKey, deque[J]] = {}
        self._tasks: dict[ChainKey, asyncio.Task[None]] = {}
        # Per running chain: its run's id, jobs submitted and finished, and the jobs of
        # other chains waiting for a number of them (`reached`).
        self._runs: dict[ChainKey, int] = {}
        self._counts: dict[ChainKey, list[int]] = {}
        self._waiters: dict[ChainKey, list[tuple[int, asyncio.Future[None]]]] = {}
        self._run_ids = itertools.count()
        self._per_partition: dict[TopicPartition, int] = {}
        self._in_flight = 0
        self._finished_total = 0  # jobs ended, ever (`wait_change` counts from it)
        self._changed = asyncio.Event()
        self.abandoned = 0
        """Jobs that left without finishing (cancelled, halted, or behind a crash), ever."""

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def queued(self, key: ChainKey) -> int:
        """Jobs of the chain `key` (topic, partition, ordering key) queued or running."""
        queue = self._queues.get(key)
        return len(queue) if queue is not None else 0

    def finished(self, key: ChainKey) -> int:
        """Jobs the chain's current run finished (0 when it has none): its progress."""
        counts = self._counts.get(key)
        return counts[1] if counts is not None else 0

    def submit(self, job: J) -> None:
        """Queue a job behind earlier jobs of the same key, or start it now."""
        key = (job.topic, job.partition, job.ordering_key)
        tp = (job.topic, job.partition)
        self._in_flight += 1
        self._per_partition[tp] = self._per_partition.get(tp, 0) + 1
        queue = self._queues.get(key)
        if queue is not None:
            queue.append(job)
            self._counts[key][0] += 1
            return
        self._queues[key] = deque((job,))
        self._runs[key] = next(self._run_ids)
        self._counts[key] = [1, 0]
        self._tasks[key] = asyncio.get_running_loop().create_task(self._chain(key))

    def barriers(self, topic: str, partition: int) -> dict[Hashable, Barrier]:
        """Per ordering key of the partition with jobs queued or running: the point its
        chain has reached in submissions now (`reached` waits until those jobs finished)."""
        return {key[2]: (key, self._runs[key], counts[0])
                for key, counts in self._counts.items()
                if key[0] == topic and key[1] == partition}

    async def reached(self, barrier: Barrier) -> None:
        """Wait until the chain finished the jobs the barrier counts, or that run of it
        ended (done, abandoned or crashed)."""
        chain, run, count = barrier
        while self._runs.get(chain) == run and self._counts[chain][1] < count:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(chain, []).append((count, waiter))
            await waiter

    def _advance(self, key: ChainKey) -> None:
        """One job of the chain finished: wake who waited for that many."""
        counts = self._counts.get(key)
        if counts is None:
            return
        counts[1] += 1
        waiters = self._waiters.get(key)
        if waiters:
            for count, waiter in waiters:
                if count <= counts[1] and not waiter.done():
                    waiter.set_result(None)
            self._waiters[key] = [w for w in waiters if not w[1].done()]

    def _end(self, key: ChainKey) -> None:
        """The chain's run is over (done, abandoned or crashed): its waiters go on."""
        self._runs.pop(key, None)
        self._counts.pop(key, None)
        for _, waiter in self._waiters.pop(key, ()):
            if not waiter.done():
                waiter.set_result(None)

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
                self._advance(key)
        finally:
            leftover = len(queue)
            if leftover:
                self._done(key[0], key[1], leftover)
                self.abandoned += leftover
                queue.clear()
            if self._tasks.get(key) is task:  # not a chain submitted since for this key
                self._queues.pop(key, None)
                self._tasks.pop(key, None)
                self._end(key)

    def _done(self, topic: str, partition: int, count: int) -> None:
        self._in_flight -= count
        self._finished_total += count
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

    def jobs(self) -> Iterator[J]:
        """Every job not finished (queued or running)."""
        for queue in self._queues.values():
            yield from queue

    def pending(self, partitions: Iterable[TopicPartition] | None = None) -> int:
        """Jobs not finished, for some partitions or all."""
        if partitions is None:
            return self._in_flight
        return sum(self._per_partition.get(tp, 0) for tp in partitions)

    async def wait_change(self, timeout: float, jobs: int = 1) -> None:
        """Wait until `jobs` jobs ended (at least one, at most those in flight), or
        `timeout` seconds."""
        if timeout <= 0:
            return
        target = self._finished_total + max(1, min(jobs, self._in_flight))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):  # not wait_for: see `Gate.admit`
                while self._finished_total < target:
                    self._changed.clear()
                    await self._changed.wait()

    def cancel_soon(self, partitions: Iterable[TopicPartition] | None) -> None:
        """Cancel the chains of these partitions (or all) without waiting for them: for a
        drain cancelled itself, which cannot await `cancel`. Each chain stops at its next
        step; the jobs behind its current one never start (`_chain`)."""
        for task in self._chains(partitions).values():
            task.cancel()

    def _chains(self, partitions: Iterable[TopicPartition] | None,
                keep: Callable[[J], bool] | None = None) -> dict[ChainKey, asyncio.Task[None]]:
        """The chains of these partitions (or all), less those whose current job `keep`
        accepts."""
        wanted = None if partitions is None else set(partitions)
        return {key: task for key, task in self._tasks.items()
                if (wanted is None or (key[0], key[1]) in wanted)
                and not (keep is not None and self._queues.get(key)
                         and keep(self._queues[key][0]))}

    async def cancel(self, partitions: Iterable[TopicPartition] | None,
                     keep: Callable[[J], bool] | None = None) -> int:
        """Abandon the jobs of these partitions (or all); returns how many were abandoned.
        `keep`: spare the chains whose current job it accepts (with the jobs behind it)."""
        victims = self._chains(partitions, keep)
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
                self._end(key)
                if queue:
                    self._done(key[0], key[1], len(queue))
                    self.abandoned += len(queue)
                    queue.clear()
        return abandoned
