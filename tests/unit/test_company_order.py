"""Unit tests for consumer.company_order: several users' updates of one company in intake order."""

from __future__ import annotations

import asyncio
import logging

import pytest

from consumer.company_order import CompanyOrder, Write

A, B = ("t", 0), ("t", 1)


def test_a_later_write_waits_for_the_earlier_ones_of_its_company_only() -> None:
    async def main() -> list[str]:
        order = CompanyOrder(wait_s=5.0)
        first = order.place(1, A, ["acme"])
        other = order.place(2, A, ["globex"])
        second = order.place(3, B, ["acme"])
        sent: list[str] = []

        async def send(name: str, writes: tuple[Write, ...], company: str, delay: float) -> None:
            await asyncio.sleep(delay)
            await order.turn(writes, company)
            sent.append(name)
            order.written(writes, company)

        await asyncio.gather(send("first", first, "acme", 0.05),
                             send("other", other, "globex", 0.0),
                             send("second", second, "acme", 0.0))
        assert len(order) == 0
        return sent

    assert asyncio.run(main()) == ["other", "first", "second"]


def test_a_write_decided_late_takes_its_intake_place_not_its_decision_time() -> None:
    """An event whose schema was fetched joins the line at its intake number: a write
    placed before it but taken after it waits for it; it never waits for that one."""
    async def main() -> list[str]:
        order = CompanyOrder(wait_s=5.0)
        later = order.place(7, A, ["acme"])
        earlier = order.place(3, A, ["acme"])  # decided after its schema was fetched
        sent: list[str] = []

        async def send(name: str, writes: tuple[Write, ...]) -> None:
            await order.turn(writes, "acme")
            sent.append(name)
            order.written(writes, "acme")

        await asyncio.gather(send("later", later), send("earlier", earlier))
        return sent

    assert asyncio.run(main()) == ["earlier", "later"]


def test_an_event_that_ends_without_writing_lets_the_others_go() -> None:
    async def main() -> None:
        order = CompanyOrder(wait_s=5.0)
        dropped = order.place(1, A, ["acme"])
        waiting = order.place(2, A, ["acme"])
        task = asyncio.create_task(order.turn(waiting, "acme"))
        await asyncio.sleep(0.01)
        assert not task.done()
        order.after(dropped)  # e.g. a duplicate, or dead-lettered before its write
        await asyncio.wait_for(task, 1.0)

    asyncio.run(main())


def test_a_revoked_partitions_writes_never_hold_the_others() -> None:
    """Events abandoned before they ran never call `after`: `forget` lets them go."""
    async def main() -> None:
        order = CompanyOrder(wait_s=5.0)
        order.place(1, A, ["acme"])
        waiting = order.place(2, B, ["acme"])
        task = asyncio.create_task(order.turn(waiting, "acme"))
        await asyncio.sleep(0.01)
        order.forget([A])
        await asyncio.wait_for(task, 1.0)
        order.after(waiting)
        assert len(order) == 0

    asyncio.run(main())


def test_a_stuck_earlier_write_is_waited_out_once_with_a_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> float:
        order = CompanyOrder(wait_s=0.1)
        order.place(1, A, ["acme"])  # its user is stuck in retries
        second, third = order.place(2, A, ["acme"]), order.place(3, A, ["acme"])
        loop = asyncio.get_running_loop()
        start = loop.time()
        await order.turn(second, "acme")
        waited = loop.time() - start
        order.written(second, "acme")
        start = loop.time()
        await order.turn(third, "acme")
        assert loop.time() - start < 0.05, "the stuck write is not waited out again"
        return waited

    with caplog.at_level(logging.WARNING):
        assert 0.1 <= asyncio.run(main()) < 1.0
    assert "company 'acme': 1 earlier update(s) not answered" in caplog.text
