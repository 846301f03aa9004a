"""Outages of Userpilot and the registry (issue 14), on the real broker, registry and sandbox.

Budgets are compressed to seconds; each test asserts counts (delivered, dead-lettered,
duplicates), not just that the worker stays alive.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from consumer.registry import Registry
from consumer.sandbox import SandboxControl, SandboxThread
from tests.integration.harness import (
    WRITE_TOKEN,
    WorkerThread,
    caught_up,
    delivered_seqs,
    produce,
    read_topic,
    track_event,
    undelivered,
    wait_until,
    worker_env,
)
from tests.integration.own_services import OwnServices

Sandbox = tuple[SandboxThread, SandboxControl]
FAST_RETRY = {
    "USERPILOT_RETRY_BACKOFF_SECONDS": "0.05",
    "USERPILOT_RETRY_BACKOFF_MAX_SECONDS": "0.5",
    "USERPILOT_REQUEST_TIMEOUT_SECONDS": "2",
}



def test_an_outage_longer_than_the_budget_then_flaky_answers_dead_letters_nothing(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    sandbox: Sandbox,
) -> None:
    """Before the fix every held event's budget ran during the outage, so after it any
    single 5xx dead-lettered a healthy event (52-74 of 3,000 in the issue's runs)."""
    server, control = sandbox
    topic = topic_factory(partitions=3)
    events = [track_event(f"u{i % 40}", i) for i in range(1500)]
    produce(kafka_bootstrap, schema_registry_url, topic, events)
    group = f"{topic}-g"
    window = 300
    control.set_faults(phases=[
        {"seconds": 15, "action": "503"},  # 3 x the 5 s budget
        {"seconds": 25, "error_rate": 0.3, "error_codes": [500, 502, 503]},
    ])
    env = worker_env(kafka_bootstrap, schema_registry_url, server.url, topic, group,
                     WORKER_MAX_IN_FLIGHT=str(window), USERPILOT_RETRY_BUDGET_SECONDS="5",
                     **FAST_RETRY)
    with WorkerThread(env) as w:
        wait_until(caught_up(kafka_bootstrap, group, topic), 120, "offsets at the end")
        dead = w.metric("userpilot_events_dead_lettered_total", reason="retries_exhausted")
        dlq = w.settings.dlq_topic
        phase = control.faults()["phase"]
    stats = control.stats()
    assert stats["by_status"].get("503", 0) >= 10, stats  # the outage was felt
    assert phase is None or phase["index"] >= 1, "delivery finished inside the outage"
    assert not undelivered(control, events)
    got = delivered_seqs(control)
    assert sum(got.values()) - len(events) <= window
    assert dead == 0
    assert read_topic(kafka_bootstrap, dlq) == []


class _Stalls(threading.Thread):
    """Times this process could not run a thread every `TICK_S`: the machine (or another
    thread holding the GIL) stalled the worker, the sandbox and the test alike."""

    TICK_S = 0.05
    NOTICED_S = 0.25

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.gaps: list[tuple[float, float]] = []  # (wall time the gap ended, seconds)
        self._halt = threading.Event()

    def run(self) -> None:
        last = time.monotonic()
        while not self._halt.wait(self.TICK_S):
            now = time.monotonic()
            if now - last > self.NOTICED_S:
                self.gaps.append((time.time(), now - last - self.TICK_S))
            last = now

    def stop(self) -> None:
        self._halt.set()
        self.join(5)

    def after(self, wall: float) -> float:
        """Seconds stalled in the gaps that ended after `wall`."""
        return sum(gap for ended, gap in self.gaps if ended > wall)


def test_delivery_resumes_within_ten_seconds_of_userpilot_recovering(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    sandbox: Sandbox, caplog: pytest.LogCaptureFixture,
) -> None:
    """Probes every 0.5 s doubling to 5 s: the first 202 comes at most ~6 s after recovery
    (the issue measured 28-68 s with probes doubling to 60 s).

    Once in ~25 CI runs it came 14 s after (round 26's CI); never in 21 runs here, loaded
    or not. The bound is not widened: the seconds the whole process was stalled after the
    recovery (`_Stalls`) are added to it, and a failure prints the gate's probes."""
    caplog.set_level(logging.DEBUG, logger="consumer.policy")
    stalls = _Stalls()
    stalls.start()
    server, control = sandbox
    topic = topic_factory(partitions=2)
    events = [track_event(f"u{i % 10}", i) for i in range(200)]
    produce(kafka_bootstrap, schema_registry_url, topic, events)
    group = f"{topic}-g"
    outage_s = 30.0
    started = time.time()
    control.set_faults(phases=[{"seconds": outage_s, "action": "503"}])
    recovered = started + outage_s  # at the latest: the PUT came after `started`
    env = worker_env(kafka_bootstrap, schema_registry_url, server.url, topic, group,
                     **FAST_RETRY)
    with WorkerThread(env) as w:
        wait_until(lambda: w.worker.gate.state == "outage", 30, "the gate to close")
        wait_until(caught_up(kafka_bootstrap, group, topic), 120, "offsets at the end")
    stalls.stop()
    first_202 = min(r["received_at"] for r in control.requests("/v1/track"))
    resumed_after = first_202 - recovered
    stalled = stalls.after(recovered)
    print(f"\ntime from Userpilot's recovery to the first 202: {resumed_after:.2f} s "
          f"(process stalled {stalled:.2f} s of it)")
    assert first_202 >= started + outage_s - 0.5, "a 202 during the outage?"
    # On failure, which step was late: the probe's admission (its DEBUG line), its
    # identify reaching the sandbox (the first accepted one), or the Track after it.
    timeline = [f"{r.created - recovered:+.2f} s {r.getMessage()}" for r in caplog.records
                if r.name == "consumer.policy"]
    identified = [r["received_at"] - recovered for r in control.requests("/v1/identify")]
    if identified:
        timeline.append(f"{min(identified):+.2f} s first identify accepted")
    assert resumed_after <= 10.0 + stalled, "from recovery:\n" + "\n".join(timeline)
    assert not undelivered(control, events)


def test_an_echoing_error_body_never_puts_the_token_in_the_dlq(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    sandbox: Sandbox,
) -> None:
    server, control = sandbox
    topic = topic_factory(partitions=1)
    # Other users' deliveries go on while the failing event retries: that is the evidence
    # that lets it be given up (alone, every failure is evidence about Userpilot).
    good = [track_event(f"u{i % 10}", i) for i in range(600)]
    bad = [track_event("rejected-user", 10000), track_event("failing-user", 10001)]
    produce(kafka_bootstrap, schema_registry_url, topic, [*bad, *good])
    group = f"{topic}-g"
    control.set_faults(latency_ms=20, echo_errors=True, rules=[
        {"user_id": "rejected-user", "action": "400"},
        {"user_id": "failing-user", "action": "502"},
    ])
    env = worker_env(kafka_bootstrap, schema_registry_url, server.url, topic, group,
                     USERPILOT_RETRY_MAX_ATTEMPTS="3", **FAST_RETRY)
    with WorkerThread(env) as w:
        wait_until(caught_up(kafka_bootstrap, group, topic), 90, "offsets at the end")
        dlq = w.settings.dlq_topic
    records = read_topic(kafka_bootstrap, dlq)
    assert len(records) == 2
    reasons = set()
    for record in records:
        headers = dict(record.headers() or [])
        reasons.add(headers["userpilot.error.reason"])
        body = headers["userpilot.error.body"]
        assert b'"echo"' in body and b"Token ***" in body  # the echo reached the DLQ, masked
        blobs = [record.key() or b"", record.value() or b"", *headers.values()]
        assert not any(WRITE_TOKEN.encode() in blob for blob in blobs)
        assert not any(WRITE_TOKEN[:8].encode() in blob for blob in blobs)
    assert reasons == {b"bad_request", b"retries_exhausted"}
    assert not undelivered(control, good)


# ---------------------------------------------------------------- a registry of our own


# Our own services, in a run directory of their own on free ports.
OWN = OwnServices("outage-services-", kafka_port=os.environ.get("OUTAGE_KAFKA_PORT"),
                  registry_port=os.environ.get("OUTAGE_REGISTRY_PORT"))


@pytest.fixture(scope="module")
def own_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A registry this module may freeze: never the shared one."""
    yield from OWN.registry(tmp_path_factory.mktemp("own-registry") / "started")


def test_a_frozen_registry_is_logged_and_unhealthy_and_delivery_recovers(
    kafka_bootstrap: str, own_registry: str, topic_factory: Callable[..., str],
    sandbox: Sandbox, caplog: pytest.LogCaptureFixture,
) -> None:
    server, control = sandbox
    topic = topic_factory(partitions=1)
    events = [track_event(f"u{i % 4}", i) for i in range(40)]
    produce(kafka_bootstrap, own_registry, topic, events)  # schema known to ours only
    group = f"{topic}-g"
    env = worker_env(kafka_bootstrap, own_registry, server.url, topic, group, **FAST_RETRY)
    OWN.ctl("freeze", "registry")
    try:
        with caplog.at_level(logging.WARNING, logger="consumer.registry"), \
                WorkerThread(env) as w:
            frozen_at = time.monotonic()
            wait_until(lambda: not _registry(w).healthy, 30, "the registry to be unhealthy")
            noticed_after = time.monotonic() - frozen_at
            assert "does not answer" in caplog.text
            assert _registry(w).last_error is not None
            wait_until(lambda: w.health.ready()[1].startswith("schema registry does not answer"),
                       10, "readiness to name the registry")
            assert control.stats()["accepted"] == 0
            OWN.ctl("thaw", "registry")
            wait_until(caught_up(kafka_bootstrap, group, topic), 90, "offsets at the end")
            assert _registry(w).healthy
            assert w.health.ready() == (True, "ready")
            assert "schema registry answers again" in caplog.text
    finally:
        OWN.ctl("thaw", "registry")
    assert noticed_after <= 15.0  # 5 s timeout per call, plus start-up
    assert not undelivered(control, events)


# ---------------------------------------------------------------- a broker of our own


@pytest.fixture(scope="module")
def own_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A broker this module may kill and restart: never the shared one."""
    yield from OWN.kafka(tmp_path_factory.mktemp("own-kafka") / "started")


def test_a_broker_killed_and_restarted_on_its_data_mid_delivery_loses_nothing(
    own_kafka: str, schema_registry_url: str, sandbox: Sandbox,
) -> None:
    from tests.conftest import create_topic

    server, control = sandbox
    topic = create_topic(own_kafka, f"it-broker-restart-{int(time.time() * 1000)}", 3)
    events = [track_event(f"u{i % 20}", i) for i in range(3000)]
    produce(own_kafka, schema_registry_url, topic, events)
    group = f"{topic}-g"
    window = 200
    control.set_faults(latency_ms=40)  # ~500 events/s: the kill lands mid-delivery
    env = worker_env(own_kafka, schema_registry_url, server.url, topic, group,
                     WORKER_MAX_IN_FLIGHT=str(window), **FAST_RETRY)
    with WorkerThread(env) as w:
        wait_until(lambda: control.stats()["accepted"] >= 800, 60, "delivery under way")
        OWN.ctl("kill", "kafka")
        killed_at = control.stats()["accepted"]
        time.sleep(3)
        OWN.ctl("up", "kafka", "--keep-data")
        wait_until(caught_up(own_kafka, group, topic), 180, "offsets at the end")
        assert w.alive, "the worker recovered without a restart"
        dlq = w.settings.dlq_topic
    assert killed_at < len(events), "the broker died before everything was delivered"
    assert not undelivered(control, events)
    got = delivered_seqs(control)
    assert sum(got.values()) - len(events) <= window
    assert read_topic(own_kafka, dlq) == []


def _registry(w: WorkerThread) -> Registry:
    registry = w.worker.registry
    assert isinstance(registry, Registry)
    return registry
