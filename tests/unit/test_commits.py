"""Unit tests for consumer.commits: per-batch drop records, commit bookkeeping."""

from __future__ import annotations

import random

from consumer.commits import TP, Commits
from consumer.offsets import Finished, decode_note, encode_note

PARTS: list[TP] = [("t", 0), ("t", 1), ("u", 0)]


def test_recording_drops_per_batch_gives_the_offsets_of_recording_each_one() -> None:
    """The worker's intake records a batch's drops as one mark per partition run
    (`Commits.dropped`, flushed before that partition's next `take` and at the end of the
    batch); the reference takes and finishes every dropped offset. Whatever the mix of
    drops and sends, the batch sizes and the order sends finish in, both give the same
    offsets to commit, the same window and the same acknowledgements."""
    rng = random.Random(11)
    for _ in range(300):
        batched, each = Commits(), Commits()
        batched.assign(PARTS)
        each.assign(PARTS)
        first = dict.fromkeys(PARTS, rng.choice([0, 5, 1000]))
        next_offset = dict(first)
        open_: list[tuple[TP, int]] = []
        drop_share = rng.random()
        for _batch in range(rng.randrange(1, 12)):
            marks: dict[TP, int] = {}
            for _message in range(rng.randrange(0, 30)):
                tp = rng.choice(PARTS)
                offset = next_offset[tp]
                next_offset[tp] += 1
                if rng.random() < drop_share:
                    marks[tp] = offset
                    assert each.take(tp, offset)
                    each.finish(tp, offset)
                    continue
                mark = marks.pop(tp, None)
                if mark is not None:
                    batched.dropped({tp: mark})
                for commits in (batched, each):
                    assert commits.take(tp, offset)
                    commits.sending(tp, offset)
                open_.append((tp, offset))
                if open_ and rng.random() < 0.3:  # a delivery finishes meanwhile
                    done = open_.pop(rng.randrange(len(open_)))
                    batched.finish(*done)
                    each.finish(*done)
            batched.dropped(marks)
            # Between batches the poll thread commits what is due; sometimes it is acked.
            assert batched.due() == each.due()
            assert batched.due(pipelined=True) == each.due(pipelined=True)
            assert batched.in_window_by_family() == each.in_window_by_family()
            due = each.due()
            batched.requested(due)
            each.requested(due)
            if rng.random() < 0.5:
                acked = sorted(due.items())
                assert batched.acknowledged(acked) == each.acknowledged(acked)
                assert batched.in_window_by_family() == each.in_window_by_family()
        rng.shuffle(open_)
        for done in open_:
            batched.finish(*done)
            each.finish(*done)
            assert batched.due() == each.due()
        # Everything finished: each partition that was read is due up to its end.
        assert batched.due() == {tp: offset for tp, offset in next_offset.items()
                                 if offset > first[tp] and offset != each.committed().get(tp)}


def test_drops_of_a_partition_no_longer_assigned_are_ignored() -> None:
    commits = Commits()
    commits.assign([("t", 0)])
    assert commits.owns(("t", 0)) and not commits.owns(("t", 1))
    commits.dropped({("t", 0): 4, ("t", 1): 9})
    assert commits.due() == {("t", 0): 5}
    commits.release([("t", 0)])
    assert not commits.owns(("t", 0))
    commits.dropped({("t", 0): 7})
    assert commits.due() == {}


def test_a_commit_is_outstanding_from_its_request_to_its_acknowledgement() -> None:
    commits = Commits()
    a, b = ("t", 0), ("t", 1)
    commits.assign([a, b])
    commits.dropped({a: 9, b: 9})  # a commit is only ever of offsets taken
    assert not commits.outstanding()
    commits.requested({a: 3, b: 7})
    commits.acknowledged([(a, 3)])
    assert commits.outstanding(), "b's commit not answered yet"
    commits.requested({a: 5})
    commits.acknowledged([(b, 7)])
    assert commits.outstanding(), "a's second commit not answered yet"
    commits.acknowledged([(a, 5)])
    assert not commits.outstanding()
    commits.requested({b: 9})
    commits.release([b])
    assert not commits.outstanding(), "a partition no longer ours awaits nothing"
    commits.requested({a: 8})
    commits.acknowledged([], failed=[a])
    assert not commits.outstanding(), "a failed commit is requested again by the next due"


