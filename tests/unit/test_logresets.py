"""`LogResets` on its own: what a reset reported from the poll thread means once the
partition's next messages come (the worker's part is in test_worker_log_reset)."""

from __future__ import annotations

import logging
import time

import pytest
from prometheus_client import CollectorRegistry

from consumer.commits import Commits
from consumer.errors import Stop, UnreadableBatch
from consumer.logresets import RESET_LOOP_S, LogResets
from consumer.metrics import Metrics

TP = ("signal", 0)


def _resets() -> tuple[LogResets, Commits, Metrics]:
    commits = Commits()
    commits.assign([TP])
    metrics = Metrics(CollectorRegistry())
    return LogResets(commits, metrics), commits, metrics


def test_a_reset_is_judged_only_once_collected_and_the_first_position_holds() -> None:
    resets, _, metrics = _resets()
    resets.reported(TP, 100, False)
    assert resets.pending == {}, "the intake sees a reset only after its consume returned"
    resets.reported(TP, 150, None)  # a second before any message: the first position holds
    resets.collect()
    assert resets.pending == {TP: (100, False, 0)}
    resets.collect()  # nothing new: nothing changes
    assert resets.pending == {TP: (100, False, 0)}
    resets.after_reset(TP, -1, 130)
    assert resets.pending == {}
    assert metrics.skipped_offsets.labels(TP[0])._value.get() == 30


def test_forget_drops_both_a_reported_and_a_collected_reset() -> None:
    resets, _, _ = _resets()
    resets.reported(TP, 100, False)
    resets.collect()
    resets.reported(("signal", 1), 7, False)
    resets.forget([TP, ("signal", 1)])
    resets.collect()
    assert resets.pending == {}


def test_going_back_again_soon_stops_and_later_is_another_new_log(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    resets, commits, metrics = _resets()
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    for offset in range(4):
        commits.take(TP, offset)
    with caplog.at_level(logging.ERROR, logger="consumer.logresets"):
        resets.went_back(TP, 3, 0, mark=None)
    assert commits.high(TP) == -1, "tracked anew"
    assert metrics.log_resets.labels(TP[0])._value.get() == 1
    assert "went back from offset 3 to 0" in caplog.text
    now[0] += RESET_LOOP_S - 1
    with pytest.raises(UnreadableBatch, match="cannot read past offset 4"):
        resets.went_back(TP, 3, 0, mark=None)
    assert metrics.log_resets.labels(TP[0])._value.get() == 2  # the stop is counted
    now[0] += RESET_LOOP_S  # long after: another new log, tracked anew again
    resets.went_back(TP, 3, 0, mark=None)
    assert metrics.log_resets.labels(TP[0])._value.get() == 3


def test_going_back_right_after_an_unreadable_batch_stops_at_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Review "design59": the first going back after the client said it could not read a
    batch is that batch, not a new log; long after, a going back is a new log again."""
    resets, commits, metrics = _resets()
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    for offset in range(4):
        commits.take(TP, offset)
    resets.unreadable(TP, 4, "MessageSet at offset 4 (270 bytes) failed CRC32C check")
    resets.unreadable(TP, 8680820740569200760, "Unsupported Message(Set) MagicByte 120")
    with pytest.raises(Stop, match=r"cannot read a record batch \(MessageSet at offset 4"):
        resets.went_back(TP, 3, 0, mark=None)
    assert commits.high(TP) == 3, "not tracked anew"
    assert metrics.log_resets.labels(TP[0])._value.get() == 1, "the stop counted (ops59)"
    now[0] += RESET_LOOP_S
    resets.went_back(TP, 3, 0, mark=None)
    assert metrics.log_resets.labels(TP[0])._value.get() == 2


def test_a_reset_past_the_end_with_nothing_taken_is_told_after_two_batches(
        caplog: pytest.LogCaptureFixture) -> None:
    """A commit past the end of a log replaced while the workers were stopped is read from
    the start, told so once a batch was taken after it (the new log may be empty: review
    "diff59"), unless the client failed to read a batch meanwhile: then its first message
    stops the worker (a restarted pod sent the whole log up to the batch again, review
    "design59")."""
    resets, _, metrics = _resets()
    resets.reported(TP, 120, True)
    resets.collect()
    resets.after_reset(TP, -1, 0)  # the new log's first message: told after two batches
    resets.collect()
    assert metrics.log_resets.labels(TP[0])._value.get() == 0
    with caplog.at_level(logging.WARNING, logger="consumer.logresets"):
        resets.collect()
    assert metrics.log_resets.labels(TP[0])._value.get() == 1
    assert "its committed offset 120 is past the end of its log" in caplog.text
    assert resets.pending == {}
    resets.reported(TP, 8680820740569200761, True)
    resets.collect()
    resets.unreadable(TP, 4, "MessageSet at offset 4 (270 bytes) failed CRC32C check")
    resets.collect()
    resets.collect()  # not told: the batch could not be read
    with pytest.raises(Stop, match="starts the partition over from offset 0"):
        resets.after_reset(TP, -1, 0)
    assert metrics.log_resets.labels(TP[0])._value.get() == 2, "the stop counted (ops59)"


def test_a_batch_read_after_all_is_no_reason_to_stop() -> None:
    """Review "diff59": a batch that failed once (a passing decompression fault) and was
    then read: a later going back is a new log, not that batch."""
    resets, commits, metrics = _resets()
    resets.unreadable(TP, 4, "Decompression (codec 0x4) of message at 4 failed")
    resets.read_past(TP, 3)
    assert TP in resets.unread, "a message before the batch says nothing"
    resets.read_past(TP, 4)
    assert resets.unread == {}
    for offset in range(6):
        commits.take(TP, offset)
    resets.went_back(TP, 5, 0, mark=None)
    assert metrics.log_resets.labels(TP[0])._value.get() == 1


def test_an_old_unreadable_batch_does_not_hold_back_a_reset_past_the_end(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Review "diff59b": a partition held at a batch it could not read (its error older
    than RESET_LOOP_S), then its topic recreated: the reset past the end was never told."""
    resets, _, metrics = _resets()
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    resets.unreadable(TP, 500, "Decompression (codec 0x4) of message at 500 failed")
    now[0] += RESET_LOOP_S + 1
    resets.reported(TP, 500, True)
    for _ in range(3):
        resets.collect()
    assert metrics.log_resets.labels(TP[0])._value.get() == 1
    assert resets.pending == {}
