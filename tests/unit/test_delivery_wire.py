"""UserpilotClient on the wire: real sockets against hand-written asyncio servers.

Why real sockets: what the worker depends on here is framing on the wire (interim 1xx
responses, keep-alive, timeouts, TLS trust), which a mock transport cannot show. Each test
runs a server on 127.0.0.1 port 0 that counts connections and records what arrived.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import socket
import ssl
import struct
import subprocess
import threading
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import aiohttp
import httpx
import pytest

from consumer.answers import BODY_LIMIT
from consumer.delivery import STALE_RESENDS, UserpilotClient, ssl_context, transport_failure
from consumer.errors import (
    ConnectionFailed,
    Misconfigured,
    ProxyRefused,
    RateLimited,
    Refused,
    Rejected,
    ServerError,
    Timeout,
    TlsRefused,
    WorkerError,
)
from consumer.redaction import MASK
from consumer.stalls import STALL_S
from tests.certificates import self_signed

T = TypeVar("T")

TOKEN = "wt_9f8e7d6c5b4a3210"
BODY = b'{"user_id":"user_001","event_name":"feature_used","metadata":{"k":"\xc3\xa9\r\n"}}'


# ------------------------------------------------------------------ the test server


@dataclass
class Req:
    """One request as the server received it."""

    conn: int  # server-side connection number, from 1
    index: int  # request number on that connection, from 1
    line: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: str) -> bytes | None:
        values = [v for k, v in self.headers if k.lower() == name.lower().encode()]
        assert len(values) <= 1, f"{name} sent {len(values)} times"
        return values[0] if values else None


@dataclass
class Send:
    """Write `data` after `delay` seconds and keep the connection open.

    Every action's `data` may be a list: separate writes, 20 ms apart (separate segments).
    """

    data: bytes | list[bytes]
    delay: float = 0.0


@dataclass
class Close:
    """Write `data` (maybe nothing), then close the connection (FIN)."""

    data: bytes | list[bytes] = b""
    delay: float = 0.0


@dataclass
class Reset:
    """Write `data`, let the client read it, then reset the connection (RST)."""

    data: bytes | list[bytes] = b""
    delay: float = 0.0


@dataclass
class Hang:
    """Write `data` (maybe nothing), then never answer; wait for the client to hang up."""

    data: bytes | list[bytes] = b""
    delay: float = 0.0


Action = Send | Close | Reset | Hang


async def _read_request(reader: asyncio.StreamReader, conn: int, index: int) -> Req | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return None
    line, *fields = head[:-4].split(b"\r\n")
    headers = [(k, v.strip()) for k, _, v in (f.partition(b":") for f in fields)]
    length = next((int(v) for k, v in headers if k.lower() == b"content-length"), 0)
    return Req(conn, index, line, headers, await reader.readexactly(length))


class Server:
    """An HTTP/1.x server whose answers come from `respond(request)`.

    Counts connections (total, simultaneously open, peak) and which ones the client closed.
    """

    def __init__(self, respond: Callable[[Req], Action],
                 tls: ssl.SSLContext | None = None) -> None:
        self.respond = respond
        self.tls = tls
        self.connections = 0
        self.open = 0
        self.peak = 0
        self.requests: list[Req] = []
        self.hung_up: set[int] = set()  # connections the client closed
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    def url(self, path: str = "/v1/track", scheme: str = "http",
            host: str = "127.0.0.1") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        n = self.connections
        self.open += 1
        self.peak = max(self.peak, self.open)
        try:
            index = 0
            while True:
                req = await _read_request(reader, n, index + 1)
                if req is None:
                    self.hung_up.add(n)
                    return
                index += 1
                self.requests.append(req)
                action = self.respond(req)
                if action.delay:
                    await asyncio.sleep(action.delay)
                writes = action.data if isinstance(action.data, list) else [action.data]
                for i, data in enumerate(writes):
                    if i:
                        await asyncio.sleep(0.02)
                    writer.write(data)
                    await writer.drain()
                if isinstance(action, Close):
                    return
                if isinstance(action, Reset):
                    await asyncio.sleep(0.02)  # the client reads the partial data first
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()
                    return
                if isinstance(action, Hang):
                    await reader.read()  # until EOF: the client gave up on this connection
                    self.hung_up.add(n)
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            self.hung_up.add(n)
        except asyncio.CancelledError:
            pass  # test over; ending normally keeps asyncio's server callback quiet
        finally:
            self.open -= 1
            writer.close()
            self._tasks.discard(task)


def http(status: int = 202, body: bytes = b"", headers: Sequence[str] = (), *,
         version: str = "HTTP/1.1", reason: str = "OK", length: bool = True) -> bytes:
    """A response as raw bytes; Content-Length added unless `length` is False."""
    lines = [f"{version} {status} {reason}", *headers]
    if length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


ACCEPTED = http(202, b'{"ok":true}', ["Content-Type: application/json", "X-Request-Id: r1"])


def always(action: Action) -> Callable[[Req], Action]:
    return lambda _req: action


async def wait_until(predicate: Callable[[], bool], seconds: float = 1.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


def run(main: Callable[[], Awaitable[T]]) -> T:
    async def wrapped() -> T:
        return await main()

    return asyncio.run(wrapped())


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


HEADERS = {"Authorization": f"Token {TOKEN}", "Content-Type": "application/json"}


def up(url: str, *, timeout_s: float = 2.0, max_connections: int = 4,
       ca_bundle: str | None = None) -> UserpilotClient:
    return UserpilotClient(url, HEADERS, timeout_s=timeout_s, max_connections=max_connections,
                           ca_bundle=ca_bundle)


E = TypeVar("E", bound=WorkerError)


async def failure_of(client: UserpilotClient, kind: type[E]) -> E:
    """What a Track through `client` raises, which must be a `kind`; the client closed."""
    try:
        with pytest.raises(kind) as info:
            await client.track(BODY)
    finally:
        await client.aclose()
    return info.value


async def outcome(client: UserpilotClient, body: bytes) -> str:
    """'ok', or the name of the classified exception."""
    try:
        await client.track(body)
    except WorkerError as exc:
        return type(exc).__name__
    return "ok"


@pytest.fixture(autouse=True)
def _no_proxy_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                 "all_proxy", "SSL_CERT_FILE", "SSL_CERT_DIR"):
        monkeypatch.delenv(name, raising=False)


# ------------------------------------------------------------------ requests and keep-alive


def test_sequential_requests_reuse_one_connection_and_arrive_exactly() -> None:
    async def main() -> None:
        async with Server(always(Send(ACCEPTED))) as srv:
            client = up(srv.url())
            assert [await outcome(client, BODY) for _ in range(3)] == ["ok"] * 3
            await client.aclose()
        assert srv.connections == 1
        assert [q.body for q in srv.requests] == [BODY] * 3
        first = srv.requests[0]
        assert first.line == b"POST /v1/track HTTP/1.1"
        assert first.header("Authorization") == f"Token {TOKEN}".encode()
        assert first.header("Content-Length") == str(len(BODY)).encode()

    run(main)


def test_a_2xx_whose_body_comes_later_still_leaves_its_connection_to_the_next() -> None:
    """A 2xx's body is not needed, but one not all there when the status came is read
    (briefly): left unread, the connection would be closed instead of pooled, and every
    request would pay a new connection (a TLS handshake with Userpilot)."""
    head, body = ACCEPTED.split(b"\r\n\r\n", 1)
    async def main() -> None:
        async with Server(always(Send([head + b"\r\n\r\n", body]))) as srv:
            client = up(srv.url())
            assert [await outcome(client, BODY) for _ in range(3)] == ["ok"] * 3
            await client.aclose()
        assert srv.connections == 1

    run(main)


def test_a_2xx_that_came_whole_is_not_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading the body of an answer nothing looks at cost ~4 % of the worker's CPU per
    delivered event (RESULTS.md, "Round 39"); an error answer is still read (classified)."""
    import consumer.delivery as delivery

    reads: list[int] = []
    real = delivery._read_capped

    async def counted(response: httpx.Response) -> bytes:
        reads.append(1)
        return await real(response)

    monkeypatch.setattr(delivery, "_read_capped", counted)
    head, body = ACCEPTED.split(b"\r\n\r\n", 1)
    answers = iter([Send(ACCEPTED), Send([head + b"\r\n\r\n", body]),
                    Send(http(400, b'{"error":"bad"}'))])

    async def main() -> None:
        async with Server(lambda _req: next(answers)) as srv:
            client = up(srv.url())
            assert await outcome(client, BODY) == "ok"
            assert reads == [], "a whole 2xx is not read"
            assert await outcome(client, BODY) == "ok"
            assert reads == [1], "one still arriving is"
            assert await outcome(client, BODY) == "Rejected"
            assert reads == [1, 1], "an error answer is"
            await client.aclose()
        assert srv.connections == 1

    run(main)


