"""The Helm chart's values, checked without helm: the schema accepts the shipped values and
refuses mistakes, every value is documented, the chart can set every worker setting, and its
defaults are the worker's own. (Rendering is checked by ops/check_helm.sh.)"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from consumer.config import is_known_env_var, load_settings
from consumer.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm/userpilot-worker"
VALUES_TEXT = (CHART / "values.yaml").read_text(encoding="utf-8")
VALUES: dict[str, Any] = yaml.safe_load(VALUES_TEXT)
FULL: dict[str, Any] = yaml.safe_load((ROOT / "ops/helm-values-full.yaml").read_text())
SCHEMA: dict[str, Any] = json.loads((CHART / "values.schema.json").read_text())
TEMPLATES = "\n".join(p.read_text() for p in sorted((CHART / "templates").glob("*.yaml")))
# Every variable of the settings contract.
CONTRACT = {
    "USERPILOT_API_KEY", "USERPILOT_ANALYTICS_ENDPOINT", "USERPILOT_INSECURE_HTTP",
    "USERPILOT_CONSENT_CATEGORIES", "USERPILOT_CONSENT_MISSING", "USERPILOT_MAPPINGS_FILE",
    "USERPILOT_RATE_LIMIT", "USERPILOT_RATE_PERIOD_SECONDS", "USERPILOT_REQUEST_TIMEOUT_SECONDS",
    "USERPILOT_RETRY_MAX_ATTEMPTS", "USERPILOT_RETRY_BUDGET_SECONDS", "KAFKA_BOOTSTRAP_SERVERS",
    "KAFKA_TOPICS", "KAFKA_GROUP_ID", "KAFKA_DLQ_TOPIC", "SCHEMA_REGISTRY_URL",
    "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO", "WORKER_MAX_IN_FLIGHT",
    "WORKER_SHUTDOWN_GRACE_SECONDS", "WORKER_METRICS_PORT", "WORKER_LOG_FORMAT",
    "WORKER_LOG_LEVEL", "WORKER_DLQ_MAX_RATIO", "WORKER_DLQ_WINDOW",
    "WORKER_DLQ_MAX_CONSECUTIVE", "WORKER_DLQ_GUARD_HOLD_SECONDS", "WORKER_REPLAY_MAX",
}  # fmt: skip
CONTRACT |= {"REDIS_URL", "REDIS_TLS_CA_FILE", "REDIS_TIMEOUT_SECONDS",
             "REDIS_DEDUP_TTL_SECONDS", "USERPILOT_RATE_LIMIT_SHARED"}  # issue 12
# Groups whose every leaf value must carry its own comment.
DOCUMENTED_GROUPS = {
    "image", "serviceAccount", "userpilot", "kafka", "schemaRegistry", "worker", "service",
    "serviceMonitor", "prometheusRule", "dashboard", "podDisruptionBudget", "autoscaling",
    "kafkaExporter",
    "redis",
}  # fmt: skip


def merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Helm's coalescing of a values file over the chart defaults (maps merge, rest replaces)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def validate(values: dict[str, Any]) -> None:
    jsonschema.Draft7Validator(SCHEMA).validate(values)


def test_schema_is_a_valid_draft7_schema() -> None:
    jsonschema.Draft7Validator.check_schema(SCHEMA)


@pytest.mark.parametrize("values", [VALUES, merged(VALUES, FULL)], ids=["default", "full"])
def test_schema_accepts_the_shipped_values(values: dict[str, Any]) -> None:
    validate(values)


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"userpilot": {"consentMissing": "maybe"}}, "consentMissing"),
        ({"userpilot": {"analyticsEndpoint": "https://analytex.userpilot.io/v1"}}, "analytics"),
        ({"replicaCount": "two"}, "replicaCount"),
        ({"replicas": 2}, "replicas"),
        ({"kafka": {"topics": []}}, "topics"),
        ({"worker": {"logFormat": "xml"}}, "logFormat"),
        ({"worker": {"dlqGuard": {"maxRatio": 1.5}}}, "maxRatio"),
        ({"autoscaling": {"keda": {"offsetResetPolicy": "none"}}}, "offsetResetPolicy"),
        ({"runbookBaseUrl": "README.md"}, "runbookBaseUrl"),
        ({"runbookBaseUrl": "https://example.com/README.md#alerts"}, "runbookBaseUrl"),
        ({"kafkaExporter": {"serviceMonitor": {"selector": {"app": 1}}}}, "selector"),
        ({"kafkaExporter": {"serviceMonitor": {"interval": "often"}}}, "interval"),
        ({"kafka": {"extraEnv": [{"name": "SASL_PASSWORD", "value": "x"}]}}, "SASL_PASSWORD"),
        ({"image": {"digest": "sha256:short"}}, "digest"),
    ],
)
def test_schema_refuses_mistakes(override: dict[str, Any], field: str) -> None:
    with pytest.raises(jsonschema.ValidationError) as excinfo:
        validate(merged(VALUES, override))
    error = excinfo.value
    assert field in f"{list(error.path)} {error.message}"


def _key_lines() -> list[tuple[tuple[str, ...], bool]]:
    """(path, has a comment directly above) for every mapping key in values.yaml."""
    out: list[tuple[tuple[str, ...], bool]] = []
    stack: list[tuple[int, str]] = []
    previous = ""
    for line in VALUES_TEXT.splitlines():
        match = re.match(r"^( *)([A-Za-z][\w.-]*):(?: |$)", line)
        if match:
            indent = len(match[1])
            while stack and stack[-1][0] >= indent:
                stack.pop()
            stack.append((indent, match[2]))
            out.append((tuple(k for _, k in stack), previous.lstrip().startswith("#")))
        if line.strip():
            previous = line
    return out


def test_every_value_is_documented() -> None:
    """Top-level values and every leaf of a settings group carry a comment, their own or
    that of an enclosing map below the group (e.g. the example entries of a labels map)."""
    lines = _key_lines()
    commented = dict(lines)
    undocumented = []
    for path, _ in lines:
        node: Any = VALUES
        for key in path:
            node = node[key]
        if isinstance(node, dict):
            continue
        if len(path) == 1 or path[0] in DOCUMENTED_GROUPS:
            covers = [path[:i] for i in range(2 if len(path) > 1 else 1, len(path) + 1)]
            if not any(commented[p] for p in covers):
                undocumented.append(".".join(path))
    assert undocumented == []


def test_every_schema_property_is_in_values_yaml() -> None:
    """A value the schema allows but values.yaml omits is a value nobody documented."""
    missing = []

    def walk(schema: dict[str, Any], values: Any, path: str) -> None:
        for key, sub in (schema.get("properties") or {}).items():
            if key == "global":
                continue
            if not isinstance(values, dict) or key not in values:
                missing.append(f"{path}{key}")
            elif "properties" in sub:
                walk(sub, values[key], f"{path}{key}.")

    walk(SCHEMA, VALUES, "")
    # resources' optional extras are Kubernetes fields, documented by Kubernetes.
    allowed = {"resources.claims", "resources.requests.ephemeral-storage",
               "resources.limits.ephemeral-storage", "livenessProbe.successThreshold",
               "readinessProbe.successThreshold"}  # fmt: skip
    assert sorted(set(missing) - allowed) == []


def test_chart_can_set_every_contract_variable() -> None:
    missing = sorted(name for name in CONTRACT if name not in TEMPLATES)
    assert missing == []


def test_chart_sets_only_variables_the_worker_reads() -> None:
    names = set(
        re.findall(r"\b((?:USERPILOT|KAFKA|SCHEMA_REGISTRY|WORKER)_[A-Z0-9_]+)\b", TEMPLATES)
    )
    assert names, "expected variable names in the templates"
    assert sorted(n for n in names if not is_known_env_var(n)) == []


def test_contract_defaults() -> None:
    assert VALUES["replicaCount"] == 2
    assert VALUES["resources"] == {
        "requests": {"cpu": "250m", "memory": "256Mi"},
        "limits": {"cpu": "500m", "memory": "512Mi"},
    }
    assert VALUES["worker"]["metricsPort"] == 8082 == VALUES["service"]["port"]
    assert VALUES["terminationGracePeriodSeconds"] == 45
    assert VALUES["terminationGracePeriodSeconds"] > VALUES["worker"]["shutdownGraceSeconds"]
    assert VALUES["dashboard"]["labels"] == {"grafana_dashboard": "1"}
    assert not (
        VALUES["autoscaling"]["keda"]["enabled"] and VALUES["autoscaling"]["hpa"]["enabled"]
    )
    for auto in (VALUES["autoscaling"]["keda"], FULL["autoscaling"]["keda"]):
        assert auto["maxReplicaCount"] <= VALUES["autoscaling"]["partitions"]
    security = VALUES["securityContext"]
    assert security["runAsNonRoot"] and security["runAsUser"] == 10001
    assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}


def test_the_analytics_endpoint_has_no_default() -> None:
    """An EU (or dedicated-host) install that forgot the endpoint sent its users' events to
    the US host: the chart refuses to render without one (`ops/check_helm.sh`,
    "no-endpoint"), as the worker refuses to start without USERPILOT_ANALYTICS_ENDPOINT.
    The schema lets the empty default through, so helm's message is the chart's own."""
    assert VALUES["userpilot"]["analyticsEndpoint"] == ""
    validate(VALUES)
    with pytest.raises(ConfigError, match="USERPILOT_ANALYTICS_ENDPOINT"):
        load_settings({"USERPILOT_API_KEY": "token", "KAFKA_BOOTSTRAP_SERVERS": "k:9092",
                       "KAFKA_TOPICS": "t", "SCHEMA_REGISTRY_URL": "http://sr:8081",
                       "USERPILOT_ANALYTICS_ENDPOINT": ""})


def test_defaults_are_the_workers_own() -> None:
    """The chart's defaults must not silently change the worker's behaviour."""
    settings = load_settings(
        {
            "USERPILOT_API_KEY": "token",
            "USERPILOT_ANALYTICS_ENDPOINT": "analytex.userpilot.io",  # no default: below
            "KAFKA_BOOTSTRAP_SERVERS": VALUES["kafka"]["bootstrapServers"],
            "KAFKA_TOPICS": ",".join(VALUES["kafka"]["topics"]),
            "SCHEMA_REGISTRY_URL": VALUES["schemaRegistry"]["url"],
        }
    )
    up, worker = VALUES["userpilot"], VALUES["worker"]
    assert settings.insecure_http is up["insecureHttp"]
    assert list(settings.consent.categories) == up["consentCategories"]
    assert settings.consent.missing == up["consentMissing"]
    assert settings.rate_limit == up["rateLimit"]
    assert settings.rate_period_s == up["ratePeriodSeconds"]
    assert settings.request_timeout_s == up["requestTimeoutSeconds"]
    assert settings.retry_max_attempts == up["retry"]["maxAttempts"]
    assert settings.retry_budget_s == up["retry"]["budgetSeconds"]
    assert settings.group_id == VALUES["kafka"]["groupId"]
    assert settings.max_in_flight == worker["maxInFlight"]
    assert settings.shutdown_grace_s == worker["shutdownGraceSeconds"]
    assert settings.metrics_port == worker["metricsPort"]
    assert settings.log_level == worker["logLevel"]
    assert settings.dlq_max_ratio == worker["dlqGuard"]["maxRatio"]
    assert settings.dlq_window == worker["dlqGuard"]["window"]
    assert settings.dlq_max_consecutive == worker["dlqGuard"]["maxConsecutive"]
    assert settings.dlq_guard_hold_s == worker["dlqGuard"]["holdSeconds"]
    assert settings.replay_max == worker["replayMax"]


def test_full_values_switch_every_feature_on() -> None:
    assert FULL["autoscaling"]["keda"]["enabled"] and not FULL["autoscaling"]["hpa"]["enabled"]
    for feature in ("serviceMonitor", "prometheusRule", "dashboard", "podDisruptionBudget"):
        assert FULL[feature]["enabled"], feature
    assert FULL["kafkaExporter"]["serviceMonitor"]["enabled"]
    assert FULL["runbookBaseUrl"] != VALUES["runbookBaseUrl"]  # the substitution is exercised
    assert FULL["userpilot"]["existingSecret"] and not FULL["userpilot"].get("apiKey")
    assert FULL["userpilot"]["mappings"]
    assert FULL["kafka"]["existingSecret"] and FULL["kafka"]["extraEnv"]
    assert FULL["schemaRegistry"]["existingSecret"]
    for key in ("nodeSelector", "tolerations", "affinity", "topologySpreadConstraints",
                "extraVolumes", "extraVolumeMounts"):
        assert FULL[key], key


def test_full_values_keep_no_relabeling_for_series_never_emitted() -> None:
    """A metricRelabeling for a name the worker doesn't export is dead configuration."""
    from prometheus_client import CollectorRegistry

    from consumer.metrics import Metrics

    reg = CollectorRegistry()
    Metrics(reg)
    names = {s.name for f in reg.collect() for s in f.samples}
    for relabel in FULL["serviceMonitor"]["metricRelabelings"]:
        if relabel.get("sourceLabels") == ["__name__"]:
            pattern = re.compile(relabel["regex"])
            assert any(pattern.fullmatch(n) for n in names), relabel["regex"]
