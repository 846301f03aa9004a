"""Unit tests for consumer.codec: JSON ↔ Avro record ↔ Confluent wire bytes, no registry."""

from __future__ import annotations

import copy
import io
import json
import math
import random
import struct
from collections.abc import Mapping
from typing import Any, cast

import fastavro
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer import codec
from consumer.calls import encode_body
from consumer.errors import InvalidEvent, UndecodableEvent


def own_schema(schema_id: int) -> Mapping[str, Any]:
    return codec.SCHEMA


def roundtrip(event: Mapping[str, Any], lookup: codec.SchemaLookup = own_schema) -> Any:
    return dict(codec.decode(codec.encode(7, codec.to_record(event)), lookup))


# ------------------------------------------------------------------ round trips

ROUND_TRIPS: list[tuple[str, dict[str, Any]]] = [
    ("minimal", {"type": "track"}),
    ("seed track", {
        "type": "track", "event": "Feature Used", "userId": "user_001",
        "anonymousId": "anon_1", "messageId": "m-1", "timestamp": "2024-05-01T12:00:00.000Z",
        "receivedAt": "2024-05-01T12:00:01Z", "sentAt": "2024-05-01T12:00:00.5Z",
        "properties": {"feature": "export_csv"},
        "context": {"consent": {"analytics": True, "marketing": False}},
    }),
    ("nested products with prices", {
        "type": "track", "event": "Order Completed", "userId": "u",
        "properties": {
            "order_id": "o-1", "total": 129.99, "currency": "EUR",
            "products": [
                {"product_id": "p1", "price": 19.99, "quantity": 2,
                 "tags": ["a", "b"], "dims": {"w": 1.5, "h": 0}},
                {"product_id": "p2", "price": 90.01, "quantity": 1, "discount": None},
            ],
        },
    }),
    ("unicode", {
        "type": "page", "name": "Café ☕ 日本語", "userId": "ユーザー",
        "properties": {"emoji": "🚀", "rtl": "שלום", "nul": "a\u0000b", "quote": "\"\\"},
        "context": {"page": {"title": "Über uns — 💡", "url": "https://ex.com/ü?q=é"}},
    }),
    ("nulls inside properties", {
        "type": "track", "event": "E", "properties": {"a": None, "b": [None, 1], "c": {"d": None}},
    }),
    ("very large integers", {
        "type": "track", "event": "E",
        "properties": {"big": 2**64 + 1, "huge": 10**40, "neg": -(2**70), "max64": 2**63 - 1},
        "traits": {"n": 2**65},
    }),
    ("floats", {
        "type": "track", "event": "E",
        "properties": {"pi": 3.141592653589793, "tiny": 5e-324, "large": 1.7976931348623157e308,
                       "neg": -0.5, "one": 1.0, "exp": 1e21},
    }),
    ("booleans", {
        "type": "track", "event": "E", "properties": {"t": True, "f": False, "l": [True]},
    }),
    ("empty objects", {
        "type": "track", "event": "E", "properties": {}, "traits": {},
        "context": {"page": {}, "device": {}, "campaign": {}, "consent": {}},
    }),
    ("empty context", {"type": "identify", "userId": "u", "context": {}}),
    ("unknown context keys", {
        "type": "track", "event": "E",
        "context": {"library": {"name": "datafly.js", "version": "2.1"}, "os": "linux",
                    "screen": {"width": 1920}, "groups": [1, 2], "extra": "not special",
                    "nothing": None},
    }),
    ("unknown page keys beside known ones", {
        "type": "page", "name": "Home",
        "context": {"page": {"url": "https://a.b/", "hash": "#x", "width": 3,
                             "title": "T", "meta": {"k": "v"}}},
    }),
    ("only unknown page keys", {"type": "page", "context": {"page": {"hash": "#top"}}}),
    ("known page field with a non-string value", {
        "type": "page", "context": {"page": {"url": 42, "path": "/p"}},
    }),
    ("non-string context values", {
        "type": "track", "event": "E",
        "context": {"locale": 7, "ip": ["1.2.3.4"], "userAgent": {"ua": "x"}, "timezone": True,
                    "page": "home", "device": ["phone"], "campaign": 3},
    }),
    ("all typed context fields", {
        "type": "track", "event": "E",
        "context": {
            "page": {"url": "u", "path": "p", "referrer": "r", "title": "t", "search": "?s"},
            "device": {"type": "mobile", "manufacturer": "Apple", "model": "iPhone"},
            "campaign": {"source": "s", "medium": "m", "name": "n", "term": "t",
                         "content": "c"},
            "locale": "en-GB", "ip": "10.0.0.1", "userAgent": "UA", "timezone": "Europe/Paris",
        },
    }),
    ("consent in both shapes", {
        "type": "track", "event": "E",
        "context": {"consent": {"canonical": {"analytics": True}, "categories": ["C0001"],
                                "analytics": "granted"}},
    }),
    ("consent that is not an object", {"type": "track", "context": {"consent": "yes"}}),
    ("group", {"type": "group", "groupId": "g", "traits": {"plan": "pro", "seats": 12}}),
]


@pytest.mark.parametrize("event", [e for _, e in ROUND_TRIPS], ids=[n for n, _ in ROUND_TRIPS])
def test_round_trip_gives_identical_json(event: dict[str, Any]) -> None:
    decoded = roundtrip(event)
    assert decoded == event
    # Equality of Python objects is not enough for 1 vs 1.0 or True vs 1: compare JSON text.
    assert json.dumps(decoded, sort_keys=True) == json.dumps(event, sort_keys=True)


def test_large_integer_keeps_every_digit_and_int_type() -> None:
    decoded = roundtrip({"type": "track", "properties": {"big": 2**64 + 1}})
    assert decoded["properties"]["big"] == 18446744073709551617
    assert type(decoded["properties"]["big"]) is int


def test_float_and_int_types_are_kept() -> None:
    decoded = roundtrip({"type": "track", "properties": {"f": 1.0, "i": 1, "b": True}})
    assert [type(decoded["properties"][k]) for k in "fib"] == [float, int, bool]


@pytest.mark.parametrize("key", [
    "event", "name", "userId", "anonymousId", "groupId", "timestamp", "messageId",
    "receivedAt", "sentAt", "properties", "traits", "context",
])
def test_envelope_null_and_absent_are_the_same(key: str) -> None:
    with_null = {"type": "track", key: None}
    assert roundtrip(with_null) == {"type": "track"}
    assert codec.to_record(with_null) == codec.to_record({"type": "track"})


