"""Userpilot's per-token limit, scaled down 6× in time (100 per 10 s = 600 per 60 s's rate):
one worker and three workers sharing the token reach ≥ 95 % of it with zero 429s."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from consumer.ratelimit import safe_rate
from consumer.sandbox import SandboxControl, SandboxThread
from tests.integration.harness import WorkerThread, produce, track_event, wait_until, worker_env
from tests.rolling import max_in_window

Sandbox = tuple[SandboxThread, SandboxControl]
LIMIT, PERIOD = 100, 10.0
WARMUP, MEASURE = 4.0, 20.0


@pytest.mark.parametrize("workers", [1, 3])
def test_workers_sharing_a_token_use_the_limit_without_429(
    workers: int, kafka_bootstrap: str, schema_registry_url: str,
    topic_factory: Callable[..., str], sandbox: Sandbox,
) -> None:
    server, control = sandbox
    control.set_faults(rate_limit=LIMIT, rate_window_seconds=PERIOD)
    topic = topic_factory(partitions=6)
    backlog = int((WARMUP + MEASURE + 15) * LIMIT / PERIOD * 1.5)
    produce(kafka_bootstrap, schema_registry_url, topic,
            [track_event(f"u{i % 60}", i) for i in range(backlog)])
    env = worker_env(kafka_bootstrap, schema_registry_url, server.url, topic, f"{topic}-g",
                     USERPILOT_RATE_LIMIT=str(LIMIT), USERPILOT_RATE_PERIOD_SECONDS=str(PERIOD),
                     USERPILOT_RATE_BURST="1", WORKER_MAX_IN_FLIGHT="50")
    group = [WorkerThread(env) for _ in range(workers)]
    try:
        for w in group:
            w.__enter__()
        wait_until(lambda: sum(len(w.worker.assigned) for w in group) == 6
                   and all(w.worker.assigned for w in group), 60, "every worker assigned")
        time.sleep(WARMUP)
        start = time.time()
        time.sleep(MEASURE)
        end = time.time()
    finally:
        for w in group:
            w.stop()
    received = [r["received_at"] for r in control.requests("/v1/track")]
    stats = control.stats()
    in_window = sum(1 for t in received if start <= t < end)
    share = in_window / (LIMIT * MEASURE / PERIOD)
    assert stats["by_status"].get("429", 0) == 0, stats
    assert sum(w.metric("userpilot_responses_total", status="429", endpoint=e)
               for w in group for e in ("track", "identify")) == 0
    # What the pacing allows: each replica's share minus its own burst, over the period
    # plus the jitter slack (`consumer.ratelimit.safe_rate`).
    designed = workers * safe_rate(LIMIT, PERIOD, 1, 1 / workers)
    used = in_window / (designed * MEASURE)
    assert used >= 0.97, (f"{workers} worker(s) used {used:.1%} of the designed pace "
                          f"({share:.1%} of the limit)")
    worst = max_in_window(received, PERIOD)
    assert worst <= LIMIT, f"{worst} requests in one rolling {PERIOD:g} s window"


def test_a_slow_spell_past_what_the_pool_carries_ends_without_a_burst_of_429s(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    sandbox: Sandbox,
) -> None:
    """Answers at 2 s on 4 connections carry 2 requests a second against the limit's 10.
    Before round 21 events took their rate slots and then queued for a connection; when
    answers sped up they went out together, over the rolling window: 429s, and the
    limiter halved. A slot is now taken only by a request holding a connection."""
    server, control = sandbox
    control.set_faults(rate_limit=LIMIT, rate_window_seconds=PERIOD)
    topic = topic_factory(partitions=3)
    produce(kafka_bootstrap, schema_registry_url, topic,
            [track_event(f"u{i % 60}", i) for i in range(600)])
    env = worker_env(kafka_bootstrap, schema_registry_url, server.url, topic, f"{topic}-g",
                     USERPILOT_RATE_LIMIT=str(LIMIT), USERPILOT_RATE_PERIOD_SECONDS=str(PERIOD),
                     USERPILOT_RATE_BURST="1", USERPILOT_ENSURE_USER="false",
                     USERPILOT_MAX_CONNECTIONS="4")
    with WorkerThread(env) as w:
        wait_until(lambda: len(w.worker.assigned) == 3, 60, "the partitions assigned")
        wait_until(lambda: control.stats()["accepted"] >= 5, 30, "delivery under way")
        control.set_faults(latency_ms=2000)
        time.sleep(8)
        control.set_faults(latency_ms=0)
        time.sleep(PERIOD + 2)
        limited = sum(w.metric("userpilot_responses_total", status="429", endpoint=e)
                      for e in ("track", "identify"))
    received = sorted(r["received_at"] for r in control.requests("/v1/track"))
    assert control.stats()["by_status"].get("429", 0) == 0, control.stats()
    assert limited == 0
    worst = max_in_window(received, PERIOD)
    assert worst <= LIMIT, f"{worst} requests in one rolling {PERIOD:g} s window"