def test_redis_defaults_are_the_workers_own() -> None:
    """Redis is off by default; its timeouts and TTL match the worker's defaults."""
    redis = VALUES["redis"]
    assert redis["url"] == "" and redis["existingSecret"] == ""
    settings = load_settings({
        "USERPILOT_API_KEY": "token", "USERPILOT_ANALYTICS_ENDPOINT": "a.example.com",
        "KAFKA_BOOTSTRAP_SERVERS": "k:9092", "KAFKA_TOPICS": "t",
        "SCHEMA_REGISTRY_URL": "http://r", "REDIS_URL": "redis://redis:6379/0",
    })
    assert settings.redis is not None
    assert settings.redis.timeout_s == redis["timeoutSeconds"]
    assert settings.redis.dedup_ttl_s == redis["dedupTtlSeconds"]
    assert settings.rate_limit_shared is VALUES["userpilot"]["rateLimitShared"]
    assert FULL["redis"]["existingSecret"] and FULL["redis"]["tlsCaSecret"]


@pytest.mark.parametrize("url", ["redis:6379", "http://redis:6379"])
def test_schema_refuses_a_redis_url_without_its_scheme(url: str) -> None:
    with pytest.raises(jsonschema.ValidationError):
        validate(merged(VALUES, {"redis": {"url": url}}))


