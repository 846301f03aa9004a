"""Unit tests for consumer.policy: the outage gate and the per-event retry policy."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable

import pytest
from tenacity.wait import wait_random_exponential

from consumer.delivery import classify
from consumer.errors import (
    ConnectionFailed,
    Pause,
    ProxyRefused,
    RateLimited,
    Refused,
    RefusedAlone,
    Rejected,
    Retry,
    ServerError,
    Timeout,
    TlsRefused,
    UndecodableEvent,
    WorkerError,
)
from consumer.permits import PermitPool
from consumer.policy import (
    PROBE_BASE_S,
    PROBE_MAX_S,
    REFUSED_ALONE,
    Attempts,
    Gate,
    RetryPolicy,
)


class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeSleep:
    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.slept: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.clock.now += seconds
        await asyncio.sleep(0)


class Stopped(Exception):
    """Ends a test that would otherwise retry forever (not a Retry, so not retried)."""


def run(coro: Awaitable[object]) -> object:
    async def main() -> object:
        return await asyncio.wait_for(coro, 5.0)
    return asyncio.run(main())


# ------------------------------------------------------------------ Gate


def test_gate_closes_after_n_consecutive_transient_failures() -> None:
    changes: list[tuple[str, str]] = []
    gate = Gate(outage_after=3, clock=FakeClock(),
                on_change=lambda state, detail: changes.append((state, detail)))
    for _ in range(2):
        gate.transient_failure(ServerError("HTTP 503"))
    assert gate.state == "up"
    gate.transient_failure(ServerError("HTTP 503"))
    assert gate.state == "outage"
    assert changes == [("outage", "3 failures in a row, last: HTTP 503")]
    gate.transient_failure(ServerError("HTTP 503"))
    assert len(changes) == 1  # no repeat notification while already in outage


def test_a_lasting_tls_refusal_closes_the_gate_as_misconfigured_one_stray_does_not() -> None:
    """Review "faults29": an untrusted certificate or a plain-HTTP port, retried as connection
    errors, closed the gate as an outage: the pod stayed ready. Review "r30": paused at the
    first one, a middlebox's stray bytes paused everything, and `delete-users` gave up."""
    changes: list[tuple[str, str]] = []
    gate = Gate(outage_after=3, clock=FakeClock(),
                on_change=lambda state, detail: changes.append((state, detail)))
    refused = TlsRefused("TLS: Userpilot's certificate is not trusted: set USERPILOT_CA_BUNDLE")
    gate.transient_failure(refused)
    gate.success()
    assert gate.state == "up" and changes == [], "one stray refusal is retried"
    for _ in range(3):
        gate.transient_failure(refused)
    assert gate.state == "misconfigured"
    assert "USERPILOT_CA_BUNDLE" in changes[-1][1]
    # An outage that turns out to be TLS (the last failures refusals, as many as close the
    # gate) says so too; one refusal among 5xx does not (review "diff59b": a struggling
    # node's handshake alert made a plain outage "misconfigured" until it ended).
    other = Gate(outage_after=2, clock=FakeClock())
    other.transient_failure(ServerError("HTTP 503"))
    other.transient_failure(ServerError("HTTP 503"))
    assert other.state == "outage"
    other.transient_failure(refused)
    assert other.state == "outage"
    for _ in range(5):
        other.transient_failure(ServerError("HTTP 503"))
    other.transient_failure(refused)
    assert other.state == "outage", "two refusals among eight failures: not most"
    mixed = Gate(outage_after=3, clock=FakeClock())
    for failure in (ServerError("HTTP 503"), ServerError("HTTP 503"), refused):
        mixed.transient_failure(failure)
    assert mixed.state == "outage", "closed by a run of mostly 5xx: an outage"
    # A lasting refusal with a timeout every third try is still a setting (review
    # "diff59c": it stayed an outage for hours, the pod ready).
    interleaved = Gate(outage_after=3, clock=FakeClock())
    for i in range(12):
        interleaved.transient_failure(Timeout("t") if i % 3 == 2 else refused)
    assert interleaved.state == "misconfigured"
    assert isinstance(refused, ConnectionFailed) and refused.cause == "connection_error"


def test_a_gate_closed_by_429s_says_the_token_is_limited_not_only_an_outage() -> None:
    """Review "faults28": a run of 429s read "delivery paused (outage)" and nothing more."""
    changes: list[tuple[str, str]] = []
    gate = Gate(outage_after=2, clock=FakeClock(),
                on_change=lambda state, detail: changes.append((state, detail)))
    for _ in range(2):
        gate.transient_failure(RateLimited("HTTP 429"))
    assert changes == [("outage", "2 failures in a row, last: HTTP 429; Userpilot is limiting "
                        "this token: another sender uses it, or USERPILOT_RATE_LIMIT is above "
                        "its limit")]


@pytest.mark.parametrize("reset", ["success", "answered"])
def test_any_answer_resets_the_run_of_failures(reset: str) -> None:
    gate = Gate(outage_after=3, clock=FakeClock())
    for _ in range(10):
        gate.transient_failure(Timeout("t"))
        gate.transient_failure(Timeout("t"))
        getattr(gate, reset)()
    assert gate.state == "up"


def test_only_success_moves_last_success() -> None:
    clock = FakeClock(5.0)
    gate = Gate(clock=clock)
    gate.answered()
    assert gate.last_success < 0
    gate.success()
    assert gate.last_success == 5.0


def test_admit_is_free_while_up() -> None:
    gate = Gate(clock=FakeClock())
    assert run(gate.admit()) is False


def test_outage_admits_exactly_one_probe_at_a_time_and_closes_on_success() -> None:
    clock = FakeClock()
    gate = Gate(outage_after=1, probe_base_s=10.0, clock=clock)
    gate.transient_failure(ConnectionFailed("refused"))
    assert gate.state == "outage"

    async def main() -> list[object]:
        clock.now += 12.0  # the first probe is due (10 s, jittered by up to 20 %)
        first = asyncio.ensure_future(gate.admit())
        others = [asyncio.ensure_future(gate.admit()) for _ in range(3)]
        for _ in range(5):
            await asyncio.sleep(0)
        assert first.done() and first.result() is True
        assert not any(o.done() for o in others)  # everybody else waits for the probe
        gate.success(probe=True)
        return list(await asyncio.gather(*others))

    assert run(main()) == [False, False, False]
    assert gate.state == "up"


def test_probe_is_not_admitted_before_it_is_due() -> None:
    clock = FakeClock()
    # Waiting is real time (a timeout of the remaining delay), due-ness is the clock's.
    gate = Gate(outage_after=1, probe_base_s=0.02, clock=clock)
    gate.transient_failure(ServerError("HTTP 500"))

    async def main() -> bool:
        task = asyncio.ensure_future(gate.admit())
        await asyncio.sleep(0.1)
        assert not task.done()  # several re-checks happened; the fake clock says not yet
        clock.now += 0.03  # due: 0.02 s, jittered by up to 20 %
        return await task

    assert run(main()) is True


