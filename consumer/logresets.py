"""A partition's log that changes under the worker: replaced (its topic deleted and created
again), truncated (an unclean leader election), or cut at its start (retention or
delete-records overtaking a backlog), and librdkafka's position reset to go on reading.

Each of these loses or repeats events unless the worker notices: its commits must follow
the new log's own offsets, and offsets removed unread must be said (a metric and a line),
since nothing else says them. `LogResets` judges what each message after such a reset
means and tells it; the worker's intake asks it only for a partition it names (`pending`,
empty but after a reset) or whose offset went back.

Thread rule: `reported` runs on the poll thread (librdkafka's offset-reset callback, inside
a `Source.call`) and touches only `_incoming`, under `_lock`; `collect` hands those to
`pending` on the event loop after each consume. `another_log` runs on either (the intake,
and the read of the commit notes on the poll thread): it only calls `Commits` (which locks)
and logs. Everything else is the event loop's.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from typing import NamedTuple

from consumer.commits import TP, Commits
from consumer.errors import UnreadableBatch
from consumer.logs import partitions_text
from consumer.metrics import Metrics

log = logging.getLogger(__name__)

RESET_LOOP_S = 300.0
"""A partition's log going back to the same offset or below again within this is a loop
(a record batch the client cannot read, so it starts over), not another new log: the
worker stops rather than deliver the same events about 9 times a second (review
"escape55")."""

__all__ = ["RESET_LOOP_S", "LogResets"]


class _Reset(NamedTuple):
    """A reset librdkafka reported, waiting for the partition's next message."""

    at: int  # the position it found out of range
    past_end: bool  # past the log's end with nothing taken: a log replaced while stopped
    collects: int  # consumes since (a reset past the end is told after the next one's)


class _Unreadable(NamedTuple):
    """A record batch the client said it could not read."""

    offset: int  # the batch's, as the error names it
    text: str
    since: float


