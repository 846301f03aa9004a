"""A partition revoked while paused and assigned again is consumed again.

librdkafka keeps a partition's pause flag across a revoke and a later re-assignment
(librdkafka#1849); the fake source does the same, so without the worker resuming it the
partition would stay silent forever (seen after a SIGKILL rebalance in the benchmark).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from consumer.commits import TP
from consumer.health import Health
from consumer.metrics import Metrics
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
