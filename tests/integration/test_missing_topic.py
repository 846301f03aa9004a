"""A source topic that does not exist yet (a typo in KAFKA_TOPICS, or a topic created after
its consumer): the worker reads the others, says which one is missing in a gauge the
`UserpilotSourceTopicMissing` alert watches, and reads it once it is created."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from consumer.sandbox import SandboxControl, SandboxThread
from tests.conftest import create_topic, delete_topic
from tests.integration.harness import (
    WorkerThread,
    produce,
    track_event,
    undelivered,
    wait_until,
    worker_env,
)

Sandbox = tuple[SandboxThread, SandboxControl]
GAUGE = "userpilot_source_topic_missing"


def test_a_missing_source_topic_is_gauged_and_read_once_it_is_created(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    sandbox: Sandbox,
) -> None:
    server, control = sandbox
    there = topic_factory(partitions=2)
    missing = f"{there}-later"
    env = worker_env(kafka_bootstrap, schema_registry_url, server.url,
                     f"{there},{missing}", f"{there}-g", USERPILOT_ENSURE_USER="false",
                     KAFKA_DLQ_TOPIC=f"{there}.dlq",
                     # librdkafka's look for new topics, compressed from the worker's 30 s
                     KAFKA_TOPIC_METADATA_REFRESH_INTERVAL_MS="1000")
    first = [track_event(f"a{i}", i) for i in range(20)]
    produce(kafka_bootstrap, schema_registry_url, there, first)
    try:
        with WorkerThread(env) as w:
            wait_until(lambda: not undelivered(control, first), 60,
                       "the existing topic delivered while the other is missing")
            wait_until(lambda: w.metric(GAUGE, topic=missing) == 1, 30,
                       "the missing topic gauged")
            assert w.metric(GAUGE, topic=there) == 0
            create_topic(kafka_bootstrap, missing, 1)
            later = [track_event(f"b{i}", 100 + i) for i in range(10)]
            produce(kafka_bootstrap, schema_registry_url, missing, later)
            wait_until(lambda: not undelivered(control, later), 90,
                       "the topic read once created")
            wait_until(lambda: w.metric(GAUGE, topic=missing) == 0, 90,
                       "the gauge cleared")
            assert w.error is None and w.exit_code is None
    finally:
        with contextlib.suppress(Exception):  # cleanup only: it may not have been created
            delete_topic(kafka_bootstrap, missing)
