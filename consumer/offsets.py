"""Per-partition "finished up to" tracking for at-least-once commits, and the note a commit
carries of what is finished above it.

Deliveries complete out of order; the committable offset is the lowest offset not yet
finished (Kafka commits name the next offset to read). A dropped event is finished at
once, a dead-lettered one when the DLQ produce is acknowledged.

Above the committable offset, events of other users are often finished already. A commit
names them in its metadata (the *note*: `encode_note`), as Confluent's Parallel Consumer
does, so the partition's next owner skips them (`decode_note`) instead of sending them
again: a drain then only has to let the requests on the wire finish, and a crash re-sends
only what was unfinished at the last commit.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import re
from array import array
from collections import deque
from collections.abc import Iterable, Sequence

__all__ = ["NOTE_MAX_CHARS", "NOTE_PREFIX", "Finished", "PartitionOffsets", "decode_note",
           "encode_note"]

NOTE_PREFIX = "upf1:"
"""Marks a note this worker wrote (other metadata in the group's commits is ignored)."""
NOTE_MAX_CHARS = 1000
"""A note's length bound: brokers refuse commit metadata over `offset.metadata.max.bytes`
(4,096 by default). Finished ranges past the bound are left out: sent again, as before."""
_OFFSET = re.compile(r"[0-9]{1,19}")
NOTE_MIN_CHARS = 32  # a broker refusing notes shorter than this gets none
NOTE_MAX_RANGES = 4096
"""A decoded note's bound (a note is ~2 bytes a range, so a well-formed one has fewer)."""
PENDING_SLACK = 256  # finished offsets kept behind an unfinished one before compacting


def _varint(value: int, out: bytearray) -> None:
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def encode_note(base: int, ranges: Sequence[tuple[int, int]],
                max_chars: int = NOTE_MAX_CHARS) -> str:
    """The note of a commit at `base`: finished offset ranges above it (inclusive, sorted,
    disjoint, each above `base`), as `upf1:<base>:<base64 of varint (gap, length - 1)
    pairs>`; "" when there are none. Ranges that would pass `max_chars` are left out."""
    if not ranges:
        return ""
    head = f"{NOTE_PREFIX}{base}:"
    budget = (max_chars - len(head)) // 4 * 3  # bytes whose base64 fits
    out = bytearray()
    cursor = base + 1
    for start, end in ranges:
        if start < cursor or end < start:
            raise ValueError(f"ranges must be sorted, disjoint and above {base}")
        pair = bytearray()
        _varint(start - cursor, pair)
        _varint(end - start, pair)
        if len(out) + len(pair) > budget:
            break
        out += pair
        cursor = end + 1
    return head + base64.b64encode(bytes(out)).decode("ascii") if out else ""


def decode_note(note: str | None, base: int) -> Finished:
    """The finished ranges a note names, if it is ours and was written with the commit at
    `base` (the offset committed with it); nothing for anything else (no note, another
    application's metadata, an older commit's note, a malformed one)."""
    empty = Finished(())
    if not note or not note.startswith(NOTE_PREFIX):
        return empty
    written, sep, body = note[len(NOTE_PREFIX):].partition(":")
    # ASCII digits only (str.isdigit takes "²", which int() refuses), and no more than an
    # offset has (int() refuses over 4,300 digits).
    if not sep or not _OFFSET.fullmatch(written) or int(written) != base:
        return empty
    try:
        data = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        return empty
    ranges: list[tuple[int, int]] = []
    values: list[int] = []
    value = shift = 0
    for byte in data:
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte & 0x80:
            if shift > 63:
                return empty
            continue
        values.append(value)
        value = shift = 0
    if shift or len(values) % 2 or len(values) > 2 * NOTE_MAX_RANGES:
        return empty
    cursor = base + 1
    for i in range(0, len(values), 2):
        start = cursor + values[i]
        end = start + values[i + 1]
        ranges.append((start, end))
        cursor = end + 1
    return Finished(ranges, base)


class Finished:
    """Offset ranges known finished (inclusive), sorted and disjoint: what a note names."""

    __slots__ = ("_ends", "_starts", "floor")

    def __init__(self, ranges: Iterable[tuple[int, int]], floor: int = -1) -> None:
        pairs = list(ranges)
        self._starts = [start for start, _ in pairs]
        self._ends = [end for _, end in pairs]
        self.floor = floor
        """The offset committed with the note that named them: its log's reading starts
        there, and one that starts below it is another log (`Worker._intake`)."""

    def __bool__(self) -> bool:
        return bool(self._starts)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Finished) and self.ranges == other.ranges

    def __repr__(self) -> str:
        return f"Finished({self.ranges!r})"

    @property
    def ranges(self) -> list[tuple[int, int]]:
        return list(zip(self._starts, self._ends, strict=True))

    @property
    def last(self) -> int:
        """The highest offset named (-1 when none)."""
        return self._ends[-1] if self._ends else -1

    def covers(self, offset: int) -> bool:
        i = bisect.bisect_right(self._starts, offset) - 1
        return i >= 0 and offset <= self._ends[i]

    def past(self, offset: int) -> int:
        """`offset`, or the first offset after the ranges that run on from it."""
        while True:
            i = bisect.bisect_right(self._starts, offset) - 1
            if i < 0 or offset > self._ends[i]:
                return offset
            offset = self._ends[i] + 1

    def above(self, offset: int) -> list[tuple[int, int]]:
        """The ranges clipped to offsets above `offset`."""
        i = bisect.bisect_right(self._ends, offset)
        return [(max(start, offset + 1), end)
                for start, end in zip(self._starts[i:], self._ends[i:], strict=True)]


