"""The Userpilot requests one Signal event becomes, as plain data. Pure.

Track is one call per event; ``identify`` and ``group`` events are not. This module builds
the bodies of the other calls and names each request with a :class:`Call`, so the worker
sends, rate-limits, counts and explains every request the same way:

* ``identify`` → ``POST /v1/identify`` ``{"user_id", "metadata", "company"?}``;
* ``group`` → ``POST /v1/companies/identify`` ``{"company_id", "metadata"}``, then, when the
  event has a ``userId``, ``POST /v1/identify`` ``{"user_id", "metadata": {}, "company"}``
  (a company shows in Userpilot only once a user belongs to it, so the company goes first);
* a Track of a user this replica has not identified yet is preceded by a bare
  ``POST /v1/identify {"user_id", "metadata": {}}`` (:class:`KnownUsers` remembers who was
  identified):
  Userpilot accepts a Track for an unknown user with 202 and attributes it to no one.

Metadata follows the Track rules (``consumer.mapping``): primitives only, objects flattened
to ``parent_child`` keys. Callers filter first (consent, anonymous), as for Track.
Facts and sources: ``docs/userpilot-calls.md``.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal, TypeAlias, get_args

from consumer.mapping import (
    COMPANY_ID_KEYS,
    DEFAULT_MAX_METADATA_BYTES,
    DEFAULT_MAX_METADATA_KEYS,
    Primitive,
    field_size,
    flatten_properties,
    js_number,
    limit_metadata,
    metadata_size,
)

__all__ = [
    "COMPANY_IDENTIFY_PATH",
    "COMPANY_KEY",
    "DEFAULT_KNOWN_USERS",
    "ENDPOINTS",
    "FAMILIES",
    "IDENTIFY_PATH",
    "TRACK_PATH",
    "Call",
    "CallPlan",
    "CompanyLimit",
    "Endpoint",
    "Family",
    "KnownUsers",
    "Purpose",
    "TraitsShape",
    "company_identify_payload",
    "drop_company_ids",
    "encode_body",
    "ensure_user",
    "ensure_user_call",
    "event_calls",
    "flatten_traits",
    "group_calls",
    "identify_calls",
    "identify_payload",
    "lacks_required_id",
    "renders_as_nothing",
    "state_written",
    "track_call",
    "visible",
]

COMPANY_KEY = "id"
"""The key of the company id inside identify's ``company`` object.

Userpilot's docs disagree: the help page ("Identify User": "object with at least an id
field", example ``{"company": {"id": ...}}``) against the OpenAPI page ("company_id is
required"). We follow the help page and RudderStack's destination, which sends
``context.traits.company`` only when ``company.id`` is set. If Userpilot confirms
``company_id``, this is the one line to change (the sandbox accepts either).
"""

TRACK_PATH = "/v1/track"
IDENTIFY_PATH = "/v1/identify"
COMPANY_IDENTIFY_PATH = "/v1/companies/identify"

DEFAULT_KNOWN_TTL_S = 86_400.0
"""How long an identify is trusted (USERPILOT_ENSURE_USER_TTL_SECONDS): a day."""
DEFAULT_KNOWN_USERS = 100_000
"""Default capacity of :class:`KnownUsers`: ~120 bytes an entry plus the id (an id over 64
characters kept as a digest), so ~20 MB at most."""

Family: TypeAlias = Literal["track", "identify"]
"""Rate-limit family: Userpilot limits track and identify to 600/min/token each.

Company identify is counted as ``identify``: it is an identify call, Userpilot documents
no separate limit for it, and sharing the stricter budget cannot cause 429s.
"""
FAMILIES: tuple[Family, ...] = get_args(Family)

Endpoint: TypeAlias = Literal["track", "identify", "company_identify"]
"""One per path: the metric label, and the key a messageId is recorded under."""
ENDPOINTS: tuple[Endpoint, ...] = get_args(Endpoint)
"""Every family, in order: one limiter, one connection pool, one metric label each."""

Purpose: TypeAlias = Literal[
    "track", "identify", "company_identify", "associate_company", "ensure_user"
]
"""Why a call is made: ``explain`` prints it, metrics count ensure-user calls by it."""

TraitsShape: TypeAlias = Callable[[Mapping[str, Any], dict[str, Primitive]], dict[str, Primitive]]
"""``(event, flattened traits) → metadata``: the mappings file's identify/group section.

