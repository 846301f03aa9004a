"""The Userpilot edge: one request (Track, identify, company identify), and the one place
HTTP outcomes are classified.

`classify` turns a status into what happens next (see consumer.errors); `UserpilotClient`
maps transport failures the same way. A new rule for a status belongs here. Others read
the status `classify` put on its exception, never an answer's: `policy.RetryPolicy` (a
`Refused` that other events get past becomes `RefusedAlone`), `reach`
(its one-line messages per status), the handler's `responses` counter and the dead
letter's `userpilot.error.status` header (which `replay` selects on).
Error messages carry the status, Userpilot's x-request-id and a truncated body, never a
header we sent, so the token cannot leak through an exception.
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import contextvars
import email.utils
import errno
import functools
import logging
import math
import os
import re
import ssl
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp
import httpx
from aiohttp.client_proto import ResponseHandler
from aiohttp.client_reqrep import ClientRequest
from aiohttp.connector import Connection
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import RawResponseMessage
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.tracing import Trace
from httpx_aiohttp.transport import AiohttpResponseStream, AiohttpTransport

from consumer.answers import (
    BODY_LIMIT,
    MAX_BODY_BYTES,
    PAGE_LIMIT,
    body_text,
    charset_of,
    html_page,
    page_kept,
)
from consumer.codec import replace_surrogates
from consumer.errors import (
    ConnectionFailed,
    DeadLetter,
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
from consumer.logs import RateLimit
from consumer.redaction import Redactor, url_credentials
from consumer.stalls import STALL_S, StallAwareDeadline
from consumer.stdout import printable
from consumer.tls import ssl_context, verification

if TYPE_CHECKING:
    from consumer.calls import Call
    from consumer.config import Settings

__all__ = ["BODY_LIMIT", "UserpilotClient", "causes", "classify", "classify_answer",
           "parse_retry_after", "quoted_header", "request_secrets", "ssl_context",
           "transport_failure", "unreachable"]

USER_AGENT = "userpilot-delivery-worker"
MAX_RETRY_AFTER_S = 600.0
STALE_RESENDS = 3
"""Immediate resends of a request that a pooled connection lost before any answer."""
STALE_WITHIN_S = 0.25
"""... lost this soon after it went out: the keep-alive race ends within a round trip (the
server had closed the connection already). Later, the server may have read it and worked
on it: that failure goes through the retry policy (backoff, an attempt, a limiter slot)."""
_CERT_TIME_CODES = frozenset({9, 10})
"""OpenSSL's X509_V_ERR_CERT_NOT_YET_VALID and X509_V_ERR_CERT_HAS_EXPIRED."""
_CERT_HOST_CODES = frozenset({62, 64})
"""OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH."""
_CERT_WEAK_CODES = frozenset({66, 67, 68})
"""OpenSSL's X509_V_ERR_EE_KEY_TOO_SMALL, X509_V_ERR_CA_KEY_TOO_SMALL and
X509_V_ERR_CA_MD_TOO_WEAK: a chain this host's OpenSSL refuses at its security level,
however trusted its CA."""
HEADER_LINE_MAX = 64 * 1024
"""The longest header line (or status line) an answer may have; aiohttp's default, 8,190
bytes, refused a valid 2xx with a long Content-Security-Policy or Set-Cookie."""
HEADERS_MAX = 256
"""The most header fields an answer may have (aiohttp's default: 128)."""
HEADER_BLOCK_MAX = 256 * 1024
"""The most bytes an answer's head may take, all lines together, give or take the read that
completes it (at most 256 KiB more): past it the connection is closed."""
KEEPALIVE_S = 4.0
"""How long an idle pooled connection is kept: under the 5 s after which common servers
(Node.js, Apache) close theirs, so the client rarely reuses one the server is closing."""


class _Attempt:
    """Per request, set by `_Connector`: was it sent on a connection that served before,
    and which connection (`answered`: did any byte of an answer come on it)?"""

    __slots__ = ("protocol", "reused")

    def __init__(self) -> None:
        self.reused = False
        self.protocol: _Protocol | None = None

    def answered(self) -> bool:
        """A byte of an answer came (or none could be told: not our protocol)."""
        return self.protocol is None or self.protocol.heard


_ATTEMPT: contextvars.ContextVar[_Attempt | None] = contextvars.ContextVar(
    "userpilot_attempt", default=None)


class _Protocol(ResponseHandler):
    """aiohttp's connection protocol, whose read timeout (`sock_read`, the request timeout)
    does not count time the event loop did not run, and which tells whether it carried a
    request before (`served`) and whether any byte came since its request went out
    (`heard`; `_Connector` sets both).

    Why: frozen (SIGSTOP, a paused VM) between writing a request's head and its body (a
    separate task in aiohttp), the client resumes, sends the body, and the overdue read
    timeout fires in the same turn, before any answer could come: the request timed out
    and was sent again, though Userpilot took the first (round 33: 18 of 1,500 after a 5 s
    freeze at a 1 s timeout). A read timeout firing more than STALL_S late starts again,
    whole: the body may have gone out only now, and Userpilot gets the request timeout to
    answer it (review "diff33": a fixed second sent slower answers twice)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop=loop)
        self.served = False
        self.heard = False
        self.head_left: int | None = None  # bytes an answer's head may still take
        self._head_tail = b""  # the last bytes of a head not ended yet (its end may span reads)

    def data_received(self, data: bytes) -> None:
        self.heard = True
        if self.head_left is None:
            super().data_received(data)
            return
        # A head is fed to the parser alone, what follows it in a second call: aiohttp
        # drops every message it parsed from a read when a later byte of the read is
        # refused, so a 2xx followed in the same read by bytes it cannot parse (a 204 with
        # a body, a stray byte, a bad chunk size) read as no answer, and its accepted event
        # was sent again (review "http49"). By offsets into the one read, each byte copied
        # once: a slice per head found cost the square of a read of many (review "diff49a").
        pos, size = 0, len(data)
        while self.head_left is not None:
            end = _head_end(self._head_tail if pos == 0 else b"", data, pos)
            piece = data if pos == 0 and end in (-1, size) else data[pos:end if end > 0 else size]
            if end < 0:
                # A head not ended yet: its last bytes, as its end may span the next read
                # (blank lines before a head are no start of one).
                if self._head_tail or piece.strip(b"\r\n"):
                    self._head_tail = (self._head_tail + piece[-2:])[-2:]
                self._feed_head(piece)
                return
            self._head_tail = b""
            if not self._feed_head(piece) or end == size:
                return
            pos = end
        super().data_received(data[pos:])

    def _feed_head(self, data: bytes) -> bool:
        """Feed bytes of an answer's head (and maybe its end); False once refused."""
        left = self.head_left
        assert left is not None
        # The answer's head as a whole is bounded (HEADER_BLOCK_MAX), each line and the
        # count of fields by the parser: 256 fields of 64 KiB held ~31 MiB an answer, and
        # a pool of them past the chart's memory (review "diff44").
        before = self._payload
        super().data_received(data)
        if self._payload is not before and self._payload is not EMPTY_PAYLOAD:
            # The head is parsed: the body is bounded by its reader. A 1xx (100 Continue,
            # 103 Early Hints) is a message of its own with no body: the final head still
            # counts (it switched the cap off, review "diff44"). A final answer without a
            # body has nothing after its head; the next request starts the count again.
            self.head_left = None
            return True
        self.head_left = left - len(data)
        if self.head_left < 0:  # an unusable answer, as a parser's refusal is
            if self.transport is not None:
                self.transport.close()
            self.set_exception(HttpProcessingError(
                message=f"the answer's head is over {HEADER_BLOCK_MAX} bytes"))
            self.head_left = None
            return False
        return self.exception() is None  # the parser refused none of it

    def reset_head(self) -> None:
        """A request goes out: its answer's head starts afresh."""
        self._head_tail = b""

    def _on_read_timeout(self) -> None:
        handle, now = self._read_timeout_handle, self._loop.time()
        if handle is not None and now - handle.when() > STALL_S:
            self._reschedule_timeout()
            return
        super()._on_read_timeout()


