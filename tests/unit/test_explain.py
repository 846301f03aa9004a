"""Unit tests for consumer.explain: the Event Debugger's decision documents."""

from __future__ import annotations

import json
from typing import Any

import pytest

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
        "requests": [
            {"purpose": "ensure_user", "method": "POST",
             "url": "https://analytex.userpilot.io/v1/identify", "headers": HEADERS,
             "body": {"user_id": "user_001", "metadata": {}}},
            {"purpose": "track", "method": "POST",
             "url": "https://analytex.userpilot.io/v1/track", "headers": HEADERS,
             "body": {"user_id": "user_001", "event_name": "feature_used",
                      "metadata": {"feature": "export_csv"}}},
        ],
        "request": {
            "method": "POST",
            "url": "https://analytex.userpilot.io/v1/track",
            "headers": HEADERS,
            "body": {"user_id": "user_001", "event_name": "feature_used",
                     "metadata": {"feature": "export_csv"}},
        },
    }
    assert TOKEN not in json.dumps(doc)


HEADERS = {"Content-Type": "application/json", "Authorization": "Token ***",
           "X-API-Version": "2020-09-22"}
CONSENT = {"consent": {"analytics": True}}


def _requests(doc: dict[str, Any]) -> list[tuple[str, str, Any]]:
    return [(r["purpose"], r["url"].rsplit("/v1/", 1)[1], r["body"]) for r in doc["requests"]]


def test_every_request_of_an_event_in_order_and_ensure_user_once_per_user() -> None:
    docs = list(explain_lines([
        line(type="group", userId="u1", groupId="acme", traits={"plan": "pro"},
             context=CONSENT),
        line(type="track", event="Feature Used", userId="u1", context=CONSENT),
        line(type="track", event="Feature Used", userId="u2", context=CONSENT),
        line(type="track", event="Feature Used", userId="u2", context=CONSENT),
        line(type="identify", userId="u3", traits={"email": "a@b.c"}, context=CONSENT),
        line(type="track", event="Feature Used", userId="u3", context=CONSENT),
    ], SETTINGS))
    track = {"event_name": "feature_used", "metadata": {}}
    assert [_requests(d) for d in docs] == [
        [("company_identify", "companies/identify",
          {"company_id": "acme", "metadata": {"plan": "pro"}}),
         ("associate_company", "identify", {"user_id": "u1", "metadata": {},
                                                 "company": {"id": "acme"}})],
        [("track", "track", {"user_id": "u1", **track})],  # u1 was identified just before
        [("ensure_user", "identify", {"user_id": "u2", "metadata": {}}),
         ("track", "track", {"user_id": "u2", **track})],
        [("track", "track", {"user_id": "u2", **track})],
        [("identify", "identify", {"user_id": "u3", "metadata": {"email": "a@b.c"}})],
        [("track", "track", {"user_id": "u3", **track})],
    ]
    assert all(r["headers"] == HEADERS for d in docs for r in d["requests"])


def test_no_ensure_user_when_it_is_off() -> None:
    settings = load_settings({"USERPILOT_API_KEY": TOKEN, "USERPILOT_ENSURE_USER": "false"},
                             offline=True)
    (doc,) = explain_lines([DELIVERED], settings)
    assert [r["purpose"] for r in doc["requests"]] == ["track"]


def test_drops_name_the_reason_and_category() -> None:
    docs = list(explain_lines([
        line(type="track", event="Feature Used", messageId="a"),
        line(type="track", event="Feature Used", userId="u", messageId="b",
             context={"consent": {"analytics": False}}),
        line(type="group", userId="u", context={"consent": {"analytics": True}}),
        line(type="track", event="Nope", userId="u", context={"consent": {"analytics": True}}),
    ], SETTINGS))
    assert [(d["messageId"], d["decision"], d["reason"]) for d in docs] == [
        ("a", "drop", "anonymous"),
        ("b", "drop", "consent:analytics"),
        (None, "drop", "anonymous"),  # a group without groupId
        (None, "drop", "unmapped"),
    ]
    assert all("request" not in d for d in docs)


def test_invalid_lines_are_dead_letters_with_their_line_number() -> None:
    docs = list(explain_lines([DELIVERED, "", "{not json", "   ", line(type=3),
                               json.dumps([1]), line(type="track", bogus=1)], SETTINGS))
    assert docs[0]["decision"] == "deliver"
    bad = docs[1:]
    assert [d["line"] for d in bad] == [3, 5, 6, 7]
    assert all(d["decision"] == "dead_letter" for d in bad)
    assert all(d["reason"].startswith("invalid event: ") for d in bad)
    assert "bogus" in bad[3]["reason"]


@pytest.mark.parametrize("kind", ["screen", "alias", "Track", "", " track"])
def test_a_type_the_worker_drops_is_explained_as_dropped(kind: str) -> None:
    """`run` drops a record of any other type as unsupported_type; explain called it a dead
    letter (review "mapping22"), and a blank one still (review "events28")."""
    (doc,) = explain_lines([line(type=kind, userId="u", name="Home",
                                 context={"consent": {"analytics": True}})], SETTINGS)
    assert (doc["decision"], doc["reason"]) == ("drop", "unsupported_type")


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