@pytest.mark.parametrize("lost", [Close(), Reset()], ids=["closed", "reset"])
def test_a_request_a_kept_alive_connection_lost_is_sent_again_at_once(lost: Action) -> None:
    """Review idle18: the server closed an idle connection as the client reused it (its
    keep-alive timeout against ours). aiohttp resends only idempotent methods; counted as
    a failure, the event lost an attempt, a backoff and a rate-limit slot."""
    async def main() -> None:
        async with Server(lambda req: lost if req.index == 2 else Send(ACCEPTED)) as srv:
            client = up(srv.url())
            assert await outcome(client, BODY) == "ok"
            assert await outcome(client, BODY) == "ok", "sent again on a new connection"
            await client.aclose()
        assert [(q.conn, q.index) for q in srv.requests] == [(1, 1), (1, 2), (2, 1)]

    run(main)


PARTIAL_202 = b"HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\n"


@pytest.mark.parametrize("lost", [Close(delay=0.5), Reset(delay=0.5), Close(PARTIAL_202),
                                  Reset(PARTIAL_202), Reset(b"HTTP/1.1 202 Acc")],
                         ids=["held-then-closed", "held-then-reset", "answer-begun",
                              "answer-begun-then-reset", "status-begun-then-reset"])
def test_a_kept_alive_request_the_server_may_have_taken_is_not_sent_again_at_once(
        lost: Action) -> None:
    """Review diff18: a request the server held for a while, or began to answer, before
    the connection dropped may have been processed: it goes through the retry policy
    (backoff, an attempt, a limiter slot), not an immediate resend."""
    async def main() -> None:
        async with Server(lambda req: lost if req.index == 2 else Send(ACCEPTED)) as srv:
            client = up(srv.url())
            assert await outcome(client, BODY) == "ok"
            assert await outcome(client, BODY) == "ConnectionFailed"
            await client.aclose()
        assert len(srv.requests) == 2

    run(main)


@pytest.mark.parametrize(("stale", "real", "expected"), [
    (http(202, b"stale"), http(400, b'{"error":"real"}'), "Rejected"),
    (http(400, b'{"error":"stale"}'), ACCEPTED, "ok"),
], ids=["stale-202", "stale-400"])
def test_an_answer_that_came_on_an_idle_connection_is_nobody_s(
        stale: bytes, real: bytes, expected: str) -> None:
    """Review http40: a server (or middlebox) wrote a whole answer on a pooled connection
    nobody was using. aiohttp queued it, and the next request on that connection took it
    as its own without having reached the server: a stale 202 counted an unsent event
    delivered (lost once committed), a stale 400 dead-lettered it. The connection is
    closed instead, and the request goes out on a new one and gets its own answer."""
    async def main() -> None:
        def respond(req: Req) -> Action:
            if req.conn == 1:
                return Send([ACCEPTED, stale])  # the second write: after the answer, idle
            return Send(real)

        async with Server(respond) as srv:
            client = up(srv.url(), max_connections=1)
            assert await outcome(client, BODY) == "ok"
            await asyncio.sleep(0.1)  # the stale answer arrives on the idle connection
            assert await outcome(client, BODY) == expected
            await client.aclose()
        assert [(q.conn, q.index) for q in srv.requests] == [(1, 1), (2, 1)]

    run(main)


@pytest.mark.parametrize(("reason", "status", "expected"), [
    (b"Accept\xe9", 202, "ok"),  # Latin-1 "Accepté"
    (b"Acc\xffpted", 202, "ok"),
    (b"Accept\xc3\xa9", 202, "ok"),  # UTF-8
    (b"B\xffd", 400, "Rejected"),
])
def test_a_reason_phrase_of_any_bytes_is_read(reason: bytes, status: int, expected: str) -> None:
    """Review http40: HTTP allows any byte in a reason phrase. One that is not UTF-8 made
    httpx-aiohttp raise after the answer had come: a 202 read as no answer was sent again
    (and again, each time), a 400 was retried instead of dead-lettered."""
    async def main() -> None:
        answer = b"HTTP/1.1 %d " % status + reason + b"\r\nContent-Length: 2\r\n\r\n{}"
        async with Server(always(Send(answer))) as srv:
            client = up(srv.url(), max_connections=1)
            assert await outcome(client, BODY) == expected
            assert await outcome(client, BODY) == expected
            await client.aclose()
        assert len(srv.requests) == 2, "each request sent once"
        assert srv.connections == 1

    run(main)


def test_a_new_connection_lost_before_the_answer_is_a_failure_not_resent() -> None:
    """Only a kept-alive connection's loss is the keep-alive race: a server that drops a
    new connection's request is failing, and its failures go through the retry policy."""
    async def main() -> None:
        async with Server(always(Close())) as srv:
            client = up(srv.url())
            assert await outcome(client, BODY) == "ConnectionFailed"
            await client.aclose()
        assert len(srv.requests) == 1

    run(main)


def test_resends_of_lost_kept_alive_requests_are_bounded() -> None:
    """Every connection is lost on its second request: with eight kept alive, the request
    and its three resends each take one, and then the failure counts (a server dropping
    every reused connection is failing, not racing)."""
    async def main() -> None:
        async with Server(lambda req: Close() if req.index >= 2 else Send(ACCEPTED)) as srv:
            client = up(srv.url(), max_connections=8)
            # Eight kept-alive connections, each with one request behind it.
            gate = asyncio.Event()

            async def first() -> str:
                await gate.wait()
                return await outcome(client, BODY)

            tasks = [asyncio.create_task(first()) for _ in range(8)]
            gate.set()
            assert await asyncio.gather(*tasks) == ["ok"] * 8
            before = len(srv.requests)
            assert await outcome(client, BODY) == "ConnectionFailed"
            await client.aclose()
        assert len(srv.requests) - before == 1 + STALE_RESENDS

    run(main)


def test_a_resend_is_told_with_its_endpoint_and_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    """Review http54: a server that took the request and then lost the connection has it
    twice; the resend was invisible (no metric, no line). It is told to `on_resend` with
    the call's endpoint, and logged."""
    told: list[str] = []

    async def main() -> None:
        async with Server(lambda req: Close() if req.index == 2 else Send(ACCEPTED)) as srv:
            client = UserpilotClient(srv.url(), HEADERS, timeout_s=2.0, max_connections=1,
                                     on_resend=told.append)
            assert await outcome(client, BODY) == "ok"
            assert told == []
            assert await outcome(client, BODY) == "ok"
            await client.aclose()
        assert len(srv.requests) == 3

    with caplog.at_level(logging.INFO, logger="consumer.delivery.resend"):
        run(main)
    assert told == ["track"]
    assert [r.getMessage() for r in caplog.records
            if r.name == "consumer.delivery.resend"] == [
        "a track request that a kept-alive connection lost as it went out "
        "(ServerDisconnectedError) was sent again at once; had Userpilot taken it, it has it "
        "twice"]


