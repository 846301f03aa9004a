"""Unit tests for consumer.mapping: names, flattening, summaries, custom mappings, loading."""

from __future__ import annotations

import json
import math
import random
import re
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer.mapping import (
    DEFAULT_PRESET,
    MAX_DEPTH,
    EventRule,
    MappingsError,
    MappingSet,
    build_track_payload,
    load_mappings,
    normalize_event_name,
)

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "schemas" / "mappings.example.json"


def track(name: str, props: Any = None, **extra: Any) -> dict[str, Any]:
    event: dict[str, Any] = {"type": "track", "event": name, "userId": "user_001"}
    if props is not None:
        event["properties"] = props
    event.update(extra)
    return event


def metadata(props: Any, rule: EventRule | None = None, **extra: Any) -> dict[str, Any]:
    rule = rule or EventRule("Feature Used", "feature_used")
    payload = build_track_payload(track("Feature Used", props, **extra), rule)
    result: dict[str, Any] = payload["metadata"]
    return result


# ------------------------------------------------------------------ seed example


def test_seed_example_exact() -> None:
    event = {
        "type": "track",
        "event": "Feature Used",
        "properties": {
            "feature": "export_csv",
            "feature_id": "feat_017",
            "context": "reports_dashboard",
        },
        "userId": "user_001",
        "anonymousId": "anon_1",
        "context": {"consent": {"analytics": True}},
    }
    rule = DEFAULT_PRESET.lookup(event)
    assert rule is not None
    payload = build_track_payload(event, rule)
    expected = {
        "user_id": "user_001",
        "event_name": "feature_used",
        "metadata": {
            "feature": "export_csv",
            "feature_id": "feat_017",
            "context": "reports_dashboard",
        },
    }
    assert payload == expected
    assert list(payload) == ["user_id", "event_name", "metadata"]
    assert list(payload["metadata"]) == ["feature", "feature_id", "context"]
    assert json.dumps(payload) == json.dumps(expected)


# ------------------------------------------------------------------ preset and names


SEED_TABLE = [
    ("page", "page_viewed"),
    ("Signed Up", "signed_up"),
    ("Logged In", "logged_in"),
    ("Feature Used", "feature_used"),
    ("Products Searched", "searched"),
    ("Plan Viewed", "plan_viewed"),
    ("Product Viewed", "product_viewed"),
    ("Trial Started", "trial_started"),
    ("Subscription Started", "subscription_started"),
    ("Subscription Cancelled", "subscription_cancelled"),
    ("Lead Generated", "lead_generated"),
]


def test_default_preset_is_exactly_the_seed_table() -> None:
    assert [(r.source_name, r.event_name) for r in DEFAULT_PRESET.rules] == SEED_TABLE
    assert DEFAULT_PRESET.names() == tuple(s for s, _ in SEED_TABLE)
    described = json.loads(json.dumps(DEFAULT_PRESET.describe()))
    assert described["preset"] == "default"
    assert [(e["source"], e["event_name"]) for e in described["events"]] == SEED_TABLE


@pytest.mark.parametrize(("source", "target"), SEED_TABLE[1:])
def test_every_preset_track_event_maps(source: str, target: str) -> None:
    rule = DEFAULT_PRESET.lookup(track(source))
    assert rule is not None
    assert rule.event_name == target


@pytest.mark.parametrize(
    "name",
    [
        "Feature Used",
        "feature_used",
        "feature-used",
        "FEATURE USED",
        " Feature  Used ",
        "featureUsed",
        "FeatureUsed",
        "feature__used",
        "Feature_Used",
    ],
)
def test_name_variants_match_the_same_rule(name: str) -> None:
    assert normalize_event_name(name) == "feature_used"
    rule = DEFAULT_PRESET.lookup(track(name))
    assert rule is not None and rule.event_name == "feature_used"


@pytest.mark.parametrize(
    ("name", "key"),
    [("Order Completed", "order_completed"), ("HTMLExport", "html_export"), ("", ""),
     ("  ", ""), ("v2Signup", "v2_signup"),
     # A word's own capitals in a name with separators are not camelCase (review mapping25).
     ("2FA Enabled", "2fa_enabled"), ("iOS App Opened", "ios_app_opened"),
     ("OAuth Connected", "oauth_connected"), ("SaaS Plan Viewed", "saas_plan_viewed"),
     ("PDFs Exported", "pdfs_exported"), ("B2B Lead", "b2b_lead"),
     ("oauth-Connected", "oauth_connected"), ("iOS_app", "ios_app"),
     # One spelling, Unicode's case folding (review "mappings48"): "e" + U+0301 met no rule
     # written "é", "GRÖSSE" none written "Größe".
     ("Cafe\u0301 Visited", "caf\u00e9_visited"), ("cafe\u0301Visited", "caf\u00e9_visited"),
     ("GR\u00d6SSE GEW\u00c4HLT", "gr\u00f6sse_gew\u00e4hlt"),
     ("Gr\u00f6\u00dfe Gew\u00e4hlt", "gr\u00f6sse_gew\u00e4hlt")],
)
def test_normalize_event_name(name: str, key: str) -> None:
    assert normalize_event_name(name) == key


@pytest.mark.parametrize(("name", "key"), [
    ("caféVisited", "café_visited"), ("userÖffnet", "user_öffnet"),
    ("überFeature", "über_feature"), ("приветМир", "привет_мир"),
    ("ÉTÉVisité", "été_visité"), ("naïveBayesRun", "naïve_bayes_run"),
    # Decomposed accents (a letter, then U+0301): the letter's case counts (diff34), and
    # the key is the composed letter's (NFC, review "mappings48").
    ("cafe\u0301Visited", "caf\u00e9_visited"), ("ABE\u0301c", "ab_\u00e9c"),
    ("ABQ\u0301c", "ab_q\u0301c")])
def test_camel_case_is_split_in_any_script(name: str, key: str) -> None:
    """Review "seed34": `[a-z]`/`[A-Z]` saw no boundary between "é" and "V", so
    "caféVisited" did not meet the mapping "Café Visited"."""
    assert normalize_event_name(name) == key
    assert normalize_event_name(name) == normalize_event_name(key.replace("_", " ").title())


@given(st.text(alphabet="aAbB1 _-éÉ", max_size=24))
def test_normalize_splits_acronyms_exactly_as_the_backtracking_pattern_did(name: str) -> None:
    """The lookahead form is the old `([A-Z]+)([A-Z][a-z])` → `\\1 \\2`, without its
    quadratic backtracking; a name with separators is not split at its capitals. "é" and
    "É" are letters of their case like any (review "seed34")."""
    old = name
    if re.search(r"[\s_\-]", name) is None:
        old = re.sub(r"([A-ZÉ]+)([A-ZÉ][a-zé])", r"\1 \2",
                     re.sub(r"([a-zé0-9])([A-ZÉ])", r"\1 \2", name))
    expected = re.sub(r"[\s_\-]+", "_", old).strip("_").lower()
    assert normalize_event_name(name) == expected


@given(st.lists(st.text(alphabet="aAbB1é", min_size=1, max_size=6), min_size=2, max_size=4))
def test_a_title_case_name_meets_its_snake_and_kebab_spellings(words: list[str]) -> None:
    """What Signal sends as `Title Case` and as `snake_case` names one event."""
    title = " ".join(words)
    assert normalize_event_name(title) == normalize_event_name("_".join(w.lower() for w in words))
    assert normalize_event_name(title) == normalize_event_name("-".join(words))