def test_ensure_user_defaults_are_the_workers_own() -> None:
    settings = load_settings({
        "USERPILOT_API_KEY": "token", "USERPILOT_ANALYTICS_ENDPOINT": "a.example.com",
        "KAFKA_BOOTSTRAP_SERVERS": "k:9092", "KAFKA_TOPICS": "t",
        "SCHEMA_REGISTRY_URL": "http://r",
    })
    assert settings.ensure_user is VALUES["userpilot"]["ensureUser"]
    assert settings.ensure_user_cache == VALUES["userpilot"]["ensureUserCache"]
    with pytest.raises(jsonschema.ValidationError):
        validate(merged(VALUES, {"userpilot": {"ensureUserCache": 0}}))


BOUNDED = [  # values path, the worker's variable, its largest accepted value
    ("userpilot.rateLimit", "USERPILOT_RATE_LIMIT", 10_000_000),
    ("userpilot.ratePeriodSeconds", "USERPILOT_RATE_PERIOD_SECONDS", 86_400),
    ("userpilot.requestTimeoutSeconds", "USERPILOT_REQUEST_TIMEOUT_SECONDS", 300),
    ("userpilot.retry.maxAttempts", "USERPILOT_RETRY_MAX_ATTEMPTS", 1000),
    ("userpilot.ensureUserCache", "USERPILOT_ENSURE_USER_CACHE", 10_000_000),
    ("worker.maxInFlight", "WORKER_MAX_IN_FLIGHT", 100_000),
    ("worker.shutdownGraceSeconds", "WORKER_SHUTDOWN_GRACE_SECONDS", 3600),
    ("worker.replayMax", "WORKER_REPLAY_MAX", 1000),
    ("worker.dlqGuard.window", "WORKER_DLQ_WINDOW", 1_000_000),
    ("worker.dlqGuard.maxConsecutive", "WORKER_DLQ_MAX_CONSECUTIVE", 1_000_000),
    ("worker.dlqGuard.holdSeconds", "WORKER_DLQ_GUARD_HOLD_SECONDS", 3600),
]


