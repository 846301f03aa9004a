"""The oversized-dead-letter decision against the real producer and broker (issue 14).

The estimate in consumer.deadletter must never call a record small enough when librdkafka
or the broker refuses it, and the value-less record it falls back to must be accepted.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import pytest
from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from consumer.deadletter import (
    DlqRecord,
    Failure,
    dead_letter_record,
    producer_limit,
    without_value,
)

FAILURE = Failure(reason="retries_exhausted", exception_class="ServerError",
                  message="HTTP 503: Userpilot error (transient)", status=503,
                  body='{"errors":[{"error":"down"}]}' * 30, attempts=12)
ORIGINAL = [("traceparent", b"00-" + b"a" * 50), ("source", b"signal")]


def _send(conf: dict[str, str], topic: str, record: DlqRecord) -> KafkaError | None:
    """Produce one record; the error (local or from the broker), or None when acked."""
    producer = Producer(conf)
    errors: list[KafkaError | None] = []
    try:
        producer.produce(topic, key=record.key, value=record.value, headers=list(record.headers),
                         on_delivery=lambda err, _msg: errors.append(err))
    except KafkaException as exc:
        return exc.args[0]  # type: ignore[no-any-return]
    producer.flush(30)
    assert len(errors) == 1
    return errors[0]


def _record(value: bytes, topic: str, max_bytes: int) -> DlqRecord:
    return dead_letter_record(key=b"user-42", value=value, headers=ORIGINAL, timestamp_ms=None,
                              topic=topic, partition=0, offset=7, failure=FAILURE,
                              max_bytes=max_bytes)


def test_near_the_producer_limit_the_estimate_is_never_too_optimistic(
    kafka_bootstrap: str, topic_factory: Callable[..., str],
) -> None:
    dlq = topic_factory(partitions=1)
    conf = {"bootstrap.servers": kafka_bootstrap}
    limit = producer_limit(conf)
    full = _record(b"v" * (limit - 100), dlq, max_bytes=10 * limit)  # the old behaviour
    err = _send(conf, dlq, full)
    assert err is not None and err.code() == KafkaError.MSG_SIZE_TOO_LARGE

    decided = _record(b"v" * (limit - 100), dlq, max_bytes=limit)
    assert decided.value is None
    assert _send(conf, dlq, decided) is None

    # Around the boundary: whenever the estimate keeps the value, the producer takes it.
    overhead = _record(b"", dlq, max_bytes=limit).size
    kept = 0
    for value_size in range(limit - overhead - 300, limit - overhead + 300, 50):
        record = _record(b"v" * value_size, dlq, max_bytes=limit)
        if record.value is not None:
            kept += 1
            assert _send(conf, dlq, record) is None, value_size
    assert kept >= 5  # the sweep did cover records that keep their value


def test_a_dlq_topic_with_a_lower_limit_gets_the_value_less_record(
    kafka_bootstrap: str,
) -> None:
    """The broker refuses what the producer let through: the worker then sends
    `without_value(record)` (the MSG_SIZE_TOO_LARGE fallback)."""
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    dlq = f"it-dlq-small-{int(time.time() * 1000)}"
    futures = admin.create_topics([NewTopic(dlq, 1, 1, config={"max.message.bytes": "50000"})])
    futures[dlq].result(30)
    try:
        conf = {"bootstrap.servers": kafka_bootstrap}
        record = _record(b"v" * 200_000, dlq, max_bytes=producer_limit(conf))
        assert record.value is not None  # fits the producer's limit...
        err = _send(conf, dlq, record)
        assert err is not None and err.code() == KafkaError.MSG_SIZE_TOO_LARGE  # ...not the topic's
        assert _send(conf, dlq, without_value(record)) is None
        # Knowing the topic's limit up front decides it before any produce.
        assert _record(b"v" * 200_000, dlq,
                       max_bytes=producer_limit(conf, topic_limit=50_000)).value is None
    finally:
        admin.delete_topics([dlq])[dlq].result(30)


def test_a_record_over_the_dlq_topics_segment_size_is_too_large_not_retried(
    kafka_bootstrap: str,
) -> None:
    """Review "big43": a DLQ topic whose `segment.bytes` is below the record (its
    `max.message.bytes` above it) answers RECORD_LIST_TOO_LARGE, which the producer took
    for a passing error: the same bytes were retried every 30 s for ever, the partition
    stalled, where the value-less record fits."""
    import asyncio

    from consumer.errors import DlqRecordTooLarge
    from consumer.kafka import DeadLetterProducer

    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    dlq = f"it-dlq-segment-{int(time.time() * 1000)}"
    futures = admin.create_topics([NewTopic(dlq, 1, 1, config={
        "max.message.bytes": "3000000", "segment.bytes": "1048576"})])
    futures[dlq].result(30)

    async def send(value: bytes) -> None:
        producer = DeadLetterProducer({"bootstrap.servers": kafka_bootstrap,
                                       "message.max.bytes": 3_000_000})
        try:
            await asyncio.wait_for(producer.send(dlq, key=b"k", value=value, headers=[]), 60)
        finally:
            producer.close(5)

    try:
        with pytest.raises(DlqRecordTooLarge, match=r"(?i)segment|too large"):
            asyncio.run(send(os.urandom(2_000_000)))  # incompressible
        asyncio.run(send(b"v" * 1000))  # the value-less record's size goes
    finally:
        admin.delete_topics([dlq])[dlq].result(30)


@pytest.mark.parametrize("size", [0, 1])
def test_small_dead_letters_keep_everything(
    kafka_bootstrap: str, topic_factory: Callable[..., str], size: int,
) -> None:
    dlq = topic_factory(partitions=1)
    conf = {"bootstrap.servers": kafka_bootstrap}
    record = _record(b"v" * size, dlq, max_bytes=producer_limit(conf))
    assert record.value == b"v" * size and record.key == b"user-42"
    assert _send(conf, dlq, record) is None


def test_dead_letters_that_each_fit_the_dlq_topic_are_not_refused_for_sharing_a_batch(
    kafka_bootstrap: str,
) -> None:
    """The broker checks a topic's max.message.bytes per batch: six 200 KB dead letters
    written together were refused as one batch and all rewritten without their value,
    though each fits alone. The DLQ producer now puts one record in a batch."""
    import asyncio
    import os

    from consumer.kafka import DeadLetterProducer

    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    dlq = f"it-dlq-batch-{int(time.time() * 1000)}"
    admin.create_topics([NewTopic(dlq, 1, 1, config={"max.message.bytes": "300000"})])[
        dlq].result(30)
    producer = DeadLetterProducer({"bootstrap.servers": kafka_bootstrap})

    async def main() -> list[BaseException | None]:
        results = await asyncio.gather(*(
            producer.send(dlq, key=b"k", value=os.urandom(200_000), headers=[])
            for _ in range(6)), return_exceptions=True)
        return list(results)

    try:
        assert asyncio.run(main()) == [None] * 6
    finally:
        producer.close(10)
        admin.delete_topics([dlq])[dlq].result(30)