@pytest.mark.parametrize("key", ["locale", "ip", "userAgent", "timezone", "consent", "page",
                                 "device", "campaign"])
def test_typed_context_null_is_left_out(key: str) -> None:
    assert roundtrip({"type": "track", "context": {key: None}}) == {
        "type": "track", "context": {}}


def test_unknown_context_keys_travel_in_extra() -> None:
    record = codec.to_record({
        "type": "track", "context": {"os": "linux", "page": {"url": "u", "hash": "#x"},
                                     "locale": 5}})
    assert json.loads(record["context"]["extra"]) == {
        "os": "linux", "page": {"hash": "#x"}, "locale": 5}
    assert record["context"]["page"]["url"] == "u"
    assert record["context"].get("locale") is None


def test_record_without_unknown_context_keys_has_no_extra() -> None:
    record = codec.to_record({"type": "track", "context": {"locale": "en"}})
    assert record["context"]["extra"] is None


def test_wire_format_header() -> None:
    data = codec.encode(258, codec.to_record({"type": "track"}))
    assert data[0] == codec.MAGIC_BYTE == 0
    assert struct.unpack(">I", data[1:5]) == (258,)
    schema_id, body = codec.split_wire(data)
    assert schema_id == 258
    assert bytes(body) == data[5:]


def test_decode_passes_the_schema_id_to_the_lookup() -> None:
    seen: list[int] = []

    def lookup(schema_id: int) -> Mapping[str, Any]:
        seen.append(schema_id)
        return codec.SCHEMA

    codec.decode(codec.encode(123456, codec.to_record({"type": "track"})), lookup)
    assert seen == [123456]


def test_decode_with_an_equal_but_separately_parsed_writer_schema() -> None:
    """The registry edge parses what the registry returns: not the identical object."""
    writer = fastavro.parse_schema(json.loads(codec.SCHEMA_TEXT))
    assert writer is not codec.SCHEMA
    event = ROUND_TRIPS[1][1]
    assert roundtrip(event, lambda _id: cast(Mapping[str, Any], writer)) == event


# ------------------------------------------------------------------ to_record errors

@pytest.mark.parametrize(("event", "names"), [
    ({"type": "track", "evnt": "E"}, ["evnt"]),
    ({"type": "track", "zzz": 1, "aaa": 2}, ["aaa", "zzz"]),
    ({"type": 7}, ["type", "7"]),
    ({}, ["type", "None"]),
    ({"type": "track", "event": 5}, ["event", "int"]),
    ({"type": "track", "userId": 42}, ["userId", "int"]),
    ({"type": "track", "messageId": ["m"]}, ["messageId", "list"]),
    ({"type": "track", "timestamp": 1714560000}, ["timestamp", "int"]),
    ({"type": "track", "properties": [1, 2]}, ["properties", "list"]),
    ({"type": "track", "properties": "x"}, ["properties", "str"]),
    ({"type": "identify", "traits": 3}, ["traits", "int"]),
    ({"type": "track", "context": "web"}, ["context", "str"]),
])
def test_to_record_errors_name_the_field(event: dict[str, Any], names: list[str]) -> None:
    with pytest.raises(InvalidEvent) as info:
        codec.to_record(event)
    for name in names:
        assert name in str(info.value)
    assert info.value.reason == "invalid_event"


@pytest.mark.parametrize("event", [[], "track", None, 3])
def test_to_record_refuses_non_objects(event: Any) -> None:
    with pytest.raises(InvalidEvent, match="JSON object"):
        codec.to_record(event)


# ------------------------------------------------------------------ decode errors

GOOD = codec.encode(1, codec.to_record(ROUND_TRIPS[1][1]))


def missing_schema(schema_id: int) -> Mapping[str, Any]:
    raise KeyError(schema_id)


@pytest.mark.parametrize(("data", "lookup", "fragment"), [
    (None, own_schema, "tombstone"),
    (b"", own_schema, "0 bytes"),
    (b"\x00\x00\x00", own_schema, "3 bytes"),
    (b"\x00\x00\x00\x00", own_schema, "4 bytes"),
    (b"\x01" + GOOD[1:], own_schema, "magic byte 1"),
    (b"\xff" + GOOD[1:], own_schema, "magic byte 255"),
    (b"{" + GOOD[1:], own_schema, "magic byte 123"),
    (GOOD, missing_schema, "unknown schema id 1"),
    (GOOD[:5], own_schema, "Avro: truncated"),
    (GOOD[:-1], own_schema, "Avro: truncated"),
    (GOOD[: len(GOOD) // 2], own_schema, "Avro: truncated"),
    (GOOD + b"\x00", own_schema, "1 trailing bytes"),
    (GOOD + b"garbage", own_schema, "7 trailing bytes"),
    (b"\x00\x00\x00\x00\x01" + b"\x02\xff", own_schema, "Avro"),  # invalid UTF-8 in type
    (b"\x00\x00\x00\x00\x01" + b"\x02t\x09", own_schema, "Avro"),  # union index out of range
    (json.dumps({"type": "track"}).encode(), own_schema, "magic byte"),
])
def test_decode_errors_are_undecodable(
    data: bytes | None, lookup: codec.SchemaLookup, fragment: str
) -> None:
    with pytest.raises(UndecodableEvent) as info:
        codec.decode(data, lookup)
    assert fragment in str(info.value)
    assert info.value.reason == "undecodable"


def test_invalid_utf8_in_a_string_becomes_a_replacement_character() -> None:
    """A producer that cut a string inside a multi-byte character: the event is decoded
    with U+FFFD there (as Java's Avro does), not dead-lettered for ever."""
    record = codec.to_record({**ROUND_TRIPS[1][1], "userId": "user-\u00e9-1"})
    data = codec.encode(1, record)
    cut = data.replace("user-\u00e9-1".encode(), b"user-\xc3--1")
    assert cut != data and len(cut) == len(data)
    event = codec.decode(cut, own_schema)
    assert event["userId"] == "user-\ufffd--1"
    assert codec.decode(data, own_schema)["userId"] == "user-\u00e9-1"


def test_lookup_errors_other_than_key_error_propagate() -> None:
    """A registry outage is not a bad event: it must not be dead-lettered."""
    def down(schema_id: int) -> Mapping[str, Any]:
        raise ConnectionError("registry down")

    with pytest.raises(ConnectionError):
        codec.decode(GOOD, down)


def test_random_bytes_never_escape_as_another_exception() -> None:
    rng = random.Random(20240501)
    undecodable = 0
    for _ in range(2000):
        body = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 64)))
        data = b"\x00\x00\x00\x00\x01" + body if rng.random() < 0.8 else body
        try:
            event = codec.decode(data, own_schema)
        except UndecodableEvent:
            undecodable += 1
        else:  # a random body that happens to be valid Avro must still be an event shape
            assert isinstance(event, codec.Event)
            assert isinstance(event["type"], str)
    assert undecodable > 1900