def taken(tp: TP, count: int, *finished: int) -> Commits:
    """Commits of one partition with offsets 0..count-1 taken and `finished` finished."""
    commits = Commits()
    commits.assign([tp])
    for offset in range(count):
        commits.take(tp, offset)
    for offset in finished:
        commits.finish(tp, offset)
    return commits


def test_a_commit_is_due_again_when_only_its_note_changed() -> None:
    tp = ("t", 0)
    commits = taken(tp, 4, 1)
    due = commits.due_noted()
    assert list(due) == [tp] and due[tp][0] == 0
    assert decode_note(due[tp][1], 0).ranges == [(1, 1)]
    commits.requested({tp: 0}, {tp: due[tp][1]})
    assert commits.due_noted(pipelined=True) == {}  # nothing new since
    commits.finish(tp, 3)  # the offset is still held by 0
    again = commits.due_noted(pipelined=True)
    assert decode_note(again[tp][1], 0).ranges == [(1, 1), (3, 3)]
    # Acknowledged: its note is what the coordinator holds; a sync commit needs no repeat.
    commits.requested({tp: 0}, {tp: again[tp][1]})
    commits.acknowledged([(tp, 0)])  # the first commit's answer
    assert commits.due_noted() == {tp: again[tp]}
    commits.acknowledged([(tp, 0)])  # the second's
    assert commits.due_noted() == {}


def test_inherited_ranges_are_offered_to_the_intake_until_passed() -> None:
    tp, other = ("t", 0), ("t", 1)
    commits = Commits()
    commits.assign([tp, other])
    commits.inherit({tp: Finished([(5, 6)]), ("t", 9): Finished([(1, 1)])})  # 9: not ours
    assert commits.inherited() == {tp: Finished([(5, 6)])}
    commits.take(tp, 4)
    commits.dropped({tp: 6})  # 5 and 6 skipped at intake
    commits.finish(tp, 4)
    assert commits.inherited() == {}


def test_an_answer_is_credited_with_the_note_its_own_commit_carried() -> None:
    """Two commits of one held offset, the second with a longer note: the first's answer
    must not mark the longer note stored. If the second then fails, the revoke's
    synchronous commit must send it (found by a review: the next owner re-sent 2-3)."""
    tp = ("t", 0)
    c = taken(tp, 10, 1)
    ((_, first),) = c.due_noted(pipelined=True).values()
    c.requested({tp: 0}, {tp: first})
    c.finish(tp, 2)
    c.finish(tp, 3)
    ((_, second),) = c.due_noted(pipelined=True).values()
    c.requested({tp: 0}, {tp: second})
    c.acknowledged([(tp, 0)])  # the answer to the first
    c.acknowledged([], failed=[tp])  # the second refused (a rebalance)
    assert c.due_noted([tp]) == {tp: (0, second)}
    c.requested({tp: 0}, {tp: second})
    c.acknowledged([(tp, 0)])
    assert c.due_noted([tp]) == {}


def test_an_acknowledged_note_frees_the_window_of_what_it_names() -> None:
    """Events finished above a held offset leave the window once a commit naming them is
    acknowledged, not when it is only requested; a commit sent without a note (the
    broker refuses metadata) frees nothing above its offset."""
    tp = ("t", 0)
    c = Commits()
    c.assign([tp])
    for offset in range(6):
        c.take(tp, offset)
        c.sending(tp, offset)
    for offset in (1, 2, 4):
        c.finish(tp, offset)
    ((offset, note),) = c.due_noted(pipelined=True).values()
    assert offset == 0 and decode_note(note, 0) == Finished([(1, 2), (4, 4)])
    c.requested({tp: 0}, {})  # sent without its note
    c.acknowledged([(tp, 0)])
    assert c.in_window_by_partition() == {tp: 6}
    c.requested({tp: 0}, {tp: note})
    assert c.in_window_by_partition() == {tp: 6}  # requested, not yet held
    c.acknowledged([(tp, 0)])
    assert c.in_window_by_partition() == {tp: 3}  # 0, 3, 5
    c.requested({tp: 0}, {tp: note})
    c.acknowledged([(tp, 0)])  # the same note again changes nothing
    assert c.in_window_by_partition() == {tp: 3}


