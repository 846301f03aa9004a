"""Unit tests for consumer.dedup: keys and outcomes over an in-memory store."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Literal

import pytest

from consumer.calls import ENDPOINTS
from consumer.dedup import HUNG_AFTER, Deduplicator, Outcome, dedup_key, user_key
from consumer.errors import SharedStateUnavailable
from consumer.redisstore import progress_key, token_digest

State = Literal["claimed", "duplicate", "busy"]
DIGEST_USERS = token_digest("secret-write-token")


class MemoryStore:
    """The claim/confirm/release contract of RedisStore, without time."""

    def __init__(self, fail: bool = False) -> None:
        self.values: dict[str, str] = {}
        self.fail = fail
        self.answers = 0  # RedisStore's count of answered calls (any kind)

    def _check(self) -> None:
        if self.fail:
            raise SharedStateUnavailable("redis claim failed: ConnectionError")

    async def claim(self, key: str, owner: str, ttl_ms: int) -> tuple[State, float]:
        self._check()
        value = self.values.get(key)
        if value is None or value == f"c:{owner}":
            self.values[key] = f"c:{owner}"
            return "claimed", 0.0
        return ("duplicate", 0.0) if value == "d" else ("busy", 12.5)

    async def confirm(self, key: str, ttl_ms: int) -> None:
        self._check()
        self.values[key] = "d"
        self.values.pop(progress_key(key), None)

    async def progress(self, key: str, note: str, ttl_ms: int) -> None:
        self._check()
        self.values[progress_key(key)] = note

    async def progress_of(self, key: str) -> str | None:
        self._check()
        return self.values.get(progress_key(key))

    async def release(self, key: str, owner: str) -> None:
        self._check()
        if self.values.get(key) == f"c:{owner}":
            del self.values[key]

    async def mark(self, key: str, ttl_ms: int) -> None:
        self._check()
        self.values[key] = f"{ttl_ms} ttl={ttl_ms}"

    async def mark_left(self, key: str) -> tuple[int | None, int] | None:
        """(the TTL written, ms left): a value "<written> ttl=<left>", or "1 ttl=<left>" as
        written before the TTL was kept."""
        self._check()
        value = self.values.get(key)
        if value is None:
            return None
        written, _, left = value.partition(" ttl=")
        return (int(written) if written != "1" else None), int(left) if left else 0


@pytest.mark.parametrize(("record", "ttl_s", "trusted"), [
    ("86400000 ttl=86399000", 86400.0, 86399.0),  # identified a second ago: the rest of it
    ("86400000 ttl=86399000", 60.0, 59.0),  # a lower TTL now: counted from the identify
    (f"86400000 ttl={22 * 3600 * 1000}", 60.0, None),  # 2 h ago: past today's 60 s
    ("60000 ttl=50000", 86400.0, 50.0),  # a higher TTL now: the record ends first
    ("1 ttl=5000000", 3.0, 3.0),  # written without its TTL: at most today's
])
def test_a_known_user_is_trusted_for_todays_ttl_from_its_identify(
        record: str, ttl_s: float, trusted: float | None) -> None:
    """Review users41: a record written under a longer TTL was trusted for what was left of
    that one: lowering USERPILOT_ENSURE_USER_TTL_SECONDS did nothing for up to a day."""
    store = MemoryStore()
    store.values[user_key(DIGEST_USERS, "u1")] = record
    known = asyncio.run(Deduplicator(store, DIGEST_USERS).user_known("u1", ttl_s))
    assert known == trusted


def test_key_never_holds_the_token_and_long_ids_are_hashed() -> None:
    digest = token_digest("secret-write-token")
    assert "secret" not in digest and len(digest) == 24
    key = dedup_key(digest, "track", "m-1")
    assert key == f"ud:track:{digest[:16]}:m-1"
    long_key = dedup_key(digest, "track", "x" * 500)
    assert len(long_key) < 80 and "xxxx" not in long_key
    assert dedup_key(digest, "track", "x" * 500) == long_key
    assert dedup_key(digest, "track", "x" * 499) != long_key
    assert dedup_key(digest, "identify", "m-1") != key


def test_outcomes() -> None:
    async def main() -> None:
        dd = Deduplicator(MemoryStore(), token_digest("t"))
        assert (await dd.claim("track", "m", "a")).outcome is Outcome.SEND
        busy = await dd.claim("track", "m", "b")
        assert (busy.outcome, busy.retry_after_s) == (Outcome.BUSY, 12.5)
        assert await dd.confirm("track", "m")
        assert (await dd.claim("track", "m", "b")).outcome is Outcome.DUPLICATE
        assert (await dd.claim("track", "n", "a")).outcome is Outcome.SEND
        assert await dd.release("track", "n", "a")
        assert (await dd.claim("track", "n", "b")).outcome is Outcome.SEND

    asyncio.run(main())


def test_busy_waits_at_least_the_minimum() -> None:
    class Soon(MemoryStore):
        async def claim(self, key: str, owner: str, ttl_ms: int) -> tuple[State, float]:
            return "busy", 0.0

    result = asyncio.run(Deduplicator(Soon(), "d", busy_retry_min_s=0.5).claim("track", "m", "a"))
    assert (result.outcome, result.retry_after_s) == (Outcome.BUSY, 0.5)


def test_claims_seen_busy_are_pruned_once_per_as_many_more_and_none_live_is_let_go(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Review "scale46": past BUSY_SEEN_MAX live claims seen busy (a re-produced topic's
    copies) every busy answer rebuilt the dict (~1 ms). Now once per as many more. None
    live is dropped (review "diff46b": dropping the oldest sent an event over another
    replica's live claim once Redis hung); expired ones go."""
    import consumer.dedup as dedup_module

    class Busy(MemoryStore):
        async def claim(self, key: str, owner: str, ttl_ms: int) -> tuple[State, float]:
            return "busy", 12.5  # another owner's claim, live for 12.5 s more

    pruned: list[int] = []
    real = dedup_module._pruned

    def counting(entries: dict[str, float],
                 live: Callable[[str, float], bool]) -> tuple[dict[str, float], int]:
        pruned.append(len(entries))
        return real(entries, live)

    monkeypatch.setattr(dedup_module, "_pruned", counting)
    clock = Clock()
    dedup = Deduplicator(Busy(), "d", clock=clock)
    cap = dedup_module.BUSY_SEEN_MAX

    async def claims(start: int, stop: int) -> None:
        for n in range(start, stop):
            assert (await dedup.claim("track", f"m{n}", "a")).outcome is Outcome.BUSY

    asyncio.run(claims(0, 2 * cap + 1))
    assert pruned == [cap, 2 * cap], "at the cap, then at twice the live ones"
    assert len(dedup._busy) == 2 * cap + 1, "every live claim kept"
    clock.now += 13.0  # all of them ended
    asyncio.run(claims(2 * cap + 1, 4 * cap + 2))
    assert pruned == [cap, 2 * cap, 4 * cap]
    assert len(dedup._busy) == 2 * cap + 1, "the ended ones went, the live ones stay"
    assert dedup.key("track", "m0") not in dedup._busy