def test_failed_probes_back_off_exponentially_up_to_the_maximum() -> None:
    clock = FakeClock()
    gate = Gate(outage_after=1, probe_base_s=1.0, probe_max_s=8.0, clock=clock)
    gate.transient_failure(ServerError("HTTP 500"))
    delays = []
    for _ in range(6):
        clock.now = gate._next_probe
        assert run(gate.admit()) is True
        gate.transient_failure(ServerError("HTTP 500"), probe=True)
        delays.append(gate._next_probe - clock.now)
    expected = [1, 1, 2, 4, 8, 8, 8][1:]
    for got, base in zip(delays, expected, strict=True):
        assert 0.8 * base <= got <= 1.2 * base


def test_a_released_probe_frees_the_slot() -> None:
    clock = FakeClock()
    gate = Gate(outage_after=1, probe_base_s=0.0, clock=clock)
    gate.transient_failure(ServerError("HTTP 500"))

    async def main() -> tuple[bool, bool]:
        first = await gate.admit()
        second = asyncio.ensure_future(gate.admit())
        await asyncio.sleep(0)
        assert not second.done()
        gate.release(first)
        return first, await second

    assert run(main()) == (True, True)
    assert gate.state == "outage"


def test_a_pause_or_an_outage_quotes_the_answer_that_caused_it() -> None:
    """Review "egress59": a TLS-inspecting proxy's block page said why (an expired upstream
    certificate) while `/readyz` and the pause line said only "token refused"."""
    gate = Gate(outage_after=2, clock=FakeClock())
    page = "<html><body>\n  <h1>Blocked</h1>   upstream certificate expired</body></html>"
    gate.misconfigured(Refused("HTTP 403: refused with an HTML page", status=403, body=page))
    assert gate.detail == ("HTTP 403: refused with an HTML page (answer: Blocked upstream "
                           "certificate expired)")
    outage = Gate(outage_after=2, clock=FakeClock())
    for _ in range(2):
        outage.transient_failure(ServerError("HTTP 503: Userpilot error (transient)",
                                             status=503, body="x" * 500))
    assert outage.detail.endswith("(answer: " + "x" * 160 + "…)")
    quiet = Gate(outage_after=2, clock=FakeClock())
    quiet.misconfigured(Refused("HTTP 401: token refused", status=401, body="  "))
    assert quiet.detail == "HTTP 401: token refused"


def test_misconfigured_state_holds_everything_until_an_answer() -> None:
    changes: list[str] = []
    clock = FakeClock()
    gate = Gate(probe_base_s=0.02, clock=clock, on_change=lambda s, d: changes.append(s))
    gate.misconfigured(Refused("HTTP 401: token refused"))
    assert (gate.state, gate.detail) == ("misconfigured", "HTTP 401: token refused")

    async def main() -> bool:
        task = asyncio.ensure_future(gate.admit())
        await asyncio.sleep(0.1)
        assert not task.done()
        clock.now += 0.03  # due: 0.02 s, jittered by up to 20 %
        probe = await task
        gate.misconfigured(Refused("HTTP 401: token refused"), probe=probe)
        assert gate.state == "misconfigured"
        clock.now += 100.0
        probe = await gate.admit()
        gate.answered(probe=probe)  # e.g. a 400: the token works again
        return probe

    assert run(main()) is True
    assert gate.state == "up"
    assert changes == ["misconfigured", "up"]


def test_misconfigured_during_an_outage_switches_state() -> None:
    gate = Gate(outage_after=1, clock=FakeClock())
    gate.transient_failure(Timeout("t"))
    gate.misconfigured(Refused("HTTP 404"))
    assert (gate.state, gate.detail) == ("misconfigured", "HTTP 404")


# ------------------------------------------------------------------ RetryPolicy


class Script:
    """A send() that raises the scripted outcomes in turn (None = delivered)."""

    def __init__(self, outcomes: Iterable[BaseException | None],
                 side: Callable[[int], None] | None = None) -> None:
        self.outcomes = list(outcomes)
        self.calls = 0
        self.side = side

    async def __call__(self) -> None:
        self.calls += 1
        if self.side is not None:
            self.side(self.calls)
        outcome = self.outcomes[min(self.calls, len(self.outcomes)) - 1]
        if outcome is not None:
            raise outcome


def policy(gate: Gate, clock: FakeClock, sleep: FakeSleep, *, max_attempts: int = 3,
           budget_s: float = 1e9, seen: list[Retry | Pause] | None = None) -> RetryPolicy:
    return RetryPolicy(gate, max_attempts=max_attempts, budget_s=budget_s,
                       backoff_multiplier_s=1.0, backoff_max_s=60.0,
                       on_retry=None if seen is None else seen.append,
                       sleep=sleep, clock=clock)


def setup(outage_after: int = 1000) -> tuple[FakeClock, FakeSleep, Gate]:
    clock = FakeClock()
    return clock, FakeSleep(clock), Gate(outage_after=outage_after, probe_base_s=0.0,
                                         clock=clock)


def delivered_between(clock: FakeClock, gate: Gate, endpoint: str,
                      sent_ago: float | None = 0.5) -> Callable[[int], None]:
    """A Script side effect: before each attempt, a second passes and another event's
    request to `endpoint`, sent `sent_ago` seconds earlier (None: untold), is delivered."""
    def deliver(_call: int) -> None:
        clock.now += 1.0
        gate.success(endpoint=endpoint,
                     sent=None if sent_ago is None else clock.now - sent_ago)
    return deliver


def test_retries_transient_errors_with_growing_jittered_backoff() -> None:
    clock, sleep, gate = setup()
    errors: list[BaseException | None] = [ServerError("500"), Timeout("t"),
                                          ConnectionFailed("c"), ServerError("502"), None]
    send = Script(errors)
    seen: list[Retry | Pause] = []
    attempts = Attempts()
    run(policy(gate, clock, sleep, max_attempts=100, seen=seen).run(send, attempts))
    assert send.calls == 5
    assert attempts.count == 5
    assert attempts.first_wall is not None and attempts.last_wall is not None
    assert attempts.first_wall <= attempts.last_wall
    assert seen == errors[:4]
    assert len(sleep.slept) == 4
    for n, waited in enumerate(sleep.slept, start=1):
        assert 0.0 <= waited <= 2.0 ** n  # full jitter over 1, 2, 4, 8 s
    assert gate.state == "up"
    assert gate.last_success == clock.now


