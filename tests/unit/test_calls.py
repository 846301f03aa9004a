"""Unit tests for consumer.calls: identify/group bodies, the Call type, ensure-user."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.calls import (
    COMPANY_KEY,
    Call,
    CallPlan,
    KnownUsers,
    company_identify_payload,
    encode_body,
    ensure_user,
    ensure_user_call,
    event_calls,
    flatten_traits,
    group_calls,
    identify_calls,
    identify_payload,
    lacks_required_id,
    state_written,
    track_call,
    visible,
)
from consumer.mapping import DEFAULT_PRESET, build_track_payload


def identify(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "type": "identify", "userId": "user_001",
        "traits": {"name": "Jane Doe", "email": "jane@example.com", "plan": "pro"},
    }
    base.update(over)
    return base


def group(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "type": "group", "userId": "user_001", "groupId": "acme",
        "traits": {"name": "Acme", "plan": "enterprise", "employees": 120},
    }
    base.update(over)
    return base


TRACK = {"user_id": "user_001", "event_name": "feature_used", "metadata": {"f": "x"}}


def test_the_calls_that_write_a_company_are_the_ones_carrying_its_properties() -> None:
    """`written_company` lines up several users' updates of one company (`CompanyOrder`):
    a group's company identify and an identify's company properties; not the association
    (it adds a member, no property) nor a company named by its id alone."""
    company_identify, associate = group_calls(group())
    assert company_identify.written_company == "acme"
    assert associate.written_company is None
    with_props, = identify_calls(identify(traits={"company": {"id": "acme", "plan": "x"}}))
    assert with_props.written_company == "acme"
    id_only, = identify_calls(identify(traits={"company_id": "acme"}))
    assert id_only.written_company is None
    assert track_call(TRACK).written_company is None
    assert ensure_user_call("user_001").written_company is None


def test_the_state_an_events_calls_set_again_is_a_users_traits_or_a_companys() -> None:
    """`state_written`: what a later event setting it again makes stale (review "order50");
    a Track is history, and the bare identify that makes a user exist sets nothing (review
    "diff50a"); a membership is a state of its own (review "diff50d")."""
    assert state_written(identify_calls(identify())) == (("user", "user_001"),)
    assert state_written(group_calls(group())) == (("company", "acme"),
                                                    ("member", "user_001", "acme"))
    with_company = identify_calls(identify(traits={"company": {"id": "acme", "plan": "x"}}))
    assert state_written(with_company) == (("user", "user_001"), ("company", "acme"),
                                           ("member", "user_001", "acme"))
    assert state_written((ensure_user_call("user_001"), track_call(TRACK))) == ()
    assert state_written(group_calls(group())[1:]) == (("member", "user_001", "acme"),)
    assert state_written(()) == ()


# ---------------------------------------------------------------------------- identify


def test_identify_sends_traits_as_metadata_with_the_exact_body() -> None:
    (call,) = identify_calls(identify())
    assert (call.method, call.path, call.family, call.endpoint, call.purpose) == (
        "POST", "/v1/identify", "identify", "identify", "identify")
    assert call.body == (b'{"user_id":"user_001","metadata":{"name":"Jane Doe",'
                         b'"email":"jane@example.com","plan":"pro"}}')
    assert json.loads(call.body) == call.payload
    assert call.user_id == "user_001"
    assert call.track_user_id is None


def test_identify_flattens_like_track_metadata() -> None:
    traits = {"address": {"city": "Paris", "geo": {"lat": 1.5}}, "tags": ["a", "b"],
              "address_city": "Lyon", "nan": math.nan, "ok": True, "none": None}
    payload = identify_payload(identify(traits=traits))
    track = build_track_payload(
        {"type": "track", "event": "Feature Used", "userId": "u", "properties": traits},
        DEFAULT_PRESET.lookup({"type": "track", "event": "Feature Used"}),  # type: ignore[arg-type]
    )
    assert payload["metadata"] == track["metadata"]
    assert payload["metadata"]["address_city"] == "Lyon"  # a top-level primitive wins
    assert payload["metadata"]["address_geo_lat"] == 1.5
    assert "nan" not in payload["metadata"]


@pytest.mark.parametrize(("traits", "expected"), [
    ({"createdAt": "2024-01-01T00:00:00Z"}, {"created_at": "2024-01-01T00:00:00Z"}),
    ({"created_at": "2024-02-02"}, {"created_at": "2024-02-02"}),
    ({"createdAt": "2024-01-01", "created_at": "2023-12-31"}, {"created_at": "2024-01-01"}),
    ({"createdAt": None, "created_at": "2023-12-31"}, {"created_at": "2023-12-31"}),
    ({"createdAt": 1700000000}, {"created_at": 1700000000}),
])
def test_created_at_is_renamed_as_both_peers_do(
    traits: dict[str, Any], expected: dict[str, Any]
) -> None:
    assert identify_payload(identify(traits=traits))["metadata"] == expected


def test_company_object_with_id_becomes_identify_company() -> None:
    traits = {"name": "Jane", "company": {"id": "acme", "name": "Acme", "plan": "ent",
                                         "address": {"city": "Paris"}, "tags": ["x"]}}
    payload = identify_payload(identify(traits=traits))
    assert payload["company"] == {COMPANY_KEY: "acme", "name": "Acme", "plan": "ent",
                                  "address_city": "Paris", "tags": "x"}
    assert payload["metadata"] == {"name": "Jane"}  # the company is not a user trait too


@pytest.mark.parametrize(("company_id", "sent"), [
    (1.0, "1"), (1.5e20, "150000000000000000000"), (123, "123"), (0, "0"),
    # As JavaScript writes them, not their binary digits (review "seed34").
    (12345678901234567890.0, "12345678901234567000"), (1e300, "1" + "0" * 300),
    (12345678901234567890, "12345678901234567890"),
    # One JSON number, spelled either way, is one company (reviews "ids47", "spec47").
    (1e21, "1000000000000000000000"), (10**21, "1000000000000000000000"),
    (-2.5e22, "-25000000000000000000000")])
def test_an_integral_number_names_a_company_whichever_way_json_wrote_it(
        company_id: float, sent: str) -> None:
    """Review "events31": 1.0 was no id (1 was), and the company's fields went into the
    user's metadata; JSON and JavaScript have one number type."""
    payload = identify_payload(identify(traits={"company": {"id": company_id, "name": "N"}}))
    assert payload["company"] == {COMPANY_KEY: sent, "name": "N"}
    assert payload["metadata"] == {}


