"""Replay's pure parts: which dead letters a selection replays, and its consumer group."""

from __future__ import annotations

import argparse
import base64
import errno
import io
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from consumer.deadletter import Failure, dlq_headers
from consumer.errors import ConfigError
from consumer.replay import Filters, decide, default_group

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
OLD_EVENT_MS = int(datetime(2020, 1, 1, tzinfo=UTC).timestamp() * 1000)


@dataclass
class DlqRecord:
    """What `_replay_one` reads of a polled dead letter (confluent-kafka's `Message`)."""

    _headers: list[tuple[str, bytes | None]]
    _value: bytes | None
    _key: bytes = b"u1"

    def headers(self) -> list[tuple[str, bytes | None]]:
        return self._headers

    def timestamp(self) -> tuple[int, int]:
        return (1, 1_764_000_000_000)

    def key(self) -> bytes:
        return self._key

    def value(self) -> bytes | None:
        return self._value


def _undecodable(at: datetime | None) -> list[tuple[str, bytes | None]]:
    """A dead letter without attempts (undecodable), as the handler writes it."""
    failure = Failure(reason="undecodable", exception_class="UndecodableEvent", message="bad",
                      at=at.timestamp() if at else None)
    return dlq_headers([], topic="t", partition=0, offset=7, failure=failure)


def test_since_and_until_read_the_time_of_dead_lettering_not_the_events_time() -> None:
    """An event from 2020 dead-lettered a minute ago is inside `--since 10 minutes ago`
    (its record's timestamp is the source event's; it has no attempts to date it by)."""
    headers = _undecodable(NOW - timedelta(minutes=1))
    recent = Filters(since=NOW - timedelta(minutes=10))
    assert decide(headers, 0, 7, OLD_EVENT_MS, recent) == "replay"
    assert decide(headers, 0, 7, OLD_EVENT_MS, Filters(until=NOW - timedelta(minutes=5))) \
        == "filtered"


def test_records_without_the_header_are_dated_by_their_last_attempt_then_timestamp() -> None:
    headers = [h for h in _undecodable(None) if h[0] != "userpilot.error.dead_lettered_at"]
    headers.append(("__connect.errors.topic", b"t"))
    since = Filters(since=datetime(2019, 1, 1, tzinfo=UTC))
    assert decide(headers, 0, 7, OLD_EVENT_MS, since) == "replay"
    assert decide(headers, 0, 7, OLD_EVENT_MS, Filters(since=NOW)) == "filtered"
    dated = [*headers, ("userpilot.error.last_attempt", NOW.isoformat().encode())]
    assert decide(dated, 0, 7, OLD_EVENT_MS, Filters(since=NOW)) == "replay"


def test_each_selection_keeps_its_own_progress_and_the_unfiltered_run_the_plain_group() -> None:
    """A run commits past what its filters skipped: one group for every selection would
    hide the other reasons' records from a later run."""
    plain = default_group("dlq", Filters())
    assert plain == "userpilot-replay.dlq"
    assert default_group("dlq", Filters(max_replays=9)) == plain  # a limit selects nothing
    a = default_group("dlq", Filters(reasons=frozenset({"bad_request"})))
    b = default_group("dlq", Filters(reasons=frozenset({"retries_exhausted"})))
    assert len({plain, a, b}) == 3
    assert a.startswith("userpilot-replay.dlq.")
    # The same selection resumes the same group: the same instant in another zone too.
    assert default_group("dlq", Filters(reasons=frozenset({"bad_request"}))) == a
    plus_one = timezone(timedelta(hours=1))
    assert default_group("dlq", Filters(since=NOW)) == default_group(
        "dlq", Filters(since=NOW.astimezone(plus_one)))
    both = default_group("dlq", Filters(statuses=frozenset({"400", "422"})))
    assert default_group("dlq", Filters(statuses=frozenset({"422", "400"}))) == both
    assert default_group("dlq", Filters(since=NOW)) != default_group("dlq", Filters(until=NOW))


def test_reasons_and_statuses_are_read_as_the_headers_spell_them() -> None:
    """`Bad_Request` or " 422" matched no record (and named a group of their own)."""
    from consumer import replay

    parser = argparse.ArgumentParser()
    replay.add_arguments(parser)
    args = parser.parse_args(["--from", "dlq", "--reason", " Bad_Request", "--status", " 422"])
    seen: list[Filters] = []

    def fake_run(conf: Any, dlq: str, group: str, filters: Filters, **_: Any) -> Any:
        seen.append(filters)
        return replay.Summary()

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KAFKA_BOOTSTRAP_SERVERS", "k:9092")
        mp.setattr(replay, "run_replay", fake_run)
        mp.setattr("consumer.reach.kafka", lambda *a, **k: None)
        assert replay.main(args) == 0
    assert seen[0].reasons == {"bad_request"} and seen[0].statuses == {"422"}


def _main_with(fake_run: Any, argv: list[str], env: dict[str, str] | None = None,
               kafka_problem: str | None = None) -> int:
    """`replay.main` on a fake run; what it sets for the process (signal handlers, the
    logging it configures) is put back, so no other test inherits it. `kafka_problem`:
    what the reachability check of Kafka says (None: it answers)."""
    import logging
    import signal

    from consumer import replay
    from consumer.logs import QUIET_LOGGERS

    parser = argparse.ArgumentParser()
    replay.add_arguments(parser)
    root = logging.getLogger()
    loggers = [root, *(logging.getLogger(n) for n in ("consumer", *QUIET_LOGGERS))]
    levels = [logger.level for logger in loggers]
    handlers = list(root.handlers)
    signals = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("KAFKA_BOOTSTRAP_SERVERS", "k:9092")
            for name, value in (env or {}).items():
                mp.setenv(name, value)
            mp.setattr(replay, "run_replay", fake_run)
            mp.setattr("consumer.reach.kafka", lambda *a, **k: kafka_problem)
            return replay.main(parser.parse_args(["--from", "dlq", *argv]))
    finally:
        root.handlers[:] = handlers
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        for sig, handler in signals.items():
            signal.signal(sig, handler)


def _no_space(*args: Any, **kwargs: Any) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("write_error", ["broken pipe", "no space"])
def test_a_closed_stdout_stops_the_run_like_an_interrupt_without_a_traceback(
        capfd: pytest.CaptureFixture[str], write_error: str) -> None:
    """`replay ... | head -1`: the reader went away. The run stops after the record at hand
    and commits what it published (`stopping` turns true), where a BrokenPipeError raised
    through it had published a batch and committed none of it (review "dlq33"); and so
    does `> replay.log` on a full disk (review "cli50")."""
    from consumer import replay

    stops: list[bool] = []

    def fake_run(conf: Any, dlq: str, group: str, filters: Filters, *, report: Any,
                 stopping: Any, **_: Any) -> Any:
        report({"replayed": 1})
        stops.append(stopping())
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("builtins.print",
                       _broken_pipe if write_error == "broken pipe" else _no_space)
            report({"replayed": 2})
        stops.append(stopping())
        report({"replayed": 3})  # nothing raised: the output goes nowhere
        return replay.Summary(replayed=3)

    real_stdout = os.dup(1)
    try:
        assert _main_with(fake_run, []) == 130
    finally:
        os.dup2(real_stdout, 1)
        os.close(real_stdout)
    assert stops == [False, True]
    err = capfd.readouterr().err
    assert "stdout was closed: what was replayed is committed" in err
    # Review "dlq48": the counts went to /dev/null with stdout; stderr has them.
    summary = json.loads(next(line for line in err.splitlines() if line.startswith("{")))
    assert summary["summary"]["replayed"] == 3 and summary["interrupted"] is True