def test_honours_retry_after() -> None:
    clock, sleep, gate = setup()
    send = Script([RateLimited("429", retry_after=30.0), ServerError("503", retry_after=2.0),
                   None])
    run(policy(gate, clock, sleep, max_attempts=100).run(send, Attempts()))
    assert len(sleep.slept) == 2
    assert 30.0 <= sleep.slept[0] <= 30.0 + 3.05
    assert 2.0 <= sleep.slept[1] <= 4.0  # a 5xx's Retry-After is a floor under the backoff


def test_a_retry_after_of_zero_or_past_does_not_replace_the_backoff() -> None:
    """A brown-out answering 503 with "Retry-After: 0" (or a date already past) had each
    retry sent at once: an event used its 12 attempts in 10 s and was dead-lettered."""
    clock, sleep, gate = setup()
    send = Script([ServerError("503", retry_after=0.0)] * 3
                  + [RateLimited("429", retry_after=0.0), RateLimited("429", retry_after=1.0),
                     None])
    retrying = policy(gate, clock, sleep, max_attempts=100)
    retrying._jitter = wait_random_exponential(multiplier=5.0, min=5.0, max=5.0)
    run(retrying.run(send, Attempts()))
    assert sleep.slept[:4] == [5.0] * 4
    assert 1.0 <= sleep.slept[4] <= 1.15  # a 429's own Retry-After: Userpilot's word


def test_never_gives_up_while_nothing_else_succeeds() -> None:
    """Everything failing is evidence about Userpilot: the event waits, it is not dropped."""
    clock, sleep, gate = setup()
    send = Script([ServerError("503")] * 30 + [Stopped()])
    with pytest.raises(Stopped):
        run(policy(gate, clock, sleep, max_attempts=3, budget_s=10.0).run(send, Attempts()))
    assert send.calls == 31


def test_gives_up_when_attempts_are_spent_and_another_delivery_succeeded() -> None:
    clock, sleep, gate = setup()
    last = ServerError("HTTP 500: third")

    def others_succeed(call: int) -> None:
        clock.now += 0.001
        gate.success()

    send = Script([ServerError("first"), ServerError("second"), last, Stopped()],
                  others_succeed)
    with pytest.raises(ServerError) as info:
        run(policy(gate, clock, sleep, max_attempts=3).run(send, Attempts()))
    assert info.value is last
    assert send.calls == 3


def test_an_attempt_counts_only_when_a_delivery_succeeded_since_the_previous_one() -> None:
    clock, sleep, gate = setup()

    def success_before_every_other_call(call: int) -> None:
        if call % 2 == 0:
            clock.now += 0.001
            gate.success()

    send = Script([ServerError("503")] * 6 + [Stopped()], success_before_every_other_call)
    attempts = Attempts()
    with pytest.raises(ServerError):
        run(policy(gate, clock, sleep, max_attempts=3).run(send, attempts))
    # Counted: 1 (first), 3 (success during 2), 5 (success during 4).
    assert (send.calls, attempts.count, attempts.answered) == (5, 5, 3)


def test_a_success_before_the_first_attempt_does_not_count() -> None:
    clock, sleep, gate = setup()
    gate.success()  # long before this event
    clock.now += 50
    send = Script([ServerError("503")] * 10 + [Stopped()])
    with pytest.raises(Stopped):
        run(policy(gate, clock, sleep, max_attempts=3).run(send, Attempts()))
    assert send.calls == 11


def test_gives_up_when_the_time_budget_is_spent_and_another_delivery_succeeded() -> None:
    clock, sleep, gate = setup()

    send = Script([ServerError("503", retry_after=4.0)] * 100, lambda call: gate.success())
    with pytest.raises(ServerError):
        run(policy(gate, clock, sleep, max_attempts=1000, budget_s=10.0).run(send, Attempts()))
    assert send.calls == 4  # ~4.2 s per wait: the 4th failure is past 10 s


def test_a_long_retry_after_does_not_stretch_the_time_budget() -> None:
    """A 5xx's Retry-After is a floor, but not past the budget's end by more than a
    backoff: "503 Retry-After: 600" on one path held its event 1,233 s against the
    documented 900 (review "rate42")."""
    clock, sleep, gate = setup()
    first = clock.now
    send = Script([ServerError("503", retry_after=600.0)] * 100,
                  delivered_between(clock, gate, "track"))
    with pytest.raises(ServerError):
        run(policy(gate, clock, sleep, max_attempts=1000, budget_s=900.0).run(
            send, Attempts(), endpoint="track"))
    assert clock.now - first <= 900 + 60 + 5  # the budget, one backoff, the 1 s steps
    assert send.calls == 3  # 0, ~600 s (Retry-After), ~900 s (the budget's end)
    assert 600.0 <= sleep.slept[0] <= 660.05


def test_a_held_event_past_its_budget_still_honours_retry_after() -> None:
    """Its endpoint failing for everyone, an event past its budget is held (no evidence
    against it), and waits the floor again: the first cap dropped it, and such an event
    retried a path answering "503 Retry-After: 600" every few seconds (review "diff42")."""
    clock, sleep, gate = setup()
    gate.failing("track", 12345, True)  # another Track fails too: /v1/track is down

    def side(_call: int) -> None:
        clock.now += 1.0
        gate.success(endpoint="identify", sent=clock.now - 0.5)  # identifies work

    send = Script([ServerError("503", retry_after=600.0)] * 8 + [Stopped("end")], side)
    with pytest.raises(Stopped):
        run(policy(gate, clock, sleep, max_attempts=1000, budget_s=900.0).run(
            send, Attempts(), endpoint="track"))
    assert len(sleep.slept) == 8
    assert sleep.slept[0] >= 600.0  # the floor, inside the budget
    assert sleep.slept[1] < 600.0  # the budget's end: its last attempt there
    assert all(wait >= 600.0 for wait in sleep.slept[2:]), sleep.slept


def test_never_gives_up_on_429_however_long_while_other_deliveries_succeed() -> None:
    """A 429 says the token's budget is spent (another client may share it), not that the
    event is bad: it neither ends the event nor uses up its attempts or time budget."""
    clock, sleep, gate = setup()
    send = Script([RateLimited("429", retry_after=4.0)] * 50 + [None],
                  lambda call: gate.success())
    attempts = Attempts()
    run(policy(gate, clock, sleep, max_attempts=2, budget_s=10.0).run(send, attempts))
    assert send.calls == 51
    assert attempts.count == 51 and attempts.answered == 1  # only the delivering attempt


