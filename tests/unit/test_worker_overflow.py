"""The overflow under random revokes, re-assigns and pauses (fake source, no services).

Deliveries are fast against a window of 10, so messages keep waiting in the overflow
(`Worker.overflow`) while partitions come and go. The fake follows librdkafka where it
matters: a re-assigned partition is fetched again from its committed offset, and a resume
fetches from the offset after the last message `consume` returned. The rules checked are
the product's: nothing is taken for a partition this worker does not own, each assignment
takes its partition's offsets in order without gaps or repeats, a commit never covers an
event Userpilot has not accepted, and every event is delivered.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from consumer import worker as worker_module
from consumer.commits import TP
from consumer.worker import Callbacks
from tests.unit.test_worker import (
    TOPIC,
    FakeClient,
    FakeSource,
    Message,
    codec_seq,
    drive,
    make,
    track,
    until,
)

EVENTS = 400  # per partition


def user(partition: int, seq: int) -> str:
    """Ten users per partition: a user's events go one at a time, a partition's do not."""
    return f"u{partition}.{seq % 10}"


@dataclass
class Rebalancing(FakeSource):
    """A member whose partitions are revoked and re-assigned, as the test decides."""

    owned: set[TP] = field(default_factory=set)
    assign_next: list[TP] = field(default_factory=list)
    epochs: dict[TP, int] = field(default_factory=lambda: defaultdict(int))
    accepted: Callable[[], set[tuple[str, int]]] | None = None
    bad_commits: list[tuple[TP, int, list[int]]] = field(default_factory=list)

    def commit(self, offsets: dict[TP, int], *, wait: bool = True,
               notes: dict[TP, str] | None = None) -> bool:
        if self.accepted is not None:
            seen = self.accepted()
            for tp, offset in offsets.items():
                lost = [i for i in range(offset) if (user(tp[1], i), i) not in seen]
                if lost:
                    self.bad_commits.append((tp, offset, lost[:5]))
        return super().commit(offsets, wait=wait, notes=notes)

    def subscribe(self) -> None:
        self._on_poll_thread()
        self.position = {tp: 0 for tp in self.log}
        self.owned = set(self.log)
        self.cb.on_assign(sorted(self.log))

    def consume(self, max_messages: int, timeout_s: float) -> list[Message]:
        self._on_poll_thread()
        while self._acks:
            self.cb.on_committed(list(self._acks.pop(0).items()), [])
        # A request is cleared only once handled: the scenario reads `owned` when both are
        # empty (cleared before the revoke callback returned, it missed a partition).
        if self.revoke_next:
            parts = [tp for tp in self.revoke_next if tp in self.owned]
            if parts:
                self.cb.on_revoke(parts)
                self.owned.difference_update(parts)
            self.revoke_next = []
        if self.assign_next:
            parts = [tp for tp in self.assign_next if tp not in self.owned]
            if parts:
                done = self.committed()
                for tp in parts:  # fetched again from the committed offset
                    self.position[tp] = done.get(tp, 0)
                    self.epochs[tp] += 1
                self.owned.update(parts)
                self.cb.on_assign(sorted(parts))
            self.assign_next = []
        out: list[Message] = []
        for tp, messages in sorted(self.log.items()):
            if tp in self.paused or tp not in self.owned:
                continue
            while self.position[tp] < len(messages) and len(out) < max_messages:
                out.append(messages[self.position[tp]])
                self.position[tp] += 1
        if not out:
            time.sleep(min(timeout_s, 0.005))  # as a consume with nothing to return waits
        return out


class JitterClient(FakeClient):
    """Userpilot answering at once or after a few to 50 ms."""

    def __init__(self, rng: random.Random) -> None:
        super().__init__()
        self.rng = rng

    async def send(self, call: Any) -> int:
        await asyncio.sleep(self.rng.choice([0, 0, 0.002, 0.02, 0.05]))
        return await super().send(call)


@pytest.mark.parametrize(("seed", "jitter"), [(0, False), (1, True), (2, True)])
def test_overflow_keeps_order_ownership_and_commits_through_rebalances(
        seed: int, jitter: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(seed)
    parts = [(TOPIC, p) for p in range(3)]
    log = {tp: [Message(TOPIC, tp[1], i, user(tp[1], i).encode(), track(user(tp[1], i), i))
                for i in range(EVENTS)] for tp in parts}
    run = make(log, client=JitterClient(random.Random(seed)) if jitter else None,
               WORKER_MAX_IN_FLIGHT="10", USERPILOT_ENSURE_USER="false")

    def member(cb: Callbacks) -> Rebalancing:
        made = Rebalancing(cb, log)
        run.made.append(made)
        return made

    def accepted() -> set[tuple[str, int]]:
        return {(json.loads(b)["user_id"], codec_seq(b)) for b in list(run.client.bodies)}

    worker = run.worker
    taken: list[tuple[TP, int, int, bool]] = []  # partition, offset, epoch, owned then
    held = [0]
    real_take, real_next = worker._take, worker._next_batch

    def source() -> Rebalancing:
        first = run.made[0]
        assert isinstance(first, Rebalancing)
        return first

    def take(message: Any, tp: TP, offset: int, *rest: Any) -> Any:
        at = (tp, offset, source().epochs[tp], tp in source().owned)
        out = real_take(message, tp, offset, *rest)
        if out is not worker_module._DEFER:  # deferred (schema window full): taken later
            taken.append(at)
        return out

    def next_batch(messages: Any, room: int) -> Any:
        out = real_next(messages, room)
        held[0] = max(held[0], len(worker.overflow))
        return out

    monkeypatch.setattr(worker, "_make_source", member)
    monkeypatch.setattr(worker, "_take", take)
    monkeypatch.setattr(worker, "_next_batch", next_batch)

    async def scenario(_: FakeSource) -> None:
        s = source()
        s.accepted = accepted
        for _step in range(25):
            await asyncio.sleep(rng.uniform(0.01, 0.06))
            tp = rng.choice(parts)
            if tp in s.owned:
                s.revoke_next = [tp]
            else:
                s.assign_next = [tp]
        await until(lambda: not s.revoke_next and not s.assign_next, "the last rebalance")
        s.assign_next = [tp for tp in parts if tp not in s.owned]
        await until(lambda: all(s.committed().get(tp) == EVENTS for tp in parts),
                    "everything committed", timeout=60)

    assert drive(run, scenario) == 0
    assert held[0] > 0, "the overflow was never used: the test proves nothing"
    assert not source().bad_commits, source().bad_commits[:3]
    assert all(owned for *_, owned in taken), "taken for a partition not owned"
    by_assignment: dict[tuple[TP, int], list[int]] = defaultdict(list)
    for tp, offset, epoch, _ in taken:
        by_assignment[(tp, epoch)].append(offset)
    for key, offsets in by_assignment.items():
        assert offsets == list(range(offsets[0], offsets[0] + len(offsets))), key
    seen = accepted()
    for tp in parts:
        missing = [i for i in range(EVENTS) if (user(tp[1], i), i) not in seen]
        assert not missing, (tp, missing[:10])
