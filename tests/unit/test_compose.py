"""docker-compose.yml, checked without a Docker engine: the stack's shape, and that the worker
is configured only with variables it reads and with a configuration it accepts."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from consumer.config import ENV_VARS, is_known_env_var, load_settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
# Variables the worker cannot start without (the contract's "required" column).
REQUIRED = {
    "USERPILOT_API_KEY",
    "USERPILOT_ANALYTICS_ENDPOINT",
    "KAFKA_BOOTSTRAP_SERVERS",
    "KAFKA_TOPICS",
    "SCHEMA_REGISTRY_URL",
}
SERVICES = {
    "redis",
    "kafka",
    "topic-init",
    "schema-registry",
    "sandbox",
    "worker",
    "producer",
    "kafka-exporter",
    "prometheus",
    "grafana",
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    return doc


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    svcs = compose["services"]
    assert isinstance(svcs, dict)
    return svcs


def env_of(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a dict, whichever of compose's two forms it uses."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def bind_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(host path, container path) for each bind mount, short or long syntax."""
    mounts = []
    for vol in service.get("volumes") or []:
        if isinstance(vol, str):
            source, target = vol.split(":")[:2]
        else:
            source, target = vol.get("source", ""), vol.get("target", "")
        if source.startswith((".", "/")):
            mounts.append((source, target))
    return mounts


