"""consumer.dlqfetch against the real broker: the original of a value-less dead letter."""

from __future__ import annotations

from collections.abc import Callable

from confluent_kafka import Producer

from consumer.deadletter import (
    VALUE_SHA256,
    Failure,
    dead_letter_record,
    header_value,
    source_of,
)
from consumer.dlqfetch import Original, restore

FAILURE = Failure(reason="retries_exhausted", exception_class="ServerError", message="HTTP 503")


def _produce(bootstrap: str, topic: str, key: bytes, value: bytes,
             headers: list[tuple[str, bytes]]) -> int:
    producer = Producer({"bootstrap.servers": bootstrap})
    offsets: list[int] = []
    producer.produce(topic, key=key, value=value, headers=list(headers),
                     on_delivery=lambda err, msg: offsets.append(msg.offset() or 0))
    assert producer.flush(30) == 0
    return offsets[0]


def test_a_value_less_dead_letter_is_restored_from_the_source_topic(
    kafka_bootstrap: str, topic_factory: Callable[..., str],
) -> None:
    topic = topic_factory(partitions=1)
    value = b"\x00\x00\x00\x00\x01" + b"x" * 50_000
    offset = _produce(kafka_bootstrap, topic, b"user-7", value, [("trace", b"t-1")])
    conf = {"bootstrap.servers": kafka_bootstrap}

    record = dead_letter_record(key=b"user-7", value=value, headers=[("trace", b"t-1")],
                                timestamp_ms=None, topic=topic, partition=0, offset=offset,
                                failure=FAILURE, max_bytes=20_000)
    assert record.value is None and source_of(record.headers) == (topic, 0, offset)

    got = restore(conf, record.key, record.value, record.headers)
    assert isinstance(got, Original)
    assert (got.key, got.value) == (b"user-7", value)
    assert header_value(got.headers, "trace") == b"t-1"

    # Key and original headers omitted too: both come back from the source.
    slim = dead_letter_record(key=b"user-7", value=value, headers=[("trace", b"t" * 3000)],
                              timestamp_ms=None, topic=topic, partition=0, offset=offset,
                              failure=FAILURE, max_bytes=3_000)
    assert slim.key is None
    got = restore(conf, slim.key, slim.value, slim.headers)
    assert isinstance(got, Original)
    assert (got.key, got.value) == (b"user-7", value)
    assert header_value(got.headers, "trace") == b"t-1"


def test_gone_or_different_originals_are_reported_not_replayed(
    kafka_bootstrap: str, topic_factory: Callable[..., str],
) -> None:
    topic = topic_factory(partitions=1)
    value = b"y" * 5_000
    offset = _produce(kafka_bootstrap, topic, b"k", value, [])
    conf = {"bootstrap.servers": kafka_bootstrap}

    past_end = dead_letter_record(key=b"k", value=value, headers=None, timestamp_ms=None,
                                  topic=topic, partition=0, offset=offset + 5,
                                  failure=FAILURE, max_bytes=1_000)
    assert restore(conf, past_end.key, past_end.value, past_end.headers) == "gone"

    record = dead_letter_record(key=b"k", value=value, headers=None, timestamp_ms=None,
                                topic=topic, partition=0, offset=offset, failure=FAILURE,
                                max_bytes=1_000)
    forged = [(k, b"0" * 64 if k == VALUE_SHA256 else v) for k, v in record.headers]
    assert restore(conf, record.key, record.value, forged) == "mismatch"

    missing_topic = dead_letter_record(key=b"k", value=value, headers=None, timestamp_ms=None,
                                       topic=f"{topic}-never-created", partition=0, offset=0,
                                       failure=FAILURE, max_bytes=1_000)
    assert restore(conf, missing_topic.key, missing_topic.value, missing_topic.headers,
                   timeout_s=5) == "gone"

    kept = dead_letter_record(key=b"k", value=b"small", headers=None, timestamp_ms=None,
                              topic=topic, partition=0, offset=offset, failure=FAILURE)
    got = restore(conf, kept.key, kept.value, kept.headers)
    assert isinstance(got, Original) and got.value == b"small"


def test_every_command_builds_its_kafka_clients_in_the_shapes_check_config_validates(
    kafka_bootstrap: str, topic_factory: Callable[..., str],
) -> None:
    """Review config25: settings `check-config` and `run` accept were refused by the other
    commands' clients, built from the raw settings (the start-up check's producer without
    the idempotence `enable.gapless.guarantee` needs; replay's and the original fetch's
    consumers without the worker's 10 s session under a 30 s max.poll.interval.ms, or its
    fetch bounds under a 20 MB receive.message.max.bytes)."""
    from consumer import reach
    from consumer.config import load_settings
    from consumer.replay import Filters, run_replay

    extras = {"KAFKA_ENABLE_GAPLESS_GUARANTEE": "true", "KAFKA_MAX_POLL_INTERVAL_MS": "30000",
              "KAFKA_RECEIVE_MESSAGE_MAX_BYTES": "20000000"}
    topic = topic_factory(partitions=1)
    settings = load_settings({"USERPILOT_API_KEY": "wt_0123456789abcdef",
                              "USERPILOT_ANALYTICS_ENDPOINT": "analytex.userpilot.io",
                              "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
                              "SCHEMA_REGISTRY_URL": "http://127.0.0.1:1",
                              "KAFKA_TOPICS": topic, **extras})  # check-config's own parse
    conf = settings.kafka_config(logger=False)
    assert reach.kafka(conf, 10, [topic], None) is None, "the start-up check's producer"
    offset = _produce(kafka_bootstrap, topic, b"user-7", b"v" * 100, [])
    record = dead_letter_record(key=b"user-7", value=b"v" * 100, headers=[],
                                timestamp_ms=None, topic=topic, partition=0, offset=offset,
                                failure=FAILURE, max_bytes=50)
    got = restore(conf, record.key, record.value, record.headers)
    assert isinstance(got, Original) and got.value == b"v" * 100, "the original's fetch"
    dlq = topic_factory(partitions=1)
    _produce(kafka_bootstrap, dlq, b"user-7", b"v" * 100,
             [(k, v) for k, v in record.headers if v is not None])
    summary = run_replay(conf, dlq, f"{dlq}-replay", Filters(), dry_run=True,
                         report=lambda _: None)
    assert summary.replayed == 1, "replay's consumer"