@pytest.mark.parametrize("name", ["A" * 100_000, "Ab" + "A" * 100_000 + "b", "AB" * 50_000])
def test_a_huge_all_caps_name_is_normalised_in_linear_time_and_not_cached(name: str) -> None:
    """The backtracking pattern took ~100 s on 100,000 capitals (quadratic): the event loop
    held, and the group evicted the worker. The bound here is generous on purpose."""
    done: list[str] = []
    thread = threading.Thread(target=lambda: done.append(normalize_event_name(name)),
                              daemon=True)
    thread.start()
    thread.join(20.0)
    assert done, "normalising a 100,000-character name took over 20 s"
    assert len(done[0]) >= len(name)
    from consumer import mapping

    assert mapping._normalize_cached.cache_info().currsize <= 4096
    before = mapping._normalize_cached.cache_info().misses  # long names never enter it
    normalize_event_name(name)
    assert mapping._normalize_cached.cache_info().misses == before


def test_normalize_is_total_on_non_strings() -> None:
    assert normalize_event_name(None) == ""
    assert normalize_event_name(42) == ""


@pytest.mark.parametrize(
    "event",
    [
        {"type": "page", "name": "Pricing"},
        {"type": "page"},
        {"type": "page", "event": "Signed Up"},
    ],
)
def test_page_events_use_the_page_rule(event: dict[str, Any]) -> None:
    rule = DEFAULT_PRESET.lookup(event)
    assert rule is not None and rule.event_name == "page_viewed"


@pytest.mark.parametrize(
    "event",
    [
        track("page"),
        track("Page"),
        track("PAGE"),
        track("Order Completed"),
        track(None),  # type: ignore[arg-type]
        track(""),
        {"type": "track", "event": ["Feature Used"]},
        {"type": "identify", "event": "Feature Used"},
        {"type": "group", "event": "Feature Used"},
        {"type": "screen", "event": "Feature Used"},
        {"type": None},
        {},
    ],
)
def test_lookup_misses(event: dict[str, Any]) -> None:
    assert DEFAULT_PRESET.lookup(event) is None


def test_mapping_set_refuses_duplicate_normalised_names() -> None:
    with pytest.raises(ValueError, match="both normalise to 'feature_used'"):
        MappingSet((EventRule("Feature Used", "a"), EventRule("feature-used", "b")))


# ------------------------------------------------------------------ flattening


@pytest.mark.parametrize(
    ("props", "expected"),
    [
        ({"a": 1, "b": "x", "c": True, "d": None, "e": 1.5}, {"a": 1, "b": "x", "c": True,
                                                           "d": None, "e": 1.5}),
        ({"big": 2**70, "neg": -(2**65)}, {"big": 2**70, "neg": -(2**65)}),
        ({"f": 1.0}, {"f": 1.0}),
        ({"nan": math.nan, "inf": math.inf, "ninf": -math.inf, "ok": 0}, {"ok": 0}),
        (
            {"plan": {"tier": "pro", "limits": {"seats": 5}}},
            {"plan_tier": "pro", "plan_limits_seats": 5},
        ),
        ({"plan": {}}, {}),
        ({"plan": {"tags": ["a"], "x": {"y": [1]}}}, {"plan_tags": "a", "plan_x_y": "1"}),
        ({"tags": ["a", "b"], "ids": [1], "objs": [{"a": 1}]}, {"tags": "a,b", "ids": "1"}),
        ({"mixed": ["a", 1, 2.5, True, None], "empty": [], "nested": [[1]]},
         {"mixed": "a,1,2.5,true", "empty": ""}),
        ({"m": {"n": None}}, {"m_n": None}),
        ({"odd": {1: "one"}}, {"odd_1": "one"}),
        ({"s": {1, 2}, "t": (1, 2), "b": b"x"}, {}),
    ],
)
def test_flattening(props: dict[str, Any], expected: dict[str, Any]) -> None:
    result = metadata(props)
    assert result == expected
    for key, value in expected.items():
        assert type(result[key]) is type(value)


@pytest.mark.parametrize(
    "props",
    [
        {"plan_tier": "top", "plan": {"tier": "nested"}},
        {"plan": {"tier": "nested"}, "plan_tier": "top"},
    ],
)
def test_top_level_key_wins_a_flattening_collision(props: dict[str, Any]) -> None:
    assert metadata(props) == {"plan_tier": "top"}


def test_collision_between_nested_keys_first_wins() -> None:
    props = {"a": {"b_c": 1}, "a_b": {"c": 2}}
    assert metadata(props) == {"a_b_c": 1}


def test_top_level_array_is_joined_and_nan_does_not_block_nested() -> None:
    props = {"plan_tier": [1, 2], "plan": {"tier": "pro"}, "x_y": math.nan, "x": {"y": 3}}
    assert metadata(props) == {"plan_tier": "1,2", "x_y": 3}


def test_deep_nesting_is_bounded() -> None:
    deep: dict[str, Any] = {"leaf": 1}
    for _ in range(MAX_DEPTH + 5):
        deep = {"k": deep}
    result = metadata({"root": deep, "shallow": {"k": {"leaf": 2}}})
    assert result == {"shallow_k_leaf": 2}


@pytest.mark.parametrize("props", [None, "text", 5, ["a"], True])
def test_odd_properties_give_empty_metadata(props: Any) -> None:
    event = {"type": "track", "event": "Feature Used", "userId": "u", "properties": props}
    assert build_track_payload(event, EventRule("Feature Used", "feature_used"))["metadata"] == {}


def test_missing_user_id_gives_empty_user_id() -> None:
    payload = build_track_payload({"type": "track"}, EventRule("x", "x"))
    assert payload == {"user_id": "", "event_name": "x", "metadata": {}}


# ------------------------------------------------------------------ product summary


@pytest.mark.parametrize("id_key", ["product_id", "item_id", "id", "sku"])
def test_summary_id_keys(id_key: str) -> None:
    result = metadata({"products": [{id_key: "P1"}]})
    assert result == {"product_id": "P1", "products_count": 1}


def test_summary_id_key_priority() -> None:
    item = {"sku": "S", "id": "I", "item_id": "IT", "product_id": "P"}
    assert metadata({"products": [item]})["product_id"] == "P"
    del item["product_id"]
    assert metadata({"products": [item]})["product_id"] == "IT"
    del item["item_id"]
    assert metadata({"products": [item]})["product_id"] == "I"


@pytest.mark.parametrize("name_key", ["name", "item_name", "product_name"])
def test_summary_name_keys(name_key: str) -> None:
    result = metadata({"items": [{name_key: "Headphones"}]})
    assert result == {"product_name": "Headphones", "items_count": 1}


def test_summary_full_example_from_signal_docs() -> None:
    props = {
        "order_id": "ORD-1234",
        "total": 129.99,
        "currency": "USD",
        "products": [
            {"product_id": "SKU-001", "name": "Wireless Headphones", "price": 79.99,
             "quantity": 1},
            {"product_id": "SKU-002", "name": "Case", "price": 50.0, "quantity": 1},
        ],
    }
    assert metadata(props) == {
        "order_id": "ORD-1234",
        "total": 129.99,
        "currency": "USD",
        "product_id": "SKU-001",
        "product_name": "Wireless Headphones",
        "price": 79.99,
        "quantity": 1,
        "products_count": 2,
    }


@pytest.mark.parametrize(
    ("props", "currency"),
    [
        ({"products": [{"id": "p", "currency": "EUR"}]}, "EUR"),
        ({"currency": "GBP", "products": [{"id": "p"}]}, "GBP"),
        ({"products": [{"id": "p"}], "currency": "GBP"}, "GBP"),
        ({"currency": "GBP", "products": [{"id": "p", "currency": "EUR"}]}, "GBP"),
    ],
)
def test_summary_currency(props: dict[str, Any], currency: str) -> None:
    assert metadata(props)["currency"] == currency


