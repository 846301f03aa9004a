"""Operations against a running worker process (issue "Operations"): what Prometheus scrapes,
what Kubernetes probes see, and what the logs and dead letters never contain.

Each test runs the real `python -m consumer run` against the real broker, registry and
sandbox, because the point is what an operator observes from outside: a metric that only
exists in a unit test's registry, or a readiness flip that only a mock sees, pages nobody.
"""

from __future__ import annotations

import gzip
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from consumer.config import load_settings
from consumer.explain import explain_lines
from consumer.sandbox import SandboxControl, SandboxThread
from ops.check_metric_names import DEFAULT_FILES, used_names
from tests.integration.harness import (
    READ_TOKEN,
    REPO,
    WRITE_TOKEN,
    Samples,
    WorkerProcess,
    WorkerThread,
    caught_up,
    committed_offsets,
    end_offsets,
    free_port,
    get,
    produce,
    produce_raw,
    read_topic,
    scrape,
    track_event,
    value,
    wait_until,
    worker_env,
)

SAMPLES = REPO / "schemas" / "sample-events.jsonl"
Sandbox = tuple[SandboxThread, SandboxControl]
NOT_READY_REASON = "Userpilot refuses delivery: HTTP "
# librdkafka's "no offset committed" sentinel, as returned by Consumer.committed().
OFFSET_INVALID = -1001