def test_a_huge_integer_is_left_out_and_named_as_the_worker_does() -> None:
    """explain refused a line with an integer past Python's 4,300 digits as "not JSON",
    while the worker delivers it with the field left out (review "diff21")."""
    text = ('{"type": "track", "event": "Feature Used", "userId": "u1", '
            '"context": {"consent": {"analytics": true}}, '
            f'"properties": {{"ok": 1, "huge": {"9" * 5000}}}}}')
    (doc,) = explain_lines([text], SETTINGS)
    assert doc["decision"] == "deliver", doc
    assert doc["request"]["body"]["metadata"] == {"ok": 1}
    assert any("huge" in str(field) for field in doc["omitted"]), doc


def test_a_lone_surrogate_in_the_envelope_is_noted_as_replaced() -> None:
    """The envelope's strings are replaced in the record, before the worker parses any
    JSON text: explain showed the changed string with no note (review "seed23")."""
    text = ('{"type": "track", "event": "Feature Used", "userId": "abc", '
            '"anonymousId": "a\\ud83d", "context": {"consent": {"analytics": true}}, '
            '"properties": {"a": "x\\udc00"}}')
    (doc,) = explain_lines([text], SETTINGS)
    assert doc["decision"] == "deliver", doc
    assert doc["request"]["body"]["metadata"] == {"a": "x\ufffd"}
    assert doc["replaced_surrogates"] == 2


@pytest.mark.parametrize("field", ["userId", "groupId", "messageId"])
def test_a_lone_surrogate_in_an_id_is_refused_as_produce_refuses_it(field: str) -> None:
    """Review "ids47": replaced, "alice\\ud83d" and "alice\\ud83e" were one user in
    Userpilot (one company, one messageId), which the worker refuses for an id it sees cut."""
    text = ('{"type": "group", "userId": "u1", "groupId": "g1", "messageId": "m1", '
            '"context": {"consent": {"analytics": true}}}').replace(
                f'"{field}": "', f'"{field}": "\\ud83d')
    (doc,) = explain_lines([text], SETTINGS)
    assert doc["decision"] == "dead_letter", doc
    assert doc["reason"].startswith(f"invalid event: {field} holds a lone UTF-16 surrogate")


@pytest.mark.parametrize("literal", ["1e400", "-1e400", "NaN", "Infinity"])
def test_a_number_too_large_for_a_double_is_left_out_as_run_leaves_it_out(literal: str) -> None:
    """Review "events28": valid JSON, read as infinity; explain called the event a dead
    letter while `run` delivered it without that field."""
    text = ('{"type":"track","event":"Feature Used","userId":"k2",'
            '"context":{"consent":{"analytics":true}},"properties":{"a":' + literal + ',"b":2}}')
    (doc,) = explain_lines([text], SETTINGS)
    assert doc["decision"] == "deliver"
    assert doc["request"]["body"]["metadata"] == {"b": 2}
    assert "a" in doc["omitted"]


def test_replay_dry_run_lines_are_explained_by_their_event() -> None:
    """`replay --dry-run --show-event` lines (review "dlq48"): each explained by its event
    and named by its dead letter; one without its event says why; the summary is passed
    over."""
    event = json.loads(DELIVERED)
    lines = [json.dumps({"dlq": "t.dlq[0]@4", "to": "t", "dry_run": True, "event": event}),
             json.dumps({"dlq": "t.dlq[0]@5", "to": "t", "dry_run": True,
                         "event_unreadable": "UndecodableEvent: magic byte 103"}),
             json.dumps({"dlq": "t.dlq[0]@6", "to": "t", "dry_run": True}),
             json.dumps({"summary": {"replayed": 3}, "dry_run": True, "interrupted": False})]
    docs = list(explain_lines(lines, SETTINGS))
    assert [(d["dlq"], d["decision"]) for d in docs] == [
        ("t.dlq[0]@4", "deliver"), ("t.dlq[0]@5", "dead_letter"), ("t.dlq[0]@6", "dead_letter")]
    assert "magic byte 103" in docs[1]["reason"]
    assert "--show-event" in docs[2]["reason"]
    assert docs[0]["requests"] == next(explain_lines([DELIVERED], SETTINGS))["requests"]


def test_a_replay_line_s_marks_of_another_shape_are_ignored_not_a_crash() -> None:
    """Review "diff48c": `"event_cut": 5` raised inside the line's reading, reported as a
    mapping error dead letter without its `dlq`."""
    event = json.loads(DELIVERED)
    line = json.dumps({"dlq": "t.dlq[0]@4", "dry_run": True, "event": event,
                       "event_cut": 5, "event_surrogated": {"traits": 3}})
    (doc,) = explain_lines([line], SETTINGS)
    assert (doc["dlq"], doc["decision"]) == ("t.dlq[0]@4", "deliver"), doc
