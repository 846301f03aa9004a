"""consumer.kafka.KafkaSource without a broker: its error callback and connectivity."""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import Future
from types import SimpleNamespace

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from consumer.kafka import ANSWER_SLICE_S, COMMIT_SILENCE_S, KafkaSource
from consumer.offsets import NOTE_MAX_CHARS, NOTE_MIN_CHARS


def source() -> KafkaSource:
    # Nothing listens on port 1; nothing here polls, so no connection is attempted.
    return KafkaSource({"bootstrap.servers": "127.0.0.1:1", "group.id": "unit"}, ["t"],
                       on_assign=lambda _p: None, on_revoke=lambda _p: None,
                       on_lost=lambda _p: None)


def test_a_down_broker_logs_one_line_per_broker_per_ten_seconds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    src = source()
    caplog.set_level(logging.WARNING, logger="consumer.kafka")
    for ms in range(45):  # ~45 a second from librdkafka with a broker down
        for broker in ("kafka-0:9092/0", "kafka-1:9092/1"):
            src._on_error(KafkaError(KafkaError._TRANSPORT, f"{broker}: Connect to ipv4#"
                                     f"10.0.0.1:9092 failed: Connection refused (after {ms}ms "
                                     "in state CONNECT)"))
    lines = [r.getMessage() for r in caplog.records if r.name == "consumer.kafka"]
    assert len(lines) == 2, lines
    assert {line.split(":", 1)[0] for line in lines} == {"kafka kafka-0", "kafka kafka-1"}


