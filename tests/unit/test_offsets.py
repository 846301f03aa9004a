"""Unit tests for consumer.offsets: the committable offset under out-of-order completion."""

from __future__ import annotations

import random

import pytest

from consumer.offsets import PartitionOffsets


def tracker(*offsets: int) -> PartitionOffsets:
    t = PartitionOffsets()
    for offset in offsets:
        t.started(offset)
    return t


def test_nothing_taken() -> None:
    t = PartitionOffsets()
    assert t.committable() is None
    assert t.unfinished == 0


def test_started_but_unfinished_commits_the_first() -> None:
    t = tracker(10, 11, 12)
    assert t.committable() == 10
    assert t.unfinished == 3


@pytest.mark.parametrize(("finish_order", "expected"), [
    ([], []),
    ([10], [11]),
    ([11], [10]),
    ([11, 12], [10, 10]),
    ([11, 12, 10], [10, 10, 13]),
    ([11, 10], [10, 12]),
    ([12, 10], [10, 11]),
    ([12, 10, 11], [10, 11, 13]),
    ([10, 11, 12], [11, 12, 13]),
    ([12, 11, 10], [10, 10, 13]),
])
def test_out_of_order_finishes(finish_order: list[int], expected: list[int]) -> None:
    t = tracker(10, 11, 12)
    seen = []
    for offset in finish_order:
        t.finished(offset)
        seen.append(t.committable())
    assert seen == expected
    assert t.unfinished == 3 - len(finish_order)


def test_committable_is_the_lowest_unfinished_with_gaps() -> None:
    """Offsets need not be contiguous (compaction, transaction markers)."""
    t = tracker(5, 9, 20, 21)
    t.finished(9)
    t.finished(21)
    assert t.committable() == 5
    t.finished(5)
    assert t.committable() == 20
    t.finished(20)
    assert t.committable() == 22
    assert t.unfinished == 0


def test_everything_finished_commits_past_the_highest() -> None:
    t = tracker(0)
    t.finished(0)
    assert t.committable() == 1
    t.started(1)
    assert t.committable() == 1
    t.finished(1)
    assert t.committable() == 2


@pytest.mark.parametrize("repeat", [3, 4, 5])
def test_refetch_of_tracked_offsets_is_ignored(repeat: int) -> None:
    t = tracker(3, 4, 5)
    t.finished(3)
    t.started(repeat)  # seek back and re-fetch
    assert t.unfinished == 2
    assert t.committable() == 4
    t.finished(4)
    t.finished(5)
    assert t.committable() == 6
    assert t.unfinished == 0


def test_refetch_of_a_finished_offset_is_not_tracked_again() -> None:
    t = tracker(3)
    t.finished(3)
    t.started(3)
    assert t.committable() == 4
    assert t.unfinished == 0


def test_duplicate_finish_is_harmless() -> None:
    t = tracker(1, 2, 3)
    t.finished(2)
    t.finished(2)
    assert t.unfinished == 2
    t.finished(1)
    t.finished(1)
    assert t.committable() == 3
    assert t.unfinished == 1


@pytest.mark.parametrize("unknown", [0, 6, 8, 100])
def test_unknown_offsets_are_ignored(unknown: int) -> None:
    t = tracker(5, 7)
    t.finished(unknown)
    assert t.committable() == 5
    assert t.unfinished == 2


def test_finishing_an_offset_before_it_is_started_does_not_pre_finish_it() -> None:
    """A stray finish (old assignment) must not make a later delivery count as done."""
    t = tracker(5)
    t.finished(6)
    t.started(6)
    t.finished(5)
    assert t.committable() == 6
    assert t.unfinished == 1


def test_unknown_offset_on_an_empty_tracker() -> None:
    t = PartitionOffsets()
    t.finished(3)
    assert t.committable() is None
    assert t.unfinished == 0


def test_random_orders_match_a_simple_model() -> None:
    rng = random.Random(7)
    for _ in range(200):
        offsets = sorted(rng.sample(range(1000), rng.randrange(1, 40)))
        t = tracker(*offsets)
        order = offsets[:]
        rng.shuffle(order)
        done: set[int] = set()
        for offset in order:
            t.finished(offset)
            done.add(offset)
            lowest = next((o for o in offsets if o not in done), offsets[-1] + 1)
            assert t.committable() == lowest
            assert t.unfinished == len(offsets) - len(done)


def test_at_risk_counts_only_sent_offsets_until_committed() -> None:
    tracker = PartitionOffsets()
    for offset in range(10):
        tracker.started(offset)
    for offset in (2, 5, 7):
        tracker.sent(offset)
    for offset in range(10):
        tracker.finished(offset)
    assert tracker.at_risk == 3, "dropped offsets are not at risk of duplication"
    tracker.committed(6)
    assert tracker.at_risk == 1
    tracker.committed(10)
    assert tracker.at_risk == 0
    tracker.started(10)
    tracker.sent(10)
    assert tracker.at_risk == 1


def test_skipped_is_started_then_finished() -> None:
    """The drop path's one-step record gives the same committable offsets as two steps,
    whatever the mix of skipped and sent offsets and the order they finish in."""
    rng = random.Random(7)
    for _ in range(200):
        one, two = PartitionOffsets(), PartitionOffsets()
        open_: list[int] = []
        for offset in range(rng.randrange(5, 40)):
            if rng.random() < 0.6:
                one.skipped(offset)
                two.started(offset)
                two.finished(offset)
            else:
                one.started(offset)
                two.started(offset)
                open_.append(offset)
            if open_ and rng.random() < 0.3:
                done = open_.pop(rng.randrange(len(open_)))
                one.finished(done)
                two.finished(done)
            assert one.committable() == two.committable()
            assert one.unfinished == two.unfinished
        for done in open_:
            one.finished(done)
            two.finished(done)
            assert one.committable() == two.committable()


def test_skipped_ignores_a_refetched_offset() -> None:
    t = tracker(10, 11)
    t.skipped(11)
    assert t.committable() == 10
    t.finished(10)
    assert t.committable() == 11  # 11 is still open: the refetch did not finish it


def test_at_risk_is_counted_per_window_family_until_committed() -> None:
    tracker = PartitionOffsets()
    for offset, family in enumerate(["identify", "track", "identify", "track", "track"]):
        tracker.started(offset)
        tracker.sent(offset, family)
    assert tracker.at_risk_by_family == {"identify": 2, "track": 3}
    tracker.committed(3)
    assert tracker.at_risk_by_family == {"track": 2}
    tracker.committed(5)
    assert tracker.at_risk_by_family == {} and tracker.at_risk == 0


def test_drops_behind_an_unfinished_event_keep_no_state() -> None:
    """One entry per slice of drops was kept behind an event waiting out an outage: ~60 MB
    an hour on a mostly dropped topic, for as long as the outage lasted."""
    t = tracker(0)
    for offset in range(1, 200_001):
        t.skipped(offset)
    assert len(t._pending) == 1  # only the unfinished one
    assert t.committable() == 0
    t.finished(0)
    assert t.committable() == 200_001
