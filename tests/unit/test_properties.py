"""Property tests: no JSON value in an event can crash decode → route → encode.

Hypothesis drives arbitrary JSON values — lone surrogates, control characters, huge and
tiny numbers, NaN/Infinity, deep nesting, empty keys, 10,000 keys — into properties,
traits and context, and checks what the worker relies on: route either decides (drop or
a Track body) or raises a DeadLetter for that one event; a body is valid JSON, strict
UTF-8, flat (primitive metadata values only) and within the size limits.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumer import codec
from consumer.errors import DeadLetter, InvalidEvent
from consumer.filtering import ConsentPolicy, Drop
from consumer.mapping import DEFAULT_PRESET, TRUNCATED_KEY, MappingSet, load_mappings
from consumer.routing import Send, route

ANY_CHAR = st.characters(exclude_categories=())  # includes lone surrogates (category Cs)
KEYS = st.one_of(st.just(""), st.text(ANY_CHAR, max_size=8), st.sampled_from(
    ["feature", "products", "items", "currency", "url", "name", "a_b", "a"]))
SCALARS = st.one_of(
    st.none(), st.booleans(), st.text(ANY_CHAR, max_size=20),
    st.integers(), st.integers(min_value=-(10**300), max_value=10**300),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(min_value=-1e-300, max_value=1e-300),
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=5),
                            st.dictionaries(KEYS, inner, max_size=5)),
    max_leaves=40,
)
OBJECTS = st.dictionaries(KEYS, JSON_VALUES, max_size=8)
CONSENTS = st.one_of(JSON_VALUES, st.just({"analytics": True}),
                     st.just({"canonical": {"analytics": "granted"}}))
MAPPINGS = [
    DEFAULT_PRESET,
    load_mappings({"events": {"Feature Used": {
        "event_name": "feature_used", "rename": {"feature": "f"},
        "fields": {"pick": "properties.a", "ctx": "context", "deep": "properties.a.0.a"},
        "static": {"source": "signal"}}}}),
    MappingSet(DEFAULT_PRESET.rules, max_metadata_bytes=300, max_metadata_keys=5),
]
POLICIES = [ConsentPolicy(), ConsentPolicy(categories=(), missing="allow"),
            ConsentPolicy(categories=("analytics", "marketing"), missing="allow")]


def _strict(text: str) -> Any:
    def refuse(token: str) -> Any:
        raise ValueError(f"{token} is not JSON")
    return json.loads(text, parse_constant=refuse)


def _dump(value: Any, ascii_only: bool) -> str:
    """JSON text as any producer might write it (NaN tokens, escaped surrogates...)."""
    try:
        text = json.dumps(value, ensure_ascii=ascii_only, allow_nan=True)
    except ValueError:  # an int over Python's digit limit: still JSON text
        return "1" + "0" * 5000
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # Avro strings are UTF-8: surrogates travel as escapes
        return json.dumps(value, ensure_ascii=True, allow_nan=True)
    return text


def check_decision(event: Mapping[str, Any], mappings: MappingSet,
                   policy: ConsentPolicy) -> None:
    try:
        decision = route(event, policy, mappings)
    except DeadLetter as exc:  # this one event is dead-lettered; nothing else may escape
        assert exc.reason in ("undecodable", "mapping_error")
        assert exc.reason == "undecodable", f"unexpected mapping error: {exc}"
        return
    if isinstance(decision, Drop):
        return
    assert isinstance(decision, Send)
    for call in decision.calls:
        _check_call(call.body, dict(call.payload), mappings)


def _check_call(raw: bytes, data: dict[str, Any], mappings: MappingSet) -> None:
    body = raw.decode("utf-8")  # strict: no surrogates survived
    assert _strict(body) == _strict(json.dumps(data, allow_nan=False))
    payload = _strict(body)
    if "company_id" in payload:  # company identify
        assert isinstance(payload["company_id"], str) and payload["company_id"].strip()
        assert set(payload) == {"company_id", "metadata"}
    elif "event_name" in payload:  # track
        assert set(payload) == {"user_id", "event_name", "metadata"}
    else:  # identify: metadata unless it only associates a company
        assert set(payload) <= {"user_id", "metadata", "company"}
    if "user_id" in payload:
        assert isinstance(payload["user_id"], str) and payload["user_id"].strip()
    if "metadata" not in payload:
        return
    metadata = payload["metadata"]
    assert isinstance(metadata, dict)
    for key, value in metadata.items():
        assert isinstance(key, str)
        assert value is None or isinstance(value, str | bool | int | float), (key, value)
        assert not isinstance(value, float) or math.isfinite(value)
    assert len(metadata) <= mappings.max_metadata_keys
    size = len(json.dumps(metadata, ensure_ascii=False).encode("utf-8"))
    if TRUNCATED_KEY in metadata:
        assert size <= mappings.max_metadata_bytes + 64 or len(metadata) == 1


def wire_event(properties: str | None, traits: str | None, consent: str | None,
               extra: str | None, **envelope: Any) -> codec.Event:
    record = codec.to_record({"type": "track", "event": "Feature Used", "userId": "u1",
                              "context": {"page": {"url": "https://x"}}, **envelope})
    record["properties"], record["traits"] = properties, traits
    record["context"]["consent"], record["context"]["extra"] = consent, extra
    return codec.decode(codec.encode(1, record), lambda _i: codec.SCHEMA)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(props=OBJECTS, traits=OBJECTS, consent=CONSENTS, extra=OBJECTS,
       ascii_only=st.booleans(), kind=st.sampled_from(["track", "page", "identify"]),
       mappings=st.sampled_from(MAPPINGS), policy=st.sampled_from(POLICIES))
def test_any_json_text_decodes_routes_and_encodes(
    props: dict[str, Any], traits: dict[str, Any], consent: Any, extra: dict[str, Any],
    ascii_only: bool, kind: str, mappings: MappingSet, policy: ConsentPolicy,
) -> None:
    event = wire_event(_dump(props, ascii_only), _dump(traits, ascii_only),
                       _dump(consent, ascii_only), _dump(extra, ascii_only), type=kind)
    check_decision(event, mappings, policy)


@settings(max_examples=40, deadline=None)
@given(depth=st.integers(min_value=1, max_value=3000), opener=st.sampled_from("[{"),
       where=st.sampled_from(["properties", "consent", "extra"]))
def test_deep_nesting_is_decided_or_dead_lettered(depth: int, opener: str, where: str) -> None:
    inner = ("[" * depth + "]" * depth) if opener == "[" else (
        '{"a":' * depth + "1" + "}" * depth)
    text = '{"deep":' + inner + "}"
    texts = {"properties": None, "consent": '{"analytics":true}', "extra": None}
    texts[where] = text
    event = wire_event(texts["properties"], None, texts["consent"], texts["extra"])
    check_decision(event, DEFAULT_PRESET, POLICIES[2])


def test_ten_thousand_keys_are_cut_to_the_limits() -> None:
    props = {f"k{i}": "v" * (i % 50) for i in range(10_000)}
    event = wire_event(json.dumps(props), None, '{"analytics":true}', None)
    decision = route(event, ConsentPolicy(), DEFAULT_PRESET)
    assert isinstance(decision, Send)
    *named, more = decision.truncated  # 20 names, then "… N more"
    assert len(named) == 20 and more.startswith("… ")
    assert decision.payload["metadata"][TRUNCATED_KEY] == 20 + int(more.split()[1])
    assert len(decision.payload["metadata"]) <= DEFAULT_PRESET.max_metadata_keys
    check_decision(event, DEFAULT_PRESET, ConsentPolicy())


def test_lone_surrogates_are_replaced_and_counted() -> None:
    event = wire_event('{"n":"\\ud83d","\\udc00k":["\\ud800"]}', None,
                       '{"analytics":true}', None)
    decision = route(event, ConsentPolicy(), DEFAULT_PRESET)
    assert isinstance(decision, Send)
    assert decision.payload["metadata"] == {"n": "\ufffd", "\ufffdk": "\ufffd"}
    assert decision.replaced == event.replaced == 3


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(props=OBJECTS, traits=OBJECTS, context=OBJECTS, user=st.text(ANY_CHAR, max_size=10),
       name=st.text(ANY_CHAR, max_size=10) | st.just("Feature Used"),
       mappings=st.sampled_from(MAPPINGS), policy=st.sampled_from(POLICIES))
def test_produce_encode_then_decode_never_crashes(
    props: dict[str, Any], traits: dict[str, Any], context: dict[str, Any], user: str,
    name: str, mappings: MappingSet, policy: ConsentPolicy,
) -> None:
    """The produce side: canonical JSON → Avro record → wire bytes → decode → route."""
    event = {"type": "track", "event": name, "userId": user, "properties": props,
             "traits": traits, "context": context}
    try:
        record = codec.to_record(event)
    except InvalidEvent:  # NaN/Infinity or an int over Python's digit limit: refused
        return
    decoded = codec.decode(codec.encode(3, record), lambda _i: codec.SCHEMA)
    check_decision(decoded, mappings, policy)


_FIELD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(st.characters(codec="utf-8"), max_size=20))


@given(st.text(st.characters(codec="utf-8"), max_size=20), _FIELD_VALUES)
def test_a_fields_size_is_what_the_compact_json_body_spends_on_it(key: str, value: Any) -> None:
    """`_size` skips json.dumps (round 24: 3× faster cuts of huge objects); it must still
    count exactly the bytes the body's encoder writes for the field."""
    from consumer.mapping import _size

    alone = len(json.dumps({}, separators=(",", ":")).encode())
    body = json.dumps({key: value}, ensure_ascii=False, separators=(",", ":")).encode()
    assert _size(key, value) == len(body) - alone + 1
