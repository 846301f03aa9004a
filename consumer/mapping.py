"""Pure mapping from a decoded Signal event to a Userpilot Track payload.

Userpilot's ``metadata`` accepts primitives only (a nested object or an array is a 400), so
everything here exists to turn free-form Signal properties into a flat, primitive dict:

* :func:`normalize_event_name` lets ``"Feature Used"``, ``"feature_used"``, ``"feature-used"``
  and ``"featureUsed"`` select the same rule.
* :class:`EventRule` / :class:`MappingSet` hold the event table; :data:`DEFAULT_PRESET` is
  the seed integration page's table; :func:`load_mappings` builds one from a mappings file
  (format in ``docs/mappings.md``) and refuses mistakes with :class:`MappingsError`.
* :func:`build_payload` runs per event (through ``routing.route``, with the configured
  limits), so rule options are pre-computed at load time and the hot path does no regex
  work and no copies beyond the output dict. :func:`build_track_payload` is its body alone
  with the default limits, for tests and tools; the worker never calls it.

Arrays: an array of primitives becomes one comma-joined string (``["a", "b"]`` → ``"a,b"``,
as Userpilot's own examples send multi-valued traits); ``products``/``items`` become a
scalar summary; any other array holding objects or arrays is left out, and so are objects
nested deeper than :data:`MAX_DEPTH`, nested keys longer than :data:`MAX_KEY_CHARS` and
NaN/Infinity. Every left-out field is named in
:attr:`Payload.omitted` (``explain`` shows it).

Size: metadata larger than :attr:`MappingSet.max_metadata_bytes` (JSON bytes, default
64 KB) or with more than :attr:`MappingSet.max_metadata_keys` keys is cut: the largest
fields go first until it fits, and ``_truncated`` says how many went
(:attr:`Payload.truncated` names them).

No I/O happens here apart from :func:`load_mappings` reading the file it is given.
"""

from __future__ import annotations

import difflib
import functools
import json
import math
import os
import re
import unicodedata
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal, TypeAlias

from consumer import codec

__all__ = [
    "DEFAULT_MAX_METADATA_BYTES",
    "DEFAULT_MAX_METADATA_KEYS",
    "DEFAULT_PRESET",
    "EVENT_ROOT_KEYS",
    "MAX_DEPTH",
    "MAX_KEY_CHARS",
    "PAGE_SOURCE",
    "EventRule",
    "MappingSet",
    "MappingsError",
    "Payload",
    "Primitive",
    "PropertySelection",
    "TraitsRule",
    "build_payload",
    "build_track_payload",
    "field_size",
    "flatten_properties",
    "js_number",
    "limit_metadata",
    "load_mappings",
    "metadata_size",
    "normalize_event_name",
]

Primitive: TypeAlias = str | int | float | bool | None
PropertySelection: TypeAlias = Literal["all", "none"] | tuple[str, ...]

PAGE_SOURCE = "page"
"""Source name of the page-view rule. It matches events of ``type == "page"`` only."""

MAX_DEPTH = 16
"""Objects nested deeper than this are left out (keeps flattening bounded and total)."""

MAX_KEY_CHARS = 256
"""A flattened key (``parent_child``) longer than this is left out, with what is under it.

Why: every leaf's key repeats its parents' keys, so a 179 KB event with 8,000 leaves under
one 100 KB key built 800 MB of keys before the size limit cut them all (a replica under
the chart's 512 MiB limit was OOM-killed, again on each restart). Bounded here, a leaf
costs at most this many characters whatever its parents."""

DEFAULT_MAX_METADATA_BYTES = 64 * 1024
"""Userpilot documents no per-event limit, only 512 KB per app in total (README,
"Payload limits"); 64 KB keeps one event far below that and below common proxy limits."""

DEFAULT_MAX_METADATA_KEYS = 1000
"""More keys than this in one event's metadata are cut (largest first)."""

COMPANY_ID_KEYS = ("id", "company_id")
"""Both keys Userpilot's documents name a company by: never a company property beside the
company's id (`calls` leaves them out; the `group` section may not write them)."""

TRUNCATED_KEY = "_truncated"
"""The worker's marker on metadata it cut: how many fields it left out."""
OWN_TRUNCATED_KEY = "_truncated_"
"""Where an event's own field named `_truncated` goes: Userpilot showed `_truncated: 3` on
an event nothing was cut from, and a cut counted that field as one of its own (review
"seed17")."""

EVENT_ROOT_KEYS = (
    "anonymousId",
    "context",
    "event",
    "groupId",
    "messageId",
    "name",
    "properties",
    "receivedAt",
    "sentAt",
    "timestamp",
    "traits",
    "type",
    "userId",
)
"""First segment a ``fields`` path may start with: the canonical envelope keys."""

_PAGE_FIELDS = ("url", "path", "title", "referrer")
_SUMMARY_ARRAYS = ("products", "items")
_ID_KEYS = ("product_id", "item_id", "id", "sku")
_NAME_KEYS = ("name", "item_name", "product_name")
_ITEM_FIELDS = frozenset({"product_id", "product_name", "price", "quantity"})
"""A summary's fields that describe its first item (not the count, nor the currency)."""
_MISSING: Any = object()


class MappingsError(ValueError):
    """A mappings file (or dict) is invalid; the message says where and how to fix it.

    ``problems`` lists every mistake found, one line each, so a user fixes them in one go.
    """

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems: tuple[str, ...] = tuple(problems)
        super().__init__("\n".join(self.problems))


# ---------------------------------------------------------------------------- names

_CAMEL_1 = re.compile(r"([a-z0-9])([A-Z])")
# An upper-case letter that starts a capitalised word after an acronym ("HTTPServer"): a
# lookahead, linear in the name; `([A-Z]+)([A-Z][a-z])` backtracked quadratically (a 20,000
# letter all-caps name held the event loop 4 s, a 1 MB one for hours).
_CAMEL_2 = re.compile(r"([A-Z])(?=[A-Z][a-z])")
_SEPARATORS = re.compile(r"[\s_\-]+")


NAME_CACHE_MAX = 256  # longer names are normalised each time, never kept in the cache


def normalize_event_name(name: object) -> str:
    """Return the matching key of an event name: lower snake_case words.

    Title Case (the integration page), snake_case (upstream event specs), kebab-case,
    upper case, stray spaces and camelCase all meet on one key, e.g. ``feature_used``.
    camelCase is split only in a name without separators: a word's own capitals or
    digits ("2FA Enabled", "iOS App Opened") must meet its snake_case spelling
    ("2fa_enabled", "ios_app_opened"), not become "2_fa" or "i_os".
    Cached because it runs per event and real traffic has few distinct names; only names
    up to `NAME_CACHE_MAX` characters (4,096 names of 1 MB would hold 4 GB).
    """
    if not isinstance(name, str):
        return ""
    if len(name) > NAME_CACHE_MAX:
        return _normalize(name)
    return _normalize_cached(name)


