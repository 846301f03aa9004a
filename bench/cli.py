"""`python -m bench`: run the workloads, print the table, write the JSON.

Needs a running broker and registry (KAFKA_BOOTSTRAP_SERVERS, SCHEMA_REGISTRY_URL); the
sandbox and the workers are started as child processes and stopped again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.report import machine, render_table, targets
from bench.workloads import Bench, Params, ratios

__all__ = ["WORKLOADS", "build_parser", "main"]

log = logging.getLogger(__name__)

# Number → (JSON key, Bench method name), in the order.
WORKLOADS: dict[int, tuple[str, str]] = {
    1: ("consume_decode", "consume_decode"),
    2: ("drop_path", "drop_path"),
    3: ("delivery_path", "delivery_path"),
    4: ("http_ceiling", "http_ceiling"),
    5: ("naive", "naive"),
    6: ("saturation", "saturation"),
    7: ("memory", "memory"),
    8: ("latency", "latency"),
    9: ("skewed_keys", "skewed_keys"),
    10: ("sigkill_duplicates", "sigkill_duplicates"),
    11: ("redis_cpu", "redis_cpu"),
    12: ("mixed_saturation", "mixed_saturation"),
}
DEFAULT_WORKLOADS = [1, 2, 3, 4, 5, 6, 7, 8, 12]
"""Without --workloads: 1-8 and 12 (mixed saturation); the Redis workloads 9-11 are asked for
explicitly."""


def _workload_list(text: str) -> list[int]:
    try:
        chosen = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use numbers 1-12, e.g. 1,2,3") from None
    bad = [n for n in chosen if n not in WORKLOADS]
    if bad or not chosen:
        raise argparse.ArgumentTypeError(f"{text!r}: workloads are numbered 1-12")
    return chosen


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the worker against Userpilot's limits and a naive loop, on "
        "the real broker/registry and the sandbox. Headline figures are ratios measured "
        "in the same run.",
    )
    parser.add_argument("--smoke", action="store_true",
                        help="small sizes (under a minute): checks the harness, not targets")
    parser.add_argument("--workloads", type=_workload_list, default=list(DEFAULT_WORKLOADS),
                        help="comma-separated subset of 1-12 (default: 1-8, 12; 9-11 need Redis)")
    parser.add_argument("--out", type=Path, default=None, help="write the results JSON here")
    parser.add_argument("--bootstrap-servers", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS"))
    parser.add_argument("--schema-registry-url", default=os.environ.get("SCHEMA_REGISTRY_URL"))
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL"),
                        help="Redis for workloads 9-11 (default: $REDIS_URL)")
    parser.add_argument("--logs", type=Path, default=None,
                        help="directory for worker logs (default: a temporary directory)")
    parser.add_argument("--keep-topics", action="store_true",
                        help="do not delete the benchmark topics afterwards")
    parser.add_argument("--max-in-flight", type=int, default=None,
                        help="WORKER_MAX_IN_FLIGHT for every worker (default: the worker's 200)")
    parser.add_argument("--max-connections", type=int, default=None,
                        help="USERPILOT_MAX_CONNECTIONS and the HTTP ceiling's concurrency "
                        "(default: the worker's 64)")
    parser.add_argument("--sat-limit", type=int, default=None,
                        help="saturation limit per family per window (default 600; 6 and 9)")
    parser.add_argument("--sat-window", type=float, default=None,
                        help="saturation window in seconds (default 60)")
    parser.add_argument("--sat-windows", type=int, default=None,
                        help="full windows measured per scenario (default 3)")
    parser.add_argument("--mixed-track-users", type=int, default=None,
                        help="users the mixed workload's Tracks rotate over (default 60)")
    parser.add_argument("--drop-events", type=int, default=None,
                        help="size of the drop-path backlog (workloads 1, 2)")
    parser.add_argument("--delivery-events", type=int, default=None,
                        help="size of the delivery backlog (workloads 3, 5)")
    parser.add_argument("--verbose", "-v", action="store_true")
    return parser


def run(bench: Bench, chosen: Sequence[int],
        progress: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """Run the chosen workloads in order; the results document (without the table)."""
    results: dict[str, Any] = {
        "command": "python -m bench " + " ".join(sys.argv[1:]),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "worker_revision": _revision(),
        "params": {**asdict(bench.params), "concurrency": bench.params.concurrency,
                   "workloads": list(chosen)},
        "layout": "sandbox and every worker are separate processes (python -m "
                  "consumer.sandbox / python -m consumer run); workloads 1, 4 and 5 run in "
                  "the driver process while nothing else is measured",
        "workloads": {},
    }
    begun = time.monotonic()
    for number in chosen:
        key, method = WORKLOADS[number]
        progress(f"workload {number}: {key} ...")
        started = time.monotonic()
        figures = getattr(bench, method)()
        figures["wall_s"] = round(time.monotonic() - started, 2)
        results["workloads"][key] = figures
    results["wall_s"] = round(time.monotonic() - begun, 2)
    results["ratios"] = ratios(results)
    results["summary"] = bench.summary
    results["targets"] = [row.to_json() for row in targets(results)]
    return results


def _revision() -> dict[str, Any]:
    """The commit measured, and whether the worker's files differed from it."""
    import subprocess

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                                  check=False).stdout.strip()
        except OSError:
            return ""

    dirty = git("status", "--porcelain", "--", "consumer")
    return {"commit": git("rev-parse", "HEAD"), "consumer_modified": bool(dirty)}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if not args.bootstrap_servers or not args.schema_registry_url:
        print("error: set KAFKA_BOOTSTRAP_SERVERS and SCHEMA_REGISTRY_URL (or pass "
              "--bootstrap-servers / --schema-registry-url)", file=sys.stderr)
        return 2
    params = Params.smoke_run() if args.smoke else Params(smoke=False)
    overrides: dict[str, Any] = {}
    if args.max_in_flight is not None:
        overrides["max_in_flight"] = args.max_in_flight
    if args.max_connections is not None:
        overrides["max_connections"] = args.max_connections
    for arg, field in (("sat_limit", "sat_limit"), ("sat_window", "sat_window_s"),
                       ("sat_windows", "sat_windows"),
                       ("mixed_track_users", "mixed_track_users")):
        if getattr(args, arg) is not None:
            overrides[field] = getattr(args, arg)
    if args.drop_events is not None:
        overrides["drop_events"] = args.drop_events
    if args.delivery_events is not None:
        overrides["delivery_events"] = args.delivery_events
    params = dataclasses.replace(params, **overrides)
    logs = args.logs or Path(tempfile.mkdtemp(prefix="bench-logs-"))
    bench = Bench(args.bootstrap_servers, args.schema_registry_url, params, logs,
                  redis_url=args.redis_url)

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        results = run(bench, args.workloads, progress)
    finally:
        if not args.keep_topics:
            bench.cleanup()
    results["logs"] = str(logs)
    print(render_table(results))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
        print(f"results written to {args.out}", file=sys.stderr)
    return 0
