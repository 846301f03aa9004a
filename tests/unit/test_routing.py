"""Unit tests for consumer.routing: one decision per event, and the exact request body."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer import codec
from consumer.errors import InvalidEvent
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
    ({"type": "screen"}, Drop("unsupported_type")),
    ({"type": "group"}, Drop("anonymous")),
    ({"type": "identify", "context": {"consent": {"analytics": False}}},
     Drop("consent", "analytics")),
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


def _calls(decision: Drop | Send) -> list[tuple[str, str, Any]]:
    assert isinstance(decision, Send)
    return [(c.purpose, c.path, json.loads(c.body)) for c in decision.calls]


def test_identify_is_one_identify_call_with_all_traits_by_default() -> None:
    decision = route({"type": "identify", "userId": "u1", "context": GRANTED,
                      "traits": {"email": "a@b.c", "plan": {"tier": "pro"},
                                 "createdAt": "2024-01-01T00:00:00Z"}},
                     POLICY, DEFAULT_PRESET)
    assert _calls(decision) == [("identify", "/v1/identify", {
        "user_id": "u1", "metadata": {"email": "a@b.c", "plan_tier": "pro",
                                      "created_at": "2024-01-01T00:00:00Z"}})]
    assert isinstance(decision, Send) and decision.event_name == "identify"


def test_identify_and_group_report_the_trait_fields_they_leave_out() -> None:
    """explain lists what metadata leaves out; identify and group reported nothing."""
    decision = route({"type": "identify", "userId": "u1", "context": GRANTED,
                      "traits": {"email": "a@b", "roles": [{"a": 1}],
                                 "company": {"id": "c", "owners": [{"x": 1}]}}},
                     POLICY, DEFAULT_PRESET)
    assert isinstance(decision, Send)
    assert sorted(decision.omitted) == ["company.owners", "roles"]
    decision = route({"type": "group", "groupId": "g", "userId": "u1", "context": GRANTED,
                      "traits": {"name": "A", "owners": [{"x": 1}]}}, POLICY, DEFAULT_PRESET)
    assert isinstance(decision, Send) and decision.omitted == ("owners",)


def test_group_is_company_identify_then_the_association() -> None:
    decision = route({"type": "group", "userId": "u1", "groupId": "acme", "context": GRANTED,
                      "traits": {"name": "Acme"}}, POLICY, DEFAULT_PRESET)
    assert _calls(decision) == [
        ("company_identify", "/v1/companies/identify",
         {"company_id": "acme", "metadata": {"name": "Acme"}}),
        ("associate_company", "/v1/identify", {"user_id": "u1", "metadata": {},
                                                 "company": {"id": "acme"}}),
    ]


def test_traits_sections_pick_rename_exclude_and_add_static_values() -> None:
    mappings = load_mappings({
        "identify": {"exclude": ["password"], "rename": {"plan": "plan_tier"},
                     "static": {"source": "signal"}},
        "group": {"pick": ["name"]},
    })
    identify = route({"type": "identify", "userId": "u1", "context": GRANTED,
                      "traits": {"plan": "pro", "password": "x", "email": "e"}},
                     POLICY, mappings)
    assert _calls(identify)[0][2]["metadata"] == {"plan_tier": "pro", "email": "e",
                                                  "source": "signal"}
    group = route({"type": "group", "groupId": "g", "userId": "u1", "context": GRANTED,
                   "traits": {"name": "Acme", "size": 5}}, POLICY, mappings)
    assert _calls(group) == [("company_identify", "/v1/companies/identify",
                              {"company_id": "g", "metadata": {"name": "Acme"}}),
                             ("associate_company", "/v1/identify",
                              {"user_id": "u1", "metadata": {}, "company": {"id": "g"}})]


def test_traits_get_the_track_size_limits() -> None:
    from dataclasses import replace
    mappings = replace(DEFAULT_PRESET, max_metadata_keys=3)
    decision = route({"type": "identify", "userId": "u1", "context": GRANTED,
                      "traits": {f"k{i}": i for i in range(10)}}, POLICY, mappings)
    assert isinstance(decision, Send)
    metadata = decision.calls[0].payload["metadata"]
    assert len(metadata) == 3 and metadata["_truncated"] == 8
    assert len(decision.truncated) == 8


@pytest.mark.parametrize("text", ['[{"feature": "export_csv"}]', '"x"', "42", "true"])
@pytest.mark.parametrize(("kind", "field"), [("track", "properties"),
                                             ("identify", "traits"), ("group", "traits")])
def test_properties_or_traits_that_are_not_an_object_dead_letter_the_event(
        text: str, kind: str, field: str) -> None:
    """They were sent with empty metadata: the event's data lost without a trace."""
    from consumer import codec
    from consumer.errors import DeadLetter, InvalidEvent
    from consumer.filtering import ConsentPolicy
    from consumer.mapping import DEFAULT_PRESET

    record = codec.to_record({"type": kind, "event": "Feature Used", "userId": "u1",
                              "groupId": "acme", "context": {"consent": {"analytics": True}}})
    record[field] = text
    decoded = codec.decode(codec.encode(1, record), lambda _i: codec.SCHEMA)
    with pytest.raises(InvalidEvent, match=f"{field} must be JSON object text") as info:
        route(decoded, ConsentPolicy(), DEFAULT_PRESET)
    assert isinstance(info.value, DeadLetter) and info.value.reason == "invalid_event"
    record[field] = "null"  # JSON null: absent, as before
    decoded = codec.decode(codec.encode(1, record), lambda _i: codec.SCHEMA)
    assert not isinstance(route(decoded, ConsentPolicy(), DEFAULT_PRESET), Drop)