def test_json_fields_that_are_not_json_text_are_undecodable() -> None:
    record = codec.to_record({"type": "track"})
    record["properties"] = "{not json"
    event = codec.decode(codec.encode(1, record), own_schema)  # envelope only: not parsed
    assert event.get("type") == "track"
    with pytest.raises(UndecodableEvent, match="properties"):
        event.get("properties")


def test_an_integer_past_pythons_digit_limit_reads_as_an_infinity_not_a_dead_letter() -> None:
    """Valid JSON, but over int_max_str_digits (4,300): the whole event was dead-lettered as
    undecodable, for good (review "poison21"). It reads as an infinity, which the mapping
    leaves out like NaN; the rest of the field is kept."""
    record = codec.to_record({"type": "track"})
    huge, low = "9" * 5000, "1" * 4400
    record["properties"] = f'{{"huge": {huge}, "low": -{low}, "ok": 7}}'
    event = codec.decode(codec.encode(1, record), own_schema)
    assert event.get("properties") == {"huge": float("inf"), "low": float("-inf"), "ok": 7}


def test_a_huge_integer_in_broken_or_too_deep_json_is_still_undecodable() -> None:
    """The second read (huge integers as infinities) raised JSONDecodeError or
    RecursionError out of the event: dead-lettered as `mapping_error`, the reason that
    points operators at their mapping rules (review "diff21")."""
    huge = "9" * 5000
    for text, reason in ((f'{{"huge": {huge}, "broken": }}', "not valid JSON"),
                         (f'{{"huge": {huge}, "deep": {"[" * 5000}{"]" * 5000}}}',
                          "nested deeper")):
        record = codec.to_record({"type": "track"})
        record["properties"] = text
        event = codec.decode(codec.encode(1, record), own_schema)
        with pytest.raises(UndecodableEvent, match=reason):
            event.get("properties")


# ------------------------------------------------------------------ schema evolution

def _schema_json() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(codec.SCHEMA_TEXT)
    return loaded


def _older_schema() -> dict[str, Any]:
    """What a producer registered before sentAt/receivedAt and context.extra existed."""
    old = _schema_json()
    old["fields"] = [f for f in old["fields"] if f["name"] not in ("sentAt", "receivedAt")]
    context = next(f for f in old["fields"] if f["name"] == "context")
    context["type"][1]["fields"] = [
        f for f in context["type"][1]["fields"] if f["name"] != "extra"]
    parsed = cast(dict[str, Any], fastavro.parse_schema(old))
    return parsed


def _newer_schema() -> dict[str, Any]:
    """A later producer adds optional fields with defaults (top level and in context)."""
    new = _schema_json()
    new["fields"].append({"name": "tenant", "type": ["null", "string"], "default": None})
    new["fields"].append({"name": "priority", "type": "int", "default": 0})
    context = next(f for f in new["fields"] if f["name"] == "context")
    context["type"][1]["fields"].append(
        {"name": "app", "type": ["null", "string"], "default": None})
    parsed = cast(dict[str, Any], fastavro.parse_schema(new))
    return parsed


def test_older_writer_schema_decodes_with_defaults() -> None:
    writer = _older_schema()
    record = {
        "type": "track", "event": "Feature Used", "name": None,
        "properties": '{"feature":"export_csv","n":18446744073709551617}', "traits": None,
        "userId": "user_001", "anonymousId": "anon_1", "groupId": None,
        "context": {"page": {"url": "https://a.b/", "path": None, "referrer": None,
                             "title": None, "search": None},
                    "device": None, "campaign": None, "locale": "en", "ip": None,
                    "userAgent": None, "timezone": None, "consent": '{"analytics":true}'},
        "timestamp": "2024-05-01T12:00:00Z", "messageId": "m-1",
    }
    data = codec.encode(3, record, schema=writer)
    assert codec.decode(data, lambda _id: writer) == {
        "type": "track", "event": "Feature Used", "userId": "user_001", "anonymousId": "anon_1",
        "properties": {"feature": "export_csv", "n": 18446744073709551617},
        "context": {"page": {"url": "https://a.b/"}, "locale": "en",
                    "consent": {"analytics": True}},
        "timestamp": "2024-05-01T12:00:00Z", "messageId": "m-1",
    }


def test_newer_writer_schema_extra_fields_are_ignored() -> None:
    writer = _newer_schema()
    event = ROUND_TRIPS[1][1]
    record = codec.to_record(event)
    record["tenant"] = "acme"
    record["priority"] = 5
    record["context"] = {**record["context"], "app": "web"}
    data = codec.encode(4, record, schema=writer)
    assert codec.decode(data, lambda _id: writer) == event


def test_writer_schemas_are_not_confused_by_id() -> None:
    """Several writer versions live side by side; each id resolves with its own schema."""
    schemas = {1: _older_schema(), 2: codec.SCHEMA, 3: _newer_schema()}
    event = {"type": "track", "event": "E", "userId": "u"}
    base = codec.to_record(event)
    records = {
        1: {k: v for k, v in base.items() if k not in ("sentAt", "receivedAt")},
        2: base,
        3: {**base, "tenant": None, "priority": 1},
    }
    for schema_id, record in records.items():
        data = codec.encode(schema_id, record, schema=schemas[schema_id])
        assert codec.decode(data, schemas.__getitem__) == event


