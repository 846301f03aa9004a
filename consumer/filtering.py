"""Pure decision: is a decoded Signal event delivered to Userpilot, and if not, why.

Userpilot needs a known user, has no server-side consent parameter and only takes the
mapped events, so the worker drops (and finishes at once) events that are anonymous,
lack consent, or are not in the mapping. The :class:`Drop` reasons and categories form
a small fixed set because metrics are labelled by them.

Consent rules (Signal puts consent in ``context.consent`` in two shapes):

* ``{"canonical": {"analytics": true, ...}, "categories": [...]}``: when ``canonical`` is
  an object it is authoritative and any flat keys beside it are ignored;
* otherwise flat values ``{"analytics": true, "marketing": false}``.

A category is granted only by ``true`` or one of the strings in :data:`GRANTED_STRINGS`
(case-insensitive); ``false``, numbers, other strings, null and absence are not granted.
``essential`` is always granted. An event with no consent data (no context, no consent,
``{}``, or one whose values are all null) follows the policy's ``missing`` setting; a
consent that is present but not an object grants nothing. With no gating categories
configured nothing is dropped for consent.

Decisions are ordered by cost (decide before you parse): anonymous, unsupported type and
unmapped name need only the envelope strings; consent parses ``context.consent`` alone
(:attr:`consumer.codec.Event.consent`), once per distinct text; nothing here reads
``properties`` or ``traits``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

from consumer.calls import lacks_required_id
from consumer.codec import Event
from consumer.mapping import MappingSet

__all__ = [
    "ALWAYS_GRANTED",
    "CATEGORIES",
    "CONSENT_CACHE_SIZE",
    "DROP_TOMBSTONE",
    "GRANTED_STRINGS",
    "ConsentPolicy",
    "Drop",
    "DropReason",
    "consent_of",
    "drop_reason",
    "envelope_drop",
]

DropReason: TypeAlias = Literal["anonymous", "consent", "unmapped", "unsupported_type",
                                 "tombstone"]

ALWAYS_GRANTED = "essential"
CATEGORIES = ("analytics", "marketing", "functional", "advertising", "personalization",
              "essential")
"""Signal's consent categories: a closed set, so a typo cannot silently drop every event."""
GRANTED_STRINGS = frozenset({"true", "granted", "yes", "allow", "allowed"})
_DELIVERED_TYPES = ("track", "page", "identify", "group")
_MAPPED_TYPES = ("track", "page")


@dataclass(frozen=True, slots=True)
class Drop:
    """Why an event is not delivered. ``category`` is set for consent drops only.

    ``category`` is always one of the policy's configured categories, so metric labels
    built from ``(reason, category)`` stay bounded whatever the events contain.
    """

    reason: DropReason
    category: str | None = None


CONSENT_CACHE_SIZE = 1024
"""Distinct ``context.consent`` texts whose decision is remembered (cleared when full)."""
CONSENT_CACHE_TEXT_MAX = 1024
"""Longer consent texts are decided each time, never kept: 1,024 texts of ~1 MB each (a
consent object padded up to Kafka's message size) would hold a gigabyte."""

DROP_ANONYMOUS = Drop("anonymous")
DROP_UNMAPPED = Drop("unmapped")
DROP_UNSUPPORTED_TYPE = Drop("unsupported_type")
DROP_TOMBSTONE = Drop("tombstone")
"""A record with no value: a compacted topic's deletion marker (a GDPR erasure by key, say),
not an event. Dead-lettered, a run of 50 tripped the DLQ guard and the worker stopped on it
at every restart (review "kafka21")."""
_CONSENT_DROPS: dict[str, Drop] = {}  # one per configured category: a bounded set


def _consent_drop(category: str) -> Drop:
    """The consent Drop of `category`, made once: building a frozen dataclass per dropped
    event costs more than the rest of the consent decision."""
    drop = _CONSENT_DROPS.get(category)
    if drop is None:
        drop = _CONSENT_DROPS[category] = Drop("consent", category)
    return drop


