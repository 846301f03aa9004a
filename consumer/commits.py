"""The one owner of offsets, the in-flight window and commit requests/acknowledgements.

Per assigned partition it tracks which taken offsets are finished (`PartitionOffsets`),
which of them count against the window (events that reach Userpilot or the DLQ, from
intake until committed), which commit was requested and which was acknowledged by the
group coordinator, and the note each commit carries of what is finished above it (and
what the previous owner's note named, skipped at intake). It never calls Kafka: the worker
asks `due` what to commit, runs the commit on the poll thread and reports back with
`requested` / `acknowledged`.

A partition's log can go back under a running worker (its topic deleted and created
again, a log truncated by an unclean leader election): the worker then `restart`s the
partition, and the old log's events finish under their `generation` without touching the
new log's offsets.

Thread rule: two threads touch this state. The event loop takes and finishes offsets;
the Kafka poll thread assigns and releases partitions (rebalance callbacks), asks what is
due and records commit results (librdkafka's commit callback). Every public method takes
`self._lock`, so no caller relies on the GIL; no method blocks or calls out while holding
it.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Iterable, Mapping

from consumer.offsets import NOTE_MAX_CHARS, Finished, PartitionOffsets, decode_note

__all__ = ["TP", "Commits"]

TP = tuple[str, int]
UNANSWERED_MAX = 64  # commits remembered per partition while the coordinator does not answer


class Commits:
    """Offsets of the assigned partitions and the commit bookkeeping, behind one lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._offsets: dict[TP, PartitionOffsets] = {}
        self._committed: dict[TP, int] = {}  # acknowledged by the coordinator
        self._requested: dict[TP, int] = {}  # sent to the coordinator, maybe not acked yet
        self._notes: dict[TP, str] = {}  # the note sent with each requested offset
        # Commits sent and not answered, oldest first, with their notes: each answer is
        # credited with the note its own commit carried (answers come in order).
        self._unanswered: dict[TP, deque[tuple[int, str]]] = {}
        self._committed_notes: dict[TP, str] = {}  # ... and with each acknowledged one
        self._inheriting: set[TP] = set()  # partitions with a previous owner's note ahead
        # Per partition, the generation of its tracker: a new one per assignment and per
        # `restart`; an event finishes under the generation it was taken in.
        self._generations: dict[TP, int] = {}
        self._next_generation = itertools.count(1)
        self._latest: dict[TP, int] = {}  # per partition, its latest generation (kept)
        # Partitions whose log went back (`restart`): librdkafka's position still names
        # the old log until the new one is read up to it, so `passed` ignores it until
        # it is no further than the new log's last offset taken + 1.
        self._old_position: set[TP] = set()
        # ... and the offsets of its old log's commits still unanswered then, oldest first:
        # their answers come before any of the new log's and are not the new log's
        # commits. Credited by offset alone, the old log's late answer at 70 read as the
        # new log committed at 70 while an event at 2 was unfinished: the committed gauge
        # and the window wrong until the new log passed 70 (review "design59").
        self._stale: dict[TP, deque[int]] = {}
        # The window's count, kept per partition and in total (`in_window_by_family`):
        # summed over every partition on each ask, it cost ~0.35 ms a loop pass at 1,000
        # partitions, on the drop path too. A method that may change a tracker's window
        # (`sent`, `held`, `finished`, `committed`, a new or released tracker) marks its
        # partition (`_touched`); an ask counts the marked ones again.
        self._touched: set[TP] = set()
        self._risk: dict[TP, dict[str, int]] = {}
        self._risk_total: dict[str, int] = {}

    # -- partitions (poll thread) -------------------------------------------------------
    def assign(self, parts: Iterable[TP]) -> None:
        """Start tracking newly assigned partitions from scratch."""
        with self._lock:
            for tp in parts:
                self._track_anew(tp)

    def _track_anew(self, tp: TP) -> None:
        """A fresh tracker and commit record for `tp`, under a new generation. Lock held."""
        self._offsets[tp] = PartitionOffsets()
        self._touched.add(tp)
        self._generations[tp] = self._latest[tp] = next(self._next_generation)
        for known in (self._committed, self._requested, self._notes,
                      self._committed_notes, self._unanswered):
            known.pop(tp, None)
        self._inheriting.discard(tp)
        self._old_position.discard(tp)
        self._stale.pop(tp, None)

    def restart(self, tp: TP) -> bool:
        """`tp`'s log went back (an offset at or below one already taken): track it anew,
        as if just assigned. The old log's events still in flight finish under their old
        generation and are ignored; answers to commits of the old log that exceed what the
        new log has taken are ignored (`acknowledged`). False when `tp` is not assigned."""
        with self._lock:
            if tp not in self._offsets:
                return False
            stale = deque(sent for sent, _ in self._unanswered.get(tp, ()))
            self._track_anew(tp)
            self._old_position.add(tp)
            if stale:
                self._stale[tp] = stale
            return True

    def high(self, tp: TP) -> int | None:
        """The highest offset taken or skipped on `tp` (-1: none yet; None: `tp` is not
        assigned). Asked once per partition per slice of a polled batch."""
        with self._lock:
            tracker = self._offsets.get(tp)
            return None if tracker is None else tracker.high

    def inherit(self, finished: Mapping[TP, Finished]) -> dict[TP, tuple[int, int] | None]:
        """What the previous owners' commits named finished (`decode_note`), per partition;
        read before any of the partition's messages is taken, mostly. Unassigned ones are
        ignored; so is a note read late, once the partition's first offset taken was below
        the offset it was written with. Returns those, partition -> (first offset taken,
        the note's offset) for another log's (see `Worker._intake`; review "diff45b"), None
        for this worker's own commit's note, read after it committed at or below what it
        took, or one that commit overwrote (reviews "diff45c", "diff45d", "diff45e")."""
        late: dict[TP, tuple[int, int] | None] = {}
        with self._lock:
            for tp, ranges in finished.items():
                tracker = self._offsets.get(tp)
                if tracker is None or not ranges or tp in self._old_position:
                    continue  # gone, empty, or written for the log before a `restart`
                first = tracker.first
                if first is not None and first < ranges.floor:
                    own = ((tp in self._requested or tp in self._committed)
                           and tracker.could_commit(ranges.floor))
                    late[tp] = None if own else (first, ranges.floor)
                    continue
                tracker.inherit(ranges)
                self._inheriting.add(tp)
        return late

    def disown(self, tp: TP) -> None:
        """Forget what `tp`'s previous owner named finished: its log is not the one the
        note was written for (`Worker._intake`)."""
        with self._lock:
            tracker = self._offsets.get(tp)
            if tracker is not None:
                tracker.inherit(Finished(()))
            self._inheriting.discard(tp)

    def inherited(self) -> dict[TP, Finished]:
        """Per partition, the previous owner's finished ranges not yet passed: the intake
        skips those offsets (asked once per slice of a polled batch; usually empty)."""
        with self._lock:
            out: dict[TP, Finished] = {}
            if not self._inheriting:
                return out
            for tp in list(self._inheriting):
                tracker = self._offsets.get(tp)
                ranges = tracker.inherited if tracker is not None else None
                if ranges is None:
                    self._inheriting.discard(tp)
                else:
                    out[tp] = ranges
            return out

    def release(self, parts: Iterable[TP]) -> None:
        """Forget revoked or lost partitions; later finishes of their offsets are ignored."""
        with self._lock:
            for tp in parts:
                self._offsets.pop(tp, None)
                self._generations.pop(tp, None)
                self._stale.pop(tp, None)
                self._touched.add(tp)

    # -- events (event loop) ------------------------------------------------------------
    def take(self, tp: TP, offset: int) -> int:
        """Record an offset handed to the pipeline; returns the generation to `finish` it
        under (0, falsy, when `tp` is not assigned)."""
        with self._lock:
            tracker = self._offsets.get(tp)
            if tracker is None:
                return 0
            tracker.started(offset)
            return self._generations[tp]

    def latest_generation(self, tp: TP) -> int:
        """The generation of `tp`'s latest assignment, released since or not (0: never
        assigned): a DLQ guard trip names only its dead letters (`Worker`)."""
        with self._lock:
            return self._latest.get(tp, 0)

    def owns(self, tp: TP) -> bool:
        """`tp` is assigned: its messages may be taken (asked once per slice of a polled
        batch)."""
        with self._lock:
            return tp in self._offsets

    def dropped(self, marks: Mapping[TP, int]) -> None:
        """Dropped events, taken and finished at once: per partition the highest offset of
        a run of drops, in offset order with that partition's `take`s.

        One call per slice of a polled batch (and before a partition's next `take`), not
        one lock per event: a dropped offset is never open, so recording a run's last
        offset gives the same committable offsets as `take` and `finish` of each of them
        (`PartitionOffsets.skipped`). Partitions no longer assigned are ignored.
        """
        with self._lock:
            for tp, offset in marks.items():
                tracker = self._offsets.get(tp)
                if tracker is not None:
                    tracker.skipped(offset)

    def sending(self, tp: TP, offset: int, family: str = "track") -> None:
        """The event will reach Userpilot or the DLQ: it counts against its family's window
        (`family`: the rate budget its main request draws from)."""
        with self._lock:
            tracker = self._offsets.get(tp)
            if tracker is not None:
                tracker.sent(offset, family)
                self._touched.add(tp)

    def finish(self, tp: TP, offset: int, generation: int | None = None) -> None:
        """The event has its outcome (delivered, dropped, dead-lettered and acked);
        `generation`: what `take` returned (None: the current one). An event of a log the
        partition no longer reads (`restart`) or of an earlier assignment is ignored."""
        with self._lock:
            tracker = self._offsets.get(tp)
            if tracker is not None and (generation is None
                                        or generation == self._generations.get(tp)):
                tracker.finished(offset)
                self._touched.add(tp)

    def hold(self, tp: TP, offset: int, generation: int | None = None) -> None:
        """The event's dead letter is written, and its commit waits for the DLQ guard: out
        of the window, not finished (`PartitionOffsets.held`); `finish` ends it."""
        with self._lock:
            tracker = self._offsets.get(tp)
            if tracker is not None and (generation is None
                                        or generation == self._generations.get(tp)):
                tracker.held(offset)
                self._touched.add(tp)

    def settled(self) -> list[TP]:
        """Assigned partitions with every taken offset finished: where the consumer's
        position may be ahead of the last offset taken (`passed`)."""
        with self._lock:
            return [tp for tp, tracker in self._offsets.items() if not tracker.unfinished]

    def passed(self, positions: Mapping[TP, int]) -> None:
        """The consumer's positions of partitions all of whose handed-over messages were
        taken: the offsets below a position that were never handed over (transaction
        markers, aborted transactions' records) are finished like drops, so the commit
        reaches the log's end. Without it, a transactional topic's committed offset
        stopped at each partition's last commit marker: a lag of 1 for ever, of the whole
        batch after an aborted one (review "offsets16").

        The caller guarantees that every message handed over was taken: a position also
        counts a message handed over and not taken yet, which this would skip.

        After `restart` the position is the old log's (librdkafka keeps it until the new
        log is read up to it): ignored until it is no further than the new log's last
        offset taken + 1. Trusted, it named the rest of the old log's offsets finished on
        the new, shorter log: the commit went past the new log's end, and the records
        later written below it were never delivered (review "kafka18")."""
        with self._lock:
            for tp, position in positions.items():
                tracker = self._offsets.get(tp)
                if tracker is None:
                    continue
                if tp in self._old_position:
                    if position > tracker.high + 1:
                        continue
                    self._old_position.discard(tp)
                if not tracker.unfinished and position > tracker.high + 1:
                    tracker.skipped(position - 1)

    def in_window_by_family(self) -> dict[str, int]:
        """Events sent or sending and not committed, per window family: what a crash now
        would send again (each family is bounded by WORKER_MAX_IN_FLIGHT)."""
        with self._lock:
            self._count_touched()
            return {family: n for family, n in self._risk_total.items() if n}

    def in_window_by_partition(self) -> dict[TP, int]:
        """Events in the window per assigned partition, all families (fair intake)."""
        with self._lock:
            self._count_touched()
            risk = self._risk
            return {tp: sum(risk[tp].values()) if tp in risk else 0 for tp in self._offsets}

    def _count_touched(self) -> None:
        """Count the window of the partitions touched since the last ask again. Lock held."""
        total = self._risk_total
        for tp in self._touched:
            old = self._risk.pop(tp, None)
            if old:
                for family, n in old.items():
                    total[family] -= n
            tracker = self._offsets.get(tp)
            new = tracker.at_risk_by_family if tracker is not None else None
            if new:
                self._risk[tp] = new
                for family, n in new.items():
                    total[family] = total.get(family, 0) + n
        self._touched.clear()

    # -- commits (poll thread) ----------------------------------------------------------
    def due(self, parts: Iterable[TP] | None = None, *, pipelined: bool = False,
            max_chars: int = NOTE_MAX_CHARS) -> dict[TP, int]:
        """Offsets to commit now (next offset to read per partition).

        `pipelined` skips offsets already requested (an asynchronous commit in flight);
        otherwise only offsets already acknowledged are skipped. `max_chars`: the notes'
        limit the commits are sent with (a note cut otherwise never matches the one sent).
        """
        return {tp: offset for tp, (offset, _) in
                self.due_noted(parts, pipelined=pipelined, max_chars=max_chars).items()}

    def due_noted(self, parts: Iterable[TP] | None = None, *, pipelined: bool = False,
                  notes: bool = True, max_chars: int = NOTE_MAX_CHARS
                  ) -> dict[TP, tuple[int, str]]:
        """`due`, each offset with its note (`PartitionOffsets.note`: what is finished above
        it). With `notes`, also due when only the note changed: the offset held by an
        unfinished event while others after it finish (a crash or a drain then re-sends
        only the unfinished). Without, only a moved offset is due (and carries its note):
        the worker asks that way between its commit intervals."""
        with self._lock:
            known = self._requested if pipelined else self._committed
            known_notes = self._notes if pipelined else self._committed_notes
            out: dict[TP, tuple[int, str]] = {}
            for tp, offset in self._committable(parts).items():
                moved = known.get(tp) != offset
                if not moved and not notes:
                    continue
                note = self._offsets[tp].note(offset, max_chars)
                if moved or known_notes.get(tp, "") != note:
                    out[tp] = (offset, note)
            return out

    def committable(self, parts: Iterable[TP]) -> dict[TP, int]:
        """What would be committed now (the first unfinished offset, or past the last),
        for the partitions that took anything."""
        with self._lock:
            return self._committable(parts)

    def _committable(self, parts: Iterable[TP] | None) -> dict[TP, int]:
        """`committable` with the lock held (None: every tracked partition)."""
        out: dict[TP, int] = {}
        for tp in list(self._offsets) if parts is None else parts:
            tracker = self._offsets.get(tp)
            offset = tracker.committable() if tracker is not None else None
            if offset is not None:
                out[tp] = offset
        return out

    def requested(self, offsets: Mapping[TP, int], notes: Mapping[TP, str] | None = None
                  ) -> None:
        """A commit of these offsets (with these notes) was sent."""
        with self._lock:
            self._requested.update(offsets)
            for tp, offset in offsets.items():
                note = self._notes[tp] = (notes or {}).get(tp, "")
                self._unanswered.setdefault(tp, deque(maxlen=UNANSWERED_MAX)).append(
                    (offset, note))

    def acknowledged(self, done: Iterable[tuple[TP, int]], failed: Iterable[TP] = ()
                     ) -> list[tuple[TP, int]]:
        """Commit results; returns the newly committed (partition, offset) pairs.

        A committed offset frees the window below it, and its note the offsets it names
        above it; a failed partition is requested again by the next `due`.
        """
        fresh: list[tuple[TP, int]] = []
        with self._lock:
            for tp in failed:
                if self._old_answer(tp, None):
                    continue
                self._requested.pop(tp, None)
                unanswered = self._unanswered.get(tp)
                if unanswered:
                    unanswered.popleft()
            for tp, offset in done:
                if self._old_answer(tp, offset):
                    continue
                tracker = self._offsets.get(tp)
                if tracker is not None and not tracker.could_commit(offset):
                    continue  # a commit of the log before a `restart`: not this log's
                committed = self._committed.get(tp, -1)
                if offset < committed:
                    self._forget(tp, offset)  # an older commit's late answer: no news
                    continue
                before = self._committed_notes.get(tp) if offset == committed else None
                note = self._credit(tp, offset)
                if offset == committed:
                    if tracker is not None and note is not None and note != before:
                        # The same offset with another note: what it names now (more, or
                        # less: a longer note the broker refused was committed without).
                        tracker.committed(offset, decode_note(note, offset))
                        self._touched.add(tp)
                    continue
                self._committed[tp] = offset
                if tracker is not None:
                    tracker.committed(offset, decode_note(note or "", offset))
                    self._touched.add(tp)
                    fresh.append((tp, offset))
        return fresh

    def _old_answer(self, tp: TP, offset: int | None) -> bool:
        """The answer (committing `offset`; None: a failure) is to a commit of `tp`'s log
        before its `restart`: forget that commit and ignore the answer. Answers come in
        order, so a success naming no such commit means the old log's are over (lost:
        the rest are forgotten). Lock held."""
        stale = self._stale.get(tp)
        if stale is None:
            return False
        if offset is None:
            stale.popleft()
        elif offset in stale:
            while stale.popleft() != offset:
                pass
        else:
            del self._stale[tp]
            return False
        if not stale:
            del self._stale[tp]
        return True

    def _forget(self, tp: TP, offset: int) -> None:
        """Drop the record of a commit whose answer no longer matters. Lock held."""
        unanswered = self._unanswered.get(tp)
        if unanswered and any(sent == offset for sent, _ in unanswered):
            self._answer(tp, offset)

    def _credit(self, tp: TP, offset: int) -> str | None:
        """An answer committing `offset`: the coordinator now holds the note that commit
        carried, not the newest one requested (a later commit of the same offset with a
        longer note may still fail). Returns that note (None: no such commit is known).
        Lock held."""
        note = self._answer(tp, offset)
        if note is not None:
            self._committed_notes[tp] = note
        return note

    def _answer(self, tp: TP, offset: int) -> str | None:
        """The commits sent up to the one of `offset` are answered: forget them; the note
        that one carried (None: no such commit is known). Lock held."""
        unanswered = self._unanswered.get(tp)
        while unanswered:
            sent, note = unanswered.popleft()
            if sent == offset:
                return note
        return None

    def unanswered(self) -> bool:
        """A commit of an assigned partition was sent and not answered yet, whatever its
        offset (`outstanding` misses one that only carries a new note)."""
        with self._lock:
            return any(self._unanswered.get(tp) for tp in self._offsets)

    def outstanding(self) -> bool:
        """A commit of an assigned partition was sent and is not acknowledged yet."""
        with self._lock:
            return any(offset > self._committed.get(tp, -1)
                       for tp, offset in self._requested.items() if tp in self._offsets)

    def committed(self) -> dict[TP, int]:
        """A copy of the acknowledged offsets (logs, the demo, tests)."""
        with self._lock:
            return dict(self._committed)

    def committed_finished(self) -> dict[TP, list[tuple[int, Finished]]]:
        """Per partition, the commits that may have landed, each as its offset and the
        offsets above it its note names finished: what the next owner may not read again.
        The acknowledged one, and one requested without an answer yet: a DLQ guard trip
        with Kafka slow gave up waiting for the final commit's answer, and the dead letters
        it committed were named as not committed (review "diff41d")."""
        with self._lock:
            out: dict[TP, list[tuple[int, Finished]]] = {}
            for known, notes in ((self._committed, self._committed_notes),
                                 (self._requested, self._notes)):
                for tp, offset in known.items():
                    out.setdefault(tp, []).append((offset, decode_note(notes.get(tp), offset)))
            return out
