"""One decision per event: drop it (and why) or send these Userpilot calls. Pure.

`run` and `explain` both call `route`, so the Event Debugger shows exactly what the
worker would do. Decisions are ordered by cost (see ``consumer.filtering``): the envelope
decides most drops; ``properties``/``traits`` are parsed only for events that are sent.
Ensure-user identifies are not decided here: they depend on what this replica has
identified so far (``consumer.calls.CallPlan``, run by the handler).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from consumer.calls import (
    COMPANY_KEY,
    Call,
    company_id_source,
    drop_company_ids,
    encode_body,
    event_calls,
    track_call,
)
from consumer.errors import DeadLetter, InvalidEvent, MappingError
from consumer.filtering import ConsentPolicy, Drop, drop_reason
from consumer.mapping import MappingSet, Primitive, TraitsRule, build_payload, limit_metadata

__all__ = ["MAX_LISTED", "Send", "encode_payload", "listed", "route"]

encode_payload = encode_body
"""The one JSON encoder of request bodies (``consumer.calls.encode_body``)."""


MAX_LISTED = 20
"""Names of left-out or cut keys a Send keeps; more are counted in one last entry."""


def listed(names: Sequence[str]) -> tuple[str, ...]:
    """At most MAX_LISTED names, then "… N more". Why: a Send waits in the window, and a
    61 KB event whose 7,300 flattened keys were cut kept all their names, 2 MiB per event
    (200 such events waiting for the rate limiter: an OOM kill under the chart's limit)."""
    if len(names) <= MAX_LISTED:
        return tuple(names)
    return (*names[:MAX_LISTED], f"… {len(names) - MAX_LISTED} more")


@dataclass(frozen=True, slots=True)
class Send:
    """The calls an event causes, in order, and what was left out of their metadata.

    ``event_name``: the ``delivered`` metric label (the Track event name; ``identify`` or
    ``group`` for those types). ``omitted``/``truncated``: metadata keys left out (not
    flat) or cut (size/count); ``replaced``: lone surrogates replaced while decoding.
    """

    calls: tuple[Call, ...]
    event_name: str
    omitted: tuple[str, ...] = ()
    truncated: tuple[str, ...] = ()
    replaced: int = 0

    @property
    def payload(self) -> Mapping[str, Any]:
        """The body of the event's main (last) call: the Track, or the identify."""
        return self.calls[-1].payload

    @property
    def body(self) -> bytes:
        """The exact bytes of :attr:`payload`."""
        return self.calls[-1].body


def _limit(
    mappings: MappingSet, truncated: list[str], prefix: str = ""
) -> Callable[[dict[str, Primitive], int], dict[str, Primitive]]:
    """The configured metadata size limits, less the bytes the body spends already (its
    second argument), recording each cut key (with `prefix`)."""
    def limit(metadata: dict[str, Primitive], spent: int) -> dict[str, Primitive]:
        kept, cut = limit_metadata(metadata, max(0, mappings.max_metadata_bytes - spent),
                                   mappings.max_metadata_keys)
        truncated.extend(f"{prefix}{key}" for key in cut)
        return kept
    return limit


def _shape(
    rule: TraitsRule, mappings: MappingSet, truncated: list[str], omitted: list[str],
    settle: Callable[[dict[str, Primitive]], None] | None = None,
) -> Any:
    """The mappings file's traits section plus the Track size limits, as a TraitsShape;
    `settle` edits the metadata between the two (what is never sent takes no room)."""
    limit = _limit(mappings, truncated)

    def shape(_event: Mapping[str, Any], metadata: dict[str, Primitive]) -> dict[str, Primitive]:
        shaped = rule.apply(metadata, omitted)
        if settle is not None:
            settle(shaped)
        return limit(shaped, 0)
    return shape


_NO_CUT: frozenset[str] = frozenset()  # `cut` of an event that is not a decoded one
_ID_SOURCES = frozenset({"userId", "groupId", "traits"})
"""The fields a call's user or company id comes from (an identify's company from its
`traits`, or `groupId`)."""


def _refuse_cut_ids(send: Send, cut: frozenset[str], kind: Any,
                    event: Mapping[str, Any]) -> Send:
    """`send`, unless an id it sends comes from a field read from invalid UTF-8 (one of
    `cut`): U+FFFD where its bytes were cut, two users (or companies) cut alike would be
    one in Userpilot, one's traits and Tracks credited to the other (review "users42",
    "diff42"). Dead-lettered, to be fixed and replayed. Each id is judged by its own source:
    a U+FFFD the producer wrote in `userId` is text, whatever else was cut."""
    surrogated = getattr(event, "surrogated", None) or {}
    if (not cut or not cut & _ID_SOURCES) and "traits" not in surrogated:
        return send
    replaced: frozenset[str] = frozenset()  # the strings of the id's source that held one
    if kind == "identify":  # its company's id from its traits, else its groupId
        traits = event.get("traits")
        _, source = company_id_source(event, traits if isinstance(traits, dict) else {})
        company_cut = source in cut
        replaced = surrogated.get(source, frozenset())
    else:
        company_cut = "groupId" in cut
    for call in send.calls:
        company = call.payload.get("company")
        company_id = company.get(COMPANY_KEY) if isinstance(company, Mapping) else None
        checked = (("user id", call.payload.get("user_id"), "userId" in cut),
                   ("company id", call.payload.get("company_id"), "groupId" in cut),
                   ("company id", company_id, company_cut or (
                       isinstance(company_id, str) and company_id in replaced)))
        for name, value, from_cut in checked:
            if from_cut and isinstance(value, str) and "\ufffd" in value:
                raise InvalidEvent(
                    f"the {name} holds invalid UTF-8 or a lone UTF-16 surrogate (read as "
                    "U+FFFD): ids cut alike would name one Userpilot record; fix the "
                    "producer's ids and replay")
    return send


def route(event: Mapping[str, Any], consent: ConsentPolicy, mappings: MappingSet) -> Drop | Send:
    """Drop with a reason, or the calls to send.

    Raises only :class:`DeadLetter`: :class:`UndecodableEvent` for JSON text that turns
    out broken when first parsed, :class:`MappingError` wrapping any other exception, so
    the caller dead-letters the one event and goes on.
    """
    try:
        drop = drop_reason(event, consent, mappings)
        if drop is not None:
            return drop
        kind = event.get("type")
        if kind in ("identify", "group"):
            truncated: list[str] = []
            omitted: list[str] = []
            calls = event_calls(
                event, identify_shape=_shape(mappings.identify, mappings, truncated, omitted),
                group_shape=_shape(mappings.group, mappings, truncated, omitted,
                                   lambda metadata: drop_company_ids(metadata, omitted)),
                company_limit=_limit(mappings, truncated, "company."), omitted=omitted)
            return _refuse_cut_ids(
                Send(calls, str(kind), listed(omitted), listed(truncated),
                     getattr(event, "replaced", 0)), getattr(event, "cut", _NO_CUT), kind,
                event)
        rule = mappings.lookup(event)
        if rule is None:  # drop_reason checked it; kept for the type checker
            return Drop("unmapped")
        built = build_payload(event, rule, mappings.max_metadata_bytes,
                              mappings.max_metadata_keys)
        call = track_call(built.body)
    except DeadLetter:
        raise
    except Exception as exc:  # one event's data must never stop the worker
        raise MappingError(exc) from exc
    return _refuse_cut_ids(
        Send((call,), rule.event_name, listed(built.omitted), listed(built.truncated),
             getattr(event, "replaced", 0)), getattr(event, "cut", _NO_CUT), "track",
        event)