def test_an_answer_to_a_resent_request_says_so() -> None:
    """Review "r54": a 4xx says the request was not taken, and the handler hands the
    event's claim on at a stop; but a 429 answering a resend says nothing of the request
    the lost connection carried, which the server may have taken. The answer carries it."""
    async def main() -> list[WorkerError]:
        answers: dict[tuple[int, int], Action] = {(1, 1): Send(ACCEPTED), (1, 2): Close()}
        async with Server(lambda req: answers.get((req.conn, req.index),
                                                  Send(http(429, b"")))) as srv:
            client = up(srv.url())
            assert await outcome(client, BODY) == "ok"
            resent = await error_of(client, BODY)  # lost on the kept-alive connection
            again = await error_of(client, BODY)  # the new connection, not lost
            await client.aclose()
        return [resent, again]

    resent, again = run(main)
    assert isinstance(resent, RateLimited) and resent.resent
    assert isinstance(again, RateLimited) and not again.resent


def test_at_most_max_connections_under_fifty_concurrent_requests() -> None:
    async def main() -> None:
        async with Server(always(Send(ACCEPTED, delay=0.01))) as srv:
            client = up(srv.url(), max_connections=4)
            results = await asyncio.gather(*(outcome(client, BODY) for _ in range(50)))
            await client.aclose()
        assert results == ["ok"] * 50
        assert srv.peak <= 4

    run(main)


def test_cookies_are_neither_kept_nor_sent_back() -> None:
    """An API client for one fixed host: a Set-Cookie (a gateway's session, an affinity
    cookie) must not make later requests differ from the first."""
    cookie = http(202, b"", ["Set-Cookie: session=abc; Path=/", "Set-Cookie: lb=node-2"])

    async def main() -> None:
        async with Server(always(Send(cookie))) as srv:
            # By name: aiohttp's default jar ignores cookies from IP-address hosts, so at
            # 127.0.0.1 this test could not fail.
            client = up(srv.url(host="localhost"))
            assert [await outcome(client, BODY) for _ in range(3)] == ["ok"] * 3
            await client.aclose()
        assert [q.header("Cookie") for q in srv.requests] == [None] * 3

    run(main)


def test_redirects_are_not_followed_on_the_wire() -> None:
    """A 3xx is classified (Misconfigured), never followed: the token stays on its host."""
    moved = http(307, b"", ["Location: http://127.0.0.1:9/v1/track"], reason="Moved")

    async def main() -> str:
        async with Server(always(Send(moved))) as srv:
            client = up(srv.url())
            got = await outcome(client, BODY)
            await client.aclose()
        assert len(srv.requests) == 1
        return got

    assert run(main) == "Misconfigured"


# ------------------------------------------------------------------ interim 1xx responses


@pytest.mark.parametrize("interim", [
    b"HTTP/1.1 100 Continue\r\n\r\n",
    b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n",
], ids=["100", "103", "100+102"])
def test_interim_responses_do_not_shift_later_responses(interim: bytes) -> None:
    """Each request gets its own final answer, whatever interim answers came before it."""
    final = {b"good": ACCEPTED, b"bad": http(400, b'{"error":"bad"}', reason="Bad Request"),
             b"busy": http(503, b"", reason="Unavailable")}

    def respond(req: Req) -> Action:
        return Send([interim, final[req.body]])  # separate segments, as a proxy would

    async def main() -> list[str]:
        async with Server(respond) as srv:
            client = up(srv.url(), max_connections=1)
            got = [await outcome(client, body)
                   for body in (b"good", b"bad", b"good", b"busy", b"good", b"good")]
            await client.aclose()
            assert srv.connections == 1  # kept alive across the interim answers
        return got

    assert run(main) == ["ok", type(Rejected("")).__name__, "ok",
                         type(ServerError("")).__name__, "ok", "ok"]


# ------------------------------------------------------------------ timeouts and failures


def test_timeouts_and_refusals_are_classified_without_the_token() -> None:
    async def main() -> None:
        async with Server(always(Hang())) as srv:
            slow = up(srv.url(), timeout_s=0.2)
            with pytest.raises(Timeout) as timed_out:
                await slow.track(BODY)
            await slow.aclose()
        refused = up(f"http://127.0.0.1:{closed_port()}/v1/track", timeout_s=0.2)
        with pytest.raises(ConnectionFailed) as failed:
            await refused.track(BODY)
        await refused.aclose()
        for exc in (timed_out.value, failed.value):
            assert TOKEN not in str(exc)

    run(main)


def test_the_pool_timeout_bounds_the_wait_for_a_connection() -> None:
    async def main() -> None:
        async with Server(always(Hang())) as srv:
            client = up(srv.url(), timeout_s=0.3, max_connections=1)
            start = time.monotonic()
            results = await asyncio.gather(outcome(client, BODY), outcome(client, BODY))
            elapsed = time.monotonic() - start
            await client.aclose()
        assert results == ["Timeout", "Timeout"]
        assert elapsed < 2.0

    run(main)


def test_waiting_for_a_connection_is_not_part_of_an_attempt() -> None:
    """Userpilot slow but within the timeout, more requests than connections: those queued
    for a connection timed out in the pool ("ConnectTimeout"), each using an attempt of
    an event that never left, feeding the outage gate, and dead-lettering events."""
    async def main() -> list[str]:
        async with Server(always(Send(ACCEPTED, delay=0.4))) as srv:
            client = up(srv.url(), timeout_s=0.5, max_connections=2)
            results = await asyncio.gather(*(outcome(client, BODY) for _ in range(8)))
            await client.aclose()
            assert len(srv.requests) == 8 and srv.peak <= 2
        return results

    assert run(main) == ["ok"] * 8


@pytest.mark.parametrize("answer", [
    Close(b"HTTP/1.1 202 Accepted\r\nContent-Length: 100\r\n\r\n{\"ok\""),
    Send([http(202, b"", length=False)[:-2] + b"Content-Length: 40\r\n\r\n"]
         + [b"x"] * 40),  # the body trickles past the deadline
    Send(http(202, b"not gzip at all", ["Content-Encoding: gzip"])),
], ids=["cut", "trickled", "bad-gzip"])
def test_a_2xx_whose_body_then_fails_is_delivered_not_sent_again(answer: Action) -> None:
    """Userpilot said 2xx: the event is delivered, whatever became of the body. A body
    error after a 202 was retried, and Userpilot got the event twice."""
    async def main() -> tuple[str, int]:
        async with Server(always(answer)) as srv:
            client = up(srv.url(), timeout_s=0.2)
            got = await outcome(client, BODY)
            await client.aclose()
            return got, len(srv.requests)

    assert run(main) == ("ok", 1)


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 204 No Content\r\nContent-Length: 2\r\n\r\n{}",
    b"HTTP/1.1 202 Accepted\r\nContent-Length: 2\r\n\r\n{}x",
    b"HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhi\r\n0\r\n\r\n",
    b"HTTP/1.1 204 No Content\nContent-Length: 2\n\n{}",
    [b"HTTP/1.1 204 No Content\r\nContent-Length: 2\r\n\r", b"\n{}"],
    [b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n", b"Content-Length: 2\r\n\r\n{}"],
], ids=["204-with-body", "stray-byte", "bad-chunk", "lf-only", "end-split", "after-100"])
def test_a_2xx_followed_in_the_same_read_by_unparsable_bytes_is_delivered_once(
        answer: bytes | list[bytes]) -> None:
    """Review "http49": aiohttp drops the messages it parsed from a read when a later byte
    of it is refused, so a 2xx arriving with unparsable bytes in the same read read as no
    answer, and its accepted event was sent again (every time: an outage declared, each
    probe another duplicate). The same bytes in a later read were delivered once."""
    async def main() -> tuple[str, int]:
        async with Server(always(Send(answer))) as srv:
            client = up(srv.url(), timeout_s=0.5)
            got = await outcome(client, BODY)
            await client.aclose()
            return got, len(srv.requests)

    assert run(main) == ("ok", 1)


def _cut(status: int, headers: Sequence[str]) -> bytes:
    """A status line and headers promising a 100-byte body, then 5 bytes of it."""
    return http(status, b"", length=False)[:-2] + b"\r\n".join(
        [h.encode() for h in headers] + [b"Content-Length: 100", b"", b"abcde"])