def _with(path: str, value: Any) -> dict[str, Any]:
    override: dict[str, Any] = {}
    node = override
    *parents, leaf = path.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    return merged(VALUES, override)


@pytest.mark.parametrize(("path", "env", "largest"), BOUNDED)
def test_the_schema_refuses_what_the_worker_refuses(path: str, env: str, largest: int) -> None:
    """A values file that lints clean must not crash-loop the pod: the schema's maxima are
    the worker's own (they were missing)."""
    validate(_with(path, largest))
    with pytest.raises(jsonschema.ValidationError):
        validate(_with(path, largest + 1))
    base = {"USERPILOT_API_KEY": "t", "USERPILOT_ANALYTICS_ENDPOINT": "analytex.userpilot.io",
            "KAFKA_BOOTSTRAP_SERVERS": "k:9092", "KAFKA_TOPICS": "t",
            "SCHEMA_REGISTRY_URL": "http://r:8081"}
    load_settings({**base, env: str(largest)})
    with pytest.raises(Exception, match=env):
        load_settings({**base, env: str(largest + 1)})


def test_the_readme_names_every_setting_the_chart_has_no_value_for() -> None:
    """Seven settings could only be set through `extraEnv` and nothing said which (review
    newcomer19): README's Helm section names each one."""
    from consumer.config import ENV_VARS

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("### Deploy with Helm"):readme.index("### Redis:")]
    missing = sorted(v for v in ENV_VARS if v not in TEMPLATES)
    assert missing, "every setting has a chart value: drop the README's list"
    assert [v for v in missing if f"`{v}`" not in section] == []