def test_ids_left_out_of_an_identifys_company_are_listed() -> None:
    """Review "events31": a competing `traits.company_id` and an unusable `company.id`
    were dropped without a word in `omitted`."""
    omitted: list[str] = []
    payload = identify_payload(identify(traits={"company": {"id": "A"}, "company_id": "B"}),
                               omitted=omitted)
    assert payload["company"] == {COMPANY_KEY: "A"}
    assert omitted == ["company_id (another company id than the one sent)"]
    omitted.clear()
    payload = identify_payload(identify(groupId="g4", traits={"company": {"id": {"x": 1}}}),
                               omitted=omitted)
    assert payload["company"] == {COMPANY_KEY: "g4"}
    assert omitted == ["company.id (not a usable company id)"]
    omitted.clear()
    identify_payload(identify(traits={"company": {"id": "A"}, "company_id": "A"}),
                     omitted=omitted)
    assert omitted == [], "the same id twice leaves nothing out"


def test_a_group_id_the_traits_overruled_is_listed_as_left_out() -> None:
    """Review "seed34": the traits' company id won over the event's groupId, and `explain`
    did not say the groupId was not sent."""
    omitted: list[str] = []
    payload = identify_payload(identify(groupId="g-env", traits={"company": {"id": "g-t"}}),
                               omitted=omitted)
    assert payload["company"] == {COMPANY_KEY: "g-t"}
    assert omitted == ["groupId (another company id than the one sent)"]
    omitted.clear()
    identify_payload(identify(groupId="g-t", traits={"company": {"id": "g-t"}}),
                     omitted=omitted)
    assert omitted == [], "the same id twice leaves nothing out"