NAMED_MAX = 1_000_000  # sent events per family a held note may take out of the window


class _SentLog:
    """One family's sent offsets from the committed one, ascending (8 bytes each: behind
    an event stuck for a day the named ones may number a million)."""

    __slots__ = ("head", "offsets")

    def __init__(self) -> None:
        self.offsets = array("q")
        self.head = 0  # offsets before it are below the base

    def drop_below(self, base: int) -> None:
        offsets = self.offsets
        if self.head < len(offsets) and offsets[self.head] < base:
            self.head = bisect.bisect_left(offsets, base, self.head)
            if self.head > 1024 and 2 * self.head > len(offsets):
                del offsets[:self.head]
                self.head = 0

    def count(self) -> int:
        return len(self.offsets) - self.head

    def holds(self, offset: int) -> bool:
        i = bisect.bisect_left(self.offsets, offset, self.head)
        return i < len(self.offsets) and self.offsets[i] == offset

    def count_in(self, start: int, end: int) -> int:
        """How many offsets lie in [start, end]."""
        low = bisect.bisect_left(self.offsets, start, self.head)
        return bisect.bisect_right(self.offsets, end, low) - low


class PartitionOffsets:
    """Offsets taken from one partition, in order, and which of them are finished."""

    __slots__ = ("_base", "_changes", "_first", "_freed", "_held", "_held_by_family",
                 "_high", "_inherited", "_named", "_note", "_open", "_pending", "_sent")

    def __init__(self) -> None:
        self._pending: deque[int] = deque()  # taken, in order, from the first unfinished
        self._open: set[int] = set()  # taken and not finished
        self._high: int | None = None
        self._base: int | None = None
        self._first: int | None = None  # the first offset taken or skipped
        # Per window family, the offsets that reach Userpilot or the DLQ, from the base.
        self._sent: dict[str, _SentLog] = {}
        self._named = Finished(())  # what the note held with the base names finished
        self._freed: dict[str, int] = {}  # ... and how many sent offsets of each family
        # Dead letters the DLQ guard holds (unfinished, out of the window): offset → family
        self._held: dict[int, str] = {}
        self._held_by_family: dict[str, int] = {}
        self._inherited = Finished(())  # finished by the previous owner (its commit's note)
        self._changes = 0  # bumped by whatever changes the note (see `note`)
        # (changes, base, max_chars, note) last encoded
        self._note: tuple[int, int, int, str] | None = None

    def started(self, offset: int) -> None:
        """Record an offset handed to the pipeline; offsets arrive in increasing order."""
        if self._high is not None and offset <= self._high:
            return  # never handed over twice (the worker restarts a log that went back)
        self._pending.append(offset)
        self._open.add(offset)
        self._high = offset
        self._changes += 1
        if self._base is None:
            self._base = offset
        if self._first is None:
            self._first = offset

    def skipped(self, offset: int) -> None:
        """Record an offset taken and finished at once (a dropped event).

        Same result as `started` then `finished`: only the high mark moves. A finished
        offset is never the committable one (that is the first unfinished, or past the high
        mark), so it is not kept: kept behind an event waiting out an outage, one entry
        per slice of drops grew without bound (~60 MB an hour at 47k drops/s).
        """
        if self._high is not None and offset <= self._high:
            return
        self._high = offset
        self._changes += 1
        if self._base is None:
            self._base = offset
        if self._first is None:
            self._first = offset

    def held(self, offset: int) -> None:
        """An unfinished offset whose dead letter the DLQ guard holds: it keeps the commit
        back but leaves the window, as a crash now would only write its dead letter again
        (`replay` sends such a copy once), no request. Counted, a window no larger than the
        guard's horizon filled with held dead letters, which were let go and committed
        before the guard could trip (round 42's note). `finished` ends the hold."""
        if offset not in self._open or offset in self._held:
            return
        for family, log in self._sent.items():
            if log.holds(offset):
                self._held[offset] = family
                self._held_by_family[family] = self._held_by_family.get(family, 0) + 1
                return

    def finished(self, offset: int) -> None:
        """Mark an offset done; unknown offsets are ignored (partition was reassigned)."""
        if offset not in self._open:
            return
        self._open.discard(offset)
        family = self._held.pop(offset, None)
        if family is not None:
            self._held_by_family[family] -= 1
        self._changes += 1
        pending = self._pending
        while pending and pending[0] not in self._open:
            pending.popleft()
        if len(pending) > 2 * len(self._open) + PENDING_SLACK:
            # Behind one event stuck for hours (a retry, a schema the registry withholds)
            # the finished ones after it are named by the commits' notes and leave the
            # window, so intake goes on: keep only the unfinished (amortised O(1)).
            self._pending = deque(o for o in pending if o in self._open)

    @property
    def high(self) -> int:
        """The highest offset taken or skipped (-1: none yet)."""
        return -1 if self._high is None else self._high

    def could_commit(self, offset: int) -> bool:
        """`offset` is one this tracker could have had committed: at most one past what it
        took (and the previous owner's finished offsets that follow). Anything else
        answers a commit of another log (the partition's log was replaced while that
        commit was on its way)."""
        return self._high is not None and offset <= self._inherited.past(self._high + 1)

    def committable(self) -> int | None:
        """The offset to commit (next to read), or None when nothing was taken yet.

        Past the previous owner's finished offsets that follow what was taken: a note
        names only offsets above its commit, so committed at the first of them (not read
        yet: a full window, a drain), the note left it out and the next owner sent that
        event again (review "rebal54")."""
        if self._pending:
            return self._pending[0]
        return None if self._high is None else self._inherited.past(self._high + 1)

    @property
    def unfinished(self) -> int:
        """How many taken offsets are not finished yet."""
        return len(self._open)

    def committed(self, offset: int, named: Finished | None = None) -> None:
        """Record that `offset` (next to read) is committed; `named`: what the note the
        coordinator now holds with it names finished above it (None: the note it held
        before still stands). A crash or a drain sends none of those again, so they leave
        the window, and come back into it if a later note names less (one cut at its
        length, or a broker that began refusing notes)."""
        self._base = offset if self._base is None else max(self._base, offset)
        for log in self._sent.values():
            log.drop_below(self._base)
        if self._held:  # out of the sent logs now: no longer taken off their counts
            for held in [o for o in self._held if o < self._base]:
                self._held_by_family[self._held.pop(held)] -= 1
        if named is not None:
            self._named = named
        self._count_named()

    def _count_named(self) -> None:
        """How many sent offsets of each family the held note names (at most NAMED_MAX)."""
        named = self._named
        base = -1 if self._base is None else self._base
        above = named.above(base) if named else []
        self._freed = {family: min(NAMED_MAX, sum(log.count_in(start, end)
                                                  for start, end in above))
                       for family, log in self._sent.items()} if above else {}

    def sent(self, offset: int, family: str = "track") -> None:
        """Record a taken offset that will be sent (to Userpilot or the DLQ), not dropped,
        under its window `family` (the rate budget its main request draws from)."""
        if self._base is None or offset >= self._base:
            log = self._sent.get(family)
            if log is None:
                log = self._sent[family] = _SentLog()
            log.offsets.append(offset)

    @property
    def at_risk(self) -> int:
        """Sent or sending events not yet committed, nor named finished by the note held
        with the commit, nor dead letters the guard holds (`held`): what a crash now would
        send again.

        Dropped events are not counted: dropped again after a crash, they are no
        duplicate anywhere.
        """
        return sum(self.at_risk_by_family.values())

    @property
    def at_risk_by_family(self) -> dict[str, int]:
        """`at_risk` per window family (families with none are left out)."""
        freed = self._freed
        held = self._held_by_family
        out: dict[str, int] = {}
        for family, log in self._sent.items():
            n = log.count() - freed.get(family, 0) - held.get(family, 0)
            if n:
                out[family] = n
        return out

    @property
    def first(self) -> int | None:
        """The first offset taken or skipped (None: none yet)."""
        return self._first

    # -- the note -----------------------------------------------------------------------
    def inherit(self, finished: Finished) -> None:
        """What the previous owner's last commit named finished above it: skipped when
        read (`inherited`), and named again by this owner's notes until passed."""
        self._inherited = finished
        self._changes += 1

    @property
    def inherited(self) -> Finished | None:
        """The previous owner's finished ranges not read yet: passed only once taken past
        (a commit may go past some before they are read, `committable`, and they are still
        skipped when they come)."""
        if not self._inherited:
            return None
        if self._high is not None and self._high >= self._inherited.last:
            self._inherited = Finished(())  # passed: nothing of it is read again
            self._changes += 1
            return None
        return self._inherited

    def note(self, base: int, max_chars: int = NOTE_MAX_CHARS) -> str:
        """`encode_note(base, finished_ranges(base), max_chars)`, encoded again only after
        a change (it is asked at every commit check, for every partition)."""
        cached = self._note
        if (cached is not None and cached[0] == self._changes and cached[1] == base
                and cached[2] == max_chars):
            return cached[3]
        note = encode_note(base, self.finished_ranges(base), max_chars) if max_chars else ""
        self._note = (self._changes, base, max_chars, note)
        return note

    def finished_ranges(self, base: int) -> list[tuple[int, int]]:
        """Finished offsets above `base` (the committable offset), as inclusive ranges.

        Every offset between two taken ones was dropped (finished at once), so the
        finished offsets up to the high mark are the gaps between unfinished ones; above
        the high mark, what the previous owner's note named.
        """
        out: list[tuple[int, int]] = []
        high = self._high
        if high is not None and high > base:
            start = base + 1
            for offset in sorted(self._open):  # the in-flight few, not every pending offset
                if offset <= base:
                    continue
                if offset > start:
                    out.append((start, offset - 1))
                start = offset + 1
            if start <= high:
                out.append((start, high))
        inherited = self.inherited
        if inherited is not None:
            floor = base if high is None else max(base, high)
            out.extend(inherited.above(floor))
        return _merged(out)


def _merged(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, disjoint ranges with touching ones joined."""
    out: list[tuple[int, int]] = []
    for start, end in ranges:
        if out and start <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out
