"""Failure handling against the real broker, registry and sandbox (issue: failure handling)."""

from __future__ import annotations

import functools
import http.server
import itertools
import json
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from consumer.sandbox import SandboxControl, SandboxThread
from tests.integration.harness import (
    READ_TOKEN,
    REPO,
    WorkerThread,
    caught_up,
    committed_offsets,
    delivered_seqs,
    produce,
    produce_raw,
    produce_records,
    read_topic,
    track_event,
    undelivered,
    wait_until,
    worker_env,
)
from tests.integration.rawkafka import produce_with_header

Sandbox = tuple[SandboxThread, SandboxControl]
FAST_RETRY = {
    "USERPILOT_RETRY_BACKOFF_SECONDS": "0.05",
    "USERPILOT_RETRY_BACKOFF_MAX_SECONDS": "0.5",
    "USERPILOT_REQUEST_TIMEOUT_SECONDS": "1",
}





def headers_of(message: Any) -> dict[str, bytes]:
    return dict(message.headers() or [])


def test_transient_faults_deliver_everything_and_dead_letter_nothing(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    sandbox: Sandbox,
) -> None:
    server, control = sandbox
    control.set_faults(
        error_rate=0.3, error_codes=[500, 502, 503, 408], reset_rate=0.05,
        script=["429"] * 15 + ["timeout:1500", "reset", "503", "timeout:1500"] * 3,
    )
    topic = topic_factory(partitions=3)
    events = [track_event(f"u{i % 20}", i) for i in range(300)]
    produce(kafka_bootstrap, schema_registry_url, topic, events)
    group = f"{topic}-g"
    window = 50
    env = worker_env(kafka_bootstrap, schema_registry_url, server.url, topic, group,
                     WORKER_MAX_IN_FLIGHT=str(window), USERPILOT_RETRY_MAX_ATTEMPTS="15",
                     USERPILOT_RETRY_BUDGET_SECONDS="60", **FAST_RETRY)
    thread = WorkerThread(env)
    # The 429 run closes the outage gate; the faults after it are probes, which back off
    # to 5 s each (most of this test's 85 s). Compressed to 1 s: the same faults, met sooner.
    thread.worker.gate._probe_max = 1.0
    with thread as w:
        wait_until(caught_up(kafka_bootstrap, group, topic), 120, "offsets at the end")
        retries = sum(w.metric("userpilot_retries_total", cause=c)
                      for c in ("rate_limited", "server_error", "timeout", "connection_error"))
    got = delivered_seqs(control)
    missing = undelivered(control, events)
    assert not missing, missing[:10]
    assert sum(got.values()) - len(events) <= window, "duplicates stay within the window"
    assert retries > 50, "the faults were really hit"
    assert sum(w.metric("userpilot_responses_total", status="429", endpoint=e)
               for e in ("track", "identify")) >= 15
    assert read_topic(kafka_bootstrap, w.settings.dlq_topic) == []
    assert w.metric("userpilot_events_dead_lettered_total", reason="retries_exhausted") == 0


def test_bad_request_and_poison_pill_are_dead_lettered_while_the_rest_flows(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    sandbox: Sandbox,
) -> None:
    server, control = sandbox
    control.set_faults(rules=[{"event_name": "plan_viewed", "action": "400"}])
    topic = topic_factory(partitions=1)
    before = [track_event(f"u{i % 5}", i) for i in range(20)]
    bad = track_event("u-bad", 999, name="Plan Viewed")
    after = [track_event(f"u{i % 5}", i) for i in range(20, 40)]
    produce(kafka_bootstrap, schema_registry_url, topic, before)
    produce_raw(kafka_bootstrap, topic, b"poison-key", b"\x07not avro at all")
    produce(kafka_bootstrap, schema_registry_url, topic, [bad, *after])
    group = f"{topic}-g"
    env = worker_env(kafka_bootstrap, schema_registry_url, server.url, topic, group,
                     **FAST_RETRY)
    with WorkerThread(env) as w:
        wait_until(caught_up(kafka_bootstrap, group, topic), 60, "offsets at the end")
        dlq = w.settings.dlq_topic
        assert w.metric("userpilot_events_dead_lettered_total", reason="bad_request") == 1
        assert w.metric("userpilot_events_dead_lettered_total", reason="undecodable") == 1
    got = delivered_seqs(control)
    assert all(got[(e["userId"], e["properties"]["seq"])] == 1 for e in before + after)
    records = read_topic(kafka_bootstrap, dlq)
    assert len(records) == 2
    by_reason = {headers_of(m)["userpilot.error.reason"].decode(): m for m in records}
    poison = by_reason["undecodable"]
    assert poison.key() == b"poison-key" and poison.value() == b"\x07not avro at all"
    h = headers_of(poison)
    assert h["__connect.errors.topic"] == topic.encode()
    assert h["__connect.errors.partition"] == b"0"
    assert h["__connect.errors.offset"] == b"20"
    assert h["__connect.errors.exception.class.name"] == b"UndecodableEvent"
    assert b"magic byte" in h["__connect.errors.exception.message"]
    assert h["userpilot.replay.count"] == b"0"
    rejected = headers_of(by_reason["bad_request"])
    assert rejected["__connect.errors.offset"] == b"21"
    assert rejected["userpilot.error.status"] == b"400"
    assert b"errors" in rejected["userpilot.error.body"]
    assert rejected["userpilot.error.attempts"] == b"1"
    assert rejected["userpilot.error.first_attempt"] and rejected["userpilot.error.last_attempt"]
    assert rejected["__connect.errors.exception.class.name"] == b"Rejected"
    original = by_reason["bad_request"]
    assert original.key() == b"u-bad"
    assert original.timestamp()[1] > 0


def test_a_header_key_that_is_not_utf8_neither_stops_the_worker_nor_loses_events(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    sandbox: Sandbox,
) -> None:
    """confluent-kafka raises from headers() on such a key: the worker exited 1 on it, on
    every restart, and nothing of its batch was delivered (review "poison21"). Worse, once
    the call site was warm (CPython specialises it after a few calls) no error was raised
    and reading the half-built list crashed the process (SIGSEGV): hence 40 events before
    it. The event is readable: it is delivered, its headers left out."""
    server, control = sandbox
    topic = topic_factory(partitions=1)
    produce(kafka_bootstrap, schema_registry_url, topic,
            [track_event("u1", 1)] + [track_event(f"w{i}", i) for i in range(40)])
    wire = read_topic(kafka_bootstrap, topic)[0].value()
    assert wire is not None
    produce_with_header(kafka_bootstrap, topic, b"u1", wire, b"\xff\xfeorigin")
    produce(kafka_bootstrap, schema_registry_url, topic, [track_event("u2", 2)])
    group = f"{topic}-g"
    env = worker_env(kafka_bootstrap, schema_registry_url, server.url, topic, group)
    with WorkerThread(env) as w:
        wait_until(caught_up(kafka_bootstrap, group, topic), 60, "offsets at the end")
        assert w.worker.fatal is None
    got = delivered_seqs(control)
    assert got[("u1", 1)] == 2 and got[("u2", 2)] == 1, got  # the copy went too