@pytest.mark.parametrize("bad", ["   ", 1.5, True, {"x": 1}, ["a"], None])
def test_an_unusable_company_id_with_no_company_is_not_a_user_property(bad: Any) -> None:
    """Review "seed34": with no usable id anywhere no company is attached, and the unusable
    id went out as the user's `company_id` property (an id beside no company). Left out and
    listed; the company object's other fields stay user properties."""
    omitted: list[str] = []
    payload = identify_payload(identify(traits={"plan": "pro", "company_id": bad}),
                               omitted=omitted)
    assert "company" not in payload
    assert payload["metadata"] == {"plan": "pro"}
    assert omitted == ["company_id (not a usable company id)"]
    omitted.clear()
    payload = identify_payload(identify(traits={"company": {"id": bad, "name": "Acme"}}),
                               omitted=omitted)
    assert "company" not in payload
    assert payload["metadata"] == {"company_name": "Acme"}
    assert omitted == ["company.id (not a usable company id)"]


def test_no_second_company_id_travels_beside_the_chosen_one() -> None:
    """Userpilot's documents disagree on the key (`id`, `company_id`): a `company_id` among
    the company's properties could attach the user to another company."""
    (call,) = identify_calls({"type": "identify", "userId": "u1", "traits": {
        "company": {"id": "acme", "company_id": "globex", "name": "Acme"}}})
    assert call.payload["company"] == {"id": "acme", "name": "Acme"}
    # Without `id`, the company's `company_id` (the OpenAPI page's spelling) is the id.
    (call,) = identify_calls({"type": "identify", "userId": "u1", "groupId": "acme",
                              "traits": {"company": {"company_id": "globex", "plan": "pro"}}})
    assert call.payload["company"] == {"id": "globex", "plan": "pro"}
    assert call.payload["metadata"] == {}


def test_identify_company_properties_have_the_metadata_size_limits() -> None:
    """A `company` of 3,000 long keys went out whole (a 332 KB identify body)."""
    from consumer.mapping import DEFAULT_MAX_METADATA_BYTES, DEFAULT_MAX_METADATA_KEYS

    fields = {f"{'k' * 100}{i}": i for i in range(3000)}
    payload = identify_payload(identify(traits={"company": {"id": "acme", **fields}}))
    company = payload["company"]
    assert company[COMPANY_KEY] == "acme"
    properties = {k: v for k, v in company.items() if k != COMPANY_KEY}
    assert len(properties) <= DEFAULT_MAX_METADATA_KEYS  # the cut marker included
    assert len(encode_body(properties)) <= DEFAULT_MAX_METADATA_BYTES  # as sent
    assert company["_truncated"] > 0


def test_company_key_is_id_as_userpilot_help_page_and_rudderstack() -> None:
    assert COMPANY_KEY == "id"


@pytest.mark.parametrize(("traits", "group_id", "expected"), [
    ({"company_id": "c1"}, None, {COMPANY_KEY: "c1"}),
    ({"company_id": 42}, None, {COMPANY_KEY: "42"}),
    ({"company": {"id": "c1"}, "company_id": "c2"}, "g", {COMPANY_KEY: "c1"}),
    ({"company": {"name": "Acme"}, "company_id": "c2"}, None, {COMPANY_KEY: "c2", "name": "Acme"}),
    ({}, "g1", {COMPANY_KEY: "g1"}),
    ({"company": {"name": "Acme"}}, "g1", {COMPANY_KEY: "g1", "name": "Acme"}),
    ({"company": {"id": ""}, "company_id": "  "}, "g1", {COMPANY_KEY: "g1"}),
    ({"company": {"id": True}}, None, None),
    ({"company": "Acme Inc"}, None, None),
])
def test_company_id_comes_from_traits_then_group_id(
    traits: dict[str, Any], group_id: str | None, expected: dict[str, Any] | None
) -> None:
    payload = identify_payload(identify(traits=traits, groupId=group_id))
    assert payload.get("company") == expected
    assert "company_id" not in payload["metadata"] or expected is None


def test_company_string_without_id_stays_a_user_trait() -> None:
    payload = identify_payload(identify(traits={"company": "Acme Inc"}))
    assert payload == {"user_id": "user_001", "metadata": {"company": "Acme Inc"}}


def test_identify_without_traits_sends_empty_metadata() -> None:
    assert identify_payload(identify(traits=None)) == {"user_id": "user_001", "metadata": {}}


def test_identify_without_user_id_gets_empty_user_id_not_an_exception() -> None:
    assert identify_payload(identify(userId=None))["user_id"] == ""


