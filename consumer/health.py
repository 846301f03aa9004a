"""Liveness/readiness state and the small HTTP server for /metrics, /healthz and /readyz.

The worker has no request path of its own, so Kubernetes learns about it only here:
liveness says "the poll loop still turns" (a wedged loop stops Kafka heartbeats and holds
partitions, so a restart is the fix); readiness says "this replica is doing useful work"
(joined the group, broker reachable, Userpilot accepting the token, not shutting down), so
rollouts wait for it and the dashboard shows why it isn't. The server is a stdlib WSGI
server on a daemon thread, so a stuck asyncio loop can't also stop the probes from answering
honestly; /metrics is prometheus_client's own WSGI app, so scrapers get what they negotiate
(gzip, the OpenMetrics format) exactly as from any other Python exporter.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import io
import logging
import math
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable, Iterable
from http import HTTPStatus
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any, TextIO, cast
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

from consumer.metrics import Metrics

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIEnvironment
    from wsgiref.types import WSGIApplication as WSGIApp

__all__ = ["DEFAULT_MAX_SILENCE_S", "Health", "HealthServer", "make_app", "serve"]

log = logging.getLogger(__name__)

# The poll loop beats at least every poll timeout (0.1 s), and a revoke's drain, which holds
# the poll loop, beats while it waits: a minute of silence means stuck.
DEFAULT_MAX_SILENCE_S = 60.0


class Health:
    """Thread-safe health state written by the worker loop, read by the probe server."""

    def __init__(
        self,
        metrics: Metrics | None = None,
        *,
        max_silence_s: float = DEFAULT_MAX_SILENCE_S,
        max_poll_interval_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lock = threading.Lock()
        self._metrics = metrics
        self._clock = clock
        self.max_silence_s = max_silence_s
        # Readiness ends sooner when librdkafka leaves the group sooner (max.poll.interval.ms
        # below the silence limit): a member it left still said ready (review zombie19).
        self.ready_silence_s = min(max_silence_s, max_poll_interval_s or max_silence_s)
        self._last_beat = clock()
        self._assigned = False
        self._lost = False  # the last change of `_assigned` was a loss (`set_assigned`)
        self._connected = False
        self._integration_up = True
        self._integration_detail = ""
        self._stopping = False
        self._stopping_reason = "stopping"
        self._waiting: str | None = None
        self._checks: list[Callable[[], str | None]] = []
        if metrics is not None:
            # Evaluated at scrape time, so the gauge equals what /readyz would answer now.
            metrics.worker_ready.set_function(lambda: 1.0 if self.ready()[0] else 0.0)
        self._publish()

    def beat(self) -> None:
        """Record that the poll loop is turning."""
        with self._lock:
            self._last_beat = self._clock()

    def alive(self, max_silence_s: float | None = None) -> bool:
        """True while the last beat is recent enough."""
        limit = self.max_silence_s if max_silence_s is None else max_silence_s
        with self._lock:
            return bool(self._clock() - self._last_beat <= limit)

    def set_assigned(self, assigned: bool, lost: bool = False) -> None:
        """Group join done (an assignment arrived, possibly empty) or lost (`lost`: the
        group took the partitions away, which /readyz then says instead of "yet")."""
        with self._lock:
            self._assigned = assigned
            self._lost = lost and not assigned

    def set_connected(self, connected: bool) -> None:
        """Whether the Kafka client currently reaches the brokers."""
        with self._lock:
            self._connected = connected

    def set_integration_up(self, up: bool, detail: str = "") -> None:
        """False while Userpilot refuses delivery outright (401/403/404, a redirect, the
        proxy's 407, a TLS handshake a setting fixes); `detail` says which, for /readyz (it
        named the token for all of them, sending an operator to rotate a token when a proxy
        or the endpoint was wrong)."""
        with self._lock:
            self._integration_up = up
            self._integration_detail = detail[:300]
        self._publish()

    def add_check(self, check: Callable[[], str | None]) -> None:
        """A dependency readiness asks on every probe: None when fine, else the reason
        (e.g. the schema registry not answering). Checks must not block."""
        with self._lock:
            self._checks.append(check)

    def set_waiting(self, reason: str | None) -> None:
        """Start-up waits for Kafka or the registry (`reason` says which), or no longer."""
        with self._lock:
            self._waiting = None if reason is None else reason[:500]

    def set_stopping(self, reason: str = "stopping") -> None:
        """Shutdown began: stay alive for the drain but stop claiming readiness."""
        with self._lock:
            self._stopping = True
            self._stopping_reason = reason

    def ready(self) -> tuple[bool, str]:
        """(ready, reason); the reason names the first unmet condition, "ready" otherwise."""
        with self._lock:
            return self._ready_locked()

    def _ready_locked(self) -> tuple[bool, str]:
        if self._stopping:
            return False, self._stopping_reason
        if self._waiting is not None:
            return False, self._waiting
        if self._clock() - self._last_beat > self.ready_silence_s:
            return False, f"poll loop silent for more than {self.ready_silence_s:g}s"
        if not self._connected:
            return False, "not connected to Kafka"
        if not self._assigned:
            # What keeps partitions away may be a check's to name: with none of
            # KAFKA_TOPICS there, nothing is ever assigned, and "no partition assignment"
            # sent the operator to the group instead of the topic's name (review "ops31").
            return False, self._problem() or (
                "partitions lost: the group's session expired (Kafka unreachable or hung, or "
                "the worker stalled); rejoining" if self._lost else "no partition assignment yet")
        if not self._integration_up:
            return False, "Userpilot refuses delivery: " + (
                self._integration_detail or "the token or endpoint (401/403/404...)")
        problem = self._problem()
        return (False, problem) if problem is not None else (True, "ready")

    def _problem(self) -> str | None:
        """The first registered check's problem, if any."""
        for check in self._checks:
            problem = check()
            if problem is not None:
                return problem
        return None

    def _publish(self) -> None:
        if self._metrics is None:
            return
        with self._lock:
            up = self._integration_up
        self._metrics.integration_up.set(1 if up else 0)