def test_429s_after_a_counted_failure_do_not_use_up_its_time_budget() -> None:
    """The time spent waiting out 429s is not spent from the budget either, whatever came
    first (the first fix undid only the attempt count)."""
    clock, sleep, gate = setup()
    send = Script([ServerError("503")] + [RateLimited("429", retry_after=4.0)] * 100
                  + [ServerError("503"), None], lambda call: gate.success())
    run(policy(gate, clock, sleep, max_attempts=1000, budget_s=60.0).run(send, Attempts()))
    assert send.calls == 103  # ~400 s of 429s, then a 503 inside the 60 s budget, then 2xx


def test_429s_leave_the_attempts_budget_to_the_failures_that_are_evidence() -> None:
    clock, sleep, gate = setup()
    send = Script([RateLimited("429", retry_after=1.0)] * 5 + [ServerError("503"), None],
                  lambda call: gate.success())
    run(policy(gate, clock, sleep, max_attempts=2).run(send, Attempts()))
    assert send.calls == 7  # the 503 was the first counted attempt; the 2nd delivered


def test_never_gives_up_on_pause_while_nothing_else_is_delivered() -> None:
    """A refused token refuses every request: the event waits however long it lasts."""
    clock, sleep, gate = setup()
    gate.success()  # before the token was refused

    def time_passes(call: int) -> None:
        clock.now += 100.0  # budget long spent

    send = Script([Refused("HTTP 401")] * 20 + [None], time_passes)
    run(policy(gate, clock, sleep, max_attempts=1, budget_s=1.0).run(send, Attempts()))
    assert send.calls == 21
    assert set(sleep.slept) == {0.0}  # the gate does the waiting, not the backoff
    assert gate.state == "up"


def test_an_event_refused_while_others_are_delivered_between_is_given_up() -> None:
    """401/403/404 for this event alone, others delivered with the same token between its
    refusals: the answer is about it (a WAF rule, a blocked user). Held, it stopped its
    partition for good and closed the gate for everyone at each attempt (review "dlq33")."""
    clock, sleep, gate = setup()

    send = Script([Refused("HTTP 403: forbidden", status=403, body="waf")] * 10,
                  delivered_between(clock, gate, "track"))  # sent after the refusal
    with pytest.raises(RefusedAlone) as info:
        run(policy(gate, clock, sleep, max_attempts=12).run(send, Attempts(), endpoint="track"))
    assert send.calls == REFUSED_ALONE
    assert info.value.status == 403 and info.value.body == "waf"
    assert "refused 3 times for this event alone" in str(info.value)
    assert gate.state == "up", "the token works: the gate is not left closed"


def test_successes_count_as_evidence_only_on_the_events_own_endpoint() -> None:
    """/v1/track answering 503 while /v1/identify works: identifies delivered say nothing
    about the Tracks, which other events fail on too. Counted on any endpoint, every Track
    was dead-lettered after its attempts and the DLQ guard stopped the worker, on every
    restart (review "http33")."""
    clock, sleep, gate = setup()

    identifies_delivered = delivered_between(clock, gate, "identify")
    gate.failing("track", -1, True)  # another Track event fails too
    send = Script([ServerError("HTTP 503")] * 30 + [None], identifies_delivered)
    attempts = Attempts()
    run(policy(gate, clock, sleep, max_attempts=3).run(send, attempts, endpoint="track"))
    assert send.calls == 31, "delivered in the end, never given up"


def test_a_refusal_counts_deliveries_to_any_endpoint() -> None:
    """One company identify (or a blocked user's identify) refused while Tracks go
    through: the token works, the refusal is about the event. Counted on its own endpoint
    only, it was held for ever with its partition's commits, the gate flapping and the
    replica unready (review "http35")."""
    clock, sleep, gate = setup()
    refused = Script([Refused("HTTP 403", status=403)] * 10 + [None],
                     delivered_between(clock, gate, "track"))
    with pytest.raises(RefusedAlone):
        run(policy(gate, clock, sleep).run(refused, Attempts(), endpoint="company_identify"))
    assert refused.calls == REFUSED_ALONE
    assert gate.state == "up"


def test_an_endpoint_refused_for_everyone_holds_its_events() -> None:
    """Review diff35: counted on any endpoint whatever else failed, an endpoint refused for
    everyone (a WAF rule on /v1/identify, an account without companies) dead-lettered all
    its events and tripped the DLQ guard. With another event refused on the same endpoint,
    Tracks delivered meanwhile say nothing of it: held, delivery paused."""
    clock, sleep, gate = setup()
    gate.failing("company_identify", -1, True)  # another company identify refused too
    refused = Script([Refused("HTTP 403", status=403)] * 10 + [None],
                     delivered_between(clock, gate, "track"))
    run(policy(gate, clock, sleep).run(refused, Attempts(), endpoint="company_identify"))
    assert refused.calls == 11, "held until it went through, never dead-lettered"


def test_an_event_failing_alone_on_its_endpoint_is_given_up_on_other_endpoints_evidence(
) -> None:
    """One company identify payload that Userpilot keeps answering 500, no other event on
    that endpoint, Tracks delivered meanwhile: given up after its attempts, not held for
    ever with its partition's commits (review "diff33")."""
    clock, sleep, gate = setup()

    send = Script([ServerError("HTTP 500")] * 30, delivered_between(clock, gate, "track"))
    with pytest.raises(ServerError):
        run(policy(gate, clock, sleep, max_attempts=3).run(send, Attempts(),
                                                          endpoint="company_identify"))
    assert send.calls == 3


def test_a_refusal_counts_only_deliveries_sent_after_it() -> None:
    """Requests sent before a token was revoked and answered after an event's refusal say
    nothing of the token now: counted, a rotation dead-lettered a burst of good events as
    `refused` (review "diff33"). Nor does a proxy's refusal ever count."""
    clock, sleep, gate = setup()

    late_answers_of_earlier_requests = delivered_between(clock, gate, "track", sent_ago=100.0)
    send = Script([Refused("HTTP 401", status=401)] * 10 + [None],
                  late_answers_of_earlier_requests)
    run(policy(gate, clock, sleep).run(send, Attempts(), endpoint="track"))
    assert send.calls == 11, "paused, never dead-lettered"

    proxy = Script([ProxyRefused("the proxy refused the tunnel", status=403)] * 10 + [None],
                   delivered_between(clock, gate, "track"))
    run(policy(gate, clock, sleep).run(proxy, Attempts(), endpoint="track"))
    assert proxy.calls == 11, "a proxy's refusal is about the setting"
    # The same failures with Tracks delivered between them: given up.
    tracks = Script([ServerError("HTTP 503")] * 30,
                    delivered_between(clock, gate, "track", sent_ago=None))
    with pytest.raises(ServerError):
        run(policy(gate, clock, sleep, max_attempts=3).run(tracks, Attempts(), endpoint="track"))
    assert tracks.calls == 3