The default keeps every flattened trait (the Default preset forwards all traits).
"""


@dataclass(frozen=True, slots=True)
class Call:
    """One request to Userpilot: where it goes, its JSON body, and how it is counted.

    ``endpoint`` is the metric label (one per path); ``family`` picks the rate limiter;
    ``payload`` is the body as data (for explain and logs), ``body`` its exact bytes.
    """

    purpose: Purpose
    family: Family
    endpoint: Endpoint
    method: Literal["POST"]
    path: str
    payload: Mapping[str, Any]
    body: bytes

    @property
    def user_id(self) -> str | None:
        """The user this call identifies in Userpilot once it succeeds (identify only)."""
        if self.path != IDENTIFY_PATH:
            return None
        user_id = self.payload.get("user_id")
        return user_id if isinstance(user_id, str) and user_id else None

    @property
    def written_company(self) -> str | None:
        """The company whose properties this call sets (a company identify, an identify
        carrying company properties); not a bare association, which only adds a member."""
        if self.endpoint == "company_identify":
            company_id = self.payload.get("company_id")
            return company_id if isinstance(company_id, str) and company_id else None
        if self.purpose != "identify":
            return None
        company = self.payload.get("company")
        if not isinstance(company, Mapping) or len(company) < 2:
            return None
        company_id = company.get(COMPANY_KEY)
        return company_id if isinstance(company_id, str) and company_id else None

    @property
    def track_user_id(self) -> str | None:
        """The user a Track call is attributed to (Track only)."""
        if self.path != TRACK_PATH:
            return None
        user_id = self.payload.get("user_id")
        return user_id if isinstance(user_id, str) and user_id else None


_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
"""Made once: `json.dumps` with options builds an encoder per call."""


def encode_body(payload: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON, as ``routing.encode_payload`` (which may delegate here)."""
    return _ENCODER.encode(payload).encode("utf-8")


def _call(purpose: Purpose, path: str, payload: dict[str, Any]) -> Call:
    if path == TRACK_PATH:
        return Call(purpose, "track", "track", "POST", path, payload, encode_body(payload))
    endpoint: Literal["identify", "company_identify"] = (
        "identify" if path == IDENTIFY_PATH else "company_identify"
    )
    return Call(purpose, "identify", endpoint, "POST", path, payload, encode_body(payload))


# ---------------------------------------------------------------------------- metadata


def flatten_traits(traits: Mapping[str, Any],
                   omitted: list[str] | None = None) -> dict[str, Primitive]:
    """Traits → primitive metadata with exactly the rules Track applies to ``properties``.

    A top-level primitive wins over a flattened key of the same name; nested objects
    become ``parent_child`` keys; arrays are handled as for Track properties. ``omitted``
    collects the fields left out, as for Track (``explain`` shows them).
    """
    return flatten_properties(traits, omitted)


def _created_at(metadata: dict[str, Primitive], omitted: list[str] | None = None,
                prefix: str = "") -> None:
    """``createdAt`` → ``created_at`` (Userpilot's reserved key), as Segment and RudderStack.

    When both are set, ``createdAt`` wins (Segment's rule: ``createdAt || created_at``);
    the value left out is named in ``omitted`` (`explain` showed none, review "events29").
    """
    if "createdAt" not in metadata:
        return
    value = metadata.pop("createdAt")
    if value is not None or "created_at" not in metadata:
        if "created_at" in metadata and omitted is not None:
            omitted.append(f"{prefix}created_at (createdAt wins)")
        metadata["created_at"] = value
    elif omitted is not None:
        omitted.append(f"{prefix}createdAt (null; created_at is sent)")


def _traits(event: Mapping[str, Any]) -> dict[str, Any]:
    traits = event.get("traits")
    return traits if isinstance(traits, dict) else {}