@pytest.mark.parametrize(("answer", "kind"), [
    (Reset(_cut(429, ["Retry-After: 7"])), RateLimited),
    (Send([_cut(429, ["Retry-After: 7"])] + [b"x"] * 40), RateLimited),  # trickled
    (Reset(_cut(401, [])), Refused),
    (Send([_cut(401, [])] + [b"x"] * 40), Refused),
    (Reset(_cut(503, [])), ServerError),
], ids=["429-reset", "429-trickled", "401-reset", "401-trickled", "503-reset"])
def test_an_answer_whose_body_breaks_off_is_classified_by_its_status(
        answer: Action, kind: type[WorkerError]) -> None:
    """The status line and headers came, then the body broke off (reset, or trickled past
    the deadline): taken as a timeout or reset, a 429 used up the event's attempts with
    its Retry-After unread, and a refused token read as an outage (review "http35")."""
    async def main() -> WorkerError:
        async with Server(always(answer)) as srv:
            client = up(srv.url(), timeout_s=0.2)
            try:
                return await error_of(client, BODY)
            finally:
                await client.aclose()

    error = run(main)
    assert type(error) is kind, error
    assert getattr(error, "status", None) == int(_cut_status(answer))
    if kind is RateLimited:
        assert getattr(error, "retry_after", None) == 7.0


def test_a_dead_letters_answer_whose_body_breaks_off_is_retried_not_dead_lettered() -> None:
    """A 400 read in part may be a proxy's glitch: an answer that cannot be read whole is
    never the reason an event is given up (review "diff35")."""
    async def main() -> WorkerError:
        async with Server(always(Reset(_cut(400, [])))) as srv:
            client = up(srv.url(), timeout_s=0.2)
            try:
                return await error_of(client, BODY)
            finally:
                await client.aclose()

    error = run(main)
    assert isinstance(error, ConnectionFailed | Timeout), error


def _cut_status(answer: Action) -> str:
    data = answer.data[0] if isinstance(answer.data, list) else answer.data
    return data.split(b" ")[1].decode()


def test_an_https_proxy_refusing_its_credentials_is_a_misconfiguration() -> None:
    """A 407 to the CONNECT of an HTTPS request comes from the egress proxy: pause like a
    refused token (readiness off, the alert), not an endless run of connection errors."""
    async def main() -> tuple[str, bytes]:
        refuse = Close(http(407, b"", ["Proxy-Authenticate: Basic realm=\"egress\""],
                            reason="Proxy Authentication Required"))
        async with Server(always(refuse)) as proxy:
            client = UserpilotClient("https://up.test/v1/track", HEADERS, timeout_s=2.0,
                                     max_connections=2,
                                     proxy=f"http://user:wrong@127.0.0.1:{proxy.port}")
            got = await outcome(client, BODY)
            await client.aclose()
            return got, proxy.requests[0].line

    got, line = run(main)
    assert line.startswith(b"CONNECT up.test:443")
    assert got == "Misconfigured"


def test_proxy_credentials_go_out_with_warnings_as_errors() -> None:
    """Review "env60": given as credentials, httpx-aiohttp passed them in aiohttp's
    deprecated `proxy_auth`; under PYTHONWARNINGS=error every request failed as "unusable
    answer" and nothing was delivered while the pod read ready. The CONNECT carries them,
    and nothing else does."""
    import base64
    import warnings

    async def main() -> tuple[str, bytes | None, bytes | None]:
        refuse = Close(http(407, b"", ["Proxy-Authenticate: Basic realm=\"egress\""],
                            reason="Proxy Authentication Required"))
        async with Server(always(refuse)) as proxy:
            client = UserpilotClient("https://up.test/v1/track", HEADERS, timeout_s=2.0,
                                     max_connections=2,
                                     proxy=f"http://user:p%40ss@127.0.0.1:{proxy.port}")
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                got = await outcome(client, BODY)
            await client.aclose()
            request = proxy.requests[0]
            return got, request.header("Proxy-Authorization"), request.header("Authorization")

    got, sent, plain = run(main)
    assert got == "Misconfigured"  # the proxy's 407, not "unusable answer"
    assert sent == b"Basic " + base64.b64encode(b"user:p@ss")
    assert plain is None


def test_a_proxy_echoing_the_request_leaves_no_proxy_credential_in_the_error() -> None:
    """A plain-HTTP proxy answering 400 with the request quoted: the token was masked in
    the body the DLQ stores, `Proxy-Authorization: Basic …` was not."""
    import base64

    from consumer.errors import Rejected

    secret = "Pr0xy-Secret"
    basic = base64.b64encode(f"puser:{secret}".encode())

    def echo(req: Req) -> Action:
        quoted = b" | ".join(k + b": " + v for k, v in req.headers)
        return Send(http(400, b'{"error":"bad"} ' + quoted))

    async def main() -> tuple[bytes | None, str]:
        async with Server(echo) as proxy:
            client = UserpilotClient("http://up.test/v1/track", HEADERS, timeout_s=2.0,
                                     max_connections=2,
                                     proxy=f"http://puser:{secret}@127.0.0.1:{proxy.port}")
            try:
                await client.track(BODY)
            except Rejected as exc:
                body = exc.body or ""
            else:
                raise AssertionError("a 400 is Rejected")
            await client.aclose()
            return proxy.requests[0].header("Proxy-Authorization"), body

    sent, body = run(main)
    assert sent == b"Basic " + basic  # the proxy did get the credentials
    assert "Proxy-Authorization: Basic ***" in body
    assert basic.decode() not in body and secret not in body and TOKEN not in body


def test_an_https_proxy_forbidding_the_tunnel_is_a_setting_not_an_outage() -> None:
    """A proxy's 403 to the CONNECT is its policy: the host is not allowed. As an outage the
    pod stayed ready and no alert said why (review "http33"); as a refused setting delivery
    pauses, /readyz names it, and nothing is dead-lettered (`Misconfigured`)."""
    async def main() -> WorkerError:
        async with Server(always(Close(http(403, b"", reason="Forbidden")))) as proxy:
            client = UserpilotClient("https://up.test/v1/track", HEADERS, timeout_s=2.0,
                                     max_connections=2, proxy=f"http://127.0.0.1:{proxy.port}")
            return await failure_of(client, Misconfigured)

    failure = run(main)
    assert "the proxy refused the tunnel to Userpilot (HTTP 403)" in str(failure)
    assert "NO_PROXY" in str(failure) and "token" not in str(failure)


def test_a_proxy_that_never_answers_connect_is_named_in_the_timeout() -> None:
    """Round 59's "noticed": a proxy that takes the connection and never answers CONNECT
    read as Userpilot's silence ("no answer from Userpilot in time"), the proxy unnamed. A
    server that never answers, reached directly, still reads as Userpilot's."""
    async def main() -> tuple[Timeout, Timeout]:
        async with Server(always(Hang())) as proxy:
            client = UserpilotClient("https://up.test/v1/track", HEADERS, timeout_s=0.3,
                                     max_connections=2, proxy=f"http://127.0.0.1:{proxy.port}")
            through = await failure_of(client, Timeout)
        async with Server(always(Hang())) as srv:
            direct = await failure_of(up(srv.url(), timeout_s=0.3), Timeout)
        return through, direct

    through, direct = run(main)
    assert "through the proxy" in str(through) and "HTTPS_PROXY" in str(through), through
    assert "proxy" not in str(direct) and "no answer from Userpilot" in str(direct), direct


def _tunnel_refused(status: int, kind: type[E]) -> E:
    """What a Track through a proxy answering CONNECT with `status` raises (a `kind`)."""
    async def main() -> E:
        async with Server(always(Close(http(status, b"", reason="No")))) as proxy:
            client = UserpilotClient("https://up.test/v1/track", HEADERS, timeout_s=2.0,
                                     max_connections=2, proxy=f"http://127.0.0.1:{proxy.port}")
            return await failure_of(client, kind)

    return run(main)


