"""Unit tests for consumer.delivery: status classification and the Track client (MockTransport)."""

from __future__ import annotations

import asyncio
import email.utils
import json
import ssl
import time
from collections.abc import Callable

import httpx
import pytest
from httpx_aiohttp import AiohttpTransport

from consumer.delivery import (
    BODY_LIMIT,
    MAX_RETRY_AFTER_S,
    REQUEST_REFUSED,
    UserpilotClient,
    classify,
    parse_retry_after,
)
from consumer.errors import (
    ConnectionFailed,
    DeadLetter,
    Misconfigured,
    Pause,
    RateLimited,
    Refused,
    Rejected,
    Retry,
    ServerError,
    Timeout,
    WorkerError,
)

TOKEN = "wt_9f8e7d6c5b4a3210"
URL = "https://analytex.userpilot.io/v1/track"
HEADERS = {
    "Content-Type": "application/json",
    "Authorization": f"Token {TOKEN}",
    "X-API-Version": "2020-09-22",
}
BODY = b'{"user_id":"user_001","event_name":"feature_used","metadata":{"feature":"export_csv"}}'
NOW = 1_714_560_000.0


def h(**values: str) -> httpx.Headers:
    return httpx.Headers({k.replace("_", "-"): v for k, v in values.items()})


# ------------------------------------------------------------------ classify


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
def test_2xx_is_delivered(status: int) -> None:
    assert classify(status, h(), "") is None


@pytest.mark.parametrize("status", [400, 409, 412, 413, 418, 422, 451, 499])
def test_payload_problems_are_rejected(status: int) -> None:
    exc = classify(status, h(x_request_id="rid-1"), '{"error":"bad"}')
    assert isinstance(exc, Rejected)
    assert isinstance(exc, DeadLetter)
    assert exc.status == status
    assert exc.body == '{"error":"bad"}'
    assert str(exc) == f"HTTP {status} (x-request-id rid-1): payload rejected"


@pytest.mark.parametrize(("status", "hint"), [
    (401, "write token"), (403, "write token"), (404, "USERPILOT_ANALYTICS_ENDPOINT"),
    (431, "USERPILOT_API_KEY"),  # the head is the worker's own, every event's (config53)
])
def test_configuration_problems_pause(status: int, hint: str) -> None:
    exc = classify(status, h(), "nope")
    assert isinstance(exc, Misconfigured)
    assert isinstance(exc, Pause)
    assert exc.status == status
    assert hint in str(exc)
    assert TOKEN not in str(exc)
    assert "x-request-id" not in str(exc)  # only when Userpilot sent one


@pytest.mark.parametrize("status", sorted(REQUEST_REFUSED | {402}))
def test_a_status_about_the_request_itself_pauses_instead_of_dead_lettering(
        status: int) -> None:
    """Review "r54": 405, 410, 411, 414, 415, 426 (the method, path, length, URI, content
    type, protocol: the worker's own, every event's) and 402 (the account) were payload
    rejections: every event was dead-lettered until the DLQ guard stopped the worker. A
    refusal: delivery pauses, and `policy` dead-letters an event only when others pass."""
    exc = classify(status, h(), "nope", path="/v1/track")
    assert isinstance(exc, Refused) and isinstance(exc, Pause)
    assert not isinstance(exc, DeadLetter)
    assert exc.status == status and exc.body == "nope"
    assert f"HTTP {status} from /v1/track" in str(exc)
    hint = "plan and billing" if status == 402 else "USERPILOT_ANALYTICS_ENDPOINT"
    assert hint in str(exc)


def test_only_userpilots_refusals_may_be_about_one_event() -> None:
    """A proxy's 407, a 431 and a redirect are about settings whatever else passes: not
    `Refused`, which `policy` may turn into a dead letter when other events pass."""
    for status in (407, 431, 302):
        exc = classify(status, h(location="https://x.example/"), "")
        assert isinstance(exc, Misconfigured) and not isinstance(exc, Refused)
    for status in (401, 403, 404):
        assert isinstance(classify(status, h(), ""), Refused)


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_redirects_pause_instead_of_dead_lettering_every_event(status: int) -> None:
    """A redirect means the endpoint or scheme is wrong: no event can succeed."""
    exc = classify(status, h(location="https://elsewhere.example/v1/track"), "")
    assert isinstance(exc, Misconfigured)
    assert "USERPILOT_ANALYTICS_ENDPOINT" in str(exc)
    assert "redirected to https://elsewhere.example/v1/track;" in str(exc)