_RENDERS_AS_NOTHING = re.compile(
    "[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e"
    "\u2060-\u206f\u2800\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufff8"
    "\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0000-\U000e0fff]")
"""Unicode's Default_Ignorable_Code_Point set, which Python counts as printable in part (the
Hangul fillers, variation selectors, the combining grapheme joiner, review diff19), and the
blank Braille pattern: characters that render as nothing, favourites for ids that look
empty."""


def renders_as_nothing(char: str) -> bool:
    """`char` is one of `_RENDERS_AS_NOTHING` (Default_Ignorable_Code_Point, blank Braille)."""
    return _RENDERS_AS_NOTHING.match(char) is not None


def invisible_edge(text: str) -> bool:
    """Whether `text` begins or ends with a character that shows nothing (a byte order
    mark, a zero-width space, a NUL, a noncharacter: what `visible` counts as blank): an id
    that is not the one it looks like. One rule with `visible` (review "diff51b")."""
    return bool(text) and (not visible(text[0]) or not visible(text[-1]))


def visible(text: str) -> bool:
    """Whether a string can identify anything: it holds a character that is neither blank
    nor invisible. ``""``, ``"  "``, ``"\u200b"``, ``"\x00"`` and ``"\u3164"`` cannot;
    as ids they would merge unrelated users, companies or messages into one.
    """
    if text.isascii() and text.isprintable():  # the common id: two C calls
        return not text.isspace() and text != ""
    return any(not c.isspace() and (c.isprintable() or _shown(c))
               for c in _RENDERS_AS_NOTHING.sub("", text))


def _shown(c: str) -> bool:
    """A character `str.isprintable` refuses that still shows: a format character outside
    `_RENDERS_AS_NOTHING` (U+0600 ARABIC NUMBER SIGN), private use (a company's own
    glyphs), or one this Python's Unicode tables predate (🩵 U+1FA75 on 3.11): ids made of
    them were dropped as anonymous, silently, and which ones depended on the Python version
    (review "mapping51"). Blank: controls (NUL), separators, lone surrogates, the
    noncharacters (never assigned: U+FFFE, U+FFFF, U+FDD0-FDEF, each plane's last two) and
    the format controls that show nothing alone (interlinear annotation U+FFF9-FFFB,
    Egyptian hieroglyph joiners U+13430-1343F; review "diff51a")."""
    code = ord(c)
    if code & 0xFFFE == 0xFFFE or 0xFDD0 <= code <= 0xFDEF:
        return False
    if 0xFFF9 <= code <= 0xFFFB or 0x13430 <= code <= 0x1343F:
        return False
    return unicodedata.category(c) not in ("Cc", "Cs", "Zl", "Zp", "Zs")


def _id(value: Any) -> str | None:
    """A usable id: a :func:`visible` string, or an integer (sent as its decimal string),
    also written as a float (`1.0`: JSON and JavaScript have one number type, and a
    company id 1.0 went into the user's metadata, review "events31")."""
    if isinstance(value, str):
        return value if visible(value) else None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        # Its shortest spelling's digits, as JavaScript writes them below 1e21 (seed34), and
        # from there on too: "1e+21" and the integer 1000000000000000000000 (the same JSON
        # number) were two companies (reviews "ids47", "spec47").
        text = js_number(value)
        return format(Decimal(repr(value)), "f") if "e" in text else text
    return None


def _metadata(
    event: Mapping[str, Any], traits: Mapping[str, Any], shape: TraitsShape | None,
    omitted: list[str] | None,
) -> dict[str, Primitive]:
    metadata = flatten_traits(traits, omitted)
    _created_at(metadata, omitted)
    return metadata if shape is None else shape(event, metadata)


CompanyLimit: TypeAlias = Callable[[dict[str, Primitive], int], dict[str, Primitive]]
"""Cuts identify's company properties to the metadata size limits less the bytes the body
already spends (its second argument: the user's metadata and the company's id), so one
identify carries at most one limit's worth (`routing` passes the configured limits and
records what was cut)."""