def test_another_owners_claim_is_asked_about_at_a_growing_pace_within_its_end() -> None:
    """Waiting the claim's whole TTL held a copy of a messageId 25 s behind a confirm that
    came 50 ms later (review "redis25"): asked again soon, then less often."""
    from consumer.dedup import BUSY_POLL_FIRST_S, BUSY_POLL_MAX_S, BusyWait, ClaimResult

    busy, long_claim = BusyWait(), ClaimResult(Outcome.BUSY, retry_after_s=25.0)
    waits = [busy.after(long_claim) for _ in range(8)]
    assert waits[0] == BUSY_POLL_FIRST_S
    assert waits == sorted(waits) and waits[-1] == BUSY_POLL_MAX_S
    assert sum(waits) < 25.0 / 2, "a confirm is seen long before the claim's end"
    ending = BusyWait()
    ending.after(long_claim)
    assert ending.after(ClaimResult(Outcome.BUSY, retry_after_s=0.05)) == 0.05, \
        "never past the claim's own end"


def test_store_down_delivers_degraded() -> None:
    async def main() -> None:
        dd = Deduplicator(MemoryStore(fail=True), token_digest("t"))
        result = await dd.claim("track", "m", "a")
        assert (result.outcome, result.degraded) == (Outcome.SEND, True)
        assert not await dd.confirm("track", "m")
        assert not await dd.release("track", "m", "a")

    asyncio.run(main())


