"""Signal events between canonical JSON and Avro in the Confluent wire format.

Pure: no network. The registry lookup is passed in as a callable, so decoding is tested
without a registry and the Kafka edge decides how schemas are fetched and cached.

Free-form objects (properties, traits, consent, unknown context keys) travel as JSON text
inside the Avro record. A typed recursive union cannot carry integers beyond 64 bits and
costs more to decode (see README, "Schema"); JSON text round-trips every JSON value exactly.

Decide before you parse: :func:`decode` returns an :class:`Event`, a read-only mapping whose
JSON text fields are parsed on first access. Most events are dropped on envelope fields
alone (no userId, unmapped name), so their ``properties``/``traits`` are never parsed, and
the consent check parses ``context.consent`` only (:attr:`Event.consent`).

Strings are made safe once, where JSON text is parsed: a lone UTF-16 surrogate (valid JSON
``"\\ud83d"``, emitted when JavaScript cuts a string inside an emoji) becomes U+FFFD and is
counted in :attr:`Event.replaced`, so no later encoder can fail on it. Invalid UTF-8 in an
Avro string (cut inside a multi-byte character) becomes U+FFFD as well; an id read from such
text (:attr:`Event.cut`, :attr:`Event.surrogated`) is refused. JSON text nested
deeper than :data:`MAX_JSON_DEPTH`, or that is not JSON, raises :class:`UndecodableEvent`
when it is first read (inside ``route``): the event is dead-lettered, never a crash.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
import math
import re
import struct
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from types import MappingProxyType
from typing import Any, cast

import fastavro
import fastavro._read_py as fastavro_py

from consumer.errors import InvalidEvent, UndecodableEvent

__all__ = [
    "DELIVERED_TYPES",
    "FANOUT_LIMIT",
    "IGNORED_ENVELOPE",
    "MAGIC_BYTE",
    "MAX_JSON_DEPTH",
    "SCHEMA",
    "SCHEMA_TEXT",
    "SCREENED",
    "DeepSchema",
    "DeepUnion",
    "Event",
    "Renamed",
    "RenamedUnion",
    "SchemaLookup",
    "any_integer",
    "bytes_as_strings",
    "decode",
    "encode",
    "envelope_of",
    "envelope_surrogates",
    "fanout",
    "free_items",
    "has_surrogates",
    "loads",
    "plain_types",
    "reader_for",
    "replace_surrogates",
    "self_referencing",
    "split_wire",
    "to_record",
    "too_deep",
    "unread_items",
    "writer_json",
]

MAGIC_BYTE = 0
_HEADER = struct.Struct(">Bi")
"""Magic byte, then the schema id as a signed 32-bit integer, as Confluent's Java
deserialiser reads it: a registry's ids are positive, so an id past 2**31 - 1 (garbage after
a zero byte) reads as negative and is unknown without asking (Confluent's registry answers
such a path 404 without its "not found" code, which read as an outage: the partition
retried for ever, review "poison21")."""

SCHEMA_TEXT: str = resources.files("consumer").joinpath("signal_event.avsc").read_text("utf-8")
SCHEMA_JSON: dict[str, Any] = json.loads(SCHEMA_TEXT)
SCHEMA = cast(dict[str, Any], fastavro.parse_schema(json.loads(SCHEMA_TEXT)))

_read_record: Callable[[io.BytesIO, Any, Any], Any] = fastavro.schemaless_reader
"""fastavro's reader, typed once here rather than cast on every decode (the hot path)."""
_read_escaping: Callable[[io.BytesIO, Any, Any], Any] = functools.partial(
    fastavro.schemaless_reader, handle_unicode_errors="surrogateescape")
"""... and the same reader keeping invalid UTF-8 as escapes (read again only then), each
then replaced by U+FFFD where it is known which field held it (`_replaced`)."""
_read_deep: Callable[..., Any] = fastavro_py.schemaless_reader
"""fastavro's pure-Python reader, for writer schemas whose types refer to themselves
(:class:`DeepSchema`): its recursion ends in RecursionError, not a crash of the process."""


def _bounded_int(digits: str) -> int | float:
    """A JSON integer as Python reads it, or an infinity past its digit limit."""
    try:
        return int(digits)
    except ValueError:
        return float("-inf") if digits.startswith("-") else float("inf")


def loads(text: str) -> Any:
    """JSON text as `json.loads` reads it, but an integer past Python's digit limit (4,300)
    is an infinity, which the mapping leaves out like NaN and Infinity (and names).
    Refused whole, such an event was dead-lettered for good: no replay could deliver it
    (review "poison21"). Raises what `json.loads` raises for anything else."""
    try:
        return json.loads(text)
    except ValueError as exc:
        if "integer string conversion" not in str(exc):
            raise
    return json.loads(text, parse_int=_bounded_int)


class DeepSchema(dict[str, Any]):
    """A parsed writer schema with a type that refers to itself (a linked list, a tree).

    Why: fastavro's compiled reader follows such a type by recursion in C, so one message
    nesting it ~20,000 levels deep (20 KB) kills the process with SIGSEGV: nothing is
    dead-lettered or committed, and every restart, on every replica, dies on the same
    offset. Events of these schemas are read by the pure-Python reader instead, whose
    recursion stops at Python's limit: that one event is dead-lettered as undecodable.
    """

    reader: Any = SCHEMA  # or ours under the writer's record names (`reader_for`)


class DeepUnion(list[Any]):
    """`DeepSchema`, for a writer schema that is a union (of records)."""

    reader: Any = SCHEMA


class Renamed(dict[str, Any]):
    """A parsed writer schema read with a reader of its own (`reader_for`: records of ours
    under the writer's names)."""

    def __init__(self, writer: Mapping[str, Any], reader: Any) -> None:
        super().__init__(writer)
        self.reader = reader


class RenamedUnion(list[Any]):
    """`Renamed`, for a writer schema that is a union of records."""

    def __init__(self, writer: list[Any], reader: Any) -> None:
        super().__init__(writer)
        self.reader = reader