def _default_company_limit(properties: dict[str, Primitive], spent: int
                           ) -> dict[str, Primitive]:
    return limit_metadata(properties, max(0, DEFAULT_MAX_METADATA_BYTES - spent),
                          DEFAULT_MAX_METADATA_KEYS)[0]


def company_id_source(event: Mapping[str, Any], traits: Mapping[str, Any]
                      ) -> tuple[str | None, str | None]:
    """An identify's company id and the field it comes from (``traits`` or ``groupId``):
    ``traits.company.id``, else ``traits.company.company_id`` (the OpenAPI page's
    spelling), else ``traits.company_id``, else the event's ``groupId``."""
    company = traits.get("company")
    fields = company if isinstance(company, dict) else {}
    for value in (fields.get("id"), fields.get("company_id"), traits.get("company_id")):
        found = _id(value)
        if found is not None:
            return found, "traits"
    found = _id(event.get("groupId"))
    return (found, "groupId") if found is not None else (None, None)


def _company(event: Mapping[str, Any], traits: Mapping[str, Any],
             omitted: list[str] | None = None) -> tuple[str, dict[str, Primitive]] | None:
    """identify's company id and its properties (not yet cut to size), or None when the
    event names no company.

    The id is ``traits.company.id``, else ``traits.company_id``, else the event's
    ``groupId``; the other fields of ``traits.company`` (an object) are its properties.
    """
    company = traits.get("company")
    fields = company if isinstance(company, dict) else {}
    company_id, _ = company_id_source(event, traits)
    if company_id is None:
        return None
    rest = {k: v for k, v in fields.items() if k != "id"}
    left_out: list[str] = []
    if fields.get("id") is not None and _id(fields["id"]) is None:
        left_out.append("id (not a usable company id)")
    flat_id = traits.get("company_id")
    if omitted is not None and flat_id is not None and _id(flat_id) != company_id:
        # Not sent beside the chosen id (it could name another company): said so.
        omitted.append("company_id (another company id than the one sent)")
    group_id = _id(event.get("groupId"))
    if omitted is not None and group_id is not None and group_id != company_id:
        # The traits' id won: the event's groupId, naming another company, is not sent
        # either; `explain` said nothing of it (review "seed34").
        omitted.append("groupId (another company id than the one sent)")
    properties = flatten_traits(rest, left_out)
    _created_at(properties, left_out)
    # Neither spelling of the id may travel beside the chosen one: Userpilot's documents
    # disagree on which key names the company (`id`, `company_id`), so a second one could
    # attach the user to another company.
    for key in COMPANY_ID_KEYS:
        spelt = properties.pop(key, None)
        if spelt is not None and _id(spelt) != company_id:  # the id sent is not left out
            left_out.append(f"{key} (another spelling of the company's id)")
    if omitted is not None:
        omitted.extend(f"company.{key}" for key in left_out)
    return company_id, properties


def _without_unusable_company_ids(traits: dict[str, Any],
                                  omitted: list[str] | None) -> dict[str, Any]:
    """The traits without the company ids no company could be made of (a blank, `1.5`,
    `true`, null): none is attached, so each is left out and listed, not sent as the user's
    `company_id` property, an id beside no company (review "seed34"; a null one went out as
    `company_id: null`, review "mapping51"). The company object's other fields stay user
    properties."""
    company = traits.get("company")
    nested = [k for k in COMPANY_ID_KEYS if isinstance(company, dict) and k in company]
    if "company_id" not in traits and not nested:
        return traits
    out = dict(traits)
    left_out: list[str] = []
    if "company_id" in out:
        del out["company_id"]
        left_out.append("company_id")
    if nested and isinstance(company, dict):
        out["company"] = {k: v for k, v in company.items() if k not in nested}
        left_out.extend(f"company.{k}" for k in nested)
    if omitted is not None:
        omitted.extend(f"{key} (not a usable company id)" for key in left_out)
    return out


# ---------------------------------------------------------------------------- payloads