def test_a_restarted_partition_ignores_the_old_logs_finishes_and_commit_answers() -> None:
    tp = ("t", 0)
    commits = Commits()
    commits.assign([tp])
    old = [commits.take(tp, offset) for offset in range(30)]
    for offset in range(30):
        if offset != 2:
            commits.finish(tp, offset, old[offset])
    commits.requested({tp: 2})
    assert commits.restart(tp)
    assert commits.high(tp) == -1 and commits.committable([tp]) == {}
    new = commits.take(tp, 0), commits.take(tp, 1), commits.take(tp, 2)
    assert new[0] != old[0], "a new generation"
    commits.finish(tp, 2, old[2])  # the old log's event at offset 2 ends: not the new one's
    commits.finish(tp, 0, new[0])
    assert commits.committable([tp]) == {tp: 1}
    # The old log's commit answered late, and one of offset 30: neither is this log's.
    assert commits.acknowledged([(tp, 30)]) == []
    assert commits.committed() == {}
    commits.finish(tp, 1, new[1])
    commits.requested({tp: 2})
    assert commits.acknowledged([(tp, 2)]) == [(tp, 2)]
    assert not commits.restart(("t", 9)), "not assigned"


def _finished_through(commits: Commits, tp: TP, end: int) -> None:
    """Offsets 0..end-1 of `tp` taken and finished."""
    generations = [commits.take(tp, offset) for offset in range(end)]
    for offset, generation in enumerate(generations):
        commits.finish(tp, offset, generation)


def test_an_old_logs_late_answer_within_the_new_logs_offsets_is_not_its_commit() -> None:
    """Review "design59": the old log's commit at 70, answered after the new log was taken
    past 70, was credited as the new log's (its offset alone could be): committed read 70
    while the new log's event at 2 was unfinished, and its window stopped counting it.
    Answers come in order: the old log's come first, whatever their offsets."""
    tp = ("t", 0)
    commits = Commits()
    commits.assign([tp])
    _finished_through(commits, tp, 70)
    commits.requested({tp: 50})
    commits.requested({tp: 70})
    commits.requested({tp: 70})  # the same offset with another note: answered in turn
    assert commits.restart(tp)
    new = [commits.take(tp, offset) for offset in range(80)]
    for offset in range(80):
        commits.sending(tp, offset)
        if offset != 2:
            commits.finish(tp, offset, new[offset])
    assert commits.in_window_by_partition() == {tp: 80}
    commits.requested({tp: 2})
    assert commits.acknowledged([], [tp]) == [], "the old commit at 50 failed"
    assert commits.acknowledged([(tp, 70)]) == [], "the old log's"
    assert commits.acknowledged([(tp, 70)]) == [], "the old log's, again"
    assert commits.committed() == {}
    assert commits.acknowledged([(tp, 2)]) == [(tp, 2)], "the new log's own answer"
    assert commits.committed() == {tp: 2}
    assert commits.in_window_by_partition() == {tp: 78}, "2 still unfinished: counted"
    # Past the old log's answers, an answer of the same offset is the new log's again.
    commits.finish(tp, 2, new[2])
    commits.requested({tp: 80})
    assert commits.acknowledged([(tp, 80)]) == [(tp, 80)]


def test_an_old_logs_lost_answers_do_not_hide_the_new_logs() -> None:
    """The old log's commits never answered (a rebalance, a coordinator moving): the new
    log's first answer of another offset ends the wait for them."""
    tp = ("t", 0)
    commits = Commits()
    commits.assign([tp])
    _finished_through(commits, tp, 10)
    commits.requested({tp: 10})
    assert commits.restart(tp)
    _finished_through(commits, tp, 4)
    commits.requested({tp: 4})
    assert commits.acknowledged([(tp, 4)]) == [(tp, 4)]
    commits.requested({tp: 4})
    assert commits.acknowledged([], [tp]) == [], "a failure of the new log's own commit"
    assert commits.committed() == {tp: 4}


def test_after_a_restart_the_old_logs_position_finishes_nothing_of_the_new_log() -> None:
    """Review kafka18: librdkafka keeps the old log's position (here 20) after the topic is
    created again; trusted, it named offsets 3-19 of the new, shorter log finished, the
    commit went past its end and what was written there later was never delivered."""
    tp = ("t", 0)
    commits = Commits()
    commits.assign([tp])
    for offset in range(20):
        commits.finish(tp, offset, commits.take(tp, offset))
    assert commits.restart(tp)
    for offset in range(3):
        commits.finish(tp, offset, commits.take(tp, offset))
    commits.passed({tp: 20})
    assert commits.committable([tp]) == {tp: 3}, "the old position is not this log's"
    for offset in range(3, 25):
        commits.finish(tp, offset, commits.take(tp, offset))
    commits.passed({tp: 25})  # the position has caught up with the new log
    commits.passed({tp: 27})  # ... and now goes past its transaction markers again
    assert commits.committable([tp]) == {tp: 27}


