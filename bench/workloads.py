"""The workloads of the benchmark issue (1-8) and of issue 12's Redis (9-11, in
`bench.replicas`), each returning JSON-able figures.

Layout on a 2-core machine: the sandbox is always its own process and so is every worker
(`python -m consumer run`), so neither shares a GIL with the other or with this driver.
The driver only produces backlogs up front, polls committed offsets a few times a second
and, for the comparison loops (workloads 1, 4, 5), is itself the thing measured while no
worker runs.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from bench import events as ev
from bench import replicas
from bench.http_ceiling import (
    HttpResult,
    run_aiohttp,
    run_httpx,
    run_httpx_aiohttp,
    run_worker_client,
    send_latency,
)
from bench.kafka_io import (
    DrainResult,
    OffsetProbe,
    Pacer,
    consume_avro,
    consume_decode,
    create_topic,
    delete_topics,
    produce_backlog,
    register_schema,
)
from bench.naive import naive_loop
from bench.procs import (
    BENCH_TOKEN,
    RssTrace,
    SandboxProcess,
    WorkerProcess,
    read_cpu,
    read_rss,
    worker_env,
)
from bench.report import percentile, ratio
from consumer import codec
from consumer.config import DEFAULT_MAX_CONNECTIONS
from consumer.filtering import ConsentPolicy
from consumer.mapping import DEFAULT_PRESET
from consumer.routing import Send, route

__all__ = ["Bench", "Params"]

log = logging.getLogger(__name__)

API_HEADERS = {"Content-Type": "application/json", "Authorization": f"Token {BENCH_TOKEN}",
               "X-API-Version": "2020-09-22"}
TOKEN_LIMIT_RPS = 10.0  # Userpilot: 600 requests per minute per token
UNLIMITED = {"USERPILOT_RATE_LIMIT": "1000000", "USERPILOT_RATE_PERIOD_SECONDS": "1",
             "USERPILOT_RATE_BURST": "100000"}
KNOWN_USERS = {"USERPILOT_ENSURE_USER": "false"}
"""Delivery (3) and latency (8) run as for users the worker already identified: their
backlogs spread over 10,000 users, so with ensure-user on most events would be a user's
first and cost two requests (identify, then Track), against one in the plain loops and at
`5aa140f` they are compared with. The cost of a user's first event (one identify round trip
more) is reported apart; memory (7) keeps ensure-user on (its cache is part of the RSS)."""
DROP_PROGRESS = {"WORKER_COMMIT_INTERVAL_SECONDS": "0.2"}
"""The drop-path worker commits every 0.2 s (the default is 2 s). The driver sees a drain only
through committed offsets and starts its clock at the first commit: at 2 s a 150,000-event
backlog drained at 55k events/s shows its first commit with 80 % of it done, leaving half a
second to measure, a quarter of it the final commit's latency. Five commits a second cost the
worker nothing measurable."""


@dataclass(frozen=True)
class Params:
    """Every size and setting of a run; written verbatim into the JSON."""

    smoke: bool
    partitions: int = 6
    users: int = 10_000
    drop_events: int = 300_000
    delivery_events: int = 20_000
    latencies_ms: tuple[float, ...] = (0.0, 20.0)
    max_in_flight: int = 200  # the worker's defaults: what a user deploys
    max_connections: int = DEFAULT_MAX_CONNECTIONS  # the worker's own default
    commit_interval_s: float = 2.0
    http_seconds: float = 10.0
    naive_max_events: int = 5_000
    naive_seconds: float = 15.0
    sat_limit: int = 600
    sat_window_s: float = 60.0
    sat_windows: int = 3
    sat_parallel: bool = False
    mixed_track_users: int = 60
    memory_events: int = 1_000_000
    memory_latency_ms: float = 50.0
    memory_min_s: float = 60.0
    memory_max_s: float = 180.0
    latency_rate: float = 50.0
    latency_seconds: float = 60.0
    latency_sandbox_ms: float = 20.0
    drain_timeout_s: float = 900.0
    # 9-11 (Redis): limits compressed in time so each run takes seconds, not minutes.
    skew_limit: int = 600
    skew_window_s: float = 10.0
    skew_warmup_s: float = 5.0
    skew_measure_s: float = 30.0
    kill_events: int = 3_000
    kill_limit: int = 1_000
    kill_window_s: float = 10.0
    kill_events_fast: int = 20_000
    cpu_events: int = 10_000

    @property
    def concurrency(self) -> int:
        """Requests the worker can have open at once: its window, capped by its pool."""
        return min(self.max_in_flight, self.max_connections)

    @classmethod
    def smoke_run(cls) -> Params:
        return cls(smoke=True, users=1_000, drop_events=60_000, delivery_events=800,
                   http_seconds=1.0, naive_max_events=200, naive_seconds=1.5, sat_limit=30,
                   sat_window_s=3.0, sat_windows=2, sat_parallel=True,
                   memory_events=20_000, memory_min_s=3.0, memory_max_s=3.0,
                   latency_seconds=1.5, drain_timeout_s=120.0, skew_limit=60,
                   skew_window_s=3.0, skew_warmup_s=2.0, skew_measure_s=6.0,
                   kill_events=300, kill_limit=300, kill_events_fast=3_000,
                   cpu_events=1_000)


@dataclass(frozen=True)
class Drain:
    """A worker's progress from its first commit to the end of the backlog."""

    events: int
    seconds: float
    first_commit_after_s: float
    cpu_s: float = math.nan  # the worker process's CPU time (all threads) over `seconds`

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else math.nan

    @property
    def cpu_us_per_event(self) -> float:
        return 1e6 * self.cpu_s / self.events if self.events else math.nan


