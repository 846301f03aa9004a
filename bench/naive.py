"""Workload 5: the loop a user writes first. Poll one, decode, map, POST, commit, repeat.

Deliberately plain (a synchronous `httpx.Client`, a synchronous commit per message), since
the figure answers "how much better than what I would have written", not "how fast can a
careful loop go".
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import httpx
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from consumer import codec
from consumer.filtering import ConsentPolicy
from consumer.mapping import DEFAULT_PRESET
from consumer.registry import Registry
from consumer.routing import Send, route

__all__ = ["NaiveResult", "naive_loop"]


@dataclass(frozen=True)
class NaiveResult:
    """Messages handled after the first one, 202s among them, and the time they took."""

    count: int
    accepted: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else 0.0


def naive_loop(bootstrap: str, registry_url: str, topic: str, url: str,
               headers: Mapping[str, str], *, max_events: int, max_seconds: float) -> NaiveResult:
    """Run the naive loop until `max_events` are handled or `max_seconds` have passed."""
    registry = Registry(registry_url)
    consent, mappings = ConsentPolicy(), DEFAULT_PRESET
    consumer = Consumer({"bootstrap.servers": bootstrap,
                         "group.id": f"bench-naive-{time.time_ns()}",
                         "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    # assign, not subscribe: skips the group join (not measured anyway); commits still
    # go to the group, as a user's loop would.
    meta = consumer.list_topics(topic, timeout=10)
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING)
                     for p in meta.topics[topic].partitions])
    handled = accepted = 0
    first = last = 0.0
    deadline = time.monotonic() + max_seconds + 30.0  # + time for the first fetch
    stop_at = float("inf")
    try:
        with httpx.Client(headers=dict(headers), timeout=30.0) as client:
            while handled < max_events and time.monotonic() < min(deadline, stop_at):
                message = consumer.poll(1.0)
                if message is None or message.error() is not None:
                    continue
                event = codec.decode(message.value(), registry.writer_schema)
                decision = route(event, consent, mappings)
                if isinstance(decision, Send):
                    response = client.post(url, content=decision.body)
                    accepted += response.status_code == 202
                consumer.commit(message=message, asynchronous=False)
                last = time.perf_counter()
                if handled == 0:
                    first = last
                    stop_at = time.monotonic() + max_seconds
                handled += 1
    finally:
        consumer.close()
    if handled < 2:
        raise TimeoutError(f"naive loop handled only {handled} message(s) from {topic}")
    # The first message starts the clock (after the group join), so it is not counted.
    return NaiveResult(handled - 1, accepted - 1 if accepted else 0, last - first)
