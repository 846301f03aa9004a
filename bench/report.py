"""Ratios, targets, the printed table and the machine description. Pure (no I/O but `os`).

Every headline figure is a ratio of two measurements from the same run, because the
machines these run on are shared and noisy: absolute rates drift, ratios much less.
"""

from __future__ import annotations

import math
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Target", "machine", "percentile", "ratio", "render_table", "targets"]


def machine() -> dict[str, Any]:
    """Enough to tell two result files' hosts apart."""
    cpu_model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            cpu_model = next((line.split(":", 1)[1].strip() for line in info
                              if line.startswith("model name")), "")
    except OSError:
        pass
    mem_total = 0
    try:
        with open("/proc/meminfo", encoding="utf-8") as info:
            mem_total = int(next(line.split()[1] for line in info
                                 if line.startswith("MemTotal"))) * 1024
    except (OSError, StopIteration):
        pass
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or cpu_model,
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_bytes": mem_total,
        "load_avg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
    }


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else math.nan


@dataclass(frozen=True)
class Target:
    """One row of the issue's target table, evaluated."""

    name: str
    value: float
    op: str  # ">=" or "<="
    bound: float
    unit: str = ""
    extra_ok: bool = True  # a second condition, e.g. zero 429s
    note: str = ""

    @property
    def passed(self) -> bool:
        if not math.isfinite(self.value) or not self.extra_ok:
            return False
        return self.value >= self.bound if self.op == ">=" else self.value <= self.bound

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "pass": self.passed}


def _get(results: Mapping[str, Any], *path: str) -> Any:
    node: Any = results
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


RATIO_TARGETS: tuple[tuple[str, str, float], ...] = (
    ("drop_over_consume_decode", "drop path ÷ consume+decode", 0.6),
    ("drop_over_consume_avro", "drop path ÷ consume+Avro (no JSON)", 0.8),
    ("drop_cpu_over_consume_avro_cpu", "drop path, CPU/event: Avro-only ÷ worker", 0.8),
    ("delivery_over_client_loop_20ms", "delivery ÷ plain loop, same client @ 20ms", 0.9),
    ("delivery_cpu_over_client_loop_cpu_20ms",
     "delivery, CPU/event: plain loop ÷ worker @ 20ms", 0.9),
    ("delivery_over_token_limit_0ms", "delivery @ 0ms ÷ token limit (10 req/s)", 50),
    ("delivery_over_naive_20ms", "delivery ÷ naive @ 20ms", 20),
)
"""The same-run ratio targets (key in the results' ``ratios``, row label, at least)."""


def targets(results: Mapping[str, Any]) -> list[Target]:
    """The issue's targets for whichever workloads ran."""
    rows: list[Target] = []
    ratios = results.get("ratios", {})
    for key, label, goal in RATIO_TARGETS:
        if key in ratios:
            rows.append(Target(label, ratios[key], ">=", goal))
    for label in ("1_worker", "3_workers"):
        sat = _get(results, "workloads", "saturation", label)
        if sat:
            rows.append(Target(
                f"saturation, {label.replace('_', ' ')} (min window share)",
                100 * sat["min_window_share"], ">=", 98.0, "%",
                extra_ok=sat["responses_429"] == 0,
                note=f"{sat['responses_429']} × 429"))
    # 3 workers on partition shares are reported, not judged: see Bench.mixed_saturation.
    for label in ("1_worker", "3_workers_redis"):
        mixed = _get(results, "workloads", "mixed_saturation", label)
        if mixed:
            for family in ("track", "identify"):
                rows.append(Target(
                    f"mixed {family}, {label.replace('_', ' ')} (min window share)",
                    100 * mixed[family]["min_window_share"], ">=", 98.0, "%",
                    extra_ok=mixed["responses_429"] == 0,
                    note=f"{mixed['responses_429']} × 429"))
    mem = _get(results, "workloads", "memory")
    if mem:
        rows.append(Target("peak RSS, backlog draining", mem["peak_rss_mb"], "<=", 200.0, "MB",
                           note=f"backlog {mem['backlog_events']:,}"))
    skew = _get(results, "workloads", "skewed_keys", "redis")
    if skew:
        rows.append(Target("skewed keys, 3 workers, Redis (share of limit)",
                           100 * skew["share_of_limit"], ">=", 98.0, "%",
                           extra_ok=skew["responses_429"] == 0,
                           note=f"{skew['responses_429']} × 429"))
    for pace in ("limited", "unlimited"):
        kill = _get(results, "workloads", "sigkill_duplicates", pace, "redis")
        if kill:
            rows.append(Target(f"SIGKILL of 1 of 3 workers, {pace}, Redis: duplicates",
                               kill["duplicates"], "<=", 0.0, extra_ok=kill["lost"] == 0,
                               note=f"{kill['lost']} lost"))
    lat = _get(results, "workloads", "latency")
    if lat:
        rows.append(Target("added latency p99", lat["added_ms"]["p99"], "<=", 50.0, "ms"))
    return rows


def _fmt(value: float, unit: str = "") -> str:
    if not math.isfinite(value):
        return "n/a"
    text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"
    return f"{text} {unit}".strip()


def render_table(results: Mapping[str, Any]) -> str:
    """Raw figures per workload, then the targets with PASS/MISS."""
    summary = results.get("summary", [])
    width = max((len(name) for name, _ in summary), default=20) + 2
    lines = [f"{'workload':<{width}}figure", "-" * (width + 50)]
    for name, text in summary:
        lines.append(f"{name:<{width}}{text}")
    lines += ["", f"{'target':<48}{'value':>12}  {'goal':>10}  result", "-" * 80]
    for row in targets(results):
        goal = f"{row.op} {_fmt(row.bound, row.unit)}"
        mark = "PASS" if row.passed else "MISS"
        note = f"  ({row.note})" if row.note else ""
        lines.append(f"{row.name:<48}{_fmt(row.value, row.unit):>12}  {goal:>10}  {mark}{note}")
    return "\n".join(lines)
