"""`produce` round-trips canonical JSON through Kafka and the registry (issue: foundation)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition

from consumer import codec
from consumer.registry import Registry
from tests.integration.harness import REPO

FIXTURE = [
    {"type": "track", "event": "Order Completed", "userId": "user_98765",
     "anonymousId": "anon_a1b2c3d4",
     "properties": {"order_id": "ORD-1234", "total": 129.99, "currency": "USD",
                    "products": [{"product_id": "SKU-001", "name": "Wireless Headphones",
                                  "price": 79.99, "quantity": 1},
                                 {"product_id": "SKU-002", "name": "Ünïcødé ✓ 東京",
                                  "price": 0.1, "quantity": 2, "tags": ["a", None, 3]}],
                    "big": 123456789012345678901234567890, "negative": -(2**70),
                    "nothing": None, "flag": False, "nested": {"a": {"b": {"c": [1.5, {}]}}}},
     "context": {"page": {"url": "https://x.test/é", "path": "/checkout", "referrer": "",
                          "title": "Checkout", "search": ""},
                 "device": {"type": "desktop"}, "campaign": {"source": "google"},
                 "locale": "en-US", "ip": "203.0.113.42", "userAgent": "Mozilla/5.0",
                 "timezone": "Europe/London",
                 "consent": {"canonical": {"analytics": True}, "categories": ["C0001"]},
                 "library": {"name": "datafly.js", "version": "2.1.0"}},
     "timestamp": "2026-02-25T14:30:00.000Z", "messageId": "a1b2c3d4-e5f6",
     "receivedAt": "2026-02-25T14:30:00.120Z", "sentAt": "2026-02-25T14:29:59.990Z"},
    {"type": "page", "name": "Pricing", "anonymousId": "anon_only",
     "properties": {"url": "https://x.test/pricing"}, "messageId": "p-1"},
    {"type": "identify", "userId": "user_001", "traits": {"name": "Jane Doe", "plan": "pro",
                                                          "seats": 2**63}},
    {"type": "group", "userId": "user_001", "groupId": "acme", "traits": {}},
]


def _consume_all(bootstrap: str, topic: str, count: int) -> list[tuple[bytes | None, bytes]]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"{topic}-reader",
                         "auto.offset.reset": "earliest"})
    try:
        consumer.assign([TopicPartition(topic, 0, 0)])
        out: list[tuple[bytes | None, bytes]] = []
        for _ in range(60):
            for msg in consumer.consume(100, 0.5):
                value = msg.value()
                if msg.error() is None and value is not None:
                    out.append((msg.key(), value))
            if len(out) >= count:
                break
        return out
    finally:
        consumer.close()


def _records_on(bootstrap: str, topic: str) -> int:
    """How many records partition 0 holds: its high watermark, read from the broker at once
    (consuming an empty topic to show it is empty waited out a 30 s loop)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"{topic}-reader"})
    try:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
        return int(high - low)
    finally:
        consumer.close()


