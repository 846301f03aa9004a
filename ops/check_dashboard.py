#!/usr/bin/env python3
"""Check the Grafana dashboard's structure and make its PromQL checkable by promtool.

Grafana accepts a broken query silently and shows "No data", so this catches what review
misses: the import input and fixed uid, the namespace/pod/topic variables, panel types,
every query's datasource and its namespace/pod (and topic) filters, lag read from the broker
(kafka_exporter) first with the workers' figure as fallback, process_* series limited to
worker pods, and runbook links whose anchors exist in README.md. With ``--emit-rules``
it writes every query, Grafana variables replaced, as recording rules so that
``promtool check rules`` parses them; with ``--emit-test`` also a ``promtool test rules``
file that evaluates them over the series the worker exports (two pods): a query can parse
and still fail on every evaluation (two series left with one label set), which Grafana
shows as an error panel.

Usage: check_dashboard.py [--emit-rules OUT.yaml [--emit-test TEST.yaml]] [DASHBOARD.json]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "helm" / "userpilot-worker" / "files" / "dashboard.json"

UID = "userpilot-delivery-worker"
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
VARIABLES = ("namespace", "pod", "topic")
PANEL_TYPES = {"row", "timeseries", "stat"}
# Metrics carrying a topic label; their selectors must honour $topic too.
TOPIC_METRICS = {
    "userpilot_events_consumed_total",
    "userpilot_consumer_lag",
    "userpilot_committed_offset",
    "userpilot_unstable_records",
    "userpilot_stable_offset_stalled_seconds",
    "userpilot_log_resets_total",
    "userpilot_skipped_offsets_total",
    "userpilot_source_topic_missing",
}
"""Every series labelled by topic: a panel follows the $topic variable (review "multi53":
three per-topic series showed every topic whatever was selected)."""
SELECTOR_RE = re.compile(r"\b((?:userpilot|process|python)_[a-zA-Z0-9_]+)(\{[^}]*\})?")
BROKER_LAG_RE = re.compile(r"\bkafka_consumergroup_lag(\{[^}]*\})?")
# process_*/python_* come from every Python service in a namespace: keep the worker's pods.
WORKER_ONLY = "and on (namespace, pod, instance) userpilot_worker_ready{"
README = ROOT / "README.md"
RUNBOOK_BASE = "https://github.com/signal/userpilot-worker/blob/main/README.md"
SUBSTITUTIONS = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$namespace": ".*",
    "$pod": ".*",
    "$topic": ".*",
    "$consumergroup": "userpilot-delivery",
}


def readme_anchors(text: str) -> set[str]:
    """GitHub's anchors for the Markdown headings of ``text``."""
    anchors: set[str] = set()
    for line in text.splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            anchors.add(slug)
    return anchors