@pytest.mark.parametrize("status", [502, 503])
def test_an_https_proxy_refusing_the_tunnel_otherwise_is_a_connection_failure(
        status: int) -> None:
    """A proxy that cannot reach Userpilot says nothing about the event, which must wait,
    never be dead-lettered as a payload Userpilot rejected (it never left the proxy). Its
    status is named: "ProxyError" alone did not say who refused (review "http33")."""
    failure = _tunnel_refused(status, ConnectionFailed)
    assert f"the proxy refused the tunnel (HTTP {status})" in str(failure)
    assert not isinstance(failure, Misconfigured)


@pytest.mark.parametrize("status", [400, 405, 501])
def test_a_proxy_that_opens_no_tunnels_is_a_setting_not_an_outage(status: int) -> None:
    """A proxy for plain HTTP only answers CONNECT 400, 405 or 501: nothing is delivered
    until the setting changes. As an outage the pod stayed ready and no alert fired
    (review "egress59"); the events wait (a pause), never dead-lettered."""
    failure = _tunnel_refused(status, Misconfigured)
    assert isinstance(failure, ProxyRefused) and failure.status == status
    assert f"the proxy does not open tunnels (HTTP {status} to CONNECT)" in str(failure)
    assert "HTTPS_PROXY" in str(failure) and "NO_PROXY" in str(failure)


def timed_outcome(segments: list[bytes], timeout_s: float) -> tuple[str, float]:
    """The outcome of one request answered in `segments` (20 ms apart), and its seconds."""
    async def main() -> tuple[str, float]:
        async with Server(always(Send(segments))) as srv:
            client = up(srv.url(), timeout_s=timeout_s)
            start = time.monotonic()
            got = await outcome(client, BODY)
            elapsed = time.monotonic() - start
            await client.aclose()
        return got, elapsed

    return run(main)


def test_a_trickled_answer_times_out_as_a_whole() -> None:
    """Each byte arrives well within the read timeout, the whole answer does not: the
    attempt ends at twice the request timeout instead of holding its event."""
    trickle = [bytes([b]) for b in ACCEPTED]  # one byte every 20 ms: ~1.4 s in all
    assert len(trickle) * 0.02 > 1.0  # the whole answer would take longer than the deadline
    got, elapsed = timed_outcome(trickle, 0.2)
    assert got == "Timeout"
    assert elapsed < 0.9


def test_a_2xx_whose_body_trickles_delivers_its_event_at_once() -> None:
    """Review "slow55": the 2xx's head came at once, its body a byte at a time: the event
    (and its user's next ones) waited for the whole body, up to twice the request timeout
    (20 s at the defaults). The event is delivered at the head; the rest of the body is
    waited for a moment only, then the connection is closed instead of pooled."""
    body = b"x" * 150  # one byte every 20 ms: 3 s in all
    head = http(202, b"", length=False)[:-2] + f"Content-Length: {len(body)}\r\n\r\n".encode()
    got, elapsed = timed_outcome([head] + [bytes([b]) for b in body], 5.0)
    assert got == "ok"
    assert elapsed < 2.0  # ACCEPTED_BODY_S (1 s) and the head


@pytest.mark.parametrize("response", [
    b"HTTX/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n",
    b"<html>hello</html>\r\n\r\n",
    b"HTTP/1.1 202 Accepted\r\nContent-Length: ten\r\n\r\n0123456789",
], ids=["protocol", "html", "length"])
def test_malformed_responses_are_transient_failures(response: bytes) -> None:
    async def main() -> str:
        async with Server(always(Close(response))) as srv:
            client = up(srv.url())
            got = await outcome(client, BODY)
            await client.aclose()
        return got

    assert run(main) in ("ConnectionFailed", "ServerError", "Timeout")


