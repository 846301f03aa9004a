from __future__ import annotations

import copy
import importlib.util
import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from consumer.metrics import (
    DEAD_LETTER_REASONS,
    DISTRIBUTION,
    EVENT_AGE_BUCKETS,
    LATENCY_BUCKETS,
    LIMITER_WAIT_BUCKETS,
    REBALANCE_KINDS,
    RETRY_CAUSES,
    REVISION_ENV,
    Children,
    Metrics,
    build_revision,
)

ROOT = Path(__file__).resolve().parents[2]

# The contract: metric family name -> (type, label names).
CONTRACT: dict[str, tuple[str, tuple[str, ...]]] = {
    "userpilot_events_consumed": ("counter", ("topic",)),
    "userpilot_events_dropped": ("counter", ("reason", "category")),
    "userpilot_events_already_finished": ("counter", ()),
    "userpilot_events_delivered": ("counter", ("event_name",)),
    "userpilot_events_metadata_cut": ("counter", ("kind",)),
    "userpilot_responses": ("counter", ("endpoint", "status")),
    "userpilot_requests_resent": ("counter", ("endpoint",)),
    "userpilot_commit_failures": ("counter", ()),
    "userpilot_retries": ("counter", ("cause",)),
    "userpilot_events_dead_lettered": ("counter", ("reason",)),
    "userpilot_delivery_latency_seconds": ("histogram", ("endpoint",)),
    "userpilot_connection_wait_seconds": ("histogram", ("endpoint",)),
    "userpilot_event_age_seconds": ("histogram", ()),
    "userpilot_in_flight_events": ("gauge", ()),
    "userpilot_rate_limiter_wait_seconds": ("histogram", ("endpoint",)),
    "userpilot_rate_limit_requests_per_second": ("gauge", ("endpoint",)),
    "userpilot_ensure_user_identify": ("counter", ()),
    "userpilot_ensure_user_shared": ("counter", ()),
    "userpilot_paused_partitions": ("gauge", ()),
    "userpilot_events_waiting_schema": ("gauge", ()),
    "userpilot_partitions_held_for_one_user": ("gauge", ()),
    "userpilot_consumer_lag": ("gauge", ("topic", "partition")),
    "userpilot_committed_offset": ("gauge", ("topic", "partition")),
    "userpilot_unstable_records": ("gauge", ("topic", "partition")),
    "userpilot_stable_offset_stalled_seconds": ("gauge", ("topic", "partition")),
    "userpilot_rebalances": ("counter", ("kind",)),
    "userpilot_log_resets": ("counter", ()),
    "userpilot_skipped_offsets": ("counter", ()),
    "userpilot_integration_up": ("gauge", ()),
    "userpilot_dlq_guard_tripped": ("gauge", ()),
    "userpilot_dlq_unwritable": ("gauge", ()),
    "userpilot_worker_ready": ("gauge", ()),
    "userpilot_source_topic_missing": ("gauge", ()),
    "userpilot_build_info": ("gauge", ("revision", "version")),
}
# What prometheus_client's default registry exposes; the worker's own registry must too.
RUNTIME_FAMILIES = {
    "process_cpu_seconds": "counter",
    "process_open_fds": "gauge",
    "process_max_fds": "gauge",
    "process_resident_memory_bytes": "gauge",
    "process_virtual_memory_bytes": "gauge",
    "process_start_time_seconds": "gauge",
    "python_info": "gauge",
    "python_gc_objects_collected": "counter",
    "python_gc_objects_uncollectable": "counter",
    "python_gc_collections": "counter",
}