_HEAD_END = re.compile(rb"\n\r?\n")
"""The empty line that ends a head, CRLF or bare LF, as the parser reads one. One pattern,
searched from the head on: two `find`s each scanned the rest of the read when one kind of
line end was absent (10,000 interim answers in a read cost a second, review "diff49a")."""
_BLANK_LINES = re.compile(rb"[\r\n]*")


def _head_end(tail: bytes, data: bytes, start: int) -> int:
    """Where in `data` the head from `start` ends (past its empty line), or -1. `tail`: the
    last bytes of that head before this read, its end may span the two. Blank lines before
    a head are skipped, as the parser skips them (each one an "end", 200 KB of them cost
    seconds, review "diff49a")."""
    if tail:
        found = _HEAD_END.search(tail + data[:2])
        if found is not None and found.end() > len(tail):
            return found.end() - len(tail)
    else:
        match = _BLANK_LINES.match(data, start)
        start = match.end() if match is not None else start
    found = _HEAD_END.search(data, start)
    return found.end() if found is not None else -1


class _Response(aiohttp.ClientResponse):
    """aiohttp's response, whose reason phrase always encodes as UTF-8. HTTP allows any
    byte there (obs-text); aiohttp keeps one that is not UTF-8 as a lone surrogate, on
    which httpx-aiohttp's `reason.encode()` raised once the answer had come: a 202 with a
    Latin-1 reason ("Accepté") read as no answer, and its event was sent again, every
    time (review "http40")."""

    async def start(self, connection: Connection) -> aiohttp.ClientResponse:
        started = await super().start(connection)
        if self.reason is not None and not self.reason.isascii():
            self.reason = replace_surrogates(self.reason)
        return started


class _Connector(aiohttp.TCPConnector):
    """aiohttp's connector, telling the request under way (`_ATTEMPT`) which connection
    it goes out on and whether that one served a request before. Through `connect`, its
    public extension point: aiohttp's trace hooks say the same for ~17 µs of CPU per
    request (7 % of the client). Its connections speak `_Protocol` (aiohttp's protocol
    factory, set as aiohttp does).

    A pooled connection on which bytes came while it was idle is closed, not used: aiohttp
    queued them as the answer of the next request on it. An answer nobody asked for (a
    misbehaving server or middlebox) was taken as the next request's own, which never left:
    a stale 202 counted an unsent event delivered, a stale 400 dead-lettered it (review
    "http40")."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        loop = self._loop

        def protocol() -> ResponseHandler:
            return _Protocol(loop=loop)

        self._factory = functools.partial(protocol)

    async def connect(self, req: ClientRequest, traces: list[Trace],
                      timeout: aiohttp.ClientTimeout) -> Connection:
        while True:
            connection = await super().connect(req, traces, timeout)
            protocol = connection.protocol
            if not isinstance(protocol, _Protocol):
                return connection
            if protocol.served and protocol.should_close:
                connection.close()  # bytes came while it was idle (see the class)
                continue
            attempt = _ATTEMPT.get()
            if attempt is not None:
                attempt.reused = protocol.served
                attempt.protocol = protocol
            protocol.served = True
            protocol.heard = False
            protocol.head_left = HEADER_BLOCK_MAX
            protocol.reset_head()
            return connection


def _lost_on_reuse(exc: BaseException, attempt: _Attempt) -> bool:
    """The server closed (or reset) a kept-alive connection as the request went out, before
    any of an answer came: the classic keep-alive race (aiohttp resends such a request only
    for idempotent methods, never a POST). A disconnection after part of an answer (even
    a few bytes of its status line: the server had the request) is not; a reset after
    one was resent at once (review "http40")."""
    if attempt.answered():
        return False
    cause = exc.__cause__
    if isinstance(cause, aiohttp.ServerDisconnectedError):
        return not isinstance(cause.message, RawResponseMessage)
    return (isinstance(cause, aiohttp.ClientOSError)
            and not isinstance(cause, aiohttp.ClientConnectorError))


_DELTA_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?")
"""Retry-After's delta-seconds: ASCII digits (a fraction, which some servers send, taken)."""