@pytest.mark.parametrize(("path", "value"), [
    ("kafka.topics", ["."]), ("kafka.topics", [".."]), ("kafka.topics", ["t" * 250]),
    ("kafka.dlqTopic", ".."), ("kafka.dlqTopic", "d" * 250),
    ("userpilot.analyticsEndpoint", "a..b"), ("userpilot.analyticsEndpoint", "host:0"),
    ("userpilot.analyticsEndpoint", "host:99999"), ("userpilot.analyticsEndpoint", ".host"),
])
def test_the_schema_refuses_names_the_worker_refuses(path: str, value: Any) -> None:
    """`helm lint` passed these and every pod exited 2 (review config19)."""
    group, key = path.split(".")
    with pytest.raises(jsonschema.ValidationError):
        validate(merged(VALUES, {group: {key: value}}))


_BASE_ENV = {"USERPILOT_API_KEY": "k" * 20, "USERPILOT_ANALYTICS_ENDPOINT": "a.io",
             "KAFKA_BOOTSTRAP_SERVERS": "k:9092", "KAFKA_TOPICS": "t",
             "SCHEMA_REGISTRY_URL": "http://r"}
_AS_ENV = {"kafka.bootstrapServers": "KAFKA_BOOTSTRAP_SERVERS", "redis.url": "REDIS_URL",
           "schemaRegistry.url": "SCHEMA_REGISTRY_URL", "kafka.groupId": "KAFKA_GROUP_ID",
           "userpilot.analyticsEndpoint": "USERPILOT_ANALYTICS_ENDPOINT"}


@pytest.mark.parametrize(("path", "value"), [
    ("kafka.bootstrapServers", "kafka:99999"), ("kafka.bootstrapServers", "kafka:0"),
    ("kafka.bootstrapServers", "http://kafka:9092"), ("kafka.bootstrapServers", "my kafka:9092"),
    ("redis.url", "redis://r:99999"), ("redis.url", "redis://r:6379/abc"),
    ("schemaRegistry.url", "http://a:8081,http://b:8081"),
    ("userpilot.analyticsEndpoint", "-bad-.example"),
])
def test_the_schema_refuses_what_every_pod_would_refuse(path: str, value: str) -> None:
    """Rendered, each of these crash-looped every pod with exit 2 (review "ops36")."""
    group, key = path.split(".")
    with pytest.raises(jsonschema.ValidationError):
        validate(merged(VALUES, {group: {key: value}}))
    with pytest.raises(ConfigError):
        load_settings({**_BASE_ENV, _AS_ENV[path]: value})


@pytest.mark.parametrize("group", [" ", " my-group", "my-group\t"])
def test_the_schema_refuses_a_group_id_with_spaces_around_it(group: str) -> None:
    """The worker reads a blank value as unset and trims the rest, while the chart gives the
    value as written to KEDA, the lag alert and the dashboard: they watched a group nobody
    consumes as (review "ops36")."""
    with pytest.raises(jsonschema.ValidationError):
        validate(merged(VALUES, {"kafka": {"groupId": group}}))