def identify_payload(
    event: Mapping[str, Any], shape: TraitsShape | None = None,
    company_limit: CompanyLimit | None = None, omitted: list[str] | None = None,
) -> dict[str, Any]:
    """The ``/v1/identify`` body for an ``identify`` event.

    ``metadata`` comes from ``traits`` (flattened; ``createdAt`` → ``created_at``).
    ``company`` is attached when the event names one (see :func:`_company`); then
    ``traits.company`` (an object) and ``traits.company_id`` are not repeated in the
    user's metadata. No company property can replace the id.
    An event without a string ``userId`` gets ``user_id: ""`` (callers drop those first).
    ``omitted`` collects the trait fields left out (company ones as ``company.<key>``).
    """
    traits = _traits(event)
    company = _company(event, traits, omitted)
    if company is not None:  # the company's own keys are not user properties too
        traits = {k: v for k, v in traits.items()
                  if not (k == "company_id" or (k == "company" and isinstance(v, dict)))}
    else:
        traits = _without_unusable_company_ids(traits, omitted)
    user_id = event.get("userId")
    metadata = _metadata(event, traits, shape, omitted)
    payload: dict[str, Any] = {
        "user_id": user_id if isinstance(user_id, str) else "",
        "metadata": metadata,
    }
    if company is not None:
        # The same size rule as all metadata (a `company` of 3,000 long keys made a 332 KB
        # identify body), over the body as a whole: the company's properties get what the
        # user's metadata and the company's id leave of the limit. Each cut to the whole
        # limit, an identify carried two limits' worth, past a 1 MiB body cap: a 413 and a
        # dead letter where the README promises the largest fields left out (review "api44").
        company_id, properties = company
        spent = metadata_size(metadata) + field_size(COMPANY_KEY, company_id)
        payload["company"] = {
            COMPANY_KEY: company_id,
            **(company_limit or _default_company_limit)(properties, spent)}
    return payload


def company_identify_payload(
    event: Mapping[str, Any], shape: TraitsShape | None = None,
    omitted: list[str] | None = None,
) -> dict[str, Any]:
    """The ``/v1/companies/identify`` body for a ``group`` event: groupId and its traits.

    No id travels in the metadata beside ``groupId`` (``id``, ``company_id``, a
    ``company.id`` flattened): as for identify's ``company``, Userpilot's documents
    disagree on which key names a company, and a second one could name another (review
    "poison26"). They are listed as left out."""
    company_id = _id(event.get("groupId"))
    metadata = _metadata(event, _traits(event), shape, omitted)
    drop_company_ids(metadata, omitted)  # a shape given by `routing` dropped them already
    return {"company_id": company_id or "", "metadata": metadata}


def drop_company_ids(metadata: dict[str, Primitive], omitted: list[str] | None) -> None:
    """Leave a company's ids out of its metadata (`company_identify_payload`), listing them.
    `routing` calls it between the mappings' rule and the size limits: removed after the
    limits, an `id` trait that is never sent had cost real properties their place (review
    "mapping41")."""
    for key in COMPANY_ID_KEYS:
        if key in metadata:
            del metadata[key]
            if omitted is not None:
                omitted.append(f"{key} (the company's id is groupId)")


# ---------------------------------------------------------------------------- calls


def identify_calls(event: Mapping[str, Any], shape: TraitsShape | None = None,
                   company_limit: CompanyLimit | None = None,
                   omitted: list[str] | None = None) -> tuple[Call]:
    """An ``identify`` event → one identify call (it creates the user, no ensure-user)."""
    payload = identify_payload(event, shape, company_limit, omitted)
    return (_call("identify", IDENTIFY_PATH, payload),)


def group_calls(event: Mapping[str, Any], shape: TraitsShape | None = None,
                omitted: list[str] | None = None) -> tuple[Call, ...]:
    """A ``group`` event → company identify, then (with a ``userId``) the association.

    The association is an identify with only ``company`` and an empty ``metadata``, so the
    user's properties are left as they are (Userpilot's API reference lists ``metadata``
    without marking it optional, its help page calls it optional: ``{}`` suits both, where
    an absent key was a 400 on every association under the first reading, review "api43").
    The filters drop a ``group`` without a
    ``userId``; called with one anyway (a library caller), only the company goes.
    """
    company = company_identify_payload(event, shape, omitted)
    first = _call("company_identify", COMPANY_IDENTIFY_PATH, company)
    user_id = event.get("userId")
    if not isinstance(user_id, str) or not visible(user_id):
        return (first,)
    associate = {"user_id": user_id, "metadata": {},
                 "company": {COMPANY_KEY: company["company_id"]}}
    return first, _call("associate_company", IDENTIFY_PATH, associate)