def test_tombstones_are_dropped_and_never_trip_the_dlq_guard(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    sandbox: Sandbox,
) -> None:
    """A compacted topic's deletion markers (no value) were dead-lettered: 60 of them
    tripped the DLQ guard (exit 3) and the worker stopped on them at every restart (review
    "kafka21")."""
    server, control = sandbox
    topic = topic_factory(partitions=1)
    produce(kafka_bootstrap, schema_registry_url, topic, [track_event("u1", 1)])
    produce_records(kafka_bootstrap, topic, [(f"gone{i}".encode(), None) for i in range(60)])
    produce(kafka_bootstrap, schema_registry_url, topic, [track_event("u2", 2)])
    group = f"{topic}-g"
    env = worker_env(kafka_bootstrap, schema_registry_url, server.url, topic, group)
    with WorkerThread(env) as w:
        wait_until(caught_up(kafka_bootstrap, group, topic), 60, "offsets at the end")
        assert w.worker.fatal is None
        assert w.metric("userpilot_events_dropped_total", reason="tombstone", category="") == 60
        assert read_topic(kafka_bootstrap, w.settings.dlq_topic) == []
    got = delivered_seqs(control)
    assert got[("u1", 1)] == 1 and got[("u2", 2)] == 1, got


@pytest.fixture
def not_found_host() -> Iterator[str]:
    """A host that answers 404 to everything: the 'wrong analytics endpoint' case."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            return None

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.mark.parametrize("fault", ["read_token", "wrong_host"])
def test_misconfiguration_pauses_without_dead_letters_and_recovers_after_fix(
    fault: str, kafka_bootstrap: str, schema_registry_url: str,
    topic_factory: Callable[..., str], sandbox: Sandbox, not_found_host: str,
) -> None:
    server, control = sandbox
    topic = topic_factory(partitions=2)
    events = [track_event(f"u{i % 7}", i) for i in range(60)]
    produce(kafka_bootstrap, schema_registry_url, topic, events)
    group = f"{topic}-g"
    good = worker_env(kafka_bootstrap, schema_registry_url, server.url, topic, group,
                      **FAST_RETRY)
    broken = dict(good)
    if fault == "read_token":
        broken["USERPILOT_API_KEY"] = READ_TOKEN
    else:
        broken["USERPILOT_ANALYTICS_ENDPOINT"] = not_found_host.split("://", 1)[1]
    with WorkerThread(broken) as w:
        wait_until(lambda: w.metric("userpilot_retries_total", cause="misconfigured") >= 3,
                   30, "misconfiguration noticed")
        time.sleep(2)
        ready, why = w.health.ready()
        assert not ready and why
        assert w.metric("userpilot_integration_up") == 0
        assert w.metric("userpilot_worker_ready") == 0
        assert w.alive, "a misconfiguration pauses; it does not crash the worker"
        dlq = w.settings.dlq_topic
    assert read_topic(kafka_bootstrap, dlq) == []
    assert control.requests("/v1/track") == []
    committed = committed_offsets(kafka_bootstrap, group, topic)
    assert all(off <= 0 for off in committed.values()), committed
    with WorkerThread(good) as fixed:
        wait_until(caught_up(kafka_bootstrap, group, topic), 60, "offsets at the end")
        assert fixed.health.ready()[0]
    got = delivered_seqs(control)
    assert all(got[(e["userId"], e["properties"]["seq"])] >= 1 for e in events)


def test_outage_longer_than_the_retry_budget_loses_and_dead_letters_nothing(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    sandbox: Sandbox,
) -> None:
    server, control = sandbox
    topic = topic_factory(partitions=2)
    events = [track_event(f"u{i % 9}", i) for i in range(80)]
    produce(kafka_bootstrap, schema_registry_url, topic, events)
    group = f"{topic}-g"
    control.set_faults(error_rate=1.0, error_codes=[503])
    env = worker_env(kafka_bootstrap, schema_registry_url, server.url, topic, group,
                     USERPILOT_RETRY_MAX_ATTEMPTS="3", USERPILOT_RETRY_BUDGET_SECONDS="1",
                     **FAST_RETRY)
    with WorkerThread(env) as w:
        wait_until(lambda: w.metric("userpilot_retries_total", cause="server_error") >= 10,
                   30, "the outage to be felt")
        time.sleep(4)  # well past the 1 s retry budget
        assert w.metric("userpilot_events_dead_lettered_total", reason="retries_exhausted") == 0
        control.clear_faults()
        wait_until(caught_up(kafka_bootstrap, group, topic), 90, "offsets at the end")
        dlq = w.settings.dlq_topic
    got = delivered_seqs(control)
    assert all(got[(e["userId"], e["properties"]["seq"])] >= 1 for e in events)
    assert read_topic(kafka_bootstrap, dlq) == []


def _replay(dlq: str, bootstrap: str, *extra: str,
            token: str | None = None) -> tuple[dict[str, Any], list[str]]:
    env = {"KAFKA_BOOTSTRAP_SERVERS": bootstrap, "PATH": "/usr/bin:/bin",
           **({"USERPILOT_API_KEY": token} if token else {})}
    out = subprocess.run(
        [sys.executable, "-m", "consumer", "replay", "--from", dlq, *extra],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=120, check=True,
    )
    lines = out.stdout.strip().splitlines()
    return json.loads(lines[-1]), lines[:-1]


def test_replayed_events_failing_again_pass_the_guard_only_with_replays_seal(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    sandbox: Sandbox,
) -> None:
    """Replayed dead letters come as one block: failing again, they stopped the worker as a
    broken deploy (review "replay17"), so the guard leaves them out. Only those replay
    sealed with the workers' token: a producer setting the replay count itself turned the
    guard off (review "kafka18")."""
    server, control = sandbox
    control.set_faults(rules=[{"event_name": "plan_viewed", "action": "422"}])
    topic = topic_factory(partitions=1)
    events = []
    for i in range(8):  # never two dead letters in a row on the first pass
        events += [track_event(f"p{i}", i, name="Plan Viewed"), track_event(f"g{i}", 100 + i)]
    produce(kafka_bootstrap, schema_registry_url, topic, events)
    group = f"{topic}-g"
    env = worker_env(kafka_bootstrap, schema_registry_url, server.url, topic, group,
                     WORKER_DLQ_MAX_CONSECUTIVE="3", WORKER_DLQ_MAX_RATIO="1", **FAST_RETRY)
    with WorkerThread(env) as w:
        dlq = w.settings.dlq_topic
        wait_until(caught_up(kafka_bootstrap, group, topic), 60, "first pass")
        assert len(read_topic(kafka_bootstrap, dlq)) == 8
        sealed, _ = _replay(dlq, kafka_bootstrap, token=env["USERPILOT_API_KEY"])
        assert sealed["summary"]["replayed"] == 8
        wait_until(lambda: len(read_topic(kafka_bootstrap, dlq)) == 16, 60,
                   "the replayed events dead-lettered again")
        assert w.alive and w.metric("userpilot_dlq_guard_tripped") == 0
        # The same records again, replayed without the token: not sealed, counted.
        unsealed = subprocess.run(
            [sys.executable, "-m", "consumer", "replay", "--from", dlq, "--group", "again"],
            env={"KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "PATH": "/usr/bin:/bin"},
            cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
        assert "USERPILOT_API_KEY is not set" in unsealed.stderr
        wait_until(lambda: not w.alive, 60, "the guard to stop the worker")
    assert w.exit_code == 3


def test_replay_after_fix_delivers_once_and_respects_the_limit(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    sandbox: Sandbox,
) -> None:
    server, control = sandbox
    control.set_faults(rules=[{"event_name": "plan_viewed", "action": "422"}])
    topic = topic_factory(partitions=2)
    bad = [track_event(f"p{i}", i, name="Plan Viewed") for i in range(4)]
    good = [track_event(f"g{i}", 100 + i) for i in range(10)]
    produce(kafka_bootstrap, schema_registry_url, topic, bad + good)
    group = f"{topic}-g"
    env = worker_env(kafka_bootstrap, schema_registry_url, server.url, topic, group,
                     **FAST_RETRY)
    with WorkerThread(env) as w:
        dlq = w.settings.dlq_topic
        wait_until(caught_up(kafka_bootstrap, group, topic), 60, "first pass")
        assert len(read_topic(kafka_bootstrap, dlq)) == 4

        dry, listed = _replay(dlq, kafka_bootstrap, "--dry-run", "--status", "422")
        assert dry["summary"]["replayed"] == 4 and len(listed) == 4
        # A partition the DLQ does not have can match nothing: refused, not "0 replayed".
        absent = subprocess.run(
            [sys.executable, "-m", "consumer", "replay", "--from", dlq, "--dry-run",
             "--partition", "99"],
            env={"KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "PATH": "/usr/bin:/bin"},
            cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
        assert absent.returncode == 2, absent
        assert f"--partition 99: dead-letter topic {dlq!r} has partitions 0-" in absent.stderr
        control.clear_faults()
        assert not [r for r in control.requests("/v1/track")
                    if r["body"]["event_name"] == "plan_viewed"]
        first, _ = _replay(dlq, kafka_bootstrap)
        assert first["summary"] == {"replayed": 4, "skipped_by_filter": 0, "over_limit": 0,
                                    "no_origin": 0, "restored": 0, "gone": 0, "mismatch": 0,
                                    "unpublishable": 0, "doubled": 0}
        wait_until(lambda: len([r for r in control.requests("/v1/track")
                                if r["body"]["event_name"] == "plan_viewed"]) == 4,
                   60, "replayed events delivered")
        second, _ = _replay(dlq, kafka_bootstrap)
        assert second["summary"]["replayed"] == 0, "a second run replays nothing"

        control.set_faults(rules=[{"event_name": "plan_viewed", "action": "422"}])
        produce(kafka_bootstrap, schema_registry_url, topic,
                [track_event("late", 7, name="Plan Viewed")])
        wait_until(lambda: len(read_topic(kafka_bootstrap, dlq)) == 5, 60, "new dead letter")
        filtered, _ = _replay(dlq, kafka_bootstrap, "--reason", "undecodable")
        # A selection of its own has its own group: it reads every record, and skipping
        # them commits nothing another selection needs.
        assert filtered["summary"]["skipped_by_filter"] == 5
        again, listed = _replay(dlq, kafka_bootstrap, "--dry-run", "--reason", "bad_request",
                                "--from-offset", "4")
        assert again["summary"]["replayed"] == 1 and len(listed) == 1, \
            "the record the undecodable run skipped is still there for its own selection"
        filtered_topic = read_topic(kafka_bootstrap, topic)
        over, _ = _replay(dlq, kafka_bootstrap, "--max-replays", "0", "--group", "other")
        assert over["summary"]["over_limit"] == 5 and over["summary"]["replayed"] == 0
        assert len(read_topic(kafka_bootstrap, topic)) == len(filtered_topic)
    replayed = [m for m in read_topic(kafka_bootstrap, topic)
                if headers_of(m).get("userpilot.replay.count") == b"1"]
    assert len(replayed) == 4
    assert all("__connect.errors.topic" not in headers_of(m) for m in replayed)
    got = Counter(r["body"]["user_id"] for r in control.requests("/v1/track")
                  if r["body"]["event_name"] == "plan_viewed")
    assert got == Counter({f"p{i}": 1 for i in range(4)})


def test_an_event_dead_lettered_twice_is_replayed_once(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    sandbox: Sandbox,
) -> None:
    """Two owners dead-letter the same record (here two groups; in production a crash
    between the DLQ's acknowledgement and the commit, or a partition lost while Kafka was
    unreachable): replay sends the event once and names the second copy."""
    server, control = sandbox
    control.set_faults(rules=[{"event_name": "plan_viewed", "action": "422"}])
    topic = topic_factory(partitions=1)
    produce(kafka_bootstrap, schema_registry_url, topic,
            [track_event("p1", 1, name="Plan Viewed"), track_event("g1", 2)])
    for group in (f"{topic}-a", f"{topic}-b"):
        env = worker_env(kafka_bootstrap, schema_registry_url, server.url, topic, group,
                         **FAST_RETRY)
        with WorkerThread(env) as w:
            dlq = w.settings.dlq_topic
            wait_until(caught_up(kafka_bootstrap, group, topic), 60, f"{group} caught up")
    assert len(read_topic(kafka_bootstrap, dlq)) == 2
    control.clear_faults()

    def replay(*flags: str) -> tuple[list[dict[str, Any]], dict[str, Any], str]:
        out = subprocess.run(
            [sys.executable, "-m", "consumer", "replay", "--from", dlq, *flags],
            env={"KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "PATH": "/usr/bin:/bin"},
            cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
        *lines, last = [json.loads(line) for line in out.stdout.strip().splitlines()]
        return lines, last["summary"], out.stderr

    # The dry run that finds a deleted user's dead letters (README, GDPR) lists both
    # copies on stdout with their key, not the second on stderr only (review "replay29").
    listed, summary, err = replay("--dry-run", "--all")
    assert [(line["dlq"], line["key"], line.get("doubled_of")) for line in listed] == [
        (f"{dlq}[0]@0", "p1", None), (f"{dlq}[0]@1", "p1", f"{dlq}[0]@0")]
    assert "listed above by this dry run" in err
    lines, summary, err = replay()
    assert (summary["replayed"], summary["doubled"]) == (1, 1)
    assert f"{dlq}[0]@1 (the same event as {dlq}[0]@0)" in err
    # The replayed line comes with its acknowledgement, the copy's as it is read.
    assert sorted(line.get("doubled_of") or "" for line in lines) == ["", f"{dlq}[0]@0"]
    env = worker_env(kafka_bootstrap, schema_registry_url, server.url, topic, f"{topic}-a",
                     **FAST_RETRY)
    with WorkerThread(env):
        wait_until(caught_up(kafka_bootstrap, f"{topic}-a", topic), 60, "replay delivered")
    assert [r["body"]["user_id"] for r in control.requests("/v1/track")
            if r["body"]["event_name"] == "plan_viewed"] == ["p1"]


def stopped(worker: WorkerThread) -> bool:
    return not worker.alive


def test_dlq_guard_stops_the_worker_under_total_failure(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    sandbox: Sandbox,
) -> None:
    server, control = sandbox
    control.set_faults(rules=[{"event_name": "feature_used", "action": "400"}])
    topic = topic_factory(partitions=1)
    events = [track_event(f"u{i % 3}", i) for i in range(100)]
    produce(kafka_bootstrap, schema_registry_url, topic, events)
    group = f"{topic}-g"
    env = worker_env(kafka_bootstrap, schema_registry_url, server.url, topic, group,
                     WORKER_DLQ_MAX_CONSECUTIVE="5", WORKER_MAX_IN_FLIGHT="10", **FAST_RETRY)
    for restart in (1, 2):
        w = WorkerThread(env)
        with w:
            wait_until(functools.partial(stopped, w), 60, "the guard to stop the worker")
        assert w.exit_code == 3
        assert w.metric("userpilot_dlq_guard_tripped") == 1
        # The run that tripped it is not committed either: restarted, the worker meets the
        # same events and trips again, writing their dead letters again (replay sends each
        # once), instead of moving 5 more events into the DLQ at each restart.
        assert len(read_topic(kafka_bootstrap, w.settings.dlq_topic)) == 5 * restart
        committed = committed_offsets(kafka_bootstrap, group, topic)
        assert committed.get(0, -1) <= 0, "nothing of the tripping run is committed"
    control.clear_faults()  # the deploy fixed: the backlog is delivered, none of it lost
    with WorkerThread(env):
        wait_until(caught_up(kafka_bootstrap, group, topic), 60, "the backlog delivered")
    assert {r["body"]["metadata"]["seq"] for r in control.requests("/v1/track")} == set(
        range(100))


@pytest.mark.parametrize("how", ["stopped", "error"])
def test_a_replay_cut_short_resumes_where_it_stopped_and_replays_nothing_twice(
    how: str, kafka_bootstrap: str, topic_factory: Callable[..., str],
) -> None:
    """The replay committed once, at the end: Ctrl-C (or an error) after some records had
    been published left them to be published again by the next run."""
    from confluent_kafka import Producer

    from consumer.replay import Filters, run_replay

    origin = topic_factory(partitions=1)
    dlq = topic_factory(suffix="-dlq")
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for i in range(30):
        producer.produce(dlq, key=f"k{i}".encode(), value=f"v{i}".encode(),
                         headers=[("__connect.errors.topic", origin.encode()),
                                  ("userpilot.error.reason", b"bad_request")])
    assert producer.flush(30) == 0
    conf = {"bootstrap.servers": kafka_bootstrap}
    filters = Filters()
    seen: list[str] = []
    keys: list[str] = []

    def report(line: dict[str, Any]) -> None:
        seen.append(line["dlq"])
        keys.append(line["key"])  # how an operator finds a user's dead letters
        if how == "error" and len(seen) == 8:
            raise RuntimeError("cut short")

    group = f"{dlq}-replayer"
    if how == "stopped":
        asked = itertools.count()  # once per loop turn, then before each record
        first = run_replay(conf, dlq, group, filters, dry_run=False, report=report,
                           stopping=lambda: next(asked) >= 8)
        assert first.replayed == 7
    else:
        with pytest.raises(RuntimeError):
            run_replay(conf, dlq, group, filters, dry_run=False, report=report)
    assert keys[:3] == ["k0", "k1", "k2"]
    before = len(seen)
    second = run_replay(conf, dlq, group, filters, dry_run=False, report=lambda _: None)
    assert before + second.replayed in (30, 31)  # the record that raised is read again
    wait_until(lambda: len(read_topic(kafka_bootstrap, origin)) >= 30, 30, "replayed")
    values = sorted(m.value() for m in read_topic(kafka_bootstrap, origin))
    assert values == sorted(f"v{i}".encode() for i in range(30)), "each record once"


def test_replay_republishes_large_records_that_each_fit_the_origin_topic(
    kafka_bootstrap: str, topic_factory: Callable[..., str],
) -> None:
    """The broker checks max.message.bytes per batch: large records re-published together
    were refused together, and every run failed on the same ones."""
    import os

    from confluent_kafka import Producer

    from consumer.replay import Filters, run_replay

    origin = topic_factory(config={"max.message.bytes": "300000"})
    dlq = topic_factory(suffix="-dlq")
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "batch.num.messages": 1})
    values = [os.urandom(200_000) for _ in range(6)]
    for value in values:
        producer.produce(dlq, value=value, headers=[("__connect.errors.topic", origin.encode())])
    assert producer.flush(30) == 0
    summary = run_replay({"bootstrap.servers": kafka_bootstrap}, dlq, f"{dlq}-r", Filters(),
                         dry_run=False, report=lambda _: None)
    assert summary.replayed == 6
    wait_until(lambda: len(read_topic(kafka_bootstrap, origin)) == 6, 30, "replayed")
    assert sorted(m.value() for m in read_topic(kafka_bootstrap, origin)) == sorted(values)


def test_a_dead_letter_is_written_now_and_a_replay_too_with_the_original_time_kept(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    sandbox: Sandbox,
) -> None:
    """Written with the original's time, the dead letter of an event older than the DLQ's
    retention was deleted minutes after its source offset was committed (a backlog after
    a long stop): the event existed nowhere."""
    from confluent_kafka import Producer

    from consumer import codec
    from consumer.registry import Registry

    server, control = sandbox
    control.set_faults(rules=[{"event_name": "plan_viewed", "action": "400"}])
    topic = topic_factory(partitions=1)
    schema_id = Registry(schema_registry_url).register(topic)
    old_ms = int((time.time() - 8 * 86400) * 1000)
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    producer.produce(topic, key=b"p0", timestamp=old_ms, value=codec.encode(
        schema_id, codec.to_record(track_event("p0", 0, name="Plan Viewed"))))
    assert producer.flush(30) == 0
    group = f"{topic}-g"
    env = worker_env(kafka_bootstrap, schema_registry_url, server.url, topic, group,
                     **FAST_RETRY)
    with WorkerThread(env) as w:
        wait_until(caught_up(kafka_bootstrap, group, topic), 60, "dead-lettered")
        dlq = w.settings.dlq_topic
    (record,) = read_topic(kafka_bootstrap, dlq)
    written_ms = record.timestamp()[1]
    assert abs(written_ms - time.time() * 1000) < 300_000, "written now"
    assert dict(record.headers())["userpilot.original.timestamp"] == str(old_ms).encode()
    control.set_faults(rules=[])
    summary, _ = _replay(dlq, kafka_bootstrap, "--reason", "bad_request")
    assert summary["summary"]["replayed"] == 1
    replayed = [m for m in read_topic(kafka_bootstrap, topic) if m.offset() == 1]
    assert len(replayed) == 1
    assert abs(replayed[0].timestamp()[1] - time.time() * 1000) < 300_000
    assert dict(replayed[0].headers())["userpilot.original.timestamp"] == str(old_ms).encode()


def test_replay_counts_a_record_its_origin_refuses_and_commits_the_rest_once(
    kafka_bootstrap: str, topic_factory: Callable[..., str],
) -> None:
    """One record the origin topic refused made the whole polled batch uncommitted: every
    rerun published the others again, and the refused offset was never named. And a
    source record over librdkafka's default 1,000,000 bytes (the topic holds 1,048,588)
    could never be replayed: every later record of its partition waited behind it."""
    import os

    from confluent_kafka import Producer

    from consumer.replay import Filters, run_replay

    small = topic_factory(config={"max.message.bytes": "2000"})
    large = topic_factory(partitions=1)  # the broker's default limit, 1,048,588
    dlq = topic_factory(suffix="-dlq")
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "batch.num.messages": 1,
                         "message.max.bytes": 2_000_000})
    # Random: the broker checks the limit after compression.
    values = [b"a" * 100, os.urandom(5000), b"c" * 100, os.urandom(1_030_000), b"e" * 100]
    origins = [small, small, small, large, small]
    for value, origin in zip(values, origins, strict=True):
        producer.produce(dlq, value=value, headers=[("__connect.errors.topic", origin.encode())])
    assert producer.flush(30) == 0
    conf = {"bootstrap.servers": kafka_bootstrap}
    first = run_replay(conf, dlq, f"{dlq}-r", Filters(), dry_run=False, report=lambda _: None)
    assert (first.replayed, first.unpublishable) == (4, 1)
    assert first.unpublishable_offsets[0].startswith(f"{dlq}[0]@1 (")
    again = run_replay(conf, dlq, f"{dlq}-r", Filters(), dry_run=False, report=lambda _: None)
    assert (again.replayed, again.unpublishable) == (0, 0)
    wait_until(lambda: len(read_topic(kafka_bootstrap, small)) >= 3, 30, "replayed")
    assert sorted(m.value() for m in read_topic(kafka_bootstrap, small)) == [
        values[0], values[2], values[4]], "each once"
    assert [m.value() for m in read_topic(kafka_bootstrap, large)] == [values[3]]


def test_replay_finishes_when_retention_deleted_what_it_was_to_read(
    kafka_bootstrap: str, topic_factory: Callable[..., str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Records deleted between reading the end offsets and fetching them: the position
    reset past those ends and the run never finished."""
    from confluent_kafka import Consumer, Producer, TopicPartition
    from confluent_kafka.admin import AdminClient

    from consumer import replay

    origin = topic_factory(partitions=1)
    dlq = topic_factory(partitions=1, suffix="-dlq")
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for i in range(10):
        producer.produce(dlq, value=f"v{i}".encode(),
                         headers=[("__connect.errors.topic", origin.encode())])
    assert producer.flush(30) == 0
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})

    class Expiring(Consumer):
        """Retention strikes once the end offsets are read, before any fetch."""

        def assign(self, partitions: list[TopicPartition]) -> None:
            for future in admin.delete_records([TopicPartition(dlq, 0, 10)]).values():
                future.result(30)
            super().assign(partitions)

    monkeypatch.setattr(replay, "Consumer", Expiring)
    result: list[Any] = []
    runner = threading.Thread(target=lambda: result.append(replay.run_replay(
        {"bootstrap.servers": kafka_bootstrap}, dlq, f"{dlq}-r", replay.Filters(),
        dry_run=False, report=lambda _: None)), daemon=True)
    runner.start()
    runner.join(60)
    assert not runner.is_alive(), "the replay never finished"
    assert result[0].replayed == 0


