"""`python -m bench.compare`: the same workload for workers from different source trees.

For before/after figures on a shared machine: the drop path of each tree runs back to back
on one backlog, between two runs of the bare consume + Avro ceiling, repeated; delivery at
a sandbox latency runs each tree back to back after the plain loop on the worker's client,
the trees' order alternating; saturation, memory and added latency run per tree with the
same parameters. Only the worker process comes from the other tree (its `PYTHONPATH`); the
driver, the sandbox and the ceilings are this tree's. A tree is a checkout, e.g.
`git worktree add /tmp/old 5aa140f`; `here` is this one. The workers run from a scratch
directory, so `python -m consumer` imports the tree given, not the current directory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.http_ceiling import run_worker_client
from bench.kafka_io import consume_avro
from bench.procs import SandboxProcess, WorkerProcess
from bench.workloads import API_HEADERS, DROP_PROGRESS, KNOWN_USERS, UNLIMITED, Bench, Params

__all__ = ["main"]

HERE = str(Path(__file__).resolve().parents[1])


class TreeBench(Bench):
    """A Bench whose workers import `consumer` from `tree`."""

    tree: str = HERE

    def worker(self, sandbox: SandboxProcess, topic: str, tag: str,
               extra: Mapping[str, str] | None = None) -> WorkerProcess:
        settings = {**(extra or {}), "PYTHONPATH": self.tree}
        config = Path(self.tree, "consumer", "config.py").read_text(encoding="utf-8")
        for name in KNOWN_USERS:
            if name not in config:
                # An older tree without ensure-user refuses the setting (and has the
                # behaviour it selects).
                settings.pop(name, None)
        return super().worker(sandbox, topic, tag, settings)


def _name(tree: str) -> str:
    return "here" if tree == HERE else Path(tree).name


def drop(bench: TreeBench, trees: Sequence[str], rounds: int) -> list[dict[str, Any]]:
    """Per round: ceiling, each tree's drop path, ceiling again; rates and CPU per event."""
    events = bench.params.drop_events
    topic = bench.backlog("drop", events)
    rows: list[dict[str, Any]] = []
    with SandboxProcess() as sandbox:
        for r in range(rounds):
            before = consume_avro(bench.bootstrap, bench.registry, topic, events)
            row: dict[str, Any] = {"round": r}
            for tree in trees:
                bench.tree = tree
                tag = f"drop{r}-{_name(tree)}"
                worker = bench.worker(sandbox, topic, tag, {**UNLIMITED, **DROP_PROGRESS})
                try:
                    drain = bench.drain(worker, topic, tag)
                finally:
                    worker.stop()
                row[_name(tree)] = {"rate": drain.rate, "cpu_us": drain.cpu_us_per_event}
            after = consume_avro(bench.bootstrap, bench.registry, topic, events)
            ceiling = (before.rate + after.rate) / 2
            ceiling_cpu = (before.cpu_us_per_event + after.cpu_us_per_event) / 2
            row["avro_only"] = {"rate": ceiling, "cpu_us": ceiling_cpu}
            for tree in trees:
                figures = row[_name(tree)]
                figures["ratio"] = figures["rate"] / ceiling
                figures["cpu_ratio"] = ceiling_cpu / figures["cpu_us"]
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def delivery(bench: TreeBench, trees: Sequence[str], rounds: int) -> list[dict[str, Any]]:
    """Per round: the plain loop on the worker's client (`run_worker_client`, workload 4),
    then each tree's delivery workload (3) on one backlog, at the params' last latency;
    rates, CPU per event and the ratios the issue sets against the plain loop."""
    p = bench.params
    latency = p.latencies_ms[-1]
    topic = bench.backlog("deliver", p.delivery_events)
    bodies = bench.payloads()
    base = bench.run_id
    rows: list[dict[str, Any]] = []
    try:
        with SandboxProcess() as sandbox:
            for r in range(rounds):
                sandbox.control.set_faults(latency_ms=latency)
                sandbox.control.reset()
                plain = run_worker_client(sandbox.url + "/v1/track", API_HEADERS, bodies,
                                          p.http_seconds, p.concurrency)
                if plain.accepted == 0 or plain.other:
                    raise RuntimeError(f"plain loop on the worker's client: {plain}")
                row: dict[str, Any] = {"round": r, "latency_ms": latency,
                                       "plain_loop": {"rate": plain.rate,
                                                      "cpu_us": plain.cpu_us_per_request}}
                for tree in (trees if r % 2 == 0 else trees[::-1]):
                    bench.tree = tree
                    bench.run_id = f"{base}-{r}-{_name(tree)}"  # a fresh consumer group
                    result = bench._deliver(sandbox, topic, latency)
                    row[_name(tree)] = {
                        "rate": result["rate"], "cpu_us": result["cpu_us_per_event"],
                        "ratio": result["rate"] / plain.rate,
                        "cpu_ratio": plain.cpu_us_per_request / result["cpu_us_per_event"]}
                print(json.dumps(row), flush=True)
                rows.append(row)
    finally:
        bench.run_id = base
    return rows