def _normalize(name: str) -> str:
    # One spelling per name (NFC: "é" typed as "e" + U+0301, as macOS input and some
    # browsers send it), and case folded as Unicode folds it ("GRÖSSE" meets "Größe"):
    # lower-cased only, such names were dropped as unmapped (review "mappings48").
    ascii_ = name.isascii()
    if not ascii_:
        name = unicodedata.normalize("NFC", name)
    if _SEPARATORS.search(name) is None:
        if ascii_ or len(name) > UNICODE_CAMEL_MAX:
            name = _CAMEL_2.sub(r"\1 ", _CAMEL_1.sub(r"\1 \2", name))
        else:
            name = _split_camel(name)
    name = _SEPARATORS.sub("_", name).strip("_")
    return name.lower() if ascii_ else name.casefold()


UNICODE_CAMEL_MAX = NAME_CACHE_MAX
"""Longer non-ASCII names are split at ASCII case changes only: `re` has no Unicode case
classes, and the letter-by-letter walk is kept to names the cache holds (uncached, a flood
of long names would each cost it again; no mapped name is that long)."""


def _split_camel(name: str) -> str:
    """`_CAMEL_1` then `_CAMEL_2` for any script: "caféVisited" and "userÖffnet" split like
    "cafeVisited" (review "seed34": `[a-z]`/`[A-Z]` saw no boundary at "é" → "V")."""
    out: list[str] = []
    for i, c in enumerate(name):
        if i and c.isupper():
            # A combining accent belongs to the letter before it ("e" + U+0301): the case
            # that counts is that letter's (review "diff34").
            j = i - 1
            while j > 0 and unicodedata.combining(name[j]):
                j -= 1
            k = i + 1
            while k < len(name) and unicodedata.combining(name[k]):
                k += 1
            before = name[j]
            if before.islower() or before.isdecimal() or (
                    before.isupper() and k < len(name) and name[k].islower()):
                out.append(" ")
        out.append(c)
    return "".join(out)


_normalize_cached = functools.lru_cache(maxsize=4096)(_normalize)


# ---------------------------------------------------------------------------- rules


@dataclass(frozen=True, slots=True)
class EventRule:
    """How one Signal event becomes one Userpilot event.

    ``properties`` chooses which derived metadata keys are kept ("all", "none" or a list
    of flattened keys); ``rename`` renames kept keys; ``fields`` adds values picked from
    anywhere in the event by dotted path; ``static`` adds constants. Later steps win on a
    key clash: static > fields > renamed keys > other keys.
    """

    source_name: str
    event_name: str
    properties: PropertySelection = "all"
    rename: tuple[tuple[str, str], ...] = ()
    fields: tuple[tuple[str, str], ...] = ()
    static: tuple[tuple[str, Primitive], ...] = ()
    key: str = field(init=False, compare=False)
    _keep: frozenset[str] | None = field(init=False, repr=False, compare=False)
    _rename: dict[str, str] = field(init=False, repr=False, compare=False)
    _paths: tuple[tuple[str, tuple[str, ...]], ...] = field(
        init=False, repr=False, compare=False
    )
    _plain: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        keep: frozenset[str] | None
        if self.properties == "all":
            keep = None
        elif self.properties == "none":
            keep = frozenset()
        else:
            keep = frozenset(self.properties)
        setattr_ = object.__setattr__
        setattr_(self, "key", normalize_event_name(self.source_name))
        setattr_(self, "_keep", keep)
        setattr_(self, "_rename", dict(self.rename))
        setattr_(self, "_paths", tuple((t, tuple(p.split("."))) for t, p in self.fields))
        setattr_(self, "_plain", keep is None and not (self.rename or self.fields or self.static))

    def describe(self) -> dict[str, Any]:
        """JSON-able view (for ``check-config`` and ``explain``)."""
        props: Any = self.properties if isinstance(self.properties, str) else list(
            self.properties
        )
        return {
            "source": self.source_name,
            "match_key": self.key,
            "event_name": self.event_name,
            "properties": props,
            "rename": dict(self.rename),
            "fields": dict(self.fields),
            "static": dict(self.static),
        }


@dataclass(frozen=True, slots=True)
class TraitsRule:
    """How an ``identify`` or ``group`` event's flattened traits become Userpilot metadata.

    ``pick`` keeps "all" (the default: every trait goes), "none" or a list of flattened
    keys; ``exclude`` removes keys after that; ``rename`` renames kept keys; ``static``
    adds constants. Later steps win on a key clash: static > renamed keys > other keys.
    """

    pick: PropertySelection = "all"
    exclude: tuple[str, ...] = ()
    rename: tuple[tuple[str, str], ...] = ()
    static: tuple[tuple[str, Primitive], ...] = ()

    @property
    def plain(self) -> bool:
        """True when the rule forwards the traits unchanged."""
        return self.pick == "all" and not (self.exclude or self.rename or self.static)

    def apply(self, metadata: Mapping[str, Primitive],
              omitted: list[str] | None = None) -> dict[str, Primitive]:
        """The metadata this rule keeps from flattened ``metadata`` (a new dict); a kept
        trait whose name a rename or a static takes is listed in ``omitted``."""
        if self.plain:
            return dict(metadata)
        keep = None if self.pick == "all" else frozenset(() if self.pick == "none"
                                                          else self.pick)
        drop = frozenset(self.exclude)
        rename = dict(self.rename)
        out: dict[str, Primitive] = {}
        taken = _Taken(out, omitted)
        for key, value in metadata.items():
            if (keep is not None and key not in keep) or key in drop:
                continue
            new_key = rename.get(key)
            if new_key is None:
                taken.own(key, value)
            else:
                taken.put(new_key, value, f"rename of {_shown(key)}", key)
        for key, constant in self.static:
            taken.put(key, constant, "static")
        return out

    def describe(self) -> dict[str, Any]:
        """JSON-able view (for ``check-config``)."""
        return {"pick": self.pick if isinstance(self.pick, str) else list(self.pick),
                "exclude": list(self.exclude), "rename": dict(self.rename),
                "static": dict(self.static)}