def test_identify_company_properties_take_the_configured_limits_and_report_the_cut() -> None:
    """They were cut to the defaults whatever USERPILOT_MAX_METADATA_KEYS said, and what was
    cut was not reported."""
    from dataclasses import replace

    from consumer.filtering import ConsentPolicy

    fields = {f"k{i}": i for i in range(1500)}
    event = {"type": "identify", "userId": "u1", "traits": {"company": {"id": "acme", **fields}},
             "context": {"consent": {"analytics": True}}}
    roomy = replace(DEFAULT_PRESET, max_metadata_keys=5000)
    sent = route(event, ConsentPolicy(), roomy)
    assert isinstance(sent, Send)
    assert len(sent.payload["company"]) == 1501 and sent.truncated == ()
    tight = replace(DEFAULT_PRESET, max_metadata_keys=10)
    sent = route(event, ConsentPolicy(), tight)
    assert isinstance(sent, Send)
    assert len(sent.payload["company"]) <= 12  # the id, ten fields and the cut marker
    assert sent.truncated[0].startswith("company.")
    assert sent.truncated[-1] == f"… {1500 - 9 - 20} more"  # all counted, 20 named


def test_a_send_keeps_a_bounded_list_of_what_was_left_out() -> None:
    """A Send waits in the window: 7,300 names of cut keys (a 61 KB event) were 2 MiB per
    event, and 200 such events waiting for the limiter got the worker OOM-killed."""
    import sys

    from consumer.routing import MAX_LISTED, Send

    parent = "p" * 240
    props = {parent: {f"k{i}": i for i in range(7600)}}
    for shaped in (event(properties=props),
                   event(type="identify", event=None, properties=None, traits=props)):
        sent = route(shaped, POLICY, DEFAULT_PRESET)
        assert isinstance(sent, Send)
        assert len(sent.truncated) == MAX_LISTED + 1
        assert sent.truncated[-1].startswith("… ") and sent.truncated[-1].endswith(" more")
        assert sum(sys.getsizeof(name) for name in sent.truncated) < 20_000


