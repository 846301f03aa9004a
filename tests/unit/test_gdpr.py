"""Unit tests for consumer.gdpr: reading ids, batching, pacing, retries, the command line."""

from __future__ import annotations

import argparse
import io
import itertools
import json
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer.__main__ import build_parser
from consumer.errors import (
    ConfigError,
    ConnectionFailed,
    Misconfigured,
    RateLimited,
    Refused,
    Rejected,
    ServerError,
    TlsRefused,
)
from consumer.gdpr import (
    DEFAULT_BATCH_SIZE,
    DeleteClient,
    Pacer,
    Summary,
    _client_from_env,
    batches,
    delete_body,
    delete_users,
    main,
    padded,
    read_json_ids,
    read_user_ids,
)
from tests.unit.test_reach import answering

TOKEN = "secret-write-token-123"
ENV = {"USERPILOT_API_KEY": TOKEN, "USERPILOT_ANALYTICS_ENDPOINT": "sandbox.test",
       "USERPILOT_RETRY_BACKOFF_SECONDS": "0.5"}


class FakeTime:
    """A clock that only moves when something sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class FakeSend:
    """Answers from a script: an exception to raise, or a request id to return."""

    def __init__(self, time: FakeTime, script: list[Any], latency: float = 0.1) -> None:
        self.time = time
        self.script = list(script)
        self.latency = latency
        self.sent: list[tuple[float, list[str]]] = []

    def __call__(self, body: bytes) -> str:
        self.sent.append((self.time.now, json.loads(body)["users"]))
        self.time.now += self.latency
        outcome = self.script.pop(0) if self.script else "x-request-id rid"
        if isinstance(outcome, Exception):
            raise outcome
        return str(outcome)


def run(ids: list[str], script: list[Any], *, size: int = 2, interval: float = 2.0,
        attempts: int = 5) -> tuple[Summary, FakeSend, FakeTime, list[str]]:
    time = FakeTime()
    send = FakeSend(time, script)
    lines: list[str] = []
    summary = delete_users(ids, send, batch_size=size,
                           pacer=Pacer(interval, clock=time.clock, sleep=time.sleep),
                           attempts=attempts, backoff_s=1.0, backoff_max_s=8.0,
                           log=lines.append)
    return summary, send, time, lines


# ---------------------------------------------------------------------------- pure parts


def test_read_user_ids_keeps_ids_as_written_skips_blanks_dedupes_and_drops_a_bom() -> None:
    """Not stripped: the worker sends userId exactly as the event carries it, so
    "carol\u00a0" is not carol (stripping deleted another user, or none, and reported
    it deleted; review "gdpr16")."""
    lines = ["\ufeffu1\n", "  u2  \r\n", "\n", "   \n", "u1\n", "carol\u00a0\n", "u3"]
    assert read_user_ids(lines) == ["u1", "\ufeffu1", "  u2  ", "carol\u00a0", "u3"]
    assert padded(read_user_ids(lines)) == 3


def test_batches_keep_order_and_size() -> None:
    assert batches(["a", "b", "c", "d", "e"], 2) == [["a", "b"], ["c", "d"], ["e"]]
    assert batches([], 3) == []
    with pytest.raises(ValueError):
        batches(["a"], 0)


@given(st.lists(st.text(min_size=1, max_size=4), max_size=50), st.integers(1, 12))
def test_batches_partition_the_ids(ids: list[str], size: int) -> None:
    groups = batches(ids, size)
    assert [u for g in groups for u in g] == ids
    assert all(1 <= len(g) <= size for g in groups)
    assert len(groups) == -(-len(ids) // size)


def test_delete_body_is_the_documented_shape() -> None:
    assert delete_body(["a", "é"]) == '{"users":["a","é"]}'.encode()


def test_default_batch_size() -> None:
    assert DEFAULT_BATCH_SIZE == 1_000


def test_pacer_waits_the_interval_from_the_last_answer() -> None:
    time = FakeTime()
    pacer = Pacer(2.0, clock=time.clock, sleep=time.sleep)
    pacer.wait()
    assert time.sleeps == []  # the first request goes at once
    time.now = 10.0
    pacer.answered()
    time.now = 10.5
    pacer.wait()
    assert time.sleeps == [1.5] and time.now == 12.0
    time.now = 20.0
    pacer.wait()
    assert time.sleeps == [1.5]  # already long enough ago


# ---------------------------------------------------------------------------- the run


def test_batches_are_sent_in_order_at_least_the_interval_apart() -> None:
    summary, send, _, lines = run(["a", "b", "c", "d", "e"], [])
    assert [users for _, users in send.sent] == [["a", "b"], ["c", "d"], ["e"]]
    starts = [t for t, _ in send.sent]
    # each request starts ≥ 2 s after the previous answer (start + 0.1 s latency)
    assert all(b - a >= 2.0 + 0.1 - 1e-9 for a, b in itertools.pairwise(starts))
    assert summary == Summary(requested=5, batches_sent=3, deleted=5, failed=0)
    assert summary.ok
    assert summary.line() == "users requested 5, batches sent 3, deleted 5, failed 0"
    assert lines[0] == "batch 1/3 (2 users): scheduled for deletion (x-request-id rid)"


def test_429_and_5xx_are_retried_with_backoff_and_still_paced() -> None:
    script = [RateLimited("HTTP 429", status=429), ServerError("HTTP 503", status=503), "ok"]
    summary, send, time, _ = run(["a"], script)
    assert len(send.sent) == 3 and summary.deleted == 1 and summary.ok
    starts = [t for t, _ in send.sent]
    assert all(b - a >= 2.1 - 1e-9 for a, b in itertools.pairwise(starts))
    assert time.sleeps[0] >= 1.0  # backoff slept, then the pacer tops up to the interval


def test_retry_after_is_honoured_when_longer_than_backoff() -> None:
    summary, send, _, _ = run(["a"], [RateLimited("HTTP 429", status=429, retry_after=7.0)])
    starts = [t for t, _ in send.sent]
    assert starts[1] - starts[0] >= 7.0 + 0.1 - 1e-9 and summary.ok


def test_a_rejected_batch_fails_and_the_rest_go_on() -> None:
    why = '{"errors":[{"message":"Invalid user id in users[1]"}]}'
    summary, send, _, lines = run(["a", "b", "c"],
                                  [Rejected("HTTP 400: bad", status=400, body=why)])
    assert [users for _, users in send.sent] == [["a", "b"], ["c"]]
    assert (summary.deleted, summary.failed, summary.batches_sent) == (1, 2, 2)
    assert not summary.ok
    assert "gave up after 1 attempt(s): HTTP 400: bad" in lines[0]
    assert "Invalid user id in users[1]" in lines[0], "Userpilot's reason is shown"


def test_retries_keep_to_the_budget_and_each_wait_is_logged() -> None:
    """USERPILOT_RETRY_BUDGET_SECONDS was ignored: with Retry-After honoured, one batch
    could wait for hours without a line (review "gdpr16")."""
    busy = [ServerError("HTTP 503", status=503, retry_after=5.0)] * 20
    time = FakeTime()
    send = FakeSend(time, busy)
    lines: list[str] = []
    summary = delete_users(["a"], send, batch_size=1,
                           pacer=Pacer(2.0, clock=time.clock, sleep=time.sleep),
                           attempts=12, backoff_s=1.0, backoff_max_s=8.0, budget_s=12.0,
                           log=lines.append)
    assert summary.failed == 1
    assert 1 < len(send.sent) < 12
    assert send.sent[-1][0] <= 12.0, "no attempt starts past the budget"
    waits = [line for line in lines if "next in 5.0 s" in line]
    assert len(waits) == len(send.sent) - 1
    assert "attempt 1/12: HTTP 503" in waits[0]
    assert "gave up after" in lines[-1]


def test_retries_are_bounded() -> None:
    script = [ServerError("HTTP 500", status=500)] * 10
    summary, send, _, _ = run(["a"], script, attempts=3)
    assert len(send.sent) == 3 and summary.failed == 1


def test_a_refused_token_stops_the_run() -> None:
    script = [Refused("HTTP 401: token refused", status=401)]
    summary, send, _, lines = run(["a", "b", "c", "d", "e"], script)
    assert len(send.sent) == 1
    assert (summary.deleted, summary.failed, summary.batches_sent) == (0, 5, 1)
    assert summary.aborted and not summary.ok
    assert "stopping" in lines[0]


# ---------------------------------------------------------------------------- HTTP edge


def test_delete_client_sends_delete_with_headers_and_classifies() -> None:
    seen: list[httpx.Request] = []
    answers = iter([httpx.Response(202, headers={"x-request-id": "r1"}),
                    httpx.Response(429, text='{"errors":[]}'),
                    httpx.Response(401, text="no")])

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return next(answers)

    client = DeleteClient("https://h.test/v1/users",
                          {"Authorization": f"Token {TOKEN}", "X-API-Version": "2020-09-22",
                           "Content-Type": "application/json"},
                          timeout_s=5, transport=httpx.MockTransport(handler))
    assert client.delete(b'{"users":["a"]}') == "x-request-id r1"
    assert seen[0].method == "DELETE" and seen[0].url.path == "/v1/users"
    assert seen[0].content == b'{"users":["a"]}'
    assert seen[0].headers["authorization"] == f"Token {TOKEN}"
    with pytest.raises(RateLimited):
        client.delete(b'{"users":["a"]}')
    with pytest.raises(Misconfigured) as refused:
        client.delete(b'{"users":["a"]}')
    assert TOKEN not in str(refused.value)
    client.close()


def test_a_2xx_answers_request_id_and_message_are_escaped() -> None:
    """Reviews "logsec52", "diff52a": the success line quoted the x-request-id and
    Userpilot's `message` with a terminal's escapes and bidirectional controls as they were."""
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(202, json={"message": "queued\x1b]0;PWNED\x07\x1b[2J\u202eevil"},
                              headers=[(b"x-request-id", b"rid\x1b[31m")])

    client = DeleteClient("https://h.test/v1/users", {"Authorization": f"Token {TOKEN}"},
                          timeout_s=5, transport=httpx.MockTransport(handler))
    said = client.delete(b'{"users":["a"]}')
    assert said == ("x-request-id rid\\x1b[31m; Userpilot: queued\\x1b]0;PWNED\\x07\\x1b[2J"
                    "\\u202eevil")
    client.close()


@pytest.mark.parametrize("status", [401, 302, 407])
def test_an_answer_echoing_the_request_quotes_no_token_or_proxy_credential(status: int) -> None:
    """Review secrets18: delete-users printed an echoed request's Authorization, a
    redirect's Location and a proxy's Proxy-Authorization raw (the worker masked them)."""
    import base64

    pair = "puser:S3CR3T-PROXY-pw"
    echo = (f"refused\nAuthorization: Token {TOKEN}\n"
            f"Proxy-Authorization: Basic {base64.b64encode(pair.encode()).decode()}")

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, text=echo, headers={
            "location": f"https://login.test/?auth=Token%20{TOKEN}",
            "x-request-id": f"r-{TOKEN}"})

    client = DeleteClient("https://h.test/v1/users", {"Authorization": f"Token {TOKEN}"},
                          timeout_s=5, transport=httpx.MockTransport(handler),
                          proxy=f"http://{pair}@proxy.test:3128")
    with pytest.raises(Exception) as failed:
        client.delete(b"{}")
    text = f"{failed.value} {getattr(failed.value, 'body', '')}"
    assert TOKEN not in text and "S3CR3T-PROXY-pw" not in text
    assert base64.b64encode(pair.encode()).decode() not in text
    client.close()


def test_a_2xx_answer_echoing_the_token_in_its_request_id_does_not_print_it() -> None:
    """Review secrets34: the x-request-id of a 2xx went raw into the batch's success line;
    a gateway echoing the request put the token there (error answers were redacted)."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(202, headers={
            "x-request-id": f"req-1; auth={request.headers['authorization']}"})

    client = DeleteClient("https://h.test/v1/users", {"Authorization": f"Token {TOKEN}"},
                          timeout_s=5, transport=httpx.MockTransport(handler))
    try:
        said = client.delete(b"{}")
    finally:
        client.close()
    assert said.startswith("x-request-id req-1; auth=") and TOKEN not in said