def test_a_3xx_without_a_location_is_not_called_a_redirect_to_nowhere() -> None:
    """Review http54: a 304 (no Location) read "redirected to ?"."""
    exc = classify(304, h(), "")
    assert isinstance(exc, Misconfigured)
    assert "HTTP 304 with no Location; check USERPILOT_ANALYTICS_ENDPOINT" in str(exc)
    assert "redirected" not in str(exc)


@pytest.mark.parametrize("status", [408, 500, 502, 503, 504, 599])
def test_server_errors_retry(status: int) -> None:
    exc = classify(status, h(), "oops")
    assert isinstance(exc, ServerError)
    assert isinstance(exc, Retry)
    assert exc.status == status
    assert exc.retry_after is None


@pytest.mark.parametrize("status", [0, 99, 100, 101, 199, 600, 999])
def test_statuses_outside_http_classes_retry_and_never_dead_letter(status: int) -> None:
    """A final 1xx or a non-HTTP status says nothing about the payload: a broken proxy or
    gateway answering every request so must not send every event to the DLQ."""
    exc = classify(status, h(), "?")
    assert isinstance(exc, ServerError)
    assert not isinstance(exc, DeadLetter)


def test_503_with_retry_after() -> None:
    exc = classify(503, h(retry_after="7"), "")
    assert isinstance(exc, ServerError)
    assert exc.retry_after == 7.0


@pytest.mark.parametrize(("headers", "expected"), [
    (h(), None),
    (h(retry_after="30"), 30.0),
    (h(Retry_After="2.5"), 2.5),
    (h(retry_after="0"), 0.0),
    (h(retry_after="later"), None),
])
def test_429_is_rate_limited(headers: httpx.Headers, expected: float | None) -> None:
    exc = classify(429, headers, "slow down")
    assert isinstance(exc, RateLimited)
    assert exc.status == 429
    assert exc.retry_after == expected
    assert exc.cause == "rate_limited"


def test_429_with_an_http_date() -> None:
    when = email.utils.formatdate(time.time() + 120, usegmt=True)
    exc = classify(429, h(retry_after=when), "")
    assert isinstance(exc, RateLimited)
    assert exc.retry_after is not None
    assert 115 <= exc.retry_after <= 120


def test_body_is_truncated() -> None:
    exc = classify(400, h(), "x" * 5000)
    assert isinstance(exc, Rejected)
    assert exc.body == "x" * BODY_LIMIT


def test_retry_causes_label_metrics() -> None:
    causes = {type(classify(s, h(), "")).__name__: getattr(classify(s, h(), ""), "cause", None)
              for s in (429, 503)}
    assert causes == {"RateLimited": "rate_limited", "ServerError": "server_error"}


# ------------------------------------------------------------------ parse_retry_after


@pytest.mark.parametrize(("value", "expected"), [
    (None, None),
    ("", None),
    ("   ", None),
    ("5", 5.0),
    (" 5 ", 5.0),
    ("1.5", 1.5),
    ("-3", None),  # not HTTP's delta-seconds (ASCII digits): the backoff (review outage49)
    ("0", 0.0),
    ("601", MAX_RETRY_AFTER_S),
    ("1e9", None),
    ("9" * 400, MAX_RETRY_AFTER_S),  # float() is inf: saturated, not ignored (diff49b)
    ("inf", None),  # not a number of seconds: the backoff, not a 600 s hold (review http33)
    ("1e400", None),
    ("-inf", None),
    ("nan", None),
    ("soon", None),
    ("5 seconds", None),
    (email.utils.formatdate(NOW + 120, usegmt=True), 120.0),
    (email.utils.formatdate(NOW - 120, usegmt=True), 0.0),
    (email.utils.formatdate(NOW + 86400, usegmt=True), MAX_RETRY_AFTER_S),
    ("Wed, 01 May 2024 10:42:00 GMT", 120.0),  # NOW is 2024-05-01T10:40:00Z
    ("Wednesday, 01-May-24 10:42:00 GMT", 120.0),  # obsolete RFC 850 form, still valid
    ("Wed May  1 10:42:00 2024", 120.0),  # asctime form (no zone: read as UTC)
])
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    result = parse_retry_after(value, now=NOW)
    if expected is None:
        assert result is None
    else:
        assert result == pytest.approx(expected)


