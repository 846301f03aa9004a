"""Workloads 9-11: replicas sharing state through Redis (issue 12), each with and without it.

9  skewed keys: one hot partition, three workers, Userpilot's limit compressed in time
   (600 per 10 s by default: the 10 req/s rate of 600/min, 6× shorter window): the share
   of the limit delivered, 429s and the busiest rolling window, partition share vs Redis.
10 SIGKILL of one of three workers mid-stream: how many events Userpilot received twice,
   without Redis (at least once) and with the messageId deduplication.
11 CPU cost of the Redis calls: worker CPU seconds per delivered event with and without
   REDIS_URL (unlimited rate, same backlog size), and redis-server's own CPU per event.

Needs REDIS_URL (or ``--redis-url``); every run uses messageIds unique to it, so records
left in Redis by an earlier run never turn this run's events into duplicates.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import redis as sync_redis

from bench import events as ev
from bench.kafka_io import OffsetProbe, group_stable, produce_backlog, register_schema
from bench.procs import SandboxProcess, WorkerProcess, cpu_seconds

if TYPE_CHECKING:
    from bench.workloads import Bench

__all__ = ["cpu_cost", "sigkill_duplicates", "skewed_keys"]

UNLIMITED = {"USERPILOT_RATE_LIMIT": "1000000", "USERPILOT_RATE_PERIOD_SECONDS": "1",
             "USERPILOT_RATE_BURST": "100000"}
FAST_GROUP = {"KAFKA_SESSION_TIMEOUT_MS": "6000", "KAFKA_HEARTBEAT_INTERVAL_MS": "1000"}


def _backlog(bench: Bench, name: str, count: int, partitions: int,
             partition: int | None = None, topic: str | None = None) -> str:
    """Delivered events whose messageId and sent_ns are unique to this run (sent_ns is the
    event's identity in the sandbox's records)."""
    topic = topic or bench.topic(name, partitions)
    schema_id = register_schema(bench.registry, topic)
    (tmpl,) = ev.templates(schema_id, "deliver")
    base = time.time_ns() // 1000 % 10**14 * 10
    produce_backlog(bench.bootstrap, topic,
                    (tmpl.render(ev.Stamp(i % bench.params.users, base + i, base + i))
                     for i in range(count)), partition=partition)
    return topic


def _identities(sandbox: SandboxProcess) -> Counter[int]:
    out: Counter[int] = Counter()
    for record in sandbox.control.requests("/v1/track"):
        sent = ev.sent_ns_of(record["body"].get("metadata", {}))
        if sent is not None:
            out[sent] += 1
    return out


def _wait(predicate: Callable[[], bool], timeout: float, what: str,
          workers: list[WorkerProcess]) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        for worker in workers:
            if not worker.alive():
                raise RuntimeError(f"worker exited while waiting for {what}:\n{worker.tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def _accepted_at_least(sandbox: SandboxProcess, n: int) -> bool:
    return bool(sandbox.control.stats()["accepted"] >= n)


def _caught_up(bench: Bench, group: str, topic: str) -> Callable[[], bool]:
    probe = OffsetProbe(bench.bootstrap, group, topic)
    total = probe.end_total()

    def done() -> bool:
        return probe.committed_total() >= total

    return done


def _max_in_window(times: list[float], period: float) -> int:
    times = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while times[lo] <= t - period:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


# -- 9 -------------------------------------------------------------------------------------
def skewed_keys(bench: Bench, redis_url: str) -> dict[str, Any]:
    p = bench.params
    limit, period = p.skew_limit, p.skew_window_s
    out: dict[str, Any] = {"limit": limit, "window_s": period, "workers": 3,
                           "partitions": p.partitions, "hot_partition": 0,
                           "measure_s": p.skew_measure_s}
    for mode, extra in (("partition_share", {}), ("redis", {"REDIS_URL": redis_url})):
        count = int((p.skew_warmup_s + p.skew_measure_s + 30) * limit / period)
        topic = bench.topic(f"skew-{mode}", p.partitions)
        with SandboxProcess(rate_limit=limit, rate_window_s=period) as sandbox:
            settings = {"USERPILOT_RATE_LIMIT": str(limit),
                        "USERPILOT_RATE_PERIOD_SECONDS": f"{period:g}",
                        "USERPILOT_RATE_BURST": "1", **FAST_GROUP, **extra}
            tag = f"skew-{mode}"
            workers = [bench.worker(sandbox, topic, tag, settings) for _ in range(3)]
            try:
                # The backlog arrives once the group has settled, so no join-time rebalance
                # falls into the measured window.
                group = f"bench-{tag}-{bench.run_id}"
                _wait(partial(group_stable, bench.bootstrap, group, 3), 120,
                      "three members with partitions", workers)
                _backlog(bench, tag, count, p.partitions, partition=0, topic=topic)
                _wait(lambda: sandbox.control.stats()["total"] > 0, 120, "a first request",
                      workers)
                time.sleep(p.skew_warmup_s)
                start = time.time()
                time.sleep(p.skew_measure_s)
                end = time.time()
                times = [r["received_at"] for r in sandbox.control.requests("/v1/track")]
                statuses = sandbox.control.stats()["by_status"]
            finally:
                for worker in workers:
                    worker.kill()  # measured already; a drain would wait on the limiter
        measured = sum(1 for t in times if start <= t < end)
        share = measured / (limit * p.skew_measure_s / period)
        out[mode] = {"delivered_in_window": measured, "share_of_limit": share,
                     "responses_429": int(statuses.get("429", 0)),
                     "busiest_rolling_window": _max_in_window(times, period)}
        bench.note(f"9 skewed keys, 3 workers, {mode.replace('_', ' ')}",
                   f"{100 * share:.1f}% of the limit, {out[mode]['responses_429']} × 429, "
                   f"busiest window {out[mode]['busiest_rolling_window']}/{limit}")
    return out


# -- 10 ------------------------------------------------------------------------------------
def sigkill_duplicates(bench: Bench, redis_url: str) -> dict[str, Any]:
    """Two paces: at the (compressed) rate limit, where commits keep up and few events are
    delivered-but-uncommitted at the kill, and at full speed (no limit), where a whole
    window is; each without and with Redis."""
    p = bench.params
    out: dict[str, Any] = {"workers": 3, "partitions": 3, "max_in_flight": p.max_in_flight,
                           "commit_interval_s": p.commit_interval_s, "sandbox_latency_ms": 0}
    limited = {"USERPILOT_RATE_LIMIT": str(p.kill_limit),
               "USERPILOT_RATE_PERIOD_SECONDS": f"{p.kill_window_s:g}",
               "USERPILOT_RATE_BURST": "1"}
    paces = (("limited", p.kill_events, limited, f"{p.kill_limit} per {p.kill_window_s:g} s"),
             ("unlimited", p.kill_events_fast, UNLIMITED, "none"))
    for pace, count, limits, label in paces:
        row: dict[str, Any] = {"events": count, "rate_limit": label,
                               "killed_after": count // 3}
        for mode, extra in (("without_redis", {}), ("redis", {"REDIS_URL": redis_url})):
            tag = f"kill-{pace}-{mode}"
            topic = _backlog(bench, tag, count, 3)
            with SandboxProcess() as sandbox:
                settings = {**limits, **FAST_GROUP, **extra}
                workers = [bench.worker(sandbox, topic, tag, settings) for _ in range(3)]
                try:
                    _wait(partial(_accepted_at_least, sandbox, count // 3), 180,
                          "a third delivered", workers)
                    workers[0].kill()  # SIGKILL at an arbitrary moment mid-stream
                    done = _caught_up(bench, f"bench-{tag}-{bench.run_id}", topic)
                    _wait(done, p.drain_timeout_s, "the end of the backlog", workers[1:])
                    got = _identities(sandbox)
                finally:
                    for worker in workers[1:]:
                        worker.stop()
            duplicates = sum(n - 1 for n in got.values() if n > 1)
            lost = count - len(got)
            row[mode] = {"accepted": sum(got.values()), "distinct": len(got),
                         "duplicates": duplicates, "lost": lost}
            bench.note(f"10 SIGKILL of 1 of 3 workers, {pace}, {mode.replace('_', ' ')}",
                       f"{duplicates} duplicates, {lost} lost of {count:,}")
        out[pace] = row
    return out


# -- 11 ------------------------------------------------------------------------------------
def _redis_cpu(client: sync_redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def cpu_cost(bench: Bench, redis_url: str) -> dict[str, Any]:
    p = bench.params
    count = p.cpu_events
    out: dict[str, Any] = {"events": count, "rate": "unlimited", "sandbox_latency_ms": 0}
    client = sync_redis.Redis.from_url(redis_url)
    try:
        for mode, extra in (("without_redis", {}), ("redis", {"REDIS_URL": redis_url})):
            topic = _backlog(bench, f"cpu-{mode}", count, p.partitions)
            tag = f"cpu-{mode}"
            with SandboxProcess() as sandbox:
                worker = bench.worker(sandbox, topic, tag, {**UNLIMITED, **extra})
                try:
                    _wait(lambda: sandbox.control.stats()["accepted"] > 0, 120,
                          "a first request", [worker])
                    cpu0, redis0 = cpu_seconds(worker.pid), _redis_cpu(client)
                    seen0 = sandbox.control.stats()["accepted"]
                    done = _caught_up(bench, f"bench-{tag}-{bench.run_id}", topic)
                    _wait(done, p.drain_timeout_s, "the end of the backlog", [worker])
                    cpu1, redis1 = cpu_seconds(worker.pid), _redis_cpu(client)
                    delivered = sandbox.control.stats()["accepted"] - seen0
                finally:
                    worker.stop()
            if cpu0 is None or cpu1 is None or delivered <= 0:
                raise RuntimeError(f"{tag}: no CPU figure (worker gone?)")
            out[mode] = {"delivered": delivered, "worker_cpu_s": cpu1 - cpu0,
                         "worker_cpu_us_per_event": 1e6 * (cpu1 - cpu0) / delivered,
                         "redis_server_cpu_us_per_event": 1e6 * (redis1 - redis0) / delivered}
    finally:
        client.close()
    extra_us = (out["redis"]["worker_cpu_us_per_event"]
                - out["without_redis"]["worker_cpu_us_per_event"])
    out["redis_calls_worker_cpu_us_per_event"] = extra_us
    bench.note("11 CPU of the Redis calls per event",
               f"worker +{extra_us:.0f} µs ({out['without_redis']['worker_cpu_us_per_event']:.0f}"
               f" → {out['redis']['worker_cpu_us_per_event']:.0f} µs/event), redis-server "
               f"{out['redis']['redis_server_cpu_us_per_event']:.0f} µs/event")
    return out