def writer_json(text: str, *, root: bool = True) -> Any:
    """A writer schema's text as this reader parses it: without logical types
    (`plain_types`) nor field defaults (`without_defaults`), bytes read as strings where
    ours has strings (`bytes_as_strings`).

    `root`: the event's own schema, read as our root whatever it is called (each record
    branch of a union root too), as `reader_for` reads it; otherwise a record kept in a
    subject of its own (a Schema Registry reference), compared with our record it shares
    most fields with. Chosen by name, a root named like one of our inner records
    (`com.acme.Page`), a union root and a context record named otherwise kept their
    `bytes`, and a cut character dead-lettered the event for good (review "fuzz42")."""
    writer = without_defaults(plain_types(json.loads(text)))
    if not root:
        return bytes_as_strings(writer, _ours_like(writer))
    if isinstance(writer, list):
        return [bytes_as_strings(branch, SCHEMA_JSON) for branch in writer]
    return bytes_as_strings(writer, SCHEMA_JSON)


def _ours_like(writer: Any) -> Any:
    """Our record (the root too) sharing most field names with a writer's record; a name
    alike breaks a tie."""
    if not (isinstance(writer, dict) and writer.get("type") in _NAMED_CONTAINERS):
        return None
    names = {f.get("name") for f in writer.get("fields", ()) if isinstance(f, dict)}
    short = str(writer.get("name", "")).rsplit(".", 1)[-1]

    def score(ours: dict[str, Any]) -> tuple[int, bool]:
        mine = {f.get("name") for f in ours.get("fields", ()) if isinstance(f, dict)}
        return len(names & mine), str(ours.get("name", "")).rsplit(".", 1)[-1] == short

    return max((SCHEMA_JSON, *_READER_RECORDS.values()), key=score)


def without_defaults(node: Any) -> Any:
    """A writer schema's JSON without its fields' ``default`` values.

    Why: a writer's defaults play no part in reading (schema resolution fills missing
    fields from the reader's), but fastavro checks them when it parses, and Confluent's
    registry accepts a schema whose default does not match its type (an array field with
    ``"default": null``) unless told to validate them: every event of such a version was
    dead-lettered as "not an Avro schema" (review "schema16"). Java's and Confluent's
    deserialisers read them.
    """
    if isinstance(node, dict):
        out = {key: without_defaults(value) for key, value in node.items()}
        if out.get("type") in ("record", "error") and isinstance(out.get("fields"), list):
            out["fields"] = [{k: v for k, v in field.items() if k != "default"}
                             if isinstance(field, dict) else field for field in out["fields"]]
        return out
    if isinstance(node, list):
        return [without_defaults(item) for item in node]
    return node


def plain_types(node: Any) -> Any:
    """A writer schema's JSON without its ``logicalType`` annotations.

    Why: fastavro converts by the writer's logical types, so a producer declaring
    ``userId`` as ``{"type": "string", "logicalType": "uuid"}`` (an annotation only, Avro
    compatible) would hand over ``uuid.UUID`` objects where this reader's schema, which
    decides the types, has plain strings: every such event was dropped as anonymous and
    its messageId lost. Java's Avro with our reader schema yields the plain values too.
    """
    if isinstance(node, dict):
        return {key: plain_types(value) for key, value in node.items() if key != "logicalType"}
    if isinstance(node, list):
        return [plain_types(item) for item in node]
    return node


