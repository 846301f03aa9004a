"""The worker loop's contract on inputs nobody wrote down (hypothesis, in-memory fakes).

Whatever mix of records the partitions hold (events of every type, anonymous, without
consent, unmapped, poison bytes, tombstones, an unknown schema id) and whatever Userpilot
answers each request (accepted or refused for good): every record ends exactly once, as
delivered, dropped or dead-lettered (its original bytes kept); the committed offset of each
partition reaches its end; and no Track goes out twice.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumer import codec
from consumer.calls import Call
from consumer.errors import Rejected
from tests.unit.test_worker import (
    SCHEMA_ID,
    TOPIC,
    FakeClient,
    FakeSource,
    Message,
    Run,
    drive,
    known_schema,
    make,
    until,
)

USERS = st.sampled_from([None, "", " ", "u1", "u2", "ü3", "x" * 300])
NAMES = st.sampled_from(["Feature Used", "feature_used", "Checkout Completed", "", "é" * 50])
VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3),
    max_leaves=8)
PROPS = st.dictionaries(st.text(max_size=6), VALUES, max_size=4)


@st.composite
def records(draw: st.DrawFn, seq: int) -> tuple[str, bytes | None]:
    """One record's value, and what it is (for the failure message)."""
    kind = draw(st.sampled_from(["track", "track", "page", "identify", "group", "screen",
                                 "poison", "tombstone", "unknown_schema", "no_consent"]))
    if kind == "poison":
        return kind, draw(st.binary(max_size=40))
    if kind == "tombstone":
        return kind, None
    event: dict[str, Any] = {
        "type": "track" if kind in ("unknown_schema", "no_consent") else kind,
        "userId": draw(USERS), "anonymousId": "anon", "messageId": f"m{seq}",
        "timestamp": "2026-11-26T10:00:00.000Z",
        "context": {"consent": {"analytics": kind != "no_consent"}},
    }
    if event["type"] == "track":
        event["event"] = draw(NAMES)
        event["properties"] = {**draw(PROPS), "seq": seq}
    elif kind == "page":
        event["name"] = draw(NAMES)
        event["properties"] = draw(PROPS)
    elif kind == "identify":
        event["traits"] = draw(PROPS)
    elif kind == "group":
        event["groupId"] = draw(st.sampled_from([None, "", "c1", "c2", "7"]))
        event["traits"] = draw(PROPS)
    schema = 999 if kind == "unknown_schema" else SCHEMA_ID
    return kind, codec.encode(schema, codec.to_record(event))


@st.composite
def topics(draw: st.DrawFn) -> tuple[dict[tuple[str, int], list[Message]], list[str]]:
    count = draw(st.integers(1, 30))
    partitions = draw(st.integers(1, 3))
    log: dict[tuple[str, int], list[Message]] = {(TOPIC, p): [] for p in range(partitions)}
    kinds = []
    for seq in range(count):
        kind, value = draw(records(seq))
        p = draw(st.integers(0, partitions - 1))
        part = log[(TOPIC, p)]
        part.append(Message(TOPIC, p, len(part), b"key", value))
        kinds.append(kind)
    return log, kinds


class RefusingClient(FakeClient):
    """Userpilot refusing for good (400) the Tracks whose seq is in `refuse`."""

    def __init__(self, refuse: set[int]) -> None:
        super().__init__()
        self.refuse = refuse

    async def send(self, call: Call) -> int:
        if call.endpoint == "track" and track_seq(call.body) in self.refuse:
            self.calls.append(call)
            raise Rejected("HTTP 400: refused", status=400)
        return await super().send(call)


def track_seq(body: bytes) -> int | None:
    metadata = json.loads(body).get("metadata")
    seq = metadata.get("seq") if isinstance(metadata, dict) else None
    return seq if isinstance(seq, int) else None


def total(run: Run, name: str) -> float:
    registry = run.worker.m.registry
    return float(sum(s.value for metric in registry.collect() for s in metric.samples
                     if s.name == name))


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(topic=topics(), refuse=st.sets(st.integers(0, 29), max_size=6))
def test_every_record_ends_once_and_every_partition_commits_to_its_end(
        topic: tuple[dict[tuple[str, int], list[Message]], list[str]], refuse: set[int]) -> None:
    log, kinds = topic
    run = make(log, registry=known_schema(), client=RefusingClient(refuse),
               WORKER_DLQ_MAX_RATIO="1", WORKER_DLQ_MAX_CONSECUTIVE="1000000")
    ends = {tp: len(part) for tp, part in log.items()}

    async def scenario(source: FakeSource) -> None:
        await until(lambda: all(source.committed().get(tp, 0) == end
                                for tp, end in ends.items() if end), "every partition's end")

    assert drive(run, scenario) == 0, kinds
    consumed = total(run, "userpilot_events_consumed_total")
    dropped = total(run, "userpilot_events_dropped_total")
    delivered = total(run, "userpilot_events_delivered_total")
    dead = total(run, "userpilot_events_dead_lettered_total")
    assert consumed == len(kinds), kinds
    assert dropped + delivered + dead == len(kinds), (kinds, dropped, delivered, dead)
    assert len(run.dlq.records) == dead, kinds
    originals = Counter(m.value() for part in log.values() for m in part)
    assert not Counter(r.value for r in run.dlq.records) - originals, "original bytes kept"
    accepted = Counter(track_seq(b) for b in run.client.bodies if track_seq(b) not in refuse)
    assert all(n == 1 for seq, n in accepted.items() if seq is not None), accepted
    refused = {track_seq(c.body) for c in run.client.calls
               if c.endpoint == "track" and track_seq(c.body) in refuse}
    reasons = Counter(run.dlq.reasons())
    assert reasons["bad_request"] >= len(refused), (reasons, refused)