@pytest.mark.parametrize(("path", "value"), [
    ("kafka.bootstrapServers", "kafka-0:9092,kafka-1.kafka.svc:9092"),
    ("kafka.bootstrapServers", "PLAINTEXT://broker:9093"), ("kafka.bootstrapServers", "kafka"),
    ("kafka.bootstrapServers", "a:9092, b:9092"), ("kafka.bootstrapServers", "a:9092 ,b:9092"),
    # Review diff36b: each worked, and the first schema refused it.
    ("kafka.bootstrapServers", "kafka-0.kafka-headless.kafka.svc.cluster.local.:9092"),
    ("kafka.bootstrapServers", "2001:db8::5"), ("kafka.bootstrapServers", "Plaintext://b:9093"),
    ("kafka.bootstrapServers", "a:09092"), ("kafka.bootstrapServers", "a:9092\n"),
    ("redis.url", "redis://redis:06379"), ("userpilot.analyticsEndpoint", "host:08443"),
    ("userpilot.analyticsEndpoint", "analytex.userpilot.io\n"),
    ("schemaRegistry.url", "http://user:pa ss@reg:8081"),
    ("kafka.bootstrapServers", "[::1]:9092"), ("kafka.bootstrapServers", "10.0.0.5:9092,"),
    ("redis.url", "rediss://:p%40ss@redis:6380/1?ssl_cert_reqs=required"),
    ("redis.url", "redis://user:pw@[::1]:6379"), ("redis.url", "redis://redis"),
    ("schemaRegistry.url", "https://u:p@reg.example.com/apis/ccompat/v7"),
    ("kafka.groupId", "my group"),
])
def test_the_schema_takes_what_the_worker_takes(path: str, value: str) -> None:
    group, key = path.split(".")
    validate(merged(VALUES, {group: {key: value}}))
    load_settings({**_BASE_ENV, _AS_ENV[path]: value})


@pytest.mark.parametrize("endpoint", ["analytex.userpilot.io", "sandbox:8080", "localhost",
                                      "analytex-eu.userpilot.io:65535", "10.0.0.7:443"])
def test_the_schema_takes_the_hosts_the_worker_takes(endpoint: str) -> None:
    validate(merged(VALUES, {"userpilot": {"analyticsEndpoint": endpoint}}))
    assert load_settings({"USERPILOT_API_KEY": "k" * 20, "USERPILOT_ANALYTICS_ENDPOINT": endpoint,
                          "KAFKA_BOOTSTRAP_SERVERS": "k:9092", "KAFKA_TOPICS": "t",
                          "SCHEMA_REGISTRY_URL": "http://r"}).analytics_endpoint == endpoint


@pytest.mark.parametrize(("key", "value", "env"), [
    ("logLevel", "info", "WORKER_LOG_LEVEL"), ("logLevel", "Debug", "WORKER_LOG_LEVEL"),
    ("logLevel", "WARNING", "WORKER_LOG_LEVEL"), ("logFormat", "JSON", "WORKER_LOG_FORMAT"),
])
def test_the_schema_takes_log_settings_in_any_case_the_worker_takes(
        key: str, value: str, env: str) -> None:
    """The worker reads `info` as INFO; the schema took upper case only, so a values file
    with the worker's own documented spelling failed `helm install` (review "ops29")."""
    validate(merged(VALUES, {"worker": {key: value}}))
    load_settings({"USERPILOT_API_KEY": "k" * 20, "USERPILOT_ANALYTICS_ENDPOINT": "a.io",
                   "KAFKA_BOOTSTRAP_SERVERS": "k:9092", "KAFKA_TOPICS": "t",
                   "SCHEMA_REGISTRY_URL": "http://r", env: value})
    with pytest.raises(jsonschema.ValidationError):
        validate(merged(VALUES, {"worker": {key: "verbose"}}))


def test_the_charts_grace_margin_covers_the_stop_after_the_drain() -> None:
    """Review "budgets43": the chart's margin (terminationGracePeriodSeconds over
    worker.shutdownGraceSeconds) must hold the worker's steps after its drain, with time
    left for the process to exit; the two are set in different languages."""
    from consumer.worker import STOP_AFTER_DRAIN_S, STOP_STEP_MIN_S

    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    (margin,) = re.findall(
        r"lt \(int \$v\.terminationGracePeriodSeconds\) \(add \(int "
        r"\$v\.worker\.shutdownGraceSeconds\) (\d+)\)", helpers)
    assert int(margin) >= STOP_AFTER_DRAIN_S + 3 * STOP_STEP_MIN_S + 1.0
    default = VALUES["terminationGracePeriodSeconds"] - VALUES["worker"]["shutdownGraceSeconds"]
    assert default >= int(margin)


