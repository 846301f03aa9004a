"""Per-partition "finished up to" tracking for at-least-once commits.

Deliveries complete out of order; the committable offset is the lowest offset not yet
finished (Kafka commits name the next offset to read). A dropped event is finished at
once, a dead-lettered one when the DLQ produce is acknowledged.
"""

from __future__ import annotations

from collections import deque

__all__ = ["PartitionOffsets"]


class PartitionOffsets:
    """Offsets taken from one partition, in order, and which of them are finished."""

    __slots__ = ("_base", "_families", "_high", "_open", "_pending", "_risk", "_sent")

    def __init__(self) -> None:
        self._pending: deque[int] = deque()  # taken, in order, from the first unfinished
        self._open: set[int] = set()  # taken and not finished
        self._high: int | None = None
        self._base: int | None = None
        self._sent: deque[int] = deque()  # offsets that reach Userpilot or the DLQ
        self._families: deque[str] = deque()  # ... and the window family of each
        self._risk: dict[str, int] = {}  # at-risk count per window family

    def started(self, offset: int) -> None:
        """Record an offset handed to the pipeline; offsets arrive in increasing order."""
        if self._high is not None and offset <= self._high:
            return  # a re-fetch after seek: already tracked
        self._pending.append(offset)
        self._open.add(offset)
        self._high = offset
        if self._base is None:
            self._base = offset

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
        if self._base is None:
            self._base = offset

    def finished(self, offset: int) -> None:
        """Mark an offset done; unknown offsets are ignored (partition was reassigned)."""
        if offset not in self._open:
            return
        self._open.discard(offset)
        while self._pending and self._pending[0] not in self._open:
            self._pending.popleft()

    def committable(self) -> int | None:
        """The offset to commit (next to read), or None when nothing was taken yet."""
        if self._pending:
            return self._pending[0]
        return None if self._high is None else self._high + 1

    @property
    def unfinished(self) -> int:
        """How many taken offsets are not finished yet."""
        return len(self._open)

    def committed(self, offset: int) -> None:
        """Record that `offset` (next to read) is committed."""
        self._base = offset if self._base is None else max(self._base, offset)
        while self._sent and self._sent[0] < self._base:
            self._sent.popleft()
            family = self._families.popleft()
            self._risk[family] -= 1

    def sent(self, offset: int, family: str = "track") -> None:
        """Record a taken offset that will be sent (to Userpilot or the DLQ), not dropped,
        under its window `family` (the rate budget its main request draws from)."""
        if self._base is None or offset >= self._base:
            self._sent.append(offset)
            self._families.append(family)
            self._risk[family] = self._risk.get(family, 0) + 1

    @property
    def at_risk(self) -> int:
        """Sent or sending events not yet committed: what a crash now would send again.

        Dropped events are not counted: dropped again after a crash, they are no
        duplicate anywhere.
        """
        return len(self._sent)

    @property
    def at_risk_by_family(self) -> dict[str, int]:
        """`at_risk` per window family (families with none are left out)."""
        return {family: n for family, n in self._risk.items() if n}