def test_pause_closes_the_gate_until_a_probe_succeeds() -> None:
    clock, sleep, gate = setup()
    states: list[str] = []
    send = Script([Pause("integration broken"), Refused("HTTP 403"), None],
                  lambda call: states.append(gate.state))
    run(policy(gate, clock, sleep).run(send, Attempts()))
    assert states == ["up", "misconfigured", "misconfigured"]
    assert gate.state == "up"


@pytest.mark.parametrize("error", [
    Rejected("HTTP 400", status=400), UndecodableEvent("bad bytes"),
])
def test_dead_letter_is_raised_at_once_without_retry(error: WorkerError) -> None:
    clock, sleep, gate = setup(outage_after=2)
    gate.transient_failure(Timeout("t"))
    send = Script([error, None])
    with pytest.raises(type(error)):
        run(policy(gate, clock, sleep).run(send, Attempts()))
    assert send.calls == 1
    assert sleep.slept == []
    gate.transient_failure(Timeout("t"))
    assert gate.state == "up"  # the 400 was an answer: the failure run was reset


def test_transient_failures_open_an_outage_and_a_probe_closes_it() -> None:
    clock, sleep, gate = setup(outage_after=3)
    states: list[str] = []
    send = Script([ServerError("503")] * 5 + [None], lambda call: states.append(gate.state))
    run(policy(gate, clock, sleep, max_attempts=100).run(send, Attempts()))
    assert states == ["up", "up", "up", "outage", "outage", "outage"]
    assert gate.state == "up"


def test_before_send_runs_before_every_attempt() -> None:
    clock, sleep, gate = setup()
    order: list[str] = []

    async def before() -> None:
        order.append("before")

    send = Script([Timeout("t"), None], lambda call: order.append("send"))
    run(policy(gate, clock, sleep).run(send, Attempts(), before_send=before))
    assert order == ["before", "send", "before", "send"]


def test_an_event_the_gate_closed_on_while_it_waited_for_its_slot_waits_at_the_gate() -> None:
    """Admitted while the gate was up, then held at the rate limiter while other requests
    found an outage: it waits for the gate's probe to succeed, then for a slot again, and
    is not sent meanwhile (review "slowup20": ~185 requests reached a timing-out Userpilot
    after the gate closed)."""
    clock = FakeClock()
    gate = Gate(outage_after=1, probe_base_s=3600.0, clock=clock)  # no probe of its own
    order: list[str] = []

    async def before() -> None:
        order.append("before")
        if order.count("before") == 1:  # others' requests time out meanwhile
            gate.transient_failure(Timeout("t"))

    send = Script([None], lambda call: order.append("send"))

    async def main() -> None:
        task = asyncio.ensure_future(
            policy(gate, clock, FakeSleep(clock)).run(send, Attempts(), before_send=before))
        await asyncio.sleep(0.1)
        assert gate.state == "outage" and order == ["before"], order
        gate.success()  # another event's probe got through
        await task

    run(main())
    assert order == ["before", "before", "send"]


class Recorded:
    """A hold on a one-permit pool that logs its taking and giving back into `order`."""

    def __init__(self, pool: PermitPool, order: list[str]) -> None:
        self.pool, self.order = pool, order

    async def acquire(self) -> None:
        await self.pool.acquire()
        self.order.append("hold")

    def release(self) -> None:
        self.pool.release()
        self.order.append("free")


def test_the_hold_comes_before_the_slot_and_is_given_back_at_a_closed_gate() -> None:
    """The connection permit is taken before the rate slot and kept until the answer; an
    event the gate closed on while it waited for its slot gives it back while it waits at
    the gate (the probe the gate lets through may need that very permit)."""
    clock = FakeClock()
    gate = Gate(outage_after=1, probe_base_s=3600.0, clock=clock)
    pool, order = PermitPool(1), list[str]()

    async def before() -> None:
        order.append("before")
        if order.count("before") == 1:
            gate.transient_failure(Timeout("t"))

    send = Script([None], lambda call: order.append("send"))

    async def main() -> None:
        task = asyncio.ensure_future(policy(gate, clock, FakeSleep(clock)).run(
            send, Attempts(), before_send=before, hold=Recorded(pool, order)))
        await asyncio.sleep(0.1)
        assert gate.state == "outage" and pool.free == 1, (order, pool.free)
        gate.success()
        await task

    run(main())
    assert order == ["hold", "before", "free", "hold", "before", "send", "free"]
    assert pool.free == 1


def test_an_attempt_the_gate_closed_on_while_it_waited_for_its_hold_takes_no_slot() -> None:
    """Handed its connection after the gate closed, it took a rate slot (a slot of the
    shared budget) before it looked at the gate (review "permits21")."""
    clock = FakeClock()
    gate = Gate(outage_after=1, probe_base_s=3600.0, clock=clock)
    pool, order = PermitPool(1), list[str]()

    async def before() -> None:
        order.append("before")

    send = Script([None], lambda call: order.append("send"))

    async def main() -> None:
        await pool.acquire()  # another request holds the only connection
        task = asyncio.ensure_future(policy(gate, clock, FakeSleep(clock)).run(
            send, Attempts(), before_send=before, hold=Recorded(pool, order)))
        await asyncio.sleep(0.05)
        gate.transient_failure(Timeout("t"))  # that request found the outage
        pool.release()
        await asyncio.sleep(0.05)
        assert order == ["hold", "free"] and gate.state == "outage", order
        gate.success()
        await task

    run(main())
    assert order == ["hold", "free", "hold", "before", "send", "free"]


def test_a_wait_for_a_slot_is_cut_short_the_moment_the_gate_closes() -> None:
    """Review "rate21": attempts queued for their rate slot (holding their connection
    permits) each took a slot at the slowed rate before they looked at the closed gate,
    and the gate's probe waited behind up to 64 of them (15 s of silence). The gate closing
    now ends their wait at once: the permit is given back, no slot is taken, and once the
    gate is up again the attempt queues for a slot anew."""
    clock = FakeClock()
    gate = Gate(outage_after=1, probe_base_s=3600.0, clock=clock)
    pool, order = PermitPool(1), list[str]()
    queue_open = asyncio.Event()  # the limiter's queue: nothing comes out while closed

    async def before() -> None:
        order.append("before")
        await queue_open.wait()
        order.append("slot")

    send = Script([None], lambda call: order.append("send"))

    async def main() -> None:
        task = asyncio.ensure_future(policy(gate, clock, FakeSleep(clock)).run(
            send, Attempts(), before_send=before, hold=Recorded(pool, order)))
        await asyncio.sleep(0.05)
        assert order == ["hold", "before"]
        gate.transient_failure(Timeout("t"))  # another request found the outage
        await asyncio.sleep(0.05)
        assert order == ["hold", "before", "free"] and pool.free == 1, order
        gate.success()  # another event's probe got through
        await asyncio.sleep(0.05)
        assert order == ["hold", "before", "free", "hold", "before"], order
        queue_open.set()
        await task

    run(main())
    assert order == ["hold", "before", "free", "hold", "before", "slot", "send", "free"]
    assert pool.free == 1 and gate._watches == {}