ATTRIBUTES = {
    "events_consumed": "userpilot_events_consumed",
    "events_dropped": "userpilot_events_dropped",
    "delivered": "userpilot_events_delivered",
    "responses": "userpilot_responses",
    "requests_resent": "userpilot_requests_resent",
    "commit_failures": "userpilot_commit_failures",
    "retries": "userpilot_retries",
    "dead_lettered": "userpilot_events_dead_lettered",
    "delivery_latency": "userpilot_delivery_latency_seconds",
    "connection_wait": "userpilot_connection_wait_seconds",
    "event_age": "userpilot_event_age_seconds",
    "in_flight": "userpilot_in_flight_events",
    "limiter_wait": "userpilot_rate_limiter_wait_seconds",
    "rate_limit_rps": "userpilot_rate_limit_requests_per_second",
    "ensure_user_identify": "userpilot_ensure_user_identify",
    "ensure_user_shared": "userpilot_ensure_user_shared",
    "paused_partitions": "userpilot_paused_partitions",
    "waiting_schema": "userpilot_events_waiting_schema",
    "held_for_one_user": "userpilot_partitions_held_for_one_user",
    "consumer_lag": "userpilot_consumer_lag",
    "committed_offset": "userpilot_committed_offset",
    "unstable_records": "userpilot_unstable_records",
    "stable_offset_stalled": "userpilot_stable_offset_stalled_seconds",
    "rebalances": "userpilot_rebalances",
    "log_resets": "userpilot_log_resets",
    "skipped_offsets": "userpilot_skipped_offsets",
    "integration_up": "userpilot_integration_up",
    "dlq_guard_tripped": "userpilot_dlq_guard_tripped",
    "dlq_unwritable": "userpilot_dlq_unwritable",
    "worker_ready": "userpilot_worker_ready",
    "source_topic_missing": "userpilot_source_topic_missing",
    "build_info": "userpilot_build_info",
}

# Redis (issue 12). Label names show up only once a series exists: redis_errors and
# redis_latency_seconds are pre-declared per operation (the dashboard's Redis row reads them
# from the start), the others per budget or endpoint when the worker declares them.
CONTRACT.update({
    "userpilot_redis_latency_seconds": ("histogram", ("operation",)),
    "userpilot_redis_errors": ("counter", ("operation",)),
    "userpilot_rate_limiter_fallback": ("gauge", ()),
    "userpilot_rate_limiter_fallbacks": ("counter", ()),
    "userpilot_duplicates_skipped": ("counter", ()),
    "userpilot_dedup_unchecked": ("counter", ()),
})
ATTRIBUTES.update({
    "redis_latency": "userpilot_redis_latency_seconds",
    "redis_errors": "userpilot_redis_errors",
    "rate_limiter_fallback": "userpilot_rate_limiter_fallback",
    "rate_limiter_fallbacks": "userpilot_rate_limiter_fallbacks",
    "duplicates_skipped": "userpilot_duplicates_skipped",
    "already_finished": "userpilot_events_already_finished",
    "dedup_unchecked": "userpilot_dedup_unchecked",
})


def test_redis_series_exist_at_zero_and_observe_hook(reg: CollectorRegistry, m: Metrics) -> None:
    m.declare_redis_endpoints(["track", "identify"])
    for endpoint in ("track", "identify"):
        assert value(reg, "userpilot_rate_limiter_fallback", endpoint=endpoint) == 0
        assert value(reg, "userpilot_rate_limiter_fallbacks_total", endpoint=endpoint) == 0
        assert value(reg, "userpilot_duplicates_skipped_total", endpoint=endpoint) == 0
        assert value(reg, "userpilot_dedup_unchecked_total", endpoint=endpoint) == 0
    for operation in ("gcra", "claim", "confirm", "release"):
        assert value(reg, "userpilot_redis_errors_total", operation=operation) == 0
    m.observe_redis("gcra", 0.002, None)
    m.observe_redis("gcra", 0.25, "TimeoutError")
    assert value(reg, "userpilot_redis_latency_seconds_count", operation="gcra") == 2
    assert value(reg, "userpilot_redis_errors_total", operation="gcra") == 1


@pytest.fixture
def reg() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def m(reg: CollectorRegistry) -> Metrics:
    return Metrics(reg)


def value(reg: CollectorRegistry, name: str, **labels: str) -> float | None:
    return reg.get_sample_value(name, labels)


def test_registers_exactly_the_contract(reg: CollectorRegistry, m: Metrics) -> None:
    m.consumer_lag.labels("t", "0").set(1)
    m.committed_offset.labels("t", "0").set(1)
    m.unstable_records.labels("t", "0").set(1)
    m.stable_offset_stalled.labels("t", "0").set(1)
    m.events_consumed.labels("t").inc()
    m.delivered.labels("x").inc()
    m.rate_limit_rps.labels("track").set(1)  # per budget, once the worker knows them
    found: dict[str, tuple[str, tuple[str, ...]]] = {}
    for family in reg.collect():
        if not family.name.startswith("userpilot_"):
            continue
        label_names: set[str] = set()
        for sample in family.samples:
            label_names |= set(sample.labels) - {"le"}
        found[family.name] = (family.type, tuple(sorted(label_names)))
    expected = {k: (t, tuple(sorted(ls))) for k, (t, ls) in CONTRACT.items()}
    assert found == expected