@pytest.mark.parametrize(
    "props",
    [
        {"price": 10, "products": [{"id": "p", "price": 99}]},
        {"products": [{"id": "p", "price": 99}], "price": 10},
    ],
)
def test_top_level_beats_summary(props: dict[str, Any]) -> None:
    """The top level's price describes a product: the first item's fields, another
    product's, are not sent beside it (review "events28")."""
    assert metadata(props) == {"price": 10, "products_count": 1}


def test_an_items_price_in_another_currency_is_not_sent_under_the_events_currency() -> None:
    """Review "events31": the event's USD won the `currency` key and the item's EUR price
    went out beside it, as 9.5 USD. Same currency, or none on the item: the price goes."""
    from consumer.mapping import build_payload

    rule = DEFAULT_PRESET.lookup(track("Product Viewed"))
    assert rule is not None
    item = {"sku": "S1", "name": "N", "price": 9.5, "quantity": 2}
    built = build_payload(track("Product Viewed", {
        "products": [{**item, "currency": "EUR"}], "currency": "USD"}), rule)
    assert built.body["metadata"] == {"product_id": "S1", "product_name": "N", "quantity": 2,
                                      "currency": "USD", "products_count": 1}
    assert "price of products[0] (in another currency than the event's)" in built.omitted
    for same in ({**item, "currency": "USD"}, item):
        sent = build_payload(track("Product Viewed", {"products": [same], "currency": "USD"}),
                             rule).body["metadata"]
        assert (sent["price"], sent["currency"]) == (9.5, "USD")


@pytest.mark.parametrize(("item_currency", "event_currency"),
                         [("usd", "USD"), ("USD", "usd"), (" eur", "EUR ")])
def test_one_currency_in_another_case_keeps_the_items_price(
        item_currency: str, event_currency: str) -> None:
    """Review "seed34": Stripe writes "usd"; beside the event's "USD" it read as another
    currency and the item's price was left out. The event's own spelling is sent."""
    from consumer.mapping import build_payload

    rule = DEFAULT_PRESET.lookup(track("Product Viewed"))
    assert rule is not None
    built = build_payload(track("Product Viewed", {
        "products": [{"sku": "S1", "price": 49, "currency": item_currency}],
        "currency": event_currency}), rule)
    assert (built.body["metadata"]["price"], built.body["metadata"]["currency"]) == (
        49, event_currency)
    assert not any(o.startswith("price") for o in built.omitted), built.omitted


def test_a_top_level_product_id_is_never_sent_with_the_first_items_name_and_price() -> None:
    """Review "events28": the top-level product_id went out with products[0]'s name, price
    and quantity, another product's."""
    from consumer.mapping import build_payload

    props = {"product_id": "SKU-TOP", "products": [
        {"product_id": "SKU-001", "name": "Headphones", "price": 79.99, "quantity": 1}]}
    rule = DEFAULT_PRESET.lookup(track("Product Viewed"))
    assert rule is not None
    built = build_payload(track("Product Viewed", props), rule)
    assert built.body["metadata"] == {"product_id": "SKU-TOP", "products_count": 1}
    assert set(built.omitted) == {
        "product_id (name taken)",
        *(f"{key} of products[0] (the top level names another product)"
          for key in ("product_name", "price", "quantity"))}


@pytest.mark.parametrize(("props", "sent"), [
    # An id key the summary does not read: the top level still names another product.
    ({"product_id": "SKU-TOP", "products": [{"productId": "SKU-001", "name": "Headphones",
                                             "price": 79.99, "quantity": 1}]},
     {"product_id": "SKU-TOP", "products_count": 1}),
    ({"price": 10, "products": [{"id": "p"}]}, {"price": 10, "products_count": 1}),
    # A flattened object after the list names the product.
    ({"products": [{"name": "Headphones", "price": 79.99}], "product": {"id": "SKU-TOP"}},
     {"product_id": "SKU-TOP", "products_count": 1}),
    ({"products": [{"name": "Headphones"}], "a": {"b": 1}, "product": {"x": {"y": 2}}},
     {"product_name": "Headphones", "products_count": 1, "a_b": 1, "product_x_y": 2}),
    # The first item's currency is that other product's too (review "events29") ...
    ({"product_id": "SKU-TOP", "price": 5,
      "products": [{"id": "SKU-001", "price": 79.99, "currency": "EUR"}]},
     {"product_id": "SKU-TOP", "price": 5, "products_count": 1}),
    # ... while the event's own top-level currency is sent.
    ({"product_id": "SKU-TOP", "currency": "USD",
      "products": [{"id": "SKU-001", "currency": "EUR"}]},
     {"product_id": "SKU-TOP", "currency": "USD", "products_count": 1}),
    ({"products": [{"id": "SKU-001", "currency": "EUR"}]},
     {"product_id": "SKU-001", "currency": "EUR", "products_count": 1}),
])
def test_the_first_items_fields_never_mix_with_a_product_the_event_names(
        props: dict[str, Any], sent: dict[str, Any]) -> None:
    """Review diff28: whatever the summary itself holds, and wherever the event's own
    product fields come (a flattened object after the list)."""
    assert metadata(props) == sent


def test_an_empty_products_list_does_not_hide_the_items() -> None:
    """Review "events28": `products: []` was summarised and the filled `items` left out."""
    props = {"products": [], "items": [{"product_id": "SKU-9", "name": "Cable", "price": 5}]}
    assert metadata(props) == {"product_id": "SKU-9", "product_name": "Cable", "price": 5,
                               "items_count": 1, "products_count": 0}


def test_top_level_product_id_and_count_beat_summary() -> None:
    props = {"product_id": "top", "products_count": 7, "products": [{"id": "p"}, {"id": "q"}]}
    assert metadata(props) == {"product_id": "top", "products_count": 7}


@pytest.mark.parametrize(
    ("props", "expected"),
    [
        (
            {"items": [{"id": "i"}], "products": [{"id": "p"}]},
            {"items_count": 1, "product_id": "p", "products_count": 1},
        ),
        ({"items": [{"item_id": "i", "price": 2}]}, {"product_id": "i", "price": 2,
                                                      "items_count": 1}),
        ({"products": []}, {"products_count": 0}),
        ({"products": ["a", "b"]}, {"products_count": 2}),
        ({"products": "not a list"}, {"products": "not a list"}),
        ({"products": [{"id": {"x": 1}, "sku": "S", "price": math.inf}]},
         {"product_id": "S", "products_count": 1}),
        ({"cart": {"products": [{"id": "p"}]}}, {}),
    ],
)
def test_summary_shapes(props: dict[str, Any], expected: dict[str, Any]) -> None:
    assert metadata(props) == expected


# ------------------------------------------------------------------ page events


def page(props: Any = None, page_ctx: Any = None, name: Any = None) -> dict[str, Any]:
    event: dict[str, Any] = {"type": "page", "userId": "u1"}
    if props is not None:
        event["properties"] = props
    if page_ctx is not None:
        event["context"] = {"page": page_ctx}
    if name is not None:
        event["name"] = name
    return event


