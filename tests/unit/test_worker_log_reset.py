"""A partition's log that goes back under the worker: its topic deleted and created again
(faster than librdkafka's metadata refresh notices) or its log truncated, and librdkafka's
position reset to the new log's start. The worker tracks the partition anew: its commits
follow the new log's unfinished events, and its window counts them (review "offsets16":
the old tracker ignored every offset up to the old log's end, so the worker committed past
an event of the new log still retrying, and its window stopped counting)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from consumer.commits import TP
from consumer.errors import UnreadableBatch
from consumer.logresets import _Reset
from consumer.offsets import Finished, decode_note
from tests.unit.test_worker import (
    TOPIC,
    FakeSource,
    Message,
    codec_seq,
    drive,
    known_schema,
    make,
    track,
    until,
)
from tests.unit.test_worker_stuck import HeldUser

WINDOW = 10
OLD, NEW = 30, 40
STUCK = 2  # the new log's offset whose user Userpilot holds


@dataclass
class Replacing(FakeSource):
    """Replaces a partition's log (`replace_next`) during a consume and reads the new one
    from offset 0, as librdkafka does once its old position is out of range."""

    replace_next: dict[TP, list[Message]] = field(default_factory=dict)

    def consume(self, max_messages: int, timeout_s: float) -> list[Message]:
        if self.replace_next:
            parts, self.replace_next = self.replace_next, {}
            for tp, messages in parts.items():
                self.log[tp] = messages
                self.position[tp] = 0
        return super().consume(max_messages, timeout_s)

    def last_commit(self, tp: TP) -> int | None:
        """The partition's latest commit (a new log's is below the old log's)."""
        return next((batch[tp] for batch in reversed(self.commits) if tp in batch), None)


def test_a_log_that_went_back_is_tracked_anew() -> None:
    tp = (TOPIC, 0)
    old = [Message(TOPIC, 0, i, f"o{i}".encode(), track(f"o{i}", i)) for i in range(OLD)]
    new = [Message(TOPIC, 0, i, f"n{i}".encode(),
                   track("stuck" if i == STUCK else f"n{i}", 100 + i)) for i in range(NEW)]
    client = HeldUser()
    run = make({tp: old}, registry=known_schema(), client=client, source_type=Replacing,
               WORKER_MAX_IN_FLIGHT=str(WINDOW), USERPILOT_ENSURE_USER="false")
    peak = [0]

    async def scenario(source: FakeSource) -> None:
        assert isinstance(source, Replacing)
        await until(lambda: source.last_commit(tp) == OLD, "the old log committed")
        source.replace_next = {tp: list(new)}

        def delivered() -> int:
            peak[0] = max(peak[0], run.worker.commits.in_window_by_partition().get(tp, 0))
            return len(client.bodies)

        await until(lambda: delivered() == OLD + NEW - 1, "the new log but its stuck event",
                    timeout=15)
        await until(lambda: source.last_commit(tp) == STUCK, "the commit held at the stuck "
                    f"event (last: {source.last_commit(tp)})")
        client.release.set()
        await until(lambda: source.last_commit(tp) == NEW, "the new log committed", 10)

    assert drive(run, scenario) == 0
    assert sorted(codec_seq(b) for b in client.bodies) == (
        list(range(OLD)) + list(range(100, 100 + NEW)))
    assert peak[0] <= WINDOW, "the window counts the new log's events"
    resets = run.worker.m.log_resets.labels(TOPIC)._value.get()
    assert resets == 1


def test_the_commit_reaches_past_markers_the_consumer_never_hands_over() -> None:
    """A transactional topic: each transaction ends in a commit marker, an aborted one's
    records are never handed over. The commit goes to the consumer's position, past them,
    so the lag reaches 0 (it stopped at the last marker: a lag of 1 for ever, of the whole
    batch behind an aborted transaction at the end)."""
    tp, other = (TOPIC, 0), (TOPIC, 1)
    offsets = [0, 1, 2, 3, 9, 10, 11]  # 4: a marker, 5-7 aborted, 8 its marker
    log = {tp: [Message(TOPIC, 0, o, f"u{o}".encode(), track(f"u{o}", o)) for o in offsets],
           other: [Message(TOPIC, 1, 0, b"stuck", track("stuck", 50))]}
    client = HeldUser()
    run = make(log, registry=known_schema(), client=client, source_type=Replacing,
               USERPILOT_ENSURE_USER="false")

    async def scenario(source: FakeSource) -> None:
        assert isinstance(source, Replacing)
        source.ends = {tp: 520, other: 7}  # an aborted batch after the last message
        await until(lambda: source.last_commit(tp) == 520, "the commit at the log's end "
                    f"(last: {source.last_commit(tp)})")
        assert source.last_commit(other) in (None, 0), "held by its unfinished event"
        client.release.set()
        await until(lambda: source.last_commit(other) == 7, "the other partition's end")

    assert drive(run, scenario) == 0
    assert sorted(codec_seq(b) for b in client.bodies) == [*offsets, 50]