class LogResets:
    """Judges a partition's offsets after librdkafka reset its position (see the module)."""

    def __init__(self, commits: Commits, metrics: Metrics) -> None:
        self._commits = commits
        self._m = metrics
        self._lock = threading.Lock()
        # Resets librdkafka reported (poll thread, under `_lock`), per partition the
        # position it found out of range and whether that lay past the log's end with
        # nothing taken yet ...
        self._incoming: dict[TP, tuple[int, bool]] = {}
        # ... handed over after each consume (event loop only): judged by the partition's
        # next message (`after_reset`). Empty but after a reset: the intake's cheap check.
        self.pending: dict[TP, _Reset] = {}
        # Per partition, the first record batch the client said it could not read (event
        # loop only): going back before it was read is that batch, not a new log. Empty but
        # after such an error: the intake's cheap check (`read_past`).
        self.unread: dict[TP, _Unreadable] = {}
        # Per partition, the offset its log last went back to and when (event loop only):
        # going back there again soon is a loop, not a new log.
        self._went_back_to: dict[TP, tuple[int, float]] = {}

    def reported(self, tp: TP, at: int, beyond_end: bool | None) -> None:
        """Poll thread: librdkafka found assigned `tp`'s position `at` out of its log and
        goes on from the log's start (`auto.offset.reset`).

        Past the log's end (a log replaced by a shorter one): with nothing taken since the
        assignment, the commit lay past the end of a log replaced while the workers were
        stopped, and the new log is read whole (told by `collect`, as a log reset, unless
        the client failed to read a batch meanwhile: then it is no new log); under taken
        events the log goes back, which `went_back` tells. Before its start (or unknown):
        told by `after_reset` once the messages fetched from there come. A second reset
        before them keeps the first `at`: the offsets lost run from there."""
        if beyond_end and self._commits.high(tp) != -1:
            return  # under taken events: `went_back` tells it
        with self._lock:
            self._incoming.setdefault(tp, (at, bool(beyond_end)))

    def collect(self) -> None:
        """Event loop, after each consume and before its messages' intake (they may follow
        a reset reported during it): the resets reported become `pending`.

        A reset past the end is told here once two batches were taken after it and the
        client said no batch of the partition unreadable: the new log may be empty (no
        message would tell it), and the CRC error that makes it no new log comes before
        the messages from the log's start, by then (the error is handed over before the
        reset is logged; a full batch may hold it back one more) (review "diff59")."""
        if self.pending:
            for tp, reset in list(self.pending.items()):
                if not reset.past_end:
                    continue
                if reset.collects and self._unreadable_now(tp) is None:
                    del self.pending[tp]
                    self._tell_replaced(tp, reset.at)
                else:
                    self.pending[tp] = reset._replace(collects=reset.collects + 1)
        if self._incoming:  # read without the lock: a reset missed now is collected next time
            with self._lock:
                for tp, (at, past_end) in self._incoming.items():
                    self.pending.setdefault(tp, _Reset(at, past_end, 0))
                self._incoming.clear()

    def _tell_replaced(self, tp: TP, at: int) -> None:
        self._m.log_resets.labels(tp[0]).inc()
        log.warning("%s: its committed offset %d is past the end of its log: the log "
                    "was replaced (the topic deleted and created again). It is read "
                    "from its start, so events sent before may be sent again",
                    partitions_text([tp]), at)

    def forget(self, parts: Iterable[TP]) -> None:
        """Event loop: partitions taken away. A reset not judged yet was their old owner's
        position: kept, a partition given back later took its first message for the log's
        new start and said offsets were lost that were only read elsewhere (review
        "design59"). A reset past the end is left for the next owner to tell."""
        with self._lock:
            for tp in parts:
                self._incoming.pop(tp, None)
                self.pending.pop(tp, None)
                self.unread.pop(tp, None)

    def unreadable(self, tp: TP, offset: int, text: str) -> None:
        """The client could not read `tp`'s record batch at `offset` (`text`, its error): a
        corrupt batch. librdkafka may then read on into its bytes, take a garbage offset
        (8680820740569200760, measured) for its next position, find it past the log's end
        and start the partition over from its start: that going back is this batch, not a
        new log. The first error is kept (the one naming the batch; the garbage offset's
        comes next, review "diff59") until a message at or past it is taken."""
        if self._unreadable_now(tp) is None:
            self.unread[tp] = _Unreadable(offset, text, time.monotonic())

    def read_past(self, tp: TP, offset: int) -> None:
        """A message of `tp` (in `unread`) at `offset` is taken: at or past the batch it
        could not read, the client read it after all (a passing fault); a later going back
        is not that batch's (review "diff59")."""
        if offset >= self.unread[tp].offset:
            del self.unread[tp]

    def _unreadable_now(self, tp: TP) -> _Unreadable | None:
        """`tp`'s batch the client could not read, within RESET_LOOP_S: an older one says
        nothing of a reset now (review "diff59b": kept, a log replaced under a partition
        held at a batch was never told)."""
        seen = self.unread.get(tp)
        if seen is None or time.monotonic() - seen.since >= RESET_LOOP_S:
            return None
        return seen

    def _stop_if_unreadable(self, tp: TP, offset: int) -> None:
        """`tp` went back to `offset` soon after the client failed to read one of its
        batches: `Stop`, before any event is delivered again. Tracked anew, the whole log
        up to the batch was delivered again, and once more at each restart of the pod
        (review "design59")."""
        seen = self._unreadable_now(tp)
        if seen is None:
            return
        # Counted as the log resets are, so UserpilotSourceLogReset (whose runbook has the
        # fix) pages: uncounted, only "workers down" did, pointing at settings (ops59).
        self._m.log_resets.labels(tp[0]).inc()
        raise UnreadableBatch(
            f"{partitions_text([tp])}: Kafka's client cannot read a record batch ({seen.text}) "
            f"and starts the partition over from offset {offset}; stopped rather than "
            "deliver the same events again and again. Move the consumer group past the "
            "unreadable batch (kafka-consumer-groups --reset-offsets --to-offset, README: "
            "UserpilotSourceLogReset)")

    def after_reset(self, tp: TP, last: int, offset: int) -> None:
        """`tp` (in `pending`) had an offset reset at `at`; `offset` is its next message and
        `last` the highest offset taken before it (-1: none since its assignment).

        Past the log's end with nothing taken: the commit lay past the end of a log
        replaced while the workers were stopped, and the new log is read whole (told by
        `collect`), unless the client failed to read a batch of it (`Stop`). (Replaced
        under messages fetched from the old log in the same call, `at` was their next
        offset and `went_back` counts it again: left, rare.)

        Messages fetched before the reset still come first (librdkafka prefetches): below
        `at` and above `last`, they continue the partition. The first at or above `at` is
        the log's new start: the offsets between were removed (retention or delete-records
        overtook a backlog paused through an outage, or a days-old commit) before they
        were read, their events gone unseen, neither delivered nor dead-lettered; without
        this nothing said so (review "topo53": 4,980 of 6,000 events, no metric, no line of
        the worker's; "diff53a": the first version took a prefetched message for the
        reset's). At or below `last`: the log went back, which `went_back` tells. Below
        `at` with nothing taken after a batch the client could not read: the log's start
        again, not a prefetched message (those come before the error): `Stop` (its end
        unknown, the reset could not say past the end, review "diff59")."""
        at, past_end, _ = self.pending[tp]
        if past_end:
            self._stop_if_unreadable(tp, offset)
            return
        if offset >= at:
            del self.pending[tp]
            if offset > at:
                self._m.skipped_offsets.labels(tp[0]).inc(offset - at)
                log.error("%s lost offsets %d to %d before this worker read them: its log "
                          "no longer had them (retention or delete-records), so Kafka's "
                          "client went on from %d. Their events (up to %d; transaction "
                          "markers count too) were neither delivered nor dead-lettered, and "
                          "are not in Kafka any more. Keep the topic's retention above the "
                          "longest backlog the workers may hold (a Userpilot outage, the lag "
                          "alerts)", partitions_text([tp]), at, offset - 1, offset, offset - at)
        elif offset <= last:
            del self.pending[tp]  # `went_back` tells it
        elif last == -1:
            self._stop_if_unreadable(tp, offset)

    def went_back(self, tp: TP, last: int, offset: int, mark: int | None) -> None:
        """`tp` handed over `offset` after `last`: its log was replaced (the topic deleted and
        created again) or truncated (an unclean leader election), and librdkafka reset its
        position. Track the partition anew from `offset`, as a fresh assignment: the old
        log's events still in flight finish without a say in its commits (their offsets
        name other events now), and the window and the commits count the new log's own.
        Left as it was, the old tracker ignored every offset up to `last`: the worker
        committed past an unfinished event of the new log and its window stopped counting
        (review "offsets16"). `mark`: the old log's last drop not recorded yet.

        Going back again to the same offset or below within RESET_LOOP_S is not another
        new log but a client that cannot read past a record and starts over (a batch
        that fails its CRC check reads as an offset out of range, and librdkafka resets to
        the log's start): tracked anew each time, the same events were delivered about 9
        times a second, for good (review "escape55"). `Stop` instead, loudly; at once when
        the client said it could not read a batch just before (`unreadable`)."""
        self._stop_if_unreadable(tp, offset)
        now = time.monotonic()
        before = self._went_back_to.get(tp)
        if before is not None and offset <= before[0] and now - before[1] < RESET_LOOP_S:
            # An unreadable batch too, counted as the other form is (round 59's "noticed":
            # a plain Stop, the loop's second going back went uncounted).
            self._m.log_resets.labels(tp[0]).inc()
            raise UnreadableBatch(
                f"{partitions_text([tp])} went back from offset {last} to {offset} again, "
                f"{now - before[1]:.0f} s after it went back to {before[0]}: Kafka's client "
                f"cannot read past offset {last + 1} (a corrupt record batch?) and starts "
                "over; stopped rather than deliver the same events again and again. Move "
                "the consumer group past the unreadable batch (kafka-consumer-groups "
                "--reset-offsets --to-offset, README: UserpilotSourceLogReset)")
        self._went_back_to[tp] = (offset, now)
        if mark is not None:
            self._commits.dropped({tp: mark})
        self._commits.restart(tp)
        self._m.log_resets.labels(tp[0]).inc()
        log.error("%s went back from offset %d to %d: its log was replaced (topic deleted "
                  "and created again) or truncated. Tracking it anew from %d; events of the "
                  "old log still in flight are delivered but no longer hold its commits. "
                  "Stop the workers before recreating a source topic: when the new log is "
                  "already longer, Kafka's client goes on from offset %d and skips the "
                  "records before it unseen", partitions_text([tp]), last, offset, offset, last + 1)

    def another_log(self, tp: TP, offset: int, floor: int) -> None:
        """`tp`'s first offset handed over is below the offset its note was committed with
        (`floor`): Kafka found that offset out of range (the log was replaced or truncated)
        and reset to the log's start. The note named the old log's offsets above it: kept,
        the new log's records at those offsets were skipped as finished, committed and
        never sent (review "topo45")."""
        self._commits.disown(tp)
        log.warning("%s starts at offset %d, below its committed offset %d: its log was "
                    "replaced or truncated. What the previous owner named finished above %d "
                    "is not skipped; those events are delivered (some may be sent again)",
                    partitions_text([tp]), offset, floor, floor)
