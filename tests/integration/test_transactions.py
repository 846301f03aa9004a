"""A source topic written by transactional producers (review "offsets16").

Each transaction ends in a commit or abort marker the consumer never hands over, and the
records of an aborted transaction are skipped (read_committed). The worker delivers the
committed events only, and commits each partition to its end, past the markers and an
aborted batch at the tail: before, the committed offset stopped at the last marker, a lag
of 1 for ever on every transactional partition, of the whole batch behind an aborted one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from confluent_kafka import Producer

from consumer import codec
from consumer.registry import Registry
from consumer.sandbox import SandboxControl, SandboxThread
from tests.integration.harness import (
    WorkerThread,
    caught_up,
    committed_offsets,
    delivered_seqs,
    end_offsets,
    track_event,
    wait_until,
    worker_env,
)

Sandbox = tuple[SandboxThread, SandboxControl]


def test_aborted_events_are_never_sent_and_commits_reach_past_the_markers(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    sandbox: Sandbox,
) -> None:
    server, control = sandbox
    topic = topic_factory(partitions=2)
    schema_id = Registry(schema_registry_url).register(topic)
    producer = Producer({"bootstrap.servers": kafka_bootstrap,
                         "transactional.id": f"{topic}-tx"})
    producer.init_transactions(30)

    def transaction(events: list[dict[str, Any]], commit: bool) -> None:
        producer.begin_transaction()
        for event in events:
            producer.produce(topic, key=event["userId"].encode(),
                             value=codec.encode(schema_id, codec.to_record(event)))
        producer.flush(30)  # written, so an abort leaves them in the log, skipped
        if commit:
            producer.commit_transaction(30)
        else:
            producer.abort_transaction(30)

    kept = [track_event(f"c{i}", i) for i in range(10)]
    kept2 = [track_event(f"d{i}", 200 + i) for i in range(10)]
    transaction(kept, True)
    transaction([track_event(f"a{i}", 100 + i) for i in range(5)], False)
    transaction(kept2, True)
    transaction([track_event(f"z{i}", 300 + i) for i in range(40)], False)
    # The coordinator writes an abort's markers after the producer's call returns: on a
    # loaded host the first read came before them (52 of the 73 offsets, a CI flake).
    # Read until two reads a second apart agree, past the records alone.
    reads = [end_offsets(kafka_bootstrap, topic)]

    def settled() -> bool:
        reads.append(end_offsets(kafka_bootstrap, topic))
        return reads[-1] == reads[-2] and sum(reads[-1].values()) > len(kept) + len(kept2) + 45

    wait_until(settled, 30, "markers take offsets", interval=1.0)
    ends = reads[-1]
    group = f"{topic}-g"
    with WorkerThread(worker_env(kafka_bootstrap, schema_registry_url, server.url, topic,
                                 group)) as w:
        wait_until(caught_up(kafka_bootstrap, group, topic), 60,
                   f"commits at the log's end, {ends}")
        assert committed_offsets(kafka_bootstrap, group, topic) == ends

        def lags() -> list[float | None]:
            return [w.registry.get_sample_value(
                "userpilot_consumer_lag", {"topic": topic, "partition": str(p)}) for p in ends]

        wait_until(lambda: lags() == [0] * len(ends), 30,
                   "userpilot_consumer_lag 0 on every partition (a series for each)")
        assert w.error is None and w.exit_code is None
    got = delivered_seqs(control)
    assert sorted(got) == sorted((e["userId"], e["properties"]["seq"]) for e in kept + kept2)
    assert set(got.values()) == {1}


def test_records_an_open_transaction_holds_back_show_while_the_lag_reads_0(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    sandbox: Sandbox,
) -> None:
    """Review "tx50": a transaction left open holds its records and every later one (here
    another producer's committed events) back; read_committed, the worker's lag reads 0 and
    it reads nothing. `userpilot_unstable_records` counts them and
    `userpilot_stable_offset_stalled_seconds` rises; once the transaction commits, all are
    delivered and both read 0."""
    server, control = sandbox
    topic = topic_factory(partitions=1)
    schema_id = Registry(schema_registry_url).register(topic)

    def value(event: dict[str, Any]) -> bytes:
        return codec.encode(schema_id, codec.to_record(event))

    open_tx = Producer({"bootstrap.servers": kafka_bootstrap, "transactional.id": f"{topic}-tx",
                        "transaction.timeout.ms": 60000})
    open_tx.init_transactions(30)
    open_tx.begin_transaction()
    for i in range(5):
        open_tx.produce(topic, key=b"u", value=value(track_event(f"a{i}", i)))
    open_tx.flush(30)
    plain = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True})
    for i in range(10):
        plain.produce(topic, key=b"u", value=value(track_event(f"b{i}", 100 + i)))
    plain.flush(30)
    labels = {"topic": topic, "partition": "0"}
    with WorkerThread(worker_env(kafka_bootstrap, schema_registry_url, server.url, topic,
                                 f"{topic}-g", KAFKA_STATISTICS_INTERVAL_MS="1000")) as w:

        def sample(name: str) -> float | None:
            return w.registry.get_sample_value(name, labels)

        wait_until(lambda: (sample("userpilot_unstable_records") or 0) >= 15, 30,
                   "the 15 held records counted")
        first = sample("userpilot_stable_offset_stalled_seconds") or 0.0
        wait_until(lambda: (sample("userpilot_stable_offset_stalled_seconds") or 0) >= first + 2,
                   20, "the stalled time rising")
        assert sample("userpilot_consumer_lag") == 0, "the lag does not count them"
        assert sum(delivered_seqs(control).values()) == 0
        open_tx.commit_transaction(30)
        wait_until(lambda: sum(delivered_seqs(control).values()) == 15, 60, "all delivered")
        wait_until(lambda: sample("userpilot_unstable_records") == 0
                   and sample("userpilot_stable_offset_stalled_seconds") == 0, 30,
                   "nothing held any more")
        assert w.error is None and w.exit_code is None