def test_an_events_own_truncated_field_never_reads_as_the_workers_marker() -> None:
    """Userpilot showed `_truncated: 3` on an event nothing was cut from, and a cut
    counted the event's own `_truncated` as one of its fields (review "seed17")."""
    from dataclasses import replace

    def track(properties: dict[str, object], keys: int = 1000) -> dict[str, object]:
        decision = route({"type": "track", "event": "Feature Used", "userId": "u1",
                          "context": GRANTED, "properties": properties}, POLICY,
                         replace(DEFAULT_PRESET, max_metadata_keys=keys))
        assert isinstance(decision, Send)
        return dict(decision.calls[0].payload["metadata"])

    assert track({"feature": "export", "_truncated": 3}) == {
        "feature": "export", "_truncated_": 3}
    cut = track({"a": "x", "b": "yy", "c": "zzz", "_truncated": 1}, keys=3)
    assert cut["_truncated"] == 2 and "_truncated_" not in cut  # two fields went, of four
    # An own `_truncated_` keeps its name; the renamed field takes the next free one.
    assert track({"_truncated_": "mine", "_truncated": 9}) == {
        "_truncated_": "mine", "_truncated__": 9}


def _company_metadata(traits: dict[str, Any]) -> tuple[Send, dict[str, Any]]:
    sent = route({"type": "group", "userId": "u1", "groupId": "g1", "traits": traits,
                  "context": GRANTED}, POLICY, DEFAULT_PRESET)
    assert isinstance(sent, Send)
    return sent, json.loads(sent.calls[0].body)["metadata"]


def test_a_company_id_trait_takes_no_place_under_the_key_limit() -> None:
    """Review mapping41: the `id` a company identify never sends was counted against the
    key limit, and two real properties of a company that fits were cut for it."""
    traits: dict[str, Any] = {f"k{i:04d}": "v" for i in range(DEFAULT_PRESET.max_metadata_keys)}
    sent, metadata = _company_metadata({**traits, "id": "g1"})
    assert sent.truncated == () and metadata == traits
    assert any(note.startswith("id (") for note in sent.omitted)


def test_a_company_id_trait_takes_no_place_under_the_byte_limit() -> None:
    description = "x" * (DEFAULT_PRESET.max_metadata_bytes - 40)
    sent, metadata = _company_metadata({"description": description,
                                        "company_id": "g1-as-well-0123456789"})
    assert sent.truncated == () and metadata == {"description": description}
    assert any(note.startswith("company_id (") for note in sent.omitted)


def test_a_renamed_company_id_trait_is_still_sent() -> None:
    """The ids are left out after the mappings' rule: a rename keeps one."""
    mappings = load_mappings({"group": {"rename": {"id": "external_id"}}})
    sent = route({"type": "group", "userId": "u1", "groupId": "g1",
                  "traits": {"id": "crm-7", "plan": "pro"}, "context": GRANTED},
                 POLICY, mappings)
    assert isinstance(sent, Send)
    assert json.loads(sent.calls[0].body)["metadata"] == {"external_id": "crm-7", "plan": "pro"}


def _cut(kind: str, raw_user: bytes, raw_group: bytes = b"acme-ab") -> codec.Event:
    """A decoded event whose userId (and groupId) Avro bytes are the raw ones given."""
    event: dict[str, Any] = {"type": kind, "userId": "user-ab", "messageId": "m",
                             "context": {"consent": {"analytics": True}}}
    if kind == "track":
        event["event"] = "Feature Used"
    if kind == "group":
        event["groupId"] = "acme-ab"
    wire = codec.encode(7, codec.to_record(event))
    wire = wire.replace(b"user-ab", raw_user).replace(b"acme-ab", raw_group)
    return codec.decode(wire, lambda _id: codec.SCHEMA)


