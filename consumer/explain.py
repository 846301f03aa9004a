"""`explain`: the Event Debugger. What would the worker do with these events?

Each canonical JSON event line goes through the same path as in `run` — Avro encode, wire
decode, `route` — and one JSON line per event says what happens: ``decision`` is
``deliver``, ``drop`` or ``dead_letter``; a delivered event shows every request it causes,
in order (``requests``: ensure-user identify, company identify, identify, track; token
redacted), ``request`` is the last of them, and which fields were left out or cut.
Ensure-user is shown as a freshly started replica would send it: the first Track of each
user in the input gets a bare identify unless an identify of that user came earlier in
the input (or ``USERPILOT_ENSURE_USER=false``). Nothing is sent.

Built to be scripted: every output line carries the input line number and event name; a
bad line (invalid UTF-8, a byte order mark, not JSON, not an event) is one ``dead_letter``
line and the next lines are still explained; no input makes it raise. Envelope fields of
common event formats that the worker does not use (:data:`IGNORED_ENVELOPE`) are ignored
and listed, not refused.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from consumer import codec
from consumer.calls import Call, KnownUsers, ensure_user
from consumer.config import API_VERSION, Settings
from consumer.errors import DeadLetter, InvalidEvent
from consumer.filtering import Drop
from consumer.routing import route

__all__ = ["IGNORED_ENVELOPE", "explain_lines", "is_valid"]

IGNORED_ENVELOPE = codec.IGNORED_ENVELOPE

_BOM = "\ufeff"


def _name(raw: Any) -> str | None:
    if not isinstance(raw, Mapping):
        return None
    for key in ("event", "name"):
        value = raw.get(key)
        if isinstance(value, str):
            return value
    kind = raw.get("type")
    return kind if isinstance(kind, str) else None


def is_valid(doc: Mapping[str, Any]) -> bool:
    """False for a line the worker would dead-letter (or could not read at all)."""
    return doc.get("decision") != "dead_letter"


def _invalid(number: int, reason: str, raw: Any = None) -> dict[str, Any]:
    message_id = raw.get("messageId") if isinstance(raw, Mapping) else None
    return {"line": number, "event": _name(raw),
            "messageId": message_id if isinstance(message_id, str) else None,
            "decision": "dead_letter", "reason": reason}


def _text(raw_line: str | bytes) -> str:
    if isinstance(raw_line, bytes):
        try:
            return raw_line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"not UTF-8 text (byte {exc.start}): save the file as UTF-8") from None
    return raw_line


def explain_lines(lines: Iterable[str | bytes], settings: Settings) -> Iterator[dict[str, Any]]:
    """One decision document per non-empty input line (text or raw bytes)."""
    known = (KnownUsers(settings.ensure_user_cache, settings.ensure_user_ttl_s)
             if settings.ensure_user else None)
    for number, raw_line in enumerate(lines, start=1):
        try:
            yield from _explain_one(number, raw_line, settings, known)
        except Exception as exc:  # the debugger must survive any input
            yield _invalid(number, f"mapping_error: {type(exc).__name__}: {exc}"[:500])


def _request(settings: Settings, call: Call) -> dict[str, Any]:
    """One request as the worker sends it, the token redacted."""
    return {
        "purpose": call.purpose,
        "method": call.method,
        "url": settings.base_url + call.path,
        "headers": {
            "Content-Type": "application/json",
            "Authorization": "Token ***",
            "X-API-Version": API_VERSION,
        },
        "body": call.payload,
    }


def _explain_one(
    number: int, raw_line: str | bytes, settings: Settings, known: KnownUsers | None = None
) -> Iterator[dict[str, Any]]:
    try:
        text = _text(raw_line)
    except ValueError as exc:
        yield _invalid(number, f"invalid line: {exc}")
        return
    if not text.strip():
        return
    if text.startswith(_BOM):
        yield _invalid(number, "invalid line: starts with a byte order mark (BOM): save the "
                               "file as UTF-8 without BOM")
        return
    try:
        with codec.any_integer():
            raw = json.loads(text)
        deep = codec.too_deep(raw, codec.MAX_JSON_DEPTH + 1)  # a field's levels, as `run`'s
    except RecursionError:
        deep = True
    except ValueError as exc:
        yield _invalid(number, f"invalid event: not JSON ({exc})")
        return
    if deep:
        yield _invalid(number, f"invalid event: JSON nested deeper than {codec.MAX_JSON_DEPTH} "
                               "levels")
        return
    dlq = None
    cut: frozenset[str] = frozenset()
    surrogated: dict[str, frozenset[str]] = {}
    if isinstance(raw, dict) and "dlq" in raw and "dry_run" in raw:
        # A line of `replay --dry-run --show-event`: its event is explained, named by its
        # dead letter (review "dlq48"); the replay's summary line is passed over.
        dlq = raw["dlq"]
        if not isinstance(raw.get("event"), dict):
            why = raw.get("event_unreadable") or "run replay with --show-event"
            yield {**_invalid(number, f"a replay line without its event ({why})"), "dlq": dlq}
            return
        # Fields `run` read as U+FFFD, which canonical JSON cannot say: an id read so is
        # refused there, and here (review "diff48b").
        marked_cut = raw.get("event_cut")
        if isinstance(marked_cut, list):  # replay writes lists; anything else is ignored
            cut = frozenset(f for f in marked_cut if isinstance(f, str))
        marked = raw.get("event_surrogated")
        if isinstance(marked, dict):
            surrogated = {str(k): frozenset(t for t in v if isinstance(t, str))
                          for k, v in marked.items() if isinstance(v, list)}
        raw = raw["event"]
    elif isinstance(raw, dict) and "summary" in raw and "dry_run" in raw:
        return
    ignored: list[str] = []
    if isinstance(raw, dict):
        ignored = sorted(k for k in raw if k in IGNORED_ENVELOPE)
        event_in = {k: v for k, v in raw.items() if k not in IGNORED_ENVELOPE}
    else:
        event_in = raw
    try:
        with codec.any_integer():
            record = codec.to_record(event_in)
        event = codec.decode(codec.encode(0, record), lambda _id: codec.SCHEMA)
        if cut:
            event.cut = cut
        if surrogated:
            event.surrogated = surrogated
    except (InvalidEvent, ValueError, RecursionError) as exc:
        yield {**_invalid(number, f"invalid event: {exc}", raw),
               **({"dlq": dlq} if dlq is not None else {})}
        return
    doc: dict[str, Any] = {"line": number, "event": _name(event),
                           "messageId": event.get("messageId")}
    if dlq is not None:
        doc["dlq"] = dlq
    try:
        decision = route(event, settings.consent, settings.mappings)
    except DeadLetter as exc:
        doc["decision"] = "dead_letter"
        doc["reason"] = f"{exc.reason}: {exc}"
        yield doc
        return
    if isinstance(decision, Drop):
        doc["decision"] = "drop"
        doc["reason"] = decision.reason + (f":{decision.category}" if decision.category
                                           else "")
    else:
        doc["decision"] = "deliver"
        doc["reason"] = None
        calls = ensure_user(decision.calls, known)
        if known is not None:  # as if every call succeeded, as a replica would remember
            for call in calls:
                known.remember_succeeded(call)
        requests = [_request(settings, call) for call in calls]
        doc["requests"] = requests
        doc["request"] = {k: v for k, v in requests[-1].items() if k != "purpose"}
        if decision.omitted:
            doc["omitted"] = list(decision.omitted)
        if decision.truncated:
            doc["truncated"] = list(decision.truncated)
        # The envelope's (an id, the event's name) are replaced in the record, before the
        # worker sees it; the JSON text's as the worker parses it.
        replaced = decision.replaced + codec.envelope_surrogates(event_in)
        if replaced:
            doc["replaced_surrogates"] = replaced
    if ignored:
        doc["ignored"] = ignored
    yield doc
