"""Unit tests for consumer.company_order: several users' updates of one company in intake order."""

from __future__ import annotations

import asyncio
import logging
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abc"), st.floats(0, 0.003), st.booleans()),
                min_size=1, max_size=12),
       st.randoms(use_true_random=False))
def test_each_companys_writes_go_in_intake_order_whatever_the_timing(
        writes: list[tuple[str, float, bool]], rnd: random.Random) -> None:
    """Writes placed in a shuffled order (decided late), started in a shuffled order after
    random delays, some events ending without their write: each company's writes that are
    sent go in intake order, and nothing waits for ever."""
    async def main() -> list[tuple[str, int]]:
        order = CompanyOrder(wait_s=5.0)
        placed = [(intake, company, delay, sends)
                  for intake, (company, delay, sends) in enumerate(writes, 1)]
        rnd.shuffle(placed)
        lines = {intake: order.place(intake, A, [company])
                 for intake, company, _, _ in placed}
        sent: list[tuple[str, int]] = []

        async def run(intake: int, company: str, delay: float, sends: bool) -> None:
            await asyncio.sleep(delay)
            if not sends:
                order.after(lines[intake])
                return
            await order.turn(lines[intake], company)
            sent.append((company, intake))
            await asyncio.sleep(0)
            order.written(lines[intake], company)
            order.after(lines[intake])

        await asyncio.wait_for(asyncio.gather(*(run(*p) for p in placed)), 2.0)
        assert len(order) == 0
        return sent

    sent = asyncio.run(main())
    for company in "abc":
        mine = [intake for c, intake in sent if c == company]
        assert mine == sorted(mine)


def test_a_timeout_gives_up_on_the_stuck_write_only_not_on_those_queued_behind_it() -> None:
    """Review "diff31": A is stuck; C times out waiting and ended every unanswered earlier
    write, B too, which only waited its turn behind A: B went beside C, after it even,
    and D then waited for C alone."""
    async def main() -> list[str]:
        order = CompanyOrder(wait_s=0.2)
        order.place(1, A, ["c"])  # its owner is stuck: never answered
        b, c, d = (order.place(i, A, ["c"]) for i in (2, 3, 4))
        sent: list[str] = []

        async def go(name: str, writes: tuple[Write, ...], delay: float) -> None:
            await asyncio.sleep(delay)
            await order.turn(writes, "c")
            sent.append(name)
            await asyncio.sleep(0.05)
            order.written(writes, "c")

        await asyncio.wait_for(asyncio.gather(go("C", c, 0.0), go("B", b, 0.1),
                                              go("D", d, 0.21)), 5.0)
        return sent

    assert asyncio.run(main()) == ["B", "C", "D"]


def test_a_write_queued_behind_another_in_retries_waits_for_its_request_not_its_answer() -> None:
    """Review "users42": A stuck; C times out and gives A up; B, queued and not given up,
    went next, and C waited for B's answer: B in retries (up to the retry budget, 900 s)
    held C, its user's chain and its partition's commits, past COMPANY_WAIT_S. C now goes
    once B's request has gone."""
    async def main() -> tuple[list[str], float]:
        order = CompanyOrder(wait_s=0.2)
        order.place(1, A, ["c"])  # its owner is stuck: never answered
        b, c = (order.place(i, A, ["c"]) for i in (2, 3))
        sent: list[str] = []
        loop = asyncio.get_running_loop()
        start = loop.time()

        async def go(name: str, writes: tuple[Write, ...], delay: float, answer_s: float
                     ) -> None:
            await asyncio.sleep(delay)
            await order.turn(writes, "c")
            sent.append(name)
            await asyncio.sleep(answer_s)  # its request, answered (or given up) this late
            order.written(writes, "c")

        stuck = asyncio.create_task(go("B", b, 0.1, 30.0))
        await asyncio.wait_for(go("C", c, 0.0, 0.0), 5.0)
        waited = loop.time() - start
        stuck.cancel()
        return sent, waited

    sent, waited = asyncio.run(main())
    assert sent == ["B", "C"]  # B's request first, as its intake says
    assert waited < 1.0, f"C waited {waited:.1f} s"


def test_the_wait_warning_quotes_a_long_company_id_cut(
        caplog: pytest.LogCaptureFixture) -> None:
    """A 500,000-character groupId made a 500 KB warning line, which container runtimes
    split at 16 KB; cut as messageIds are (review "sec45")."""
    company = "c" * 500_000

    async def main() -> None:
        order = CompanyOrder(wait_s=0.01)
        order.place(1, A, [company])  # stuck in retries: never answered
        second = order.place(2, A, [company])
        await order.turn(second, company)

    with caplog.at_level(logging.WARNING, logger="consumer.company_order"):
        asyncio.run(main())
    [record] = [r for r in caplog.records if "not answered" in r.getMessage()]
    assert 100 < len(record.getMessage()) < 400