@pytest.mark.parametrize("kind", ["identify", "track", "group"])
def test_a_user_id_cut_inside_a_character_is_dead_lettered_not_merged(kind: str) -> None:
    """`user-\\xe2\\x82` and `user-\\xe2\\x84` both read as `user-\\ufffd`: sent, two users
    were one in Userpilot (review "users42")."""
    for raw in (b"user-\xe2\x82", b"user-\xe2\x84"):
        event = _cut(kind, raw)
        assert event.cut == {"userId"} and event["userId"] == "user-\ufffd"
        with pytest.raises(InvalidEvent, match="the user id holds invalid UTF-8"):
            route(event, ConsentPolicy(), DEFAULT_PRESET)


def test_a_group_id_cut_inside_a_character_is_dead_lettered() -> None:
    with pytest.raises(InvalidEvent, match="the company id holds invalid UTF-8"):
        route(_cut("group", b"user-ab", b"acme-\xe2\x82"), ConsentPolicy(), DEFAULT_PRESET)


@pytest.mark.parametrize("traits", [{"company": {"id": "acme-ab", "name": "Acme"}},
                                    {"company_id": "acme-ab", "plan": "pro"}])
def test_an_identifys_company_id_cut_inside_a_character_is_dead_lettered(
        traits: dict[str, Any]) -> None:
    """Review "diff42": only the envelope's ids were looked at; an identify's company id
    (from its traits) cut alike made two companies one."""
    wire = codec.encode(7, codec.to_record({
        "type": "identify", "userId": "u1", "traits": traits,
        "context": {"consent": {"analytics": True}}}))
    event = codec.decode(wire.replace(b"acme-ab", b"acme-\xe2\x82"), lambda _id: codec.SCHEMA)
    assert event.cut == {"traits"}
    with pytest.raises(InvalidEvent, match="the company id holds invalid UTF-8"):
        route(event, ConsentPolicy(), DEFAULT_PRESET)


def _identify_with_traits(traits: str) -> codec.Event:
    """A decoded identify whose `traits` travel as the JSON text given."""
    record = codec.to_record({"type": "identify", "userId": "u1",
                              "context": {"consent": {"analytics": True}}})
    record["traits"] = traits
    return codec.decode(codec.encode(7, record), lambda _id: codec.SCHEMA)


def _sent_company_ids(traits: str) -> tuple[Send, list[Any]]:
    """The Send of an identify with these traits, and the company ids its calls carry."""
    sent = route(_identify_with_traits(traits), ConsentPolicy(), DEFAULT_PRESET)
    assert isinstance(sent, Send)
    return sent, [json.loads(call.body).get("company", {}).get("id") for call in sent.calls]


@pytest.mark.parametrize("traits", ['{"company": {"id": "acme-\\ud83d", "name": "Acme"}}',
                                    '{"company_id": "acme-\\ud83e", "plan": "pro"}'])
def test_an_identifys_company_id_with_a_lone_surrogate_is_dead_lettered(traits: str) -> None:
    """`"acme-\\ud83d"` and `"acme-\\ud83e"` (JavaScript cut inside an emoji) both read
    `acme-\ufffd`: sent, two companies were one in Userpilot (round 42's note)."""
    event = _identify_with_traits(traits)
    with pytest.raises(InvalidEvent, match=r"the company id holds .* lone UTF-16 surrogate"):
        route(event, ConsentPolicy(), DEFAULT_PRESET)
    assert not event.cut and event.replaced == 1 and "traits" in event.surrogated


def test_a_lone_surrogate_beside_the_ids_still_goes() -> None:
    """Only an id read from the replaced text is refused: the trait that held the surrogate
    is sent with U+FFFD, as before."""
    sent, ids = _sent_company_ids(
        '{"company": {"id": "acme", "name": "Acme \\ud83d"}, "nick": "x\\udc00"}')
    assert sent.replaced == 2 and "acme" in ids, ids
    # A U+FFFD the producer wrote in the id is text, whatever else held a surrogate (review
    # "diff43": the whole of traits was taken as cut).
    sent, ids = _sent_company_ids('{"company": {"id": "acme-\ufffd"}, "name": "Zoe \\ud83d"}')
    assert sent.replaced == 1 and "acme-\ufffd" in ids, ids