def test_replay_finishes_when_a_dlq_partition_ends_with_a_transaction_marker(
    kafka_bootstrap: str, topic_factory: Callable[..., str],
) -> None:
    """Review replay25: a transactional writer (MirrorMaker 2, Kafka Streams exactly-once)
    leaves its commit marker as the partition's last offset. It is never handed over, the
    loop waited for it for ever, and every later run again."""
    from confluent_kafka import Producer

    from consumer import replay

    origin = topic_factory(partitions=1)
    dlq = topic_factory(partitions=1, suffix="-dlq")
    headers: list[tuple[str, str | bytes | None]] = [("__connect.errors.topic", origin.encode())]
    plain = Producer({"bootstrap.servers": kafka_bootstrap})
    plain.produce(dlq, value=b"v0", headers=headers)
    assert plain.flush(30) == 0
    txn = Producer({"bootstrap.servers": kafka_bootstrap, "transactional.id": f"{dlq}-tx"})
    txn.init_transactions(30)
    txn.begin_transaction()
    txn.produce(dlq, value=b"v1", headers=headers)
    txn.commit_transaction(30)
    # commit_transaction returns before the coordinator wrote the partition's commit marker;
    # until then a read_committed reader (the replay) ends at v0 (CI stop 42 counted 1 of
    # 2). The last stable offset reaches the marker's end (3) once it is written.
    from confluent_kafka import Consumer, TopicPartition

    probe = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": f"{dlq}-probe",
                      "isolation.level": "read_committed"})
    try:
        wait_until(lambda: probe.get_watermark_offsets(TopicPartition(dlq, 0), timeout=5)[1]
                   >= 3, 30, "the transaction's commit marker written")
    finally:
        probe.close()
    replayed: list[int] = []
    for dry_run in (True, False, False):  # the last: nothing left, and it finishes too
        result: list[Any] = []

        def run(into: list[Any] = result, dry: bool = dry_run) -> None:
            into.append(replay.run_replay(
                {"bootstrap.servers": kafka_bootstrap}, dlq, f"{dlq}-r", replay.Filters(),
                dry_run=dry, report=lambda _: None))

        runner = threading.Thread(target=run, daemon=True)
        runner.start()
        runner.join(60)
        assert not runner.is_alive(), f"the replay never finished (dry run: {dry_run})"
        replayed.append(result[0].replayed)
    assert replayed == [2, 2, 0]
    wait_until(lambda: sorted(m.value() for m in read_topic(kafka_bootstrap, origin))
               == [b"v0", b"v1"], 30, "both replayed once")


