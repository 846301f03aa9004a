"""Benchmark events: realistic Signal events encoded once, then stamped per message. Pure.

A million-event backlog cannot afford fastavro per message, so each distinct event is
encoded once with fixed-width placeholder strings and every message is a byte replacement
of those placeholders. Same-width replacements leave every Avro length prefix valid, so the
result is exactly what `codec.encode` would produce for the stamped event.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from consumer import codec

__all__ = [
    "DROP_KINDS",
    "Stamp",
    "Template",
    "delivered_event",
    "dropped_events",
    "identify_event",
    "mixed_messages",
    "sent_ns_of",
    "templates",
]

USER_MARK = "U~~~~~~~"  # 8 chars: "u" + 7 digits
MSG_MARK = "M~~~~~~~~~~~~~~~"  # 16 chars: "m" + 15 digits
SENT_MARK = "S~~~~~~~~~~~~~~~~~~"  # 19 chars: time.time_ns() as decimal
DROP_KINDS = ("anonymous", "consent", "unmapped")
Kind = Literal["deliver", "anonymous", "consent", "unmapped"]


def _event(kind: Kind) -> dict[str, Any]:
    """A track event shaped like real Signal traffic (nested properties, page context)."""
    event: dict[str, Any] = {
        "type": "track",
        "event": "Feature Used",
        "userId": USER_MARK,
        "anonymousId": "anon-" + USER_MARK,
        "properties": {
            "feature": "export_csv", "feature_id": "feat_017", "plan": "growth",
            "count": 3, "ok": True, "sent_ns": SENT_MARK,
            "source": {"page": "/reports", "widget": "toolbar"},
        },
        "context": {
            "consent": {"analytics": True, "marketing": False},
            "page": {"url": "https://app.example.com/reports", "path": "/reports",
                     "title": "Reports"},
            "locale": "en-GB", "timezone": "Europe/London",
            "userAgent": "Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0",
        },
        "timestamp": "2026-11-26T10:00:00.000Z",
        "messageId": MSG_MARK,
    }
    if kind == "anonymous":
        event["userId"] = None
    elif kind == "consent":
        event["context"]["consent"] = {"analytics": False, "marketing": False}
    elif kind == "unmapped":
        event["event"] = "Button Hovered"
    return event


def delivered_event() -> dict[str, Any]:
    """The mapped, consented event every delivery workload sends (placeholders unstamped)."""
    return _event("deliver")


def identify_event() -> dict[str, Any]:
    """An identify with realistic traits (placeholders unstamped): one /v1/identify call."""
    return {
        "type": "identify",
        "userId": USER_MARK,
        "anonymousId": "anon-" + USER_MARK,
        "traits": {"name": "Jane Doe", "email": "jane@example.com", "plan": "growth",
                   "createdAt": "2026-01-15T09:00:00.000Z",
                   "address": {"city": "London", "country": "GB"}},
        "context": {"consent": {"analytics": True, "marketing": False},
                    "locale": "en-GB", "timezone": "Europe/London"},
        "timestamp": "2026-11-26T10:00:00.000Z",
        "messageId": MSG_MARK,
    }


def mixed_messages(track: Template, identify: Template, count: int, track_users: int,
                   id_base: int = 0) -> Iterator[tuple[bytes, bytes]]:
    """Alternating Track and identify events: Tracks rotate over `track_users` users (each
    needs one ensure-user identify, then only Tracks), identifies each go to a new user in
    a separate range, so no user's Tracks queue behind an identify.

    messageIds start at `id_base`: a run on Redis must not find the ids of an earlier run
    recorded as delivered (they would be skipped without a request). The users, hence the
    partitions, are the same in every run."""
    for seq in range(count):
        if seq % 2 == 0:
            yield track.render(Stamp((seq // 2) % track_users, id_base + seq))
        else:
            yield identify.render(Stamp(1_000_000 + seq, id_base + seq))


def dropped_events() -> list[dict[str, Any]]:
    """One event per drop reason: anonymous, no consent, unmapped."""
    return [_event(kind) for kind in DROP_KINDS]  # type: ignore[arg-type]


@dataclass(frozen=True)
class Stamp:
    """What varies per message: user (also the Kafka key), message id, produce time."""

    user: int
    seq: int
    sent_ns: int | None = None


@dataclass(frozen=True)
class Template:
    """One event encoded once; `render` stamps a message in microseconds, not fastavro's."""

    wire: bytes
    anonymous: bool

    @classmethod
    def of(cls, schema_id: int, event: dict[str, Any]) -> Template:
        wire = codec.encode(schema_id, codec.to_record(event))
        return cls(wire, event.get("userId") is None)

    def render(self, stamp: Stamp) -> tuple[bytes, bytes]:
        """(key, wire value) with every placeholder replaced by same-width text."""
        user = f"u{stamp.user % 10_000_000:07d}".encode()
        sent = stamp.sent_ns if stamp.sent_ns is not None else 0
        value = (self.wire.replace(USER_MARK.encode(), user)
                 .replace(MSG_MARK.encode(), f"m{stamp.seq % 10**15:015d}".encode())
                 .replace(SENT_MARK.encode(), f"{sent % 10**19:019d}".encode()))
        key = b"anon-" + user if self.anonymous else user
        return key, value


def templates(schema_id: int, kind: Literal["deliver", "drop"]) -> list[Template]:
    """The templates a backlog cycles through."""
    events = [delivered_event()] if kind == "deliver" else dropped_events()
    return [Template.of(schema_id, e) for e in events]


def messages(tmpls: list[Template], count: int, users: int, start: int = 0,
             ) -> Iterator[tuple[bytes, bytes]]:
    """`count` (key, value) pairs, templates and users in rotation."""
    n = len(tmpls)
    for seq in range(start, start + count):
        yield tmpls[seq % n].render(Stamp(seq % users, seq))


def now_stamp(user: int, seq: int) -> Stamp:
    """A stamp carrying the produce time, for the latency workload."""
    return Stamp(user, seq, time.time_ns())


def sent_ns_of(metadata: dict[str, Any]) -> int | None:
    """The produce time a delivered payload carries (metadata is flattened by the mapping)."""
    for key in ("sent_ns", "properties_sent_ns"):
        value = metadata.get(key)
        if isinstance(value, str) and value.isdigit():
            return int(value)
    return None
