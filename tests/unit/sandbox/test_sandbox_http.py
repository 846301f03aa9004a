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
