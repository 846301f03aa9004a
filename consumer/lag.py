"""The consumer-lag, committed-offset and held-back gauges of the partitions this worker
owns.

Two sources: librdkafka's statistics (a fetched partition's `consumer_lag`, the group's
committed offset, the low watermark) and, for a paused partition, the broker's high
watermark asked directly: statistics learn high watermarks from fetch
responses, and a paused partition is not fetched, so its lag froze at the pause while the
backlog grew (an outage, exactly when lag matters: the lag alert never fired without
kafka_exporter). `Lag.paused` asks for those, and for partitions no fetch answered for
(`Lag.unfetched`: a broker quota starving them).

Under read_committed every lag figure ends at the last stable offset: a transaction left
open (until the broker aborts it at its producer's transaction.timeout.ms, or for good when
it hangs) holds its records and all later ones back while the lag reads 0, the worker
stays ready and reads nothing (review "tx50"). `unstable_records` and
`stable_offset_stalled_seconds` show it, from the same statistics.

Thread rule: called on the Kafka poll thread (the stats callback, the paused partitions'
watermarks); what the statistics taught is kept under this object's own lock, so the
worker's release of a partition (any thread) may forget it.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

from consumer.commits import TP, Commits
from consumer.metrics import Metrics

__all__ = ["Lag"]

log = logging.getLogger(__name__)

UNFETCHED_AFTER = 2
"""Statistics in a row without a partition's high watermark after which it is looked up
(`Lag.unfetched`): the first may come before the first fetch of a new assignment."""


class Lag:
    """Sets `consumer_lag` and `committed_offset` per owned partition."""

    def __init__(self, metrics: Metrics, commits: Commits,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.m = metrics
        self.commits = commits
        self._clock = clock
        self._lock = threading.Lock()
        # Per partition with records held back: its last stable offset, and since when
        # (the poll thread's statistics only).
        self._stable: dict[TP, tuple[int, float]] = {}
        self._group: dict[TP, int] = {}  # the group's committed offsets, from the statistics
        self._low: dict[TP, int] = {}  # low watermarks, from the statistics
        # Where the next round of paused partitions' lookups starts (`paused`).
        self._next: TP | None = None
        # Per fetched (not paused) partition the statistics knew no high watermark of: how
        # many statistics in a row (`unfetched`).
        self._unseen: dict[TP, int] = {}
        # Partitions whose low watermark was asked of the broker (`paused`), not learnt from
        # the statistics: asked again every round, retention moving the log's start.
        self._asked_low: set[TP] = set()

    def forget(self, parts: Collection[TP]) -> None:
        """A partition left this worker: what the statistics said of it no longer holds."""
        with self._lock:
            for tp in parts:
                self._group.pop(tp, None)
                self._low.pop(tp, None)
                self._stable.pop(tp, None)
                self._unseen.pop(tp, None)
                self._asked_low.discard(tp)

    def on_stats(self, stats: dict[str, Any], assigned: Collection[TP],
                 paused: Collection[TP]) -> None:
        """librdkafka's statistics: lag of the fetched partitions, and what later lags of
        paused or never-committed partitions count from."""
        own = self.commits.committed()
        for topic, info in stats.get("topics", {}).items():
            for pid, pinfo in info.get("partitions", {}).items():
                tp = (topic, int(pid))
                if tp not in assigned:
                    continue
                offset = pinfo.get("committed_offset", -1)
                if isinstance(offset, int) and offset >= 0:
                    with self._lock:
                        self._group[tp] = offset
                    if tp not in own:
                        # The group's commit, until this worker commits the partition itself:
                        # taken over finished, the partition had no series at all.
                        self.m.committed_offset.labels(topic, pid).set(offset)
                low = pinfo.get("lo_offset", -1)
                if isinstance(low, int) and low >= 0:
                    with self._lock:
                        self._low[tp] = low
                        self._asked_low.discard(tp)
                if tp in paused:
                    with self._lock:
                        self._unseen.pop(tp, None)
                    continue  # stale without fetches: `Lag.paused` sets it
                self._note_fetched(tp, pinfo.get("hi_offset", -1))
                self._held_back(tp, pinfo)
                # Offsets are committed explicitly, never stored: consumer_lag_stored is
                # always -1 here, consumer_lag (high watermark - committed) is the figure.
                lag = pinfo.get("consumer_lag", -1)
                if not (isinstance(lag, int) and lag >= 0):
                    # Nothing committed in the group yet (a new group or partition):
                    # librdkafka has no lag, and the partitions furthest behind had no
                    # series (a backlog of 75,000 reported as 42,000).
                    # The last stable offset, as librdkafka's own lag counts under
                    # read_committed: past it an open transaction's records cannot be read
                    # yet, and the high watermark showed them as lag (review "gaps46").
                    stable = pinfo.get("ls_offset", -1)
                    lag = self._uncommitted(tp, stable if isinstance(stable, int)
                                            and stable >= 0 else pinfo.get("hi_offset", -1))
                if lag is not None:
                    self.m.consumer_lag.labels(topic, pid).set(lag)

    def _note_fetched(self, tp: TP, high: object) -> None:
        """Whether the statistics know `tp`'s high watermark (from a fetch answer)."""
        with self._lock:
            if isinstance(high, int) and high >= 0:
                self._unseen.pop(tp, None)
            else:
                self._unseen[tp] = self._unseen.get(tp, 0) + 1

    def unfetched(self) -> set[TP]:
        """Partitions the statistics have known no high watermark of twice in a row (a
        statistics interval at least): no fetch answered for them, so no lag series. A
        broker quota starving every fetch (an empty answer each second), a batch larger
        than the fetch takes, left the whole backlog without a figure and the lag alerts
        silent (round 59's "noticed", review "sizes59"). `paused` asks the broker for them
        as for paused partitions."""
        if not self._unseen:  # read without the lock: the common case, nothing to ask
            return set()
        with self._lock:
            return {tp for tp, times in self._unseen.items() if times >= UNFETCHED_AFTER}

    def _held_back(self, tp: TP, pinfo: dict[str, Any]) -> None:
        """The records past the last stable offset of a fetched partition, and how long
        that offset has not moved while some are."""
        high, stable = pinfo.get("hi_offset", -1), pinfo.get("ls_offset", -1)
        if not (isinstance(high, int) and isinstance(stable, int) and 0 <= stable <= high):
            return
        labels = (tp[0], str(tp[1]))
        now = self._clock()
        with self._lock:
            if stable == high:
                self._stable.pop(tp, None)
                since = now
            else:
                last = self._stable.get(tp)
                since = last[1] if last is not None and last[0] == stable else now
                self._stable[tp] = (stable, since)
        self.m.unstable_records.labels(*labels).set(high - stable)
        self.m.stable_offset_stalled.labels(*labels).set(now - since)

    def paused(self, parts: Sequence[TP],
               high_watermarks: Callable[[list[TP]], dict[TP, int]],
               still_paused: Callable[[], Collection[TP]],
               low_watermarks: Callable[[list[TP]], dict[TP, int]] | None = None) -> None:
        """The lag of paused partitions from the broker's high watermarks (one ListOffsets
        each, every few seconds); set only for those still paused once it answered.

        `high_watermarks` asks in order until its budget is spent (-1: asked, no answer).
        Each round starts after the last partition asked: asked in partition order every
        time, those past the budget were never asked, a topic sorting last kept the lag it
        had when paused through a whole outage (review "multi45"); sorted by when each last
        answered, a partition without a leader came first every round and starved the
        others (review "diff45b"); and a guess at how many the budget reached skipped some
        for ever (reviews "diff45c", "diff45d").

        A partition without a base (nothing committed, never fetched: a new group whose
        fetches a quota starves) counts from its low watermark, asked by `low_watermarks`
        after the high ones (the worker gives them what the high ones left of the budget,
        a quarter at least: asked first, lows that never answered starved every paused
        partition's lag, review "diff60b"; last with nothing left, the reverse, "diff60c")
        and each round while it has no other base (retention moves it): its lag is set from
        the next round on."""
        committed = self.bases(parts)
        with self._lock:
            baseless = [tp for tp in parts if tp not in committed or (
                tp in self._asked_low and committed[tp] == self._low.get(tp))]
        eligible = sorted(tp for tp in parts if tp in committed)
        with self._lock:
            start = bisect.bisect_left(eligible, self._next) if self._next else 0
        order = eligible[start:] + eligible[:start]
        try:
            highs = high_watermarks(order)
        except Exception:
            log.debug("paused partitions' high watermarks unavailable", exc_info=True)
            highs = {}
        asked = [i for i, tp in enumerate(order) if tp in highs]
        if order:
            with self._lock:
                self._next = order[(asked[-1] + 1 if asked else 1) % len(order)]
        still = still_paused()
        for (topic, partition), high in highs.items():
            if high >= 0 and (topic, partition) in still:
                self.m.consumer_lag.labels(topic, str(partition)).set(
                    max(0, high - committed[(topic, partition)]))
        if baseless and low_watermarks is not None:
            self._ask_lows(baseless, low_watermarks, still_paused)

    def _ask_lows(self, parts: list[TP], low_watermarks: Callable[[list[TP]], dict[TP, int]],
                  still_paused: Callable[[], Collection[TP]]) -> None:
        """Keep the low watermarks the broker gives for `parts` (`paused`)."""
        try:
            lows = low_watermarks(parts)
        except Exception:
            log.debug("low watermarks unavailable", exc_info=True)
            return
        owned = still_paused()  # not kept for a partition released meanwhile
        with self._lock:
            for tp, low in lows.items():
                if low >= 0 and tp in owned:
                    self._low[tp] = low
                    self._asked_low.add(tp)

    def bases(self, parts: Sequence[TP]) -> dict[TP, int]:
        """Where each partition's lag counts from: the offset this worker had acknowledged,
        else the group's as librdkafka knows it, else (a new group or partition) what this
        worker would commit, else the low watermark (a partition without a committed offset
        is read from the log's start: `config` refuses any other auto.offset.reset); so every
        partition has a lag."""
        with self._lock:
            low = {tp: self._low[tp] for tp in parts if tp in self._low}
            group = {tp: self._group[tp] for tp in parts if tp in self._group}
        mine = self.commits.committed()
        return {**low, **self.commits.committable(parts), **group,
                **{tp: mine[tp] for tp in parts if tp in mine}}

    def _uncommitted(self, tp: TP, high: object) -> int | None:
        """The lag of a partition librdkafka has none for (nothing committed in the group)."""
        if not isinstance(high, int) or high < 0:
            return None
        base = self.bases([tp]).get(tp)
        return None if base is None else max(0, high - base)