def test_traits_shape_sees_the_event_and_flattened_metadata() -> None:
    seen: list[Any] = []

    def shape(event: Any, metadata: dict[str, Any]) -> dict[str, Any]:
        seen.append((event["type"], dict(metadata)))
        return {"plan": metadata["plan"], "source": "signal"}

    payload = identify_payload(identify(), shape)
    assert payload["metadata"] == {"plan": "pro", "source": "signal"}
    assert seen == [("identify", {"name": "Jane Doe", "email": "jane@example.com",
                                  "plan": "pro"})]


# ---------------------------------------------------------------------------- group


def test_group_sends_company_then_associates_the_user_in_that_order() -> None:
    company, associate = group_calls(group())
    assert (company.path, company.family, company.endpoint, company.purpose) == (
        "/v1/companies/identify", "identify", "company_identify", "company_identify")
    assert company.body == (b'{"company_id":"acme","metadata":{"name":"Acme",'
                            b'"plan":"enterprise","employees":120}}')
    assert (associate.path, associate.purpose) == ("/v1/identify", "associate_company")
    assert associate.payload == {"user_id": "user_001", "metadata": {},
                                 "company": {COMPANY_KEY: "acme"}}
    assert associate.payload["metadata"] == {}  # user properties are left alone
    assert company.user_id is None and associate.user_id == "user_001"


def test_group_without_user_only_identifies_the_company() -> None:
    (company,) = group_calls(group(userId=None))
    assert company.payload["company_id"] == "acme"


def test_group_traits_are_flattened_and_created_at_renamed() -> None:
    payload = company_identify_payload(group(traits={"createdAt": "2020-01-01",
                                                     "address": {"city": "Paris"}}))
    assert payload == {"company_id": "acme",
                       "metadata": {"created_at": "2020-01-01", "address_city": "Paris"}}


def test_numeric_group_id_is_sent_as_a_string() -> None:
    assert company_identify_payload(group(groupId=7))["company_id"] == "7"


# ---------------------------------------------------------------------------- track, ensure


def test_track_call_keeps_the_track_body() -> None:
    call = track_call(TRACK)
    assert (call.path, call.family, call.endpoint, call.purpose) == (
        "/v1/track", "track", "track", "track")
    assert call.body == encode_body(TRACK)
    assert call.track_user_id == "user_001" and call.user_id is None


def test_ensure_user_call_is_a_bare_identify() -> None:
    call = ensure_user_call("u9")
    assert call.body == b'{"user_id":"u9","metadata":{}}'
    assert (call.path, call.family, call.purpose, call.user_id) == (
        "/v1/identify", "identify", "ensure_user", "u9")


def test_ensure_user_puts_a_bare_identify_before_the_first_track_of_an_unknown_user() -> None:
    known = KnownUsers(10)
    calls = ensure_user([track_call(TRACK)], known)
    assert [c.purpose for c in calls] == ["ensure_user", "track"]
    known.remember_succeeded(calls[0])
    assert [c.purpose for c in ensure_user([track_call(TRACK)], known)] == ["track"]


def test_ensure_user_is_not_added_when_the_event_identifies_the_user_first() -> None:
    known = KnownUsers(10)
    calls = (*identify_calls(identify()), track_call(TRACK))
    assert [c.purpose for c in ensure_user(calls, known)] == ["identify", "track"]


def test_an_identify_is_trusted_for_the_ttl_then_the_user_is_identified_again() -> None:
    """Review users22: a user deleted in Userpilot whose id came back was remembered for
    good, and its Tracks went out with no identify in front (attributed to no one)."""
    now = [1000.0]
    known = KnownUsers(10, ttl_s=60.0, clock=lambda: now[0])
    known.remember("u1")
    now[0] += 59.0
    assert not known.needs_identify("u1")  # a lookup does not extend the trust...
    now[0] += 2.0
    assert known.needs_identify("u1")  # ...61 s after the identify it has expired
    assert "u1" not in known
    known.remember("u1")  # the new identify succeeded: trusted for another 60 s
    now[0] += 30.0
    known.remember("u1")  # any later identify renews it
    now[0] += 45.0
    assert not known.needs_identify("u1")
    assert len(known) == 1


def test_ensure_user_off_returns_the_calls_unchanged() -> None:
    calls = (track_call(TRACK),)
    assert ensure_user(calls, None) == calls


