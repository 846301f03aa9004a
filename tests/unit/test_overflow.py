"""`consumer.overflow`: how many polled messages wait past a full window, and in what order
they are taken. The worker's runs with an overflow are in `test_worker.py` and
`test_worker_overflow.py`."""

from __future__ import annotations

import time
from dataclasses import dataclass

from consumer.overflow import OVERFLOW_SECONDS, RATE_SPAN_S, Overflow

MAX_WAITING = 2_000

TOPIC = "signal"


@dataclass(frozen=True)
class Msg:
    tp: tuple[str, int]
    offset: int
    failed: bool = False

    def topic(self) -> str:
        return self.tp[0]

    def partition(self) -> int:
        return self.tp[1]

    def error(self) -> object | None:
        return "broker down" if self.failed else None


def finished(overflow: Overflow[Msg], at: float, count: int) -> None:
    overflow.pace_log.append((at, count))
    overflow.pace_total += count


def test_an_overflow_only_when_the_window_holds_under_two_seconds_of_work() -> None:
    overflow: Overflow[Msg] = Overflow(200, MAX_WAITING)
    assert overflow.cap() == 0, "nothing finished yet: a full window pauses at once"
    now = time.monotonic()
    for at, count in ((now - 5.0, 10_000), (now - 0.5, 150), (now, 50)):
        finished(overflow, at, count)
    assert overflow.cap() == 0, "100 per second (the last RATE_SPAN_S): no overflow"
    assert overflow.pace_total == 200, "what left the span no longer counts"
    finished(overflow, now, 200)
    assert overflow.cap() == int(400 / RATE_SPAN_S * OVERFLOW_SECONDS)
    finished(overflow, now, 100_000)
    assert overflow.cap() == MAX_WAITING


def test_a_larger_window_outlasts_a_faster_pace() -> None:
    small, large = Overflow[Msg](100, MAX_WAITING), Overflow[Msg](1_000, MAX_WAITING)
    now = time.monotonic()
    for overflow in (small, large):
        finished(overflow, now, 400)  # 200 a second
    assert small.cap() == int(200 * OVERFLOW_SECONDS), "100 is under two seconds of 200/s"
    assert large.cap() == 0, "1,000 is five seconds of 200/s: pausing costs nothing"


def test_at_start_the_pace_is_measured_since_the_first_intake() -> None:
    overflow: Overflow[Msg] = Overflow(200, MAX_WAITING)
    now = time.monotonic()
    finished(overflow, now, 150)
    assert overflow.cap() == 0, "no intake recorded: over RATE_SPAN_S, 75 a second"
    at_1500 = int(1500 * OVERFLOW_SECONDS)
    overflow.pace_since = now - 0.1
    assert at_1500 - 10 <= overflow.cap() <= at_1500, \
        "150 finished 0.1 s after the first intake: 1,500 a second, not 75"
    overflow.pace_since = now - 0.01
    assert overflow.cap() == at_1500, "never over less than MIN_PACE_SPAN_S"
    overflow.pace_since = now - 30.0
    assert overflow.cap() == 0, "long after the start: RATE_SPAN_S again"
    overflow.pace_since = now - 0.1
    overflow.pace_total = 99
    assert overflow.cap() == 0, "under half a window finished: too few to trust"
    overflow.pace_log.clear()
    overflow.pace_log.append((now - RATE_SPAN_S - 1, 99))
    overflow.cap()
    assert overflow.pace_since is None, "idle for RATE_SPAN_S: the next intake starts anew"
    assert overflow.pace_total == 0


def test_the_pace_counts_what_finished_and_starts_at_the_first_intake() -> None:
    overflow: Overflow[Msg] = Overflow(200, MAX_WAITING)
    overflow.note_pace(0, 0)
    assert overflow.pace_since is None, "an idle poll (nothing taken) starts no span"
    assert not overflow.pace_log, "nothing finished: nothing logged"
    overflow.note_pace(3, 0)
    started = overflow.pace_since
    assert started is not None
    overflow.note_pace(5, 7)
    assert overflow.pace_since == started, "the span starts once"
    assert overflow.pace_total == 7 and [n for _, n in overflow.pace_log] == [7]
    overflow.note_pace(1, 7)
    assert overflow.pace_total == 7, "a running total: nothing new finished, nothing logged"