def test_delete_client_maps_transport_failures() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    client = DeleteClient("https://h.test/v1/users", {}, timeout_s=5,
                          transport=httpx.MockTransport(handler))
    with pytest.raises(Exception) as failed:
        client.delete(b"{}")
    assert type(failed.value).__name__ == "ConnectionFailed"


@pytest.fixture
def refusing_proxy() -> Iterator[str]:
    """A proxy that answers every CONNECT with 407 (wrong proxy credentials)."""
    refusal = (b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic\r\n"
               b"Content-Length: 0\r\nConnection: close\r\n\r\n")
    with answering(refusal) as port:
        yield f"http://user:wrong@127.0.0.1:{port}"


def test_a_proxy_refusing_the_tunnel_stops_the_run(refusing_proxy: str) -> None:
    """httpx's own transport says 407 only in its ProxyError's text: delete-users read it
    as a connection failure, retried every batch 12 times and went on to the next batch,
    ~6 minutes a batch (review newcomer19). The worker's rule, shared: it stops."""
    client = DeleteClient("https://analytex.userpilot.io/v1/users", {"Authorization": "Token t"},
                          timeout_s=5, proxy=refusing_proxy)
    with pytest.raises(Misconfigured, match="407"):
        client.delete(b'{"users":["u"]}')
    now = [0.0]

    def sleep(s: float) -> None:
        now[0] += s

    lines: list[str] = []
    summary = delete_users(["u0", "u1", "u2"], client.delete, batch_size=1,
                           pacer=Pacer(2.0, clock=lambda: now[0], sleep=sleep),
                           attempts=12, log=lines.append)
    client.close()
    assert summary.aborted and summary.batches_sent == 1 and summary.deleted == 0
    assert now[0] < 60 and "wrong" not in " ".join(lines)


