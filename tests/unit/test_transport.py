"""Unit tests for consumer.transport.StreamTransport, driven through httpx.AsyncClient.

Why real sockets: the transport's job is framing, keep-alive and failure mapping on the
wire, which a mock cannot show. Each test runs a hand-written asyncio server on 127.0.0.1
port 0 that counts connections and records exactly what arrived.
"""

from __future__ import annotations

import asyncio
import gzip
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
import pytest

from consumer.delivery import UserpilotClient
from consumer.errors import ConnectionFailed, Timeout
from consumer.transport import StreamTransport

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


def client(transport: httpx.AsyncBaseTransport, timeout: float = 2.0) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=transport, timeout=timeout)


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


# ------------------------------------------------------------------ keep-alive and the request


def test_sequential_requests_reuse_one_connection_and_arrive_exactly() -> None:
    async def main() -> None:
        async with Server(always(Send(ACCEPTED))) as srv:
            async with client(StreamTransport(4)) as c:
                for i in range(5):
                    r = await c.post(srv.url("/v1/track?n=" + str(i)), content=BODY + bytes([i]),
                                     headers={"Authorization": f"Token {TOKEN}",
                                              "X-API-Version": "2020-09-22",
                                              "Content-Type": "application/json"})
                    assert r.status_code == 202
                    assert r.json() == {"ok": True}
                    assert r.headers["x-request-id"] == "r1"
            assert srv.connections == 1
            assert [(q.conn, q.index) for q in srv.requests] == [(1, i) for i in range(1, 6)]
            for i, q in enumerate(srv.requests):
                assert q.line == f"POST /v1/track?n={i} HTTP/1.1".encode()
                assert q.header("Host") == f"127.0.0.1:{srv.port}".encode()
                assert q.header("Content-Length") == str(len(BODY) + 1).encode()
                assert q.header("Authorization") == f"Token {TOKEN}".encode()
                assert q.header("X-API-Version") == b"2020-09-22"
                assert q.header("Content-Type") == b"application/json"
                assert q.body == BODY + bytes([i])

    run(main)


# ------------------------------------------------------------------ response framing


def test_chunked_body_with_extensions_and_trailers_then_the_connection_is_reused() -> None:
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"4;name=value\r\nWiki\r\n5;a;b=\"c\"\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n"
               b"0;last\r\nX-Trailer: one\r\nY: two\r\n\r\n")
    responses = iter([chunked, ACCEPTED])

    async def main() -> None:
        async with Server(lambda _req: Send(next(responses))) as srv:
            async with client(StreamTransport()) as c:
                r = await c.post(srv.url(), content=BODY)
                assert (r.status_code, r.content) == (200, b"Wikipedia in\r\n\r\nchunks.")
                assert (await c.post(srv.url(), content=BODY)).status_code == 202
            assert srv.connections == 1

    run(main)


def test_close_delimited_body_is_read_to_the_end_and_the_connection_not_reused() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n"

    def respond(req: Req) -> Action:
        if req.conn == 1:  # no length: the body ends when the server closes
            return Close([head + b"first part, ", b"second part, ", b"third part"])
        return Send(ACCEPTED)

    async def main() -> None:
        async with Server(respond) as srv:
            async with client(StreamTransport()) as c:
                r = await c.post(srv.url(), content=BODY)
                assert (r.status_code, r.text) == (200, "first part, second part, third part")
                assert (await c.post(srv.url(), content=BODY)).status_code == 202
            assert srv.connections == 2

    run(main)


