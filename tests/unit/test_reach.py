"""`reach.userpilot` (check-config --online's token check) against raw local servers."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from consumer import reach
from consumer.config import Settings, load_settings


@contextmanager
def answering(raw: bytes) -> Iterator[int]:
    """A server on 127.0.0.1 that answers every connection's first request with `raw`."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                conn.sendall(raw)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        listener.close()


def settings(port: int) -> Settings:
    return load_settings({
        "USERPILOT_API_KEY": "wt_1234567890", "USERPILOT_ANALYTICS_ENDPOINT":
        f"127.0.0.1:{port}", "USERPILOT_INSECURE_HTTP": "true",
        "KAFKA_BOOTSTRAP_SERVERS": "kafka:9092", "KAFKA_TOPICS": "events",
        "SCHEMA_REGISTRY_URL": "http://registry:8081"}, check_clients=False)


def response(status: int, reason: str) -> bytes:
    return f"HTTP/1.1 {status} {reason}\r\nContent-Length: 0\r\n\r\n".encode()


def test_400_to_an_empty_track_means_the_token_is_good() -> None:
    with answering(response(400, "Bad Request")) as port:
        assert reach.userpilot(settings(port), 5) is None


@pytest.mark.parametrize(("raw", "expected"), [
    (response(401, "Unauthorized"), "refused the token (401)"),
    (response(404, "Not Found"), "wrong host"),
    (response(503, "Unavailable"), "answered 503 to a token check: try again later"),
    # Permanent answers of a host that is not Userpilot's API, and one that takes
    # anything: "try again later" and "online OK" misled (review "seed17").
    (response(405, "Method Not Allowed"), "answered 405 to a token check, which Userpilot "
     "answers with 400: this host does not serve Userpilot's API"),
    (response(410, "Gone"), "check USERPILOT_ANALYTICS_ENDPOINT"),
    (response(200, "OK"), "accepted an empty Track (200)"),
    (response(202, "Accepted"), "is not Userpilot's analytics API"),
    (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "unusable answer from Userpilot"),
])
def test_problems_are_one_line_that_names_them(raw: bytes, expected: str) -> None:
    with answering(raw) as port:
        problem = reach.userpilot(settings(port), 5)
    assert problem is not None
    assert expected in problem
    assert "None" not in problem
    assert "wt_1234567890" not in problem