def test_a_fresh_assignment_trusts_the_position_at_once() -> None:
    tp = ("t", 0)
    commits = Commits()
    commits.assign([tp])
    commits.finish(tp, 0, commits.take(tp, 0))
    commits.passed({tp: 3})  # a commit marker at 1, an aborted record at 2
    assert commits.committable([tp]) == {tp: 3}


def test_a_note_read_late_is_another_logs_only_past_what_this_worker_took() -> None:
    """Read late (after the first offsets were taken), a note at or below what this worker
    took is its own commit's (or one that commit overwrote): not taken, not reported. One
    past all it took is another log's: reported, even after a commit of its own (reviews
    "diff45c", "diff45d")."""
    from consumer.offsets import Finished

    tp = ("events", 0)
    commits = Commits()
    commits.assign([tp])
    for offset in range(4):
        commits.take(tp, offset)
        commits.finish(tp, offset)
    commits.requested({tp: 4})
    assert commits.inherit({tp: Finished([(1005, 1010)], 1000)}) == {tp: (0, 1000)}
    assert commits.inherit({tp: Finished([(6, 9)], 4)}) == {tp: None}
    assert commits.inherited() == {}


def test_a_late_note_of_another_log_is_reported_before_any_commit_of_this_workers() -> None:
    """With no commit of its own, a late note at or below what it took cannot be this
    worker's: another log's, reported (review "diff45e"); and after a `restart` (the log
    went back) a note still asked for is the old log's, never taken."""
    from consumer.offsets import Finished

    tp = ("events", 0)
    commits = Commits()
    commits.assign([tp])
    for offset in range(10):
        commits.take(tp, offset)
    assert commits.inherit({tp: Finished([(12, 14)], 10)}) == {tp: (0, 10)}
    other = ("events", 1)
    commits.assign([other])
    for offset in range(1000, 1004):
        commits.take(other, offset)
    assert commits.restart(other)
    commits.take(other, 1001)
    commits.inherit({other: Finished([(1005, 1010)], 1000)})
    assert commits.inherited() == {}


# Mutation tests' gaps (review "mutants46": each kills a mutant the suite let pass)
_TP = ("events", 0)


def test_a_note_read_after_the_first_message_at_its_own_offset_is_still_inherited() -> None:
    """The common late read: the fetch handed over the committed offset itself (first ==
    floor) before the note arrived. That is this log, so what the previous owner finished
    above its commit must be skipped, not disowned (which would send those events again)."""
    commits = Commits()
    commits.assign([_TP])
    commits.take(_TP, 10)  # the first message, at the committed offset
    finished = decode_note(encode_note(10, [(12, 13)]), 10)
    assert finished.floor == 10 and finished.ranges == [(12, 13)]
    late = commits.inherit({_TP: finished})
    assert late == {}
    assert commits.inherited()[_TP].ranges == [(12, 13)]


def test_the_first_acknowledged_commit_frees_the_window_of_what_its_note_names() -> None:
    """An event stuck at offset 5, the four after it delivered: the commit at 5 carries a
    note naming 6..9, and once acknowledged those leave the window (a crash would not send
    them again), so intake goes on behind the stuck event."""
    commits = Commits()
    commits.assign([_TP])
    for offset in range(5, 10):
        commits.take(_TP, offset)
        commits.sending(_TP, offset)
    for offset in range(6, 10):
        commits.finish(_TP, offset)
    assert commits.in_window_by_partition() == {_TP: 5}
    due = commits.due_noted()
    offset, note = due[_TP]
    assert offset == 5 and decode_note(note, 5).ranges == [(6, 9)]
    commits.requested({_TP: offset}, {_TP: note})
    assert commits.acknowledged([(_TP, offset)]) == [(_TP, 5)]
    assert commits.in_window_by_partition() == {_TP: 1}


