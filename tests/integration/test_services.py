"""The project-started Kafka and schema registry behave like the real things the worker uses.

These guard the test infrastructure itself: if they fail, every other integration test's
failure is about the environment, not the worker.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

EVENT_SCHEMA = json.dumps({
    "type": "record",
    "name": "ProbeEvent",
    "namespace": "test.services",
    "fields": [
        {"name": "id", "type": "string"},
        {"name": "count", "type": "int"},
    ],
})


def _consume_all(bootstrap: str, topic: str, expected: int, timeout: float = 30.0) -> list[Any]:
    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": f"g-{uuid.uuid4().hex[:8]}",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
    })
    consumer.subscribe([topic])
    messages: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while len(messages) < expected and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            messages.append(msg)
    finally:
        consumer.close()
    return messages


@pytest.mark.parametrize("unique_topic", [3], indirect=True)
def test_topic_is_created_with_requested_partitions(
    kafka_bootstrap: str, unique_topic: str
) -> None:
    topics = AdminClient({"bootstrap.servers": kafka_bootstrap}).list_topics(timeout=10).topics
    assert unique_topic in topics
    assert sorted(topics[unique_topic].partitions) == [0, 1, 2]


def test_kafka_round_trip_preserves_keys_values_and_order(
    kafka_bootstrap: str, unique_topic: str
) -> None:
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True})
    sent = [(f"user-{i % 3}".encode(), f"value-{i}".encode()) for i in range(20)]
    for key, value in sent:
        producer.produce(unique_topic, key=key, value=value)
    assert producer.flush(30) == 0

    received = _consume_all(kafka_bootstrap, unique_topic, expected=len(sent))

    assert [(m.key(), m.value()) for m in received] == sent
    assert [m.offset() for m in received] == list(range(len(sent)))


def test_committed_offsets_survive_a_new_consumer(kafka_bootstrap: str, unique_topic: str) -> None:
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for i in range(5):
        producer.produce(unique_topic, value=str(i).encode())
    assert producer.flush(30) == 0
    group = f"g-{uuid.uuid4().hex[:8]}"
    config = {"bootstrap.servers": kafka_bootstrap, "group.id": group,
              "auto.offset.reset": "earliest", "enable.auto.commit": False}

    first = Consumer(config)
    first.subscribe([unique_topic])
    got: list[bytes] = []
    deadline = time.monotonic() + 30
    while len(got) < 3 and time.monotonic() < deadline:
        msg = first.poll(0.5)
        if msg is not None and msg.error() is None:
            got.append(msg.value() or b"")
            if len(got) == 3:
                first.commit(message=msg, asynchronous=False)
    first.close()
    assert got == [b"0", b"1", b"2"]

    second = Consumer(config)
    second.subscribe([unique_topic])
    rest: list[bytes] = []
    deadline = time.monotonic() + 30
    while len(rest) < 2 and time.monotonic() < deadline:
        msg = second.poll(0.5)
        if msg is not None and msg.error() is None:
            rest.append(msg.value() or b"")
    second.close()
    assert rest == [b"3", b"4"]


def test_registry_registers_and_fetches_avro_schema_by_id(schema_registry_url: str) -> None:
    client = SchemaRegistryClient({"url": schema_registry_url})
    subject = f"probe-{uuid.uuid4().hex[:8]}-value"

    schema_id = client.register_schema(subject, Schema(EVENT_SCHEMA, "AVRO"))

    assert isinstance(schema_id, int)
    fetched = SchemaRegistryClient({"url": schema_registry_url}).get_schema(schema_id)
    assert fetched.schema_type == "AVRO"
    assert json.loads(fetched.schema_str or "{}")["name"] == "ProbeEvent"
    assert client.register_schema(subject, Schema(EVENT_SCHEMA, "AVRO")) == schema_id
    assert subject in client.get_subjects()
    latest = client.get_latest_version(subject)
    assert (latest.schema_id, latest.version) == (schema_id, 1)


def test_avro_wire_format_round_trip_through_kafka_and_registry(
    kafka_bootstrap: str, schema_registry_url: str, unique_topic: str
) -> None:
    registry = SchemaRegistryClient({"url": schema_registry_url})
    serialize = AvroSerializer(registry, EVENT_SCHEMA)
    record = {"id": "evt-1", "count": 7}
    ctx = SerializationContext(unique_topic, MessageField.VALUE)
    payload = serialize(record, ctx)
    assert payload is not None
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    producer.produce(unique_topic, value=payload)
    assert producer.flush(30) == 0

    [msg] = _consume_all(kafka_bootstrap, unique_topic, expected=1)

    value = msg.value()
    assert value[0] == 0  # Confluent wire format: magic byte, then the 4-byte schema id
    schema_id = int.from_bytes(value[1:5], "big")
    assert registry.get_latest_version(f"{unique_topic}-value").schema_id == schema_id
    fresh_registry = SchemaRegistryClient({"url": schema_registry_url})
    assert AvroDeserializer(fresh_registry)(value, ctx) == record