def test_a_proxy_that_cannot_reach_userpilot_is_named_without_a_tls_hint() -> None:
    """A proxy answering the tunnel with 502 failed before any TLS: the failure names it,
    and a CA-bundle hint beside it would send the operator the wrong way (review "http33",
    the worker's check-config rule, shared through `ConnectionFailed.before_tls`)."""
    refusal = (b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n"
               b"Connection: close\r\n\r\n")
    with answering(refusal) as port:
        client = DeleteClient("https://analytex.userpilot.io/v1/users",
                              {"Authorization": "Token t"}, timeout_s=5,
                              proxy=f"http://127.0.0.1:{port}")
        try:
            with pytest.raises(ConnectionFailed) as failed:
                client.delete(b'{"users":["u"]}')
        finally:
            client.close()
    assert "the proxy refused the tunnel (HTTP 502)" in str(failed.value)
    assert "USERPILOT_CA_BUNDLE" not in str(failed.value)


def test_a_proxy_that_never_answers_connect_is_named_in_the_timeout() -> None:
    """Round 59's "noticed": a proxy taking the connection and never answering CONNECT
    read as "no answer from Userpilot in time", the proxy unnamed."""
    import socket

    from consumer.errors import Timeout

    with socket.create_server(("127.0.0.1", 0)) as silent:  # the kernel takes connections
        client = DeleteClient("https://analytex.userpilot.io/v1/users",
                              {"Authorization": "Token t"}, timeout_s=0.3,
                              proxy=f"http://127.0.0.1:{silent.getsockname()[1]}")
        try:
            with pytest.raises(Timeout) as failed:
                client.delete(b'{"users":["u"]}')
        finally:
            client.close()
    assert "the proxy (HTTPS_PROXY or ALL_PROXY)" in str(failed.value), failed.value


def test_an_https_proxy_url_naming_a_plain_http_proxy_names_its_scheme() -> None:
    """Review "egress59": `HTTPS_PROXY=https://` naming a plain-HTTP proxy; check-config
    said to check the proxy URL's scheme, `delete-users` only the endpoint's port (its
    failures were classified as if there were no proxy)."""
    answer = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    with answering(answer) as port:
        client = DeleteClient("https://analytex.userpilot.io/v1/users",
                              {"Authorization": "Token t"}, timeout_s=5,
                              proxy=f"https://127.0.0.1:{port}")
        try:
            with pytest.raises(TlsRefused) as failed:
                client.delete(b'{"users":["u"]}')
        finally:
            client.close()
    assert "the proxy URL's scheme" in str(failed.value)


# ---------------------------------------------------------------------------- command line


def args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["delete-users", *argv])


@pytest.fixture
def streams() -> Iterator[tuple[io.StringIO, io.StringIO]]:
    yield io.StringIO(), io.StringIO()


def test_dry_run_reads_stdin_batches_and_sends_nothing(
    streams: tuple[io.StringIO, io.StringIO]
) -> None:
    out, err = streams
    code = main(args("--dry-run", "--batch-size", "2"), env=ENV,
                stdin=io.StringIO("a\nb\nc\n"), out=out, err=err)
    assert code == 0
    assert out.getvalue() == ("delete-users: users requested 3, batches sent 0, deleted 0, "
                              "failed 0 (dry run: nothing sent)\n")
    assert err.getvalue().count("would delete") == 2


def test_file_dash_means_stdin(streams: tuple[io.StringIO, io.StringIO]) -> None:
    out, err = streams
    main(args("--file", "-", "--dry-run"), env=ENV, stdin=io.StringIO("x\n"), out=out, err=err)
    assert "users requested 1," in out.getvalue()


def test_reads_a_file(tmp_path: Any, streams: tuple[io.StringIO, io.StringIO]) -> None:
    path = tmp_path / "ids.txt"
    path.write_text("u1\nu2\n", encoding="utf-8")
    out, err = streams
    main(args("--file", str(path), "--dry-run"), env=ENV, out=out, err=err)
    assert "users requested 2," in out.getvalue()


@pytest.mark.parametrize("argv", [("--batch-size", "0"), ("--batch-size", "10001"),
                                  ("--interval", "-1"), ("--interval", "nan"),
                                  ("--interval", "1e300"), ("--interval", "inf"),
                                  ("--file", "/nonexistent/ids.txt")])
def test_bad_input_is_a_config_error(argv: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError):
        main(args(*argv, "--dry-run"), env={}, stdin=io.StringIO("a\n"),
             out=io.StringIO(), err=io.StringIO())


def test_missing_token_is_refused_before_sending() -> None:
    with pytest.raises(ConfigError, match="USERPILOT_API_KEY"):
        main(args(), env={"USERPILOT_ANALYTICS_ENDPOINT": "h.test"},
             stdin=io.StringIO("a\n"), out=io.StringIO(), err=io.StringIO())


def test_subcommand_is_registered_with_its_options() -> None:
    parsed = args("--file", "ids.txt", "--batch-size", "10", "--interval", "0.5", "--dry-run")
    assert (parsed.file, parsed.batch_size, parsed.interval, parsed.dry_run) == (
        "ids.txt", 10, 0.5, True)
    assert parsed.func.__name__ == "cmd_delete_users"


def test_env_settings_are_the_workers() -> None:
    """Token, host and scheme come from the worker's configuration; Kafka is not needed."""
    from consumer import gdpr

    client, settings = gdpr._client_from_env({**ENV, "USERPILOT_INSECURE_HTTP": "true"})
    try:
        assert client.url == "http://sandbox.test/v1/users"
        assert settings.retry_backoff_s == 0.5
    finally:
        client.close()


