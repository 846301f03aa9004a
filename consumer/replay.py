"""`replay`: dead-lettered events back onto their original topic, filtered and counted.

The replayer is a consumer group of its own on the DLQ: it reads up to the end offsets
seen at start, re-publishes what passes the filters (acks=all) and commits, so a run can
be stopped and resumed and a second run replays nothing twice. Each replay increments
`userpilot.replay.count`; an event at the limit is reported, not replayed again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from consumer.deadletter import REPLAY_COUNT, Header, header_value, replay_count
from consumer.errors import ConfigError

__all__ = ["Filters", "Summary", "add_arguments", "decide", "main", "replay_headers"]


@dataclass(frozen=True)
class Filters:
    """Which dead letters to replay; empty means all."""

    reasons: frozenset[str] = frozenset()
    statuses: frozenset[str] = frozenset()
    since: datetime | None = None
    until: datetime | None = None
    from_offset: int | None = None
    to_offset: int | None = None
    partitions: frozenset[int] = frozenset()
    max_replays: int = 3


@dataclass
class Summary:
    replayed: int = 0
    skipped_by_filter: int = 0
    over_limit: int = 0
    no_origin: int = 0
    over_limit_offsets: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"replayed": self.replayed, "skipped_by_filter": self.skipped_by_filter,
                "over_limit": self.over_limit, "no_origin": self.no_origin}


def _when(headers: Sequence[Header] | None, timestamp_ms: int | None) -> datetime | None:
    raw = header_value(headers, "userpilot.error.last_attempt")
    if raw:
        try:
            return datetime.fromisoformat(raw.decode())
        except ValueError:
            pass
    if timestamp_ms:
        return datetime.fromtimestamp(timestamp_ms / 1000, UTC)
    return None


def decide(headers: Sequence[Header] | None, partition: int, offset: int,
           timestamp_ms: int | None, filters: Filters) -> str:
    """'replay', 'filtered', 'over_limit' or 'no_origin' for one DLQ record. Pure."""
    if filters.partitions and partition not in filters.partitions:
        return "filtered"
    if filters.from_offset is not None and offset < filters.from_offset:
        return "filtered"
    if filters.to_offset is not None and offset > filters.to_offset:
        return "filtered"
    if filters.reasons:
        reason = (header_value(headers, "userpilot.error.reason") or b"").decode()
        if reason not in filters.reasons:
            return "filtered"
    if filters.statuses:
        status = (header_value(headers, "userpilot.error.status") or b"").decode()
        if status not in filters.statuses:
            return "filtered"
    if filters.since is not None or filters.until is not None:
        when = _when(headers, timestamp_ms)
        if when is None:
            return "filtered"
        if filters.since is not None and when < filters.since:
            return "filtered"
        if filters.until is not None and when > filters.until:
            return "filtered"
    if not header_value(headers, "__connect.errors.topic"):
        return "no_origin"
    if replay_count(headers) >= filters.max_replays:
        return "over_limit"
    return "replay"


def replay_headers(headers: Sequence[Header] | None) -> list[Header]:
    """Original headers without the error context, replay count incremented."""
    count = replay_count(headers)
    kept = [(k, v) for k, v in (headers or ())
            if not k.startswith("__connect.errors.") and not k.startswith("userpilot.error.")
            and k != REPLAY_COUNT]
    return [*kept, (REPLAY_COUNT, str(count + 1).encode())]


def _time(text: str) -> datetime:
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="dlq_topic", required=True, help="the dead-letter topic")
    p.add_argument("--reason", action="append", default=[],
                   help="only this userpilot.error.reason (repeatable)")
    p.add_argument("--status", action="append", default=[],
                   help="only this HTTP status (repeatable)")
    p.add_argument("--since", type=_time, help="dead-lettered at or after (ISO 8601)")
    p.add_argument("--until", type=_time, help="dead-lettered at or before (ISO 8601)")
    p.add_argument("--partition", type=int, action="append", default=[],
                   help="only this DLQ partition (repeatable)")
    p.add_argument("--from-offset", type=int, help="first DLQ offset to consider")
    p.add_argument("--to-offset", type=int, help="last DLQ offset to consider")
    p.add_argument("--max-replays", type=int, default=None,
                   help="replay limit per event (default: $WORKER_REPLAY_MAX or 3)")
    p.add_argument("--group", default=None,
                   help="replayer consumer group (default: userpilot-replay.<dlq topic>)")
    p.add_argument("--dry-run", action="store_true",
                   help="list what would be replayed; send and commit nothing")


def main(args: argparse.Namespace) -> int:
    from consumer.config import load_settings
    from consumer.kafka import run_replay

    if not os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip():
        raise ConfigError("replay needs KAFKA_BOOTSTRAP_SERVERS")
    # The worker's own settings: same KAFKA_* pass-through (secrets, service links) and
    # the validated WORKER_REPLAY_MAX; what replay does not use may be left unset.
    settings = load_settings(os.environ, offline=True)
    max_replays = settings.replay_max if args.max_replays is None else args.max_replays
    filters = Filters(
        reasons=frozenset(args.reason), statuses=frozenset(args.status), since=args.since,
        until=args.until, from_offset=args.from_offset, to_offset=args.to_offset,
        partitions=frozenset(args.partition), max_replays=max_replays,
    )
    conf: dict[str, Any] = settings.kafka_config()
    group = args.group or f"userpilot-replay.{args.dlq_topic}"

    def report(line: dict[str, Any]) -> None:
        print(json.dumps(line, ensure_ascii=False))

    summary = run_replay(conf, args.dlq_topic, group, filters, dry_run=args.dry_run,
                         report=report)
    print(json.dumps({"summary": summary.as_dict(), "dry_run": args.dry_run}), file=sys.stdout)
    for item in summary.over_limit_offsets[:50]:
        print(f"over replay limit (not replayed): {item}", file=sys.stderr)
    return 0