def test_cut_text_elsewhere_and_a_real_replacement_character_still_go() -> None:
    """Only ids read from invalid UTF-8 are refused: a U+FFFD the producer wrote is text,
    even beside another field's cut (review "diff42": the first rule was per event)."""
    wire = codec.encode(7, codec.to_record({
        "type": "identify", "userId": "user-\ufffd", "messageId": "m-ab",
        "context": {"consent": {"analytics": True}, "locale": "fr-ab"}}))
    written = codec.decode(wire, lambda _id: codec.SCHEMA)
    assert not written.cut
    assert isinstance(route(written, ConsentPolicy(), DEFAULT_PRESET), Send)
    elsewhere = codec.decode(wire.replace(b"fr-ab", b"fr-\xe2\x82").replace(b"m-ab", b"m-\xe2\x82"),
                             lambda _id: codec.SCHEMA)
    assert elsewhere.cut == {"context", "messageId"}
    assert elsewhere["context"]["locale"] == "fr-\ufffd"
    assert isinstance(route(elsewhere, ConsentPolicy(), DEFAULT_PRESET), Send)
    anonymous_cut = codec.decode(
        codec.encode(7, codec.to_record({"type": "track", "event": "Feature Used",
                                         "anonymousId": "an-ab"})).replace(b"an-ab",
                                                                          b"an-\xe2\x82"),
        lambda _id: codec.SCHEMA)
    assert anonymous_cut.cut == {"anonymousId"}
    assert isinstance(route(anonymous_cut, ConsentPolicy(), DEFAULT_PRESET), Drop)


@pytest.mark.parametrize(("kind", "extra"), [("track", {"event": "Feature Used"}),
                                             ("identify", {})])
def test_a_producers_replacement_character_in_the_user_id_goes_beside_a_cut_trait(
        kind: str, extra: dict[str, Any]) -> None:
    """Each id is judged by its own source: a cut in `traits` refused a U+FFFD the
    producer wrote in `userId` (review "diff42")."""
    event: dict[str, Any] = {"type": kind, "userId": "user-\ufffd", "messageId": "m",
                             "traits": {"bio": "caf-ab", "plan": "pro"},
                             "context": {"consent": {"analytics": True}}, **extra}
    wire = codec.encode(7, codec.to_record(event))
    decoded = codec.decode(wire.replace(b"caf-ab", b"caf-\xc3b"), lambda _id: codec.SCHEMA)
    assert decoded.cut == {"traits"}
    assert isinstance(route(decoded, ConsentPolicy(), DEFAULT_PRESET), Send)


def _identify_cut(traits: dict[str, Any], group_id: str | None, cut: bytes) -> codec.Event:
    """An identify whose Avro bytes `cut` (once in the event) lose a character's end."""
    event: dict[str, Any] = {"type": "identify", "userId": "u1", "messageId": "m",
                             "traits": traits, "context": {"consent": {"analytics": True}}}
    if group_id is not None:
        event["groupId"] = group_id
    wire = codec.encode(7, codec.to_record(event))
    assert wire.count(cut) == 1
    return codec.decode(wire.replace(cut, cut[:-2] + b"\xc3" + cut[-1:]),
                        lambda _id: codec.SCHEMA)


@pytest.mark.parametrize(("traits", "group_id", "cut", "cut_field"), [
    # the company id from groupId; only an unrelated trait cut
    ({"bio": "caf-ab", "plan": "pro"}, "acme-\ufffd", b"caf-ab", "traits"),
    # the company id from traits.company.id; the groupId (not sent) cut
    ({"company": {"id": "acme-\ufffd", "name": "Acme"}}, "grp-ab", b"grp-ab", "groupId"),
])
def test_an_identifys_company_id_is_judged_by_the_field_it_comes_from(
        traits: dict[str, Any], group_id: str, cut: bytes, cut_field: str) -> None:
    """Review "diff42": the identify's company id was refused for a cut in either field."""
    event = _identify_cut(traits, group_id, cut)
    assert event.cut == {cut_field}
    sent = route(event, ConsentPolicy(), DEFAULT_PRESET)
    assert isinstance(sent, Send) and sent.payload["company"]["id"] == "acme-\ufffd"