def _dead_letters_from(bootstrap: str, dlq: str, origin: str,
                       partitions: dict[bytes, int]) -> None:
    """Dead letters in Kafka Connect's headers: each key (its value too) from its
    partition of `origin`."""
    from confluent_kafka import Producer

    plain = Producer({"bootstrap.servers": bootstrap})
    for key, partition in partitions.items():
        plain.produce(dlq, key=key, value=key, headers=[
            ("__connect.errors.topic", origin.encode()),
            ("__connect.errors.partition", str(partition).encode()),
            ("__connect.errors.offset", b"0")])
    assert plain.flush(30) == 0


def test_replay_writes_each_event_back_to_the_partition_it_came_from(
    kafka_bootstrap: str, topic_factory: Callable[..., str],
) -> None:
    """Review replay25: librdkafka's partitioner is not the Java client's, so a keyed event
    a Java producer wrote came back on another partition, beside other users and out of
    order with its own user's live events. A partition the topic no longer has: wherever
    the partitioner puts it."""
    from consumer import replay

    origin = topic_factory(partitions=3)
    dlq = topic_factory(partitions=1, suffix="-dlq")
    sent = {f"user-{i}".encode(): i % 3 for i in range(12)}
    _dead_letters_from(kafka_bootstrap, dlq, origin, {**sent, b"gone": 7})
    summary = replay.run_replay({"bootstrap.servers": kafka_bootstrap}, dlq, f"{dlq}-r",
                                replay.Filters(), dry_run=False, report=lambda _: None)
    assert summary.replayed == 13
    wait_until(lambda: len(read_topic(kafka_bootstrap, origin)) == 13, 30, "replayed")
    landed = {m.key(): m.partition() for m in read_topic(kafka_bootstrap, origin)}
    assert {k: landed[k] for k in sent} == sent
    assert landed[b"gone"] in (0, 1, 2)


