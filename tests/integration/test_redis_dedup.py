"""messageId deduplication against a real redis-server: claim, confirm, duplicate, busy,
release, expiry, Redis down, and the memory one recorded id costs.

Memory, measured by ``test_memory_per_recorded_id`` (100 000 confirmed ids, production key
shape ``ud:track:<16 hex>:<uuid>`` = 62 bytes, 24 h TTL; Redis 7.0.15, jemalloc, 64-bit):
197 bytes per recorded id by the INFO used_memory delta (hash-table and expiry-table slots
included), 136 bytes by MEMORY USAGE of one key. A token saturated at 600/min all day
records 864 000 ids per family: about 170 MB at the default 24 h TTL.
"""

from __future__ import annotations

import asyncio
import random
import uuid

import pytest
import redis as sync_redis

from consumer.dedup import Deduplicator, Outcome, user_key
from consumer.redisstore import RedisStore, token_digest
from tests.integration.redis_fixtures import SlowLink, StoppableRedis

MAX_BYTES_PER_ID = 240


def _dedup(url: str, ttl_s: float = 86400.0, claim_ttl_s: float = 60.0
           ) -> tuple[Deduplicator, RedisStore]:
    store = RedisStore(url, timeout_s=0.2)
    return Deduplicator(store, token_digest(f"tok-{uuid.uuid4()}"), ttl_s=ttl_s,
                        claim_ttl_s=claim_ttl_s), store


def test_claim_confirm_then_duplicate(redis_url: str) -> None:
    async def main() -> list[Outcome]:
        dd, store = _dedup(redis_url)
        mid = str(uuid.uuid4())
        first = await dd.claim("track", mid, "a/t/0/1")
        assert await dd.confirm("track", mid)
        again = await dd.claim("track", mid, "b/t/0/1")
        other_endpoint = await dd.claim("identify", mid, "b/t/0/1")
        await store.close()
        return [first.outcome, again.outcome, other_endpoint.outcome]

    assert asyncio.run(main()) == [Outcome.SEND, Outcome.DUPLICATE, Outcome.SEND]


def test_claimed_by_another_is_busy_until_released_and_own_claim_is_reentrant(
    redis_url: str,
) -> None:
    async def main() -> None:
        dd, store = _dedup(redis_url, claim_ttl_s=30)
        mid = str(uuid.uuid4())
        assert (await dd.claim("track", mid, "a")).outcome is Outcome.SEND
        assert (await dd.claim("track", mid, "a")).outcome is Outcome.SEND  # retry, same owner
        busy = await dd.claim("track", mid, "b")
        assert busy.outcome is Outcome.BUSY
        assert 25 < busy.retry_after_s <= 30
        assert await dd.release("track", mid, "b")  # not b's claim: stays
        assert (await dd.claim("track", mid, "b")).outcome is Outcome.BUSY
        assert await dd.release("track", mid, "a")
        assert (await dd.claim("track", mid, "b")).outcome is Outcome.SEND
        await store.close()

    asyncio.run(main())


def test_claims_and_records_expire(redis_url: str) -> None:
    async def main() -> None:
        dd, store = _dedup(redis_url, ttl_s=0.3, claim_ttl_s=0.2)
        crashed, delivered = str(uuid.uuid4()), str(uuid.uuid4())
        assert (await dd.claim("track", crashed, "a")).outcome is Outcome.SEND
        assert (await dd.claim("track", delivered, "a")).outcome is Outcome.SEND
        await dd.confirm("track", delivered)
        assert (await dd.claim("track", delivered, "b")).outcome is Outcome.DUPLICATE
        await asyncio.sleep(0.45)
        assert (await dd.claim("track", crashed, "b")).outcome is Outcome.SEND
        assert (await dd.claim("track", delivered, "b")).outcome is Outcome.SEND
        await store.close()

    asyncio.run(main())


