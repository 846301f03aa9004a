"""A producer's own evolution of the Signal schema, compatible with it, through the real
registry: ids annotated as `uuid`, and a field of a type that contains itself. Before, the
first had every event dropped as anonymous (fastavro handed over uuid.UUID objects), and
one deep event of the second killed the worker with SIGSEGV, on every restart."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, cast

import fastavro

from consumer import codec
from consumer.sandbox import SandboxControl, SandboxThread
from tests.integration.harness import (
    WorkerThread,
    caught_up,
    delivered_seqs,
    produce_raw,
    read_topic,
    track_event,
    wait_until,
    worker_env,
)
from tests.integration.test_schema_references import _register

Sandbox = tuple[SandboxThread, SandboxControl]


def test_an_evolved_writer_schema_delivers_and_a_deep_event_is_dead_lettered(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    sandbox: Sandbox,
) -> None:
    server, control = sandbox
    topic = topic_factory(partitions=1)
    writer: dict[str, Any] = json.loads(codec.SCHEMA_TEXT)
    uuid_string = ["null", {"type": "string", "logicalType": "uuid"}]
    for field in writer["fields"]:
        if field["name"] in ("userId", "messageId"):
            field["type"] = uuid_string
    node = {"type": "record", "name": "Node",
            "fields": [{"name": "next", "type": ["null", "Node"], "default": None}]}
    writer["fields"].append({"name": "trail", "type": ["null", node], "default": None})
    schema_id = _register(schema_registry_url, f"{topic}-value", writer)
    parsed = cast(dict[str, Any], fastavro.parse_schema(json.loads(json.dumps(writer))))
    users = ["6f1c2a9e-4b1d-4c3e-9a7b-2d5e8f0a1b2c", "0b9e1f6a-2c3d-4e5f-8a9b-1c2d3e4f5a6b",
             "9d8c7b6a-5f4e-4d3c-8b2a-1f0e9d8c7b6a"]
    events = [track_event(user, i) for i, user in enumerate(users)]
    wires = [codec.encode(schema_id, {**codec.to_record(e), "trail": None}, parsed)
             for e in events]
    # The middle one nests the trail 100,000 levels deep (one byte per level, the trail
    # being the last field): a 100 KB message.
    wires[1] = wires[1][:-1] + b"\x02" * 100_000 + b"\x00"
    for user, wire in zip(users, wires, strict=True):
        produce_raw(kafka_bootstrap, topic, user.encode(), wire)
    group = f"{topic}-g"
    with WorkerThread(worker_env(kafka_bootstrap, schema_registry_url, server.url, topic,
                                 group)) as w:
        wait_until(caught_up(kafka_bootstrap, group, topic), 60, "offsets at the end")
        dlq = read_topic(kafka_bootstrap, w.settings.dlq_topic)
    got = delivered_seqs(control)
    assert got == {(users[0], 0): 1, (users[2], 2): 1}
    assert len(dlq) == 1
    assert dlq[0].value() == wires[1]
    headers = dict(dlq[0].headers() or [])
    assert headers["userpilot.error.reason"] == b"undecodable"
    assert b"RecursionError" in headers["__connect.errors.exception.message"]


def _varint(n: int) -> bytes:
    zigzag, out = (n << 1) ^ (n >> 63), bytearray()
    while zigzag > 0x7F:
        out.append((zigzag & 0x7F) | 0x80)
        zigzag >>= 7
    out.append(zigzag)
    return bytes(out)


def test_an_array_of_items_that_take_no_bytes_cannot_hang_the_worker(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    sandbox: Sandbox,
) -> None:
    """A compatible writer adding `array<null>`, and one 164-byte event counting 2^62
    items: fastavro skipped them in C, GIL held, for ever (no /healthz, no SIGTERM), on
    every replica that took the partition. Such a schema is refused: its events are
    dead-lettered, the others delivered."""
    from consumer.registry import Registry

    topic = topic_factory(partitions=1)
    ours = Registry(schema_registry_url).register(topic)
    writer: dict[str, Any] = json.loads(codec.SCHEMA_TEXT)
    writer["fields"].append({"name": "x", "type": {"type": "array", "items": "null"},
                             "default": []})
    theirs = _register(schema_registry_url, f"{topic}-value", writer)
    parsed = cast(dict[str, Any], fastavro.parse_schema(json.loads(json.dumps(writer))))
    poison = codec.encode(theirs, {**codec.to_record(track_event("u1", 1)), "x": []}, parsed)
    poison = poison[:-1] + _varint(2**62) + b"\x00"  # the array, last: 2^62 nulls, then end
    _poison_between_two_tracks(kafka_bootstrap, schema_registry_url, sandbox, topic, ours,
                               poison, b"items take no bytes")


def _poison_between_two_tracks(kafka_bootstrap: str, schema_registry_url: str,
                               sandbox: Sandbox, topic: str, ours: int, poison: bytes,
                               says: bytes) -> None:
    """u1's Tracks 0 and 2 (our schema) around `poison`, through a worker: both delivered,
    the poison alone dead-lettered, its reason holding `says`."""
    server, control = sandbox
    for wire in (codec.encode(ours, codec.to_record(track_event("u1", 0))), poison,
                 codec.encode(ours, codec.to_record(track_event("u1", 2)))):
        produce_raw(kafka_bootstrap, topic, b"u1", wire)
    group = f"{topic}-g"
    with WorkerThread(worker_env(kafka_bootstrap, schema_registry_url, server.url, topic,
                                 group)) as w:
        wait_until(caught_up(kafka_bootstrap, group, topic), 60, "offsets at the end")
        dlq = read_topic(kafka_bootstrap, w.settings.dlq_topic)
    assert delivered_seqs(control) == {("u1", 0): 1, ("u1", 2): 1}
    assert [m.value() for m in dlq] == [poison]
    assert says in dict(dlq[0].headers() or [])["__connect.errors.exception.message"]


def _tree(depth: int) -> dict[str, Any]:
    """A binary tree of named records with null leaves, each level defined once: ~7 KB of
    schema at depth 40, and no byte of an event for the whole tree."""
    node: dict[str, Any] = {"type": "record", "name": f"L{depth}",
                            "fields": [{"name": "x", "type": "null"}]}
    for d in range(depth - 1, -1, -1):
        node = {"type": "record", "name": f"L{d}", "fields": [
            {"name": "a", "type": node}, {"name": "b", "type": f"L{d + 1}"}]}
    return node


def test_a_schema_whose_records_fan_out_without_bytes_cannot_hang_the_worker(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    sandbox: Sandbox,
) -> None:
    """Review "registry48": a compatible writer adding `["null", tree]` where the tree is
    40 levels of records defined once each; one 40-byte event of its tree branch made
    fastavro visit 2^40 records in C, GIL held: no /healthz, no SIGTERM, on every replica
    taking the partition. Such a schema is refused (`codec.fanout`): its events are
    dead-lettered, the others delivered."""
    from consumer.registry import Registry

    topic = topic_factory(partitions=1)
    ours = Registry(schema_registry_url).register(topic)
    writer: dict[str, Any] = json.loads(codec.SCHEMA_TEXT)
    writer["fields"].append({"name": "x", "type": ["null", _tree(40)], "default": None})
    theirs = _register(schema_registry_url, f"{topic}-value", writer)
    parsed = cast(dict[str, Any], fastavro.parse_schema(json.loads(json.dumps(writer))))
    poison = codec.encode(theirs, {**codec.to_record(track_event("u1", 1)), "x": None}, parsed)
    assert poison[-1:] == b"\x00"
    poison = poison[:-1] + b"\x02"  # the union's tree branch, whose 2^40 records take no byte
    _poison_between_two_tracks(kafka_bootstrap, schema_registry_url, sandbox, topic, ours,
                               poison, b"without reading a byte")
