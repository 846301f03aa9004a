"""`consumer.keyless`: a keyless event's chain is its user, and a partition's later events
wait to learn the user of a keyless event whose schema is being fetched. The worker's runs
(a registry outage, mixed keyed and keyless users) are in `test_worker.py`."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from typing import Any

import pytest

from consumer import keyless as keyless_module
from consumer.calls import Call
from consumer.codec import Event as Decoded
from consumer.handler import Event
from consumer.keyless import KeylessOrder, UserWaits, decided_user
from consumer.logs import RateLimit
from consumer.routing import Send
from consumer.scheduling import Barrier

TP = ("signal", 0)


def event(offset: int, key: bytes | None = None) -> Event:
    return Event(TP[0], TP[1], offset, key if key else (TP[0], TP[1], offset), key, b"v",
                 None, None)


def send(user: str) -> Send:
    call = Call("track", "track", "track", "POST", "/v1/track", {"user_id": user}, b"{}")
    return Send((call,), "feature_used")


def no_barriers() -> dict[Hashable, Barrier]:
    return {}


def test_a_keyless_events_chain_is_its_user_and_a_keyed_ones_is_its_key() -> None:
    order = KeylessOrder()
    keyless, keyed = event(0), event(1, b"k1")
    order.place(keyless, TP, Decoded({"userId": "u1"}), no_barriers)
    order.place(keyed, TP, Decoded({"userId": "u1"}), no_barriers)
    assert keyless.ordering_key == b"u1", "keyed and keyless events of u1 share a chain"
    assert keyed.ordering_key == b"k1"
    assert keyless.waits is None and keyed.waits is None, "no unknown user: nothing waited on"
    decided = event(2)
    decided.decision = send("u2")  # decided without `screen` (debug logging)
    order.place(decided, TP, None, no_barriers)
    assert decided.ordering_key == b"u2"


def test_decided_user_reads_the_first_call_with_a_user() -> None:
    assert decided_user(send("u")) == "u"
    assert decided_user(send("")) is None
    assert decided_user(None) is None


async def decide_u1(e: Event) -> None:
    """The handler's decision after the schema: a Track of u1."""
    e.decision = send("u1")


async def reach_at_once(_: Barrier) -> None:
    """A chain already past its barrier."""
    return None


def run_order(scenario: Any) -> Any:
    async def main() -> Any:
        return await scenario(KeylessOrder())
    return asyncio.run(main())


def test_later_events_wait_for_an_unknown_user_only_when_it_is_theirs() -> None:
    async def scenario(order: KeylessOrder) -> list[str]:
        unknown = event(0)  # no key, schema not fetched: decision None, user unknown
        chain: Barrier = ((TP[0], TP[1], b"u1"), 1, 3)
        barriers: dict[Hashable, Barrier] = {b"u1": chain}
        order.place(unknown, TP, None, lambda: barriers)
        assert isinstance(unknown.waits, UserWaits) and unknown.waits.own is not None
        assert unknown.waits.chains == barriers, "where each chain stood at its intake"
        same, other = event(1, b"u1"), event(2, b"u2")
        for later in (same, other):
            order.place(later, TP, None, no_barriers)
            assert isinstance(later.waits, UserWaits) and later.waits.own is None
        went: list[str] = []
        reached: list[Barrier] = []

        async def decide(e: Event) -> None:
            if e is unknown:
                await asyncio.sleep(0.05)  # its schema is fetched
                e.decision = send("u1")
            else:
                e.decision = send("u1" if e is same else "u2")

        async def reach(barrier: Barrier) -> None:
            reached.append(barrier)

        async def go(e: Event, name: str) -> None:
            await order.before(e, decide, reach)
            went.append(name)
            if e is unknown:
                await asyncio.sleep(0.05)  # its request
            order.after(e)
            went.append(f"{name} done")

        await asyncio.gather(go(same, "same"), go(other, "other"), go(unknown, "unknown"))
        assert reached == [chain], "it waited for its own user's chain"
        return went

    went = run_order(scenario)
    assert went.index("other") < went.index("unknown done"), "another user does not wait"
    assert went.index("same") > went.index("unknown done"), "the same user waits for it"


@pytest.mark.parametrize("unknowns", [1, 5])
def test_learning_an_unknown_user_is_bounded(monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture,
                                             unknowns: int) -> None:
    """Bounded, with a warning; one line for a window of such events, not one each
    (review "registry48": a registry outage leaves up to a window of them)."""
    monkeypatch.setattr(keyless_module, "UNRESOLVED_WAIT_S", 0.05)
    limits = [f for f in keyless_module.log.filters if isinstance(f, RateLimit)]
    assert limits, "the warning is rate-limited"
    # A fresh one: another test's line within 30 s would hide this one's.
    monkeypatch.setattr(keyless_module.log, "filters", [RateLimit(limits[0].interval)])

    async def scenario(order: KeylessOrder) -> bool:
        unknown = [event(i) for i in range(unknowns)]
        for e in unknown:
            order.place(e, TP, None, no_barriers)
        later = [event(unknowns + i, b"u1") for i in range(unknowns)]
        for e in later:
            order.place(e, TP, None, no_barriers)

        # The unknown events never learn their user (the registry is down): the later
        # ones go after the bound, with a warning.
        for e in later:
            await asyncio.wait_for(order.before(e, decide_u1, reach_at_once), 2.0)
        waits = unknown[0].waits
        assert isinstance(waits, UserWaits) and waits.own is not None
        return waits.own.user.done()

    assert run_order(scenario) is False
    assert caplog.text.count("is not known after") == 1, caplog.text


def test_a_partition_that_goes_releases_whoever_waits_on_it() -> None:
    async def scenario(order: KeylessOrder) -> bool:
        unknown, later = event(0), event(1, b"u1")
        order.place(unknown, TP, None, no_barriers)
        order.place(later, TP, None, no_barriers)

        waiting = asyncio.ensure_future(order.before(later, decide_u1, reach_at_once))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        order.forget([TP])  # revoked: the unknown event was abandoned before it ran
        await asyncio.wait_for(waiting, 1.0)
        fresh = event(2, b"u1")
        order.place(fresh, TP, None, no_barriers)
        return fresh.waits is None

    assert run_order(scenario), "nothing of the revoked partition is waited on any more"