def _identify_of(user_fields: dict[str, Any], company_fields: dict[str, Any]) -> dict[str, Any]:
    return {"type": "identify", "userId": "user_001",
            "traits": {**user_fields, "company": {"id": "acme", **company_fields}},
            "context": dict(GRANTED)}


def _compact_size(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())


def test_an_identify_carries_one_metadata_limit_for_user_and_company_together() -> None:
    """Each cut to the whole limit, an identify at the largest limit (512 KiB) carried
    1 MiB of properties: a 413 and a dead letter where the largest fields should be left
    out (review "api44"). The user's metadata goes first; the company keeps its id."""
    from dataclasses import replace

    cap = 512 * 1024
    user = {f"u{i:03d}": "v" * 2000 for i in range(250)}  # ~505 KB: fits alone
    company = {f"c{i:03d}": "w" * 2000 for i in range(250)}
    sent = route(_identify_of(user, company), POLICY,
                 replace(DEFAULT_PRESET, max_metadata_bytes=cap))
    assert isinstance(sent, Send)
    payload = sent.payload
    assert len(payload["metadata"]) == 250  # the user's metadata whole
    assert payload["company"]["id"] == "acme"
    assert _compact_size(payload["metadata"]) + _compact_size(payload["company"]) <= cap
    assert len(sent.body) <= cap + 64  # the body: user_id, keys and braces beside them
    assert sent.truncated and all(key.startswith("company.") for key in sent.truncated[:20])


@settings(max_examples=150, deadline=None)
@given(user=st.dictionaries(st.text("ab", min_size=1, max_size=4),
                            st.text("xé", max_size=300), max_size=12),
       company=st.dictionaries(st.text("cd", min_size=1, max_size=4),
                               st.text("yé", max_size=300), max_size=12),
       limit=st.integers(64, 3000))
def test_an_identifys_metadata_and_company_stay_within_one_limit(
        user: dict[str, str], company: dict[str, str], limit: int) -> None:
    from dataclasses import replace

    sent = route(_identify_of(user, company), POLICY,
                 replace(DEFAULT_PRESET, max_metadata_bytes=limit))
    assert isinstance(sent, Send)
    payload = sent.payload
    assert payload["company"]["id"] == "acme"
    # Within the limit but for the two `_truncated` markers when nearly everything is cut.
    allowance = 2 * len('"_truncated":99,')
    assert _compact_size(payload["metadata"]) + _compact_size(payload["company"]) \
        <= limit + allowance