def test_a_proxy_only_the_registry_would_use_does_not_stop_delete_users() -> None:
    """delete-users talks to Userpilot only: a SOCKS ALL_PROXY (for the registry's plain
    http, in the worker) stopped it after the registry's proxy became checked."""
    from consumer import gdpr

    client, settings = gdpr._client_from_env({**ENV, "HTTPS_PROXY": "http://corp:3128",
                                              "ALL_PROXY": "socks5://127.0.0.1:1080"})
    try:
        assert settings.proxy is not None and settings.proxy.reveal() == "http://corp:3128"
    finally:
        client.close()


def test_stdin_is_read_as_strict_utf8_before_anything_is_sent(
        streams: tuple[io.StringIO, io.StringIO]) -> None:
    """A bad byte on stdin went through the text stream's decoding to a traceback after
    the first batches were sent (review "gdpr16")."""
    out, err = streams
    stdin = io.TextIOWrapper(io.BytesIO(b"sa\nsb\n\xffsc\n"), encoding="utf-8",
                             errors="surrogateescape")
    with pytest.raises(ConfigError, match="cannot read user ids from stdin"):
        main(args("--batch-size", "1"), env=ENV, stdin=stdin, out=out, err=err)
    assert out.getvalue() == ""


@pytest.mark.parametrize(("stop", "exit_code"), [(KeyboardInterrupt(), 130),
                                                 (SystemExit(143), 143)],
                         ids=["ctrl-c", "sigterm"])
def test_an_interrupted_run_prints_what_it_did(
        monkeypatch: pytest.MonkeyPatch, streams: tuple[io.StringIO, io.StringIO],
        stop: BaseException, exit_code: int) -> None:
    """A SIGTERM (SystemExit(143) from `__main__`'s handler) prints what was done, as
    Ctrl-C does; it printed nothing (review diff19)."""
    import consumer.gdpr as gdpr

    def interrupted(user_ids: Any, send: Any, **kw: Any) -> Summary:
        summary: Summary = kw["summary"]
        summary.requested, summary.batches_sent, summary.deleted = len(user_ids), 1, 1
        summary.batches_done = 1  # answered: no batch under way at the interrupt
        raise stop

    monkeypatch.setattr(gdpr, "delete_users", interrupted)
    out, err = streams
    code = main(args("--batch-size", "1"), env=ENV, stdin=io.StringIO("a\nb\n"), out=out,
                err=err)
    assert code == exit_code
    assert "interrupted after 1 of 2 batches" in err.getvalue()
    # Review "gdpr48": the batch never sent was in no count ("failed 0"), and the line
    # spoke of a batch under way when none was; it says how to finish.
    assert "under way" not in err.getvalue() and "run the same list again" in err.getvalue()
    assert out.getvalue() == ("delete-users: users requested 2, batches sent 1, deleted 1, "
                              "failed 0, unsent 1\n")


def test_a_sigterm_during_a_request_stops_the_run_after_it_not_inside_it(
        monkeypatch: pytest.MonkeyPatch, streams: tuple[io.StringIO, io.StringIO]) -> None:
    """Review "deps56": `__main__`'s handler raised SystemExit wherever the signal landed;
    in a generator's finalizer it was swallowed (the run went on to its end), in the HTTP
    client's lock the close in `finally` hung for good. The run's own handler sets a flag:
    the request under way ends, then the run stops, and says so."""
    import os
    import signal

    import consumer.gdpr as gdpr
    from consumer.__main__ import _terminated
    from consumer.signals import handled

    real = gdpr._client_from_env
    sent: list[bytes] = []

    class Signalled:
        url = "https://up.test/v1/users"

        def delete(self, body: bytes) -> str:
            sent.append(body)
            os.kill(os.getpid(), signal.SIGTERM)  # while the request is under way
            return "req-1"

        def close(self) -> None:
            return None

    def client_from_env(env: Any) -> tuple[Any, Any]:
        client, settings = real(env)
        client.close()
        return Signalled(), settings

    monkeypatch.setattr(gdpr, "_client_from_env", client_from_env)
    out, err = streams
    with handled(_terminated, [signal.SIGTERM]):  # as `__main__.main` runs every command
        code = main(args("--batch-size", "1", "--interval", "0"), env=ENV,
                    stdin=io.StringIO("a\nb\nc\n"), out=out, err=err)
    assert code == 128 + signal.SIGTERM
    assert len(sent) == 1
    assert "batch 1/3 (1 users): scheduled for deletion (req-1)" in err.getvalue()
    assert "interrupted after 1 of 3 batches" in err.getvalue()
    assert "under way" not in err.getvalue()
    assert out.getvalue() == ("delete-users: users requested 3, batches sent 1, deleted 1, "
                              "failed 0, unsent 2\n")


def test_settings_the_deletion_does_not_use_are_not_read() -> None:
    """The worker's environment without its mounted files: a Kafka CA or a mappings file
    it cannot read stopped the deletion (review "gdpr16")."""
    env = {**ENV, "USERPILOT_MAPPINGS_FILE": "/nonexistent/mappings.json",
           "KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CA_LOCATION": "/nonexistent/ca.pem",
           "SCHEMA_REGISTRY_URL": "not a url", "REDIS_URL": "nonsense://"}
    client, settings = _client_from_env(env)
    try:
        assert client.url == "https://sandbox.test/v1/users"
        assert settings.api_key.reveal() == TOKEN
    finally:
        client.close()


def test_a_trickled_answer_ends_the_attempt_at_twice_the_timeout() -> None:
    """httpx's timeout bounds each read: an answer whose body came a byte a second held the
    run until something killed it (review "gdpr16")."""
    import time

    from consumer.errors import Timeout
    from tests.unit.test_cutoff import trickling

    with trickling(b"HTTP/1.1 503 Busy\r\nContent-Length: 40\r\n\r\n", b"x" * 40) as url:
        client = DeleteClient(f"{url}/v1/users", {}, timeout_s=0.3)
        started = time.monotonic()
        try:
            with pytest.raises(Timeout, match=r"took over 0\.6 s"):
                client.delete(b'{"users":["a"]}')
            assert time.monotonic() - started < 1.5
        finally:
            client.close()