@dataclass
class NotedReplacing(Replacing):
    """... after a previous owner whose commit (offset 0) named 2..OLD-1 finished."""

    ahead: dict[TP, Finished] = field(
        default_factory=lambda: {(TOPIC, 0): Finished([(2, OLD - 1)])})


def test_the_old_logs_note_skips_nothing_of_the_new_log() -> None:
    """Review core40: the previous owner's note (its finished offsets above the commit)
    was read once per slice of a polled batch. A log that went back inside that slice
    kept it: the new log's records at the note's offsets were skipped as finished, then
    committed, never sent."""
    tp = (TOPIC, 0)
    old = [Message(TOPIC, 0, i, f"o{i}".encode(), track("stuck" if i == 0 else f"o{i}", i))
           for i in range(OLD)]
    new = [Message(TOPIC, 0, i, f"n{i}".encode(), track(f"n{i}", 100 + i)) for i in range(NEW)]
    client = HeldUser()  # holds the old log's offset 0: the note is never passed
    run = make({tp: old}, registry=known_schema(), client=client, source_type=NotedReplacing,
               USERPILOT_ENSURE_USER="false")

    async def scenario(source: FakeSource) -> None:
        assert isinstance(source, Replacing)
        await until(lambda: bool(client.held), "the old log's first event held")
        await until(lambda: run.worker.commits.high(tp) == OLD - 1, "the old log read")
        source.replace_next = {tp: list(new)}
        await until(lambda: source.last_commit(tp) == NEW, "the new log committed")
        client.release.set()

    assert drive(run, scenario) == 0
    sent = {codec_seq(b) for b in client.bodies}
    assert sent >= set(range(100, 100 + NEW)), "every record of the new log delivered"
    assert run.worker.m.log_resets.labels(TOPIC)._value.get() == 1


@dataclass
class NotedAbove(FakeSource):
    """A previous owner's commit at offset 100 named 101..150 finished; this log starts at 0
    (Kafka found 100 out of range: the log was replaced or truncated)."""

    ahead: dict[TP, Finished] = field(
        default_factory=lambda: {(TOPIC, 0): Finished([(101, 150)], 100)})


def test_a_note_above_where_the_log_starts_skips_nothing_of_it() -> None:
    """Review topo45: the note of a commit past the log's end (a topic recreated under a
    running worker, a truncated log) was kept when Kafka reset to the log's start: the new
    log's records at 101..150 were skipped as finished, committed and never sent."""
    tp = (TOPIC, 0)
    log = [Message(TOPIC, 0, i, f"u{i}".encode(), track(f"u{i}", i)) for i in range(200)]
    run = make({tp: log}, registry=known_schema(), source_type=NotedAbove,
               USERPILOT_ENSURE_USER="false")

    async def scenario(source: FakeSource) -> None:
        await until(lambda: source.committed().get(tp) == 200, "the commit at the end")

    assert drive(run, scenario) == 0
    assert sorted(codec_seq(b) for b in run.client.bodies) == list(range(200))
    assert run.worker.m.already_finished._value.get() == 0


@dataclass
class NotedAboveLate(NotedAbove):
    """... whose note the coordinator gives only when asked again, once the log's first
    records were taken."""

    notes_unanswered: int = 1


def test_a_note_above_where_the_log_starts_read_late_skips_nothing_of_it() -> None:
    """Review diff45b: the note was dropped only when it was there at the partition's first
    offset; read on a retry, it was installed as is, and 101..150 never sent."""
    tp = (TOPIC, 0)
    log = [Message(TOPIC, 0, i, f"u{i}".encode(), track(f"u{i}", i)) for i in range(200)]
    run = make({tp: log[:10]}, registry=known_schema(), source_type=NotedAboveLate,
               USERPILOT_ENSURE_USER="false")

    async def scenario(source: FakeSource) -> None:
        await until(lambda: len(run.client.bodies) == 10, "the first records sent")
        await until(lambda: len(source.ahead_asked) >= 2, "the note read again")
        source.log[tp].extend(log[10:])
        await until(lambda: source.committed().get(tp) == 200, "the commit at the end")

    assert drive(run, scenario) == 0
    assert sorted(codec_seq(b) for b in run.client.bodies) == list(range(200))


