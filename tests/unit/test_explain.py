"""Unit tests for consumer.explain: the Event Debugger's decision documents."""

from __future__ import annotations

import json
from typing import Any

from consumer.config import load_settings
from consumer.explain import explain_lines

TOKEN = "wt_9f8e7d6c5b4a3210"
SETTINGS = load_settings({"USERPILOT_API_KEY": TOKEN}, offline=True)


def line(**event: Any) -> str:
    return json.dumps(event)


DELIVERED = line(type="track", event="Feature Used", userId="user_001", messageId="m-1",
                 properties={"feature": "export_csv"},
                 context={"consent": {"analytics": True}})


def test_deliver_shows_the_exact_request_with_the_token_redacted() -> None:
    (doc,) = explain_lines([DELIVERED], SETTINGS)
    assert doc == {
        "line": 1,
        "event": "Feature Used",
        "messageId": "m-1",
        "decision": "deliver",
        "reason": None,
        "request": {
            "method": "POST",
            "url": "https://analytex.userpilot.io/v1/track",
            "headers": {"Content-Type": "application/json", "Authorization": "Token ***",
                        "X-API-Version": "2020-09-22"},
            "body": {"user_id": "user_001", "event_name": "feature_used",
                     "metadata": {"feature": "export_csv"}},
        },
    }
    assert TOKEN not in json.dumps(doc)


def test_drops_name_the_reason_and_category() -> None:
    docs = list(explain_lines([
        line(type="track", event="Feature Used", messageId="a"),
        line(type="track", event="Feature Used", userId="u", messageId="b",
             context={"consent": {"analytics": False}}),
        line(type="identify", userId="u", context={"consent": {"analytics": True}}),
        line(type="track", event="Nope", userId="u", context={"consent": {"analytics": True}}),
    ], SETTINGS))
    assert [(d["messageId"], d["decision"], d["reason"]) for d in docs] == [
        ("a", "drop", "anonymous"),
        ("b", "drop", "consent:analytics"),
        (None, "drop", "unsupported_type"),
        (None, "drop", "unmapped"),
    ]
    assert all("request" not in d for d in docs)


def test_invalid_lines_are_dead_letters_with_their_line_number() -> None:
    docs = list(explain_lines([DELIVERED, "", "{not json", "   ", line(type="alias"),
                               json.dumps([1]), line(type="track", bogus=1)], SETTINGS))
    assert docs[0]["decision"] == "deliver"
    bad = docs[1:]
    assert [d["line"] for d in bad] == [3, 5, 6, 7]
    assert all(d["decision"] == "dead_letter" for d in bad)
    assert all(d["reason"].startswith("invalid event: ") for d in bad)
    assert "bogus" in bad[3]["reason"]


def test_the_schema_round_trip_is_applied() -> None:
    """What is explained is what `run` would see after Avro: envelope nulls are gone."""
    (doc,) = explain_lines([line(type="track", event="Feature Used", userId="u",
                                 messageId=None, context={"consent": {"analytics": True}})],
                           SETTINGS)
    assert doc["decision"] == "deliver"
    assert doc["messageId"] is None


def test_consent_settings_are_honoured() -> None:
    settings = load_settings({"USERPILOT_CONSENT_MISSING": "allow"}, offline=True)
    (doc,) = explain_lines([line(type="track", event="Feature Used", userId="u")], settings)
    assert doc["decision"] == "deliver"