def test_decoding_with_the_wrong_writer_schema_fails_or_differs() -> None:
    """The body alone does not say which schema wrote it: the id must be honoured."""
    writer = _newer_schema()
    record = {**codec.to_record({"type": "track", "event": "E"}), "tenant": "acme",
              "priority": 9}
    data = codec.encode(4, record, schema=writer)
    with pytest.raises(UndecodableEvent):
        codec.decode(data, own_schema)


def test_older_schema_copy_does_not_mutate_ours() -> None:
    before = copy.deepcopy(json.loads(codec.SCHEMA_TEXT))
    _older_schema()
    _newer_schema()
    assert json.loads(codec.SCHEMA_TEXT) == before
    event = ROUND_TRIPS[1][1]
    assert roundtrip(event) == event


def test_envelope_is_the_record_and_decode_refuses_what_split_wire_refuses() -> None:
    """The inlined wire header of `decode` keeps `split_wire`'s reasons."""
    record = codec.to_record({"type": "track", "event": "E", "userId": "u",
                              "properties": {"a": 1}})
    event = codec.decode(codec.encode(3, record), lambda _i: codec.SCHEMA)
    assert event.envelope["userId"] == "u"
    assert event.envelope["properties"] == '{"a":1}'  # raw text there, parsed through get
    assert event["properties"] == {"a": 1}
    for data, reason in ((None, "tombstone"), (b"\x00\x01", "shorter"),
                         (b"\x01\x00\x00\x00\x03rest", "magic")):
        with pytest.raises(UndecodableEvent, match=reason):
            codec.decode(data, lambda _i: codec.SCHEMA)


# ------------------------------------------------------------------ writer schema shapes

_NODE = {"type": "record", "name": "Node", "namespace": "t",
         "fields": [{"name": "next", "type": ["null", "Node"], "default": None}]}


def _named(schema: dict[str, Any]) -> dict[str, Any]:
    named: dict[str, Any] = {}
    fastavro.parse_schema(copy.deepcopy(schema), named_schemas=named)
    return named


def test_self_referencing_finds_a_type_that_can_contain_itself() -> None:
    direct = {"type": "record", "name": "E", "namespace": "t",
              "fields": [{"name": "trail", "type": ["null", _NODE], "default": None}]}
    assert codec.self_referencing(_named(direct))
    # Through another type, and through an array or a map.
    a = {"type": "record", "name": "A", "namespace": "t", "fields": [
        {"name": "b", "type": {"type": "record", "name": "B", "fields": [
            {"name": "as", "type": {"type": "map", "values": {
                "type": "array", "items": "A"}}}]}}]}
    assert codec.self_referencing(_named(a))
    # A named type used twice side by side is no recursion.
    point = {"type": "record", "name": "P", "fields": [{"name": "x", "type": "int"}]}
    twice = {"type": "record", "name": "T", "namespace": "t", "fields": [
        {"name": "from_", "type": point}, {"name": "to", "type": "t.P"},
        {"name": "kind", "type": {"type": "enum", "name": "K", "symbols": ["A"]}}]}
    assert not codec.self_referencing(_named(twice))
    assert not codec.self_referencing(_named(json.loads(codec.SCHEMA_TEXT)))


def test_plain_types_drops_logical_types_only() -> None:
    schema = {"type": "record", "name": "R", "fields": [
        {"name": "id", "type": {"type": "string", "logicalType": "uuid"}},
        {"name": "at", "type": ["null", {"type": "long", "logicalType": "timestamp-millis"}]},
        {"name": "n", "type": "int", "doc": "logicalType"}]}
    assert codec.plain_types(schema) == {"type": "record", "name": "R", "fields": [
        {"name": "id", "type": {"type": "string"}},
        {"name": "at", "type": ["null", {"type": "long"}]},
        {"name": "n", "type": "int", "doc": "logicalType"}]}


def test_free_items_finds_arrays_whose_items_take_no_bytes() -> None:
    """A count costs a few bytes whatever it says: 2^62 null items in a 164-byte event
    kept fastavro skipping in C, the GIL held, for ever."""
    def with_field(field_type: Any) -> dict[str, Any]:
        return {"type": "record", "name": "E", "namespace": "t",
                "fields": [{"name": "x", "type": field_type}]}

    empty = {"type": "record", "name": "Nothing", "fields": []}
    zero = {"type": "fixed", "name": "Z", "size": 0}
    for free in ({"type": "array", "items": "null"},
                 ["null", {"type": "array", "items": empty}],
                 {"type": "map", "values": {"type": "array", "items": zero}},
                 {"type": "array", "items": {"type": "record", "name": "N2", "fields": [
                     {"name": "a", "type": "null"}, {"name": "b", "type": zero}]}}):
        schema = with_field(free)
        assert codec.free_items(_named(schema), schema) is not None, free
    for costly in ({"type": "array", "items": "boolean"},
                   {"type": "array", "items": ["null", "int"]},
                   {"type": "array", "items": {"type": "enum", "name": "K", "symbols": ["A"]}},
                   {"type": "map", "values": "null"},
                   ["null", _NODE]):
        schema = with_field(costly)
        assert codec.free_items(_named(schema), schema) is None, costly
    assert codec.free_items(_named(json.loads(codec.SCHEMA_TEXT)),
                            json.loads(codec.SCHEMA_TEXT)) is None


def test_unread_items_finds_arrays_skipped_without_reading_a_byte() -> None:
    """Review "big43": fastavro's compiled reader skips fixed-width items by moving its
    position, never meeting the message's end: 2^62 doubles declared, it spun for ever."""
    def with_field(field_type: Any) -> dict[str, Any]:
        return {"type": "record", "name": "E", "namespace": "t",
                "fields": [{"name": "x", "type": field_type}]}

    point = {"type": "record", "name": "P", "fields": [{"name": "a", "type": "double"},
                                                      {"name": "b", "type": "boolean"}]}
    for spins in ({"type": "array", "items": "boolean"},
                  {"type": "array", "items": {"type": "float"}},
                  ["null", {"type": "array", "items": "double"}],
                  {"type": "map", "values": {"type": "array", "items": point}},
                  {"type": "array", "items": {"type": "fixed", "name": "F", "size": 16}}):
        schema = with_field(spins)
        assert (codec.unread_items(_named(schema), schema) or "").startswith("E.x"), spins
        assert codec.free_items(_named(schema), schema) is None, spins
    for read in ({"type": "array", "items": "int"},
                 {"type": "array", "items": "string"},
                 {"type": "array", "items": ["null", "double"]},
                 {"type": "array", "items": {"type": "record", "name": "Q", "fields": [
                     {"name": "a", "type": "double"}, {"name": "b", "type": "long"}]}},
                 {"type": "array", "items": "null"},  # free_items refuses it
                 {"type": "map", "values": "double"},  # each key's length is read
                 ["null", _NODE]):
        schema = with_field(read)
        assert codec.unread_items(_named(schema), schema) is None, read
    assert codec.unread_items(_named(json.loads(codec.SCHEMA_TEXT)),
                              json.loads(codec.SCHEMA_TEXT)) is None