def test_a_wait_cut_short_by_the_gate_is_queued_again_even_if_the_gate_reopened() -> None:
    """Cut short, the attempt has no slot: a gate that reopened before the attempt ran
    again must not let it send without one."""
    clock = FakeClock()
    gate = Gate(outage_after=1, probe_base_s=3600.0, clock=clock)
    slots, sent = [0], []
    queue_open = asyncio.Event()

    async def before() -> None:
        await queue_open.wait()
        slots[0] += 1

    async def send() -> None:
        sent.append(slots[0])

    async def main() -> None:
        task = asyncio.ensure_future(policy(gate, clock, FakeSleep(clock)).run(
            send, Attempts(), before_send=before))
        await asyncio.sleep(0.01)
        gate.transient_failure(Timeout("t"))
        gate.success()  # reopened before the cut task runs again
        await asyncio.sleep(0.01)
        assert sent == []
        queue_open.set()
        await task

    run(main())
    assert sent == [1]


def test_a_revoke_during_a_wait_the_gate_also_cut_still_cancels_the_event() -> None:
    """The gate's cancellation is told apart from any other: a revoke or shutdown that
    arrives together with it still ends the event."""
    clock = FakeClock()
    gate = Gate(outage_after=1, probe_base_s=3600.0, clock=clock)

    async def before() -> None:
        await asyncio.Event().wait()

    async def main() -> None:
        task = asyncio.ensure_future(policy(gate, clock, FakeSleep(clock)).run(
            Script([None]), Attempts(), before_send=before))
        await asyncio.sleep(0.01)
        gate.transient_failure(Timeout("t"))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main())
    assert gate._watches == {}


@pytest.mark.parametrize("where", ["before_send", "send", "retried"])
def test_the_hold_is_given_back_however_the_attempt_ends(where: str) -> None:
    clock, sleep, gate = setup()
    pool, order = PermitPool(1), list[str]()

    async def before() -> None:
        if where == "before_send":
            raise RuntimeError("bug")

    scripts: dict[str, list[BaseException | None]] = {
        "before_send": [None], "send": [RuntimeError("bug")],
        "retried": [ServerError("HTTP 503"), ServerError("HTTP 503"), None]}
    send = Script(scripts[where])

    async def main() -> None:
        await policy(gate, clock, sleep).run(send, Attempts(), before_send=before,
                                             hold=Recorded(pool, order))

    if where == "retried":
        run(main())
        assert order == ["hold", "free"] * 3
    else:
        with pytest.raises(RuntimeError):
            run(main())
    assert pool.free == 1


def test_unexpected_errors_propagate_and_free_the_probe_slot() -> None:
    clock, sleep, gate = setup(outage_after=1)
    gate.transient_failure(Timeout("t"))
    send = Script([RuntimeError("bug")])
    with pytest.raises(RuntimeError):
        run(policy(gate, clock, sleep).run(send, Attempts()))
    assert gate._probing is False


# ------------------------------------------------------------------ issue 14: outages