@pytest.mark.parametrize("cut", ["trickled", "closed"])
def test_a_2xx_whose_body_breaks_off_is_a_scheduled_batch(cut: str) -> None:
    """Review http54: a 202 whose body trickled past the deadline or broke off was a
    Timeout or a ConnectionFailed: retried, then counted failed (exit 1, nobody forgotten)
    though Userpilot had scheduled the deletion. The worker's own client takes any 2xx."""
    import time

    from tests.unit.test_cutoff import trickling

    head = b"HTTP/1.1 202 Accepted\r\nx-request-id: r-9\r\nContent-Length: 40\r\n\r\n"
    if cut == "trickled":
        with trickling(head, b"x" * 40) as url:
            client = DeleteClient(f"{url}/v1/users", {}, timeout_s=0.3)
            started = time.monotonic()
            try:
                said = client.delete(b'{"users":["a"]}')
                assert time.monotonic() - started < 1.5
            finally:
                client.close()
    else:
        with answering(head + b"x" * 5) as port:
            client = DeleteClient(f"http://127.0.0.1:{port}/v1/users", {}, timeout_s=2)
            try:
                said = client.delete(b'{"users":["a"]}')
            finally:
                client.close()
    assert said == "x-request-id r-9; HTTP 202, its body broken off"


@pytest.mark.parametrize("sep", ["\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c", "\x1e"])
def test_stdin_splits_ids_only_at_line_endings_as_file_does(
        tmp_path: Any, streams: tuple[io.StringIO, io.StringIO], sep: str) -> None:
    """Review replay26: stdin was split with str.splitlines (U+2028, NEL, FF, VT, ...), so
    `alice<sep>bob` became the ids `alice<sep>` and `bob`: a user never listed was deleted."""
    from consumer import gdpr

    data = f"alice{sep}bob\ncarol\n".encode()
    path = tmp_path / "ids.txt"
    path.write_bytes(data)
    from_file = gdpr._read(str(path), io.StringIO())
    stdin = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8")
    from_stdin = gdpr._read(None, stdin)
    assert from_file == from_stdin == [f"alice{sep}bob", "carol"]


@pytest.mark.parametrize("text", ["", "\n\n", "  \n"])
@pytest.mark.parametrize("dry", [True, False])
def test_no_ids_at_all_is_a_mistake_not_a_deletion(text: str, dry: bool) -> None:
    """Review replay26: an empty file exited 0, which a GDPR script reads as done."""
    with pytest.raises(ConfigError, match="no user ids given"):
        main(args(*(["--dry-run"] if dry else [])), env=ENV, stdin=io.StringIO(text),
             out=io.StringIO(), err=io.StringIO())


def test_a_batch_interrupted_in_the_pacers_wait_is_not_counted_as_sent() -> None:
    """Review replay26: Ctrl-C in the 2 s wait before batch 3 printed "batches sent 3" and
    "the batch under way may or may not have been scheduled"; only 2 had gone out."""
    time = FakeTime()
    send = FakeSend(time, [])
    waits = 0

    def sleep(seconds: float) -> None:
        nonlocal waits
        waits += 1
        if waits == 2:
            raise KeyboardInterrupt
        time.sleep(seconds)

    summary = Summary()
    with pytest.raises(KeyboardInterrupt):
        delete_users(["a", "b", "c"], send, batch_size=1,
                     pacer=Pacer(2.0, clock=time.clock, sleep=sleep), summary=summary)
    assert len(send.sent) == 2
    assert summary.batches_sent == 2


def test_only_scheduled_batches_are_forgotten_and_a_failure_to_forget_is_one_line() -> None:
    """With Redis, the replicas' shared record of identified users is cleared for each
    batch Userpilot scheduled (never a failed one); Redis failing leaves the deletion."""
    time = FakeTime()
    why = '{"errors":[{"message":"bad"}]}'
    send = FakeSend(time, ["r1", Rejected("HTTP 400: bad", status=400, body=why), "r3"])
    forgotten: list[list[str]] = []

    def forget(batch: Sequence[str]) -> str | None:
        forgotten.append(list(batch))
        return "redis forget failed: ConnectionError" if batch == ["e"] else None

    lines: list[str] = []
    summary = delete_users(["a", "b", "c", "d", "e"], send, batch_size=2,
                           pacer=Pacer(2.0, clock=time.clock, sleep=time.sleep),
                           attempts=1, log=lines.append, forget=forget)
    assert forgotten == [["a", "b"], ["e"]]
    assert (summary.deleted, summary.failed) == (3, 2)
    assert sum("not cleared" in line for line in lines) == 1
    assert "batch 3/3" in next(line for line in lines if "not cleared" in line)


def test_without_redis_or_ensure_user_nothing_is_forgotten() -> None:
    from consumer.gdpr import _client_from_env, _shared_users
    _, settings = _client_from_env(ENV)
    assert _shared_users(ENV, settings, print) is None
    env = {**ENV, "REDIS_URL": "redis://r:6379/0", "USERPILOT_ENSURE_USER": "false"}
    _, settings = _client_from_env(env)
    assert _shared_users(env, settings, print) is None
    lines: list[str] = []
    env = {**ENV, "REDIS_URL": "redis://r:6379/0", "REDIS_TLS_CA_FILE": "/nonexistent/ca.pem"}
    _, settings = _client_from_env(env)
    forget = _shared_users(env, settings, lines.append)
    assert len(lines) == 1 and "Redis settings unusable" in lines[0]
    # A clean-up that fails for each batch, so the summary counts it (review "diff54b")
    assert forget is not None and forget(["a"]) == "its settings are unusable (above)"


def test_an_answer_is_read_only_as_far_as_it_is_quoted() -> None:
    """Review http41: `delete-users` read each answer whole and inflated (httpx asked for
    gzip): a few KB of gzip held as many MB as it inflated to. Now, as the worker reads
    them, at most MAX_BODY_BYTES as sent, and only what is quoted inflated."""
    import gzip
    import tracemalloc

    bomb = gzip.compress(b"no " * 20_000_000, compresslevel=9)
    raw = (b"HTTP/1.1 400 Bad Request\r\nContent-Encoding: gzip\r\n"
           b"Content-Length: %d\r\n\r\n" % len(bomb) + bomb)
    with answering(raw) as port:
        client = DeleteClient(f"http://127.0.0.1:{port}/v1/users",
                              {"Authorization": f"Token {TOKEN}"}, timeout_s=5)
        tracemalloc.start()
        try:
            with pytest.raises(Rejected) as refused:
                client.delete(b'{"users":["a"]}')
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
            client.close()
    assert peak < 8 * 2**20, f"held {peak / 2**20:.0f} MiB"
    assert refused.value.body.startswith("no no no")


def _budgeted(script: list[Any], interval: float, budget: float) -> tuple[Summary, FakeSend]:
    time = FakeTime()
    send = FakeSend(time, script)
    summary = delete_users(["a", "b"], send, batch_size=1,
                           pacer=Pacer(interval, clock=time.clock, sleep=time.sleep),
                           attempts=12, backoff_s=1.0, backoff_max_s=8.0, budget_s=budget)
    return summary, send