_ABSENT: Any = object()
NESTED_META = frozenset({"categories", "version", "updatedat", "updated_at"})
"""The nested consent form's keys beside `canonical` (the platform's raw codes, the record's
version and time): they say nothing of a Signal category, in either shape."""


def _flat_keys(consent: Mapping[Any, Any]) -> dict[Any, Any]:
    """A consent object's keys but the nested form's own (NESTED_META, and a `canonical`
    without a value: null, or an object of nulls): what decides when no `canonical` has a
    value. A key naming no Signal category, or a `canonical` that is not an object, is
    consent data that grants nothing."""
    return {k: v for k, v in consent.items()
            if not (isinstance(k, str) and (
                (name := k.strip().lower()) in NESTED_META
                or (name == "canonical" and _valueless(v))))}


def _valueless(value: Any) -> bool:
    return value is None or (isinstance(value, dict)
                             and all(v is None for v in value.values()))


def _granted(value: Any) -> bool:
    if value is True:
        return True
    return isinstance(value, str) and value.strip().lower() in GRANTED_STRINGS


@dataclass(frozen=True, slots=True)
class ConsentPolicy:
    """Which consent categories gate delivery, and what to do when an event has none.

    Categories are compared lower-cased and stripped, the event's consent keys too (an exact
    key wins over another spelling of it); duplicates are removed.
    """

    categories: tuple[str, ...] = ("analytics",)
    missing: Literal["deny", "allow"] = "deny"
    _gating: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _by_text: dict[str | None, str | None] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.missing not in ("deny", "allow"):
            raise ValueError(f'missing must be "deny" or "allow", got {self.missing!r}')
        if isinstance(self.categories, str) or not all(
            isinstance(c, str) and c.strip() for c in self.categories
        ):
            raise ValueError(
                f"categories must be a tuple of non-empty strings, got {self.categories!r}"
            )
        cleaned = tuple(dict.fromkeys(c.strip().lower() for c in self.categories))
        object.__setattr__(self, "categories", cleaned)
        object.__setattr__(self, "_gating", tuple(c for c in cleaned if c != ALWAYS_GRANTED))
        object.__setattr__(self, "_by_text", {})

    def missing_category(self, event: Mapping[str, Any]) -> str | None:
        """The first configured category ``event`` was not granted, or None if it may go.

        For a decoded :class:`Event` the answer is a function of the ``context.consent``
        text alone, and real traffic carries a handful of distinct texts: the decision is
        remembered per text (at most :data:`CONSENT_CACHE_SIZE` of them), so most events
        are decided without parsing any JSON. Text holding a ``\\u`` escape is always
        parsed (a lone surrogate in it is replaced and counted on the event).
        """
        if not self._gating:
            return None
        if not isinstance(event, Event):
            return self._decide(consent_of(event))
        text = event.consent_text
        known = self._by_text
        if text in known:
            return known[text]
        category = self._decide(event.consent)
        if text is None or (len(text) <= CONSENT_CACHE_TEXT_MAX and "\\u" not in text):
            if len(known) >= CONSENT_CACHE_SIZE:
                known.clear()
            known[text] = category
        return category

    def _decide(self, consent: Any) -> str | None:
        gating = self._gating
        if not isinstance(consent, dict):
            # Only absent consent is "no consent data" (USERPILOT_CONSENT_MISSING); an
            # explicit `false`, "denied", [] or 1 grants nothing.
            return None if consent is None and self.missing == "allow" else gating[0]
        canonical = consent.get("canonical")
        if _valueless(canonical):
            # Spelled as the category keys may be (`Canonical`): the nested form was
            # ignored, and its flat keys decided alone (review "events31"). Also beside a
            # `canonical` without a value, which is as if absent: `{"canonical": null,
            # "Canonical": {"analytics": false}, "analytics": true}` went (review
            # "consent49"), `{"canonical": {}, "Canonical": {"analytics": true}}` was
            # dropped (review "diff49b").
            canonical = next((v for k, v in consent.items()
                              if isinstance(k, str) and k.strip().lower() == "canonical"
                              and not _valueless(v)), canonical)
        granted_by: dict[Any, Any] = consent
        if isinstance(canonical, dict):
            # The nested form's `canonical` decides when it has a value; one without any
            # (`{}`, all null) beside flat keys that say `false` let the event through
            # under USERPILOT_CONSENT_MISSING=allow (review "events29"): then the flat keys
            # that name a Signal category decide (not `categories`, the platform's raw
            # codes, nor `version` or `updatedAt` beside them: they made a valueless
            # nested consent "present", review "r30"), and only with no value in either it
            # is no consent data.
            if any(v is not None for v in canonical.values()):
                granted_by = canonical
            else:
                # The flat keys decide as they do with no `canonical` at all: only the
                # Signal categories counted here, and `{"canonical": {},
                # "analytics_storage": "denied"}` went where the same keys without it
                # were dropped (review "consent49").
                granted_by = _flat_keys(consent)
        else:
            # The nested form's own keys beside no `canonical` are no consent data either:
            # `{"categories": ["C0002"]}` was dropped under USERPILOT_CONSENT_MISSING=allow
            # while `{"canonical": {}, "categories": ["C0002"]}` went (review "seed44").
            granted_by = _flat_keys(consent)
        # No value in the object that decides is no consent data, in either shape:
        # `{"canonical": {"analytics": null}}` was denied where `{"analytics": null}` took
        # USERPILOT_CONSENT_MISSING (review "mapping22").
        if all(v is None for v in granted_by.values()):
            return None if self.missing == "allow" else gating[0]
        folded: dict[str, bool] | None = None
        for category in gating:
            value = granted_by.get(category, _ABSENT)
            if value is _ABSENT:
                # Keys compared as categories are (lower-cased, stripped): a consent
                # platform's `"Analytics": true` was dropped as no consent (review
                # "mapping25"). The exact key wins where both spellings occur; other
                # spellings that disagree grant nothing (fail closed: the first one in
                # the object's key order decided, review "events29").
                if folded is None:
                    folded = {}
                    for key, granted in granted_by.items():
                        if isinstance(key, str):
                            name = key.strip().lower()
                            folded[name] = folded.get(name, True) and _granted(granted)
                if not folded.get(category, False):
                    return category
            elif not _granted(value):
                return category
        return None