@dataclass
class CoordinatorNotes(FakeSource):
    """The coordinator answers the note read only on its third try, then with what it holds
    by then (the committed offset and its note, as `KafkaSource.finished_ahead` reads it)."""

    notes_unanswered: int = 2

    def finished_ahead(self, parts: Sequence[TP], timeout_s: float
                       ) -> tuple[dict[TP, Finished], list[TP]]:
        self.ahead = {tp: decode_note(note, offset)
                      for tp, (offset, note) in self.stored.items() if note}
        return super().finished_ahead(parts, timeout_s)


def test_a_note_read_late_that_is_the_workers_own_is_not_another_logs(
        caplog: pytest.LogCaptureFixture) -> None:
    """Read on a retry after this worker's own commit, the note is that commit's: taken for
    another log's, a healthy log was reported "replaced or truncated" (review "diff45c")."""
    tp = (TOPIC, 0)
    log = [Message(TOPIC, 0, i, f"u{i}".encode(), track("stuck" if i == 5 else f"u{i}", i))
           for i in range(30)]
    client = HeldUser()
    run = make({tp: log}, registry=known_schema(), client=client,
               source_type=CoordinatorNotes, USERPILOT_ENSURE_USER="false",
               WORKER_COMMIT_INTERVAL_SECONDS="0.1")

    async def scenario(source: FakeSource) -> None:
        await until(lambda: source.stored.get(tp, (0, ""))[0] == 5
                    and bool(source.stored[tp][1]), "its own commit at 5, with a note")
        await until(lambda: len(source.ahead_asked) >= 3, "the note read a third time", 6)
        client.release.set()
        await until(lambda: source.committed().get(tp) == 30, "the commit at the end")

    with caplog.at_level(logging.INFO, logger="consumer.worker"):
        assert drive(run, scenario) == 0
    said = [r.getMessage() for r in caplog.records]
    assert not [line for line in said if "replaced or truncated" in line]
    # ... nor that previous owners' events are skipped: none are (review "diff45d").
    assert not [line for line in said if "previous owners finished" in line]


@dataclass
class Trimmed(FakeSource):
    """Before its first message is handed over, a partition's log is found to start at
    `trim[tp]` (retention removed the offsets below): Kafka's client goes on from there and
    says so, as `KafkaSource` does, with `on_reset(tp, where it was, False)` (not past the
    log's end) before handing over the messages fetched since."""

    # tp: (where the client was, the log's first offset now)
    trim: dict[TP, tuple[int, int]] = field(default_factory=lambda: {(TOPIC, 0): (2, 17)})

    def consume(self, max_messages: int, timeout_s: float) -> list[Message]:
        for tp, (at, first) in list(self.trim.items()):
            if self.position.get(tp) == 0:
                self.log[tp] = [m for m in self.log[tp] if m._offset >= first]
                del self.trim[tp]
                assert self.cb.on_reset is not None
                self.cb.on_reset(tp, at, False)
        return super().consume(max_messages, timeout_s)


def test_offsets_retention_removed_before_they_were_read_are_counted_and_told(
        caplog: pytest.LogCaptureFixture) -> None:
    """Review "topo53": the backlog of a partition paused through an outage was removed by
    retention; Kafka's client went on from the log's start and the worker committed past
    the hole with no metric and no line of its own (4,980 of 6,000 events)."""
    tp, other = (TOPIC, 0), (TOPIC, 1)
    log = {tp: [Message(TOPIC, 0, i, f"u{i}".encode(), track(f"u{i}", i)) for i in range(30)],
           other: [Message(TOPIC, 1, i, f"v{i}".encode(), track(f"v{i}", 100 + i))
                   for i in range(5)]}
    client = HeldUser()
    client.release.set()
    run = make(log, registry=known_schema(), client=client, source_type=Trimmed,
               USERPILOT_ENSURE_USER="false")

    async def scenario(source: FakeSource) -> None:
        await until(lambda: len(client.bodies) == 13 + 5, "the retained events delivered")
        await until(lambda: any(c.get(tp) == 30 for c in source.commits),
                    "the partition committed at its end")

    with caplog.at_level(logging.WARNING):
        assert drive(run, scenario) == 0
    assert sorted(codec_seq(b) for b in client.bodies) == [*range(17, 30), *range(100, 105)]
    assert run.worker.m.skipped_offsets.labels(TOPIC)._value.get() == 15
    assert run.worker.m.log_resets.labels(TOPIC)._value.get() == 0
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(f"{TOPIC}[0] lost offsets 2 to 16" in line and "(up to 15;" in line
               for line in lines), lines


