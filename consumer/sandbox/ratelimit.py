"""Userpilot's per-token limit as an exact rolling window (a sliding log).

Fixed one-minute buckets would let a client send 2x the limit across a bucket edge and
hide pacing bugs in the worker; a sliding log admits at most ``limit`` requests in *any*
``window`` seconds. Only admitted requests enter the log, so a client hammering through
its 429s does not extend its own penalty. The clock is passed in for tests.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

__all__ = ["Decision", "SlidingWindowLimiter"]


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
