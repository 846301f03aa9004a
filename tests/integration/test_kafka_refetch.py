"""librdkafka#5586 on the real broker: a new assignment whose committed offsets were refused
for the whole request (NOT_COORDINATOR, no partitions) is never fetched by librdkafka; the
worker notices from the statistics and assigns it again (`consumer.kafka._watch_fetchers`).

The trigger comes from `KafkaProxy` between the worker and the shared broker: it answers the
group's first OffsetFetch requests itself, as a broker does while the coordinator moves.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from consumer.kafka import FETCHLESS_S
from consumer.sandbox import SandboxControl, SandboxThread
from tests.integration.harness import (
    WorkerProcess,
    caught_up,
    delivered_seqs,
    free_port,
    produce,
    scrape,
    track_event,
    undelivered,
    value,
    wait_until,
    worker_env,
)
from tests.integration.kafkaproxy import KafkaProxy

Sandbox = tuple[SandboxThread, SandboxControl]
STATS_S = 5.0  # the worker's statistics.interval.ms: detection waits for whole reports
NEVER_FETCHED = "librdkafka never started fetching"


@pytest.fixture
def kafka_proxy(kafka_bootstrap: str) -> Iterator[KafkaProxy]:
    with KafkaProxy(kafka_bootstrap) as proxy:
        yield proxy


def test_assignment_whose_offset_fetch_was_refused_is_assigned_again_and_delivered_once(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    sandbox: Sandbox, kafka_proxy: KafkaProxy, tmp_path: Path,
) -> None:
    server, control = sandbox
    topic = topic_factory(partitions=4)
    events = [track_event(f"u{i % 5}", i) for i in range(100)]
    produce(kafka_bootstrap, schema_registry_url, topic, events)
    group = f"{topic}-g"
    # The worker's own read of the commit notes and librdkafka's OffsetFetch for the
    # assignment both follow the assignment at once; both are refused (the notes are asked
    # for again after 1 s, past the window, and then answered).
    kafka_proxy.fail_offset_fetch(group, count=2, window_s=0.5)
    port = free_port()
    env = worker_env(kafka_proxy.bootstrap, schema_registry_url, server.url, topic, group,
                     WORKER_METRICS_PORT=str(port))
    worker = WorkerProcess(env, tmp_path / "worker.log")
    try:
        wait_until(lambda: len(kafka_proxy.refused) >= 2, 30,
                   "the assignment's OffsetFetch refused")
        refused_at = kafka_proxy.refused[0].at  # just after the assignment
        assert {r.group for r in kafka_proxy.refused} == {group}
        # Detection: FETCHLESS_S of steady "none" states, seen in whole statistics reports.
        wait_until(lambda: not undelivered(control, events), FETCHLESS_S + 2 * STATS_S + 10,
                   f"every event delivered (worker log {worker.log_path})")
        took = time.monotonic() - refused_at
        assert took >= FETCHLESS_S - 1, (
            f"delivered {took:.1f} s after the refusal: the trigger did not stall the fetch")
        wait_until(caught_up(kafka_bootstrap, group, topic), 20, "offsets committed at the end")
        refetched = value(scrape(port)[1], "userpilot_rebalances_total", kind="refetch")
        assert refetched is not None and refetched >= 1
    finally:
        code = worker.terminate(60)
    assert code == 0, worker.output()[-3000:]
    got = delivered_seqs(control)
    assert got == {(e["userId"], e["properties"]["seq"]): 1 for e in events}, (
        "every event exactly once")
    output = worker.output()
    assert NEVER_FETCHED in output, output[-3000:]
