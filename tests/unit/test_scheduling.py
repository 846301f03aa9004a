"""Unit tests for consumer.scheduling: per-key order, concurrency, window accounting."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import TypeVar

import pytest

from consumer.scheduling import Scheduler

T = TypeVar("T")


@dataclass
class Work:
    topic: str
    partition: int
    offset: int
    ordering_key: Hashable
    release: asyncio.Event = field(default_factory=asyncio.Event)


def run(main: Callable[[], Awaitable[T]]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(main(), 5.0)
    return asyncio.run(bounded())


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


class Recorder:
    """A run() that logs start/end and waits for each job's release event."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []
        self.running: set[int] = set()
        self.max_running = 0

    async def __call__(self, job: Work) -> None:
        self.events.append(("start", job.offset))
        self.running.add(job.offset)
        self.max_running = max(self.max_running, len(self.running))
        try:
            await job.release.wait()
        finally:
            self.running.discard(job.offset)
        self.events.append(("end", job.offset))


def crash_collector() -> tuple[list[BaseException], Callable[[BaseException], None]]:
    crashes: list[BaseException] = []
    return crashes, crashes.append



async def drained(sched: Scheduler[Work], timeout: float = 1.0) -> None:
    """Wait until nothing is pending; fails the test after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while sched.pending():
        assert loop.time() < deadline, "scheduler did not drain"
        await sched.wait_change(0.05)


def test_same_key_runs_in_partition_order() -> None:
    async def main() -> list[tuple[str, int]]:
        rec = Recorder()
        crashes, on_crash = crash_collector()
        sched: Scheduler[Work] = Scheduler(rec, on_crash)
        jobs = [Work("t", 0, o, "user-1") for o in range(5)]
        for job in jobs:
            sched.submit(job)
        await settle()
        assert rec.events == [("start", 0)]  # later events of the user wait
        for job in reversed(jobs):  # releasing out of order must not reorder
            job.release.set()
        await drained(sched)
        assert crashes == []
        return rec.events

    events = run(main)
    assert events == [(kind, o) for o in range(5) for kind in ("start", "end")]


def test_different_keys_run_concurrently() -> None:
    async def main() -> Recorder:
        rec = Recorder()
        sched: Scheduler[Work] = Scheduler(rec, crash_collector()[1])
        jobs = [Work("t", 0, o, f"user-{o}") for o in range(10)]
        for job in jobs:
            sched.submit(job)
        await settle()
        assert rec.max_running == 10
        for job in jobs:
            job.release.set()
        await drained(sched)
        return rec

    assert run(main).max_running == 10


def test_same_user_on_different_partitions_is_not_serialised() -> None:
    async def main() -> int:
        rec = Recorder()
        sched: Scheduler[Work] = Scheduler(rec, crash_collector()[1])
        jobs = [Work("t", p, p, "user-1") for p in range(3)] + [Work("u", 0, 9, "user-1")]
        for job in jobs:
            sched.submit(job)
        await settle()
        running = rec.max_running
        for job in jobs:
            job.release.set()
        await drained(sched)
        return running

    assert run(main) == 4


def test_in_flight_and_pending_accounting() -> None:
    async def main() -> None:
        rec = Recorder()
        sched: Scheduler[Work] = Scheduler(rec, crash_collector()[1])
        assert sched.in_flight == 0
        a = [Work("t", 0, o, "a") for o in range(2)]
        b = [Work("t", 1, o, "b") for o in range(2)]
        for job in a + b:
            sched.submit(job)
        assert sched.in_flight == 4
        assert sched.pending([("t", 0)]) == 2
        assert sched.pending([("t", 1)]) == 2
        assert sched.pending([("t", 0), ("t", 1), ("x", 9)]) == 4
        assert sched.pending() == 4
        await settle()
        a[0].release.set()
        await settle()
        assert sched.in_flight == 3
        assert sched.pending([("t", 0)]) == 1
        for job in a + b:
            job.release.set()
        await drained(sched)
        assert sched.in_flight == 0
        assert sched.pending([("t", 0)]) == 0

    run(main)


def test_cancel_returns_the_abandoned_count_and_frees_the_window() -> None:
    async def main() -> None:
        rec = Recorder()
        crashes, on_crash = crash_collector()
        sched: Scheduler[Work] = Scheduler(rec, on_crash)
        for o in range(3):
            sched.submit(Work("t", 0, o, "a"))
        sched.submit(Work("t", 0, 3, "b"))
        keep = Work("t", 1, 0, "c")
        sched.submit(keep)
        await settle()
        assert await sched.cancel([("t", 0)]) == 4
        assert sched.in_flight == 1
        assert sched.pending([("t", 0)]) == 0
        assert crashes == []  # cancellation is not a crash
        keep.release.set()
        await drained(sched)
        assert ("end", 0) in rec.events  # the kept partition finished normally

    run(main)


def test_cancel_all() -> None:
    async def main() -> None:
        sched: Scheduler[Work] = Scheduler(Recorder(), crash_collector()[1])
        for o in range(4):
            sched.submit(Work("t", o % 2, o, o))
        await settle()
        assert await sched.cancel(None) == 4
        assert sched.in_flight == 0
        assert await sched.cancel(None) == 0

    run(main)


def test_cancel_right_after_submit_before_jobs_started() -> None:
    """A revoke can arrive in the same loop turn as the poll that submitted the jobs."""
    async def main() -> None:
        rec = Recorder()
        sched: Scheduler[Work] = Scheduler(rec, crash_collector()[1])
        for o in range(3):
            sched.submit(Work("t", 0, o, o))
        assert await sched.cancel([("t", 0)]) == 3
        assert sched.in_flight == 0
        assert sched.pending() == 0
        assert rec.events == []
        job = Work("t", 0, 0, 0)  # the same key works again afterwards
        sched.submit(job)
        job.release.set()
        await drained(sched)
        assert rec.events == [("start", 0), ("end", 0)]

    run(main)


def test_key_can_be_reused_after_its_chain_ended() -> None:
    async def main() -> list[tuple[str, int]]:
        rec = Recorder()
        sched: Scheduler[Work] = Scheduler(rec, crash_collector()[1])
        for o in range(3):
            job = Work("t", 0, o, "a")
            job.release.set()
            sched.submit(job)
            await drained(sched)
        return rec.events

    assert run(main) == [(kind, o) for o in range(3) for kind in ("start", "end")]


@pytest.mark.parametrize("error", [RuntimeError("bug"), KeyError("x"), ValueError("v")])
def test_on_crash_is_called_on_unexpected_exceptions(error: Exception) -> None:
    async def main() -> tuple[list[BaseException], list[int]]:
        crashes, on_crash = crash_collector()
        ran: list[int] = []

        async def job_run(job: Work) -> None:
            ran.append(job.offset)
            if job.offset == 1:
                raise error

        sched: Scheduler[Work] = Scheduler(job_run, on_crash)
        for o in range(4):
            sched.submit(Work("t", 0, o, "a"))
        sched.submit(Work("t", 0, 9, "other"))
        await drained(sched)
        assert sched.in_flight == 0  # the crashed chain's jobs are not left counted
        return crashes, ran

    crashes, ran = run(main)
    assert crashes == [error]
    assert sorted(ran) == [0, 1, 9]  # the chain stops at the crash; other keys run


def test_current_lists_the_job_each_chain_is_working_on() -> None:
    async def main() -> None:
        rec = Recorder()
        sched: Scheduler[Work] = Scheduler(rec, lambda exc: None)
        jobs = [Work("t", 0, 0, "a"), Work("t", 0, 1, "a"), Work("t", 1, 2, "b")]
        for job in jobs:
            sched.submit(job)
        await settle()
        assert sorted(j.offset for j in sched.current()) == [0, 2]
        assert [j.offset for j in sched.current([("t", 1)])] == [2]
        jobs[0].release.set()
        await settle()
        assert sorted(j.offset for j in sched.current([("t", 0)])) == [1]
        for job in jobs:
            job.release.set()
        await settle()
        assert sched.current() == []
    run(main)


def swallowing_job(started: list[int], goes_on_s: float) -> Callable[[Work], Awaitable[None]]:
    """A job that records its start, swallows its cancellation (as Python 3.11's wait_for
    can, in libraries too) and goes on `goes_on_s` seconds more."""
    async def job(item: Work) -> None:
        started.append(item.offset)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(10)
        await asyncio.sleep(goes_on_s)
    return job


def test_a_job_that_swallows_its_cancel_ends_its_chain_and_cancel_is_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Python 3.11's wait_for (inside libraries too) can swallow a cancellation: the
    chain then ran its user's next events and `cancel` waited for all of them."""
    from consumer import scheduling

    monkeypatch.setattr(scheduling, "CANCEL_WAIT_S", 0.2)
    started: list[int] = []
    stubborn = swallowing_job(started, goes_on_s=0.5)

    async def main() -> None:
        crashes, on_crash = crash_collector()
        sched: Scheduler[Work] = Scheduler(stubborn, on_crash)
        for offset in range(3):
            sched.submit(Work("t", 0, offset, "user"))
        await settle()
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert await sched.cancel([("t", 0)]) == 3
        assert loop.time() - start < 0.4, "bounded by CANCEL_WAIT_S, not the job"
        assert sched.in_flight == 0
        await asyncio.sleep(0.6)  # the stubborn job ends: nothing counted twice
        assert sched.in_flight == 0 and sched.pending([("t", 0)]) == 0
        assert started == [0], "the chain's next jobs never started"
        assert not crashes
        sched.submit(Work("t", 0, 3, "user"))  # the key is usable again
        await settle()
        assert started == [0, 3]
        await sched.cancel(None)

    run(main)