def test_each_batchs_budget_runs_from_its_first_attempt() -> None:
    """Review cli44: counted from before the pacer's wait, the pause after the previous
    batch took a later batch's budget: a 503 with Retry-After 4 under a 5 s budget was
    retried on batch 1, not on batch 2."""
    busy = ServerError("HTTP 503", status=503, retry_after=4.0)
    summary, send = _budgeted([busy, "rid", busy, "rid"], interval=2.0, budget=5.0)
    assert summary.ok and [users for _, users in send.sent] == [["a"], ["a"], ["b"], ["b"]]
    # A retry the pacer would start past the budget is not started (nor is it later).
    summary, send = _budgeted(["rid", busy], interval=10.0, budget=5.0)
    assert summary.failed == 1 and len(send.sent) == 2


def test_a_line_starting_with_a_byte_order_mark_is_sent_without_it_and_as_written() -> None:
    """Review cli44: `cat a.txt b.txt` puts b's mark before its first id: sent with it
    alone, that user was not deleted, and the run said it was. Review diff44: the worker
    sends a userId starting with one as it comes: sent without it alone, that user could
    not be deleted at all. A line holding only a mark is blank."""
    assert read_user_ids(["a\n", "\ufeffbob\n", "\ufeff\n", "bob\n"]) == [
        "a", "bob", "\ufeffbob"]
    assert read_user_ids(["\ufeffa\r\n"]) == ["a", "\ufeffa"]


def test_ids_with_an_invisible_edge_are_counted_for_the_warning() -> None:
    assert padded(["a", " b", "c\u200b", "\u2060d", "e f"]) == 3
    # what `visible` counts as blank, at an edge (review "diff51b"): a NUL, a noncharacter,
    # an annotation control; a private-use or newer character shows
    assert padded(["g\x00", "\uffffh", "i\ufff9", "\ue000j", "k\U0001fa75", "ü"]) == 3


@pytest.mark.parametrize(("url", "says"), [
    ("https://analytex.userpilot.invalid", "does not resolve (DNS)"),
    ("https://127.0.0.1:1", "refused it"),
])
def test_a_wrong_host_or_port_is_named_not_sent_to_the_ca_bundle(url: str, says: str) -> None:
    """Review cli44: httpx's bare ConnectError was told "for TLS, check
    USERPILOT_CA_BUNDLE", hiding a misspelt host."""
    from consumer.errors import ConnectionFailed

    client = DeleteClient(f"{url}/v1/users", {"Authorization": "Token t"}, timeout_s=2.0)
    try:
        with pytest.raises(ConnectionFailed) as info:
            client.delete(b'{"users":["a"]}')
    finally:
        client.close()
    assert says in str(info.value) and "USERPILOT_CA_BUNDLE" not in str(info.value)


@pytest.mark.parametrize(("proxy", "says"), [
    ("http://proxy.invalid:3128", "the proxy's host 'proxy.invalid' does not resolve"),
    ("http://user:secret@127.0.0.1:1", "the proxy '127.0.0.1' refused it"),
])
def test_through_a_proxy_its_failure_is_named_not_userpilots(proxy: str, says: str) -> None:
    """Review diff44: the connection is to the proxy; naming Userpilot's host sent the
    operator to USERPILOT_ANALYTICS_ENDPOINT. The proxy's credentials are never shown."""
    from consumer.errors import ConnectionFailed

    client = DeleteClient("https://analytex.userpilot.io/v1/users", {"Authorization": "Token t"},
                          timeout_s=2.0, proxy=proxy)
    try:
        with pytest.raises(ConnectionFailed) as info:
            client.delete(b'{"users":["a"]}')
    finally:
        client.close()
    said = str(info.value)
    assert says in said and "HTTPS_PROXY" in said and "secret" not in said


def test_a_user_sent_in_two_forms_is_counted_once() -> None:
    """Review diff44: a two-line file whose first line starts with a byte order mark said
    "3 users requested"."""
    ids = read_user_ids(["\ufeffalice\n", "bob\n"])
    summary, send, _, _ = run(ids, [], size=10)
    assert [users for _, users in send.sent] == [["alice", "\ufeffalice", "bob"]]
    assert (summary.requested, summary.deleted, summary.failed) == (2, 2, 0)


def test_a_failed_batch_of_second_forms_alone_still_fails_the_run() -> None:
    """Review diff44: a batch holding only the byte-order-mark form of an id counted 0, and
    when Userpilot refused it the run said "failed 0", exit 0."""
    ids = read_user_ids(["bob\n", "\ufeffalice\n"])  # bob, alice, \ufeffalice
    summary, _, _, _ = run(ids, ["rid", "rid", Rejected("HTTP 400", status=400)], size=1)
    assert summary.failed == 1 and not summary.ok


def test_a_user_whose_two_forms_both_fail_is_one_failure() -> None:
    ids = read_user_ids(["\ufeffalice\n"])  # alice, \ufeffalice
    refused = Rejected("HTTP 400", status=400)
    summary, _, _, _ = run(ids, [refused, refused], size=1)
    assert (summary.requested, summary.failed, summary.ok) == (1, 1, False)


def test_json_lines_name_ids_holding_line_breaks_exactly(
    streams: tuple[io.StringIO, io.StringIO]
) -> None:
    """Review "ids47": the worker sends a userId holding a line break or a carriage return
    as it is; one id a line read "a\\nb" as the users a and b, and "c\\r" as c, deleted
    others instead and said it had deleted them. With --json each line is a JSON string."""
    out, err = streams
    stdin = io.StringIO('\ufeff"user\\nwith-newline"\n"crlf-user\\r"\n\n'
                        '"crlf-user\\r"\n"\\u2028x"\n')
    code = main(args("--json", "--dry-run", "--batch-size", "10"), env=ENV, stdin=stdin,
                out=out, err=err)
    assert code == 0
    assert "users requested 3," in out.getvalue()
    assert read_json_ids(['"user\\nwith-newline"', '"crlf-user\\r"']) == [
        "user\nwith-newline", "crlf-user\r"]


@pytest.mark.parametrize(("line", "problem"), [
    ("plain-id", "line 2: not JSON"), ("42", "line 2: a JSON int, not a string"),
    ('["a"]', "line 2: a JSON list, not a string")])
def test_json_lines_refuse_a_line_that_is_not_a_json_string_before_sending(
    line: str, problem: str, streams: tuple[io.StringIO, io.StringIO]
) -> None:
    out, err = streams
    with pytest.raises(ConfigError) as refused:
        main(args("--json"), env=ENV, stdin=io.StringIO(f'"ok"\n{line}\n'), out=out, err=err)
    assert problem in str(refused.value)
    assert out.getvalue() == ""