# ------------------------------------------------------------------ TLS


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost (cert, key)."""
    return self_signed(tmp_path_factory.mktemp("tls"))


def _server_context(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    return context


def test_https_trusts_the_configured_ca_bundle(certificate: tuple[Path, Path]) -> None:
    async def main() -> None:
        async with Server(always(Send(ACCEPTED)), tls=_server_context(certificate)) as srv:
            client = up(srv.url(scheme="https", host="localhost"), ca_bundle=str(certificate[0]))
            assert [await outcome(client, BODY) for _ in range(2)] == ["ok", "ok"]
            await client.aclose()
        assert [q.body for q in srv.requests] == [BODY] * 2

    run(main)


def test_https_without_the_ca_refuses_the_server(certificate: tuple[Path, Path]) -> None:
    async def main() -> None:
        async with Server(always(Send(ACCEPTED)), tls=_server_context(certificate)) as srv:
            client = up(srv.url(scheme="https"))  # certifi's CAs: self-signed is refused
            # A setting to fix, not an outage: paused, and /readyz names it (review
            # "faults29": retried as a connection error, the pod stayed ready).
            try:
                await client.track(BODY)
            except TlsRefused as exc:
                assert "USERPILOT_CA_BUNDLE" in str(exc)
            else:
                raise AssertionError("delivered to an untrusted certificate")
            await client.aclose()
        assert srv.requests == []

    run(main)


def test_https_to_a_plain_http_port_is_a_setting_not_an_outage() -> None:
    """TLS spoken to a port that answers plain HTTP (the endpoint's port wrong): OpenSSL
    reads the HTTP answer as a broken record. Retried as a connection error, it left the
    pod ready and `userpilot_integration_up` at 1 (review "faults29")."""
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)  # the ClientHello
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = up(f"https://127.0.0.1:{port}")
        try:
            await client.track(BODY)
        except TlsRefused as exc:
            assert "does not speak TLS" in str(exc) and "USERPILOT_ANALYTICS_ENDPOINT" in str(exc)
        else:
            raise AssertionError("no TLS refusal")
        finally:
            await client.aclose()
            server.close()
            await server.wait_closed()

    run(main)


def test_ssl_cert_file_is_honoured_when_no_bundle_is_configured(
        certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate[0]))

    async def main() -> str:
        async with Server(always(Send(ACCEPTED)), tls=_server_context(certificate)) as srv:
            client = up(srv.url(scheme="https"))
            got = await outcome(client, BODY)
            await client.aclose()
        return got

    assert run(main) == "ok"


def test_the_configured_bundle_wins_over_ssl_cert_file(
        certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "missing.pem"))
    context = ssl_context(str(certificate[0]))
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert len(context.get_ca_certs()) == 1


# ------------------------------------------------------------------ answers nobody expects


async def error_of(client: UserpilotClient, body: bytes) -> WorkerError:
    try:
        await client.track(body)
    except WorkerError as exc:
        return exc
    raise AssertionError("delivered")


@pytest.mark.parametrize("charset", ["cp500", "utf-16-le", "utf-32", "shift_jis", "big5",
                                     "utf-7", "utf-8"])
def test_an_echo_of_the_token_under_any_charset_label_is_masked(charset: str) -> None:
    """Review http40: a gateway quoting the request (the bytes it was sent) under a charset
    label that reads ASCII as something else: decoded by that label, the token escaped
    redaction yet stayed whole, to be encoded back from the exception and the dead letter
    (a Shift_JIS or Big5 lead byte took its first character, leaving 18 of 19 in sight)."""
    async def main() -> WorkerError:
        def respond(req: Req) -> Action:
            quoted = b" | ".join(k + b": " + v for k, v in req.headers)
            # A Shift_JIS (Big5) lead byte right before it reads as one character with
            # the token's first.
            quoted = quoted.replace(b"Token ", b"Token \x81")
            return Send(http(400, b"bad request: " + quoted,
                             [f"Content-Type: text/plain; charset={charset}"]))

        async with Server(respond) as srv:
            client = up(srv.url())
            got = await error_of(client, BODY)
            await client.aclose()
        return got

    error = run(main)
    assert isinstance(error, Rejected)
    shown = f"{error} {error.body}"
    assert TOKEN[1:] not in shown and TOKEN[:-1] not in shown
    assert TOKEN.encode() not in shown.encode(charset, "replace")
    assert MASK in error.body


@pytest.mark.parametrize(("answer", "kind"), [
    (http(503, b"abcd", ["Content-Type: text/plain; charset=utf-16"]), ServerError),
    (http(503, b"abcd", ["Content-Type: text/plain; charset=idna"]), ServerError),
    (http(503, b"abcd", ["Content-Type: text/plain; charset=hex"]), ServerError),
    (http(400, b"\xff\xfe\x00bad", ["Content-Type: text/plain; charset=nope"]), Rejected),
    (http(429, b"", ["Retry-After: Mon, 01 Jan 2026 00:00:00 +99999999999999999999"]),
     RateLimited),
    (http(503, b"", ["Retry-After: Mon, 01 Jan 99999999999 00:00:00 GMT"]), ServerError),
    (http(503, b"\x1f\x8b not gzip", ["Content-Encoding: gzip"]), ServerError),
    (http(503, b"zzz", ["Content-Encoding: br"]), ServerError),
], ids=["utf-16", "idna", "hex", "unknown-charset", "zone-overflow", "year-overflow",
        "bad-gzip", "br"])
def test_an_odd_error_answer_is_classified_never_raised_raw(
        answer: bytes, kind: type[WorkerError]) -> None:
    """A charset Python cannot apply, a Retry-After date too large for datetime, a body in
    an encoding we did not ask for: each raised something other than a WorkerError, which
    stopped the worker (exit 1) on every restart while the gateway answered so."""
    async def main() -> WorkerError:
        async with Server(always(Send(answer))) as srv:
            client = up(srv.url())
            got = await error_of(client, BODY)
            await client.aclose()
        return got

    error = run(main)
    assert type(error) is kind
    assert getattr(error, "retry_after", None) in (None, 0.0) or kind is ServerError


def test_answers_are_read_only_so_far() -> None:
    """A 2xx or an error answer of 200 MB (or a gzip body inflating to 64 MB and more)
    was read and decoded whole: an OOM kill under the chart's 512 MiB limit. At most
    MAX_BODY_BYTES are read; such a connection is closed (not pooled) and the next
    request still works."""
    bomb = gzip.compress(b"A" * (64 * 1024 * 1024), compresslevel=9)
    big = b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n"
    chunk = 8 * 1024 * 1024
    answers = iter([
        Send([big % (202, 200 * chunk), b"x" * chunk]),
        Send([big % (503, 200 * chunk), b"y" * chunk]),
        Send(http(503, bomb, ["Content-Encoding: gzip"])),
        Send(ACCEPTED),
    ])

    async def main() -> tuple[list[str], list[str], int]:
        results: list[str] = []
        texts: list[str] = []
        async with Server(lambda _req: next(answers)) as srv:
            client = up(srv.url(), timeout_s=5.0, max_connections=1)
            for _ in range(4):
                try:
                    await client.track(BODY)
                    results.append("ok")
                except WorkerError as exc:
                    results.append(type(exc).__name__)
                    texts.append(getattr(exc, "body", ""))
            await client.aclose()
            return results, texts, srv.connections

    tracemalloc.start()
    try:
        results, texts, connections = run(main)
        peak_mb = tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()
    assert results == ["ok", "ServerError", "ServerError", "ok"]
    assert texts == ["y" * BODY_LIMIT, "A" * BODY_LIMIT]
    assert connections >= 3  # the answers left unread were not pooled
    # The server's own 8 MB writes (in this process) are most of what is left.
    assert peak_mb < 40, f"peak traced memory {peak_mb:.0f} MB"


def test_a_redirect_quotes_its_location_without_the_token() -> None:
    """The Location of a redirect is quoted in the error (and /readyz); a gateway that
    echoes the token into it must not put it there."""
    moved = http(302, b"", [f"Location: https://elsewhere.test/?auth={TOKEN}",
                            f"X-Request-Id: r-{TOKEN}"], reason="Found")

    async def main() -> WorkerError:
        async with Server(always(Send(moved))) as srv:
            client = up(srv.url())
            got = await error_of(client, BODY)
            await client.aclose()
        return got

    error = run(main)
    assert "elsewhere.test" in str(error) and TOKEN not in str(error)


# ------------------------------------------------------------------ a stalled event loop


class ThreadedServer:
    """Answers every request `answer` after `delay` s, on its own thread: it goes on while
    the test freezes the client's event loop (a SIGSTOP, a paused VM). `answer` None:
    never answers."""

    def __init__(self, answer: bytes | None, delay: float = 0.05) -> None:
        self.answer, self.delay = answer, delay
        self.requests = 0
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as stream:
            while True:
                head = b""
                while not head.endswith(b"\r\n\r\n"):
                    line = stream.readline()
                    if not line:
                        return
                    head += line
                length = next(int(v) for k, _, v in (f.partition(b":") for f in head.split(b"\r\n"))
                              if k.lower() == b"content-length")
                stream.read(length)
                self.requests += 1
                if self.answer is None:
                    stream.read()  # until the client hangs up
                    return
                time.sleep(self.delay)
                conn.sendall(self.answer)

    def close(self) -> None:
        self._sock.close()


def test_answers_that_came_while_the_loop_was_frozen_are_read_not_timed_out() -> None:
    """Frozen past the deadline (twice the request timeout) with requests on the wire, the
    client resumes with their answers in its sockets: they are delivered, not timed out and
    sent again (round 33: every request on the wire then was a duplicate)."""
    srv = ThreadedServer(ACCEPTED)

    async def main() -> list[str]:
        client = up(f"http://127.0.0.1:{srv.port}/v1/track", timeout_s=0.2)
        sends = [asyncio.create_task(outcome(client, BODY)) for _ in range(4)]
        await wait_until(lambda: srv.requests == 4)
        time.sleep(2.0)  # the loop frozen 1.6 s past the 0.4 s deadline; answers arrive
        got = await asyncio.gather(*sends)
        await client.aclose()
        return got

    try:
        assert run(main) == ["ok"] * 4
        assert srv.requests == 4, "sent once each"
    finally:
        srv.close()


def test_a_request_with_no_answer_still_times_out_after_a_frozen_loop() -> None:
    """After the stall the timeouts start again, whole: a request whose answer never comes
    ends then."""
    srv = ThreadedServer(None)

    async def main() -> tuple[str, float]:
        client = up(f"http://127.0.0.1:{srv.port}/v1/track", timeout_s=0.2)
        start = time.monotonic()
        send = asyncio.create_task(outcome(client, BODY))
        await wait_until(lambda: srv.requests == 1)
        time.sleep(1.5)
        got = await send
        await client.aclose()
        return got, time.monotonic() - start

    try:
        got, elapsed = run(main)
        assert got == "Timeout"
        assert elapsed < 1.5 + STALL_S + 0.5
    finally:
        srv.close()


def test_a_read_timeout_firing_late_after_a_frozen_loop_starts_again() -> None:
    """The connection's read timeout (aiohttp's `sock_read`): overdue by more than STALL_S
    when the loop resumes, it starts again, whole (the body may have gone out only now);
    on time, it fires as before."""
    from consumer.delivery import _Protocol

    async def main() -> tuple[BaseException | None, BaseException | None]:
        proto = _Protocol(loop=asyncio.get_running_loop())
        proto.read_timeout = 0.1
        proto.start_timeout()
        time.sleep(0.1 + STALL_S + 0.2)  # frozen past the read timeout by more than STALL_S
        await asyncio.sleep(0.05)
        first = proto.exception()
        await asyncio.sleep(0.1)  # one read timeout more
        return first, proto.exception()

    first, later = run(main)
    assert first is None, "fired for time the loop did not run"
    assert isinstance(later, aiohttp.SocketTimeoutError)


def test_a_host_that_does_not_resolve_is_named_in_the_failure() -> None:
    """"ClientConnectorDNSError" alone hid a misspelt USERPILOT_ANALYTICS_ENDPOINT: the
    failure names the host (review "http33"). Still a connection failure: DNS may be down."""

    async def main() -> WorkerError:
        client = up("http://no-such-host.invalid/v1/track")
        return await failure_of(client, ConnectionFailed)

    failure = run(main)
    assert "'no-such-host.invalid' does not resolve" in str(failure)
    assert "USERPILOT_ANALYTICS_ENDPOINT" in str(failure)


def test_a_proxy_host_that_does_not_resolve_names_the_proxy_setting() -> None:
    """Through a proxy the name looked up is the proxy's: the failure names HTTPS_PROXY, not
    the Userpilot endpoint (review "diff33")."""

    async def main() -> WorkerError:
        client = UserpilotClient("https://up.test/v1/track", HEADERS, timeout_s=2.0,
                                 max_connections=2, proxy="http://no-such-proxy.invalid:3128")
        return await failure_of(client, ConnectionFailed)

    said = str(run(main))
    assert "the proxy's host 'no-such-proxy.invalid' does not resolve" in said
    assert "HTTPS_PROXY" in said and "USERPILOT_ANALYTICS_ENDPOINT" not in said


_BIG_FIELD = (b"HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\n"
              b"Content-Security-Policy: " + b"a" * 9000 + b"\r\nContent-Length: 2\r\n\r\n{}")
_MANY_FIELDS = (b"HTTP/1.1 202 Accepted\r\n"
                + b"".join(b"X-Trace-%d: v\r\n" % i for i in range(200))
                + b"Content-Length: 2\r\n\r\n{}")


@pytest.mark.parametrize("answer", [_BIG_FIELD, _MANY_FIELDS], ids=["9KB-field", "200-fields"])
def test_an_accepted_answer_with_large_headers_is_delivered_once(answer: bytes) -> None:
    """Review http44: over aiohttp's default header limits (8,190 bytes a line, 128
    fields) a valid 202 read as an unusable answer, retried: Userpilot counted the event
    at every attempt."""
    async def main() -> tuple[str, int]:
        async with Server(always(Send(answer))) as s:
            c = up(s.url())
            try:
                return await outcome(c, b'{"user_id":"u1","event_name":"e"}'), len(s.requests)
            finally:
                await c.aclose()

    assert run(main) == ("ok", 1)


@pytest.mark.parametrize(("fields", "expected"), [
    # Review http44: httpx joins repeated fields ("30, 30"), which read as nothing, and the
    # wait Userpilot asked for was lost.
    (["Retry-After: 30", "Retry-After: 5"], 30),
    # Review "http49": a blank first field read as no wait asked for.
    (["Retry-After: ", "Retry-After: 5"], 5),
], ids=["sent-twice", "blank-first"])
def test_a_retry_after_sent_twice_is_read_from_its_first_field_not_blank(
        fields: list[str], expected: float) -> None:
    async def main() -> float | None:
        async with Server(always(Send(http(429, b"", fields)))) as s:
            c = up(s.url())
            try:
                await c.track(b"{}")
            except RateLimited as exc:
                return exc.retry_after
            finally:
                await c.aclose()
        return None

    assert run(main) == expected


@pytest.mark.parametrize(("code", "says"), [
    (10, "outside its validity dates"), (9, "outside its validity dates"),
    (9, "not valid yet"),
    (10, "a CA in USERPILOT_CA_BUNDLE to replace"), (20, "set USERPILOT_CA_BUNDLE"),
    (62, "issued for another host"), (64, "issued for another host")])
def test_an_expired_certificate_is_not_sent_to_the_ca_bundle(code: int, says: str) -> None:
    """Review http44: its CA is trusted; "set USERPILOT_CA_BUNDLE to the CA that signed
    it" sent the operator the wrong way. An unknown issuer (20) still names the setting."""
    from consumer.delivery import _tls_refusal

    cause = ssl.SSLCertVerificationError(1, "certificate verify failed")
    cause.verify_code = code
    cause.verify_message = {10: "certificate has expired", 9: "certificate is not yet valid",
                            20: "unable to get local issuer certificate",
                            62: "Hostname mismatch", 64: "IP address mismatch"}[code]
    wrapped = aiohttp.ClientConnectorCertificateError(None, cause)  # type: ignore[arg-type]
    refusal = _tls_refusal(wrapped)
    assert refusal is not None and says in str(refusal)
    assert (code in (9, 10)) == ("clock is wrong" in str(refusal))
    # Review "http49": a certificate for another name is not the CA bundle's to fix.
    assert (code in (62, 64)) == ("USERPILOT_CA_BUNDLE" not in str(refusal))