@pytest.mark.parametrize(("method", "response"), [
    ("POST", b"HTTP/1.1 204 No Content\r\nX-Request-Id: r1\r\n\r\n"),
    ("POST", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 50\r\n\r\n"),
    ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nContent-Type: text/plain\r\n\r\n"),
], ids=["204", "304", "HEAD"])
def test_responses_without_a_body_read_none_and_keep_the_connection(
        method: str, response: bytes) -> None:
    responses = iter([response, ACCEPTED])

    async def main() -> None:
        async with Server(lambda _req: Send(next(responses))) as srv:
            async with client(StreamTransport()) as c:
                r = await c.request(method, srv.url())
                assert r.content == b""
                # Had the transport waited for a body, this request would read its head.
                assert (await c.post(srv.url(), content=BODY)).json() == {"ok": True}
            assert srv.connections == 1

    run(main)


def test_gzip_content_encoding_is_decoded_by_httpx() -> None:
    text = "accepted " * 200
    packed = gzip.compress(text.encode())

    async def main() -> None:
        response = http(200, packed, ["Content-Encoding: gzip"])
        async with Server(always(Send(response))) as srv, client(StreamTransport()) as c:
            r = await c.post(srv.url(), content=BODY)
            assert r.text == text

    run(main)


def test_undecodable_gzip_body_raises_decoding_error_and_drops_the_connection() -> None:
    def respond(req: Req) -> Action:
        bad = http(200, b"not gzip at all", ["Content-Encoding: gzip"])
        return Send(bad) if req.conn == 1 else Send(ACCEPTED)

    async def main() -> None:
        async with Server(respond) as srv:
            async with client(StreamTransport()) as c:
                with pytest.raises(httpx.DecodingError):
                    await c.post(srv.url(), content=BODY)
                await wait_until(lambda: 1 in srv.hung_up)
                assert (await c.post(srv.url(), content=BODY)).status_code == 202
            assert srv.connections == 2

    run(main)


# ------------------------------------------------------------------ connection reuse rules


@pytest.mark.parametrize(("response", "reused"), [
    (http(202, b"ok", ["Connection: close"]), False),
    (http(202, b"ok", ["Connection: Keep-Alive, Close"]), False),
    (http(202, b"ok", version="HTTP/1.0"), False),
    (http(202, b"ok", ["Connection: keep-alive"], version="HTTP/1.0"), True),
    (http(202, b"ok"), True),
], ids=["close", "keep-alive-and-close", "1.0", "1.0-keep-alive", "1.1"])
def test_connection_reuse_follows_version_and_connection_header(
        response: bytes, reused: bool) -> None:
    async def main() -> None:
        async with Server(always(Send(response))) as srv:
            async with client(StreamTransport()) as c:
                for _ in range(3):
                    assert (await c.post(srv.url(), content=BODY)).text == "ok"
            assert srv.connections == (1 if reused else 3)
            if not reused:  # the client closed each one; the server never had to
                await wait_until(lambda: srv.hung_up == {1, 2, 3})

    run(main)


def test_idle_connections_older_than_the_expiry_are_not_reused() -> None:
    async def main() -> None:
        transport = StreamTransport(idle_expiry_s=0.05)
        async with Server(always(Send(ACCEPTED))) as srv, client(transport) as c:
            await c.post(srv.url(), content=BODY)
            await c.post(srv.url(), content=BODY)  # within the expiry: reused
            assert srv.connections == 1
            await asyncio.sleep(0.1)
            await c.post(srv.url(), content=BODY)
            assert srv.connections == 2
            await wait_until(lambda: 1 in srv.hung_up)  # the expired one was closed

    run(main)


def test_at_most_max_connections_under_fifty_concurrent_requests() -> None:
    async def main() -> None:
        async with Server(always(Send(ACCEPTED, delay=0.01))) as srv:
            async with client(StreamTransport(4)) as c:
                results = await asyncio.gather(
                    *(c.post(srv.url(), content=BODY) for _ in range(50)))
            assert [r.status_code for r in results] == [202] * 50
            assert len(srv.requests) == 50
            assert srv.peak == 4
            assert srv.connections == 4  # idle ones are reused, never replaced

    run(main)


# ------------------------------------------------------------------ stale keep-alive connections


def test_reused_connection_closed_before_answering_is_retried_once_on_a_fresh_one() -> None:
    def respond(req: Req) -> Action:
        # The server's idle timeout fired just as the second request arrived.
        return Close() if req.index == 2 else Send(ACCEPTED)

    async def main() -> None:
        async with Server(respond) as srv:
            async with client(StreamTransport()) as c:
                assert (await c.post(srv.url(), content=BODY)).status_code == 202
                assert (await c.post(srv.url(), content=BODY)).status_code == 202
            assert srv.connections == 2
            assert [(q.conn, q.index) for q in srv.requests] == [(1, 1), (1, 2), (2, 1)]
            assert all(q.body == BODY for q in srv.requests)

    run(main)


def test_connection_the_server_closed_while_idle_is_not_used() -> None:
    async def main() -> None:
        # Answers without `Connection: close`, then closes: the client only sees the FIN.
        async with Server(always(Close(ACCEPTED))) as srv:
            async with client(StreamTransport()) as c:
                assert (await c.post(srv.url(), content=BODY)).status_code == 202
                await asyncio.sleep(0.02)
                assert (await c.post(srv.url(), content=BODY)).status_code == 202
            assert srv.connections == 2
            assert len(srv.requests) == 2

    run(main)


def test_the_retry_after_a_stale_connection_uses_a_fresh_one_not_another_idle_one() -> None:
    def respond(req: Req) -> Action:
        return Close() if req.index == 2 else Send(ACCEPTED, delay=0.02)

    async def main() -> None:
        async with Server(respond) as srv:
            async with client(StreamTransport()) as c:
                await asyncio.gather(*(c.post(srv.url(), content=BODY) for _ in range(2)))
                assert srv.connections == 2  # two idle connections, both about to go stale
                assert (await c.post(srv.url(), content=BODY)).status_code == 202
            assert srv.connections == 3
            assert len(srv.requests) == 4  # two answered, one lost to a stale one, one retried

    run(main)


def test_fresh_connection_closed_before_answering_raises_without_retry() -> None:
    async def main() -> None:
        async with Server(always(Close())) as srv:
            async with client(StreamTransport()) as c:
                with pytest.raises(httpx.RemoteProtocolError):
                    await c.post(srv.url(), content=BODY)
            assert srv.connections == 1
            assert len(srv.requests) == 1

    run(main)


@pytest.mark.parametrize("reused", [False, True])
@pytest.mark.parametrize("action", [Close(b"HTTP/1.1 202 Acc"), Reset(b"HTTP/1.1 202 Acc")],
                         ids=["close", "reset"])
def test_connection_lost_after_a_partial_head_raises_without_retry(
        reused: bool, action: Action) -> None:
    def respond(req: Req) -> Action:
        return action if req.index == (2 if reused else 1) else Send(ACCEPTED)

    async def main() -> None:
        async with Server(respond) as srv:
            async with client(StreamTransport()) as c:
                if reused:
                    assert (await c.post(srv.url(), content=BODY)).status_code == 202
                with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
                    await c.post(srv.url(), content=BODY)
            assert srv.connections == 1  # the server started answering: never sent twice
            assert len(srv.requests) == (2 if reused else 1)

    run(main)


def test_connection_lost_mid_body_raises_read_error() -> None:
    async def main() -> None:
        partial = b"HTTP/1.1 202 Accepted\r\nContent-Length: 100\r\n\r\n{\"ok\""
        async with Server(always(Close(partial))) as srv, client(StreamTransport()) as c:
            with pytest.raises(httpx.ReadError):
                await c.post(srv.url(), content=BODY)

    run(main)


# ------------------------------------------------------------------ timeouts and refusals


def test_server_that_never_answers_raises_read_timeout_within_the_timeout() -> None:
    async def main() -> None:
        async with Server(always(Hang())) as srv, client(StreamTransport(), 0.2) as c:
            start = time.monotonic()
            with pytest.raises(httpx.ReadTimeout):
                await c.post(srv.url(), content=BODY)
            assert 0.15 < time.monotonic() - start < 1.5
            await wait_until(lambda: 1 in srv.hung_up)  # the timed-out one was closed

    run(main)


def test_body_that_never_finishes_raises_read_timeout() -> None:
    async def main() -> None:
        partial = b"HTTP/1.1 202 Accepted\r\nContent-Length: 100\r\n\r\n{"
        async with Server(always(Hang(partial))) as srv, client(StreamTransport(), 0.2) as c:
            with pytest.raises(httpx.ReadTimeout):
                await c.post(srv.url(), content=BODY)

    run(main)


def test_closed_port_raises_connect_error() -> None:
    async def main() -> None:
        async with client(StreamTransport()) as c:
            with pytest.raises(httpx.ConnectError):
                await c.post(f"http://127.0.0.1:{closed_port()}/v1/track", content=BODY)

    run(main)


def test_userpilot_client_maps_timeouts_and_refusals() -> None:
    headers = {"Authorization": f"Token {TOKEN}", "Content-Type": "application/json"}

    async def main() -> None:
        async with Server(always(Hang())) as srv:
            slow = UserpilotClient(srv.url(), headers, timeout_s=0.2, max_connections=2)
            with pytest.raises(Timeout) as timed_out:
                await slow.track(BODY)
            await slow.aclose()
        refused = UserpilotClient(f"http://127.0.0.1:{closed_port()}/v1/track", headers,
                                  timeout_s=0.2, max_connections=2)
        with pytest.raises(ConnectionFailed) as failed:
            await refused.track(BODY)
        await refused.aclose()
        for exc in (timed_out.value, failed.value):
            assert TOKEN not in str(exc)

    run(main)


def test_userpilot_client_posts_through_the_stream_transport() -> None:
    async def main() -> None:
        async with Server(always(Send(ACCEPTED))) as srv:
            up = UserpilotClient(srv.url(), {"Authorization": f"Token {TOKEN}"},
                                 timeout_s=1.0, max_connections=2)
            for _ in range(3):
                result = await up.track(BODY)
                assert (result.status, result.request_id) == (202, "r1")
            await up.aclose()
            assert srv.connections == 1
            assert [q.body for q in srv.requests] == [BODY] * 3

    run(main)


# ------------------------------------------------------------------ malformed responses


@pytest.mark.parametrize("response", [
    b"HTTX/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1\r\n\r\n",
    b"HTTP/1.1 abc OK\r\nContent-Length: 0\r\n\r\n",
    b"<html>hello</html>\r\n\r\n",
    b"HTTP/1.1 202 Accepted\r\nno colon on this line\r\n\r\n",
    b"HTTP/1.1 202 Accepted\r\nContent-Length: ten\r\n\r\n0123456789",
    b"HTTP/1.1 202 Accepted\r\nContent-Length: -1\r\n\r\n",
    b"HTTP/1.1 202 Accepted\r\nContent-Length: 99999999999\r\n\r\n",
    b"HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n",
    b"HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\n\r\n-2\r\nab\r\n0\r\n\r\n",
    b"HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXY0\r\n\r\n",
], ids=["protocol", "no-status", "status", "html", "header", "length", "negative-length",
        "huge-length", "chunk-size", "negative-chunk", "chunk-terminator"])
def test_malformed_response_raises_protocol_error_and_drops_the_connection(
        response: bytes) -> None:
    def respond(req: Req) -> Action:
        return Send(response) if req.conn == 1 else Send(ACCEPTED)

    async def main() -> None:
        async with Server(respond) as srv:
            async with client(StreamTransport()) as c:
                with pytest.raises(httpx.RemoteProtocolError):
                    await c.post(srv.url(), content=BODY)
                assert (await c.post(srv.url(), content=BODY)).status_code == 202
            assert srv.connections == 2
            await wait_until(lambda: 1 in srv.hung_up)

    run(main)


@pytest.mark.parametrize("head", [
    b"HTTP/1.1 202 Accepted\r\nX-Big: " + b"a" * 70_000 + b"\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 202 Accepted\r\n" + b"X-Many: header\r\n" * 5_000 + b"Content-Length: 0\r\n\r\n",
], ids=["one-long-line", "many-lines"])
def test_oversized_response_head_raises_protocol_error(head: bytes) -> None:
    async def main() -> None:
        async with Server(always(Send(head))) as srv, client(StreamTransport()) as c:
            with pytest.raises(httpx.RemoteProtocolError):
                await c.post(srv.url(), content=BODY)

    run(main)


def test_oversized_chunk_size_line_raises_protocol_error() -> None:
    response = (b"HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\n\r\n2;"
                + b"x" * 70_000 + b"\r\nab\r\n0\r\n\r\n")

    async def main() -> None:
        async with Server(always(Send(response))) as srv, client(StreamTransport()) as c:
            with pytest.raises(httpx.RemoteProtocolError):
                await c.post(srv.url(), content=BODY)

    run(main)


# ------------------------------------------------------------------ cancellation


@pytest.mark.parametrize("sent", [b"", b"HTTP/1.1 202 Accepted\r\nContent-Length: 11\r\n\r\n{"],
                         ids=["before-head", "mid-body"])
def test_cancelled_request_does_not_return_its_connection_to_the_pool(sent: bytes) -> None:
    def respond(req: Req) -> Action:
        return Hang(sent) if req.conn == 1 else Send(ACCEPTED)

    async def main() -> None:
        async with Server(respond) as srv:
            async with client(StreamTransport(1)) as c:
                task = asyncio.create_task(c.post(srv.url(), content=BODY))
                await wait_until(lambda: len(srv.requests) == 1)
                await asyncio.sleep(0.03)  # the client is now waiting for the rest
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                await wait_until(lambda: 1 in srv.hung_up)  # closed, not pooled
                r = await c.post(srv.url(), content=BODY)  # also: the one slot was released
                assert r.json() == {"ok": True}
            assert srv.connections == 2

    run(main)


# ------------------------------------------------------------------ TLS


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost (cert, key)."""
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True, stdin=subprocess.DEVNULL,
    )
    return cert, key


def _server_context(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    return context


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_https_with_a_trusted_certificate_keeps_alive(
        certificate: tuple[Path, Path], host: str) -> None:
    async def main() -> None:
        trusted = ssl.create_default_context(cafile=str(certificate[0]))
        async with Server(always(Send(ACCEPTED)), tls=_server_context(certificate)) as srv:
            async with client(StreamTransport(verify=trusted)) as c:
                for _ in range(3):
                    r = await c.post(srv.url(scheme="https", host=host), content=BODY)
                    assert r.json() == {"ok": True}
            assert srv.connections == 1
            assert [q.body for q in srv.requests] == [BODY] * 3
            assert srv.requests[0].header("Host") == f"{host}:{srv.port}".encode()

    run(main)


def test_https_with_an_untrusted_certificate_raises_connect_error(
        certificate: tuple[Path, Path]) -> None:
    async def main() -> None:
        async with Server(always(Send(ACCEPTED)), tls=_server_context(certificate)) as srv:
            async with client(StreamTransport()) as c:  # certifi's CAs: self-signed is refused
                with pytest.raises(httpx.ConnectError) as refused:
                    await c.post(srv.url(scheme="https"), content=BODY)
            assert "CERTIFICATE_VERIFY_FAILED" in str(refused.value)
            assert srv.requests == []

    run(main)


# ------------------------------------------------------------------ aclose


def test_aclose_closes_idle_connections_and_refuses_later_requests() -> None:
    async def main() -> None:
        async with Server(always(Send(ACCEPTED))) as srv:
            transport = StreamTransport()
            c = client(transport)
            assert (await c.post(srv.url(), content=BODY)).status_code == 202
            await transport.aclose()
            await wait_until(lambda: srv.hung_up == {1})
            with pytest.raises(httpx.ConnectError):
                await c.post(srv.url(), content=BODY)
            assert srv.connections == 1
            await c.aclose()

    run(main)


def test_a_request_in_flight_during_aclose_completes_and_its_connection_is_closed() -> None:
    async def main() -> None:
        async with Server(always(Send(ACCEPTED, delay=0.05))) as srv:
            transport = StreamTransport()
            c = client(transport)
            task = asyncio.create_task(c.post(srv.url(), content=BODY))
            await wait_until(lambda: len(srv.requests) == 1)
            await transport.aclose()
            assert (await task).status_code == 202
            await wait_until(lambda: srv.hung_up == {1})  # not left open in the idle pool
            await c.aclose()

    run(main)