def test_json_lines_refuse_a_lone_surrogate_before_sending(
    streams: tuple[io.StringIO, io.StringIO]
) -> None:
    """Review "diff47a": `"carol\\ud83d"` is a JSON string, and failed its batch's encoding
    with a traceback after earlier batches were sent."""
    out, err = streams
    with pytest.raises(ConfigError) as refused:
        main(args("--json", "--batch-size", "1"), env=ENV,
             stdin=io.StringIO('"alice"\n"carol\\ud83d"\n'), out=out, err=err)
    assert "line 2: the id holds a lone UTF-16 surrogate" in str(refused.value)
    assert out.getvalue() == "" and "batch" not in err.getvalue()


def test_json_lines_count_each_id_as_written_a_byte_order_mark_included(
    streams: tuple[io.StringIO, io.StringIO]
) -> None:
    """Review "diff47a": with --json nothing is sent twice, yet "\\ufeffbob" and "bob" were
    counted as one user and the run said each went in two forms; a line holding only a
    byte order mark was refused as not JSON, where one id a line reads it as blank."""
    out, err = streams
    code = main(args("--json", "--dry-run"), env=ENV,
                stdin=io.StringIO('"\\ufeffbob"\n"bob"\n\ufeff\n'), out=out, err=err)
    assert code == 0
    assert "users requested 2," in out.getvalue()
    assert "byte order mark" not in err.getvalue()
    assert "1 ids begin or end with whitespace or an invisible character" in err.getvalue()


@pytest.mark.parametrize("failure", [
    ConnectionFailed("connection to Userpilot failed: its host 'x.invalid' does not resolve "
                     "(DNS); check USERPILOT_ANALYTICS_ENDPOINT", before_tls=True),
    TlsRefused("TLS: Userpilot's certificate is not trusted; check USERPILOT_CA_BUNDLE"),
])
def test_a_batch_given_up_before_userpilot_was_reached_stops_the_run(failure: Exception) -> None:
    """Review "gdpr48": each batch was retried in full (~6 min each with the defaults), 50
    batches five hours of the same lines, for a setting only a person can fix."""
    summary, send, _, lines = run(["a", "b", "c", "d", "e", "f"], [failure] * 20, attempts=3)
    assert len(send.sent) == 3  # the first batch's attempts only
    assert summary.failed == 6 and summary.aborted and not summary.ok
    assert any("stopping: Userpilot was not reached" in line for line in lines), lines


def test_a_transient_failure_does_not_stop_the_run() -> None:
    busy = ConnectionFailed("connection to Userpilot failed (ConnectionResetError)")
    summary, _, _, _ = run(["a", "b", "c", "d"], [busy] * 3, attempts=3)
    assert (summary.failed, summary.deleted) == (2, 2) and not summary.aborted


def test_json_ids_are_counted_exactly_as_the_dry_run_counts_them(
        streams: tuple[io.StringIO, io.StringIO], monkeypatch: pytest.MonkeyPatch) -> None:
    """Review "gdpr48": with --json, ids differing by a leading byte order mark were two in
    the dry run and one in the run."""
    import consumer.gdpr as gdpr

    seen: list[bool] = []
    real = gdpr.delete_users

    def counted(user_ids: Any, send: Any, **kw: Any) -> Summary:
        seen.append(kw.get("exact", False))
        kw["pacer"] = Pacer(0.0)
        return real(user_ids, lambda body: "x-request-id r", **{
            k: v for k, v in kw.items() if k != "forget"})

    monkeypatch.setattr(gdpr, "delete_users", counted)
    out, err = streams
    assert main(args("--json"), env=ENV, stdin=io.StringIO('"\\ufeffa"\n"a"\n'), out=out,
                err=err) == 0
    assert seen == [True]
    assert "users requested 2" in out.getvalue() and "deleted 2" in out.getvalue()


def test_a_2xx_answer_s_message_is_logged() -> None:
    """Review "gdpr48": Userpilot's 202 says how many users it scheduled, the only sign
    that an id named nobody; it was discarded."""
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(202, json={"message": "0 users\nscheduled for deletion"},
                              headers={"x-request-id": "r1"})

    client = DeleteClient("https://up.test/v1/users", {"Authorization": f"Token {TOKEN}"},
                          timeout_s=2.0, transport=httpx.MockTransport(handler))
    try:
        # On one line: the message's line break would split the log line.
        assert client.delete(b'{"users":["nobody"]}') == (
            "x-request-id r1; Userpilot: 0 users scheduled for deletion")
    finally:
        client.close()


def test_a_retry_line_says_when_the_next_attempt_really_goes() -> None:
    """Review "gdpr48": "next in 1 s" went out 2 s later (the pacer's interval from the
    answer), and a sub-second wait read "next in 0 s"."""
    busy = ServerError("HTTP 503", status=503)
    _, send, _, lines = run(["a"], [busy], size=1, interval=2.0)
    (line,) = [line for line in lines if "next in" in line]
    assert "next in 2.0 s" in line, line
    assert send.sent[1][0] - send.sent[0][0] == pytest.approx(2.1)


def test_a_2xx_answer_nested_past_the_parser_is_no_traceback() -> None:
    """Review "diff48c": its message was parsed, RecursionError escaped, the scheduled
    batch went uncounted and the run ended in a traceback."""
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(202, content=b"[" * 100_000, headers={"x-request-id": "r1"})

    client = DeleteClient("https://up.test/v1/users", {"Authorization": f"Token {TOKEN}"},
                          timeout_s=2.0, transport=httpx.MockTransport(handler))
    try:
        assert client.delete(b'{"users":["a"]}') == "x-request-id r1"
    finally:
        client.close()


def test_ids_written_in_quotes_are_named() -> None:
    """Review "gdpr54": `jq .key` output (or a --json file without --json) deleted nobody,
    each id sent with its quotes, and the run said "deleted 2", exit 0, without a word. A
    warning, not a refusal: a userId may hold quotes, and --json would then delete other
    users (review "compat54")."""
    err = io.StringIO()
    assert main(args("--dry-run"), env=ENV, stdin=io.StringIO('"alice"\n"bob"\n'),
                out=io.StringIO(), err=err) == 0
    assert ("2 of 2 ids are written in double quotes: read one a line, the quotes are part "
            "of the id, as they are sent. If they came from JSON (`jq .key` output), stop "
            "and give the file with --json") in err.getvalue()
    err = io.StringIO()
    main(args("--dry-run"), env=ENV, stdin=io.StringIO('"alice"\nbob\n'), out=io.StringIO(),
         err=err)
    assert "1 of 2 ids are written in double quotes" in err.getvalue()
    err = io.StringIO()
    main(args("--dry-run", "--json"), env=ENV, stdin=io.StringIO('"alice"\n"bob"\n'),
         out=io.StringIO(), err=err)
    assert "double quotes" not in err.getvalue()


