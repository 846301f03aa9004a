"""The benchmark's Kafka edge: topics, backlogs, offsets, and the bare consume+decode loop.

The consume+decode loop (workload 1) lives here because it is nothing but a Kafka client
and `codec.decode`: the ceiling any Python worker on this machine can reach.
"""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, cast

import fastavro
from confluent_kafka import (
    Consumer,
    ConsumerGroupState,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from consumer import codec
from consumer.registry import Registry

__all__ = [
    "DrainResult",
    "OffsetProbe",
    "Pacer",
    "committed_total",
    "consume_avro",
    "consume_decode",
    "create_topic",
    "delete_topics",
    "end_total",
    "produce_backlog",
    "register_schema",
]

# Throughput settings for filling a backlog fast; acks=all as in production.
_BULK_PRODUCER = {
    "linger.ms": 50, "batch.num.messages": 10_000, "batch.size": 1_000_000,
    "queue.buffering.max.messages": 500_000, "queue.buffering.max.kbytes": 1_048_576,
    "acks": "all",
}


def create_topic(bootstrap: str, name: str, partitions: int, timeout: float = 30.0) -> str:
    """Create a topic and wait until every partition has a leader."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(name, num_partitions=partitions,
                                  replication_factor=1)])[name].result(timeout=timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        topic = admin.list_topics(topic=name, timeout=5).topics.get(name)
        if (topic is not None and topic.error is None and len(topic.partitions) == partitions
                and all(p.leader >= 0 for p in topic.partitions.values())):
            return name
        time.sleep(0.1)
    raise TimeoutError(f"topic {name} has no leaders after {timeout:.0f} s")


def delete_topics(bootstrap: str, names: Iterable[str]) -> None:
    """Best effort: a benchmark's topics are large, so do not leave them behind."""
    names = list(names)
    if not names:
        return
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.delete_topics(names).values():
        with contextlib.suppress(Exception):  # cleanup only: a stale topic costs disk
            future.result(timeout=30)


def register_schema(registry_url: str, topic: str) -> int:
    """The schema id the worker will resolve for this topic (as `consumer produce` does)."""
    return Registry(registry_url).register(topic)


def produce_backlog(bootstrap: str, topic: str, messages: Iterable[tuple[bytes, bytes]],
                    conf: dict[str, Any] | None = None, partition: int | None = None) -> int:
    """Produce every (key, value) and wait for all acks; returns the count. ``partition``:
    all to that one partition (a hot key range), else by key."""
    producer = Producer({"bootstrap.servers": bootstrap, **_BULK_PRODUCER, **(conf or {})})
    failures: list[str] = []

    def on_delivery(err: Any, _msg: Any) -> None:
        if err is not None:
            failures.append(str(err))

    count = 0
    for key, value in messages:
        while True:
            try:
                if partition is None:
                    producer.produce(topic, value, key, on_delivery=on_delivery)
                else:
                    producer.produce(topic, value, key, partition=partition,
                                     on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.05)
        count += 1
        if count % 10_000 == 0:
            producer.poll(0)
    left = producer.flush(120)
    if left or failures:
        raise RuntimeError(f"backlog on {topic}: {left} unacknowledged, "
                           f"{len(failures)} failed ({failures[:3]})")
    return count


def _partitions(consumer: Consumer, topic: str) -> list[TopicPartition]:
    meta = consumer.list_topics(topic, timeout=10)
    return [TopicPartition(topic, p) for p in meta.topics[topic].partitions]


class OffsetProbe:
    """One long-lived consumer for reading end and committed offsets while a run goes on."""

    def __init__(self, bootstrap: str, group: str, topic: str) -> None:
        self._consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                                   "enable.auto.commit": False})
        self._parts = _partitions(self._consumer, topic)

    def end_total(self) -> int:
        return sum(self._consumer.get_watermark_offsets(tp, timeout=10)[1]
                   for tp in self._parts)

    def committed_total(self) -> int:
        """Sum of committed offsets (0 for partitions without one, or while not ready)."""
        try:
            found = self._consumer.committed(self._parts, timeout=10)
        except KafkaException:
            return 0
        return sum(max(tp.offset, 0) for tp in found)

    def close(self) -> None:
        self._consumer.close()


def end_total(bootstrap: str, topic: str) -> int:
    probe = OffsetProbe(bootstrap, "bench-probe", topic)
    try:
        return probe.end_total()
    finally:
        probe.close()


def committed_total(bootstrap: str, group: str, topic: str) -> int:
    probe = OffsetProbe(bootstrap, group, topic)
    try:
        return probe.committed_total()
    finally:
        probe.close()


@dataclass(frozen=True)
class DrainResult:
    """Messages handled between the first and the last one, and how long that took."""

    count: int
    seconds: float
    cpu_s: float = float("nan")  # this process's CPU time (all threads) over `seconds`

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_us_per_event(self) -> float:
        return 1e6 * self.cpu_s / self.count if self.count else float("nan")