CTX_PAGE = {"url": "https://a.io/p?x=1", "path": "/p", "title": "P", "referrer": "https://g.co",
            "search": "?x=1"}


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (
            page(page_ctx=CTX_PAGE, name="Pricing"),
            {"url": "https://a.io/p?x=1", "path": "/p", "title": "P",
             "referrer": "https://g.co", "name": "Pricing"},
        ),
        (
            page(props={"url": "https://b.io/q", "title": "Q", "plan": {"tier": "pro"}},
                 page_ctx=CTX_PAGE),
            {"url": "https://b.io/q", "path": "/p", "title": "Q", "referrer": "https://g.co",
             "plan_tier": "pro"},
        ),
        (
            page(props={"path": None, "name": "Props name"}, page_ctx={"path": "/ctx"},
                 name="Event name"),
            {"path": "/ctx", "name": "Props name"},
        ),
        (page(), {}),
        (page(page_ctx="broken", name=""), {"name": ""}),
        ({"type": "page", "userId": "u", "context": "broken"}, {}),
        (page(props={"category": "Docs"}, name="Intro"), {"name": "Intro", "category": "Docs"}),
    ],
)
def test_page_metadata(event: dict[str, Any], expected: dict[str, Any]) -> None:
    rule = DEFAULT_PRESET.lookup(event)
    assert rule is not None
    payload = build_track_payload(event, rule)
    assert payload["event_name"] == "page_viewed"
    assert payload["metadata"] == expected
    assert list(payload["metadata"]) == list(expected)


# ------------------------------------------------------------------ custom mappings

RICH_EVENT: dict[str, Any] = {
    "type": "track",
    "event": "Feature Used",
    "userId": "user_001",
    "properties": {
        "feature": "export_csv",
        "feature_id": "feat_017",
        "context": "reports_dashboard",
        "plan": {"tier": "pro"},
    },
    "context": {
        "campaign": {"source": "google", "medium": "cpc"},
        "page": {"url": "https://a.io"},
        "device": {"type": "desktop", "manufacturer": None},
    },
    "messageId": "m-1",
}


def load_rule(entry: Any, name: str = "Feature Used", preset: str = "default") -> EventRule:
    mappings = load_mappings({"preset": preset, "events": {name: entry}})
    rule = mappings.lookup({"type": "track", "event": name})
    assert rule is not None
    return rule


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"properties": ["feature", "feature_id"]}, {"feature": "export_csv",
                                                     "feature_id": "feat_017"}),
        ({"properties": ["plan_tier", "absent"]}, {"plan_tier": "pro"}),
        ({"properties": "none"}, {}),
        ({"properties": "all", "rename": {"feature": "feature_key"}},
         {"feature_key": "export_csv", "feature_id": "feat_017", "context": "reports_dashboard",
          "plan_tier": "pro"}),
        ({"properties": ["feature"], "rename": {"feature": "feature_id"}},
         {"feature_id": "export_csv"}),
        ({"properties": "all", "rename": {"feature": "feature_id"}},
         {"feature_id": "export_csv", "context": "reports_dashboard", "plan_tier": "pro"}),
        ({"properties": "none", "fields": {"utm_source": "context.campaign.source",
                                           "plan": "properties.plan.tier",
                                           "msg": "messageId", "missing": "context.nope.x",
                                           "through_str": "properties.feature.x"}},
         {"utm_source": "google", "plan": "pro", "msg": "m-1"}),
        ({"properties": "none", "fields": {"campaign": "context.campaign",
                                           "device": "context.device"}},
         {"campaign_source": "google", "campaign_medium": "cpc", "device_type": "desktop",
          "device_manufacturer": None}),
        ({"properties": "none", "fields": {"p": "properties"}},
         {"p_feature": "export_csv", "p_feature_id": "feat_017",
          "p_context": "reports_dashboard", "p_plan_tier": "pro"}),
        ({"properties": "none", "static": {"source": "signal", "v": 2, "on": True, "n": None}},
         {"source": "signal", "v": 2, "on": True, "n": None}),
        ({"properties": ["feature"], "fields": {"feature": "context.campaign.source"},
          "static": {"plan_tier": "static"}},
         {"feature": "google", "plan_tier": "static"}),
        ("feature_touched", {"feature": "export_csv", "feature_id": "feat_017",
                             "context": "reports_dashboard", "plan_tier": "pro"}),
    ],
)
def test_custom_rule_metadata(entry: Any, expected: dict[str, Any]) -> None:
    rule = load_rule(entry)
    assert build_track_payload(RICH_EVENT, rule)["metadata"] == expected


def test_custom_rule_keeps_preset_event_name_unless_given() -> None:
    assert load_rule({"static": {"a": 1}}).event_name == "feature_used"
    assert load_rule({"event_name": "feature_touched"}).event_name == "feature_touched"


def test_fields_pick_list_index_and_drop_arrays() -> None:
    event = track("Order Completed", {"products": [{"id": "a"}, {"id": "b", "tags": ["x"]}]})
    rule = load_rule(
        {"event_name": "order_completed", "properties": "none",
         "fields": {"second": "properties.products.1.id", "arr": "properties.products",
                    "tags": "properties.products.1.tags", "oob": "properties.products.9.id",
                    "neg": "properties.products.-1.id",
                    # Past any list; int() of it raised (review "mappings48").
                    "huge": "properties.products." + "1" * 4301 + ".id",
                    "big": "properties.products.9999999999999999999.id"}},
        name="Order Completed",
    )
    assert build_track_payload(event, rule)["metadata"] == {"second": "b", "tags": "x"}


def test_custom_file_semantics() -> None:
    mappings = load_mappings(
        {
            "events": {
                "Order Completed": {"event_name": "order_completed"},
                "lead-generated": False,
                "page": {"properties": ["url"], "static": {"kind": "page"}},
            }
        }
    )
    assert mappings.preset == "default"
    assert "Lead Generated" not in mappings.names()
    assert mappings.lookup(track("Lead Generated")) is None
    rule = mappings.lookup(track("order_completed"))
    assert rule is not None and rule.event_name == "order_completed"
    assert mappings.names()[-1] == "Order Completed"
    page_rule = mappings.lookup(page(page_ctx=CTX_PAGE))
    assert page_rule is not None
    assert build_track_payload(page(page_ctx=CTX_PAGE), page_rule)["metadata"] == {
        "url": "https://a.io/p?x=1", "kind": "page"}
    assert mappings.lookup(track("page")) is None


def test_preset_none_starts_empty() -> None:
    mappings = load_mappings({"preset": "none", "events": {"Order Completed": "order_done"}})
    assert mappings.names() == ("Order Completed",)
    assert mappings.lookup(track("Feature Used")) is None
    assert mappings.lookup(page()) is None
    assert load_mappings({"preset": "none"}).names() == ()


def test_overriding_a_preset_event_with_another_spelling_keeps_its_place() -> None:
    mappings = load_mappings({"events": {"feature_used": {"event_name": "feature_touched"}}})
    assert len(mappings.names()) == len(SEED_TABLE)
    assert mappings.names()[3] == "feature_used"


def test_describe_is_json_and_complete() -> None:
    mappings = load_mappings(EXAMPLE)
    described = json.loads(json.dumps(mappings.describe()))
    by_source = {e["source"]: e for e in described["events"]}
    assert by_source["Feature Used"]["properties"] == ["feature", "feature_id", "plan_tier"]
    assert by_source["Feature Used"]["rename"] == {"feature": "feature_key"}
    assert by_source["Feature Used"]["fields"]["utm_source"] == "context.campaign.source"
    assert by_source["Feature Used"]["static"] == {"source": "signal"}
    assert "Lead Generated" not in by_source
    assert by_source["Order Completed"]["event_name"] == "order_completed"


def test_example_file_maps_the_example_event() -> None:
    mappings = load_mappings(EXAMPLE)
    event = dict(RICH_EVENT)
    rule = mappings.lookup(event)
    assert rule is not None
    assert build_track_payload(event, rule) == {
        "user_id": "user_001",
        "event_name": "feature_used",
        "metadata": {
            "feature_key": "export_csv",
            "feature_id": "feat_017",
            "plan_tier": "pro",
            "utm_source": "google",
            "utm_medium": "cpc",
            "source": "signal",
        },
    }


