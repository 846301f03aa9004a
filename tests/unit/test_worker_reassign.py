"""Partitions assigned during the run: one revoked while paused and assigned again is
consumed again; one assigned later has its commit notes read before its messages.

librdkafka keeps a partition's pause flag across a revoke and a later re-assignment
(librdkafka#1849); the fake source does the same, so without the worker resuming it the
partition would stay silent forever (seen after a SIGKILL rebalance in the benchmark).
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field

import pytest
from prometheus_client import CollectorRegistry

from consumer.commits import TP
from consumer.health import Health
from consumer.metrics import Metrics
from consumer.offsets import Finished
from consumer.worker import Callbacks, Worker
from tests.unit.test_worker import (
    TOPIC,
    FakeClient,
    FakeDlq,
    FakeRegistry,
    FakeSource,
    Message,
    Run,
    drive,
    log_of,
    make,
    settings,
    track,
    until,
)


@dataclass
class Reassigning(FakeSource):
    """Also hands partitions back (`assign_next`), from offset 0, during a consume."""

    assign_next: dict[TP, list[Message]] = field(default_factory=dict)

    def consume(self, max_messages: int, timeout_s: float) -> list[Message]:
        if self.assign_next:
            parts, self.assign_next = self.assign_next, {}
            for tp, messages in parts.items():
                self.log[tp] = messages
                self.position[tp] = 0
            self.cb.on_assign(sorted(parts))
        return super().consume(max_messages, timeout_s)


def test_a_partition_revoked_while_paused_is_resumed_when_assigned_again() -> None:
    tp = (TOPIC, 0)
    messages = [Message(TOPIC, 0, i, f"u{i}".encode(), track(f"u{i}", i)) for i in range(20)]
    metrics = Metrics(CollectorRegistry())
    client, dlq, registry = FakeClient(), FakeDlq(), FakeRegistry()
    client.gate = asyncio.Event()  # Userpilot hangs: the window fills, the partition pauses
    made: list[Reassigning] = []

    def source(cb: Callbacks) -> Reassigning:
        made.append(Reassigning(cb, {tp: list(messages)}))
        return made[-1]

    worker = Worker(settings(WORKER_MAX_IN_FLIGHT="4", WORKER_SHUTDOWN_GRACE_SECONDS="0.2"),
                    metrics, Health(metrics), client=client, registry=registry, dlq=dlq,
                    source=source)
    run = Run(worker, client, dlq, registry, made)  # type: ignore[arg-type]

    async def scenario(fake: FakeSource) -> None:
        src = made[0]
        await until(lambda: tp in src.paused, "the partition paused", timeout=10)
        src.revoke_next = [tp]
        await until(lambda: tp not in worker.assigned, "the revoke")
        assert tp in src.paused, "the fake keeps the pause, as librdkafka does"
        assert client.gate is not None
        client.gate.set()
        src.assign_next = {tp: list(messages)}
        await until(lambda: src.committed().get(tp) == 20, "the partition consumed to its end",
                    timeout=10)

    assert drive(run, scenario) == 0


def test_a_partition_assigned_soon_after_another_has_its_notes_read_at_once() -> None:
    """Notes are read per partition when it is assigned. A first version waited a second
    after any read before the next: a partition assigned meanwhile had its messages taken
    first, and the events its previous owner had finished were sent again."""
    first, second = (TOPIC, 0), (TOPIC, 1)
    later = [Message(TOPIC, 1, i, f"v{i}".encode(), track(f"v{i}", i)) for i in range(10)]
    metrics = Metrics(CollectorRegistry())
    client, dlq, registry = FakeClient(), FakeDlq(), FakeRegistry()
    made: list[Reassigning] = []

    def source(cb: Callbacks) -> Reassigning:
        made.append(Reassigning(cb, {first: [Message(TOPIC, 0, 0, b"u", track("u", 0))]}))
        made[-1].ahead = {second: Finished([(1, 9)])}
        return made[-1]

    worker = Worker(settings(), metrics, Health(metrics), client=client, registry=registry,
                    dlq=dlq, source=source)
    run = Run(worker, client, dlq, registry, made)  # type: ignore[arg-type]

    async def scenario(fake: FakeSource) -> None:
        src = made[0]
        await until(lambda: src.committed().get(first) == 1, "the first partition done")
        src.assign_next = {second: list(later)}
        await until(lambda: src.committed().get(second) == 10, "the second partition done")

    assert drive(run, scenario) == 0
    users = sorted(json.loads(body)["user_id"] for body in client.bodies)
    assert users == ["u", "v0"]


def test_the_stop_line_names_only_the_partitions_held_at_the_stop(
        caplog: pytest.LogCaptureFixture) -> None:
    """A partition revoked long before was still listed with the offset this replica last
    committed, which the next owner had since moved past (review "ops36")."""
    log = {**log_of(track("u1", 1), track("u2", 2), partition=0),
           **log_of(track("u3", 3), track("u4", 4), partition=1)}
    run = make(log)

    async def scenario(source: FakeSource) -> None:
        await until(lambda: source.committed().get((TOPIC, 0)) == 2
                    and source.committed().get((TOPIC, 1)) == 2, "both partitions committed")
        source.revoke_next = [(TOPIC, 0)]
        await until(lambda: (TOPIC, 0) not in run.worker.assigned, "the revoke")

    with caplog.at_level(logging.INFO, logger="consumer.worker"):
        assert drive(run, scenario) == 0
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stopped;")]
    assert line == f"stopped; committed {TOPIC}: 1@2"  # partition@offset
