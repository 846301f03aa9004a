"""The small slice of HTTP/1.1 the sandbox speaks, as pure functions over bytes.

Only what Userpilot clients send is supported: a request line, headers, and a body framed
by ``Content-Length``. Chunked bodies are refused (411) rather than half-supported. Keeping
this pure lets the server loop stay a few lines of socket plumbing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qs

__all__ = [
    "MAX_HEAD_BYTES",
    "HttpError",
    "Request",
    "RequestHead",
    "Response",
    "parse_head",
    "render_response",
]

MAX_HEAD_BYTES = 64 * 1024


class HttpError(Exception):
    """A request so malformed that the connection cannot be trusted afterwards."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class RequestHead:
    """Request line and headers; header names are lower-cased, last value wins."""

    method: str
    target: str
    version: str
    headers: dict[str, str]

    @property
    def keep_alive(self) -> bool:
        connection = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.0":
            return "keep-alive" in connection
        return "close" not in connection

    def content_length(self) -> int:
        if "transfer-encoding" in self.headers:
            raise HttpError(411, "only Content-Length bodies are supported")
        raw = self.headers.get("content-length")
        if raw is None:
            return 0
        # "²" is a digit to str.isdigit; 5,000 digits made int() raise (review "sandbox48").
        if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
            raise HttpError(400, "invalid Content-Length")
        return int(raw)


@dataclass(frozen=True, slots=True)
class Request:
    """A complete request as the application sees it."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes = b""

    @classmethod
    def from_head(cls, head: RequestHead, body: bytes) -> Request:
        # Split by hand: a target is a path and a query (origin-form), and `urlsplit` read
        # `//v1/track` as a host and `/track`, and raised on `//[` (review "sandbox45").
        path, _, query = head.target.partition("?")
        return cls(
            method=head.method,
            path=path or "/",
            query=parse_qs(query),
            headers=head.headers,
            body=body,
        )


@dataclass(frozen=True, slots=True)
class Response:
    """What to send back; ``headers`` are extra headers beyond the framing ones."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"


def parse_head(data: bytes) -> RequestHead:
    """Parse everything up to (not including) the blank line that ends the head."""
    try:
        text = data.decode("latin-1")
    except UnicodeDecodeError as exc:  # pragma: no cover - latin-1 decodes every byte
        raise HttpError(400, "undecodable head") from exc
    lines = text.split("\r\n")
    request_line = lines[0].split(" ")
    if len(request_line) != 3:
        raise HttpError(400, "malformed request line")
    method, target, version = request_line
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise HttpError(505, "unsupported HTTP version")
    if not method.isalpha() or not target.startswith("/"):
        raise HttpError(400, "malformed request line")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise HttpError(400, "malformed header line")
        headers[name.lower()] = value.strip()
    return RequestHead(method=method, target=target, version=version, headers=headers)


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def render_response(response: Response, *, keep_alive: bool, request_id: str,
                    head_only: bool = False) -> bytes:
    """Serialise a response with framing headers and the ``x-request-id`` header; for a
    HEAD request (`head_only`) without its content (RFC 9110 9.3.2: a keep-alive client
    read the next answer from the middle of it)."""
    lines = [
        f"HTTP/1.1 {response.status} {_reason(response.status)}",
        f"content-type: {response.content_type}",
        f"content-length: {len(response.body)}",
        f"x-request-id: {request_id}",
    ]
    lines.extend(f"{name}: {value}" for name, value in response.headers.items())
    if not keep_alive:
        lines.append("connection: close")
    head = "\r\n".join(lines) + "\r\n\r\n"
    return head.encode("latin-1") + (b"" if head_only else response.body)
