"""consumer.kafka.KafkaSource on a real broker: a resume fetches at once.

librdkafka's broker thread sleeps up to a second while every partition it fetches is
paused, and a plain resume does not wake it: each window that filled and paused the replica
stopped fetching for ~0.9 s after it resumed (RESULTS.md, "Round 37")."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from confluent_kafka import Message

from consumer.kafka import KafkaSource, make_producer

RESUMED_WITHIN_S = 0.5
"""Without the wake-up seek the first message came 0.8-1.0 s after the resume."""


def produce(bootstrap: str, topic: str, count: int, value: bytes) -> None:
    producer = make_producer({"bootstrap.servers": bootstrap})
    for i in range(count):
        producer.produce(topic, key=b"%d" % i, value=value)
    assert producer.flush(30) == 0


def subscribed(bootstrap: str, topic: str) -> KafkaSource:
    """A source of its own group, subscribed to `topic`; its rebalances are ignored."""
    def ignore(_parts: list[tuple[str, int]]) -> None:
        return None

    source = KafkaSource({"bootstrap.servers": bootstrap, "group.id": f"{topic}-g"},
                         [topic], on_assign=ignore, on_revoke=ignore, on_lost=ignore)
    source.subscribe()
    return source


def test_a_resume_after_every_partition_was_paused_fetches_at_once(
    kafka_bootstrap: str, topic_factory: Callable[..., str],
) -> None:
    topic = topic_factory(partitions=2)
    produce(kafka_bootstrap, topic, 2000, b"x" * 100)
    source = subscribed(kafka_bootstrap, topic)
    try:
        deadline = time.monotonic() + 30
        seen: dict[int, list[int]] = {0: [], 1: []}

        def take(messages: Sequence[Message]) -> int:
            for message in messages:
                assert message.error() is None, message.error()
                seen[message.partition() or 0].append(message.offset() or 0)
            return len(messages)

        while not take(source.consume(50, 0.5)):
            assert time.monotonic() < deadline, "no message within 30 s"
        parts = [(topic, 0), (topic, 1)]
        waits = []
        for _ in range(3):  # every resume, not only the first
            source.pause(parts)
            time.sleep(0.1)
            assert source.consume(50, 0.0) == []  # paused: the fetched queue was emptied
            source.resume(parts)
            resumed = time.monotonic()
            got = 0
            while not got and time.monotonic() - resumed < 5:
                got = take(source.consume(50, 0.01))
            waits.append(time.monotonic() - resumed)
            assert got, "nothing fetched within 5 s of the resume"
        assert max(waits) < RESUMED_WITHIN_S, waits
        # The seek is to where the resume would fetch from: nothing again, nothing skipped.
        for offsets in seen.values():
            assert offsets == list(range(len(offsets))), offsets
    finally:
        source.close(10)


def test_a_caught_up_partition_keeps_its_position_across_a_pause(
    kafka_bootstrap: str, topic_factory: Callable[..., str],
) -> None:
    """A seek clears the position until the next message: a caught-up partition is not
    sought, so the commit past trailing transaction markers (`positions`) keeps working."""
    topic = topic_factory(partitions=1)
    produce(kafka_bootstrap, topic, 10, b"x")
    source = subscribed(kafka_bootstrap, topic)
    try:
        deadline = time.monotonic() + 30
        taken = 0
        while taken < 10:
            assert time.monotonic() < deadline, f"{taken} of 10 messages within 30 s"
            taken += len(source.consume(50, 0.5))
        part = (topic, 0)
        assert source.positions([part]) == {part: 10}
        source.pause([part])
        source.resume([part])
        assert source.positions([part]) == {part: 10}
    finally:
        source.close(10)


def test_paused_partitions_high_watermarks_answer_while_the_consumer_fetches(
    kafka_bootstrap: str, topic_factory: Callable[..., str],
) -> None:
    """Review "logs56": asked through the consumer, a paused partition's high watermark
    waited behind the consumer's own fetch of an idle partition (the broker holds it up to
    fetch.wait.max.ms): three lookups in four timed out, the lag went stale and librdkafka
    logged a WARNING about timed-out requests on a healthy cluster."""
    topic = topic_factory(partitions=2)
    produce(kafka_bootstrap, topic, 50, b"x")
    source = subscribed(kafka_bootstrap, topic)
    try:
        deadline = time.monotonic() + 30
        while not source.consume(50, 0.5):
            assert time.monotonic() < deadline, "no message within 30 s"
        source.pause([(topic, 0)])  # the other partition, idle, is fetched (long-polled)
        # The first lookup makes the lookups' client (its metadata, its connection): on a
        # loaded machine that took more than the budget once, answered at the next round.
        source.high_watermarks([(topic, 0)], 5.0)
        answers = []
        for _ in range(10):
            source.consume(50, 0.05)
            answers.append(source.high_watermarks([(topic, 0), (topic, 1)], 1.0))
        ends = {(topic, 0): 0, (topic, 1): 0}
        for tp in ends:
            ends[tp] = max(a[tp] for a in answers)
        assert sum(ends.values()) == 50, ends  # every message counted, on one or the other
        assert all(a == ends for a in answers), answers  # each lookup answered
    finally:
        source.close(10)
