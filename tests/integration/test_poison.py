"""No event can stop the worker: poison events between good ones (issue 10).

Each poison event is valid Avro whose JSON text breaks something later: nesting deeper
than Python's recursion limit, JSON text that is not JSON, a lone surrogate (browsers
send it when JavaScript cuts a string inside an emoji). The first two are dead-lettered
with their bytes, the surrogate is replaced and the event delivered, every good event is
delivered once, and the worker is still running at the end.

Needs the worker to dead-letter any exception from decode/route (issue 11's worker).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from consumer import codec
from consumer.registry import Registry
from consumer.sandbox import SandboxControl, SandboxThread
from tests.integration.harness import (
    WorkerThread,
    caught_up,
    delivered_seqs,
    produce,
    produce_raw,
    read_topic,
    track_event,
    wait_until,
    worker_env,
)

Sandbox = tuple[SandboxThread, SandboxControl]


def _wire(schema_id: int, seq: int, properties: str) -> bytes:
    record = codec.to_record(track_event("u-poison", seq))
    record["properties"] = properties
    return codec.encode(schema_id, record)


def test_poison_events_are_dead_lettered_and_the_rest_delivered(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    sandbox: Sandbox,
) -> None:
    server, control = sandbox
    topic = topic_factory(partitions=1)
    before = [track_event(f"u{i % 3}", i) for i in range(10)]
    after = [track_event(f"u{i % 3}", i) for i in range(10, 20)]
    produce(kafka_bootstrap, schema_registry_url, topic, before)
    schema_id = Registry(schema_registry_url).register(topic)
    poison: dict[str, bytes] = {
        "deep": _wire(schema_id, 900, '{"seq":900,"a":' + "[" * 5000 + "]" * 5000 + "}"),
        "not json": _wire(schema_id, 901, '{"seq":901,'),
    }
    surrogate = _wire(schema_id, 902, '{"seq":902,"n":"\\ud83d"}')
    for value in (*poison.values(), surrogate):
        produce_raw(kafka_bootstrap, topic, b"poison", value)
    produce(kafka_bootstrap, schema_registry_url, topic, after)
    group = f"{topic}-g"
    with WorkerThread(worker_env(kafka_bootstrap, schema_registry_url, server.url, topic,
                                 group)) as w:
        wait_until(caught_up(kafka_bootstrap, group, topic), 60, "offsets at the end")
        dlq = w.settings.dlq_topic
        assert w.error is None and w.exit_code is None  # still running
    got = delivered_seqs(control)
    assert all(got[(e["userId"], e["properties"]["seq"])] == 1 for e in before + after)
    assert got[("u-poison", 902)] == 1
    (sent,) = [r["body"] for r in control.requests("/v1/track")
               if r["body"]["metadata"]["seq"] == 902]
    assert sent["metadata"]["n"] == "\ufffd"
    records: list[Any] = read_topic(kafka_bootstrap, dlq)
    assert sorted(m.value() for m in records) == sorted(poison.values())
    for message in records:
        headers = dict(message.headers() or [])
        assert headers["userpilot.error.reason"] in (b"undecodable", b"mapping_error")
        assert headers["__connect.errors.exception.class.name"]