def _records(node: Any, out: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every record of a schema's JSON by its short name."""
    if isinstance(node, dict):
        if node.get("type") in ("record", "error"):
            out.setdefault(str(node.get("name", "")).rsplit(".", 1)[-1], node)
        for value in node.values():
            _records(value, out)
    elif isinstance(node, list):
        for item in node:
            _records(item, out)
    return out


def _branches(kind: Any) -> list[Any]:
    return kind if isinstance(kind, list) else [kind]


def _takes_string(kind: Any) -> bool:
    return any(b == "string" or (isinstance(b, dict) and b.get("type") == "string")
               for b in _branches(kind))


def _record_of(kind: Any) -> dict[str, Any] | None:
    return next((b for b in _branches(kind)
                 if isinstance(b, dict) and b.get("type") in _NAMED_CONTAINERS), None)


def bytes_as_strings(writer: Any, reader: Any) -> Any:
    """A writer record's JSON with `bytes` read as `string` wherever `reader`, our record it
    is read as, has a string (the two encode alike), so invalid UTF-8 in them becomes U+FFFD.

    Why: Avro promotes bytes to string, but fastavro's promotion decodes strictly whatever
    `handle_unicode_errors` says: a producer declaring `userId` as bytes had each event with
    a cut multi-byte character dead-lettered, and no replay could succeed.
    """
    if not (isinstance(writer, dict) and writer.get("type") in _NAMED_CONTAINERS
            and isinstance(reader, dict)):
        return writer
    ours = {f.get("name"): f.get("type") for f in reader.get("fields", ())
            if isinstance(f, dict)}
    fields = []
    for field in writer.get("fields", ()):
        if not isinstance(field, dict) or field.get("name") not in ours:
            fields.append(field)
            continue
        want, kind = ours[field["name"]], field.get("type")
        if _takes_string(want) and not _takes_string(kind):
            kind = [("string" if b == "bytes" else
                     {**b, "type": "string"} if isinstance(b, dict) and b.get("type") == "bytes"
                     else b) for b in _branches(kind)]
            kind = kind if isinstance(field.get("type"), list) else kind[0]
        elif (inner := _record_of(kind)) is not None and _record_of(want) is not None:
            fixed = bytes_as_strings(inner, _record_of(want))
            kind = ([fixed if b is inner else b for b in kind] if isinstance(kind, list)
                    else fixed)
        fields.append({**field, "type": kind})
    return {**writer, "fields": fields}


_NAMED_CONTAINERS = ("record", "error")
_READER_RECORDS = _records(SCHEMA_JSON, {})


def reader_for(writer: Any, named: Mapping[str, Any]) -> Any:
    """The reader schema for a parsed writer schema (`named`: its named types by full
    name): `SCHEMA`, or, when the writer calls one of our records by another name, a copy
    of ours whose records take the writer's names as aliases.

    Why: Avro matches records by their fields whatever they are called (Java's Resolver,
    which Confluent's registry and deserialisers use, resolves a record against a record,
    and a union's record branch by structure); fastavro compares names. Every event of a
    producer whose root record is named per event type (TopicRecordNameStrategy:
    `TrackEvent`) or whose context record has a name of its own was dead-lettered, and no
    replay could deliver it (review "schemas41")."""
    aliases: dict[str, set[str]] = {}

    def record(node: Any) -> tuple[str, Any] | None:
        if isinstance(node, str):  # a reference to a named type
            target = named.get(node)
            if isinstance(target, dict) and target.get("type") in _NAMED_CONTAINERS:
                return node, target
            return None
        if isinstance(node, dict) and node.get("type") in _NAMED_CONTAINERS:
            return str(node.get("name", "")), node
        return None

    def visit(node: Any, ours: dict[str, Any]) -> None:
        found = record(node)
        if found is None:
            return
        name, body = found
        short = name.rsplit(".", 1)[-1]
        if short != str(ours["name"]).rsplit(".", 1)[-1]:
            aliases.setdefault(ours["name"], set()).update({name, short})
        mine = {f["name"]: f["type"] for f in ours.get("fields", ())}
        for field in body.get("fields", ()):
            want = _record_of(mine.get(field.get("name"))) if isinstance(field, dict) else None
            if want is None:
                continue
            # Its one record branch (a union of two records names them; none here does).
            branches = [b for b in _branches(field.get("type")) if record(b) is not None]
            if len(branches) == 1:
                visit(branches[0], want)

    # A union root (several event types on one topic, each a record of its own): each
    # record branch is read as ours.
    for root in writer if isinstance(writer, list) else [writer]:
        visit(root, SCHEMA_JSON)
    if not aliases:
        return SCHEMA
    aliased = copy.deepcopy(SCHEMA_JSON)

    def alias(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") in _NAMED_CONTAINERS and node.get("name") in aliases:
                node["aliases"] = sorted(aliases[node["name"]])
            for value in node.values():
                alias(value)
        elif isinstance(node, list):
            for item in node:
                alias(item)

    alias(aliased)
    return fastavro.parse_schema(aliased)


_FIXED_WIDTHS = {"null": 0, "boolean": 1, "float": 4, "double": 8}
"""Avro's types of a fixed width (in bytes), which a reader skips without reading them."""


def free_items(named: Mapping[str, Any], root: Any) -> str | None:
    """The first array (or map of such arrays) in a writer schema whose items can take no
    bytes at all (`null`, `fixed` of size 0, a record of only such fields), as a path; None
    when there is none.

    Why: an array's count costs a few bytes whatever it says, so a 164-byte event could
    declare 2^62 null items; fastavro skipping them spun in C with the GIL held for ever
    (no health answers, no SIGTERM), on every replica that took the partition. Java's Avro
    guards this with a limit on collection items; here such a schema is refused.
    """
    return _arrays_of(named, root, lambda width: width == 0)


def unread_items(named: Mapping[str, Any], root: Any) -> str | None:
    """The first array in a writer schema whose items are of a fixed width read from no
    byte of the message (`boolean`, `float`, `double`, `fixed`, records of only those), as
    a path; None when there is none.

    Why: fastavro's compiled reader skips such an array (a field our schema lacks: an
    ordinary `coords: array<double>` added to the writer's schema) by moving its position
    item by item, never past the end of the message: a 32-byte event declaring 2^62 items
    spun in C with the GIL held for ever (review "big43"). Reading them, or the pure-Python
    reader, meets the message's end at once: such schemas are read by the latter
    (`DeepSchema`)."""
    return _arrays_of(named, root, lambda width: width > 0)


def _arrays_of(named: Mapping[str, Any], root: Any, chosen: Callable[[int], bool]
               ) -> str | None:
    """The path of the first array whose items have a byte width read from nothing that
    `chosen` takes (`_width`), looking through maps, records and unions."""
    widths: dict[str, int | None] = {}

    def width(node: Any, open_: frozenset[str]) -> int | None:
        """The bytes an item takes when skipping it reads none of them; None when skipping
        it reads a byte (a length, a count, a union's branch, an enum's index)."""
        if isinstance(node, str):
            fixed = _FIXED_WIDTHS.get(node)
            if fixed is not None:
                return fixed
            if node not in named or node in open_:
                return None
            if node not in widths:
                widths[node] = width(named[node], open_ | {node})
            return widths[node]
        if not isinstance(node, dict):
            return None  # a union (its branch index is a byte)
        kind = node.get("type")
        if kind in _NAMED_CONTAINERS:
            total = 0
            for field in node.get("fields", ()):
                if not isinstance(field, dict):
                    return None
                one = width(field.get("type"), open_)
                if one is None:
                    return None
                total += one
            return total
        if kind == "fixed":
            size = node.get("size")
            return size if isinstance(size, int) else None
        if isinstance(kind, str) and kind in _FIXED_WIDTHS:
            return _FIXED_WIDTHS[kind]
        if isinstance(kind, (dict, list)) or (isinstance(kind, str) and kind in named):
            return width(kind, open_)
        return None

    def spins(items: Any) -> bool:
        found = width(items, frozenset())
        return found is not None and chosen(found)

    seen: set[int] = set()

    def walk(node: Any, path: str) -> str | None:
        if isinstance(node, list):
            for branch in node:
                found = walk(branch, path)
                if found:
                    return found
            return None
        if not isinstance(node, dict) or id(node) in seen:
            return None
        seen.add(id(node))
        kind = node.get("type")
        if kind == "array":
            if spins(node.get("items")):
                return path
            return walk(node.get("items"), f"{path}[]")
        if kind == "map":
            return walk(node.get("values"), f"{path}{{}}")
        if kind in _NAMED_CONTAINERS:
            for field in node.get("fields", ()):
                if isinstance(field, dict):
                    found = walk(field.get("type"), f"{path}.{field.get('name')}")
                    if found:
                        return found
            return None
        if isinstance(kind, (dict, list)):
            return walk(kind, path)
        return None

    top = str(root.get("name", "")) if isinstance(root, dict) else ""
    for name, definition in [(top, root), *named.items()]:
        found = walk(definition, name)
        if found:
            return found
    return None


REASON_DETAIL = 300
"""Characters of a decoder's own message kept in an undecodable event's reason."""
FANOUT_LIMIT = 1000
"""Parts of a value (records, fields of a fixed width, nulls) a reader may visit between two
bytes it must read (a length, a count, a union's branch, an enum's index): `fanout`."""


@dataclass(frozen=True, slots=True)
class _Run:
    """How one value of a type is read, in parts visited without reading a byte (`fanout`):
    `reads` whether it reads any byte at all; if not, `total` parts; if so, `head` parts
    before its first byte, `tail` after its last, `inner` the most between two of its own.
    All capped at FANOUT_LIMIT + 1."""

    reads: bool
    total: int = 0
    head: int = 0
    tail: int = 0
    inner: int = 0

    @property
    def longest(self) -> int:
        return max(self.head, self.tail, self.inner) if self.reads else self.total

    def then(self, after: _Run) -> _Run:
        """This value, then `after` (a record's fields in order)."""
        cap = FANOUT_LIMIT + 1
        if not self.reads and not after.reads:
            return _Run(False, total=min(cap, self.total + after.total))
        if not self.reads:
            return _Run(True, head=min(cap, self.total + after.head), tail=after.tail,
                        inner=after.inner)
        if not after.reads:
            return _Run(True, head=self.head, tail=min(cap, self.tail + after.total),
                        inner=self.inner)
        return _Run(True, head=self.head, tail=after.tail,
                    inner=max(self.inner, after.inner, min(cap, self.tail + after.head)))


_READS = _Run(True)  # a primitive read from bytes: a length, a number, an index
_ONE = _Run(False, total=1)  # a part that takes no byte: a null, a fixed-width value


def fanout(named: Mapping[str, Any], root: Any) -> str | None:
    """The first part of a writer schema whose reading visits more than FANOUT_LIMIT parts
    in a row without reading a byte of the message, as a path; None when there is none.

    Why: a record is read (or skipped, for a field our schema lacks) part by part, and a
    null or a field of a fixed width skipped takes no byte of it. A schema of a few KB whose
    extra field is a binary tree of named records, each level defined once, made one 38-byte
    event cost 2^depth visits in C with the GIL held: 5.5 s at depth 22, for ever at 40 (no
    health answers, no SIGTERM; review "registry48"). Past FANOUT_LIMIT a byte, one event of
    up to a MB is bounded to a billion visits; an honest schema has nowhere near so many
    nulls, booleans, floats and fixed in a row without a string, number, union or array.
    Counted run by run: a record of 1,001 `{amount: long, currency: string}` fields reads a
    byte every part or two, and adding up its parts refused it (review "diff48a").
    """
    runs: dict[str, _Run] = {}

    def of(node: Any, open_: frozenset[str]) -> _Run:
        if isinstance(node, list):  # a union: its branch's index first
            branches = [of(branch, open_) for branch in node]
            return _Run(True, head=0, tail=max((b.tail if b.reads else b.total)
                                               for b in branches) if branches else 0,
                        inner=max((b.longest for b in branches), default=0))
        if isinstance(node, str):
            if node in _FIXED_WIDTHS:
                return _ONE
            if node not in named or node in open_:
                return _READS  # a primitive; a type within itself (`DeepSchema`) reads
            if node not in runs:
                runs[node] = of(named[node], open_ | {node})
            return runs[node]
        if not isinstance(node, dict):
            return _READS
        kind = node.get("type")
        if kind in _NAMED_CONTAINERS:
            run = _ONE  # the record itself
            for field in node.get("fields", ()):
                if isinstance(field, dict):
                    run = run.then(of(field.get("type"), open_))
            return run
        if kind in ("array", "map"):
            # Its counts are read; each item after the last one's tail. Items of no byte at
            # all are `free_items` (refused) or fixed-width ones the pure-Python reader
            # reads from the message (`unread_items`): one item's parts in a row.
            items = of(node.get("items" if kind == "array" else "values"), open_)
            inner = (max(items.inner, items.head, items.tail, min(FANOUT_LIMIT + 1,
                                                                 items.tail + items.head))
                     if items.reads else items.total)
            return _Run(True, inner=inner)
        if isinstance(kind, (dict, list)) or (isinstance(kind, str) and kind in named):
            return of(kind, open_)
        if kind in _FIXED_WIDTHS or kind == "fixed":
            return _ONE
        return _READS  # an enum's index, a string's length, a logical type's number

    if of(root, frozenset()).longest <= FANOUT_LIMIT:
        return None
    # Where: the widest of the root's fields (or of its union's branches) by itself, else
    # the root (a run across several of its fields).
    top = str(root.get("name", "")) if isinstance(root, dict) else "(the root union)"
    parts = ([(f"{top}.{f.get('name')}", f.get("type")) for f in root.get("fields", ())
              if isinstance(f, dict)] if isinstance(root, dict) else
             [(f"{top}[{i}]", b) for i, b in enumerate(root)] if isinstance(root, list) else [])
    for where, kind in parts:
        if of(kind, frozenset()).longest > FANOUT_LIMIT:
            return where
    return top


def self_referencing(named: Mapping[str, Any]) -> bool:
    """Whether any of these parsed named types (fastavro's ``named_schemas``: full name →
    definition) can contain itself, directly or through others: see :class:`DeepSchema`."""
    done: set[str] = set()
    open_: set[str] = set()

    def walk(node: Any) -> bool:
        if isinstance(node, str):
            if node in open_:
                return True
            return node not in done and node in named and walk(named[node])
        if isinstance(node, list):
            return any(walk(branch) for branch in node)
        if not isinstance(node, dict):
            return False
        kind = node.get("type")
        if kind in _NAMED_CONTAINERS:
            name = str(node.get("name"))
            if name in open_:
                return True
            if name in done:
                return False
            open_.add(name)
            if any(walk(f.get("type")) for f in node.get("fields", ()) if isinstance(f, dict)):
                return True
            open_.discard(name)
            done.add(name)
            return False
        if kind == "array":
            return walk(node.get("items"))
        if kind == "map":
            return walk(node.get("values"))
        return isinstance(kind, (dict, list, str)) and walk(kind)

    return any(walk(definition) for definition in list(named.values()))

SchemaLookup = Callable[[int], Mapping[str, Any]]
"""Returns the parsed writer schema registered under an id, or raises KeyError."""

_ENVELOPE_STRINGS = (
    "event", "name", "userId", "anonymousId", "groupId",
    "timestamp", "messageId", "receivedAt", "sentAt",
)
_REFUSED_SURROGATES = frozenset(("userId", "groupId", "messageId"))
"""Ids a lone surrogate is refused in (`to_record`), not replaced: each names one record."""
_JSON_FIELDS = ("properties", "traits")
_JSON_KINDS = {list: "array", str: "string", int: "number", float: "number", bool: "boolean"}
_SUBRECORDS: dict[str, tuple[str, ...]] = {
    "page": ("url", "path", "referrer", "title", "search"),
    "device": ("type", "manufacturer", "model"),
    "campaign": ("source", "medium", "name", "term", "content"),
}
_CONTEXT_STRINGS = ("locale", "ip", "userAgent", "timezone")
_KNOWN_TOP = frozenset(("type", "context", *_ENVELOPE_STRINGS, *_JSON_FIELDS))
_PLAIN_TOP = frozenset(("type", *_ENVELOPE_STRINGS))  # read straight from the record
IGNORED_ENVELOPE = frozenset({
    "integrations", "channel", "originalTimestamp", "version", "projectId", "writeKey",
    "_metadata", "request_ip", "rudderId", "previousId", "sourceId",
})
"""Segment/RudderStack envelope fields the worker does not use: left out, not refused (by
`produce` and `explain` alike: one said "deliver" where the other refused the whole file)."""
DELIVERED_TYPES = ("track", "page", "identify", "group")


MAX_JSON_DEPTH = 200
"""JSON text nested deeper than this is undecodable (dead-lettered): parsing and walking it
would otherwise exhaust Python's recursion limit and stop the partition. Real events nest a
handful of levels; the mapping flattens at most ``mapping.MAX_DEPTH`` of them."""

_SURROGATE = re.compile("[\ud800-\udfff]")


def _dumps(value: Any) -> str:
    """JSON text for a record's field. A number too large for a double (JSON `1e400`, read
    as infinity) is written back as one (`1e999`), and a NaN as `NaN` (what Python's and
    JavaScript's lax writers put in the text, and the worker's `loads` reads), so `run`
    reads what `explain` and `produce` read and leaves the field out as it leaves out any
    NaN or Infinity; refused, `explain` called a dead letter what `run` delivers (review
    "events28" for infinities, "events29" for NaN)."""
    try:
        return _dumps_finite(value)
    except ValueError:
        marks: dict[str, str] = {}
        marked = _mark_non_finite(value, marks)
        if not marks:
            raise
        text = _dumps_finite(marked)
        for mark, literal in marks.items():
            text = text.replace(f'"{mark}"', literal)
        return text


def _mark_non_finite(value: Any, marks: dict[str, str]) -> Any:
    """`value` with each NaN or infinite float replaced by a unique string, noted in
    `marks` with the literal that stands for it."""
    if isinstance(value, float) and not math.isfinite(value):
        mark = f"@@userpilot-non-finite-{uuid.uuid4().hex}@@"
        marks[mark] = "NaN" if math.isnan(value) else "1e999" if value > 0 else "-1e999"
        return mark
    if isinstance(value, dict):
        return {key: _mark_non_finite(item, marks) for key, item in value.items()}
    if isinstance(value, list):
        return [_mark_non_finite(item, marks) for item in value]
    return value


def _dumps_finite(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: keep them as escapes, as browsers send them
        return json.dumps(value, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return text


def has_surrogates(text: str) -> bool:
    """`text` holds a lone surrogate (which `replace_surrogates` would replace)."""
    return _SURROGATE.search(text) is not None


def replace_surrogates(text: str) -> str:
    """Lone surrogates replaced by U+FFFD: no UTF-8 encoding takes them (Avro strings on
    the produce side, the text of an answer decoded with utf-7 or utf-16)."""
    return _SURROGATE.sub("\ufffd", text)


@contextlib.contextmanager
def any_integer() -> Iterator[None]:
    """Integers of any length while a line is read and written as the Avro record's JSON
    text: a producer may write one past Python's 4,300 digits, which the worker reads as
    an infinity and leaves out (`loads`). Refused here, `explain` called "not JSON"
    an event the worker delivers (review "diff21"), and `produce` refused the file
    (review "seed23"). The worker's own decode runs with the default limit. For a
    command's own process only: the setting is global."""
    limit = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)
    try:
        yield
    finally:
        sys.set_int_max_str_digits(limit)


def envelope_surrogates(event: Mapping[str, Any]) -> int:
    """Lone surrogates `to_record` replaces in the envelope's own strings (an id, the
    event's name), for `explain`'s note: the JSON fields' are counted as they are parsed."""
    found = [event.get("type"), *(event.get(key) for key in _ENVELOPE_STRINGS)]
    context = event.get("context")
    if isinstance(context, Mapping):
        for key, fields in _SUBRECORDS.items():
            value = context.get(key)
            if isinstance(value, Mapping):
                found += [value.get(name) for name in fields]
        found += [context.get(key) for key in _CONTEXT_STRINGS]
    return sum(len(_SURROGATE.findall(text)) for text in found if isinstance(text, str))


def to_record(event: Mapping[str, Any]) -> dict[str, Any]:
    """Canonical JSON event → Avro record; InvalidEvent names the offending field."""
    if not isinstance(event, Mapping):
        raise InvalidEvent("an event must be a JSON object")
    unknown = sorted(set(event) - _KNOWN_TOP - IGNORED_ENVELOPE)
    if unknown:
        raise InvalidEvent(
            f"unknown field(s) {', '.join(unknown)}; the envelope has only "
            f"{', '.join(sorted(_KNOWN_TOP))} (put free-form data in properties or context)"
        )
    kind = event.get("type")
    # Any other type is carried as it is (the schema's `type` is a string), a blank one too,
    # and `run` drops it as unsupported_type; refused here, `explain` called it a dead
    # letter and `produce` refused the whole file, while the worker drops it (review
    # "events28": a blank type still was).
    if not isinstance(kind, str):
        raise InvalidEvent(f"type must be a string ({', '.join(DELIVERED_TYPES)} are "
                           f"delivered, others dropped), not {kind!r}")
    record: dict[str, Any] = {"type": replace_surrogates(kind)}
    for key in _ENVELOPE_STRINGS:
        value = event.get(key)
        if value is not None and not isinstance(value, str):
            raise InvalidEvent(f"{key} must be a string or null, not {type(value).__name__}")
        if key in _REFUSED_SURROGATES and value is not None and has_surrogates(value):
            # Replaced, "alice\ud83d" and "alice\ud83e" became one user (one company, one
            # messageId), which the worker refuses for an id it can see was cut (README,
            # Strings; review "ids47").
            raise InvalidEvent(f"{key} holds a lone UTF-16 surrogate (an emoji cut in half): "
                               "ids cut alike would name one Userpilot record; fix the id")
        record[key] = value if value is None else replace_surrogates(value)
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
        raise InvalidEvent(f"{field}: {exc}") from None


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
                sub[name] = item if item is None else replace_surrogates(item)
            else:
                leftover[name] = item
        # An empty object must come back as an empty object, not as null.
        record[key] = {name: sub.get(name) for name in fields} if sub or not leftover else None
        if leftover:
            extra[key] = leftover
    for key in _CONTEXT_STRINGS:
        value = context.get(key)
        if value is None or isinstance(value, str):
            record[key] = value if value is None else replace_surrogates(value)
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


_NO_CUT: frozenset[str] = frozenset()  # `Event.cut` of an event read as valid UTF-8
_NO_SURROGATES: Mapping[str, frozenset[str]] = MappingProxyType({})  # nor lone surrogates


class Event(Mapping[str, Any]):
    """A decoded Signal event: a read-only mapping that parses JSON text on first access.

    Envelope strings (``type``, ``userId``, ``event``…) cost nothing to read; ``properties``,
    ``traits`` and ``context`` are parsed (once) when first read; :attr:`consent` parses
    ``context.consent`` alone. Parsing may raise :class:`UndecodableEvent`.
    """

    __slots__ = ("_consent", "_extra", "_parsed", "_record", "cut", "replaced", "surrogated")

    def __init__(self, record: Mapping[str, Any], cut: frozenset[str] = _NO_CUT) -> None:
        self._record = record
        self.cut = cut
        """The top-level fields whose invalid UTF-8 was read as U+FFFD (`decode`): an id
        from one may be two ids cut alike (`routing.route` refuses it)."""
        self._parsed: dict[str, Any] = {}
        self._consent: Any = _UNSET
        self._extra: Any = _UNSET  # context.extra parsed, once (its surrogates counted once)
        self.replaced = 0
        """Lone surrogates replaced by U+FFFD in the JSON text parsed so far."""
        self.surrogated: Mapping[str, frozenset[str]] = _NO_SURROGATES
        """Per JSON field parsed so far, its strings that held a lone surrogate, as replaced
        by U+FFFD: an id that is one of them may be two ids cut alike (`routing.route`)."""

    def _present(self) -> Iterator[str]:
        record = self._record
        yield "type"
        for key in _ENVELOPE_STRINGS:
            if record.get(key) is not None:
                yield key
        for key in _JSON_FIELDS:
            if record.get(key) is not None:
                yield key
        if record.get("context") is not None:
            yield "context"

    def __iter__(self) -> Iterator[str]:
        return self._present()

    def __len__(self) -> int:
        return sum(1 for _ in self._present())

    def __contains__(self, key: object) -> bool:
        if key == "type":
            return True
        if isinstance(key, str) and key in _KNOWN_TOP:
            return self._record.get(key) is not None
        return False

    def get(self, key: str, default: Any = None) -> Any:
        """Envelope strings straight from the record; JSON fields parsed once."""
        if key in _PLAIN_TOP:
            value = self._record.get(key)
            return default if value is None else value
        try:
            return self[key]
        except KeyError:
            return default

    def __getitem__(self, key: str) -> Any:
        parsed = self._parsed
        if key in parsed:
            return parsed[key]
        record = self._record
        value = record.get(key)
        if value is None or key not in _KNOWN_TOP:
            raise KeyError(key)
        if key in _JSON_FIELDS:
            value = self._json(key, value)
            if value is not None and not isinstance(value, dict):
                # The schema's "JSON object text": an array or a string here is a malformed
                # event, dead-lettered whole rather than sent with its data left out.
                raise InvalidEvent(f"{key} must be JSON object text, not a JSON "
                                   f"{_JSON_KINDS.get(type(value), type(value).__name__)}")
        elif key == "context":
            value = self._context(value)
        parsed[key] = value
        return value

    @property
    def envelope(self) -> Mapping[str, Any]:
        """The decoded Avro record itself: envelope strings (``type``, ``userId``,
        ``event``…) read at dict speed. Its JSON fields are raw text: read those through
        the event, never here."""
        return self._record

    @property
    def consent_text(self) -> str | None:
        """``context.consent`` as the JSON text it travels as (None when absent); parses
        nothing, so a decision already taken for the same text can be reused."""
        context = self._record.get("context")
        return context.get("consent") if context is not None else None

    @property
    def consent(self) -> Any:
        """``context.consent`` (None when absent), parsing nothing else."""
        if self._consent is _UNSET:
            context = self._record.get("context")
            text = context.get("consent") if context is not None else None
            self._consent = None if text is None else self._json("context.consent", text)
        return self._consent

    @property
    def page(self) -> Any:
        """``context.page`` (`context_key`): a page view uses nothing else of the context."""
        return self.context_key("page")

    def context_key(self, key: str, default: Any = None) -> Any:
        """``self["context"].get(key, default)``, parsing only what that key needs: ``consent`` for
        itself, ``context.extra`` only when its text can hold the key (spelled as written,
        or through escapes). Another key of ``extra`` broken, BOM-led or nested too deep,
        or consent text that is not JSON, dead-lettered page views (review "poison26") and
        events a mapping rule picked a ``context.*`` field of (review "seed42") that the
        same event without the rule delivered."""
        parsed = self._parsed.get("context", _UNSET)
        if parsed is not _UNSET:
            return parsed.get(key, default)
        record = self._record.get("context")
        if record is None:
            return default
        value: Any = default
        if key in _SUBRECORDS:
            sub = record.get(key)
            if sub is not None:
                value = {k: v for k, v in sub.items() if v is not None}
        elif key in _CONTEXT_STRINGS:
            if record.get(key) is not None:
                value = record[key]
        elif key == "consent" and self.consent is not None:
            value = self.consent
        text = record.get("extra")
        # A key of letters is spelled otherwise only through \u escapes; one with a quote,
        # a backslash, a slash or a control character, through any escape (any backslash
        # for those alone: an escaped quote or a `\/` in a value is common).
        odd = any(c in '"\\/' or c < " " for c in key)
        if text is not None and (f'"{key}"' in text or "\\u" in text
                                 or (odd and "\\" in text)):
            extra = self._extra_of(text)
            if isinstance(extra, dict) and key in extra:
                over = extra[key]
                value = {**value, **over} if isinstance(over, dict) and isinstance(
                    value, dict) else over
        return value

    def _extra_of(self, text: str) -> Any:
        """``context.extra`` parsed once, for `page` and the whole context alike."""
        if self._extra is _UNSET:
            self._extra = self._json("context.extra", text)
        return self._extra

    def _json(self, field: str, text: str) -> Any:
        try:
            value = loads(text)
        except RecursionError:
            raise UndecodableEvent(
                f"{field} is JSON nested deeper than {MAX_JSON_DEPTH} levels"
            ) from None
        except ValueError as exc:
            raise UndecodableEvent(f"{field} is not valid JSON text: {exc}") from None
        texts: set[str] | None = None  # the strings that held one (`fixed` itself: None)
        if isinstance(value, str):
            fixed, count = _SURROGATE.subn("\ufffd", value)
        elif not isinstance(value, dict | list):
            return value
        # Cheap pre-checks: only text that could hold a lone surrogate or deep nesting is
        # walked (the Avro string itself is valid UTF-8, so a surrogate needs an escape).
        elif ("\\ud" in text or "\\uD" in text) or (
            text.count("[") + text.count("{") > MAX_JSON_DEPTH
        ):
            texts = set()
            fixed, count = _clean(field, value, texts)
        else:
            return value
        if count:
            # Like a cut: `"acme-\\ud83d"` and `"acme-\\ud83e"` both read `acme-\ufffd`, so an
            # id that is one of these strings is refused by `routing.route` (two companies
            # would be one); a U+FFFD the producer wrote elsewhere is text.
            self.replaced += count
            self.surrogated = {**self.surrogated,
                               field: frozenset((fixed,) if texts is None else texts)}
        return fixed

    def _context(self, record: Mapping[str, Any]) -> dict[str, Any]:
        context: dict[str, Any] = {}
        for key in _SUBRECORDS:
            sub = record.get(key)
            if sub is not None:
                context[key] = {k: v for k, v in sub.items() if v is not None}
        for key in _CONTEXT_STRINGS:
            value = record.get(key)
            if value is not None:
                context[key] = value
        consent = self.consent
        if consent is not None:
            context["consent"] = consent
        extra_text = record.get("extra")
        if extra_text is not None:
            extra = self._extra_of(extra_text)
            if isinstance(extra, dict):
                for key, value in extra.items():
                    if isinstance(value, dict) and isinstance(context.get(key), dict):
                        context[key].update(value)
                    else:
                        context[key] = value
        return context


_UNSET: Any = object()


def too_deep(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Parsed JSON nested deeper than `limit` levels (iteratively). How deep `json.loads`
    goes before its RecursionError depends on the interpreter (3.13's decoder parsed 5,000
    levels): checked on the value, a message does not (review "py312")."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(node, dict):
            stack.extend((child, depth + 1) for child in node.values()
                         if isinstance(child, dict | list))
        elif isinstance(node, list):
            stack.extend((child, depth + 1) for child in node if isinstance(child, dict | list))
    return False


def _clean(field: str, root: Any, texts: set[str] | None = None) -> tuple[Any, int]:
    """Replace lone surrogates in keys and strings (iteratively); refuse deep nesting.
    `texts` collects the strings that held one, as replaced."""
    replaced = 0

    def fix(text: str) -> str:
        nonlocal replaced
        fixed, count = _SURROGATE.subn("\ufffd", text)
        if count:
            replaced += count
            if texts is not None:
                texts.add(fixed)
        return fixed

    stack: list[tuple[Any, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise UndecodableEvent(f"{field} is JSON nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(node, dict):
            renamed = False
            for key in list(node):
                value = node[key]
                if isinstance(value, str):
                    value = node[key] = fix(value)
                elif isinstance(value, dict | list):
                    stack.append((value, depth + 1))
                renamed = renamed or _SURROGATE.search(key) is not None
            if renamed:
                # Rebuilt in order, the first of keys that become one kept: moved to the end
                # one by one, a fixed key changed which key won a clash when flattened, and
                # the later of two such keys overwrote the earlier (review "explain48").
                items = list(node.items())
                node.clear()
                for key, value in items:
                    node.setdefault(fix(key) if _SURROGATE.search(key) else key, value)
        else:
            for index, value in enumerate(node):
                if isinstance(value, str):
                    node[index] = fix(value)
                elif isinstance(value, dict | list):
                    stack.append((value, depth + 1))
    if isinstance(root, str):
        root = fix(root)
    return root, replaced


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


SCREENED = ("type", "event", "userId", "groupId")
"""The envelope strings the drop rules before consent read (`filtering.envelope_drop`; a
page's `name` decides nothing there)."""


def _head_layout(schema: Mapping[str, Any]) -> tuple[tuple[str, int | None, bool], ...]:
    """Our schema's leading fields up to the last of :data:`SCREENED`: (name, the string
    branch of a ``["null", "string"]`` union or None for a plain string, kept). Empty when
    another type comes first (the schema changed): `envelope_of` then reads nothing."""
    layout: list[tuple[str, int | None, bool]] = []
    wanted = set(SCREENED)
    for field in schema["fields"]:
        if not wanted:
            break
        kind = field["type"]
        if kind == "string":
            branch = None
        elif kind in (["null", "string"], ["string", "null"]):
            branch = kind.index("string")
        else:
            return ()
        layout.append((field["name"], branch, field["name"] in wanted))
        wanted.discard(field["name"])
    return tuple(layout) if not wanted else ()


_HEAD = _head_layout(SCHEMA_JSON)


def envelope_of(data: bytes, lookup: SchemaLookup) -> dict[str, str] | None:
    """The :data:`SCREENED` strings of an event written with our own schema, read from the
    head of its Avro body alone; None when that cannot be read plainly (another writer
    schema, a long union index, invalid UTF-8, a cut body): then only :func:`decode` tells.

    Why: most events on a Signal topic are dropped on these fields alone (no userId, an
    unmapped name). fastavro reads a whole event in ~15 µs, this head in ~2 µs. The rest of
    an event dropped so is never read, so a corrupt tail behind it is not noticed (it
    would not be sent either way; a decoded event's tail is checked as before). The
    lookup's exceptions (`SchemaNotCached`, KeyError) propagate: the caller decides.
    """
    if len(data) < _HEADER.size or data[0] != MAGIC_BYTE or not _HEAD:
        return None
    if lookup(_HEADER.unpack_from(data)[1]) is not SCHEMA:
        return None
    pos = _HEADER.size
    end = len(data)
    found: dict[str, str] = {}
    try:
        for name, branch, kept in _HEAD:
            if branch is not None:
                index = data[pos]  # zig-zag: branch 0 is 0x00, branch 1 is 0x02
                pos += 1
                if index != branch << 1:
                    if index == (1 - branch) << 1:
                        continue  # null
                    return None
            size = data[pos]
            pos += 1
            if size & 0x80:  # a length of 64 or more: more bytes follow
                size &= 0x7F
                shift = 7
                while True:
                    more = data[pos]
                    pos += 1
                    size |= (more & 0x7F) << shift
                    if not more & 0x80:
                        break
                    shift += 7
                    if shift > 63:
                        return None
            if size & 1:
                return None  # a negative length
            size >>= 1
            if pos + size > end:
                return None
            if kept:
                found[name] = data[pos:pos + size].decode("utf-8")
            pos += size
    except (IndexError, UnicodeDecodeError):
        return None
    return found


def decode(data: bytes | None, lookup: SchemaLookup) -> Event:
    """Wire bytes → event (JSON text parsed lazily), resolving the writer schema to ours."""
    if data is not None and len(data) >= _HEADER.size and data[0] == MAGIC_BYTE:
        schema_id = _HEADER.unpack_from(data)[1]  # the common case, without a call
    else:
        schema_id, _ = split_wire(data)  # raises the reason
    assert data is not None  # split_wire raised otherwise
    try:
        writer = lookup(schema_id)
    except KeyError:
        raise UndecodableEvent(f"unknown schema id {schema_id}") from None
    # Read in place past the header: a BytesIO over bytes shares them (no copy of the body).
    stream = io.BytesIO(data)
    stream.seek(_HEADER.size)
    # Resolution costs time per call; skip it when the writer is our own schema.
    reader = None if writer is SCHEMA else getattr(writer, "reader", SCHEMA)  # `Renamed`
    cut = _NO_CUT
    try:
        kind: type = writer.__class__  # a union root (`DeepUnion`) is a list
        deep = kind is DeepSchema or kind is DeepUnion
        try:
            record = (_read_deep(stream, writer, reader) if deep
                      else _read_record(stream, writer, reader))
        except UnicodeDecodeError:
            # A string cut inside a multi-byte character (a producer limiting bytes):
            # U+FFFD, as Java's Avro decodes it, not the whole event dead-lettered (replay
            # could never succeed). Read again only then: the hot path keeps the default.
            # Read with escapes first, to know which fields were cut (`Event.cut`).
            stream.seek(_HEADER.size)
            record = (_read_deep(stream, writer, reader, handle_unicode_errors="surrogateescape")
                      if deep else _read_escaping(stream, writer, reader))
            if isinstance(record, dict):
                record, cut = _replaced(record)
    except EOFError:
        # fastavro's own says nothing ("EOFError: "), review "registry48".
        raise UndecodableEvent("not a Signal event in Avro: truncated (the body ends before "
                               "the record does)") from None
    except Exception as exc:  # fastavro raises many types on corrupt input
        # Cut: a root the reader cannot resolve quoted our whole parsed schema (~11 KB,
        # review "registry48"), where the DLQ header and the log keep a KB.
        raise UndecodableEvent(f"not a Signal event in Avro: {type(exc).__name__}: "
                               f"{str(exc)[:REASON_DETAIL]}") from None
    if stream.tell() != len(data):
        raise UndecodableEvent(
            f"{len(data) - stream.tell()} trailing bytes after the Avro record (corrupt message)"
        )
    if not isinstance(record, dict):
        raise UndecodableEvent("Avro body did not decode to a record")
    return Event(record, cut)


_ESCAPED = re.compile("[\udc80-\udcff]")


def _replaced(record: dict[str, Any]) -> tuple[dict[str, Any], frozenset[str]]:
    """A record read with invalid UTF-8 as escapes: each such string as the "replace" read
    gives it (U+FFFD), and the top-level fields that held one."""
    def fix(value: Any) -> tuple[Any, bool]:
        if isinstance(value, str):
            if _ESCAPED.search(value) is None:
                return value, False
            return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace"), True
        if isinstance(value, dict):
            out, any_cut = {}, False
            for key, item in value.items():
                new_key, key_cut = fix(key)
                out[new_key], item_cut = fix(item)
                any_cut = any_cut or key_cut or item_cut
            return out, any_cut
        if isinstance(value, list):
            items = [fix(item) for item in value]
            return [item for item, _ in items], any(was for _, was in items)
        return value, False

    fixed: dict[str, Any] = {}
    cut = []
    for key, value in record.items():
        fixed[key], was = fix(value)
        if was:
            cut.append(key)
    return fixed, frozenset(cut)