@dataclass
class Bench:
    """One benchmark run against one broker and registry; creates (and deletes) its topics."""

    bootstrap: str
    registry: str
    params: Params
    workdir: Path
    redis_url: str | None = None
    run_id: str = field(default_factory=lambda: time.strftime("%Y%m%d%H%M%S"))
    topics: list[str] = field(default_factory=list)
    summary: list[tuple[str, str]] = field(default_factory=list)
    _backlogs: dict[str, str] = field(default_factory=dict)

    # -- plumbing ----------------------------------------------------------------------
    def topic(self, name: str, partitions: int | None = None) -> str:
        topic = create_topic(self.bootstrap, f"bench-{name}-{self.run_id}",
                             partitions or self.params.partitions)
        self.topics.append(topic)
        return topic

    def cleanup(self) -> None:
        delete_topics(self.bootstrap, self.topics)

    def backlog(self, kind: Literal["deliver", "drop"], count: int, name: str = "") -> str:
        """A topic holding `count` events of `kind`, made once per run (per `name`)."""
        key = f"{name or kind}-{count}"
        if key not in self._backlogs:
            topic = self.topic(key)
            schema_id = register_schema(self.registry, topic)
            tmpls = ev.templates(schema_id, kind)
            start = time.perf_counter()
            produce_backlog(self.bootstrap, topic, ev.messages(tmpls, count, self.params.users))
            log.info("backlog %s: %d events in %.1f s", topic, count,
                     time.perf_counter() - start)
            self._backlogs[key] = topic
        return self._backlogs[key]

    def worker(self, sandbox: SandboxProcess, topic: str, tag: str,
               extra: Mapping[str, str] | None = None) -> WorkerProcess:
        """A worker process on `topic` as group bench-<tag>; `extra` overrides any setting."""
        settings = {
            "WORKER_MAX_IN_FLIGHT": str(self.params.max_in_flight),
            "USERPILOT_MAX_CONNECTIONS": str(self.params.max_connections),
            "WORKER_COMMIT_INTERVAL_SECONDS": f"{self.params.commit_interval_s:g}",
            "KAFKA_DLQ_TOPIC": f"bench-dlq-{self.run_id}",
            **(extra or {}),
        }
        env = worker_env(bootstrap=self.bootstrap, registry=self.registry,
                         sandbox=sandbox.host_port, topic=topic,
                         group=f"bench-{tag}-{self.run_id}", **settings)
        self.workdir.mkdir(parents=True, exist_ok=True)
        return WorkerProcess(env, self.workdir / f"worker-{tag}.log", ("consumer", "run"))

    def drain(self, worker: WorkerProcess, topic: str, tag: str,
              first_request: Callable[[], float | None] | None = None) -> Drain:
        """Wait until the worker's group has committed the whole topic.

        The clock starts at the first request the sandbox received (`first_request`, wall
        time) or else at the first commit seen, so the group join is not counted; it stops
        when the last offset is committed.
        """
        probe = OffsetProbe(self.bootstrap, f"bench-{tag}-{self.run_id}", topic)
        try:
            total = probe.end_total()
            started = time.time()
            deadline = time.monotonic() + self.params.drain_timeout_s
            first: tuple[float, int] | None = None
            cpu_at_first = read_cpu(worker.pid)
            cpu_samples: list[tuple[float, float]] = []  # (wall time, worker CPU seconds)
            while True:
                if not worker.alive():
                    raise RuntimeError(f"worker {tag} exited:\n{worker.tail()}")
                done = probe.committed_total()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"worker {tag} committed {done} of {total} offsets of "
                                       f"{topic} in {self.params.drain_timeout_s:.0f} s")
                now = time.time()
                if first_request is not None:
                    cpu_samples.append((now, read_cpu(worker.pid)))
                if done > 0 and first is None:
                    first = (now, done)
                    cpu_at_first = read_cpu(worker.pid)
                if done >= total:
                    cpu_at_end = read_cpu(worker.pid)
                    break
                time.sleep(0.05)
        finally:
            probe.close()
        assert first is not None
        if first_request is not None:
            at = first_request()
            if at is None:
                raise RuntimeError(f"{tag}: the sandbox received no request")
            # The CPU clock starts at the last sample taken before the first request.
            before = [cpu for wall, cpu in cpu_samples if wall <= at]
            return Drain(total, now - at, at - started,
                         cpu_at_end - before[-1] if before else math.nan)
        if first[1] >= total:
            raise RuntimeError(f"{tag}: the backlog ({total}) was committed before the "
                               "first observation; make it larger")
        return Drain(total - first[1], now - first[0], first[0] - started,
                     cpu_at_end - cpu_at_first)

    def note(self, name: str, text: str) -> None:
        self.summary.append((name, text))
        log.info("%s: %s", name, text)

    @staticmethod
    def payloads() -> list[bytes]:
        """The Track bodies the delivery backlog maps to (same events, same users)."""
        schema_id = 1
        tmpls = ev.templates(schema_id, "deliver")
        bodies: list[bytes] = []
        for _key, value in ev.messages(tmpls, 1000, 1000):
            decision = route(codec.decode(value, lambda _i: codec.SCHEMA), ConsentPolicy(),
                             DEFAULT_PRESET)
            assert isinstance(decision, Send)
            bodies.append(decision.body)
        return bodies

    # -- 1 ---------------------------------------------------------------------------
    def consume_decode(self) -> dict[str, Any]:
        topic = self.backlog("drop", self.params.drop_events)
        result = consume_decode(self.bootstrap, self.registry, topic, self.params.drop_events)
        self.note("1 consume+decode (bare)", f"{result.rate:,.0f} ev/s")
        avro = consume_avro(self.bootstrap, self.registry, topic, self.params.drop_events)
        self.note("1 consume+Avro, no JSON (bare)", f"{avro.rate:,.0f} ev/s")
        return {"events": result.count, "seconds": result.seconds, "rate": result.rate,
                "cpu_us_per_event": result.cpu_us_per_event, "topic": topic,
                "avro_only": _drained(avro)}

    # -- 2 ---------------------------------------------------------------------------
    def drop_path(self) -> dict[str, Any]:
        topic = self.backlog("drop", self.params.drop_events)
        with SandboxProcess() as sandbox:
            worker = self.worker(sandbox, topic, "drop", {**UNLIMITED, **DROP_PROGRESS})
            try:
                drain = self.drain(worker, topic, "drop")
            finally:
                worker.stop()
            stats = sandbox.control.stats()
        self.note("2 drop path (worker)", f"{drain.rate:,.0f} ev/s committed, "
                  f"{drain.cpu_us_per_event:.1f} µs CPU per event")
        # The ceiling again right after the worker: on a shared machine the load drifts, so
        # the drop path is compared with the mean of the ceiling before and after it.
        after = consume_avro(self.bootstrap, self.registry, topic, self.params.drop_events)
        self.note("2 consume+Avro, no JSON, after", f"{after.rate:,.0f} ev/s, "
                  f"{after.cpu_us_per_event:.1f} µs CPU per event")
        return {**asdict(drain), "rate": drain.rate, "cpu_us_per_event": drain.cpu_us_per_event,
                "topic": topic, "mix": list(ev.DROP_KINDS), "requests_sent": stats["total"],
                "avro_only_after": _drained(after)}

    # -- 3 ---------------------------------------------------------------------------
    def delivery_path(self) -> dict[str, Any]:
        topic = self.backlog("deliver", self.params.delivery_events)
        out: dict[str, Any] = {"topic": topic, "events": self.params.delivery_events,
                               "max_in_flight": self.params.max_in_flight,
                               "max_connections": self.params.max_connections,
                               "by_latency": {}}
        with SandboxProcess() as sandbox:
            for latency in self.params.latencies_ms:
                key = f"{latency:g}ms"
                row = self._deliver(sandbox, topic, latency)
                out["by_latency"][key] = row
                self.note(f"3 delivery path @ {key}",
                          f"{row['rate']:,.0f} ev/s delivered + committed, "
                          f"{row['cpu_us_per_event']:.0f} µs CPU per event")
        return out

    def _deliver(self, sandbox: SandboxProcess, topic: str, latency: float) -> dict[str, Any]:
        sandbox.control.set_faults(latency_ms=latency)
        sandbox.control.reset()
        tag = f"deliver-{latency:g}ms"
        worker = self.worker(sandbox, topic, tag, {**UNLIMITED, **KNOWN_USERS})
        try:
            drain = self.drain(worker, topic, tag, lambda: _first_received(sandbox))
        finally:
            worker.stop()
        stats = sandbox.control.stats()
        if stats["accepted"] < self.params.delivery_events:
            raise RuntimeError(f"{tag}: sandbox accepted only {stats['accepted']}")
        return {**asdict(drain), "rate": drain.rate, "cpu_us_per_event": drain.cpu_us_per_event,
                "accepted": stats["accepted"], "by_status": stats["by_status"]}

    # -- 4 ---------------------------------------------------------------------------
    def http_ceiling(self) -> dict[str, Any]:
        bodies = self.payloads()
        conc = self.params.concurrency
        out: dict[str, Any] = {"concurrency": conc, "seconds_each": self.params.http_seconds,
                               "by_latency": {}}
        with SandboxProcess() as sandbox:
            url = sandbox.url + "/v1/track"
            for latency in self.params.latencies_ms:
                sandbox.control.set_faults(latency_ms=latency)
                row: dict[str, Any] = {}
                clients: list[tuple[str, Callable[..., HttpResult]]] = [
                    ("httpx", run_httpx), ("worker_client", run_worker_client),
                    ("httpx_aiohttp", run_httpx_aiohttp), ("aiohttp", run_aiohttp)]
                for client, run in clients:
                    sandbox.control.reset()
                    result = run(url, API_HEADERS, bodies, self.params.http_seconds, conc)
                    if result.accepted == 0 or result.other:
                        raise RuntimeError(f"HTTP ceiling {client}: {result}")
                    row[client] = {**asdict(result), "rate": result.rate,
                                   "cpu_us_per_request": result.cpu_us_per_request}
                row["best"] = max(row["httpx"]["rate"], row["aiohttp"]["rate"])
                key = f"{latency:g}ms"
                out["by_latency"][key] = row
                self.note(f"4 HTTP ceiling @ {key} (c={conc})",
                          f"httpx {row['httpx']['rate']:,.0f}/s, "
                          f"worker's client {row['worker_client']['rate']:,.0f}/s "
                          f"({row['worker_client']['cpu_us_per_request']:.0f} µs CPU each), "
                          f"AsyncClient on aiohttp {row['httpx_aiohttp']['rate']:,.0f}/s "
                          f"({row['httpx_aiohttp']['cpu_us_per_request']:.0f} µs), "
                          f"aiohttp {row['aiohttp']['rate']:,.0f}/s")
        return out

    # -- 5 ---------------------------------------------------------------------------
    def naive(self) -> dict[str, Any]:
        topic = self.backlog("deliver", self.params.delivery_events)
        out: dict[str, Any] = {"topic": topic, "by_latency": {}}
        with SandboxProcess() as sandbox:
            for latency in self.params.latencies_ms:
                sandbox.control.set_faults(latency_ms=latency)
                result = naive_loop(self.bootstrap, self.registry, topic,
                                    sandbox.url + "/v1/track", API_HEADERS,
                                    max_events=self.params.naive_max_events,
                                    max_seconds=self.params.naive_seconds)
                key = f"{latency:g}ms"
                out["by_latency"][key] = {**asdict(result), "rate": result.rate}
                self.note(f"5 naive loop @ {key}", f"{result.rate:,.0f} ev/s")
        return out

    # -- 6 ---------------------------------------------------------------------------
    def saturation(self) -> dict[str, Any]:
        """One sandbox per scenario, so each one's 429 count is its own."""
        p = self.params
        count = p.sat_limit * (p.sat_windows + 1) * 2
        out: dict[str, Any] = {"limit": p.sat_limit, "window_s": p.sat_window_s,
                               "windows": p.sat_windows, "parallel": p.sat_parallel,
                               "partitions": p.partitions, "backlog_events": count}
        runs = [(f"{n}_worker" + ("s" if n > 1 else ""), n,
                 self.backlog("deliver", count, f"sat{n}")) for n in (1, 3)]
        batches = [runs] if p.sat_parallel else [[run] for run in runs]
        for batch in batches:
            started = []
            try:
                for label, n, topic in batch:
                    sandbox = SandboxProcess(rate_limit=p.sat_limit,
                                             rate_window_s=p.sat_window_s)
                    started.append((label, n, sandbox, self._start_sat(sandbox, topic, n)))
                # Full windows are counted from each scenario's first accepted request.
                for _, _, sandbox, workers in started:
                    _wait(_answered_any(sandbox), 120, *workers)
                time.sleep(p.sat_windows * p.sat_window_s + 0.5)
                finished = time.time()
                for label, n, sandbox, workers in started:
                    for worker in workers:
                        if not worker.alive():
                            raise RuntimeError(f"saturation worker exited:\n{worker.tail()}")
                    out[label] = self._sat_figures(sandbox, n, finished)
            finally:
                for _, _, sandbox, workers in started:
                    for worker in workers:
                        worker.kill()  # measured already; a drain would wait on the limiter
                    sandbox.stop()
        for label, _, _ in runs:
            sat = out[label]
            self.note(f"6 saturation, {label.replace('_', ' ')}",
                      f"{100 * sat['min_window_share']:.1f}% of limit (worst window), "
                      f"{sat['responses_429']} × 429")
        return out

    def _start_sat(self, sandbox: SandboxProcess, topic: str, n: int) -> list[WorkerProcess]:
        p = self.params
        limits = {"USERPILOT_RATE_LIMIT": str(p.sat_limit),
                  "USERPILOT_RATE_PERIOD_SECONDS": f"{p.sat_window_s:g}"}
        return [self.worker(sandbox, topic, f"sat{n}", limits) for _ in range(n)]

    def _sat_figures(self, sandbox: SandboxProcess, workers: int, finished: float,
                     ) -> dict[str, Any]:
        """Accepted requests per full window from the first one, and the busiest window."""
        p = self.params
        times = sorted(r["received_at"] for r in sandbox.control.requests("/v1/track"))
        if not times:
            raise RuntimeError(f"saturation ({workers} workers): nothing delivered")
        start = times[0]
        full = int((finished - start) // p.sat_window_s)
        counts = [0] * full
        for t in times:
            k = int((t - start) // p.sat_window_s)
            if k < full:
                counts[k] += 1
        busiest, j = 0, 0  # sliding: more than the limit in any window would be a 429
        for i, t in enumerate(times):
            while times[j] <= t - p.sat_window_s:
                j += 1
            busiest = max(busiest, i - j + 1)
        shares = [c / p.sat_limit for c in counts]
        return {"workers": workers, "delivered": len(times), "full_windows": full,
                "window_counts": counts, "window_shares": shares,
                "min_window_share": min(shares) if shares else 0.0,
                "mean_window_share": sum(shares) / len(shares) if shares else 0.0,
                "busiest_sliding_window": busiest,
                "responses_429": int(sandbox.control.stats()["by_status"].get("429", 0))}

    # -- 9 ---------------------------------------------------------------------------
    def mixed_saturation(self) -> dict[str, Any]:
        """Identify + Track backlog: each family saturates its own limit, 0 × 429.

        The sandbox limits track and identify to `sat_limit` per `sat_window_s` each (as
        Userpilot does); half the backlog is identify events (new users), half Tracks of
        `mixed_track_users` users (one ensure-user identify each, which counts against
        the identify budget). One sandbox per scenario: 1 worker, 3 workers on partition
        shares, and (with Redis) 3 workers on the shared budget.

        Why 3 workers twice: the Tracks' users hash unevenly over the partitions (7 to 13
        of 60 per partition), so the replica owning the Track-poor partitions cannot spend
        its partition share of the Track budget for longer than its window lets Track run
        ahead of identify, while another replica's share is too small for its Tracks. Only
        a budget shared across replicas (Redis) follows the demand; the target is judged
        on that run, the partition-share run is reported beside it.
        """
        p = self.params
        count = p.sat_limit * (p.sat_windows + 1) * 2 * 2
        out: dict[str, Any] = {"limit_per_family": p.sat_limit, "window_s": p.sat_window_s,
                               "windows": p.sat_windows, "partitions": p.partitions,
                               "backlog_events": count, "track_users": p.mixed_track_users}
        topic = self._mixed_backlog(count)
        scenarios: list[tuple[str, int, dict[str, str]]] = [("1_worker", 1, {}),
                                                             ("3_workers", 3, {})]
        if self.redis_url:
            scenarios.append(("3_workers_redis", 3, {"REDIS_URL": self.redis_url}))
        # The smoke run (sat_parallel) runs the scenarios side by side, as `saturation` does:
        # one sandbox and consumer group each, so their figures stay their own.
        batches = [scenarios] if p.sat_parallel else [[one] for one in scenarios]
        for batch in batches:
            started: list[tuple[str, bool, SandboxProcess, list[WorkerProcess]]] = []
            try:
                for label, n, extra in batch:
                    sandbox = SandboxProcess(rate_limit=p.sat_limit,
                                             rate_window_s=p.sat_window_s)
                    workers: list[WorkerProcess] = []
                    started.append((label, bool(extra), sandbox, workers))
                    workers.extend(self.worker(sandbox, topic, f"mixed-{label}", {
                        "USERPILOT_RATE_LIMIT": str(p.sat_limit),
                        "USERPILOT_RATE_PERIOD_SECONDS": f"{p.sat_window_s:g}", **extra})
                        for _ in range(n))
                for _, _, sandbox, workers in started:
                    _wait(_answered_any(sandbox), 120, *workers)
                time.sleep(p.sat_windows * p.sat_window_s + 0.5)
                finished = time.time()
                for label, shared, sandbox, workers in started:
                    for worker in workers:
                        if not worker.alive():
                            raise RuntimeError(f"mixed worker exited:\n{worker.tail()}")
                    out[label] = self._mixed_figures(sandbox, len(workers), finished)
                    out[label]["budget"] = "redis" if shared else "partition share"
            finally:
                for _, _, sandbox, workers in started:
                    for worker in workers:
                        worker.kill()
                    sandbox.stop()
        for label, _, _ in scenarios:
            for family in ("track", "identify"):
                fam = out[label][family]
                self.note(f"12 mixed {family}, {label.replace('_', ' ')}",
                          f"{100 * fam['min_window_share']:.1f}% of its limit (worst window; "
                          f"per window {fam['window_counts']}), "
                          f"{out[label]['responses_429']} × 429")
        return out

    def _mixed_backlog(self, count: int) -> str:
        key = f"mixed-{count}"
        if key not in self._backlogs:
            topic = self.topic(key)
            schema_id = register_schema(self.registry, topic)
            track = ev.Template.of(schema_id, ev.delivered_event())
            identify = ev.Template.of(schema_id, ev.identify_event())
            produce_backlog(self.bootstrap, topic, ev.mixed_messages(
                track, identify, count, self.params.mixed_track_users,
                id_base=time.time_ns() // 1000 % 10**14 * 10))
            self._backlogs[key] = topic
        return self._backlogs[key]

    def _mixed_figures(self, sandbox: SandboxProcess, workers: int, finished: float,
                       ) -> dict[str, Any]:
        """Per family: accepted requests per full window from the first request of any."""
        p = self.params
        records = sandbox.control.requests()
        if not records:
            raise RuntimeError(f"mixed saturation ({workers} workers): nothing delivered")
        start = min(r["received_at"] for r in records)
        full = int((finished - start) // p.sat_window_s)
        out: dict[str, Any] = {"workers": workers, "full_windows": full}
        for family, paths in (("track", ("/v1/track",)),
                              ("identify", ("/v1/identify", "/v1/companies/identify"))):
            counts = [0] * full
            for r in records:
                if r["path"] in paths:
                    k = int((r["received_at"] - start) // p.sat_window_s)
                    if k < full:
                        counts[k] += 1
            shares = [c / p.sat_limit for c in counts]
            out[family] = {"window_counts": counts, "window_shares": shares,
                           "min_window_share": min(shares) if shares else 0.0}
        ensure = sum(1 for r in records  # `calls.ensure_user_call`'s bare body (older
                     # trees sent no `metadata`)
                     if r["path"] == "/v1/identify" and r["body"].get("metadata", {}) == {}
                     and set(r["body"]) <= {"user_id", "metadata"})
        out["ensure_user_identifies"] = ensure
        out["responses_429"] = int(sandbox.control.stats()["by_status"].get("429", 0))
        return out

    # -- 7 ---------------------------------------------------------------------------
    def memory(self) -> dict[str, Any]:
        p = self.params
        topic = self.backlog("deliver", p.memory_events)
        trace = RssTrace()
        with SandboxProcess(latency_ms=p.memory_latency_ms) as sandbox:
            worker = self.worker(sandbox, topic, "memory", UNLIMITED)
            probe = OffsetProbe(self.bootstrap, f"bench-memory-{self.run_id}", topic)
            try:
                start = time.monotonic()
                while True:
                    elapsed = time.monotonic() - start
                    sample = read_rss(worker.pid, elapsed)
                    if sample is None or not worker.alive():
                        raise RuntimeError(f"memory worker exited:\n{worker.tail()}")
                    trace.add(sample)
                    if elapsed >= p.memory_max_s or (
                            elapsed >= p.memory_min_s and trace.plateaued(0.02)):
                        break
                    time.sleep(0.5)
                committed = probe.committed_total()
            finally:
                probe.close()
                worker.stop()
            accepted = sandbox.control.stats()["accepted"]
        peak = trace.peak_hwm / 2**20
        self.note("7 memory (peak VmHWM)", f"{peak:,.0f} MB; {accepted:,} delivered, "
                  f"{committed:,} committed of {p.memory_events:,} in {elapsed:.0f} s")
        return {"backlog_events": p.memory_events, "sandbox_latency_ms": p.memory_latency_ms,
                "observed_s": elapsed, "plateaued": trace.plateaued(0.02),
                "peak_rss_mb": peak, "final_rss_mb": trace.samples[-1].rss / 2**20,
                "delivered": accepted, "committed": committed,
                "rss_mb_series": [(round(s.at_s, 1), round(s.rss / 2**20, 1))
                                  for s in trace.samples[:: max(1, len(trace.samples) // 60)]]}

    # -- 8 ---------------------------------------------------------------------------
    def latency(self) -> dict[str, Any]:
        p = self.params
        topic = self.topic("latency")
        schema_id = register_schema(self.registry, topic)
        (tmpl,) = ev.templates(schema_id, "deliver")
        with SandboxProcess(latency_ms=p.latency_sandbox_ms) as sandbox:
            worker = self.worker(sandbox, topic, "latency", {**UNLIMITED, **KNOWN_USERS})
            pacer = Pacer(self.bootstrap, topic)
            try:
                # Warm-up: the worker has joined, cached the schema and opened a connection.
                pacer.send(*tmpl.render(ev.now_stamp(0, 0)))
                _wait(lambda: sandbox.control.stats()["accepted"] >= 1, 60, worker)
                sandbox.control.reset()
                total = int(p.latency_rate * p.latency_seconds)
                pacer.paced(lambda i: tmpl.render(ev.now_stamp(i % p.users, i)), total,
                            p.latency_rate)
                _wait(lambda: sandbox.control.stats()["accepted"] >= total, 60, worker)
                records = sandbox.control.requests("/v1/track")
            finally:
                pacer.close()
                worker.stop()
            # What the HTTP client alone adds, same sandbox, same pace: the worker's client
            # against the same request written straight to a socket (the floor a
            # hand-written client had), so the worker's figure can be read net of it.
            client: dict[str, dict[str, float]] = {}
            probes = min(total, 500)
            for name, raw in (("worker_client", False), ("raw_socket", True)):
                sandbox.control.reset()
                send_latency(sandbox.url + "/v1/track", API_HEADERS, probes, p.latency_rate, raw)
                client[name] = _summary(_added_ms(sandbox.control.requests("/v1/track")))
        added = _added_ms(records)
        figures = _summary(added)
        self.note("8 added latency (produce→request)",
                  f"p50 {figures['p50']:.1f} ms, p99 {figures['p99']:.1f} ms "
                  f"at {p.latency_rate:g}/s; of which the HTTP client's send alone p50 "
                  f"{client['worker_client']['p50']:.2f} ms "
                  f"(a raw socket write: {client['raw_socket']['p50']:.2f} ms)")
        return {"rate_per_s": p.latency_rate, "events": len(added),
                "sandbox_latency_ms": p.latency_sandbox_ms, "added_ms": figures,
                "client_send_ms": client,
                "produce_to_202_ms_estimate": {k: v + p.latency_sandbox_ms
                                               for k, v in figures.items()}}


    # -- 9-11 (Redis) ---------------------------------------------------------------------
    def _redis(self) -> str:
        if not self.redis_url:
            raise RuntimeError("workloads 9-11 need Redis: set REDIS_URL or pass --redis-url")
        return self.redis_url

    def skewed_keys(self) -> dict[str, Any]:
        return replicas.skewed_keys(self, self._redis())

    def sigkill_duplicates(self) -> dict[str, Any]:
        return replicas.sigkill_duplicates(self, self._redis())

    def redis_cpu(self) -> dict[str, Any]:
        return replicas.cpu_cost(self, self._redis())


def _added_ms(records: list[dict[str, Any]]) -> list[float]:
    """Sandbox receipt minus the stamp each delivered body carries, in ms."""
    added = []
    for record in records:
        sent = ev.sent_ns_of(record["body"].get("metadata", {}))
        if sent is not None:
            added.append((record["received_at"] - sent / 1e9) * 1000)
    if not added:
        raise RuntimeError("no stamped request reached the sandbox")
    return added


def _summary(added: list[float]) -> dict[str, float]:
    """p50, p90, p99 and max of added latencies (ms)."""
    figures = {q: percentile(added, float(q[1:])) for q in ("p50", "p90", "p99")}
    figures["max"] = max(added)
    return figures


def _drained(result: DrainResult) -> dict[str, float]:
    return {"events": result.count, "seconds": result.seconds, "rate": result.rate,
            "cpu_us_per_event": result.cpu_us_per_event}


def _answered_any(sandbox: SandboxProcess) -> Callable[[], bool]:
    return lambda: bool(sandbox.control.stats()["total"] > 0)


def _first_received(sandbox: SandboxProcess) -> float | None:
    records = sandbox.control.requests("/v1/track")
    return min((r["received_at"] for r in records), default=None)


def _wait(predicate: Callable[[], bool], timeout: float, *workers: WorkerProcess) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        for worker in workers:
            if not worker.alive():
                raise RuntimeError(f"worker exited:\n{worker.tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s\n{workers[0].tail()}")
        time.sleep(0.1)


def ratios(results: dict[str, Any]) -> dict[str, float]:
    """Headline ratios from whichever workloads ran (all from the same run)."""
    w = results["workloads"]
    out: dict[str, float] = {}
    if "consume_decode" in w and "drop_path" in w:
        out["drop_over_consume_decode"] = ratio(w["drop_path"]["rate"],
                                                w["consume_decode"]["rate"])
        avro = w["consume_decode"].get("avro_only")
        if avro:
            ceilings = [avro] + ([w["drop_path"]["avro_only_after"]]
                                 if "avro_only_after" in w["drop_path"] else [])
            out["drop_over_consume_avro"] = ratio(
                w["drop_path"]["rate"], sum(c["rate"] for c in ceilings) / len(ceilings))
            cpu = [c.get("cpu_us_per_event", math.nan) for c in ceilings]
            # CPU per event, ceiling ÷ worker: the same comparison, steadier under load.
            out["drop_cpu_over_consume_avro_cpu"] = ratio(
                sum(cpu) / len(cpu), w["drop_path"].get("cpu_us_per_event", math.nan))
    for key, row in w.get("delivery_path", {}).get("by_latency", {}).items():
        out[f"delivery_over_token_limit_{key}"] = ratio(row["rate"], TOKEN_LIMIT_RPS)
    delivery = w.get("delivery_path", {}).get("by_latency", {})
    ceiling = w.get("http_ceiling", {}).get("by_latency", {})
    naive = w.get("naive", {}).get("by_latency", {})
    for key, row in delivery.items():
        if key in ceiling:
            out[f"delivery_over_http_ceiling_{key}"] = ratio(row["rate"], ceiling[key]["best"])
            out[f"delivery_over_httpx_loop_{key}"] = ratio(row["rate"],
                                                           ceiling[key]["httpx"]["rate"])
            out[f"delivery_over_client_loop_{key}"] = ratio(
                row["rate"], ceiling[key]["worker_client"]["rate"])
            if "httpx_aiohttp" in ceiling[key]:  # results from round 6 on
                out[f"delivery_over_asyncclient_loop_{key}"] = ratio(
                    row["rate"], ceiling[key]["httpx_aiohttp"]["rate"])
            # CPU per request of the plain loop ÷ the worker's CPU per event: the same
            # comparison as the rates, steadier while other processes share the cores.
            out[f"delivery_cpu_over_client_loop_cpu_{key}"] = ratio(
                ceiling[key]["worker_client"].get("cpu_us_per_request", math.nan),
                row.get("cpu_us_per_event", math.nan))
        if key in naive:
            out[f"delivery_over_naive_{key}"] = ratio(row["rate"], naive[key]["rate"])
    return out