def consent_of(event: Mapping[str, Any]) -> Any:
    """``context.consent`` of an event; for a decoded :class:`Event` nothing else is parsed."""
    if isinstance(event, Event):
        return event.consent
    context = event.get("context")
    return context.get("consent") if isinstance(context, dict) else None


def envelope_drop(envelope: Mapping[str, Any], mappings: MappingSet) -> Drop | None:
    """:func:`drop_reason`'s checks before consent: anonymous, type, mapping. They read
    only :data:`consumer.codec.SCREENED`, so the intake can run them on an event's head
    (`codec.envelope_of`) before decoding the rest."""
    kind = envelope.get("type")
    if lacks_required_id(envelope):
        return DROP_ANONYMOUS
    if kind not in _DELIVERED_TYPES:
        return DROP_UNSUPPORTED_TYPE
    if kind in _MAPPED_TYPES and mappings.lookup(envelope) is None:
        return DROP_UNMAPPED
    return None


def drop_reason(
    event: Mapping[str, Any], consent: ConsentPolicy, mappings: MappingSet
) -> Drop | None:
    """Why ``event`` is not delivered, or None when it should be sent.

    Checked cheapest first: anonymous (:func:`consumer.calls.lacks_required_id`: a
    ``group`` without ``groupId``, any type without a non-blank ``userId``), type
    (only track, page, identify and group are delivered; others are ``unsupported_type``)
    and mapping (track/page only: one without a rule is ``unmapped``; identify and group
    always go, shaped by the mappings file's sections), all from envelope strings; then
    consent, which gates every type alike.
    """
    # A decoded Event's envelope strings are read from its record directly (no parsing).
    drop = envelope_drop(event.envelope if isinstance(event, Event) else event, mappings)
    if drop is not None:
        return drop
    category = consent.missing_category(event)
    if category is not None:
        return _consent_drop(category)
    return None