def test_probes_default_to_half_a_second_doubling_to_five() -> None:
    clock = FakeClock()
    gate = Gate(outage_after=1, clock=clock)
    gate.transient_failure(ServerError("HTTP 503"))
    delays = [gate._next_probe - clock.now]
    for _ in range(6):
        clock.now = gate._next_probe
        assert run(gate.admit()) is True
        gate.transient_failure(ServerError("HTTP 503"), probe=True)
        delays.append(gate._next_probe - clock.now)
    expected = [0.5, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    assert (PROBE_BASE_S, PROBE_MAX_S) == (0.5, 5.0)
    for got, base in zip(delays, expected, strict=True):
        assert 0.8 * base <= got <= 1.2 * base


def test_an_event_at_a_closed_gate_waits_there_not_in_its_backoff() -> None:
    """Review outage26: after a failure that found the gate closed (a failed probe, too)
    the event slept its backoff (up to 60 s by default) before it came back to the gate,
    so with few users waiting nobody was there when the next probe was due: delivery
    resumed up to ~54 s after Userpilot did."""
    gate = Gate(outage_after=1, probe_base_s=0.01, probe_max_s=0.01)
    sleep = FakeSleep(FakeClock())
    send = Script([ServerError("HTTP 503")] * 6 + [None])
    retrying = RetryPolicy(gate, max_attempts=5, budget_s=60.0, backoff_multiplier_s=1.0,
                           backoff_max_s=60.0, sleep=sleep)
    run(retrying.run(send, Attempts()))
    assert send.calls == 7
    assert sleep.slept == [0.0] * 6  # every wait was the gate's
    assert gate.state == "up"


def test_a_probe_failing_after_the_gate_reopened_leaves_the_probes_at_their_base() -> None:
    clock = FakeClock()
    gate = Gate(outage_after=3, clock=clock)
    for _ in range(3):
        gate.transient_failure(ServerError("HTTP 503"))
    clock.now = gate._next_probe
    assert run(gate.admit()) is True
    gate.success()  # a request admitted before the gate closed was delivered: it reopens
    gate.transient_failure(ServerError("HTTP 503"), probe=True)  # the probe's late 503
    assert gate.state == "up" and not gate._probing
    for _ in range(2):
        gate.transient_failure(ServerError("HTTP 503"))
    assert gate.state == "outage"
    assert gate._next_probe - clock.now <= 1.2 * PROBE_BASE_S  # not twice the base


def test_a_retry_after_that_comes_after_the_gate_closed_holds_the_probes() -> None:
    """Its event waits at the gate, not in its backoff: without this it could probe at the
    closing failure's 0.5 s, long before the 30 s it was asked to wait (review "diff27")."""
    clock = FakeClock()
    gate = Gate(outage_after=1, clock=clock)
    gate.transient_failure(ServerError("HTTP 503"))  # another request's 503 closes it
    assert gate._next_probe - clock.now <= 1.2 * PROBE_BASE_S
    gate.transient_failure(RateLimited("HTTP 429", retry_after=30.0))  # this one's answer
    assert gate._next_probe - clock.now >= 30.0


def test_a_failed_probe_waits_at_least_retry_after() -> None:
    clock = FakeClock()
    gate = Gate(outage_after=1, clock=clock)
    gate.transient_failure(ServerError("HTTP 503", retry_after=20.0))
    assert gate._next_probe - clock.now == 20.0  # the outage's first probe, too
    clock.now = gate._next_probe
    assert run(gate.admit()) is True
    gate.transient_failure(RateLimited("HTTP 429", retry_after=7.5), probe=True)
    assert gate._next_probe - clock.now == 7.5
    clock.now = gate._next_probe
    assert run(gate.admit()) is True
    gate.transient_failure(ServerError("HTTP 503"), probe=True)  # no Retry-After: backoff
    assert gate._next_probe - clock.now <= 1.2 * 2.0


def test_up_time_runs_only_while_the_gate_is_up() -> None:
    clock = FakeClock(0.0)
    gate = Gate(outage_after=1, clock=clock)
    clock.now = 10.0
    assert gate.up_time() == 10.0
    gate.transient_failure(ServerError("HTTP 503"))
    clock.now = 1000.0
    assert gate.up_time() == 10.0  # held: not counted
    gate.success()
    clock.now = 1005.0
    assert gate.up_time() == 15.0
    gate.misconfigured(Refused("HTTP 401"))
    clock.now = 2000.0
    gate.answered()
    clock.now = 2001.0
    assert gate.up_time() == 16.0


def test_a_long_outage_then_flaky_answers_does_not_dead_letter_a_healthy_event() -> None:
    """The issue-14 case: budget 30 s, outage 1,000 s, then a single failure must not end it.

    Before the fix the budget kept running while the gate held the event, so the first
    failure after the outage (with another delivery succeeding) dead-lettered it.
    """
    clock, sleep, gate = setup(outage_after=2)

    def story(call: int) -> None:
        if call == 3:
            clock.now += 1000.0  # a long outage: the probe fails and time passes
        if call >= 4:  # Userpilot answers again: other events are delivered meanwhile
            clock.now += 0.001
            gate.success()

    send = Script([ServerError("503")] * 4 + [ServerError("503"), None], story)
    attempts = Attempts()
    run(policy(gate, clock, sleep, max_attempts=3, budget_s=30.0).run(send, attempts))
    assert send.calls == 6
    assert attempts.count == 6
    # 1 counted before the outage; 2 (no success since 1) and the probe 3 not counted.
    assert attempts.answered == 3


def test_given_up_after_its_attempts_while_answering_however_long_the_outage() -> None:
    clock, sleep, gate = setup(outage_after=2)
    last = ServerError("HTTP 503: last")

    def story(call: int) -> None:
        if call == 3:
            clock.now += 1000.0
        if call >= 4:
            clock.now += 0.001
            gate.success()

    send = Script([ServerError("503")] * 7 + [last, Stopped()], story)
    attempts = Attempts()
    with pytest.raises(ServerError) as info:
        run(policy(gate, clock, sleep, max_attempts=5, budget_s=1e6).run(send, attempts))
    assert info.value is last
    # call 1 counts; 2 (nothing delivered since) and 3 (probe) do not; 4 is a probe too
    # (the gate reopened during it), 5..8 count: 5 answered attempts at call 8.
    assert (send.calls, attempts.answered) == (8, 5)


def test_the_time_budget_runs_on_the_up_clock() -> None:
    clock, sleep, gate = setup(outage_after=1)
    pol = policy(gate, clock, sleep, max_attempts=100, budget_s=30.0)
    attempts = Attempts(count=1, answered=1, first_mono=clock.now, first_up=gate.up_time())
    clock.now += 10.0
    gate.transient_failure(ServerError("503"))  # outage for 1,000 s
    clock.now += 1000.0
    gate.success()
    assert not pol.spent(attempts)  # 10 s of up-time spent, not 1,010
    clock.now += 19.0
    assert not pol.spent(attempts)
    clock.now += 1.5
    assert pol.spent(attempts)


def test_never_given_up_while_the_gate_is_closed() -> None:
    clock, sleep, gate = setup(outage_after=1)
    pol = policy(gate, clock, sleep, max_attempts=1, budget_s=0.0)
    attempts = Attempts(count=5, answered=5, first_mono=clock.now, first_up=gate.up_time())
    clock.now += 1.0
    gate.success()
    assert pol.spent(attempts)
    gate.transient_failure(ServerError("503"))
    assert not pol.spent(attempts)


def test_the_first_attempt_goes_through_tenacity_like_the_others() -> None:
    """A failed first attempt is reported to on_retry and waited for by the same rules."""
    clock, sleep, gate = setup()
    seen: list[Retry | Pause] = []
    first = RateLimited("429", retry_after=3.0)
    send = Script([first, None])
    run(policy(gate, clock, sleep, seen=seen).run(send, Attempts()))
    assert seen == [first]
    assert len(sleep.slept) == 1 and sleep.slept[0] >= 3.0


def test_a_closed_gate_nobody_waits_at_any_more_reopens() -> None:
    """The events waiting out a 401 were taken away (a revoke): nothing would probe the
    gate again, and the replica said "token refused" for ever (review "ops17")."""
    changes: list[str] = []
    clock = FakeClock()
    gate = Gate(probe_base_s=0.02, clock=clock, on_change=lambda s, d: changes.append(s))
    gate.enter()
    gate.enter()
    gate.misconfigured(Refused("HTTP 401: token refused"))
    gate.leave()
    assert gate.state == "misconfigured"  # one event still waits: its probe tells
    gate.leave()
    assert gate.state == "up" and changes == ["misconfigured", "up"]


def test_an_event_cancelled_while_it_waits_at_a_closed_gate_reopens_it() -> None:
    clock, sleep, gate = setup()
    send = Script([Refused("HTTP 401")] * 1000)

    async def main() -> None:
        task = asyncio.ensure_future(policy(gate, clock, sleep).run(send, Attempts()))
        while gate.state == "up":
            await asyncio.sleep(0)
        await asyncio.sleep(0.05)  # waiting at the gate for its next probe
        assert gate.state == "misconfigured"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main())
    assert gate.state == "up"


def test_a_probe_cancelled_while_others_wait_at_the_gate_lets_the_next_one_probe() -> None:
    """Review "mutate52": the probe's request cancelled (its partition revoked mid-probe)
    while another event waits at the closed gate must hand the probe on; kept, no probe was
    ever sent again and delivery stayed paused for good. (With no other event waiting the
    gate reopens through `leave`: the test above.)"""
    clock, sleep, gate = setup(outage_after=1)
    gate.transient_failure(ServerError("HTTP 503"))
    assert gate.state == "outage"
    started: list[bool] = []
    after = Script([None])

    async def main() -> None:
        never = asyncio.Event()

        async def hanging() -> None:  # the probe: Userpilot never answers it
            started.append(True)
            await never.wait()

        probe = asyncio.ensure_future(policy(gate, clock, sleep).run(hanging, Attempts()))
        while not started:
            await asyncio.sleep(0)
        other = asyncio.ensure_future(policy(gate, clock, sleep).run(after, Attempts()))
        await asyncio.sleep(0.05)
        assert after.calls == 0, "it waits at the gate behind the probe"
        probe.cancel()
        with pytest.raises(asyncio.CancelledError):
            await probe
        await asyncio.wait_for(other, 2.0)

    run(main())
    assert after.calls == 1
    assert gate.state == "up"


