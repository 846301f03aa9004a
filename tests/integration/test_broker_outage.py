"""Kafka and DLQ outages on the worker side (issue 14), on real brokers and the sandbox.

The broker tests run against a broker of their own (free ports, or OUTAGE2_KAFKA_PORT) that
they kill and restart on its data; the DLQ tests use the shared broker. Timeouts are
compressed to seconds; each test asserts counts (lost, duplicates, dead letters), not just
that the worker stays alive.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewTopic,
)

from consumer.sandbox import SandboxControl, SandboxThread
from tests.integration.harness import (
    REPO,
    WorkerProcess,
    WorkerThread,
    caught_up,
    committed_offsets,
    delivered_seqs,
    free_port,
    produce,
    produce_raw,
    read_topic,
    track_event,
    undelivered,
    wait_until,
    worker_env,
)
from tests.integration.own_services import OwnServices

Sandbox = tuple[SandboxThread, SandboxControl]
FAST = {
    "USERPILOT_RETRY_BACKOFF_SECONDS": "0.05",
    "USERPILOT_RETRY_BACKOFF_MAX_SECONDS": "0.5",
    "USERPILOT_REQUEST_TIMEOUT_SECONDS": "2",
}


# A broker of this module's own, on free ports and in a run directory of its own.
OWN = OwnServices("broker-outage-services-", kafka_port=os.environ.get("OUTAGE2_KAFKA_PORT"))


@pytest.fixture(scope="module")
def own_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A broker this module may kill and restart: never the shared one."""
    yield from OWN.kafka(tmp_path_factory.mktemp("own-kafka") / "started")


def _readyz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def _settled(bootstrap: str, group: str, topic: str) -> Callable[[], bool]:
    """`caught_up`, tolerating a broker that is still electing leaders after a restart or a
    thaw: reading the end offsets is retried too (CI once saw NOT_LEADER_FOR_PARTITION from
    them right after SIGCONT, before any check ran)."""
    checks: list[Callable[[], bool]] = []

    def settled() -> bool:
        try:
            if not checks:
                checks.append(caught_up(bootstrap, group, topic))
            return checks[0]()
        except Exception:
            return False
    return settled



def test_sigterm_during_a_broker_outage_with_a_full_window_exits_within_the_grace(
    own_kafka: str, schema_registry_url: str, sandbox: Sandbox, tmp_path: Path,
) -> None:
    """Before the fix the poll thread sat in a synchronous commit: /readyz stayed 200 and
    SIGTERM waited for the broker (85+ s). Now: 503 within 10 s, exit within the grace
    period, then another worker finishes with 0 lost and duplicates <= the window."""
    from tests.conftest import create_topic

    server, control = sandbox
    topic = create_topic(own_kafka, f"it-sigterm-outage-{int(time.time() * 1000)}", 3)
    events = [track_event(f"u{i % 20}", i) for i in range(1500)]
    produce(own_kafka, schema_registry_url, topic, events)
    group = f"{topic}-g"
    window, grace = 100, 5
    control.set_faults(latency_ms=150)  # slower than intake: the window stays full
    port = free_port()
    env = worker_env(own_kafka, schema_registry_url, server.url, topic, group,
                     WORKER_MAX_IN_FLIGHT=str(window), WORKER_METRICS_PORT=str(port),
                     WORKER_SHUTDOWN_GRACE_SECONDS=str(grace), **FAST)
    worker = WorkerProcess(env, tmp_path / "worker.log")
    try:
        wait_until(lambda: control.stats()["accepted"] >= 200, 60, "delivery under way")
        wait_until(lambda: _readyz(port) == 200, 20, "ready")
        OWN.ctl("kill", "kafka")
        killed = time.monotonic()
        wait_until(lambda: _readyz(port) == 503, 15, "/readyz 503 after the broker died")
        unready_after = time.monotonic() - killed
        time.sleep(2)  # the outage goes on; deliveries of the window finish meanwhile
        sent = time.monotonic()
        try:
            code = worker.terminate(timeout=60)
        except subprocess.TimeoutExpired:
            worker.proc.send_signal(signal.SIGKILL)
            raise AssertionError("no exit 60 s after SIGTERM:\n"
                                 + worker.output()[-4000:]) from None
        exit_after = time.monotonic() - sent
    finally:
        if worker.proc.poll() is None:
            worker.kill()
        OWN.ctl("up", "kafka", "--keep-data")
    output = worker.output()
    print(f"\n/readyz 503 after {unready_after:.2f} s; exit {exit_after:.2f} s after SIGTERM")
    assert "Traceback" not in output, output[-3000:]
    assert unready_after <= 10.0, unready_after
    assert code == 0, output[-3000:]
    # The drain (grace) plus the bounded final commit, group leave and DLQ flush.
    assert exit_after <= grace + 10, (exit_after, output[-3000:])
    delivered_before = sum(delivered_seqs(control).values())
    assert delivered_before < len(events), "the outage came too late to test anything"
    control.set_faults(latency_ms=0)
    with WorkerThread(worker_env(own_kafka, schema_registry_url, server.url, topic, group,
                                 WORKER_MAX_IN_FLIGHT=str(window), **FAST)) as w:
        wait_until(_settled(own_kafka, group, topic), 120, "offsets at the end")
        dlq = w.settings.dlq_topic
    assert not undelivered(control, events)
    duplicates = sum(delivered_seqs(control).values()) - len(events)
    print(f"0 lost of {len(events)}; {duplicates} duplicates (window {window})")
    assert 0 <= duplicates <= window, duplicates
    assert read_topic(own_kafka, dlq) == []