@pytest.mark.parametrize(("code", "why"), [
    (66, "EE certificate key too weak"), (67, "CA certificate key too weak"),
    (68, "CA signature digest algorithm too weak")])
def test_a_chain_too_weak_for_openssl_is_not_sent_to_the_ca_bundle(code: int, why: str) -> None:
    """Review "egress59": a 1024-bit key or a SHA-1 signature from a trusted CA read "set
    USERPILOT_CA_BUNDLE to the CA that signed it", which cannot fix it."""
    from consumer.delivery import _tls_refusal

    cause = ssl.SSLCertVerificationError(1, "certificate verify failed")
    cause.verify_code = code
    cause.verify_message = why
    wrapped = aiohttp.ClientConnectorCertificateError(None, cause)  # type: ignore[arg-type]
    refusal = _tls_refusal(wrapped)
    assert refusal is not None and "too weak" in str(refusal) and why in str(refusal)
    assert "USERPILOT_CA_BUNDLE" not in str(refusal)


def _ssl_failure(reason: str) -> aiohttp.ClientConnectorSSLError:
    """aiohttp's handshake failure as raised, its cause the `ssl` error of OpenSSL's
    `reason`."""
    cause = ssl.SSLError(1, f"[SSL: {reason}] {reason.lower()}")
    cause.reason = reason
    try:
        try:
            raise cause
        except ssl.SSLError as exc:
            raise aiohttp.ClientConnectorSSLError(None, exc) from exc
    except aiohttp.ClientConnectorSSLError as wrapped:
        return wrapped


def test_running_out_of_file_descriptors_is_named_not_taken_for_userpilot() -> None:
    """Review "env60": at the process's open-file limit every connection failed as
    "connection to Userpilot failed (ClientConnectorError)", an outage of Userpilot's with
    nothing naming the descriptors."""
    import errno
    from types import SimpleNamespace

    key = SimpleNamespace(host="up.test", port=443, ssl=True)
    cause = aiohttp.ClientConnectorError(
        key, OSError(errno.EMFILE, "Too many open files"))  # type: ignore[arg-type]
    wrapped = httpx.ConnectTimeout("")
    wrapped.__cause__ = cause
    failure = transport_failure(wrapped, 5.0)
    assert type(failure) is ConnectionFailed
    assert "too many open files" in str(failure) and "ulimit" in str(failure), failure
    other = aiohttp.ClientConnectorError(
        key, OSError(errno.EHOSTUNREACH, "No route to host"))  # type: ignore[arg-type]
    wrapped.__cause__ = other
    assert "open files" not in str(transport_failure(wrapped, 5.0))