def test_a_pipe_closed_at_the_summary_line_puts_the_summary_on_stderr(
        capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The reader went away at the summary line itself: its counts went nowhere (review
    "diff48a")."""
    from consumer import replay

    def fake_run(*_: Any, **__: Any) -> Any:
        return replay.Summary(replayed=4)

    monkeypatch.setattr(replay, "_stdout_json", lambda doc: False)
    assert _main_with(fake_run, []) == 0
    err = capfd.readouterr().err
    summary = json.loads(next(line for line in err.splitlines() if line.startswith("{")))
    assert summary["summary"]["replayed"] == 4


def _broken_pipe(*args: Any, **kwargs: Any) -> None:
    raise BrokenPipeError(32, "Broken pipe")


def test_a_stdout_that_cannot_encode_a_line_gets_it_escaped(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An ASCII stdout (PYTHONIOENCODING=ascii, a C locale) and a `josé` key: the line
    raised before the batch's commit, and every rerun published the batch again (review
    "replay41"). It is printed with JSON's escapes instead, and the run goes on."""
    import io
    import json

    from consumer import replay

    out = io.TextIOWrapper(io.BytesIO(), encoding="ascii", errors="strict")
    monkeypatch.setattr(sys, "stdout", out)

    def fake_run(*_: Any, report: Any, **__: Any) -> Any:
        report({"key": "jos\u00e9", "message": "too long\u2026"})
        return replay.Summary(replayed=1)

    assert _main_with(fake_run, []) == 0
    out.flush()
    lines = out.buffer.getvalue().decode("ascii").splitlines()
    assert json.loads(lines[0]) == {"key": "jos\u00e9", "message": "too long\u2026"}
    assert json.loads(lines[-1])["summary"]["replayed"] == 1


def test_a_stuck_dry_run_says_it_replayed_and_committed_nothing(
        capfd: pytest.CaptureFixture[str]) -> None:
    """It said "the records before it are replayed and committed" (review "replay41")."""
    from consumer import replay

    def fake_run(*_: Any, **__: Any) -> Any:
        raise replay.ReplayStuck("dlq[0]@9: its original could not be read",
                                 replay.Summary(replayed=4))

    assert _main_with(fake_run, ["--dry-run", "--all"]) == 1
    err = capfd.readouterr().err
    assert "replayed and committed" not in err
    assert "a dry run replays and commits nothing; run it again" in err


@pytest.mark.parametrize(("unrestored", "code"), [([], 0), (["dlq[0]@4 (gone)"], 1)])
def test_value_less_dead_letters_it_could_not_restore_make_the_run_exit_1(
        unrestored: list[str], code: int) -> None:
    """Their original gone or changed: not replayed, and the selection is past them; a cron
    job must not read success (review "dlq33": exit 0)."""
    from consumer import replay

    def fake_run(*_: Any, **__: Any) -> Any:
        return replay.Summary(replayed=2, unrestored_offsets=list(unrestored))

    assert _main_with(fake_run, []) == code


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_stuck_run_prints_its_summary_then_says_where_it_stopped(
        fmt: str, capfd: pytest.CaptureFixture[str]) -> None:
    """The origin topic refused a record for a reason that may pass: the summary of what went
    before (on stdout, JSON, and its details on stderr), then why it stopped and where a
    rerun starts, as the command's last word: one JSON line when the logs are JSON (review
    "ops36"), exit 1."""
    import json

    from consumer import replay

    def fake_run(*_: Any, **__: Any) -> Any:
        raise replay.ReplayStuck("dlq[0]@9: the origin topic did not answer", replay.Summary(
            replayed=4, unpublishable=1, unpublishable_offsets=["dlq[0]@3 (too large)"]))

    assert _main_with(fake_run, [], {"WORKER_LOG_FORMAT": fmt}) == 1
    out, err = capfd.readouterr()
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["summary"]["replayed"] == 4 and summary["interrupted"] is False
    lines = err.strip().splitlines()
    detail = next(i for i, line in enumerate(lines) if "dlq[0]@3 (too large)" in line)
    why = "replay stopped: dlq[0]@9: the origin topic did not answer"
    assert detail < len(lines) - 1, "the summary's details come before the last word"
    last = lines[-1]
    if fmt == "json":
        line = json.loads(last)
        assert line["level"] == "error" and line["message"].startswith(why), last
        assert "a rerun starts at it" in line["message"]
    else:
        assert last.startswith(f"error: {why}") and "a rerun starts at it" in last, err


@pytest.mark.parametrize("status", ["abc", "42", "600", "4220", "-42", "4 2"])
def test_a_status_that_is_not_an_http_status_is_refused(status: str) -> None:
    """It could match no record: the run exited 0 with everything skipped by the filter."""
    from consumer import replay

    parser = argparse.ArgumentParser()
    replay.add_arguments(parser)
    with pytest.raises(SystemExit) as exited:
        parser.parse_args(["--from", "dlq", "--status", status])
    assert exited.value.code == 2


def test_an_empty_status_selects_the_dead_letters_without_one() -> None:
    """Timeouts and connection errors have an empty status header: `--status ""`."""
    from consumer import replay

    parser = argparse.ArgumentParser()
    replay.add_arguments(parser)
    args = parser.parse_args(["--from", "dlq", "--status", "", "--status", " 503 "])
    assert args.status == ["", "503"]


def test_an_original_the_source_does_not_answer_for_stops_the_run_there(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Not counted gone and committed past (review "replay17"): the run stops at it, and
    the next one starts there."""
    from consumer import dlqfetch, replay
    from consumer.deadletter import VALUE_OMITTED

    headers = dlq_headers(None, topic="events", partition=0, offset=7, failure=Failure(
        reason="bad_request", exception_class="Rejected", message="x"))
    record = DlqRecord([*headers, (VALUE_OMITTED, b"true")], None)
    monkeypatch.setattr(dlqfetch, "restore", lambda *a, **k: "unanswered")
    summary = replay.Summary()
    with pytest.raises(replay.ReplayStuck) as stuck:
        replay._replay_one(record, 0, 3, "dlq", Filters(), {}, summary,  # type: ignore[arg-type]
                           dry_run=False)
    assert "dlq[0]@3" in str(stuck.value) and summary.gone == 0


def test_a_dead_letter_naming_the_dlq_itself_as_its_origin_is_not_replayed_into_it() -> None:
    """Review "replay51": an edited record naming the DLQ as its origin was published into
    the DLQ it was read from and counted replayed."""
    from consumer import replay

    headers = dlq_headers(None, topic="dlq", partition=0, offset=7, failure=Failure(
        reason="bad_request", exception_class="Rejected", message="x"))
    summary = replay.Summary()
    line = replay._replay_one(DlqRecord(headers, b"v"), 0, 3, "dlq", Filters(), {},  # type: ignore[arg-type]
                              summary, dry_run=False)
    assert line is None and summary.no_origin == 1 and summary.no_origin_offsets == ["dlq[0]@3"]
    other = replay.Summary()
    headers = dlq_headers(None, topic="events", partition=0, offset=7, failure=Failure(
        reason="bad_request", exception_class="Rejected", message="x"))
    sent = replay._replay_one(DlqRecord(headers, b"v"), 0, 3, "dlq", Filters(), {},  # type: ignore[arg-type]
                              other, dry_run=False)
    assert sent is not None and other.no_origin == 0


def test_a_dead_letter_whose_headers_cannot_be_read_is_reported_not_a_crash() -> None:
    """A header key that is not UTF-8 makes confluent-kafka raise from headers() (or,
    at a warm call site, hand back a list that crashes the process: review "poison21").
    Replay reads it through `message_headers`: no origin, counted and reported."""
    from consumer import replay

    class Msg:
        def topic(self) -> str:
            return "dlq"

        def partition(self) -> int:
            return 0

        def offset(self) -> int:
            return 3

        def headers(self) -> object:
            raise SystemError("<method 'headers'> returned a result with an exception set")

        def timestamp(self) -> tuple[int, int]:
            return (1, 1_764_000_000_000)

        def key(self) -> bytes:
            return b"u1"

        def value(self) -> bytes:
            return b"v"

    summary = replay.Summary()
    line = replay._replay_one(Msg(), 0, 3, "dlq", Filters(), {}, summary,  # type: ignore[arg-type]
                              dry_run=False)
    assert line is None and summary.no_origin == 1


def test_committed_offsets_are_asked_again_while_the_coordinator_is_not_ready() -> None:
    """A replay right after a broker (re)start stopped on "Not coordinator" (CI, the first
    use of a fresh broker); the coordinator answers moments later. Other errors stop it."""
    from confluent_kafka import KafkaError, KafkaException, TopicPartition

    from consumer.replay import _committed

    class Coordinator:
        def __init__(self, errors: list[int]) -> None:
            self.errors = errors
            self.asked = 0

        def committed(self, parts: list[TopicPartition], timeout: float) -> list[TopicPartition]:
            self.asked += 1
            if self.errors:
                raise KafkaException(KafkaError(self.errors.pop(0)))
            return parts

    parts = [TopicPartition("dlq", 0)]
    loading = Coordinator([KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_LOAD_IN_PROGRESS])
    assert _committed(loading, parts) == parts  # type: ignore[arg-type]
    assert loading.asked == 3
    refused = Coordinator([KafkaError.GROUP_AUTHORIZATION_FAILED])
    with pytest.raises(KafkaException):
        _committed(refused, parts)  # type: ignore[arg-type]
    assert refused.asked == 1
    forever = Coordinator([KafkaError.NOT_COORDINATOR] * 100)
    with pytest.raises(KafkaException):
        _committed(forever, parts, within_s=0.6)  # type: ignore[arg-type]
    assert 2 <= forever.asked <= 3
    # Ctrl-C while the coordinator loads: the run ends now, not after 30 s.
    stopped = Coordinator([KafkaError.NOT_COORDINATOR] * 100)
    asked = iter([False, False, True])
    started = time.monotonic()
    assert _committed(stopped, parts, stopping=lambda: next(asked)) is None  # type: ignore[arg-type]
    assert time.monotonic() - started < 1.0 and stopped.asked == 1


def test_call_filter_selects_by_the_request_the_event_failed_at() -> None:
    """Review users22: a replayed identify or group re-applies its traits after a later
    identify of the same user that was delivered meanwhile (Userpilot keeps the last
    write). `--call track --call ensure_user` replays Track events only."""
    def dead(call: str) -> list[tuple[str, bytes]]:
        return [("__connect.errors.topic", b"events"),
                ("userpilot.error.call", f"{call} POST /v1/x".encode())]

    tracks = Filters(calls=frozenset({"track", "ensure_user"}))
    assert decide(dead("track"), 0, 1, None, tracks) == "replay"
    assert decide(dead("ensure_user"), 0, 1, None, tracks) == "replay"
    for state in ("identify", "company_identify", "associate_company"):
        assert decide(dead(state), 0, 1, None, tracks) == "filtered"
    assert decide([("__connect.errors.topic", b"events")], 0, 1, None, tracks) == "filtered"
    assert decide(dead("identify"), 0, 1, None, Filters()) == "replay"
    assert default_group("dlq", tracks) != default_group("dlq", Filters())
    # A selection without --call keeps the group it had before the option existed.
    assert default_group("dlq", Filters(reasons=frozenset({"bad_request"}))) == (
        "userpilot-replay.dlq." + __import__("hashlib").sha256(
            b'{"from_offset": null, "partitions": [], "reasons": ["bad_request"], '
            b'"since": null, "statuses": [], "to_offset": null, "until": null}'
        ).hexdigest()[:12])


def test_topic_filter_selects_by_the_source_topic() -> None:
    """Review "multi53": with one DLQ for several topics, the dead letters of the topic
    whose cause was fixed could not be replayed alone."""
    def dead(topic: bytes) -> list[tuple[str, bytes]]:
        return [("__connect.errors.topic", topic)]

    one = Filters(topics=frozenset({"t1"}))
    assert decide(dead(b"t1"), 0, 1, None, one) == "replay"
    assert decide(dead(b"t2"), 0, 1, None, one) == "filtered"
    assert decide([], 0, 1, None, one) == "filtered"
    assert decide(dead(b"t2"), 0, 1, None, Filters()) == "replay"
    assert default_group("dlq", one) != default_group("dlq", Filters(topics=frozenset({"t2"})))
    # A selection without --topic keeps the group it had before the option existed.
    assert default_group("dlq", Filters(calls=frozenset({"track"}))) == (
        "userpilot-replay.dlq." + __import__("hashlib").sha256(
            b'{"calls": ["track"], "from_offset": null, "partitions": [], "reasons": [], '
            b'"since": null, "statuses": [], "to_offset": null, "until": null}'
        ).hexdigest()[:12])


@pytest.mark.parametrize(("argv", "says"), [
    (["--topic", " "], "name a source topic"),
    (["--max-replays", "-1"], "negative"),
    (["--partition", "-2"], "negative"),
    (["--from-offset", "x"], "not a whole number"),
    (["--since", "garbage"], "not an ISO 8601 time"),
    (["--until", "2026-W48-1"], "ISO week date"), (["--since", "2026w481"], "ISO week date"),
    (["--until", "2026-W48"], "ISO week date"),
    (["--from-offset", "5", "--to-offset", "2"], "past --to-offset"),
    (["--since", "2026-12-02", "--until", "2026-12-01"], "after --until"),
    (["--since", "2026-12-02T00:00:01Z", "--until", "2026-12-01"], "after --until"),
    (["--reason", "bad-request"], "not a dead-letter reason: one of bad_request"),
    (["--reason", "server_error"], "not a dead-letter reason"),
    (["--show-event"], "--show-event lists events and needs --dry-run"),
    (["--show-event", "--dry-run"], "--show-event needs SCHEMA_REGISTRY_URL"),
])
def test_arguments_that_select_nothing_or_mean_nothing_are_refused(
        argv: list[str], says: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """They were taken without a word: a negative --max-replays named every record over
    the limit, a reversed range selected nothing with exit 0, and a bad --since printed
    argparse's "invalid _time value" (review "ops23")."""
    from consumer.__main__ import main

    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1")
    monkeypatch.delenv("SCHEMA_REGISTRY_URL", raising=False)
    try:
        code: object = main(["replay", "--from", "dlq", *argv])
    except SystemExit as exc:  # argparse's own refusal
        code = exc.code
    assert code == 2
    assert says in capsys.readouterr().err


class _DeadLetter:
    """A DLQ message as confluent-kafka hands it over, written as the worker writes it."""

    def __init__(self, source_offset: int | None, value: bytes = b"v") -> None:
        failure = Failure(reason="bad_request", exception_class="Rejected", message="x")
        self._headers: list[tuple[str, bytes | None]] = (
            dlq_headers(None, topic="events", partition=2, offset=source_offset,
                        failure=failure)
            if source_offset is not None else [("__connect.errors.topic", b"events")])
        self._value = value

    def headers(self) -> list[tuple[str, bytes | None]]:
        return self._headers

    def timestamp(self) -> tuple[int, int]:
        return (1, 1_764_000_000_000)

    def key(self) -> bytes:
        return b"u1"

    def value(self) -> bytes:
        return self._value


def test_a_second_dead_letter_of_the_same_source_record_is_counted_not_replayed() -> None:
    """An event dead-lettered twice (a crash between the DLQ's acknowledgement and the
    commit, a partition lost while Kafka was down: the next owner re-reads it) has two
    dead letters with one source record. Replayed both, Userpilot got the event twice
    (review "faults23": 3 of 120 after a broker kill)."""
    from consumer import replay

    summary = replay.Summary()
    seen = replay.SeenSources()

    def one(msg: _DeadLetter, off: int) -> dict[str, Any] | None:
        return replay._replay_one(msg, 0, off, "dlq", Filters(), {}, summary,  # type: ignore[arg-type]
                                  dry_run=True, seen=seen)

    assert one(_DeadLetter(7), 10) is not None
    assert one(_DeadLetter(8), 11) is not None, "another record of the partition"
    # The copy is not taken (no record to publish) but gets a line of its own, key
    # included: `--dry-run --all` lists every dead letter of a user (review "replay29").
    assert one(_DeadLetter(7), 12) == {
        "dlq": "dlq[0]@12", "to": "events", "dry_run": True, "reason": "bad_request",
        "call": None, "key": "u1", "doubled_of": "dlq[0]@10", "status": None,
        "attempts": 0, "dead_lettered_at": None, "message": "x"}
    assert (summary.doubled, summary.doubled_offsets) == (
        1, ["dlq[0]@12 (the same event as dlq[0]@10)"])
    # Without source coordinates nothing says two dead letters are one event.
    assert one(_DeadLetter(None), 13) is not None and one(_DeadLetter(None), 14) is not None
    assert summary.as_dict()["doubled"] == 1


def test_only_a_replayed_dead_letter_makes_a_later_one_a_second_copy(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A first copy the selection skips, or whose original is gone, was not replayed: the
    second copy is judged on its own."""
    from consumer import dlqfetch, replay
    from consumer.deadletter import VALUE_OMITTED

    summary = replay.Summary()
    seen = replay.SeenSources()
    bad_request = Filters(reasons=frozenset({"bad_request"}))
    other = _DeadLetter(7)
    other._headers = [(k, b"server_error" if k == "userpilot.error.reason" else v)
                      for k, v in other._headers]
    assert replay._replay_one(other, 0, 1, "dlq", bad_request, {}, summary,  # type: ignore[arg-type]
                              dry_run=True, seen=seen) is None
    assert summary.skipped_by_filter == 1
    omitted = _DeadLetter(7)
    omitted._headers = [*omitted._headers, (VALUE_OMITTED, b"true")]
    monkeypatch.setattr(dlqfetch, "restore", lambda *a, **k: "gone")
    assert replay._replay_one(omitted, 0, 2, "dlq", Filters(), {}, summary,  # type: ignore[arg-type]
                              dry_run=True, seen=seen) is None
    assert summary.gone == 1
    assert replay._replay_one(_DeadLetter(7), 0, 3, "dlq", Filters(), {}, summary,  # type: ignore[arg-type]
                              dry_run=True, seen=seen) is not None
    assert summary.doubled == 0


def test_the_sources_remembered_are_bounded_oldest_first() -> None:
    from consumer.replay import SeenSources

    seen = SeenSources(limit=3)
    for offset in range(4):
        seen.add(("events", 0, offset, b"h"), (0, 100 + offset))
    assert seen.before(("events", 0, 0, b"h")) is None, "the oldest is forgotten"
    assert [seen.before(("events", 0, o, b"h")) for o in (1, 2, 3)] == [
        (0, 101), (0, 102), (0, 103)]
    assert seen.before(None) is None


def test_another_event_at_the_same_coordinates_is_no_copy() -> None:
    """Review diff24: a source topic deleted and created again numbers its offsets from 0
    again; another event dead-lettered at the same coordinates was skipped as a copy, and
    committed past (never replayed). The event's bytes are part of what makes a copy."""
    from consumer import replay

    summary = replay.Summary()
    seen = replay.SeenSources()

    def one(msg: _DeadLetter, off: int) -> dict[str, Any] | None:
        return replay._replay_one(msg, 0, off, "dlq", Filters(), {}, summary,  # type: ignore[arg-type]
                                  dry_run=True, seen=seen)

    assert one(_DeadLetter(0, value=b"alice"), 10) is not None
    assert one(_DeadLetter(0, value=b"bob"), 11) is not None
    copy = one(_DeadLetter(0, value=b"bob"), 12)
    assert copy is not None and "_record" not in copy and summary.doubled == 1


def test_a_value_less_copy_is_known_by_its_originals_hash(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A dead letter too large for the DLQ carries its original's SHA-256 instead of its
    value: two such copies of one event are one event; another event is not."""
    import hashlib

    from consumer import dlqfetch, replay
    from consumer.deadletter import VALUE_OMITTED, VALUE_SHA256

    def omitted(original: bytes) -> _DeadLetter:
        msg = _DeadLetter(7, value=b"")
        msg._headers = [*msg._headers, (VALUE_OMITTED, b"true"),
                        (VALUE_SHA256, hashlib.sha256(original).hexdigest().encode())]
        return msg

    class Found:
        key, value, headers = b"u1", b"big", None

    monkeypatch.setattr(dlqfetch, "restore", lambda *a, **k: Found())
    summary = replay.Summary()
    seen = replay.SeenSources()
    for off, original in enumerate([b"big", b"big", b"other"]):
        replay._replay_one(omitted(original), 0, off, "dlq", Filters(), {}, summary,  # type: ignore[arg-type]
                           dry_run=True, seen=seen)
    assert (summary.doubled, summary.restored) == (1, 2)
    assert hashlib.sha256(b"big").digest() == replay.source_event(
        omitted(b"big").headers(), None)[3]  # type: ignore[index]


def test_a_report_line_shows_a_key_up_to_256_bytes_then_its_size() -> None:
    """Review poison24: a 1.2 MB key made a 1.2 MB line per record (dry runs too)."""
    from consumer.replay import shown_key

    assert shown_key(None) is None and shown_key(b"") is None
    assert shown_key(b"user-1") == "user-1"
    assert shown_key("é".encode() * 128) == "é" * 128  # 256 bytes: whole
    long = shown_key(b"u" * 1_200_000)
    assert long == "u" * 256 + "… (1200000 bytes)"
    cut = shown_key(b"a" + "é".encode() * 200)  # cut inside a character: no stray byte
    assert cut is not None and cut.startswith("a" + "é" * 127 + "…") and "\ufffd" not in cut


@pytest.mark.parametrize("name", ["userpilot.error.reason", "userpilot.error.status",
                                  "userpilot.value.sha256"])
def test_header_values_that_are_not_utf8_are_read_not_a_crash(name: str) -> None:
    """A foreign record's header need not be UTF-8: a bare decode raised a traceback, and
    every rerun stopped at the same record (review replay25)."""
    from consumer import replay

    headers = [(k, v) for k, v in dlq_headers(None, topic="events", partition=0, offset=7,
                                              failure=Failure(reason="bad_request",
                                                              exception_class="Rejected",
                                                              message="x"))
               if k != name] + [(name, b"\xff\xfe")]

    for filters in (Filters(), Filters(reasons=frozenset({"bad_request"})),
                    Filters(statuses=frozenset({"400"}))):
        summary = replay.Summary()
        replay._replay_one(DlqRecord(headers, b"v"), 0, 3, "dlq", filters, {},  # type: ignore[arg-type]
                           summary, dry_run=True)
    assert decide(headers, 0, 3, None, Filters(reasons=frozenset({"bad_request"}))) == (
        "filtered" if name == "userpilot.error.reason" else "replay")


@pytest.mark.parametrize("name", [b"\xff\xfe", b"bad\x00topic", b"\x00", b"t" * 250,
                                  b"t" * 600])
def test_an_origin_that_is_not_a_topic_name_is_no_origin(name: bytes) -> None:
    """A NUL too (review "dlq41"): the Kafka client raised ValueError for it, out of the
    metadata lookup and `produce`, and every replay run stopped at that record."""
    headers = [(k, name if k == "__connect.errors.topic" else v)
               for k, v in _undecodable(NOW)]
    assert decide(headers, 0, 3, None, Filters()) == "no_origin"


def test_events_over_the_limit_are_named_with_how_to_replay_them(
        capsys: pytest.CaptureFixture[str]) -> None:
    """The same selection with a higher --max-replays replays nothing (its progress is past
    them), and nothing said so (review replay25)."""
    from consumer import replay

    summary = replay.Summary(over_limit=1, over_limit_offsets=["dlq[0]@20"])
    replay._print_summary(summary, dry_run=False, interrupted=False)
    err = capsys.readouterr().err
    assert "over replay limit (not replayed): dlq[0]@20" in err
    assert "--from-offset" in err and "higher --max-replays" in err
    replay._print_summary(replay.Summary(), dry_run=False, interrupted=False)
    assert "--max-replays" not in capsys.readouterr().err


def test_a_bare_date_until_reaches_the_end_of_that_day_and_reasons_are_spelt_as_written(
) -> None:
    """`--until 2026-12-01` read as that day's midnight left the whole day out; a reason is
    matched as the headers spell it (review "ops29")."""
    from consumer import replay

    end = replay._until("2026-12-01")
    assert end == datetime(2026, 12, 1, 23, 59, 59, 999_000, tzinfo=UTC)
    assert replay._until("20261201") == end
    assert replay._until("2026-12-01T10:00:00Z") == datetime(2026, 12, 1, 10, tzinfo=UTC)
    assert replay._until("2026-12-01T10:00:00+01:00") == datetime(2026, 12, 1, 9, tzinfo=UTC)
    # The same day with its zone written, and a time to the hour or minute: the period's end,
    # not its first instant (review "ops45").
    assert replay._until("2026-12-01Z") == end
    assert replay._until("2026-12-01+01:00") == end - timedelta(hours=1)
    assert replay._until("2026-12-01T09") == datetime(2026, 12, 1, 9, 59, 59, 999_000,
                                                      tzinfo=UTC)
    assert replay._until("2026-12-01T09:30Z") == datetime(2026, 12, 1, 9, 30, 59, 999_000,
                                                          tzinfo=UTC)
    assert replay._until("2026-12-01T0930") == replay._until("2026-12-01T09:30")
    assert replay._until("2026-12-01-05:30") == end + timedelta(hours=5, minutes=30)
    assert replay._time("2026-12-01+01:00") == datetime(2026, 11, 30, 23, tzinfo=UTC)  # --since
    with pytest.raises(argparse.ArgumentTypeError):
        replay._time("2026-12-01+25:00")
    # Review diff45: minutes past 59, a lower-case z after a time, a zone with seconds.
    for minutes_past_59 in ("2026-12-01+05:99", "2026-12-01T09:30+05:75", "2026-12-01T09+0599",
                            "2026-12-01T09:30:00.5+05:75", "2026-12-01T09:30:00,250+0575",
                            "2026-12-01T09:30:00+05:30:15"):  # review diff45c: a fraction, seconds
        with pytest.raises(argparse.ArgumentTypeError):
            replay._time(minutes_past_59)
    assert replay._time("2026-12-01T09:30:00.5-05:30") == datetime(2026, 12, 1, 15, 0, 0,
                                                                   500_000, tzinfo=UTC)
    assert replay._time("20261201T0930-0500") == datetime(2026, 12, 1, 14, 30, tzinfo=UTC)
    assert replay._until("2026-12-01z") == end
    assert replay._until("2026-12-01T09z") == replay._until("2026-12-01T09Z")
    with pytest.raises(argparse.ArgumentTypeError):
        replay._time("2026-12-01+05:30:15")
    assert replay._until("2026-12-01T09:30:00.5Z") == datetime(2026, 12, 1, 9, 30, 0, 500_000,
                                                               tzinfo=UTC)
    headers = _undecodable(datetime(2026, 12, 1, 18, tzinfo=UTC))
    assert decide(headers, 0, 7, OLD_EVENT_MS, Filters(until=end)) == "replay"
    assert decide(headers, 0, 7, OLD_EVENT_MS,
                  Filters(until=replay._until("2026-11-30"))) == "filtered"
    assert replay._reason(" Bad_Request ") == "bad_request"
    with pytest.raises(argparse.ArgumentTypeError, match="undecodable"):
        replay._reason("nope")


def test_a_report_line_says_what_failed_how_often_and_when() -> None:
    """Review "ops29": a dry run's lines named the reason and call only; deciding what to
    replay meant reading the DLQ again for the status, attempts, time and message."""
    from consumer import replay

    failure = Failure(reason="retries_exhausted", exception_class="ServerError",
                      message="HTTP 503 (x-request-id req-9): Userpilot error (transient)",
                      status=503, attempts=5, at=NOW.timestamp(), call="track POST /v1/track")
    headers = dlq_headers(None, topic="events", partition=0, offset=3, failure=failure)
    said = replay.failure_of(headers)
    assert said == {"status": 503, "attempts": 5,
                    "dead_lettered_at": "2026-12-01T12:00:00.000+00:00",
                    "message": "track POST /v1/track: HTTP 503 (x-request-id req-9): "
                               "Userpilot error (transient)"}
    long = dlq_headers(None, topic="events", partition=0, offset=3, failure=Failure(
        reason="bad_request", exception_class="Rejected", message="m" * 1000, status=400))
    cut = replay.failure_of(long)["message"]
    assert len(cut) == replay.MESSAGE_SHOWN + 1 and cut.endswith("…")
    assert replay.failure_of([("userpilot.error.status", "²".encode())])["status"] is None


def test_a_dry_run_lists_records_over_the_limit_and_without_origin_with_their_keys(
        capsys: pytest.CaptureFixture[str]) -> None:
    """Review replay35: `--dry-run --all` is how an operator finds a deleted user's dead
    letters (README, GDPR): those over the replay limit, and those without an origin topic,
    were on stderr only, by their coordinates, without their key."""
    from consumer import replay

    at_limit = [*_undecodable(NOW), ("userpilot.replay.count", b"3")]
    no_origin = [(k, v) for k, v in _undecodable(NOW) if k != "__connect.errors.topic"]
    for headers, verdict in ((at_limit, "over_limit"), (no_origin, "no_origin")):
        summary = replay.Summary()
        record = DlqRecord(headers, b"v", b"u_deleted")
        listed = replay._replay_one(record, 0, 9, "dlq", Filters(max_replays=3), {},  # type: ignore[arg-type]
                                    summary, True)
        assert listed is not None and "_record" not in listed, "listed, never published"
        assert listed["key"] == "u_deleted" and listed["not_replayable"] == verdict
        assert replay._replay_one(record, 0, 9, "dlq", Filters(max_replays=3), {},  # type: ignore[arg-type]
                                  replay.Summary(), False) is None, "a real run: stderr only"
        replay._print_summary(summary, dry_run=True, interrupted=False)
        assert "dlq[0]@9" in capsys.readouterr().err, "named on stderr"


@pytest.mark.parametrize("timestamp_ms", [253402300800000, 2**62])
def test_a_record_time_past_year_9999_is_no_time_not_a_stop(timestamp_ms: int) -> None:
    """Review dlq40: a foreign dead letter without the worker's time headers, whose
    CreateTime is past year 9999 (accepted by brokers before Kafka 4.0), raised from
    `datetime`: every rerun of a `--since` replay stopped on it."""
    headers = [("__connect.errors.topic", b"events")]
    since = Filters(since=datetime(2024, 1, 1, tzinfo=UTC))
    assert decide(headers, 0, 0, timestamp_ms, since) == "filtered"
    assert decide(headers, 0, 0, timestamp_ms, Filters()) == "replay"


def test_skip_void_leaves_out_only_the_named_runs_dead_letters_of_those_events() -> None:
    """`--skip-void WORKER/TOPIC:PARTITION@OFFSETS` (what a DLQ guard trip names, reviews
    dlq41, diff41b): that run's dead letters of those events are left out; another run's of
    the same events (written after the partition moved) and the rest replay."""
    from consumer.__main__ import build_parser

    def headers(worker: str, topic: str, partition: int, offset: int
                ) -> list[tuple[str, bytes | None]]:
        values = {"__connect.errors.topic": topic.encode(),
                  "__connect.errors.partition": str(partition).encode(),
                  "__connect.errors.offset": str(offset).encode(),
                  "userpilot.error.worker": worker.encode()}
        return [(k, values.get(k, v)) for k, v in _undecodable(NOW)] + (
            [] if "userpilot.error.worker" in dict(_undecodable(NOW))
            else [("userpilot.error.worker", worker.encode())])

    args = build_parser().parse_args(["replay", "--from", "dlq", "--skip-void",
                                      "pod-a-7-abc123/ev:0@5,7-9", "--skip-void",
                                      "pod.b-8-def456/other.topic:12@0"])
    filters = Filters(skip_void=frozenset(args.skip_void))
    assert filters.skip_void == {("pod-a-7-abc123", "ev", 0, ((5, 5), (7, 9))),
                                 ("pod.b-8-def456", "other.topic", 12, ((0, 0),))}
    run = "pod-a-7-abc123"
    for offset, verdict in ((4, "replay"), (5, "filtered"), (6, "replay"), (7, "filtered"),
                            (9, "filtered"), (10, "replay")):
        assert decide(headers(run, "ev", 0, offset), 0, 1, None, filters) == verdict, offset
    assert decide(headers("pod-c-9-0a0b0c", "ev", 0, 5), 0, 1, None, filters) == "replay"
    assert decide(headers(run, "ev", 1, 5), 0, 1, None, filters) == "replay"
    assert decide(headers("pod.b-8-def456", "other.topic", 12, 0), 0, 1, None,
                  filters) == "filtered"
    # Not a selection of its own (review "replay51"): the trip's command started a group of
    # its own at the DLQ's start, re-sending what the routine replay had sent, and the
    # routine group never passed the void dead letters, sent twice by its next run.
    assert default_group("dlq", filters) == default_group("dlq", Filters())
    narrowed = Filters(reasons=frozenset({"bad_request"}))
    assert default_group("dlq", replace(narrowed, skip_void=filters.skip_void)) == default_group(
        "dlq", narrowed)


@pytest.mark.parametrize("bad", ["ev:0@5", "w/ev@5", "w/ev:x@5", "w/ev:0", "w/:0@5",
                                 "w/ev:0@-1", "w/ev:0@5-", "w/ev:0@a-b", "/ev:0@5",
                                 "w/ev:0@9-7"])
def test_skip_void_refuses_what_is_not_worker_topic_partition_offsets(
        bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    from consumer.__main__ import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["replay", "--from", "dlq", "--skip-void", bad])
    assert "WORKER/TOPIC:PARTITION@OFFSETS" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [
    {}, {"KAFKA_LINGER_MS": "60000"}, {"KAFKA_QUEUE_BUFFERING_MAX_MS": "120000"},
    {"KAFKA_LINGER_MS": "70000", "KAFKA_DELIVERY_TIMEOUT_MS": "100000"},
    {"KAFKA_MESSAGE_TIMEOUT_MS": "0"}])
def test_replays_producer_takes_what_check_config_accepts_with_its_own_answer_bound(
        extra: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Replay waits for every answer, within its own minute: the user's 0 ("never") stalled
    a run for ever, and a linger at or past that minute made librdkafka refuse the producer
    check-config had built (review "diff42")."""
    from consumer import replay
    from consumer.config import load_settings
    from consumer.librdkafka import producer_settings

    settings = load_settings({
        "USERPILOT_API_KEY": "wt_9f8e7d6c5b4a3210",
        "USERPILOT_ANALYTICS_ENDPOINT": "analytex.userpilot.io",
        "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1", "KAFKA_TOPICS": "delivery-userpilot",
        "SCHEMA_REGISTRY_URL": "http://schema-registry:8081", **extra})
    seen: dict[str, Any] = {}
    real = getattr(replay, "make_producer")  # noqa: B009 (imported there, not exported)

    def spy(conf: dict[str, Any], **own: Any) -> Any:
        seen.update(producer_settings(conf, **own))
        return real(conf, **own)

    monkeypatch.setattr(replay, "make_producer", spy)
    replay.replay_producer(settings.kafka_config())  # librdkafka builds it
    assert seen["message.timeout.ms"] == replay.REPLAY_ANSWER_MS and seen["linger.ms"] == 0
    for alias in ("delivery.timeout.ms", "queue.buffering.max.ms", "topic.message.timeout.ms"):
        assert alias not in seen


def test_a_dead_letter_written_without_its_key_is_listed_with_the_source_events_key(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Review replay44: a dead letter the DLQ refused even without its value is written
    without its key too. Over the replay limit, `--dry-run --all` listed it with `"key":
    null`, so a deleted user's dead letter was not found (README, GDPR); its key is read
    from the source event by its coordinates, as a replay restores it."""
    from consumer import dlqfetch, replay
    from consumer.deadletter import DlqRecord as Dead
    from consumer.deadletter import without_originals, without_value

    failure = Failure(reason="bad_request", exception_class="Rejected", message="HTTP 400",
                      status=400, at=datetime(2026, 12, 1, tzinfo=UTC).timestamp())
    headers = dlq_headers([("userpilot.replay.count", b"3"), ("big", b"x" * 2_000_000)],
                          topic="events", partition=0, offset=41, failure=failure)
    dead = without_originals(without_value(Dead(b"u_deleted", b"v" * 10, headers)))
    assert dead.key is None
    asked: list[tuple[str, int, int]] = []

    def fetch(_conf: Any, topic: str, partition: int, offset: int, **_: Any
              ) -> dlqfetch.Fetched:
        asked.append((topic, partition, offset))
        return dlqfetch.Fetched(b"u_deleted", b"v" * 10)

    monkeypatch.setattr(dlqfetch, "fetch_original", fetch)
    msg = DlqRecord(list(dead.headers), dead.value, None)  # type: ignore[arg-type]
    line = replay._replay_one(msg, 0, 9, "dlq", Filters(max_replays=3), {},  # type: ignore[arg-type]
                              replay.Summary(), True)
    assert line is not None and line["not_replayable"] == "over_limit"
    assert line["key"] == "u_deleted" and asked == [("events", 0, 41)]

    def listed(found: dlqfetch.Fetched) -> dict[str, Any] | None:
        monkeypatch.setattr(dlqfetch, "fetch_original", lambda *_a, **_k: found)
        return replay._replay_one(msg, 0, 9, "dlq", Filters(max_replays=3),  # type: ignore[arg-type]
                                  {}, replay.Summary(), True)

    for problem in ("gone", "unanswered"):
        line = listed(dlqfetch.Fetched(problem=problem))
        assert line is not None and line["key"] is None and line["key_omitted"] == problem
    # Another record at those coordinates (the topic re-created): not its key (review
    # diff44: another user's key was listed).
    line = listed(dlqfetch.Fetched(b"u_someone_else", b"other value"))
    assert line is not None and line["key"] is None and line["key_omitted"] == "mismatch"


def test_a_dry_run_line_is_one_line_whatever_its_key_holds(
        capsys: pytest.CaptureFixture[str]) -> None:
    """Review "ids47": a dead letter keyed "dl-user\\u2028line2" made two lines of one in
    `replay --dry-run`, README's way to find a user's dead letters."""
    from consumer.replay import _stdout_json

    assert _stdout_json({"key": "dl-user\u2028line2\u0085x\u202e"})
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 1
    assert json.loads(out)["key"] == "dl-user\u2028line2\u0085x\u202e"


class _OneSchema:
    """The registry's answer for every id: our schema, or an error quoting the request."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error

    def get_schema(self, schema_id: int) -> Any:
        from consumer.codec import SCHEMA_TEXT
        from consumer.registry import SchemaDoc

        if self.error is not None:
            raise self.error
        return SchemaDoc(SCHEMA_TEXT)


def _show_settings() -> Any:
    from consumer.config import load_settings

    return load_settings({"USERPILOT_API_KEY": "x" * 12, "SCHEMA_REGISTRY_URL": "http://r"},
                         offline=True)


def test_show_event_marks_ids_read_from_invalid_utf8_and_explain_refuses_them() -> None:
    """Review "diff48b": `run` dead-letters an event whose userId holds invalid UTF-8 (two
    users cut alike would be one); its --show-event line showed U+FFFD, which `explain`
    took for a clean id and called `deliver`."""
    from consumer import codec, replay
    from consumer.explain import explain_lines
    from consumer.registry import Registry

    event = {"type": "identify", "userId": "user_\u00e9", "messageId": "m1",
             "traits": {"email": "a@b.c"}, "context": {"consent": {"analytics": True}}}
    bad = codec.encode(1, codec.to_record(event)).replace("user_\u00e9".encode(),
                                                          b"user_\xff\xfe")
    reader = replay._event_reader(_show_settings(), Registry("http://r", client=_OneSchema()))
    shown = reader(bad)
    assert shown["event_cut"] == ["userId"] and "\ufffd" in shown["event"]["userId"]
    line = json.dumps({"dlq": "t.dlq[0]@0", "to": "t", "dry_run": True, **shown})
    (doc,) = explain_lines([line], _show_settings())
    assert doc["decision"] == "dead_letter" and "invalid UTF-8" in doc["reason"], doc
    good = reader(codec.encode(1, codec.to_record(event)))
    assert "event_cut" not in good
    (doc,) = explain_lines([json.dumps({"dlq": "t.dlq[0]@1", "dry_run": True, **good})],
                           _show_settings())
    assert doc["decision"] == "deliver", doc


def test_show_event_stops_on_a_registry_outage_and_masks_what_it_echoes() -> None:
    """Review "diff48b": each record waited out the registry's timeout and was listed as
    unreadable (exit 0), and a gateway's page echoing the request printed the registry's
    basic-auth credentials."""
    from consumer import codec, replay
    from consumer.registry import Registry, RegistryError

    secret = base64.b64encode(b"svc:S3cretPw").decode()
    echo = RegistryError(500, None, f"upstream failed; request was: Authorization: Basic {secret}")
    reader = replay._event_reader(_show_settings(), Registry(
        "http://r", "svc:S3cretPw", client=_OneSchema(echo)))
    value = codec.encode(1, codec.to_record({"type": "track", "event": "x", "userId": "u"}))
    with pytest.raises(replay.ReplayStuck) as stuck:
        replay._shown_event(reader, [], value, "t.dlq[0]@0", replay.Summary())
    assert "did not answer" in str(stuck.value) and secret not in str(stuck.value)
    unreadable = replay._shown_event(reader, [], b"garbage", "t.dlq[0]@1", replay.Summary())
    assert "magic byte" in unreadable["event_unreadable"]


def test_skip_keys_reads_ids_as_delete_users_and_keeps_the_selection_s_progress(
        tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    """`--skip-keys` (review "gdpr48"): read as delete-users reads ids."""
    from consumer import replay

    ids = tmp_path / "ids.txt"
    ids.write_text("alice\r\n\ufeffbob\n\n", "utf-8")
    keys = replay._skip_keys(str(ids))
    assert keys == {b"alice", b"bob", "\ufeffbob".encode()}
    # Not a selection of its own: each new list started it over from the DLQ's start,
    # sending again what the routine replay had sent (review "diff48c").
    assert replay.default_group("d", replay.Filters(skip_keys=keys)) == replay.default_group(
        "d", replay.Filters())
    (tmp_path / "empty.txt").write_text("\n", "utf-8")
    for path in (tmp_path / "empty.txt", tmp_path / "missing.txt"):
        with pytest.raises(ConfigError):
            replay._skip_keys(str(path))
    # `delete-users --json`'s file (review "whole48": read one a line, `"carol"` kept its
    # quotes and matched nothing; an id with a line break could not be named at all).
    (tmp_path / "ids.jsonl").write_text('"carol"\n"user\\nwith-newline"\n', "utf-8")
    assert replay._skip_keys(str(tmp_path / "ids.jsonl"), as_json=True) == {
        b"carol", b"user\nwith-newline"}
    with pytest.raises(ConfigError, match="--skip-keys-json"):
        replay._skip_keys(str(ids), as_json=True)  # not JSON strings
    # ... and that file given to --skip-keys: each key kept its quotes and skipped only a
    # key holding them: named (review "gdpr54"), not refused (a userId may hold quotes,
    # review "compat54")
    with caplog.at_level(logging.WARNING, logger="consumer.replay"):
        assert replay._skip_keys(str(tmp_path / "ids.jsonl")) == {
            b'"carol"', b'"user\\nwith-newline"'}
    assert "2 of 2 ids are written in double quotes" in caplog.text
    assert "give the file with --skip-keys-json" in caplog.text


def test_a_line_that_cannot_reach_a_buffered_stdout_stops_the_run_at_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Review "diff50c": without PYTHONUNBUFFERED stdout to a file or a pipe is buffered; a
    full disk showed only at exit, after the whole selection was replayed, as exit 120. Each
    line is flushed, so the run stops after the record at hand."""
    from consumer import replay

    class Buffered(io.StringIO):
        def flush(self) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sys, "stdout", Buffered())
    monkeypatch.setattr(replay, "stdout_gone", lambda: None)
    assert replay._stdout_json({"replayed": 1}) is False


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_an_unreachable_kafka_s_text_is_escaped_once(
        fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Review "diff53c": the refusal quoted in "nothing was replayed" was escaped before the
    JSON line escaped it again: a JSON reader saw `\\x1b` spelled out. In text, escaped."""
    import json

    said = "kafka: OIDC endpoint said \x1b[31mno\x1b[0m"
    assert _main_with(None, [], {"WORKER_LOG_FORMAT": fmt}, kafka_problem=said) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    if fmt == "json":
        assert json.loads(err)["message"] == f"nothing was replayed: {said}"
    else:
        assert err == "error: nothing was replayed: kafka: OIDC endpoint said " \
                      "\\x1b[31mno\\x1b[0m"


def test_a_dlq_the_principal_may_not_read_stops_the_run_instead_of_waiting_for_ever(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Review "sasl55": with Describe but no Read on the DLQ, librdkafka hands over one
    TOPIC_AUTHORIZATION_FAILED; passed over, the run waited for records that never came,
    for ever. It stops, naming the ACL."""
    from confluent_kafka import KafkaError, TopicPartition

    from consumer import replay

    class Refusal:
        def error(self) -> KafkaError:
            return KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED,
                              "Not authorized to access topics: [dlq]")

    class Info:
        error = None
        partitions = {0: None}

    class Meta:
        topics = {"dlq": Info()}

    class Refused:
        def __init__(self, conf: dict[str, Any]) -> None:
            self.handed = False

        def list_topics(self, topic: str, timeout: float) -> Meta:
            return Meta()

        def committed(self, parts: list[TopicPartition], timeout: float
                      ) -> list[TopicPartition]:
            return [TopicPartition(p.topic, p.partition, 5) for p in parts]

        def get_watermark_offsets(self, tp: TopicPartition, timeout: float
                                  ) -> tuple[int, int]:
            return 0, 10

        def assign(self, parts: list[TopicPartition]) -> None: ...

        def position(self, parts: list[TopicPartition]) -> list[TopicPartition]:
            return [TopicPartition(p.topic, p.partition, 5) for p in parts]

        def consume(self, count: int, timeout: float) -> list[Refusal]:
            if self.handed:  # said once, as librdkafka does
                time.sleep(min(timeout, 0.01))
                return []
            self.handed = True
            return [Refusal()]

        def commit(self, *args: Any, **kwargs: Any) -> None: ...

        def close(self) -> None: ...

    monkeypatch.setattr(replay, "Consumer", Refused)
    calls = iter(range(1000))

    def stopping() -> bool:  # a bound on the test, never reached with the fix
        return next(calls) >= 999

    with pytest.raises(replay.ReplayStuck) as stuck:
        replay.run_replay({"bootstrap.servers": "k:9092"}, "dlq", "dlq-replay",
                          replay.Filters(), dry_run=True, report=lambda line: None,
                          stopping=stopping)
    assert "Kafka refused to read the DLQ topic 'dlq'" in str(stuck.value)
    assert "Read on the topic and on the group 'dlq-replay'" in str(stuck.value)