@dataclass(frozen=True)
class MappingSet:
    """The event table: which Signal events are delivered, and as what.

    Rules are matched by :func:`normalize_event_name`. The rule whose source is ``page``
    matches page views (``type == "page"``) and nothing else: a *track* event that happens
    to be named "page" is unmapped, so it can never pose as a page view.
    """

    rules: tuple[EventRule, ...]
    preset: str = "custom"
    max_metadata_bytes: int = DEFAULT_MAX_METADATA_BYTES
    max_metadata_keys: int = DEFAULT_MAX_METADATA_KEYS
    identify: TraitsRule = TraitsRule()
    group: TraitsRule = TraitsRule()
    _by_key: dict[str, EventRule] = field(init=False, repr=False, compare=False)
    _page: EventRule | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_key: dict[str, EventRule] = {}
        for rule in self.rules:
            if rule.key in by_key:
                raise ValueError(
                    f"event names {by_key[rule.key].source_name!r} and {rule.source_name!r} "
                    f"both normalise to {rule.key!r}; keep one"
                )
            by_key[rule.key] = rule
        object.__setattr__(self, "_page", by_key.pop(PAGE_SOURCE, None))
        object.__setattr__(self, "_by_key", by_key)

    def lookup(self, event: Mapping[str, Any]) -> EventRule | None:
        """The rule for ``event``, or None (identify/group, unknown type, unmapped name)."""
        kind = event.get("type")
        if kind == "page":
            return self._page
        if kind != "track":
            return None
        name = event.get("event")
        if not isinstance(name, str):
            return None
        # normalize_event_name, inlined: this runs for every identified Track event, most
        # of them dropped (one Python frame less per event on the drop path).
        return self._by_key.get(_normalize_cached(name) if len(name) <= NAME_CACHE_MAX
                                else _normalize(name))

    def names(self) -> tuple[str, ...]:
        """Source names as written, in table order (``page`` means page views)."""
        return tuple(rule.source_name for rule in self.rules)

    def describe(self) -> dict[str, Any]:
        """JSON-able view of the whole table (for ``check-config``)."""
        return {"preset": self.preset, "events": [rule.describe() for rule in self.rules],
                "identify": self.identify.describe(), "group": self.group.describe()}


_DEFAULT_TABLE = (
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
)

DEFAULT_PRESET = MappingSet(
    tuple(EventRule(source, target) for source, target in _DEFAULT_TABLE), preset="default"
)
"""The seed integration page's Default preset: page views plus core engagement events."""

PRESETS: dict[str, MappingSet] = {
    "default": DEFAULT_PRESET,
    "none": MappingSet((), preset="none"),
}


# ---------------------------------------------------------------------------- payload


def _is_primitive(value: Any) -> bool:
    """True for values Userpilot metadata can carry (finite numbers; JSON has no NaN)."""
    if value is None or isinstance(value, str | bool | int):
        return True
    return isinstance(value, float) and math.isfinite(value)


def _joined(items: list[Any]) -> tuple[str | None, bool]:
    """An array of primitives as one comma-joined string (None if it holds anything else),
    and whether NaN or Infinity items were left out of it: skipped as nulls are, the rest
    sent (one such item left the whole array out, review "events31")."""
    parts: list[str] = []
    lost = False
    for item in items:
        if isinstance(item, str):
            parts.append(item)
        elif isinstance(item, bool):
            parts.append("true" if item else "false")
        elif item is None:
            continue
        elif isinstance(item, int):
            parts.append(str(item))
        elif isinstance(item, float):
            if math.isfinite(item):
                parts.append(js_number(item))
            else:
                lost = True
        else:
            return None, lost
    return ",".join(parts), lost


def js_number(value: float) -> str:
    """A number in a joined array as JavaScript writes it (`String(n)`, what Userpilot's
    own SDK sends): `1.0` → "1", `1e20` → "100000000000000000000", `-0.0` → "0",
    `1e-6` → "0.000001", `1.5e-7` → "1.5e-7" (Python wrote "1.0", "1e+20", "-0.0",
    "1e-06": review "events31"). From 1e16 on, where a float's binary value has more
    digits than its shortest spelling, as JavaScript too: `12345678901234567890.0` →
    "12345678901234567000", not its binary "12345678901234567168" (review "seed34")."""
    if value.is_integer() and abs(value) < 1e16:  # below, repr has no exponent: exact
        return str(int(value))
    text = repr(value)  # the shortest round trip, as JavaScript's
    mantissa, _, exponent = text.partition("e")
    if not exponent:
        return text
    power = int(exponent)
    if -7 < power < 21:
        return format(Decimal(text), "f")
    return f"{mantissa}e{'+' if power > 0 else '-'}{abs(power)}"


def _leaf(out: dict[str, Primitive], omitted: list[str], key: str, value: Any) -> None:
    """Add one non-object value under ``key`` (first wins), or note it as left out."""
    if key in out:
        omitted.append(_taken(key))
        return
    if isinstance(value, list):
        joined, lost = _joined(value)
        if joined is None:
            omitted.append(key)
        else:
            out[key] = joined
            if lost:
                omitted.append(f"{key} (its NaN/Infinity items)")
    elif _is_primitive(value):
        out[key] = value
    else:
        omitted.append(key)


def _shown(key: str) -> str:
    """A left-out key as ``omitted`` lists it: a long one cut, with its length."""
    return key if len(key) <= 80 else f"{key[:64]}…({len(key)} characters)"


def _flatten_into(
    out: dict[str, Primitive], prefix: str, obj: Mapping[Any, Any], depth: int,
    omitted: list[str],
) -> None:
    """Add ``obj``'s leaves under ``prefix_key`` keys; what cannot be flat goes to omitted.

    A key already in ``out`` is kept (first wins): callers add the winners first.
    """
    if depth > MAX_DEPTH or len(prefix) > MAX_KEY_CHARS:
        omitted.append(_shown(prefix))
        return
    room = MAX_KEY_CHARS - len(prefix) - 1
    for raw_key, value in obj.items():
        key = raw_key if isinstance(raw_key, str) else str(raw_key)
        if len(key) > room:
            omitted.append(_shown(f"{prefix}_{key}"))
            continue
        key = f"{prefix}_{key}"
        if isinstance(value, dict):
            _flatten_into(out, key, value, depth + 1, omitted)
        else:
            _leaf(out, omitted, key, value)


