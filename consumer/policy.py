"""What to do after a failed attempt: back off, hold everything, or give up on one event.

Two rules make an outage harmless:
- the `Gate` holds every delivery while the integration is down (401/403/404, or a run
  of transient failures with no success), letting one probe through at a time (every
  0.5 s doubling to at most 5 s, or later when Retry-After says so: a probe is one
  request), so a dead Userpilot is not hammered and partitions back up (and get paused)
  instead of failing;
- an event is given up (dead-lettered) only after it had its attempts *while Userpilot
  was answering*: only attempts admitted while the gate was up count, each after the
  first only if some delivery succeeded since this event's previous attempt, and the
  time budget runs on the gate's up-clock (time held by the gate is not spent). Failing
  alone is evidence about the event; everything failing is evidence about Userpilot, and
  the event waits however long the outage lasts.
Backoff is exponential with full jitter (tenacity), and honours Retry-After; none at a
closed gate, whose probes pace the events waiting there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type
from tenacity.wait import wait_random_exponential

from consumer.answers import excerpt
from consumer.errors import (
    DeadLetter,
    Pause,
    RateLimited,
    Refused,
    RefusedAlone,
    Retry,
    TlsRefused,
    WorkerError,
)

__all__ = ["PROBE_BASE_S", "PROBE_MAX_S", "REFUSED_ALONE", "Attempts", "Gate", "Hold",
           "RetryPolicy", "quoting"]

log = logging.getLogger(__name__)

PROBE_BASE_S = 0.5
PROBE_MAX_S = 5.0
REFUSED_ALONE = 3
"""401/403/404 answers to one event, with other events delivered in between, after which it
is dead-lettered (`RetryPolicy._refused_alone`)."""

GateState = Literal["up", "outage", "misconfigured"]


class Hold(Protocol):
    """What an attempt holds from before its rate slot until its answer (the handler's
    connection permit, `permits.Permit`): a slot is taken only by a request that can then
    go out at once. Given back while the attempt waits at a closed gate: the probe the
    gate lets through must be able to take one."""

    async def acquire(self) -> None: ...
    def release(self) -> None: ...


def quoting(exc: WorkerError) -> str:
    """A failure as `/readyz` and the pause line say it: its text, and the answer that
    caused it, when there was one (a proxy's block page says why; review "egress59")."""
    body = getattr(exc, "body", "") or ""
    shown = excerpt(body) if body.strip() else ""
    return f"{exc} (answer: {shown})" if shown else str(exc)


class Gate:
    """Open when Userpilot works; closed (one probe at a time) during outages or misconfig.

    It also keeps the *up-clock*: seconds spent open. Retry budgets run on it, so time an
    event spends held by a closed gate is never charged to the event.

    A closed gate is probed by the requests of the events that wait at it; it counts the
    events in their attempts (`enter`, `leave`), and when the last leaves while it is
    closed (their partitions were taken away), nothing would ever probe it again: it
    reopens, and the next event's request tells. Left closed, a replica reported "token
    refused" (unready, `userpilot_integration_up` 0) for ever after the token worked again,
    while another replica delivered the same events (review "ops17").
    """

    def __init__(
        self, *, outage_after: int = 10, probe_base_s: float = PROBE_BASE_S,
        probe_max_s: float = PROBE_MAX_S, clock: Callable[[], float] = time.monotonic,
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
        self._succeeded: dict[str, float] = {}  # per endpoint: its last delivery
        self._sent_ok: dict[str, float] = {}  # per endpoint: when its latest delivered request
        # went out (`sent_ok_since`)
        self._failing: dict[str, set[int]] = {}  # per endpoint: events whose last attempt failed
        self._consecutive = 0
        # Of those, the TLS refusals: only as many as close the gate, and most of the run,
        # are a setting (`transient_failure`; reviews "diff59b", "diff59c").
        self._tls_run = 0
        self._probe_delay = probe_base_s
        self._next_probe = 0.0
        self._probing = False
        self._changed = asyncio.Event()
        self._up_total = 0.0
        self._up_since: float | None = clock()
        self._running = 0  # events in their attempts (`enter` .. `leave`)
        self._watches: dict[asyncio.Task[object], _Watch] = {}  # waits a closing cuts short

    def up_time(self) -> float:
        """Seconds the gate has been open since it was made (the retry budgets' clock)."""
        if self._up_since is None:
            return self._up_total
        return self._up_total + self._clock() - self._up_since

    async def admit(self) -> bool:
        """Wait until a request may be sent; True when this caller is the probe."""
        while self.state != "up":
            now = self._clock()
            if not self._probing and now >= self._next_probe:
                self._probing = True
                log.debug("probe: one request to see whether Userpilot works again (%s)",
                          self.state)
                return True
            self._changed.clear()
            timeout = max(0.01, self._next_probe - now) if not self._probing else None
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a
            # cancellation that arrives as the wait ends (the task would then send).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._changed.wait()
        return False

    def watch(self) -> _Watch:
        """``async with gate.watch() as w:`` — a wait for a rate slot that the gate closing
        cuts short (``w.cut`` is then True and the block ends without an error).

        Why: an attempt admitted while the gate was up queues for its rate slot holding a
        connection permit. When the gate closed meanwhile, each queued attempt still took a
        slot at the slowed rate before it looked at the gate and gave its permit back, and
        the probe the gate let through waited behind up to 64 of them: delivery was silent
        for 15 s after a 15 s spell of 429s (31 s on one shared budget; review "rate21").
        Cut short, they give their permits back at once and reserve nothing more."""
        return _Watch(self)

    def enter(self) -> None:
        """An event starts its attempts."""
        self._running += 1

    def leave(self) -> None:
        """An event's attempts ended: delivered, given up, or taken away (cancelled)."""
        self._running -= 1
        if self._running == 0 and self.state != "up":
            self._consecutive = 0
            self._tls_run = 0
            self._probe_delay = self._probe_base
            self._probing = False
            self._set("up", "", reopened=True)

    def _set(self, state: GateState, detail: str, *, reopened: bool = False) -> None:
        if state != self.state:
            now = self._clock()
            if self._up_since is not None:
                self._up_total += now - self._up_since
            self._up_since = now if state == "up" else None
            was = self.state
            self.state = state
            self.detail = detail
            if was == "up":
                self._cut_watches()
            if reopened:
                log.warning("no event waits for Userpilot any more (%s before): the next "
                            "request tells whether it works", was)
            elif state == "up":
                log.warning("Userpilot answers again; delivery resumes")
            else:
                log.error("delivery paused (%s): %s", state, detail)
            if self._on_change is not None:
                self._on_change(state, detail)
        self._changed.set()

    def _cut_watches(self) -> None:
        current = asyncio.current_task() if self._watches else None
        for task, watch in list(self._watches.items()):
            # Never the running task: its cancellation would land at its next await,
            # wherever that is; it sees the closed gate itself when its wait returns.
            if task is not current and not watch.cut:
                watch.cut = True
                task.cancel("the outage gate closed")
        self._watches.clear()

    def success(self, probe: bool = False, endpoint: str = "",
                sent: float | None = None) -> None:
        """Delivered (a request that went out at `sent`): Userpilot works, and this is
        evidence for giving up on other events of the same endpoint (`last_success_of`)."""
        self.last_success = self._succeeded[endpoint] = self._clock()
        if sent is not None:
            self._sent_ok[endpoint] = max(sent, self._sent_ok.get(endpoint, sent))
        self.answered(probe)

    def sent_ok_since(self, endpoint: str | None, when: float) -> bool:
        """A request to `endpoint` that went out after `when` was delivered. By send time,
        not answer time: a request sent before a token was revoked and answered after an
        event's refusal says nothing of the token now (review "diff33")."""
        if endpoint is None:
            return any(sent > when for sent in self._sent_ok.values())
        return self._sent_ok.get(endpoint, -1e18) > when

    def failing(self, endpoint: str, event: int, failed: bool) -> None:
        """`event` (its `Attempts`' id) failed on `endpoint`, transiently or refused (True),
        or its attempts ended or succeeded (False)."""
        events = self._failing.setdefault(endpoint, set())
        if failed:
            events.add(event)
        else:
            events.discard(event)

    def failing_alone(self, endpoint: str, event: int) -> bool:
        """No other event's last attempt on `endpoint` failed: its failures are its own."""
        return self._failing.get(endpoint, set()) <= {event}

    def evidence(self, endpoint: str | None, event: int, since: float) -> bool:
        """A delivery since `since` says Userpilot works for `endpoint`: one to that
        endpoint; or, while no other event fails on it, one to any endpoint (a single
        payload that `/v1/companies/identify` keeps answering 500 is given up, not held for
        ever on a low-traffic endpoint; review "diff33")."""
        if self.last_success_of(endpoint) > since:
            return True
        return (endpoint is not None and self.last_success > since
                and self.failing_alone(endpoint, event))

    def last_success_of(self, endpoint: str | None) -> float:
        """When a request to `endpoint` was last delivered (None: to any endpoint).

        Why per endpoint: Userpilot's paths fail apart (a /v1/track answering 503 while
        /v1/identify works). Counted on any endpoint, identifies succeeding made every Track
        give up: its events were dead-lettered as retries_exhausted and the DLQ guard
        stopped the worker, on every restart (review "http33")."""
        if endpoint is None:
            return self.last_success
        return self._succeeded.get(endpoint, -1e18)

    def answered(self, probe: bool = False) -> None:
        """Userpilot answered (e.g. 400 for one payload): it is reachable and the token works."""
        self._consecutive = 0
        self._tls_run = 0
        self._probe_delay = self._probe_base
        if probe:
            self._probing = False
        if self.state != "up":
            self._set("up", "")

    def _probe_wait(self, retry_after: float | None) -> float:
        """Jittered probe delay, never shorter than what Retry-After asked for."""
        return max(self._probe_delay * random.uniform(0.8, 1.2), retry_after or 0.0)

    def _failed_probe(self, probe: bool, retry_after: float | None = None) -> None:
        if probe and self.state == "up":
            # Its failure came after another request reopened the gate: no outage to
            # pace, and the next one starts probing at the base delay again.
            self._probing = False
            self._changed.set()
        elif probe:
            self._probing = False
            wait = self._probe_wait(retry_after)
            self._next_probe = self._clock() + wait
            self._probe_delay = min(self._probe_max, self._probe_delay * 2)
            log.debug("probe failed; the next in %.2f s", wait)
            self._changed.set()

    def transient_failure(self, exc: Retry, probe: bool = False) -> None:
        self._consecutive += 1
        self._tls_run += isinstance(exc, TlsRefused)
        # A TLS refusal that lasts is a setting: /readyz and integration_up say so. One
        # among other failures is not: a struggling node's handshake alert turned a plain
        # 5xx outage "misconfigured" until it ended, paging as a wrong token (diff59b). Nor
        # need they be unbroken: an untrusted CA with a timeout every few tries stayed an
        # outage for hours, the pod ready (diff59c).
        lasting_tls = (self._tls_run >= self._outage_after
                       and 2 * self._tls_run > self._consecutive)
        if self.state == "up" and self._consecutive >= self._outage_after:
            self._next_probe = self._clock() + self._probe_wait(exc.retry_after)
            hint = ("; Userpilot is limiting this token: another sender uses it, or "
                    "USERPILOT_RATE_LIMIT is above its limit" if isinstance(exc, RateLimited)
                    else "")  # a run of 429s read as an outage (review "faults28")
            state: GateState = "misconfigured" if lasting_tls else "outage"
            self._set(state, f"{self._consecutive} failures in a row, last: "
                             f"{quoting(exc)}{hint}")
        elif self.state == "outage" and lasting_tls:
            self._set("misconfigured",
                      f"{self._consecutive} failures in a row, last: {quoting(exc)}")
        elif self.state != "up" and exc.retry_after:
            # An answer that came after the gate closed: its event waits at the gate now,
            # not in its own backoff, so its Retry-After holds the probes (review "diff27").
            self._next_probe = max(self._next_probe, self._clock() + exc.retry_after)
        self._failed_probe(probe, exc.retry_after)

    def misconfigured(self, exc: Pause, probe: bool = False) -> None:
        if self.state != "misconfigured":
            self._next_probe = self._clock() + self._probe_wait(None)
            self._set("misconfigured", quoting(exc))
        self._failed_probe(probe)

    def release(self, probe: bool) -> None:
        """A probe that ended without an answer (cancelled) frees the probe slot."""
        if probe:
            log.debug("probe ended unanswered; the next waiting request probes")
            self._probing = False
            self._changed.set()


class _Replay:
    """An attempt function whose first call raises the first attempt's failure (made
    outside tenacity, `RetryPolicy.run`), and whose later calls make the attempt."""

    __slots__ = ("_failure",)

    def __init__(self, failure: BaseException) -> None:
        self._failure: BaseException | None = failure

    async def __call__(self, attempt: Callable[..., Awaitable[None]], *args: object) -> None:
        failure, self._failure = self._failure, None
        if failure is not None:
            try:
                raise failure
            finally:
                # The traceback keeps this frame: holding the failure too, it would be a
                # cycle left to the garbage collector.
                del failure
        await attempt(*args)


class _Watch:
    """One attempt's wait for its rate slot, cut short when the gate closes (`Gate.watch`).

    The cancellation is told apart from any other the way `asyncio.timeout` does: the
    gate cancels the task once and marks the watch; on the way out the mark and the task's
    own count of pending cancellations (`uncancel`) say whether that was the only one. A
    revoke or shutdown arriving too still propagates."""

    __slots__ = ("_gate", "_task", "cut")

    def __init__(self, gate: Gate) -> None:
        self._gate = gate
        self._task: asyncio.Task[object] | None = None
        self.cut = False

    async def __aenter__(self) -> _Watch:
        task = asyncio.current_task()
        if task is not None and self._gate.state == "up":
            self._task = task
            self._gate._watches[task] = self
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: object) -> bool:
        task = self._task
        if task is None:
            return False
        self._gate._watches.pop(task, None)
        # True (the error is swallowed, the wait ends here) only for the gate's
        # cancellation alone; `uncancel` balances the gate's `cancel` either way.
        return self.cut and task.uncancel() == 0 and exc_type is asyncio.CancelledError


@dataclass
class Attempts:
    """Bookkeeping of one event's attempts (for DLQ headers, metrics and giving up).

    `count` is every attempt (the DLQ header); `answered` only those that count against
    the budget: admitted while the gate was up, not a probe, and (after the first) with
    a delivery succeeding since this event's previous attempt.
    """

    count: int = 0
    answered: int = 0
    first_wall: float | None = None
    last_wall: float | None = None
    first_mono: float = 0.0  # monotonic time of the first answered attempt
    first_up: float = 0.0  # the gate's up-clock at the first answered attempt
    last_mono: float | None = None  # monotonic time of the previous attempt, any kind
    # Monotonic time of the first attempt, any kind: how long the event has been in its
    # attempts (the worker's HOT_STALL_S); `first_wall` is for the DLQ headers only.
    first_started: float | None = None
    limited_up: float = 0.0  # up-clock seconds from each 429 to the next attempt: not spent
    limited_since: float | None = None  # the up-clock at the last 429, until the next attempt
    refused: int = 0  # 401/403/404 answers with a delivery succeeding since the previous one
    refused_at: float | None = None  # monotonic time of this event's last such answer


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
        self._retry_on = retry_if_exception_type((Retry, Pause))
        self._on_retry = on_retry
        self._sleep = sleep
        self._clock = clock

    def _refused_alone(self, attempts: Attempts, endpoint: str | None) -> bool:
        """After a refusal (`Refused`: 401/403/404...): True when this event was refused
        REFUSED_ALONE times with other events delivered in between each time, so the
        refusal is about it, not the token. Held for ever otherwise, one event a WAF
        blocks held its partition's commits and readiness for good, and closed the gate
        for everyone at each of its attempts (review "dlq33"). A refused token fails every
        request: no success comes in between, and delivery stays paused.

        What counts in between: a delivery to the event's own endpoint; or, while no other
        event is failing on that endpoint, one to any endpoint (the token is one for all).
        Counted on its own endpoint only, a blocked user's identify or one company identify
        a WAF refuses, on an endpoint little else goes to, was held for ever, its
        partition's commits with it, the gate flapping (Tracks at ~2 a second, the replica
        unready and UserpilotIntegrationDown firing with the token working; review
        "http35"). Counted on any endpoint whatever else failed, an endpoint refused for
        everyone (a WAF rule on /v1/identify, an account without companies) dead-lettered
        all its events and tripped the DLQ guard (review "diff35"): with others refused
        beside it, the event is held, and the pause says why."""
        now = self._clock()
        if attempts.refused_at is not None and (
                self._gate.sent_ok_since(endpoint, attempts.refused_at)
                or (endpoint is not None
                    and self._gate.sent_ok_since(None, attempts.refused_at)
                    and self._gate.failing_alone(endpoint, id(attempts)))):
            attempts.refused += 1
        attempts.refused_at = now
        return attempts.refused >= REFUSED_ALONE - 1

    def spent(self, attempts: Attempts, endpoint: str | None = None) -> bool:
        """True when the event may be given up after a transient failure.

        Its attempts made while Userpilot answered are used up, or the up-clock budget
        since the first of them is; and a delivery to its endpoint (None: any) succeeded
        since then; and the gate is still up (a failure that closed it is evidence about
        Userpilot, not the event).
        """
        if attempts.answered == 0 or self._gate.state != "up":
            return False
        spent_up = self._gate.up_time() - attempts.first_up - attempts.limited_up
        used = attempts.answered >= self._max_attempts or spent_up >= self._budget
        return used and self._gate.evidence(endpoint, id(attempts), attempts.first_mono)

    def _stop(self, state: RetryCallState, attempts: Attempts, endpoint: str | None) -> bool:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, (Pause, RateLimited)):
            # A 429 says the token's budget is spent (maybe by another client sharing it),
            # never that the event is bad: retried, slower, however long it lasts.
            return False
        return self.spent(attempts, endpoint)

    def _wait(self, state: RetryCallState, attempts: Attempts) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, Pause) or self._gate.state != "up":
            # The gate does the waiting, its probes paced by its own schedule (Retry-After
            # their floor). An event asleep in its backoff is not at the gate to probe it:
            # with few users waiting, each failed probe sent its event to sleep up to
            # USERPILOT_RETRY_BACKOFF_MAX_SECONDS (60 s), and delivery resumed up to ~54 s
            # after Userpilot did (review "outage26", simulated with the defaults).
            return 0.0
        backoff = float(self._jitter(state))
        # The budget left, once it runs: the last attempt comes at its end, not a backoff
        # past it (a 60 s backoff against a 2 s budget held its event 58 s, review
        # "extremes54"). Once it is spent, an event still held (its endpoint failing for
        # everyone: no evidence against it) waits its backoff again (review "diff42").
        # Not a 429's: its waits use none of the budget (`limited_up`), and capped by it a
        # spell of 429s near the budget's end was retried every few seconds (diff54c).
        left = (self._budget - (self._gate.up_time() - attempts.first_up
                                - attempts.limited_up)
                if attempts.answered and not isinstance(exc, RateLimited) else 0.0)
        if isinstance(exc, Retry) and exc.retry_after is not None:
            asked = exc.retry_after + random.uniform(0, 0.1 * exc.retry_after + 0.05)
            if isinstance(exc, RateLimited) and exc.retry_after > 0:
                return asked  # the token's budget: Userpilot's word on when it refills
            # Otherwise a floor (RFC 9110: the minimum to wait), never a shortcut: a
            # brown-out answering 503 with "Retry-After: 0" (or a date already past, with
            # clock skew) used up an event's attempts in 10 s and dead-lettered it.
            # But not past the budget's end: a path answering "503 Retry-After: 600" held
            # its event 1,233 s against the documented 900 (review "rate42").
            return min(max(backoff, asked), left) if left > 0 else max(asked, backoff)
        return min(backoff, left) if left > 0 else backoff

    def _before_sleep(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        if self._on_retry is not None and isinstance(exc, (Retry, Pause)):
            self._on_retry(exc)

    async def run(self, send: Callable[[], Awaitable[None]], attempts: Attempts,
                  before_send: Callable[[], Awaitable[None]] | None = None,
                  hold: Hold | None = None, endpoint: str | None = None) -> None:
        """Call `send` until it returns; re-raises the last error when the event is given up.

        Each attempt: the gate, then `hold` (taken), then `before_send` (the rate slot),
        then `send`; `hold` is given back once the attempt ends, however it ends.

        Called form, not `async for attempt in retrying`: the iterator keeps its call state
        on the retrying object, which points back at it. And tenacity keeps the actions of
        its last step (bound to the retrying object) after the call: cleared here. Both were
        reference cycles, ~40 objects per event left to the garbage collector: at 2,000
        events/s two full collections a second, and the memory of every event finished
        since the last one (RESULTS.md, "Round 8"). Without them the event's retry state is
        freed the moment it ends. An event that ends in an exception (dead-lettered, given
        up, cancelled) would keep one more: the exception's traceback holds tenacity's frame,
        whose call state holds the exception. The finished frames' locals are cleared (the
        traceback's lines stay).

        One `AsyncRetrying` per call, never shared: tenacity keeps a call's state per
        thread, not per task, so concurrent events would overwrite each other's.

        Made only when the first attempt failed: most requests succeed at once, and
        tenacity's machinery cost ~40 µs a call, ~5 % of the CPU of a delivered event
        (review "prof26"). It then sees that first attempt fail with the same exception
        (`_Replay`), so every attempt, the first too, is stopped, waited for and reported
        by the same rules.
        """
        self._gate.enter()
        try:
            try:
                await self._once(send, attempts, before_send, hold, endpoint)
                return
            except (Retry, Pause) as exc:
                first = _Replay(exc)
            retrying = AsyncRetrying(
                retry=self._retry_on,
                stop=lambda s: self._stop(s, attempts, endpoint),
                wait=lambda s: self._wait(s, attempts),
                sleep=self._sleep,
                before_sleep=self._before_sleep,
                reraise=True,
            )
            try:
                await retrying(first, self._once, send, attempts, before_send, hold,
                               endpoint)
            finally:
                retrying.iter_state.reset()
        except BaseException as exc:
            if exc.__traceback__ is not None:  # this frame runs on: from the next one
                traceback.clear_frames(exc.__traceback__.tb_next)
            raise
        finally:
            if endpoint is not None:
                self._gate.failing(endpoint, id(attempts), False)
            self._gate.leave()

    async def _once(self, send: Callable[[], Awaitable[None]], attempts: Attempts,
                    before_send: Callable[[], Awaitable[None]] | None,
                    hold: Hold | None, endpoint: str | None = None) -> None:
        probe = await self._gate.admit()
        counted = held = False
        try:
            while True:
                if hold is not None:
                    await hold.acquire()
                    held = True
                if before_send is None:
                    break
                if probe:
                    await before_send()
                    break
                if self._gate.state == "up":
                    async with self._gate.watch() as watch:
                        await before_send()
                    if not watch.cut and self._gate.state == "up":
                        break  # (cut short, it has no slot, even if the gate reopened since)
                # The gate closed while this waited for its connection or its rate slot
                # (requests ahead of it found the outage; the slot's wait is cut short the
                # moment it closes, `Gate.watch`): wait at the gate again, then for both
                # again. Admitted once, a window of events went on to a Userpilot that
                # timed out, at the limiter's pace, ~185 requests in 25 s past the
                # gate's "one probe at a time" (review "slowup20"); and each spent a slot
                # of the budget before it looked (review "permits21"). Without its hold
                # meanwhile: the probe the gate lets through may need it.
                if hold is not None and held:
                    held = False
                    hold.release()
                probe = await self._gate.admit()
            now = self._clock()
            if attempts.limited_since is not None:  # waiting out a 429 spends no budget
                attempts.limited_up += max(0.0, self._gate.up_time() - attempts.limited_since)
                attempts.limited_since = None
            if not probe and self._gate.state == "up" and (
                    attempts.answered == 0 or attempts.last_mono is None
                    or self._gate.evidence(endpoint, id(attempts), attempts.last_mono)):
                if attempts.answered == 0:
                    attempts.first_mono = now
                    attempts.first_up = self._gate.up_time()
                attempts.answered += 1
                counted = True
            attempts.last_mono = now
            if attempts.first_started is None:
                attempts.first_started = now
            attempts.count += 1
            attempts.last_wall = time.time()
            if attempts.first_wall is None:
                attempts.first_wall = attempts.last_wall
            await send()
        except Retry as exc:
            if isinstance(exc, RateLimited):  # not evidence about the event: no budget
                if counted:
                    attempts.answered -= 1
                attempts.limited_since = self._gate.up_time()
            elif endpoint is not None:
                self._gate.failing(endpoint, id(attempts), True)
            self._gate.transient_failure(exc, probe)
            raise
        except Pause as exc:
            # Userpilot's own refusals only: a proxy's (407, a 403 to CONNECT) or a redirect
            # is about the setting whatever else gets through (review "diff33").
            refusal = isinstance(exc, Refused)
            if refusal and endpoint is not None:
                self._gate.failing(endpoint, id(attempts), True)  # for `failing_alone`
            if refusal and self._refused_alone(attempts, endpoint):
                self._gate.answered(probe)  # the token works: others got through
                raise RefusedAlone(
                    f"{exc} (refused {attempts.refused + 1} times for this event alone: "
                    "other events were delivered with the same token in between)",
                    status=exc.status, body=exc.body) from None
            self._gate.misconfigured(exc, probe)
            raise
        except DeadLetter:
            self._gate.answered(probe)
            raise
        except BaseException:
            self._gate.release(probe)
            raise
        else:
            self._gate.success(probe, endpoint or "", sent=now)
            if endpoint is not None:
                self._gate.failing(endpoint, id(attempts), False)
        finally:
            if hold is not None and held:
                hold.release()
