"""PermitPool: urgent first, then intake order; a permit is never lost or doubled, whatever
the waiters do (cancelled while waiting, cancelled as they were granted)."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.permits import Permit, PermitPool


def test_free_permits_are_taken_without_waiting() -> None:
    async def main() -> None:
        pool = PermitPool(2)
        await pool.acquire()
        await pool.acquire()
        assert pool.free == 0
        pool.release()
        assert pool.free == 1

    asyncio.run(main())


def test_a_released_permit_goes_to_the_urgent_waiter_then_the_lowest_order() -> None:
    async def main() -> list[str]:
        pool = PermitPool(1)
        await pool.acquire()
        served: list[str] = []

        async def wait(name: str, urgent: bool, order: int) -> None:
            await pool.acquire(urgent, order)
            served.append(name)

        tasks = [asyncio.create_task(wait(name, urgent, order)) for name, urgent, order in (
            ("late event", False, 9), ("early event", False, 1), ("ensure-user", True, 50),
            ("same order, later", False, 1))]
        await asyncio.sleep(0)  # all four queue
        assert pool.waiting == 4
        for _ in range(4):
            pool.release()
            await asyncio.sleep(0)
        await asyncio.gather(*tasks)
        return served

    assert asyncio.run(main()) == ["ensure-user", "early event", "same order, later",
                                   "late event"]


def test_a_newcomer_does_not_overtake_waiters_for_a_free_permit() -> None:
    """Released while an urgent caller waits, the permit is its, even if a newcomer asks
    before the waiter's task runs."""
    async def main() -> list[str]:
        pool = PermitPool(1)
        await pool.acquire()
        served: list[str] = []

        async def wait(name: str, urgent: bool) -> None:
            await pool.acquire(urgent)
            served.append(name)
            await asyncio.sleep(0.01)
            pool.release()

        waiter = asyncio.create_task(wait("urgent waiter", True))
        await asyncio.sleep(0)
        pool.release()
        newcomer = asyncio.create_task(wait("newcomer", False))
        await asyncio.gather(waiter, newcomer)
        return served

    assert asyncio.run(main()) == ["urgent waiter", "newcomer"]


def test_a_waiter_cancelled_as_it_was_granted_hands_the_permit_on() -> None:
    async def main() -> None:
        pool = PermitPool(1)
        await pool.acquire()
        first = asyncio.create_task(pool.acquire(order=1))
        second = asyncio.create_task(pool.acquire(order=2))
        await asyncio.sleep(0)
        pool.release()  # granted to `first`, which has not run yet
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        await asyncio.wait_for(second, 1.0)  # the permit went on to it
        assert pool.free == 0
        pool.release()
        assert pool.free == 1

    asyncio.run(main())


def test_releasing_more_than_was_taken_is_an_error() -> None:
    pool = PermitPool(1)
    with pytest.raises(RuntimeError, match="twice"):
        pool.release()


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_wait_is_the_pools_only_while_every_permit_is_on_the_wire() -> None:
    """A permit is held from before the rate slot: while a holder waits for its slot, a
    waiter waits for the limiter, not for the pool (review "permits21": a backlog at the
    rate limit read as 6.8 s of "connection wait" with connections to spare)."""
    async def main() -> Permit:
        clock = Clock()
        pool = PermitPool(2, clock=clock)
        first, second = Permit(pool), Permit(pool)
        await first.acquire()
        await second.acquire()
        first.sending()  # on the wire; `second` waits for its rate slot
        waiter = Permit(pool)
        task = asyncio.create_task(waiter.acquire())
        await asyncio.sleep(0)
        clock.now += 3.0  # limiter-bound: one holder is not on the wire
        second.sending()
        clock.now += 1.0  # pool-bound: both are
        first.sent()
        first.release()
        await task
        return waiter

    waiter = asyncio.run(main())
    assert waiter.for_pool == 1.0
    assert waiter.for_limiter == 3.0


def test_a_permit_given_back_twice_is_given_back_once() -> None:
    """The handler gives it back while it sleeps on a busy claim; if taking it again is
    cancelled, the policy's own release must not free a permit it no longer holds."""
    async def main() -> PermitPool:
        pool = PermitPool(1)
        permit = Permit(pool)
        await permit.acquire()
        permit.release()
        permit.release()
        return pool

    pool = asyncio.run(main())
    assert pool.free == 1


@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 3),
       plan=st.lists(st.tuples(st.booleans(), st.integers(0, 5), st.sampled_from(
           ["hold", "cancel_waiting", "cancel_later"])), min_size=1, max_size=12))
def test_no_permit_is_lost_or_doubled(size: int, plan: list[tuple[bool, int, str]]) -> None:
    """Any mix of holders and waiters cancelled at any point: the pool ends whole, and never
    more than `size` hold a permit at once."""
    async def main() -> None:
        pool = PermitPool(size)
        holding = 0
        peak = 0

        async def user(urgent: bool, order: int) -> None:
            nonlocal holding, peak
            await pool.acquire(urgent, order)
            holding += 1
            peak = max(peak, holding)
            try:
                await asyncio.sleep(0.001 * (order + 1))
            finally:
                holding -= 1
                pool.release()

        tasks = []
        for urgent, order, what in plan:
            task = asyncio.create_task(user(urgent, order))
            tasks.append(task)
            await asyncio.sleep(0)
            if what == "cancel_waiting":
                task.cancel()
        await asyncio.sleep(0.002)
        for task, (_, _, what) in zip(tasks, plan, strict=True):
            if what == "cancel_later":
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert peak <= size
        assert pool.free == size
        assert pool.waiting == 0

    asyncio.run(main())