def _ceiling_consumer(bootstrap: str, group_prefix: str, topic: str) -> Consumer:
    """A fresh group's consumer of `topic` with the worker source's librdkafka settings
    (cooperative-sticky, no auto-commit), so the ceilings differ from it only in the
    pipeline. The loops stay in the ceilings themselves: they are what is measured."""
    consumer = Consumer({
        "bootstrap.servers": bootstrap, "group.id": f"{group_prefix}-{time.time_ns()}",
        "enable.auto.commit": False, "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest", "partition.assignment.strategy": "cooperative-sticky",
    })
    consumer.subscribe([topic])
    return consumer


def consume_decode(bootstrap: str, registry_url: str, topic: str, expected: int,
                   timeout_s: float = 300.0) -> DrainResult:
    """Workload 1: a bare group consumer plus `codec.decode`, nothing else.

    Same librdkafka consumer settings as the worker's source (cooperative-sticky, no
    auto-commit, batched `consume`), so the only difference left is the pipeline.
    """
    registry = Registry(registry_url)
    consumer = _ceiling_consumer(bootstrap, "bench-ceiling", topic)
    seen = 0
    first = cpu_first = 0.0
    deadline = time.monotonic() + timeout_s
    try:
        while seen < expected and time.monotonic() < deadline:
            batch = consumer.consume(500, 0.1)
            for message in batch:
                if message.error() is not None:
                    continue
                if seen == 0:
                    first = time.perf_counter()
                    cpu_first = time.process_time()
                codec.decode(message.value(), registry.writer_schema)
                seen += 1
        last = time.perf_counter()
        cpu_last = time.process_time()
    finally:
        consumer.close()
    if seen < expected:
        raise TimeoutError(f"consume+decode saw {seen} of {expected} messages")
    # The first message starts the clock, so it is not counted in the rate.
    return DrainResult(seen - 1, last - first, cpu_last - cpu_first)


def consume_avro(bootstrap: str, registry_url: str, topic: str, expected: int,
                 timeout_s: float = 300.0) -> DrainResult:
    """Workload 1's second ceiling: a bare consumer plus the Avro decode alone.

    The wire header is read and fastavro decodes the record with the writer schema; no
    JSON text field (context, properties, traits) is parsed. The drop path is measured
    against this: an event dropped on its envelope needs no more than this.
    """
    registry = Registry(registry_url)
    consumer = _ceiling_consumer(bootstrap, "bench-avro", topic)
    seen = 0
    first = cpu_first = 0.0
    deadline = time.monotonic() + timeout_s
    try:
        while seen < expected and time.monotonic() < deadline:
            for message in consumer.consume(500, 0.1):
                if message.error() is not None:
                    continue
                if seen == 0:
                    first = time.perf_counter()
                    cpu_first = time.process_time()
                schema_id, body = codec.split_wire(message.value())
                writer = cast(dict[str, Any], registry.writer_schema(schema_id))
                fastavro.schemaless_reader(io.BytesIO(body), writer, None)
                seen += 1
        last = time.perf_counter()
        cpu_last = time.process_time()
    finally:
        consumer.close()
    if seen < expected:
        raise TimeoutError(f"consume+avro saw {seen} of {expected} messages")
    return DrainResult(seen - 1, last - first, cpu_last - cpu_first)


class Pacer:
    """A producer for the latency workload: no batching delay, sends at a steady rate."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self._topic = topic
        self._producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0,
                                   "acks": "all"})

    def send(self, key: bytes, value: bytes) -> None:
        self._producer.produce(self._topic, value, key)
        self._producer.poll(0)

    def paced(self, make: Callable[[int], tuple[bytes, bytes]], count: int,
              rate: float) -> int:
        """Send `make(i)` for i in 1..count at `rate`; each is made just before it is sent,
        so a produce time stamped by `make` is the moment of `produce`."""
        interval = 1.0 / rate
        next_at = time.perf_counter()
        sent = 0
        for i in range(1, count + 1):
            delay = next_at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            self.send(*make(i))
            sent += 1
            next_at += interval
        if self._producer.flush(30):
            raise RuntimeError("latency producer: messages left unacknowledged")
        return sent

    def close(self) -> None:
        self._producer.flush(10)


def group_stable(bootstrap: str, group: str, members: int) -> bool:
    """The group has settled: `members` members, each with partitions, no rebalance under way."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    try:
        found = admin.describe_consumer_groups([group], request_timeout=5)[group].result(
            timeout=10)
    except KafkaException:
        return False
    return bool(found.state == ConsumerGroupState.STABLE and len(found.members) == members
                and all(m.assignment.topic_partitions for m in found.members))