def test_a_broker_outage_longer_than_max_poll_interval_never_exceeds_it_from_our_side(
    own_kafka: str, schema_registry_url: str, sandbox: Sandbox,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """max.poll.interval.ms = session.timeout.ms = 6 s and a 12 s outage with a full window:
    the loop keeps polling (librdkafka never reports the poll interval exceeded). The
    session timeout does make librdkafka give up the assignment (that is the broker's
    absence, not our poll thread): readiness is 503 until reassigned, nothing is committed
    for the lost partitions, and everything is delivered afterwards, duplicates <= window."""
    from tests.conftest import create_topic

    server, control = sandbox
    topic = create_topic(own_kafka, f"it-maxpoll-{int(time.time() * 1000)}", 2)
    events = [track_event(f"u{i % 10}", i) for i in range(800)]
    produce(own_kafka, schema_registry_url, topic, events)
    group = f"{topic}-g"
    window = 50
    control.set_faults(latency_ms=100)
    env = worker_env(own_kafka, schema_registry_url, server.url, topic, group,
                     WORKER_MAX_IN_FLIGHT=str(window), KAFKA_MAX_POLL_INTERVAL_MS="6000",
                     KAFKA_SESSION_TIMEOUT_MS="6000", **FAST)
    caplog.set_level(logging.WARNING)
    with WorkerThread(env) as w:
        wait_until(lambda: control.stats()["accepted"] >= 100, 60, "delivery under way")
        wait_until(lambda: w.health.ready()[0], 20, "ready")
        OWN.ctl("kill", "kafka")
        killed = time.monotonic()
        wait_until(lambda: not w.health.ready()[0], 10, "unready")
        beats = []
        while time.monotonic() - killed < 12:
            beats.append(w.health.alive(2.0))  # the loop polled within the last 2 s
            time.sleep(0.5)
        OWN.ctl("up", "kafka", "--keep-data")
        control.set_faults(latency_ms=0)
        wait_until(_settled(own_kafka, group, topic), 120, "offsets at the end")
        wait_until(lambda: w.health.ready()[0], 30, "ready again")
        assert w.alive
        lost = w.metric("userpilot_rebalances_total", kind="lost")
        dlq = w.settings.dlq_topic
    assert all(beats), "the poll loop stalled during the outage"
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "maximum poll interval" not in text.lower(), text[-2000:]
    assert lost <= 1  # the session timeout's doing, once; never the poll interval
    assert not undelivered(control, events)
    duplicates = sum(delivered_seqs(control).values()) - len(events)
    print(f"\n12 s outage, max.poll 6 s: lost rebalances {lost:.0f}; 0 lost of "
          f"{len(events)}; {duplicates} duplicates (window {window})")
    assert 0 <= duplicates <= window, duplicates
    assert read_topic(own_kafka, dlq) == []


def test_a_frozen_broker_turns_readiness_off_and_delivery_recovers_after_the_thaw(
    own_kafka: str, schema_registry_url: str, sandbox: Sandbox,
) -> None:
    """SIGSTOP keeps the broker's connections open: librdkafka reports nothing for a minute.
    The unanswered commits tell: /readyz 503 within 10 s (8 s silence + the commit cadence);
    after SIGCONT, ready again, 0 lost, duplicates <= the window."""
    from tests.conftest import create_topic

    server, control = sandbox
    topic = create_topic(own_kafka, f"it-frozen-{int(time.time() * 1000)}", 2)
    events = [track_event(f"u{i % 10}", i) for i in range(600)]
    produce(own_kafka, schema_registry_url, topic, events)
    group = f"{topic}-g"
    window = 50
    control.set_faults(latency_ms=100)
    env = worker_env(own_kafka, schema_registry_url, server.url, topic, group,
                     WORKER_MAX_IN_FLIGHT=str(window), KAFKA_SESSION_TIMEOUT_MS="30000",
                     KAFKA_HEARTBEAT_INTERVAL_MS="3000", **FAST)
    with WorkerThread(env) as w:
        wait_until(lambda: control.stats()["accepted"] >= 100, 60, "delivery under way")
        wait_until(lambda: w.health.ready()[0], 20, "ready")
        OWN.ctl("freeze", "kafka")
        try:
            frozen = time.monotonic()
            wait_until(lambda: not w.health.ready()[0], 20, "unready while frozen")
            unready_after = time.monotonic() - frozen
            reason = w.health.ready()[1]
        finally:
            OWN.ctl("thaw", "kafka")
        control.set_faults(latency_ms=0)
        wait_until(_settled(own_kafka, group, topic), 120, "offsets at the end")
        wait_until(lambda: w.health.ready()[0], 30, "ready again")
        dlq = w.settings.dlq_topic
    print(f"\nfrozen broker: unready after {unready_after:.2f} s ({reason})")
    assert reason == "not connected to Kafka"
    assert unready_after <= 10.0, unready_after
    assert not undelivered(control, events)
    duplicates = sum(delivered_seqs(control).values()) - len(events)
    assert 0 <= duplicates <= window, duplicates
    assert read_topic(own_kafka, dlq) == []


# ---------------------------------------------------------------- the DLQ (shared broker)


def _topic_config(bootstrap: str, topic: str, **config: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    entries = [ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET)
               for k, v in config.items()]
    resource = ConfigResource("topic", topic, incremental_configs=entries)
    for future in admin.incremental_alter_configs([resource]).values():
        future.result(30)


def _create_dlq(bootstrap: str, name: str, **config: str) -> str:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(name, 1, 1, config=config)])[name].result(30)
    return name


