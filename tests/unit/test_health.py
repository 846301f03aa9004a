from __future__ import annotations

import gzip
import io
import logging
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)

from consumer.health import Health, HealthServer, serve
from consumer.metrics import Metrics


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def get(port: int, path: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read().decode()


def make_ready(h: Health) -> None:
    h.beat()
    h.set_connected(True)
    h.set_assigned(True)
    h.set_integration_up(True)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def reg() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def health(reg: CollectorRegistry, clock: FakeClock) -> Health:
    return Health(Metrics(reg), max_silence_s=30, clock=clock)


@pytest.fixture
def server(reg: CollectorRegistry, health: Health) -> Iterator[HealthServer]:
    srv = serve(0, reg, health, host="127.0.0.1")
    yield srv
    srv.close()


def test_alive_follows_beats(health: Health, clock: FakeClock) -> None:
    assert health.alive()
    clock.now += 31
    assert not health.alive()
    assert health.alive(max_silence_s=60)
    health.beat()
    assert health.alive()


def test_not_ready_until_every_piece_is_set(health: Health) -> None:
    assert health.ready() == (False, "not connected to Kafka")
    health.set_connected(True)
    assert health.ready() == (False, "no partition assignment yet")
    health.set_assigned(True)
    assert health.ready() == (True, "ready")


def test_each_condition_makes_it_unready(health: Health, clock: FakeClock) -> None:
    make_ready(health)
    health.set_integration_up(False)
    ok, reason = health.ready()
    assert not ok and "401/403/404" in reason
    # The gate's detail names the refusal: a redirect or a proxy's 407 is not the token.
    health.set_integration_up(False, "HTTP 301: redirected to https://x.example/; check "
                                     "USERPILOT_ANALYTICS_ENDPOINT")
    ok, reason = health.ready()
    assert not ok and reason.startswith("Userpilot refuses delivery: HTTP 301: redirected")
    assert "token" not in reason
    health.set_integration_up(True)
    health.set_connected(False)
    assert health.ready() == (False, "not connected to Kafka")
    health.set_connected(True)
    health.set_assigned(False)
    assert health.ready() == (False, "no partition assignment yet")
    # Taken away by the group (a hung broker, a stall): not "yet" (review "faults36").
    health.set_assigned(False, lost=True)
    ok, reason = health.ready()
    assert not ok and reason.startswith("partitions lost: the group's session expired")
    health.set_assigned(True)
    assert health.ready() == (True, "ready")
    health.set_assigned(False)
    assert health.ready() == (False, "no partition assignment yet")
    health.set_assigned(True)
    clock.now += 31
    ok, reason = health.ready()
    assert not ok and "silent" in reason
    health.beat()
    assert health.ready() == (True, "ready")
    health.set_stopping()
    assert health.ready() == (False, "stopping")
    assert health.alive()  # still alive while draining


def test_added_checks_make_it_unready_with_their_reason(health: Health) -> None:
    make_ready(health)
    problems: list[str | None] = [None]
    health.add_check(lambda: problems[0])
    assert health.ready() == (True, "ready")
    problems[0] = "schema registry does not answer (get schema 3: ReadTimeout)"
    assert health.ready() == (False, problems[0])
    problems[0] = None
    assert health.ready() == (True, "ready")


def test_a_check_names_why_no_partition_is_assigned(health: Health) -> None:
    """Review "ops31": with none of KAFKA_TOPICS there nothing is ever assigned, and
    /readyz said "no partition assignment yet" while the topic check knew the reason."""
    health.set_connected(True)
    problems: list[str | None] = ["no source topic is there (signal): check KAFKA_TOPICS"]
    health.add_check(lambda: problems[0])
    assert health.ready() == (False, problems[0])
    problems[0] = None
    assert health.ready() == (False, "no partition assignment yet")


def test_gauges_mirror_state(reg: CollectorRegistry, health: Health, clock: FakeClock) -> None:
    assert reg.get_sample_value("userpilot_worker_ready") == 0
    assert reg.get_sample_value("userpilot_integration_up") == 1
    make_ready(health)
    assert reg.get_sample_value("userpilot_worker_ready") == 1
    health.set_integration_up(False)
    assert reg.get_sample_value("userpilot_integration_up") == 0
    assert reg.get_sample_value("userpilot_worker_ready") == 0
    health.set_integration_up(True)
    assert reg.get_sample_value("userpilot_worker_ready") == 1
    clock.now += 31  # a stalled loop shows at the next scrape, without any call from it
    assert reg.get_sample_value("userpilot_worker_ready") == 0


def test_works_without_metrics(clock: FakeClock) -> None:
    h = Health(clock=clock)
    make_ready(h)
    assert h.ready() == (True, "ready")
    h.set_integration_up(False)
    assert not h.ready()[0]


def test_concurrent_updates_are_safe(health: Health) -> None:
    def flip() -> None:
        for i in range(2000):
            health.set_connected(i % 2 == 0)
            health.beat()
            health.ready()

    threads = [threading.Thread(target=flip) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    health.set_connected(True)
    health.set_assigned(True)
    assert health.ready() == (True, "ready")


def test_server_binds_port_zero(server: HealthServer) -> None:
    assert server.port > 0


def test_metrics_endpoint(server: HealthServer, reg: CollectorRegistry) -> None:
    status, ctype, body = get(server.port, "/metrics")
    assert status == 200
    assert ctype.startswith("text/plain")
    assert "userpilot_events_consumed_total{" not in body  # no topic declared yet
    assert 'userpilot_retries_total{cause="rate_limited"} 0.0' in body
    assert "userpilot_worker_ready 0.0" in body


def fetch(port: int, path: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers)
    with urllib.request.urlopen(req, timeout=5) as resp:
        return resp.status, dict(resp.headers.items()), resp.read()


def test_metrics_is_gzipped_when_asked(server: HealthServer) -> None:
    status, headers, raw = fetch(server.port, "/metrics", **{"Accept-Encoding": "gzip"})
    assert status == 200 and headers.get("Content-Encoding") == "gzip"
    text = gzip.decompress(raw).decode()
    assert "userpilot_worker_ready 0.0" in text
    assert "process_resident_memory_bytes" in text and "python_info{" in text
    plain = fetch(server.port, "/metrics")
    assert "Content-Encoding" not in plain[1]
    assert b"userpilot_worker_ready 0.0" in plain[2]


def test_metrics_speaks_openmetrics_when_negotiated(server: HealthServer) -> None:
    accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
    status, headers, raw = fetch(server.port, "/metrics", Accept=accept)
    assert status == 200
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    text = raw.decode()
    assert text.endswith("# EOF\n")
    assert "# TYPE userpilot_build_info gauge" in text
    families = {f.name: f for f in openmetrics_families(text)}  # type: ignore[no-untyped-call]
    assert families["userpilot_retries"].type == "counter"


def test_metrics_name_filter(server: HealthServer) -> None:
    _, _, raw = fetch(server.port, "/metrics?name[]=userpilot_worker_ready")
    assert raw.decode().strip().splitlines()[-1] == "userpilot_worker_ready 0.0"
    assert b"userpilot_retries_total" not in raw


def test_healthz(server: HealthServer, health: Health, clock: FakeClock) -> None:
    assert get(server.port, "/healthz")[0::2] == (200, "ok\n")
    clock.now += 31
    status, _, body = get(server.port, "/healthz")
    assert status == 503 and "stalled" in body


def test_readyz(server: HealthServer, health: Health) -> None:
    status, _, body = get(server.port, "/readyz")
    assert (status, body) == (503, "not connected to Kafka\n")
    make_ready(health)
    assert get(server.port, "/readyz")[0::2] == (200, "ready\n")
    _, _, metrics_body = get(server.port, "/metrics")
    assert "userpilot_worker_ready 1.0" in metrics_body
    health.set_stopping()
    assert get(server.port, "/readyz")[0::2] == (503, "stopping\n")


def test_unknown_path_is_404(server: HealthServer) -> None:
    assert get(server.port, "/nope")[0] == 404


def _status_line(port: int, head: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer.split(b"\r\n", 1)[0]


@pytest.mark.parametrize(("head", "status"), [
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nUser-Agent: kube-probe\r\n\r\n", b" 200 "),
    # Up to the cap, in many lines: served.
    (b"GET /healthz HTTP/1.1\r\n" + b"".join(b"X-%02d: %s\r\n" % (i, b"a" * 1000)
                                             for i in range(30)) + b"\r\n", b" 200 "),
    # Over it, in headers (each line and their number within http.server's own limits)...
    (b"GET /healthz HTTP/1.1\r\n" + b"".join(b"X-%02d: %s\r\n" % (i, b"a" * 1000)
                                             for i in range(40)) + b"\r\n", b" 431 "),
    (b"GET /metrics HTTP/1.1\r\nX-Big: " + b"b" * 60_000 + b"\r\n\r\n", b" 431 "),
    # ... or in the request line alone.
    (b"GET /" + b"a" * 40_000 + b" HTTP/1.1\r\n\r\n", b" 431 "),
])
def test_a_request_head_is_served_up_to_its_cap(server: HealthServer, head: bytes,
                                                status: bytes) -> None:
    """Review "sec56": http.server takes ~6.4 MB of headers a request (~49 MB parsed): 16
    such connections, or ~60 in a row, took the worker past the chart's 512 Mi."""
    assert status in _status_line(server.port, head)
    assert get(server.port, "/healthz")[0] == 200  # and it serves on


def test_query_string_is_ignored(server: HealthServer) -> None:
    assert get(server.port, "/healthz?verbose=1")[0] == 200


def test_no_access_log(
    server: HealthServer, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    get(server.port, "/healthz")
    captured = capsys.readouterr()
    assert "GET /healthz" not in captured.err + captured.out
    assert "GET /healthz" not in caplog.text


def test_close_releases_port(reg: CollectorRegistry, health: Health) -> None:
    srv = serve(0, reg, health, host="127.0.0.1")
    port = srv.port
    srv.close()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)
    again = serve(port, reg, health, host="127.0.0.1")  # the port is free to bind again
    try:
        assert get(again.port, "/healthz")[0] == 200
    finally:
        again.close()


def test_an_idle_connection_is_closed_after_the_handler_timeout(
    reg: CollectorRegistry, health: Health, monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """A peer that connected and sent nothing held a thread and a descriptor for ever; its
    timeout then printed a traceback to stderr, past the JSON logs (review "ops36")."""
    import socket
    import struct
    import time

    from consumer import health as health_module

    assert health_module._QuietHandler.timeout == 10
    monkeypatch.setattr(health_module._QuietHandler, "timeout", 0.3)
    srv = serve(0, reg, health, host="127.0.0.1")
    try:
        before = threading.active_count()
        idle = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(20)]
        for conn in idle:
            conn.settimeout(5)
            assert conn.recv(1) == b"", "the server closes it"
            conn.close()
        deadline = time.monotonic() + 5
        while threading.active_count() > before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert threading.active_count() <= before
        assert get(srv.port, "/healthz")[0] == 200  # and it still answers
        # Half a request, then a reset (SO_LINGER 0): the read fails with ECONNRESET.
        cut = socket.create_connection(("127.0.0.1", srv.port))
        cut.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        cut.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        cut.close()
        time.sleep(0.5)
        assert get(srv.port, "/healthz")[0] == 200
    finally:
        srv.close()
    assert capfd.readouterr().err == "", "nothing but the worker's own log lines"


def test_readiness_ends_with_librdkafka_s_poll_interval() -> None:
    """A member librdkafka left (max.poll.interval.ms below the 60 s silence limit) still
    said ready (review zombie19); liveness keeps the silence limit."""
    now = [0.0]
    health = Health(max_poll_interval_s=15.0, clock=lambda: now[0])
    health.set_connected(True)
    health.set_assigned(True)
    health.beat()
    assert health.ready() == (True, "ready")
    now[0] = 16.0
    assert health.ready() == (False, "poll loop silent for more than 15s")
    assert health.alive()
    assert Health(max_poll_interval_s=300.0).ready_silence_s == 60.0


def _ipv6_loopback() -> bool:
    """Whether this kernel can listen on ::1 (IPv6 may be disabled on the machine)."""
    import socket

    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def test_by_default_the_probes_answer_on_ipv4_and_ipv6(reg: CollectorRegistry,
                                                      health: Health) -> None:
    """Review ops26: on 0.0.0.0 a single-stack IPv6 cluster's kubelet was refused, and
    every pod failed its liveness probe. Where the kernel has no IPv6, IPv4 still."""
    srv = serve(0, reg, health)
    try:
        hosts = ["127.0.0.1", "[::1]"] if _ipv6_loopback() else ["127.0.0.1"]
        for host in hosts:
            # No proxy: a runner's HTTP_PROXY took http://[::1] to the proxy (its NO_PROXY
            # rarely names the bracketed form, review "flaky57").
            direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            with direct.open(f"http://{host}:{srv.port}/healthz", timeout=5) as r:
                assert r.status == 200, host
    finally:
        srv.close()


def test_without_ipv6_the_server_listens_on_ipv4(reg: CollectorRegistry, health: Health,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import wsgiref.simple_server
    from typing import Any

    from consumer import health as module

    real = wsgiref.simple_server.make_server

    def no_ipv6(host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        if host == "::":
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(module, "make_server", no_ipv6)
    srv = serve(0, reg, health)
    try:
        assert get(srv.port, "/healthz")[0] == 200
    finally:
        srv.close()


def test_head_of_metrics_answers_as_get_without_a_body(server: HealthServer) -> None:
    """prometheus_client answers HEAD with 405: an uptime check by HEAD saw the endpoint
    down (review "http33"). Every path answers HEAD with its GET's status."""
    import http.client

    for path, expected in (("/metrics", 200), ("/healthz", 200), ("/readyz", 503)):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        try:
            conn.request("HEAD", path)
            resp = conn.getresponse()
            assert (path, resp.status) == (path, expected)
            assert resp.read() == b""
        finally:
            conn.close()


def test_a_failure_while_answering_goes_through_logging_not_stderr(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str],
) -> None:
    """Review logs44: a /metrics reader that stopped reading timed the write out, and
    wsgiref printed a 12-line traceback to stderr, breaking the JSON logs."""
    from wsgiref.handlers import SimpleHandler

    from consumer.health import _QuietHandler

    stream = _QuietHandler.get_stderr(None)  # type: ignore[arg-type]
    handler = SimpleHandler(io.BytesIO(), io.BytesIO(), stream, {})
    with caplog.at_level(logging.DEBUG, logger="consumer.health"):
        for error in (TimeoutError("timed out"), ValueError("a bug")):
            try:
                raise error
            except Exception:
                handler.log_exception(sys.exc_info())
    assert capsys.readouterr().err == ""
    said = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert said[0] == ("DEBUG", "probe/metrics client left mid-answer: TimeoutError")
    assert said[1][0] == "ERROR" and "ValueError: a bug" in said[1][1]


def test_slow_clients_neither_pile_up_nor_keep_the_probes_away(
        reg: CollectorRegistry, health: Health, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review sec45: ~1,000 clients sending a byte every few seconds held a thread and a
    descriptor each, until accept() failed and /healthz went unanswered. Connections are
    capped, and at the cap the one that has waited longest for its head is cut for the
    newcomer (refused instead, idle clients renewed every few seconds kept every probe
    out, review diff45c); a head that does not come whole within HEAD_WITHIN_S is cut."""
    import socket
    import time

    from consumer import health as health_module

    monkeypatch.setattr(health_module, "CONNECTIONS_MAX", 4)
    monkeypatch.setattr(health_module, "HEAD_WITHIN_S", 30.0)
    srv = serve(0, reg, health, host="127.0.0.1")
    slow: list[socket.socket] = []
    try:
        for _ in range(4):
            slow.append(socket.create_connection(("127.0.0.1", srv.port)))
            slow[-1].sendall(b"GET /healthz HTTP/1.1\r\nX-Slow: ")  # and never the rest
            time.sleep(0.05)
        assert get(srv.port, "/healthz")[0] == 200  # at the cap: the oldest is cut for it
        slow[0].settimeout(2)
        assert slow[0].recv(1) == b"", "the oldest slow connection is not cut"
        slow[1].settimeout(0.3)
        with pytest.raises(TimeoutError):
            slow[1].recv(1)  # the next is still waited for: under the cap again
        assert get(srv.port, "/healthz")[0] == 200
        monkeypatch.setattr(health_module, "HEAD_WITHIN_S", 0.5)
        late = socket.create_connection(("127.0.0.1", srv.port))
        slow.append(late)
        late.sendall(b"GET /healthz HTTP/1.1\r\n")
        late.settimeout(3)
        started = time.monotonic()
        assert late.recv(1) == b"", "a head not whole within HEAD_WITHIN_S is not cut"
        assert time.monotonic() - started < 2.0
    finally:
        for conn in slow:
            conn.close()
        srv.close()


def test_the_server_starts_without_looking_its_host_name_up(
        reg: CollectorRegistry, health: Health, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review "env60": http.server's bind called socket.getfqdn, which raised UnicodeError
    for a 64-character hostname (`run` crash-looped) and waited 20 s for a DNS that did not
    answer. The server starts on every address without it, and answers."""
    def refused(name: str = "") -> str:
        raise UnicodeError("encoding with 'idna' codec failed (label too long)")

    monkeypatch.setattr(socket, "getfqdn", refused)
    srv = serve(0, reg, health)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/healthz", timeout=5) as r:
            assert r.status == 200
    finally:
        srv.close()


def test_out_of_descriptors_the_server_pauses_and_says_so_once(
        reg: CollectorRegistry, health: Health, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Review "env60": at the open-file limit accept() failed, the connection stayed queued
    and serve_forever called accept() again at once, a whole core, /healthz unanswered and
    no line. It pauses between tries and says why once."""
    import errno

    from consumer import health as health_module

    monkeypatch.setattr(health_module, "ACCEPT_PAUSE_S", 0.1, raising=False)
    srv = serve(0, reg, health, host="127.0.0.1")
    tries = [0]

    class OutOfFiles:
        """The listening socket, whose accept() fails as at the open-file limit."""

        def __init__(self, real: socket.socket) -> None:
            self.real = real

        def fileno(self) -> int:
            return self.real.fileno()

        def accept(self) -> tuple[socket.socket, object]:
            tries[0] += 1
            raise OSError(errno.EMFILE, "Too many open files")

    try:
        with caplog.at_level(logging.ERROR, logger="consumer.health"):
            monkeypatch.setattr(srv._httpd, "socket", OutOfFiles(srv._httpd.socket))
            client = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
            time.sleep(1.0)
            monkeypatch.undo()
            client.close()
    finally:
        srv.close()
    assert 2 <= tries[0] <= 15, tries[0]  # spinning, it was tens of thousands
    told = [r for r in caplog.records if "too many open files" in r.getMessage()]
    assert len(told) == 1, [r.getMessage() for r in caplog.records]