def _links(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, url) of the dashboard's own links and every panel's links."""
    found = [("dashboard", str(link.get("url", ""))) for link in dash.get("links", [])]
    for panel in dash.get("panels", []):
        where = f"panel {panel.get('title')!r}"
        found += [(where, str(x.get("url", ""))) for x in panel.get("links", [])]
    return found


def _targets(dash: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    found: list[tuple[str, dict[str, Any]]] = []
    for panel in dash.get("panels", []):
        for target in panel.get("targets", []):
            found.append((str(panel.get("title")), target))
        for inner in panel.get("panels", []):  # collapsed rows keep their panels inside
            for target in inner.get("targets", []):
                found.append((str(inner.get("title")), target))
    return found


def problems(dash: dict[str, Any]) -> list[str]:
    """Everything wrong with the dashboard, as human-readable lines."""
    out: list[str] = []
    inputs = dash.get("__inputs", [])
    if not any(
        i.get("name") == "DS_PROMETHEUS" and i.get("pluginId") == "prometheus" for i in inputs
    ):
        out.append("__inputs lacks the DS_PROMETHEUS prometheus datasource input")
    if dash.get("uid") != UID:
        out.append(f"uid is {dash.get('uid')!r}, expected {UID!r}")
    variables = {v.get("name"): v for v in dash.get("templating", {}).get("list", [])}
    # Provisioning (file provider, Grafana sidecar) ignores __inputs; a datasource variable
    # of the same name lets ${DS_PROMETHEUS} resolve there as well.
    ds_var = variables.get("DS_PROMETHEUS", {})
    if ds_var.get("type") != "datasource" or ds_var.get("query") != "prometheus":
        out.append("template variable 'DS_PROMETHEUS' (type datasource, prometheus) missing")
    for name in VARIABLES:
        var = variables.get(name)
        if var is None:
            out.append(f"template variable {name!r} missing")
            continue
        query = var.get("definition") or str(var.get("query"))
        if "label_values(" not in query:
            out.append(f"template variable {name!r} is not a label_values query")
        if var.get("datasource") != DATASOURCE:
            out.append(f"template variable {name!r} does not use ${{DS_PROMETHEUS}}")

    ids: set[int] = set()
    for panel in dash.get("panels", []):
        title = panel.get("title")
        if panel.get("type") not in PANEL_TYPES:
            out.append(f"panel {title!r}: type {panel.get('type')!r} not in {sorted(PANEL_TYPES)}")
        pid = panel.get("id")
        if pid in ids:
            out.append(f"panel {title!r}: duplicate id {pid}")
        ids.add(pid)
        grid = panel.get("gridPos", {})
        if grid.get("x", 0) + grid.get("w", 0) > 24:
            out.append(f"panel {title!r}: wider than the 24-column grid")
        if panel.get("type") != "row" and not panel.get("targets"):
            out.append(f"panel {title!r}: no queries")

    for title, target in _targets(dash):
        expr = str(target.get("expr", ""))
        if target.get("datasource") != DATASOURCE:
            out.append(f"panel {title!r}: query {target.get('refId')} not on ${{DS_PROMETHEUS}}")
        selectors = SELECTOR_RE.findall(expr)
        if not selectors:
            out.append(f"panel {title!r}: query uses no userpilot_* metric: {expr}")
        if re.search(r"\b(process|python)_", expr) and WORKER_ONLY not in expr:
            out.append(f"panel {title!r}: process_/python_ series not limited by '{WORKER_ONLY}'")
        if re.search(r"sum by \(topic, partition\) \((kafka_consumergroup_lag|userpilot_)", expr):
            # a partition handed over shows on two pods (or two exporters) for a scrape
            out.append(f"panel {title!r}: per-partition gauges summed; take their max")
        if "kafka_consumergroup_lag" in expr and ">= 0" not in expr:
            out.append(f"panel {title!r}: kafka_consumergroup_lag reads -1 when never "
                       "committed: keep only >= 0")
        if "userpilot_consumer_lag" in expr and " or " not in expr.replace(WORKER_ONLY, ""):
            out.append(f"panel {title!r}: lag must prefer kafka_consumergroup_lag (... or ...)")
        for matchers in BROKER_LAG_RE.findall(expr):
            for m in ('consumergroup="$consumergroup"', 'topic=~"$topic"'):
                if m not in matchers:
                    out.append(f"panel {title!r}: kafka_consumergroup_lag lacks {m}")
        for name, matchers in selectors:
            needed = ['namespace=~"$namespace"', 'pod=~"$pod"']
            if name.removesuffix("_bucket") in TOPIC_METRICS:
                needed.append('topic=~"$topic"')
            missing = [m for m in needed if m not in matchers]
            if missing:
                out.append(f"panel {title!r}: {name} lacks {', '.join(missing)}")
    for title, expr in [(t, str(x.get("expr", ""))) for t, x in _targets(dash)]:
        if "userpilot_consumer_lag" in expr and "kafka_consumergroup_lag" not in expr:
            out.append(f"panel {title!r}: lag without the broker's kafka_consumergroup_lag")

    anchors = readme_anchors(README.read_text(encoding="utf-8"))
    links = _links(dash)
    if not any(url.startswith(RUNBOOK_BASE + "#alert-") for _, url in links):
        out.append("no panel links a runbook")
    for where, url in links:
        if url.startswith(RUNBOOK_BASE):
            anchor = url.partition("#")[2]
            if anchor not in anchors:
                out.append(f"{where}: link {url} has no heading #{anchor} in README.md")
    return out


def as_rules(dash: dict[str, Any]) -> dict[str, Any]:
    """Every query as a recording rule, Grafana variables replaced, for promtool to parse."""
    rules = []
    for i, (_title, target) in enumerate(_targets(dash)):
        expr = str(target.get("expr", ""))
        for var, value in SUBSTITUTIONS.items():
            expr = expr.replace(var, value)
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    return {"groups": [{"name": "dashboard-queries", "rules": rules}]}


def exported_series(pods: tuple[str, ...] = ("w-0", "w-1")) -> list[dict[str, str]]:
    """What consumer/metrics.py exports at start-up, on each of `pods` as prometheus-operator
    labels it, with counters rising and gauges level; plus a broker lag series."""
    sys.path.insert(0, str(ROOT))
    from prometheus_client import CollectorRegistry

    from consumer.metrics import Metrics

    registry = CollectorRegistry()
    metrics = Metrics(registry, version="1", revision="r")
    metrics.declare_redis_endpoints(["track", "identify"])
    metrics.declare_topics(["delivery-userpilot"])
    metrics.declare_event_names(["feature_used", "identify", "group"])
    metrics.declare_consent_categories(["analytics"])
    metrics.consumer_lag.labels("delivery-userpilot", "0").set(5)
    metrics.committed_offset.labels("delivery-userpilot", "0").set(5)
    metrics.unstable_records.labels("delivery-userpilot", "0").set(0)
    series = []
    for family in registry.collect():
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            rising = sample.name.endswith(("_total", "_bucket", "_count", "_sum"))
            for pod in pods:
                labels = dict(sample.labels, namespace="delivery", pod=pod,
                              instance=f"{pod}:8082", job="userpilot-worker")
                text = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
                series.append({"series": f"{sample.name}{{{text}}}",
                               "values": "0+1x30" if rising else "1x30"})
    series.append({"series": 'kafka_consumergroup_lag{consumergroup="userpilot-delivery",'
                             'topic="delivery-userpilot",partition="0"}', "values": "5x30"})
    return series


def as_test(rules: Path) -> dict[str, Any]:
    """A promtool unit test evaluating `rules` (every query) over `exported_series`: promtool
    fails it when any rule's evaluation errs. It expects no alert (there is none)."""
    return {"rule_files": [str(rules.resolve())], "evaluation_interval": "1m",
            "tests": [{"interval": "1m", "input_series": exported_series(),
                       "alert_rule_test": [{"eval_time": "20m", "alertname": "none",
                                            "exp_alerts": []}]}]}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dashboard", nargs="?", type=Path, default=DEFAULT)
    parser.add_argument("--emit-rules", type=Path, help="write the queries as a rules file")
    parser.add_argument("--emit-test", type=Path,
                        help="write a promtool test evaluating those rules (needs --emit-rules)")
    args = parser.parse_args(argv)
    if args.emit_test and not args.emit_rules:
        parser.error("--emit-test needs --emit-rules")
    dash = json.loads(args.dashboard.read_text(encoding="utf-8"))
    found = problems(dash)
    for line in found:
        print(f"{args.dashboard}: {line}", file=sys.stderr)
    if args.emit_rules:
        # JSON is valid YAML, so promtool reads this without a YAML library here.
        args.emit_rules.write_text(json.dumps(as_rules(dash), indent=1), encoding="utf-8")
    if args.emit_test:
        args.emit_test.write_text(json.dumps(as_test(args.emit_rules)), encoding="utf-8")
    if found:
        return 1
    print(f"dashboard OK: {len(_targets(dash))} queries in {len(dash['panels'])} panels")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
