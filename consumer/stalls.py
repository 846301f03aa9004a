"""The event loop not running for a while: a process frozen (SIGSTOP, a paused VM, a node
short of memory) or starved of CPU. Two things break across such a stall, each mended here:

- A deadline that came due while the loop was stopped fires at once on resume, before the
  answer waiting in its socket is read: the call "timed out" though it was answered.
  `StallAwareDeadline` does not count the stopped time (round 33: requests sent twice;
  review "freeze57": Redis claims failed, so events went out unchecked and twice).
- A stall longer than the group's session lets the coordinator give this member's
  partitions to another replica; on resume, the requests that had waited for their rate
  slot went out before the poll thread heard of the loss, after the new owner had sent
  them (review "freeze57": 2-3 events per freeze, and a user's older traits written over
  newer ones). `StallWatch` holds every request after such a stall until the poll thread
  has served librdkafka's callbacks: the lost partitions' events are halted by then.

Thread rule: event loop only, except `StallWatch.polled`'s argument, a clock reading.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Callable
from types import TracebackType

__all__ = ["LATE_S", "STALL_S", "TICK_S", "StallAwareDeadline", "StallWatch"]

log = logging.getLogger(__name__)

STALL_S = 1.0
"""A deadline that fires this much later than it was due found the event loop stalled (a
frozen process, a paused VM, a loop blocked): the answer may have come meanwhile, unread.
A loop under load is late by milliseconds, never by a second."""
LATE_S = 0.05
"""A deadline that fires this much late, and less than STALL_S, found the loop busy (a CPU
limit, a large event mapped): it waits this long once more, so an answer that came while
the loop was busy is read before the call is cut (review "limits57": Redis claims failed
against a Redis answering in 14 ms, at the chart's CPU limit)."""
TICK_S = 0.25
"""How often `StallWatch` notes that the loop runs."""


class StallAwareDeadline:
    """`asyncio.timeout(seconds)` that does not count time the event loop did not run.

    Why: a replica frozen past the deadline (SIGSTOP, a paused VM) resumes with its answers
    waiting in the sockets, and the overdue deadline cut the call before they were read:
    an HTTP request was sent again, although Userpilot had accepted it (round 33: every
    request on the wire during a freeze of 2x the request timeout), a Redis claim failed.
    A deadline that fires more than STALL_S late finds the loop stalled: it starts again,
    whole, so the answers that came meanwhile are read first (the loop serves ready
    sockets before due timers) and a call that went out only at the resume gets its time;
    one with no answer still ends, that much later.
    """

    __slots__ = ("_graced", "_handle", "_loop", "_restarted", "_seconds", "_timeout")

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self._loop = asyncio.get_running_loop()
        self._timeout = asyncio.timeout(None)
        self._handle: asyncio.TimerHandle | None = None
        self._restarted = self._graced = False

    def _due(self, when: float) -> None:
        now = self._loop.time()
        late = now - when
        if late > STALL_S and not self._restarted:
            # Once: a loop whose every turn is that long (a quarter of a core mapping large
            # events) restarted a hung Redis's call for ever (review "diff57b").
            self._restarted = True
            again = now + self._seconds
        elif late > LATE_S and not self._graced:
            self._graced = True  # once: a loop busy for good still ends the call
            again = now + LATE_S
        else:
            self._timeout.reschedule(now)  # expires at once: the task is cancelled
            return
        self._handle = self._loop.call_at(again, self._due, again)

    async def __aenter__(self) -> None:
        await self._timeout.__aenter__()
        when = self._loop.time() + self._seconds
        self._handle = self._loop.call_at(when, self._due, when)

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._handle is not None:
            self._handle.cancel()
        await self._timeout.__aexit__(exc_type, exc, tb)  # raises TimeoutError once expired


class StallWatch:
    """Whether requests may go out: not after a stall of `long_s` or more (the group may
    have expired this member's session meanwhile) until a consume that began `hold_s`
    after the stall was noticed has returned (`polled`). librdkafka learns of a lost
    session within a heartbeat of the resume (its overdue heartbeat is answered
    UNKNOWN_MEMBER_ID, and it checks the session itself), and serves the lost assignment
    in the next consume, whose callback halts the partitions' events before returning.

    Noticed at the first of the watch's tick (every TICK_S) or a request's `passable`: on
    resume, a request whose rate slot came due during the stall may run before the tick.
    """

    def __init__(self, long_s: float, hold_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._long = long_s
        self._hold = hold_s
        self._clock = clock
        self._ran = clock()  # when the loop was last seen running
        self._noticed: float | None = None  # the stall requests wait out, noticed then
        self._open: asyncio.Event | None = None  # made on the loop, on first need

    def _check(self) -> None:
        now = self._clock()
        stopped = now - self._ran
        self._ran = now
        if stopped >= self._long:
            if self._noticed is None:
                # Outside the event's context whose request noticed it: the whole process
                # stalled, not that event (its fields were on the line, review "diff57b").
                contextvars.Context().run(
                    log.warning, "the worker did not run for %.1f s (frozen, paused or "
                    "starved of CPU): requests wait until Kafka says which partitions are "
                    "still this replica's", stopped)
            self._noticed = now
            if self._open is not None:
                self._open.clear()

    async def run(self) -> None:
        """The tick, from the worker's start (not the watch's making: start-up checks ran
        between): notes that the loop runs, so a stall is measured from its start."""
        self._ran = self._clock()
        while True:
            await asyncio.sleep(TICK_S)
            self._check()

    def polled(self, started: float) -> None:
        """A consume that began at `started` (this watch's clock) returned: its callbacks
        (a lost or revoked assignment) have run."""
        noticed = self._noticed
        if noticed is not None and started >= noticed + self._hold:
            self._noticed = None
            if self._open is not None:
                self._open.set()

    def release(self) -> None:
        """Kafka told, or nothing more will be asked of it: a rebalance callback runs (the
        group's verdict on this member after the stall: its partitions lost, or some
        revoked and the rest kept), or the worker stops. Requests go: a drain waits for a
        half-sent event's next call, and held here it waited out the whole grace, then
        called the unsent call cut on the wire (review "diff57b")."""
        self._noticed = None
        self._ran = self._clock()  # the stall is dealt with: not noticed again at the tick
        if self._open is not None:
            self._open.set()

    async def passable(self) -> None:
        """Return when a request may go out (at once, unless a stall is being waited out)."""
        self._check()
        if self._noticed is None:
            return
        if self._open is None:
            self._open = asyncio.Event()
        while self._noticed is not None:
            self._open.clear()
            await self._open.wait()
