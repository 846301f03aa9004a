"""`python -m bench.latency_legs`: where the latency workload's added latency goes, leg by leg.

Workload 8's figure (produce → the sandbox's receipt, p50) says how much, not where. This runs
the same paced Track events (50/s, 20 ms sandbox) through a worker whose hot path is wrapped
with wall-clock stamps (a traced `python -m consumer run`: this module with
`--traced-worker`), and prints the p50/p90 of each leg:

- kafka: the producer's stamp → the poll thread's `consume` returned it;
- hop: → the event loop resumed with it (a thread wake-up);
- batch: → `Worker._take` (poll bookkeeping, the envelope decoded and screened);
- decide: → `Scheduler.submit` (decided, mapped, the body built);
- queue: → `Handler.handle` started;
- handle: → the HTTP transport is handed the request (`handle_async_request`: limiter,
  retry policy, the request built);
- client: → the request's bytes are written to the socket (the transport's own work);
- wire: → the sandbox read the request (the kernel, the sandbox's wake-up and read).

At 50 events/s one event is under way at a time, so each leg is the time between consecutive
stamps. The stamps cost a few µs each; compare legs, not totals, with workload 8.

`--tree <checkout>` runs another tree's worker the same way (e.g. `5aa140f`, whose HTTP client
was hand-written). A step that tree does not have leaves its stamp out, and the legs around it
are reported as one (`batch..handle`): so kafka, hop and client compare across trees. The
client leg starts where the HTTP transport is handed the request (`handle_async_request`, of
httpx-aiohttp here, of `consumer/transport.py` at `5aa140f`).
"""

from __future__ import annotations

import argparse
import atexit
import functools
import itertools
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

TRACE_ENV = "BENCH_LEGS_OUT"
STAMPS = "pcriqhswx"
"""The stamps in the order an event passes them (the module docstring says where each is)."""
LEG_NAMES = {"pc": "kafka", "cr": "hop", "ri": "batch", "iq": "decide", "qh": "queue",
             "hs": "handle", "sw": "client", "wx": "wire"}


def _traced_worker(argv: list[str]) -> int:
    """The worker, with a stamp at each leg's end (see the module docstring). Run as a
    script, so `consumer` is the PYTHONPATH's (the tree measured), not this directory's."""
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    import asyncio.selector_events
    import importlib

    import consumer
    from consumer import kafka
    from consumer.__main__ import main

    tree = Path(os.environ["PYTHONPATH"]).resolve()
    if not Path(consumer.__file__ or "").resolve().is_relative_to(tree):
        # The venv's editable install answers when the tree has no package of its own.
        raise SystemExit(f"consumer imported from {consumer.__file__}, not {tree}")

    def found(module: str, name: str) -> Any:
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            return None  # an older (or newer) tree without that step

    stamps: list[tuple[str, float]] = []
    lock = threading.Lock()

    def stamp(kind: str) -> None:
        with lock:
            stamps.append((kind, time.time()))

    def wrap(owner: Any, name: str, kind: str, *, after: bool = False) -> None:
        inner = getattr(owner, name)
        if after:  # consume: the stamp when it returns something
            @functools.wraps(inner)
            def stamped(*args: Any) -> Any:
                out = inner(*args)
                if out:
                    stamp(kind)
                return out
        else:
            @functools.wraps(inner)
            def stamped(*args: Any, **kwargs: Any) -> Any:
                stamp(kind)
                return inner(*args, **kwargs)
        setattr(owner, name, stamped)

    wrap(kafka.KafkaSource, "consume", "c", after=True)
    # Every socket write of the event loop (only HTTP requests write there: Kafka is
    # librdkafka's own threads); the last before the sandbox's receipt ends the client leg.
    wrap(getattr(asyncio.selector_events, "_SelectorSocketTransport"), "write", "w")  # noqa: B009
    for module, name, method, kind in (
            ("consumer.worker", "Worker", "_take", "i"),
            ("consumer.scheduling", "Scheduler", "submit", "q"),
            ("consumer.handler", "Handler", "handle", "h"),
            ("consumer.transport", "StreamTransport", "handle_async_request", "s"),
            ("httpx_aiohttp.transport", "AiohttpTransport", "handle_async_request", "s")):
        owner = found(module, name)
        if owner is not None and hasattr(owner, method):
            wrap(owner, method, kind)
    call = kafka.KafkaSource.call

    async def resumed(self: kafka.KafkaSource, fn: Any, *args: Any) -> Any:
        out = await call(self, fn, *args)
        if getattr(fn, "__name__", "") == "consume" and out:
            stamp("r")
        return out

    setattr(kafka.KafkaSource, "call", resumed)  # noqa: B010 - mypy refuses assigning a method

    def dump() -> None:
        Path(os.environ[TRACE_ENV]).write_text(json.dumps(stamps))

    atexit.register(dump)
    sys.argv = ["consumer", *argv]
    return main()


