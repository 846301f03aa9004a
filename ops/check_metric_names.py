#!/usr/bin/env python3
"""Fail when the dashboard or alert rules use a userpilot_* metric the worker doesn't export.

A renamed metric otherwise turns a panel into "No data" and an alert into one that can
never fire, silently. The exported names come from instantiating ``consumer.metrics.Metrics``
on a fresh registry, so the code is the source of truth.

Usage: check_metric_names.py [FILE ...]   (default: the chart's dashboard.json and alerts.yaml)
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prometheus_client import CollectorRegistry  # noqa: E402

from consumer.metrics import Metrics  # noqa: E402

DEFAULT_FILES = (
    ROOT / "helm" / "userpilot-worker" / "files" / "dashboard.json",
    ROOT / "helm" / "userpilot-worker" / "files" / "alerts.yaml",
)
NAME_RE = re.compile(r"\buserpilot_[a-zA-Z0-9_]*[a-zA-Z0-9]")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# The labels a scraper sets on every target (Prometheus, prometheus-operator). The chart's
# ServiceMonitor honours the worker's labels (its `endpoint` is one of these names), so an
# exported label among the others would override where a series came from.
TARGET_LABELS = frozenset({"job", "instance", "namespace", "pod", "service", "container"})


def exported_names() -> tuple[set[str], set[str]]:
    """(series names as scraped, histogram base names); counters carry _total."""
    names: set[str] = set()
    histograms: set[str] = set()
    for family in _registry().collect():
        names.add(family.name + "_total" if family.type == "counter" else family.name)
        if family.type == "histogram":
            histograms.add(family.name)
    return names, histograms


def _registry() -> CollectorRegistry:
    reg = CollectorRegistry()
    Metrics(reg)
    return reg


def used_names(text: str) -> set[str]:
    """userpilot_* identifiers in a file, as written."""
    return set(NAME_RE.findall(text))


def unknown_names(used: Iterable[str]) -> set[str]:
    """Names that are neither exported nor a histogram's _bucket/_sum/_count series."""
    known, histograms = exported_names()
    bad: set[str] = set()
    for name in used:
        if name in known:
            continue
        base = next((name[: -len(s)] for s in HISTOGRAM_SUFFIXES if name.endswith(s)), None)
        if base not in histograms:
            bad.add(name)
    return bad


def target_label_clashes() -> set[str]:
    """Exported label names that would override a target's own (see TARGET_LABELS)."""
    clashes: set[str] = set()
    for value in vars(Metrics(CollectorRegistry())).values():
        names = getattr(value, "_labelnames", ())  # declared, whether any series exists yet
        clashes.update(set(names) & TARGET_LABELS)
    return clashes


def check(files: Iterable[Path]) -> dict[Path, set[str]]:
    """Unknown names per file (only files with any)."""
    unknown: dict[Path, set[str]] = {}
    for path in files:
        bad = unknown_names(used_names(path.read_text(encoding="utf-8")))
        if bad:
            unknown[path] = bad
    return unknown


def main(argv: Sequence[str]) -> int:
    files = [Path(a) for a in argv] or list(DEFAULT_FILES)
    missing = [p for p in files if not p.is_file()]
    if missing:
        for p in missing:
            print(f"missing file: {p}", file=sys.stderr)
        return 2
    clashes = target_label_clashes()
    for label in sorted(clashes):
        print(f"consumer/metrics.py: label {label!r} would override the scraper's own "
              "(the ServiceMonitor sets honorLabels)", file=sys.stderr)
    if clashes:
        return 1
    unknown = check(files)
    for path, names in unknown.items():
        for name in sorted(names):
            print(f"{path}: unknown metric {name}", file=sys.stderr)
    if unknown:
        return 1
    used = set().union(*(used_names(p.read_text(encoding="utf-8")) for p in files))
    print(f"metric names OK: checked {len(used)} names in {len(files)} files")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
