"""Unit tests for consumer.cutoff: a whole-call deadline that holds in every step of a
synchronous httpx call, against a server that trickles its answer."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from consumer.cutoff import Cutoff


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