def parse_retry_after(value: str | None, now: float | None = None,
                      date: str | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP date), capped; else None.

    An HTTP date is on the server's clock: counted from the answer's own `Date` header
    when it has a valid one, not from this machine's clock. A worker 5 minutes behind
    Userpilot waited 5 minutes more on every 429, and one ahead retried at once into more
    429s (review "clock53"). `now`, for tests, stands for the local clock."""
    if not value:
        return None
    value = value.strip()
    if _DELTA_SECONDS.fullmatch(value):
        seconds = min(float(value), MAX_RETRY_AFTER_S)  # 400 digits: the cap, not `inf`
    else:
        # Not float(): it took `1_000`, `1e3`, `+30` and non-ASCII digits, which HTTP does
        # not, and held a family for the 600 s cap on a garbled header (review "outage49").
        when = _http_date(value)
        if when is None:
            return None
        sent = _http_date(date) if date else None
        if sent is None:  # no usable Date: this machine's clock
            sent = time.time() if now is None else now
        seconds = when - sent
    if not math.isfinite(seconds):  # NaN, or "1e400": a 600 s hold, not a number
        return None
    return max(0.0, min(seconds, MAX_RETRY_AFTER_S))


def _http_date(text: str) -> float | None:
    """An HTTP date (Retry-After's, Date's) as a POSIX time; None when unreadable."""
    try:
        when = email.utils.parsedate_to_datetime(text.strip())
        if when.tzinfo is None:  # HTTP dates are always GMT, whatever the local zone
            when = when.replace(tzinfo=UTC)
        stamp = when.timestamp()
    except (TypeError, ValueError, OverflowError, IndexError):
        # A date with a year, hour or zone too large for datetime raises OverflowError:
        # it crashed the worker on a 429 (no WorkerError), on every restart.
        return None
    return stamp if math.isfinite(stamp) else None


ACCEPTED_BODY_S = 1.0
"""How long the rest of a 2xx's body is waited for (its event is delivered already)."""

RESENT = "userpilot_worker.resent"
"""The request extension `_send` sets on a request it sent again (`WorkerError.resent`)."""

REQUEST_REFUSED = frozenset({405, 410, 411, 414, 415, 426})
"""4xx statuses about the request itself (method, path, length, URI, content type,
protocol), which the worker makes alike for every event: never a payload problem."""


def classify(status: int, headers: Mapping[str, str], body: str,
             path: str = "") -> WorkerError | None:
    """None when delivered (202, or any 2xx); otherwise the exception that says what next.
    `path`, the request's, is named in a refusal: one endpoint refusing while the others
    take the same token read as a wrong token everywhere (review "http33")."""
    if 200 <= status < 300:
        return None
    rid = headers.get("x-request-id", "")
    snippet = body[:BODY_LIMIT]
    asked = f" (x-request-id {rid})" if rid else ""
    where = f"HTTP {status}{asked}"
    refused = f"HTTP {status} from {path}{asked}" if path else where
    if status == 429:
        return RateLimited(
            f"{where}: rate limited", status=status, body=snippet,
            retry_after=parse_retry_after(headers.get("retry-after"),
                                          date=headers.get("date")),
        )
    if status == 408 or 500 <= status <= 599:
        return ServerError(
            f"{where}: Userpilot error (transient)", status=status, body=snippet,
            retry_after=parse_retry_after(headers.get("retry-after"),
                                          date=headers.get("date")),
        )
    if status == 407:
        # From the egress proxy, not Userpilot: no event can pass until its credentials
        # are fixed, so pause like a refused token instead of dead-lettering every event.
        return Misconfigured(
            f"{refused}: the proxy refused its credentials; check the user and password in "
            "HTTPS_PROXY / HTTP_PROXY (percent-encoded)", status=status, body=snippet,
        )
    if status in (401, 403) and html_page(snippet):
        # Userpilot's API answers JSON: an HTML page is a block page of something in
        # between. Read as "token refused", on-call chased the token (review "egress59").
        return Refused(
            f"{refused}: refused with an HTML page, which Userpilot's API does not send: an "
            "egress proxy, firewall or TLS-inspecting gateway in between answered (its page "
            "says why: see the answer quoted); else check USERPILOT_API_KEY",
            status=status, body=snippet,
        )
    if status in (401, 403):
        return Refused(
            f"{refused}: token refused; use the application write token, not the read/export "
            "token (USERPILOT_API_KEY)", status=status, body=snippet,
        )
    if status == 404:
        return Refused(
            f"{refused}: not found; check USERPILOT_ANALYTICS_ENDPOINT (host only, e.g. "
            "analytex.userpilot.io or analytex-eu.userpilot.io)", status=status, body=snippet,
        )
    if status == 402:
        return Refused(
            f"{refused}: payment required, for every event alike; check the Userpilot "
            "account's plan and billing", status=status, body=snippet,
        )
    if status in REQUEST_REFUSED:
        # The method, path, length, URI, content type or protocol: the worker's own, the
        # same for every event. Dead-lettered as a payload problem, every event went to
        # the DLQ until its guard stopped the worker (review "r54").
        return Refused(
            f"{refused}: the request refused, not this event's payload; this host does not "
            "serve Userpilot's API as the worker calls it: check USERPILOT_ANALYTICS_ENDPOINT "
            "(host only) and any proxy or gateway in between", status=status, body=snippet,
        )
    if status == 431:
        # The request's head is the worker's own, the same for every event (the token, the
        # content type, the API version): no event can pass, so pause, not dead-letter
        # each one (review "config53").
        return Misconfigured(
            f"{refused}: request headers too large; check USERPILOT_API_KEY (the token "
            "alone)", status=status, body=snippet,
        )
    if 400 <= status <= 499:
        return Rejected(f"{where}: payload rejected", status=status, body=snippet)
    if 300 <= status <= 399:
        # Never followed (the token must not travel to another host); no event can succeed.
        # A 3xx without a Location (a 304 says "not modified") named "redirected to ?".
        location = headers.get("location")
        said = (f"redirected to {location[:200]}" if location
                else f"HTTP {status} with no Location")
        return Misconfigured(
            f"{refused}: {said}; check USERPILOT_ANALYTICS_ENDPOINT (host only) and "
            "USERPILOT_INSECURE_HTTP", status=status, body=snippet,
        )
    # A final 1xx, or a status outside HTTP's classes: it says nothing about the payload
    # (a broken gateway or proxy answering every request so), so it is retried like a 5xx
    # (the gate holds everything after ten in a row) and never dead-letters the event.
    return ServerError(f"{where}: unexpected status from Userpilot or a proxy (transient)",
                       status=status, body=snippet)