def test_concurrent_claims_admit_exactly_one(redis_url: str) -> None:
    async def main() -> list[Outcome]:
        pairs = [_dedup(redis_url) for _ in range(8)]
        digest = token_digest("shared-token")
        dds = [Deduplicator(store, digest) for _, store in pairs]
        mid = str(uuid.uuid4())
        results = await asyncio.gather(*(dd.claim("track", mid, f"owner-{i}")
                                         for i, dd in enumerate(dds)))
        for _, store in pairs:
            await store.close()
        return [r.outcome for r in results]

    outcomes = asyncio.run(main())
    assert outcomes.count(Outcome.SEND) == 1
    assert outcomes.count(Outcome.BUSY) == 7


def test_redis_unreachable_delivers_at_least_once() -> None:
    async def main() -> None:
        dd, store = _dedup("redis://127.0.0.1:1/0")  # nothing listens on port 1
        result = await dd.claim("track", "m-1", "a")
        assert (result.outcome, result.degraded) == (Outcome.SEND, True)
        assert not await dd.confirm("track", "m-1")
        assert not await dd.release("track", "m-1", "a")
        await store.close()

    asyncio.run(main())


def test_memory_per_recorded_id(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    client = sync_redis.Redis.from_url(redis_url)
    digest = token_digest(f"mem-{uuid.uuid4()}")
    dd = Deduplicator(RedisStore(redis_url), digest)  # only for the key shape
    n = 100_000
    keys = [dd.key("track", str(uuid.uuid4())) for _ in range(n)]
    client.execute_command("MEMORY", "PURGE")  # type: ignore[no-untyped-call]
    before = int(client.info("memory")["used_memory"])
    pipe = client.pipeline(transaction=False)
    for i, key in enumerate(keys):
        pipe.set(key, "d", px=86_400_000)
        if i % 5000 == 4999:
            pipe.execute()
    pipe.execute()
    after = int(client.info("memory")["used_memory"])
    sample = int(client.execute_command("MEMORY", "USAGE", keys[0]))  # type: ignore[no-untyped-call]
    per_id = (after - before) / n
    client.delete(*keys)
    client.close()
    with capsys.disabled():
        print(f"\n[dedup memory] {per_id:.1f} bytes per recorded id (INFO used_memory delta "
              f"over {n}); MEMORY USAGE of one key: {sample} bytes; key length "
              f"{len(keys[0])} bytes")
    assert 0 < per_id <= MAX_BYTES_PER_ID


def test_a_pooled_connection_the_server_closed_is_not_redis_down(
    stoppable_redis: StoppableRedis,
) -> None:
    """Redis closes idle connections (its `timeout`, a managed Redis's idle limit, a load
    balancer): the next call on one failed once, the claim was taken as unchecked and an
    event already delivered was sent again."""
    sync_redis.Redis.from_url(stoppable_redis.url).config_set("timeout", 1)

    async def main() -> list[tuple[Outcome, bool]]:
        digest = token_digest(f"tok-{uuid.uuid4()}")  # one token, two replicas
        first_store = RedisStore(stoppable_redis.url, timeout_s=0.2)
        store = RedisStore(stoppable_redis.url, timeout_s=0.2)
        first, replica = Deduplicator(first_store, digest), Deduplicator(store, digest)
        ids = [str(uuid.uuid4()) for _ in range(8)]
        # The replica's pool holds 8 connections from earlier work, then it idles.
        await asyncio.gather(*(replica.claim("track", f"warm-{i}", "b/warm") for i in range(8)))
        for mid in ids:
            assert (await first.claim("track", mid, "a/t/0/1")).outcome is Outcome.SEND
            assert await first.confirm("track", mid)
        await asyncio.sleep(2.5)  # past the server's idle timeout: it closed them
        claims = await asyncio.gather(*(replica.claim("track", mid, f"b/t/0/{i}")
                                        for i, mid in enumerate(ids)))
        await store.close()
        await first_store.close()
        return [(c.outcome, c.degraded) for c in claims]

    assert asyncio.run(main()) == [(Outcome.DUPLICATE, False)] * 8


def test_a_cancelled_redis_call_ends_its_task(redis_url: str) -> None:
    """redis-py writes through `asyncio.wait_for` when given a socket timeout, and on
    Python 3.11 that drops a cancellation arriving as the write completes: the call
    returned, the cancelled delivery went on and a revoke or shutdown waited for it (in
    review, 32 of 64 tasks still ran 1 s after their cancel)."""
    async def main() -> int:
        store = RedisStore(redis_url, timeout_s=0.25)
        prefix = f"cancel-{uuid.uuid4()}"
        stop = False

        async def claims(i: int) -> None:
            n = 0
            while not stop:  # a task that swallowed its cancel must still end (no hang)
                await store.claim(f"{prefix}-{i}-{n}", "me", 5000)
                n += 1

        tasks = [asyncio.create_task(claims(i)) for i in range(64)]
        await asyncio.sleep(0.3)
        rng = random.Random(7)
        for task in tasks:
            await asyncio.sleep(rng.random() * 0.002)
            task.cancel()
        await asyncio.sleep(1.0)
        alive = sum(not t.done() for t in tasks)
        stop = True
        await asyncio.gather(*tasks, return_exceptions=True)
        await store.close()
        return alive

    assert asyncio.run(main()) == 0


def test_a_redis_90_ms_away_answers_the_first_call_on_a_new_connection(
        stoppable_redis: StoppableRedis) -> None:
    """redis-py's defaults open a connection with HELLO 3 and CLIENT SETINFO: 370 ms at
    90 ms a round trip for the first call, over the default 0.25 s timeout. A
    call cut short drops its connection, so no call ever succeeded: the replicas ran
    without deduplication or the shared budget, for good."""
    from consumer.redisstore import CLAIM_LUA, GCRA_LUA

    direct = sync_redis.Redis.from_url(stoppable_redis.url)
    for script in (CLAIM_LUA, GCRA_LUA):  # loaded once per Redis: not what this is about
        direct.script_load(script)
    with SlowLink(stoppable_redis.port, 0.09) as link:
        async def main() -> list[str]:
            done: list[str] = []
            for _ in range(3):  # each store opens a new connection
                store = RedisStore(link.url(), timeout_s=0.25)
                try:
                    await store.ping()
                    state, _ = await store.claim(f"k-{uuid.uuid4()}", "me", 5000)
                    done.append(state)
                finally:
                    await store.close()
            return done

        assert asyncio.run(main()) == ["claimed"] * 3


def test_identified_users_are_shared_for_the_ttl_and_forgotten_on_request(redis_url: str) -> None:
    """Ensure-user across replicas (GET/SET on `ud:user:…`), the record's TTL, and
    delete-users' UNLINK."""
    async def main() -> None:
        one, store = _dedup(redis_url)
        other, other_store = _dedup(redis_url)
        other._digest = one._digest  # the same token
        user = f"user-{uuid.uuid4()}"
        assert await other.user_known(user, 1.5) is None
        assert await one.note_user(user, 1.5)
        left = await other.user_known(user, 1.5)
        assert left is not None and 1.0 <= left <= 1.5
        await asyncio.sleep(0.6)
        assert await other.user_known(user, 1.5) is None, "under a second left: none"
        await asyncio.sleep(1.0)
        assert await other.user_known(user, 1.5) is None, "trusted for the TTL only"
        assert await one.note_user(user, 60.0)
        left = await other.user_known(user, 10.0)  # the TTL lowered since: counted from it
        assert left is not None and 9.0 <= left <= 10.0
        await store.forget([user_key(one._digest, user)])
        assert await other.user_known(user, 60.0) is None
        await store.close()
        await other_store.close()

    asyncio.run(main())