def test_redis_down_is_one_warning_per_interval_not_one_per_event(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every claim fails while Redis is down: 300 events logged 300 warnings."""
    from consumer import dedup
    from consumer.logs import RateLimit

    # The module's own limiter, with its memory of earlier tests' lines wiped.
    limits = [f for f in dedup.log.filters if isinstance(f, RateLimit)]
    monkeypatch.setattr(dedup.log, "filters",
                        [RateLimit(f.interval) if f in limits else f for f in dedup.log.filters])
    async def main() -> None:
        dd = Deduplicator(MemoryStore(fail=True), token_digest("t"))
        for i in range(300):
            assert (await dd.claim("track", f"m{i}", "a")).degraded
            assert not await dd.confirm("track", f"m{i}")

    with caplog.at_level(logging.WARNING, logger="consumer.dedup"):
        asyncio.run(main())
    lines = [r for r in caplog.records if r.name == "consumer.dedup"]
    assert 1 <= len(lines) <= 2, [r.getMessage() for r in lines]


class HungStore(MemoryStore):
    """Times out (as RedisStore does past REDIS_TIMEOUT_SECONDS) while `hung`, counting the
    calls that reached it."""

    def __init__(self) -> None:
        super().__init__()
        self.hung = True
        self.asked = 0

    def _check(self) -> None:
        self.asked += 1
        if self.hung:
            raise SharedStateUnavailable("redis claim failed: TimeoutError", timed_out=True)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_once_calls_time_out_in_a_row_redis_is_skipped_then_probed_less_and_less_often(
) -> None:
    """Review faults26: a frozen Redis cost REDIS_TIMEOUT_SECONDS on each of an event's
    calls; one user's events went out at ~1 a second for as long as it was frozen."""
    async def main() -> None:
        store, clock = HungStore(), Clock()
        dd = Deduplicator(store, token_digest("t"), clock=clock)
        for _ in range(HUNG_AFTER):
            first = await dd.claim("track", "m0", "a")
            assert (first.outcome, first.degraded) == (Outcome.SEND, True)
        assert store.asked == HUNG_AFTER
        for i in range(20):  # within the skip: answered as failed, Redis not asked
            assert (await dd.claim("track", f"m{i}", "a")).degraded
            assert not await dd.confirm("track", f"m{i}")
            assert await dd.progress_of("track", f"m{i}") is None
        assert store.asked == HUNG_AFTER
        probes = []
        for skip in (1.0, 2.0, 4.0, 8.0, 10.0, 10.0):
            clock.now += skip - 0.01
            await dd.claim("track", "x", "a")
            before = store.asked
            clock.now += 0.01
            await dd.claim("track", "x", "a")  # the probe, timing out again
            probes.append(store.asked - before)
        assert probes == [1] * 6 and store.asked == HUNG_AFTER + 6
        store.hung = False
        clock.now += 10.0
        assert not (await dd.claim("track", "y", "a")).degraded
        assert await dd.confirm("track", "y")  # answered: asked at once again
        assert (await dd.claim("track", "y", "b")).outcome is Outcome.DUPLICATE

    asyncio.run(main())


def test_a_skip_ends_once_redis_answered_another_call_of_the_replica() -> None:
    """Review faults36: a freeze over, the shared budget's calls were answered again, yet
    claims were skipped until the deduplicator's own probe (up to SKIP_MAX_S): events
    went out unchecked against a Redis that answered, twice when the replica then died."""
    async def main() -> None:
        store, clock = HungStore(), Clock()
        dd = Deduplicator(store, token_digest("t"), clock=clock)
        for _ in range(HUNG_AFTER):
            await dd.claim("track", "m0", "a")
        assert (await dd.claim("track", "m1", "a")).degraded, "skipping"
        assert store.asked == HUNG_AFTER
        store.hung = False
        clock.now += 0.2  # well within the skip
        assert (await dd.claim("track", "m2", "a")).degraded, "no answer seen: still skipped"
        store.answers += 1  # the limiter's GCRA call was answered
        result = await dd.claim("track", "m3", "a")
        assert not result.degraded and store.asked == HUNG_AFTER + 1, "asked at once"
        assert await dd.confirm("track", "m3")

    asyncio.run(main())


def test_with_the_budget_answered_and_claims_hung_one_claim_at_a_time_asks_redis() -> None:
    """Review diff36b: the budget's calls answered while the claims timed out (one shard
    hung): ending the skip at each answer sent every waiting claim to the hung store."""
    async def main() -> None:
        store, clock = HungStore(), Clock()
        dd = Deduplicator(store, token_digest("t"), clock=clock)
        for _ in range(HUNG_AFTER):
            await dd.claim("track", "m0", "a")
        store.answers += 1  # the budget answered: the next claim probes, the others skip

        async def claim(i: int) -> bool:
            return (await dd.claim("track", f"c{i}", "a")).degraded

        assert all(await asyncio.gather(*(claim(i) for i in range(50))))
        assert store.asked == HUNG_AFTER + 1, "one probe, not fifty calls"
        assert all([await claim(i) for i in range(50)]), "the probe timed out: skipping"
        assert store.asked == HUNG_AFTER + 1

    asyncio.run(main())


class Blip(MemoryStore):
    """A healthy Redis whose calls on keys ending in one of `slow` time out."""

    def __init__(self) -> None:
        super().__init__()
        self.slow: set[str] = set()
        self.asked = 0

    async def claim(self, key: str, owner: str, ttl_ms: int) -> tuple[State, float]:
        self.asked += 1
        if any(key.endswith(s) for s in self.slow):
            await asyncio.sleep(0)
            raise SharedStateUnavailable("redis claim failed: TimeoutError", timed_out=True)
        return await super().claim(key, owner, ttl_ms)


def test_one_slow_call_among_answers_skips_nothing() -> None:
    """Review diff26: one slow call (a fork for BGSAVE) made every call of the next second
    go unchecked."""
    async def main() -> None:
        store, clock = Blip(), Clock()
        dd = Deduplicator(store, token_digest("t"), clock=clock)
        for i in range(5):
            store.slow = {":slow"}
            assert (await dd.claim("track", "slow", "a")).degraded
            store.slow = set()
            assert not (await dd.claim("track", f"m{i}", "a")).degraded
        assert store.asked == 10

    asyncio.run(main())


def test_a_busy_wait_is_not_turned_into_a_send_by_another_keys_timeout() -> None:
    """Review diff26: owner a holds m's claim; b waits it out. Redis skipped for other
    keys' timeouts made b's next claim SEND while a's claim was live: a duplicate."""
    async def main() -> None:
        store, clock = Blip(), Clock()
        dd = Deduplicator(store, token_digest("t"), clock=clock)
        assert (await dd.claim("track", "m", "a")).outcome is Outcome.SEND
        busy = await dd.claim("track", "m", "b")
        assert busy.outcome is Outcome.BUSY  # a's claim holds 12.5 s (MemoryStore)
        store.slow = {":o1", ":o2"}
        for other in ("o1", "o2"):
            await dd.claim("track", other, "c")  # Redis hung: skipped from here
        clock.now += 0.5
        again = await dd.claim("track", "m", "b")
        assert store.asked == 4, "skipped"
        assert again.outcome is Outcome.BUSY and 11.5 < again.retry_after_s <= 12.0, again
        clock.now += 13.0  # past a's claim, Redis still hung: b sends, unchecked
        store.slow = {":m"}
        late = await dd.claim("track", "m", "b")
        assert (late.outcome, late.degraded) == (Outcome.SEND, True)

    asyncio.run(main())


def test_a_busy_wait_is_not_turned_into_a_send_by_its_own_calls_timing_out() -> None:
    """Review redis42: b waits out a's live claim; Redis freezes. b's own next calls time
    out (not skipped: they were the ones under way), and each forgot a's claim: b sent
    over it ~0.1 s after the freeze, a's request still on the wire."""
    async def main() -> None:
        store, clock = Blip(), Clock()
        dd = Deduplicator(store, token_digest("t"), clock=clock)
        assert (await dd.claim("track", "m", "a")).outcome is Outcome.SEND
        assert (await dd.claim("track", "m", "b")).outcome is Outcome.BUSY  # 12.5 s left
        store.slow = {":m"}  # Redis freezes
        for _ in range(2):  # the busy wait's next poll, then the re-claim
            clock.now += 0.1
            again = await dd.claim("track", "m", "b")
            assert again.outcome is Outcome.BUSY and 12.0 < again.retry_after_s < 12.5, again
        clock.now += 13.0  # past a's claim, Redis still hung: b sends, unchecked
        late = await dd.claim("track", "m", "b")
        assert (late.outcome, late.degraded) == (Outcome.SEND, True)

    asyncio.run(main())


def test_the_claims_holder_is_not_kept_waiting_on_its_own_claim_as_redis_freezes() -> None:
    """Review diff42: the busy claim was kept per key, so the holder's own re-claim timing
    out waited out its own claim; a copy told it was busy still waits."""
    async def main() -> None:
        store, clock = Blip(), Clock()
        dd = Deduplicator(store, token_digest("t"), clock=clock)
        assert (await dd.claim("track", "m", "a")).outcome is Outcome.SEND  # a holds it
        assert (await dd.claim("track", "m", "b")).outcome is Outcome.BUSY  # a copy waits
        assert (await dd.claim("track", "m", "a")).outcome is Outcome.SEND  # a renews
        store.slow = {":m"}  # Redis freezes
        clock.now += 0.1
        mine = await dd.claim("track", "m", "a")  # a's re-claim before its request
        assert (mine.outcome, mine.degraded) == (Outcome.SEND, True), mine
        copy = await dd.claim("track", "m", "b")
        assert copy.outcome is Outcome.BUSY, copy

    asyncio.run(main())


def test_a_copy_asking_first_as_redis_freezes_waits_out_a_claim_seen_live() -> None:
    """Review diff42: with only the owners told busy waiting, a third copy's first claim
    (timed out, or skipped once Redis counts as hung) sent over a live claim."""
    async def main() -> None:
        store, clock = Blip(), Clock()
        dd = Deduplicator(store, token_digest("t"), clock=clock)
        store.values[dd.key("track", "m")] = "c:other-replica/x"  # another replica holds it
        assert (await dd.claim("track", "m", "b")).outcome is Outcome.BUSY  # 12.5 s left
        store.slow = {":m", ":n"}  # Redis freezes
        clock.now += 0.1
        assert (await dd.claim("track", "m", "c")).outcome is Outcome.BUSY  # timed out
        for i in range(HUNG_AFTER):  # other events' claims time out: Redis counts as hung
            clock.now += 0.1
            assert (await dd.claim("track", "n", f"o{i}")).degraded
        asked = store.asked
        late = await dd.claim("track", "m", "d")
        assert store.asked == asked and late.outcome is Outcome.BUSY, late  # skipped

    asyncio.run(main())


def test_calls_in_flight_when_redis_froze_are_one_sign_not_one_doubling_each() -> None:
    """Review diff26: eight calls timing out together doubled the skip eight times (10 s
    at once); a late answer to a call begun before the freeze must not end it either."""
    async def main() -> None:
        store, clock = Blip(), Clock()
        dd = Deduplicator(store, token_digest("t"), clock=clock)
        store.slow = {f":m{i}" for i in range(8)}
        await asyncio.gather(*(dd.claim("track", f"m{i}", "a") for i in range(8)))
        store.slow = set()
        clock.now += 0.5
        assert (await dd.claim("track", "mid", "a")).degraded, "skipped for 1 s"
        clock.now += 0.5
        before = store.asked
        result = await dd.claim("track", "fresh", "a")  # SKIP_FIRST_S on: one probe
        assert store.asked == before + 1 and not result.degraded

    asyncio.run(main())


def test_a_refusal_skips_nothing() -> None:
    """Connection refused fails at once: the next call asks Redis again (a blip is over
    as soon as it answers)."""
    async def main() -> None:
        store = MemoryStore(fail=True)
        dd = Deduplicator(store, token_digest("t"))
        for _ in range(5):
            assert (await dd.claim("track", "m", "a")).degraded
        store.fail = False
        assert not (await dd.claim("track", "m", "a")).degraded

    asyncio.run(main())


def test_one_probe_at_a_time_the_others_skip() -> None:
    async def main() -> None:
        clock = Clock()
        gate = asyncio.Event()

        class SlowProbe(HungStore):
            async def claim(self, key: str, owner: str, ttl_ms: int) -> tuple[State, float]:
                self.asked += 1
                if self.asked <= HUNG_AFTER:
                    raise SharedStateUnavailable("redis claim failed: TimeoutError",
                                                 timed_out=True)
                await asyncio.wait_for(gate.wait(), 5)
                return "claimed", 0.0

        store = SlowProbe()
        dd = Deduplicator(store, token_digest("t"), clock=clock)
        for _ in range(HUNG_AFTER):
            await dd.claim("track", "a", "o")
        clock.now += 1.0
        probe = asyncio.ensure_future(dd.claim("track", "b", "o"))
        await asyncio.sleep(0)
        others = [await dd.claim("track", f"c{i}", "o") for i in range(5)]
        assert all(r.degraded for r in others) and store.asked == HUNG_AFTER + 1
        gate.set()
        assert not (await probe).degraded
        assert not (await dd.claim("track", "d", "o")).degraded
        assert store.asked == HUNG_AFTER + 2

    asyncio.run(main())


def test_an_identified_user_is_known_to_every_replica_for_the_ttl_never_when_redis_fails() -> None:
    store = MemoryStore()
    one, other = Deduplicator(store, DIGEST_USERS), Deduplicator(store, DIGEST_USERS)

    async def scenario() -> None:
        assert await other.user_known("u1", 86400.0) is None
        assert await one.note_user("u1", 86400.0)
        assert await other.user_known("u1", 86400.0) == 86400.0
        assert await other.user_known("u2", 86400.0) is None
        assert await one.note_user("u4", 0.5)  # about to end: as good as none
        assert await other.user_known("u4", 86400.0) is None
        assert store.values[user_key(DIGEST_USERS, "u1")] == "86400000 ttl=86400000"
        # A user's key is neither a messageId's nor the token's.
        assert user_key(DIGEST_USERS, "u1") not in {one.key(e, "u1") for e in ENDPOINTS}
        assert "secret" not in user_key(DIGEST_USERS, "u1")
        store.fail = True
        assert await other.user_known("u1", 86400.0) is None  # Redis down: identify sent
        assert not await one.note_user("u3", 60.0)

    asyncio.run(scenario())


def test_a_raw_id_never_takes_the_key_of_a_hashed_one() -> None:
    """`#` and 32 hex digits is the key of an id over 64 bytes: given raw (a user id, a
    messageId), it took that key, and the event sent second was skipped as a duplicate
    (review "sec45")."""
    import hashlib

    long_id = "x" * 100
    lookalike = "#" + hashlib.sha256(long_id.encode()).hexdigest()[:32]
    assert dedup_key("d" * 24, "track", lookalike) != dedup_key("d" * 24, "track", long_id)
    assert user_key("d" * 24, lookalike) != user_key("d" * 24, long_id)
    assert dedup_key("d" * 24, "track", "order-1").endswith(":order-1")  # raw ids stay raw
    # ... and so do other ids starting with #: replicas of the previous release read the
    # same records during a rolling upgrade (review "diff45c").
    assert dedup_key("d" * 24, "track", "#order-1").endswith(":#order-1")
    assert user_key("d" * 24, "#abc").endswith(":#abc")


def test_an_event_waiting_out_a_live_claim_keeps_waiting_past_the_cap_as_redis_freezes(
) -> None:
    """Review "diff46b": pruning at the cap dropped the oldest live claims seen busy, and
    once Redis froze the event waiting longest was sent over another replica's claim."""
    from consumer.dedup import BUSY_SEEN_MAX

    async def main() -> None:
        store, clock = Blip(), Clock()
        dd = Deduplicator(store, token_digest("t"), clock=clock)
        store.values[dd.key("track", "m")] = "c:other-replica/x"  # live: 12.5 s left
        assert (await dd.claim("track", "m", "b")).outcome is Outcome.BUSY
        # copies of other events, each claimed by the other replica (a re-produced topic)
        async def copies(start: int, stop: int) -> None:
            for n in range(start, stop):
                store.values[dd.key("track", f"c{n}")] = "c:other-replica/y"
                assert (await dd.claim("track", f"c{n}", "z")).outcome is Outcome.BUSY

        await copies(0, BUSY_SEEN_MAX // 2)
        clock.now += 1.0
        # b asks again about m: still busy, 12.5 s left; the dict keeps m's first place
        assert (await dd.claim("track", "m", "b")).outcome is Outcome.BUSY
        await copies(BUSY_SEEN_MAX // 2, BUSY_SEEN_MAX)  # the cap: pruned to 7,500
        assert dd._busy[dd.key("track", f"c{BUSY_SEEN_MAX - 1}")] > clock(), "all live"
        store.slow = {":m", ":n"}  # Redis freezes
        for i in range(HUNG_AFTER):
            clock.now += 0.1
            assert (await dd.claim("track", "n", f"o{i}")).degraded
        clock.now += 0.1
        again = await dd.claim("track", "m", "b")
        assert again.outcome is Outcome.BUSY, f"sent over another replica's live claim: {again}"

    asyncio.run(main())