# ------------------------------------------------------------------ context.page alone

def decoded_with_extra(page: dict[str, Any] | None, extra: str | None) -> codec.Event:
    """A decoded page event whose ``context.extra`` travels as the text given."""
    record = codec.to_record({"type": "page", "userId": "u",
                              "context": {"page": page} if page is not None else {}})
    if record["context"] is None:
        record["context"] = codec.to_record({"type": "page", "context": {"locale": "x"}}
                                            )["context"]
    record["context"]["extra"] = extra
    return codec.decode(codec.encode(7, record), own_schema)


@pytest.mark.parametrize("extra", [
    "{", "\ufeff{}", "[" * 300 + "]" * 300,
    '{"campaign": {"source": ' + "[" * 300 + "]" * 300 + "}}",
    # Backslashes in values (review "diff42": any backslash made the text readable)
    '{"note": "say \\"hi\\"", "deep": ' + "[" * 300 + "]" * 300 + "}",
    '{"ref": "https:\\/\\/x.io\\/", "deep": ' + "[" * 300 + "]" * 300 + "}",
    '\ufeff{"path": "C:\\\\tmp"}'])
def test_a_page_reads_its_page_without_the_rest_of_a_broken_extra(extra: str) -> None:
    """Review poison26: a page view dead-lettered for context text it does not use."""
    event = decoded_with_extra({"url": "https://a.example/x", "title": "X"}, extra)
    assert event.page == {"url": "https://a.example/x", "title": "X"}
    with pytest.raises(UndecodableEvent):
        assert event["context"] is None  # the whole context still refuses it


@pytest.mark.parametrize("extra", ['{"page": {"title": "Y", "name": "n"}, "a": 1}',
                                   '{"p\\u0061ge": {"title": "Y", "name": "n"}}'])
def test_extras_page_keys_go_over_the_typed_ones_as_in_the_whole_context(extra: str) -> None:
    event = decoded_with_extra({"url": "u", "title": "X"}, extra)
    expected = {"url": "u", "title": "Y", "name": "n"}
    assert event.page == expected
    fresh = decoded_with_extra({"url": "u", "title": "X"}, extra)
    assert fresh["context"]["page"] == expected
    assert fresh.page == expected  # read from the parsed context once it exists


@pytest.mark.parametrize(("page", "extra", "expected"), [
    (None, None, None),
    (None, '{"page": {"title": "Y"}}', {"title": "Y"}),
    ({"url": "u"}, '{"page": "a string"}', "a string"),
    ({"url": "u"}, '{"other": {"page": 1}}', {"url": "u"}),
    ({"url": "u"}, '["page"]', {"url": "u"}),
])
def test_page_agrees_with_the_whole_context(page: dict[str, Any] | None, extra: str | None,
                                            expected: Any) -> None:
    assert decoded_with_extra(page, extra).page == expected
    whole = decoded_with_extra(page, extra)["context"]
    assert whole.get("page") == expected


def test_an_extra_page_that_is_broken_is_still_undecodable() -> None:
    """What the page view uses, broken, is a malformed event: dead-lettered."""
    event = decoded_with_extra({"url": "u"}, '{"page": {"title": ')
    with pytest.raises(UndecodableEvent):
        assert event.page is None


def test_extra_is_parsed_once_for_the_page_and_the_whole_context() -> None:
    """Review diff26: `page` parsed `context.extra` again after (or before) the whole
    context did: twice the CPU, and its lone surrogates counted twice."""
    record = codec.to_record({"type": "page", "userId": "u",
                              "context": {"page": {"url": "u", "custom": "a\ud800b"}}})
    event = codec.decode(codec.encode(7, record), own_schema)
    assert event.page["custom"] == "a\ufffdb"
    assert event["context"]["page"]["custom"] == "a\ufffdb"
    assert event.replaced == 1


_KEYS = st.sampled_from(["page", "campaign", "app", "locale", "consent", "debug", "p/g",
                         'q"t', "x"])
_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.text(max_size=3))
_JSONISH = st.recursive(_LEAF, lambda inner: st.dictionaries(_KEYS, inner, max_size=3),
                        max_leaves=6)


def _context_text(value: Any, escaped: bool) -> str:
    text = json.dumps(value)
    return text.replace("/", "\\/") if escaped else text


@settings(max_examples=300, deadline=None)
@given(typed=st.fixed_dictionaries({}, optional={
           "page": st.fixed_dictionaries({}, optional={"url": st.text(max_size=3)}),
           "campaign": st.fixed_dictionaries({}, optional={"source": st.text(max_size=3)}),
           "locale": st.text(max_size=3),
           "consent": st.fixed_dictionaries({}, optional={"analytics": st.booleans()})}),
       extra=st.one_of(st.none(), st.dictionaries(_KEYS, _JSONISH, max_size=4), _JSONISH),
       escaped=st.booleans(), key=_KEYS)
def test_one_context_key_agrees_with_the_whole_context(typed: dict[str, Any], extra: Any,
                                                       escaped: bool, key: str) -> None:
    """`context_key` reads one key as the whole context gives it (review "seed42")."""
    def event() -> codec.Event:
        record = codec.to_record({"type": "track", "event": "E", "userId": "u",
                                  "context": {**typed, "ip": "1.2.3.4"}})
        record["context"]["extra"] = None if extra is None else _context_text(extra, escaped)
        return codec.decode(codec.encode(7, record), own_schema)
    missing = object()
    assert event().context_key(key, missing) == event()["context"].get(key, missing)
    whole = event()
    _ = whole["context"]
    assert whole.context_key(key, missing) == whole["context"].get(key, missing)