def transport_failure(exc: BaseException, deadline_s: float,
                      proxied: bool = False) -> WorkerError:
    """What a request that got no usable answer raises (the one place for transport
    outcomes, the worker's and `delete-users`'; `classify` is the one for HTTP statuses)."""
    if isinstance(exc, TimeoutError):
        return Timeout(f"no whole answer from Userpilot within {deadline_s:g} s")
    refused = _tls_refusal(exc, proxied)
    if refused is not None:
        return refused
    if isinstance(exc, httpx.TimeoutException):
        if _really_timed_out(exc):
            if proxied and isinstance(exc, httpx.ConnectTimeout):
                # Through a proxy the connection is the proxy's and its tunnel: one that
                # takes the connection and never answers CONNECT read as Userpilot's
                # silence, the proxy unnamed (round 59's "noticed").
                return Timeout(
                    "no connection to Userpilot in time through the proxy (ConnectTimeout): "
                    "the proxy (HTTPS_PROXY or ALL_PROXY) did not connect or open the tunnel, "
                    "or the TLS handshake through it did not finish")
            return Timeout(f"no answer from Userpilot in time ({type(exc).__name__})")
        cause = exc.__cause__
        if isinstance(cause, aiohttp.ClientConnectorDNSError):
            if _out_of_files():
                # glibc's lookup fails "Name or service not known" at the descriptor limit:
                # it read as a misspelt USERPILOT_ANALYTICS_ENDPOINT (review "diff60b").
                return ConnectionFailed(f"connection to Userpilot failed ({_OUT_OF_FILES_SAID})")
            # Named: "ClientConnectorDNSError" alone hid a misspelt host (review "http33").
            # Through a proxy, the name looked up is the proxy's (it resolves Userpilot's).
            return unreachable(cause.host, proxied)
        if isinstance(cause, aiohttp.ClientConnectorError) and _refused(cause.os_error):
            # Nothing listens on the port (the proxy's, through one): said so, as
            # `delete-users` says it, not "for TLS, check USERPILOT_CA_BUNDLE" (review
            # "config48"). httpx-aiohttp maps it to a ConnectTimeout.
            return unreachable(cause.host, proxied, refused=True)
        return ConnectionFailed(f"connection to Userpilot failed ({_named(cause or exc)})")
    if isinstance(exc, httpx.ProxyError):
        status = _proxy_status(exc)
        if status == 407:
            # An HTTPS proxy refusing the tunnel (CONNECT) answers before Userpilot is
            # reached: a 407 there is the proxy's credentials, as it is for plain-HTTP
            # proxying.
            problem = classify(407, {}, "")
            if problem is not None:
                return problem
        if status == 403:
            # The proxy's policy forbids the host: a setting (its allow-list, NO_PROXY),
            # not an outage. As one the pod stayed ready and no alert said why (review
            # "http33"). Delivery pauses; nothing is dead-lettered.
            return ProxyRefused(
                "the proxy refused the tunnel to Userpilot (HTTP 403): allow the Userpilot "
                "host in the proxy's policy, or bypass it with NO_PROXY", status=403)
        if status in _NO_TUNNELS:
            # A proxy for plain HTTP only: a setting, as a 405/501 from Userpilot is; as an
            # outage the pod stayed ready and no alert fired (review "egress59").
            return ProxyRefused(
                f"the proxy does not open tunnels (HTTP {status} to CONNECT): it proxies "
                "plain HTTP only; name one that tunnels HTTPS in HTTPS_PROXY, or bypass it "
                "with NO_PROXY", status=status)
        if status is not None:
            # Any other refusal of the tunnel (a 502: it cannot reach Userpilot) says
            # nothing about the event (never a dead letter), but says who refused.
            return ConnectionFailed(
                f"connection to Userpilot failed: the proxy refused the tunnel (HTTP {status})",
                before_tls=True)
    if isinstance(exc, (httpx.TransportError, OSError)):
        return ConnectionFailed(f"connection to Userpilot failed ({_named(exc)})")
    # A broken answer: a body httpx cannot decode, or a response aiohttp's parser refused
    # (httpx-aiohttp passes those through unmapped).
    return ServerError(f"unusable answer from Userpilot ({type(exc).__name__})")


_NO_TUNNELS = frozenset({400, 405, 501})
"""A proxy's answers to CONNECT that say it does not tunnel (a plain-HTTP proxy)."""


def _named(exc: BaseException) -> str:
    """The exception's class, with OpenSSL's reason when a TLS error is among its causes:
    "ClientConnectorSSLError" alone hid which handshake failed (review "egress59")."""
    reason = next((getattr(seen, "reason", None) for seen in causes(exc)
                   if isinstance(seen, ssl.SSLError) and getattr(seen, "reason", None)), None)
    if reason is None and any(isinstance(seen, OSError) and seen.errno in _OUT_OF_FILES
                              for seen in causes(exc)):
        # The process's own limit, not Userpilot: said, it was an outage of Userpilot's
        # with nothing naming the descriptors (review "env60").
        reason = _OUT_OF_FILES_SAID
    return f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__


_OUT_OF_FILES = (errno.EMFILE, errno.ENFILE)
_OUT_OF_FILES_SAID = ("too many open files: the process reached its open-file limit (ulimit "
                      "-n, the container's nofile); raise it")


def _out_of_files() -> bool:
    """The process is at its open-file limit now (a descriptor cannot be had)."""
    try:
        os.close(os.dup(2))
    except OSError as exc:
        return exc.errno in _OUT_OF_FILES
    return False


def quoted_header(value: str, redact: Callable[[str], str]) -> str:
    """An answer's header (x-request-id, Location) as a refusal or a success line quotes it:
    cut at 200 characters, redacted (a gateway may echo the request, token included) and
    escaped (`check-config --online` and `delete-users` print it as it is: a terminal's
    escapes in an x-request-id, review "logsec52"). For the worker and `delete-users` alike."""
    return printable(redact(value[:200]))


def classify_answer(status: int, headers: httpx.Headers, body: bytes,
                    redact: Callable[[str], str], path: str = "") -> WorkerError | None:
    """`classify` of an answer as received, with what it quotes (body, x-request-id,
    Location) redacted: a gateway may echo the request, token and proxy credentials
    included. For the worker and `delete-users` alike (the latter quoted them raw, review
    "secrets18"). An answer that cannot even be read is a server error (retried, never a
    dead letter), not an exception that stops the worker."""
    try:
        quoted = {name: quoted_header(headers[name], redact)
                  for name in ("x-request-id", "location") if name in headers}
        if "retry-after" in headers:
            # The first field: httpx joins repeated ones ("30, 30", a gateway's beside the
            # origin's), which read as neither seconds nor a date, and the wait Userpilot
            # asked for was lost (review "http44"); a date holds a comma of its own.
            # The first one not blank: a blank one beside a valid one hid it (review "http49").
            fields = headers.get_list("retry-after")
            quoted["retry-after"] = next((f for f in fields if f.strip()), fields[0])
            if "date" in headers:  # a Retry-After date counts from it (review "clock53")
                quoted["date"] = headers.get_list("date")[0]
        charset, coding = charset_of(headers), headers.get("content-encoding")
        limit = BODY_LIMIT
        shown = redact(body_text(body, charset=charset, encoding=coding))
        # Not a JSON answer, which may quote `<html` and `<!--` (an event's value echoed):
        # blanked as a page, its error code was lost (review "diff60").
        page = "json" not in headers.get("content-type", "").lower() and html_page(shown)
        if page:
            # A page's text may come after its head and stylesheet: read further, then
            # blank what no reader sees (`page_kept`) before `classify` cuts it.
            limit = PAGE_LIMIT
            shown = redact(body_text(body, charset=charset, encoding=coding, limit=limit))
        if charset is not None and not _utf8(charset):
            # An echo quotes the token as the bytes it was sent in: a charset label that
            # reads them as something else (cp500, utf-16, a Shift_JIS lead byte taking
            # its first character) hid it from redaction while keeping it whole, to be
            # encoded back from the exception or the dead letter (review "http40").
            plain = body_text(body, encoding=coding, limit=limit)
            masked = redact(plain)
            if masked != plain:
                shown = masked
        return classify(status, quoted, page_kept(shown) if page else shown, path)
    except Exception as exc:  # see above
        return ServerError(f"HTTP {status}: unusable answer from Userpilot or a proxy "
                           f"({type(exc).__name__}; transient)", status=status)


