"""Unit tests for consumer.filtering: anonymous, consent and mapping drops."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from consumer.filtering import ConsentPolicy, Drop, drop_reason
from consumer.mapping import DEFAULT_PRESET, load_mappings

ANALYTICS = ConsentPolicy()
ALLOW_MISSING = ConsentPolicy(missing="allow")
TWO = ConsentPolicy(categories=("analytics", "functional"))


def event(consent: Any = None, *, no_context: bool = False, **over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "type": "track",
        "event": "Feature Used",
        "userId": "user_001",
        "anonymousId": "anon_1",
        "properties": {"feature": "export_csv"},
    }
    if not no_context:
        base["context"] = {"consent": consent} if consent is not None else {}
    base.update(over)
    return base


def drop(e: Mapping[str, Any], policy: ConsentPolicy = ANALYTICS) -> Drop | None:
    return drop_reason(e, policy, DEFAULT_PRESET)


# ------------------------------------------------------------------ delivered


def test_seed_example_is_delivered() -> None:
    assert drop(event({"analytics": True})) is None


# ------------------------------------------------------------------ anonymous


@pytest.mark.parametrize("user_id", [None, "", "   ", "\t\n", 42, ["u"], {"id": "u"}, True])
def test_anonymous(user_id: Any) -> None:
    assert drop(event({"analytics": True}, userId=user_id)) == Drop("anonymous")


def test_absent_user_id_is_anonymous() -> None:
    e = event({"analytics": True})
    del e["userId"]
    assert drop(e) == Drop("anonymous")


def test_anonymous_is_checked_before_consent_and_type() -> None:
    e = event({"analytics": False}, userId=None, type="identify")
    assert drop(e) == Drop("anonymous")


# ------------------------------------------------------------------ consent


@pytest.mark.parametrize(
    ("consent", "policy", "expected"),
    [
        # flat shape
        ({"analytics": True}, ANALYTICS, None),
        ({"analytics": False}, ANALYTICS, Drop("consent", "analytics")),
        ({"marketing": True}, ANALYTICS, Drop("consent", "analytics")),
        ({"analytics": None, "marketing": True}, ANALYTICS, Drop("consent", "analytics")),
        ({"analytics": True, "functional": True}, TWO, None),
        ({"analytics": True, "functional": False}, TWO, Drop("consent", "functional")),
        ({"analytics": False, "functional": False}, TWO, Drop("consent", "analytics")),
        # canonical shape
        ({"canonical": {"analytics": True}, "categories": ["C0002"]}, ANALYTICS, None),
        ({"canonical": {"analytics": False}}, ANALYTICS, Drop("consent", "analytics")),
        ({"canonical": {}, "categories": ["C0002"]}, ANALYTICS, Drop("consent", "analytics")),
        ({"canonical": {"analytics": True, "functional": True}}, TWO, None),
        ({"canonical": {"analytics": True}}, TWO, Drop("consent", "functional")),
        # canonical is authoritative over flat keys beside it
        ({"canonical": {"analytics": False}, "analytics": True}, ANALYTICS,
         Drop("consent", "analytics")),
        ({"canonical": {"analytics": True}, "analytics": False}, ANALYTICS, None),
        # ... in any spelling of its key, as category keys (review "events31")
        ({"Canonical": {"analytics": True}, "analytics": False}, ANALYTICS, None),
        ({" CANONICAL ": {"Analytics": False}, "analytics": True}, ANALYTICS,
         Drop("consent", "analytics")),
        # a canonical that is not an object is ignored: the flat keys decide
        ({"canonical": None, "analytics": True}, ANALYTICS, None),
        ({"canonical": "yes", "analytics": False}, ANALYTICS, Drop("consent", "analytics")),
        ({"canonical": "yes", "analytics": False}, ALLOW_MISSING,
         Drop("consent", "analytics")),
        # raw CMP codes only: the nested form's metadata, no consent data in either shape
        # (review seed44: dropped under allow where the nested form went)
        ({"categories": ["C0001", "C0002"]}, ALLOW_MISSING, None),
        ({"categories": ["C0001"], "analytics": False}, ALLOW_MISSING,
         Drop("consent", "analytics")),
        ({"categories": ["C0001"], "other": True}, ALLOW_MISSING, Drop("consent", "analytics")),
        # keys compared as categories are: lower-cased and stripped (review mapping25) ...
        ({"Analytics": True}, ANALYTICS, None),
        ({"canonical": {"ANALYTICS ": True}}, ANALYTICS, None),
        ({"Analytics": True, "Functional": "granted"}, TWO, None),
        ({"Analytics": False}, ANALYTICS, Drop("consent", "analytics")),
        # ... and the exact key wins over another spelling of it
        ({"analytics": False, "Analytics": True}, ANALYTICS, Drop("consent", "analytics")),
        ({"Analytics": False, "analytics": True}, ANALYTICS, None),
        ({"canonical": {"Analytics": False}, "analytics": True}, ANALYTICS,
         Drop("consent", "analytics")),
        # ... other spellings that disagree grant nothing, in any key order (review
        # events29: the first one decided)
        ({"Analytics": True, "ANALYTICS": False}, ANALYTICS, Drop("consent", "analytics")),
        ({"ANALYTICS": False, "Analytics": True}, ANALYTICS, Drop("consent", "analytics")),
        ({"Analytics": True, " analytics": "granted"}, ANALYTICS, None),
        # a canonical without values beside flat keys: the flat keys decide (review
        # events29: `false` went through under USERPILOT_CONSENT_MISSING=allow)
        ({"canonical": {}, "analytics": False}, ALLOW_MISSING, Drop("consent", "analytics")),
        ({"canonical": {"analytics": None}, "analytics": False}, ALLOW_MISSING,
         Drop("consent", "analytics")),
        ({"canonical": {}, "analytics": True}, ANALYTICS, None),
        ({1: True, "analytics": True}, ANALYTICS, None),
        ({1: True}, ANALYTICS, Drop("consent", "analytics")),
        # Review "consent49": beside a valueless `canonical` the flat keys decide as they do
        # with none (only category names counted, and Consent Mode's keys went) ...
        ({"canonical": {}, "analytics_storage": "denied"}, ALLOW_MISSING,
         Drop("consent", "analytics")),
        ({"canonical": {"analytics": None}, "analytics_storage": "denied"}, ALLOW_MISSING,
         Drop("consent", "analytics")),
        ({"analytics_storage": "denied"}, ALLOW_MISSING, Drop("consent", "analytics")),
        # ... a null `canonical` is as if absent: another spelling of it decides ...
        ({"canonical": None, "Canonical": {"analytics": False}, "analytics": True},
         ALLOW_MISSING, Drop("consent", "analytics")),
        ({"Canonical": {"analytics": False}, "analytics": True}, ALLOW_MISSING,
         Drop("consent", "analytics")),
        # ... and a `canonical` that is not an object is data that grants nothing
        ({"canonical": "granted"}, ALLOW_MISSING, Drop("consent", "analytics")),
        # ... and an empty one as if absent too (review "diff49b": it was dropped)
        ({"canonical": {}, "Canonical": {"analytics": True}}, ALLOW_MISSING, None),
        ({"canonical": {"analytics": None}, "Canonical": {"analytics": False}},
         ALLOW_MISSING, Drop("consent", "analytics")),
    ],
)
def test_consent_shapes(consent: Any, policy: ConsentPolicy, expected: Drop | None) -> None:
    assert drop(event(consent), policy) == expected


@pytest.mark.parametrize(
    ("value", "granted"),
    [
        (True, True),
        ("granted", True),
        ("GRANTED", True),
        (" true ", True),
        ("yes", True),
        ("allow", True),
        ("allowed", True),
        (False, False),
        (1, False),
        (1.0, False),
        ("false", False),
        ("denied", False),
        ("", False),
        (None, False),
        ({"granted": True}, False),
        (["analytics"], False),
    ],
)
def test_granted_values(value: Any, granted: bool) -> None:
    expected = None if granted else Drop("consent", "analytics")
    assert drop(event({"analytics": value, "marketing": True})) == expected
    assert drop(event({"canonical": {"analytics": value, "marketing": True}})) == expected


@pytest.mark.parametrize(
    ("categories", "consent", "expected"),
    [
        (("essential",), {"analytics": False}, None),
        (("essential",), None, None),
        (("essential", "analytics"), {"analytics": True}, None),
        (("essential", "analytics"), {"essential": False, "analytics": True}, None),
        (("essential", "analytics"), {"analytics": False}, Drop("consent", "analytics")),
        (("Analytics ",), {"analytics": True}, None),
        ((), {"analytics": False}, None),
        ((), None, None),
    ],
)
def test_essential_and_category_cleaning(
    categories: tuple[str, ...], consent: Any, expected: Drop | None
) -> None:
    assert drop(event(consent), ConsentPolicy(categories=categories)) == expected


NO_CONSENT_DATA = [
    event(no_context=True),
    event(),  # context without consent
    event(context=None),
    event(context="broken"),
    event({}),
    event({"analytics": None}),
    event({"canonical": None}),
    # The nested form without a value is no data either, as the flat one (review mapping22).
    event({"canonical": {}}),
    event({"canonical": {"analytics": None}}),
    event({"canonical": {"analytics": None}, "categories": ["C0002"]}),
    # ... nor do keys beside it that name no category (review r30).
    event({"canonical": {"analytics": None}, "version": 2, "updatedAt": "2026-01-01"}),
    event({"canonical": {}, "Categories": ["C0001"], "analytics": None}),
    # ... nor in the flat form, for the same keys without `canonical` (review seed44).
    event({"categories": ["C0002"]}),
    event({"version": 3, "updatedAt": "2026-01-01", "analytics": None}),
]
"""Consent that is not an object (`"analytics=true"`, `["analytics"]`, `true`) is not "no
data": it grants nothing under either policy (test_explicit_consent_that_is_not_...)."""