@pytest.mark.parametrize("text", [{"consent": "not json"},
                                  {"extra": '{"debug": ' + "[" * 300 + "]" * 300 + "}"},
                                  {"extra": '{"app": {"x": 1}, "oops": }'}])
def test_a_rule_picking_one_context_key_reads_no_other(text: dict[str, str]) -> None:
    """The docs' own rule, ``"utm_source": "context.campaign.source"``, parsed the whole
    context: consent text or another key of ``extra`` broken dead-lettered events the
    Default preset delivered (README, "Payload limits": unused text stops nothing; review
    "seed42")."""
    from consumer.filtering import ConsentPolicy
    from consumer.mapping import load_mappings
    from consumer.routing import Send, route

    rule = load_mappings({"events": {"Feature Used": {
        "fields": {"utm_source": "context.campaign.source", "lang": "context.locale",
                   "nothing": "context.nosuchkey.x"}}}})
    record = codec.to_record({"type": "track", "event": "Feature Used", "userId": "u1",
                              "context": {"campaign": {"source": "google"}, "locale": "fr"}})
    record["context"].update(text)
    event = codec.decode(codec.encode(7, record), own_schema)
    decision = route(event, ConsentPolicy(categories=()), rule)
    assert isinstance(decision, Send)
    metadata = decision.payload["metadata"]
    assert metadata["utm_source"] == "google" and metadata["lang"] == "fr"
    assert "nothing" not in metadata
    with pytest.raises(UndecodableEvent):
        assert event["context"] is None  # the whole context still refuses it


def test_an_infinite_number_is_written_as_one_too_large_for_a_double() -> None:
    """Review "events28": JSON's `1e400` reads as infinity; the record's text says 1e999 (as
    large, and JSON), which the worker reads back as infinity, not a refusal."""
    record = codec.to_record({"type": "track", "properties": {
        "a": float("inf"), "b": [float("-inf"), 1.5], "c": "@@x@@"}})
    assert record["properties"] == '{"a":1e999,"b":[-1e999,1.5],"c":"@@x@@"}'
    assert json.loads(record["properties"]) == {"a": float("inf"), "b": [float("-inf"), 1.5],
                                                "c": "@@x@@"}


def test_a_nan_is_written_as_the_nan_the_worker_reads() -> None:
    """Review "events29": refused here, `explain` called a dead letter (and `produce`
    refused) an event whose JSON text says NaN, which `run` reads and leaves out."""
    record = codec.to_record({"type": "track", "properties": {
        "x": float("nan"), "y": [float("nan"), float("inf")], "z": 1},
        "traits": {"t": float("-nan")}, "context": {"consent": {"a": float("nan")}}})
    assert record["properties"] == '{"x":NaN,"y":[NaN,1e999],"z":1}'
    assert record["traits"] == '{"t":NaN}'
    assert record["context"]["consent"] == '{"a":NaN}'
    assert codec.to_record({"type": "track", "context": {"os": float("nan")}})["context"][
        "extra"] == '{"os":NaN}'
    read = codec.loads(record["properties"])
    assert math.isnan(read["x"]) and math.isnan(read["y"][0]) and read["z"] == 1


# ------------------------------------------------------------------ bytes read as strings

def _writer_with_bytes(root_name: str, field: str = "userId") -> dict[str, Any]:
    """Our schema as a producer might declare it: its root named `root_name`
    (TopicRecordNameStrategy), `field` as bytes (Avro promotes bytes to string)."""
    schema: dict[str, Any] = copy.deepcopy(json.loads(codec.SCHEMA_TEXT))
    schema["name"] = root_name
    for each in schema["fields"]:
        if each["name"] == "context":  # its records keep our namespace
            each["type"][1]["namespace"] = "io.datafly.signal"
        if each["name"] == field:
            each["type"] = ["null", "bytes"]
    return schema


class _Docs:
    """A registry serving one schema, and its references from `refs` by subject."""

    def __init__(self, text: str, refs: Mapping[str, str] | None = None) -> None:
        self.text, self.refs = text, dict(refs or {})

    def get_schema(self, schema_id: int) -> Any:
        from consumer.registry import Reference, SchemaDoc
        return SchemaDoc(self.text, tuple(Reference(s, s, 1) for s in self.refs))

    def get_version(self, subject: str, version: int) -> Any:
        from consumer.registry import SchemaDoc
        return SchemaDoc(self.refs[subject])


def _decide(docs: _Docs, body: bytes) -> Any:
    from consumer.handler import Event
    from consumer.registry import Registry
    from tests.unit.test_handler import Client, handler_for
    from tests.unit.test_handler import settings as handler_settings

    handler, _dlq, _limiter, _reg = handler_for(
        handler_settings(USERPILOT_CONSENT_CATEGORIES="none"), Client())
    handler.registry = Registry("http://unused", client=docs)
    handler.registry.writer_schema(5)  # what the worker's fetch does
    event = Event("t", 0, 0, b"k", b"k", struct.pack(">Bi", 0, 5) + body, [], 1)
    assert handler.decide(event)
    return event.decision


CUT = "user_é".encode()[:-1]  # a producer cut it inside the character


@pytest.mark.parametrize("root_name", ["com.acme.TrackEvent", "com.acme.Page",
                                       "com.acme.Device", "com.acme.Context", "union"])
def test_a_cut_character_in_bytes_is_replaced_whatever_the_root_is_called(
        root_name: str) -> None:
    """Our record to compare a writer's with was chosen by name: a root named like one of
    our inner records, or a union root, kept its bytes, and fastavro's strict promotion
    dead-lettered the event for good (review "fuzz42")."""

    track = _writer_with_bytes("com.acme.TrackEvent" if root_name == "union" else root_name)
    schema: Any = track
    datum: Any = {"type": "track", "event": "Feature Used", "userId": CUT,
                  "properties": '{"a": 1}', "context": None}
    if root_name == "union":
        schema = [{"type": "record", "name": "com.acme.Heartbeat",
                   "fields": [{"name": "at", "type": "long"}]}, track]
        datum = ("com.acme.TrackEvent", datum)
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(schema), datum)
    decision = _decide(_Docs(json.dumps(schema)), buf.getvalue())
    # Read (not `undecodable`): a userId read so is then refused as an id (review "users42")
    assert isinstance(decision, InvalidEvent), f"{root_name}: {decision!r}"
    assert "the user id holds invalid UTF-8" in str(decision)


