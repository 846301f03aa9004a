"""The core pipeline against the real broker, registry and sandbox (issue: core pipeline)."""

from __future__ import annotations

import json
import random
import signal
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from consumer.config import load_settings
from consumer.explain import explain_lines
from consumer.sandbox import SandboxControl, SandboxThread, fingerprint
from tests.integration.harness import (
    REPO,
    WRITE_TOKEN,
    WorkerProcess,
    WorkerThread,
    caught_up,
    delivered_seqs,
    produce,
    track_event,
    undelivered,
    wait_until,
    worker_env,
)

SAMPLES = REPO / "schemas" / "sample-events.jsonl"
Sandbox = tuple[SandboxThread, SandboxControl]




def test_demo_set_arrives_exactly_as_explained(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    sandbox: Sandbox,
) -> None:
    server, control = sandbox
    topic = topic_factory(partitions=3)
    lines = SAMPLES.read_text().splitlines()
    produce(kafka_bootstrap, schema_registry_url, topic, [json.loads(x) for x in lines])
    group = f"{topic}-g"
    env = worker_env(kafka_bootstrap, schema_registry_url, server.url, topic, group)
    expected = [d for d in explain_lines(lines, load_settings(env)) if d["decision"] == "deliver"]
    tracks = [d for d in expected if d["request"]["url"].endswith("/v1/track")]
    assert len(tracks) == 11, "the sample set covers all 11 preset rows"
    requests = [r for d in expected for r in d["requests"]]

    with WorkerThread(env) as w:
        wait_until(caught_up(kafka_bootstrap, group, topic), 60, "offsets at the end")
        records = control.requests("/v1/track")
        every = control.requests()
        assert w.metric("userpilot_events_consumed_total", topic=topic) == len(lines)
        assert w.metric("userpilot_events_dropped_total", reason="anonymous", category="") == 1
        assert w.metric("userpilot_events_dropped_total", reason="consent",
                        category="analytics") == 2
        assert w.metric("userpilot_events_dropped_total", reason="unmapped", category="") == 1
        assert w.metric("userpilot_events_dropped_total", reason="unsupported_type",
                        category="") == 0, "identify is delivered now"
        delivered = sum(w.metric("userpilot_events_delivered_total", event_name=d["request"]
                                 ["body"]["event_name"]) for d in tracks)
        assert delivered == 11
        assert w.metric("userpilot_events_delivered_total", event_name="identify") == 2
        assert w.metric("userpilot_events_delivered_total", event_name="group") == 2
        assert w.metric("userpilot_responses_total", status="202", endpoint="track") == 11
        identifies = sum(1 for r in requests if r["url"].endswith("/v1/identify"))
        assert w.metric("userpilot_responses_total", status="202",
                        endpoint="identify") == identifies
        companies = sum(1 for r in requests if r["url"].endswith("/v1/companies/identify"))
        assert w.metric("userpilot_responses_total", status="200",
                        endpoint="company_identify") == companies == 2
        assert w.metric("userpilot_ensure_user_identify_total") == sum(
            1 for r in requests if r["purpose"] == "ensure_user")
    assert w.exit_code == 0

    got = sorted(json.dumps(r["body"], sort_keys=True) for r in records)
    want = sorted(json.dumps(d["request"]["body"], sort_keys=True) for d in tracks)
    assert got == want, "every delivered payload is byte-for-byte what explain promised"
    got_all = sorted((r["path"], json.dumps(r["body"], sort_keys=True)) for r in every)
    want_all = sorted(("/v1/" + r["url"].split("/v1/", 1)[1], json.dumps(r["body"], sort_keys=True))
                      for r in requests)
    assert got_all == want_all, "every request (identify, ensure-user, track) as explained"
    assert control.attribution()[1] == 0, "ensure-user: no Track is unattributed"
    assert {r["body"]["event_name"] for r in records} == {
        "page_viewed", "signed_up", "logged_in", "feature_used", "searched", "plan_viewed",
        "product_viewed", "trial_started", "subscription_started", "subscription_cancelled",
        "lead_generated"}
    for r in records:
        h = {k.lower(): v for k, v in r["headers"].items()}
        assert h["content-type"].startswith("application/json")
        assert h["x-api-version"] == "2020-09-22"
        assert r["token"] == fingerprint(WRITE_TOKEN)
    dropped_users = {"user_006", "user_007"}
    assert not dropped_users & {r["body"]["user_id"] for r in records}
    assert all(r["body"]["event_name"] != "order_completed" for r in records)