class HealthServer:
    """A running probe/metrics server; ``port`` is the bound port (useful with port 0)."""

    def __init__(self, httpd: WSGIServer, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread
        self.port: int = int(httpd.server_address[1])

    def close(self) -> None:
        """Stop serving and release the socket."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


CONNECTIONS_MAX = 64
"""Connections the probe/metrics server serves at once: past it, the one waiting longest for
its request head is cut for the newcomer; the newcomer is refused when every open one has
sent its head already, or twice as many are open while those cut finish."""
ACCEPT_PAUSE_S = 0.1
"""How long the server waits before accepting again when the process is out of descriptors."""
HEAD_WITHIN_S = 5.0
"""A connection's request head must be whole within this; a slower one is cut."""
HEAD_MAX_BYTES = 32 * 1024
"""The longest request head (request line and headers) served: a longer one is answered 431.
http.server's own limits (64 KiB a line, 100 lines) let one request hold ~6.4 MB of headers,
~49 MB once parsed: 16 such connections, or ~60 one after another, took the worker past the
chart's 512 Mi and the kubelet killed it (review "sec56")."""


class _HeadLimit:
    """The connection's reader, counting the request head's bytes: past HEAD_MAX_BYTES a
    line read raises http.client.LineTooLong, which http.server answers 431. What follows
    the head (a body) is not counted (`done`)."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self._left = HEAD_MAX_BYTES
        self.done = False

    def readline(self, limit: int = -1) -> bytes:
        if self.done:
            return cast("bytes", self._raw.readline(limit))
        if self._left <= 0:
            raise http.client.LineTooLong("request head")
        want = self._left + 1 if limit < 0 else min(limit, self._left + 1)
        line = cast("bytes", self._raw.readline(want))
        self._left -= len(line)
        if self._left < 0:
            raise http.client.LineTooLong("request head")
        return line

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    """One thread per request, so a slow scrape never delays a probe; at most
    CONNECTIONS_MAX at once. Unbounded, ~1,000 clients sending a byte every few seconds held
    a thread and a descriptor each, the process ran out of descriptors, accept() failed in
    a loop at a whole core, and /healthz went unanswered until the kubelet restarted the
    pod (review "sec45"). At the cap the connection that has waited longest for its request
    head is cut, not the newcomer: refused, 64 idle connections renewed every 5 s kept
    every probe out (review "diff45c"); a probe sends its head at once."""

    daemon_threads = True
    _out_of_files_told: float  # when "too many open files" was last said (`get_request`)

    def server_bind(self) -> None:
        """Bind without http.server's `socket.getfqdn` (WSGI's SERVER_NAME, unused here): it
        raised UnicodeError for a 64-character hostname (Linux allows 64, a DNS label 63),
        `run` crash-looping on a traceback, and waited 20 s for a DNS that did not answer
        before the probes came up (review "env60")."""
        socketserver.TCPServer.server_bind(self)
        self.server_name = socket.gethostname()
        self.server_port = self.server_address[1]
        self.setup_environ()

    def get_request(self) -> tuple[socket.socket, Any]:
        """accept(), pausing ACCEPT_PAUSE_S when the process is out of descriptors: the
        connection stays queued, the listening socket readable, and serve_forever called
        accept() again at once, a whole core spent while /healthz went unanswered, with no
        line (review "env60"). Said once a minute."""
        try:
            return super().get_request()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                now = time.monotonic()
                if now - self._out_of_files_told >= 60.0:
                    self._out_of_files_told = now
                    log.error("the probe and metrics server cannot take a connection: too "
                              "many open files (the process reached its open-file limit, "
                              "ulimit -n or the container's nofile; raise it)")
                time.sleep(ACCEPT_PAUSE_S)
            raise

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._out_of_files_told = -math.inf
        self._lock = threading.Lock()
        self._open = 0
        # Connections whose request head has not come yet, oldest first.
        self._headless: dict[Any, None] = {}
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        evicted: Any = None
        refused = False
        with self._lock:
            if self._open >= CONNECTIONS_MAX:
                evicted = next(iter(self._headless), None)
                if evicted is None or self._open >= 2 * CONNECTIONS_MAX:
                    refused = True  # all are being answered: the newcomer is refused
                    evicted = None
                else:
                    del self._headless[evicted]
            if not refused:
                self._open += 1
                self._headless[request] = None
        if evicted is not None:
            with contextlib.suppress(OSError):
                evicted.shutdown(socket.SHUT_RDWR)
        if refused:
            log.debug("probe/metrics server: %d connections open, %s refused", self._open,
                      client_address[0])
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._closed(request)
            raise

    def head_came(self, request: Any) -> None:
        """`request`'s head was read: it is being answered, no longer cut for a newcomer."""
        with self._lock:
            self._headless.pop(request, None)

    def _closed(self, request: Any) -> None:
        with self._lock:
            self._open -= 1
            self._headless.pop(request, None)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._closed(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away or never finished its request (a scanner, a browser's
        preconnect through `kubectl port-forward`, a load balancer's TCP check): one DEBUG
        line. socketserver's default printed a traceback to stderr, 17 lines that broke the
        one-JSON-object-per-line logs (review "ops36"). Anything else is logged, whole,
        through the worker's logging."""
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):  # timed out, reset, broken pipe
            log.debug("probe/metrics client %s left: %s", client_address[0],
                      type(exc).__name__)
            return
        log.exception("probe/metrics server: unexpected error serving %s", client_address[0])


class _ErrorsToLog(io.TextIOBase):
    """wsgiref's error stream, through the worker's logging. A failure while answering
    (a /metrics reader that stopped reading: the write timed out) was printed there as a
    raw traceback, which broke the one-JSON-object-per-line logs (review "logs44"): a
    client gone is one DEBUG line, anything else one ERROR record."""

    def __init__(self) -> None:
        super().__init__()
        self._parts: list[str] = []

    def write(self, text: str) -> int:
        self._parts.append(text)
        return len(text)

    def flush(self) -> None:
        text, self._parts = "".join(self._parts), []
        if not text.strip():
            return
        exc = sys.exc_info()[1]  # wsgiref writes while it handles the exception
        if isinstance(exc, OSError):
            log.debug("probe/metrics client left mid-answer: %s", type(exc).__name__)
        else:
            log.error("probe/metrics server: %s", text.rstrip())


class _QuietHandler(WSGIRequestHandler):
    # A connection that sends nothing (or half a request) held a thread and a descriptor
    # for as long as its peer kept it open; now for at most this many seconds a read or a
    # write, and its whole request head within HEAD_WITHIN_S (a byte every few seconds
    # kept each read under the timeout for ever, review "sec45").
    timeout = 10

    def setup(self) -> None:
        super().setup()
        self._head = _HeadLimit(self.rfile)
        self.rfile = cast("Any", self._head)
        self._cut = threading.Timer(HEAD_WITHIN_S, self._cut_off)
        self._cut.daemon = True
        self._cut.start()

    def _cut_off(self) -> None:
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def handle(self) -> None:
        try:
            super().handle()
        except http.client.LineTooLong:  # the request line alone was too long
            self.requestline, self.request_version, self.command = "", "", ""
            self.send_error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "Request head too long")

    def parse_request(self) -> bool:
        whole = super().parse_request()
        self._head.done = True
        self._cut.cancel()  # the head came: the answer has its own write timeout
        server = self.server
        if isinstance(server, _ThreadingWSGIServer):
            server.head_came(self.request)
        return whole

    def finish(self) -> None:
        cut = getattr(self, "_cut", None)
        if cut is not None:
            cut.cancel()
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        # Probes hit this every few seconds; access logs would drown the worker's own.
        pass

    def get_stderr(self) -> TextIO:
        return cast("TextIO", _ErrorsToLog())