@pytest.mark.parametrize("context_name", ["com.acme.Context", "com.acme.EventContext"])
def test_a_cut_character_in_a_referenced_records_bytes_is_replaced(context_name: str) -> None:
    """A context record kept in a subject of its own under a name of its own was compared
    with our root record (review "fuzz42")."""
    from consumer.routing import Send

    ours = json.loads(codec.SCHEMA_TEXT)
    context = copy.deepcopy(next(f for f in ours["fields"]
                                 if f["name"] == "context")["type"][1])
    context["name"], context["namespace"] = context_name, "io.datafly.signal"
    for each in context["fields"]:
        if each["name"] == "locale":
            each["type"] = ["null", "bytes"]
    root = copy.deepcopy(ours)
    root["name"] = "com.acme.TrackEvent"
    for each in root["fields"]:
        if each["name"] == "context":
            each["type"] = ["null", context_name]
    named: dict[str, Any] = {}
    fastavro.parse_schema(context, named_schemas=named)
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(root, named_schemas=named), {
        "type": "track", "event": "Feature Used", "userId": "u1", "properties": "{}",
        "context": {"locale": "fr-é".encode()[:-1]}})
    decision = _decide(_Docs(json.dumps(root), {"ctx": json.dumps(context)}), buf.getvalue())
    assert isinstance(decision, Send), repr(decision)


# ------------------------------------------------------- envelope_of (the drop path's head)

_HEAD_TEXT = st.one_of(st.none(), st.text(max_size=3), st.text(min_size=60, max_size=200),
                       st.sampled_from(["Feature Used", "u1", " ", "é✓😀"]))


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(["track", "page", "identify", "group", "screen", "x" * 70]),
       head=st.fixed_dictionaries({name: _HEAD_TEXT for name in (
           "event", "name", "userId", "anonymousId", "groupId")}),
       properties=st.one_of(st.none(),
                            st.dictionaries(st.text(max_size=5), st.text(), max_size=30)),
       traits=st.one_of(st.none(), st.dictionaries(st.text(max_size=5), st.integers())))
def test_envelope_of_reads_the_head_as_decode_reads_it(
        kind: str, head: dict[str, str | None], properties: dict[str, Any] | None,
        traits: dict[str, Any] | None) -> None:
    """Every screened string, of any length (a varint of several bytes), as decode gives it;
    an absent one absent; the JSON text before userId skipped by its length."""
    doc = {"type": kind, **head, "properties": properties, "traits": traits,
           "context": {"consent": {"analytics": True}}, "messageId": "m"}
    wire = codec.encode(7, codec.to_record(doc))
    record = codec.decode(wire, own_schema).envelope
    expected = {name: record[name] for name in codec.SCREENED if record.get(name) is not None}
    assert codec.envelope_of(wire, own_schema) == expected


def test_envelope_of_leaves_to_decode_what_it_cannot_read_plainly() -> None:
    wire = codec.encode(7, codec.to_record({"type": "track", "event": "E", "userId": "u1"}))
    assert codec.envelope_of(wire, own_schema) == {"type": "track", "event": "E", "userId": "u1"}
    # another writer schema (resolved by fastavro), a wrong magic byte, a short message
    other = cast(dict[str, Any], fastavro.parse_schema(json.loads(codec.SCHEMA_TEXT)))
    assert codec.envelope_of(wire, lambda _id: other) is None
    assert codec.envelope_of(b"\x01" + wire[1:], own_schema) is None
    assert codec.envelope_of(wire[:4], own_schema) is None
    # cut inside the head; a union index that is neither branch; a negative length
    assert codec.envelope_of(wire[:9], own_schema) is None
    bad_branch = wire[:5] + wire[5:].replace(b"\x02\x02E", b"\x04\x02E", 1)
    assert codec.envelope_of(bad_branch, own_schema) is None
    negative = wire[:5] + wire[5:].replace(b"\x02\x02E", b"\x02\x03E", 1)
    assert codec.envelope_of(negative, own_schema) is None
    # invalid UTF-8 in a screened string: decode reads it as U+FFFD (and notes the cut)
    cut = wire.replace(b"\x04u1", b"\x04u\xe2", 1)
    assert codec.envelope_of(cut, own_schema) is None
    assert codec.decode(cut, own_schema).cut == frozenset({"userId"})
    # the lookup's exception propagates (decode maps KeyError; the caller decides here)
    with pytest.raises(KeyError):
        codec.envelope_of(wire, lambda _id: cast(dict[int, Any], {})[_id])


def test_envelope_of_is_off_when_the_schema_no_longer_starts_with_strings() -> None:
    changed = copy.deepcopy(codec.SCHEMA_JSON)
    changed["fields"].insert(1, {"name": "version", "type": "int"})
    assert codec._head_layout(changed) == ()
    assert [name for name, _, kept in codec._HEAD if kept] == list(codec.SCREENED)


@pytest.mark.parametrize("size", [63, 64, 8191, 8192, 2**20 + 3])
@pytest.mark.parametrize("where", ["properties", "anonymousId", "userId", "event"])
def test_envelope_of_reads_past_lengths_of_three_and_four_varint_bytes(
        size: int, where: str) -> None:
    """Lengths of 8192 bytes and more take three varint bytes, of 2**20 four (review
    "diff46a": the property test's strings stop short of them)."""
    doc: dict[str, Any] = {"type": "track", "event": "Feature Used", "userId": "u1",
                           "groupId": "g", "anonymousId": "a", "messageId": "m"}
    doc[where] = {"k": "x" * size} if where == "properties" else "x" * size
    wire = codec.encode(7, codec.to_record(doc))
    record = codec.decode(wire, own_schema).envelope
    assert codec.envelope_of(wire, own_schema) == {
        name: record[name] for name in codec.SCREENED if record.get(name) is not None}


def test_envelope_of_leaves_a_body_cut_inside_its_last_string_to_decode() -> None:
    """groupId is the last string read: a body cut inside it is not read short."""
    wire = codec.encode(7, codec.to_record({
        "type": "track", "event": "Nobody Maps This", "userId": "u1",
        "groupId": "acme-corporation", "messageId": "m"}))
    assert codec.envelope_of(wire[:wire.index(b"acme") + 4], own_schema) is None