def test_sigkill_midstream_redelivers_everything_with_bounded_duplicates(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    sandbox: Sandbox, tmp_path: Path,
) -> None:
    server, control = sandbox
    control.set_faults(latency_ms=5)
    topic = topic_factory(partitions=3)
    events = [track_event(f"u{i % 40}", i) for i in range(600)]
    produce(kafka_bootstrap, schema_registry_url, topic, events)
    group = f"{topic}-g"
    window = 40
    env = worker_env(kafka_bootstrap, schema_registry_url, server.url, topic, group,
                     WORKER_MAX_IN_FLIGHT=str(window), WORKER_COMMIT_INTERVAL_SECONDS="5")
    first = WorkerProcess(env, tmp_path / "first.log")
    wait_until(lambda: len(control.requests("/v1/track")) >= 150, 60, "150 deliveries")
    first.kill()
    before = sum(delivered_seqs(control).values())
    assert before < len(events), "killed mid-stream"
    second = WorkerProcess(env, tmp_path / "second.log")
    try:
        wait_until(caught_up(kafka_bootstrap, group, topic), 90, "offsets at the end")
    finally:
        assert second.terminate() == 0, second.output()
    seen = delivered_seqs(control)
    missing = undelivered(control, events)
    assert not missing, f"lost events: {missing[:10]}"
    duplicates = sum(seen.values()) - len(events)
    assert 0 <= duplicates <= window, f"{duplicates} duplicates > window {window}"


def test_sigterm_drains_and_commits_so_restart_sends_no_duplicates(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    sandbox: Sandbox, tmp_path: Path,
) -> None:
    server, control = sandbox
    control.set_faults(latency_ms=20)
    topic = topic_factory(partitions=2)
    events = [track_event(f"u{i % 25}", i) for i in range(400)]
    produce(kafka_bootstrap, schema_registry_url, topic, events)
    group = f"{topic}-g"
    env = worker_env(kafka_bootstrap, schema_registry_url, server.url, topic, group,
                     WORKER_MAX_IN_FLIGHT="60", WORKER_COMMIT_INTERVAL_SECONDS="30")
    first = WorkerProcess(env, tmp_path / "first.log")
    wait_until(lambda: len(control.requests("/v1/track")) >= 100, 60, "100 deliveries")
    assert first.terminate() == 0, first.output()
    assert len(control.requests("/v1/track")) < len(events), "stopped mid-stream"
    second = WorkerProcess(env, tmp_path / "second.log")
    try:
        wait_until(caught_up(kafka_bootstrap, group, topic), 90, "offsets at the end")
    finally:
        assert second.terminate() == 0, second.output()
    seen = delivered_seqs(control)
    assert len(seen) == len(events)
    assert max(seen.values()) == 1, "SIGTERM drained in-flight work and committed it"


def test_a_worker_frozen_past_its_request_deadline_sends_nothing_twice(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    sandbox: Sandbox, tmp_path: Path,
) -> None:
    """SIGSTOP mid-backlog for 2.5x the request deadline (twice the request timeout), within
    the session timeout: the answers that arrived during the freeze are read when it
    resumes, not timed out, so no event is sent twice (62 of 4,000 were before
    `delivery.STALL_S`, at 20 ms answers and a 2 s timeout)."""
    server, control = sandbox
    control.set_faults(latency_ms=20)
    topic = topic_factory(partitions=3)
    events = [track_event(f"u{i % 50}", i) for i in range(1500)]
    produce(kafka_bootstrap, schema_registry_url, topic, events)
    group = f"{topic}-g"
    env = worker_env(kafka_bootstrap, schema_registry_url, server.url, topic, group,
                     USERPILOT_REQUEST_TIMEOUT_SECONDS="1", USERPILOT_ENSURE_USER="false")
    worker = WorkerProcess(env, tmp_path / "worker.log")
    try:
        wait_until(lambda: len(control.requests("/v1/track")) >= 300, 60, "300 deliveries")
        worker.proc.send_signal(signal.SIGSTOP)
        time.sleep(5.0)  # deadline 2 s; session timeout 10 s
        worker.proc.send_signal(signal.SIGCONT)
        wait_until(caught_up(kafka_bootstrap, group, topic), 90, "offsets at the end")
    finally:
        worker.proc.send_signal(signal.SIGCONT)
        assert worker.terminate() == 0, worker.output()
    seen = delivered_seqs(control)
    assert not undelivered(control, events)
    twice = sorted(key for key, n in seen.items() if n > 1)
    assert not twice, f"{len(twice)} sent twice, e.g. {twice[:5]}\n{worker.output()[-2000:]}"
    assert "no whole answer" not in worker.output()