# -- helpers ------------------------------------------------------------------------------
def total(samples: Samples, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def exported_names(text: str) -> set[str]:
    """Every name a query can use against this scrape: sample names as exposed (counters
    with _total, histogram _bucket/_sum/_count) plus histogram base names."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(s.name for s in family.samples)
        if family.type == "histogram":
            names.add(family.name)
    return names


def _lag_settled(samples: Samples, topic: str, ends: dict[int, int]) -> bool:
    return all(
        value(samples, "userpilot_consumer_lag", topic=topic, partition=str(p)) == 0
        for p, end in ends.items()
        if end
    )




def start_worker(env: dict[str, str], log: Path) -> tuple[WorkerProcess, int]:
    """A worker process with its probe server on a port of ours; waits until it listens."""
    port = free_port()
    worker = WorkerProcess({**env, "WORKER_METRICS_PORT": str(port)}, log)
    try:
        wait_until(
            lambda: get(port, "/healthz")[0] != 0 or worker.proc.poll() is not None,
            30,
            "the probe server to listen",
        )
        assert worker.proc.poll() is None, f"worker exited early:\n{worker.output()}"
    except BaseException:
        worker.kill()
        raise
    return worker, port


def stop_worker(worker: WorkerProcess) -> None:
    """SIGTERM and require a clean exit (drain + final commit), showing the log if not."""
    code = worker.terminate(45) if worker.proc.poll() is None else worker.wait(1)
    assert code == 0, f"worker exit code {code}:\n{worker.output()[-4000:]}"


@pytest.fixture
def not_found_server() -> Iterator[str]:
    """A host:port that answers 404 to every request, like a wrong analytics endpoint."""

    class Handler(BaseHTTPRequestHandler):
        def _reply(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            body = b'{"error": "not found"}'
            self.send_response(404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = _reply

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


# -- 1. the scrape has every name the dashboard and alerts use, and counts what happened ----
def test_scrape_after_demo_set_exports_every_used_name_and_counts_match(
    kafka_bootstrap: str,
    schema_registry_url: str,
    topic_factory: Callable[..., str],
    sandbox: Sandbox,
    tmp_path: Path,
) -> None:
    server, control = sandbox
    topic = topic_factory(partitions=3)
    dlq = topic_factory(partitions=1, suffix="-dlq")
    lines = SAMPLES.read_text().splitlines()
    produce(kafka_bootstrap, schema_registry_url, topic, [json.loads(x) for x in lines])
    produce_raw(kafka_bootstrap, topic, b"poison", b"plain bytes, not the Confluent wire format")
    group = f"{topic}-g"
    env = worker_env(
        kafka_bootstrap, schema_registry_url, server.url, topic, group, KAFKA_DLQ_TOPIC=dlq
    )
    docs = [d for d in explain_lines(lines, load_settings(env)) if d["decision"] == "deliver"]
    delivered = [d["request"]["body"]["event_name"] for d in docs
                 if d["request"]["url"].endswith("/v1/track")]
    assert len(delivered) == 11 and len(set(delivered)) == 11, "11 preset events, 1 each"
    identifies = sum(1 for d in docs for r in d["requests"] if r["url"].endswith("/v1/identify"))
    companies = sum(1 for d in docs for r in d["requests"]
                    if r["url"].endswith("/v1/companies/identify"))
    ensured = sum(1 for d in docs for r in d["requests"] if r["purpose"] == "ensure_user")
    ends = end_offsets(kafka_bootstrap, topic)
    assert sum(ends.values()) == len(lines) + 1

    worker, port = start_worker(env, tmp_path / "worker.log")
    try:
        wait_until(caught_up(kafka_bootstrap, group, topic), 60, "offsets at the end")
        # Lag comes from librdkafka statistics (every 5 s): give them three intervals to show
        # up; if they don't, the name check below says which panels and alerts go blank.
        deadline = time.monotonic() + 15
        text, samples = scrape(port)
        while not _lag_settled(samples, topic, ends) and time.monotonic() < deadline:
            time.sleep(0.5)
            text, samples = scrape(port)
    finally:
        stop_worker(worker)

    # Every userpilot_* name used by a panel or an alert rule is in the live scrape.
    exported = exported_names(text)
    for path in DEFAULT_FILES:
        used = used_names(path.read_text(encoding="utf-8"))
        assert used, f"{path.name} uses no userpilot_* metric: the extraction broke"
        missing = used - exported
        assert not missing, (
            f"{path.name} uses metrics the running worker doesn't export: {sorted(missing)}"
        )

    m = samples
    assert value(m, "userpilot_events_consumed_total", topic=topic) == len(lines) + 1
    assert total(m, "userpilot_events_consumed_total") == len(lines) + 1
    for name in delivered:
        assert value(m, "userpilot_events_delivered_total", event_name=name) == 1, name
    assert value(m, "userpilot_events_delivered_total", event_name="identify") == 2
    assert value(m, "userpilot_events_delivered_total", event_name="group") == 2
    assert total(m, "userpilot_events_delivered_total") == 15
    assert value(m, "userpilot_events_dropped_total", reason="anonymous", category="") == 1
    assert value(m, "userpilot_events_dropped_total", reason="consent", category="analytics") == 2
    assert value(m, "userpilot_events_dropped_total", reason="unmapped", category="") == 1
    assert value(m, "userpilot_events_dropped_total", reason="unsupported_type", category="") == 0
    assert total(m, "userpilot_events_dropped_total") == 4
    assert value(m, "userpilot_events_dead_lettered_total", reason="undecodable") == 1
    assert total(m, "userpilot_events_dead_lettered_total") == 1
    assert value(m, "userpilot_responses_total", status="202", endpoint="track") == 11
    assert value(m, "userpilot_responses_total", status="202", endpoint="identify") == identifies
    assert value(m, "userpilot_responses_total", status="200",
                 endpoint="company_identify") == companies
    assert total(m, "userpilot_responses_total") == 11 + identifies + companies, "no other"
    assert value(m, "userpilot_ensure_user_identify_total") == ensured
    assert total(m, "userpilot_retries_total") == 0
    assert value(m, "userpilot_delivery_latency_seconds_count", endpoint="track") == 11
    assert value(m, "userpilot_delivery_latency_seconds_count",
                 endpoint="identify") == identifies
    assert value(m, "userpilot_delivery_latency_seconds_count",
                 endpoint="company_identify") == companies
    assert value(m, "userpilot_event_age_seconds_count") == 15  # every delivered event
    assert value(m, "userpilot_rate_limiter_wait_seconds_count", endpoint="track") == 11
    assert value(m, "userpilot_rate_limiter_wait_seconds_count",
                 endpoint="identify") == identifies + companies  # the identify family
    assert value(m, "userpilot_in_flight_events") == 0
    assert value(m, "userpilot_paused_partitions") == 0
    assert value(m, "userpilot_integration_up") == 1
    assert value(m, "userpilot_dlq_guard_tripped") == 0
    assert value(m, "userpilot_worker_ready") == 1
    assert (value(m, "userpilot_rebalances_total", kind="assign") or 0) >= 1
    for partition, end in ends.items():
        if end:
            assert (
                value(m, "userpilot_committed_offset", topic=topic, partition=str(partition)) == end
            ), f"partition {partition}"
            assert value(m, "userpilot_consumer_lag", topic=topic, partition=str(partition)) == 0, (
                f"partition {partition}"
            )
    assert len(control.requests("/v1/track")) == 11
    dead = read_topic(kafka_bootstrap, dlq)
    assert [(d.key(), d.value()) for d in dead] == [
        (b"poison", b"plain bytes, not the Confluent wire format")
    ]
    assert dict(dead[0].headers())["userpilot.error.reason"] == b"undecodable"
    assert WRITE_TOKEN not in text


# -- 1b. the ecosystem's standard series: process, Python runtime, build info ---------------
def test_scrape_has_process_python_and_build_info_series_in_both_formats(
    kafka_bootstrap: str,
    schema_registry_url: str,
    topic_factory: Callable[..., str],
    sandbox: Sandbox,
    tmp_path: Path,
) -> None:
    server, _ = sandbox
    topic = topic_factory(partitions=1)
    env = worker_env(
        kafka_bootstrap,
        schema_registry_url,
        server.url,
        topic,
        f"{topic}-g",
        KAFKA_DLQ_TOPIC=topic_factory(suffix="-dlq"),
        USERPILOT_WORKER_REVISION="it-0123456789ab",
    )
    started = time.time()
    worker, port = start_worker(env, tmp_path / "worker.log")
    try:
        text, samples = scrape(port)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/metrics",
            headers={
                "Accept": "application/openmetrics-text;version=1.0.0",
                "Accept-Encoding": "gzip",
            },
        )
        with urllib.request.urlopen(request, timeout=5) as resp:
            om_type, om_encoding = resp.headers["Content-Type"], resp.headers["Content-Encoding"]
            om_text = gzip.decompress(resp.read()).decode()
    finally:
        stop_worker(worker)

    # process_*: the worker process's own RSS, CPU, file descriptors and start time.
    rss = value(samples, "process_resident_memory_bytes")
    assert rss is not None and rss > 10_000_000, rss
    fds = value(samples, "process_open_fds")
    assert fds is not None and fds >= 3
    max_fds = value(samples, "process_max_fds")
    assert max_fds is not None and max_fds >= fds
    assert (value(samples, "process_cpu_seconds_total") or 0) > 0
    start = value(samples, "process_start_time_seconds")
    assert start is not None and started - 5 <= start <= time.time(), (started, start)
    # python_*: interpreter info and garbage-collector counters.
    info = [labels for (name, labels), _ in samples.items() if name == "python_info"]
    assert len(info) == 1 and ("implementation", "CPython") in info[0]
    assert total(samples, "python_gc_collections_total") > 0
    # the build this replica runs
    build = {
        labels: v for (name, labels), v in samples.items() if name == "userpilot_build_info"
    }
    version = metadata.version("userpilot-delivery-worker")
    assert build == {frozenset({("version", version), ("revision", "it-0123456789ab")}): 1}
    assert WRITE_TOKEN not in text
    # The same registry in OpenMetrics, gzipped, as prometheus_client negotiates it.
    assert om_type.startswith("application/openmetrics-text") and om_encoding == "gzip"
    assert om_text.endswith("# EOF\n")
    assert "process_resident_memory_bytes " in om_text
    assert f'userpilot_build_info{{revision="it-0123456789ab",version="{version}"}} 1.0' in om_text


# -- 2. probes: live and ready when healthy, not ready while Userpilot refuses ---------------
def test_sigterm_as_soon_as_the_probes_answer_is_a_clean_exit(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    sandbox: Sandbox, tmp_path: Path,
) -> None:
    """Kubernetes may stop a pod the moment it starts: the handler is in place before the
    probes answer (it was installed only once the event loop ran: exit -15, 10 of 10 here)."""
    server, _ = sandbox
    topic = topic_factory(partitions=1)
    env = worker_env(kafka_bootstrap, schema_registry_url, server.url, topic, f"{topic}-g")
    for attempt in range(3):
        worker, _ = start_worker(env, tmp_path / f"worker{attempt}.log")
        stop_worker(worker)  # SIGTERM at once; exit code 0 required


def test_healthz_and_readyz_are_200_while_assigned_and_delivering(
    kafka_bootstrap: str,
    schema_registry_url: str,
    topic_factory: Callable[..., str],
    sandbox: Sandbox,
    tmp_path: Path,
) -> None:
    server, control = sandbox
    topic = topic_factory(partitions=2)
    group = f"{topic}-g"
    env = worker_env(
        kafka_bootstrap,
        schema_registry_url,
        server.url,
        topic,
        group,
        KAFKA_DLQ_TOPIC=topic_factory(suffix="-dlq"),
    )
    worker, port = start_worker(env, tmp_path / "worker.log")
    try:
        assert get(port, "/healthz") == (200, "ok\n")
        wait_until(lambda: get(port, "/readyz")[0] == 200, 30, "/readyz 200 once assigned")
        assert get(port, "/readyz") == (200, "ready\n")
        produce(
            kafka_bootstrap,
            schema_registry_url,
            topic,
            [track_event(f"u{i}", i) for i in range(20)],
        )
        wait_until(caught_up(kafka_bootstrap, group, topic), 30, "offsets at the end")
        assert get(port, "/healthz")[0] == 200
        assert get(port, "/readyz") == (200, "ready\n")
        _, samples = scrape(port)
        assert value(samples, "userpilot_worker_ready") == 1
        assert value(samples, "userpilot_integration_up") == 1
        assert len(control.requests("/v1/track")) == 20
        assert get(port, "/nope")[0] == 404
    finally:
        stop_worker(worker)


@pytest.mark.parametrize("refusal", ["403", "404"])
def test_readyz_flips_to_503_while_userpilot_refuses_and_nothing_is_lost(
    refusal: str,
    kafka_bootstrap: str,
    schema_registry_url: str,
    topic_factory: Callable[..., str],
    sandbox: Sandbox,
    not_found_server: str,
    tmp_path: Path,
) -> None:
    server, control = sandbox
    topic = topic_factory(partitions=1)
    dlq = topic_factory(suffix="-dlq")
    group = f"{topic}-g"
    events = [track_event(f"u{i % 3}", i) for i in range(6)]
    produce(kafka_bootstrap, schema_registry_url, topic, events)
    if refusal == "403":  # the read/export token where the write token belongs
        env = worker_env(
            kafka_bootstrap,
            schema_registry_url,
            server.url,
            topic,
            group,
            USERPILOT_API_KEY=READ_TOKEN,
        )
        token = READ_TOKEN
    else:  # a host that isn't Userpilot's analytics endpoint
        env = worker_env(
            kafka_bootstrap, schema_registry_url, f"http://{not_found_server}", topic, group
        )
        token = WRITE_TOKEN
    env.update(
        KAFKA_DLQ_TOPIC=dlq,
        WORKER_SHUTDOWN_GRACE_SECONDS="2",
        USERPILOT_RETRY_MAX_ATTEMPTS="2",
        USERPILOT_RETRY_BUDGET_SECONDS="1",
    )

    worker, port = start_worker(env, tmp_path / "worker.log")
    try:
        wait_until(
            lambda: get(port, "/readyz")[0] == 503 and NOT_READY_REASON in get(port, "/readyz")[1],
            30,
            "/readyz 503 naming the refusal",
        )
        text, samples = scrape(port)
        assert value(samples, "userpilot_integration_up") == 0
        assert value(samples, "userpilot_worker_ready") == 0
        assert sum(value(samples, "userpilot_responses_total", status=refusal, endpoint=e)
                   or 0 for e in ("track", "identify")) >= 1
        assert (value(samples, "userpilot_retries_total", cause="misconfigured") or 0) >= 1
        assert get(port, "/healthz") == (200, "ok\n"), "alive: a restart would not help"
        # Several commit intervals (0.5 s) and retry budgets (1 s) pass: still nothing
        # given up, nothing committed past the first event.
        time.sleep(3)
        status, reason = get(port, "/readyz")
        assert status == 503 and reason.startswith(f"{NOT_READY_REASON}{refusal}"), reason
        _, samples = scrape(port)
        assert value(samples, "userpilot_integration_up") == 0
        assert total(samples, "userpilot_events_dead_lettered_total") == 0
        assert total(samples, "userpilot_events_delivered_total") == 0
        assert value(samples, "userpilot_events_consumed_total", topic=topic) == len(events)
        assert read_topic(kafka_bootstrap, dlq, timeout=3) == []
        committed = committed_offsets(kafka_bootstrap, group, topic).get(0, OFFSET_INVALID)
        assert committed in (OFFSET_INVALID, 0), f"committed past the first event: {committed}"
        assert token not in text
    finally:
        stop_worker(worker)
    assert token not in worker.output()
    assert read_topic(kafka_bootstrap, dlq, timeout=3) == [], "shutdown dead-lettered nothing"
    committed = committed_offsets(kafka_bootstrap, group, topic).get(0, OFFSET_INVALID)
    assert committed in (OFFSET_INVALID, 0), f"shutdown committed undelivered events: {committed}"
    assert control.requests("/v1/track") == []


def test_readyz_recovers_when_the_token_is_accepted_again(
    kafka_bootstrap: str,
    schema_registry_url: str,
    topic_factory: Callable[..., str],
    sandbox: Sandbox,
    tmp_path: Path,
) -> None:
    server, control = sandbox
    topic = topic_factory(partitions=1)
    group = f"{topic}-g"
    events = [track_event(f"u{i % 3}", i) for i in range(6)]
    produce(kafka_bootstrap, schema_registry_url, topic, events)
    env = worker_env(
        kafka_bootstrap,
        schema_registry_url,
        server.url,
        topic,
        group,
        USERPILOT_API_KEY=READ_TOKEN,
        KAFKA_DLQ_TOPIC=topic_factory(suffix="-dlq"),
    )
    worker, port = start_worker(env, tmp_path / "worker.log")
    try:
        wait_until(
            lambda: get(port, "/readyz")[0] == 503 and NOT_READY_REASON in get(port, "/readyz")[1],
            30,
            "/readyz 503",
        )
        control.set_tokens(write_tokens=[READ_TOKEN, WRITE_TOKEN], read_tokens=[])
        wait_until(lambda: get(port, "/readyz")[0] == 200, 30, "/readyz 200 again")
        wait_until(caught_up(kafka_bootstrap, group, topic), 30, "offsets at the end")
        _, samples = scrape(port)
        assert value(samples, "userpilot_integration_up") == 1
        assert total(samples, "userpilot_events_delivered_total") == len(events)
        assert total(samples, "userpilot_events_dead_lettered_total") == 0
    finally:
        stop_worker(worker)
    got = sorted(r["body"]["metadata"]["seq"] for r in control.requests("/v1/track"))
    assert got == list(range(len(events))), "every held event delivered once after recovery"


# -- 3. the token never appears; JSON logs parse and carry event coordinates ---------------
EVENT_MESSAGES = (
    "dropped",
    "dead-lettered",
    "schema registry unavailable",
    "dead-letter produce failed",
    "DLQ guard tripped",
)


def test_token_never_appears_in_logs_metrics_or_dead_letters(
    kafka_bootstrap: str,
    schema_registry_url: str,
    topic_factory: Callable[..., str],
    sandbox: Sandbox,
    tmp_path: Path,
) -> None:
    server, control = sandbox
    topic = topic_factory(partitions=2)
    dlq = topic_factory(suffix="-dlq")
    group = f"{topic}-g"
    env = worker_env(
        kafka_bootstrap,
        schema_registry_url,
        server.url,
        topic,
        group,
        KAFKA_DLQ_TOPIC=dlq,
        WORKER_LOG_FORMAT="json",
        WORKER_LOG_LEVEL="debug",
    )
    control.set_faults(rules=[{"event_name": "searched", "action": "400"}])
    lines = SAMPLES.read_text().splitlines()
    worker, port = start_worker(env, tmp_path / "worker.log")
    try:
        # Phase 1: deliveries, drops, and one payload Userpilot rejects with 400.
        produce(kafka_bootstrap, schema_registry_url, topic, [json.loads(x) for x in lines])
        produce_raw(kafka_bootstrap, topic, b"poison", b"not wire format")
        wait_until(caught_up(kafka_bootstrap, group, topic), 45, "phase 1 committed")
        _, samples = scrape(port)
        assert value(samples, "userpilot_events_dead_lettered_total", reason="bad_request") == 1
        assert value(samples, "userpilot_events_dead_lettered_total", reason="undecodable") == 1
        # 10 tracks, 2 identify, 2 group
        assert total(samples, "userpilot_events_delivered_total") == 14
        # Phase 2: Userpilot starts refusing the token (403), then accepts it again.
        control.set_tokens(write_tokens=["rotated-write-token"], read_tokens=[WRITE_TOKEN])
        produce(
            kafka_bootstrap,
            schema_registry_url,
            topic,
            [track_event(f"late{i}", i) for i in range(4)],
        )
        wait_until(
            lambda: value(scrape(port)[1], "userpilot_integration_up") == 0,
            30,
            "integration down on 403",
        )
        assert get(port, "/readyz")[0] == 503
        metrics_during_403 = scrape(port)[0]
        control.set_tokens(write_tokens=[WRITE_TOKEN], read_tokens=[READ_TOKEN])
        wait_until(caught_up(kafka_bootstrap, group, topic), 45, "phase 2 committed")
        metrics_text, samples = scrape(port)
        assert total(samples, "userpilot_events_delivered_total") == 18
        assert sum(value(samples, "userpilot_responses_total", status="403", endpoint=e)
                   or 0 for e in ("track", "identify")) >= 1
    finally:
        stop_worker(worker)

    output = worker.output()
    assert WRITE_TOKEN not in output
    assert WRITE_TOKEN not in metrics_during_403 and WRITE_TOKEN not in metrics_text
    dead = read_topic(kafka_bootstrap, dlq)
    assert sorted(dict(d.headers())["userpilot.error.reason"] for d in dead) == [
        b"bad_request",
        b"undecodable",
    ]
    token = WRITE_TOKEN.encode()
    for record in dead:
        assert token not in (record.key() or b"")
        assert token not in (record.value() or b"")
        for name, raw in record.headers() or []:
            assert WRITE_TOKEN not in name and token not in (raw or b""), name

    docs = []
    for n, line in enumerate(output.splitlines(), 1):
        if not line.strip():
            continue
        try:
            docs.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"log line {n} is not JSON: {line!r}")
    assert all({"time", "level", "logger", "message"} <= d.keys() for d in docs)
    event_lines = [d for d in docs if d["message"].startswith(EVENT_MESSAGES)]
    # 4 drops (debug) and 2 dead letters of the sample set at least (identify is sent).
    assert sum(d["message"].startswith("dropped") for d in event_lines) == 4
    assert sum(d["message"].startswith("dead-lettered") for d in event_lines) == 2
    ends = end_offsets(kafka_bootstrap, topic)
    for d in event_lines:
        assert d.get("topic") == topic, d
        assert d.get("partition") in ends, d
        assert isinstance(d.get("offset"), int) and 0 <= d["offset"] < ends[d["partition"]], d
        assert "message_id" in d, d
    assert any(d["message"].startswith("delivery paused (misconfigured)") for d in docs)
    assert any(d["message"].startswith("Userpilot answers again") for d in docs)


def test_a_tripped_dlq_guard_stays_visible_to_scrapes_before_exit_code_3(
    kafka_bootstrap: str,
    schema_registry_url: str,
    topic_factory: Callable[..., str],
    sandbox: Sandbox,
    tmp_path: Path,
) -> None:
    """The gauge lived ~0.2 s (the process exited at once): a 30 s scrape never saw it, so
    UserpilotDlqGuardTripped never fired. Now the process holds, unready, then exits 3."""
    server, control = sandbox
    control.set_faults(rules=[{"event_name": "feature_used", "action": "400"}])
    topic = topic_factory(partitions=1)
    produce(kafka_bootstrap, schema_registry_url, topic,
            [track_event(f"u{i}", i) for i in range(20)])
    env = worker_env(kafka_bootstrap, schema_registry_url, server.url, topic, f"{topic}-g",
                     WORKER_DLQ_MAX_CONSECUTIVE="3", WORKER_DLQ_GUARD_HOLD_SECONDS="4",
                     USERPILOT_RETRY_BACKOFF_SECONDS="0.05")
    worker, port = start_worker(env, tmp_path / "worker.log")
    try:
        def tripped() -> bool:
            status, text = get(port, "/metrics")
            return status == 200 and "\nuserpilot_dlq_guard_tripped 1.0" in text
        wait_until(tripped, 60, "the guard's gauge at 1 on a scrape")
        seen = time.monotonic()
        time.sleep(1.0)  # a later scrape still sees it: the process is held, not gone
        assert worker.proc.poll() is None, worker.output()[-3000:]
        _, samples = scrape(port)
        assert value(samples, "userpilot_dlq_guard_tripped") == 1
        assert value(samples, "userpilot_worker_ready") == 0
        status, body = get(port, "/readyz")
        assert status == 503 and "DLQ guard" in body
        assert get(port, "/healthz")[0] == 200
        code = worker.wait(30)
    except BaseException:
        worker.kill()
        raise
    assert code == 3, worker.output()[-3000:]
    assert time.monotonic() - seen >= 2.5  # held ~4 s from the trip
    assert "holding 4s before exit code 3" in worker.output()


def test_the_lag_of_a_paused_partition_follows_the_growing_backlog(
    kafka_bootstrap: str,
    schema_registry_url: str,
    topic_factory: Callable[..., str],
    sandbox: Sandbox,
) -> None:
    """librdkafka learns the high watermark from fetches; a paused partition has none, so
    userpilot_consumer_lag froze at the pause while an outage's backlog grew."""
    server, control = sandbox
    control.set_faults(error_rate=1.0, error_codes=[503])
    topic = topic_factory(partitions=1)
    produce(kafka_bootstrap, schema_registry_url, topic,
            [track_event(f"u{i}", i) for i in range(30)])
    env = worker_env(kafka_bootstrap, schema_registry_url, server.url, topic, f"{topic}-g",
                     WORKER_MAX_IN_FLIGHT="5")
    with WorkerThread(env) as w:
        wait_until(lambda: w.metric("userpilot_paused_partitions") == 1, 30, "a pause")
        produce(kafka_bootstrap, schema_registry_url, topic,
                [track_event(f"v{i}", i) for i in range(200)])
        wait_until(lambda: w.metric("userpilot_consumer_lag", topic=topic, partition="0") == 230,
                   30, "the lag to count the new backlog")
        control.set_faults(error_rate=0.0)
        wait_until(caught_up(kafka_bootstrap, f"{topic}-g", topic), 60, "offsets at the end")


def test_a_sigterm_during_the_guards_own_shutdown_skips_the_hold(
    kafka_bootstrap: str,
    schema_registry_url: str,
    topic_factory: Callable[..., str],
    sandbox: Sandbox,
    tmp_path: Path,
) -> None:
    """A SIGTERM while the tripped worker drained was taken by the worker's handler; the
    hold then ran its whole length (Kubernetes signals once, then SIGKILLs)."""
    import signal

    server, control = sandbox
    control.set_faults(rules=[{"event_name": "feature_used", "action": "400"},
                              {"event_name": "logged_in", "action": "delay:6000"}])
    topic = topic_factory(partitions=1)
    events = [track_event(f"slow{i}", i, name="Logged In") for i in range(3)]
    events += [track_event(f"u{i}", i) for i in range(10)]
    produce(kafka_bootstrap, schema_registry_url, topic, events)
    env = worker_env(kafka_bootstrap, schema_registry_url, server.url, topic, f"{topic}-g",
                     WORKER_DLQ_MAX_CONSECUTIVE="3", WORKER_DLQ_GUARD_HOLD_SECONDS="40",
                     USERPILOT_ENSURE_USER="false", USERPILOT_RETRY_BACKOFF_SECONDS="0.05")
    worker, _ = start_worker(env, tmp_path / "worker.log")
    try:
        wait_until(lambda: "Not dead-lettering and stopping" in worker.output(), 60, "the trip")
        signalled = time.monotonic()
        worker.proc.send_signal(signal.SIGTERM)  # e.g. a rollout while it drains
        code = worker.wait(60)
    except BaseException:
        worker.kill()
        raise
    assert code == 3, worker.output()[-3000:]
    assert time.monotonic() - signalled < 20, "the hold ignored the SIGTERM"
    assert "holding" not in worker.output()


def test_partitions_added_to_the_source_topic_are_read_within_the_metadata_refresh(
    kafka_bootstrap: str,
    schema_registry_url: str,
    topic_factory: Callable[..., str],
    sandbox: Sandbox,
) -> None:
    """Adding partitions is how operators scale out past the replica count; with
    librdkafka's 300 s metadata refresh the new ones were first read 288 s later, two
    thirds of the keys undelivered meanwhile and readiness green."""
    from confluent_kafka.admin import AdminClient, NewPartitions

    from consumer.kafka import METADATA_REFRESH_MS

    server, control = sandbox
    topic = topic_factory(partitions=1)
    env = worker_env(kafka_bootstrap, schema_registry_url, server.url, topic, f"{topic}-g")
    with WorkerThread(env):
        produce(kafka_bootstrap, schema_registry_url, topic, [track_event("u0", 0)])
        wait_until(lambda: len(control.requests("/v1/track")) == 1, 30, "the first event")
        admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
        for future in admin.create_partitions([NewPartitions(topic, 3)]).values():
            future.result(30)
        added = time.monotonic()
        produce(kafka_bootstrap, schema_registry_url, topic,
                [track_event(f"u{i}", i) for i in range(1, 40)])
        assert set(end_offsets(kafka_bootstrap, topic)) == {0, 1, 2}
        wait_until(lambda: len(control.requests("/v1/track")) == 40,
                   METADATA_REFRESH_MS / 1000 + 30, "the events of the new partitions")
        assert time.monotonic() - added < METADATA_REFRESH_MS / 1000 + 30