def _sent(raw: dict[str, Any], mappings: Any) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The first call's metadata and the Send's `omitted`, the event read as `run` reads it
    (Avro and back)."""
    decoded = codec.decode(codec.encode(1, codec.to_record(raw)), lambda _i: codec.SCHEMA)
    decision = route(decoded, ConsentPolicy(categories=(), missing="allow"), mappings)
    assert isinstance(decision, Send), decision
    return json.loads(decision.calls[0].body)["metadata"], decision.omitted


def test_a_value_of_the_event_a_rule_step_replaces_is_listed_as_omitted() -> None:
    """A rename, a `fields` pick or a static taking the name of one of the event's own
    values replaced it, as documented, but `explain` showed no loss (review "mapfid45")."""
    identify = load_mappings({"identify": {"rename": {"plan": "plan_tier"},
                                           "static": {"source": "signal"}}})
    metadata, omitted = _sent({"type": "identify", "userId": "u1", "traits": {
        "plan_tier": "gold", "plan": "pro", "source": "web", "email": "a@b.c"}}, identify)
    assert metadata == {"plan_tier": "pro", "source": "signal", "email": "a@b.c"}
    assert omitted == ("plan_tier (replaced by the rule's rename of plan)",
                       "source (replaced by the rule's static)")

    # The rename's value comes first in the traits this time: the same loss, named.
    _, omitted = _sent({"type": "identify", "userId": "u1",
                        "traits": {"plan": "pro", "plan_tier": "gold"}}, identify)
    assert omitted == ("plan_tier (replaced by the rule's rename of plan)",)

    track = load_mappings({"events": {"Feature Used": {
        "rename": {"feature": "feature_key"},
        "fields": {"utm_source": "context.campaign.source", "plan": "context.plan"}}}})
    metadata, omitted = _sent({"type": "track", "event": "Feature Used", "userId": "u1",
                               "properties": {"feature": "export", "feature_key": "k-17",
                                              "utm_source": "mail", "plan": "pro"},
                               "context": {"campaign": {"source": "google"}}}, track)
    assert metadata == {"feature_key": "export", "utm_source": "google", "plan": "pro"}
    assert omitted == ("feature_key (replaced by the rule's rename of feature)",
                       "utm_source (replaced by the rule's field utm_source)")


def test_rule_steps_that_replace_nothing_of_the_event_list_nothing() -> None:
    mappings = load_mappings({"events": {"Feature Used": {
        "rename": {"feature": "feature_key"},
        "fields": {"utm_source": "context.campaign.source"},
        "static": {"tier": "fixed"}}}})
    metadata, omitted = _sent({"type": "track", "event": "Feature Used", "userId": "u1",
                               "properties": {"feature": "export"},
                               "context": {"campaign": {"source": "google"}}}, mappings)
    assert metadata == {"feature_key": "export", "utm_source": "google", "tier": "fixed"}
    assert omitted == ()


@pytest.mark.parametrize("key", ["id", "company_id"])
def test_a_company_id_read_from_invalid_utf8_is_refused_under_either_key(
        key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """README: the company's key is one constant, `calls.COMPANY_KEY`, a one-line change if
    Userpilot says `company_id`; the refusal of an id cut from invalid UTF-8 read `"id"`
    whatever it was, and after the change two companies cut alike became one (review
    "users45"). Patched in both modules, as an edit of the constant would be."""
    from consumer import calls, routing
    from consumer.errors import InvalidEvent

    monkeypatch.setattr(calls, "COMPANY_KEY", key)
    monkeypatch.setattr(routing, "COMPANY_KEY", key)
    wire = codec.encode(7, codec.to_record({
        "type": "identify", "userId": "u1", "traits": {"company": {"id": "acme-ab"}},
        "context": {"consent": {"analytics": True}}}))
    cut = codec.decode(wire.replace(b"acme-ab", b"acme-\xe2\x82"), lambda _id: codec.SCHEMA)
    with pytest.raises(InvalidEvent, match="company id"):
        route(cut, ConsentPolicy(), DEFAULT_PRESET)


def test_the_company_id_sent_is_not_listed_as_left_out() -> None:
    """`traits.company.company_id` chosen as the id was listed as "another spelling of the
    company's id" left out (review "users45")."""
    decision = route(event(type="identify", event=None, properties=None, traits={
        "company": {"company_id": "acme", "name": "Acme"}}), POLICY, DEFAULT_PRESET)
    assert isinstance(decision, Send)
    assert json.loads(decision.calls[0].body)["company"]["id"] == "acme"
    assert decision.omitted == ()


def test_exactly_max_listed_names_are_kept_as_they_are() -> None:
    """Review "mutate52": at exactly MAX_LISTED names no "… 0 more" follows them."""
    from consumer.routing import MAX_LISTED, listed

    names = [f"k{i}" for i in range(MAX_LISTED + 1)]
    assert listed(names[:MAX_LISTED]) == tuple(names[:MAX_LISTED])
    assert listed(names) == (*names[:MAX_LISTED], "… 1 more")