def test_process_and_python_collectors_on_the_workers_registry(reg: CollectorRegistry) -> None:
    Metrics(reg)
    found = {f.name: f.type for f in reg.collect() if not f.name.startswith("userpilot_")}
    assert found == RUNTIME_FAMILIES
    rss = value(reg, "process_resident_memory_bytes")
    assert rss is not None and rss > 1_000_000
    assert value(reg, "process_open_fds") is not None
    info = [s for f in reg.collect() if f.name == "python_info" for s in f.samples]
    assert len(info) == 1 and info[0].labels["major"] == str(sys.version_info.major)


def test_build_info_names_version_and_revision(reg: CollectorRegistry) -> None:
    Metrics(reg, version="1.2.3", revision="abc123")
    assert value(reg, "userpilot_build_info", version="1.2.3", revision="abc123") == 1
    samples = [s for f in reg.collect() if f.name == "userpilot_build_info" for s in f.samples]
    assert len(samples) == 1


def test_build_info_defaults_to_package_metadata_and_revision(reg: CollectorRegistry) -> None:
    Metrics(reg)
    version = metadata.version(DISTRIBUTION)
    assert value(reg, "userpilot_build_info", version=version, revision=build_revision()) == 1


def test_build_revision_prefers_the_image_build_argument() -> None:
    assert build_revision({REVISION_ENV: " 0123456789ab\n"}) == "0123456789ab"


def test_build_revision_falls_back_to_git_then_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    head = subprocess.run(
        ["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True
    )
    expected = head.stdout.strip() if head.returncode == 0 else "unknown"
    assert build_revision({}) == expected
    assert build_revision({REVISION_ENV: "  "}) == expected
    monkeypatch.setenv("PATH", "/nonexistent")  # no git to ask
    assert build_revision({}) == "unknown"


def test_build_revision_ignores_a_repository_around_an_installed_package(tmp_path: Path) -> None:
    site = tmp_path / "venv" / "lib" / "site-packages"
    site.mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(
        ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t",
         "commit", "-q", "--allow-empty", "-m", "x"],
        check=True,
    )  # fmt: skip
    assert build_revision({}, source=site) == "unknown"
    (site / "pyproject.toml").write_text("")  # a checkout of the project: git is asked
    assert build_revision({}, source=site) not in {"", "unknown"}


def test_attribute_names_map_to_contract_names(m: Metrics) -> None:
    for attr, name in ATTRIBUTES.items():
        metric = getattr(m, attr)
        # prometheus_client strips `_total` from counter names; the family name is the rest.
        assert metric._name == name, attr


def test_known_label_sets_exist_at_zero(reg: CollectorRegistry, m: Metrics) -> None:
    for reason in ("anonymous", "unmapped", "unsupported_type", "tombstone"):
        assert value(reg, "userpilot_events_dropped_total", reason=reason, category="") == 0
    for cause in RETRY_CAUSES:
        assert value(reg, "userpilot_retries_total", cause=cause) == 0
    for dl_reason in DEAD_LETTER_REASONS:
        assert value(reg, "userpilot_events_dead_lettered_total", reason=dl_reason) == 0
    for kind in REBALANCE_KINDS:
        assert value(reg, "userpilot_rebalances_total", kind=kind) == 0
    for status in ("202", "429", "timeout", "connection_error"):
        for endpoint in ("track", "identify", "company_identify"):
            assert value(reg, "userpilot_responses_total", status=status,
                         endpoint=endpoint) == 0
    for endpoint in ("track", "identify", "company_identify"):
        assert value(reg, "userpilot_delivery_latency_seconds_count", endpoint=endpoint) == 0
    for family in ("track", "identify"):
        assert value(reg, "userpilot_rate_limiter_wait_seconds_count", endpoint=family) == 0
    assert value(reg, "userpilot_ensure_user_identify_total") == 0
    assert value(reg, "userpilot_integration_up") == 1
    assert value(reg, "userpilot_dlq_guard_tripped") == 0
    assert value(reg, "userpilot_worker_ready") == 0
    # Consent drops without a declared category would be a meaningless series.
    assert value(reg, "userpilot_events_dropped_total", reason="consent", category="") is None