@pytest.mark.parametrize("escape", ["\\ud83d", "\\uD83D"])
def test_a_lone_surrogate_escape_in_either_case_is_replaced(escape: str) -> None:
    """JSON escapes are case-insensitive: "\\uD83D" is the same lone surrogate as "\\ud83d".
    Left in, the body cannot be encoded as UTF-8 and the event is dead-lettered instead of
    delivered with U+FFFD (and an id holding it is not refused as ambiguous)."""
    event = codec.Event({"type": "track", "userId": "u", "event": "Feature Used",
                         "properties": '{"name": "x' + escape + '"}'})
    assert event["properties"] == {"name": "x\ufffd"}
    assert event.replaced == 1
    encode_body(event["properties"])


def test_a_lone_surrogate_in_a_key_is_replaced() -> None:
    event = codec.Event({"type": "track", "userId": "u", "event": "Feature Used",
                         "properties": '{"k\\ud83d": 1}'})
    assert event["properties"] == {"k\ufffd": 1}
    encode_body(event["properties"])


def _tree(depth: int, leaf: Any = "null") -> dict[str, Any]:
    """A binary tree of named records, each level defined once (a schema of a few KB)."""
    node: dict[str, Any] = {"type": "record", "name": f"L{depth}",
                            "fields": [{"name": "x", "type": leaf}]}
    for d in range(depth - 1, -1, -1):
        node = {"type": "record", "name": f"L{d}", "fields": [
            {"name": "a", "type": node}, {"name": "b", "type": f"L{d + 1}"}]}
    return node


def _fanout(schema: dict[str, Any] | list[Any]) -> str | None:
    """`codec.fanout` on a schema parsed as the registry client parses it (full names)."""
    named: dict[str, Any] = {}
    parsed = fastavro.parse_schema(copy.deepcopy(schema), named_schemas=named)
    return codec.fanout(named, parsed)


def test_fanout_finds_parts_read_without_a_byte_past_the_limit() -> None:
    """Review "registry48": a binary tree of records with null leaves made a 38-byte event
    cost 2^depth visits in C, the GIL held (5.5 s at depth 22, for ever at 40)."""
    def with_field(field_type: Any) -> dict[str, Any]:
        return {"type": "record", "name": "E", "namespace": "t",
                "fields": [{"name": "id", "type": "string"}, {"name": "x", "type": field_type}]}

    for wide, where in ((_tree(10), "t.E.x"),
                        (["null", _tree(12)], "t.E.x"),
                        ({"type": "array", "items": _tree(11, "boolean")}, "t.E.x"),
                        ({"type": "map", "values": ["null", _tree(10, "double")]}, "t.E.x"),
                        ({"type": "record", "name": "Flat", "fields": [
                            {"name": f"f{i}", "type": "boolean"} for i in range(1001)]},
                         "t.E.x")):
        schema = with_field(wide)
        assert _fanout(schema) == where, wide
    for fine in (_tree(7), ["null", _tree(8, "string")],
                 {"type": "record", "name": "Strings", "fields": [
                     {"name": f"s{i}", "type": "string"} for i in range(5000)]},
                 {"type": "record", "name": "Flat", "fields": [
                     {"name": f"f{i}", "type": "double"} for i in range(990)]},
                 {"type": "array", "items": ["null", _NODE]},
                 # Review "diff48a": bytes are read between these parts; added up, they were
                 # refused.
                 {"type": "record", "name": "Prices", "fields": [
                     {"name": f"p{i}", "type": {"type": "record", "name": f"Money{i}",
                                                "fields": [{"name": "amount", "type": "long"},
                                                           {"name": "currency",
                                                            "type": "string"}]}}
                     for i in range(1001)]},
                 {"type": "record", "name": "Metrics", "fields": [
                     *({"name": f"a{i}", "type": "double"} for i in range(600)),
                     {"name": "sep", "type": "string"},
                     *({"name": f"b{i}", "type": "double"} for i in range(600))]},
                 {"type": "array", "items": {"type": "record", "name": "Pt", "fields": [
                     {"name": f"c{i}", "type": "double"} for i in range(500)]}}):
        schema = with_field(fine)
        assert _fanout(schema) is None, fine
    assert _fanout(json.loads(codec.SCHEMA_TEXT)) is None
    # Review "diff48a": a union root's wide branch was found and then passed over (its
    # path was the empty string); and a run across fields, each under the limit, counts.
    ours = json.loads(codec.SCHEMA_TEXT)
    wide = {**ours, "fields": [*ours["fields"], {"name": "x", "type": _tree(12)}]}
    assert _fanout(["null", wide]) == "(the root union)[1]"
    halves = with_field({"type": "record", "name": "Halves", "fields": [
        *({"name": f"a{i}", "type": "double"} for i in range(600)),
        *({"name": f"b{i}", "type": "null"} for i in range(600))]})
    assert _fanout(halves) == "t.E.x"


def test_a_root_the_reader_cannot_resolve_is_named_without_our_whole_schema() -> None:
    """Review "registry48": a writer whose root is a string was dead-lettered with our
    parsed reader schema quoted whole (~11 KB), where the DLQ header keeps a KB."""
    from consumer.registry import Registry, SchemaDoc

    class StringRoot:
        def get_schema(self, schema_id: int) -> SchemaDoc:
            return SchemaDoc.of({"schema": '"string"'})

    registry = Registry("http://unused", client=StringRoot())
    with pytest.raises(UndecodableEvent) as info:
        codec.decode(b"\x00\x00\x00\x00\x05" + b"\x02a", registry.writer_schema)
    assert len(str(info.value)) < codec.REASON_DETAIL + 100, len(str(info.value))


def test_keys_that_become_one_keep_their_place_and_the_first_value() -> None:
    """Review "explain48": `k\\ud800` and `k\\ud801` both become `k\\ufffd`; moved to the end
    one by one, the later overwrote the earlier and the fixed key changed places (which
    decides a clash when flattened)."""
    event = {"type": "track", "event": "x", "userId": "u",
             # Built from pairs: ruff takes the two literals for one key (F601).
             "properties": dict([("a", 1), ("k\ud800", 1), ("b", 2), ("k\ud801", 2)])}
    decoded = codec.decode(codec.encode(1, codec.to_record(event)), own_schema)
    assert list(decoded["properties"].items()) == [("a", 1), ("k\ufffd", 1), ("b", 2)]
