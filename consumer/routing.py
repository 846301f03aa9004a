"""One decision per event: drop it (and why) or send this Track payload. Pure.

`run` and `explain` both call `route`, so the Event Debugger shows exactly what the
worker would do.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from consumer.filtering import ConsentPolicy, Drop, drop_reason
from consumer.mapping import MappingSet, build_track_payload

__all__ = ["Send", "encode_payload", "route"]


@dataclass(frozen=True, slots=True)
class Send:
    """A Track call to make: the payload and its JSON body."""

    payload: dict[str, Any]
    body: bytes

    @property
    def event_name(self) -> str:
        return str(self.payload["event_name"])


def encode_payload(payload: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON; NaN/Infinity are impossible (the mapping drops them)."""
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"),
                      allow_nan=False).encode("utf-8")


def route(event: Mapping[str, Any], consent: ConsentPolicy, mappings: MappingSet) -> Drop | Send:
    """Drop with a reason, or the Track payload to send."""
    drop = drop_reason(event, consent, mappings)
    if drop is not None:
        return drop
    rule = mappings.lookup(event)
    if rule is None:  # drop_reason checked it; kept for the type checker
        return Drop("unmapped")
    payload = build_track_payload(event, rule)
    return Send(payload, encode_payload(payload))
