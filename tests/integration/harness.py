"""Helpers for integration tests: run the worker (in a thread or as a process), produce
events, read offsets, wait for conditions. Real broker, registry and sandbox only."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaException, TopicPartition
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from consumer.config import load_settings
from consumer.health import Health
from consumer.kafka import make_producer
from consumer.metrics import Metrics
from consumer.produce import produce_events
from consumer.worker import Worker
from tests.conftest import hang_up_as_default

REPO = Path(__file__).resolve().parents[2]
WRITE_TOKEN = "it-write-token-7f3a9c"
READ_TOKEN = "it-read-token-51be02"


def free_port() -> int:
    """A port nothing listens on right now (bind to 0, read it, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
"""A /metrics scrape's samples keyed by (sample name, labels)."""


def get(port: int, path: str) -> tuple[int, str]:
    """(status, body) of a GET on the worker's probe server; (0, error) when not listening."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


def scrape(port: int) -> tuple[str, Samples]:
    """The /metrics text and its samples keyed by (sample name, labels)."""
    status, text = get(port, "/metrics")
    assert status == 200, f"/metrics answered {status}: {text}"
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return text, samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def wait_until(predicate: Callable[[], bool], timeout: float, what: str,
               interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def track_event(user: str, seq: int, name: str = "Feature Used", **props: Any) -> dict[str, Any]:
    return {
        "type": "track", "event": name, "userId": user, "anonymousId": f"anon-{user}",
        "properties": {"seq": seq, "user": user, **props},
        "context": {"consent": {"analytics": True}},
        "timestamp": "2026-11-26T10:00:00.000Z", "messageId": f"{user}-{seq}",
    }


def produce(bootstrap: str, registry: str, topic: str, events: Iterable[Mapping[str, Any]]) -> int:
    lines = [json.dumps(e) for e in events]
    with open(os.devnull, "w") as quiet:
        return produce_events(lines, topic=topic, bootstrap=bootstrap, registry_url=registry,
                              out=quiet)


def produce_raw(bootstrap: str, topic: str, key: bytes | None, value: bytes | None) -> None:
    produce_records(bootstrap, topic, [(key, value)])


def produce_records(bootstrap: str, topic: str,
                    records: Sequence[tuple[bytes | None, bytes | None]]) -> None:
    """Raw records in order through one producer (a producer per record costs ~0.5 s)."""
    producer = make_producer({"bootstrap.servers": bootstrap})
    for key, value in records:
        producer.produce(topic, key=key, value=value)
    assert producer.flush(30) == 0


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "it-offsets-probe"})
    try:
        meta = consumer.list_topics(topic, timeout=10)
        ends = {}
        for p in meta.topics[topic].partitions:
            ends[p] = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
        return ends
    finally:
        consumer.close()


def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    """Committed offsets of a group; {} while the coordinator is not ready yet."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        meta = consumer.list_topics(topic, timeout=10)
        parts = [TopicPartition(topic, p) for p in meta.topics[topic].partitions]
        try:
            found = consumer.committed(parts, timeout=10)
        except KafkaException:
            return {}
        return {tp.partition: tp.offset for tp in found}
    finally:
        consumer.close()


def caught_up(bootstrap: str, group: str, topic: str) -> Callable[[], bool]:
    """A predicate: the group has committed every partition to its current end."""
    ends = end_offsets(bootstrap, topic)

    def check() -> bool:
        committed = committed_offsets(bootstrap, group, topic)
        return all(end == 0 or committed.get(p, -1) >= end for p, end in ends.items())
    return check


def delivered_seqs(control: Any) -> Counter[tuple[str, int]]:
    """(user_id, metadata.seq) of every Track call the sandbox accepted, with counts."""
    return Counter((r["body"]["user_id"], r["body"]["metadata"]["seq"])
                   for r in control.requests("/v1/track"))


def undelivered(control: Any, events: Iterable[Mapping[str, Any]]) -> list[Any]:
    """The messageIds of `events` (made by `track_event`) the sandbox never accepted."""
    got = delivered_seqs(control)
    return [e["messageId"] for e in events
            if got[(e["userId"], e["properties"]["seq"])] == 0]


def read_topic(bootstrap: str, topic: str, timeout: float = 10.0) -> list[Any]:
    """Every message currently in a topic (e.g. the DLQ)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"it-read-{time.time()}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    try:
        meta = consumer.list_topics(topic, timeout=10)
        if topic not in meta.topics or meta.topics[topic].error is not None:
            return []
        parts = list(meta.topics[topic].partitions)
        ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                for p in parts}
        total = sum(ends.values())
        consumer.assign([TopicPartition(topic, p, 0) for p in parts])
        out: list[Any] = []
        deadline = time.monotonic() + timeout
        while len(out) < total and time.monotonic() < deadline:
            out.extend(m for m in consumer.consume(100, 0.5) if m.error() is None)
        return out
    finally:
        consumer.close()


def worker_env(bootstrap: str, registry: str, sandbox_url: str, topic: str, group: str,
               **extra: str) -> dict[str, str]:
    env = {
        "USERPILOT_API_KEY": WRITE_TOKEN,
        "USERPILOT_ANALYTICS_ENDPOINT": sandbox_url.split("://", 1)[1],
        "USERPILOT_INSECURE_HTTP": "true",
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "KAFKA_TOPICS": topic,
        "KAFKA_GROUP_ID": group,
        "SCHEMA_REGISTRY_URL": registry,
        "WORKER_METRICS_PORT": "0",
        "WORKER_COMMIT_INTERVAL_SECONDS": "0.5",
        "USERPILOT_RATE_LIMIT": "1000000",
        "USERPILOT_RATE_BURST": "100",
        "KAFKA_SESSION_TIMEOUT_MS": "10000",
        "KAFKA_HEARTBEAT_INTERVAL_MS": "1000",
    }
    env.update(extra)
    return env


class WorkerThread:
    """The real Worker on a background thread with its own event loop."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.settings = load_settings(env)
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.health = Health(self.metrics)
        self.worker = Worker(self.settings, self.metrics, self.health)
        self.exit_code: int | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.exit_code = asyncio.run(self.worker.run())
        except BaseException as exc:
            self.error = exc

    def __enter__(self) -> WorkerThread:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, timeout: float = 60.0) -> int | None:
        if self._thread.is_alive():
            self.worker.stop()
            self._thread.join(timeout)
        if self.error is not None:
            raise self.error
        return self.exit_code

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def metric(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


class WorkerProcess:
    """`python -m consumer run` as a child process, output captured to a file.

    Only ``env`` configures it: REDIS_URL (exported by ``make test``) is not inherited, so a
    test uses Redis only when it passes it."""

    def __init__(self, env: Mapping[str, str], log_path: Path,
                 args: tuple[str, ...] = ()) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115
        full_env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("KAFKA_", "USERPILOT_", "WORKER_", "SCHEMA_REGISTRY",
                                         "REDIS_"))}
        full_env.update(env)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "consumer", "run", *args], env=full_env, cwd=REPO,
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=hang_up_as_default,
        )

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self._log.close()

    def terminate(self, timeout: float = 60.0, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self._log.close()
        return code

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        self._log.close()
        return code

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")
