"""Unit tests for consumer.cutoff: a whole-call deadline that holds in every step of a
synchronous httpx call, against a server that trickles its answer."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from consumer.cutoff import Cutoff
from consumer.errors import Timeout
from consumer.gdpr import DeleteClient
from consumer.registry import RestClient
from tests.certificates import self_signed


@contextlib.contextmanager
def trickling(first: bytes, slow: bytes, after: bytes = b"", every_s: float = 0.1
              ) -> Iterator[str]:
    """A one-connection HTTP server answering `first` at once, then `slow` a byte every
    `every_s`, then `after`; yields its base URL (the registry's and delete-users' tests
    share it)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    stop = threading.Event()

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            try:
                conn.sendall(first)
                for byte in slow:
                    if stop.is_set():
                        return
                    conn.sendall(bytes([byte]))
                    time.sleep(every_s)
                conn.sendall(after)
            except OSError:
                return

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        server.close()


def test_a_trickled_answer_is_cut_at_the_deadline() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\n"
    with trickling(head, b"x" * 40) as url, \
            httpx.Client(limits=httpx.Limits(max_keepalive_connections=0)) as client:
        cut = Cutoff(0.3)
        started = time.monotonic()
        with pytest.raises(httpx.TransportError):
            client.get(url, extensions={"trace": cut.trace})
        cut.cancel()
        assert cut.fired and time.monotonic() - started < 1.5


def test_an_answer_in_time_is_not_cut() -> None:
    with trickling(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n", b"ok", every_s=0.01) \
            as url, httpx.Client(limits=httpx.Limits(max_keepalive_connections=0)) as client:
        cut = Cutoff(2.0)
        assert client.get(url, extensions={"trace": cut.trace}).content == b"ok"
        cut.cancel()
        assert not cut.fired


# ------------------------------------------------------------------ through a proxy's tunnel

TRICKLE_S = 0.05
ANSWERS = {
    "delete": b"HTTP/1.1 202 Accepted\r\nContent-Length: 2\r\n\r\nok",
    "registry": b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n[]',
}


def _tunnelled(cert: Path, key: Path, answer: bytes) -> tuple[int, int]:
    """A TLS server trickling `answer` one byte every TRICKLE_S, and a plain-HTTP
    CONNECT proxy in front of it: (server port, proxy port)."""
    ports: list[tuple[int, int]] = []

    async def main() -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)

        async def target(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                await r.readuntil(b"\r\n\r\n")
                for b in answer:
                    w.write(bytes([b]))
                    await w.drain()
                    await asyncio.sleep(TRICKLE_S)
            except Exception:
                pass
            finally:
                w.close()

        tsrv = await asyncio.start_server(target, "127.0.0.1", 0, ssl=ctx)
        tport = tsrv.sockets[0].getsockname()[1]

        async def pipe(a: asyncio.StreamReader, b: asyncio.StreamWriter) -> None:
            try:
                while data := await a.read(65536):
                    b.write(data)
                    await b.drain()
            except Exception:
                pass
            finally:
                b.close()

        async def proxy(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await r.readuntil(b"\r\n\r\n")  # CONNECT localhost:tport
            tr, tw = await asyncio.open_connection("127.0.0.1", tport)
            w.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await w.drain()
            await asyncio.gather(pipe(r, tw), pipe(tr, w))

        psrv = await asyncio.start_server(proxy, "127.0.0.1", 0)
        ports.append((tport, psrv.sockets[0].getsockname()[1]))
        await asyncio.sleep(60)

    threading.Thread(target=lambda: asyncio.run(main()), daemon=True).start()
    while not ports:
        time.sleep(0.01)
    return ports[0]


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed(tmp_path_factory.mktemp("tls"))


@pytest.mark.parametrize("via_proxy", [False, True], ids=["direct", "http-proxy-connect"])
def test_delete_users_deadline_holds_through_a_connect_tunnel(
        certificate: tuple[Path, Path], via_proxy: bool) -> None:
    """Through an http:// proxy's tunnel the TLS socket was never kept: a trickled answer
    held delete-users past its deadline (review "http42")."""
    cert, key = certificate
    answer = ANSWERS["delete"]
    tport, pport = _tunnelled(cert, key, answer)
    client = DeleteClient(f"https://localhost:{tport}/v1/users",
                          {"Authorization": "Token wt_0123456789abcdef"}, timeout_s=0.3,
                          ca_bundle=str(cert),
                          proxy=f"http://127.0.0.1:{pport}" if via_proxy else None)
    start = time.monotonic()
    with pytest.raises(Timeout):  # the answer takes ~2.2 s; the deadline is 0.6 s
        client.delete(b'{"users":["u1"]}')
    assert time.monotonic() - start < client.deadline_s + 0.5
    client.close()


@pytest.mark.parametrize("via_proxy", [False, True], ids=["direct", "http-proxy-connect"])
def test_registry_deadline_holds_through_a_connect_tunnel(
        certificate: tuple[Path, Path], via_proxy: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    cert, key = certificate
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the registry trusts SSL_CERT_FILE
    tport, pport = _tunnelled(cert, key, ANSWERS["registry"])
    client = RestClient(f"https://localhost:{tport}", timeout_s=0.3,
                        proxy=f"http://127.0.0.1:{pport}" if via_proxy else None)
    start = time.monotonic()
    with pytest.raises(TimeoutError):  # the answer takes ~4 s; the deadline is 0.3 s
        client.subjects()
    assert time.monotonic() - start < 0.3 + 0.5
    client.close()