def make_app(registry: CollectorRegistry, health: Health) -> WSGIApp:
    """The WSGI app: /metrics is prometheus_client's own (gzip, OpenMetrics negotiation,
    ``name[]`` filtering), the probes answer from ``health``, anything else is a 404."""
    metrics_app = make_wsgi_app(registry)

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            if environ.get("REQUEST_METHOD") == "HEAD":
                # prometheus_client answers HEAD with 405; a HEAD check of the endpoint
                # (a load balancer's, an uptime probe's) gets the GET's status and headers.
                metrics_app({**environ, "REQUEST_METHOD": "GET"}, start_response)
                return []
            return cast("Iterable[bytes]", metrics_app(environ, start_response))
        if path == "/healthz":
            status, body = (200, "ok") if health.alive() else (503, "poll loop stalled")
        elif path == "/readyz":
            ok, body = health.ready()
            status = 200 if ok else 503
        else:
            status, body = 404, "not found"
        data = (body + "\n").encode()
        start_response(
            f"{status} {HTTPStatus(status).phrase}",
            [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(data)))],
        )
        return [data]

    return app


class _DualStackWSGIServer(_ThreadingWSGIServer):
    """On "::" with IPV6_V6ONLY off: IPv6 and IPv4 alike. A pod of a single-stack IPv6
    cluster is probed and scraped at its IPv6 address, which 0.0.0.0 refused: every pod
    failed its liveness probe (review "ops26")."""

    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def _every_address(port: int, app: WSGIApp) -> tuple[WSGIServer, str]:
    """The server on every address: "::" dual-stack, else 0.0.0.0 where the kernel has no
    IPv6 (disabled by `ipv6.disable=1`, some hardened nodes)."""
    if socket.has_ipv6:
        try:
            return make_server("::", port, app, server_class=_DualStackWSGIServer,
                               handler_class=_QuietHandler), "[::]"
        except OSError as exc:
            if exc.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT):
                raise
    return make_server("0.0.0.0", port, app, server_class=_ThreadingWSGIServer,
                       handler_class=_QuietHandler), "0.0.0.0"


def serve(
    port: int, registry: CollectorRegistry, health: Health, host: str | None = None
) -> HealthServer:
    """Start the /metrics, /healthz and /readyz server on a daemon thread: on `host`, by
    default on every IPv6 and IPv4 address."""
    app = make_app(registry, health)
    if host is None:
        httpd, host = _every_address(port, app)
    else:
        httpd = make_server(host, port, app, server_class=_ThreadingWSGIServer,
                            handler_class=_QuietHandler)
    # A short poll interval keeps close() (shutdown waits for one poll) quick.
    thread = threading.Thread(
        target=httpd.serve_forever, args=(0.1,), name="health-server", daemon=True
    )
    thread.start()
    server = HealthServer(httpd, thread)
    log.info("serving /metrics, /healthz and /readyz on %s:%d", host, server.port)
    return server
