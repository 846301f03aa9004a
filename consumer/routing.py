"""One decision per event: drop it (and why) or send this Track payload. Pure.

`run` and `explain` both call `route`, so the Event Debugger shows exactly what the
worker would do. Decisions are ordered by cost (see ``consumer.filtering``): the envelope
decides most drops; ``properties``/``traits`` are parsed only for events that are sent.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from consumer.errors import DeadLetter, MappingError
from consumer.filtering import ConsentPolicy, Drop, drop_reason
from consumer.mapping import MappingSet, build_payload

__all__ = ["Send", "encode_payload", "route"]


@dataclass(frozen=True, slots=True)
class Send:
    """A Track call to make: the payload, its JSON body, and what was left out of it.

    ``omitted``/``truncated``: metadata keys left out (not flat) or cut (size/count);
    ``replaced``: lone surrogates replaced while decoding this event's JSON text.
    """

    payload: dict[str, Any]
    body: bytes
    omitted: tuple[str, ...] = ()
    truncated: tuple[str, ...] = ()
    replaced: int = 0

    @property
    def event_name(self) -> str:
        return str(self.payload["event_name"])


def encode_payload(payload: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON; NaN/Infinity and lone surrogates are impossible (decode and the
    mapping remove them)."""
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"),
                      allow_nan=False).encode("utf-8")


def route(event: Mapping[str, Any], consent: ConsentPolicy, mappings: MappingSet) -> Drop | Send:
    """Drop with a reason, or the Track payload to send.

    Raises only :class:`DeadLetter`: :class:`UndecodableEvent` for JSON text that turns
    out broken when first parsed, :class:`MappingError` wrapping any other exception, so
    the caller dead-letters the one event and goes on.
    """
    try:
        drop = drop_reason(event, consent, mappings)
        if drop is not None:
            return drop
        rule = mappings.lookup(event)
        if rule is None:  # drop_reason checked it; kept for the type checker
            return Drop("unmapped")
        built = build_payload(event, rule, mappings.max_metadata_bytes,
                              mappings.max_metadata_keys)
        body = encode_payload(built.body)
    except DeadLetter:
        raise
    except Exception as exc:  # one event's data must never stop the worker
        raise MappingError(exc) from exc
    return Send(built.body, body, built.omitted, built.truncated,
                getattr(event, "replaced", 0))