def _utf8(charset: str) -> bool:
    """`charset` names UTF-8 (most JSON answers): then the body was read as UTF-8 already."""
    try:
        return codecs.lookup(charset.strip()).name == "utf-8"
    except (LookupError, ValueError):
        return False


def request_secrets(headers: Mapping[str, str], proxy: str | None) -> list[str]:
    """What an echo of a Userpilot request could show: the token and the proxy's
    credentials."""
    return [*_credentials(headers), *url_credentials(proxy)]


_PLAIN_PORT = frozenset({"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "PACKET_LENGTH_TOO_LONG",
                         "RECORD_LAYER_FAILURE", "UNKNOWN_PROTOCOL"})
"""OpenSSL's reasons for a handshake answered by something that is not TLS (an HTTP port)."""
_NO_COMMON_GROUND = {
    **dict.fromkeys(("TLSV1_ALERT_PROTOCOL_VERSION", "UNSUPPORTED_PROTOCOL",
                     "NO_PROTOCOLS_AVAILABLE"),
                    "no TLS version both ends accept (the worker speaks TLS 1.2 and 1.3)"),
    # OpenSSL refuses a missing client certificate over TLS 1.2 with this alert too
    # (review "diff59b").
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "no cipher suite or key exchange both ends accept, or "
                                     "(TLS 1.2) the other end asks for a client certificate "
                                     "(mutual TLS), which the worker does not send",
    **dict.fromkeys(("NO_SHARED_CIPHER", "NO_CIPHERS_AVAILABLE",
                     "TLSV1_ALERT_INSUFFICIENT_SECURITY"),
                    "no cipher suite or key exchange both ends accept"),
    **dict.fromkeys(("TLSV13_ALERT_CERTIFICATE_REQUIRED", "SSLV3_ALERT_BAD_CERTIFICATE"),
                    "the other end asks for a client certificate (mutual TLS), which the "
                    "worker does not send"),
}
"""OpenSSL's reasons for a handshake refused for a lasting lack of common ground, and what
each means: retried as an outage with only "ClientConnectorSSLError" to show, the pod stayed
ready and no alert said why (review "egress59"). Userpilot's own endpoint accepts TLS 1.2
and 1.3 without a client certificate: such a refusal is a wrong endpoint, or a proxy or
gateway in front of it."""


def unreachable(host: str, proxied: bool, *, refused: bool = False) -> ConnectionFailed:
    """A connection that failed before any TLS, named: the host does not resolve (DNS), or
    (`refused`) nothing listens on its port. Through a proxy, the host is the proxy's."""
    if refused:
        what = (f"the proxy {host!r} refused it" if proxied else f"{host!r} refused it")
        what += " (nothing listens on that port)"
    else:
        what = (f"the proxy's host {host!r} does not resolve (DNS)" if proxied
                else f"its host {host!r} does not resolve (DNS)")
    fix = "HTTPS_PROXY / HTTP_PROXY" if proxied else "USERPILOT_ANALYTICS_ENDPOINT"
    return ConnectionFailed(f"connection to Userpilot failed: {what}; check {fix}",
                            before_tls=True)


def _refused(error: OSError) -> bool:
    """A connection refused, also as asyncio reports it for a host of several addresses
    ("Multiple exceptions: [Errno 111] Connect call failed ..." for each)."""
    if isinstance(error, ConnectionRefusedError) or error.errno == errno.ECONNREFUSED:
        return True
    text = str(error)
    return (text.startswith("Multiple exceptions: ")
            and text.count("Connect call failed") == text.count("[Errno")
            and text.count(f"[Errno {errno.ECONNREFUSED}]") == text.count("[Errno"))


def _proxy(url: str) -> httpx.Proxy:
    """The proxy at `url`, its credentials (if any) given as a header of the proxy's own:
    as credentials, httpx-aiohttp passes them in aiohttp's deprecated `proxy_auth`, whose
    DeprecationWarning failed every request under `PYTHONWARNINGS=error` as "unusable
    answer from Userpilot" while the pod read ready (review "env60"). aiohttp takes the
    proxy headers' `Authorization` as it takes `proxy_auth`'s: sent as Proxy-Authorization
    on the CONNECT (https) or the request (http). Basic, the credentials ASCII (`config`
    refuses others), as aiohttp encoded them."""
    given = httpx.Proxy(url)
    if given.auth is None:
        return given
    user, password = given.auth
    basic = base64.b64encode(f"{user}:{password}".encode("latin-1")).decode("ascii")
    return _CredentialedProxy(given.url, headers={"Authorization": f"Basic {basic}"})


class _CredentialedProxy(httpx.Proxy):
    """A proxy whose credentials are a header, which its repr does not show (httpx's
    shows headers; it masked only credentials in the URL, review "diff60b")."""

    def __repr__(self) -> str:
        return f"Proxy({str(self.url)!r}, headers=***)"


def causes(exc: BaseException, depth: int = 6) -> Iterator[BaseException]:
    """`exc` and its causes (`__cause__`, else `__context__`), at most `depth` of them:
    httpx wraps its transport's errors, which wrap the socket's or the `ssl` module's."""
    seen: BaseException | None = exc
    for _ in range(depth):
        if seen is None:
            return
        yield seen
        seen = seen.__cause__ or seen.__context__