def test_a_probe_is_not_counted_against_its_event_when_the_gate_reopened_meanwhile() -> None:
    """A probe never counts against its event's attempts (`Attempts`), even when the gate
    reopened while the probe waited for its rate slot (another request in flight came back
    delivered): counted then, an event that only probed an outage lost an attempt (review
    "mutate52")."""
    clock, sleep, gate = setup(outage_after=1)
    gate.transient_failure(ServerError("HTTP 503"))
    assert gate.state == "outage"

    async def slot() -> None:  # meanwhile another event's request is delivered
        gate.success(endpoint="track", sent=clock.now - 0.5)
        assert gate.state == "up"

    attempts = Attempts()
    run(policy(gate, clock, sleep).run(Script([None]), attempts, before_send=slot,
                                       endpoint="track"))
    assert attempts.count == 1
    assert attempts.answered == 0


def test_a_closed_gate_stays_closed_while_an_event_waits_at_it() -> None:
    clock, sleep, gate = setup(outage_after=1)
    states: list[str] = []
    send = Script([ServerError("503")] * 3 + [None], lambda call: states.append(gate.state))
    run(policy(gate, clock, sleep, max_attempts=100).run(send, Attempts()))
    assert states == ["up", "outage", "outage", "outage"]


def test_429s_between_counted_failures_do_not_use_up_the_attempts() -> None:
    """503, two 429s, 503, then 2xx, other events delivered between each attempt: only the
    two 503s are evidence against the event, so with 3 attempts it is not given up."""
    clock, sleep, gate = setup()
    send = Script([ServerError("503"), RateLimited("429", retry_after=1.0),
                   RateLimited("429", retry_after=1.0), ServerError("503"), None],
                  delivered_between(clock, gate, "track"))
    attempts = Attempts()
    run(policy(gate, clock, sleep, max_attempts=3).run(send, attempts, endpoint="track"))
    assert send.calls == 5
    assert attempts.answered == 3  # the two 503s and the delivering attempt


def test_an_event_is_never_given_up_on_a_429_even_past_its_time_budget() -> None:
    """A 503 starts the event's budget; 20 s later (others delivered meanwhile) it gets a
    429: that says the token's budget is spent, never that the event is bad, so it is
    retried (and delivered), not dead-lettered."""
    clock, sleep, gate = setup()

    def side(call: int) -> None:
        if call == 2:
            clock.now += 20.0
            gate.success(endpoint="track", sent=clock.now)

    send = Script([ServerError("503"), RateLimited("429", retry_after=1.0), None], side)
    run(policy(gate, clock, sleep, max_attempts=100, budget_s=10.0)
        .run(send, Attempts(), endpoint="track"))
    assert send.calls == 3


def test_an_event_userpilot_answers_404_alone_is_given_up() -> None:
    """404 is one of Userpilot's refusals (401/403/404): refused for this event alone,
    others delivered between, it is dead-lettered after REFUSED_ALONE answers, not held
    for ever (closing the gate for everyone at each attempt)."""
    clock, sleep, gate = setup()
    send = Script([Refused("HTTP 404: not found", status=404, body="nf")] * 10,
                  delivered_between(clock, gate, "identify"))
    with pytest.raises(RefusedAlone) as info:
        run(policy(gate, clock, sleep, max_attempts=12)
            .run(send, Attempts(), endpoint="identify"))
    assert send.calls == REFUSED_ALONE
    assert info.value.status == 404


@pytest.mark.parametrize("status", [402, 405, 415])
def test_a_request_refused_for_everyone_pauses_for_one_event_alone_is_given_up(
        status: int) -> None:
    """Review "r54": a status about the request itself (`classify` makes it a `Refused`)
    was a dead letter per event: a gateway answering 405 to everything filled the DLQ until
    its guard stopped the worker. Refused with nothing delivered between, the event waits
    and delivery pauses; refused while others pass, it alone is dead-lettered."""
    refusal = classify(status, {}, "no", path="/v1/track")
    clock, sleep, gate = setup()
    gate.success()
    held = Script([refusal] * 20 + [None])
    run(policy(gate, clock, sleep, max_attempts=1, budget_s=1.0)
        .run(held, Attempts(), endpoint="track"))
    assert held.calls == 21, "held until it went through, never dead-lettered"

    clock, sleep, gate = setup()
    alone = Script([refusal] * 10, delivered_between(clock, gate, "track"))
    with pytest.raises(RefusedAlone) as info:
        run(policy(gate, clock, sleep, max_attempts=12).run(alone, Attempts(), endpoint="track"))
    assert alone.calls == REFUSED_ALONE and info.value.status == status


def test_a_backoff_longer_than_the_budget_left_ends_at_the_budget() -> None:
    """Review "extremes54": with a 2 s budget and backoffs up to 60 s, an event answered
    503 for ever was dead-lettered after 58 s (33 s in another run). The last attempt
    comes when the budget is spent."""
    clock, sleep, gate = setup()
    first = clock.now
    send = Script([ServerError("503")] * 100, delivered_between(clock, gate, "track"))
    pol = RetryPolicy(gate, max_attempts=1000, budget_s=2.0, backoff_multiplier_s=30.0,
                      backoff_max_s=60.0, sleep=sleep, clock=clock)
    with pytest.raises(ServerError):
        run(pol.run(send, Attempts(), endpoint="track"))
    assert clock.now - first <= 2.0 + 1.5  # the budget, and the 1 s steps of the fake sleep
    assert all(s <= 2.0 for s in sleep.slept)


def test_a_429_near_the_budgets_end_keeps_its_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Review "diff54c": capped by the budget left (which a 429's waits do not use), a spell
    of 429s without Retry-After near the budget's end was retried every few seconds: 246
    requests in 600 s against 29. A 429 waits its backoff."""
    import random as random_module
    monkeypatch.setattr(random_module, "uniform", lambda low, high: high)  # the longest
    clock, sleep, gate = setup()
    send = Script([ServerError("503")] + [RateLimited("429")] * 8 + [None],
                  delivered_between(clock, gate, "track"))
    pol = RetryPolicy(gate, max_attempts=1000, budget_s=10.0, backoff_multiplier_s=1.0,
                      backoff_max_s=60.0, sleep=sleep, clock=clock)
    run(pol.run(send, Attempts(), endpoint="track"))
    assert send.calls == 10
    # the backoff's doubling (uniform's highest), never cut to the budget left
    assert sleep.slept == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]
