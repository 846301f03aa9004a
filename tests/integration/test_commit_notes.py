"""Commit notes on a real broker: a commit names the offsets finished above it (its
metadata), the partition's next owner reads them back and skips those events; a broker
that refuses the metadata gets commits without it. And end to end: a SIGTERM while one
user's event waits out retries below delivered ones re-sends only that event."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError, TopicPartition

from consumer.kafka import KafkaSource
from consumer.offsets import Finished, encode_note
from consumer.sandbox import SandboxControl, SandboxThread
from tests.integration.harness import (
    WorkerProcess,
    caught_up,
    committed_offsets,
    delivered_seqs,
    produce,
    track_event,
    undelivered,
    wait_until,
    worker_env,
)

Sandbox = tuple[SandboxThread, SandboxControl]


def source(bootstrap: str, group: str, topic: str) -> KafkaSource:
    def ignore(_parts: list[tuple[str, int]]) -> None:
        return None

    return KafkaSource({"bootstrap.servers": bootstrap, "group.id": group}, [topic],
                       on_assign=ignore, on_revoke=ignore, on_lost=ignore)


def test_a_commits_note_is_read_back_by_the_next_owner(
    kafka_bootstrap: str, topic_factory: Callable[..., str],
) -> None:
    topic = topic_factory(partitions=2)
    group = f"{topic}-g"
    first = source(kafka_bootstrap, group, topic)
    try:
        note = encode_note(5, [(6, 9), (12, 12)])
        assert first.commit({(topic, 0): 5, (topic, 1): 3}, notes={(topic, 0): note})
    finally:
        first.close(10)
    second = source(kafka_bootstrap, group, topic)
    try:
        ahead, unanswered = second.finished_ahead([(topic, 0), (topic, 1)], 10)
    finally:
        second.close(10)
    assert ahead == {(topic, 0): Finished([(6, 9), (12, 12)])}  # partition 1: no note
    assert unanswered == []
    assert committed_offsets(kafka_bootstrap, group, topic) == {0: 5, 1: 3}


def test_a_broker_refusing_the_note_gets_the_commit_without_it(
    kafka_bootstrap: str, topic_factory: Callable[..., str], caplog: pytest.LogCaptureFixture,
) -> None:
    """Brokers cap commit metadata (offset.metadata.max.bytes, 4,096 by default; our notes
    stay under 1,000). One that refuses it must not stop the offsets being committed."""
    topic = topic_factory(partitions=1)
    group = f"{topic}-g"
    first = source(kafka_bootstrap, group, topic)
    try:
        too_long = "upf1:7:" + "A" * 8000  # over any default limit
        first.note_limit = 9000  # as if our notes could be that long: the broker refuses it
        assert first.commit({(topic, 0): 7}, notes={(topic, 0): too_long})
        assert first.note_limit == len(too_long) // 2  # cut from now on, not turned off
        assert first.commit({(topic, 0): 8}, notes={(topic, 0): too_long})  # none sent now
        answer = first._consumer.committed([TopicPartition(topic, 0)], timeout=10)
        short = encode_note(9, [(11, 20)])
        assert first.commit({(topic, 0): 9}, notes={(topic, 0): short})
        later = first._consumer.committed([TopicPartition(topic, 0)], timeout=10)
    finally:
        first.close(10)
    assert answer[0].offset == 8 and not answer[0].metadata
    assert later[0].offset == 9 and later[0].metadata == short
    assert "offset.metadata.max.bytes" in caplog.text
    assert KafkaError.OFFSET_METADATA_TOO_LARGE  # the code this is about


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_with_one_event_retrying_below_delivered_ones_resends_only_it(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    sandbox: Sandbox, tmp_path: Path, stop: signal.Signals,
) -> None:
    """One user's event waits out 503s at offset 0 while 150 events of other users after it
    are delivered. A SIGTERM abandons it (it is not on the wire) and commits offset 0 with
    a note naming the 150; the next owner sends the one abandoned event and nothing else.
    Without the note the next owner sent all 150 again. A hang-up (a closed terminal) is the
    same clean stop: without a handler it killed the worker before its final commit (review
    "cli50")."""
    server, control = sandbox
    topic = topic_factory(partitions=1)
    events: list[dict[str, Any]] = [track_event("stuck", 0)]
    events += [track_event(f"u{i % 30}", i) for i in range(1, 151)]
    produce(kafka_bootstrap, schema_registry_url, topic, events)
    control.set_faults(rules=[{"user_id": "stuck", "action": "503", "times": None}])
    group = f"{topic}-g"
    env = worker_env(kafka_bootstrap, schema_registry_url, server.url, topic, group,
                     USERPILOT_RETRY_MAX_ATTEMPTS="1000", USERPILOT_RETRY_BACKOFF_SECONDS="0.3",
                     USERPILOT_RETRY_BACKOFF_MAX_SECONDS="0.3", USERPILOT_ENSURE_USER="false")
    first = WorkerProcess(env, tmp_path / "first.log")
    wait_until(lambda: len(control.requests("/v1/track")) >= 150, 60,
               "the 150 events after the stuck one")
    assert first.terminate(sig=stop) == 0, first.output()
    assert committed_offsets(kafka_bootstrap, group, topic) == {0: 0}
    control.set_faults(rules=[])
    second = WorkerProcess(env, tmp_path / "second.log")
    try:
        wait_until(caught_up(kafka_bootstrap, group, topic), 60, "offsets at the end")
    finally:
        assert second.terminate() == 0, second.output()
    seen = delivered_seqs(control)
    assert not undelivered(control, events)
    assert max(seen.values()) == 1, sorted(k for k, n in seen.items() if n > 1)[:10]
    assert "finished 150 events above their commits" in second.output()