def test_ensure_user_reads_but_never_remembers() -> None:
    known = KnownUsers(10)
    ensure_user([track_call(TRACK)], known)
    assert "user_001" not in known


def test_known_users_retry_semantics() -> None:
    """A failed identify leaves the user unknown: the retry sends it again."""
    known = KnownUsers(10)
    first = ensure_user([track_call(TRACK)], known)
    # the identify failed (no remember): the retried event plans it again
    assert ensure_user([track_call(TRACK)], known) == first
    known.remember_succeeded(first[0])
    # identify succeeded, Track failed: the retry sends only the Track
    assert [c.purpose for c in ensure_user([track_call(TRACK)], known)] == ["track"]


def test_known_users_evicts_the_least_recently_used() -> None:
    known = KnownUsers(2)
    known.remember("a")
    known.remember("b")
    assert not known.needs_identify("a")  # touches a: b is now the oldest
    known.remember("c")
    assert len(known) == 2
    assert "b" not in known and "a" in known and "c" in known
    assert known.needs_identify("b")


def test_remember_succeeded_ignores_track_and_company_calls() -> None:
    known = KnownUsers(5)
    known.remember_succeeded(track_call(TRACK))
    known.remember_succeeded(group_calls(group())[0])
    assert len(known) == 0


@pytest.mark.parametrize("capacity", [0, -1, True, 1.5, "10"])
def test_known_users_refuses_a_bad_capacity(capacity: Any) -> None:
    with pytest.raises(ValueError, match="capacity"):
        KnownUsers(capacity)


# ---------------------------------------------------------------------------- properties

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=20,
)
_ids = st.none() | st.text(max_size=5) | st.integers() | st.booleans()


def _primitive(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return value is None or isinstance(value, str | int | bool)


@settings(max_examples=300, deadline=None)
@given(traits=st.dictionaries(st.text(max_size=8), _json, max_size=6) | _json,
       user_id=_ids, group_id=_ids)
def test_any_identify_event_gives_a_valid_flat_body(
    traits: Any, user_id: Any, group_id: Any
) -> None:
    event = {"type": "identify", "userId": user_id, "groupId": group_id, "traits": traits}
    (call,) = identify_calls(event)
    body = json.loads(call.body)
    assert isinstance(body["user_id"], str)
    assert all(_primitive(v) for v in body["metadata"].values())
    company = body.get("company")
    if company is not None:
        assert isinstance(company[COMPANY_KEY], str) and company[COMPANY_KEY].strip()
        assert all(_primitive(v) for v in company.values())
    assert "createdAt" not in body["metadata"]


@settings(max_examples=300, deadline=None)
@given(traits=_json, user_id=_ids, group_id=_ids)
def test_any_group_event_gives_company_first_then_at_most_one_association(
    traits: Any, user_id: Any, group_id: Any
) -> None:
    event = {"type": "group", "userId": user_id, "groupId": group_id, "traits": traits}
    calls = group_calls(event)
    assert calls[0].path == "/v1/companies/identify"
    assert all(_primitive(v) for v in json.loads(calls[0].body)["metadata"].values())
    assert len(calls) == (2 if isinstance(user_id, str) and visible(user_id) else 1)
    if len(calls) == 2:
        assert json.loads(calls[1].body)["company"] == {
            COMPANY_KEY: calls[0].payload["company_id"]}


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["need", "remember"]),
                              st.sampled_from("abcdefg")), max_size=60),
       capacity=st.integers(1, 4))
def test_known_users_matches_a_reference_lru(ops: list[tuple[str, str]], capacity: int) -> None:
    known = KnownUsers(capacity)
    model: list[str] = []  # least recent first
    for op, user in ops:
        if op == "need":
            expected = user not in model
            assert known.needs_identify(user) is expected
            if not expected:
                model.remove(user)
                model.append(user)
        else:
            known.remember(user)
            if user in model:
                model.remove(user)
            model.append(user)
            del model[:-capacity]
        assert len(known) == len(model) <= capacity
        assert all(u in known for u in model)


def test_flatten_traits_is_the_track_rule() -> None:
    assert flatten_traits({"a": {"b": 1}, "c": [1, 2], "d": "x", "e": [{"f": 1}]}) == {
        "a_b": 1, "c": "1,2", "d": "x"}