def test_all_services_present(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == SERVICES


def test_worker_runs_two_replicas_without_fixed_names_or_host_ports(
    services: dict[str, dict[str, Any]],
) -> None:
    worker = services["worker"]
    assert worker["deploy"]["replicas"] == 2
    assert "container_name" not in worker
    assert "ports" not in worker  # a fixed host port would collide between replicas
    assert worker["command"] == ["run"]
    assert "build" in worker


def test_images_are_pinned(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        if "build" in svc:  # built from this repo's Dockerfile
            continue
        image = svc["image"]
        repo, _, tag = image.rpartition(":")
        assert repo and re.fullmatch(r"v?\d+(\.\d+){2}", tag), f"{name}: {image} is not pinned"
    assert services["kafka"]["image"] == "apache/kafka:4.1.1"
    assert services["schema-registry"]["image"].startswith("apicurio/apicurio-registry:3.")


def test_dockerfile_base_is_a_pinned_slim_bookworm() -> None:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    assert base and re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", base[1])
    assert re.search(r"^USER 10001(:10001)?$", text, re.M)
    assert re.search(r"^EXPOSE 8082$", text, re.M)
    assert 'ENTRYPOINT ["python", "-m", "consumer"]' in text
    assert 'CMD ["run"]' in text


def test_every_service_that_others_wait_on_can_satisfy_the_condition(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, svc in services.items():
        depends = svc.get("depends_on") or {}
        assert isinstance(depends, dict), f"{name}: use the long depends_on form with conditions"
        for dep, spec in depends.items():
            assert dep in services, f"{name} depends on unknown {dep}"
            condition = spec["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep}'s healthcheck"
            elif condition == "service_completed_successfully":
                assert services[dep].get("restart") == "no", f"{dep} is a one-shot job"
            else:
                assert condition == "service_started"


def test_startup_order(services: dict[str, dict[str, Any]]) -> None:
    worker = services["worker"]["depends_on"]
    assert worker["topic-init"]["condition"] == "service_completed_successfully"
    assert worker["schema-registry"]["condition"] == "service_healthy"
    assert worker["sandbox"]["condition"] == "service_healthy"
    assert services["topic-init"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    producer = services["producer"]["depends_on"]
    assert producer["topic-init"]["condition"] == "service_completed_successfully"
    assert producer["schema-registry"]["condition"] == "service_healthy"


def test_worker_healthcheck_uses_the_metrics_port(services: dict[str, dict[str, Any]]) -> None:
    test = " ".join(services["worker"]["healthcheck"]["test"])
    port = env_of(services["worker"]).get("WORKER_METRICS_PORT", "8082")
    assert f"localhost:{port}/healthz" in test


def test_worker_sets_only_variables_it_reads(services: dict[str, dict[str, Any]]) -> None:
    env = env_of(services["worker"])
    unknown = sorted(name for name in env if not is_known_env_var(name))
    assert unknown == []


def test_worker_sets_every_required_setting(services: dict[str, dict[str, Any]]) -> None:
    assert REQUIRED <= ENV_VARS  # the contract and the worker agree on the names
    env = env_of(services["worker"])
    missing = sorted(name for name in REQUIRED if not env.get(name, "").strip())
    assert missing == []


def test_worker_configuration_is_accepted_by_the_worker(
    services: dict[str, dict[str, Any]],
) -> None:
    """The worker's own validation passes on the compose environment, with container paths
    translated to the repo files mounted there."""
    worker = services["worker"]
    env = env_of(worker)
    for source, target in bind_mounts(worker):
        for name, value in env.items():
            if value == target:
                env[name] = str(ROOT / source)
    settings = load_settings(env)
    assert settings.mappings_file == str(ROOT / "schemas/mappings.example.json")


def test_worker_talks_to_the_sandbox_with_its_token(services: dict[str, dict[str, Any]]) -> None:
    env = env_of(services["worker"])
    sandbox = services["sandbox"]["command"]
    assert sandbox[:1] == ["sandbox"]
    port = sandbox[sandbox.index("--port") + 1]
    assert env["USERPILOT_ANALYTICS_ENDPOINT"] == f"sandbox:{port}"
    assert env["USERPILOT_INSECURE_HTTP"] == "true"
    assert sandbox[sandbox.index("--write-token") + 1] == env["USERPILOT_API_KEY"]


def test_worker_stop_grace_exceeds_its_drain_budget(services: dict[str, dict[str, Any]]) -> None:
    worker = services["worker"]
    drain = int(env_of(worker).get("WORKER_SHUTDOWN_GRACE_SECONDS", "25"))
    grace = re.fullmatch(r"(\d+)s", worker["stop_grace_period"])
    # The chart's rule (review helm24: 35 s against a 25 s drain): the final commit and
    # leaving the group take up to 20 s after the drain.
    assert grace and int(grace[1]) >= drain + 20


def test_worker_is_hardened_like_the_chart(services: dict[str, dict[str, Any]]) -> None:
    worker = services["worker"]
    assert worker["user"] == "10001:10001"
    assert worker["read_only"] is True
    assert "/tmp" in worker["tmpfs"]
    assert worker["cap_drop"] == ["ALL"]


def test_topics_created_match_the_worker_topics(services: dict[str, dict[str, Any]]) -> None:
    script = "\n".join(services["topic-init"]["command"])
    created = set(re.findall(r"--create[^\n]*\n?\s*--topic (\S+)", script))
    env = env_of(services["worker"])
    wanted = set(env["KAFKA_TOPICS"].split(",")) | {env["KAFKA_DLQ_TOPIC"]}
    assert wanted <= created
    producer = services["producer"]["command"]
    assert producer[producer.index("--topic") + 1] in env["KAFKA_TOPICS"].split(",")


def test_producer_loads_the_sample_events(services: dict[str, dict[str, Any]]) -> None:
    producer = services["producer"]
    command = producer["command"]
    assert command[0] == "produce"
    sample = command[command.index("--file") + 1]
    assert (ROOT / sample).is_file()  # baked into the image under WORKDIR /app
    env = env_of(producer)
    assert env["KAFKA_BOOTSTRAP_SERVERS"] and env["SCHEMA_REGISTRY_URL"]
    assert env["SCHEMA_REGISTRY_URL"] == env_of(services["worker"])["SCHEMA_REGISTRY_URL"]
    assert env["SCHEMA_REGISTRY_URL"].endswith("/apis/ccompat/v7")


def test_files_referenced_by_volumes_exist(services: dict[str, dict[str, Any]]) -> None:
    mounts = [(name, src) for name, svc in services.items() for src, _ in bind_mounts(svc)]
    assert mounts, "expected bind mounts for the mappings, Prometheus and Grafana"
    missing = [f"{name}: {src}" for name, src in mounts if not (ROOT / src).exists()]
    assert missing == []


def test_prometheus_scrapes_the_workers_and_loads_the_chart_alerts(
    services: dict[str, dict[str, Any]],
) -> None:
    mounts = dict(bind_mounts(services["prometheus"]))
    assert mounts["./ops/compose/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    config = yaml.safe_load((ROOT / "ops/compose/prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    sd = jobs["userpilot-worker"]["dns_sd_configs"][0]
    assert sd["names"] == ["worker"] and sd["port"] == 8082
    assert jobs["userpilot-worker"]["job_name"] == "userpilot-worker"  # the alerts' up{job=...}
    rules_target = mounts["./helm/userpilot-worker/files/alerts.yaml"]
    rule_globs = config["rule_files"]
    assert any(Path(rules_target).match(pattern) for pattern in rule_globs)


def test_kafka_exporter_reports_the_workers_group_to_prometheus(
    services: dict[str, dict[str, Any]],
) -> None:
    """The lag alert reads kafka_consumergroup_lag{consumergroup="<the workers' group>"}: the
    exporter must reach the broker and Prometheus must scrape it."""
    exporter = services["kafka-exporter"]
    assert exporter["image"].startswith("danielqsj/kafka-exporter:")
    bootstrap = services["worker"]["environment"]["KAFKA_BOOTSTRAP_SERVERS"]
    assert f"--kafka.server={bootstrap}" in exporter["command"]
    assert exporter["depends_on"]["kafka"]["condition"] == "service_healthy"
    config = yaml.safe_load((ROOT / "ops/compose/prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = [t for sc in jobs["kafka-exporter"]["static_configs"] for t in sc["targets"]]
    assert targets == ["kafka-exporter:9308"] and "9308" in exporter["expose"]
    group = services["worker"]["environment"]["KAFKA_GROUP_ID"]
    alerts = (ROOT / "helm/userpilot-worker/files/alerts.yaml").read_text()
    assert f'kafka_consumergroup_lag{{consumergroup="{group}"}}' in alerts


def test_image_build_records_the_revision(services: dict[str, dict[str, Any]]) -> None:
    args = services["worker"]["build"]["args"]
    assert args["REVISION"] == "${GIT_REVISION:-unknown}"
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"^ARG REVISION=unknown$", dockerfile, re.M)
    assert "USERPILOT_WORKER_REVISION=${REVISION}" in dockerfile


def test_image_installs_from_the_constraints_file() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"^COPY pyproject.toml constraints.txt ", dockerfile, re.M)
    assert "pip install --constraint constraints.txt /dist/*.whl" in dockerfile
    assert "!constraints.txt" in (ROOT / ".dockerignore").read_text().splitlines()


def test_grafana_provisions_the_chart_dashboard(services: dict[str, dict[str, Any]]) -> None:
    mounts = dict(bind_mounts(services["grafana"]))
    provisioning = ROOT / "ops/compose/grafana/provisioning"
    assert mounts["./ops/compose/grafana/provisioning"] == "/etc/grafana/provisioning"
    dashboards = yaml.safe_load((provisioning / "dashboards/userpilot-worker.yml").read_text())
    path = dashboards["providers"][0]["options"]["path"]
    assert mounts["./helm/userpilot-worker/files/dashboard.json"].startswith(path + "/")
    datasources = yaml.safe_load((provisioning / "datasources/prometheus.yml").read_text())
    (prometheus,) = datasources["datasources"]
    assert prometheus["url"] == "http://prometheus:9090"


def test_dashboard_variables_resolve_without_an_import_step() -> None:
    """File provisioning and the Grafana sidecar do not fill `__inputs`, so every ${VAR} the
    dashboard uses must be one of its own template variables (or a Grafana built-in)."""
    dashboard = json.loads((ROOT / "helm/userpilot-worker/files/dashboard.json").read_text())
    defined = {v["name"] for v in (dashboard.get("templating") or {}).get("list", [])}
    text = json.dumps(dashboard)
    used = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::[a-z]+)?\}", text))
    builtins = {"__interval", "__rate_interval", "__range", "__dashboard", "__from", "__to"}
    assert sorted(used - defined - builtins) == []


def test_workers_share_redis(services: dict[str, dict[str, Any]]) -> None:
    redis = services["redis"]
    assert redis["image"].startswith("redis:7.")
    assert "redis-cli" in redis["healthcheck"]["test"]
    worker = services["worker"]
    assert env_of(worker)["REDIS_URL"] == "redis://redis:6379/0"
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"


def test_host_ports_are_published_on_the_loopback_only(compose: dict[str, Any]) -> None:
    """Review "sandbox48": the sandbox's unauthenticated control API (tokens, faults),
    Grafana and the broker were published on every interface of the host."""
    services = compose["services"]
    published = [(name, port) for name, service in services.items()
                 for port in service.get("ports", [])]
    assert published
    assert all(str(port).startswith("127.0.0.1:") for _, port in published), published