def test_declare_creates_zero_series(reg: CollectorRegistry, m: Metrics) -> None:
    m.declare_event_names(["Report Viewed", "Signed Up"])
    m.declare_consent_categories(["analytics", "marketing"])
    m.declare_topics(["signal.events"])
    assert value(reg, "userpilot_events_delivered_total", event_name="Report Viewed") == 0
    assert value(reg, "userpilot_events_delivered_total", event_name="Signed Up") == 0
    for cat in ("analytics", "marketing"):
        assert value(reg, "userpilot_events_dropped_total", reason="consent", category=cat) == 0
    assert value(reg, "userpilot_events_consumed_total", topic="signal.events") == 0
    assert value(reg, "userpilot_log_resets_total", topic="signal.events") == 0
    assert value(reg, "userpilot_skipped_offsets_total", topic="signal.events") == 0
    assert value(reg, "userpilot_commit_failures_total", topic="signal.events") == 0
    assert value(reg, "userpilot_source_topic_missing", topic="signal.events") == 0


def test_declare_does_not_reset_counts(reg: CollectorRegistry, m: Metrics) -> None:
    m.delivered.labels("Signed Up").inc(3)
    m.declare_event_names(["Signed Up"])
    assert value(reg, "userpilot_events_delivered_total", event_name="Signed Up") == 3


def test_counters_count(reg: CollectorRegistry, m: Metrics) -> None:
    m.events_consumed.labels("t").inc()
    m.events_consumed.labels("t").inc()
    m.events_dropped.labels("consent", "analytics").inc()
    m.responses.labels("418", "identify").inc()
    m.ensure_user_identify.inc()
    assert value(reg, "userpilot_events_consumed_total", topic="t") == 2
    assert value(reg, "userpilot_events_dropped_total", reason="consent", category="analytics") == 1
    assert value(reg, "userpilot_responses_total", status="418", endpoint="identify") == 1
    assert value(reg, "userpilot_responses_total", status="418", endpoint="track") is None
    assert value(reg, "userpilot_ensure_user_identify_total") == 1


def test_forget_partition_removes_only_that_partition(reg: CollectorRegistry, m: Metrics) -> None:
    m.consumer_lag.labels("t", "0").set(10)
    m.consumer_lag.labels("t", "1").set(20)
    m.committed_offset.labels("t", "0").set(100)
    m.committed_offset.labels("t", "1").set(200)
    m.unstable_records.labels("t", "0").set(3)
    m.stable_offset_stalled.labels("t", "0").set(4)
    m.forget_partition("t", 0)
    for name in ("userpilot_consumer_lag", "userpilot_committed_offset",
                 "userpilot_unstable_records", "userpilot_stable_offset_stalled_seconds"):
        assert value(reg, name, topic="t", partition="0") is None, name
    assert value(reg, "userpilot_consumer_lag", topic="t", partition="1") == 20
    assert value(reg, "userpilot_committed_offset", topic="t", partition="1") == 200
    # Forgetting an unknown or already forgotten partition is harmless.
    m.forget_partition("t", 0)
    m.forget_partition("other", "7")


def test_histogram_buckets_cover_their_ranges(reg: CollectorRegistry, m: Metrics) -> None:
    assert LATENCY_BUCKETS[0] <= 0.005 and LATENCY_BUCKETS[-1] >= 30
    assert EVENT_AGE_BUCKETS[0] <= 1 and EVENT_AGE_BUCKETS[-1] >= 86400
    assert LIMITER_WAIT_BUCKETS[0] <= 0.001 and LIMITER_WAIT_BUCKETS[-1] >= 60
    for buckets in (LATENCY_BUCKETS, EVENT_AGE_BUCKETS, LIMITER_WAIT_BUCKETS):
        assert list(buckets) == sorted(set(buckets))
    m.delivery_latency.labels("track").observe(0.04)
    name = "userpilot_delivery_latency_seconds_bucket"
    assert value(reg, name, le="0.025", endpoint="track") == 0
    assert value(reg, name, le="0.05", endpoint="track") == 1
    assert value(reg, name, le="+Inf", endpoint="track") == 1


def test_two_instances_on_separate_registries(reg: CollectorRegistry) -> None:
    Metrics(reg)
    other = CollectorRegistry()
    Metrics(other)
    with pytest.raises(ValueError):
        Metrics(reg)  # duplicate names on one registry are a bug, not silently shared