def _first_primitive(item: Mapping[Any, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        value = item.get(key)
        if value is not None and _is_primitive(value):
            return value
    return _MISSING


def _same_currency(a: object, b: object) -> bool:
    """One currency however it is written: "USD", "usd" and " USD " (Stripe writes its
    codes in lower case). Compared exactly, an item's "usd" beside the event's "USD" lost
    the item's price (review "seed34")."""
    if isinstance(a, str) and isinstance(b, str):
        return a.strip().casefold() == b.strip().casefold()
    return a == b


def _summary(props: Mapping[Any, Any], array_key: str, items: list[Any]) -> dict[str, Primitive]:
    """Scalar summary of a products/items array: its first item plus a count."""
    summary: dict[str, Primitive] = {}
    first = items[0] if items else None
    if isinstance(first, dict):
        pid = _first_primitive(first, _ID_KEYS)
        if pid is not _MISSING:
            summary["product_id"] = pid
        pname = _first_primitive(first, _NAME_KEYS)
        if pname is not _MISSING:
            summary["product_name"] = pname
        for key in ("price", "quantity"):
            value = first.get(key)
            if value is not None and _is_primitive(value):
                summary[key] = value
        currency = _first_primitive(first, ("currency",))
        if currency is _MISSING:
            currency = _first_primitive(props, ("currency",))
        if currency is not _MISSING:
            summary["currency"] = currency
    summary[f"{array_key}_count"] = len(items)
    return summary


def flatten_properties(
    props: Mapping[str, Any], omitted: list[str] | None = None
) -> dict[str, Primitive]:
    """Free-form properties or traits → primitive metadata, by Track's flattening rules.

    Public so identify and group traits are flattened exactly like Track properties;
    `omitted` collects the fields left out (arrays of objects, too deep, NaN).
    """
    return _derived_metadata({"properties": dict(props)}, False,
                             omitted if omitted is not None else [])


def _derived_metadata(
    event: Mapping[str, Any], is_page: bool, omitted: list[str]
) -> dict[str, Primitive]:
    """All metadata an event yields before rule options: flattened properties etc.

    Precedence on a key clash: a primitive given directly at the top level of
    ``properties`` wins; then the first derived value in property order.
    """
    props = event.get("properties")
    if not isinstance(props, dict):
        props = {}
    out: dict[str, Primitive] = {}

    if is_page:
        if isinstance(event, codec.Event):
            page = event.page  # parses no other context text
        else:
            context = event.get("context")
            page = context.get("page") if isinstance(context, dict) else None
        if not isinstance(page, dict):
            page = {}
        for key in _PAGE_FIELDS:
            value = props.get(key)
            if value is None or not _is_primitive(value):
                value = page.get(key)
            if value is not None and _is_primitive(value):
                out[key] = value
        name = props.get("name")
        if name is None or not _is_primitive(name):
            name = event.get("name")
        if name is not None and _is_primitive(name):
            out["name"] = name
    preset_keys = frozenset(out) if is_page else frozenset()

    # The first non-empty list is summarised (an empty `products` beside a filled `items`
    # hid the item, review "events28"); with all of them empty, the first.
    summary_key: str | None = None
    for candidate in _SUMMARY_ARRAYS:
        listed = props.get(candidate)
        if isinstance(listed, list):
            if summary_key is None:
                summary_key = candidate
            if listed:
                summary_key = candidate
                break

    shadowed: list[tuple[str, Primitive]] = []  # summary values whose name was taken
    for raw_key, value in props.items():
        key = raw_key if isinstance(raw_key, str) else str(raw_key)
        if isinstance(value, dict):
            _flatten_nested(out, key, value, props, omitted)
        elif isinstance(value, list):
            if key == summary_key:
                summary = _summary(props, key, value)
                # The first item's fields describe one product together: when the top level
                # (or a flattened object) names a product itself, none of them is sent, or
                # the top-level product_id went out with another product's name and price
                # (review "events28").
                other = any(_owned(out, props, s_key) or _nested(props, s_key)
                            for s_key in _ITEM_FIELDS)
                # The event's own currency wins the `currency` key; an item priced in
                # another one would go out labelled with it (review "events31").
                top_currency = props.get("currency", _MISSING)
                mislabeled = (top_currency is not None and _is_primitive(top_currency)
                              and "currency" in summary
                              and not _same_currency(summary["currency"], top_currency))
                for s_key, s_value in summary.items():
                    if _owned(out, props, s_key):
                        shadowed.append((s_key, s_value))
                    elif other and (s_key in _ITEM_FIELDS or s_key == "currency"):
                        # The currency too: the first item's is that other product's
                        # (review "events29"); a top-level one is the event's own.
                        omitted.append(f"{s_key} of {_shown(key)}[0] (the top level "
                                       "names another product)")
                    elif mislabeled and s_key == "price":
                        omitted.append(f"price of {_shown(key)}[0] (in another currency "
                                       "than the event's)")
                    else:
                        out[s_key] = s_value
                if value and not isinstance(value[0], dict):
                    omitted.append(key)  # not line items: only their count is sent
            elif key in _SUMMARY_ARRAYS:
                top = props.get(f"{key}_count", _MISSING)
                if top is _MISSING or not _is_primitive(top):
                    out.setdefault(f"{key}_count", len(value))
                if value:
                    omitted.append(key)  # the other list is summarised: only its count
            elif key not in preset_keys:
                _leaf(out, omitted, key, value)
            else:
                omitted.append(_taken(key))  # a page field: `context.page`'s value is sent
        elif key not in preset_keys:
            if _is_primitive(value):
                out[key] = value
            else:
                omitted.append(key)
        elif not _is_primitive(value):
            omitted.append(_taken(key))  # a page field: `context.page`'s value is sent
    # A top-level primitive or an earlier flattened key owns a summary value's name: left
    # out, and said so when what is sent differs (review mapping25).
    omitted.extend(_taken(key) for key, value in shadowed
                   if out.get(key, _MISSING) != value)
    return out


def _owned(out: Mapping[str, Primitive], props: Mapping[Any, Any], key: str) -> bool:
    """Whether `key` is taken: already in `out`, or a top-level primitive owns it."""
    if key in out:
        return True
    top = props.get(key, _MISSING)
    return top is not _MISSING and _is_primitive(top)


def _nested(obj: Mapping[Any, Any], key: str) -> bool:
    """Whether flattening `obj` yields a primitive at `key` through a nested object
    (`{"product": {"id": 1}}` yields `product_id`), wherever it comes in `obj`: a summary
    must not take an item's name beside another product's id flattened after it."""
    start = key.find("_")
    while start > 0:
        value = obj.get(key[:start])
        if isinstance(value, dict):
            rest = key[start + 1:]
            if _is_primitive(value.get(rest, _MISSING)) or _nested(value, rest):
                return True
        start = key.find("_", start + 1)
    return False


def _flatten_nested(
    out: dict[str, Primitive], prefix: str, obj: Mapping[Any, Any], props: Mapping[Any, Any],
    omitted: list[str],
) -> None:
    """Flatten a top-level object, yielding each key that a top-level primitive owns."""
    flat: dict[str, Primitive] = {}
    _flatten_into(flat, prefix, obj, 1, omitted)
    for key, value in flat.items():
        if _owned(out, props, key):
            omitted.append(_taken(key))
        else:
            out[key] = value


def _taken(key: str) -> str:
    """How a value whose flattened name another value took is listed as left out: without
    it, `{"a": {"b": 1}, "a_b": [1, 2]}` lost the list and `explain` showed no loss
    (review "mapping22")."""
    return f"{_shown(key)} (name taken)"


def _pick(event: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    """Walk a dotted path through objects (and list indexes); _MISSING when absent.

    A decoded event's ``context.<key>`` is read alone (`codec.Event.context_key`): its
    other keys, unread, stop nothing (README, "Payload limits")."""
    node: Any = event
    if len(path) > 1 and path[0] == "context" and isinstance(event, codec.Event):
        node = event.context_key(path[1], _MISSING)
        if node is _MISSING:
            return _MISSING
        path = path[2:]
    for segment in path:
        if isinstance(node, Mapping):
            node = node.get(segment, _MISSING)
        elif (isinstance(node, list) and segment.isascii() and segment.isdigit()
              and len(segment) <= 18):  # longer is past any list: int() of 4,301 digits
            # raised, and every mapped event was dead-lettered (review "mappings48")
            index = int(segment)
            node = node[index] if index < len(node) else _MISSING
        else:
            return _MISSING
        if node is _MISSING:
            return _MISSING
    return node


def _apply_rule(
    derived: dict[str, Primitive], event: Mapping[str, Any], rule: EventRule,
    omitted: list[str],
) -> dict[str, Primitive]:
    keep = rule._keep
    rename = rule._rename
    out: dict[str, Primitive] = {}
    taken = _Taken(out, omitted)
    for key, value in derived.items():
        if keep is not None and key not in keep:
            continue
        new_key = rename.get(key)
        if new_key is None:
            taken.own(key, value)
        else:
            taken.put(new_key, value, f"rename of {_shown(key)}", key)
    for target, path in rule._paths:
        picked = _pick(event, path)
        flat: dict[str, Primitive] = {}
        if isinstance(picked, Mapping):
            _flatten_into(flat, target, picked, 1, omitted)
        elif picked is not _MISSING:
            _leaf(flat, omitted, target, picked)
        for key, value in flat.items():
            taken.put(key, value, f"field {_shown(target)}", key)
    for key, static_value in rule.static:
        taken.put(key, static_value, "static")
    return out


def _same(held: Primitive, value: Primitive) -> bool:
    """The very value, so replacing it loses nothing (`True` is not `1`, nor `1.0`)."""
    return type(held) is type(value) and held == value


class _Taken:
    """Writes a rule's keys into `out`, naming in `omitted` each value of the event's own
    that a rule step (a rename, a `fields` pick, a static) replaces: the documented
    precedence (static > fields > renamed > other keys), but without it `explain` showed a
    mapping that threw a user's `plan_tier` away as losing nothing (review "mapfid45")."""

    __slots__ = ("_from", "_omitted", "_out")

    def __init__(self, out: dict[str, Primitive], omitted: list[str] | None) -> None:
        self._out = out
        self._omitted = omitted
        # key in `out` -> the event's key its value came from, and the step that put it
        self._from: dict[str, tuple[str, str]] = {}

    def own(self, key: str, value: Primitive) -> None:
        """An event's key kept under its name; a rename that took the name first wins."""
        if key in self._out:
            if not _same(self._out[key], value):
                self._lost(key, key, self._from[key][1] if key in self._from else "rename")
        else:
            self._out[key] = value
            self._from[key] = (key, "")

    def put(self, key: str, value: Primitive, how: str, source: str | None = None) -> None:
        """A rule step's value, winning over what `key` held (`source`: the event's key it
        comes from, None for a value the rule itself brings). The very value `key` held
        (a pick of what was derived already) loses nothing."""
        if key in self._from and not _same(self._out[key], value):
            self._lost(self._from[key][0], key, how)
        self._out[key] = value
        if source is None:
            self._from.pop(key, None)
        else:
            self._from[key] = (source, how)

    def _lost(self, lost: str, key: str, how: str) -> None:
        if self._omitted is not None:
            where = "" if lost == key else f" as {_shown(key)}"
            self._omitted.append(f"{_shown(lost)}{where} (replaced by the rule's {how})")


@dataclass(frozen=True, slots=True)
class Payload:
    """A Track body and what had to be left out of it to keep it flat and small.

    ``omitted``: metadata keys left out because they cannot be flat (arrays of objects,
    objects nested too deep, NaN/Infinity). ``truncated``: keys cut for size or count.
    """

    body: dict[str, Any]
    omitted: tuple[str, ...] = ()
    truncated: tuple[str, ...] = ()


_quoted = json.encoder.encode_basestring  # what json.dumps(ensure_ascii=False) does to a str
_ENCODER = json.JSONEncoder(ensure_ascii=False)  # json.dumps builds one per call otherwise


def _size(key: str, value: Primitive) -> int:
    """The bytes one field adds to the compact JSON object as sent (``calls.encode_body``):
    its key, the colon, its value and one separator (a comma, or the closing brace). The
    object's size is then 1 (its ``{``) plus its fields' sizes, exactly."""
    text = _quoted(value) if isinstance(value, str) else _ENCODER.encode(value)
    return len(_quoted(key).encode("utf-8")) + len(text.encode("utf-8")) + 2


field_size = _size
"""The bytes one field adds to a compact JSON object as sent (see ``_size``)."""


def metadata_size(metadata: Mapping[str, Primitive]) -> int:
    """The exact bytes of ``metadata`` as compact JSON, as ``calls.encode_body`` sends it."""
    return 1 + sum(_size(k, v) for k, v in metadata.items()) if metadata else 2


def _size_bound(metadata: Mapping[str, Primitive]) -> int:
    """An upper bound of the JSON size (6 bytes per character at worst): no JSON needed."""
    return sum(
        6 * (len(k) + (len(v) if isinstance(v, str) else len(repr(v)))) + 32
        for k, v in metadata.items()
    )


def _truncate(
    metadata: dict[str, Primitive], max_bytes: int, max_keys: int
) -> tuple[dict[str, Primitive], tuple[str, ...]]:
    """Drop the largest fields until metadata fits both limits; mark it with _truncated."""
    sizes = {key: _size(key, value) for key, value in metadata.items()}
    total = 1 + sum(sizes.values())
    removed: list[str] = []
    # The marker's size without a JSON encoding per step (its value is an int: its digits).
    # With one, a 300,000-key object took seconds of the event loop (review "poison24").
    marker_key = _size(TRUNCATED_KEY, 0) - 1
    for key in sorted(sizes, key=lambda k: (-sizes[k], k)):
        marker = marker_key + len(str(len(removed)))  # its value: the count cut so far
        if total + marker <= max_bytes and len(metadata) - len(removed) + 1 <= max_keys:
            break
        removed.append(key)
        total -= sizes[key]
    gone = frozenset(removed)
    kept: dict[str, Primitive] = {k: v for k, v in metadata.items() if k not in gone}
    kept[TRUNCATED_KEY] = len(removed)
    return kept, tuple(removed)


def _marker_freed(metadata: dict[str, Primitive]) -> dict[str, Primitive]:
    """`metadata` with its own `_truncated` field under OWN_TRUNCATED_KEY (one more `_`
    while the event has a field of that name too), so TRUNCATED_KEY only ever means the
    worker's marker and no field of the event is lost."""
    free = OWN_TRUNCATED_KEY
    while free in metadata:
        free += "_"
    return {free if key == TRUNCATED_KEY else key: value for key, value in metadata.items()}


def limit_metadata(
    metadata: dict[str, Primitive], max_bytes: int, max_keys: int
) -> tuple[dict[str, Primitive], tuple[str, ...]]:
    """``metadata`` cut to the size/key limits (largest fields first), and the cut keys.

    The one size rule for Track metadata and identify/company traits alike.
    """
    if TRUNCATED_KEY in metadata:
        metadata = _marker_freed(metadata)
    if len(metadata) > max_keys or (
        _size_bound(metadata) > max_bytes
        and 1 + sum(_size(k, v) for k, v in metadata.items()) > max_bytes
    ):
        return _truncate(metadata, max_bytes, max_keys)
    return metadata, ()


def build_payload(
    event: Mapping[str, Any], rule: EventRule,
    max_bytes: int = DEFAULT_MAX_METADATA_BYTES, max_keys: int = DEFAULT_MAX_METADATA_KEYS,
) -> Payload:
    """The Userpilot Track body for ``event`` under ``rule``, with what was left out.

    Callers filter first (see ``consumer.filtering``); an event without a string userId
    gets ``user_id: ""``, which Userpilot refuses, rather than an exception here.
    Every metadata value is a primitive (module docstring: flattening, arrays, limits).
    """
    omitted: list[str] = []
    user_id = event.get("userId")
    derived = _derived_metadata(event, event.get("type") == "page", omitted)
    metadata = derived if rule._plain else _apply_rule(derived, event, rule, omitted)
    metadata, truncated = limit_metadata(metadata, max_bytes, max_keys)
    body = {
        "user_id": user_id if isinstance(user_id, str) else "",
        "event_name": rule.event_name,
        "metadata": metadata,
    }
    return Payload(body, tuple(omitted), truncated)


def build_track_payload(event: Mapping[str, Any], rule: EventRule) -> dict[str, Any]:
    """The Track body alone (see :func:`build_payload`), with the default limits."""
    return build_payload(event, rule).body


# ---------------------------------------------------------------------------- loading

_EVENT_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.\-: ]{0,99}")
_TOP_KEYS = ("description", "events", "group", "identify", "preset")
_TRAITS_KEYS = ("exclude", "pick", "rename", "static")
_EVENT_KEYS = ("event_name", "fields", "properties", "rename", "static")
_MAX_KEY_LEN = 200


def _q(value: Any) -> str:
    """JSON-quote a value for messages, so users see what to write."""
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, float) and math.isnan(value):
        return "NaN (not JSON: Userpilot cannot take it)"
    if isinstance(value, float) and not math.isfinite(value):
        # "got a number" contradicted; Python's json reads Infinity too (not JSON either)
        return "a number too large for JSON (such as 1e999 or Infinity)"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _unknown_key(where: str, key: str, allowed: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f" (did you mean {_q(close[0])}?)" if close else ""
    return f"{where}: unknown key {_q(key)}{hint}; allowed keys: {', '.join(allowed)}"


def _suggest_event_name(value: str) -> str:
    cleaned = re.sub(r"[^a-z0-9_]", "", normalize_event_name(value))
    cleaned = cleaned.lstrip("0123456789_")
    return cleaned or "my_event"


class _Loader:
    """Validates one mappings document, collecting every problem before raising."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[str] = []

    def fail(self, where: str, message: str) -> None:
        self.problems.append(f"{self.source}: {where}: {message}")

    def metadata_key(self, where: str, key: Any) -> bool:
        if not isinstance(key, str) or not key.strip():
            self.fail(where, f"a metadata key must be a non-empty string, got {_q(key)}")
            return False
        if key != key.strip() or len(key) > _MAX_KEY_LEN:
            self.fail(
                where,
                f"metadata key {_q(key)} must have no leading/trailing spaces and at most "
                f"{_MAX_KEY_LEN} characters",
            )
            return False
        return True

    def target_key(self, where: str, key: Any) -> bool:
        """A metadata key the mapping writes: also not the worker's cut marker, which a
        field of that name gives way to (renamed `_truncated_`, unannounced)."""
        if not self.metadata_key(where, key):
            return False
        if key == TRUNCATED_KEY:
            self.fail(where, f"metadata key {_q(key)} is reserved: the worker marks cut "
                             f"metadata with it; pick another name, e.g. \"truncated\"")
            return False
        return True

    def load(self, doc: Any) -> MappingSet:
        if not isinstance(doc, dict):
            self.problems.append(
                f"{self.source}: the mappings must be a JSON object like "
                f'{{"preset": "default", "events": {{}}}}, got {_kind(doc)}'
            )
            raise MappingsError(self.problems)
        for where in _lone_surrogates(doc, ""):
            # Valid JSON (`"\\ud800"`), but no UTF-8 text holds it: every event the rule
            # shaped was dead-lettered as a mapping error while check-config said OK
            # (review "config40").
            self.fail(where or "a key", "holds a lone UTF-16 surrogate (a \\ud800-\\udfff "
                      "escape without its pair), which no UTF-8 text can carry; write the "
                      "character itself, or both halves of its surrogate pair")
        for key in doc:
            if key not in _TOP_KEYS:
                self.problems.append(_unknown_key(self.source, str(key), _TOP_KEYS))
        description = doc.get("description")
        if description is not None and not isinstance(description, str):
            self.fail("description", f"must be a string, got {_kind(description)}")

        preset_name = doc.get("preset", "default")
        preset = (
            PRESETS.get(preset_name.strip().lower()) if isinstance(preset_name, str) else None
        )
        if preset is None:
            close = difflib.get_close_matches(str(preset_name).strip().lower(), PRESETS, n=1)
            hint = f" (did you mean {_q(close[0])}?)" if close else ""
            self.fail(
                "preset",
                f"must be {' or '.join(_q(p) for p in PRESETS)}, got {_q(preset_name)}{hint}",
            )
            # Check the events against the largest table, so an entry that is right for
            # the intended preset adds no follow-on error (one message, not a cascade).
            preset = DEFAULT_PRESET

        events = doc.get("events", {})
        if not isinstance(events, dict):
            self.fail(
                "events",
                f'must be an object mapping Signal event names to rules, like '
                f'{{"Order Completed": {{"event_name": "order_completed"}}}}, '
                f"got {_kind(events)}",
            )
            events = {}

        rules = {rule.key: rule for rule in preset.rules}
        seen: dict[str, str] = {}
        for source, entry in events.items():
            where = f"events.{_q(source)}"
            if not isinstance(source, str) or not normalize_event_name(source):
                self.fail("events", f"an event name must be a non-empty string, got {_q(source)}")
                continue
            key = normalize_event_name(source)
            if key in seen:
                self.fail(
                    "events",
                    f"{_q(seen[key])} and {_q(source)} are the same event (both normalise to "
                    f"{_q(key)}); keep one of them",
                )
                continue
            seen[key] = source
            base = rules.get(key)
            if entry is False:
                if base is None:
                    known = ", ".join(_q(r.source_name) for r in preset.rules) or "none"
                    self.fail(
                        where,
                        f"false disables a preset event, but {_q(source)} is not in preset "
                        f"{_q(preset.preset)} (its events: {known}); fix the name or remove "
                        f"the entry",
                    )
                else:
                    del rules[key]
                continue
            rule = self.rule(where, source, entry, base)
            if rule is not None:
                rules[key] = rule

        identify = self.traits("identify", doc.get("identify", {}))
        group = self.traits("group", doc.get("group", {}))
        if self.problems:
            raise MappingsError(self.problems)
        return MappingSet(tuple(rules.values()), preset=preset.preset, identify=identify,
                          group=group)

    def traits(self, where: str, entry: Any) -> TraitsRule:
        """The ``identify`` / ``group`` section: how traits become metadata."""
        if not isinstance(entry, dict):
            self.fail(
                where,
                f'must be an object like {{"pick": "all", "exclude": ["password"], '
                f'"rename": {{"plan": "plan_tier"}}, "static": {{"source": "signal"}}}}, '
                f"got {_kind(entry)}",
            )
            return TraitsRule()
        for key in entry:
            if key not in _TRAITS_KEYS:
                self.problems.append(
                    _unknown_key(f"{self.source}: {where}", str(key), _TRAITS_KEYS))
        pick = self.properties(f"{where}.pick", entry.get("pick", "all"))
        exclude_value = entry.get("exclude", [])
        exclude: list[str] = []
        if isinstance(exclude_value, list):
            for i, item in enumerate(exclude_value):
                if self.metadata_key(f"{where}.exclude[{i}]", item) and item not in exclude:
                    exclude.append(item)
        else:
            self.fail(f"{where}.exclude",
                      f'must be a list of flattened trait keys like ["password", '
                      f'"address_street"], got {_kind(exclude_value)}')
        rename = self.rename(f"{where}.rename", entry.get("rename", {}))
        static = self.static(f"{where}.static", entry.get("static", {}))
        if where == "group":
            # A company's id is its groupId: a property of either name is left out of the
            # company identify (`calls.company_identify_payload`). Written here, it loaded
            # and vanished, with it the trait renamed to it (review "users36").
            written = {new for _, new in rename} | {key for key, _ in static}
            for key in COMPANY_ID_KEYS:
                if key in written:
                    self.fail(f"{where}.{'rename' if key in dict(rename).values() else 'static'}",
                              f"{_q(key)} cannot be a company property: the company's id is "
                              f"the event's groupId, and {' and '.join(map(_q, COMPANY_ID_KEYS))}"
                              f' are never sent beside it; pick another key, e.g. '
                              f'"external_id"')
        # The section applies after createdAt became created_at: a rule naming createdAt
        # would load and do nothing (an exclude meant for privacy would send it anyway).
        named = [*(pick if isinstance(pick, tuple) else ()), *exclude, *(k for k, _ in rename)]
        if "createdAt" in named:
            self.fail(where, '"createdAt" is sent as "created_at" (Userpilot\'s reserved key) '
                             'before this section applies, so a pick, exclude or rename of '
                             '"createdAt" would do nothing; write "created_at"')
        # ... and a rule writing it would send "createdAt" raw, beside (and contradicting)
        # the created_at Userpilot reads (review "mapping41").
        if any(new == "createdAt" for _, new in rename):
            self.fail(f"{where}.rename", '"createdAt" as a new name would be sent as is, '
                      'not as Userpilot\'s reserved "created_at"; write "created_at"')
        if any(key == "createdAt" for key, _ in static):
            self.fail(f"{where}.static", '"createdAt" would be sent as is, not as '
                      'Userpilot\'s reserved "created_at"; write "created_at"')
        return TraitsRule(pick, tuple(exclude), rename, static)

    def rule(
        self, where: str, source: str, entry: Any, base: EventRule | None
    ) -> EventRule | None:
        if isinstance(entry, str):
            entry = {"event_name": entry}
        if not isinstance(entry, dict):
            self.fail(
                where,
                f"must be an object like {{\"event_name\": {_q(_suggest_event_name(source))}}}, "
                f"a string (the Userpilot event name) or false (to disable a preset event), "
                f"got {_q(entry) if isinstance(entry, bool) else _kind(entry)}",
            )
            return None
        before = len(self.problems)
        for key in entry:
            if key not in _EVENT_KEYS:
                self.problems.append(_unknown_key(f"{self.source}: {where}", str(key), _EVENT_KEYS))

        event_name = entry.get("event_name", _MISSING)
        if event_name is _MISSING:
            if base is None:
                self.fail(
                    where,
                    f'"event_name" is required for an event that is not in the preset; write '
                    f'e.g. "event_name": {_q(_suggest_event_name(source))}',
                )
            else:
                event_name = base.event_name
        elif not isinstance(event_name, str) or not _EVENT_NAME_RE.fullmatch(event_name) or (
            event_name.endswith(" ")
        ):
            self.fail(
                f"{where}.event_name",
                f"{_q(event_name)} is not a valid Userpilot event name: use 1-100 letters, "
                f'digits, "_", "-", ".", ":" or spaces, starting with a letter and not ending '
                f"with a space; e.g. {_q(_suggest_event_name(str(event_name)))}",
            )

        properties = self.properties(f"{where}.properties", entry.get("properties", "all"))
        rename = self.rename(f"{where}.rename", entry.get("rename", {}))
        fields = self.fields(f"{where}.fields", entry.get("fields", {}))
        static = self.static(f"{where}.static", entry.get("static", {}))
        for target in sorted({t for t, _ in fields} & {k for k, _ in static}):
            self.fail(
                where,
                f"metadata key {_q(target)} is set by both \"fields\" and \"static\"; keep one",
            )
        if len(self.problems) != before or not isinstance(event_name, str):
            return None
        return EventRule(source, event_name, properties, rename, fields, static)

    def properties(self, where: str, value: Any) -> PropertySelection:
        if value in ("all", "none"):
            return "all" if value == "all" else "none"
        if isinstance(value, list):
            keys: list[str] = []
            for i, item in enumerate(value):
                if self.metadata_key(f"{where}[{i}]", item) and item not in keys:
                    keys.append(item)
            return tuple(keys)
        self.fail(
            where,
            f'must be "all", "none" or a list of flattened metadata keys like '
            f'["feature", "plan_tier"], got {_q(value)}',
        )
        return "all"

    def rename(self, where: str, value: Any) -> tuple[tuple[str, str], ...]:
        if not isinstance(value, dict):
            self.fail(
                where,
                f'must be an object of old key -> new key, like {{"feature": "feature_key"}}, '
                f"got {_kind(value)}",
            )
            return ()
        pairs: list[tuple[str, str]] = []
        targets: dict[str, str] = {}
        for old, new in value.items():
            if not self.metadata_key(f"{where}.{_q(old)}", old):
                continue
            if not isinstance(new, str):
                self.fail(
                    f"{where}.{_q(old)}",
                    f"the new key must be a string, got {_kind(new)}; write e.g. "
                    f"{_q(old)}: {_q(old + '_renamed')}",
                )
                continue
            if not self.target_key(f"{where}.{_q(old)}", new):
                continue
            if new in targets:
                self.fail(
                    where,
                    f"{_q(targets[new])} and {_q(old)} are both renamed to {_q(new)}; "
                    f"give each a different new key",
                )
                continue
            targets[new] = old
            pairs.append((old, new))
        return tuple(pairs)

    def _targets(self, where: str, value: Any, what: str) -> Iterator[tuple[str, str, Any]]:
        """`(where, key, value)` of each entry of an object of metadata keys (`fields`,
        `static`) whose key `target_key` accepts; `what` its values, for the message when
        `value` is not an object."""
        if not isinstance(value, dict):
            self.fail(where, f"must be an object of metadata key -> {what}, got {_kind(value)}")
            return
        for key, item in value.items():
            at = f"{where}.{_q(key)}"
            if self.target_key(at, key):
                yield at, key, item

    def fields(self, where: str, value: Any) -> tuple[tuple[str, str], ...]:
        pairs: list[tuple[str, str]] = []
        for at, target, path in self._targets(
                where, value, 'dotted event path, like {"utm_source": "context.campaign.source"}'):
            if not isinstance(path, str) or not path:
                self.fail(
                    at,
                    f'must be a dotted path string like "context.campaign.source", '
                    f"got {_q(path)}",
                )
                continue
            segments = path.split(".")
            if any(not s or s != s.strip() for s in segments):
                self.fail(
                    at,
                    f"path {_q(path)} has an empty or space-padded segment; write segments "
                    f'separated by single dots, like "properties.plan.tier"',
                )
                continue
            if segments[0] not in EVENT_ROOT_KEYS:
                close = difflib.get_close_matches(segments[0], EVENT_ROOT_KEYS, n=1)
                hint = f" (did you mean {_q(close[0])}?)" if close else ""
                self.fail(
                    at,
                    f"path {_q(path)} must start with an event key{hint}: "
                    f"{', '.join(EVENT_ROOT_KEYS)}; e.g. \"properties.{path}\"",
                )
                continue
            pairs.append((target, path))
        return tuple(pairs)

    def static(self, where: str, value: Any) -> tuple[tuple[str, Primitive], ...]:
        pairs: list[tuple[str, Primitive]] = []
        for at, key, constant in self._targets(where, value,
                                               'constant, like {"source": "signal"}'):
            if not _is_primitive(constant):
                self.fail(
                    at,
                    f"must be a string, number, boolean or null (Userpilot metadata is flat), "
                    f"got {_kind(constant)}; write e.g. {_q(key)}: \"value\"",
                )
                continue
            pairs.append((key, constant))
        return tuple(pairs)


def _lone_surrogates(node: Any, path: str) -> list[str]:
    """Where the document holds a string (key or value) with a lone surrogate."""
    found: list[str] = []
    if isinstance(node, str):
        if codec.has_surrogates(node):
            found.append(path)
    elif isinstance(node, dict):
        for key, value in node.items():
            # Each key below the top quoted as JSON (`events."Feature Used"."static"."a"`),
            # so a surrogate shows as its escape.
            inner = f"{path}.{json.dumps(str(key))}" if path else json.dumps(str(key))[1:-1]
            if isinstance(key, str) and codec.has_surrogates(key):
                found.append(inner)
            found += _lone_surrogates(value, inner)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _lone_surrogates(value, f"{path}[{index}]")
    return found


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {_q(key)} in one JSON object; keep one")
        result[key] = value
    return result


MAX_MAPPINGS_FILE_BYTES = 16 * 1024 * 1024
"""The mappings file is read at most this far (`/dev/zero` or a wrong path: no endless read)."""


def load_mappings(source: str | os.PathLike[str] | Mapping[str, Any]) -> MappingSet:
    """Build a :class:`MappingSet` from a mappings file path or an already-parsed dict.

    Raises :class:`MappingsError` listing every problem, each naming the file, the event
    and the field, what is wrong and what to write instead.
    """
    if isinstance(source, Mapping):
        return _Loader("mappings").load(dict(source))
    path = Path(source)
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_MAPPINGS_FILE_BYTES + 1)
        if len(raw) > MAX_MAPPINGS_FILE_BYTES:
            raise MappingsError([f"{path}: the mappings file holds over "
                                 f"{MAX_MAPPINGS_FILE_BYTES // (1024 * 1024)} MB; check the "
                                 "path (a mappings file is a few KB)"])
        # A byte order mark (editors on Windows write one) is read past, as a JSON reader
        # may (RFC 8259): refused, the message told the operator to change how the worker
        # decodes the file (review "mappings48").
        text = raw.decode("utf-8-sig")
    except OSError as exc:
        raise MappingsError(
            [f"{path}: cannot read the mappings file ({exc.strerror or exc}); check the path"]
        ) from exc
    except UnicodeDecodeError as exc:
        raise MappingsError([f"{path}: the mappings file is not UTF-8 text ({exc})"]) from exc
    try:
        doc = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as exc:
        raise MappingsError(
            [f"{path}: not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"]
        ) from exc
    except ValueError as exc:
        raise MappingsError([f"{path}: {exc}"]) from exc
    except RecursionError:
        # A traceback from check-config, run and explain (review config25).
        raise MappingsError([f"{path}: nested too deeply to be a mappings file (a rule is "
                             "a few levels deep); check the file"]) from None
    return _Loader(str(path)).load(doc)