def test_a_commit_past_a_replaced_log_s_end_is_told_once_nothing_was_taken() -> None:
    """A commit above the end of a log replaced while the workers were stopped: the log is
    read again whole (documented); now with a line and `log_resets`, as a log going back
    under a running worker. Past the end under taken events is `went_back`'s."""
    tp = (TOPIC, 0)
    run = make({tp: []}, registry=known_schema())
    worker = run.worker
    worker.commits.assign([tp])
    worker.assigned.add(tp)
    worker._on_reset(tp, 120, True)
    for _ in range(3):  # told once two batches were taken after it
        worker.resets.collect()
    assert worker.m.log_resets.labels(TOPIC)._value.get() == 1
    assert tp not in worker.resets.pending, "nothing left to judge: no stale entry"
    worker.commits.take(tp, 0)
    worker._on_reset(tp, 120, True)  # under a taken event: `went_back` tells it
    worker.resets.collect()
    assert worker.resets.pending == {}
    assert worker.m.log_resets.labels(TOPIC)._value.get() == 1
    assert worker.m.skipped_offsets.labels(TOPIC)._value.get() == 0


@pytest.mark.parametrize("beyond_end", [False, None])
def test_messages_fetched_before_a_reset_are_not_taken_for_it(beyond_end: bool | None) -> None:
    """Review "diff53a": librdkafka had fetched ahead when retention overtook the
    position; the reset's line came before those messages, the first of them was taken
    for the log's new start, and the 13,832 offsets skipped after them went uncounted.
    Review "diff53b": right after an assignment (nothing taken yet) too, where the first
    version called them a log replaced."""
    tp = (TOPIC, 0)
    run = make({tp: []}, registry=known_schema())
    worker = run.worker
    worker.commits.assign([tp])
    worker.assigned.add(tp)
    worker._on_reset(tp, 6168, beyond_end)
    worker._on_reset(tp, 7000, beyond_end)  # a second before any message: the first holds
    worker.resets.collect()
    worker.resets.after_reset(tp, -1, 2220)  # prefetched, nothing taken yet
    for offset in (2221, 6167):  # prefetched: they continue the partition
        worker.resets.after_reset(tp, offset - 1, offset)
    assert worker.m.log_resets.labels(TOPIC)._value.get() == 0
    worker.resets.after_reset(tp, 6167, 20000)
    assert worker.m.skipped_offsets.labels(TOPIC)._value.get() == 20000 - 6168
    assert tp not in worker.resets.pending


def test_a_log_that_went_back_after_a_reset_is_left_to_went_back() -> None:
    tp = (TOPIC, 0)
    run = make({tp: []}, registry=known_schema())
    worker = run.worker
    worker.commits.assign([tp])
    worker.resets.pending[tp] = _Reset(50, False, 0)
    worker.resets.after_reset(tp, 49, 0)
    assert tp not in worker.resets.pending
    assert worker.m.log_resets.labels(TOPIC)._value.get() == 0  # `went_back` counts it
    assert worker.m.skipped_offsets.labels(TOPIC)._value.get() == 0


@dataclass
class Scripted(FakeSource):
    """Each consume runs the next of `steps` (on the source) first; `one`: one message a
    call, so a reset's messages come in several batches."""

    steps: list[Callable[[Scripted], None]] = field(default_factory=list)
    one: bool = False

    def consume(self, max_messages: int, timeout_s: float) -> list[Message]:
        if self.steps:
            self.steps.pop(0)(self)
        return super().consume(1 if self.one else max_messages, timeout_s)


def _tracks(start: int, n: int) -> list[Message]:
    return [Message(TOPIC, 0, start + i, f"u{i}".encode(), track(f"u{i}", start + i))
            for i in range(n)]


def _scripted(steps: list[Callable[[Scripted], None]], *, one: bool = False,
              log: list[Message] | None = None) -> tuple[Any, HeldUser]:
    client = HeldUser()
    client.release.set()

    def source(cb: Any, messages: dict[TP, list[Message]]) -> Scripted:
        return Scripted(cb, messages, steps=list(steps), one=one)

    run = make({(TOPIC, 0): list(log or [])}, registry=known_schema(), client=client,
               source_type=source,  # type: ignore[arg-type]
               USERPILOT_ENSURE_USER="false")
    return run, client


def _reset(at: int) -> Callable[[Scripted], None]:
    def step(source: Scripted) -> None:
        assert source.cb.on_reset is not None
        source.cb.on_reset((TOPIC, 0), at, False)
    return step


def _log_from(start: int, n: int) -> Callable[[Scripted], None]:
    def step(source: Scripted) -> None:
        source.log[(TOPIC, 0)] = _tracks(start, n)
        source.position[(TOPIC, 0)] = 0
    return step


