"""Stream order for what several users write to one company.

A user's events keep their order (one chain per user). A company is written by all its
users (a group's company identify, an identify's `company` properties), on chains that run
side by side: two users' updates of one company went out in either order, and the older
traits could end on the company (review "events31": a user's backlog of Tracks held its
group back while another user's later group went first). Here a call that writes a company
waits until the calls writing it that were taken before it (the worker's intake order)
were answered, or COMPANY_WAIT_S passed: a user stuck in retries holds other users'
company updates no longer than that, and that company's order is then not guaranteed (a
warning says so). Events on other replicas' partitions have no order to keep: Kafka orders
a partition only.

Thread rule: event loop only (the worker's intake and the events' tasks).
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from consumer.commits import TP
from consumer.logs import shown_id

__all__ = ["COMPANY_WAIT_S", "CompanyOrder", "Write"]

log = logging.getLogger(__name__)

COMPANY_WAIT_S = 60.0
"""The longest a company write waits for the earlier writes of the same company. Long
enough for a user's chain ahead of its write to drain at a saturated budget (at most
`worker.CHAIN_MAX` events of one user are taken at once), short enough that an event stuck
in retries holds other users' updates of its company for a minute at most."""


@dataclass(slots=True, eq=False)
class Write:
    """One event's pending write of one company."""

    intake: int
    tp: TP
    company: str
    done: asyncio.Event
    waiting: bool = False  # its owner waits in `turn` (queued, not stuck)
    turned: asyncio.Event = field(default_factory=asyncio.Event)  # its owner left `turn`
    # (its request goes), or it ended


class CompanyOrder:
    """The company writes taken and not answered yet, by company, in intake order."""

    def __init__(self, wait_s: float = COMPANY_WAIT_S) -> None:
        self._wait_s = wait_s
        self._lines: dict[str, list[Write]] = {}

    def __len__(self) -> int:
        return sum(len(line) for line in self._lines.values())

    def place(self, intake: int, tp: TP, companies: Iterable[str]) -> tuple[Write, ...]:
        """Once an event is decided and has its intake number: its company writes join
        their companies' lines (a later-decided event joins at its intake position). The
        event keeps what this returns for `turn`, `written` and `after`."""
        writes = tuple(Write(intake, tp, company, asyncio.Event()) for company in companies)
        for write in writes:
            bisect.insort(self._lines.setdefault(write.company, []), write, key=_intake)
        return writes

    async def turn(self, writes: Sequence[Write], company: str,
                   fields: Mapping[str, Any] | None = None) -> None:
        """Before the request writing `company` (one of `writes`): the earlier writes of
        it were answered (or gave up their turn), or the wait ran out."""
        own = next((w for w in writes if w.company == company), None)
        line = self._lines.get(company)
        if own is None or not line:
            return
        earlier = [w for w in line if w.intake < own.intake]
        if not earlier:
            return
        own.waiting = True
        try:
            try:
                async with asyncio.timeout(self._wait_s):
                    for write in earlier:
                        await write.done.wait()
                return
            except TimeoutError:
                # Given up on: the earlier writes whose owners are not waiting their turn
                # here (stuck in retries, in a user's backlog). Those queued in `turn`
                # behind them were not stuck: ending them too let them go at once beside
                # this one, after it even (review "diff31").
                stale = [w for w in earlier if not w.done.is_set() and not w.waiting]
                if stale:
                    log.warning("company %r: %d earlier update(s) not answered after %.0f "
                                "s; this one goes first, so that company's order is not "
                                "guaranteed", shown_id(company), len(stale), self._wait_s,
                                extra=dict(fields or {}))
                for write in stale:
                    self._end(write)  # waited out once, not by every later write again
            # The earlier writes still queued here go first: each is waited for until its
            # request goes (it leaves `turn`), not until it is answered. Waited for until
            # answered, one that then met 5xx held this one for its whole retry budget,
            # far past COMPANY_WAIT_S (review "users42"). Each waits for lower intake
            # numbers only, bounded the same way, so this ends.
            for write in earlier:
                await write.turned.wait()
        finally:
            own.waiting = False
            own.turned.set()

    def written(self, writes: Sequence[Write], company: str) -> None:
        """The request writing `company` was answered (or failed for good)."""
        for write in writes:
            if write.company == company:
                self._end(write)

    def after(self, writes: Sequence[Write]) -> None:
        """The event's job ended (whatever its outcome): none of its writes is to come."""
        for write in writes:
            self._end(write)

    def forget(self, parts: Collection[TP]) -> None:
        """The partitions went: their events' writes were abandoned, some before they ran."""
        gone = set(parts)
        for line in list(self._lines.values()):
            for write in [w for w in line if w.tp in gone]:
                self._end(write)

    def _end(self, write: Write) -> None:
        write.done.set()
        write.turned.set()
        line = self._lines.get(write.company)
        if line is not None and write in line:
            line.remove(write)
            if not line:
                del self._lines[write.company]


def _intake(write: Write) -> int:
    return write.intake