def test_a_lookup_failing_at_the_descriptor_limit_is_not_called_a_wrong_host(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Review "diff60b": at the open-file limit glibc's lookup fails "Name or service not
    known", so a hostname endpoint (production's) read "its host does not resolve; check
    USERPILOT_ANALYTICS_ENDPOINT". The limit is named instead; a real DNS failure still
    names the host."""
    import errno
    import os
    import socket as socket_module
    from types import SimpleNamespace

    key = SimpleNamespace(host="analytex.userpilot.io", port=443, ssl=True)
    dns = aiohttp.ClientConnectorDNSError(
        key, socket_module.gaierror(-2, "Name or service not known"))  # type: ignore[arg-type]
    wrapped = httpx.ConnectTimeout("")
    wrapped.__cause__ = dns
    assert "does not resolve" in str(transport_failure(wrapped, 5.0))

    def out(fd: int) -> int:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(os, "dup", out)
    said = str(transport_failure(wrapped, 5.0))
    assert "too many open files" in said and "USERPILOT_ANALYTICS_ENDPOINT" not in said, said


@pytest.mark.parametrize(("reason", "says"), [
    ("TLSV1_ALERT_PROTOCOL_VERSION", "no TLS version both ends accept"),
    ("UNSUPPORTED_PROTOCOL", "no TLS version both ends accept"),
    ("SSLV3_ALERT_HANDSHAKE_FAILURE", "no cipher suite or key exchange"),
    ("NO_SHARED_CIPHER", "no cipher suite or key exchange"),
    ("TLSV13_ALERT_CERTIFICATE_REQUIRED", "asks for a client certificate")])
@pytest.mark.parametrize("proxied", [False, True])
def test_a_handshake_refused_for_lack_of_common_ground_is_a_setting(
        reason: str, says: str, proxied: bool) -> None:
    """Review "egress59": TLS 1.1 only, a client certificate required, no shared cipher:
    retried as an outage with only "ClientConnectorSSLError" to show, the pod stayed ready
    and `check-config --online` sent the operator to the CA bundle."""
    failure = transport_failure(_ssl_failure(reason), 5.0, proxied=proxied)
    assert isinstance(failure, TlsRefused), failure
    assert reason in str(failure) and says in str(failure)
    assert "USERPILOT_ANALYTICS_ENDPOINT" in str(failure)
    assert ("HTTPS_PROXY" in str(failure)) is proxied


def test_another_tls_failure_names_openssls_reason() -> None:
    """Review "egress59": a TLS failure that is no setting's is retried, but its line says
    which (OpenSSL's reason), not "ClientConnectorSSLError" alone."""
    failure = transport_failure(_ssl_failure("TLSV1_ALERT_INTERNAL_ERROR"), 5.0)
    assert type(failure) is ConnectionFailed
    assert "(ClientConnectorSSLError: TLSV1_ALERT_INTERNAL_ERROR)" in str(failure)


@pytest.mark.parametrize(("options", "says"), [
    (["-Verify", "1", "-CAfile", "{cert}"], "(TLSV13_ALERT_CERTIFICATE_REQUIRED)"),
    (["-Verify", "1", "-CAfile", "{cert}", "-tls1_2"], "(TLS 1.2) the other end asks for a "
     "client certificate"),
    (["-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0"], "no TLS version both ends accept"),
    (["-tls1_2", "-cipher", "aNULL:eNULL"], "no cipher suite or key exchange")],
    ids=["client certificate", "client certificate, TLS 1.2", "TLS 1.1", "no shared cipher"])
def test_a_real_handshake_refused_for_lack_of_common_ground_is_a_setting(
        certificate: tuple[Path, Path], options: list[str], says: str) -> None:
    """The real handshakes (review "egress59"), against OpenSSL's own server: a gateway
    demanding mutual TLS, one speaking TLS 1.1 only, one with no cipher in common."""
    cert, key = certificate
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        ["openssl", "s_server", "-accept", str(port), "-cert", str(cert), "-key", str(key),
         "-www", "-quiet", *(o.format(cert=cert) for o in options)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline and server.poll() is None, "s_server started"
            time.sleep(0.05)

        async def main() -> WorkerError:
            client = up(f"https://localhost:{port}/v1/track", ca_bundle=str(cert))
            return await failure_of(client, TlsRefused)

        failure = run(main)
    finally:
        server.kill()
        server.wait()
    assert says in str(failure), failure


def _head_of(fields: int, size: int) -> bytes:
    return (b"HTTP/1.1 202 Accepted\r\n"
            + b"".join(b"X-F%d: " % i + b"v" * size + b"\r\n" for i in range(fields))
            + b"Content-Length: 2\r\n\r\n{}")


@pytest.mark.parametrize(("fields", "size", "expected"), [
    (4, 60_000, "ok"), (200, 1_000, "ok"),
    (12, 60_000, "ServerError"), (200, 3_000, "ServerError")])
def test_an_answers_head_is_bounded_as_a_whole(fields: int, size: int, expected: str) -> None:
    """Review diff44: 256 fields of 64 KiB held ~31 MiB an answer (a pool of them past the
    chart's memory). Past 256 KiB of head (give or take one read) the answer is unusable, as a
    parser's refusal."""
    async def main() -> str:
        async with Server(always(Send(_head_of(fields, size)))) as s:
            c = up(s.url())
            try:
                return await outcome(c, b'{"user_id":"u1","event_name":"e"}')
            finally:
                await c.aclose()

    assert run(main) == expected


@pytest.mark.parametrize("interim", [
    b"HTTP/1.1 100 Continue\r\n\r\n",
    b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"])
def test_an_interim_answer_does_not_lift_the_head_cap(interim: bytes) -> None:
    """Review diff44: a 1xx is a message of its own, with no body; read as "the head is
    parsed", it switched the cap off for the final answer's head."""
    async def main() -> str:
        async with Server(always(Send([interim, _head_of(12, 60_000)]))) as s:
            c = up(s.url())
            try:
                return await outcome(c, b'{"user_id":"u1","event_name":"e"}')
            finally:
                await c.aclose()

    assert run(main) == "ServerError"


@pytest.mark.parametrize("proxied", [False, True])
def test_a_port_nothing_listens_on_is_named_not_blamed_on_tls(proxied: bool) -> None:
    """Review "config48": a refused connection said "connection to Userpilot failed
    (ClientConnectorError)", and check-config added "for TLS, check USERPILOT_CA_BUNDLE";
    through a dead proxy, "(ClientProxyConnectionError)". Named as delete-users names it."""
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    async def main() -> ConnectionFailed:
        if proxied:
            client = UserpilotClient("https://up.test/v1/track", HEADERS, timeout_s=2.0,
                                     max_connections=2, proxy=f"http://127.0.0.1:{port}")
        else:
            client = up(f"https://127.0.0.1:{port}/v1/track")
        return await failure_of(client, ConnectionFailed)

    failure = run(main)
    said = str(failure)
    assert failure.before_tls, said
    if proxied:
        assert "the proxy '127.0.0.1' refused it" in said and "HTTPS_PROXY" in said, said
    else:
        assert "'127.0.0.1' refused it (nothing listens" in said, said
        assert "USERPILOT_ANALYTICS_ENDPOINT" in said, said


class _Quiet(asyncio.Transport):
    """A transport that takes nothing and closes nothing: the protocol alone is tested."""

    def close(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


@pytest.mark.parametrize(("interim", "count"), [
    (b"HTTP/1.1 103 Early Hints\r\n\r\n" + b"\n" * 200_000, 1),
    (b"HTTP/1.1 100 Continue\r\n\r\n" * 10_000, 10_000),
    (b"HTTP/1.1 100 Continue\n\n" * 10_000, 10_000)])
def test_an_answer_s_heads_are_fed_once_each_not_per_blank_line(
        interim: bytes, count: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review "diff49a": each empty line after an interim answer was an "end of head", and
    each one copied the rest of the read and called the parser: 200 KB of them held the
    event loop for 8 s. Each head is fed once; the bytes are fed once in all."""
    from aiohttp.client_proto import ResponseHandler

    from consumer.delivery import HEADER_BLOCK_MAX, _Protocol

    fed: list[int] = []
    feed = ResponseHandler.data_received

    def counted(self: ResponseHandler, data: bytes) -> None:
        fed.append(len(data))
        feed(self, data)

    monkeypatch.setattr(ResponseHandler, "data_received", counted)
    final = b"HTTP/1.1 202 Accepted\r\nContent-Length: 2\r\n\r\n{}"

    async def main() -> list[int]:
        protocol = _Protocol(asyncio.get_running_loop())
        protocol.connection_made(_Quiet())
        protocol.set_response_params(read_timeout=5.0)
        protocol.head_left = HEADER_BLOCK_MAX
        protocol.reset_head()
        protocol.data_received(interim + final)
        assert protocol.exception() is None
        return [entry[0][0].code for entry in protocol._buffer]

    codes = asyncio.run(main())
    assert codes[-1] == 202 and len(codes) == count + 1
    assert sum(fed) == len(interim + final) and len(fed) == count + 2  # + head, + body
