"""Unit tests for consumer.offsets: the committable offset under out-of-order completion."""

from __future__ import annotations

import base64
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer.offsets import (
    NOTE_MAX_CHARS,
    NOTE_MAX_RANGES,
    NOTE_PREFIX,
    Finished,
    PartitionOffsets,
    decode_note,
    encode_note,
)


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


# -- the note: what a commit names finished above it ---------------------------------------

ranges_strategy = st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 5000)), max_size=600)


def _disjoint(base: int, raw: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Turn (gap, length) pairs into sorted disjoint ranges above `base`."""
    out, cursor = [], base + 1
    for gap, length in raw:
        start = cursor + gap
        out.append((start, start + length))
        cursor = start + length + 2  # at least one offset between ranges
    return out


@given(base=st.integers(0, 2**62), raw=ranges_strategy,
       max_chars=st.integers(20, NOTE_MAX_CHARS))
def test_a_note_decodes_to_a_prefix_of_its_ranges_within_its_bound(
        base: int, raw: list[tuple[int, int]], max_chars: int) -> None:
    ranges = _disjoint(base, raw)
    note = encode_note(base, ranges, max_chars)
    assert len(note) <= max_chars
    decoded = decode_note(note, base).ranges
    assert decoded == ranges[:len(decoded)]
    if ranges and len(ranges) <= 20 and base < 2**40 and max_chars >= 200:
        assert decoded == ranges  # a small set fits whole


def test_no_ranges_no_note() -> None:
    assert encode_note(7, []) == ""
    assert not decode_note("", 7)
    assert not decode_note(None, 7)


@pytest.mark.parametrize("note", [
    "some other application's metadata",
    "upf1:8:AAA=",        # written with another commit (offset 8, not 7)
    "upf1:7:%%%",         # not base64
    "upf1:7:gA==",        # a varint cut short
    "upf1:7:AA==",        # an odd count of numbers
    "upf1::AAA=",
    "upf1:-1:AAA=",
    "upf1:7:" + base64.b64encode(b"\xff" * 10 + b"\x01" + b"\x00").decode(),  # > 63 bits
])
def test_a_note_not_ours_or_not_this_commits_names_nothing(note: str) -> None:
    assert decode_note(note, 7) == Finished(())


def test_a_decoded_note_is_bounded_whatever_it_claims() -> None:
    huge = bytearray()
    for _ in range(NOTE_MAX_RANGES + 1):
        huge += b"\x00\x00"
    assert not decode_note("upf1:0:" + base64.b64encode(bytes(huge)).decode(), 0)
    wide = encode_note(0, [(1, 2**60)])  # one range, however wide, is two numbers
    assert decode_note(wide, 0).covers(2**59)


def test_finished_ranges_are_the_gaps_between_unfinished_offsets() -> None:
    t = tracker(10, 13, 14, 20, 22)
    t.skipped(25)  # drops after the last taken offset
    for offset in (13, 20):
        t.finished(offset)
    # Open: 10, 14, 22. Finished: 11-12 (drops), 13, 15-19 (drops), 20, 21, 23-25.
    assert t.committable() == 10
    assert t.finished_ranges(10) == [(11, 13), (15, 21), (23, 25)]
    t.finished(10)
    assert t.committable() == 14
    assert t.finished_ranges(14) == [(15, 21), (23, 25)]


def test_an_inherited_note_is_skipped_named_again_until_passed() -> None:
    t = PartitionOffsets()
    t.inherit(Finished([(3, 4), (8, 9)]))
    assert t.inherited == Finished([(3, 4), (8, 9)])
    t.started(2)  # the previous owner's held offset, taken again
    assert t.finished_ranges(2) == [(3, 4), (8, 9)]
    t.skipped(4)  # 3 and 4 skipped as already finished
    assert t.finished_ranges(2) == [(3, 4), (8, 9)]
    t.finished(2)
    t.started(5)
    assert t.committable() == 5
    assert t.finished_ranges(5) == [(8, 9)]
    t.finished(5)
    t.skipped(9)
    assert t.committable() == 10
    assert t.inherited is None  # passed: nothing of it is read again
    assert t.finished_ranges(10) == []


@pytest.mark.parametrize("written", ["²", "①", "٣", "1" * 4301, "1" * 20])
def test_a_note_with_a_foreign_or_endless_offset_names_nothing(written: str) -> None:
    """str.isdigit() takes these and int() refuses them: a note like that crashed every
    replica that was assigned its partition (found by a review)."""
    assert not decode_note(f"upf1:{written}:AA==", 2)


@given(st.text(max_size=200))
def test_no_note_crashes_the_decoder(text: str) -> None:
    for note in (text, NOTE_PREFIX + text, f"{NOTE_PREFIX}7:{text}"):
        decode_note(note, 7)


def test_the_cached_note_is_always_the_note_of_the_current_state() -> None:
    """`note` re-encodes only after a change: whatever the mix of takes, drops, finishes
    and inheritance, it equals encoding the finished ranges afresh."""
    rng = random.Random(5)
    for _ in range(200):
        t = PartitionOffsets()
        offset = rng.randrange(100)
        if rng.random() < 0.3:
            t.inherit(Finished([(offset + 5, offset + 9), (offset + 30, offset + 31)]))
        taken: list[int] = []
        for _ in range(rng.randrange(1, 60)):
            offset += rng.randrange(1, 4)
            roll = rng.random()
            if roll < 0.4:
                t.started(offset)
                taken.append(offset)
            elif roll < 0.6:
                t.skipped(offset)
            elif taken:
                t.finished(taken.pop(rng.randrange(len(taken))))
            base = t.committable()
            if base is not None:
                assert t.note(base) == encode_note(base, t.finished_ranges(base))


def test_a_committed_note_takes_what_it_names_out_of_the_window() -> None:
    """A crash or a drain does not send again what the coordinator's note names: those
    leave the window (one stuck event no longer pauses every partition), the rest stay."""
    t = PartitionOffsets()
    for offset in range(10):
        t.started(offset)
        t.sent(offset, "identify" if offset % 2 else "track")
    for offset in (1, 2, 3, 6, 7, 8):
        t.finished(offset)
    assert t.at_risk == 10
    t.committed(0, decode_note(encode_note(0, t.finished_ranges(0)), 0))
    assert t.at_risk == 4  # 0, 4, 5, 9: unfinished
    assert t.at_risk_by_family == {"track": 2, "identify": 2}
    t.committed(0, Finished([(1, 3)]))  # a later note names less (cut at its length)
    assert t.at_risk == 7, "what no held note names is at risk again"
    t.committed(0, Finished(()))  # committed again without a note (the broker refused it)
    assert t.at_risk == 10
    t.committed(0)  # an answer that brings no note news keeps the held one
    assert t.at_risk == 10
    t.committed(0, decode_note(encode_note(0, t.finished_ranges(0)), 0))
    assert t.at_risk == 4
    for offset in (0, 4, 5, 9):
        t.finished(offset)
    t.committed(10)
    assert t.at_risk == 0 and t.at_risk_by_family == {}


@given(st.lists(st.integers(0, 399), unique=True, max_size=400), st.integers(0, 2**31))
def test_at_risk_is_every_sent_offset_not_committed_nor_named(
        finish: list[int], seed: int) -> None:
    rng = random.Random(seed)
    t = PartitionOffsets()
    sent = set()
    for offset in range(400):
        t.started(offset)
        if rng.random() < 0.7:
            t.sent(offset)
            sent.add(offset)
    named: set[int] = set()
    base = 0
    for i, offset in enumerate(finish):
        t.finished(offset)
        if i % 37 == 0:
            base = t.committable() or 0
            ranges = t.finished_ranges(base)
            note = encode_note(base, ranges)
            t.committed(base, decode_note(note, base))
            # Exactly what the held note names: one cut at NOTE_MAX_CHARS may name less
            # than the previous one, and what it no longer names is at risk again.
            named = {o for o in range(base, 400) if decode_note(note, base).covers(o)}
        assert t.at_risk == len({o for o in sent if o >= base} - named)


def test_finished_offsets_behind_a_stuck_one_are_not_kept() -> None:
    """Behind one event stuck for hours, what finished after it is named by the notes and
    leaves the window, so intake goes on: the tracker keeps only the unfinished."""
    t = PartitionOffsets()
    t.started(0)
    for offset in range(1, 100_000):
        t.started(offset)
        t.finished(offset)
    assert t.committable() == 0 and t.unfinished == 1
    assert len(t._pending) <= 2 + 256
    t.finished(0)
    assert t.committable() == 100_000


def test_a_held_dead_letter_keeps_the_commit_back_and_leaves_the_window() -> None:
    """Round 43: held dead letters counted in the window, so a window no larger than the
    DLQ guard's horizon filled with them before the guard could trip."""
    offsets = PartitionOffsets()
    for offset, family in ((0, "track"), (1, "identify"), (2, "track")):
        offsets.started(offset)
        offsets.sent(offset, family)
    offsets.held(0)
    offsets.held(0)  # once
    offsets.held(1)
    offsets.held(7)  # never taken: nothing
    assert offsets.at_risk_by_family == {"track": 1}
    assert offsets.committable() == 0 and offsets.unfinished == 3
    offsets.finished(2)
    offsets.held(2)  # finished: nothing (it would leave the window uncounted)
    offsets.finished(0)  # let go: in the window again until committed
    assert offsets.at_risk_by_family == {"track": 2}
    assert offsets.committable() == 1
    offsets.committed(1)
    assert offsets.at_risk_by_family == {"track": 1}, "offset 2 is above the commit"
    offsets.finished(1)
    offsets.committed(3)
    assert offsets.at_risk_by_family == {}


def test_a_held_dead_letter_below_a_commit_is_no_longer_taken_off_the_window() -> None:
    """Review "diff43": a late answer committing past a held dead letter (the log before a
    restart) dropped it from the sent log while the hold still took it off: -1 events in
    the window."""
    offsets = PartitionOffsets()
    for offset in (0, 1):
        offsets.started(offset)
        offsets.sent(offset)
    offsets.held(0)
    offsets.committed(1)
    assert offsets.at_risk_by_family == {"track": 1}
    offsets.finished(0)
    assert offsets.at_risk_by_family == {"track": 1}


def test_the_last_inherited_offset_is_still_skipped_when_the_commit_reaches_it() -> None:
    """The previous owner's note names 5..7 finished. This owner read 3 and 4, then skipped
    5 and 6: the committable offset is 7, the note's last offset, not yet read. It is
    still finished by the previous owner and must stay inherited (skipped at intake), or it
    is delivered a second time."""
    tracker = PartitionOffsets()
    tracker.inherit(Finished([(5, 7)], 3))
    tracker.started(3)
    tracker.finished(3)
    tracker.started(4)
    tracker.finished(4)
    tracker.skipped(6)  # the intake skips 5 and 6 as inherited (one mark per run)
    assert tracker.committable() == 8  # past 7, which the note cannot name (review "rebal54")
    inherited = tracker.inherited
    assert inherited is not None and inherited.covers(7)
    tracker.skipped(7)
    assert tracker.inherited is None and tracker.committable() == 8


@pytest.mark.parametrize("taken", [41, 40])
def test_the_previous_owners_finished_offset_at_the_commit_is_not_sent_again(taken: int) -> None:
    """Review "rebal54": the previous owner's note named 38, 42-43 and 45 finished. This
    owner finished 35..41 and had not read 42 yet (a full window, a drain): it committed 42
    with a note naming 43 and 45 only (a note names offsets above its commit), and the next
    owner sent 42 again. The commit goes past the run the note named."""
    tracker = PartitionOffsets()
    tracker.inherit(Finished([(38, 38), (42, 43), (45, 45)], 35))
    for offset in range(35, taken + 1):
        if offset != 38:
            tracker.started(offset)
            tracker.finished(offset)
        else:
            tracker.skipped(offset)
    base = tracker.committable()
    assert base is not None
    nxt = decode_note(tracker.note(base), base)
    finished_by_someone = {38, 42, 43, 45, *range(35, taken + 1)}
    for offset in finished_by_someone:
        assert offset < base or nxt.covers(offset), (offset, base, nxt)
    assert base == (44 if taken == 41 else 41)
    assert tracker.could_commit(base) and not tracker.could_commit(base + 1)


@pytest.mark.parametrize("max_chars", [100, 400, NOTE_MAX_CHARS])
def test_a_note_of_many_ranges_keeps_to_its_bound(max_chars: int) -> None:
    """The bound is in characters of the note, base64 included: a budget counted in bytes
    before the encoding made notes the broker refuses with the commit (review "mutate52":
    only a property test caught it, now and then)."""
    ranges = [(1000 + 3 * i, 1000 + 3 * i + 1) for i in range(2000)]
    note = encode_note(999, ranges, max_chars)
    assert 0 < len(note) <= max_chars
    decoded = decode_note(note, 999)
    assert decoded is not None and decoded.ranges == ranges[:len(decoded.ranges)]


@given(st.lists(st.booleans(), min_size=1, max_size=60), st.lists(st.booleans(), max_size=60),
       st.lists(st.booleans(), max_size=60))
def test_a_handover_leaves_nothing_finished_to_be_sent_again(
        named: list[bool], finish: list[bool], read: list[bool]) -> None:
    """Three owners: the first committed at 0 naming `named` finished; the second reads a
    prefix of the log (`read`), skips what the note names, finishes some (`finish`), and
    commits. Every offset either of them finished is below its commit or named by its note:
    the third sends none of them again (review "rebal54")."""
    finished = {i for i, done in enumerate(named) if done and i > 0}
    runs: list[tuple[int, int]] = []
    for offset in sorted(finished):
        if runs and runs[-1][1] == offset - 1:
            runs[-1] = (runs[-1][0], offset)
        else:
            runs.append((offset, offset))
    tracker = PartitionOffsets()
    tracker.inherit(Finished(runs, 0))
    for offset in range(len(read)):
        if not read[offset]:
            break
        inherited = tracker.inherited
        if inherited is not None and inherited.covers(offset):
            tracker.skipped(offset)
            continue
        tracker.started(offset)
        if offset < len(finish) and finish[offset]:
            tracker.finished(offset)
            finished.add(offset)
    base = tracker.committable()
    if base is None:
        return
    nxt = decode_note(tracker.note(base, NOTE_MAX_CHARS), base)
    for offset in finished:
        assert offset < base or nxt.covers(offset), (offset, base, nxt)
    for offset in range(base):
        assert offset in finished, (offset, base)  # nothing unfinished is committed past