@pytest.mark.parametrize(("path", "value"), [
    ("schemaRegistry.url", v) for v in (
        "http://r:0", "http://r:99999", "http://r:65535", "http://r:8081?tenant=a",
        "http://r:8081#x", "http://r#", "http://-bad-:8081", "http://a-.b", "http://a.-b:1",
        "http://user-:pa-ss@r:8081", "http://-u:p@r", "HTTP://r:8081", "Https://r",
        "http://r:8081/apis/ccompat/v7", "http://my-registry:8081/x-y/", "http://u:0@r",
        "http://999.1.1.1:8081", "http://10.0.0.256:8081", "http://127.1:8081",
        "http://2130706433:8081", "http://1.2.3.4", "http://1.2.3.4.:8081",
        "http://01.2.3.4:8081", "http://1.2.3.04/x", "http://1.2.3.4.5",
        "http://" + "a" * 64 + ".svc:8081", "http://" + "a" * 63 + ".svc:8081",
        "http://[::1]:99999", "http://[::1]:0", "http://[::1]:8081", "http://[::1]",
        "http://r:065536", "http://r:0099999/apis/ccompat/v7", "http://[::1]:065536",
        "http://r:08081")
] + [
    ("kafka.bootstrapServers", v) for v in (
        "127.1:9092", "999.1.1.1:9092", "1.2.3.4.5:9092", "1.2.3.4.:9092", "1.2.3.256:9092",
        "1.2.3.04:9092", "1.2.3.0300:9092", "300.kafka:9092", "kafka-300.1:9092",
        "kafka:9092/", "kafka-0:9092;kafka-1:9092", "PLAINTEXT://1.2.3.999:9092",
        "PLAINTEXT://b:9093,1.2.3.4:9092", "2130706433:9092", "a:9092,999.1.1.1", "1.2.3.4:9092",
        "kafka:065536", "kafka:09092")
] + [
    ("userpilot.analyticsEndpoint", v) for v in (
        "a.io:0443", "a.io:00443", "a.io:000443", "a.io:065535", "1.2.3.4", "1.2.3.4:8443",
        "01.2.3.4", "1.2.3.4.", "10.0.0.256", "127.1", "2130706433", "a" * 63 + ".io",
        "a" * 64 + ".io", "analytex-eu.userpilot.io", "3com.example")
] + [
    # Review "helm49": the schema took each of these, and every pod exited 2 (or, for an
    # empty port, waited for ever on port 0).
    ("kafka.bootstrapServers", v) for v in (
        "kafka:", "a:9092,kafka:", "kafka: ,b:1", "[::1]:", "kafka..svc:9092", "-kafka:9092",
        "kafka-:9092", "a" * 64 + ".svc:9092", "a" * 63 + ".svc:9092", "kafka_0:9092",
        "k.-a:9092", "2001:db8::5", "[2001:db8::5]:9093")
] + [
    ("schemaRegistry.url", v) for v in (
        "http://sr:8081/a b", "http://sr..svc:8081", "http://sr:8081/a\tb",
        "http://u:p..q@sr:8081", "http://u:a@b..c@sr:8081")
] + [
    ("redis.url", v) for v in (
        "redis://redis..svc", "redis://-redis", "redis://redis-", "redis://r/100",
        "redis://r/15", "redis://r/99", "redis://r/015", "redis://r/05", "redis://r/",
        "redis://r?client_name=x", "redis://:a-b..c@r",
        "redis://" + "a" * 64 + ".svc", "redis://" + "a" * 63 + ".svc", "redis://r.",
        "redis://r_x", "redis://1.2.3.4:6379/3", "redis://[::1]:6379/2",
        "rediss://r?ssl_cert_reqs=none&ssl_check_hostname=false")
] + [("kafka.bootstrapServers", v) for v in (
    "fe80::", "2001:db8::", "kafka:99999\n", "2001:db8::1:0", "2001:db8:0:0:0:0:0:0",
    "[2001:db8::1]:0", "a:9092,[::1]:")
] + [("redis.url", v) for v in ("REDIS://r:6379/0", "Rediss://r", "redis://r:99999")])
def test_the_schema_and_the_worker_agree_on_addresses(path: str, value: str) -> None:
    """`helm lint` passed registry URLs, brokers and hosts every pod then refused with exit 2
    (a port out of range, a query, `-bad-`, `;`, `999.1.1.1`, `10.0.0.256`, a 64-letter
    label; review "config44"); and refused `HTTP://`, which the worker takes."""
    group, key = path.split(".")
    try:
        load_settings({**_BASE_ENV, _AS_ENV[path]: value})
        worker_takes = True
    except ConfigError:
        worker_takes = False
    try:
        validate(merged(VALUES, {group: {key: value}}))
        schema_takes = True
    except jsonschema.ValidationError:
        schema_takes = False
    assert schema_takes == worker_takes, f"schema {schema_takes}, worker {worker_takes}"


