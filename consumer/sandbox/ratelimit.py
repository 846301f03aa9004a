"""Userpilot's per-token limits as exact rolling windows (sliding logs).

Fixed one-minute buckets would let a client send 2x the limit across a bucket edge and
hide pacing bugs in the worker; a sliding log admits at most ``limit`` requests in *any*
``window`` seconds. Only admitted requests enter the log, so a client hammering through
its 429s does not extend its own penalty. The clock is passed in for tests.

Userpilot limits track and identify to 600 requests/minute/token *each* and delete calls to
one per 2 s: :class:`FamilyLimiter` keeps one window per (token, family). Company identify
counts as identify. ``shared`` puts track and identify in one budget, for accounts where
that turns out to be the rule.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Literal, TypeAlias

__all__ = ["Decision", "Family", "FamilyLimiter", "SlidingWindowLimiter"]

Family: TypeAlias = Literal["track", "identify", "delete"]


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    retry_after_seconds: float = 0.0

    @property
    def retry_after_header(self) -> str:
        """Whole seconds, rounded up, never 0: what a ``Retry-After`` header can carry."""
        return str(max(1, math.ceil(self.retry_after_seconds)))


class SlidingWindowLimiter:
    """At most ``limit`` admissions per key in any ``window`` seconds; ``limit <= 0`` = off."""

    def __init__(self, limit: int, window: float) -> None:
        if window <= 0:
            raise ValueError("window must be positive")
        self.limit = limit
        self.window = window
        self._logs: dict[str, deque[float]] = {}

    def acquire(self, key: str, now: float) -> Decision:
        if self.limit <= 0:
            return Decision(True)
        log = self._logs.get(key)
        if log is None:
            log = self._logs[key] = deque()
        horizon = now - self.window
        while log and log[0] <= horizon:
            log.popleft()
        if len(log) < self.limit:
            log.append(now)
            return Decision(True)
        return Decision(False, log[0] + self.window - now)

    def in_window(self, key: str, now: float) -> int:
        """Admissions still counted against ``key`` at ``now``."""
        log = self._logs.get(key, deque())
        return sum(1 for t in log if t > now - self.window)

    def reconfigure(self, limit: int, window: float) -> None:
        """Change the limit without forgetting recent admissions."""
        if window <= 0:
            raise ValueError("window must be positive")
        self.limit = limit
        self.window = window

    def reset(self) -> None:
        self._logs.clear()


class FamilyLimiter:
    """Per token: a ``limit``/``window`` budget each for track and identify, and delete calls
    at most one per ``delete_interval`` seconds (``<= 0`` lifts that limit).

    ``limit``, ``window``, ``reconfigure`` and ``reset`` keep the single limiter's interface
    (the track and identify budgets change together); ``identify_limit`` overrides the
    identify budget alone (None: same as ``limit``).
    """

    def __init__(
        self, limit: int, window: float, *, identify_limit: int | None = None,
        shared: bool = False, delete_interval: float = 2.0,
    ) -> None:
        self._track = SlidingWindowLimiter(limit, window)
        self._identify = SlidingWindowLimiter(
            limit if identify_limit is None else identify_limit, window)
        self._delete = SlidingWindowLimiter(1, delete_interval if delete_interval > 0 else 1.0)
        self.identify_limit = identify_limit
        self.shared = shared
        self.delete_interval = delete_interval

    @property
    def limit(self) -> int:
        return self._track.limit

    @property
    def window(self) -> float:
        return self._track.window

    def limit_of(self, family: Family) -> tuple[int, float]:
        """(limit, window) that applies to ``family`` now, for 429 messages."""
        if family == "delete":
            return (1 if self.delete_interval > 0 else 0), self.delete_interval
        if family == "identify" and not self.shared:
            return self._identify.limit, self._identify.window
        return self._track.limit, self._track.window

    def acquire(self, key: str, now: float, family: Family = "track") -> Decision:
        if family == "delete":
            if self.delete_interval <= 0:
                return Decision(True)
            return self._delete.acquire(key, now)
        if family == "identify" and not self.shared:
            return self._identify.acquire(key, now)
        return self._track.acquire(key, now)

    def in_window(self, key: str, now: float, family: Family = "track") -> int:
        if family == "delete":
            return self._delete.in_window(key, now)
        if family == "identify" and not self.shared:
            return self._identify.in_window(key, now)
        return self._track.in_window(key, now)

    def reconfigure(self, limit: int, window: float) -> None:
        """New track/identify budget (identify keeps its override if it has one)."""
        self._track.reconfigure(limit, window)
        self._identify.reconfigure(
            limit if self.identify_limit is None else self.identify_limit, window)

    def configure_families(
        self, *, identify_limit: int | None, shared: bool, delete_interval: float
    ) -> None:
        """Change the per-family settings without forgetting recent admissions."""
        self.identify_limit = identify_limit
        self.shared = shared
        self.delete_interval = delete_interval
        self._identify.reconfigure(
            self._track.limit if identify_limit is None else identify_limit, self._track.window)
        self._delete.reconfigure(1, delete_interval if delete_interval > 0 else 1.0)

    def reset(self) -> None:
        self._track.reset()
        self._identify.reset()
        self._delete.reset()