@pytest.mark.parametrize("e", NO_CONSENT_DATA)
def test_missing_consent_deny(e: dict[str, Any]) -> None:
    assert drop(e, ANALYTICS) == Drop("consent", "analytics")
    assert drop(e, TWO) == Drop("consent", "analytics")
    assert drop(e, ConsentPolicy(categories=("essential", "functional"))) == Drop(
        "consent", "functional"
    )


@pytest.mark.parametrize("e", NO_CONSENT_DATA)
def test_missing_consent_allow(e: dict[str, Any]) -> None:
    assert drop(e, ALLOW_MISSING) is None


def test_allow_missing_does_not_override_present_denial() -> None:
    assert drop(event({"analytics": False}), ALLOW_MISSING) == Drop("consent", "analytics")


def test_consent_category_label_is_always_a_configured_one() -> None:
    weird = event({"canonical": {"zzz": True}, "zzz": True, "analytics": True})
    result = drop(weird, TWO)
    assert result is not None and result.category in TWO.categories


# ------------------------------------------------------------------ type and mapping


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"type": "identify", "traits": {"plan": "pro"}}, None),  # no mapping needed
        ({"type": "identify", "event": "Nope"}, None),
        ({"type": "group", "groupId": "g1"}, None),
        ({"type": "group", "groupId": "g1", "userId": None}, Drop("anonymous")),
        ({"type": "group", "groupId": "g1", "userId": " "}, Drop("anonymous")),
        ({"type": "group", "groupId": 42}, None),
        ({"type": "group"}, Drop("anonymous")),  # group needs a groupId
        ({"type": "group", "groupId": "  "}, Drop("anonymous")),
        ({"type": "identify", "userId": None}, Drop("anonymous")),
        ({"type": "screen"}, Drop("unsupported_type")),
        ({"type": None}, Drop("unsupported_type")),
        ({"type": ["track"]}, Drop("unsupported_type")),
        ({"event": "Order Completed"}, Drop("unmapped")),
        ({"event": None}, Drop("unmapped")),
        ({"event": "page"}, Drop("unmapped")),
        ({"event": "feature_used"}, None),
        ({"event": "feature-used"}, None),
        ({"event": "FEATURE USED"}, None),
        ({"type": "page", "event": None, "name": "Pricing"}, None),
        ({"type": "page", "event": "Whatever"}, None),
    ],
)
def test_type_and_mapping(overrides: dict[str, Any], expected: Drop | None) -> None:
    assert drop(event({"analytics": True}, **overrides)) == expected