def _legs(stamps: list[tuple[str, float]], records: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Each leg's durations (ms), from the worker's stamps and the sandbox's records."""
    from bench import events as ev

    events: list[tuple[str, float]] = list(stamps)
    for record in records:
        sent = ev.sent_ns_of(record["body"].get("metadata", {}))
        if sent is not None:
            events.append(("p", sent / 1e9))
            events.append(("x", float(record["received_at"])))
    # Legs between the stamps this tree has (`STAMPS` order); one it lacks joins the legs
    # around it into one, named after both ("batch..handle").
    kinds = {kind for kind, _ in events}
    present = [k for k in STAMPS if k in kinds]
    legs = []
    for start, end in itertools.pairwise(present):
        steps = STAMPS[STAMPS.index(start):STAMPS.index(end) + 1]
        names = [LEG_NAMES[a + b] for a, b in itertools.pairwise(steps)]
        legs.append((names[0] if len(names) == 1 else f"{names[0]}..{names[-1]}", start, end))
    # A produce stamp precedes its consume; a receipt follows its send: sorted by time, each
    # leg is an end stamp and the latest start stamp before it.
    events.sort(key=lambda e: e[1])
    out: dict[str, list[float]] = {name: [] for name, _, _ in legs}
    last: dict[str, float] = {}
    for kind, at in events:
        for name, start, end in legs:
            if kind == end and start in last:
                out[name].append((at - last.pop(start)) * 1000)
        last[kind] = at
    return out


def main() -> int:
    if sys.argv[1:2] == ["--traced-worker"]:
        return _traced_worker(sys.argv[2:])
    parser = argparse.ArgumentParser(prog="python -m bench.latency_legs",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--sandbox-latency-ms", type=float, default=20.0)
    parser.add_argument("--tree", default=None,
                        help="another checkout whose worker to trace (default: this one)")
    args = parser.parse_args()
    tree = str(Path(args.tree or Path(__file__).resolve().parents[1]).resolve())
    if not (Path(tree) / "consumer" / "__init__.py").is_file():
        parser.error(f"--tree {args.tree}: no consumer package there")

    import bench.events as ev
    from bench.kafka_io import Pacer, register_schema
    from bench.procs import SandboxProcess, WorkerProcess, worker_env
    from bench.workloads import KNOWN_USERS, UNLIMITED, Bench, Params, _added_ms, _wait

    params = Params(smoke=False)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"latency-legs-{os.getpid()}"
    bench = Bench(os.environ["KAFKA_BOOTSTRAP_SERVERS"], os.environ["SCHEMA_REGISTRY_URL"],
                  params, work)
    trace = work / "stamps.json"
    try:
        topic = bench.topic("legs")
        (tmpl,) = ev.templates(register_schema(bench.registry, topic), "deliver")
        with SandboxProcess(latency_ms=args.sandbox_latency_ms) as sandbox:
            env = worker_env(bootstrap=bench.bootstrap, registry=bench.registry,
                             sandbox=sandbox.host_port, topic=topic,
                             group=f"legs-{bench.run_id}", **UNLIMITED, **KNOWN_USERS,
                             KAFKA_DLQ_TOPIC=f"legs-dlq-{bench.run_id}",
                             **{TRACE_ENV: str(trace)}, PYTHONPATH=tree)
            work.mkdir(parents=True, exist_ok=True)
            worker = WorkerProcess(env, work / "worker.log", script=(
                str(Path(__file__).resolve()), "--traced-worker", "run"))
            pacer = Pacer(bench.bootstrap, topic)
            try:
                pacer.send(*tmpl.render(ev.now_stamp(0, 0)))
                _wait(lambda: sandbox.control.stats()["accepted"] >= 1, 60, worker)
                sandbox.control.reset()
                total = int(args.rate * args.seconds)
                pacer.paced(lambda i: tmpl.render(ev.now_stamp(i % params.users, i)), total,
                            args.rate)
                _wait(lambda: sandbox.control.stats()["accepted"] >= total, 60, worker)
                records = sandbox.control.requests("/v1/track")
            finally:
                pacer.close()
                worker.stop()
        stamps = [(str(k), float(t)) for k, t in json.loads(trace.read_text())]
        print(f"{tree}: added latency p50 {statistics.median(_added_ms(records)):.2f} ms "
              f"({len(records)} events at {args.rate:g}/s)")
        for name, values in _legs(stamps, records).items():
            values.sort()
            if values:
                print(f"  {name:13s} p50 {values[len(values) // 2]:6.3f} ms   "
                      f"p90 {values[int(len(values) * 0.9)]:6.3f} ms   n={len(values)}")
    finally:
        bench.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