def event_calls(
    event: Mapping[str, Any],
    track_payload: Mapping[str, Any] | None = None,
    *,
    identify_shape: TraitsShape | None = None,
    group_shape: TraitsShape | None = None,
    company_limit: CompanyLimit | None = None,
    omitted: list[str] | None = None,
) -> tuple[Call, ...]:
    """Every call an event that passed the filters causes, in order (ensure-user aside).

    ``track_payload`` is the mapped Track body of a ``track``/``page`` event; other types
    give no calls. Callers add :func:`ensure_user` with their :class:`KnownUsers`.
    ``omitted`` collects the trait fields identify and group leave out.
    """
    kind = event.get("type")
    if kind == "identify":
        return identify_calls(event, identify_shape, company_limit, omitted)
    if kind == "group":
        return group_calls(event, group_shape, omitted)
    if track_payload is not None:
        return (track_call(track_payload),)
    return ()


def lacks_required_id(event: Mapping[str, Any]) -> bool:
    """The anonymous rule: every type needs a ``userId``; ``group`` a ``groupId`` as well.

    A ``group`` from an anonymous visitor is not sent either: the integration page delivers
    no anonymous (pre-login) event, and Userpilot attributes everything to a user. An id
    that is not :func:`visible` counts as missing, and so does a non-string (an integer
    ``groupId`` is accepted, as an id).
    """
    if event.get("type") == "group" and _id(event.get("groupId")) is None:
        return True
    user_id = event.get("userId")
    return not isinstance(user_id, str) or not visible(user_id)


def state_written(calls: Sequence[Call]) -> tuple[tuple[str, ...], ...]:
    """What an event's calls set in Userpilot that a later event's would set again, so
    that the later one reaching Userpilot first leaves the earlier one stale: a user's
    traits (an identify), a company's properties (a group's company identify, an identify
    carrying them: `written_company`), a user's membership of a company (a group's
    association, an identify naming a company). Nothing for a Track, which is history, not
    state, nor for the bare identify that only makes a user exist (`ensure_user`).

    An id over `LONG_ID` characters is named by its digest, as `KnownUsers` keeps it: the
    DLQ guard's hold remembers the latest 4,096 states written, and 60 KB user ids held
    ~250 MB there (review "growth52")."""
    states: list[tuple[str, ...]] = []
    for call in calls:
        user = call.payload.get("user_id")
        if isinstance(user, str):
            user = _short(user)
        if call.purpose == "identify" and isinstance(user, str):
            states.append(("user", user))
        if call.written_company is not None:
            states.append(("company", _short(call.written_company)))
        company = call.payload.get("company")
        if (isinstance(user, str) and isinstance(company, Mapping)
                and isinstance(company.get(COMPANY_KEY), str)):
            states.append(("member", user, _short(company[COMPANY_KEY])))
    return tuple(dict.fromkeys(states))


def track_call(payload: Mapping[str, Any]) -> Call:
    """A Track payload (``mapping.build_payload``'s body) as a call."""
    return _call("track", TRACK_PATH, dict(payload))


def ensure_user_call(user_id: str) -> Call:
    """The bare ``/v1/identify {"user_id", "metadata": {}}`` that makes a user exist before
    its Track (an empty ``metadata``, as in `group_calls`' association)."""
    return _call("ensure_user", IDENTIFY_PATH, {"user_id": user_id, "metadata": {}})


# ---------------------------------------------------------------------------- ensure-user


LONG_ID = 64


def _digest(user_id: str) -> str:
    return "#" + hashlib.sha256(user_id.encode("utf-8", "surrogatepass")).hexdigest()