# ------------------------------------------------------------------ validation errors


@pytest.mark.parametrize(
    ("doc", "fragments"),
    [
        ([], ["mappings: the mappings must be a JSON object", "got a list"]),
        ({"preset": "defualt"}, ['mappings: preset: must be "default" or "none", got "defualt"']),
        ({"evnts": {}}, ['unknown key "evnts" (did you mean "events"?)',
                         "allowed keys: description, events, group, identify, preset"]),
        ({"events": []}, ["mappings: events: must be an object", "got a list"]),
        ({"events": {"X": {}}}, ['events."X": "event_name" is required for an event that is not '
                                 'in the preset; write e.g. "event_name": "x"']),
        ({"events": {"Order Completed": {"event_name": ""}}},
         ['events."Order Completed".event_name: "" is not a valid Userpilot event name',
          'e.g. "my_event"']),
        ({"events": {"Order Completed": {"event_name": "Order Completed!"}}},
         ['"Order Completed!" is not a valid Userpilot event name', 'e.g. "order_completed"']),
        ({"events": {"Order Completed": {"event_name": 5}}},
         ['events."Order Completed".event_name: 5 is not a valid Userpilot event name']),
        ({"events": {"Order Completed": {"event_name": "x" * 101}}},
         ["is not a valid Userpilot event name: use 1-100"]),
        ({"events": {"Feature Used": {"static": {"src": {"a": 1}}}}},
         ['events."Feature Used".static."src": must be a string, number, boolean or null',
          "got an object", 'write e.g. "src": "value"']),
        ({"events": {"Feature Used": {"static": {"src": [1]}}}}, ["got a list"]),
        ({"events": {"Feature Used": {"static": {"src": math.nan}}}}, ["static.\"src\": must be"]),
        ({"events": {"Feature Used": {"static": "signal"}}},
         ['events."Feature Used".static: must be an object of metadata key -> constant']),
        ({"events": {"Feature Used": {"fileds": {}}}},
         ['events."Feature Used": unknown key "fileds" (did you mean "fields"?); allowed keys: '
          "event_name, fields, properties, rename, static"]),
        ({"events": {"Feature Used": {}, "feature_used": {}}},
         ['"Feature Used" and "feature_used" are the same event (both normalise to '
          '"feature_used"); keep one of them']),
        ({"events": {"Lead Genrated": False}},
         ['events."Lead Genrated": false disables a preset event, but "Lead Genrated" is not '
          'in preset "default"']),
        ({"preset": "none", "events": {"Lead Generated": False}},
         ['is not in preset "none" (its events: none)']),
        ({"events": {"Feature Used": True}},
         ['events."Feature Used": must be an object like {"event_name": "feature_used"}',
          "got true"]),
        ({"events": {"Feature Used": 3}}, ["got a number"]),
        ({"events": {"": {"event_name": "x"}}},
         ['mappings: events: an event name must be a non-empty string, got ""']),
        ({"events": {"Feature Used": {"properties": "some"}}},
         ['events."Feature Used".properties: must be "all", "none" or a list',
          'got "some"']),
        ({"events": {"Feature Used": {"properties": ["ok", 3, ""]}}},
         ['events."Feature Used".properties[1]: a metadata key must be a non-empty string, '
          "got 3", "properties[2]"]),
        ({"events": {"Feature Used": {"rename": {"a": 1}}}},
         ['events."Feature Used".rename."a": the new key must be a string, got a number']),
        ({"events": {"Feature Used": {"rename": {"a": "x", "b": "x"}}}},
         ['"a" and "b" are both renamed to "x"']),
        ({"events": {"Feature Used": {"rename": ["a"]}}}, ["rename: must be an object"]),
        ({"events": {"Feature Used": {"fields": {"u": "campain.source"}}}},
         ['events."Feature Used".fields."u": path "campain.source" must start with an event '
          'key', 'e.g. "properties.campain.source"']),
        ({"events": {"Feature Used": {"fields": {"u": "contxt.campaign"}}}},
         ['(did you mean "context"?)']),
        ({"events": {"Feature Used": {"fields": {"u": "context..source"}}}},
         ["has an empty or space-padded segment"]),
        ({"events": {"Feature Used": {"fields": {"u": 3}}}},
         ['fields."u": must be a dotted path string like "context.campaign.source", got 3']),
        ({"events": {"Feature Used": {"fields": {" u": "userId"}}}},
         ["must have no leading/trailing spaces"]),
        ({"events": {"Feature Used": {"fields": {"s": "userId"}, "static": {"s": 1}}}},
         ['metadata key "s" is set by both "fields" and "static"; keep one']),
        ({"description": 5}, ["description: must be a string, got a number"]),
    ],
)
def test_validation_messages(doc: Any, fragments: list[str]) -> None:
    with pytest.raises(MappingsError) as info:
        load_mappings(doc) if isinstance(doc, dict) else _load_any(doc)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    assert isinstance(info.value, ValueError)


def _load_any(doc: Any) -> Any:
    from consumer.mapping import _Loader

    return _Loader("mappings").load(doc)


def test_all_problems_are_reported_together() -> None:
    doc = {"preset": "x", "events": {"A": {"event_name": "!"}, "B": {"static": {"k": []}}}}
    with pytest.raises(MappingsError) as info:
        load_mappings(doc)
    assert len(info.value.problems) == 4  # preset, A.event_name, B.event_name, B.static.k


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(MappingsError, match=r"nope\.json: cannot read the mappings file"):
        load_mappings(missing)

    bad = tmp_path / "bad.json"
    bad.write_text('{"events": {\n  "X": {"event_name": "x",}\n}}', encoding="utf-8")
    with pytest.raises(MappingsError, match=r"bad\.json: not valid JSON at line 2 column"):
        load_mappings(bad)

    dup = tmp_path / "dup.json"
    dup.write_text('{"events": {"X": "x", "X": "y"}}', encoding="utf-8")
    with pytest.raises(MappingsError, match=r'dup\.json: duplicate key "X"'):
        load_mappings(str(dup))

    # A byte order mark (a Windows editor's) is read past (review "mappings48").
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + b'{"events": {"X": {"event_name": "x"}}}')
    assert load_mappings(bom).lookup(track("X")) is not None

    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"events": {"Feature Used": {"static": {"a": {}}}}}', encoding="utf-8")
    with pytest.raises(MappingsError, match=r'wrong\.json: events\."Feature Used"\.static\."a"'):
        load_mappings(wrong)


def test_a_lone_surrogate_anywhere_is_refused_where_it_is(tmp_path: Path) -> None:
    """Review config40: valid JSON (`"\\ud800"`) that no UTF-8 text holds; check-config
    said OK, and every event the rule shaped was dead-lettered as a mapping error."""
    path = tmp_path / "surrogate.json"
    path.write_text('{"identify": {"static": {"k\\ud800": "v"}}, "events": {"Signed Up": '
                    '{"static": {"a": "b\\udc80"}, "rename": {"x": "y\\ud83d"}}}}',
                    encoding="utf-8")
    with pytest.raises(MappingsError) as caught:
        load_mappings(path)
    problems = [p for p in caught.value.problems if "lone UTF-16 surrogate" in p]
    assert len(problems) == 3
    text = "\n".join(problems)
    assert 'identify."static"."k\\ud800"' in text
    assert 'events."Signed Up"."static"."a"' in text
    text.encode("utf-8")  # the message itself is printable
    # A whole pair is one character: loaded as it is.
    path.write_text('{"identify": {"static": {"mood": "\\ud83d\\ude00"}}}', encoding="utf-8")
    assert load_mappings(path) is not None


