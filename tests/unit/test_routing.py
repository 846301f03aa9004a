"""Unit tests for consumer.routing: one decision per event, and the exact request body."""

from __future__ import annotations

import json
from typing import Any

import pytest

from consumer.filtering import ConsentPolicy, Drop
from consumer.mapping import DEFAULT_PRESET, load_mappings
from consumer.routing import Send, encode_payload, route

POLICY = ConsentPolicy()
GRANTED = {"consent": {"analytics": True}}


def event(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "type": "track", "event": "Feature Used", "userId": "user_001",
        "properties": {"feature": "export_csv"}, "context": dict(GRANTED),
    }
    base.update(over)
    return base


def test_seed_example_is_sent_with_its_exact_body() -> None:
    decision = route(event(), POLICY, DEFAULT_PRESET)
    assert isinstance(decision, Send)
    assert decision.payload == {"user_id": "user_001", "event_name": "feature_used",
                                "metadata": {"feature": "export_csv"}}
    assert decision.event_name == "feature_used"
    assert decision.body == (b'{"user_id":"user_001","event_name":"feature_used",'
                             b'"metadata":{"feature":"export_csv"}}')


@pytest.mark.parametrize(("over", "expected"), [
    ({"userId": None}, Drop("anonymous")),
    ({"userId": "  "}, Drop("anonymous")),
    ({"context": {"consent": {"analytics": False}}}, Drop("consent", "analytics")),
    ({"context": {}}, Drop("consent", "analytics")),
    ({"type": "identify"}, Drop("unsupported_type")),
    ({"type": "group"}, Drop("unsupported_type")),
    ({"event": "Something Else"}, Drop("unmapped")),
    ({"event": None}, Drop("unmapped")),
])
def test_drops(over: dict[str, Any], expected: Drop) -> None:
    assert route(event(**over), POLICY, DEFAULT_PRESET) == expected


def test_page_view_is_sent_as_page_viewed() -> None:
    decision = route({"type": "page", "name": "Pricing", "userId": "u",
                      "properties": {"url": "https://ex.com/pricing"}, "context": GRANTED},
                     POLICY, DEFAULT_PRESET)
    assert isinstance(decision, Send)
    assert decision.event_name == "page_viewed"
    assert decision.payload["metadata"]["url"] == "https://ex.com/pricing"


def test_mappings_choose_the_name_and_policy_the_consent() -> None:
    mappings = load_mappings({"preset": "none",
                              "events": {"Order Completed": {"event_name": "purchase"}}})
    allow = ConsentPolicy(categories=(), missing="deny")
    decision = route(event(event="order_completed", context={}), allow, mappings)
    assert isinstance(decision, Send)
    assert decision.event_name == "purchase"
    assert route(event(), allow, mappings) == Drop("unmapped")


def test_metadata_in_the_body_is_flat() -> None:
    decision = route(event(properties={"plan": {"tier": "pro", "seats": 5}, "tags": ["a"]}),
                     POLICY, DEFAULT_PRESET)
    assert isinstance(decision, Send)
    metadata = json.loads(decision.body)["metadata"]
    assert all(not isinstance(v, dict | list) for v in metadata.values())
    assert metadata["plan_tier"] == "pro"


@pytest.mark.parametrize(("payload", "body"), [
    ({"a": "é☕"}, '{"a":"é☕"}'.encode()),
    ({"n": 2**70, "f": 1.5, "b": False, "z": None}, b'{"n":1180591620717411303424,'
                                                    b'"f":1.5,"b":false,"z":null}'),
    ({}, b"{}"),
])
def test_encode_payload_is_compact_utf8(payload: dict[str, Any], body: bytes) -> None:
    assert encode_payload(payload) == body


def test_encode_payload_refuses_nan() -> None:
    with pytest.raises(ValueError):
        encode_payload({"x": float("nan")})