def test_dashboard_and_alerts_use_exported_names() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "ops" / "check_metric_names.py")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "checked" in proc.stdout


def test_name_check_lists_unknown_names(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "expr: rate(userpilot_events_delivered_total[5m]) + userpilot_bogus_total\n"
        "  + histogram_quantile(0.9, rate(userpilot_delivery_latency_seconds_bucket[5m]))\n"
        "  + userpilot_in_flight_events_count\n"
    )
    proc = subprocess.run(
        [sys.executable, str(ROOT / "ops" / "check_metric_names.py"), str(rules)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    assert "unknown metric userpilot_bogus_total" in proc.stderr
    # _count only exists for histograms; in_flight_events is a gauge.
    assert "unknown metric userpilot_in_flight_events_count" in proc.stderr
    # Histogram series suffixes are stripped; exported names pass.
    assert "userpilot_delivery_latency_seconds" not in proc.stderr
    assert "userpilot_events_delivered_total" not in proc.stderr


def _load_ops(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, ROOT / "ops" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dashboard_structure_is_valid() -> None:
    check = _load_ops("check_dashboard")
    dash = json.loads((ROOT / "helm/userpilot-worker/files/dashboard.json").read_text())
    assert check.problems(dash) == []
    panel_types = {p["type"] for p in dash["panels"]}
    assert {"timeseries", "stat"} <= panel_types
    rules = check.as_rules(dash)["groups"][0]["rules"]
    # Every Grafana variable replaced (`$1` is label_replace's capture group, not one).
    assert rules and not any(re.search(r"\$[A-Za-z_{]", r["expr"]) for r in rules)


def test_dashboard_check_catches_mistakes() -> None:
    check = _load_ops("check_dashboard")
    dash = json.loads((ROOT / "helm/userpilot-worker/files/dashboard.json").read_text())
    broken = copy.deepcopy(dash)
    broken["uid"] = "random"
    broken["templating"]["list"] = [
        v for v in broken["templating"]["list"] if v["name"] not in ("topic", "DS_PROMETHEUS")
    ]
    lag = next(p for p in broken["panels"] if p["title"] == "Lag per partition")
    lag["targets"][0]["expr"] = 'sum(userpilot_consumer_lag{namespace=~"$namespace"})'
    latency = next(p for p in broken["panels"] if p["title"] == "Delivery latency")
    latency["targets"][0]["datasource"] = {"type": "prometheus", "uid": "prod-prometheus"}
    latency["type"] = "graph"
    found = "\n".join(check.problems(broken))
    assert "uid is 'random'" in found
    assert "template variable 'topic' missing" in found
    assert "template variable 'DS_PROMETHEUS' (type datasource, prometheus) missing" in found
    lacks = 'userpilot_consumer_lag lacks pod=~"$pod", topic=~"$topic"'
    assert f"'Lag per partition': {lacks}" in found
    assert "'Delivery latency': query A not on ${DS_PROMETHEUS}" in found
    assert "type 'graph'" in found
    assert "'Lag per partition': lag must prefer kafka_consumergroup_lag" in found
    assert "'Lag per partition': lag without the broker's kafka_consumergroup_lag" in found


def test_dashboard_check_catches_unlimited_process_series_and_dead_runbook_links() -> None:
    check = _load_ops("check_dashboard")
    dash = json.loads((ROOT / "helm/userpilot-worker/files/dashboard.json").read_text())
    broken = copy.deepcopy(dash)
    rss = next(p for p in broken["panels"] if p["title"] == "Memory (RSS)")
    rss["targets"][0]["expr"] = 'process_open_fds{namespace=~"$namespace", pod=~"$pod"}'
    total = next(p for p in broken["panels"] if p["title"] == "Total lag")
    total["targets"][0]["expr"] = total["targets"][0]["expr"].replace(
        'consumergroup="$consumergroup", ', ""
    )
    total["links"][0]["url"] = check.RUNBOOK_BASE + "#alert-userpilotnosuchalert"
    found = "\n".join(check.problems(broken))
    assert "'Memory (RSS)': process_/python_ series not limited" in found
    assert "'Total lag': kafka_consumergroup_lag lacks consumergroup=\"$consumergroup\"" in found
    assert "has no heading #alert-userpilotnosuchalert in README.md" in found


ALERTS = yaml.safe_load((ROOT / "helm/userpilot-worker/files/alerts.yaml").read_text())
RULES = [r for g in ALERTS["groups"] for r in g["rules"] if "alert" in r]


def test_every_alert_has_an_absolute_runbook_url_whose_anchor_is_in_the_readme() -> None:
    check = _load_ops("check_dashboard")
    anchors = check.readme_anchors((ROOT / "README.md").read_text(encoding="utf-8"))
    assert "alert-userpilotconsumerlaggrowing" in anchors  # the slug rule matches GitHub's
    assert len(RULES) >= 9
    for rule in RULES:
        notes = rule["annotations"]
        assert "runbook" not in notes, f"{rule['alert']}: use runbook_url"
        url = notes.get("runbook_url", "")
        base, _, anchor = url.partition("#")
        assert base == check.RUNBOOK_BASE, f"{rule['alert']}: {url}"
        assert anchor == f"alert-{rule['alert'].lower()}", f"{rule['alert']}: {url}"
        assert anchor in anchors, f"{rule['alert']}: README.md has no heading #{anchor}"


def test_runbook_base_is_the_chart_default_and_every_runbook_is_linked_from_the_dashboard() -> None:
    check = _load_ops("check_dashboard")
    values = yaml.safe_load((ROOT / "helm/userpilot-worker/values.yaml").read_text())
    assert values["runbookBaseUrl"] == check.RUNBOOK_BASE
    helpers = (ROOT / "helm/userpilot-worker/templates/_helpers.tpl").read_text()
    assert f'replace "{check.RUNBOOK_BASE}" $base $text' in helpers
    dash = json.loads((ROOT / "helm/userpilot-worker/files/dashboard.json").read_text())
    linked = {url for _, url in check._links(dash)}
    for rule in RULES:
        assert rule["annotations"]["runbook_url"] in linked, rule["alert"]


def test_lag_alert_prefers_the_brokers_figure_and_a_down_alert_exists() -> None:
    by_name = {r["alert"]: r for r in RULES}
    lag = by_name["UserpilotConsumerLagGrowing"]["expr"]
    assert 'kafka_consumergroup_lag{consumergroup="userpilot-delivery"}' in lag
    assert lag.index("kafka_consumergroup_lag") < lag.index("or on (topic)") < lag.index(
        "userpilot_consumer_lag"
    )
    down = by_name["UserpilotWorkersDown"]["expr"]
    assert 'absent(up{job="userpilot-worker"})' in down and "== 0" in down


def test_children_resolve_each_label_set_once_and_count_into_the_metric(
        reg: CollectorRegistry, m: Metrics) -> None:
    responses = Children(m.responses)
    first = responses("202", "track")
    assert responses("202", "track") is first  # looked up once, then reused
    first.inc()
    responses("202", "track").inc()
    responses("503", "track").inc()
    assert reg.get_sample_value("userpilot_responses_total",
                                {"status": "202", "endpoint": "track"}) == 2
    assert reg.get_sample_value("userpilot_responses_total",
                                {"status": "503", "endpoint": "track"}) == 1


def test_with_a_shared_budget_the_dedup_series_exist_per_endpoint(
    reg: CollectorRegistry, m: Metrics,
) -> None:
    """Review metrics18: they count per Userpilot path, and were created per rate budget:
    with USERPILOT_RATE_LIMIT_SHARED an "all" series stayed at 0 for ever and the real ones
    appeared at their first count (rate() missed it)."""
    m.declare_redis_endpoints(["all"])
    assert value(reg, "userpilot_rate_limiter_fallback", endpoint="all") == 0
    for endpoint in ("track", "identify", "company_identify"):
        assert value(reg, "userpilot_duplicates_skipped_total", endpoint=endpoint) == 0
        assert value(reg, "userpilot_dedup_unchecked_total", endpoint=endpoint) == 0
    assert value(reg, "userpilot_duplicates_skipped_total", endpoint="all") is None


def test_a_company_identifys_200_has_a_series_from_the_start(reg: CollectorRegistry,
                                                             m: Metrics) -> None:
    """Review metrics18: Userpilot answers a company identify 200, not 202."""
    assert value(reg, "userpilot_responses_total", status="200",
                 endpoint="company_identify") == 0


def test_no_exported_label_overrides_a_scrapers_target_labels() -> None:
    """The chart's ServiceMonitor sets honorLabels (for the `endpoint` label): a worker
    label named like a target's own (pod, namespace, job...) would then replace it."""
    from ops.check_metric_names import TARGET_LABELS, target_label_clashes

    assert "pod" in TARGET_LABELS and "endpoint" not in TARGET_LABELS
    assert target_label_clashes() == set()


@pytest.mark.parametrize("family", ["userpilot_redis_latency_seconds"])
def test_the_readme_names_every_redis_operation_label(family: str) -> None:
    """Review "ops29": the metrics table listed four of the six `operation` values, so a
    dashboard query written from it missed `progress` and `progress_of`."""
    from consumer.metrics import REDIS_OPERATIONS

    row = next(line for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
               if line.startswith(f"| `{family}`"))
    for operation in REDIS_OPERATIONS:
        assert f"`{operation}`" in row, operation


def test_every_redis_call_of_the_worker_has_its_series_from_the_start() -> None:
    """Review "ops36": `left_ms` and `mark` (ensure-user) were missing: their error series
    appeared at the first error, which `rate()` then did not count. `forget` is
    `delete-users`' own (no metrics there)."""
    from consumer.metrics import REDIS_OPERATIONS

    source = (ROOT / "consumer/redisstore.py").read_text(encoding="utf-8")
    called = set(re.findall(r'_call\(\s*"([a-z_]+)"', source))
    assert called - {"forget"} == set(REDIS_OPERATIONS)


def test_the_dashboard_shows_redis_and_deduplication() -> None:
    """Review "ops29": with Redis the replicas share one budget and skip duplicates, and
    none of its series was on the dashboard: a slow or failing Redis showed only as a
    10-minute alert."""
    dash = json.loads((ROOT / "helm/userpilot-worker/files/dashboard.json").read_text())
    queries = " ".join(t["expr"] for p in dash["panels"] for t in p.get("targets", []))
    for family in ("userpilot_redis_latency_seconds_bucket", "userpilot_redis_errors_total",
                   "userpilot_rate_limiter_fallback", "userpilot_duplicates_skipped_total",
                   "userpilot_dedup_unchecked_total"):
        assert family in queries, family


def test_every_retry_cause_has_its_series() -> None:
    """Review "newcomer50": a Retry subclass with a cause of its own and no `RETRY_CAUSES`
    entry got no series from the start (a rate() over it was empty until the first), and no
    test said so."""
    from consumer import errors
    from consumer.metrics import RETRY_CAUSES

    def below(cls: type[errors.Retry]) -> list[type[errors.Retry]]:
        children: list[type[errors.Retry]] = cls.__subclasses__()
        return [cls, *(sub for child in children for sub in below(child))]

    causes = {cls.cause for cls in below(errors.Retry) if cls is not errors.Retry}
    assert causes <= set(RETRY_CAUSES), causes - set(RETRY_CAUSES)
    assert "misconfigured" in RETRY_CAUSES, "a Pause's label (worker._count_retry)"


def _quantile(reg: CollectorRegistry, name: str, q: float, labels: dict[str, str]) -> float:
    """Prometheus' histogram_quantile over one series' cumulative buckets (linear
    interpolation inside the bucket the rank falls in; the highest finite bound above)."""
    buckets: list[tuple[float, float]] = []
    for family in reg.collect():
        for sample in family.samples:
            if sample.name == f"{name}_bucket" and all(
                    sample.labels.get(k) == v for k, v in labels.items()):
                buckets.append((float(sample.labels["le"]), sample.value))
    buckets.sort()
    total = buckets[-1][1]
    rank = q * total
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def test_the_quantiles_the_dashboard_draws_say_what_happened(m: Metrics,
                                                             reg: CollectorRegistry) -> None:
    """Review "dash55": requests that never waited for a connection drew a p95 wait of
    4.75 ms (the first bucket's bound, interpolated), which the panel says means a pool too
    small; events ten days old drew exactly 7 days (the top bucket)."""
    for _ in range(100):
        m.connection_wait.labels("track").observe(0.0)
        m.event_age.observe(10 * 86400.0)
    assert _quantile(reg, "userpilot_connection_wait_seconds", 0.95,
                     {"endpoint": "track"}) <= 0.0001
    assert _quantile(reg, "userpilot_event_age_seconds", 0.5, {}) > 7 * 86400.0