OTHERS = ("saturation", "memory", "latency")


def others(bench: TreeBench, trees: Sequence[str], rounds: int,
           parts: Sequence[str] = OTHERS) -> list[dict[str, Any]]:
    """Saturation (both scenarios), peak RSS draining a backlog, added latency, per tree.

    The trees' order alternates by round, so a drift in the machine's load over the run
    falls on each tree alike.
    """
    rows: list[dict[str, Any]] = []
    base = bench.run_id
    for r in range(rounds):
        for tree in (trees if r % 2 == 0 else trees[::-1]):
            bench.tree = tree
            bench.run_id = f"{base}-{r}-{_name(tree)}"  # fresh groups and latency topic
            row: dict[str, Any] = {"round": r, "tree": _name(tree)}
            if "saturation" in parts:
                sat = bench.saturation()
                row["saturation"] = {k: {f: sat[k][f] for f in ("window_counts",
                                                                "busiest_sliding_window",
                                                                "responses_429")}
                                     for k in ("1_worker", "3_workers")}
            if "memory" in parts:
                mem = bench.memory()
                row["peak_rss_mb"] = mem["peak_rss_mb"]
                row["memory_delivered"] = mem["delivered"]
            if "latency" in parts:
                row["added_latency_ms"] = bench.latency()["added_ms"]
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__)
    parser.add_argument("what", choices=("drop", "delivery", "others"))
    parser.add_argument("--trees", default="here",
                        help="comma-separated checkouts; 'here' is this one")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--drop-events", type=int, default=200_000)
    parser.add_argument("--delivery-events", type=int, default=10_000)
    parser.add_argument("--latency-ms", type=float, default=20.0,
                        help="the sandbox's latency for `delivery`")
    parser.add_argument("--parts", default=",".join(OTHERS),
                        help="what `others` measures, comma-separated: " + ", ".join(OTHERS))
    parser.add_argument("--sat-limit", type=int, default=200,
                        help="saturation's limit per window (Userpilot's: 600)")
    parser.add_argument("--sat-window", type=float, default=10.0,
                        help="saturation's window in seconds (Userpilot's: 60)")
    parser.add_argument("--sat-windows", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    parts = [part for part in args.parts.split(",") if part]
    unknown = sorted(set(parts) - set(OTHERS))
    if unknown:
        parser.error(f"--parts: unknown {', '.join(unknown)}; choose from {', '.join(OTHERS)}")
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    registry = os.environ.get("SCHEMA_REGISTRY_URL")
    if not bootstrap or not registry:
        print("error: set KAFKA_BOOTSTRAP_SERVERS and SCHEMA_REGISTRY_URL", file=sys.stderr)
        return 2
    trees = [HERE if t == "here" else str(Path(t).resolve()) for t in args.trees.split(",")]
    # Saturation compressed by default (200 per 10 s, 3 windows), a 200,000-event memory
    # backlog.
    params = replace(Params.smoke_run(), drop_events=args.drop_events,
                     sat_limit=args.sat_limit, sat_window_s=args.sat_window,
                     sat_windows=args.sat_windows, sat_parallel=True,
                     memory_events=200_000, memory_min_s=15.0, memory_max_s=20.0,
                     latency_seconds=10.0)
    if args.what == "delivery":
        # As the full run's workloads 3 and 4: its users, a 10 s plain loop.
        params = replace(params, users=Params.users, delivery_events=args.delivery_events,
                         http_seconds=Params.http_seconds, latencies_ms=(args.latency_ms,))
    out = args.out.resolve() if args.out is not None else None
    scratch = Path(tempfile.mkdtemp(prefix="bench-compare-"))
    os.chdir(scratch)  # `python -m consumer` puts the working directory first on sys.path
    bench = TreeBench(bootstrap, registry, params, scratch)
    try:
        if args.what == "others":
            rows = others(bench, trees, args.rounds, parts)
        else:
            rows = {"drop": drop, "delivery": delivery}[args.what](bench, trees, args.rounds)
    finally:
        bench.cleanup()
    if out is not None:
        out.write_text(json.dumps({"workload": args.what, "trees": trees, "rows": rows},
                                  indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