def test_example_file_is_valid_json_and_loads() -> None:
    json.loads(EXAMPLE.read_text(encoding="utf-8"))
    assert "Order Completed" in load_mappings(EXAMPLE).names()


# ------------------------------------------------------------------ property-based-ish


def _random_value(rng: random.Random, depth: int) -> Any:
    roll = rng.random()
    if depth > 0 and roll < 0.25:
        return {_random_key(rng): _random_value(rng, depth - 1) for _ in range(rng.randint(0, 4))}
    if depth > 0 and roll < 0.4:
        return [_random_value(rng, depth - 1) for _ in range(rng.randint(0, 3))]
    return rng.choice(
        [None, True, False, 0, -1, 2**80, 1.5, math.nan, math.inf, -math.inf, "", "x",
         "ünïcode", (1, 2), {1, 2}, b"bytes", object()]
    )


def _random_key(rng: random.Random) -> Any:
    return rng.choice(["a", "b", "a_b", "products", "items", "price", "currency", "id", "name",
                       "url", "title", 1, "product_id", "plan", "plan_tier", "", "items_count"])


def _is_wire_primitive(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return value is None or isinstance(value, str | int | bool)


def test_random_inputs_always_give_primitive_metadata() -> None:
    rng = random.Random(20240925)
    rules = [
        EventRule("Feature Used", "feature_used"),
        load_rule({"properties": ["a", "a_b", "price"], "rename": {"a": "b"},
                   "fields": {"ctx": "context", "props": "properties", "p": "properties.a"},
                   "static": {"s": 1}}),
    ]
    for _ in range(3000):
        event: dict[str, Any] = {
            "type": rng.choice(["track", "page"]),
            "event": "Feature Used",
            "name": _random_value(rng, 0),
            "userId": "u",
            "properties": _random_value(rng, 5) if rng.random() < 0.9 else "junk",
            "context": {"page": _random_value(rng, 2), "campaign": _random_value(rng, 2),
                        "consent": _random_value(rng, 2)},
        }
        for rule in rules:
            payload = build_track_payload(event, rule)
            assert list(payload) == ["user_id", "event_name", "metadata"]
            for key, value in payload["metadata"].items():
                assert isinstance(key, str)
                assert _is_wire_primitive(value), (key, value)
            json.dumps(payload, allow_nan=False)


# ------------------------------------------------------------------ omitted, limits, preset


def test_left_out_fields_are_reported() -> None:
    from consumer.mapping import build_payload

    rule = DEFAULT_PRESET.lookup(track("Feature Used"))
    assert rule is not None
    built = build_payload(track("Feature Used", {
        "objs": [{"a": 1}], "deep": {"x": [[1]]}, "nan": math.nan, "ok": "yes"}), rule)
    assert built.body["metadata"] == {"ok": "yes"}
    assert built.omitted == ("objs", "deep_x", "nan")
    assert built.truncated == ()


@pytest.mark.parametrize(("props", "sent", "left_out"), [
    ({"a": {"b": 1}, "a_b": [1, 2]}, {"a_b": 1}, ("a_b (name taken)",)),
    ({"x_y": {"z": 1}, "x": {"y_z": 2}}, {"x_y_z": 1}, ("x_y_z (name taken)",)),
    ({"plan": {"tier": "pro"}, "plan_tier": "basic"}, {"plan_tier": "basic"},
     ("plan_tier (name taken)",)),
    ({"a": {"b_c": 1, "b": {"c": 2}}}, {"a_b_c": 1}, ("a_b_c (name taken)",)),
    # The products summary's values, behind a nested key or a top-level one (review
    # mapping25); a top-level value equal to the summary's loses nothing.
    ({"product": {"id": "NESTED"}, "products": [{"product_id": "SKU-9"}]},
     {"product_id": "NESTED", "products_count": 1}, ("product_id (name taken)",)),
    ({"price": None, "products": [{"product_id": "SKU-9", "price": 3}]},
     {"price": None, "products_count": 1},
     ("product_id of products[0] (the top level names another product)",
      "price (name taken)")),
    ({"products": [{"product_id": "SKU-9", "price": 3}], "price": 4},
     {"price": 4, "products_count": 1},
     ("product_id of products[0] (the top level names another product)",
      "price (name taken)")),
    ({"products_count": 1, "products": [{"product_id": "SKU-9"}]},
     {"products_count": 1, "product_id": "SKU-9"}, ()),
])
def test_a_value_whose_flat_name_another_took_is_listed_as_left_out(
        props: dict[str, Any], sent: dict[str, Any], left_out: tuple[str, ...]) -> None:
    """First (or the top-level primitive) wins a flattened name; the loser was lost without
    a word, so explain showed no loss (review "mapping22")."""
    from consumer.mapping import build_payload

    rule = DEFAULT_PRESET.lookup(track("Feature Used"))
    assert rule is not None
    built = build_payload(track("Feature Used", props), rule)
    assert built.body["metadata"] == sent
    assert built.omitted == left_out


def test_a_page_property_replaced_by_the_pages_own_value_is_listed_as_left_out() -> None:
    """`properties.url` that is not a primitive: `context.page.url` is sent, and the list
    was lost without a word (review mapping25)."""
    from consumer.mapping import build_payload

    event = {"type": "page", "userId": "u", "name": "Home",
             "properties": {"url": ["https://a", "https://b"], "title": {"x": 1}},
             "context": {"page": {"url": "https://ctx"}}}
    rule = DEFAULT_PRESET.lookup(event)
    assert rule is not None
    built = build_payload(event, rule)
    assert built.body["metadata"] == {"url": "https://ctx", "name": "Home", "title_x": 1}
    assert built.omitted == ("url (name taken)",)


def test_a_nested_key_over_the_length_bound_is_left_out_with_what_is_under_it() -> None:
    from consumer.mapping import MAX_KEY_CHARS, build_payload

    rule = DEFAULT_PRESET.lookup(track("Feature Used"))
    assert rule is not None
    room = "r" * (MAX_KEY_CHARS - len("plan_"))
    built = build_payload(track("Feature Used", {
        "plan": {room: 1, room + "x": {"a": 1, "b": 2}, "tier": "pro"},
        "k" * (MAX_KEY_CHARS + 1): {"a": 1}}), rule)
    assert built.body["metadata"] == {f"plan_{room}": 1, "plan_tier": "pro"}
    long_key = f"plan_{room}x"
    assert built.omitted == (f"{long_key[:64]}…({len(long_key)} characters)",
                             f"{'k' * 64}…({MAX_KEY_CHARS + 1} characters)")


def test_flattening_costs_a_bounded_key_per_leaf_whatever_its_parents() -> None:
    """A 180 KB event: 8,000 leaves under one 100 KB key built 800 MB of keys (a replica
    under the chart's 512 MiB limit was OOM-killed on it, again after every restart)."""
    import tracemalloc

    from consumer.calls import flatten_traits
    from consumer.mapping import build_payload

    rule = DEFAULT_PRESET.lookup(track("Feature Used"))
    assert rule is not None
    blob = {"A" * 100_000: {f"k{i}": 0 for i in range(8000)}}
    tracemalloc.start()
    try:
        built = build_payload(track("Feature Used", {"blob": blob, "seq": 1}), rule)
        traits = flatten_traits({"blob": blob})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert built.body["metadata"] == {"seq": 1}
    assert traits == {}
    assert peak < 20_000_000, f"flattening took {peak / 1e6:.0f} MB"


def test_line_item_lists_reduced_to_a_count_are_listed_as_omitted() -> None:
    from consumer.mapping import build_payload

    rule = DEFAULT_PRESET.lookup(track("Feature Used"))
    assert rule is not None
    skus = build_payload(track("Feature Used", {"items": ["SKU-1", "SKU-2"]}), rule)
    assert skus.body["metadata"] == {"items_count": 2}
    assert skus.omitted == ("items",)
    both = build_payload(track("Feature Used", {
        "products": [{"id": "P1"}], "items": [{"id": "I1"}]}), rule)
    assert both.body["metadata"] == {"product_id": "P1", "products_count": 1,
                                     "items_count": 1}
    assert both.omitted == ("items",)
    empty = build_payload(track("Feature Used", {"products": [], "items": []}), rule)
    assert empty.omitted == ()


def test_metadata_over_the_size_limit_loses_its_largest_fields() -> None:
    from consumer.mapping import TRUNCATED_KEY, build_payload

    rule = DEFAULT_PRESET.lookup(track("Feature Used"))
    assert rule is not None
    props = {"small": "s", "big": "b" * 3000, "medium": "m" * 600, "n": 5}
    built = build_payload(track("Feature Used", props), rule, max_bytes=1024, max_keys=100)
    assert built.body["metadata"] == {"small": "s", "medium": "m" * 600, "n": 5,
                                      TRUNCATED_KEY: 1}
    assert built.truncated == ("big",)
    size = len(json.dumps(built.body["metadata"]).encode())
    assert size <= 1024


def test_metadata_over_the_key_limit_is_cut_to_it() -> None:
    from consumer.mapping import TRUNCATED_KEY, build_payload

    rule = DEFAULT_PRESET.lookup(track("Feature Used"))
    assert rule is not None
    props = {f"k{i:02d}": "v" * i for i in range(20)}
    built = build_payload(track("Feature Used", props), rule, max_bytes=65536, max_keys=10)
    meta = built.body["metadata"]
    assert len(meta) == 10 and meta[TRUNCATED_KEY] == 11
    assert set(built.truncated) == {f"k{i:02d}" for i in range(9, 20)}  # the largest went


@pytest.mark.parametrize("keys", [1, 2, 500, 1000])
def test_the_size_limit_is_the_json_as_sent(keys: int) -> None:
    """The size was summed per field as `{"k": v}` with a space (2-3 bytes too many a
    field): 1,000 keys at 64,036 bytes as sent lost their largest field under a 65,536
    limit, and one field of exactly 65,536 bytes was cut (review oracle19)."""
    from consumer.calls import encode_body
    from consumer.mapping import TRUNCATED_KEY, limit_metadata

    limit = 65_536
    meta: dict[str, Any] = {f"k{i:04d}": i for i in range(keys - 1)}
    meta["big"] = ""
    meta["big"] = "x" * (limit - len(encode_body(meta)))
    assert len(encode_body(meta)) == limit
    kept, cut = limit_metadata(dict(meta), limit, 1001)
    assert cut == () and kept == meta
    meta["big"] += "x"  # one byte over: cut, and what is sent fits
    kept, cut = limit_metadata(dict(meta), limit, 1001)
    assert cut == ("big",) and kept[TRUNCATED_KEY] == 1
    assert len(encode_body(kept)) <= limit


def test_a_payload_within_the_limits_is_untouched() -> None:
    from consumer.mapping import build_payload

    rule = DEFAULT_PRESET.lookup(track("Feature Used"))
    assert rule is not None
    props = {"a" * 100: "é" * 1000}
    assert build_payload(track("Feature Used", props), rule).body["metadata"] == props


@pytest.mark.parametrize("preset", ["Default", "DEFAULT", " default ", "None"])
def test_preset_name_is_case_insensitive(preset: str) -> None:
    assert load_mappings({"preset": preset}).preset == preset.strip().lower()


def test_unknown_preset_is_one_message() -> None:
    with pytest.raises(MappingsError) as info:
        load_mappings({"preset": "Defualt", "events": {"Lead Generated": False}})
    assert len(info.value.problems) == 1


def test_traits_sections_are_validated_with_precise_messages() -> None:
    with pytest.raises(MappingsError) as info:
        load_mappings({"identify": {"pik": "all", "exclude": "password",
                                    "static": {"k": []}},
                       "group": []})
    text = str(info.value)
    assert 'identify: unknown key "pik" (did you mean "pick"?)' in text
    assert "identify.exclude: must be a list of flattened trait keys" in text
    assert 'identify.static."k": must be a string, number, boolean or null' in text
    assert "group: must be an object like" in text
    assert len(info.value.problems) == 4


@pytest.mark.parametrize("section", [
    {"exclude": ["createdAt"]}, {"pick": ["email", "createdAt"]},
    {"rename": {"createdAt": "signed_up"}}])
@pytest.mark.parametrize("where", ["identify", "group"])
def test_traits_rules_naming_created_at_are_refused(where: str, section: dict[str, Any]) -> None:
    """createdAt is created_at before the section applies: an exclude of it loaded clean
    and the value was sent anyway."""
    with pytest.raises(MappingsError) as info:
        load_mappings({where: section})
    assert info.value.problems == (
        f'mappings: {where}: "createdAt" is sent as "created_at" (Userpilot\'s reserved key) '
        f'before this section applies, so a pick, exclude or rename of "createdAt" would do '
        f'nothing; write "created_at"',)
    fixed = {k: (["created_at" if x == "createdAt" else x for x in v] if isinstance(v, list)
                 else {"created_at": "signed_up"}) for k, v in section.items()}
    load_mappings({where: fixed})


@pytest.mark.parametrize(("section", "said"), [
    ({"rename": {"signup_date": "createdAt"}}, "rename: \"createdAt\" as a new name"),
    ({"static": {"createdAt": "2020-01-01"}}, "static: \"createdAt\" would be sent as is")])
@pytest.mark.parametrize("where", ["identify", "group"])
def test_traits_rules_writing_created_at_are_refused(where: str, section: dict[str, Any],
                                                     said: str) -> None:
    """Review mapping41: written by the section, "createdAt" went out raw, beside the
    created_at Userpilot reads (two dates for one user)."""
    with pytest.raises(MappingsError) as info:
        load_mappings({where: section})
    (problem,) = info.value.problems
    assert problem.startswith(f"mappings: {where}.{said}") and 'write "created_at"' in problem
    fixed = {k: {(a if a != "createdAt" else "created_at"): (b if b != "createdAt"
                                                              else "created_at")
                 for a, b in v.items()} for k, v in section.items()}
    load_mappings({where: fixed})


def test_default_preset_forwards_all_traits() -> None:
    assert DEFAULT_PRESET.identify.plain and DEFAULT_PRESET.group.plain
    assert DEFAULT_PRESET.identify.apply({"a": 1, "b": "x"}) == {"a": 1, "b": "x"}


def test_fields_picked_list_of_primitives_is_joined_as_in_metadata() -> None:
    """docs/mappings.md said a picked list gives nothing; it is joined like metadata."""
    event = track("Order Completed", {"tags": ["x", None, "y", 2, True]})
    rule = load_rule({"event_name": "o", "properties": "none", "fields": {"t": "properties.tags"}},
                     name="Order Completed")
    assert build_track_payload(event, rule)["metadata"] == {"t": "x,y,2,true"}


@pytest.mark.parametrize("doc", [
    {"events": {"Feature Used": {"static": {"_truncated": 1}}}},
    {"events": {"Feature Used": {"rename": {"feature": "_truncated"}}}},
    {"events": {"Feature Used": {"fields": {"_truncated": "properties.feature"}}}},
    {"identify": {"static": {"_truncated": "x"}}},
    {"group": {"rename": {"plan": "_truncated"}}}])
def test_the_cut_marker_is_no_mapping_target(doc: dict[str, Any]) -> None:
    """A static `_truncated` was sent as `_truncated_`, unannounced (review oracle19)."""
    with pytest.raises(MappingsError, match='"_truncated" is reserved: the worker marks cut'):
        load_mappings(doc)


@pytest.mark.parametrize(("section", "where"), [
    ({"rename": {"name": "id"}}, "group.rename"),
    ({"rename": {"plan": "company_id"}}, "group.rename"),
    ({"static": {"company_id": "forced"}}, "group.static"),
    ({"static": {"id": 7}}, "group.static")])
def test_the_group_section_cannot_write_a_company_id_key(section: dict[str, Any],
                                                          where: str) -> None:
    """Both keys are left out of the company identify (the id is groupId): a rename or a
    static of either loaded clean and the trait vanished unannounced (review users36)."""
    with pytest.raises(MappingsError) as info:
        load_mappings({"group": section})
    (problem,) = info.value.problems
    assert problem.startswith(f"mappings: {where}: ")
    assert "cannot be a company property: the company's id is the event's groupId" in problem
    load_mappings({"identify": section})  # a user's property may be called so
    load_mappings({"group": {k: {"external_id" if x in ("id", "company_id") else x:
                                 ("external_id" if y in ("id", "company_id") else y)
                                 for x, y in v.items()} for k, v in section.items()}})


def test_a_mappings_file_nested_past_the_parsers_depth_is_refused_with_a_message(
        tmp_path: Path) -> None:
    """A RecursionError traceback from check-config, run and explain (review config25)."""
    path = tmp_path / "deep.json"
    path.write_text('{"events":' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(MappingsError, match="nested too deeply"):
        load_mappings(path)


def test_a_static_value_too_large_for_json_is_named_so() -> None:
    """"must be a string, number, … got a number" for 1e999 (review config25)."""
    with pytest.raises(MappingsError, match="too large for JSON"):
        load_mappings({"events": {"Feature Used": {"static": {"a": float("inf")}}}})


def test_a_static_nan_is_named_nan(tmp_path: Path) -> None:
    """`NaN` in a mappings file was refused as "a number too large for JSON" (review
    "seed34"): the message names what the file holds."""
    path = tmp_path / "m.json"
    path.write_text('{"events": {"Feature Used": {"static": {"k": NaN}}}}')
    with pytest.raises(MappingsError, match="got NaN"):
        load_mappings(path)


def test_a_decoded_page_view_is_mapped_whatever_else_its_context_extra_holds() -> None:
    """Review poison26: a page view was dead-lettered for a broken ``context.extra`` a
    Track with the same text delivered; it reads ``context.page`` alone."""
    from consumer import codec

    record = codec.to_record({"type": "page", "userId": "u", "name": "Docs",
                              "context": {"page": {"url": "https://a.io/d", "title": "D"}}})
    record["context"]["extra"] = "\ufeff{" + "[" * 300
    event = codec.decode(codec.encode(7, record), lambda _: codec.SCHEMA)
    rule = DEFAULT_PRESET.lookup(event)
    assert rule is not None
    payload = build_track_payload(event, rule)
    assert payload["metadata"] == {"url": "https://a.io/d", "title": "D", "name": "Docs"}


@pytest.mark.parametrize(("items", "joined"), [
    ([1.0, 2], "1,2"), ([1e20], "100000000000000000000"), ([-0.0], "0"),
    ([1e-6, 1.5e-7], "0.000001,1.5e-7"), ([2.5, 1e21], "2.5,1e+21"), ([10**30], str(10**30)),
    # From 1e16 the float's shortest spelling, padded, as JavaScript (review "seed34").
    ([12345678901234567890.0], "12345678901234567000"), ([2.0**53], "9007199254740992"),
    ([1e16, -1.7e17], "10000000000000000,-170000000000000000"),
])
def test_numbers_in_a_joined_array_are_written_as_javascript_writes_them(
        items: list[Any], joined: str) -> None:
    """Review "events31": "1.0,2", "1e+20" and "-0.0" were Python's spellings; Userpilot's
    own SDK (JavaScript) sends "1,2", "100000000000000000000" and "0"."""
    assert metadata({"ids": items})["ids"] == joined


def test_nan_items_of_an_array_are_skipped_and_listed_not_the_whole_array() -> None:
    """Review "events31": one NaN left `[1, NaN]` out whole, while nulls are skipped item by
    item; the finite items go, the key is listed as having lost some."""
    from consumer.mapping import build_payload

    rule = DEFAULT_PRESET.lookup(track("Feature Used"))
    assert rule is not None
    built = build_payload(track("Feature Used", {"nan": [1, math.nan, 2.5], "inf": [math.inf],
                                                 "ok": [1, None]}), rule)
    assert built.body["metadata"] == {"nan": "1,2.5", "inf": "", "ok": "1"}
    assert set(built.omitted) == {"nan (its NaN/Infinity items)", "inf (its NaN/Infinity items)"}


def _built_by(rule: dict[str, Any], event: dict[str, Any]) -> Any:
    from consumer.mapping import build_payload

    mappings = load_mappings({"events": {"E": rule}})
    raw = {"type": "track", "event": "E", "userId": "u", **event}
    found = mappings.lookup(raw)
    assert found is not None
    return build_payload(raw, found)


def test_a_picked_value_a_later_step_replaces_is_listed_and_the_same_value_is_no_loss() -> None:
    """Review diff45: a static over a picked object's flattened key, and one field over
    another's, lost the event's value unlisted; a field picking the very value already
    derived was listed as a loss."""
    built = _built_by({"event_name": "e", "fields": {"campaign": "context.campaign"},
                       "static": {"campaign_source": "fixed"}},
                      {"context": {"campaign": {"source": "google", "medium": "cpc"}}})
    assert built.body["metadata"]["campaign_source"] == "fixed"
    assert built.omitted == ("campaign_source (replaced by the rule's static)",)
    built = _built_by({"event_name": "e", "fields": {"a_b": "properties.x", "a": "properties.y"}},
                      {"properties": {"x": "X", "y": {"b": "Y"}}})
    assert built.body["metadata"]["a_b"] == "Y"
    assert built.omitted == ("a_b (replaced by the rule's field a)",)
    built = _built_by({"event_name": "e", "fields": {"plan_tier": "properties.plan.tier"}},
                      {"properties": {"plan": {"tier": "gold"}}})
    assert built.body["metadata"] == {"plan_tier": "gold"}
    assert built.omitted == ()
    built = _built_by({"event_name": "e", "fields": {"flag": "properties.on"}},
                      {"properties": {"flag": 1, "on": True}})
    assert built.body["metadata"] == {"flag": True, "on": True}
    assert built.omitted == ("flag (replaced by the rule's field flag)",)  # 1 is not True
    # A rename over the very same value, whichever comes first in the event: no loss.
    for properties in ({"b": 1, "a": 1}, {"a": 1, "b": 1}):
        built = _built_by({"event_name": "e", "rename": {"a": "b"}}, {"properties": properties})
        assert built.body["metadata"] == {"b": 1} and built.omitted == (), properties


@pytest.mark.parametrize("metadata", [{}, {"a": 1}, {"plan": "pro", "n": 1.5, "ok": True,
                                                     "none": None, "é": "错"}])
def test_metadata_size_is_the_bytes_sent(metadata: dict[str, Any]) -> None:
    """The size rule's own count must be the body's (review "mutate52": `{}` counted 1 byte
    went unnoticed, and an identify's company got one byte too many)."""
    from consumer.calls import encode_body
    from consumer.mapping import metadata_size

    assert metadata_size(metadata) == len(encode_body(metadata))
