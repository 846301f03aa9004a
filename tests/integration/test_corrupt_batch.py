"""A record batch corrupted on the broker's disk, read with `KAFKA_CHECK_CRCS=true`
(review "design59"). librdkafka hands the CRC failure over as an error, takes a garbage
offset for its next position, finds it past the log's end and starts the partition over
from its start. Taken for a log replaced, the events before the batch were delivered
again, and again after each restart of the pod; the worker now stops at once, each event
before the batch delivered once, and a restarted worker sends nothing."""

from __future__ import annotations

import glob
import os
from collections.abc import Callable
from pathlib import Path

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, ConfigResource

from consumer import codec
from consumer.registry import Registry
from consumer.sandbox import SandboxControl, SandboxThread
from tests.integration.harness import (
    WorkerProcess,
    WorkerThread,
    delivered_seqs,
    free_port,
    track_event,
    wait_until,
    worker_env,
)

Sandbox = tuple[SandboxThread, SandboxControl]
BAD = 4  # the offset whose batch is corrupted


def _log_dirs(bootstrap: str) -> list[str]:
    """Where the (local, test) broker keeps its logs, as it says."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    broker = next(iter(admin.list_topics(timeout=10).brokers))
    resource = ConfigResource(ConfigResource.Type.BROKER, str(broker))
    configs = admin.describe_configs([resource])[resource].result(timeout=10)
    return str(configs["log.dirs"].value).split(",")


def _corrupt(bootstrap: str, topic: str, marker: bytes) -> None:
    """Flip one byte of `marker` inside the partition's segment file: the batch holding it
    fails its CRC check when read (the broker serves the bytes as they are)."""
    segments = [path for d in _log_dirs(bootstrap)
                for path in glob.glob(os.path.join(d, f"{topic}-0", "*.log"))]
    assert len(segments) == 1, segments
    with open(segments[0], "r+b") as segment:
        data = bytearray(segment.read())
        at = data.find(marker)
        assert at >= 0, "the marked record is in the segment"
        segment.seek(at + 2)
        segment.write(bytes([data[at + 2] ^ 0xFF]))


def test_a_corrupt_batch_stops_the_worker_without_sending_anything_twice(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    sandbox: Sandbox, tmp_path: Path,
) -> None:
    server, control = sandbox
    topic = topic_factory()
    group = f"{topic}-g"
    schema_id = Registry(schema_registry_url).register(topic)
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 0})
    events = [track_event(f"crc-user-{i}", i) for i in range(8)]
    for i, event in enumerate(events):  # one batch each
        value = codec.encode(schema_id, codec.to_record(event))
        if i == BAD:
            # After a failed CRC check librdkafka reads on into the batch's payload: here 8
            # bytes of "x" read as the next batch's offset (0x7878787878787878), past the
            # log's end, and the partition is reset to its start (measured). A payload read
            # otherwise has the batch fetched again and again: the partition is held, the
            # README's stalled partition.
            value = f"crc-user-{BAD}-".encode() + b"x" * 200
        producer.produce(topic, key=str(event["userId"]).encode(), value=value)
        assert producer.flush(30) == 0
    _corrupt(kafka_bootstrap, topic, f"crc-user-{BAD}".encode())
    env = worker_env(kafka_bootstrap, schema_registry_url, server.url, topic, group,
                     USERPILOT_ENSURE_USER="false", KAFKA_CHECK_CRCS="true")
    before = {(f"crc-user-{i}", i): 1 for i in range(BAD)}
    with WorkerThread(env) as w:
        wait_until(lambda: not w.alive, 60, "the worker stopped")
        assert dict(delivered_seqs(control)) == before
        assert w.exit_code == 1, w.exit_code
        # The batch's offset, for the runbook's --to-offset: not the garbage offset of the
        # error that follows it (review "diff59").
        assert f"cannot read a record batch (MessageSet at offset {BAD} " in str(
            w.worker.fatal), w.worker.fatal
        # Counted, so UserpilotSourceLogReset (its runbook) pages (review "ops59").
        assert w.metric("userpilot_log_resets_total", topic=topic) == 1
    # Restarted, as `run` in a pod: it stops again at once, sending nothing, and says why.
    worker = WorkerProcess({**env, "WORKER_METRICS_PORT": str(free_port())},
                           tmp_path / "worker.log")
    try:
        code = worker.wait(60)
    except BaseException:
        worker.kill()
        raise
    assert code == 1, worker.output()[-3000:]
    assert f"cannot read a record batch (MessageSet at offset {BAD} " in worker.output()
    assert dict(delivered_seqs(control)) == before, "the restarted worker sent nothing"