def test_an_old_logs_event_finishing_after_a_restart_leaves_the_new_logs_offset_open(
) -> None:
    """The log went back (topic re-created): offset 5 of the old log is still in flight when
    offset 5 of the new log is taken. The old one finishing must not finish the new one, or
    the commit passes an event of the new log that was never delivered."""
    commits = Commits()
    commits.assign([_TP])
    old = commits.take(_TP, 5)
    assert commits.restart(_TP)
    new = commits.take(_TP, 5)
    assert new != old
    commits.finish(_TP, 5, old)
    assert commits.committable([_TP]) == {_TP: 5}
    commits.finish(_TP, 5, new)
    assert commits.committable([_TP]) == {_TP: 6}


def test_a_disowned_note_is_not_named_again_in_this_owners_commits() -> None:
    """The previous owner's note (floor 10, 12..13 finished) was read before the first
    message, which came at offset 0: the log was replaced (`Worker._note_of_another_log`
    disowns it). This owner's commits must not name 12..13 finished, or the next owner
    skips the new log's records at those offsets."""
    commits = Commits()
    commits.assign([_TP])
    finished = decode_note(encode_note(10, [(12, 13)]), 10)
    assert commits.inherit({_TP: finished}) == {}
    commits.take(_TP, 0)
    commits.disown(_TP)
    commits.take(_TP, 1)
    commits.finish(_TP, 1)
    offset, note = commits.due_noted()[_TP]
    assert offset == 0
    assert decode_note(note, 0).ranges == [(1, 1)]


def _window_recounted(commits: Commits) -> dict[str, int]:
    """The window summed over every tracker, as `in_window_by_family` did before it kept
    its count per partition."""
    total: dict[str, int] = {}
    for tracker in commits._offsets.values():
        for family, n in tracker.at_risk_by_family.items():
            total[family] = total.get(family, 0) + n
    return total


def test_the_kept_window_count_matches_a_recount_after_any_steps() -> None:
    """`in_window_by_family` counts again only the partitions a step touched since it was
    last asked. Whatever the steps (assign, take, send, drop, hold, finish, restart,
    release, notes inherited and disowned, commits requested, acknowledged and failed,
    positions passed), and however often it is asked between them, it equals the window
    summed over every partition, and `in_window_by_partition` each partition's part."""
    rng = random.Random(47)
    families = ["track", "identify", "company"]
    parts: list[TP] = [("t", p) for p in range(6)]
    for _ in range(150):
        commits = Commits()
        commits.assign(parts[:4])
        next_offset = dict.fromkeys(parts, 0)
        taken: list[tuple[TP, int, int]] = []
        for _step in range(rng.randrange(20, 160)):
            tp = rng.choice(parts)
            roll = rng.random()
            if roll < 0.3:
                offset = next_offset[tp]
                next_offset[tp] += 1
                generation = commits.take(tp, offset)
                if rng.random() < 0.5:  # a take alone leaves the window as it was
                    assert commits.in_window_by_family() == _window_recounted(commits)
                if generation:
                    commits.sending(tp, offset, rng.choice(families))
                    taken.append((tp, offset, generation))
            elif roll < 0.4:
                next_offset[tp] += rng.randrange(1, 4)
                commits.dropped({tp: next_offset[tp] - 1})
            elif roll < 0.55 and taken:
                tp, offset, generation = taken.pop(rng.randrange(len(taken)))
                commits.finish(tp, offset, generation)
            elif roll < 0.6 and taken:
                tp, offset, generation = rng.choice(taken)
                commits.hold(tp, offset, generation)
            elif roll < 0.72:
                due = commits.due_noted(None, pipelined=True)
                commits.requested({t: o for t, (o, _) in due.items()},
                                  {t: n for t, (_, n) in due.items()})
                if rng.random() < 0.8:
                    commits.acknowledged([(t, o) for t, (o, _) in due.items()])
                else:
                    commits.acknowledged([], list(due))
            elif roll < 0.76:
                commits.passed({tp: next_offset[tp] + rng.randrange(0, 3)})
            elif roll < 0.8:
                commits.restart(tp)
            elif roll < 0.84:
                commits.release([tp])
            elif roll < 0.88:
                commits.assign([tp])
            elif roll < 0.92:
                base = next_offset[tp]
                commits.inherit({tp: Finished([(base + 2, base + 4)], base)})
            elif roll < 0.94:
                commits.disown(tp)
            if rng.random() < 0.5:
                assert commits.in_window_by_family() == _window_recounted(commits)
                assert commits.in_window_by_partition() == {
                    t: tracker.at_risk for t, tracker in commits._offsets.items()}
        assert commits.in_window_by_family() == _window_recounted(commits)