def test_connectivity_follows_all_brokers_down_and_the_broker_states_in_stats() -> None:
    src = source()
    assert src.connected
    src._on_error(KafkaError(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down"))
    assert not src.connected
    up = {"brokers": {"b/bootstrap": {"nodeid": -1, "state": "INIT"},
                      "b:9092/1": {"nodeid": 1, "state": "UP"}}}
    src._on_stats_raw(json.dumps(up))
    assert src.connected
    down = {"brokers": {"b:9092/1": {"nodeid": 1, "state": "TRY_CONNECT"}}}
    src._on_stats_raw(json.dumps(down))
    assert not src.connected


def test_the_end_of_a_kafka_outage_is_logged_with_its_length(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """Review "logs56": every other dependency said it answered again; Kafka's last line
    stayed "1/1 brokers are down". A start-up's first statistics (before the first
    connection) are no outage."""
    now = [1000.0]
    monkeypatch.setattr("consumer.kafka.time.monotonic", lambda: now[0])
    up = json.dumps({"brokers": {"b:9092/1": {"nodeid": 1, "state": "UP"}}})
    down = json.dumps({"brokers": {"b:9092/1": {"nodeid": 1, "state": "CONNECT"}}})
    src = source()
    caplog.set_level(logging.WARNING, logger="consumer.kafka")
    src._on_stats_raw(down)
    now[0] += 1
    src._on_stats_raw(up)
    assert "answer again" not in caplog.text
    src._on_error(KafkaError(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down"))
    now[0] += 40
    src._on_stats_raw(down)  # still down: its start is kept
    now[0] += 2
    src._on_commit(None, [])  # the coordinator answered
    assert "kafka: the brokers answer again (after 42 s); reading and committing go on" \
        in caplog.text
    src._on_stats_raw(up)
    assert caplog.text.count("answer again") == 1


def test_an_unanswered_commit_means_not_connected_until_an_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A hung broker (SIGSTOP, a black-holed network) keeps its connections: no error comes,
    only the commit's answer does not."""

    now = [1000.0]
    monkeypatch.setattr("consumer.kafka.time.monotonic", lambda: now[0])
    src = source()
    src._commit_waiting_since = now[0]  # what commit(wait=False) records
    now[0] += COMMIT_SILENCE_S - 1
    assert src.connected
    now[0] += 2
    assert not src.connected
    src._on_commit(KafkaError(KafkaError._WAIT_COORD), [])  # local: still no answer
    assert not src.connected
    src._on_commit(KafkaError(KafkaError.REBALANCE_IN_PROGRESS), [])  # an answer
    assert src.connected


Answer = KafkaError | bool | None
"""A commit's answer as a fake serves it: True acknowledges offsets, an error refuses them,
None is no answer yet."""


class _Consumer:
    """librdkafka's consumer as `consume` uses it: the non-blocking pass serves `first`, each
    blocking `poll` serves the next of `per_poll` and records its timeout in `polls`."""

    def __init__(self, src: KafkaSource, first: Answer = None,
                 per_poll: list[Answer] | None = None) -> None:
        self.src, self.first, self.per_poll = src, first, per_poll or []
        self.polls: list[float] = []

    def _serve(self, answer: Answer) -> None:
        if answer is True:
            self.src._on_commit(None, [TopicPartition("t", 0, 9)])
        elif isinstance(answer, KafkaError):
            self.src._on_commit(answer, [TopicPartition("t", 0, 9)])

    def consume(self, num_messages: int, timeout: float) -> list[object]:
        answer, self.first = self.first, None
        self._serve(answer)
        return []

    def poll(self, timeout: float) -> None:
        self.polls.append(timeout)
        self._serve(self.per_poll.pop(0) if self.per_poll else None)


def test_a_served_commit_answer_ends_the_poll_at_once() -> None:
    """It may have freed the worker's window: waiting on for a message held a full window's
    acknowledgement back a whole poll timeout."""
    src = source()
    src._sent_async.append((0.0, [("t", 0)]))  # what commit(wait=False) records
    fake = _Consumer(src, first=True)
    src._consumer = fake  # type: ignore[assignment]
    assert src.consume(10, 0.1) == []
    assert fake.polls == [], "returned without waiting for a message"
    assert src.consume(10, 0.1) == []
    assert fake.polls == [pytest.approx(0.1, abs=0.005)], "no answer: the poll waits as before"


def test_a_refused_commit_does_not_end_the_poll() -> None:
    """The offsets are requested again: returning at once would repeat the commit at the
    coordinator's round trip for as long as it refuses (a rebalance in progress)."""
    src = source()
    fake = _Consumer(src, first=KafkaError(KafkaError.REBALANCE_IN_PROGRESS))
    src._consumer = fake  # type: ignore[assignment]
    assert src.consume(10, 0.1) == []
    assert fake.polls == [pytest.approx(0.1, abs=0.005)], "the poll waits as before"


def test_with_commits_overlapping_the_poll_ends_when_the_second_is_acknowledged() -> None:
    src = source()
    # the first answered during the previous consume: one still out
    src._sent_async.extend([(0.0, [("t", 0)]), (0.0, [("t", 0)])])
    src._on_commit(None, [TopicPartition("t", 0, 5)])
    fake = _Consumer(src, per_poll=[None, True, None])
    src._consumer = fake  # type: ignore[assignment]
    assert src.consume(10, 0.1) == []
    assert fake.polls == [ANSWER_SLICE_S, ANSWER_SLICE_S], "sliced, ended at the answer"


def test_an_error_answer_keeps_the_poll_waiting_for_a_message() -> None:
    """The refused offsets are requested again by the next commit: ending at each refusal
    repeated the commit at the coordinator's round trip."""
    src = source()
    src._sent_async.append((0.0, [("t", 0)]))
    fake = _Consumer(src, per_poll=[None, KafkaError(KafkaError.REBALANCE_IN_PROGRESS), None])
    src._consumer = fake  # type: ignore[assignment]
    assert src.consume(10, 0.1) == []
    assert fake.polls[:2] == [ANSWER_SLICE_S, ANSWER_SLICE_S]
    assert len(fake.polls) == 3 and fake.polls[2] > 0.08, \
        "after the refusal, nothing out: one poll for the rest of the timeout"


def test_a_refused_note_halves_the_notes_until_they_are_off() -> None:
    """A broker's offset.metadata.max.bytes below a note: notes are cut to half the refused
    length (they still name the runs nearest the committed offset), and left out only
    below NOTE_MIN_CHARS; turning them off at the first refusal let a crash re-send every
    event earlier notes had named."""
    s = source()
    try:
        too_large = KafkaError.OFFSET_METADATA_TOO_LARGE
        assert not s._notes_now_refused([KafkaError._MSG_TIMED_OUT], [900])
        assert s.note_limit == NOTE_MAX_CHARS
        assert s._notes_now_refused([too_large], [800])
        assert s.note_limit == 400
        assert s._notes_now_refused([too_large], [])  # lengths unknown: half the limit
        assert s.note_limit == 200
        assert s._notes_now_refused([too_large], [NOTE_MIN_CHARS * 2 - 1])
        assert s.note_limit == 0  # every note refused: commits go without
        assert not s._notes_now_refused([too_large], [10])  # already off
    finally:
        s.close(0.1)


class _Positions:
    """librdkafka's position and cached high watermark per partition."""

    def __init__(self, positions: dict[int, int], highs: dict[int, int]) -> None:
        self.positions, self.highs = positions, highs

    def position(self, parts: list[TopicPartition]) -> list[TopicPartition]:
        return [TopicPartition(p.topic, p.partition, self.positions[p.partition])
                for p in parts]

    def get_watermark_offsets(self, part: TopicPartition, cached: bool = False
                              ) -> tuple[int, int]:
        assert cached, "a broker call on the commit path"
        return -1001, self.highs[part.partition]


def test_a_position_is_never_past_the_log_end_last_fetched() -> None:
    """Review kafka18: a topic created again kept the old log's position (20 on a log of
    5); a position with no known end is left out."""
    src = source()
    src._consumer = _Positions({0: 20, 1: 7, 2: 4}, {0: 5, 1: 9, 2: -1001})  # type: ignore[assignment]
    assert src.positions([("t", 0), ("t", 1), ("t", 2)]) == {("t", 0): 5, ("t", 1): 7}


def test_the_dlq_producer_may_create_its_topic() -> None:
    """KAFKA_ALLOW_AUTO_CREATE_TOPICS=false (set to keep the consumer from creating source
    topics) reached the DLQ producer: every dead letter failed for ever while the brokers
    would have created the DLQ topic (review diff19)."""
    from consumer.librdkafka import DLQ_PRODUCER, producer_settings

    settings = producer_settings({"allow.auto.create.topics": "false", "client.id": "c"},
                                 **DLQ_PRODUCER)
    assert settings["allow.auto.create.topics"] is True and settings["client.id"] == "c"


def test_the_session_timeout_is_the_worker_s_unless_set() -> None:
    """librdkafka's 45 s held the whole group ~39 s after a SIGKILL, and a SIGTERM in that
    wait could neither commit nor leave (review soak19)."""
    from consumer.librdkafka import SESSION_TIMEOUT_MS, consumer_settings

    assert SESSION_TIMEOUT_MS == 10_000
    assert consumer_settings({})["session.timeout.ms"] == SESSION_TIMEOUT_MS
    assert consumer_settings({"session.timeout.ms": "45000"})["session.timeout.ms"] == "45000"


def test_fetches_start_below_the_worker_s_prefetch_unless_set() -> None:
    """librdkafka's 100k (and the 10,000 before round 38) held megabytes of prefetched
    events that a worker delivering at Userpilot's pace never needed (RESULTS.md,
    "Round 38"); KAFKA_QUEUED_MIN_MESSAGES still reaches the consumer."""
    from consumer.config import load_settings
    from consumer.librdkafka import PREFETCH_MESSAGES, consumer_settings

    assert consumer_settings({})["queued.min.messages"] == PREFETCH_MESSAGES == 4_000
    env = {"USERPILOT_API_KEY": "up-token-1234",
           "USERPILOT_ANALYTICS_ENDPOINT": "analytex.userpilot.io",
           "KAFKA_BOOTSTRAP_SERVERS": "kafka:9092", "KAFKA_TOPICS": "delivery-userpilot",
           "SCHEMA_REGISTRY_URL": "http://schema-registry:8081",
           "KAFKA_QUEUED_MIN_MESSAGES": "10000"}
    settings = load_settings(env)
    assert consumer_settings(settings.kafka_config(logger=False))["queued.min.messages"] == "10000"


def test_a_producer_that_must_not_create_topics_still_says_so() -> None:
    """Replay's producer refuses to create a deleted topic (review replay17): the user's
    setting is left out, its own is kept (the first fix of diff19 dropped both)."""
    from consumer.librdkafka import producer_settings

    settings = producer_settings({"allow.auto.create.topics": "true"},
                                 **{"allow.auto.create.topics": False})
    assert settings["allow.auto.create.topics"] is False


def test_a_resume_seeks_the_partitions_it_paused_with_messages_left_to_their_positions(
) -> None:
    """The seek wakes librdkafka's fetcher (a resume alone does not). It goes to the very
    position the resume fetches from, without the leader epoch (no validation request); never
    to a partition without a position, one caught up (the seek would clear the position the
    commit past transaction markers needs) or one this source did not pause."""
    from confluent_kafka import KafkaException

    calls: list[tuple[str, list[tuple[int, int, int | None]]]] = []
    at = {0: 17, 1: -1001, 2: 40, 3: 50, 4: 8, 5: 9, 6: 3}  # 1: nothing handed over yet
    high = {0: 90, 2: 41, 3: 50, 4: 30, 5: 30, 6: -1001}  # 3: caught up; 6: never fetched

    def listed(parts: list[TopicPartition]) -> list[tuple[int, int, int | None]]:
        return [(tp.partition, tp.offset, tp.leader_epoch) for tp in parts]

    class Consumer:
        def pause(self, parts: list[TopicPartition]) -> None:
            calls.append(("pause", listed(parts)))

        def resume(self, parts: list[TopicPartition]) -> None:
            calls.append(("resume", listed(parts)))

        def position(self, parts: list[TopicPartition]) -> list[TopicPartition]:
            return [TopicPartition(tp.topic, tp.partition, at[tp.partition], leader_epoch=7)
                    for tp in parts]

        def get_watermark_offsets(self, tp: TopicPartition, cached: bool = False
                                  ) -> tuple[int, int]:
            assert cached  # local: no broker call on the poll thread
            return 0, high[tp.partition]

        def seek(self, tp: TopicPartition) -> None:
            calls.append(("seek", listed([tp])))
            if tp.partition == 0:
                raise KafkaException(KafkaError(KafkaError._STATE, "taken away meanwhile"))

    src = source()
    src._consumer = Consumer()  # type: ignore[assignment]
    paused = [("t", p) for p in (0, 1, 2, 3, 4, 6)]
    src.pause(paused)
    calls.clear()
    src.resume([*paused, ("t", 5)])  # 5 was never paused: its prefetched messages stay
    assert calls == [("resume", [(p, -1001, None) for p in (0, 1, 2, 3, 4, 6, 5)]),
                     ("seek", [(0, 17, None)]), ("seek", [(2, 40, None)]),
                     ("seek", [(4, 8, None)])]
    calls.clear()
    src.resume(paused)  # resumed already: nothing to wake
    assert [name for name, _ in calls] == ["resume"]
    calls.clear()
    src.resume([])
    assert calls == []


def test_a_resume_whose_positions_cannot_be_read_only_resumes() -> None:
    from confluent_kafka import KafkaException

    seeks: list[TopicPartition] = []

    class Consumer:
        def pause(self, parts: list[TopicPartition]) -> None:
            pass

        def resume(self, parts: list[TopicPartition]) -> None:
            pass

        def position(self, parts: list[TopicPartition]) -> list[TopicPartition]:
            raise KafkaException(KafkaError(KafkaError._STATE, "closing"))

        def seek(self, tp: TopicPartition) -> None:
            seeks.append(tp)

    src = source()
    src._consumer = Consumer()  # type: ignore[assignment]
    src.pause([("t", 0)])
    src.resume([("t", 0)])
    assert seeks == []


def test_a_failed_commit_that_names_no_partition_fails_the_last_sent() -> None:
    """Acknowledged as nothing, the worker's pipelined commit stayed outstanding and no
    commit followed it until a rebalance (review "core41")."""
    answers: list[tuple[list[tuple[tuple[str, int], int]], list[tuple[str, int]]]] = []
    src = KafkaSource({"bootstrap.servers": "127.0.0.1:1", "group.id": "unit"}, ["t"],
                      on_assign=lambda _p: None, on_revoke=lambda _p: None,
                      on_lost=lambda _p: None,
                      on_committed=lambda done, failed: answers.append((done, failed)))

    class _Committing:
        def commit(self, offsets: list[TopicPartition], asynchronous: bool) -> None:
            assert asynchronous

    src._consumer = _Committing()  # type: ignore[assignment]
    assert src.commit({("t", 0): 5, ("t", 1): 7}, wait=False)
    src._on_commit(KafkaError(KafkaError._TIMED_OUT), [])
    assert answers == [([], [("t", 0), ("t", 1)])]
    # Two under way: each answer is its own commit's, oldest first (review "diff41").
    assert src.commit({("t", 0): 6}, wait=False)
    assert src.commit({("t", 1): 8}, wait=False)
    src._on_commit(KafkaError(KafkaError._TIMED_OUT), [])
    assert answers[-1] == ([], [("t", 0)])
    src._on_commit(KafkaError(KafkaError._TIMED_OUT), [])
    assert answers[-1] == ([], [("t", 1)])
    src._on_commit(None, [TopicPartition("t", 0, 5)])
    assert answers[-1] == ([(("t", 0), 5)], [])


def test_an_assignment_after_an_outage_means_connected_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Review "probes43": a commit answered only by a local error through an outage longer
    than the session left `connected` False after the rejoin (its partitions' offsets were
    released with the session, so no later commit's answer came): a quiet replica stayed
    unready and took its partitions' messages without reading their commit notes."""

    now = [1000.0]
    monkeypatch.setattr("consumer.kafka.time.monotonic", lambda: now[0])
    assigned: list[list[tuple[str, int]]] = []
    src = source()
    src._on_assign = assigned.append
    src._commit_waiting_since = now[0]
    now[0] += COMMIT_SILENCE_S + 60
    src._on_commit(KafkaError(KafkaError._WAIT_COORD), [])  # librdkafka gives up: local
    assert not src.connected
    src._assigned([("t", 0)])  # the rejoin: the coordinator answered
    assert src.connected and assigned == [[("t", 0)]]


class _Committer:
    """librdkafka's consumer as asynchronous commits use it: sent, answered when told."""

    def commit(self, offsets: list[TopicPartition], asynchronous: bool) -> None:
        assert asynchronous


def _committing_source(monkeypatch: pytest.MonkeyPatch) -> tuple[list[float], KafkaSource]:
    """A source on a clock the test moves (`now[0]`), one asynchronous commit sent a second
    ago and not answered."""
    now = [1000.0]
    monkeypatch.setattr("consumer.kafka.time.monotonic", lambda: now[0])
    src = source()
    src._consumer = _Committer()  # type: ignore[assignment]
    src.commit({("t", 0): 5}, wait=False)
    now[0] += 1
    return now, src


def test_a_commit_still_out_after_another_was_answered_keeps_the_clock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Commits overlap: the coordinator answered the first, then hung with the second out.
    The answer cleared the clock and the worker sends no commit while one is outstanding,
    so `connected` stayed True (and /readyz green) for a minute or more (review "rebal44").
    The clock goes on from the second commit's sending, not from before an assignment."""
    now, src = _committing_source(monkeypatch)
    src.commit({("t", 0): 9}, wait=False)
    second_sent = now[0]
    now[0] += 1
    src._on_commit(None, [TopicPartition("t", 0, 5)])  # the first is answered
    assert src.connected
    now[0] = second_sent + COMMIT_SILENCE_S + 0.5
    assert not src.connected, "the second commit unanswered past the silence"
    src._on_commit(None, [TopicPartition("t", 0, 9)])
    assert src.connected

    src.commit({("t", 0): 12}, wait=False)
    src.commit({("t", 0): 15}, wait=False)
    now[0] += COMMIT_SILENCE_S  # e.g. a rebalance: no answer meanwhile
    src._assigned([("t", 0)])
    src._on_commit(None, [TopicPartition("t", 0, 12)])
    assert src.connected, "counted from the assignment, not from before it"
    now[0] += COMMIT_SILENCE_S + 0.5
    assert not src.connected


def test_a_commit_out_across_an_assignment_is_timed_from_the_assignment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Review diff44: partitions kept through a cooperative rebalance, their commit still
    out; the assignment cleared its clock and the worker sends no commit while one is out,
    so a coordinator hung from then on went unnoticed. Yet a commit from before the
    assignment that then fails locally leaves no clock behind (a quiet replica stayed
    unready for good, review "probes43")."""
    now, src = _committing_source(monkeypatch)
    src._assigned([("t", 1)])
    now[0] += COMMIT_SILENCE_S + 1
    assert not src.connected, "unanswered since the assignment"
    src._on_commit(KafkaError(KafkaError._TIMED_OUT), [])  # failed locally: no answer
    assert src.connected, "nothing out since the assignment"


def test_a_partition_without_a_leader_keeps_no_other_high_watermark_waiting() -> None:
    """A partition without a leader waited out the whole budget, and no other paused
    partition's lag was asked that round (review "diff45b"): all are asked at once, each
    answered apart, within the budget; one not answered in time, or refused, reads -1."""
    import time
    from concurrent.futures import Future
    from types import SimpleNamespace
    from typing import Any

    from consumer.kafka import KafkaSource

    asked: list[tuple[list[tuple[str, int]], float]] = []

    def list_offsets(wanted: dict[Any, Any], isolation_level: Any,
                     request_timeout: float) -> dict[Any, Future[Any]]:
        asked.append(([(tp.topic, tp.partition) for tp in wanted], request_timeout))
        out: dict[Any, Future[Any]] = {}
        for tp in wanted:
            future: Future[Any] = Future()
            if tp.partition == 2:
                future.set_exception(KafkaException(KafkaError(KafkaError._UNKNOWN_PARTITION)))
            elif tp.partition != 1:  # 1 has no leader: never answered
                future.set_result(SimpleNamespace(offset=7 + tp.partition))
            out[tp] = future
        return out

    polled: list[float] = []
    source: Any = SimpleNamespace(_marks=SimpleNamespace(list_offsets=list_offsets,
                                                         poll=polled.append))
    source._admin = lambda: source._marks
    source._answers = lambda futures, timeout_s: KafkaSource._answers(source, futures, timeout_s)
    source._offsets = lambda parts, timeout_s, spec: KafkaSource._offsets(
        source, parts, timeout_s, spec)
    started = time.monotonic()
    marks = KafkaSource.high_watermarks(source, [("t", 0), ("t", 1), ("t", 2), ("t", 3)], 0.3)
    assert time.monotonic() - started < 2.0
    assert marks == {("t", 0): 7, ("t", 1): -1, ("t", 2): -1, ("t", 3): 10}
    assert asked == [([("t", 0), ("t", 1), ("t", 2), ("t", 3)], 0.3)]  # one request
    assert polled == [0]  # its log lines served (review "diff56": never, they piled up)
    assert KafkaSource.high_watermarks(source, [], 0.3) == {}
    specs: list[str] = []

    def earliest(wanted: dict[Any, Any], **kw: Any) -> dict[Any, Future[Any]]:
        specs.extend(type(v).__name__ for v in wanted.values())
        return list_offsets(wanted, **kw)

    source._marks.list_offsets = earliest
    assert KafkaSource.low_watermarks(source, [("t", 0)], 0.3) == {("t", 0): 7}
    assert specs == ["EarliestSpec"]


class _Cluster:
    """librdkafka's consumer for a revoke's commit: metadata answered or not (a cluster
    that stopped answering, connections open), commits recorded."""

    def __init__(self, answering: bool) -> None:
        self.answering = answering
        self.commits: list[bool] = []  # asynchronous?

    def committed(self, parts: list[TopicPartition], timeout: float = -1
                  ) -> list[TopicPartition]:
        assert timeout > 0 and [(p.topic, p.partition) for p in parts] == [("t", 0)]
        if not self.answering:
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT))
        return parts

    def commit(self, offsets: list[TopicPartition], asynchronous: bool) -> list[TopicPartition]:
        self.commits.append(asynchronous)
        return offsets


def test_the_coordinator_is_asked_before_a_revoke_waits_on_its_commit(
        caplog: pytest.LogCaptureFixture) -> None:
    """Review "lifecycle47": `connected` is as old as the last served callback, and a
    revoke's drain serves none: a cluster that stopped answering during it held the
    synchronous commit, the rebalance callback and the poll thread for the whole outage
    (3 min 45 s). The worker asks `answering` first: a committed-offsets request of the
    coordinator, within SYNC_PROBE_S."""
    src = source()
    silent = _Cluster(answering=False)
    src._consumer = silent  # type: ignore[assignment]
    with caplog.at_level(logging.WARNING, logger="consumer.kafka"):
        assert not src.answering([("t", 0), ("t", 1)])
    assert "Kafka did not answer within 2 s" in caplog.text
    src._consumer = _Cluster(answering=True)  # type: ignore[assignment]
    assert src.answering([("t", 0)])
    assert src.answering([])


def _stats(parts: dict[int, dict[str, object]], *, steady: bool = True) -> str:
    return json.dumps({
        "brokers": {}, "cgrp": {"state": "up" if steady else "wait-coord",
                                "join_state": "steady" if steady else "wait-join"},
        "topics": {"t": {"partitions": {
            "-1": {"fetch_state": "none"},
            **{str(p): {"hi_offset": -1001, "app_offset": -1001, **info}
               for p, info in parts.items()}}}}})


class _Assigner:
    """A consumer that records the source's assignment calls."""

    def __init__(self, owned: list[int]) -> None:
        self.owned = owned
        self.calls: list[tuple[str, list[int]]] = []

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition("t", p) for p in self.owned]

    def incremental_unassign(self, parts: list[TopicPartition]) -> None:
        self.calls.append(("unassign", [tp.partition for tp in parts]))

    def incremental_assign(self, parts: list[TopicPartition]) -> None:
        assert all(tp.offset < 0 for tp in parts), "no offset: the committed one is asked"
        self.calls.append(("assign", [tp.partition for tp in parts]))

    def pause(self, parts: list[TopicPartition]) -> None:
        self.calls.append(("pause", [tp.partition for tp in parts]))

    def consume(self, num_messages: int, timeout: float) -> list[object]:
        return []

    def poll(self, timeout: float) -> None:
        return None


def test_partitions_librdkafka_never_fetched_are_assigned_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Review "broker49"/"stuck49": answered NOT_COORDINATOR for a new assignment's committed
    offsets, librdkafka never asks again and never fetches (librdkafka#5586): the partitions
    stalled for good behind a ready replica. Not fetching (fetch_state "none", or "stopped"
    for one owned before, review "diff49c") FETCHLESS_S after their assignment in a steady
    group, they are assigned again, without an offset, paused ones paused again; those seen
    fetching once, revoked, or never assigned here are left alone."""
    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    refetched: list[list[tuple[str, int]]] = []
    src = KafkaSource({"bootstrap.servers": "127.0.0.1:1", "group.id": "unit"}, ["t"],
                      on_assign=lambda _p: None, on_revoke=lambda _p: None,
                      on_lost=lambda _p: None, on_refetch=refetched.append)
    fake = _Assigner(owned=[0, 1, 2, 3, 4, 5, 9])
    src._consumer = fake  # type: ignore[assignment]
    src._paused = {("t", 1)}
    src._assigned([("t", p) for p in range(6)])
    src._taken([TopicPartition("t", 5)], lambda _p: None)  # revoked: not watched
    parts: dict[int, dict[str, object]] = {
        0: {"fetch_state": "none"}, 1: {"fetch_state": "none"},
        2: {"fetch_state": "active"},
        3: {"fetch_state": "stopped", "hi_offset": 30, "app_offset": 30},  # given back
        4: {"fetch_state": "offset-query"},
        5: {"fetch_state": "none"},
        9: {"fetch_state": "none"}}  # never assigned here
    for _ in range(4):  # 0, 5, 10, 15 s after the assignment: not yet, then once
        src._on_stats_raw(_stats(parts))
        src.consume(10, 0)
        now[0] += 5.0
    assert fake.calls == [("unassign", [0, 1, 3]), ("assign", [0, 1, 3]), ("pause", [1])]
    assert refetched == [[("t", 0), ("t", 1), ("t", 3)]]
    # Partition 2, seen fetching once, is not flagged when it shows "stopped" later.
    fake.calls.clear()
    parts[2] = {"fetch_state": "stopped"}
    for _ in range(4):
        src._on_stats_raw(_stats({2: parts[2]}))
        src.consume(10, 0)
        now[0] += 5.0
    assert fake.calls == []


def test_a_group_not_steady_holds_the_refetch_back() -> None:
    """A rebalance under way (the coordinator not settled) may hold an assignment's first
    fetch: nothing is assigned again until the group is steady."""
    src = source()
    fake = _Assigner(owned=[0])
    src._consumer = fake  # type: ignore[assignment]
    src._assigned([("t", 0)])
    src._unstarted[("t", 0)] -= 60.0  # assigned a minute ago
    src._on_stats_raw(_stats({0: {"fetch_state": "none"}}, steady=False))
    src.consume(10, 0)
    assert fake.calls == []
    src._on_stats_raw(_stats({0: {"fetch_state": "none"}}))
    src.consume(10, 0)
    assert fake.calls[:2] == [("unassign", [0]), ("assign", [0])]


def test_a_revoke_served_by_the_poll_drops_the_queued_refetch() -> None:
    """Review "whole49": run before the poll, an unassign made while the group awaited the
    answer to a revoke not served yet was taken as that answer, and another member got the
    partition while this one still drained it. The refetch runs after the poll, and a
    rebalance callback it served drops the queue (the next report asks again)."""
    src = source()

    class Revoking(_Assigner):
        def consume(self, num_messages: int, timeout: float) -> list[object]:
            src._taken([TopicPartition("t", 1)], lambda _p: None)  # the revoke, served
            self.owned = [0]
            return []

    fake = Revoking(owned=[0, 1])
    src._consumer = fake  # type: ignore[assignment]
    src._refetch = [("t", 0)]
    src.consume(10, 0)
    assert fake.calls == []
    src._refetch = [("t", 0)]
    fake.consume = lambda num_messages, timeout: []  # type: ignore[method-assign]
    src.consume(10, 0)
    assert fake.calls == [("unassign", [0]), ("assign", [0])]


_RESET_LINE = ("[thrd:main]: t.x-1 [3]: offset reset (at offset 20 (leader epoch -1), broker 1) "
               "to offset BEGINNING (leader epoch -1): fetch failed due to requested offset "
               "not available on the broker: Broker: Offset out of range")


@pytest.mark.parametrize(("text", "seen"), [
    (_RESET_LINE, [(("t.x-1", 3), 20)]),
    ("[thrd:main]: t [12]: offset reset (at offset 9, broker 1) to offset BEGINNING: x",
     [(("t", 12), 9)]),
    ("[thrd:main]: t [0]: offset reset (at offset 7, broker 1) to offset END: x: y",
     [(("t", 0), 7)]),  # librdkafka before leader epochs
    ("[thrd:main]: t [0]: offset reset (at offset INVALID, broker -1) to BEGINNING: x",
     []),  # no committed offset yet: nothing skipped
    ("[thrd:main]: t [0]: Fetch backoff for 500ms", []),
])
def test_the_consumer_s_logger_notes_each_offset_reset_and_logs_it(
        text: str, seen: list[tuple[tuple[str, int], int]],
        caplog: pytest.LogCaptureFixture) -> None:
    from consumer.kafka import _ResetWatch

    noted: list[tuple[tuple[str, int], int]] = []
    watch = _ResetWatch(logging.getLogger("test.librdkafka"), lambda tp, at: noted.append(
        (tp, at)))
    with caplog.at_level(logging.WARNING, "test.librdkafka"):
        watch.log(logging.WARNING, "%s [%s] %s", "OFFSET", "rdkafka#consumer-1", text)
        watch.log(logging.WARNING, "%s [%s] %s", "FETCH", "rdkafka#consumer-1", _RESET_LINE)
    assert noted == seen
    assert [r.getMessage() for r in caplog.records] == [
        f"OFFSET [rdkafka#consumer-1] {text}", f"FETCH [rdkafka#consumer-1] {_RESET_LINE}"]


def test_a_log_level_under_the_reset_s_still_sees_it_and_logs_only_what_was_asked(
        caplog: pytest.LogCaptureFixture) -> None:
    """Review "diff53a": `KAFKA_LOG_LEVEL=3` hid librdkafka's reset line from the watch
    (nothing counted); `log.thread.name=false` left out the "[thrd:main]: " it matched."""
    from consumer.kafka import _ResetWatch, _watched

    seen: list[tuple[tuple[str, int], int]] = []
    settings: dict[str, object] = {"logger": logging.getLogger("test.librdkafka"),
                                   "log_level": "3"}
    _watched(settings, lambda tp, at: seen.append((tp, at)))
    assert settings["log_level"] == 4
    watch = settings["logger"]
    assert isinstance(watch, _ResetWatch)
    with caplog.at_level(logging.DEBUG, "test.librdkafka"):
        watch.log(logging.WARNING, "%s [%s] %s", "OFFSET", "rdkafka#consumer-1",
                  "t [2]: offset reset (at offset 9, broker 1) to offset BEGINNING: x")
        watch.log(logging.ERROR, "%s [%s] %s", "FAIL", "rdkafka#consumer-1", "broken")
    assert seen == [(("t", 2), 9)]
    assert [r.getMessage() for r in caplog.records] == ["FAIL [rdkafka#consumer-1] broken"]
    kept: dict[str, object] = {"logger": logging.getLogger("test.librdkafka"),
                               "log_level": 7}
    _watched(kept, lambda tp, at: None)
    assert kept["log_level"] == 7


class _Marks:
    """The consumer and the admin client as `_tell_resets` uses them: the broker's high
    watermark per partition, each answer after `delay` seconds."""

    def __init__(self, ends: dict[int, int], delay: float = 0.0) -> None:
        self.ends = ends
        self.delay = delay

    def consume(self, num_messages: int, timeout: float) -> list[object]:
        return []

    def poll(self, timeout: float) -> None:
        return None

    def list_offsets(self, wanted: dict[TopicPartition, object], isolation_level: object,
                     request_timeout: float) -> dict[TopicPartition, Future[object]]:
        """As the admin client `high_watermarks` asks: each answer a future of its own."""
        out: dict[TopicPartition, Future[object]] = {}
        for tp in wanted:
            future: Future[object] = Future()
            if tp.partition not in self.ends:
                future.set_exception(KafkaException(KafkaError(KafkaError._TIMED_OUT)))
            else:
                answer = SimpleNamespace(offset=self.ends[tp.partition])
                timer = threading.Timer(self.delay, future.set_result, [answer])
                timer.daemon = True
                timer.start()
            out[tp] = future
        return out


def test_an_offset_reset_is_told_after_the_call_with_where_it_lay() -> None:
    """Told once the call that logged it returns (no client call inside librdkafka's log
    callback), before its batch is taken, with whether the position lay past the log's
    end (a log replaced) or before its start (offsets removed), asked of the broker."""
    told: list[tuple[tuple[str, int], int, bool | None]] = []
    src = KafkaSource({"bootstrap.servers": "127.0.0.1:1", "group.id": "unit",
                       "logger": logging.getLogger("test.librdkafka")}, ["t"],
                      on_assign=lambda _p: None, on_revoke=lambda _p: None,
                      on_lost=lambda _p: None,
                      on_reset=lambda tp, at, beyond: told.append((tp, at, beyond)))
    src._consumer = src._marks = _Marks({0: 6000, 1: 20, 3: 0})  # type: ignore[assignment]
    src._reset_seen(("t", 0), 20)  # retention removed 20.. : before the log's start
    src._reset_seen(("t", 1), 120)  # past the end of a shorter log
    src._reset_seen(("t", 2), 7)  # the broker does not say
    src._reset_seen(("t", 3), 120)  # past the end of an empty one
    assert told == []
    src.consume(10, 0)
    assert told == [(("t", 0), 20, False), (("t", 1), 120, True), (("t", 2), 7, None),
                    (("t", 3), 120, True)]
    src.consume(10, 0)
    assert len(told) == 4


def _told_source(told: list[tuple[tuple[str, int], int, bool | None]]) -> KafkaSource:
    return KafkaSource({"bootstrap.servers": "127.0.0.1:1", "group.id": "unit",
                        "logger": logging.getLogger("test.librdkafka")}, ["t"],
                       on_assign=lambda _p: None, on_revoke=lambda _p: None,
                       on_lost=lambda _p: None,
                       on_reset=lambda tp, at, beyond: told.append((tp, at, beyond)))


def test_the_lookups_after_many_resets_take_about_a_second_and_the_rest_are_unknown(
) -> None:
    """20 partitions reset at once behind a broker that does not answer: the poll thread
    is held about a second (not 0.25 s each), and those not asked are told as unknown (not
    past the end: that would count a log reset)."""
    told: list[tuple[tuple[str, int], int, bool | None]] = []
    src = _told_source(told)
    src._consumer = src._marks = _Marks({p: 10 for p in range(20)}, delay=10)  # type: ignore[assignment]
    for partition in range(20):
        src._reset_seen(("t", partition), 5)
    started = time.monotonic()
    src.consume(10, 0)
    assert 0.9 <= time.monotonic() - started < 1.5
    assert len(told) == 20 and all(beyond is None for *_, beyond in told[4:]), told


def test_a_reset_noted_before_a_revoke_or_an_assignment_in_the_same_call_is_not_told(
) -> None:
    """Review "mutate53": told after the call, it named a position of the previous
    ownership, which the next owner had moved past."""
    told: list[tuple[tuple[str, int], int, bool | None]] = []
    src = _told_source(told)
    src._consumer = src._marks = _Marks({0: 6000, 1: 6000, 2: 6000})  # type: ignore[assignment]
    src._reset_seen(("t", 0), 3)
    src._reset_seen(("t", 1), 3)
    src._reset_seen(("t", 2), 3)
    src._taken([TopicPartition("t", 0)], lambda _p: None)
    src._assigned([("t", 1)])
    src.consume(10, 0)
    assert told == [(("t", 2), 3, False)]


def test_the_source_consumer_s_logger_is_watched(monkeypatch: pytest.MonkeyPatch) -> None:
    from consumer import kafka

    made: dict[str, object] = {}

    class Made:
        def __init__(self, conf: dict[str, object]) -> None:
            made.update(conf)

    monkeypatch.setattr(kafka, "Consumer", Made)
    _told_source([])
    assert isinstance(made["logger"], kafka._ResetWatch)


def test_a_failed_commit_names_kafka_s_error_as_the_runbook_does(
        caplog: pytest.LogCaptureFixture) -> None:
    """Review "logs56": the README's UserpilotCommitsFailing section names
    GROUP_AUTHORIZATION_FAILED, REBALANCE_IN_PROGRESS...; the lines said only librdkafka's
    text ("Broker: Group authorization failed")."""
    src = _told_source([])
    src._sent_async.append((time.monotonic(), [("t", 0)]))
    with caplog.at_level(logging.WARNING, logger="consumer.kafka"):
        src._on_commit(KafkaError(KafkaError.GROUP_AUTHORIZATION_FAILED),
                       [TopicPartition("t", 0, 5)])
    assert "offset commit failed (GROUP_AUTHORIZATION_FAILED: " in caplog.text


def test_the_lookups_admin_client_asks_for_no_producer_id() -> None:
    """Made from the dead-letter producer's settings, the admin client of the lag and ACL
    lookups was idempotent: it asked for a producer id, which the brokers refuse a
    principal with Write on no topic, and the fatal error failed its every later request.
    A client built from them must also be accepted with a user's gapless guarantee."""
    from confluent_kafka.admin import AdminClient

    from consumer.librdkafka import admin_settings

    conf = {"bootstrap.servers": "127.0.0.1:1", "enable.gapless.guarantee": "true",
            "sasl.mechanism": "PLAIN", "session.timeout.ms": "6000"}
    settings = admin_settings(conf)
    assert settings["enable.idempotence"] is False
    assert "enable.gapless.guarantee" not in settings and "session.timeout.ms" not in settings
    assert settings["sasl.mechanism"] == "PLAIN"
    AdminClient(settings)  # librdkafka takes them together


_REFUSED = "SASL authentication error: Authentication failed during re-authentication due to invalid credentials with SASL mechanism SCRAM-SHA-256"  # noqa: E501


def test_a_login_refused_for_a_minute_stops_the_worker(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Review "rotate57": a Kafka password rotated (the brokers first, then the mounted
    file) is read at start-up only; the worker waited for ever, live and unready, with no
    restart to read the new one. A refusal that lasts LOGIN_REFUSED_STOP_S stops it."""
    import consumer.kafka as kafka

    now = [1000.0]
    monkeypatch.setattr("consumer.kafka.time.monotonic", lambda: now[0])
    src = source()
    try:
        src._on_error(KafkaError(KafkaError._AUTHENTICATION, _REFUSED))
        src._on_error(KafkaError(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down"))
        now[0] += kafka.LOGIN_REFUSED_STOP_S - 1
        assert src.fatal_error is None, "not yet"
        now[0] += 1
        stop = src.fatal_error
        assert stop is not None and "refused the worker's login for 60 s" in stop
        assert "invalid credentials" in stop and "KAFKA_SASL_PASSWORD_FILE" in stop

        src._brokers_seen(True)  # a broker up: the login passed (fixed in time)
        assert src.fatal_error is None
    finally:
        src.close(1)


@pytest.mark.parametrize("errors", [
    [KafkaError(KafkaError._TRANSPORT, "127.0.0.1:9092/1: Connect to ipv4#127.0.0.1:9092 "
                "failed: Connection refused (after 0ms in state CONNECT)")],
    [KafkaError(KafkaError._AUTHENTICATION, "SASL authentication error: Timed out")],
    [KafkaError(KafkaError._TIMED_OUT, "Metadata request timed out")],
])
def test_an_outage_or_a_cut_handshake_is_waited_out_not_a_refusal(
        monkeypatch: pytest.MonkeyPatch, errors: list[KafkaError]) -> None:
    """Brokers down (restarting, the network gone), a SASL handshake cut by the network:
    an outage, which the worker waits out however long."""
    now = [1000.0]
    monkeypatch.setattr("consumer.kafka.time.monotonic", lambda: now[0])
    src = source()
    try:
        for err in errors:
            src._on_error(err)
        now[0] += 3600
        assert src.fatal_error is None
    finally:
        src.close(1)


def test_a_refusal_stops_whatever_other_brokers_say_until_one_takes_the_login(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Review "diff57": a network error of another broker (one bootstrap address gone)
    restarted the minute, and a rotated password never stopped the worker. A client
    certificate refused under TLS 1.3 comes as a transport failure: a refusal too."""
    now = [1000.0]
    monkeypatch.setattr("consumer.kafka.time.monotonic", lambda: now[0])
    src = source()
    try:
        src._on_error(KafkaError(KafkaError._TRANSPORT, "ssl://b1:9093/1: Receive failed: "
                                 "ssl/record/rec_layer_s3.c:1605: error:0A000412:SSL "
                                 "routines::sslv3 alert bad certificate"))
        for _ in range(10):
            now[0] += 10
            src._on_error(KafkaError(KafkaError._TRANSPORT, "127.0.0.1:1/bootstrap: Connect "
                                     "to ipv4#127.0.0.1:1 failed: Connection refused"))
        assert src.fatal_error is not None and "alert bad certificate" in src.fatal_error
    finally:
        src.close(1)


def test_oauthbearer_logins_refused_do_not_stop_the_worker(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Review "diff57": an identity provider down for a minute (its last token expired,
    refused by the brokers) stopped every replica, and each restart too: a crash loop.
    librdkafka fetches OAUTHBEARER tokens anew itself: the worker waits."""
    from consumer.kafka import KafkaSource

    now = [1000.0]
    monkeypatch.setattr("consumer.kafka.time.monotonic", lambda: now[0])
    src = KafkaSource({"bootstrap.servers": "127.0.0.1:1", "group.id": "unit",
                       "security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "OAUTHBEARER",
                       "enable.sasl.oauthbearer.unsecure.jwt": "true"}, ["t"],
                      on_assign=lambda _p: None, on_revoke=lambda _p: None,
                      on_lost=lambda _p: None)
    try:
        src._on_error(KafkaError(KafkaError._AUTHENTICATION, "SASL authentication error: "
                                 "Authentication failed: invalid_token"))
        now[0] += 3600
        assert src.fatal_error is None
    finally:
        src.close(1)


def test_a_broker_throttling_the_worker_is_said_once_a_minute_per_broker(
        caplog: pytest.LogCaptureFixture) -> None:
    """Review "sizes59": a client quota starving the worker's fetches left no line at all
    (nothing consumed, readiness green); librdkafka tells each throttle."""
    from types import SimpleNamespace

    src = source()
    caplog.set_level(logging.WARNING, logger="consumer.kafka.throttle")
    try:
        for broker in ("kafka-0:9092", "kafka-0:9092", "kafka-1:9092"):
            src._on_throttle(SimpleNamespace(broker_name=broker, broker_id=1,
                                             throttle_time=0.98))
        src._on_throttle(SimpleNamespace(broker_name="kafka-2:9092", broker_id=2,
                                         throttle_time=0.01))  # too short to say
    finally:
        src.close(1.0)
    lines = [r.getMessage() for r in caplog.records if r.name == "consumer.kafka.throttle"]
    assert len(lines) == 2, lines
    assert "kafka kafka-0:9092/1: the broker throttles this worker's consumer for 1.0 s" in lines[0]
    assert "client quota" in lines[0]


def test_a_client_out_of_threads_or_sockets_stops_the_worker_naming_the_limit() -> None:
    """Review "env60": at `ulimit -u 11` librdkafka could not make its broker threads; the
    worker never got partitions and logged a WARNING every 10 s for good. It stops (exit 1)
    with a line naming the system limit."""
    src = source()
    try:
        assert src.fatal_error is None
        src._on_error(KafkaError(KafkaError._CRIT_SYS_RESOURCE,
                                 "Unable to create broker thread"))
        said = src.fatal_error
        assert said is not None and "Unable to create broker thread" in said, said
        assert "ulimit -u" in said and "pids limit" in said
    finally:
        src.close(1.0)


def test_close_at_the_thread_limit_is_abandoned_not_a_traceback(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Review "env60": SIGTERM at the thread limit raised "can't start new thread" out of
    close(); the process exits without destroying the client instead."""
    src = source()

    def cannot(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    with monkeypatch.context() as patched:
        patched.setattr(threading.Thread, "start", cannot)
        assert src.close(1.0) is False
    assert src.abandoned
    src._consumer.close()