def _tls_refusal(exc: BaseException, proxied: bool = False) -> TlsRefused | None:
    """A TLS failure only a setting fixes when it lasts, found in the exception's causes
    (httpx-aiohttp wraps aiohttp's, which wraps the `ssl` module's), or None. Through a
    proxy, the certificate or the plain port may be the proxy's (`HTTPS_PROXY=https://`
    naming a plain-HTTP proxy is the usual one): the message names both."""
    for seen in causes(exc):
        if isinstance(seen, ssl.SSLCertVerificationError):
            # aiohttp's ClientConnectorCertificateError is one too, holding the ssl one.
            cause = getattr(seen, "certificate_error", seen)
            why = (getattr(cause, "verify_message", None) or getattr(cause, "reason", None)
                   or "certificate verify failed")
            whose = ("Userpilot's (or the proxy's) certificate" if proxied
                     else "Userpilot's certificate")
            if getattr(cause, "verify_code", None) in _CERT_TIME_CODES:
                # Any certificate of the chain: "set USERPILOT_CA_BUNDLE to the CA that
                # signed it" sent the operator the wrong way for an expired leaf (review
                # "http44"), and an expired CA of the bundle is the bundle's (review
                # "diff44").
                return TlsRefused(
                    f"TLS: a certificate in {whose.replace(' certificate', ' chain')} is "
                    f"outside its validity dates ({why}): it has expired or is not valid "
                    "yet (the other end's to renew, or a CA in USERPILOT_CA_BUNDLE to "
                    "replace) or this host's clock is wrong")
            if getattr(cause, "verify_code", None) in _CERT_WEAK_CODES:
                # Trusted, but too weak for this host's OpenSSL: another CA bundle cannot fix
                # it (review "egress59").
                return TlsRefused(
                    f"TLS: {whose.replace(' certificate', ' chain')} uses a key or signature "
                    f"this host's OpenSSL refuses as too weak ({why}): the other end's to "
                    "replace (a TLS-inspecting proxy's CA, say); check "
                    "USERPILOT_ANALYTICS_ENDPOINT")
            if getattr(cause, "verify_code", None) in _CERT_HOST_CODES:
                # Trusted, but issued for another name: the CA bundle is not the fix
                # (review "http49").
                return TlsRefused(
                    f"TLS: {whose} is issued for another host ({why}): check the host in "
                    "USERPILOT_ANALYTICS_ENDPOINT" + (
                        ", and for an https:// proxy the host in its URL (HTTPS_PROXY)"
                        if proxied else ""))
            return TlsRefused(
                f"TLS: {whose} is not trusted ({why}): set USERPILOT_CA_BUNDLE to the CA "
                "that signed it (a TLS-inspecting proxy's, say), or check "
                "USERPILOT_ANALYTICS_ENDPOINT")
        reason = getattr(seen, "reason", None)  # aiohttp's SSL errors have none: causes do
        if isinstance(seen, ssl.SSLError) and reason in _NO_COMMON_GROUND:
            where = ("USERPILOT_ANALYTICS_ENDPOINT, and the proxy in HTTPS_PROXY (an https:// "
                     "proxy's own TLS, or one inspecting TLS; NO_PROXY bypasses it)" if proxied
                     else "USERPILOT_ANALYTICS_ENDPOINT (a gateway or proxy in front of it?)")
            return TlsRefused(
                f"TLS: the handshake was refused ({reason}): {_NO_COMMON_GROUND[reason]}; "
                f"Userpilot's own endpoint accepts TLS 1.2 and 1.3 without one: check {where}")
        if isinstance(seen, ssl.SSLError) and reason in _PLAIN_PORT:
            where = ("the port in USERPILOT_ANALYTICS_ENDPOINT, or the proxy URL's scheme "
                     "(a plain-HTTP proxy is http://, even in HTTPS_PROXY)" if proxied
                     else "the port in USERPILOT_ANALYTICS_ENDPOINT")
            return TlsRefused(
                f"TLS: the other end does not speak TLS ({reason}): check {where} (plain "
                "HTTP to Userpilot is USERPILOT_INSECURE_HTTP=true, for a local sandbox "
                "only)")
    return None


_PROXY_REFUSAL = re.compile(r"([1-5][0-9][0-9])(?: |$)")


