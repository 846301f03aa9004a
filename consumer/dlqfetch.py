"""Kafka edge for `replay`: the original of a dead letter written without its value.

A dead letter too large for the DLQ keeps only the source coordinates, the value's
SHA-256 and size (consumer.deadletter.without_value). While the source topic retains it,
the original is read back by those coordinates and checked against the hash; once it is
gone (retention, compaction, a deleted topic) replay reports it instead of guessing. A
source that does not answer (a timeout, a broker error) is not "gone": replay stops there
and the next run starts at it (review "replay17": one timeout was reported as retention and
committed past, though the original was still there).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from confluent_kafka import OFFSET_INVALID, Consumer, KafkaError, KafkaException, TopicPartition

from consumer.deadletter import (
    HEADERS_OMITTED,
    KEY_OMITTED,
    REPLAY_COUNT,
    VALUE_SHA256,
    Header,
    header_value,
    message_headers,
    source_of,
    value_omitted,
)
from consumer.librdkafka import consumer_settings

__all__ = ["Fetched", "Original", "fetch_original", "restore", "verified_original"]

Problem = Literal["no_origin", "gone", "mismatch", "unanswered"]
"""Why there is no original: `unanswered` may pass (the run stops, the next one retries)."""

_GONE = frozenset({
    KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC, KafkaError._UNKNOWN_PARTITION,
    KafkaError.OFFSET_OUT_OF_RANGE, KafkaError._PARTITION_EOF})
"""The broker's word that the record is not there (a deleted topic, an offset below the
log's start or at its end)."""


def _problem(error: KafkaError | None) -> Problem:
    return "gone" if error is not None and error.code() in _GONE else "unanswered"


@dataclass(frozen=True)
class Original:
    """The event as replay should re-publish it (before `replay.replay_headers`)."""

    key: bytes | None
    value: bytes | None
    headers: list[Header]


@dataclass(frozen=True)
class Fetched:
    """The source record at some coordinates, or why there is none."""

    key: bytes | None = None
    value: bytes | None = None
    headers: tuple[Header, ...] = ()
    problem: Problem | None = None


def fetch_original(conf: Mapping[str, Any], topic: str, partition: int, offset: int,
                   *, timeout_s: float = 10.0) -> Fetched:
    """Read one record of the source topic by its coordinates (no group, no commit)."""
    settings = {k: v for k, v in conf.items() if k not in ("group.id", "enable.auto.commit")}
    consumer = Consumer(consumer_settings({  # the worker consumer's shape (review config25)
        **settings, "group.id": "userpilot-dlqfetch", "enable.auto.commit": False,
        "enable.partition.eof": True, "auto.offset.reset": "error"}))
    try:
        tp = TopicPartition(topic, partition)
        try:
            low, high = consumer.get_watermark_offsets(tp, timeout=timeout_s)
        except KafkaException as exc:
            error = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
            return Fetched(problem=_problem(error))
        if low == OFFSET_INVALID or not low <= offset < high:
            return Fetched(problem="gone")
        consumer.assign([TopicPartition(topic, partition, offset)])
        message = consumer.poll(timeout_s)
        if message is None:
            return Fetched(problem="unanswered")
        if message.error() is not None:
            return Fetched(problem=_problem(message.error()))
        if message.offset() != offset:
            return Fetched(problem="gone")  # compacted away: a later offset came back
        return Fetched(message.key(), message.value(),
                       tuple(message_headers(message)))
    finally:
        consumer.close()


def verified_original(conf: Mapping[str, Any], headers: Sequence[Header] | None, *,
                      timeout_s: float = 10.0) -> Fetched | Problem:
    """The source event a dead letter written without its value (or key) stands in for,
    read by its coordinates and checked against the recorded SHA-256 ('mismatch': another
    record at those coordinates, the topic re-created), or why it cannot be had."""
    where = source_of(headers)
    if where is None:
        return "no_origin"
    found = fetch_original(conf, *where, timeout_s=timeout_s)
    if found.problem is not None:
        return found.problem
    digest = (header_value(headers, VALUE_SHA256) or b"").decode("utf-8", "replace")
    if hashlib.sha256(found.value or b"").hexdigest() != digest:
        return "mismatch"
    return found


def restore(conf: Mapping[str, Any], key: bytes | None, value: bytes | None,
            headers: Sequence[Header] | None, *, timeout_s: float = 10.0,
            ) -> Original | Problem:
    """What to replay for one DLQ record: itself, or the original it stands in for.

    A record with its value is returned as is. One without is fetched from the source
    topic; its value must match the recorded SHA-256 ('mismatch' otherwise). The DLQ
    record's headers are kept unless they were omitted too; the replay count travels.
    """
    if not value_omitted(headers):
        return Original(key, value, list(headers or ()))
    found = verified_original(conf, headers, timeout_s=timeout_s)
    if not isinstance(found, Fetched):
        return found
    kept = list(headers or ())
    if header_value(headers, HEADERS_OMITTED) == b"true":
        count = header_value(headers, REPLAY_COUNT)
        kept = [*found.headers, *([(REPLAY_COUNT, count)] if count is not None else [])]
    out_key = found.key if header_value(headers, KEY_OMITTED) == b"true" else key
    return Original(out_key, found.value, kept)
