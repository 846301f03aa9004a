"""Signal events between canonical JSON and Avro in the Confluent wire format.

Pure: no network. The registry lookup is passed in as a callable, so decoding is tested
without a registry and the Kafka edge decides how schemas are fetched and cached.

Free-form objects (properties, traits, consent, unknown context keys) travel as JSON text
inside the Avro record. A typed recursive union cannot carry integers beyond 64 bits and
costs more to decode (see README, "Schema"); JSON text round-trips every JSON value exactly.
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Callable, Mapping
from importlib import resources
from typing import Any, cast

import fastavro

from consumer.errors import InvalidEvent, UndecodableEvent

__all__ = [
    "MAGIC_BYTE",
    "SCHEMA",
    "SCHEMA_TEXT",
    "SchemaLookup",
    "decode",
    "encode",
    "from_record",
    "split_wire",
    "to_record",
]

MAGIC_BYTE = 0
_HEADER = struct.Struct(">BI")

SCHEMA_TEXT: str = resources.files("consumer").joinpath("signal_event.avsc").read_text("utf-8")
SCHEMA = cast(dict[str, Any], fastavro.parse_schema(json.loads(SCHEMA_TEXT)))

SchemaLookup = Callable[[int], Mapping[str, Any]]
"""Returns the parsed writer schema registered under an id, or raises KeyError."""

_ENVELOPE_STRINGS = (
    "event", "name", "userId", "anonymousId", "groupId",
    "timestamp", "messageId", "receivedAt", "sentAt",
)
_JSON_FIELDS = ("properties", "traits")
_SUBRECORDS: dict[str, tuple[str, ...]] = {
    "page": ("url", "path", "referrer", "title", "search"),
    "device": ("type", "manufacturer", "model"),
    "campaign": ("source", "medium", "name", "term", "content"),
}
_CONTEXT_STRINGS = ("locale", "ip", "userAgent", "timezone")
_KNOWN_TOP = frozenset(("type", "context", *_ENVELOPE_STRINGS, *_JSON_FIELDS))


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def to_record(event: Mapping[str, Any]) -> dict[str, Any]:
    """Canonical JSON event → Avro record; InvalidEvent names the offending field."""
    if not isinstance(event, Mapping):
        raise InvalidEvent("an event must be a JSON object")
    unknown = sorted(set(event) - _KNOWN_TOP)
    if unknown:
        raise InvalidEvent(
            f"unknown field(s) {', '.join(unknown)}; the envelope has only "
            f"{', '.join(sorted(_KNOWN_TOP))} (put free-form data in properties or context)"
        )
    kind = event.get("type")
    if kind not in ("track", "page", "identify", "group"):
        raise InvalidEvent(f"type must be track, page, identify or group, not {kind!r}")
    record: dict[str, Any] = {"type": kind}
    for key in _ENVELOPE_STRINGS:
        value = event.get(key)
        if value is not None and not isinstance(value, str):
            raise InvalidEvent(f"{key} must be a string or null, not {type(value).__name__}")
        record[key] = value
    for key in _JSON_FIELDS:
        value = event.get(key)
        if value is not None and not isinstance(value, dict):
            raise InvalidEvent(f"{key} must be an object or null, not {type(value).__name__}")
        record[key] = None if value is None else _encode_json(key, value)
    record["context"] = _context_to_record(event.get("context"))
    return record


def _encode_json(field: str, value: Any) -> str:
    try:
        return _dumps(value)
    except ValueError as exc:
        raise InvalidEvent(f"{field}: {exc} (NaN and Infinity are not JSON)") from None


def _context_to_record(context: Any) -> dict[str, Any] | None:
    if context is None:
        return None
    if not isinstance(context, dict):
        raise InvalidEvent(f"context must be an object or null, not {type(context).__name__}")
    record: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, fields in _SUBRECORDS.items():
        value = context.get(key)
        if value is None:
            record[key] = None
            continue
        if not isinstance(value, dict):
            extra[key] = value
            record[key] = None
            continue
        sub: dict[str, Any] = {}
        leftover: dict[str, Any] = {}
        for name, item in value.items():
            if name in fields and (item is None or isinstance(item, str)):
                sub[name] = item
            else:
                leftover[name] = item
        # An empty object must come back as an empty object, not as null.
        record[key] = {name: sub.get(name) for name in fields} if sub or not leftover else None
        if leftover:
            extra[key] = leftover
    for key in _CONTEXT_STRINGS:
        value = context.get(key)
        if value is None or isinstance(value, str):
            record[key] = value
        else:
            extra[key] = value
    consent = context.get("consent")
    record["consent"] = None if consent is None else _encode_json("context.consent", consent)
    known = set(_SUBRECORDS) | set(_CONTEXT_STRINGS) | {"consent"}
    for key, value in context.items():
        if key not in known:
            extra[key] = value
    record["extra"] = _encode_json("context", extra) if extra else None
    return record


def from_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """Avro record → canonical JSON event; null envelope fields are left out."""
    event: dict[str, Any] = {"type": record["type"]}
    for key in _ENVELOPE_STRINGS:
        value = record.get(key)
        if value is not None:
            event[key] = value
    for key in _JSON_FIELDS:
        text = record.get(key)
        if text is not None:
            event[key] = _decode_json(key, text)
    context = record.get("context")
    if context is not None:
        event["context"] = _context_from_record(context)
    return event


def _decode_json(field: str, text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise UndecodableEvent(f"{field} is not valid JSON text: {exc}") from None


def _context_from_record(record: Mapping[str, Any]) -> dict[str, Any]:
    context: dict[str, Any] = {}
    for key in _SUBRECORDS:
        sub = record.get(key)
        if sub is not None:
            context[key] = {k: v for k, v in sub.items() if v is not None}
    for key in _CONTEXT_STRINGS:
        value = record.get(key)
        if value is not None:
            context[key] = value
    consent = record.get("consent")
    if consent is not None:
        context["consent"] = _decode_json("context.consent", consent)
    extra_text = record.get("extra")
    if extra_text is not None:
        extra = _decode_json("context.extra", extra_text)
        if isinstance(extra, dict):
            for key, value in extra.items():
                if isinstance(value, dict) and isinstance(context.get(key), dict):
                    context[key].update(value)
                else:
                    context[key] = value
    return context


def encode(schema_id: int, record: Mapping[str, Any], schema: Mapping[str, Any] = SCHEMA) -> bytes:
    """Avro record → Confluent wire format bytes (magic byte, schema id, Avro body)."""
    buffer = io.BytesIO()
    buffer.write(_HEADER.pack(MAGIC_BYTE, schema_id))
    fastavro.schemaless_writer(buffer, cast(dict[str, Any], schema), dict(record))
    return buffer.getvalue()


def split_wire(data: bytes | None) -> tuple[int, memoryview]:
    """Confluent wire format → (schema id, Avro body); UndecodableEvent if it is not one."""
    if data is None:
        raise UndecodableEvent("message has no value (tombstone)")
    if len(data) < _HEADER.size:
        raise UndecodableEvent(f"message is {len(data)} bytes, shorter than the wire header")
    magic, schema_id = _HEADER.unpack_from(data)
    if magic != MAGIC_BYTE:
        raise UndecodableEvent(f"wrong magic byte {magic} (expected 0: Confluent wire format)")
    return schema_id, memoryview(data)[_HEADER.size:]


def decode(data: bytes | None, lookup: SchemaLookup) -> dict[str, Any]:
    """Wire bytes → canonical JSON event, resolving the writer schema to ours."""
    schema_id, body = split_wire(data)
    try:
        writer = lookup(schema_id)
    except KeyError:
        raise UndecodableEvent(f"unknown schema id {schema_id}") from None
    stream = io.BytesIO(body)
    try:
        # Resolution costs time per call; skip it when the writer is our own schema.
        reader = None if writer is SCHEMA else SCHEMA
        record = fastavro.schemaless_reader(stream, cast(dict[str, Any], writer), reader)
    except Exception as exc:  # fastavro raises many types on corrupt input
        raise UndecodableEvent(f"not a Signal event in Avro: {type(exc).__name__}: {exc}") from None
    if stream.tell() != len(body):
        raise UndecodableEvent(
            f"{len(body) - stream.tell()} trailing bytes after the Avro record (corrupt message)"
        )
    if not isinstance(record, dict):
        raise UndecodableEvent("Avro body did not decode to a record")
    return from_record(record)