def test_a_failed_partition_count_lookup_is_asked_again(
    kafka_bootstrap: str, topic_factory: Callable[..., str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A lookup that failed once (a metadata timeout) was kept for the whole run: every
    record after it went where librdkafka's partitioner put it, not to its partition."""
    from confluent_kafka import KafkaError, KafkaException

    from consumer import replay

    class FirstLookupFails:
        def __init__(self, producer: Any) -> None:
            self._producer = producer
            self.failed = 0

        def list_topics(self, *args: Any, **kwargs: Any) -> Any:
            if not self.failed:
                self.failed += 1
                raise KafkaException(KafkaError(KafkaError._TIMED_OUT))
            return self._producer.list_topics(*args, **kwargs)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._producer, name)

    from consumer.kafka import make_producer as real_make
    made: list[FirstLookupFails] = []

    def make(*args: Any, **kwargs: Any) -> FirstLookupFails:
        made.append(FirstLookupFails(real_make(*args, **kwargs)))
        return made[-1]

    monkeypatch.setattr(replay, "make_producer", make)
    monkeypatch.setattr(replay, "COUNT_RETRY_S", 0.0)
    origin = topic_factory(partitions=3)
    dlq = topic_factory(partitions=1, suffix="-dlq")
    sent = {f"user-{i}".encode(): i % 3 for i in range(12)}
    _dead_letters_from(kafka_bootstrap, dlq, origin, sent)
    summary = replay.run_replay({"bootstrap.servers": kafka_bootstrap}, dlq, f"{dlq}-r",
                                replay.Filters(), dry_run=False, report=lambda _: None)
    assert summary.replayed == 12 and made and made[0].failed == 1
    wait_until(lambda: len(read_topic(kafka_bootstrap, origin)) == 12, 30, "replayed")
    landed = {m.key(): m.partition() for m in read_topic(kafka_bootstrap, origin)}
    later = list(sent)[1:]  # the first went where the partitioner put it
    assert {k: landed[k] for k in later} == {k: sent[k] for k in later}


def test_a_dry_run_commits_nothing_and_records_refused_for_good_are_named(
    kafka_bootstrap: str, topic_factory: Callable[..., str],
) -> None:
    """`--dry-run` then the same selection for real: the dry run had committed what it
    read, so the real run replayed nothing. And a record its origin refuses for good (too
    large, or a topic that cannot exist) was committed past without being named."""
    import os

    from confluent_kafka import Producer

    small = topic_factory(config={"max.message.bytes": "2000"})
    dlq = topic_factory(suffix="-dlq")
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "batch.num.messages": 1})
    records = [(small, os.urandom(5000)), (small, b"fits"), ("not a topic!", b"nowhere")]
    for origin, value in records:
        producer.produce(dlq, value=value, headers=[("__connect.errors.topic", origin.encode()),
                                                    ("userpilot.error.reason", b"bad_request")])
    assert producer.flush(30) == 0

    def replay(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "consumer", "replay", "--from", dlq, *extra],
            env={"KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "PATH": "/usr/bin:/bin"},
            cwd=REPO, capture_output=True, text=True, timeout=120, check=False)

    dry = replay("--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout.splitlines()[-1])["summary"]["replayed"] == 3
    real = replay()
    assert real.returncode == 1, real.stderr
    summary = json.loads(real.stdout.splitlines()[-1])["summary"]
    assert (summary["replayed"], summary["unpublishable"]) == (1, 2)
    assert f"{dlq}[0]@0 (" in real.stderr and f"{dlq}[0]@2 (" in real.stderr
    assert [m.value() for m in read_topic(kafka_bootstrap, small)] == [b"fits"]
    again = replay()
    assert json.loads(again.stdout.splitlines()[-1])["summary"]["replayed"] == 0


def test_a_dead_letter_of_a_topic_deleted_since_is_unpublishable_not_recreated(
    kafka_bootstrap: str, topic_factory: Callable[..., str],
) -> None:
    """The broker creates topics on first use (Kafka's default): replay published such a
    dead letter into a new topic, counted it replayed and exited 0, while no worker read
    that name (review "replay17")."""
    import uuid

    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient

    dlq = topic_factory(suffix="-dlq")
    gone = f"deleted-{uuid.uuid4().hex[:8]}"
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    producer.produce(dlq, value=b"event", headers=[("__connect.errors.topic", gone.encode()),
                                                   ("userpilot.error.reason", b"bad_request")])
    assert producer.flush(30) == 0
    done = subprocess.run(
        [sys.executable, "-m", "consumer", "replay", "--from", dlq],
        env={"KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "PATH": "/usr/bin:/bin"},
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1, done.stderr
    summary = json.loads(done.stdout.splitlines()[-1])["summary"]
    assert (summary["replayed"], summary["unpublishable"]) == (0, 1), (done.stdout, done.stderr)
    topics = AdminClient({"bootstrap.servers": kafka_bootstrap}).list_topics(timeout=30).topics
    assert gone not in topics


def test_a_replay_whose_output_is_closed_commits_what_it_published(
    kafka_bootstrap: str, topic_factory: Callable[..., str],
) -> None:
    """`replay ... | head -1`: the reader goes away after one line. The run stops after the
    record at hand, commits what it published and exits 130 without a traceback; the next
    run publishes none of it again (review "dlq33": a BrokenPipeError traceback, nothing
    committed, and the next run sent every record again)."""
    origin = topic_factory(partitions=1)
    dlq = topic_factory(partitions=1, suffix="-dlq")
    _dead_letters_from(kafka_bootstrap, dlq, origin,
                       {f"user-{i}-{'x' * 200}".encode(): 0 for i in range(300)})
    group = f"{dlq}-piped"
    env = {"KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "PATH": "/usr/bin:/bin"}
    piped = subprocess.run(
        ["bash", "-c", f"set -o pipefail; {sys.executable} -m consumer replay --from {dlq} "
                       f"--group {group} | head -1"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert piped.returncode == 130, piped.stderr
    assert "Traceback" not in piped.stderr and "stdout was closed" in piped.stderr
    published = len(read_topic(kafka_bootstrap, origin))
    assert published > 0
    assert committed_offsets(kafka_bootstrap, group, dlq)[0] >= published
    again = subprocess.run(
        [sys.executable, "-m", "consumer", "replay", "--from", dlq, "--group", group],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
    summary = json.loads(again.stdout.strip().splitlines()[-1])["summary"]
    assert summary["replayed"] == 300 - published
    assert len(read_topic(kafka_bootstrap, origin)) == 300, "none published twice"


def test_tracks_failing_while_identifies_are_delivered_wait_and_are_never_dead_lettered(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    sandbox: Sandbox,
) -> None:
    """/v1/track answering 503 while /v1/identify works (Userpilot's paths fail apart): the
    identifies delivered are no evidence against the Tracks, which wait. Counted as such,
    every Track was dead-lettered after its attempts, and the DLQ guard stopped the worker
    on every restart (review "http33")."""
    server, control = sandbox
    control.set_faults(rules=[{"event_name": "feature_used", "path": "/v1/track",
                               "action": "503"}])
    tracks = topic_factory(partitions=1)
    identifies = topic_factory(partitions=1, suffix="-id")
    events = [track_event(f"u{i % 5}", i) for i in range(20)]
    produce(kafka_bootstrap, schema_registry_url, tracks, events)
    people = [{"type": "identify", "userId": f"p{i}", "anonymousId": f"anon-p{i}",
               "traits": {"seq": i}, "context": {"consent": {"analytics": True}},
               "timestamp": "2026-11-26T10:00:00.000Z", "messageId": f"p{i}"}
              for i in range(300)]
    group = f"{tracks}-g"
    env = worker_env(kafka_bootstrap, schema_registry_url, server.url,
                     f"{tracks},{identifies}", group, USERPILOT_RETRY_MAX_ATTEMPTS="2",
                     USERPILOT_ENSURE_USER="false", **FAST_RETRY)
    with WorkerThread(env) as w:
        for start in range(0, 300, 20):  # identifies delivered throughout
            produce(kafka_bootstrap, schema_registry_url, identifies, people[start:start + 20])
            time.sleep(0.3)
        wait_until(caught_up(kafka_bootstrap, group, identifies), 60, "identifies delivered")
        assert w.metric("userpilot_retries_total", cause="server_error") > 20
        assert w.alive, "the DLQ guard stopped the worker"
        assert read_topic(kafka_bootstrap, w.settings.dlq_topic, timeout=2.0) == []
        control.clear_faults()
        wait_until(caught_up(kafka_bootstrap, group, tracks), 60, "tracks delivered")
    assert not undelivered(control, events)


def test_an_event_refused_alone_while_others_are_delivered_is_dead_lettered_not_held(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    sandbox: Sandbox,
) -> None:
    """A 403 for one user's Tracks (a WAF rule) while the same token delivers everyone
    else's: after three refusals with deliveries between, its events go to the DLQ as
    `refused` and the partition's commits move on (review "dlq33": held for ever, the
    committed offset stayed at 0 and /readyz at 503)."""
    server, control = sandbox
    control.set_faults(rules=[{"user_id": "blocked", "path": "/v1/track", "action": "403"}])
    topic = topic_factory(partitions=1)
    events = [track_event("blocked" if i % 25 == 3 else f"u{i % 7}", i) for i in range(150)]
    produce(kafka_bootstrap, schema_registry_url, topic, events)
    group = f"{topic}-g"
    env = worker_env(kafka_bootstrap, schema_registry_url, server.url, topic, group,
                     USERPILOT_ENSURE_USER="false", **FAST_RETRY)
    with WorkerThread(env) as w:
        for start in range(150, 600, 50):  # others keep being delivered meanwhile
            produce(kafka_bootstrap, schema_registry_url, topic,
                    [track_event(f"u{i % 7}", i) for i in range(start, start + 50)])
            time.sleep(0.3)
        wait_until(caught_up(kafka_bootstrap, group, topic), 90, "offsets at the end")
        refused = w.metric("userpilot_events_dead_lettered_total", reason="refused")
        dead = read_topic(kafka_bootstrap, w.settings.dlq_topic)
    blocked = [e for e in events if e["userId"] == "blocked"]
    assert refused == len(blocked) == len(dead)
    assert {headers_of(m)["userpilot.error.reason"] for m in dead} == {b"refused"}
    assert {headers_of(m)["userpilot.error.status"] for m in dead} == {b"403"}
    assert not undelivered(control, [e for e in events if e["userId"] != "blocked"])


def test_a_users_identify_refused_alone_is_dead_lettered_while_tracks_go_on(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    sandbox: Sandbox,
) -> None:
    """A 403 for one user's identify (a blocked user, a WAF rule) while the same token
    delivers everyone's Tracks: refusals on /v1/identify count the Tracks delivered in
    between, so the group event goes to the DLQ as `refused` and the commits move on
    (review "http35": held for ever, the gate flapping, the replica unready)."""
    server, control = sandbox
    control.set_faults(rules=[{"user_id": "blocked", "path": "/v1/identify", "action": "403"}])
    topic = topic_factory(partitions=1)
    group_event = {
        "type": "group", "userId": "blocked", "groupId": "acme", "traits": {"name": "Acme"},
        "context": {"consent": {"analytics": True}}, "messageId": "blocked-group",
        "timestamp": "2026-11-26T10:00:00.000Z"}
    produce(kafka_bootstrap, schema_registry_url, topic,
            [group_event, *(track_event(f"u{i % 7}", i) for i in range(50))])
    group = f"{topic}-g"
    env = worker_env(kafka_bootstrap, schema_registry_url, server.url, topic, group,
                     **FAST_RETRY)
    with WorkerThread(env) as w:
        for start in range(50, 400, 50):  # others keep being delivered meanwhile
            produce(kafka_bootstrap, schema_registry_url, topic,
                    [track_event(f"u{i % 7}", i) for i in range(start, start + 50)])
            time.sleep(0.3)
        wait_until(caught_up(kafka_bootstrap, group, topic), 90, "offsets at the end")
        refused = w.metric("userpilot_events_dead_lettered_total", reason="refused")
        dead = read_topic(kafka_bootstrap, w.settings.dlq_topic)
    assert refused == 1 == len(dead)
    assert headers_of(dead[0])["userpilot.error.reason"] == b"refused"
    assert headers_of(dead[0])["userpilot.error.status"] == b"403"
    assert not undelivered(control, [track_event(f"u{i % 7}", i) for i in range(400)])


def test_replay_waits_for_an_answer_that_comes_after_its_first_flush(
    kafka_bootstrap: str, topic_factory: Callable[..., str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A broker answering after the batch's first flush (30 s): the record was named "no
    answer", the run stopped at it, and the next run published it again (review
    "replay42"). Now the run waits for the answer (`message.timeout.ms` bounds it)."""
    from confluent_kafka import Producer

    from consumer import replay
    from consumer.replay import Filters, run_replay

    origin = topic_factory(partitions=1)
    dlq = topic_factory(suffix="-dlq")
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    producer.produce(dlq, value=b"v0", headers=[("__connect.errors.topic", origin.encode())])
    assert producer.flush(30) == 0

    class SlowFirstAnswer:
        """The first flush returns before any answer is served (its wait ran out)."""

        def __init__(self, inner: Any) -> None:
            self.inner, self.flushes = inner, 0

        def flush(self, timeout: float = -1) -> int:
            self.flushes += 1
            if self.flushes == 1:
                return len(self.inner)
            return int(self.inner.flush(timeout))

        def __len__(self) -> int:
            return len(self.inner)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

    real = getattr(replay, "make_producer")  # noqa: B009 (imported there, not exported)
    monkeypatch.setattr(replay, "make_producer", lambda *a, **k: SlowFirstAnswer(real(*a, **k)))
    conf = {"bootstrap.servers": kafka_bootstrap}
    first = run_replay(conf, dlq, f"{dlq}-r", Filters(), dry_run=False, report=lambda _: None)
    assert first.replayed == 1
    monkeypatch.setattr(replay, "make_producer", real)
    again = run_replay(conf, dlq, f"{dlq}-r", Filters(), dry_run=False, report=lambda _: None)
    assert again.replayed == 0
    wait_until(lambda: len(read_topic(kafka_bootstrap, origin)) >= 1, 30, "replayed")
    assert [m.value() for m in read_topic(kafka_bootstrap, origin)] == [b"v0"], "once"


def test_replay_topic_selects_the_dead_letters_of_one_source_topic(
    kafka_bootstrap: str, topic_factory: Callable[..., str],
) -> None:
    """Review "multi53": with one DLQ for several topics, the dead letters of the topic
    whose cause was fixed could not be replayed alone. `--topic` replays those, and a run
    without it (another selection) still sees every record."""
    from confluent_kafka import Producer

    fixed, other = topic_factory(suffix="-fixed"), topic_factory(suffix="-other")
    dlq = topic_factory(suffix="-dlq")
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for i, origin in enumerate([fixed, other, fixed, other, other]):
        producer.produce(dlq, value=b"v%d" % i, headers=[
            ("__connect.errors.topic", origin.encode()),
            ("__connect.errors.partition", b"0"), ("__connect.errors.offset", b"%d" % i)])
    assert producer.flush(30) == 0
    done, _ = _replay(dlq, kafka_bootstrap, "--topic", fixed)
    assert (done["summary"]["replayed"], done["summary"]["skipped_by_filter"]) == (2, 3), done
    wait_until(lambda: len(read_topic(kafka_bootstrap, fixed)) == 2, 30, "replayed")
    assert sorted(m.value() for m in read_topic(kafka_bootstrap, fixed)) == [b"v0", b"v2"]
    assert read_topic(kafka_bootstrap, other) == []
    _, lines = _replay(dlq, kafka_bootstrap, "--dry-run")
    assert sorted(json.loads(line)["to"] for line in lines) == sorted(
        [fixed, other, fixed, other, other])