def test_a_skip_is_counted_once_however_many_batches_its_messages_take() -> None:
    """Review "mutate53": the hand-off to the intake left uncleared counted the skip again
    with every batch (85 instead of 15 in five)."""
    def trim(source: Scripted) -> None:
        _log_from(17, 5)(source)
        _reset(2)(source)

    run, client = _scripted([trim], one=True)

    async def scenario(source: FakeSource) -> None:
        await until(lambda: len(client.bodies) == 5, "delivered")

    assert drive(run, scenario) == 0
    assert run.worker.m.skipped_offsets.labels(TOPIC)._value.get() == 15


def test_a_second_reset_in_a_later_call_keeps_the_first_position() -> None:
    """The offsets lost run from the first position out of range: a second reset before
    the messages came (another call) under-counted them."""
    run, client = _scripted([_reset(6168), _reset(7000), _log_from(20000, 2)])

    async def scenario(source: FakeSource) -> None:
        await until(lambda: len(client.bodies) == 2, "delivered")

    assert drive(run, scenario) == 0
    assert run.worker.m.skipped_offsets.labels(TOPIC)._value.get() == 20000 - 6168


def test_a_message_at_the_reset_position_skips_nothing_and_one_again_is_went_back(
        caplog: pytest.LogCaptureFixture) -> None:
    tp = (TOPIC, 0)
    worker = make({tp: []}, registry=known_schema()).worker
    worker.commits.assign([tp])
    worker.resets.pending[tp] = _Reset(120, False, 0)
    with caplog.at_level(logging.ERROR):
        worker.resets.after_reset(tp, 119, 120)
    assert tp not in worker.resets.pending
    assert worker.m.skipped_offsets.labels(TOPIC)._value.get() == 0
    assert not [r for r in caplog.records if "lost offsets" in r.getMessage()]
    worker.resets.pending[tp] = _Reset(50, False, 0)
    worker.resets.after_reset(tp, 30, 30)
    assert tp not in worker.resets.pending


@pytest.mark.parametrize("order", ["revoke, reset in one call", "reset, revoke in one call",
                                   "reset, then revoke"])
def test_a_reset_of_a_partition_taken_away_is_forgotten(order: str) -> None:
    """Review "mutate53": a reset told after the revoke served in the same call (or pending
    at a revoke) stayed; given the partition back at another owner's commit (1000), the
    worker counted 997 offsets lost that the other owner had read, and paged. Review
    "design59": so did one told before a revoke in the same call (not handed over yet)."""
    def revoke(source: Scripted) -> None:
        source.revoke_next = [(TOPIC, 0)]

    def reset_then_revoke(source: Scripted) -> None:
        _reset(3)(source)
        revoke(source)

    def revoke_then_reset(source: Scripted) -> None:
        revoke(source)
        FakeSource.consume(source, 10, 0)  # serves the revoke
        _reset(3)(source)

    def back(source: Scripted) -> None:
        _log_from(1000, 3)(source)
        source.cb.on_assign([(TOPIC, 0)])

    def idle(source: Scripted) -> None:
        pass

    orders: dict[str, list[Callable[[Scripted], None]]] = {
        "revoke, reset in one call": [revoke_then_reset, idle, back],
        "reset, revoke in one call": [reset_then_revoke, idle, back],
        "reset, then revoke": [_reset(3), revoke, idle, back]}
    steps = orders[order]
    run, client = _scripted(steps)

    async def scenario(source: FakeSource) -> None:
        await until(lambda: len(client.bodies) == 3, "delivered after the new assignment")

    assert drive(run, scenario) == 0
    assert run.worker.m.skipped_offsets.labels(TOPIC)._value.get() == 0


@dataclass
class Unreadable(FakeSource):
    """A client that cannot read past offset `unreadable` of partition 0 and starts it over
    from the log's start each time it gets there (a batch failing its CRC check read as an
    offset out of range, which librdkafka resets to earliest: review "escape55")."""

    unreadable: int = 4
    restarts: int = 0

    def consume(self, max_messages: int, timeout_s: float) -> list[Message]:
        tp = (TOPIC, 0)
        if self.position.get(tp, 0) >= self.unreadable:
            self.position[tp] = 0
            self.restarts += 1
        out = super().consume(max_messages, timeout_s)
        # Nothing of the unreadable batch is handed over.
        return [m for m in out if m.partition() != 0 or (m.offset() or 0) < self.unreadable]