def _short(an_id: str) -> str:
    """`an_id`, or its digest (65 characters, never equal to an id kept as it is) when it
    is over `LONG_ID` characters: `KnownUsers`' keys and `state_written`'s ids."""
    return _digest(an_id) if len(an_id) > LONG_ID else an_id


class KnownUsers:
    """Users this replica has identified since it started: a bounded LRU of user ids.

    ``needs_identify(u)`` before a Track; ``remember(u)`` only after an identify of ``u``
    succeeded (any identify: bare, with traits, or a company association). A failed or
    retried identify leaves ``u`` unknown, so the retry sends it again; an identify that
    succeeded followed by a failed Track is not repeated. Forgetting (eviction, restart,
    a rebalance that brings new users) costs one extra identify, never a lost event.
    Ids over `LONG_ID` characters are kept as a digest (65 characters, so never equal to a
    kept id): the cache's memory is bounded by its capacity, whatever the ids' length
    (~120 bytes an entry plus the id). Not thread-safe: owned by the worker's event loop.

    An identify is trusted for `ttl_s` seconds: a user deleted in Userpilot since (by
    `delete-users`, its UI, another integration) whose id comes back was remembered for
    good, and its Tracks went out with no identify in front, accepted and attributed to no
    one (review "users22"). After `ttl_s` the next Track identifies the user again.
    """

    __slots__ = ("_capacity", "_clock", "_shared", "_ttl", "_users")

    def __init__(self, capacity: int = DEFAULT_KNOWN_USERS, ttl_s: float = DEFAULT_KNOWN_TTL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be a positive integer, got {capacity!r}")
        self._capacity = capacity
        self._ttl = ttl_s
        self._clock = clock
        self._users: OrderedDict[str, float] = OrderedDict()  # id -> when identified
        # id -> until when the shared record (Redis) that another replica identified it
        # holds: `learned`, `shared_left`
        self._shared: OrderedDict[str, float] = OrderedDict()

    @property
    def capacity(self) -> int:
        return self._capacity

    def needs_identify(self, user_id: str) -> bool:
        """True when ``user_id`` was not identified here (recently enough to be kept)."""
        user_id = _short(user_id)
        users = self._users
        at = users.get(user_id)
        if at is None:
            return True
        if self._clock() - at > self._ttl:
            del users[user_id]
            return True
        users.move_to_end(user_id)
        return False

    def remember(self, user_id: str, age_s: float = 0.0) -> None:
        """Record a successful identify of ``user_id`` made ``age_s`` seconds ago (another
        replica's, read from Redis); evicts the least recent beyond capacity."""
        self._remember_key(_short(user_id), age_s)

    def _remember_key(self, user_id: str, age_s: float) -> None:
        users = self._users
        if user_id in users:
            users.move_to_end(user_id)
        users[user_id] = self._clock() - max(0.0, age_s)
        if len(users) > self._capacity:
            users.popitem(last=False)

    def learned(self, user_id: str, left_s: float, recheck_s: float) -> None:
        """Record that the shared record (Redis) holds another replica's identify of
        ``user_id`` for ``left_s`` more seconds: trusted here for at most ``recheck_s`` of
        them, then the record is read again (it may have been deleted: `delete-users`);
        `shared_left` keeps the rest for when it cannot be read."""
        user_id = _short(user_id)  # one digest, kept by both maps
        self._remember_key(user_id, self._ttl - min(left_s, recheck_s))
        shared = self._shared
        if user_id in shared:
            shared.move_to_end(user_id)
        shared[user_id] = self._clock() + left_s
        if len(shared) > self._capacity:
            shared.popitem(last=False)

    def shared_left(self, user_id: str) -> float | None:
        """Seconds left of the shared record `learned` last read for ``user_id``, or None:
        while Redis cannot be read, a user it said another replica identified stays trusted
        for that long, not identified again at the next re-read (review "diff41")."""
        until = self._shared.get(_short(user_id))
        left = None if until is None else until - self._clock()
        return left if left is not None and left >= 1.0 else None

    def remember_succeeded(self, call: Call) -> None:
        """After ``call`` succeeded: remember its user when it was an identify."""
        user_id = call.user_id
        if user_id is not None:
            self.remember(user_id)

    def __contains__(self, user_id: object) -> bool:
        """Membership without touching recency (for tests and explain)."""
        return user_id in self._users

    def __len__(self) -> int:
        return len(self._users)


class CallPlan:
    """The calls of one event, sent one after another and resumed after a retry.

    The worker asks :meth:`next_call` before each request and reports each success with
    :meth:`succeeded`; a failure reports nothing, so a retry of the event resumes at the
    call that failed (calls already answered are not sent again). Ensure-user is decided
    here, just before a Track goes, so it reflects every identify that succeeded until
    then, including an earlier event of the same user. ``known=None`` turns it off.
    """

    __slots__ = ("_calls", "_index", "_known")

    def __init__(self, calls: Iterable[Call], known: KnownUsers | None) -> None:
        self._calls = tuple(calls)
        self._index = 0
        self._known = known

    @property
    def calls(self) -> tuple[Call, ...]:
        return self._calls

    @property
    def done(self) -> bool:
        return self._index >= len(self._calls)

    @property
    def started(self) -> bool:
        """A call of the event itself (not an ensure-user identify) succeeded: the event is
        half-way (a group between its company identify and its association)."""
        return self._index > 0

    def progress_note(self) -> str:
        """Which calls succeeded so far: their count and a digest of their requests (method,
        path, body), for `resume` by the next owner of the event."""
        return f"{self._index}:{_requests_digest(self._calls[:self._index])}"

    def resume(self, note: str | None) -> tuple[Call, ...]:
        """Start after the calls an earlier owner's `progress_note` says succeeded, if this
        plan's first calls are those same requests; the calls skipped. Not otherwise: the
        same messageId with other content, or a replay after a mapping change, sends every
        call (review "diff24"). Never all of them: the last call's success is the
        confirm's to say."""
        if note is None or self._index != 0:
            return ()
        count, _, digest = note.partition(":")
        # ASCII digits only: "²".isdigit() is True and int() refuses it (the note comes
        # from Redis, which anything with the password may write).
        if not (count.isascii() and count.isdigit()) or not 0 < int(count) < len(self._calls):
            return ()
        skipped = self._calls[:int(count)]
        if digest != _requests_digest(skipped):
            return ()
        self._index = len(skipped)
        return skipped

    def next_call(self) -> Call | None:
        """The request to send now, or None when every call of the event succeeded."""
        if self.done:
            return None
        call = self._calls[self._index]
        user_id = call.track_user_id
        known = self._known
        if user_id is not None and known is not None and known.needs_identify(user_id):
            return ensure_user_call(user_id)
        return call

    def succeeded(self, call: Call) -> None:
        """``call`` (as returned by :meth:`next_call`) was answered with a 2xx."""
        if self._known is not None:
            self._known.remember_succeeded(call)
        if call.purpose != "ensure_user":
            self._index += 1


def _requests_digest(calls: Iterable[Call]) -> str:
    """A short digest of requests: what makes two progress notes speak of the same calls."""
    h = hashlib.sha256()
    for call in calls:
        h.update(f"{call.method} {call.path}\n".encode())
        h.update(call.body)
        h.update(b"\0")
    return h.hexdigest()[:32]


def ensure_user(calls: Iterable[Call], known: KnownUsers | None) -> tuple[Call, ...]:
    """``calls`` with a bare identify before each Track of a user not known yet.

    The static view of :class:`CallPlan`, for ``explain`` (pass a fresh ``KnownUsers``:
    what a replica that just started sends). An identify of the same user earlier in
    ``calls`` counts as known. ``known`` is only read. ``None`` returns ``calls``.
    """
    calls = tuple(calls)
    if known is None:
        return calls
    out: list[Call] = []
    identified: set[str] = set()
    for call in calls:
        track_user = call.track_user_id
        if (track_user is not None and track_user not in identified
                and known.needs_identify(track_user)):
            out.append(ensure_user_call(track_user))
            identified.add(track_user)
        if call.user_id is not None:
            identified.add(call.user_id)
        out.append(call)
    return tuple(out)
