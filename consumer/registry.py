"""Schema Registry edge: register our schema, fetch writer schemas by id, cache both.

Subjects follow the TOPIC name strategy (`<topic>-value`) explicitly: confluent-kafka's own
serdes default to another strategy in recent versions, and other producers of these topics
expect the classic one.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from typing import Any

import fastavro
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError

from consumer.codec import SCHEMA, SCHEMA_TEXT

__all__ = ["Registry", "subject_for"]


def subject_for(topic: str) -> str:
    """TopicNameStrategy subject for a topic's values."""
    return f"{topic}-value"


class Registry:
    """A cached view of the registry; `writer_schema` is the codec's SchemaLookup."""

    def __init__(self, url: str, basic_auth_user_info: str | None = None) -> None:
        conf: dict[str, Any] = {"url": url}
        if basic_auth_user_info:
            conf["basic.auth.user.info"] = basic_auth_user_info
        self._client = SchemaRegistryClient(conf)
        self._parsed: dict[int, Mapping[str, Any]] = {}
        self._ours = fastavro.schema.to_parsing_canonical_form(SCHEMA)
        self._lock = threading.Lock()
        self._fetching = threading.Lock()

    def register(self, topic: str) -> int:
        """Register the Signal schema under the topic's subject; returns its id."""
        schema_id: int = self._client.register_schema(
            subject_for(topic), Schema(SCHEMA_TEXT, "AVRO")
        )
        with self._lock:
            self._parsed[schema_id] = SCHEMA
        return schema_id

    def cached(self, schema_id: int) -> Mapping[str, Any] | None:
        """The parsed writer schema if already fetched: the hot path never blocks on I/O."""
        return self._parsed.get(schema_id)

    def writer_schema(self, schema_id: int) -> Mapping[str, Any]:
        """Parsed writer schema for an id; KeyError when the registry does not know it."""
        cached = self._parsed.get(schema_id)
        if cached is not None:
            return cached
        with self._fetching:  # many events of a new schema arrive at once: fetch it once
            cached = self._parsed.get(schema_id)
            if cached is not None:
                return cached
            return self._fetch(schema_id)

    def _fetch(self, schema_id: int) -> Mapping[str, Any]:
        try:
            schema = self._client.get_schema(schema_id)
        except SchemaRegistryError as exc:
            if exc.http_status_code == 404:
                raise KeyError(schema_id) from None
            raise
        fresh: Any = fastavro.parse_schema(json.loads(schema.schema_str or "null"))
        parsed: Mapping[str, Any] = (
            SCHEMA if fastavro.schema.to_parsing_canonical_form(fresh) == self._ours else fresh
        )
        with self._lock:
            self._parsed[schema_id] = parsed
        return parsed