def test_waiting_messages_are_taken_first_in_poll_order() -> None:
    overflow: Overflow[Msg] = Overflow(200, MAX_WAITING)
    mine = {(TOPIC, 0), (TOPIC, 1)}
    arrived: list[tuple[str, int]] = []
    a = [Msg((TOPIC, 0), i) for i in range(6)]

    def take(messages: list[Msg], room: int) -> list[Msg]:
        return list(overflow.take(messages, room, mine.__contains__, arrived.append))

    batch = a[:2]
    assert overflow.take(batch, 5, mine.__contains__, arrived.append) is batch, \
        "room for all and nothing waiting: the batch itself, no copy"
    assert not arrived, "the common case asks nothing per partition"
    assert take(a[2:5], 1) == [a[2]]
    assert list(overflow.waiting) == a[3:5] and len(overflow) == 2 and overflow
    assert arrived == [(TOPIC, 0)], "once per partition and poll"
    assert take([a[5]], 2) == a[3:5], "the waiting ones first"
    assert take([], 0) == [] and list(overflow.waiting) == [a[5]]
    other = Msg((TOPIC, 1), 0)
    overflow.waiting.append(other)
    overflow.forget([(TOPIC, 0)])
    assert list(overflow.waiting) == [other], "a revoked partition's waiting messages go"
    stray = Msg((TOPIC, 2), 0)  # a partition not (or no longer) assigned
    assert take([stray, a[0]], 0) == []
    assert list(overflow.waiting) == [other, a[0]], "nothing of it waits"
    failed = Msg((TOPIC, 2), -1, failed=True)
    assert take([failed], 0) == [] and list(overflow.waiting)[-1] is failed, \
        "an error message waits in order too: the intake reports it"
    overflow.waiting.clear()
    assert not overflow and len(overflow) == 0


def test_held_partitions_wait_in_order_and_others_pass_them() -> None:
    """A partition whose message the intake deferred (the SCHEMA_WAIT window full) waits
    whole, in order, however much room there is; the others are taken past it."""
    overflow: Overflow[Msg] = Overflow(200, MAX_WAITING)
    p0, p1 = (TOPIC, 0), (TOPIC, 1)
    mine = {p0, p1}
    a = [Msg(p0, i) for i in range(3)]
    b = [Msg(p1, i) for i in range(3)]
    overflow.put_back([a[0], a[1]])  # deferred by the intake: first again
    got = overflow.take([b[0], a[2], b[1]], 10, mine.__contains__, lambda _: None, {p0})
    assert list(got) == [b[0], b[1]]
    assert list(overflow.waiting) == [a[0], a[1], a[2]], "held, in order"
    assert overflow.free({p0}) == 0 and overflow.free(()) == 3
    assert list(overflow.take([b[2]], 10, mine.__contains__, lambda _: None, ())) == \
        [a[0], a[1], a[2], b[2]], "released: taken first, in poll order"
    overflow.put_back([b[0]])
    assert list(overflow.take([], 0, mine.__contains__, lambda _: None, {p0})) == []
    assert list(overflow.waiting) == [b[0]], "no room: nothing taken"


def test_messages_put_back_slice_after_slice_keep_their_order() -> None:
    """The intake defers a held partition's messages slice by slice: each slice's went
    first, ahead of the earlier slices', and the partition's offsets came back out of
    order (its log looked replaced)."""
    overflow: Overflow[Msg] = Overflow(200, MAX_WAITING)
    p0, p1 = (TOPIC, 0), (TOPIC, 1)
    mine = {p0, p1}
    a = [Msg(p0, i) for i in range(4)]
    later = Msg(p1, 0)
    overflow.waiting.append(later)  # polled after the batch being taken
    overflow.put_back([a[0], a[1]])  # the first slice's
    overflow.put_back([a[2]])  # the next slice's
    assert list(overflow.waiting) == [a[0], a[1], a[2], later]
    overflow.forget([p1])
    overflow.put_back([a[3]])  # a revoke of another partition between slices
    assert list(overflow.waiting) == [a[0], a[1], a[2], a[3]]
    b = Msg(p1, 1)
    overflow.take([], 0, mine.__contains__, lambda _: None, {p0})
    overflow.put_back([b])  # a later batch's (a[0..3] were held, never handed out)
    assert list(overflow.waiting) == [b, a[0], a[1], a[2], a[3]]
