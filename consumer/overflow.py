"""Messages polled past a full window, and the pace of finished events that sizes them.

Why it exists: a resumed partition's first fetch waits for librdkafka's broker thread, up
to a second (measured: 950 ms from resume to the first message, whatever the fetch
settings), and a pause discards what was fetched. When the window holds less than two such
waits of work (deliveries faster than half of WORKER_MAX_IN_FLIGHT per second), that wait
empties it: pausing at every full window held delivery at 20 ms latency to ~410 events/s
(2,500 at `5aa140f`, whose synchronous commits freed the window before it filled), and at
50 ms to one window per resume, 200 events/s (a pace that, measured against "faster than
one window a second", kept itself below it). Then about OVERFLOW_SECONDS of messages at the
current pace wait here instead. Slower (Userpilot's 10 requests/s against a window of 200)
the window itself outlasts the wait: no overflow, and pausing, with its fair rotation over
partitions, works as before. Waiting messages are not taken: not in the window, not
committed, read again after a crash or by the next owner.

Since round 37 a resume seeks the partitions it had paused, with messages left, to their
own positions, which wakes the broker thread (`KafkaSource._wake`): the first fetch comes
within milliseconds, not a second. The threshold (RESUME_WAIT_S) is kept as measured: at
these paces the overflow still spares a pause, and the refetch of what librdkafka had
prefetched, every few hundredths of a second. Its size is a third of what it was (0.25 s of
intake, 0.75 before round 38): delivery at 20 and 50 ms read the same, the peak RSS of a
backlog into 50 ms ~0.4 MB lower (RESULTS.md, "Round 38"); a partition the wake cannot seek
(no position yet) may still wait its second.

Thread rule: event loop only (the worker's intake); nothing here locks.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from typing import Generic, Protocol, TypeVar

__all__ = ["MIN_PACE_EVENTS", "MIN_PACE_SPAN_S", "OVERFLOW_SECONDS", "RATE_SPAN_S",
           "RESUME_WAIT_S", "Overflow", "Polled"]

OVERFLOW_SECONDS = 0.25  # polled messages kept beyond a full window: this long of intake
RATE_SPAN_S = 2.0  # the pace of finished events is measured over this span
MIN_PACE_SPAN_S = 0.1  # ... or since the first intake, when shorter, but not under this
MIN_PACE_EVENTS = 50  # ... and only once this many (and half a window) finished: not noise
RESUME_WAIT_S = 1.0  # a resumed partition's first fetch without the seek (see above)

TP = tuple[str, int]


class Polled(Protocol):
    """What the overflow reads of a polled message (confluent-kafka's `Message`)."""

    def topic(self) -> str | None: ...
    def partition(self) -> int | None: ...
    def error(self) -> object | None: ...


M = TypeVar("M", bound=Polled)


class Overflow(Generic[M]):
    """The waiting messages (poll order, so per partition offset order) and the pace."""

    def __init__(self, max_in_flight: int, max_waiting: int) -> None:
        self.max_in_flight = max_in_flight
        self.max_waiting = max_waiting  # the cap never exceeds it (a few of the largest polls)
        self.waiting: deque[M] = deque()
        # (time, events finished) per poll, their sum kept as entries come and go, and the
        # first intake since the log was last empty.
        self.pace_log: deque[tuple[float, int]] = deque()
        self.pace_total = 0
        self.pace_since: float | None = None
        self._finished_seen = 0  # the worker's count of finished events at the last note
        self._returned = 0  # messages put back at the front since the last `take`

    def __len__(self) -> int:
        return len(self.waiting)

    def __bool__(self) -> bool:
        return bool(self.waiting)

    def cap(self) -> int:
        """The overflow's size: what polls fill it to and it drains back to (partitions
        pause once it holds twice this with the window full). 0 while the window outlasts
        a resumed partition's first fetch, else about OVERFLOW_SECONDS of intake at the
        current pace, never over `max_waiting`."""
        now = time.monotonic()
        log = self.pace_log
        while log and now - log[0][0] > RATE_SPAN_S:
            self.pace_total -= log.popleft()[1]
            if not log:
                self.pace_since = None  # idle for RATE_SPAN_S: the next intake starts anew
        # Events finished per second, over RATE_SPAN_S; at start, over the time since the
        # first intake once half a window (and MIN_PACE_EVENTS) finished: the first full
        # window came 0.1 s after the first message, when a 2 s span read 2,000 events/s
        # as 50 and paused every partition (their refetch: 0.3 s without a message).
        span, since = RATE_SPAN_S, self.pace_since
        if since is not None and self.pace_total >= max(MIN_PACE_EVENTS,
                                                        self.max_in_flight // 2):
            span = min(span, max(MIN_PACE_SPAN_S, now - since))
        pace = self.pace_total / span
        if pace * 2 * RESUME_WAIT_S <= self.max_in_flight:
            return 0
        return min(self.max_waiting, int(pace * OVERFLOW_SECONDS))

    def note_pace(self, scheduled: int, finished_total: int) -> None:
        """After a poll's intake: `scheduled` events were taken (the first starts the
        span); `finished_total`: events finished so far (the pace counts those since the
        last call)."""
        if scheduled and self.pace_since is None:
            self.pace_since = time.monotonic()
        finished, self._finished_seen = finished_total - self._finished_seen, finished_total
        if finished:
            self.pace_log.append((time.monotonic(), finished))
            self.pace_total += finished

    def take(self, messages: Sequence[M], room: int, owns: Callable[[TP], bool],
             arrived: Callable[[TP], None], held: Collection[TP] = ()) -> Sequence[M]:
        """What to take now: up to `room` messages, the waiting ones first, in poll order;
        the rest waits. A message of a partition `owns` denies (revoked meanwhile) does not
        wait for a re-assignment; `arrived` hears once per partition that brought one.
        Messages of `held` partitions stay, in order, however much room there is."""
        self._returned = 0
        if not self.waiting and len(messages) <= room and not held:
            return messages  # the common case: nothing waiting, no copy
        waiting = self.waiting
        owned: dict[TP, bool] = {}
        for message in messages:
            topic, partition = message.topic(), message.partition()
            if message.error() is None and topic is not None and partition is not None:
                tp = (topic, partition)
                mine = owned.get(tp)
                if mine is None:
                    mine = owned[tp] = owns(tp)
                    arrived(tp)
                if not mine:
                    continue
            waiting.append(message)
        if not held:
            return [waiting.popleft() for _ in range(min(room, len(waiting)))]
        out: list[M] = []
        kept: deque[M] = deque()
        while waiting and len(out) < room:
            message = waiting.popleft()
            if (message.topic(), message.partition()) in held:
                kept.append(message)
            else:
                out.append(message)
        kept.extend(waiting)
        self.waiting = kept
        return out

    def free(self, held: Collection[TP]) -> int:
        """Waiting messages that can be taken: not of `held` partitions (those wait for
        their partition, and must neither fill the overflow nor keep the poll from
        waiting)."""
        if not held:
            return len(self.waiting)
        return sum(1 for m in self.waiting if (m.topic(), m.partition()) not in held)

    def put_back(self, messages: Sequence[M]) -> None:
        """Messages handed out but not taken (the intake deferred them), ahead of every
        waiting one (they came first) and after those put back since the last `take` (the
        same batch's earlier slices): put first each time, a later slice's went ahead of
        an earlier one's, and a partition's offsets were taken out of order."""
        at = self._returned
        for i, message in enumerate(messages):
            self.waiting.insert(at + i, message)
        self._returned = at + len(messages)

    def forget(self, parts: Sequence[TP]) -> None:
        """Drop waiting messages of partitions no longer ours."""
        gone = set(parts)
        if self.waiting and gone:
            front = list(itertools.islice(self.waiting, self._returned))
            self._returned = sum(1 for m in front if (m.topic(), m.partition()) not in gone)
            self.waiting = deque(m for m in self.waiting
                                 if (m.topic(), m.partition()) not in gone)
