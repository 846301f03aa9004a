"""The Userpilot edge: one Track request, and the one place HTTP outcomes are classified.

`classify` turns a status into what happens next (see consumer.errors); `UserpilotClient`
maps transport failures the same way. Nothing else in the package looks at a status code.
Error messages carry the status, Userpilot's x-request-id and a truncated body, never a
header we sent, so the token cannot leak through an exception.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC

import httpx

from consumer.errors import (
    ConnectionFailed,
    Misconfigured,
    RateLimited,
    Rejected,
    ServerError,
    Timeout,
    WorkerError,
)
from consumer.transport import StreamTransport

__all__ = ["Response", "UserpilotClient", "classify", "parse_retry_after"]

BODY_LIMIT = 1024
USER_AGENT = "userpilot-delivery-worker"
MAX_RETRY_AFTER_S = 600.0


@dataclass(frozen=True)
class Response:
    """What came back, as plain data (for metrics and logs)."""

    status: int
    elapsed_s: float
    request_id: str


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP date), capped; else None."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:  # HTTP dates are always GMT, whatever the local zone
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds != seconds:  # NaN
        return None
    return max(0.0, min(seconds, MAX_RETRY_AFTER_S))


def classify(status: int, headers: Mapping[str, str], body: str) -> WorkerError | None:
    """None when delivered (202, or any 2xx); otherwise the exception that says what next."""
    if 200 <= status < 300:
        return None
    rid = headers.get("x-request-id", "")
    snippet = body[:BODY_LIMIT]
    where = f"HTTP {status}" + (f" (x-request-id {rid})" if rid else "")
    if status == 429:
        return RateLimited(
            f"{where}: rate limited", status=status, body=snippet,
            retry_after=parse_retry_after(headers.get("retry-after")),
        )
    if status == 408 or 500 <= status <= 599:
        return ServerError(
            f"{where}: Userpilot error, will retry", status=status, body=snippet,
            retry_after=parse_retry_after(headers.get("retry-after")),
        )
    if status in (401, 403):
        return Misconfigured(
            f"{where}: token refused; use the application write token, not the read/export "
            "token (USERPILOT_API_KEY)", status=status, body=snippet,
        )
    if status == 404:
        return Misconfigured(
            f"{where}: not found; check USERPILOT_ANALYTICS_ENDPOINT (host only, e.g. "
            "analytex.userpilot.io or analytex-eu.userpilot.io)", status=status, body=snippet,
        )
    if 400 <= status <= 499:
        return Rejected(f"{where}: payload rejected", status=status, body=snippet)
    if 300 <= status <= 399:
        # Never followed (the token must not travel to another host); no event can succeed.
        return Misconfigured(
            f"{where}: redirected to {headers.get('location', '?')[:200]}; check "
            "USERPILOT_ANALYTICS_ENDPOINT (host only) and USERPILOT_INSECURE_HTTP",
            status=status, body=snippet,
        )
    return Rejected(f"{where}: unexpected response", status=status, body=snippet)


class UserpilotClient:
    """Async HTTP client for /v1/track: httpx's API over the lean `StreamTransport`.

    httpx's default pool slows down as it grows (measured here against the sandbox at 64
    concurrent requests: 165 requests/s with one 64-connection pool, ~1,400/s with 64
    one-connection clients, ~4,500/s with StreamTransport; encode/httpx#3215).
    """

    def __init__(
        self, url: str, headers: Mapping[str, str], *, timeout_s: float,
        max_connections: int, transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._url = httpx.URL(url)
        self._headers = httpx.Headers({"User-Agent": USER_AGENT, **headers})
        self._timeout = httpx.Timeout(timeout_s).as_dict()
        self._transport = transport or StreamTransport(max_connections)

    async def _post(self, body: bytes) -> httpx.Response:
        # The request is built directly and handed to the transport: AsyncClient's per-call
        # machinery (cookies, auth flow, redirects, URL merging) is a third of the CPU per
        # event and does nothing for one fixed POST.
        request = httpx.Request("POST", self._url, headers=self._headers, content=body,
                                extensions={"timeout": self._timeout})
        response = await self._transport.handle_async_request(request)
        try:
            await response.aread()
        finally:
            await response.aclose()
        return response

    async def track(self, body: bytes) -> Response:
        """POST one payload; returns on 2xx, raises the classified exception otherwise."""
        start = time.perf_counter()
        try:
            response = await self._post(body)
        except httpx.TimeoutException as exc:
            raise Timeout(f"no answer from Userpilot in time ({type(exc).__name__})") from None
        except (httpx.TransportError, OSError) as exc:
            raise ConnectionFailed(
                f"connection to Userpilot failed ({type(exc).__name__})"
            ) from None
        except httpx.HTTPError as exc:  # e.g. a body httpx cannot decode: a broken answer
            raise ServerError(f"unusable answer from Userpilot ({type(exc).__name__})") \
                from None
        elapsed = time.perf_counter() - start
        status = response.status_code
        if 200 <= status < 300:  # the common case: no need to decode the body
            return Response(status, elapsed, response.headers.get("x-request-id", ""))
        problem = classify(status, response.headers, response.text)
        if problem is not None:
            raise problem
        return Response(response.status_code, elapsed, response.headers.get("x-request-id", ""))

    async def aclose(self) -> None:
        await self._transport.aclose()
