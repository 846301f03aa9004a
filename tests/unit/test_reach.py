"""`reach.userpilot` (check-config --online's token check) against raw local servers."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AclOperation

from consumer import reach
from consumer.config import Settings, load_settings
from tests.certificates import self_signed


@contextmanager
def answering(raw: bytes, tls: ssl.SSLContext | None = None) -> Iterator[int]:
    """A server on 127.0.0.1 that answers every connection's first request with `raw`
    (over TLS with `tls`: a handshake the client breaks off is let go)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            try:
                with tls.wrap_socket(conn, server_side=True) if tls else conn as peer:
                    peer.recv(65536)
                    peer.sendall(raw)
            except OSError:
                continue

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


def page(status: int, says: str) -> bytes:
    """A proxy's block page (HTML) answering with `status`."""
    body = f"<html><body><h1>{says}</h1>\n<p>Contact IT.</p></body></html>".encode()
    return (f"HTTP/1.1 {status} Blocked\r\nContent-Type: text/html\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def test_400_to_an_empty_track_means_the_token_is_good() -> None:
    with answering(response(400, "Bad Request")) as port:
        assert reach.userpilot(settings(port), 5) is None


@pytest.mark.parametrize(("raw", "expected"), [
    (response(401, "Unauthorized"), "refused the token (401)"),
    (response(404, "Not Found"), "wrong host"),
    (response(503, "Unavailable"), "answered 503 to a token check: try again later"),
    # A server without POST (python -m http.server): not Userpilot, not "later" (http33).
    (response(501, "Unsupported method ('POST')"), "answered 501 to a token check: this host "
     "does not serve Userpilot's API; check USERPILOT_ANALYTICS_ENDPOINT"),
    # Permanent answers of a host that is not Userpilot's API, and one that takes
    # anything: "try again later" and "online OK" misled (review "seed17").
    (response(405, "Method Not Allowed"), "answered 405 to a token check, which Userpilot "
     "answers with 400: this host does not serve Userpilot's API"),
    (response(410, "Gone"), "check USERPILOT_ANALYTICS_ENDPOINT"),
    (response(200, "OK"), "accepted an empty Track (200)"),
    (response(202, "Accepted"), "is not Userpilot's analytics API"),
    (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "unusable answer from Userpilot"),
    # A proxy's or firewall's block page (review "egress59"): "refused the token" and
    # "online OK" sent on-call the wrong way; its page says why.
    (page(403, "Website blocked: upstream certificate expired"),
     "refused with an HTML page, which Userpilot's API does not send"),
    (page(403, "Website blocked: upstream certificate expired"),
     "(answer: Website blocked: upstream certificate expired Contact IT.)"),
    (page(400, "Request blocked by policy"), "answered 400 with an HTML page"),
])
def test_problems_are_one_line_that_names_them(raw: bytes, expected: str) -> None:
    with answering(raw) as port:
        problem = reach.userpilot(settings(port), 5)
    assert problem is not None
    assert expected in problem
    assert "None" not in problem
    assert "wt_1234567890" not in problem


def _answer(status: str, content_type: str, body: bytes) -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


@pytest.mark.parametrize(("raw", "problem"), [
    # a UI or a URL without Apicurio's /apis/ccompat/v7: passed the probe's own "< 300"
    # rule, then every schema lookup failed (review newcomer19)
    (_answer("200 OK", "text/html", b"<html>registry UI</html>"),
     "not a Schema Registry JSON answer; check SCHEMA_REGISTRY_URL"),
    (_answer("200 OK", "application/json", b'{"subjects": []}'),
     "not a Schema Registry JSON answer"),
    (_answer("401 Unauthorized", "application/json", b'{"error_code": 401, "message": "no"}'),
     "refused the credentials (401): check SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO"),
    (_answer("404 Not Found", "text/plain", b"nope"),
     "answered 404 to GET /subjects: check SCHEMA_REGISTRY_URL (include the API path)"),
    (_answer("200 OK", "application/vnd.schemaregistry.v1+json", b'["a-value", "b-value"]'),
     None),
])
def test_the_registry_probe_accepts_what_the_worker_can_use(raw: bytes,
                                                           problem: str | None) -> None:
    with answering(raw) as port:
        said = reach.registry(f"http://u:pw-S3CRET@127.0.0.1:{port}", "u:pw-S3CRET", 5)
    if problem is None:
        assert said is None
    else:
        assert said is not None and problem in said and "S3CRET" not in said


def test_the_registry_probe_has_the_clients_deadline() -> None:
    """An answer trickled without end is cut at the timeout (the client's `Cutoff`): a byte
    every 50 ms, so no single read waits out the timeout, even on a loaded machine (one
    partial answer and then silence was cut by the read timeout under `pytest -n 4`)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    held: list[socket.socket] = []
    done = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        held.append(conn)
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n[")
        with suppress(OSError):
            while not done.wait(0.05):
                conn.sendall(b" ")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    said = reach.registry(f"http://127.0.0.1:{port}", None, 1.0)
    done.set()
    listener.close()
    for conn in held:
        conn.close()
    assert said is not None and "not reachable (TimeoutError" in said


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_registry_unreachable_through_its_proxy_names_the_proxy() -> None:
    """A cluster-wide HTTP_PROXY that fails (Settings gives the registry's client the proxy
    the environment names for it) was reported as "check SCHEMA_REGISTRY_URL" (review
    "ops22"): the proxy is named, its password not, and NO_PROXY suggested. A direct
    connection names no proxy."""
    proxy = f"http://bob:pw-S3CRET@127.0.0.1:{_closed_port()}"
    said = reach.registry("http://registry.example:8081", None, 2, proxy=proxy)
    assert said is not None and "through the proxy http://***@127.0.0.1:" in said
    assert "NO_PROXY" in said and "S3CRET" not in said
    direct = reach.registry(f"http://127.0.0.1:{_closed_port()}", None, 2)
    assert direct is not None and "proxy" not in direct


BROKERS = {"group.min.session.timeout.ms": "6000", "group.max.session.timeout.ms": "1800000",
           "auto.create.topics.enable": "false"}


@pytest.mark.parametrize(("conf", "refused"), [
    ({}, False), ({"session.timeout.ms": "6000"}, False),
    ({"session.timeout.ms": 1800000}, False), ({"session.timeout.ms": "1"}, True),
    ({"session.timeout.ms": "3600000"}, True)])
def test_a_session_timeout_the_brokers_refuse_is_named(conf: dict[str, object],
                                                       refused: bool) -> None:
    """Every JoinGroup was refused, which librdkafka only logs: never ready, and
    check-config --online said OK (review config19)."""
    problem = reach.session_timeout_problem(conf, BROKERS)
    assert (problem is not None) is refused
    if problem is not None:
        assert problem.startswith(f"KAFKA_SESSION_TIMEOUT_MS={conf['session.timeout.ms']} ")
        assert "group.min.session.timeout.ms=6000" in problem
    assert reach.session_timeout_problem({"session.timeout.ms": "1"}, {}) is None  # unread


def test_a_missing_dlq_topic_is_refused_only_where_nothing_creates_it() -> None:
    problem = reach.missing_dlq_problem("k:9092", "t.dlq", BROKERS)
    assert problem is not None and "auto.create.topics.enable=false" in problem
    assert "--create --topic t.dlq" in problem
    assert reach.missing_dlq_problem("k:9092", "t.dlq",
                                     {"auto.create.topics.enable": "true"}) is None
    assert reach.missing_dlq_problem("k:9092", "t.dlq", {}) is None  # not readable: pass


@pytest.mark.parametrize("policy", ["compact", "compact,delete", "delete,compact"])
def test_brokers_that_would_create_a_compacted_dlq_topic_are_named(policy: str) -> None:
    """Review "dlq54": brokers whose log.cleanup.policy compacts created the missing DLQ
    topic compacted at the first dead letter; start-up and check-config --online said OK."""
    problem = reach.missing_dlq_problem("k:9092", "t.dlq", {"log.cleanup.policy": policy})
    assert problem is not None and f"would create it compacted (log.cleanup.policy={policy})" \
        in problem
    assert "--create --topic t.dlq --config cleanup.policy=delete" in problem
    assert reach.missing_dlq_problem("k:9092", "t.dlq", {"log.cleanup.policy": "delete"}) is None


def test_brokers_that_would_create_a_dlq_topic_too_small_for_a_dead_letter_are_named() -> None:
    """Review "readme51": created by the first dead letter, the DLQ topic takes the brokers'
    message.max.bytes; below the worker's floor even a value-less dead letter is refused."""
    small = {"auto.create.topics.enable": "true", "message.max.bytes": "8191"}
    problem = reach.missing_dlq_problem("k:9092", "t.dlq", small)
    assert problem is not None and "message.max.bytes=8191, below 8192" in problem
    assert "--create --topic t.dlq --config max.message.bytes=1048588" in problem
    assert reach.missing_dlq_problem(
        "k:9092", "t.dlq", {**small, "message.max.bytes": "8192"}) is None


@pytest.mark.parametrize(("configs", "said"), [
    ({"cleanup.policy": "delete", "max.message.bytes": "1048588"}, None),
    ({"cleanup.policy": "delete", "max.message.bytes": "8192"}, None),
    ({"cleanup.policy": "delete", "max.message.bytes": "512"},
     "has max.message.bytes=512, below 8192"),
    ({"cleanup.policy": "compact", "max.message.bytes": "512"}, "has cleanup.policy=compact"),
    ({}, None),  # not readable (no DescribeConfigs ACL): no verdict
], ids=["default", "floor", "small", "compacted-first", "unread"])
def test_a_dlq_topic_that_refuses_a_dead_letter_without_its_value_is_named(
        configs: dict[str, str], said: str | None) -> None:
    """Review "readme51": a DLQ topic of 512 bytes refused the value-less dead letter, retried
    every 0.5 s for ever while its partition held, and check-config --online said OK."""
    from typing import Any, cast

    class Entry:
        def __init__(self, value: str) -> None:
            self.value = value

    class Answer:
        def result(self, timeout: float) -> dict[str, Entry]:
            return {name: Entry(value) for name, value in configs.items()}

    class Admin:
        def describe_configs(self, resources: list[Any], request_timeout: float
                             ) -> dict[Any, Answer]:
            return {r: Answer() for r in resources}

    problem = reach.dlq_policy(cast(Any, Admin()), "t.dlq", 1.0)
    if said is None:
        assert problem is None
    else:
        assert problem is not None and said in problem
    if problem is not None and said is not None and "max.message.bytes" in said:
        assert "--entity-name t.dlq --add-config max.message.bytes=1048588" in problem
    # A running worker's periodic check names compaction only: a topic between the smallest
    # dead letter (up to ~5 KB) and the floor takes them all, and blocking every dead letter
    # stalled every partition at its first (review "diff51a").
    running = reach.dlq_policy(cast(Any, Admin()), "t.dlq", 1.0, size=False)
    assert running == (problem if said is not None and "compact" in said else None)


def test_only_the_brokers_latest_error_says_whether_they_refuse_the_settings() -> None:
    """A refusal exits `run` at once, an outage is waited for. A login refused or an
    untrusted certificate on the latest try is a setting; a broker restarting, a TLS load
    balancer without a backend (every handshake ended by the other side) or a SASL
    handshake cut by the network is an outage (review final22)."""
    from confluent_kafka import KafkaError

    from consumer.reach import _refusal

    def error(code: int, text: str) -> KafkaError:
        return KafkaError(code, text)

    untrusted = error(KafkaError._TRANSPORT, "ssl://b:9093/bootstrap: SSL handshake failed: "
                      "error:0A000086:SSL routines::certificate verify failed")
    ended = error(KafkaError._TRANSPORT, "ssl://b:9093/bootstrap: SSL handshake failed: "
                  "Disconnected: connection reset by peer: connecting to a PLAINTEXT broker "
                  "listener? (after 1ms in state SSL_HANDSHAKE)")
    down = error(KafkaError._TRANSPORT, "ssl://b:9093/bootstrap: Connect to "
                 "ipv4#10.0.0.1:9093 failed: Connection refused (after 0ms in state CONNECT)")
    login = error(KafkaError._AUTHENTICATION, "SASL authentication error: Authentication "
                  "failed: Invalid username or password")
    cut = error(KafkaError._AUTHENTICATION, "SASL PLAIN mechanism handshake failed: Local: "
                "Broker transport failure")
    all_down = error(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down")
    assert _refusal([login, all_down]) is login
    assert _refusal([down, untrusted, all_down]) is untrusted
    assert _refusal([untrusted, down, all_down]) is None
    assert _refusal([ended, ended, all_down]) is None
    assert _refusal([cut, all_down]) is None
    assert _refusal([all_down]) is None
    assert _refusal([]) is None


@pytest.mark.parametrize("names", ["sasl.oauthbearer.client.",
                                   "sasl.oauthbearer.client.credentials.client."])
def test_an_oidc_endpoint_echoing_the_client_secret_is_redacted_in_the_kafka_problem(
        names: str) -> None:
    """librdkafka quotes the token endpoint's refusal, and one that echoes the request shows
    `Authorization: Basic base64(client.id:client.secret)`: `run`, `check-config --online`
    and `replay` printed it (review "ops23"). No broker is needed: the token comes first."""
    import base64

    server = _refusing_identity_provider(echo=True)
    secret = "OIDCSECRET_s3cret"
    conf = {"bootstrap.servers": "127.0.0.1:1", "security.protocol": "SASL_PLAINTEXT",
            "sasl.mechanism": "OAUTHBEARER", "sasl.oauthbearer.method": "oidc",
            names + "id": "cid", names + "secret": secret,
            "sasl.oauthbearer.token.endpoint.url":
                f"http://127.0.0.1:{server.server_port}/token"}
    try:
        problem = reach.kafka(conf, 3)
    finally:
        server.shutdown()
    assert problem is not None and "Basic ***" in problem, problem
    assert base64.b64encode(f"cid:{secret}".encode()).decode() not in problem
    assert secret not in problem


def _oidc_conf(endpoint: str) -> dict[str, str]:
    return {"bootstrap.servers": "127.0.0.1:1", "security.protocol": "SASL_PLAINTEXT",
            "sasl.mechanism": "OAUTHBEARER", "sasl.oauthbearer.method": "oidc",
            "sasl.oauthbearer.client.id": "cid", "sasl.oauthbearer.client.secret": "s3cret",
            "sasl.oauthbearer.token.endpoint.url": endpoint}


def _refusing_identity_provider(tls: ssl.SSLContext | None = None, *,
                                echo: bool = False) -> Any:
    """A token endpoint on 127.0.0.1 refusing the client (401 `invalid_client`), served;
    with `echo`, its answer quotes the request's headers (as some do)."""
    import http.server

    class Refuse(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            said = {"error": "invalid_client", **({"echo": dict(self.headers)} if echo else {})}
            body = json.dumps(said).encode()
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Refuse)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_an_identity_provider_that_does_not_answer_is_waited_for_not_refused() -> None:
    """A token endpoint down at start-up is an outage `run` waits out (`Unreachable`), as
    the running worker does: read as a refusal, every start during it exited 1, a crash
    loop whose back-off outlived the outage (round 57's note). No broker is needed."""
    problem = reach.kafka(_oidc_conf(f"http://127.0.0.1:{_closed_port()}/token"), 3)
    assert isinstance(problem, reach.Unreachable), problem
    assert "token endpoint gave no token" in problem and "no answer" in problem
    assert "s3cret" not in problem


@pytest.mark.parametrize(("reason", "outage"), [
    ("Failed to connect to idp.test port 443 after 3 ms: Could not connect to server", True),
    ("Could not resolve host: idp.test", True),
    ("Connection timed out after 10001 milliseconds", True),
    ("SSL certificate problem: self-signed certificate", False),
    ("SSL certificate OpenSSL verify result: self-signed certificate (18)", False),
    ("error adding trust anchors from file: /etc/pki/tls/certs/ca-bundle.crt", False),
    ("OpenSSL/3.0: error:0A00010B:SSL routines::wrong version number", False),
    ("Unsupported protocol", False),
    # diff58b: a host name saying "tls", a load balancer without a backend, a proxy's 503
    ("Could not resolve host: idp-tls.example.invalid", True),
    ("Could not resolve host: sso.ssl-corp.invalid", True),
    ("TLS connect error: error:0A000126:SSL routines::unexpected eof while reading", True),
    ("CONNECT tunnel failed, response 503", True),
    ("CONNECT tunnel failed, response 407", False),
])
def test_only_an_identity_provider_that_did_not_answer_is_an_outage(
        reason: str, outage: bool) -> None:
    """Review "diff58": librdkafka's status -1 is any failure of curl's; a certificate not
    trusted (or https spoken to a plain port) read as "no answer", and `run` waited for ever
    on a setting. The URL may say "tls" itself: only the reason after it is read."""
    from confluent_kafka import KafkaError

    answers = reach._OidcAnswers()
    answers.logger.error("%s", f'[thrd:background]: Failed to retrieve OIDC token from '
                               f'"https://tls.idp.test/token": {reason} (-1)')
    refusal = KafkaError(KafkaError._AUTHENTICATION,
                         f"Failed to acquire SASL OAUTHBEARER token: {reason}")
    assert answers.status == -1 and answers.outage(refusal) is outage


def test_https_spoken_to_a_plain_token_endpoint_stops_run_not_waited_for() -> None:
    server = _refusing_identity_provider()  # plain HTTP: the TLS handshake fails first
    try:
        problem = reach.kafka(_oidc_conf(f"https://127.0.0.1:{server.server_port}/token"), 3)
    finally:
        server.shutdown()
    assert problem is not None and not isinstance(problem, reach.Unreachable), problem
    # The endpoint's own CA setting, not the brokers' KAFKA_SSL_* (review "ops58").
    assert "token endpoint's TLS failed" in problem and "KAFKA_HTTPS_CA_LOCATION" in problem


def test_an_https_token_endpoint_is_trusted_by_the_workers_ca_rule(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review "diff58": librdkafka's wheel looks for its CA bundle at CentOS's path, so on
    Debian (the image) every https token endpoint failed "error adding trust anchors"
    unless KAFKA_HTTPS_CA_LOCATION was set. The worker gives it the rule of its other HTTPS
    clients: SSL_CERT_FILE here (a private CA), else certifi's bundle."""
    from tests.certificates import self_signed

    cert, key = self_signed(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = _refusing_identity_provider(context)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    settings = load_settings({
        "USERPILOT_API_KEY": "wt_1234567890", "USERPILOT_ANALYTICS_ENDPOINT": "a.example",
        "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1", "KAFKA_TOPICS": "events",
        "SCHEMA_REGISTRY_URL": "http://registry:8081", "SSL_CERT_FILE": str(cert),
        **{f"KAFKA_{key.upper().replace('.', '_')}": value
           for key, value in _oidc_conf(f"https://localhost:{server.server_port}/t").items()
           if key != "bootstrap.servers"}}, check_clients=False)
    conf = settings.kafka_config(logger=False)
    assert conf["https.ca.location"] == str(cert)
    try:
        problem = reach.kafka(conf, 3)
    finally:
        server.shutdown()
    assert problem is not None and "invalid_client" in problem, problem  # TLS passed


def test_a_client_secret_the_identity_provider_refuses_is_still_a_refusal() -> None:
    server = _refusing_identity_provider()
    try:
        problem = reach.kafka(_oidc_conf(f"http://127.0.0.1:{server.server_port}/token"), 3)
    finally:
        server.shutdown()
    assert problem is not None and not isinstance(problem, reach.Unreachable), problem
    assert "refused the connection" in problem and "invalid_client" in problem


def test_a_host_that_does_not_resolve_is_named_without_a_tls_hint() -> None:
    """The failure names the host and DNS; a CA-bundle hint beside it misled (http33)."""
    unresolved = load_settings({
        "USERPILOT_API_KEY": "wt_1234567890",
        "USERPILOT_ANALYTICS_ENDPOINT": "analytex.userpilot.invalid",
        "KAFKA_BOOTSTRAP_SERVERS": "kafka:9092", "KAFKA_TOPICS": "events",
        "SCHEMA_REGISTRY_URL": "http://registry:8081"}, check_clients=False)
    problem = reach.userpilot(unresolved, 5)
    assert problem is not None
    assert "cannot resolve 'analytex.userpilot.invalid'" in problem
    assert "USERPILOT_CA_BUNDLE" not in problem


def test_a_proxy_that_cannot_reach_userpilot_is_named_without_a_tls_hint() -> None:
    """A proxy answering the tunnel with 502 failed before any TLS: the problem names the
    proxy's status and gives no CA-bundle hint (http33); a connection that failed
    otherwise over https still gets the hint (`ConnectionFailed.before_tls`)."""
    env = {"USERPILOT_API_KEY": "wt_1234567890",
           "USERPILOT_ANALYTICS_ENDPOINT": "analytex.userpilot.io",
           "KAFKA_BOOTSTRAP_SERVERS": "kafka:9092", "KAFKA_TOPICS": "events",
           "SCHEMA_REGISTRY_URL": "http://registry:8081"}
    with answering(response(502, "Bad Gateway")) as port:
        proxied = load_settings({**env, "HTTPS_PROXY": f"http://127.0.0.1:{port}"},
                                check_clients=False)
        problem = reach.userpilot(proxied, 5)
    assert problem is not None and "the proxy refused the tunnel (HTTP 502)" in problem
    assert "USERPILOT_CA_BUNDLE" not in problem
    with answering(b"") as port:  # accepts, reads, closes: no TLS handshake at all
        direct = load_settings({**env, "USERPILOT_ANALYTICS_ENDPOINT": f"127.0.0.1:{port}"},
                               check_clients=False)
        problem = reach.userpilot(direct, 5)
    assert problem is not None and "USERPILOT_CA_BUNDLE" in problem, problem


@pytest.mark.parametrize(("shared", "families", "ensure_user"), [
    ("false", ("track", "identify"), "true"), ("true", ("all",), "true"),
    ("false", ("track", "identify"), "false")])
def test_the_redis_probe_covers_every_key_shape_run_uses(
        shared: str, families: tuple[str, ...], ensure_user: str) -> None:
    """Review redis34: the probe used Track's keys alone, so an ACL allowing only those
    passed check-config and run's start-up, and identify ran on its fallback for ever.
    With ensure-user, the identified users' keys are one more shape."""
    from consumer.calls import ENDPOINTS
    conf = load_settings({
        "USERPILOT_API_KEY": "wt_1234567890", "USERPILOT_ANALYTICS_ENDPOINT": "a.io",
        "KAFKA_BOOTSTRAP_SERVERS": "kafka:9092", "KAFKA_TOPICS": "events",
        "SCHEMA_REGISTRY_URL": "http://registry:8081", "REDIS_URL": "redis://r:6379/0",
        "USERPILOT_RATE_LIMIT_SHARED": shared, "USERPILOT_ENSURE_USER": ensure_user},
        check_clients=False)
    claims, budgets = reach.probe_keys(conf)
    users = ["user"] if ensure_user == "true" else []
    assert [c.split(":")[1] for c in claims] == [*ENDPOINTS, *users]
    assert tuple(b.split(":")[2] for b in budgets) == families
    assert all(":probe:" in b for b in budgets) and all(":probe-" in c for c in claims)


def test_the_source_topics_settings_are_read_in_one_request_within_one_timeout() -> None:
    """Review "diff46b": one DescribeConfigs per topic, each waited up to --timeout, held
    start-up for topics × timeout behind a broker slow to answer."""
    import time
    from typing import Any, cast

    from confluent_kafka.admin import ConfigResource

    class Entry:
        def __init__(self, value: str) -> None:
            self.value = value

    class Answer:
        def __init__(self, configs: dict[str, str] | None) -> None:
            self.configs = configs

        def result(self, timeout: float) -> dict[str, Entry]:
            if self.configs is None:  # never answered: waits its timeout out
                time.sleep(timeout)
                raise TimeoutError
            return {name: Entry(value) for name, value in self.configs.items()}

    class Admin:
        def __init__(self) -> None:
            self.calls: list[list[str]] = []

        def describe_configs(self, resources: list[ConfigResource],
                             request_timeout: float) -> dict[Any, Answer]:
            self.calls.append([r.name for r in resources])
            return {r: Answer({"cleanup.policy": "compact"} if r.name == "c" else None)
                    for r in resources}

    admin = Admin()
    started = time.monotonic()
    topics = [ConfigResource(ConfigResource.Type.TOPIC, name)
              for name in ("c", "s1", "s2", "s3", "s4", "s5")]
    found = reach._described(cast(Any, admin), topics, 0.3)
    assert time.monotonic() - started < 0.9, "one timeout for all, not one each (1.5 s)"
    assert admin.calls == [["c", "s1", "s2", "s3", "s4", "s5"]]
    assert found == {"c": {"cleanup.policy": "compact"}}


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_registry_proxy_refusing_its_credentials_names_the_proxy(scheme: str) -> None:
    """Review "registry54": a 407 from the registry's proxy said "check SCHEMA_REGISTRY_URL
    (include the API path)"; to an https registry's tunnel (review "compat54") "not
    reachable through the proxy", and `run` waited for ever. It is the proxy's
    credentials; its password is not shown."""
    refusal = _answer("407 Proxy Authentication Required", "text/plain", b"no")
    with answering(refusal) as port:
        said = reach.registry(f"{scheme}://registry.example:8081", None, 5,
                              proxy=f"http://bob:pw-S3CRET@127.0.0.1:{port}")
    assert said is not None and not isinstance(said, reach.Unreachable)
    assert f"the proxy http://***@127.0.0.1:{port} refused its credentials (407)" in said
    assert "SCHEMA_REGISTRY_URL" not in said and "S3CRET" not in said


def test_a_registry_certificate_not_trusted_is_a_setting_not_an_outage(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review "registry54": an untrusted certificate read "not reachable (ConnectError):
    check SCHEMA_REGISTRY_URL", and `run` waited for ever for a registry that was up. It is
    a setting (run exits, as for Kafka's and Redis' certificates) naming SSL_CERT_FILE;
    with the CA there, the same registry passes."""
    cert, key = self_signed(tmp_path)
    ok = _answer("200 OK", "application/vnd.schemaregistry.v1+json", b'["a-value"]')
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(cert), str(key))
    with answering(ok, context) as port:
        said = reach.registry(f"https://127.0.0.1:{port}", None, 5)
        assert said is not None and not isinstance(said, reach.Unreachable)
        assert said.startswith(f"schema registry at https://127.0.0.1:{port}: its TLS "
                               "certificate is not trusted (")
        assert "give the CA that signed it in SSL_CERT_FILE" in said
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        assert reach.registry(f"https://127.0.0.1:{port}", None, 5) is None


def test_a_redis_too_slow_to_finish_the_start_up_probe_is_the_fallbacks(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Review "slow55": a Redis answering each call in 2.6 s held `run` unready for 110 s
    (the probe's ~40 calls, each within its own timeout). The whole probe has a budget:
    past it, Redis answered (a refusal shows at the first call) and is the fallback's."""
    from consumer.redisstore import RedisStore

    async def slow(self: RedisStore, *args: object) -> None:
        await asyncio.sleep(0.3)

    monkeypatch.setattr(RedisStore, "ping", slow)
    monkeypatch.setattr(RedisStore, "probe", slow)
    monkeypatch.setattr(reach, "REDIS_REFUSAL_BUDGET_S", 0.5)
    conf = load_settings({
        "USERPILOT_API_KEY": "wt_1234567890", "USERPILOT_ANALYTICS_ENDPOINT": "up.test",
        "KAFKA_BOOTSTRAP_SERVERS": "kafka:9092", "KAFKA_TOPICS": "events",
        "SCHEMA_REGISTRY_URL": "http://registry:8081",
        "REDIS_URL": "redis://127.0.0.1:1/0"}, check_clients=False)
    started = time.monotonic()
    assert reach.redis_refusal(conf, 5.0) is None
    assert time.monotonic() - started < 2.0


def test_a_dlq_topic_whose_settings_cannot_be_read_is_named() -> None:
    """Review "sasl55": a principal without DescribeConfigs passed every DLQ check (a
    compacted DLQ among them): `check-config --online` said OK, `run` started without a
    word, and compaction removed all but one dead letter per user. The gap is named."""
    from typing import Any, cast

    from confluent_kafka.admin import ConfigResource

    class Denied:
        def result(self, timeout: float) -> dict[str, Any]:
            raise RuntimeError("TOPIC_AUTHORIZATION_FAILED")

    class Topic:
        error = None

    class Metadata:
        def __init__(self, topics: dict[str, Topic]) -> None:
            self.topics = topics

    class Admin:
        def __init__(self, readable: bool, present: bool) -> None:
            self.readable, self.present = readable, present

        def describe_configs(self, resources: list[ConfigResource],
                             request_timeout: float) -> dict[Any, Any]:
            if self.readable:
                class Read:
                    def result(self, timeout: float) -> dict[str, Any]:
                        return {}
                return {r: Read() for r in resources}
            return {r: Denied() for r in resources}

        def list_topics(self, topic: str, timeout: float) -> Metadata:
            return Metadata({topic: Topic()} if self.present else {})

    def notes(readable: bool, present: bool) -> list[str]:
        return reach.topic_notes({}, [], "signal.dlq", 1.0,
                                 admin=cast(Any, Admin(readable, present)))

    [note] = notes(readable=False, present=True)
    assert "the DLQ topic 'signal.dlq''s settings could not be read" in note
    assert "--operation DescribeConfigs --topic signal.dlq" in note
    assert notes(readable=True, present=True) == []
    assert notes(readable=False, present=False) == [], "a missing DLQ is checked elsewhere"


@pytest.mark.parametrize(("conf", "largest", "noted"), [
    ({"receive.message.max.bytes": "20000"}, "1048588", "1,049,612"),
    ({}, "1048588", ""), ({}, "99999000", "100,000,024"),
    ({"receive.message.max.bytes": "200000000"}, "99999000", ""),
    ({"receive.message.max.bytes": "20000"}, "", ""),
    # Not given, librdkafka raises it to fetch.max.bytes + 512 itself; the advice keeps
    # to its rule (review "diff59b": "at least 150,001,024" was refused at start-up).
    ({"fetch.max.bytes": "200000000"}, "150000000", ""),
    ({"fetch.max.bytes": "200000000"}, "250000000", "250,001,024"),
    ({"fetch.max.bytes": "200000000", "receive.message.max.bytes": "100000000"},
     "150000000", "200,000,512")])
def test_a_source_topic_whose_largest_batch_the_consumer_cannot_receive_is_named(
        conf: dict[str, str], largest: str, noted: str) -> None:
    """Review "sizes59": with KAFKA_RECEIVE_MESSAGE_MAX_BYTES below a record batch the
    source topic takes, the consumer dropped its connection at every fetch of it and the
    worker read as in a Kafka outage; `check-config --online` had said OK."""
    from typing import Any, cast

    from confluent_kafka.admin import ConfigResource

    class Entry:
        def __init__(self, value: str) -> None:
            self.value = value

    class Admin:
        def describe_configs(self, resources: list[ConfigResource],
                             request_timeout: float) -> dict[Any, Any]:
            class Read:
                def __init__(self, name: str) -> None:
                    self.name = name

                def result(self, timeout: float) -> dict[str, Any]:
                    if self.name != "events" or not largest:
                        return {}
                    return {"max.message.bytes": Entry(largest)}
            return {r: Read(r.name) for r in resources}

    notes = reach.topic_notes(conf, ["events"], "signal.dlq", 1.0, admin=cast(Any, Admin()))
    assert bool(notes) is bool(noted), notes
    if noted:
        assert f"Raise KAFKA_RECEIVE_MESSAGE_MAX_BYTES to at least {noted}" in notes[0]
        assert "the source topic 'events' takes record batches of up to" in notes[0]


def test_kafka_not_reachable_quotes_the_brokers_last_error() -> None:
    """Review "sasl55": a client certificate the brokers refused read "Broker transport
    failure" only (an outage, waited for for ever); librdkafka's error callback had the
    reason ("alert bad certificate"). The brokers' last error is quoted."""
    problem = reach.kafka({"bootstrap.servers": "127.0.0.1:1"}, 1.5, [], None)
    assert isinstance(problem, reach.Unreachable)
    assert "the brokers' last error: 127.0.0.1:1/bootstrap: Connect to" in problem
    assert "Connection refused" in problem


class _AuthorizedOps:
    """An admin client answering `describe_topics` / `describe_consumer_groups` with the
    authorized operations given (an exception instance: that error instead)."""

    def __init__(self, topics: dict[str, Any], group: Any) -> None:
        self.topics = topics
        self.group = group

    @staticmethod
    def _future(result: Any) -> Any:
        from concurrent.futures import Future

        future: Future[Any] = Future()
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(SimpleNamespace(authorized_operations=result))
        return future

    def describe_topics(self, topics: Any, **_: Any) -> dict[str, Any]:
        return {name: self._future(self.topics[name]) for name in topics.topic_names}

    def describe_consumer_groups(self, groups: list[str], **_: Any) -> dict[str, Any]:
        return {group: self._future(self.group) for group in groups}


_RD = [AclOperation.READ, AclOperation.DESCRIBE]
_CONF = {"bootstrap.servers": "b:9092", "sasl.mechanism": "PLAIN", "sasl.username": "svc"}


@pytest.mark.parametrize(("topic", "dlq", "group", "denied"), [
    (_RD, [AclOperation.WRITE, AclOperation.DESCRIBE], _RD, None),
    ([AclOperation.ALL, AclOperation.DESCRIBE], [AclOperation.ALL, AclOperation.DESCRIBE],
     [AclOperation.ALL, AclOperation.DESCRIBE], None),
    ([AclOperation.DESCRIBE], [AclOperation.WRITE, AclOperation.DESCRIBE], _RD,
     "Read on topic 's'"),
    (_RD, _RD, _RD, "Write on topic 'd'"),
    (_RD, [AclOperation.WRITE, AclOperation.DESCRIBE], [AclOperation.DESCRIBE],
     "Read on group 'g'"),
    (_RD, [AclOperation.WRITE, AclOperation.DESCRIBE],
     KafkaException(KafkaError(KafkaError.GROUP_AUTHORIZATION_FAILED)), "Read on group 'g'"),
    # No verdict: the operations not given (None), or a set without the DESCRIBE every
    # resource described to the worker allows it (a broker or proxy answering nothing).
    (None, [], [AclOperation.READ], None),
    (_RD, [AclOperation.DESCRIBE_CONFIGS], None, None),
    (KafkaException(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED)), None,
     KafkaException(KafkaError(KafkaError._TIMED_OUT)), None),
])
def test_acl_problem_names_what_the_brokers_deny(topic: Any, dlq: Any, group: Any,
                                                 denied: str | None) -> None:
    admin = _AuthorizedOps({"s": topic, "d": dlq}, group)
    problem = reach.acl_problem(admin, _CONF, ["s"], "d", "g", 1.0)
    if denied is None:
        assert problem is None
        return
    assert problem is not None
    assert problem.startswith(f"Kafka refuses the worker's principal {denied}: grant it, ")
    assert ("kafka-acls.sh --bootstrap-server b:9092 --command-config admin.properties --add "
            "--allow-principal User:svc --operation ") in problem
    assert problem.endswith("; or remove a DENY ACL that overrides a grant")


@pytest.mark.parametrize(("conf", "principal"), [
    ({"sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "we ird;user"}, "'User:we ird;user'"),
    ({"sasl.mechanisms": "PLAIN", "sasl.username": "svc"}, "User:svc"),
    # A user name left from another mechanism is not the principal (OAuth, Kerberos).
    ({"sasl.mechanism": "OAUTHBEARER", "sasl.username": "svc"}, "'<principal>'"),
    ({"sasl.username": "svc"}, "'<principal>'"),
    ({}, "'<principal>'"),
])
def test_the_grant_command_quotes_its_principal_for_a_shell(conf: dict[str, str],
                                                            principal: str) -> None:
    """Review "acl56": a user `we ird;user` ran `user` as a second command; `<principal>`
    was read as a redirection."""
    admin = _AuthorizedOps({}, [AclOperation.DESCRIBE])
    problem = reach.acl_problem(admin, {"bootstrap.servers": "b", **conf}, [], None, "g", 1.0)
    assert problem is not None and f"--allow-principal {principal} --operation Read" in problem


def test_acl_problem_lists_every_denial_and_skips_what_is_not_asked() -> None:
    admin = _AuthorizedOps({"s": [AclOperation.DESCRIBE], "d": [AclOperation.DESCRIBE]},
                           [AclOperation.DESCRIBE])
    problem = reach.acl_problem(admin, {"bootstrap.servers": "b"}, ["s"], "d", "g", 1.0)
    assert problem is not None
    assert "Read on topic 's', Write on topic 'd', Read on group 'g'" in problem
    assert "--allow-principal '<principal>' --operation Write --topic d;" in problem
    assert reach.acl_problem(admin, {}, [], None, None, 1.0) is None


@pytest.mark.parametrize(("value", "judged"), [
    (True, True), ("true", True), ("T", True), ("1", True), ("t", True),
    (False, False), ("false", False), ("f", False), ("0", False)])
def test_the_producer_id_is_judged_for_idempotence_as_librdkafka_reads_it(
        value: object, judged: bool) -> None:
    """Review "diff58b": `t` is true to librdkafka, and was "not idempotent" here."""
    settings: dict[str, object] = {"enable.idempotence": value}
    assert reach._ProducerId(settings).wanted is judged
    assert reach._ProducerId(settings, wanted=False).wanted is False  # a dry run's
    assert ("stats_cb" in settings) is judged


@pytest.mark.parametrize("producer_id", [True, False])
def test_a_dry_runs_probe_asks_for_no_producer_id(
        monkeypatch: pytest.MonkeyPatch, producer_id: bool) -> None:
    """CI, round 59: `replay --dry-run` of a read-only principal failed now and then with
    "Kafka failed (Failed to acquire idempotence PID ...)": its probe producer, idempotent,
    asked for a producer id the brokers refuse, a fatal error its flush then raised. The
    probe of a run that makes no producer is not idempotent; `run`'s and check-config's are
    (they judge the producer id)."""
    from confluent_kafka import KafkaException

    built: list[dict[str, object]] = []

    class Probe:
        def __init__(self, settings: dict[str, object]) -> None:
            built.append(settings)
            raise KafkaException("stop here")

    monkeypatch.setattr(reach, "Producer", Probe)
    conf = {"bootstrap.servers": "127.0.0.1:1", "enable.gapless.guarantee": "true"}
    reach.kafka(conf, 0.5, [], None, producer_id=producer_id)
    assert built and built[0]["enable.idempotence"] is producer_id
    assert ("enable.gapless.guarantee" in built[0]) is producer_id