def test_envelope_decides_before_consent() -> None:
    """Decide before you parse: type and mapping need no JSON text, consent does."""
    e = event({"analytics": False}, event="Order Completed")
    assert drop(e) == Drop("unmapped")
    e = event({"analytics": False}, type="screen")
    assert drop(e) == Drop("unsupported_type")


@pytest.mark.parametrize("kind", ["identify", "group", "page", "track"])
def test_consent_gates_every_type(kind: str) -> None:
    base: dict[str, Any] = {"type": kind, "groupId": "g1", "event": "Feature Used"}
    assert drop(event({"analytics": False}, **base)) == Drop("consent", "analytics")
    assert drop(event({"analytics": True}, **base)) is None


def test_drops_of_decoded_events_parse_no_json_text() -> None:
    """An anonymous, unmapped or unsupported event is dropped with broken JSON text in
    properties, traits and consent: it was never parsed."""
    from consumer import codec

    cases: list[tuple[dict[str, Any], Drop]] = [
        ({"userId": None}, Drop("anonymous")), ({"event": "Nope"}, Drop("unmapped")),
        ({"type": "group", "groupId": None}, Drop("anonymous")),
        ({"type": "identify", "userId": None}, Drop("anonymous"))]
    for over, expected in cases:
        base: dict[str, Any] = {"type": "track", "event": "Feature Used", "userId": "u",
                                "context": {"consent": {}}}
        record = codec.to_record(base | over)
        record["properties"] = record["traits"] = "{broken"
        assert record["context"] is not None
        record["context"]["consent"] = "{broken"
        decoded = codec.decode(codec.encode(1, record), lambda _i: codec.SCHEMA)
        assert drop(decoded) == expected