def _produce(bootstrap: str, registry: str, topic: str, fixture: Path
             ) -> subprocess.CompletedProcess[str]:
    """`python -m consumer produce --topic T --file F`, as the README shows it."""
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "SCHEMA_REGISTRY_URL": registry}
    return subprocess.run([sys.executable, "-m", "consumer", "produce", "--topic", topic,
                           "--file", str(fixture)], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_produce_round_trips_the_fixture_to_identical_json(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    tmp_path: Path,
) -> None:
    topic = topic_factory(partitions=1)
    fixture = tmp_path / "events.jsonl"
    fixture.write_text("\n".join(json.dumps(e, ensure_ascii=False) for e in FIXTURE) + "\n",
                       encoding="utf-8")
    done = _produce(kafka_bootstrap, schema_registry_url, topic, fixture)
    assert done.returncode == 0, done.stderr
    assert f"produced {len(FIXTURE)} events" in done.stderr

    assert _records_on(kafka_bootstrap, topic) == len(FIXTURE)  # what the refusals read
    messages = _consume_all(kafka_bootstrap, topic, len(FIXTURE))
    registry = Registry(schema_registry_url)
    decoded = [codec.decode(value, registry.writer_schema) for _, value in messages]
    assert decoded == FIXTURE
    assert [key for key, _ in messages] == [b"user_98765", b"anon_only", b"user_001",
                                            b"user_001"]
    assert all(value[0] == 0 for _, value in messages), "Confluent magic byte"


def test_produce_refuses_a_file_with_a_bad_line_and_sends_nothing(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    tmp_path: Path,
) -> None:
    topic = topic_factory(partitions=1)
    fixture = tmp_path / "bad.jsonl"
    fixture.write_text(json.dumps(FIXTURE[0]) + "\n{not json\n"
                       + json.dumps({"type": "track", "userId": 7}) + "\n", encoding="utf-8")
    done = _produce(kafka_bootstrap, schema_registry_url, topic, fixture)
    assert done.returncode == 1
    assert "bad.jsonl:2" in done.stderr and "bad.jsonl:3" in done.stderr
    assert "userId" in done.stderr and "nothing was sent" in done.stderr
    assert _records_on(kafka_bootstrap, topic) == 0


def test_produce_refuses_a_file_with_a_record_over_the_producer_limit_and_sends_nothing(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    tmp_path: Path,
) -> None:
    """Review "events28": 3,000 good lines then one of 1.1 MB sent the 3,000, then stopped
    with a traceback (MSG_SIZE_TOO_LARGE); a re-run after the fix duplicated them."""
    topic = topic_factory(partitions=1)
    fixture = tmp_path / "big.jsonl"
    big = {**FIXTURE[0], "properties": {"s": "x" * 1_100_000}}
    fixture.write_text(json.dumps(FIXTURE[0]) + "\n" + json.dumps(big) + "\n",
                       encoding="utf-8")
    done = _produce(kafka_bootstrap, schema_registry_url, topic, fixture)
    assert done.returncode == 1, done.stderr
    assert "big.jsonl:2" in done.stderr and "nothing was sent" in done.stderr
    assert "Traceback" not in done.stderr
    assert _records_on(kafka_bootstrap, topic) == 0


def test_produce_stopped_by_a_signal_says_how_many_were_sent_and_acknowledged(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    tmp_path: Path,
) -> None:
    """Review "cli50": interrupted mid-send, `produce` said nothing of the tens of thousands
    of events already on the topic (SIGTERM: exit 143, no line; SIGINT inside the Kafka
    client's poll: a SystemError traceback). A stop signal now ends the sending between
    records; what went is waited for and counted, and the count is what the topic holds."""
    topic = topic_factory(partitions=1)
    fixture = tmp_path / "many.jsonl"
    line = json.dumps({"type": "track", "event": "x", "userId": "u", "properties": {}})
    fixture.write_text((line + "\n") * 20_000, encoding="utf-8")
    # Slow sending, not a big input: 400,000 lines took 19-23 s to read before the first
    # record went on a loaded machine, and the wait for it ran out (review "flaky57").
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
           "SCHEMA_REGISTRY_URL": schema_registry_url,
           "KAFKA_QUEUE_BUFFERING_MAX_MESSAGES": "5", "KAFKA_LINGER_MS": "20"}
    proc = subprocess.Popen([sys.executable, "-m", "consumer", "produce", "--topic", topic,
                             "--file", str(fixture)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        consumer = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": f"{topic}-w"})
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:  # until records reach the topic
                _, high = consumer.get_watermark_offsets(TopicPartition(topic, 0), 5)
                if high > 0 or proc.poll() is not None:
                    break
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=120)
            _, high = consumer.get_watermark_offsets(TopicPartition(topic, 0), 5)
        finally:
            consumer.close()
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    said = re.search(r"interrupted: (\d+) of the 20000 events were sent and acknowledged, "
                     r"0 failed, 0 unacknowledged; the other (\d+) were not sent", err)
    assert said is not None, err
    assert int(said[1]) == high and 0 < high < 20_000


@pytest.mark.parametrize("when", ["the queue is full", "the final flush waits"])
def test_produce_stops_on_a_signal_however_it_waits(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    monkeypatch: pytest.MonkeyPatch, when: str,
) -> None:
    """Review "diff50c": with the producer's queue full (a broker gone away) `produce` looped
    on BufferError until the client's 300 s message timeout, signals and all; a signal
    during the final wait for acknowledgements gave exit 1 and no count. Both now end as any
    interruption does: what went is counted (the real Kafka and registry are probed and the
    schema registered; the producer is a stand-in that never acknowledges)."""
    import io

    import consumer.kafka
    from consumer.produce import produce_events

    signalled: list[int] = []

    class NeverAcks:
        def produce(self, *_a: Any, **_k: Any) -> None:
            if when == "the queue is full":
                signalled.append(2)  # Ctrl-C while the queue is full
                raise BufferError("Local: Queue full")

        def poll(self, timeout: float = 0) -> int:
            time.sleep(timeout)
            return 0

        def flush(self, timeout: float = 0) -> int:
            signalled.append(15)  # a SIGTERM while it waits
            time.sleep(min(timeout, 0.2))
            return 0 if when == "the queue is full" else 20

    monkeypatch.setattr(consumer.kafka, "make_producer", lambda conf: NeverAcks())
    line = json.dumps({"type": "track", "event": "x", "userId": "u", "properties": {}})
    out = io.StringIO()
    started = time.monotonic()
    sent = produce_events([line] * 20, topic=topic_factory(partitions=1),
                          bootstrap=kafka_bootstrap, registry_url=schema_registry_url, out=out,
                          timeout=5, stopping=lambda: bool(signalled))
    assert sent == 0 and time.monotonic() - started < 15
    expected = ("0 unacknowledged; the other 20 were not sent" if when == "the queue is full"
                else "20 unacknowledged; the other 0 were not sent")
    assert "interrupted: 0 of the 20 events were sent and acknowledged" in out.getvalue()
    assert expected in out.getvalue(), out.getvalue()