def test_a_dry_run_reads_the_real_runs_settings_and_names_where_it_would_send() -> None:
    """Review "gdpr54": the dry run read no setting: a token written `Token …` or an
    endpoint with a scheme rehearsed fine and the real run then exited 2; nor did it say
    which host (US or EU) it would send to."""
    err = io.StringIO()
    assert main(args("--dry-run"), env=ENV, stdin=io.StringIO("a\nb\n"), out=io.StringIO(),
                err=err) == 0
    assert "would DELETE https://sandbox.test/v1/users: 2 users in 1 batches" in err.getvalue()
    for wrong in ({**ENV, "USERPILOT_API_KEY": f"Token {TOKEN}"},
                  {**ENV, "USERPILOT_ANALYTICS_ENDPOINT": "https://analytex.userpilot.io/v1"},
                  {}):
        with pytest.raises(ConfigError):
            main(args("--dry-run"), env=wrong, stdin=io.StringIO("a\n"), out=io.StringIO(),
                 err=io.StringIO())


def test_a_batch_line_counts_users_as_the_summary_does() -> None:
    """Review "gdpr54": `cat a.txt b.txt` (b's first id after a byte order mark) said "batch
    1/2 (2 users)" for one user in its two forms, and the summary "requested 2"."""
    ids = read_user_ids(["\ufeffa\n", "b\n"])  # a, \ufeffa, b
    summary, _, _, lines = run(ids, [], size=2)
    assert summary.requested == 2
    assert lines[0].startswith("batch 1/2 (1 users): scheduled")
    assert lines[1].startswith("batch 2/2 (1 users): scheduled")


def test_redis_is_not_asked_again_after_it_failed_and_the_summary_counts_the_rest() -> None:
    """Review "gdpr54": a hung Redis cost its timeout on every batch (5 s each, 83 minutes
    over 1,000 batches), one line each, and the summary said nothing of it."""
    time = FakeTime()
    send = FakeSend(time, [])
    asked: list[list[str]] = []

    def forget(batch: Sequence[str]) -> str | None:
        asked.append(list(batch))
        return "TimeoutError (Redis at redis://r:6379/0)" if batch == ["c", "d"] else None

    lines: list[str] = []
    summary = delete_users(["a", "b", "c", "d", "e", "f", "g"], send, batch_size=2,
                           pacer=Pacer(2.0, clock=time.clock, sleep=time.sleep),
                           attempts=1, log=lines.append, forget=forget)
    assert asked == [["a", "b"], ["c", "d"]]
    assert summary.uncleared == 5 and summary.deleted == 7 and summary.ok
    assert summary.line() == ("users requested 7, batches sent 4, deleted 7, failed 0, "
                              "not cleared from Redis 5")
    assert sum("not cleared" in line for line in lines) == 1


@pytest.mark.parametrize("as_json", [False, True])
def test_the_ids_userpilot_did_not_schedule_are_written_to_the_left_file(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch, as_json: bool) -> None:
    """Review "gdpr54": a failed batch's ids were never named: the list re-run whole met the
    same 400 again, and the batch could not be cut out of it. `--left-file` holds what was
    not scheduled (here the failed batch), as `--file` reads it back."""
    import consumer.gdpr as gdpr

    real = gdpr.delete_users
    time = FakeTime()
    send = FakeSend(time, ["r1", Rejected("HTTP 400: bad", status=400), "r3"])

    def scripted(user_ids: Any, _send: Any, **kw: Any) -> Summary:
        kw["pacer"] = Pacer(2.0, clock=time.clock, sleep=time.sleep)
        return real(user_ids, send, **kw)

    monkeypatch.setattr(gdpr, "delete_users", scripted)
    left = tmp_path / "left.txt"
    ids = ["a", "b", "c\nd", "e", "f"] if as_json else ["a", "b", "c", "e", "f"]
    text = "".join((json.dumps(i) if as_json else i) + "\n" for i in ids)
    err = io.StringIO()
    code = main(args("--batch-size", "2", "--left-file", str(left),
                     *(["--json"] if as_json else [])),
                env=ENV, stdin=io.StringIO(text), out=io.StringIO(), err=err)
    assert code == 1
    written = left.read_text("utf-8")
    assert written == "".join((json.dumps(i) if as_json else i) + "\n" for i in ids[2:4])
    assert f"2 ids not scheduled written to {left}: run again with --file {left}" \
        in err.getvalue()
    again = gdpr._read(str(left), None, as_json=as_json)
    assert again == ids[2:4]


@pytest.mark.parametrize(("path", "says"), [
    ("-", "--left-file -: give a file"),
    ("/nonexistent/left.txt", "does not exist or is not writable"),
])
def test_a_left_file_that_cannot_be_written_is_refused_before_any_batch(
        path: str, says: str) -> None:
    """Review "diff54b": `--left-file` was tried only after the whole run; a wrong path
    lost which ids were left, and `-` wrote a file named `-`."""
    with pytest.raises(ConfigError, match=says):
        main(args("--left-file", path), env=ENV, stdin=io.StringIO("a\n"),
             out=io.StringIO(), err=io.StringIO())


def test_a_left_file_that_fails_at_the_end_names_the_ids(tmp_path: Any) -> None:
    from consumer.gdpr import _write_left

    lines: list[str] = []
    target = tmp_path / "gone" / "left.txt"  # its folder removed during the run
    _write_left(str(target), ["a", "b"], as_json=False, log=lines.append)
    assert lines[0].startswith(f"--left-file {str(target)!r}: cannot write it")
    assert lines[1:] == ["a", "b"]
    assert not list(tmp_path.iterdir())


def test_unusable_redis_settings_are_counted_and_the_dry_run_says_so() -> None:
    """Review "diff54b": unusable Redis settings left the summary silent, and the dry run
    promised a Redis clean-up the real run would not do."""
    env = {**ENV, "REDIS_URL": "ftp://nowhere"}
    err = io.StringIO()
    main(args("--dry-run"), env=env, stdin=io.StringIO("a\n"), out=io.StringIO(), err=err)
    assert "Redis settings unusable" in err.getvalue()
    assert "and clear the replicas' record" not in err.getvalue()