def test_a_partition_going_back_to_the_same_offset_again_stops_the_worker() -> None:
    """Review "escape55": tracked anew at every reset, the same four events were delivered
    about 9 times a second, for good. Going back once is a new log (delivered again);
    going back to the same offset again soon is a loop: the worker stops, loudly."""
    log = {(TOPIC, 0): [Message(TOPIC, 0, i, f"u{i}".encode(), track(f"u{i}", i))
                        for i in range(8)]}
    run = make(log, registry=known_schema(), source_type=Unreadable,
               USERPILOT_ENSURE_USER="false")

    async def scenario(source: FakeSource) -> None:
        await until(lambda: run.worker.fatal is not None, "the stop", timeout=10)

    assert drive(run, scenario) == 1
    assert isinstance(run.worker.fatal, UnreadableBatch)  # counted as the other form
    assert run.worker.m.log_resets.labels(TOPIC)._value.get() == 2  # went back, stopped
    assert "went back from offset 3 to 0 again" in str(run.worker.fatal)
    assert "cannot read past offset 4" in str(run.worker.fatal)
    # The first round, and the second (a replaced log looks so at first) as far as it
    # got before the stop: no more.
    seqs = [codec_seq(b) for b in run.client.bodies]
    assert set(seqs) == {0, 1, 2, 3}
    assert all(seqs.count(seq) <= 2 for seq in range(4)), seqs


GARBAGE_OFFSET = 8680820740569200761  # measured: what librdkafka took for its next position


@dataclass
class BadBatch(Message):
    """The error librdkafka hands for a record batch failing its CRC check."""

    def error(self) -> Any:
        from confluent_kafka import KafkaError

        return KafkaError(KafkaError._BAD_MSG, f"MessageSet at offset {self._offset} "
                          "(270 bytes) failed CRC32C check (original 0xfb3431e5 != "
                          "calculated 0x90706a3b)")


@dataclass
class CorruptBatch(FakeSource):
    """A real broker's partition with a corrupt batch at `bad` (check.crcs=true), as
    librdkafka 2.x read it (review "design59"): the CRC error handed over, a garbage next
    position found past the log's end (an offset reset, told to the worker as past the
    end) and the partition started over from offset 0. `start`: the committed offset the
    group reads from."""

    bad: int = 4
    start: int = 0

    def subscribe(self) -> None:
        super().subscribe()
        self.position[(TOPIC, 0)] = self.start

    def consume(self, max_messages: int, timeout_s: float) -> list[Message]:
        tp = (TOPIC, 0)
        if self.position.get(tp, 0) >= self.bad:
            self.position[tp] = 0
            assert self.cb.on_reset is not None
            self.cb.on_reset(tp, GARBAGE_OFFSET, True)
            return [BadBatch(TOPIC, 0, self.bad, None, None)]
        return super().consume(min(max_messages, self.bad - self.position.get(tp, 0)),
                               timeout_s)


@pytest.mark.parametrize("start", [0, 4], ids=["running", "restarted"])
def test_a_batch_the_client_cannot_read_stops_before_anything_is_sent_again(start: int) -> None:
    """Review "design59", on a real broker: a corrupt batch is handed over as an error,
    then librdkafka starts the partition over from its start. Taken for a new log, the
    events before the batch were all delivered again before the second pass stopped the
    worker, and after each restart of the pod (its commit at the batch) all of them once
    more: the whole log up to the batch, again and again. Now the worker stops at once."""
    log = {(TOPIC, 0): [Message(TOPIC, 0, i, f"u{i}".encode(), track(f"u{i}", i))
                        for i in range(8)]}

    def source(cb: Any, messages: dict[TP, list[Message]]) -> CorruptBatch:
        return CorruptBatch(cb, messages, start=start)

    run = make(log, registry=known_schema(), source_type=source,  # type: ignore[arg-type]
               USERPILOT_ENSURE_USER="false")

    async def scenario(source: FakeSource) -> None:
        await until(lambda: run.worker.fatal is not None, "the stop", timeout=10)

    assert drive(run, scenario) == 1
    fatal = str(run.worker.fatal)
    assert "cannot read a record batch (MessageSet at offset 4" in fatal, fatal
    assert "starts the partition over from offset 0" in fatal
    seqs = sorted(codec_seq(b) for b in run.client.bodies)
    assert seqs == ([] if start else [0, 1, 2, 3]), "nothing sent twice"
    assert run.worker.m.log_resets.labels(TOPIC)._value.get() == 1, "the stop, counted"
    assert isinstance(run.worker.fatal, UnreadableBatch)


@dataclass
class CorruptBatchUnknownEnd(CorruptBatch):
    """As CorruptBatch, but the brokers did not give the log's end within RESET_ASK_S:
    the reset is reported with its end unknown."""

    def consume(self, max_messages: int, timeout_s: float) -> list[Message]:
        tp = (TOPIC, 0)
        if self.position.get(tp, 0) >= self.bad:
            self.position[tp] = 0
            assert self.cb.on_reset is not None
            self.cb.on_reset(tp, GARBAGE_OFFSET, None)
            return [BadBatch(TOPIC, 0, self.bad, None, None)]
        return FakeSource.consume(self, min(max_messages, self.bad - self.position.get(tp, 0)),
                                  timeout_s)


