from __future__ import annotations

import pytest

from consumer.sandbox.http import HttpError, Request, Response, parse_head, render_response


def test_parse_head_lowercases_headers_and_splits_request_line() -> None:
    head = parse_head(b"POST /v1/track?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 12")
    assert (head.method, head.target, head.version) == ("POST", "/v1/track?x=1", "HTTP/1.1")
    assert head.headers == {"host": "a", "content-length": "12"}
    assert head.content_length() == 12
    assert head.keep_alive


@pytest.mark.parametrize(
    ("version", "connection", "expected"),
    [
        ("HTTP/1.1", None, True),
        ("HTTP/1.1", "close", False),
        ("HTTP/1.0", None, False),
        ("HTTP/1.0", "keep-alive", True),
    ],
)
def test_keep_alive_follows_version_and_connection(
    version: str, connection: str | None, expected: bool
) -> None:
    raw = f"GET / {version}" + (f"\r\nConnection: {connection}" if connection else "")
    assert parse_head(raw.encode()).keep_alive is expected


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GARBAGE", 400),
        (b"GET / HTTP/2.0", 505),
        (b"GET nopath HTTP/1.1", 400),
        (b"GET / HTTP/1.1\r\nno-colon-here", 400),
    ],
)
def test_malformed_heads_are_refused(raw: bytes, status: int) -> None:
    with pytest.raises(HttpError) as info:
        parse_head(raw)
    assert info.value.status == status


def test_chunked_bodies_are_refused_with_411() -> None:
    head = parse_head(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked")
    with pytest.raises(HttpError) as info:
        head.content_length()
    assert info.value.status == 411


def test_invalid_content_length_is_400() -> None:
    with pytest.raises(HttpError) as info:
        parse_head(b"POST / HTTP/1.1\r\nContent-Length: -1").content_length()
    assert info.value.status == 400


def test_request_splits_path_and_query() -> None:
    head = parse_head(b"GET /_sandbox/requests?path=/v1/track HTTP/1.1")
    request = Request.from_head(head, b"")
    assert request.path == "/_sandbox/requests"
    assert request.query == {"path": ["/v1/track"]}


def test_render_response_frames_body_and_carries_request_id() -> None:
    raw = render_response(
        Response(202, b'{"a":1}', {"retry-after": "3"}), keep_alive=False, request_id="rid-1"
    )
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 202 Accepted"
    assert "content-length: 7" in lines
    assert "x-request-id: rid-1" in lines
    assert "retry-after: 3" in lines
    assert "connection: close" in lines
    assert body == b'{"a":1}'


def _raw(url: str, data: bytes, wait: float = 2.0) -> bytes:
    """What a sandbox answers `data` on one connection, until it closes or `wait` passes."""
    import socket

    host, port = url.split("://", 1)[1].rsplit(":", 1)
    with socket.create_connection((host, int(port))) as conn:
        conn.sendall(data)
        conn.settimeout(wait)
        out = b""
        try:
            while chunk := conn.recv(65536):
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return out


@pytest.mark.parametrize("request_bytes", [
    # "²" is a digit to str.isdigit, not to int(): the handler raised, no answer came
    b"POST /v1/track HTTP/1.1\r\nHost: x\r\nContent-Length: \xb2\r\n\r\nab",
    # urlsplit took "//[" for a host and raised "Invalid IPv6 URL"
    b"GET //[/_sandbox/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
])
def test_odd_request_heads_get_an_answer_not_a_dropped_connection(request_bytes: bytes) -> None:
    """Review sandbox45."""
    from consumer.sandbox import SandboxThread

    with SandboxThread() as sandbox:
        out = _raw(sandbox.url, request_bytes)
    assert out.startswith((b"HTTP/1.1 400", b"HTTP/1.1 404")), out


def test_a_path_starting_with_two_slashes_is_a_path() -> None:
    head = parse_head(b"POST //v1/track?x=1 HTTP/1.1\r\nHost: a")
    request = Request.from_head(head, b"")
    assert (request.path, request.query) == ("//v1/track", {"x": ["1"]})


def test_a_head_request_gets_no_content() -> None:
    """RFC 9110 9.3.2; a keep-alive client read the next answer from the middle of the
    body (review sandbox45)."""
    from consumer.sandbox import SandboxThread

    with SandboxThread() as sandbox:
        out = _raw(sandbox.url, b"HEAD /v1/track HTTP/1.1\r\nHost: x\r\nConnection: close"
                                b"\r\n\r\n")
    head, _, content = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 ") and b"content-length: " in head, out
    assert content == b""


def test_faults_with_a_window_past_a_floats_range_are_refused_and_change_nothing() -> None:
    """The window's check passed an integer of 400 digits, `float()` then raised after the
    rest of the body was applied: no answer, and error_rate 1.0 stayed (review sandbox45)."""
    from consumer.sandbox import SandboxControl, SandboxThread

    body = b'{"error_rate": 1.0, "rate_window_seconds": 1' + b"0" * 400 + b"}"
    with SandboxThread() as sandbox:
        out = _raw(sandbox.url, b"PUT /_sandbox/faults HTTP/1.1\r\nHost: x\r\n"
                                b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body)
                   + body)
        faults = SandboxControl(sandbox.url).faults()
    assert (out[:12], faults["error_rate"]) == (b"HTTP/1.1 400", 0.0)


def test_a_content_length_of_thousands_of_digits_is_400() -> None:
    """Review "sandbox48": int() of 5,000 digits raised, and the connection was dropped
    without an answer."""
    with pytest.raises(HttpError) as info:
        parse_head(b"POST / HTTP/1.1\r\nContent-Length: " + b"9" * 5000).content_length()
    assert info.value.status == 400


@pytest.mark.parametrize("variable", ["HTTP_PROXY", "http_proxy", "ALL_PROXY"])
def test_the_control_client_never_goes_through_a_proxy(
        variable: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review "secrets49": urllib read HTTP_PROXY from the shell and sent the local
    sandbox's queries to a corporate proxy: `demo` ended in a traceback (407)."""
    from consumer.sandbox import SandboxControl, SandboxThread

    monkeypatch.setenv(variable, "http://127.0.0.1:9")  # the discard port: nothing answers
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with SandboxThread() as sandbox:
        assert SandboxControl(sandbox.url, timeout=5).health()