def test_a_job_that_swallows_its_cancel_and_ends_soon_does_not_start_the_next(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The chain itself must stop (`task.cancelling()`): here the job ends within
    CANCEL_WAIT_S, so `cancel` has not emptied the queue yet when the chain goes on."""
    from consumer import scheduling

    monkeypatch.setattr(scheduling, "CANCEL_WAIT_S", 0.3)
    started: list[int] = []
    stubborn = swallowing_job(started, goes_on_s=0.05)

    async def main() -> None:
        _, on_crash = crash_collector()
        sched: Scheduler[Work] = Scheduler(stubborn, on_crash)
        for offset in range(3):
            sched.submit(Work("t", 0, offset, "user"))
        await settle()
        assert await sched.cancel([("t", 0)]) == 3
        assert started == [0], "the user's next event started after its cancel"
        assert sched.in_flight == 0

    run(main)


def test_a_barrier_counts_the_jobs_queued_when_it_was_taken_not_later_ones() -> None:
    """`reached`: waits for the jobs of a chain queued when the barrier was taken, not for
    later ones (waits follow submission order, so they cannot form a cycle)."""
    async def main() -> None:
        rec = Recorder()
        crashes, on_crash = crash_collector()
        sched: Scheduler[Work] = Scheduler(rec, on_crash)
        first = Work("t", 0, 0, "a")
        sched.submit(first)
        barriers = sched.barriers("t", 0)
        assert set(barriers) == {"a"} and sched.barriers("t", 1) == {}
        later = Work("t", 0, 1, "a")
        sched.submit(later)
        waited = asyncio.create_task(sched.reached(barriers["a"]))
        await settle()
        assert not waited.done()
        first.release.set()
        await settle()
        assert waited.done() and ("start", 1) in rec.events  # `later` still runs
        again = asyncio.create_task(sched.reached(barriers["a"]))
        await settle()
        assert again.done()  # already reached
        later.release.set()
        await drained(sched)
        assert crashes == []

    run(main)


def test_a_cancelled_chain_lets_who_waits_for_it_go_on() -> None:
    async def main() -> None:
        rec = Recorder()
        crashes, on_crash = crash_collector()
        sched: Scheduler[Work] = Scheduler(rec, on_crash)
        sched.submit(Work("t", 1, 5, "c"))
        barrier = sched.barriers("t", 1)["c"]
        waited = asyncio.create_task(sched.reached(barrier))
        await settle()
        assert not waited.done()
        await sched.cancel([("t", 1)])
        await settle()
        assert waited.done() and crashes == []
        # A new run of the same key is another chain: the old barrier does not wait for it.
        sched.submit(Work("t", 1, 6, "c"))
        await asyncio.wait_for(sched.reached(barrier), 1)

    run(main)


def test_wait_change_waits_for_as_many_jobs_as_asked_or_the_timeout() -> None:
    """The worker's loop, its window full, waits for a tenth of it (review "prof26")."""
    async def main() -> tuple[list[int], float]:
        rec = Recorder()
        _, on_crash = crash_collector()
        sched: Scheduler[Work] = Scheduler(rec, on_crash)
        jobs = [Work("t", 0, o, f"user-{o}") for o in range(6)]
        for job in jobs:
            sched.submit(job)
        await settle()
        seen: list[int] = []

        async def finish_one_by_one() -> None:
            for job in jobs[:4]:
                await asyncio.sleep(0.01)
                job.release.set()
                await settle()
                seen.append(sched.in_flight)

        finisher = asyncio.create_task(finish_one_by_one())
        await sched.wait_change(5.0, jobs=3)
        woke_at = sched.in_flight  # after the third, not the first
        await finisher
        loop = asyncio.get_running_loop()
        started = loop.time()
        await sched.wait_change(0.05, jobs=10)  # 2 left in flight, none finishing: timeout
        return [woke_at, *seen], loop.time() - started

    counts, waited = run(main)
    assert counts[0] == 3, counts
    assert 0.04 <= waited < 1.0


def test_cancel_soon_stops_the_partitions_chains_before_their_next_job() -> None:
    """For a drain cancelled itself (review "design59"): no await, and no later job of a
    cancelled chain starts; other partitions' chains go on."""
    async def main() -> Recorder:
        rec = Recorder()
        sched: Scheduler[Work] = Scheduler(rec, crash_collector()[1])
        jobs = [Work("t", 0, o, "user-1") for o in range(3)] + [Work("t", 1, 9, "user-2")]
        for job in jobs:
            sched.submit(job)
        await settle()
        sched.cancel_soon([("t", 0)])
        for job in jobs:
            job.release.set()
        await drained(sched)
        return rec

    rec = run(main)
    assert rec.events == [("start", 0), ("start", 9), ("end", 9)]