def test_a_restarted_worker_whose_reset_end_is_unknown_sends_nothing_again() -> None:
    """Review "diff59": the reset's end unknown (the lookup unanswered within its second),
    the restarted pod took the log's start for prefetched messages and sent all of it."""
    log = {(TOPIC, 0): [Message(TOPIC, 0, i, f"u{i}".encode(), track(f"u{i}", i))
                        for i in range(8)]}

    def source(cb: Any, messages: dict[TP, list[Message]]) -> CorruptBatchUnknownEnd:
        return CorruptBatchUnknownEnd(cb, messages, start=4)

    run = make(log, registry=known_schema(), source_type=source,  # type: ignore[arg-type]
               USERPILOT_ENSURE_USER="false")

    async def scenario(source: FakeSource) -> None:
        await until(lambda: run.worker.fatal is not None, "the stop", timeout=10)

    assert drive(run, scenario) == 1
    assert run.client.bodies == []
    assert "cannot read a record batch (MessageSet at offset 4" in str(run.worker.fatal)


@dataclass
class Batches(FakeSource):
    """Hands the scripted batches in turn (each a list of messages, with `reset` told
    first when set), then nothing."""

    batches: list[list[Message]] = field(default_factory=list)
    reset_with: dict[int, tuple[int, bool | None]] = field(default_factory=dict)
    served: int = 0

    def consume(self, max_messages: int, timeout_s: float) -> list[Message]:
        if self.served < len(self.batches):
            self.served += 1
            reset = self.reset_with.get(self.served)
            if reset is not None:
                assert self.cb.on_reset is not None
                self.cb.on_reset((TOPIC, 0), *reset)
            return self.batches[self.served - 1]
        return FakeSource.consume(self, 0, timeout_s)  # serves the commit answers


def _four(anonymous: tuple[int, ...] = ()) -> list[Message]:
    return [Message(TOPIC, 0, i, f"u{i}".encode(), track(None if i in anonymous else f"u{i}", i))
            for i in range(4)]


@pytest.mark.parametrize("error", [True, False], ids=["unreadable batch", "loop"])
def test_a_stop_at_a_going_back_keeps_the_old_logs_drops_recorded(error: bool) -> None:
    """Review "diff59": the going back's mark was taken out of the batch's drops before
    `went_back` raised, so the stop committed 2, not 4, and the drops were read again."""
    m = _four(anonymous=(2, 3))
    bad = [BadBatch(TOPIC, 0, 4, None, None)] if error else []
    batches = [[m[0], m[1]], [m[2], m[3], *bad, m[0], m[1]], [m[2], m[3], m[0]]]

    def source(cb: Any, messages: dict[TP, list[Message]]) -> Batches:
        return Batches(cb, messages, batches=batches,
                       reset_with={2: (GARBAGE_OFFSET, True)} if error else {})

    run = make({(TOPIC, 0): m}, registry=known_schema(), source_type=source,  # type: ignore[arg-type]
               USERPILOT_ENSURE_USER="false")

    async def scenario(source: FakeSource) -> None:
        await until(lambda: run.worker.fatal is not None, "the stop", timeout=10)

    assert drive(run, scenario) == 1
    assert run.source.commits[-1].get((TOPIC, 0)) == 4, run.source.commits


def test_a_restart_below_the_batch_is_not_told_as_a_replaced_log(
        caplog: pytest.LogCaptureFixture) -> None:
    """Review "diff59": restarted with its commit below the corrupt batch, the messages
    before it came with the reset in one consume and the first was taken for the new
    log's: "log replaced" was said (and counted, paging) before the stop."""
    m = _four()

    def source(cb: Any, messages: dict[TP, list[Message]]) -> Batches:
        return Batches(cb, messages, batches=[[m[2], m[3], BadBatch(TOPIC, 0, 4, None, None),
                                               m[0]]],
                       reset_with={1: (GARBAGE_OFFSET, True)})

    run = make({(TOPIC, 0): m}, registry=known_schema(), source_type=source,  # type: ignore[arg-type]
               USERPILOT_ENSURE_USER="false")

    async def scenario(source: FakeSource) -> None:
        await until(lambda: run.worker.fatal is not None, "the stop", timeout=10)

    with caplog.at_level(logging.WARNING):
        assert drive(run, scenario) == 1
    assert run.worker.m.log_resets.labels(TOPIC)._value.get() == 1, "the stop alone"
    assert not [r for r in caplog.records if "past the end" in r.getMessage()]
    assert sorted(codec_seq(b) for b in run.client.bodies) == [2, 3]


