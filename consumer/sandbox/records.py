"""What the sandbox saw: accepted requests in arrival order, and counts by outcome.

Tests assert on these records instead of on the worker's own logs, so they hold the parsed
body exactly as received. Authorization values are replaced by the token fingerprint.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

__all__ = ["REFUSALS_KEPT", "Recorder"]

REFUSALS_KEPT = 100


@dataclass
class Recorder:
    """Accepted records (bounded by ``limit``, oldest dropped) and outcome counters."""

    limit: int = 1_000_000
    # A deque: at the limit, a list shifted every record on each accept (52 µs a request
    # against 18.5, review "sandbox48"). About 1.9 KB a record.
    records: deque[dict[str, Any]] = field(default_factory=deque)
    outcomes: Counter[str] = field(default_factory=Counter)
    accepted_total: int = 0
    dropped: int = 0
    refused: list[dict[str, Any]] = field(default_factory=list)
    """The first ``REFUSALS_KEPT`` 429s (family and wall-clock time), for test diagnostics."""

    def count(self, outcome: str) -> None:
        """Count one API request by its outcome: a status code, ``reset`` or ``timeout``."""
        self.outcomes[outcome] += 1

    def accept(self, record: dict[str, Any]) -> None:
        self.accepted_total += 1
        record["seq"] = self.accepted_total
        self.records.append(record)
        while len(self.records) > self.limit:
            self.records.popleft()
            self.dropped += 1

    def refuse(self, family: str, at: float) -> None:
        """Remember one rate-limit refusal (the first few only: enough to see when)."""
        if len(self.refused) < REFUSALS_KEPT:
            self.refused.append({"family": family, "at": at})

    def select(self, path: str | None = None) -> list[dict[str, Any]]:
        if path is None:
            return list(self.records)
        return [record for record in self.records if record["path"] == path]

    def stats(self) -> dict[str, Any]:
        return {
            "total": sum(self.outcomes.values()),
            "by_status": dict(sorted(self.outcomes.items())),
            "accepted": self.accepted_total,
            "records_dropped": self.dropped,
            "rate_limited": list(self.refused),
        }

    def reset(self) -> None:
        self.records.clear()
        self.outcomes.clear()
        self.accepted_total = 0
        self.dropped = 0
        self.refused.clear()
