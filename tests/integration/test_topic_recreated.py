"""A source topic deleted and created again, shorter, under a running worker (review "kafka18").

librdkafka keeps the old log's position until the new log is read up to it. Trusted on the
commit path (which moves the commit past transaction markers to the consumer's position),
it named the rest of the old log finished on the new one: the worker committed the old
log's end on a log of a few records, and after the next restart the records written below
that offset meanwhile were skipped, never delivered and never reported.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from consumer import codec
from consumer.registry import Registry
from consumer.sandbox import SandboxControl, SandboxThread
from tests.conftest import create_topic, delete_topic
from tests.integration.harness import (
    WorkerThread,
    caught_up,
    committed_offsets,
    end_offsets,
    track_event,
    undelivered,
    wait_until,
    worker_env,
)

Sandbox = tuple[SandboxThread, SandboxControl]
PARTITIONS = 3


def _produce(bootstrap: str, registry: str, topic: str,
             events: list[dict[str, object]], partition: int | None = None) -> None:
    schema_id = Registry(registry).register(topic)
    producer = Producer({"bootstrap.servers": bootstrap})
    for event in events:
        value = codec.encode(schema_id, codec.to_record(event))
        key = str(event["userId"]).encode()
        if partition is None:
            producer.produce(topic, key=key, value=value)
        else:
            producer.produce(topic, key=key, value=value, partition=partition)
    assert producer.flush(30) == 0


def test_a_topic_created_again_shorter_is_committed_at_its_own_end_and_loses_nothing(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    sandbox: Sandbox,
) -> None:
    server, control = sandbox
    topic = topic_factory(partitions=PARTITIONS)
    group = f"{topic}-g"
    env = worker_env(kafka_bootstrap, schema_registry_url, server.url, topic, group,
                     USERPILOT_ENSURE_USER="false")
    _produce(kafka_bootstrap, schema_registry_url, topic,
             [track_event(f"old{i}", i) for i in range(60)])
    with WorkerThread(env) as w:
        wait_until(caught_up(kafka_bootstrap, group, topic), 60, "the old log committed")
        delete_topic(kafka_bootstrap, topic)
        admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
        wait_until(lambda: topic not in admin.list_topics(timeout=5).topics, 30,
                   "the topic deleted")
        time.sleep(1)
        create_topic(kafka_bootstrap, topic, PARTITIONS)
        new = [track_event(f"new{i}", 1000 + i) for i in range(3 * PARTITIONS)]
        _produce(kafka_bootstrap, schema_registry_url, topic, new)
        ends = end_offsets(kafka_bootstrap, topic)
        wait_until(lambda: not undelivered(control, new), 60, "the new log delivered")
        wait_until(lambda: committed_offsets(kafka_bootstrap, group, topic) == ends, 30,
                   f"commits at the new log's end {ends}")
        time.sleep(3)  # commits past the end came on later passes
        assert committed_offsets(kafka_bootstrap, group, topic) == ends
        assert w.error is None and w.exit_code is None
    # A restart (a deploy); upstream produced meanwhile.
    later = {p: [track_event(f"later{p}-{i}", 5000 + 100 * p + i) for i in range(25)]
             for p in range(PARTITIONS)}
    for p, events in later.items():
        _produce(kafka_bootstrap, schema_registry_url, topic, events, partition=p)
    with WorkerThread(env):
        wait_until(caught_up(kafka_bootstrap, group, topic), 60, "the later events committed")
    lost = {p: len(undelivered(control, events)) for p, events in later.items()}
    assert lost == dict.fromkeys(range(PARTITIONS), 0), f"never delivered, per partition: {lost}"


def test_offsets_removed_before_they_were_read_are_counted_and_a_commit_past_the_end_told(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    sandbox: Sandbox, caplog: pytest.LogCaptureFixture,
) -> None:
    """Review "topo53": a committed offset below the log's start (retention removed the
    backlog's head; the same reset follows a resume past a backlog retention removed) is
    restarted at the log's start by librdkafka, whose only trace was a WARNING rate-limited
    with the topic's others; a commit past the log's end (a log replaced while the workers
    were stopped) left no trace at all. Partition 0: committed at 2, records below 17
    deleted: 15 offsets skipped. Partition 1: committed at 120, its log ends at 20."""
    server, control = sandbox
    topic = topic_factory(partitions=2)
    group = f"{topic}-g"
    events = {p: [track_event(f"u{p}-{i}", 100 * p + i) for i in range(20)] for p in (0, 1)}
    for p, batch in events.items():
        _produce(kafka_bootstrap, schema_registry_url, topic, batch, partition=p)
    committer = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group})
    committer.commit(offsets=[TopicPartition(topic, 0, 2), TopicPartition(topic, 1, 120)],
                     asynchronous=False)
    committer.close()
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    for future in admin.delete_records([TopicPartition(topic, 0, 17)]).values():
        future.result(30)
    env = worker_env(kafka_bootstrap, schema_registry_url, server.url, topic, group,
                     USERPILOT_ENSURE_USER="false")
    with caplog.at_level(logging.WARNING), WorkerThread(env) as w:
        wait_until(lambda: committed_offsets(kafka_bootstrap, group, topic) == {0: 20, 1: 20},
                   60, "both partitions committed at their ends")
        assert w.metric("userpilot_skipped_offsets_total", topic=topic) == 15
        assert w.metric("userpilot_log_resets_total", topic=topic) == 1
    assert undelivered(control, events[0][17:] + events[1]) == []
    assert len(undelivered(control, events[0][:17])) == 17
    lines = [r.getMessage() for r in caplog.records]
    assert any(f"{topic}[0] lost offsets 2 to 16" in line for line in lines), lines
    assert any(f"{topic}[1]: its committed offset 120 is past the end" in line
               for line in lines), lines