def test_a_dead_letter_too_large_for_the_dlq_is_written_value_less_and_replay_restores_it(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    sandbox: Sandbox,
) -> None:
    """A 200 kB poison event, a DLQ topic that takes 100 kB: the broker refuses the full
    record (MSG_SIZE_TOO_LARGE); it is written once without its value, the partition moves
    on, and `replay` re-publishes the original fetched from the source topic."""
    server, control = sandbox
    topic = topic_factory(partitions=1)
    dlq = _create_dlq(kafka_bootstrap, f"{topic}.dlq", **{"max.message.bytes": "100000"})
    big = b"\x00not avro" + os.urandom(100_000) + b"y" * 100_000
    produce_raw(kafka_bootstrap, topic, b"user", big)
    events = [track_event("u1", i) for i in range(5)]
    produce(kafka_bootstrap, schema_registry_url, topic, events)
    group = f"{topic}-g"
    env = worker_env(kafka_bootstrap, schema_registry_url, server.url, topic, group,
                     KAFKA_DLQ_TOPIC=dlq, **FAST)
    with WorkerThread(env) as w:
        wait_until(caught_up(kafka_bootstrap, group, topic), 60, "the partition moves on")
        dead = w.metric("userpilot_events_dead_lettered_total", reason="undecodable")
        assert w.health.ready()[0], w.health.ready()
    assert dead == 1
    assert sum(delivered_seqs(control).values()) == 5
    [record] = read_topic(kafka_bootstrap, dlq)
    headers = dict(record.headers() or [])
    assert record.value() is None
    assert headers["userpilot.error.value_omitted"] == b"true"
    assert headers["userpilot.error.value_size"] == str(len(big)).encode()
    # replay fetches the original back (to the source topic) and counts it
    env_replay = {k: v for k, v in os.environ.items()
                  if not k.startswith(("KAFKA_", "USERPILOT_", "WORKER_", "SCHEMA_REGISTRY"))}
    env_replay["KAFKA_BOOTSTRAP_SERVERS"] = kafka_bootstrap
    result = subprocess.run(
        [sys.executable, "-m", "consumer", "replay", "--from", dlq, "--group", f"{dlq}-r"],
        env=env_replay, capture_output=True, text=True, timeout=120, cwd=REPO, check=False)
    assert result.returncode == 0, result.stderr
    assert '"restored": 1' in result.stdout and '"replayed": 1' in result.stdout, result.stdout
    values = [m.value() for m in read_topic(kafka_bootstrap, topic)]
    assert values.count(big) == 2  # the original and its replay, byte for byte