def test_call_is_plain_frozen_data() -> None:
    call = track_call(TRACK)
    with pytest.raises(AttributeError):
        call.path = "/v1/identify"  # type: ignore[misc]
    assert isinstance(call, Call)


def test_event_calls_dispatches_by_type() -> None:
    assert [c.purpose for c in event_calls(identify())] == ["identify"]
    assert [c.purpose for c in event_calls(group())] == ["company_identify", "associate_company"]
    track_event = {"type": "track", "userId": "user_001", "event": "Feature Used"}
    assert [c.purpose for c in event_calls(track_event, TRACK)] == ["track"]
    assert event_calls({"type": "screen", "userId": "u"}) == ()


def test_event_calls_passes_each_shape_to_its_type() -> None:
    def only_plan(event: Any, metadata: dict[str, Any]) -> dict[str, Any]:
        return {"plan": metadata.get("plan")}

    (call,) = event_calls(identify(), identify_shape=only_plan)
    assert call.payload["metadata"] == {"plan": "pro"}
    company, _ = event_calls(group(), group_shape=only_plan)
    assert company.payload["metadata"] == {"plan": "enterprise"}


@pytest.mark.parametrize(("event", "anonymous"), [
    ({"type": "identify", "userId": "u"}, False),
    ({"type": "identify", "userId": " "}, True),
    ({"type": "identify"}, True),
    ({"type": "track", "userId": None}, True),
    ({"type": "group", "groupId": "g"}, True),  # an anonymous visitor's group: not sent
    ({"type": "group", "groupId": "g", "userId": "\u200b"}, True),
    ({"type": "group", "groupId": 5, "userId": "u"}, False),
    ({"type": "group", "groupId": "", "userId": "u"}, True),
    ({"type": "group", "userId": "u"}, True),
])
def test_anonymous_rule_per_type(event: dict[str, Any], anonymous: bool) -> None:
    assert lacks_required_id(event) is anonymous


# ---------------------------------------------------------------------------- CallPlan


def drive(plan: CallPlan, fail_at: set[int] | None = None, limit: int = 20) -> list[str]:
    """Send until done; the n-th request (0-based) in ``fail_at`` fails once."""
    sent: list[str] = []
    fail_at = set(fail_at or ())
    while (call := plan.next_call()) is not None and len(sent) < limit:
        sent.append(call.purpose)
        if len(sent) - 1 in fail_at:
            continue  # failed: reported nothing, the event is retried
        plan.succeeded(call)
    return sent


def test_plan_sends_ensure_user_then_track_and_remembers() -> None:
    known = KnownUsers(10)
    assert drive(CallPlan([track_call(TRACK)], known)) == ["ensure_user", "track"]
    assert "user_001" in known
    assert drive(CallPlan([track_call(TRACK)], known)) == ["track"]


def test_plan_retries_resume_at_the_failed_call() -> None:
    known = KnownUsers(10)
    # ensure-user fails once, then the Track fails once: 2 + 2 requests, nothing repeated
    # that had succeeded
    sent = drive(CallPlan([track_call(TRACK)], known), fail_at={0, 2})
    assert sent == ["ensure_user", "ensure_user", "track", "track"]


def test_plan_group_then_track_needs_no_ensure_user() -> None:
    known = KnownUsers(10)
    plan = CallPlan([*group_calls(group()), track_call(TRACK)], known)
    assert drive(plan, fail_at={1}) == [
        "company_identify", "associate_company", "associate_company", "track"]
    assert plan.done and plan.next_call() is None


def test_plan_sees_identifies_of_earlier_events() -> None:
    known = KnownUsers(10)
    drive(CallPlan(identify_calls(identify()), known))
    assert drive(CallPlan([track_call(TRACK)], known)) == ["track"]


def test_plan_without_known_users_never_adds_calls() -> None:
    plan = CallPlan([track_call(TRACK)], None)
    assert drive(plan) == ["track"]
    assert plan.calls == (track_call(TRACK),)


def test_plan_after_eviction_identifies_again() -> None:
    known = KnownUsers(1)
    drive(CallPlan([track_call(TRACK)], known))
    known.remember("someone_else")
    assert drive(CallPlan([track_call(TRACK)], known)) == ["ensure_user", "track"]