def test_custom_mappings_decide_unmapped() -> None:
    mappings = load_mappings(
        {"preset": "none", "events": {"Order Completed": {"event_name": "order_completed"}}}
    )
    granted = {"analytics": True}
    assert drop_reason(event(granted, event="Order Completed"), ANALYTICS, mappings) is None
    assert drop_reason(event(granted), ANALYTICS, mappings) == Drop("unmapped")
    assert drop_reason(event(granted, type="page"), ANALYTICS, mappings) == Drop("unmapped")


def test_event_that_is_not_a_dict_shape_never_raises() -> None:
    odd: dict[str, Any] = {"userId": "u", "type": "track", "event": "Feature Used",
                           "context": {"consent": {"canonical": []}}}
    assert drop(odd, ALLOW_MISSING) == Drop("consent", "analytics")
    assert drop({"userId": "u"}, ALLOW_MISSING) == Drop("unsupported_type")


# ------------------------------------------------------------------ policy validation


@pytest.mark.parametrize(
    "kwargs",
    [
        {"missing": "maybe"},
        {"categories": "analytics"},
        {"categories": ("analytics", "")},
        {"categories": ("analytics", 3)},
    ],
)
def test_policy_validation(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        ConsentPolicy(**kwargs)


def test_policy_defaults_and_dedupe() -> None:
    assert ConsentPolicy() == ConsentPolicy(("analytics",), "deny")
    assert ConsentPolicy(("Analytics", "analytics", "functional")).categories == (
        "analytics",
        "functional",
    )


# ------------------------------------------------------------------ consent decisions per text


def _decoded(consent_text: str | None, user: str = "u") -> Any:
    from consumer import codec

    record = codec.to_record({"type": "track", "event": "Feature Used", "userId": user,
                              "context": {"locale": "en"}})
    record["context"]["consent"] = consent_text
    return codec.decode(codec.encode(1, record), lambda _i: codec.SCHEMA)


def test_consent_decision_is_remembered_per_text_and_parses_nothing_again() -> None:
    from consumer import codec

    policy = ConsentPolicy()
    first = _decoded('{"analytics":false}')
    assert drop(first, policy) == Drop("consent", "analytics")
    again = _decoded('{"analytics":false}', user="other")
    assert drop(again, policy) == Drop("consent", "analytics")
    assert first._consent == {"analytics": False}
    assert again._consent is codec._UNSET  # the second was decided without parsing
    assert drop(_decoded('{"analytics":true}'), policy) is None
    assert drop(_decoded(None), policy) == Drop("consent", "analytics")
    assert drop(_decoded(None), ConsentPolicy(missing="allow")) is None


def test_consent_decisions_are_per_policy_and_bounded() -> None:
    from consumer.filtering import CONSENT_CACHE_SIZE

    deny, two = ConsentPolicy(), ConsentPolicy(categories=("analytics", "functional"))
    text = '{"analytics":true}'
    assert drop(_decoded(text), deny) is None
    assert drop(_decoded(text), two) == Drop("consent", "functional")
    for i in range(CONSENT_CACHE_SIZE + 5):
        assert drop(_decoded(f'{{"analytics":true,"n":{i}}}'), deny) is None
    assert len(deny._by_text) <= CONSENT_CACHE_SIZE


def test_long_consent_texts_are_decided_but_never_kept() -> None:
    """Only short texts are remembered: 1,024 consent objects padded to ~1 MB each would
    otherwise hold a gigabyte (the pod's limit is 512 MiB)."""
    from consumer.filtering import CONSENT_CACHE_TEXT_MAX

    policy = ConsentPolicy()
    padding = "x" * CONSENT_CACHE_TEXT_MAX
    for i in range(3):
        long = f'{{"analytics":false,"pad":"{padding}{i}"}}'
        assert drop(_decoded(long), policy) == Drop("consent", "analytics")
    assert policy._by_text == {}
    assert drop(_decoded('{"analytics":false}'), policy) == Drop("consent", "analytics")
    assert list(policy._by_text) == ['{"analytics":false}']


def test_broken_or_escaped_consent_text_is_parsed_every_time() -> None:
    from consumer.errors import UndecodableEvent

    policy = ConsentPolicy()
    for _ in range(2):
        with pytest.raises(UndecodableEvent):
            drop(_decoded("{broken"), policy)
    lone = '{"analytics":"\\ud83d"}'  # a lone surrogate: replaced and counted each time
    for _ in range(2):
        decoded = _decoded(lone)
        assert drop(decoded, policy) == Drop("consent", "analytics")
        assert decoded.replaced == 1


@pytest.mark.parametrize("consent", [False, "denied", [], 1, 0.0, True, "analytics=true",
                                     ["analytics"]])
def test_explicit_consent_that_is_not_an_object_grants_nothing(consent: Any) -> None:
    """Only absent consent follows USERPILOT_CONSENT_MISSING=allow: `false` or "denied"
    were delivered as if the event carried no consent data."""
    assert drop(event(consent), ALLOW_MISSING) == Drop("consent", "analytics")
    assert drop(event(consent)) == Drop("consent", "analytics")
    assert drop(event(None), ALLOW_MISSING) is None
    assert drop(event(None, no_context=True), ALLOW_MISSING) is None


class _Screened(Mapping[str, Any]):
    """An envelope that refuses to be read past `codec.SCREENED`: what the head holds."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self._doc = doc

    def _allowed(self, key: str) -> None:
        from consumer.codec import SCREENED

        assert key in SCREENED, f"the drop rules before consent read {key!r}"

    def __getitem__(self, key: str) -> Any:
        self._allowed(key)
        return self._doc[key]

    def get(self, key: str, default: Any = None) -> Any:
        self._allowed(key)
        return self._doc.get(key, default)

    def __iter__(self) -> Any:
        raise AssertionError("the drop rules iterate the envelope")

    def __len__(self) -> int:
        raise AssertionError("the drop rules size the envelope")


@pytest.mark.parametrize("doc", [
    {"type": "track", "event": "Feature Used", "userId": "u1"},
    {"type": "track", "event": "Nobody Maps This", "userId": "u1"},
    {"type": "track", "event": "Feature Used"},
    {"type": "page", "userId": "u1"},
    {"type": "identify", "userId": " "},
    {"type": "group", "userId": "u1"},
    {"type": "group", "userId": "u1", "groupId": "c1"},
    {"type": "screen", "userId": "u1"},
])
def test_the_drop_rules_before_consent_read_only_what_the_head_holds(
        doc: dict[str, Any]) -> None:
    """`codec.envelope_of` reads only SCREENED from an event's head: a rule before consent
    that read another field would see it missing there and drop wrongly (review
    "whole46": nothing tied the two)."""
    from consumer.filtering import envelope_drop

    mappings = load_mappings({"events": {"Feature Used": "feature_used"}})
    assert envelope_drop(_Screened(doc), mappings) == envelope_drop(doc, mappings)


@pytest.mark.parametrize(("consent", "expected"), [
    ({"canonical": None}, None),  # null: as if absent, no consent data
    ({"canonical": "granted"}, Drop("consent", "analytics")),
    ({"canonical": False}, Drop("consent", "analytics")),
    ({"canonical": []}, Drop("consent", "analytics")),
    ({"canonical": "granted", "analytics": True}, None),  # the flat keys beside it decide
])
def test_a_canonical_that_is_not_an_object_grants_nothing_as_the_docs_say(
        consent: Any, expected: Drop | None) -> None:
    """Review "spec47": docs/mappings.md said such a `canonical` is ignored, which under
    USERPILOT_CONSENT_MISSING=allow would deliver `{"canonical": false}`; it counts as a
    value that grants no category, and the docs now say so."""
    assert drop(event(consent), ALLOW_MISSING) == expected