def test_a_dead_letter_larger_than_the_producers_queue_is_written_value_less(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    sandbox: Sandbox,
) -> None:
    """Review "pass56": with KAFKA_QUEUE_BUFFERING_MAX_KBYTES=64, a 100 kB poison event was
    refused locally ("Queue full") for good: its partition held, `/readyz` blaming the
    brokers. It is written without its value; `replay` under the same queue says the
    restored record did not fit, one line, no traceback."""
    server, control = sandbox
    topic = topic_factory(partitions=1)
    dlq = _create_dlq(kafka_bootstrap, f"{topic}.dlq")
    big = b"\x00not avro" + b"y" * 100_000
    produce_raw(kafka_bootstrap, topic, b"user", big)
    events = [track_event("u1", i) for i in range(3)]
    produce(kafka_bootstrap, schema_registry_url, topic, events)
    group = f"{topic}-g"
    small = {"KAFKA_QUEUE_BUFFERING_MAX_KBYTES": "64"}
    env = worker_env(kafka_bootstrap, schema_registry_url, server.url, topic, group,
                     KAFKA_DLQ_TOPIC=dlq, **FAST, **small)
    with WorkerThread(env) as w:
        wait_until(caught_up(kafka_bootstrap, group, topic), 60, "the partition moves on")
        assert w.health.ready()[0], w.health.ready()
    assert sum(delivered_seqs(control).values()) == 3
    [record] = read_topic(kafka_bootstrap, dlq)
    assert record.value() is None
    assert dict(record.headers() or [])["userpilot.error.value_omitted"] == b"true"
    env_replay = {k: v for k, v in os.environ.items()
                  if not k.startswith(("KAFKA_", "USERPILOT_", "WORKER_", "SCHEMA_REGISTRY"))}
    result = subprocess.run(
        [sys.executable, "-m", "consumer", "replay", "--from", dlq, "--group", f"{dlq}-r"],
        env={**env_replay, "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, **small},
        capture_output=True, text=True, timeout=120, cwd=REPO, check=False)
    assert "Traceback" not in result.stderr, result.stderr
    assert "KAFKA_QUEUE_BUFFERING_MAX_KBYTES" in result.stdout + result.stderr, result
    assert result.returncode != 0, result
    assert [m.value() for m in read_topic(kafka_bootstrap, topic)].count(big) == 1


def test_an_unwritable_dlq_turns_readiness_off_and_the_metric_on_then_recovers(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    sandbox: Sandbox,
) -> None:
    """A DLQ topic whose max.message.bytes refuses even the value-less record: the poison
    event waits (never dropped, never a crash), readiness turns 503 and
    userpilot_dlq_unwritable 1 after 10 s; once the topic is fixed the record is written,
    the partition moves on and everything recovers without a restart."""
    server, control = sandbox
    topic = topic_factory(partitions=1)
    dlq = _create_dlq(kafka_bootstrap, f"{topic}.dlq", **{"max.message.bytes": "200"})
    produce_raw(kafka_bootstrap, topic, b"user", b"not avro")
    events = [track_event("u1", i) for i in range(3)]
    produce(kafka_bootstrap, schema_registry_url, topic, events)
    group = f"{topic}-g"
    env = worker_env(kafka_bootstrap, schema_registry_url, server.url, topic, group,
                     KAFKA_DLQ_TOPIC=dlq, **FAST)
    with WorkerThread(env) as w:
        wait_until(lambda: w.metric("userpilot_dlq_unwritable") == 1, 30, "the DLQ metric")
        ready, reason = w.health.ready()
        assert not ready and "DLQ unwritable" in reason, reason
        assert read_topic(kafka_bootstrap, dlq, timeout=2) == []
        _topic_config(kafka_bootstrap, dlq, **{"max.message.bytes": "1000000"})
        wait_until(caught_up(kafka_bootstrap, group, topic), 60, "the partition moves on")
        wait_until(lambda: w.health.ready()[0], 15, "ready again")
        assert w.metric("userpilot_dlq_unwritable") == 0
        dead = w.metric("userpilot_events_dead_lettered_total", reason="undecodable")
    assert dead == 1
    assert len(read_topic(kafka_bootstrap, dlq)) == 1
    assert sum(delivered_seqs(control).values()) == 3


def test_a_dlq_made_compacted_while_the_worker_runs_is_not_written_until_fixed(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Review "faults31": start-up refuses a compacted DLQ, but one switched to compact
    later took keyed dead letters with no word, and compaction then deleted all but one
    per user. The running worker reads the policy again (`DLQ_POLICY_CHECK_S`, 1 s here):
    the dead letter waits, readiness and userpilot_dlq_unwritable say why, and once the
    topic is fixed it is written and the partition moves on."""
    import consumer.kafka

    monkeypatch.setattr(consumer.kafka, "DLQ_POLICY_CHECK_S", 1.0)
    server, control = sandbox
    control.set_faults(rules=[{"event_name": "plan_viewed", "action": "400"}])
    topic = topic_factory(partitions=1)
    dlq = _create_dlq(kafka_bootstrap, f"{topic}.dlq", **{"cleanup.policy": "delete"})
    group = f"{topic}-g"
    env = worker_env(kafka_bootstrap, schema_registry_url, server.url, topic, group,
                     KAFKA_DLQ_TOPIC=dlq, **FAST)
    with WorkerThread(env) as w:
        produce(kafka_bootstrap, schema_registry_url, topic, [track_event("u1", 0)])
        wait_until(caught_up(kafka_bootstrap, group, topic), 60, "the first event delivered")
        _topic_config(kafka_bootstrap, dlq, **{"cleanup.policy": "compact"})
        time.sleep(1.5)
        produce(kafka_bootstrap, schema_registry_url, topic,
                [track_event("u-bad", 1, name="Plan Viewed"), track_event("u1", 2)])
        wait_until(lambda: w.metric("userpilot_dlq_unwritable") == 1, 30, "the DLQ metric")
        ready, reason = w.health.ready()
        assert not ready and "DLQ unwritable" in reason and "compact" in reason, reason
        assert read_topic(kafka_bootstrap, dlq, timeout=2) == []
        assert committed_offsets(kafka_bootstrap, group, topic).get(0) == 1
        _topic_config(kafka_bootstrap, dlq, **{"cleanup.policy": "delete"})
        wait_until(caught_up(kafka_bootstrap, group, topic), 60, "the partition moves on")
        wait_until(lambda: w.health.ready()[0], 15, "ready again")
        assert w.metric("userpilot_dlq_unwritable") == 0
    assert len(read_topic(kafka_bootstrap, dlq)) == 1
    assert sum(delivered_seqs(control).values()) == 2


def _readyz_text(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return str(r.read().decode())
    except urllib.error.HTTPError as exc:
        return str(exc.read().decode())
    except OSError:
        return ""


def test_a_worker_started_during_a_broker_outage_waits_unready_and_delivers_after_it(
    own_kafka: str, schema_registry_url: str, sandbox: Sandbox, tmp_path: Path,
) -> None:
    """A pod started while Kafka was down exited 1 at once; Kubernetes restarted it minutes
    apart (delivery resumed minutes after the outage) and a process run by anything else
    stayed dead. It now stays up, live and unready, says what it waits for, and delivers
    everything once the broker is back."""
    from tests.conftest import create_topic

    server, control = sandbox
    topic = create_topic(own_kafka, f"it-start-outage-{int(time.time() * 1000)}", 2)
    events = [track_event(f"u{i % 10}", i) for i in range(60)]
    produce(own_kafka, schema_registry_url, topic, events)
    group = f"{topic}-g"
    port = free_port()
    env = worker_env(own_kafka, schema_registry_url, server.url, topic, group,
                     WORKER_METRICS_PORT=str(port), **FAST)
    OWN.ctl("kill", "kafka")
    worker = WorkerProcess(env, tmp_path / "worker.log", args=("--timeout", "2"))
    try:
        wait_until(lambda: "waiting: Kafka at" in _readyz_text(port), 30,
                   "/readyz naming the wait")
        assert _readyz(port) == 503
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
            assert r.status == 200
        time.sleep(4)  # a few tries
        assert worker.proc.poll() is None, worker.output()[-3000:]
        OWN.ctl("up", "kafka", "--keep-data")
        wait_until(lambda: not undelivered(control, events), 120, "every event delivered")
        wait_until(lambda: _readyz(port) == 200, 30, "ready after the outage")
    finally:
        if worker.proc.poll() is None:
            worker.terminate(timeout=30)
        OWN.ctl("up", "kafka", "--keep-data")
    output = worker.output()
    assert "start-up: Kafka at" in output and "trying again in" in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]


def test_probes_answer_while_the_first_check_waits_for_a_silent_kafka(
    schema_registry_url: str, sandbox: Sandbox, tmp_path: Path,
) -> None:
    """Review helm24: the probe server started after the first check of the services, which
    waits --timeout for Kafka then for the registry: listeners that take connections and
    never answer left /healthz down for ~24 s of the chart's ~30 s liveness allowance."""
    import threading

    server, _ = sandbox
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    held: list[socket.socket] = []

    def accept() -> None:  # take connections, answer nothing
        while True:
            try:
                held.append(silent.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    port = free_port()
    env = worker_env(f"127.0.0.1:{silent.getsockname()[1]}", schema_registry_url, server.url,
                     "it-silent-kafka", "it-silent-kafka-g", WORKER_METRICS_PORT=str(port))
    started = time.monotonic()
    worker = WorkerProcess(env, tmp_path / "worker.log", args=("--timeout", "30"))
    try:
        wait_until(lambda: "checking Kafka and the schema registry" in _readyz_text(port), 25,
                   "/readyz while the first check waits")
        assert time.monotonic() - started < 30, "answered only after the first check"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
            assert r.status == 200
        assert _readyz(port) == 503
    finally:
        code = worker.terminate(timeout=30)
        silent.close()
        for conn in held:
            conn.close()
    # Kubernetes may stop the pod now: its probes answer, so SIGTERM is a clean stop.
    assert code == 0, worker.output()[-3000:]