@pytest.mark.parametrize(("user_id", "anonymous"), [
    ("u1", False), ("  ", True), ("\u200b", True), ("\x00", True), ("\u200b \x00\ufeff", True),
    ("user\x00", False), ("ü", False), ("u\u200b", False),
    # printable to Python, blank on screen (review oracle19): Hangul fillers, blank Braille
    ("\u3164", True), ("\u2800", True), ("\u115f\u1160", True), ("\uffa0 \u17b4\u17b5", True),
    ("\u3164a", False), ("가", False),
    # the rest of Default_Ignorable_Code_Point (review diff19)
    ("\ufe0f", True), ("\u034f\u180b", True), ("\U000e0100", True), ("\u00ad", True),
    ("e\u0301", False), ("😀\ufe0f", False),
    # shown, though Python's isprintable says no (review "mapping51"): newer than this
    # Python's Unicode tables (U+1FA75 on 3.11; U+0378 is unassigned on every one), private
    # use, a format character outside Default_Ignorable; blank: C0/C1 controls, separators
    ("\U0001fa75", False), ("\u0378", False), ("\ue000", False), ("\U000f0000", False),
    ("\u0600", False), ("\u0600\u200b", False), ("\x01\x7f\x9f", True),
    ("\u2028\u2029", True), ("\ud800", True),
    # never shown (review "diff51a"): noncharacters, annotation and hieroglyph format controls
    ("\uffff", True), ("\ufffe", True), ("\U0010ffff", True), ("\ufdd0", True),
    ("\ufff9\ufffb", True), ("\U00013430", True), ("\U0001ffff\ufdef", True)])
def test_an_id_of_invisible_characters_only_is_anonymous(user_id: str, anonymous: bool) -> None:
    """A zero-width space or a NUL was sent as a user id: no stable identity."""
    assert lacks_required_id({"type": "track", "userId": user_id}) is anonymous
    assert visible(user_id) is not anonymous


@pytest.mark.parametrize("invisible", ["\u200b", "\x00", " \ufeff "])
def test_group_ids_of_invisible_characters_only_identify_nothing(invisible: str) -> None:
    """The group path kept the blank-only test: a "\u200b" userId became a user
    associated with every company, a "\u200b" groupId a company the user moved to."""
    assert lacks_required_id({"type": "group", "groupId": invisible})
    no_user = group_calls({"type": "group", "groupId": "acme", "userId": invisible})
    assert [c.purpose for c in no_user] == ["company_identify"]
    falls_back = identify_calls({"type": "identify", "userId": "u1", "groupId": "acme",
                                 "traits": {"company": {"id": invisible}}})
    assert falls_back[0].payload["company"] == {"id": "acme"}
    no_company = identify_calls({"type": "identify", "userId": "u1", "groupId": invisible})
    assert "company" not in no_company[0].payload


def test_known_users_keep_long_ids_as_a_digest() -> None:
    """The cache was capped by count only: 100,000 ids of 10,000 characters held ~1 GB."""
    known = KnownUsers(10)
    long_a, long_b = "a" * 10_000, "a" * 9_999 + "b"
    known.remember(long_a)
    assert not known.needs_identify(long_a)
    assert known.needs_identify(long_b)
    assert all(len(key) <= 65 for key in known._users)
    short = "#" + "0" * 64  # 65 characters: as long as a digest, still not one
    assert known.needs_identify(short)


def test_a_progress_note_that_is_not_ours_resumes_nothing() -> None:
    """The note comes from Redis: whatever it holds, the plan sends every call rather than
    raise (an exception there would fail the event)."""
    from consumer.calls import CallPlan

    calls = (Call("company_identify", "identify", "company_identify", "POST",
                  "/v1/companies/identify", {"company_id": "c"}, b'{"company_id":"c"}'),
             Call("associate_company", "identify", "identify", "POST", "/v1/identify",
                  {"user_id": "u"}, b'{"user_id":"u"}'))
    good = CallPlan(calls, None)
    good.succeeded(calls[0])
    note = good.progress_note()
    for odd in (None, "", ":", "²:" + note[2:], "x:y", "1", "9:" + note[2:], "0:" + note[2:],
                "1:" + "0" * 32, "-1:" + note[2:], "1 :" + note[2:]):
        plan = CallPlan(calls, None)
        assert plan.resume(odd) == () and plan.next_call() == calls[0], odd
    plan = CallPlan(calls, None)
    assert plan.resume(note) == calls[:1] and plan.next_call() == calls[1]


