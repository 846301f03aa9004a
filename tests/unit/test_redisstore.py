"""Unit tests for consumer.redisstore's failure edge: bounded, typed, secret-free.

A local socket that accepts and never answers stands in for a black-holed Redis, and a
closed port for a stopped one; the real server is exercised in tests/integration.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import pytest

from consumer.errors import SharedStateUnavailable
from consumer.redisstore import RedisStore, token_digest

PASSWORD = "hunter2-redis"


@pytest.fixture
def silent_port() -> Iterator[int]:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield server.getsockname()[1]


def test_token_digest_is_stable_and_hides_the_token() -> None:
    assert token_digest("abc") == token_digest("abc") != token_digest("abd")
    assert "abc" not in token_digest("abc")


def test_a_silent_redis_fails_within_the_timeout(silent_port: int) -> None:
    seen: list[tuple[str, float, str | None]] = []
    store = RedisStore(f"redis://:{PASSWORD}@127.0.0.1:{silent_port}/0", timeout_s=0.2,
                       observe=lambda op, s, err: seen.append((op, s, err)))

    async def main() -> float:
        start = time.monotonic()
        with pytest.raises(SharedStateUnavailable) as info:
            await store.gcra("k", interval_us=1000, tolerance_us=0, lookahead_us=0,
                             idle_ttl_ms=1000)
        assert PASSWORD not in str(info.value)
        assert info.value.timed_out, "a hung Redis is told apart from a refusing one"
        await store.close()
        return time.monotonic() - start

    elapsed = asyncio.run(main())
    assert elapsed < 2.0  # bounded by the 0.2 s timeout, not redis-py's retries
    assert [(op, err is not None) for op, _, err in seen] == [("gcra", True)]


def test_the_memory_policy_of_a_silent_redis_is_not_waited_for(silent_port: int) -> None:
    """Review "diff51b": CONFIG GET went past `_call`, without its timeout: a Redis that
    accepts and never answers held `run`'s start-up for good (liveness failed at 60 s), where
    before it ran on its fallback."""
    store = RedisStore(f"redis://127.0.0.1:{silent_port}/0", timeout_s=0.2)

    async def main() -> tuple[str, int] | None:
        try:
            return await asyncio.wait_for(store.eviction(), 5)
        finally:
            await store.close()

    start = time.monotonic()
    assert asyncio.run(main()) is None
    assert time.monotonic() - start < 2.0


def test_a_stopped_redis_fails_at_once_with_our_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    store = RedisStore(f"redis://127.0.0.1:{closed}/0", timeout_s=0.2)

    async def main() -> None:
        with pytest.raises(SharedStateUnavailable, match="redis claim failed") as info:
            await store.claim("k", "owner", 1000)
        assert not info.value.timed_out
        await store.close()

    asyncio.run(main())


def test_options_redis_refuses_at_connect_time_are_our_error(silent_port: int) -> None:
    """redis-py raises TypeError at the first connection for `ssl_cert_reqs` on redis://
    (config refuses it first): it escaped as an unexpected error and the worker exited,
    on every restart."""
    store = RedisStore(f"redis://:{PASSWORD}@127.0.0.1:{silent_port}/0?ssl_cert_reqs=none",
                       timeout_s=0.2)

    async def main() -> None:
        with pytest.raises(SharedStateUnavailable, match="redis ping failed: TypeError") as info:
            await store.ping()
        assert PASSWORD not in str(info.value)
        await store.close()

    asyncio.run(main())


def test_a_url_the_redis_client_cannot_read_is_a_config_error_without_the_password() -> None:
    """Review secrets18: redis-py's ValueError quoted part of the password, in a traceback
    (config refuses such a URL first; this is the net under it)."""
    from consumer.errors import ConfigError

    with pytest.raises(ConfigError) as refused:
        RedisStore("redis://:S3CR3T[passwd]word@127.0.0.1:6379/0")
    assert "passwd" not in str(refused.value) and "S3CR3T" not in str(refused.value)


def test_a_tls_failure_is_named_by_openssls_reason_found_under_the_clients_error() -> None:
    """Review redis34: redis-py's ConnectionError hides the TLS cause; the store names it
    (OpenSSL's words hold no password) and marks the failure as TLS (`run` refuses it)."""
    import ssl

    from consumer.redisstore import tls_failure

    verify = ssl.SSLCertVerificationError(1, "certificate verify failed")
    verify.verify_message = "self-signed certificate"
    wrapped = ConnectionError("Error 1 connecting to localhost:6380.")
    wrapped.__cause__ = verify
    outer = RuntimeError("redis call")
    outer.__context__ = wrapped
    assert tls_failure(outer) == "certificate verify failed: self-signed certificate"
    version = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    version.reason = "WRONG_VERSION_NUMBER"
    plain = ConnectionError("x")
    plain.__context__ = version
    assert tls_failure(plain) == "WRONG_VERSION_NUMBER"
    assert tls_failure(ConnectionResetError(104, "reset")) is None
    loop = ConnectionError("a")
    loop.__context__ = loop
    assert tls_failure(loop) is None


@pytest.mark.parametrize("frozen_past_deadline_s", [1.5, 0.4])
def test_a_call_answered_while_the_loop_was_frozen_is_not_timed_out(
        frozen_past_deadline_s: float) -> None:
    """Review "freeze57": frozen (SIGSTOP) while a claim was out, the worker resumed with
    Redis's answer waiting and the overdue timeout fired first: "redis claim failed:
    TimeoutError", the event went out unchecked and, its partition another replica's by
    then, twice. The answer that came meanwhile is read; a call with none still ends.
    Busy less than a second (a CPU limit, a large event mapped: review "limits57") before
    the call's request went out, Redis's answer 20 ms later was cut: it is waited for."""
    import concurrent.futures
    import threading

    async def main() -> tuple[object, float]:
        store = RedisStore("redis://127.0.0.1:1/0", timeout_s=0.2)
        answer: concurrent.futures.Future[str] = concurrent.futures.Future()
        answered_after = 0.02 if frozen_past_deadline_s < 1 else 0.0

        async def claim() -> str:
            await asyncio.sleep(0)  # its turn to write (a pool connection) comes later
            threading.Timer(answered_after, answer.set_result, ("claimed",)).start()
            return await asyncio.wrap_future(answer)

        call = asyncio.ensure_future(store._call("claim", claim))
        await asyncio.sleep(0)  # the call's deadline runs
        time.sleep(0.2 + frozen_past_deadline_s)  # the loop frozen past the deadline
        result = await call
        unanswered = asyncio.get_running_loop().create_future()
        started = time.monotonic()
        with pytest.raises(SharedStateUnavailable):
            await store._call("claim", lambda: unanswered)
        return result, time.monotonic() - started

    result, waited = asyncio.run(main())
    assert result == "claimed"
    assert waited < 1.0, "an unanswered call still ends at its timeout"
