"""A producer whose writer schema takes a record from another subject (Schema Registry
references, e.g. the Context record registered once and shared by several topics): the
worker fetches the referenced versions and decodes its events; before, every one of them
was dead-lettered as "not an Avro schema" and no replay could succeed."""

from __future__ import annotations

import copy
import io
import json
from collections.abc import Callable
from typing import Any

import fastavro
import httpx
import pytest

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

Sandbox = tuple[SandboxThread, SandboxControl]
HEADERS = {"Content-Type": "application/vnd.schemaregistry.v1+json"}


def _register(url: str, subject: str, schema: dict[str, Any] | list[Any],
              references: list[dict[str, Any]] | None = None) -> int:
    body: dict[str, Any] = {"schema": json.dumps(schema), "schemaType": "AVRO"}
    if references:
        body["references"] = references
    answer = httpx.post(f"{url}/subjects/{subject}/versions", json=body, headers=HEADERS)
    assert answer.status_code == 200, answer.text
    return int(answer.json()["id"])


def _produce_referencing(bootstrap: str, registry_url: str, topic: str,
                         events: list[dict[str, Any]], *, namespaced: bool
                         ) -> tuple[dict[str, Any], str]:
    """Register the Context record in a subject of its own and a value schema that names it
    (in the schema's namespace, or in none by its short name); produce `events` as the
    expanded schema writes them, under the referencing id. Returns (Context, its subject)."""
    full = json.loads(codec.SCHEMA_TEXT)
    (index,) = [i for i, f in enumerate(full["fields"]) if f["name"] == "context"]
    context = copy.deepcopy(full["fields"][index]["type"][1])
    if namespaced:
        context["namespace"] = full["namespace"]
        name = f"{full['namespace']}.{context['name']}"
    else:
        context.pop("namespace", None)
        name = context["name"]  # short: resolved in no namespace
    shared = f"{topic}-shared-context"
    _register(registry_url, shared, context)
    referencing = copy.deepcopy(full)
    referencing["fields"][index] = {**full["fields"][index], "type": ["null", name]}
    schema_id = _register(registry_url, f"{topic}-value", referencing,
                          [{"name": name, "subject": shared, "version": 1}])
    for event in events:
        produce_raw(bootstrap, topic, event["userId"].encode(),
                    codec.encode(schema_id, codec.to_record(event)))
    return context, shared


def _assert_all_delivered(bootstrap: str, registry_url: str, sandbox: Sandbox, topic: str,
                          events: list[dict[str, Any]]) -> None:
    """A worker reads `topic` to its end: nothing dead-lettered, each event sent once."""
    server, control = sandbox
    group = f"{topic}-g"
    with WorkerThread(worker_env(bootstrap, registry_url, server.url, topic, group)) as w:
        wait_until(caught_up(bootstrap, group, topic), 60, "offsets at the end")
        dlq = read_topic(bootstrap, w.settings.dlq_topic)
    assert dlq == [], [dict(m.headers() or []).get("__connect.errors.exception.message")
                       for m in dlq]
    got = delivered_seqs(control)
    assert all(got[(e["userId"], e["properties"]["seq"])] == 1 for e in events)


def test_events_of_a_schema_with_references_are_decoded_and_delivered(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    sandbox: Sandbox,
) -> None:
    topic = topic_factory(partitions=1)
    events = [track_event(f"u{i}", i) for i in range(5)]
    _produce_referencing(kafka_bootstrap, schema_registry_url, topic, events, namespaced=True)
    _assert_all_delivered(kafka_bootstrap, schema_registry_url, sandbox, topic, events)


@pytest.mark.parametrize("case", ["soft-deleted reference", "null-namespace reference"])
def test_references_resolve_as_confluents_clients_and_java_avro_resolve_them(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    sandbox: Sandbox, case: str,
) -> None:
    """Review "schema22", both dead-lettered every event:
    - a referenced version soft-deleted once its referencing subject was retired: the
      schema id is still served and Confluent's clients resolve references with
      `?deleted=true`; the worker asked without it (404);
    - a referenced record in no namespace, named by its short name from a namespaced
      schema: Java's Avro (the registry) looks in the enclosing namespace, then in none;
      fastavro only in the first ("not an Avro schema")."""
    topic = topic_factory(partitions=1)
    events = [track_event(f"u{i}", i) for i in range(3)]
    context, shared = _produce_referencing(
        kafka_bootstrap, schema_registry_url, topic, events,
        namespaced=case != "null-namespace reference")
    if case == "soft-deleted reference":
        # A later version keeps the subject (Apicurio drops a subject without versions).
        newer = {**context, "fields": [*context["fields"], {
            "name": "added", "type": ["null", "string"], "default": None}]}
        _register(schema_registry_url, shared, newer)
        for path in (f"subjects/{topic}-value", f"subjects/{shared}/versions/1"):
            gone = httpx.delete(f"{schema_registry_url}/{path}", headers=HEADERS)
            assert gone.status_code == 200, (path, gone.text)
        assert httpx.get(f"{schema_registry_url}/subjects/{shared}/versions/1",
                         headers=HEADERS).status_code == 404
    _assert_all_delivered(kafka_bootstrap, schema_registry_url, sandbox, topic, events)


def test_a_value_schema_that_is_a_union_of_references_is_delivered(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    sandbox: Sandbox,
) -> None:
    """Confluent's way to put several event types on one topic: the value schema is a
    union of references, each type in a subject of its own (here one type beside null).
    Review "schema44": fastavro parsed the root again without them (UnknownType), retried
    as a registry outage for ever: the partition stalled with the registry healthy."""
    topic = topic_factory(partitions=1)
    ns = f"{topic.replace('-', '_')}_types"
    track = {**json.loads(codec.SCHEMA_TEXT), "name": "TrackEvent", "namespace": ns}
    _register(schema_registry_url, f"{topic}-track", track)
    schema_id = _register(schema_registry_url, f"{topic}-value",
                          ["null", f"{ns}.TrackEvent"],
                          [{"name": f"{ns}.TrackEvent", "subject": f"{topic}-track",
                            "version": 1}])
    events = [track_event(f"u{i}", i) for i in range(3)]
    writer = fastavro.parse_schema(track)
    for event in events:
        out = io.BytesIO()
        out.write(b"\0" + schema_id.to_bytes(4, "big") + b"\2")  # the union's second branch
        fastavro.schemaless_writer(out, writer, codec.to_record(event))
        produce_raw(kafka_bootstrap, topic, event["userId"].encode(), out.getvalue())
    _assert_all_delivered(kafka_bootstrap, schema_registry_url, sandbox, topic, events)