def test_a_commit_past_the_end_of_an_empty_new_log_is_told() -> None:
    """Review "diff59": told at the new log's first message only, a new log still empty
    never said the commit lay past its end (the README: either way the worker says so)."""
    def source(cb: Any, messages: dict[TP, list[Message]]) -> Batches:
        return Batches(cb, messages, batches=[[]], reset_with={1: (120, True)})

    run = make({(TOPIC, 0): []}, registry=known_schema(), source_type=source)  # type: ignore[arg-type]

    async def scenario(source: FakeSource) -> None:
        await until(lambda: run.worker.m.log_resets.labels(TOPIC)._value.get() == 1,
                    "the reset told")

    assert drive(run, scenario) == 0


def test_a_batch_that_failed_once_then_a_topic_recreated_is_a_new_log() -> None:
    """Review "diff59": a batch that failed to decompress once and was then read; minutes
    later (within RESET_LOOP_S) the topic was recreated: the worker stopped, calling it
    that batch. A message at or past the batch clears it."""
    old = [Message(TOPIC, 0, i, f"o{i}".encode(), track(f"o{i}", i)) for i in range(8)]
    new = [Message(TOPIC, 0, i, f"n{i}".encode(), track(f"n{i}", 100 + i)) for i in range(3)]
    once = UndecompressedOnce(TOPIC, 0, 4, None, None)
    batches: list[list[Message]] = [old[:4], [once], old[4:], new]

    def source(cb: Any, messages: dict[TP, list[Message]]) -> Batches:
        return Batches(cb, messages, batches=batches)

    run = make({(TOPIC, 0): old}, registry=known_schema(), source_type=source,  # type: ignore[arg-type]
               USERPILOT_ENSURE_USER="false")

    async def scenario(source: FakeSource) -> None:
        await until(lambda: len(run.client.bodies) == 11, "both logs delivered")

    assert drive(run, scenario) == 0
    assert run.worker.m.log_resets.labels(TOPIC)._value.get() == 1


@dataclass
class UndecompressedOnce(Message):
    def error(self) -> Any:
        from confluent_kafka import KafkaError

        return KafkaError(KafkaError._BAD_COMPRESSION,
                          "Decompression (codec 0x4) of message at 4 of 270 bytes failed")


@dataclass
class SlowAnswers(Replacing):
    """Holds the coordinator's commit answers while `hold` (served in order after)."""

    hold: bool = False

    def consume(self, max_messages: int, timeout_s: float) -> list[Message]:
        if not self.hold:
            return super().consume(max_messages, timeout_s)
        stash, self._acks = self._acks, []
        try:
            return super().consume(max_messages, timeout_s)
        finally:
            self._acks = stash + self._acks


def test_the_old_logs_late_commit_answer_is_not_the_new_logs_commit() -> None:
    """Review "design59": the old log's commit at 70, answered after the new log was read
    past 70 while its event at 2 was held, was taken for the new log's: the worker (and
    `userpilot_committed_offset`) said 70 while the coordinator held 2, and the window
    stopped counting the unfinished event."""
    tp: TP = (TOPIC, 0)

    def tracks(prefix: str, offsets: range, held: int = -1) -> list[Message]:
        return [Message(TOPIC, 0, i, f"{prefix}{i}".encode(),
                        track("stuck" if i == held else f"{prefix}{i}", 1000 + i))
                for i in offsets]

    client = HeldUser()
    run = make({tp: tracks("o", range(50))}, registry=known_schema(), client=client,
               source_type=SlowAnswers, USERPILOT_ENSURE_USER="false")
    seen: dict[str, Any] = {}

    async def scenario(source: FakeSource) -> None:
        assert isinstance(source, SlowAnswers)
        await until(lambda: run.worker.committed.get(tp) == 50, "the old log committed at 50")
        source.hold = True
        source.log[tp].extend(tracks("o", range(50, 70)))
        await until(lambda: source.last_commit(tp) == 70, "a commit at 70 sent, unanswered")
        source.replace_next = {tp: tracks("n", range(80), held=STUCK)}
        await until(lambda: run.worker.commits.high(tp) == 79, "the new log taken")
        await until(lambda: len(client.bodies) >= 70 + 79, "the new log delivered but 2")
        source.hold = False
        await until(lambda: not source._acks, "answers served")
        await asyncio.sleep(0.2)
        seen["committed"] = run.worker.committed.get(tp)
        seen["coordinator"] = source.stored[tp][0]
        seen["gauge"] = run.worker.m.committed_offset.labels(TOPIC, "0")._value.get()
        seen["window"] = run.worker.commits.in_window_by_partition().get(tp)
        client.release.set()
        await until(lambda: source.last_commit(tp) == 80, "the new log committed")

    assert drive(run, scenario) == 0
    assert seen == {"committed": STUCK, "coordinator": STUCK, "gauge": STUCK, "window": 1}