def test_per_user_order_holds_while_users_interleave(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    sandbox: Sandbox,
) -> None:
    server, control = sandbox
    control.set_faults(latency_ms=1, jitter_ms=15)
    topic = topic_factory(partitions=4)
    rng = random.Random(7)
    users = [f"user-{i}" for i in range(30)]
    counters: dict[str, int] = defaultdict(int)
    events: list[dict[str, Any]] = []
    for _ in range(600):
        user = rng.choice(users)
        events.append(track_event(user, counters[user]))
        counters[user] += 1
    produce(kafka_bootstrap, schema_registry_url, topic, events)
    group = f"{topic}-g"
    env = worker_env(kafka_bootstrap, schema_registry_url, server.url, topic, group,
                     WORKER_MAX_IN_FLIGHT="200")
    with WorkerThread(env):
        wait_until(caught_up(kafka_bootstrap, group, topic), 90, "offsets at the end")
    order: dict[str, list[int]] = defaultdict(list)
    for r in sorted(control.requests("/v1/track"), key=lambda r: r["seq"]):
        order[r["body"]["user_id"]].append(r["body"]["metadata"]["seq"])
    assert sum(len(v) for v in order.values()) == len(events)
    for user, seqs in order.items():
        assert seqs == sorted(seqs), f"{user} out of order: {seqs}"
    assert len(order) == len(users)


ALONE = (1, "ConsumerGroupState.STABLE")


def _has_assigned(worker: WorkerProcess) -> Callable[[], bool]:
    return lambda: "assigned " in worker.output()


def _members(bootstrap: str, group: str) -> tuple[int, str]:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    described = admin.describe_consumer_groups([group])[group].result(10)
    return len(described.members), str(described.state)


def test_a_worker_stopped_right_after_joining_leaves_the_group_at_once(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    sandbox: Sandbox, tmp_path: Path,
) -> None:
    """Review zombie19: librdkafka's close() alone sent no LeaveGroup for a member stopped
    just after a cooperative rebalance, so the group waited session.timeout.ms for it, the
    other members' commits were refused meanwhile and, without Redis, what they had
    delivered was sent again by the next owners (56-128 duplicates in rapid scaling).
    The worker unsubscribes and serves its revoke first: the group is whole at once."""
    server, _ = sandbox
    topic = topic_factory(partitions=6)
    group = f"{topic}-g"
    env = worker_env(kafka_bootstrap, schema_registry_url, server.url, topic, group,
                     KAFKA_SESSION_TIMEOUT_MS="30000")
    first = WorkerProcess(env, tmp_path / "first.log")
    try:
        wait_until(lambda: "(now 6 partitions)" in first.output(), 60, "the first's partitions")
        for attempt in range(2):
            second = WorkerProcess(env, tmp_path / f"second{attempt}.log")
            wait_until(_has_assigned(second), 60, "the second's first assign")
            stopped = time.monotonic()
            assert second.terminate() == 0, second.output()[-3000:]
            wait_until(lambda: _members(kafka_bootstrap, group) == ALONE, 40,
                       "the group with the first worker alone")
            took = time.monotonic() - stopped
            assert took < 15, f"the group waited {took:.1f} s (session timeout 30 s)"
    finally:
        assert first.terminate() == 0, first.output()[-3000:]


def test_a_revoke_with_work_in_flight_commits_at_once_and_hands_over(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    sandbox: Sandbox, caplog: Any,
) -> None:
    """Review "order47": a bound put on the revoke's synchronous commit (a thread of its
    own, waited for 10 s) was never answered while the rebalance callback waited: every
    revoke with work in flight froze its replica 10 s, its commit was lost (refused late as
    another generation's), and the moved partitions had no owner for ~13 s. On the
    callback's own thread the commit takes milliseconds."""
    import logging

    server, control = sandbox
    control.set_faults(latency_ms=1200, jitter_ms=200)
    topic = topic_factory(partitions=4)
    events = [track_event(f"user-{i % 12}", i) for i in range(96)]
    produce(kafka_bootstrap, schema_registry_url, topic, events)
    group = f"{topic}-g"
    env = worker_env(kafka_bootstrap, schema_registry_url, server.url, topic, group)
    caplog.set_level(logging.INFO)
    with WorkerThread(env) as first:
        # Some finished (a commit is due on revoke), more on the wire.
        wait_until(lambda: len(control.requests("/v1/track")) >= 12
                   and first.worker.in_flight > 0, 30, "the first worker delivering")
        with WorkerThread(env) as second:
            joined = time.monotonic()
            wait_until(lambda: bool(second.worker.assigned), 30, "the second worker assigned")
            handover = time.monotonic() - joined
            control.set_faults(latency_ms=1, jitter_ms=0)
            wait_until(caught_up(kafka_bootstrap, group, topic), 90, "offsets at the end")
    assert "not answered" not in caplog.text
    assert "revoked" in caplog.text
    assert handover < 8.0, f"the moved partitions waited {handover:.1f} s for an owner"
    assert not undelivered(control, events)
