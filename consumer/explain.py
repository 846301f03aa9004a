"""`explain`: the Event Debugger. What would the worker do with these events?

Each canonical JSON event goes through the same schema round-trip and `route` as in
`run`, and one JSON line per event says deliver or drop, and shows the exact request
(token redacted). Nothing is sent.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

from consumer import codec
from consumer.config import API_VERSION, Settings
from consumer.errors import InvalidEvent
from consumer.filtering import Drop
from consumer.routing import route

__all__ = ["explain_lines"]


def explain_lines(lines: Iterable[str], settings: Settings) -> Iterator[dict[str, Any]]:
    """One decision document per non-empty input line."""
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            raw = json.loads(text)
            event = codec.from_record(codec.to_record(raw))
        except (ValueError, InvalidEvent) as exc:
            yield {"line": number, "messageId": None, "decision": "dead_letter",
                   "reason": f"invalid event: {exc}"}
            continue
        decision = route(event, settings.consent, settings.mappings)
        doc: dict[str, Any] = {"messageId": event.get("messageId")}
        if isinstance(decision, Drop):
            doc["decision"] = "drop"
            doc["reason"] = decision.reason + (f":{decision.category}" if decision.category
                                               else "")
        else:
            doc["decision"] = "deliver"
            doc["reason"] = None
            doc["request"] = {
                "method": "POST",
                "url": settings.track_url,
                "headers": {
                    "Content-Type": "application/json",
                    "Authorization": "Token ***",
                    "X-API-Version": API_VERSION,
                },
                "body": decision.payload,
            }
        yield doc
