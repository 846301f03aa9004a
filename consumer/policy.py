"""What to do after a failed attempt: back off, hold everything, or give up on one event.

Two rules make an outage harmless:
- the `Gate` holds every delivery while the integration is down (401/403/404, or a run
  of transient failures with no success), letting one probe through at a time with
  exponential backoff, so a dead Userpilot is not hammered and partitions back up
  (and get paused) instead of failing;
- an event is given up (dead-lettered) only when its retry budget is spent AND some
  other delivery succeeded after its first attempt: it failing alone is evidence about
  the event; everything failing is evidence about Userpilot, and the event waits.
Backoff is exponential with full jitter (tenacity), and honours Retry-After.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type
from tenacity.wait import wait_random_exponential

from consumer.errors import DeadLetter, Pause, Retry

__all__ = ["Attempts", "Gate", "RetryPolicy"]

log = logging.getLogger(__name__)

GateState = Literal["up", "outage", "misconfigured"]


class Gate:
    """Open when Userpilot works; closed (one probe at a time) during outages or misconfig."""

    def __init__(
        self, *, outage_after: int = 10, probe_base_s: float = 1.0, probe_max_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[GateState, str], None] | None = None,
    ) -> None:
        self._outage_after = outage_after
        self._probe_base = probe_base_s
        self._probe_max = probe_max_s
        self._clock = clock
        self._on_change = on_change
        self.state: GateState = "up"
        self.detail = ""
        self.last_success = -1e18
        self._consecutive = 0
        self._probe_delay = probe_base_s
        self._next_probe = 0.0
        self._probing = False
        self._changed = asyncio.Event()

    async def admit(self) -> bool:
        """Wait until a request may be sent; True when this caller is the probe."""
        while self.state != "up":
            now = self._clock()
            if not self._probing and now >= self._next_probe:
                self._probing = True
                return True
            self._changed.clear()
            timeout = max(0.01, self._next_probe - now) if not self._probing else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)
        return False

    def _set(self, state: GateState, detail: str) -> None:
        if state != self.state:
            self.state = state
            self.detail = detail
            if state == "up":
                log.warning("Userpilot answers again; delivery resumes")
            else:
                log.error("delivery paused (%s): %s", state, detail)
            if self._on_change is not None:
                self._on_change(state, detail)
        self._changed.set()

    def success(self, probe: bool = False) -> None:
        """Delivered: Userpilot works, and this is evidence for giving up on other events."""
        self.last_success = self._clock()
        self.answered(probe)

    def answered(self, probe: bool = False) -> None:
        """Userpilot answered (e.g. 400 for one payload): it is reachable and the token works."""
        self._consecutive = 0
        self._probe_delay = self._probe_base
        if probe:
            self._probing = False
        if self.state != "up":
            self._set("up", "")

    def _failed_probe(self, probe: bool) -> None:
        if probe:
            self._probing = False
            self._next_probe = self._clock() + self._probe_delay * random.uniform(0.8, 1.2)
            self._probe_delay = min(self._probe_max, self._probe_delay * 2)
            self._changed.set()

    def transient_failure(self, exc: Retry, probe: bool = False) -> None:
        self._consecutive += 1
        if self.state == "up" and self._consecutive >= self._outage_after:
            self._next_probe = self._clock() + self._probe_delay
            self._set("outage", f"{self._consecutive} failures in a row, last: {exc}")
        self._failed_probe(probe)

    def misconfigured(self, exc: Pause, probe: bool = False) -> None:
        if self.state != "misconfigured":
            self._next_probe = self._clock() + self._probe_delay
            self._set("misconfigured", str(exc))
        self._failed_probe(probe)

    def release(self, probe: bool) -> None:
        """A probe that ended without an answer (cancelled) frees the probe slot."""
        if probe:
            self._probing = False
            self._changed.set()


@dataclass
class Attempts:
    """Bookkeeping of one event's attempts (for DLQ headers and metrics)."""

    count: int = 0
    first_wall: float | None = None
    last_wall: float | None = None
    first_mono: float = 0.0


class RetryPolicy:
    """Runs one event's attempts until delivered, or raises what ends it."""

    def __init__(
        self, gate: Gate, *, max_attempts: int, budget_s: float,
        backoff_multiplier_s: float = 1.0, backoff_max_s: float = 60.0,
        on_retry: Callable[[Retry | Pause], None] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._gate = gate
        self._max_attempts = max_attempts
        self._budget = budget_s
        self._jitter = wait_random_exponential(multiplier=backoff_multiplier_s, max=backoff_max_s)
        self._on_retry = on_retry
        self._sleep = sleep
        self._clock = clock

    def _stop(self, state: RetryCallState, attempts: Attempts) -> bool:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, Pause):
            return False
        spent = (attempts.count >= self._max_attempts
                 or self._clock() - attempts.first_mono >= self._budget)
        return spent and self._gate.last_success > attempts.first_mono

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, Pause):
            return 0.0  # the gate does the waiting
        jitter = float(self._jitter(state))
        if isinstance(exc, Retry) and exc.retry_after is not None:
            return exc.retry_after + random.uniform(0, 0.1 * exc.retry_after + 0.05)
        return jitter

    def _before_sleep(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        if self._on_retry is not None and isinstance(exc, (Retry, Pause)):
            self._on_retry(exc)

    async def run(self, send: Callable[[], Awaitable[None]], attempts: Attempts,
                  before_send: Callable[[], Awaitable[None]] | None = None) -> None:
        """Call `send` until it returns; re-raises the last error when the event is given up.

        The first attempt runs outside tenacity: almost every event succeeds at once, and
        the retry machinery was a sixth of the worker's CPU per event (profiled). A failed
        first attempt is handed to tenacity as its attempt 1, so waits and stops are the
        same as if tenacity had made it.
        """
        # The budget starts at the first real attempt, not while the gate held the event.
        attempts.first_mono = float("inf")
        try:
            await self._once(send, attempts, before_send)
            return
        except (Retry, Pause) as exc:
            first: list[BaseException] = [exc]
        retrying = AsyncRetrying(
            retry=retry_if_exception_type((Retry, Pause)),
            stop=lambda s: self._stop(s, attempts),
            wait=self._wait,
            sleep=self._sleep,
            before_sleep=self._before_sleep,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                if first:
                    raise first.pop()
                await self._once(send, attempts, before_send)

    async def _once(self, send: Callable[[], Awaitable[None]], attempts: Attempts,
                    before_send: Callable[[], Awaitable[None]] | None) -> None:
        probe = await self._gate.admit()
        try:
            if before_send is not None:
                await before_send()
            attempts.count += 1
            attempts.last_wall = time.time()
            if attempts.first_wall is None:
                attempts.first_wall = attempts.last_wall
                attempts.first_mono = self._clock()
            await send()
        except Retry as exc:
            self._gate.transient_failure(exc, probe)
            raise
        except Pause as exc:
            self._gate.misconfigured(exc, probe)
            raise
        except DeadLetter:
            self._gate.answered(probe)
            raise
        except BaseException:
            self._gate.release(probe)
            raise
        self._gate.success(probe)