@pytest.mark.parametrize("value", ["Wed May  1 10:42:00 2024", "Wed, 01 May 2024 10:42:00 -0000"])
def test_dates_without_a_zone_are_gmt_whatever_the_local_zone(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    try:
        assert parse_retry_after(value, now=NOW) == pytest.approx(120.0)
    finally:
        monkeypatch.undo()
        time.tzset()


def test_parse_retry_after_uses_the_wall_clock_by_default() -> None:
    future = email.utils.formatdate(usegmt=True)  # now, to the second
    result = parse_retry_after(future)
    assert result is not None
    assert 0.0 <= result <= 1.0


@pytest.mark.parametrize("skew", [-900.0, -300.0, 0.0, 30.0])
def test_a_retry_after_date_counts_from_the_answers_date_not_this_clock(
        skew: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review "clock53": the date is on the server's clock. A worker behind Userpilot's
    clock added the skew to each 429's wait (up to the 600 s cap); one ahead retried at
    once."""
    server_now = NOW
    headers = {"retry-after": email.utils.formatdate(server_now + 10, usegmt=True),
               "date": email.utils.formatdate(server_now, usegmt=True)}
    monkeypatch.setattr(time, "time", lambda: server_now + skew)
    for status in (429, 503):
        error = classify(status, headers, "")
        assert error is not None
        assert getattr(error, "retry_after", None) == pytest.approx(10.0)


def test_the_client_counts_a_retry_after_date_from_the_answers_date() -> None:
    """Review "diff53a": the client passed `classify` the quoted headers without `Date`,
    so the fix above never ran in the worker."""
    server_now = time.time() + 300  # Userpilot's clock 5 minutes ahead of this one

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(429, headers={
            "retry-after": email.utils.formatdate(server_now + 10, usegmt=True),
            "date": email.utils.formatdate(server_now, usegmt=True)})

    delivered, exc = call(handler)
    assert not delivered and isinstance(exc, RateLimited)
    assert exc.retry_after == pytest.approx(10.0, abs=1.5)


@pytest.mark.parametrize("date", [None, "", "yesterday", "Wed, 01 May 99999 10:40:00 GMT",
                                  "Wed, 21 Oct 9999999999999999999999 07:28:00 GMT"])
def test_a_retry_after_date_counts_from_this_clock_without_a_usable_date(
        date: str | None) -> None:
    value = email.utils.formatdate(NOW + 120, usegmt=True)
    assert parse_retry_after(value, now=NOW, date=date) == pytest.approx(120.0)


# ------------------------------------------------------------------ UserpilotClient

Handler = Callable[[httpx.Request], httpx.Response]


def call(handler: Handler, body: bytes = BODY) -> tuple[bool, Exception | None]:
    """(delivered, the classified exception)."""
    async def main() -> tuple[bool, Exception | None]:
        client = UserpilotClient(URL, HEADERS, timeout_s=5.0, max_connections=4,
                                 transport=httpx.MockTransport(handler))
        try:
            await client.track(body)
            return True, None
        except WorkerError as exc:
            return False, exc
        finally:
            await client.aclose()

    return asyncio.run(main())


def test_sends_exactly_the_headers_and_body() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(202, headers={"x-request-id": "rid-9"})

    delivered, error = call(handler)
    assert error is None
    assert delivered
    (request,) = seen
    assert request.method == "POST"
    assert str(request.url) == URL
    assert request.content == BODY
    assert json.loads(request.content) == {
        "user_id": "user_001", "event_name": "feature_used",
        "metadata": {"feature": "export_csv"}}
    for name, value in HEADERS.items():
        assert request.headers.get_list(name) == [value]
    assert request.headers["content-length"] == str(len(BODY))
    unexpected = set(request.headers) - {k.lower() for k in HEADERS} - {
        "host", "accept", "accept-encoding", "connection", "user-agent", "content-length"}
    assert unexpected == set()


@pytest.mark.parametrize(("status", "expected"), [
    (400, Rejected), (413, Rejected), (401, Refused), (404, Refused), (405, Refused),
    (429, RateLimited), (500, ServerError), (503, ServerError), (302, Misconfigured),
    (407, Misconfigured),
])
def test_error_statuses_raise_the_classified_exception(
    status: int, expected: type[Exception]
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, headers={"retry-after": "3", "location": "https://x/"},
                              text="error body")

    delivered, error = call(handler)
    assert not delivered
    assert type(error) is expected
    assert TOKEN not in str(error)
    assert TOKEN not in repr(error)
    if isinstance(error, RateLimited):
        assert error.retry_after == 3.0


def test_redirects_are_not_followed() -> None:
    hosts: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        hosts.append(request.url.host)
        return httpx.Response(307, headers={"location": "https://evil.example/v1/track"})

    _, error = call(handler)
    assert hosts == ["analytex.userpilot.io"]  # the token never travelled to evil.example
    assert isinstance(error, Misconfigured)


@pytest.mark.parametrize("exc", [
    httpx.ConnectTimeout("connect timed out"),
    httpx.ReadTimeout("read timed out"),
    httpx.WriteTimeout("write timed out"),
    httpx.PoolTimeout("pool timed out"),
])
def test_timeouts(exc: Exception) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    _, error = call(handler)
    assert isinstance(error, Timeout)
    assert type(exc).__name__ in str(error)


@pytest.mark.parametrize("exc", [
    httpx.ConnectError("[Errno 111] Connection refused"),
    httpx.ReadError("connection reset by peer"),
    httpx.RemoteProtocolError("server disconnected"),
    OSError("network unreachable"),
])
def test_connection_failures(exc: Exception) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    _, error = call(handler)
    assert isinstance(error, ConnectionFailed)
    assert error.__cause__ is None  # the httpx exception (and its request) is not chained


def test_transport_error_messages_never_include_the_token() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(f"failed with headers {request.headers}")

    _, error = call(handler)
    assert isinstance(error, ConnectionFailed)
    assert TOKEN not in str(error)
    assert TOKEN not in repr(error)
    # `from None`: tracebacks and log.exception never print the httpx error's message.
    assert error.__cause__ is None
    assert error.__suppress_context__ is True


def test_client_reuses_one_pool_for_many_requests() -> None:
    count = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal count
        count += 1
        return httpx.Response(202)

    async def main() -> None:
        client = UserpilotClient(URL, HEADERS, timeout_s=5.0, max_connections=2,
                                 transport=httpx.MockTransport(handler))
        try:
            await asyncio.gather(*(client.track(BODY) for _ in range(20)))
        finally:
            await client.aclose()

    asyncio.run(main())
    assert count == 20


@pytest.mark.parametrize("status", [400, 401, 500])
def test_an_echoed_token_never_reaches_the_exception(status: int) -> None:
    """A gateway quoting the request back (raw or JSON-escaped) in its error body."""
    token = HEADERS["Authorization"].split()[-1]

    def handler(request: httpx.Request) -> httpx.Response:
        sent = request.headers["authorization"]
        echo = f'{{"error":"bad","request":{{"authorization":"{sent}"}}}}'
        return httpx.Response(status, text=echo + " token=" + token)

    delivered, exc = call(handler)
    assert not delivered and exc is not None
    body = getattr(exc, "body", "")
    assert "***" in body
    assert token not in body and token not in str(exc)
    assert token[:12] not in body


@pytest.mark.parametrize(("url", "proxy", "loaded"), [
    ("https://analytex.userpilot.io/v1/track", None, True),
    ("http://127.0.0.1:8090/v1/track", None, False),
    ("http://127.0.0.1:8090/v1/track", "https://proxy.corp:3128", True),
    ("http://127.0.0.1:8090/v1/track", "http://proxy.corp:3128", False),
])
def test_the_ca_store_is_loaded_only_when_a_connection_can_use_tls(
        url: str, proxy: str | None, loaded: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # certifi's store costs ~2.5 MB of RSS; for plain HTTP the context trusts nothing.
    # (A CA directory, SSL_CERT_DIR, is read lazily: counted CAs would say nothing.)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    client = UserpilotClient(url, {}, timeout_s=1.0, max_connections=1, proxy=proxy)
    transport = client._transport
    assert isinstance(transport, AiohttpTransport)
    context = transport.ssl_context
    assert (context.cert_store_stats()["x509_ca"] > 0) is loaded
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname


@pytest.mark.parametrize("raised", [
    UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
    ValueError("Invalid header value"),
    AssertionError("parser state"),
    LookupError("unknown encoding"),
], ids=["unicode", "value", "assertion", "lookup"])
def test_whatever_the_transport_raises_is_a_server_error(raised: Exception) -> None:
    """The libraries raise more than their documented errors for an odd answer; one that
    was not a WorkerError stopped the worker (exit 1), again after every restart."""
    def handler(request: httpx.Request) -> httpx.Response:
        raise raised

    delivered, exc = call(handler)
    assert not delivered and isinstance(exc, ServerError)
    assert type(raised).__name__ in str(exc)


@pytest.mark.parametrize("status", [408, 500, 503, 599, 600, 199])
def test_a_transient_answer_s_text_promises_no_retry(status: int) -> None:
    """The text ends up in the dead letter of an event whose retries ran out: "will retry"
    there told the operator the opposite of what happened (review "ops29"). The retry log
    line says "retrying:" itself."""
    from consumer.delivery import classify
    from consumer.errors import Retry

    error = classify(status, {}, "")
    assert isinstance(error, Retry)
    assert "retry" not in str(error) and "transient" in str(error)


def test_a_refusal_names_the_path_it_came_from() -> None:
    """One endpoint refusing while the others take the same token read as a wrong token
    everywhere (review "http33"): the refusal names the request's path; without one (the
    proxy's tunnel, `delete-users`) the message is as before."""
    exc = classify(403, h(x_request_id="rid-1"), "", "/v1/companies/identify")
    assert isinstance(exc, Misconfigured)
    assert str(exc).startswith(
        "HTTP 403 from /v1/companies/identify (x-request-id rid-1): token refused")
    assert str(classify(403, h(x_request_id="rid-1"), "")).startswith(
        "HTTP 403 (x-request-id rid-1): token refused")
    rejected = classify(400, h(), "", "/v1/track")
    assert str(rejected) == "HTTP 400: payload rejected", "a payload's rejection as before"


def test_quoted_headers_are_escaped_for_the_commands_that_print_them() -> None:
    """Review "logsec52": `check-config --online` and `delete-users` print the refusal as it
    is; an x-request-id or a Location holding a terminal's escapes or a line break wrote
    them to the operator's terminal."""
    from consumer.delivery import classify_answer

    headers = httpx.Headers([(b"x-request-id", "rid\x1b[31mRED\x1b[0m\u202e".encode()),
                             (b"location", b"http://evil/\x1b]0;PWNED\x07")])
    exc = classify_answer(302, headers, b"", lambda text: text, "/v1/track")
    assert exc is not None
    text = str(exc)
    assert "\x1b" not in text and "\u202e" not in text and "\x07" not in text
    assert "rid\\x1b[31mRED\\x1b[0m\\u202e" in text


def test_a_block_page_past_a_long_head_is_quoted_by_its_reason_and_redacted() -> None:
    """Round 59's "noticed": an answer keeps 1,024 characters, which a block page's head and
    stylesheet filled (Squid's), so its reason never reached `/readyz` or the pause line.
    A page is read further and its unseen parts blanked before the cut; an echoed token
    past the first 1,024 characters is masked all the same. JSON is cut as before."""
    from consumer.answers import BODY_LIMIT
    from consumer.delivery import classify_answer
    from consumer.policy import quoting
    from consumer.redaction import MASK

    rules = "".join(f" #e{i} {{ margin: {i}px; }}" for i in range(200))
    page = ("<!DOCTYPE html><html><head><title>Blocked</title><style>" + rules
            + "</style></head><body><p>Policy forbids api.userpilot.io for this client; "
            + f"request Authorization: Token {TOKEN}</p></body></html>")
    assert page.index("Policy forbids") > BODY_LIMIT
    headers = httpx.Headers({"content-type": "text/html; charset=utf-8"})
    exc = classify_answer(403, headers, page.encode(), lambda t: t.replace(TOKEN, MASK),
                          "/v1/track")
    assert exc is not None
    said = quoting(exc)
    assert "refused with an HTML page" in str(exc), exc
    assert "Blocked: Policy forbids api.userpilot.io" in said, said
    assert TOKEN not in said and TOKEN not in (getattr(exc, "body", "") or "")
    assert len(getattr(exc, "body", "") or "") <= BODY_LIMIT
    json_body = ('{"error": "' + "x" * 2000 + '"}').encode()
    cut = classify_answer(400, httpx.Headers({"content-type": "application/json"}),
                          json_body, lambda t: t, "/v1/track")
    assert cut is not None and getattr(cut, "body", "") == json_body.decode()[:BODY_LIMIT]


def test_a_json_answer_quoting_html_is_kept_as_it_is() -> None:
    """Review "diff60": a JSON 400 whose details quote an event's `<html><!-- ...` value was
    taken for a page and blanked from the comment on: its error code and message were lost
    from the dead letter."""
    from consumer.delivery import classify_answer

    body = ('{"errors": [{"details": "metadata.template: \'<html><!-- header\'", '
            '"error_code": "INVALID_METADATA", "message": "bad value"}]}')
    exc = classify_answer(400, httpx.Headers({"content-type": "application/json"}),
                          body.encode(), lambda t: t, "/v1/track")
    assert exc is not None and getattr(exc, "body", "") == body