def _proxy_status(exc: BaseException) -> int | None:
    """The status a proxy refused a CONNECT with, if that is what happened: aiohttp's
    ClientHttpProxyError (wrapped by httpx-aiohttp in httpx.ProxyError), or httpx's own
    transport's ProxyError, whose text is the proxy's status line ("407 Proxy
    Authentication Required"; `delete-users` sends through that transport)."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            break
        if isinstance(seen, aiohttp.ClientHttpProxyError):
            return seen.status
        seen = seen.__cause__ or seen.__context__
    if isinstance(exc, httpx.ProxyError):
        status = _PROXY_REFUSAL.match(str(exc))
        if status is not None:
            return int(status.group(1))
    return None


async def _read_capped(response: httpx.Response) -> bytes:
    """The body as sent (not decoded), cut at MAX_BODY_BYTES: what lies beyond is never
    read, so the connection is closed rather than pooled."""
    if response.is_stream_consumed:  # a transport that read it already (httpx's mock one)
        return response.content[:MAX_BODY_BYTES]
    stream = response.stream
    if not isinstance(stream, httpx.AsyncByteStream):
        raise TypeError("an async transport answered with a sync stream")
    chunks: list[bytes] = []
    size = 0
    # The transport's stream itself, not `aiter_raw` (which re-chunks it and counts the
    # bytes, for nothing here): ~3 % of the client's CPU a request (round 36).
    async for chunk in stream:
        chunks.append(chunk)
        size += len(chunk)
        if size >= MAX_BODY_BYTES:
            break
    return b"".join(chunks)[:MAX_BODY_BYTES]


def _arrived_whole(response: httpx.Response) -> bool:
    """The answer's body is all there, as aiohttp tells (its payload at EOF): aiohttp then
    released the connection already (pooled, or closed when the answer said so), so reading
    the body serves nothing. Reading a 2xx's body anyway cost ~4 % of the worker's CPU per
    delivered event at 20 ms (RESULTS.md, "Round 39"). Any other transport's answer, or one
    still arriving, is read: left unread, its connection would be closed instead of pooled."""
    stream = response.stream
    if not isinstance(stream, AiohttpResponseStream):
        return False
    inner = getattr(stream, "_aiohttp_response", None)  # httpx-aiohttp's, pinned
    return isinstance(inner, aiohttp.ClientResponse) and inner.content.is_eof()


def _credentials(headers: Mapping[str, str]) -> list[str]:
    """The secret in the request headers: the Authorization header's token (its scheme,
    `Token`, stays readable)."""
    return [value.split()[-1] for name, value in headers.items()
            if name.lower() == "authorization" and value.strip()]


def _really_timed_out(exc: httpx.TimeoutException) -> bool:
    """httpx-aiohttp maps every aiohttp connection error (refused, reset) to ConnectTimeout;
    its cause says whether time actually ran out."""
    return exc.__cause__ is None or isinstance(exc.__cause__, TimeoutError)


_Route = tuple[httpx.URL, list[tuple[bytes, bytes]], str]
"""A path's URL, its requests' headers but Content-Length, and its endpoint label
(`UserpilotClient._route`)."""

resend_log = logging.getLogger(f"{__name__}.resend")
resend_log.addFilter(RateLimit(10.0))


class UserpilotClient:
    """POSTs to Userpilot through httpx's transport API, on aiohttp (`httpx-aiohttp`).

    Why that transport: measured at the worker's concurrency (64 connections, and at 16 in
    round 20) against the sandbox, httpx's own pool served far fewer requests per second
    than aiohttp's connector (tests/bench/RESULTS.md, "HTTP transport", "Round 20").

    Why the transport and not `httpx.AsyncClient`: the client's layer (request merging,
    auth and redirect flows, event hooks, a cookie jar fed by every response) cost ~100 µs
    of CPU per request, a third of the whole request, for features a fixed-host API client
    must not use (RESULTS.md, "Round 6"). What it gave that we need is kept here, once:
    - the proxy the environment names for Userpilot (`config.environment_proxy`, resolved
      and checked at start-up for the one Userpilot host; its credentials travel as
      Proxy-Authorization);
    - the CA bundle (`ssl_context`) and the pool timeout (the request's `timeout`
      extension, which the transport applies to the wait for a connection; a request
      takes one of `max_connections` permits before, so it only bounds a connection that
      was never given back, and waiting behind slow answers is not a failed attempt);
    - no redirects (the transport never follows one: the token stays on its host);
    - no cookies stored or sent back (aiohttp's `DummyCookieJar`).
    """

    def __init__(
        self, url: str, headers: Mapping[str, str], *, timeout_s: float,
        max_connections: int, ca_bundle: str | None = None, proxy: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        on_resend: Callable[[str], None] | None = None,
    ) -> None:
        """`on_resend(endpoint)` is told of each request sent again at once (`_send`): the
        worker counts them, as Userpilot may have taken the first (review "http54")."""
        self._on_resend = on_resend
        # Parsed once: httpx parses a str URL on every request (~6 % of the worker's CPU
        # per delivered event at 20 ms, measured with py-spy).
        self._proxied = proxy is not None  # names the proxy in TLS refusals
        parts = urlsplit(url)
        self._base = f"{parts.scheme}://{parts.netloc}"
        self._routes: dict[str, _Route] = {}
        # No compressed answers: Userpilot's are a few bytes, and a compressed one is a
        # bomb we would have to inflate (1 MB of gzip, 1 GB of text). aiohttp would
        # otherwise advertise gzip, br and zstd. A server that compresses anyway gets its
        # first few KB inflated (`answers.body_text`).
        self._headers = httpx.Headers({"User-Agent": USER_AGENT,
                                       "Accept-Encoding": "identity", **headers})
        self._track = self._route(httpx.URL(url), "track")
        self._extensions = {"timeout": httpx.Timeout(timeout_s).as_dict()}
        # The transport bounds each step (the wait for a connection, connecting, each read)
        # by `timeout_s`, not the whole: an answer trickled byte by byte would hold its
        # event, and with it the partition's commits, for ever. The whole attempt gets the
        # wait for a connection plus one request time.
        self._deadline_s = 2 * timeout_s
        # The token (and the whole credential header) as Userpilot might echo it back: a
        # gateway that quotes the request must not put it into an exception, log or DLQ.
        self._redact = Redactor(request_secrets(headers, proxy))
        self.proxy = _proxy(proxy) if proxy else None
        """The proxy in use (its URL without credentials: `proxy.url`), or None."""
        if transport is None:
            context = verification(url, str(self.proxy.url) if self.proxy else None,
                                   ca_bundle=ca_bundle)
            limits = httpx.Limits(max_connections=max_connections,
                                  max_keepalive_connections=max_connections)

            def session() -> aiohttp.ClientSession:  # made on first use, inside the loop
                connector = _Connector(limit=max_connections, ssl=context,
                                       keepalive_timeout=KEEPALIVE_S)
                # Header limits above aiohttp's defaults (8,190 bytes a line, 128 fields):
                # a 2xx with a long Content-Security-Policy or many trace headers (a gateway,
                # an inspecting proxy) is valid HTTP, but refused by the parser it read as
                # an unusable answer, and the accepted event was sent again at every attempt
                # (review "http44"). Bounded still: 256 fields of at most 64 KiB.
                return aiohttp.ClientSession(connector=connector, response_class=_Response,
                                             cookie_jar=aiohttp.DummyCookieJar(),
                                             max_line_size=HEADER_LINE_MAX,
                                             max_field_size=HEADER_LINE_MAX,
                                             max_headers=HEADERS_MAX)

            transport = AiohttpTransport(verify=context, limits=limits, proxy=self.proxy,
                                         client=session)
        self._transport = transport
        # One permit per pooled connection, taken before the request's clock starts: a
        # request waiting for a connection held by a slow Userpilot (answering within its
        # timeout) timed out in the pool as a "ConnectTimeout", used one of its event's
        # attempts, fed the outage gate, and dead-lettered events that never left.
        self._slots = asyncio.Semaphore(max_connections)

    @classmethod
    def for_settings(cls, settings: Settings, *, timeout_s: float | None = None,
                     max_connections: int | None = None,
                     on_resend: Callable[[str], None] | None = None) -> UserpilotClient:
        """The client `run` uses: the settings' endpoint, token, CA bundle and proxy
        (`check-config --online` narrows the timeout and the pool)."""
        return cls(
            settings.track_url, settings.headers(),
            timeout_s=settings.request_timeout_s if timeout_s is None else timeout_s,
            max_connections=(settings.pool_connections if max_connections is None
                             else max_connections),
            ca_bundle=settings.ca_bundle,
            proxy=settings.proxy.reveal() if settings.proxy is not None else None,
            on_resend=on_resend,
        )

    async def track(self, body: bytes) -> int:
        """POST one Track body; returns the 2xx status, raises the classified exception."""
        return await self._post(self._track, body)

    async def send(self, call: Call) -> int:
        """Send one call (``consumer.calls.Call``) to its path on this client's host.

        Same contract as :meth:`track`: returns the status of a 2xx, raises what
        `classify` says otherwise.
        """
        route = self._routes.get(call.path)
        if route is None:
            route = self._routes[call.path] = self._route(httpx.URL(self._base + call.path),
                                                          call.endpoint)
        return await self._post(route, call.body)

    def _route(self, url: httpx.URL, endpoint: str) -> _Route:
        """A path's URL and the head of its requests' headers, as httpx prepares them for
        `content=` (Host first), made once."""
        head = list(self._headers.raw)
        if "host" not in self._headers:
            head.insert(0, (b"Host", url.netloc))
        return url, head, endpoint

    async def _post(self, route: _Route, body: bytes) -> int:
        # The request `httpx.Request(content=body)` makes, with its headers merged once per
        # path (`_route`) instead of on every request: ~11 µs of CPU a request down to ~4
        # (round 36). `read` keeps the body readable as `request.content`, as `content=`.
        # ASCII, as httpx encoded them when the client was made: not found out again from
        # every request's headers (aiohttp reads them as text).
        url, head, endpoint = route
        request = httpx.Request("POST", url, stream=httpx.ByteStream(body),
                                extensions=self._extensions)
        # Set, not passed: `Request` copies what it is given and drops the encoding, which
        # it then found out again from every header when the transport read them.
        request.headers = httpx.Headers([*head, (b"Content-Length", b"%d" % len(body))],
                                        encoding="ascii")
        request.read()
        async with self._slots:
            return await self._exchange(request, endpoint)

    async def _exchange(self, request: httpx.Request, endpoint: str) -> int:
        accepted = False
        answered: httpx.Response | None = None
        broken: Exception | None = None
        try:
            async with StallAwareDeadline(self._deadline_s):
                response = answered = await self._send(request, endpoint)
                accepted = 200 <= response.status_code < 300
                try:
                    # Read, so the connection goes back to the pool (an unread body closes
                    # it); but never more than MAX_BODY_BYTES: an answer of hundreds of MB
                    # was held whole (an OOM kill under the chart's limit). Not a 2xx's that
                    # came whole: nothing reads it, and its connection is back already.
                    if not accepted:
                        body = await _read_capped(response)
                    elif _arrived_whole(response):
                        body = b""
                    else:
                        # A 2xx whose body is still coming: the event is delivered. Read
                        # for the connection's reuse a moment only: a body trickled byte by
                        # byte held the event, and its user's next ones, for the whole
                        # deadline, twice the request timeout (review "slow55"). Past the
                        # moment, the connection is closed instead of pooled.
                        # `asyncio.timeout`, not `wait_for`: on 3.11 that lost a cancel
                        # arriving as the read finished (review "diff55b").
                        async with asyncio.timeout(ACCEPTED_BODY_S):
                            body = await _read_capped(response)
                finally:
                    await response.aclose()
        except Exception as exc:
            # Any exception: what httpx and aiohttp may raise for an answer is wider than
            # their documented errors (a ValueError or UnicodeError from a parser), and one
            # outside WorkerError stopped the worker, on every restart while the answers
            # came so. `transport_failure` names what it does not know a server error.
            if accepted:
                # Userpilot said 2xx: the event is delivered, whatever became of the body
                # (cut, trickled past the deadline, not the gzip it claimed). Re-sending
                # it on a body error sent it twice.
                return response.status_code
            if answered is None:
                raise transport_failure(exc, self._deadline_s, self._proxied) from None
            # The status came, then its body broke off: the status still says what it is.
            # Taken as a timeout or reset, a 429 used up the event's attempts (its
            # Retry-After unread) and a 401 read as an outage (review "http35"). Except a
            # dead letter's: an answer that cannot be read whole is retried, never the
            # reason an event is given up (`classify_answer`; review "diff35").
            body, broken = b"", exc
        status = answered.status_code
        if accepted:  # the common case: no need to decode the body
            return status
        problem = self._problem(status, answered.headers, body, request.url.path)
        if broken is not None and (problem is None or isinstance(problem, DeadLetter)):
            del problem
            raise transport_failure(broken, self._deadline_s, self._proxied) from None
        if problem is None:
            return status
        problem.resent = RESENT in request.extensions
        try:
            raise problem
        finally:
            # The traceback holds this frame: without this the exception and the frame
            # (with the response and its connection's buffers) would form a cycle.
            del problem

    async def _send(self, request: httpx.Request, endpoint: str) -> httpx.Response:
        """The transport's answer; a request a pooled connection lost as it went out (the
        server closed it idle, `_lost_on_reuse`, within STALE_WITHIN_S) is sent again at
        once, up to STALE_RESENDS times. Counted as a failure it cost the event an
        attempt, a backoff and a slot of the rate limit, and a burst after a quiet spell
        paused delivery as an outage (review "idle18"; the hand-written transport resent
        it too). Never once part of an answer came, nor after the server held it longer
        (review "diff18"). Told (`on_resend`, a rate-limited line): a server that took the
        request and then lost the connection has it twice, unseen until then (review
        "http54")."""
        resends = 0
        while True:
            attempt = _Attempt()
            token = _ATTEMPT.set(attempt)
            sent = time.monotonic()
            try:
                return await self._transport.handle_async_request(request)
            except httpx.TransportError as exc:
                if not (attempt.reused and resends < STALE_RESENDS
                        and time.monotonic() - sent < STALE_WITHIN_S
                        and _lost_on_reuse(exc, attempt)):
                    raise
                resends += 1
                # A new dict: httpx before 0.28 keeps the one it was given, the client's
                # own for every request, and the mark went on every later one.
                request.extensions = {**request.extensions, RESENT: True}
                resend_log.info(
                    "a %s request that a kept-alive connection lost as it went out (%s) was "
                    "sent again at once; had Userpilot taken it, it has it twice", endpoint,
                    type(exc.__cause__ or exc).__name__)
                if self._on_resend is not None:
                    self._on_resend(endpoint)
            finally:
                _ATTEMPT.reset(token)

    def _problem(self, status: int, headers: httpx.Headers, body: bytes,
                 path: str) -> WorkerError | None:
        return classify_answer(status, headers, body, self._redact, path)

    async def aclose(self) -> None:
        await self._transport.aclose()