@pytest.mark.parametrize("traits", [{"company": {"id": "globex"}}, {"company_id": "globex"},
                                    {"id": "globex"}, {"id": "acme", "company_id": "acme"}])
def test_no_second_company_id_travels_in_a_company_identify(traits: dict[str, Any]) -> None:
    """Review poison26: `traits.company.id` flattened to `company_id` beside groupId."""
    omitted: list[str] = []
    payload = company_identify_payload(group(traits={**traits, "name": "Acme"}),
                                       omitted=omitted)
    assert payload == {"company_id": "acme", "metadata": {"name": "Acme"}}
    assert omitted and all("(the company's id is groupId)" in note for note in omitted)


def test_what_identify_leaves_out_of_its_traits_is_named() -> None:
    """Review "events29": `createdAt` beside `created_at`, and a second spelling of the
    company's id, were left out without a word in `omitted` (`explain` showed nothing)."""
    omitted: list[str] = []
    body = identify_payload({"type": "identify", "userId": "u1", "traits": {
        "createdAt": "2026-01-01", "created_at": "2020-01-01",
        "company": {"id": "c1", "company_id": "c2", "createdAt": None, "created_at": "x"}}},
        omitted=omitted)
    assert body["metadata"] == {"created_at": "2026-01-01"}
    assert body["company"] == {"id": "c1", "created_at": "x"}
    assert sorted(omitted) == sorted([
        "created_at (createdAt wins)",
        "company.createdAt (null; created_at is sent)",
        "company.company_id (another spelling of the company's id)"])
    # Nothing to name when nothing is left out.
    quiet: list[str] = []
    identify_payload({"type": "identify", "userId": "u1",
                      "traits": {"createdAt": "2026-01-01", "company": {"id": "c1"}}},
                     omitted=quiet)
    assert quiet == []


class _Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_another_replicas_identify_is_trusted_only_until_the_recheck() -> None:
    """Redis says another replica identified `u` and the record holds 90 s more: trusted
    here for at most `recheck_s` (10 s), then read again (`delete-users` may have deleted
    it; trusted for the whole 90 s, the user's Tracks went out with no identify in front
    and were attributed to no one)."""
    clock = _Clock()
    known = KnownUsers(ttl_s=100.0, clock=clock)
    known.learned("u", left_s=90.0, recheck_s=10.0)
    assert not known.needs_identify("u")
    clock.now += 11.0
    assert known.needs_identify("u")


def test_a_progress_note_naming_every_call_resumes_nothing() -> None:
    """`resume` never skips all of an event's calls (the last one's success is the
    confirm's to say): a note that names them all (anything with the Redis password can
    write one) would otherwise finish the event with nothing sent."""
    calls = group_calls({"type": "group", "userId": "u", "groupId": "g", "traits": {}})
    assert len(calls) == 2
    done = CallPlan(calls, None)
    for call in calls:
        done.succeeded(call)
    note = done.progress_note()
    plan = CallPlan(calls, None)
    assert plan.resume(note) == ()
    assert plan.next_call() == calls[0]


def test_the_states_an_event_writes_name_long_ids_by_their_digest() -> None:
    """Review "growth52": the DLQ guard's hold remembers the latest 4,096 states written;
    60 KB user ids kept ~250 MB there. Over LONG_ID characters an id is its digest, as
    KnownUsers keeps it: one id, one name; two ids, two names; a short id as it is."""
    from consumer.calls import LONG_ID, state_written

    def states(user: str, company: str) -> tuple[tuple[str, ...], ...]:
        (call,) = identify_calls({"type": "identify", "userId": user,
                                  "traits": {"company": {"id": company, "name": "Acme"}}})
        return state_written([call])

    long_user, long_company = "u" * 60_000, "c" * (LONG_ID + 1)
    written = states(long_user, long_company)
    assert [s[0] for s in written] == ["user", "company", "member"]
    assert all(len(part) <= LONG_ID + 1 for state in written for part in state)
    assert written == states(long_user, long_company)
    assert written != states("u" * 59_999 + "v", long_company)
    assert states("u1", "c" * LONG_ID) == (("user", "u1"), ("company", "c" * LONG_ID),
                                           ("member", "u1", "c" * LONG_ID))