@pytest.mark.parametrize(("path", "value"), [
    ("redis.url", "redis://:Hunter2@Secret@redis:6379/0"),
    ("redis.url", "redis://u:Hunter2@redis..svc:99999/abc"),
    ("schemaRegistry.url", "http://u:Hunter2 q@sr..svc/a b")])
def test_the_schema_never_refuses_a_value_holding_credentials(path: str, value: str) -> None:
    """Review "diff49a": helm quotes a value its schema refuses, password and all, into the
    terminal and CI logs; the worker names the same mistakes without the password (and the
    chart refuses credentials in the registry URL in a message of its own)."""
    group, key = path.split(".")
    validate(merged(VALUES, {group: {key: value}}))


@pytest.mark.parametrize(("path", "value"), [
    ("redis.url", "redis://127.0.0.1:36379/0?password=Hunter2#x"),
    ("redis.url", "redis://:Hunter2/host"),
    ("schemaRegistry.url", "user:Hunter2@sr:8081"),
    ("schemaRegistry.url", "http://user:Hunter2,x@sr:8081")])
def test_the_secret_fields_are_checked_by_nots_only(path: str, value: str) -> None:
    """Review "diff49b": helm quotes the value a `pattern` refuses (a password pasted in the
    query, a missing @, a registry URL without its scheme), and names only the failed
    `not`. The secret fields' checks are `not`s (ops/check_helm.sh renders these values
    and finds no password in helm's refusal); still refused."""
    group, key = path.split(".")
    with pytest.raises(jsonschema.ValidationError):
        validate(merged(VALUES, {group: {key: value}}))
    field = SCHEMA["properties"][group]["properties"][key]
    assert "pattern" not in field and "anyOf" not in field


def test_scaled_to_zero_any_event_wakes_a_replica() -> None:
    """With keda.minReplicaCount 0, KEDA starts a replica only once the lag passes the
    activation threshold: at 10, up to 10 events per topic waited unread with no alert
    until more came, and could outlive the topic's retention (review "helm45")."""
    assert VALUES["autoscaling"]["keda"]["activationLagThreshold"] == 0


def test_every_variable_the_chart_sets_is_refused_in_extra_env() -> None:
    """Review "newcomer50": the helpers' `$owned` list is a hand copy of what the configmap
    and the Deployment's env set; a name missing from it let an `extraEnv` entry win over
    the chart's value unseen (env beats envFrom)."""
    helpers = (CHART / "templates/_helpers.tpl").read_text(encoding="utf-8")
    (owned_text,) = re.findall(r"\$owned := list ((?:\"[A-Z0-9_]+\" ?)+)", helpers)
    owned = set(re.findall(r'"([A-Z0-9_]+)"', owned_text))
    configmap = (CHART / "templates/configmap.yaml").read_text(encoding="utf-8")
    deployment = (CHART / "templates/deployment.yaml").read_text(encoding="utf-8")
    set_by_chart = (set(re.findall(r"^  ([A-Z][A-Z0-9_]+):", configmap, re.M))
                    | set(re.findall(r"^\s+- name: ([A-Z][A-Z0-9_]+)$", deployment, re.M)))
    assert "KAFKA_TOPICS" in set_by_chart and "USERPILOT_API_KEY" in set_by_chart
    assert set_by_chart - owned == set()
