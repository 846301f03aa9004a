"""Unit tests for consumer.config: every variable, defaults, messages, and secret hygiene."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import certifi
import pytest

from consumer.calls import FAMILIES
from consumer.config import (
    API_VERSION,
    ENV_VARS,
    SECRET_KAFKA_KEYS,
    STANDARD_ENV_VARS,
    Secret,
    Settings,
    is_known_env_var,
    load_settings,
)
from consumer.errors import ConfigError
from consumer.filtering import ConsentPolicy
from consumer.mapping import DEFAULT_PRESET

TOKEN = "wt_9f8e7d6c5b4a3210"
SASL_PASSWORD = "kafka-s3cret-pw"
REGISTRY_AUTH = "reg-user:reg-s3cret"

BASE = {
    "USERPILOT_API_KEY": TOKEN,
    "USERPILOT_ANALYTICS_ENDPOINT": "analytex.userpilot.io",
    "KAFKA_BOOTSTRAP_SERVERS": "kafka:9092",
    "KAFKA_TOPICS": "delivery-userpilot",
    "SCHEMA_REGISTRY_URL": "http://schema-registry:8081",
}


def load(**over: str) -> Settings:
    return load_settings({**BASE, **over})


def problems(env: dict[str, str], *, offline: bool = False) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_settings(env, offline=offline)
    text = str(info.value)
    assert text.startswith("invalid configuration:\n")
    return [line.removeprefix("  - ") for line in text.splitlines()[1:]]


def problem(**over: str) -> str:
    found = problems({**BASE, **over})
    assert len(found) == 1, found
    return found[0]


# ------------------------------------------------------------------ defaults and values


def test_defaults() -> None:
    s = load()
    assert s.api_key == Secret(TOKEN)
    assert s.analytics_endpoint == "analytex.userpilot.io"
    assert s.insecure_http is False
    assert s.consent == ConsentPolicy(categories=("analytics",), missing="deny")
    assert s.mappings is DEFAULT_PRESET
    assert s.mappings_file is None
    assert (s.rate_limit, s.rate_period_s, s.rate_burst) == (600, 60.0, 1)
    assert s.request_timeout_s == 10.0
    assert (s.retry_max_attempts, s.retry_budget_s) == (12, 900.0)
    assert s.max_connections == 64
    assert s.pool_connections == len(FAMILIES) * 64  # a family's permits never wait on the pool
    assert s.bootstrap_servers == "kafka:9092"
    assert s.topics == ("delivery-userpilot",)
    assert s.group_id == "userpilot-delivery"
    assert s.dlq_topic == "delivery-userpilot.userpilot.dlq"
    assert s.kafka_extra == {}
    assert s.registry_url == "http://schema-registry:8081"
    assert s.registry_auth is None
    assert s.max_in_flight == 200
    assert s.shutdown_grace_s == 25.0
    assert s.commit_interval_s == 2.0
    assert s.metrics_port == 8082
    assert (s.log_format, s.log_level) == ("text", "INFO")
    assert (s.dlq_max_ratio, s.dlq_window, s.dlq_max_consecutive) == (0.5, 100, 50)
    assert s.replay_max == 3


SET_ALL = {
    "USERPILOT_INSECURE_HTTP": "true",
    "USERPILOT_ANALYTICS_ENDPOINT": "sandbox:8080",  # clear text only to a local host
    "USERPILOT_CONSENT_CATEGORIES": " Analytics, functional ,,",
    "USERPILOT_CONSENT_MISSING": "ALLOW",
    "USERPILOT_RATE_LIMIT": "1200",
    "USERPILOT_RATE_PERIOD_SECONDS": "30.5",
    "USERPILOT_RATE_BURST": "10",
    "USERPILOT_REQUEST_TIMEOUT_SECONDS": "2.5",
    "USERPILOT_RETRY_MAX_ATTEMPTS": "3",
    "USERPILOT_RETRY_BUDGET_SECONDS": "90",
    "USERPILOT_MAX_CONNECTIONS": "16",
    "USERPILOT_CA_BUNDLE": certifi.where(),
    "KAFKA_TOPICS": "a, b.c ,d_e",
    "KAFKA_GROUP_ID": "my-group",
    "KAFKA_DLQ_TOPIC": "a-dlq",
    "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO": REGISTRY_AUTH,
    "WORKER_MAX_IN_FLIGHT": "500",
    "WORKER_SHUTDOWN_GRACE_SECONDS": "10",
    "WORKER_COMMIT_INTERVAL_SECONDS": "0.5",
    "WORKER_METRICS_PORT": "0",
    "WORKER_LOG_FORMAT": "JSON",
    "WORKER_LOG_LEVEL": "debug",
    "WORKER_DLQ_MAX_RATIO": "1",
    "WORKER_DLQ_WINDOW": "20",
    "WORKER_DLQ_MAX_CONSECUTIVE": "7",
    "WORKER_REPLAY_MAX": "0",
    "USERPILOT_ENSURE_USER": "false",
    "USERPILOT_ENSURE_USER_CACHE": "5000",
}


def test_every_variable_is_read() -> None:
    s = load(**SET_ALL)
    assert s.insecure_http is True
    assert s.consent == ConsentPolicy(categories=("analytics", "functional"), missing="allow")
    assert (s.rate_limit, s.rate_period_s, s.rate_burst) == (1200, 30.5, 10)
    assert s.request_timeout_s == 2.5
    assert (s.retry_max_attempts, s.retry_budget_s) == (3, 90.0)
    assert s.max_connections == 16
    assert s.topics == ("a", "b.c", "d_e")
    assert s.group_id == "my-group"
    assert s.dlq_topic == "a-dlq"
    assert s.registry_auth == Secret(REGISTRY_AUTH)
    assert s.max_in_flight == 500
    assert s.shutdown_grace_s == 10.0
    assert s.commit_interval_s == 0.5
    assert s.metrics_port == 0
    assert (s.log_format, s.log_level) == ("json", "DEBUG")
    assert (s.dlq_max_ratio, s.dlq_window, s.dlq_max_consecutive) == (1.0, 20, 7)
    assert s.replay_max == 0
    assert (s.ensure_user, s.ensure_user_cache) == (False, 5000)


def test_env_vars_lists_exactly_what_load_settings_reads() -> None:
    """Every documented variable changes something, and nothing else is read."""
    read: set[str] = set()

    class Spy(dict[str, str]):
        def get(self, key: str, default: Any = None) -> Any:
            read.add(key)
            return super().get(key, default)

        def __getitem__(self, key: str) -> str:
            read.add(key)
            return super().__getitem__(key)

    load_settings(Spy({**BASE, **SET_ALL}))
    assert read == ENV_VARS | STANDARD_ENV_VARS
    assert set(SET_ALL) | set(BASE) <= ENV_VARS


def test_mappings_file_is_loaded(tmp_path: Path) -> None:
    path = tmp_path / "mappings.json"
    path.write_text(json.dumps({"preset": "none",
                                "events": {"Feature Used": {"event_name": "feature_used"}}}))
    s = load(USERPILOT_MAPPINGS_FILE=str(path))
    assert s.mappings_file == str(path)
    assert s.mappings.names() == ("Feature Used",)


def test_unreadable_mappings_file_is_reported(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    message = problem(USERPILOT_MAPPINGS_FILE=str(missing))
    assert message.startswith("USERPILOT_MAPPINGS_FILE")
    assert "nope.json" in message


def test_invalid_mappings_file_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    message = problem(USERPILOT_MAPPINGS_FILE=str(path))
    assert message.startswith("USERPILOT_MAPPINGS_FILE:")
    assert "JSON" in message


@pytest.mark.parametrize(("raw", "expected"), [
    ("1", True), ("true", True), ("YES", True), ("on", True),
    ("0", False), ("false", False), ("No", False), ("off", False), ("  ", False),
])
def test_booleans(raw: str, expected: bool) -> None:
    assert load(USERPILOT_INSECURE_HTTP=raw,
                USERPILOT_ANALYTICS_ENDPOINT="sandbox:8080").insecure_http is expected


def test_blank_values_count_as_unset() -> None:
    s = load(KAFKA_GROUP_ID="  ", WORKER_LOG_LEVEL="", USERPILOT_RATE_LIMIT=" ")
    assert (s.group_id, s.log_level, s.rate_limit) == ("userpilot-delivery", "INFO", 600)


def test_values_are_stripped() -> None:
    s = load(USERPILOT_API_KEY=f"  {TOKEN}\n",
             USERPILOT_ANALYTICS_ENDPOINT=" analytex.userpilot.io ")
    assert s.api_key.reveal() == TOKEN
    assert s.analytics_endpoint == "analytex.userpilot.io"


@pytest.mark.parametrize("host", [
    "analytex.userpilot.io", "analytex-eu.userpilot.io", "localhost", "localhost:8080",
    "127.0.0.1:65535", "sandbox:1",
])
def test_valid_endpoints(host: str) -> None:
    assert load(USERPILOT_ANALYTICS_ENDPOINT=host).analytics_endpoint == host


# ------------------------------------------------------------------ endpoint messages


@pytest.mark.parametrize(("raw", "suggestion"), [
    ("https://analytex.userpilot.io", "'analytex.userpilot.io'"),
    ("https://analytex.userpilot.io/v1/track", "'analytex.userpilot.io'"),
    ("http://analytex-eu.userpilot.io/", "'analytex-eu.userpilot.io'"),
])
def test_endpoint_with_scheme_suggests_the_host(raw: str, suggestion: str) -> None:
    message = problem(USERPILOT_ANALYTICS_ENDPOINT=raw)
    assert "has a scheme" in message
    assert f"e.g. {suggestion}" in message


@pytest.mark.parametrize(("raw", "suggestion"), [
    ("analytex.userpilot.io/v1/track", "'analytex.userpilot.io'"),
    ("analytex.userpilot.io/", "'analytex.userpilot.io'"),
])
def test_endpoint_with_path_suggests_the_host(raw: str, suggestion: str) -> None:
    message = problem(USERPILOT_ANALYTICS_ENDPOINT=raw)
    assert "has a path" in message
    assert f"e.g. {suggestion}" in message
    assert "/v1/track itself" in message


@pytest.mark.parametrize("raw", [
    "analytex userpilot io", "analytex_.userpilot.io", "-bad.example", "a..b", "host:",
    "x" * 300, "héllo.example", "host:port",
])
def test_invalid_host(raw: str) -> None:
    message = problem(USERPILOT_ANALYTICS_ENDPOINT=raw)
    assert "is not a host name" in message
    assert "analytex.userpilot.io" in message


@pytest.mark.parametrize("raw", ["host:0", "host:65536", "host:99999"])
def test_invalid_port(raw: str) -> None:
    assert "invalid port" in problem(USERPILOT_ANALYTICS_ENDPOINT=raw)


def test_missing_endpoint_says_where_to_find_it() -> None:
    env = {k: v for k, v in BASE.items() if k != "USERPILOT_ANALYTICS_ENDPOINT"}
    (message,) = problems(env)
    assert message.startswith("USERPILOT_ANALYTICS_ENDPOINT is not set")
    assert "Environment page" in message
    assert "analytex-eu.userpilot.io" in message


# ------------------------------------------------------------------ API key


@pytest.mark.parametrize("raw", ["", "   "])
def test_api_key_missing(raw: str) -> None:
    message = problem(USERPILOT_API_KEY=raw)
    assert "USERPILOT_API_KEY is not set" in message
    assert "write token" in message


def test_api_key_absent() -> None:
    env = {k: v for k, v in BASE.items() if k != "USERPILOT_API_KEY"}
    assert problems(env) == [problem(USERPILOT_API_KEY="")]


@pytest.mark.parametrize("raw", [f"Token {TOKEN}", f"token {TOKEN}", f"TOKEN  {TOKEN}"])
def test_api_key_with_token_prefix(raw: str) -> None:
    message = problem(USERPILOT_API_KEY=raw)
    assert "starts with 'Token '" in message
    assert TOKEN not in message


@pytest.mark.parametrize("raw", [f"Bearer {TOKEN}", f"{TOKEN[:5]} {TOKEN[5:]}", f"{TOKEN}\x00"])
def test_api_key_with_spaces_or_control_characters(raw: str) -> None:
    message = problem(USERPILOT_API_KEY=raw)
    assert "spaces or control characters" in message
    assert TOKEN[5:] not in message


def test_a_token_longer_than_any_token_is_refused_and_not_quoted() -> None:
    """Review "config53": a 70,000-character value (a file holding more than the token)
    passed, and every request's head was refused: each event dead-lettered."""
    long_value = "a" * 70_000
    message = problem(USERPILOT_API_KEY=long_value)
    assert "70000 characters long" in message and "paste the token alone" in message
    assert "a" * 100 not in message
    assert load(USERPILOT_API_KEY="a" * 1024).api_key.reveal() == "a" * 1024
    assert "1025 characters long" in problem(USERPILOT_API_KEY="a" * 1025)


# ------------------------------------------------------------------ topics


@pytest.mark.parametrize(("raw", "fragment"), [
    ("bad topic", "'bad topic', which is not a legal topic name"),
    ("ok,bad/slash", "'bad/slash'"),
    ("x" * 250, "at most 249"),
    (".", "'.'"),
    ("..", "'..'"),
    (" , ,", "lists no topic"),
    ("a,b,a", "lists 'a' twice"),
])
def test_topic_names(raw: str, fragment: str) -> None:
    message = problem(KAFKA_TOPICS=raw)
    assert message.startswith("KAFKA_TOPICS")
    assert fragment in message


def test_topic_of_249_characters_is_legal() -> None:
    assert load(KAFKA_TOPICS="t" * 249, KAFKA_DLQ_TOPIC="dlq").topics == ("t" * 249,)


def test_missing_topics() -> None:
    env = {k: v for k, v in BASE.items() if k != "KAFKA_TOPICS"}
    (message,) = problems(env)
    assert message.startswith("KAFKA_TOPICS is not set")


@pytest.mark.parametrize("dlq", ["delivery-userpilot", "other"])
def test_dlq_topic_equal_to_a_source_topic(dlq: str) -> None:
    message = problem(KAFKA_TOPICS="delivery-userpilot,other", KAFKA_DLQ_TOPIC=dlq)
    assert f"KAFKA_DLQ_TOPIC={dlq!r} is also a source topic" in message


@pytest.mark.parametrize(("sources", "dlq"), [("rv.col", "rv_col"), ("a,rv_col", "rv.col"),
                                             ("x.y_z", "x_y.z")])
def test_dlq_topic_colliding_with_a_source_topic_by_dot_and_underscore(
        sources: str, dlq: str) -> None:
    """Review config40: Kafka refuses `rv_col` beside `rv.col` (their metric names collide):
    check-config --online said OK, and every dead letter was retried for ever."""
    message = problem(KAFKA_TOPICS=sources, KAFKA_DLQ_TOPIC=dlq)
    assert f"KAFKA_DLQ_TOPIC={dlq!r} differs from the source topic" in message
    assert load(KAFKA_TOPICS="rv.col", KAFKA_DLQ_TOPIC="rv.col.dlq").dlq_topic == "rv.col.dlq"


def test_a_group_id_kafka_cannot_carry_is_refused() -> None:
    """Review config40: 32,768 bytes and more, the broker dropped every connection (read as
    all brokers down) while check-config said OK."""
    message = problem(KAFKA_GROUP_ID="g" * 32768)
    assert message.startswith("KAFKA_GROUP_ID is 32768 bytes long: Kafka takes at most 32767")
    assert load(KAFKA_GROUP_ID="g" * 32767).group_id == "g" * 32767


@pytest.mark.parametrize(("name", "value", "fragment"), [
    ("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1.:9092", "127.0.0.1. is not an IP address"),
    ("SCHEMA_REGISTRY_URL", "http://127.0.0.1.:8081",
     "the host '127.0.0.1.' is not an IPv4 address"),
    ("SCHEMA_REGISTRY_URL", "http://999.1.1.1:8081", "Invalid IPv4 address"),
])
def test_an_address_no_resolver_reads_is_refused(name: str, value: str, fragment: str) -> None:
    """Review config40: an IPv4 address with a name's trailing dot passed check-config; no
    resolver reads it, and `run` waited for the service as for an outage."""
    assert fragment in problem(**{name: value})


@pytest.mark.parametrize(("name", "value"), [
    ("KAFKA_BOOTSTRAP_SERVERS", "kafka.svc.cluster.local.:9092"),
    ("KAFKA_BOOTSTRAP_SERVERS", "127.1:9092"),
    ("SCHEMA_REGISTRY_URL", "http://registry.svc.cluster.local.:8081"),
    ("SCHEMA_REGISTRY_URL", "http://10.0.0.7:8081"),
])
def test_names_with_a_trailing_dot_and_addresses_are_taken(name: str, value: str) -> None:
    load(**{name: value})


@pytest.mark.parametrize("topic", ["__consumer_offsets", "__transaction_state"])
def test_kafkas_internal_topics_are_neither_source_nor_dead_letter_topic(topic: str) -> None:
    """Review kafka34: `KAFKA_DLQ_TOPIC=__consumer_offsets` passed check-config; online it
    was refused as compacted, with the advice to set cleanup.policy=delete on it (every
    group's offsets deleted by retention)."""
    message = problem(KAFKA_DLQ_TOPIC=topic)
    assert f"KAFKA_DLQ_TOPIC={topic!r} is one of Kafka's own internal topics" in message
    assert "never change that topic's settings" in message
    message = problem(KAFKA_TOPICS=f"delivery-userpilot,{topic}")
    assert f"KAFKA_TOPICS has {topic!r}, one of Kafka's own internal topics" in message
    assert load(KAFKA_DLQ_TOPIC="__userpilot_dlq").dlq_topic == "__userpilot_dlq"


@pytest.mark.parametrize("dlq", ["bad dlq", "..", "x" * 250])
def test_illegal_dlq_topic(dlq: str) -> None:
    assert "KAFKA_DLQ_TOPIC" in problem(KAFKA_DLQ_TOPIC=dlq)
    assert "not a legal topic name" in problem(KAFKA_DLQ_TOPIC=dlq)


def test_default_dlq_follows_the_first_topic() -> None:
    assert load(KAFKA_TOPICS="first,second").dlq_topic == "first.userpilot.dlq"


# ------------------------------------------------------------------ KAFKA_* pass-through


def test_kafka_pass_through_mapping() -> None:
    s = load(
        KAFKA_SECURITY_PROTOCOL="SASL_SSL",
        KAFKA_SASL_MECHANISM="SCRAM-SHA-512",
        KAFKA_SASL_USERNAME="worker",
        KAFKA_SASL_PASSWORD=SASL_PASSWORD,
        KAFKA_SSL_KEY_PASSWORD="keypw",
        KAFKA_AUTO_OFFSET_RESET="earliest",
        KAFKA_ISOLATION_LEVEL="read_committed",
        KAFKA_SESSION_TIMEOUT_MS="45000",
    )
    assert s.kafka_extra == {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "worker",
        "sasl.password": Secret(SASL_PASSWORD),
        "ssl.key.password": Secret("keypw"),
        "auto.offset.reset": "earliest",
        "isolation.level": "read_committed",
        "session.timeout.ms": "45000",
    }
    assert s.kafka_config(logger=False) == {
        "bootstrap.servers": "kafka:9092",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "worker",
        "sasl.password": SASL_PASSWORD,
        "ssl.key.password": "keypw",
        "auto.offset.reset": "earliest",
        "isolation.level": "read_committed",
        "session.timeout.ms": "45000",
    }


@pytest.mark.parametrize("value", ["latest", "LARGEST", "end", "error"])
def test_an_offset_reset_that_skips_or_stops_is_refused(value: str) -> None:
    """`latest` read a partition added to the topic from its end: what was produced to it
    before a worker got it was skipped for good (15 of 40 delivered); `error` stopped a
    partition whose committed offset retention removed, while the worker said ready
    (review "kafka21")."""
    text = problem(KAFKA_AUTO_OFFSET_RESET=value)
    assert f"KAFKA_AUTO_OFFSET_RESET={value!r}" in text
    assert "would skip events" in text and "--reset-offsets --to-latest" in text


@pytest.mark.parametrize("value", ["earliest", "smallest", "beginning", "EARLIEST"])
def test_an_offset_reset_to_the_start_is_accepted(value: str) -> None:
    assert load(KAFKA_AUTO_OFFSET_RESET=value).kafka_extra["auto.offset.reset"] == value


@pytest.mark.parametrize("value", ["read_uncommitted", "READ_UNCOMMITTED"])
def test_only_read_committed_isolation_is_accepted(value: str) -> None:
    # Uncommitted reads would hand over the events of aborted transactions (review
    # "offsets16": 500 rolled-back events reached Userpilot).
    text = problem(KAFKA_ISOLATION_LEVEL=value)
    assert f"KAFKA_ISOLATION_LEVEL={value!r}" in text
    assert "aborted transactions" in text and "read_committed" in text


def test_read_committed_in_any_case_is_accepted() -> None:
    """librdkafka reads the value in any case; it was refused as uncommitted (config19)."""
    assert load(KAFKA_ISOLATION_LEVEL="READ_COMMITTED").kafka_extra["isolation.level"] == \
        "READ_COMMITTED"


def test_a_trailing_line_break_is_dropped_from_kafka_settings() -> None:
    """A Secret made with `kubectl create secret --from-file` ends in a newline: it went
    to librdkafka as part of the SASL password (review config19), unlike a *_FILE's."""
    settings = load(KAFKA_SECURITY_PROTOCOL="SASL_SSL", KAFKA_SASL_MECHANISM="PLAIN",
                    KAFKA_SASL_USERNAME="u\n", KAFKA_SASL_PASSWORD="Pw123456\r\n")
    conf = settings.kafka_config(logger=False)
    assert conf["sasl.password"] == "Pw123456" and conf["sasl.username"] == "u"


def test_kafka_settings_are_trimmed_as_every_other_setting_but_secrets() -> None:
    """Review "ops31": 'SASL_SSL ' went to librdkafka, which refused it with no word of
    the space; USERPILOT_* and WORKER_* values are trimmed. A password is taken as it is."""
    settings = load(KAFKA_SECURITY_PROTOCOL=" SASL_SSL ", KAFKA_SASL_MECHANISM="PLAIN ",
                    KAFKA_SASL_USERNAME="u", KAFKA_SASL_PASSWORD=" pw with spaces ",
                    KAFKA_ISOLATION_LEVEL=" read_committed ")
    conf = settings.kafka_config(logger=False)
    assert (conf["security.protocol"], conf["sasl.mechanism"]) == ("SASL_SSL", "PLAIN")
    assert conf["sasl.password"] == " pw with spaces "


def test_credentials_in_a_url_valued_kafka_setting_are_never_shown() -> None:
    """The OIDC token endpoint with `id:secret@` was printed whole by check-config and
    left unmasked in librdkafka's log lines (review config19)."""
    url = "https://cid:TokEpLeak1@idp.example/oauth2/token"
    settings = load(KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL=url)
    shown = json.dumps(settings.describe()) + repr(settings)
    assert "TokEpLeak1" not in shown and "idp.example/oauth2/token" in json.dumps(
        settings.describe())
    assert "TokEpLeak1" in settings.log_secrets()
    registry = load(SCHEMA_REGISTRY_URL="https://u:RegPw12345@registry.example")
    assert "RegPw12345" not in repr(registry)


@pytest.mark.parametrize("key", sorted(SECRET_KAFKA_KEYS))
def test_every_secret_kafka_key_is_wrapped(key: str) -> None:
    name = "KAFKA_" + key.upper().replace(".", "_")
    s = load(**{name: "hush-123"})
    assert isinstance(s.kafka_extra[key], Secret)
    assert s.kafka_config()[key] == "hush-123"
    assert "hush-123" not in repr(s)
    assert "hush-123" not in json.dumps(s.describe())


def test_reserved_kafka_names_are_not_passed_through() -> None:
    s = load(KAFKA_GROUP_ID="g", KAFKA_DLQ_TOPIC="d")
    assert s.kafka_extra == {}
    assert set(s.kafka_config(logger=False)) == {"bootstrap.servers"}


@pytest.mark.parametrize(("name", "key"), [
    ("KAFKA_ENABLE_AUTO_COMMIT", "enable.auto.commit"),
    ("KAFKA_ENABLE_AUTO_OFFSET_STORE", "enable.auto.offset.store"),
    ("KAFKA_PARTITION_ASSIGNMENT_STRATEGY", "partition.assignment.strategy"),
    # librdkafka's other name for bootstrap.servers replaced it unseen (review diff22b)
    ("KAFKA_METADATA_BROKER_LIST", "metadata.broker.list"),
    # no delivery report for a written dead letter: its partition held for good (pass56)
    ("KAFKA_DELIVERY_REPORT_ONLY_ERROR", "delivery.report.only.error"),
])
def test_owned_kafka_keys_are_refused(name: str, key: str) -> None:
    message = problem(**{name: "x"})
    assert message == (
        f"{name} sets {key}, which the worker manages itself to keep at-least-once "
        "delivery: remove it"
    )


@pytest.mark.parametrize("name", ["KAFKA_sasl_mechanism", "KAFKA__X", "KAFKA_X_", "KAFKA_A-B"])
def test_invalid_pass_through_names(name: str) -> None:
    message = problem(**{name: "x"})
    assert message.startswith(f"{name} is not a valid pass-through name")


# ------------------------------------------------------------------ numbers and choices


@pytest.mark.parametrize(("name", "raw", "fragment"), [
    ("USERPILOT_RATE_LIMIT", "0", "=0 is out of range: use a number between 1 and 10000000"),
    ("USERPILOT_RATE_LIMIT", "ten", "='ten' is not a whole number: use e.g. 600"),
    ("USERPILOT_RATE_LIMIT", "1.5", "is not a whole number"),
    ("USERPILOT_RATE_PERIOD_SECONDS", "0", "out of range: use a number > 0"),
    ("USERPILOT_RATE_PERIOD_SECONDS", "-1", "out of range"),
    ("USERPILOT_RATE_PERIOD_SECONDS", "inf", "is not a number"),
    ("USERPILOT_RATE_PERIOD_SECONDS", "nan", "is not a number"),
    # Review "config48": Python's int() and float() read these, no other reader does.
    ("USERPILOT_MAX_METADATA_BYTES", "1_0", "is not a whole number"),
    ("USERPILOT_MAX_METADATA_BYTES", "\u0661\u0662", "is not a whole number"),
    ("USERPILOT_RATE_PERIOD_SECONDS", "6_0", "is not a number"),
    ("USERPILOT_RATE_PERIOD_SECONDS", "\uff16\uff10", "is not a number"),
    ("USERPILOT_MAX_METADATA_BYTES", "+0010", "USERPILOT_MAX_METADATA_BYTES=+0010 is out"),
    ("WORKER_MAX_IN_FLIGHT", "9" * 5000, "is not a whole number"),  # int() raised (diff48b)
    ("USERPILOT_RATE_PERIOD_SECONDS", "a minute", "is not a number: use e.g. 60"),
    ("USERPILOT_RATE_BURST", "0", "between 1 and 600"),
    ("USERPILOT_RATE_BURST", "601", "between 1 and 600"),
    ("USERPILOT_REQUEST_TIMEOUT_SECONDS", "301", ">= 0.1 and <= 300"),
    ("USERPILOT_REQUEST_TIMEOUT_SECONDS", "1e-300", ">= 0.1 and <= 300"),
    ("USERPILOT_REQUEST_TIMEOUT_SECONDS", "0.09", ">= 0.1 and <= 300"),
    ("USERPILOT_RETRY_MAX_ATTEMPTS", "0", "between 1 and 1000"),
    ("USERPILOT_RETRY_MAX_ATTEMPTS", "1001", "between 1 and 1000"),
    ("USERPILOT_RETRY_BUDGET_SECONDS", "0", "> 0"),
    ("USERPILOT_MAX_CONNECTIONS", "0", "between 1 and 1000"),
    ("USERPILOT_CA_BUNDLE", "/nonexistent/ca.pem", "not a readable PEM file of CA certificates"),
    ("USERPILOT_CA_BUNDLE", "/etc/hostname", "not a readable PEM file of CA certificates"),
    # httpx loads it for every client it builds: a traceback at start-up after "OK".
    ("SSL_CERT_FILE", "/nonexistent/ca.pem", "SSL_CERT_FILE='/nonexistent/ca.pem' is not a "
     "readable PEM file of CA certificates"),
    ("SSL_CERT_FILE", "/etc/hostname", "the worker's HTTP clients load it"),
    ("WORKER_MAX_IN_FLIGHT", "0", "between 1 and 100000"),
    ("WORKER_MAX_IN_FLIGHT", "100001", "between 1 and 100000"),
    ("WORKER_SHUTDOWN_GRACE_SECONDS", "3601", "<= 3600"),
    ("WORKER_COMMIT_INTERVAL_SECONDS", "0", "> 0 and <= 300"),
    ("WORKER_METRICS_PORT", "65536", "between 0 and 65535"),
    ("WORKER_METRICS_PORT", "-1", "between 0 and 65535"),
    ("WORKER_DLQ_MAX_RATIO", "0", "> 0 and <= 1"),
    ("WORKER_DLQ_MAX_RATIO", "1.01", "> 0 and <= 1"),
    ("WORKER_DLQ_WINDOW", "0", "between 1 and 1000000"),
    ("WORKER_DLQ_MAX_CONSECUTIVE", "0", "between 1 and 1000000"),
    ("WORKER_DLQ_GUARD_HOLD_SECONDS", "-1", ">= 0 and <= 3600"),
    ("WORKER_DLQ_GUARD_HOLD_SECONDS", "3601", ">= 0 and <= 3600"),
    ("WORKER_REPLAY_MAX", "-1", "between 0 and 1000"),
    ("USERPILOT_INSECURE_HTTP", "maybe", "is not a boolean: use true or false"),
    ("USERPILOT_ENSURE_USER", "sometimes", "is not a boolean: use true or false"),
    ("USERPILOT_ENSURE_USER_CACHE", "0", "between 1 and 10000000"),
    ("USERPILOT_ENSURE_USER_CACHE", "lots", "is not a whole number: use e.g. 100000"),
    ("USERPILOT_CONSENT_MISSING", "ignore", "not allowed: use one of deny, allow"),
    ("WORKER_LOG_FORMAT", "xml", "use one of text, json"),
    ("WORKER_LOG_LEVEL", "verbose", "use one of debug, info, warning, error, critical"),
    ("USERPILOT_CONSENT_CATEGORIES", "analytics,bad category", "'bad category'"),
    ("SCHEMA_REGISTRY_URL", "schema-registry:8081",
     "needs a scheme: e.g. http://schema-registry:8081"),
    ("SCHEMA_REGISTRY_URL", "mock://registry",
     "has the scheme mock://: the registry speaks HTTP; write http:// or https://, "
     "e.g. http://registry"),
    # Review "ops31": "http://ftp://reg:8081" and "http://http//reg:8081" were suggested.
    ("SCHEMA_REGISTRY_URL", "ftp://reg:8081", "e.g. http://reg:8081"),
    ("SCHEMA_REGISTRY_URL", "http//reg:8081",
     "misspells the scheme: write http:// or https://, e.g. http://reg:8081"),
    ("SCHEMA_REGISTRY_URL", "http:/reg:8081", "e.g. http://reg:8081"),
    ("USERPILOT_API_KEY", '"abc123"', "is wrapped in quotes"),
    # Review "ops31": bounds as people write them, and what to enter for a port.
    ("REDIS_DEDUP_TTL_SECONDS", "0", "use a number >= 60 and <= 2592000"),
    ("USERPILOT_ANALYTICS_ENDPOINT", "analytex.userpilot.io:0", "use 1-65535"),
    ("KAFKA_SASL_PASWORD", "x", "(did you mean KAFKA_SASL_PASSWORD?)"),
    ("userpilot_rate_burst", "5", "names are upper case; write USERPILOT_RATE_BURST"),
    ("Worker_Log_Level", "debug", "write WORKER_LOG_LEVEL"),
    # Review "config40": other cases, and the `_FILE` forms, were ignored with exit 0.
    ("Kafka_Security_Protocol", "SASL_SSL", "names are upper case; write KAFKA_SECURITY_PROTOCOL"),
    ("Kafka_Topics", "t", "write KAFKA_TOPICS"),
    ("userpilot_api_key_file", "/run/secrets/key", "write USERPILOT_API_KEY_FILE"),
    ("kafka_sasl_password_file", "/run/secrets/pw", "write KAFKA_SASL_PASSWORD_FILE"),
    ("schema_registry_basic_auth_user_info_file", "/run/secrets/reg",
     "write SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO_FILE"),
    ("USERPILOT_API_KEY", "'abc123'", "is wrapped in quotes"),
    ("HTTPS_PROXY", "http//proxy:3128", "misspells the scheme (the proxy for Userpilot)"),
    ("SCHEMA_REGISTRY_URL", "http://reg-a:8081,http://reg-b:8081",
     "holds several URLs: give one"),
    ("SCHEMA_REGISTRY_URL", "http://u:pw@reg-a:8081,http://reg-b:8081",
     "'http://***@reg-a:8081,http://reg-b:8081' holds several URLs"),
    ("SCHEMA_REGISTRY_URL", "http://reg:8081/apis/ccompat/v7?x=1", "query or fragment"),
    ("SCHEMA_REGISTRY_URL", "http://reg:8081/#frag", "give the registry's base URL alone"),
    ("SCHEMA_REGISTRY_URL", "http://reg:8081?", "query or fragment"),
    ("SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO", "useronly", "must be user:password"),
    # Review "ops36": taken, `run` waited for a registry no resolver could find, unready.
    ("SCHEMA_REGISTRY_URL", "http://schema registry:8081", "holds a space"),
    ("SCHEMA_REGISTRY_URL", "http://reg:8081/apis ccompat", "holds a space"),
    ("SCHEMA_REGISTRY_URL", "http://-bad-.example:8081",
     "the host '-bad-.example' is not a host name"),
    ("SCHEMA_REGISTRY_URL", "http://reg..example:8081", "is not a host name"),
    ("HTTPS_PROXY", "http://my proxy:3128", "holds a space"),
])
def test_each_validation_message(name: str, raw: str, fragment: str) -> None:
    message = problem(**{name: raw})
    assert message.startswith(name)
    assert fragment in message


@pytest.mark.parametrize("url", [
    "http://schema-registry:8081", "http://reg_1.internal:8081/apis/ccompat/v7",
    "http://10.0.0.1:8081/", "http://[::1]:8081", "http://ü.example:8081",
    "https://u:p%20w@reg.example.com./x", "http://user:pa ss@reg:8081"])
def test_registry_urls_any_resolver_takes_are_accepted(url: str) -> None:
    """A space in the password goes out as written (Basic auth): it works (review diff36b)."""
    assert load(SCHEMA_REGISTRY_URL=url).registry_url


def test_a_host_cut_short_by_the_user_info_is_never_quoted() -> None:
    """Review diff36b: a '/' in a user name without a password made its first part the
    "host", quoted in the refusal."""
    message = problem(SCHEMA_REGISTRY_URL="https://Zm9v+YmFy/c2VjcmV0@registry.example.com")
    assert "ends the host early" in message
    assert "zm9v" not in message.lower() and "c2VjcmV0" not in message


def test_rate_burst_bound_follows_the_rate_limit() -> None:
    assert load(USERPILOT_RATE_LIMIT="50", USERPILOT_RATE_BURST="50").rate_burst == 50
    assert "between 1 and 50" in problem(USERPILOT_RATE_LIMIT="50", USERPILOT_RATE_BURST="51")


def test_several_problems_are_reported_at_once() -> None:
    env = {
        "USERPILOT_API_KEY": f"Token {TOKEN}",
        "USERPILOT_ANALYTICS_ENDPOINT": "https://analytex.userpilot.io/v1/track",
        "KAFKA_TOPICS": "good,bad topic",
        "SCHEMA_REGISTRY_URL": "registry:8081",
        "USERPILOT_RATE_LIMIT": "-5",
        "KAFKA_ENABLE_AUTO_COMMIT": "true",
        "WORKER_LOG_FORMAT": "xml",
    }
    found = problems(env)
    starts = [p.split(" ", 1)[0].split("=", 1)[0] for p in found]
    assert sorted(starts) == sorted([
        "USERPILOT_API_KEY", "USERPILOT_ANALYTICS_ENDPOINT", "USERPILOT_RATE_LIMIT",
        "KAFKA_BOOTSTRAP_SERVERS", "KAFKA_TOPICS", "KAFKA_ENABLE_AUTO_COMMIT",
        "SCHEMA_REGISTRY_URL", "WORKER_LOG_FORMAT",
    ])
    assert TOKEN not in "\n".join(found)


def test_empty_environment_lists_every_required_variable() -> None:
    found = problems({})
    names = {p.split(" ", 1)[0] for p in found}
    assert names == {"USERPILOT_API_KEY", "USERPILOT_ANALYTICS_ENDPOINT",
                     "KAFKA_BOOTSTRAP_SERVERS", "KAFKA_TOPICS", "SCHEMA_REGISTRY_URL"}


# ------------------------------------------------------------------ secrets


def test_secret_never_shows_itself() -> None:
    secret = Secret(TOKEN)
    assert TOKEN not in repr(secret)
    assert TOKEN not in str(secret)
    assert TOKEN not in f"{secret}"
    assert TOKEN not in f"{secret!r}"
    assert TOKEN not in repr([secret, {"k": secret}])
    assert secret.reveal() == TOKEN
    assert secret == Secret(TOKEN)
    assert secret != Secret("other")
    assert secret != TOKEN
    assert len({secret, Secret(TOKEN)}) == 1


def test_settings_repr_and_describe_never_show_secrets() -> None:
    s = load(KAFKA_SASL_PASSWORD=SASL_PASSWORD, KAFKA_SASL_USERNAME="worker",
             SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO=REGISTRY_AUTH)
    described = json.dumps(s.describe())
    for text in (repr(s), str(s), described):
        assert TOKEN not in text
        assert SASL_PASSWORD not in text
        assert "reg-s3cret" not in text
    d = s.describe()
    assert d["userpilot"]["api_key"] == "***"
    assert d["kafka"]["extra"] == {"sasl.password": "***", "sasl.username": "worker"}
    assert d["schema_registry"]["basic_auth"] == "***"


def test_describe_shape() -> None:
    d = load().describe()
    assert d["userpilot"]["track_url"] == "https://analytex.userpilot.io/v1/track"
    assert d["userpilot"]["rate_limit"] == (
        "600 per 60 s (burst 1) each for track and for identify (with company identify)")
    assert d["userpilot"]["retry"] == {"max_attempts": 12, "budget_seconds": 900.0,
                                       "backoff_seconds": 1.0, "backoff_max_seconds": 60.0}
    assert d["consent"] == {"categories": ["analytics"], "missing": "deny", "gating": "on"}
    assert d["mappings"]["file"] is None
    assert d["mappings"]["events"]["preset"] == "default"
    assert d["kafka"]["topics"] == ["delivery-userpilot"]
    assert d["schema_registry"] == {"url": "http://schema-registry:8081", "basic_auth": None}
    assert d["worker"]["dlq_guard"] == {"max_ratio": 0.5, "window": 100, "max_consecutive": 50,
                                        "hold_seconds": 120.0}
    json.dumps(d)  # JSON-able for check-config


def test_headers() -> None:
    assert load().headers() == {
        "Content-Type": "application/json",
        "Authorization": f"Token {TOKEN}",
        "X-API-Version": API_VERSION,
    }
    assert API_VERSION == "2020-09-22"


@pytest.mark.parametrize(("insecure", "endpoint", "url"), [
    ("false", "analytex.userpilot.io", "https://analytex.userpilot.io/v1/track"),
    ("true", "sandbox:8080", "http://sandbox:8080/v1/track"),
])
def test_track_url(insecure: str, endpoint: str, url: str) -> None:
    assert load(USERPILOT_INSECURE_HTTP=insecure,
                USERPILOT_ANALYTICS_ENDPOINT=endpoint).track_url == url


def test_ensure_user_is_on_by_default_with_a_bounded_cache() -> None:
    s = load()
    assert (s.ensure_user, s.ensure_user_cache) == (True, 100_000)
    assert s.describe()["userpilot"]["ensure_user"] is True
    assert s.base_url == "https://analytex.userpilot.io"


def test_track_url_keeps_the_port() -> None:
    s = load(USERPILOT_ANALYTICS_ENDPOINT="localhost:8080", USERPILOT_INSECURE_HTTP="1")
    assert s.track_url == "http://localhost:8080/v1/track"


# ------------------------------------------------------------------ offline mode


def test_offline_fills_connection_settings() -> None:
    s = load_settings({"USERPILOT_CONSENT_CATEGORIES": "marketing"}, offline=True)
    assert s.consent.categories == ("marketing",)
    assert s.analytics_endpoint == "analytex.userpilot.io"
    assert s.topics == ("unused",)


def test_offline_keeps_what_is_set_and_treats_blank_as_unset() -> None:
    s = load_settings({"USERPILOT_ANALYTICS_ENDPOINT": "analytex-eu.userpilot.io",
                       "KAFKA_TOPICS": " "}, offline=True)
    assert s.track_url == "https://analytex-eu.userpilot.io/v1/track"
    assert s.topics == ("unused",)


def test_offline_still_validates_what_is_set() -> None:
    found = problems({"USERPILOT_CONSENT_MISSING": "maybe"}, offline=True)
    assert found == ["USERPILOT_CONSENT_MISSING='maybe' is not allowed: use one of deny, allow"]


def test_without_offline_nothing_is_filled() -> None:
    assert len(problems({"USERPILOT_CONSENT_CATEGORIES": "marketing"})) == 5


# ------------------------------------------------------------------ is_known_env_var


@pytest.mark.parametrize(("name", "known"), [
    *[(n, True) for n in sorted(ENV_VARS)],
    ("KAFKA_SASL_MECHANISM", True),
    ("KAFKA_SSL_CA_LOCATION", True),
    ("KAFKA_X1", True),
    ("KAFKA_", False),
    ("KAFKA_sasl_mechanism", False),
    ("KAFKA__X", False),
    ("USERPILOT_API_TOKEN", False),
    ("USERPILOT_ENDPOINT", False),
    ("WORKER_THREADS", False),
    ("PATH", False),
    ("userpilot_api_key", False),
])
def test_is_known_env_var(name: str, known: bool) -> None:
    assert is_known_env_var(name) is known


def test_an_illegal_source_topic_is_reported_once() -> None:
    """The derived DLQ name inherits the mistake; it must not be blamed on KAFKA_DLQ_TOPIC."""
    assert problems({**BASE, "KAFKA_TOPICS": "bad topic"}) == [
        "KAFKA_TOPICS has 'bad topic', which is not a legal topic name (letters, digits, "
        "'.', '_', '-', at most 249 characters)"
    ]


def test_a_derived_dlq_name_that_is_too_long_asks_for_kafka_dlq_topic() -> None:
    message = problem(KAFKA_TOPICS="t" * 240)
    assert "default dead-letter topic" in message
    assert "set KAFKA_DLQ_TOPIC" in message


# ------------------------------------------------------------------ issue 10: what run refuses


def test_kafka_tooling_variables_are_ignored_with_a_note() -> None:
    s = load(KAFKA_OPTS="-Xmx1g", KAFKA_HEAP_OPTS="-Xms256m")
    assert s.kafka_extra == {}
    assert s.notes == (
        "KAFKA_HEAP_OPTS ignored: a variable of Kafka's JVM tools, not a client setting",
        "KAFKA_OPTS ignored: a variable of Kafka's JVM tools, not a client setting",
    )


def test_a_statistics_interval_the_worker_overrides_is_not_shown_as_in_effect() -> None:
    """check-config printed it among the effective settings; the worker sets its own
    (review "ops22")."""
    s = load(KAFKA_STATISTICS_INTERVAL_MS="0")
    assert "statistics.interval.ms" not in s.kafka_extra
    assert s.notes == ("KAFKA_STATISTICS_INTERVAL_MS ignored: the worker sets "
                       "statistics.interval.ms itself (5000: its broker states and lag "
                       "figures come from the statistics)",)


def test_kafka_settings_the_dlq_producer_overrides_say_so() -> None:
    """check-config showed them as in effect; the dead-letter producer writes one record
    per batch and may create its topic whatever they say (review "kafkacfg46")."""
    s = load(KAFKA_BATCH_NUM_MESSAGES="500", KAFKA_ALLOW_AUTO_CREATE_TOPICS="false")
    assert len(load(KAFKA_ALLOW_AUTO_CREATE_TOPICS="f").notes) == 1, "librdkafka reads f as false"
    assert s.kafka_extra == {"batch.num.messages": "500", "allow.auto.create.topics": "false"}
    assert s.notes == (
        "KAFKA_ALLOW_AUTO_CREATE_TOPICS='false' keeps the consumer from creating source "
        "topics; the dead-letter producer may still create the DLQ topic where the brokers "
        "allow it (create it beforehand to choose its partitions and retention)",
        "KAFKA_BATCH_NUM_MESSAGES applies to the produce tool only: the dead-letter and "
        "replay producers write one record per batch (a broker checks a topic's "
        "max.message.bytes per batch)")
    assert load(KAFKA_ALLOW_AUTO_CREATE_TOPICS="true").notes == ()


def test_kafka_debug_with_librdkafka_contexts_is_librdkafka_s_debug() -> None:
    """It sat in the JVM tools' list only: librdkafka's debug could not be turned on."""
    s = load(KAFKA_DEBUG="consumer,cgrp")
    assert s.kafka_extra == {"debug": "consumer,cgrp"}
    assert s.notes == ()
    jvm = load(KAFKA_DEBUG="y")
    assert jvm.kafka_extra == {}
    assert jvm.notes == ("KAFKA_DEBUG ignored: a variable of Kafka's JVM tools, not a client "
                         "setting (librdkafka's debug takes contexts, e.g. "
                         "KAFKA_DEBUG=consumer,cgrp)",)


def test_an_empty_secret_file_variable_or_kafka_setting_is_unset() -> None:
    """`USERPILOT_API_KEY_FILE=` was "not a setting of this worker", an empty
    `KAFKA_SASL_PASSWORD_FILE=` the librdkafka setting 'sasl.password.file', and an empty
    `KAFKA_SASL_MECHANISM=` a null value librdkafka refused: every other empty variable
    counts as unset."""
    s = load(USERPILOT_API_KEY_FILE="", KAFKA_SASL_PASSWORD_FILE=" ", KAFKA_SASL_MECHANISM="",
             SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO_FILE="")
    assert s.kafka_extra == {}
    assert s.api_key.reveal() == BASE["USERPILOT_API_KEY"]


@pytest.mark.parametrize("endpoint", ["analytex.userpilot.io", "Analytex-EU.Userpilot.IO:80",
                                      "userpilot.io"])
def test_clear_text_to_userpilot_itself_is_refused(endpoint: str) -> None:
    """Only the Helm NOTES warned: check-config and run said nothing while the write token
    travelled in clear text; then a note, and `run` still sent it (review "seed51")."""
    message = problem(USERPILOT_INSECURE_HTTP="true", USERPILOT_ANALYTICS_ENDPOINT=endpoint)
    assert message == (f"USERPILOT_INSECURE_HTTP=true would send the write token to {endpoint} "
                       "in clear text: Userpilot's API is HTTPS; the setting is for the local "
                       "sandbox, unset it")
    assert load(USERPILOT_INSECURE_HTTP="true",
                USERPILOT_ANALYTICS_ENDPOINT="sandbox:8080").notes == ()
    # `explain` (offline: nothing is sent; an unset endpoint is a placeholder) is not refused
    offline = load_settings({"USERPILOT_INSECURE_HTTP": "true"}, offline=True)
    assert offline.insecure_http is True


def test_a_kafka_typo_is_refused_with_did_you_mean() -> None:
    message = problem(KAFKA_TOPIC="delivery-userpilot")
    assert message.startswith("KAFKA_TOPIC sets librdkafka setting 'topic', which librdkafka "
                              'refuses: No such configuration property: "topic"')
    assert message.endswith("(did you mean KAFKA_TOPICS?)")


def test_a_refused_kafka_value_suggests_no_other_name() -> None:
    """Review config40: a refused value got "(did you mean <the name typed>?)", and without
    it another setting's name."""
    message = problem(KAFKA_SASL_OAUTHBEARER_METHOD="bogus")
    assert message.endswith('Invalid value "bogus" for configuration property '
                            '"sasl.oauthbearer.method"')


def test_every_refused_kafka_setting_is_listed() -> None:
    found = problems({**BASE, "KAFKA_TOPIC": "x", "KAFKA_SESSION_TIMEOUT_MS": "soon"})
    assert len(found) == 2
    assert "session.timeout.ms" in found[0] and "topic" in found[1]


def test_librdkafka_log_level_is_expressible() -> None:
    assert load(KAFKA_LOG_LEVEL="3").kafka_extra == {"log_level": "3"}


def test_a_combination_librdkafka_refuses_is_refused() -> None:
    # With the producer's own linger.ms (5): check-config builds the clients from the
    # settings `run` builds them with, the worker's own included (review "cmds17").
    message = problem(KAFKA_MESSAGE_TIMEOUT_MS="5")
    assert "dead-letter producer" in message and "linger.ms" in message


def test_librdkafka_s_refusal_is_listed_beside_the_other_problems() -> None:
    """It came only once every other mistake was fixed, naming no variable (config19)."""
    rate, kafka = problems({**BASE, "USERPILOT_RATE_LIMIT": "abc",
                            "KAFKA_SECURITY_PROTOCOL": "SSL",
                            "KAFKA_SSL_CA_LOCATION": "/nonexistent/ca.pem"})
    assert rate.startswith("USERPILOT_RATE_LIMIT='abc'")
    assert "ssl.ca.location" in kafka and "(set by KAFKA_SSL_CA_LOCATION)" in kafka


def test_sasl_settings_without_a_sasl_protocol_are_refused() -> None:
    """librdkafka only warned (a CONFWARN the check dropped) and `run` connected in
    plaintext with the credentials unused (review config19)."""
    sasl = {"KAFKA_SASL_MECHANISM": "PLAIN", "KAFKA_SASL_USERNAME": "u",
            "KAFKA_SASL_PASSWORD": "pw-S3CRET"}
    message = problem(**sasl)
    assert "librdkafka would ignore the SASL settings" in message
    assert "set KAFKA_SECURITY_PROTOCOL=SASL_SSL" in message and "S3CRET" not in message
    assert load(**sasl, KAFKA_SECURITY_PROTOCOL="SASL_SSL").kafka_extra["sasl.mechanism"]
    # a broker written with its protocol does not set it (librdkafka drops the broker)
    found = problems({**BASE, **sasl, "KAFKA_BOOTSTRAP_SERVERS": "SASL_SSL://kafka:9093"})
    assert any("librdkafka would ignore the SASL settings" in p for p in found)
    # a username and password without a mechanism: librdkafka's note says so
    noted = load(KAFKA_SASL_USERNAME="u", KAFKA_SASL_PASSWORD="pw-S3CRET")
    assert any("sasl.username" in note and "S3CRET" not in note for note in noted.notes)
    # A SASL protocol without a mechanism: librdkafka's text said "recompile librdkafka"
    # (its default, GSSAPI, is not built in); the fix is the setting (review "ops29").
    (said,) = problems({**BASE, "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
                        "KAFKA_SASL_USERNAME": "u", "KAFKA_SASL_PASSWORD": "pw-S3CRET"})
    assert "set KAFKA_SASL_MECHANISM to PLAIN" in said
    assert "recompile" not in said and "S3CRET" not in said
    (gssapi,) = problems({**BASE, "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
                          "KAFKA_SASL_MECHANISM": "GSSAPI"})
    assert "KAFKA_SASL_MECHANISM=GSSAPI (Kerberos) is not in this build" in gssapi


def test_consumer_only_settings_do_not_reach_the_producer() -> None:
    """Each start logged librdkafka's "is a consumer property and will be ignored by this
    producer instance" (review config19): no such warning is left."""
    settings = load(KAFKA_FETCH_WAIT_MAX_MS="100", KAFKA_FETCH_MESSAGE_MAX_BYTES="2097152",
                    KAFKA_QUEUED_MIN_MESSAGES="1000", KAFKA_COORDINATOR_QUERY_INTERVAL_MS="600000",
                    KAFKA_AUTO_COMMIT_INTERVAL_MS="5000", KAFKA_CHECK_CRCS="true")
    assert [n for n in settings.notes if "librdkafka" in n] == []
    from consumer.librdkafka import client_problem

    warned: list[str] = []  # what the check would note (before: a producer warned)
    assert client_problem({"group.id": "g", **settings.kafka_extra}, warned) is None
    assert warned == []
    assert client_problem({"group.id": "g", "sasl.mechanism": "PLAIN"}, warned) is None
    assert len(warned) == 1 and "sasl.mechanism" in warned[0]  # warnings are captured


def test_consumer_only_settings_written_topic_dot_do_not_reach_the_producer() -> None:
    """Review "rebal54": the `topic.` form of a consumer-only setting reached the DLQ
    producer, and every start logged librdkafka's "is a consumer property" twice."""
    from consumer.librdkafka import client_problem, producer_settings

    settings = load(KAFKA_TOPIC_AUTO_COMMIT_INTERVAL_MS="5000")
    key = "topic.auto.commit.interval.ms"
    assert key in settings.kafka_extra
    assert key not in producer_settings(settings.kafka_extra)
    warned: list[str] = []
    assert client_problem({"group.id": "g", **settings.kafka_extra}, warned) is None
    assert warned == []


def test_producer_only_settings_reach_the_dlq_producer_and_no_note_calls_them_ignored() -> None:
    """Review "ops28": KAFKA_COMPRESSION_TYPE, KAFKA_LINGER_MS... reach the dead-letter
    producer, yet each start noted librdkafka's "is a producer property and will be ignored
    by this consumer instance", under librdkafka's own name (compression.codec) and naming
    no variable."""
    from consumer.librdkafka import _PRODUCER_ONLY, consumer_settings, producer_settings

    settings = load(KAFKA_ACKS="all", KAFKA_COMPRESSION_TYPE="zstd", KAFKA_LINGER_MS="20",
                    KAFKA_MESSAGE_TIMEOUT_MS="30000", KAFKA_BATCH_SIZE="100000",
                    KAFKA_TOPIC_COMPRESSION_TYPE="lz4")
    assert [n for n in settings.notes if "librdkafka" in n] == []
    extra = settings.kafka_extra
    assert not {k.removeprefix("topic.") for k in consumer_settings(extra)} & set(_PRODUCER_ONLY)
    produced = producer_settings(extra)
    assert (produced["compression.type"], produced["linger.ms"], produced["batch.size"]) == (
        "zstd", "20", "100000")
    from consumer.librdkafka import client_problem

    warned: list[str] = []
    assert client_problem({"group.id": "g", **extra}, warned) is None
    assert warned == []


def test_the_producer_only_list_is_what_librdkafka_calls_producer_properties() -> None:
    """Each listed name makes a consumer warn (so the list holds no consumer setting)."""
    from consumer.librdkafka import _PRODUCER_ONLY, client_problem

    sample = {"transactional.id": "t", "enable.idempotence": True, "linger.ms": 5,
              "compression.type": "lz4", "acks": "all", "message.timeout.ms": 30000,
              "batch.num.messages": 10, "partitioner": "murmur2"}
    assert set(sample) <= set(_PRODUCER_ONLY)
    from confluent_kafka import Consumer

    for key, value in sample.items():
        warned: list[str] = []
        from consumer import librdkafka

        with librdkafka._capture(warned):
            consumer = Consumer({"group.id": "g", key: value, "logger": librdkafka._CHECK})
            consumer.poll(0)
            consumer.close()
        assert any("producer property" in w for w in warned), key
    assert client_problem({"group.id": "g", "compression.type": "lz4"}, []) is None


def test_a_message_names_the_variable_by_librdkafkas_alias_too() -> None:
    """librdkafka says message.timeout.ms for delivery.timeout.ms (compression.codec for
    compression.type): the message named only the other variable, or none (review ops28)."""
    message = problem(KAFKA_DELIVERY_TIMEOUT_MS="10", KAFKA_LINGER_MS="20")
    assert "`message.timeout.ms` must be greater than `linger.ms`" in message
    assert "(set by KAFKA_DELIVERY_TIMEOUT_MS, KAFKA_LINGER_MS)" in message


@pytest.mark.parametrize(("name", "value", "says"), [
    ("KAFKA_ACKS", "1", "acks=all"),
    ("KAFKA_REQUEST_REQUIRED_ACKS", "0", "acks=all"),
    ("KAFKA_TRANSACTIONAL_ID", "dlq-tx", "transactional"),
    ("KAFKA_GROUP_PROTOCOL", "consumer", "KIP-848"),
    ("KAFKA_GROUP_PROTOCOL_TYPE", "connect", "consumer-group protocol type"),
    # librdkafka reads this one in lower case only (review "diff57")
    ("KAFKA_GROUP_PROTOCOL_TYPE", "Consumer", "consumer-group protocol type"),
    # The topic-level spellings are the same setting (review "diff17").
    ("KAFKA_TOPIC_ACKS", "1", "acks=all"),
    ("KAFKA_TOPIC_REQUEST_REQUIRED_ACKS", "0", "acks=all"),
])
def test_pass_through_values_that_break_a_guarantee_are_refused(
        name: str, value: str, says: str) -> None:
    """librdkafka takes them; then a dead letter was lost or failed for ever (a
    transactional producer refuses every produce outside a transaction), or `run` exited
    on the worker's assignor (review "cmds17")."""
    message = problem(**{name: value})
    assert message.startswith(f"{name}={value!r}") and says in message and "remove it" in message


@pytest.mark.parametrize(("name", "value"), [
    ("KAFKA_ACKS", "all"), ("KAFKA_ACKS", "-1"), ("KAFKA_ENABLE_IDEMPOTENCE", "true"),
    ("KAFKA_GROUP_PROTOCOL", "classic"), ("KAFKA_GROUP_PROTOCOL_TYPE", "consumer"),
])
def test_the_values_the_worker_uses_anyway_are_taken(name: str, value: str) -> None:
    assert load(**{name: value}).kafka_extra[name.removeprefix("KAFKA_").lower()
                                             .replace("_", ".")] == value


@pytest.mark.parametrize("servers", [
    "SSL://alice:S3cretKafkaPw@broker.example:9093",
    "alice:S3cretKafkaPw@broker.example:9093",
    "kafka://alice:S3cretKafkaPw@broker.example:9093",
])
def test_credentials_written_into_the_bootstrap_servers_are_never_echoed(servers: str) -> None:
    message = problem(KAFKA_BOOTSTRAP_SERVERS=servers, KAFKA_SECURITY_PROTOCOL="SSL")
    assert "S3cretKafkaPw" not in message and "alice" not in message
    assert "broker.example:9093" in message


@pytest.mark.parametrize(("name", "value"), [
    ("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:\u00b2"),
    ("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:\uff11\uff19\uff10\uff19\uff12"),
    ("USERPILOT_ANALYTICS_ENDPOINT", "analytex.userpilot.io:\uff18\uff10"),
    ("USERPILOT_ANALYTICS_ENDPOINT", "10.0.0.256"),
    ("USERPILOT_ANALYTICS_ENDPOINT", "[2001:db8::1"),
    ("SCHEMA_REGISTRY_URL", "http://user:pw@10.0.0.256:8081/apis"),
    ("SCHEMA_REGISTRY_URL", "http://user:p\tw@registry:8081"),
])
def test_addresses_only_the_http_client_or_librdkafka_would_refuse_are_refused_here(
        name: str, value: str) -> None:
    """Non-ASCII digits passed `isdigit`, an address of digits and dots passed the host
    pattern, an unclosed [ raised a traceback: each passed check-config and crashed `run`
    (review "cmds17"). Now each is one problem, with no password in it."""
    value = value.encode().decode("unicode_escape")
    message = problem(**{name: value})
    assert message.startswith(name) and "pw" not in message


@pytest.mark.parametrize(("name", "hint"), [
    ("USERPILOT_API_TOKEN", " (did you mean USERPILOT_API_KEY?)"),
    ("USERPILOT_CONSENT_CATEGORY", " (did you mean USERPILOT_CONSENT_CATEGORIES?)"),
    ("WORKER_MAX_INFLIGHT", " (did you mean WORKER_MAX_IN_FLIGHT?)"),
    ("SCHEMA_REGISTRY_USER_INFO", " (did you mean SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO?)"),
    ("WORKER_THREADS", ""),
])
def test_unknown_own_variables_are_refused(name: str, hint: str) -> None:
    assert problem(**{name: "1"}) == (
        f"{name} is not a setting of this worker{hint}: fix the name or remove it "
        "(see README, Configuration)"
    )


@pytest.mark.parametrize("name", ["SCHEMA_REGISTRY_BEARER_AUTH_TOKEN",
                                  "SCHEMA_REGISTRY_BEARER_AUTH_CREDENTIALS_SOURCE"])
def test_a_registry_bearer_token_is_told_unsupported_not_a_typo(name: str) -> None:
    """Review "registry58": Confluent clients' OAuth setting got "did you mean
    SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO?", as if it were a misspelling of it."""
    message = problem(**{name: "tok"})
    assert message.startswith(f"{name} is not a setting of this worker: ")
    assert "basic auth only" in message and "not supported" in message
    assert "did you mean" not in message


def test_an_oidc_token_endpoints_cas_follow_the_workers_rule_unless_given(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """librdkafka's wheel looked for CentOS's CA bundle (review "diff58"): the worker names
    SSL_CERT_FILE, else certifi's bundle where that file is missing (not SSL_CERT_DIR:
    librdkafka 2.16 takes no directory there, review "diff58b"), for OIDC only; a
    KAFKA_HTTPS_CA_LOCATION or KAFKA_HTTPS_CA_PEM given wins."""
    import certifi

    from consumer import tls

    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    monkeypatch.setattr(tls, "LIBRDKAFKA_CA_DEFAULT", str(tmp_path / "absent.crt"))
    oidc = {"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "OAUTHBEARER",
            "KAFKA_SASL_OAUTHBEARER_METHOD": "oidc", "KAFKA_SASL_OAUTHBEARER_CLIENT_ID": "c",
            "KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET": "s",
            "KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL": "https://idp.example/token"}
    assert load(**oidc).kafka_config(logger=False)["https.ca.location"] == certifi.where()
    monkeypatch.setenv("SSL_CERT_DIR", "/etc/ssl/certs")  # not a place librdkafka reads
    assert load(**oidc).kafka_config(logger=False)["https.ca.location"] == certifi.where()
    monkeypatch.setenv("SSL_CERT_FILE", certifi.where())
    assert load(**oidc).kafka_config(logger=False)["https.ca.location"] == certifi.where()
    monkeypatch.delenv("SSL_CERT_FILE")
    (tmp_path / "absent.crt").write_text("")  # a RHEL-like system: librdkafka's own default
    assert "https.ca.location" not in load(**oidc).kafka_config(logger=False)
    given = load(**oidc, KAFKA_HTTPS_CA_LOCATION=certifi.where()).kafka_config(logger=False)
    assert given["https.ca.location"] == certifi.where()
    assert "https.ca.location" not in load().kafka_config(logger=False)
    # check-config shows the file it added, and nothing when it added none (review "ops58").
    assert load(**oidc).describe()["kafka"]["added"] == {}
    (tmp_path / "absent.crt").unlink()
    assert load(**oidc).describe()["kafka"]["added"] == {"https.ca.location": certifi.where()}
    assert load().describe()["kafka"]["added"] == {}
    assert "https.ca.location" not in load(
        **oidc, KAFKA_HTTPS_CA_LOCATION=certifi.where()).describe()["kafka"]["added"]


def test_kubernetes_service_links_are_not_unknown_variables() -> None:
    s = load(WORKER_PORT="tcp://10.0.0.1:8082", WORKER_SERVICE_HOST="10.0.0.1",
             WORKER_PORT_8082_TCP_ADDR="10.0.0.1")
    assert s.notes == ()


def test_service_links_of_services_named_like_ours_are_left_alone() -> None:
    """A `kafka-ui` or `userpilot-worker` Service in the namespace: its links were refused
    and every pod of the worker stopped (plain manifests keep service links on)."""
    s = load(KAFKA_UI_PORT="tcp://10.0.0.5:8080", KAFKA_UI_SERVICE_HOST="10.0.0.5",
             KAFKA_UI_SERVICE_PORT="8080", KAFKA_UI_SERVICE_PORT_HTTP="8080",
             KAFKA_UI_PORT_8080_TCP="tcp://10.0.0.5:8080", KAFKA_UI_PORT_8080_TCP_PROTO="tcp",
             KAFKA_UI_PORT_8080_TCP_PORT="8080", KAFKA_UI_PORT_8080_TCP_ADDR="10.0.0.5",
             USERPILOT_WORKER_SERVICE_HOST="fd00::5", USERPILOT_WORKER_PORT="tcp://[fd00::5]:8082")
    assert s.kafka_extra == {} and s.notes == ()
    # ... and of Services named exactly like ours (a Bitnami `kafka` release): the first
    # version of this check read KAFKA_SERVICE_PORT as a `*_PORT` URL link and refused it.
    exact = load(KAFKA_SERVICE_HOST="10.96.0.10", KAFKA_SERVICE_PORT="9092",
                 KAFKA_SERVICE_PORT_TCP_CLIENT="9092", KAFKA_PORT="tcp://10.96.0.10:9092",
                 KAFKA_PORT_9092_TCP="tcp://10.96.0.10:9092", KAFKA_PORT_9092_TCP_PORT="9092",
                 KAFKA_PORT_9092_TCP_PROTO="tcp", KAFKA_PORT_9092_TCP_ADDR="10.96.0.10",
                 SCHEMA_REGISTRY_SERVICE_PORT="8081", USERPILOT_SERVICE_PORT="80",
                 WORKER_SERVICE_HOST="10.96.0.11", WORKER_PORT="tcp://10.96.0.11:8082")
    assert exact.kafka_extra == {} and exact.notes == ()


@pytest.mark.parametrize(("name", "value"), [
    ("USERPILOT_METRICS_PORT", "8082"),  # WORKER_METRICS_PORT, mistyped
    ("WORKER_SERVICE_HOST", "worker.local"),
    ("USERPILOT_PORT", "443"),
    ("WORKER_SERVICE_PORT", "http"),
])
def test_a_mistyped_setting_shaped_like_a_service_link_is_still_refused(
        name: str, value: str) -> None:
    assert f"{name} is not a setting of this worker" in problem(**{name: value})


def test_the_image_build_revision_is_not_an_unknown_variable() -> None:
    """The Dockerfile sets it for userpilot_build_info; refusing it would stop every pod."""
    assert load(USERPILOT_WORKER_REVISION="abc123").notes == ()


@pytest.mark.parametrize("raw", ["none", "off", "None"])
def test_consent_gating_can_be_disabled(raw: str) -> None:
    s = load(USERPILOT_CONSENT_CATEGORIES=raw)
    assert s.consent.categories == ()
    assert s.describe()["consent"]["gating"] == "off"


def test_consent_categories_are_a_closed_set() -> None:
    assert problem(USERPILOT_CONSENT_CATEGORIES="analytics,analytcs") == (
        "USERPILOT_CONSENT_CATEGORIES has 'analytcs', not a Signal consent category (did you "
        "mean analytics?): use analytics, marketing, functional, advertising, personalization, "
        "essential, or 'none' to disable consent gating"
    )
    assert "alone disables" in problem(USERPILOT_CONSENT_CATEGORIES="none,analytics")
    assert load(USERPILOT_CONSENT_CATEGORIES="Marketing, personalization").consent.categories \
        == ("marketing", "personalization")


@pytest.mark.parametrize("token", ["wt_é123", "wt\u00a0123x", "“wt_123”"])
def test_tokens_that_cannot_be_an_http_header_are_refused(token: str) -> None:
    message = problem(USERPILOT_API_KEY=token)
    assert "USERPILOT_API_KEY" in message and token not in message


def test_secrets_from_files(tmp_path: Path) -> None:
    (tmp_path / "token").write_text(TOKEN + "\n")
    (tmp_path / "auth").write_text(REGISTRY_AUTH)
    (tmp_path / "sasl").write_text(SASL_PASSWORD + "\r\n")
    env = {k: v for k, v in BASE.items() if k != "USERPILOT_API_KEY"}
    s = load_settings({**env, "USERPILOT_API_KEY_FILE": str(tmp_path / "token"),
                       "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO_FILE": str(tmp_path / "auth"),
                       "KAFKA_SASL_PASSWORD_FILE": str(tmp_path / "sasl")})
    assert s.api_key == Secret(TOKEN)
    assert s.registry_auth == Secret(REGISTRY_AUTH)
    assert s.kafka_extra == {"sasl.password": Secret(SASL_PASSWORD)}


def test_secret_file_mistakes(tmp_path: Path) -> None:
    (tmp_path / "empty").write_text("\n")
    assert problem(USERPILOT_API_KEY_FILE=str(tmp_path / "token")) == (
        "both USERPILOT_API_KEY and USERPILOT_API_KEY_FILE are set: keep one")
    env = {k: v for k, v in BASE.items() if k != "USERPILOT_API_KEY"}
    found = problems({**env, "USERPILOT_API_KEY_FILE": str(tmp_path / "missing")})
    assert found[0].startswith("USERPILOT_API_KEY_FILE=") and "cannot be read" in found[0]
    found = problems({**env, "USERPILOT_API_KEY_FILE": str(tmp_path / "empty")})
    assert found[0].endswith("is empty: the secret file must hold the value")
    assert "only secrets can be read from a file" in problem(
        KAFKA_SSL_CA_LOCATION_FILE="/etc/ca.pem")


@pytest.mark.parametrize("name", [
    "KAFKA_SASL_OAUTHBEARER_ASSERTION_FILE", "KAFKA_SASL_OAUTHBEARER_ASSERTION_PRIVATE_KEY_FILE",
    "KAFKA_SASL_OAUTHBEARER_ASSERTION_JWT_TEMPLATE_FILE"])
def test_librdkafka_s_own_file_settings_are_settings_not_secret_files(name: str) -> None:
    """Review "secrets49": any KAFKA_*_FILE was read as a secret's file form, and
    librdkafka's own `….file` settings (the jwt-bearer grant's) were refused."""
    key = name.removeprefix("KAFKA_").lower().replace("_", ".")
    assert load(**{name: "/etc/kafka/assertion.jwt"}).kafka_config(logger=False)[key] == (
        "/etc/kafka/assertion.jwt")


def test_metadata_limits_reach_the_mappings() -> None:
    s = load(USERPILOT_MAX_METADATA_BYTES="2048", USERPILOT_MAX_METADATA_KEYS="10")
    assert (s.mappings.max_metadata_bytes, s.mappings.max_metadata_keys) == (2048, 10)
    assert load().mappings.max_metadata_bytes == 64 * 1024
    assert load(USERPILOT_MAX_METADATA_BYTES="524288").mappings.max_metadata_bytes == 524288


def test_a_metadata_limit_above_userpilots_is_refused() -> None:
    """Review "api43": 16 MiB was accepted; above ~1 MB nothing was cut and Userpilot's 413
    dead-lettered events the README says are sent with their largest fields left out."""
    with pytest.raises(ConfigError, match=r"USERPILOT_MAX_METADATA_BYTES=524289 is above "
                                          r"524288 \(512 KiB, Userpilot's documented"):
        load(USERPILOT_MAX_METADATA_BYTES="524289")


def test_kafka_config_routes_librdkafka_logs_through_python_logging() -> None:
    import logging

    logger = load().kafka_config()["logger"]
    assert isinstance(logger, logging.Logger) and logger.name == "librdkafka"


@pytest.mark.parametrize("raw", [",", " , ,", ", ,"])
def test_consent_categories_that_list_nothing_are_refused_not_read_as_none(raw: str) -> None:
    """`,` used to turn consent gating off, as `none` does: a privacy hazard."""
    assert "lists no category" in problem(USERPILOT_CONSENT_CATEGORIES=raw)


@pytest.mark.parametrize(("name", "value"), [
    ("USERPILOT_RATE_LIMIT", "1000000000"), ("USERPILOT_RATE_PERIOD_SECONDS", "1e308"),
    ("USERPILOT_RATE_PERIOD_SECONDS", "inf")])
def test_rate_settings_are_bounded(name: str, value: str) -> None:
    """1e308 s overflowed the shared limiter and 1e9 stalled it, both after check-config."""
    assert name in problem(**{name: value})


@pytest.mark.parametrize("key", [
    "sasl.oauthbearer.client.credentials.client.secret",
    "sasl.oauthbearer.assertion.private.key.passphrase",
    "sasl.oauthbearer.assertion.private.key.pem"])
def test_oauthbearer_secrets_are_held_as_secrets_and_never_described(key: str) -> None:
    env_name = "KAFKA_" + key.upper().replace(".", "_")
    s = load(**{env_name: "oauth-s3cret-value"})
    assert "oauth-s3cret-value" not in json.dumps(s.describe()) + repr(s)
    assert s.kafka_config(logger=False)[key] == "oauth-s3cret-value"


@pytest.mark.parametrize(("raw", "fragment"), [
    (" , ", "lists no broker"),
    ("http://127.0.0.1:19092", "not a URL"),
    ("127.0.0.1:99999", "the port must be 1-65535"),
    ("kafka:0", "the port must be 1-65535"),
    ("kafka:", "leave out the ':' for 9092"),  # review "helm49": librdkafka dialled port 0
    ("a:1,kafka:", "the port must be 1-65535"),
    ("[::1]:", "the port must be 1-65535"),
    ("[::1", "not host:port"),
    ("user@kafka:9092", "not host:port"),
])
def test_bootstrap_servers_are_checked_offline(raw: str, fragment: str) -> None:
    """They passed check-config; `run` then waited out its reach timeout and said only
    that Kafka was not reachable."""
    assert fragment in problem(KAFKA_BOOTSTRAP_SERVERS=raw)


@pytest.mark.parametrize("raw", ["kafka:9092", "a:1, b:2,", "[::1]:9092", "PLAINTEXT://k:9092",
                                 "kafka"])
def test_bootstrap_servers_as_librdkafka_reads_them_pass(raw: str) -> None:
    assert load(KAFKA_BOOTSTRAP_SERVERS=raw).bootstrap_servers == raw


def test_a_broker_s_protocol_prefix_must_be_the_security_protocol() -> None:
    """librdkafka drops a broker whose prefix is not security.protocol ("protocol SSL does
    not match security.protocol setting plaintext"): `run` never connected (diff19)."""
    message = problem(KAFKA_BOOTSTRAP_SERVERS="SSL://k:9093")
    assert "whose protocol is not KAFKA_SECURITY_PROTOCOL (plaintext)" in message
    assert "set KAFKA_SECURITY_PROTOCOL=SSL" in message
    load(KAFKA_BOOTSTRAP_SERVERS="SSL://k:9093", KAFKA_SECURITY_PROTOCOL="ssl")


@pytest.mark.parametrize(("url", "fragment"), [
    ("http://u:pa/ss@127.0.0.1:1/apis", "percent-encode"),
    ("http://u:p?ss@registry:8081", "percent-encode"),
    ("http://u:p#ss@registry:8081", "percent-encode"),
    ("http://[::1", "not a valid URL"),
    ("http://registry:99999", "not a valid URL"),
    ("http://:8081", "has no host"),
])
def test_a_registry_url_the_client_cannot_use_is_refused_without_its_password(
        url: str, fragment: str) -> None:
    """`run` crashed on these with httpx.InvalidURL, showing part of the password."""
    found = problem(SCHEMA_REGISTRY_URL=url)
    assert fragment in found
    assert "pa/ss" not in found and "p#ss" not in found


def test_an_endpoint_with_credentials_is_refused_without_echoing_them() -> None:
    found = problem(USERPILOT_ANALYTICS_ENDPOINT="https://user:pw-s3cret@analytex.userpilot.io/x")
    assert "holds credentials" in found and "pw-s3cret" not in found


@pytest.mark.parametrize("name", ["REDIS_TIMEOUT_SECOND", "REDIS_URL_FILE", "REDIS_TLS_CA"])
def test_a_near_miss_of_a_redis_setting_is_refused(name: str) -> None:
    """They were ignored without a word (a typo of REDIS_TIMEOUT_SECONDS took no effect)."""
    assert name in problem(**{name: "1"})


def test_redis_variables_of_other_software_are_left_alone() -> None:
    """REDIS_* is shared: a password fed into REDIS_URL, the service links of a redis or
    redis-master Service (Bitnami's chart) in a pod with service links on."""
    load(REDIS_PASSWORD="x", REDIS_PORT="tcp://10.0.0.7:6379", REDIS_SERVICE_HOST="10.0.0.7",
         REDIS_PORT_6379_TCP_ADDR="10.0.0.7", REDIS_MASTER_SERVICE_HOST="10.0.0.8",
         REDIS_MASTER_PORT_6379_TCP_PROTO="tcp", REDIS_MASTER_SERVICE_PORT_TCP_REDIS="6379",
         REDIS_REPLICAS_SERVICE_HOST="10.0.0.9")


def test_an_at_sign_in_the_registry_urls_path_is_not_a_credential() -> None:
    assert load(SCHEMA_REGISTRY_URL="http://registry:8081/a@b").registry_url.endswith("/a@b")


def test_log_secrets_hold_the_registry_credentials_of_the_url_and_of_the_setting() -> None:
    """Credentials written into SCHEMA_REGISTRY_URL were masked by check-config only: a
    gateway's page echoing `Authorization: Basic …` showed them in `run`'s log (review
    "schema16")."""
    import base64

    s = load(SCHEMA_REGISTRY_URL="https://reg:UrlS3cretPw@registry.example",
             SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO="other:SettingS3cret")
    secrets = s.log_secrets()
    for pair in ("reg:UrlS3cretPw", "other:SettingS3cret"):
        assert pair in secrets
        assert base64.b64encode(pair.encode()).decode() in secrets
    assert {"UrlS3cretPw", "SettingS3cret", s.api_key.reveal()} <= set(secrets)


def test_several_topics_without_a_dlq_topic_are_noted() -> None:
    """Review "multi53": the default dead-letter topic is the first topic's: a topic added
    in front moved it, with no word."""
    noted = [n for n in load(KAFKA_TOPICS="t0,t1").notes if "dead-letter topic" in n]
    assert noted and "'t0.userpilot.dlq'" in noted[0] and "KAFKA_DLQ_TOPIC" in noted[0]
    assert not [n for n in load(KAFKA_TOPICS="t1").notes if "dead-letter topic" in n]
    assert not [n for n in load(KAFKA_TOPICS="t0,t1", KAFKA_DLQ_TOPIC="d").notes
                if "dead-letter topic" in n]


def test_a_producer_without_idempotence_is_taken_with_a_note() -> None:
    """Brokers that refuse idempotent producers (no IdempotentWrite permission, Azure
    Event Hubs) need it; the previous release took it, and refusing it crash-looped every
    new pod of a rolling upgrade (review "compat17"). acks=all keeps dead letters durable."""
    settings = load(KAFKA_ENABLE_IDEMPOTENCE="false")
    assert settings.kafka_extra["enable.idempotence"] == "false"
    assert any("KAFKA_ENABLE_IDEMPOTENCE='false'" in note and "written twice" in note
               for note in settings.notes)
    # ... but not with acks below all: an acknowledged dead letter could be lost.
    assert "acks=all" in problem(KAFKA_ENABLE_IDEMPOTENCE="false", KAFKA_ACKS="1")
    # librdkafka's other spellings of a boolean read alike (review "whole46": `t` is true
    # to librdkafka and was "not idempotent" to the note)
    assert load(KAFKA_ENABLE_IDEMPOTENCE="T").notes == ()
    assert len(load(KAFKA_ENABLE_IDEMPOTENCE="f").notes) == 1


def test_log_secrets_hold_the_registry_proxys_and_the_kafka_secrets() -> None:
    """Review secrets18: neither was masked in log lines, readiness or dead letters
    (librdkafka's errors quote an OIDC endpoint's echo, or an unparsed oauthbearer config)."""
    import base64

    settings = load(HTTPS_PROXY="http://up:S3CR3T-UP-proxy@proxy.test:3128",
                    SCHEMA_REGISTRY_URL="https://registry.test:8081",
                    NO_PROXY="proxy.test",
                    KAFKA_SASL_OAUTHBEARER_CLIENT_ID="cid",
                    KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET="S3CR3T-OIDC-sec",
                    KAFKA_SASL_OAUTHBEARER_CONFIG="principal=admin secret=S3CR3T-OAUTH-abc")
    secrets = settings.log_secrets()
    assert "S3CR3T-OIDC-sec" in secrets
    assert base64.b64encode(b"cid:S3CR3T-OIDC-sec").decode() in secrets
    assert "S3CR3T-OAUTH-abc" in secrets
    assert "S3CR3T-UP-proxy" in secrets  # Userpilot's proxy, as before
    # An http registry behind HTTP_PROXY, Userpilot (https) without one.
    proxied = load(HTTP_PROXY="http://rp:S3CR3T-REG-proxy@proxy.test:3128",
                   SCHEMA_REGISTRY_URL="http://registry.test:8081")
    assert proxied.registry_proxy is not None and proxied.proxy is None
    assert "S3CR3T-REG-proxy" not in proxied.http_secrets()
    assert "S3CR3T-REG-proxy" in proxied.log_secrets()


def test_log_secrets_hold_every_proxy_variables_even_one_no_url_can_read() -> None:
    """Review "secrets55": librdkafka's OIDC request went through `http_proxy`, used by
    nothing else, and its echo showed the credentials. Review "diff55": one that is no URL
    (`http://[bad:3128`, not refused: the worker does not use it) crashed `run` there."""
    settings = load(SCHEMA_REGISTRY_URL="https://registry.test:8081",
                    http_proxy="http://pu:S3CR3T-UNUSED-px@proxy.test:3128")
    assert settings.proxy is None and settings.registry_proxy is None
    assert "S3CR3T-UNUSED-px" in settings.log_secrets()
    for broken in ("http://[bad:3128", "http://u:S3CR3T[x@proxy.test:3128"):
        secrets = load(SCHEMA_REGISTRY_URL="https://registry.test:8081",
                       http_proxy=broken).log_secrets()
        assert ("u:S3CR3T[x" in secrets) is ("@" in broken)


def test_a_cert_dir_that_is_no_directory_is_refused(tmp_path: Any) -> None:
    """SSL_CERT_DIR replaces certifi's bundle and was never checked (review config19)."""
    text = problem(SSL_CERT_DIR=str(tmp_path / "nope"))
    assert text.startswith("SSL_CERT_DIR=") and "not a directory" in text
    (tmp_path / "ca.pem").write_text("a CA")
    text = problem(SSL_CERT_DIR=str(tmp_path))
    # OpenSSL looks CAs up there by subject hash only: `ca.pem` trusted nothing (config42)
    assert "holds no certificate named by its subject hash" in text
    assert "openssl rehash" in text and "USERPILOT_CA_BUNDLE" in text
    (tmp_path / "0a1b2c3d.0").symlink_to(tmp_path / "ca.pem")
    load(SSL_CERT_DIR=str(tmp_path))
    # A list, as OpenSSL reads it, a missing entry passed over (review "config48").
    load(SSL_CERT_DIR=f"{tmp_path / 'nope'}:{tmp_path}")
    assert "not a directory" in problem(SSL_CERT_DIR=f"{tmp_path / 'nope'}:{tmp_path / 'no'}")
    (tmp_path / "empty").mkdir()
    assert "holds no certificate" in problem(SSL_CERT_DIR=f"{tmp_path / 'nope'}:"
                                             f"{tmp_path / 'empty'}")


@pytest.mark.parametrize("name", ["USERPILOT_ANALYTICS_ENDPOINT", "HTTPS_PROXY"])
@pytest.mark.parametrize("host", ["127.1", "2130706433", "10.1.1"])
def test_digits_userpilots_client_reads_as_no_address_are_refused(name: str, host: str
                                                                   ) -> None:
    """aiohttp refuses digits that are not a dotted quad ("not a canonical IPv4 address"):
    taken, every request failed and was retried for ever (review "config42")."""
    value = f"{host}:8443" if name == "USERPILOT_ANALYTICS_ENDPOINT" else f"http://{host}:3128"
    text = problem(**{name: value})
    assert text.startswith(f"{name}=") and "a.b.c.d" in text
    load(**{name: value.replace(host, "127.0.0.1")})


@pytest.mark.parametrize(("typo", "meant"), [
    ("USERPILOT_API_KEY_FLE", "USERPILOT_API_KEY_FILE"),
    ("USERPILOT_APIKEY_FILE", "USERPILOT_API_KEY_FILE"),
    ("SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO_FLIE", "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO_FILE"),
    ("KAFKA_SASL_PASWORD_FILE", "KAFKA_SASL_PASSWORD_FILE"),
])
def test_a_misspelt_secret_file_variable_is_told_the_file_variable(typo: str, meant: str
                                                                   ) -> None:
    """The hint named the plain secret: the file's path, put there, passed as the token
    (review "config42")."""
    found = "\n".join(problems({**BASE, typo: "/run/secrets/x"}))
    assert f"(did you mean {meant}?)" in found, found


@pytest.mark.parametrize("name", ["KAFKA_SSL_CERTIFICATE_PEM_FILE",
                                  "KAFKA_SASL_OAUTHBEARER_CLIENT_ID_FILE",
                                  "KAFKA_SSL_KEYSTORE_LOCATION_FILE"])
def test_a_known_setting_read_from_a_file_is_told_to_be_set_itself(name: str) -> None:
    """Not a typo of a secret's file variable: the hint sent a certificate to ssl.key.pem
    and a client id to the client secret (review "diff42")."""
    found = "\n".join(problems({**BASE, name: "/run/secrets/x"}))
    assert "did you mean" not in found and f"set {name[:-5]} instead" in found, found


def test_redis_settings_without_redis_are_noted() -> None:
    notes = load(REDIS_TIMEOUT_SECONDS="1").notes
    assert any(n.startswith("REDIS_TIMEOUT_SECONDS ignored: REDIS_URL is not set")
               for n in notes)


def test_a_secret_file_is_read_only_so_far() -> None:
    """`/dev/zero` as a *_FILE read without end (review config19)."""
    found = problems({**BASE, "USERPILOT_API_KEY": "", "USERPILOT_API_KEY_FILE": "/dev/zero"})
    assert found[0].startswith("USERPILOT_API_KEY_FILE='/dev/zero' holds over 64 KB")


def test_a_mappings_file_is_read_only_so_far() -> None:
    from consumer.mapping import MappingsError, load_mappings

    with pytest.raises(MappingsError, match="holds over 16 MB"):
        load_mappings("/dev/zero")


@pytest.mark.parametrize(("over", "limit"), [
    ({"KAFKA_HEARTBEAT_INTERVAL_MS": "15000"}, "3333"),
    ({"KAFKA_HEARTBEAT_INTERVAL_MS": "10000"}, "3333"),
    ({"KAFKA_HEARTBEAT_INTERVAL_MS": "30000", "KAFKA_SESSION_TIMEOUT_MS": "20000"}, "6666"),
])
def test_a_heartbeat_at_or_past_the_session_timeout_is_refused(
        over: dict[str, str], limit: str) -> None:
    """librdkafka takes it; under the worker's 10 s session a 15 s heartbeat lost every
    partition every session (review "ops23")."""
    text = problem(**over)
    assert text.startswith(f"KAFKA_HEARTBEAT_INTERVAL_MS={over['KAFKA_HEARTBEAT_INTERVAL_MS']}")
    assert f"at most {limit}" in text


def test_librdkafkas_default_heartbeat_is_named_as_such_not_as_a_variable_set() -> None:
    """`KAFKA_SESSION_TIMEOUT_MS=3000` was refused with "KAFKA_HEARTBEAT_INTERVAL_MS=3000
    … or remove it", a variable the user never set (review "diff23")."""
    text = problem(KAFKA_SESSION_TIMEOUT_MS="3000")
    assert text.startswith("librdkafka's default heartbeat (3000 ms)"), text
    assert "raise KAFKA_SESSION_TIMEOUT_MS" in text
    noted = load(KAFKA_SESSION_TIMEOUT_MS="6000").notes
    assert any(n.startswith("librdkafka's default heartbeat") for n in noted), noted


def test_a_heartbeat_past_a_third_of_the_session_is_a_note_and_within_it_nothing() -> None:
    noted = load(KAFKA_HEARTBEAT_INTERVAL_MS="5000")
    assert any("KAFKA_HEARTBEAT_INTERVAL_MS=5000" in note for note in noted.notes)
    for fine in ({"KAFKA_HEARTBEAT_INTERVAL_MS": "3000"}, {},
                 {"KAFKA_HEARTBEAT_INTERVAL_MS": "15000", "KAFKA_SESSION_TIMEOUT_MS": "45000"}):
        assert not any("HEARTBEAT" in note for note in load(**fine).notes), fine


@pytest.mark.parametrize("servers", ["999.1.1.1:9092", "[1::2::3]:9092",
                                     "kafka:9092,10.0.0.256:9092", "1.2.3.4.5:9092"])
def test_a_broker_address_that_is_no_ip_address_is_refused(servers: str) -> None:
    """librdkafka only fails to resolve it, and `run` waited for ever as for an outage
    (review "ops23")."""
    assert "is not an IP address" in problem(KAFKA_BOOTSTRAP_SERVERS=servers)


@pytest.mark.parametrize(("servers", "says"), [
    ("127.0.0.1:9092 127.0.0.1:9093", "separate brokers with commas"),
    ("127.0.0.1:9092;127.0.0.1:9093", "separate brokers with commas"),
    ("127.0.0.1 :9092", "separate brokers with commas"),
    ("kafka:9092, kafka-1 :9092", "separate brokers with commas"),
    ("localhost:9092:9092", "not an IP address or a host name"),
    ("::1:9092", "in brackets, e.g. [::1]:9092"),
    ("2001:db8::5:9093", "in brackets, e.g. [::1]:9092"),
    ("kafka:9092,fe80::1:9096", "in brackets, e.g. [::1]:9092"),
    ("kafk$a:9092", "not an IP address or a host name"),
    ("kafkä:9092", "not an IP address or a host name"),
    ("kafka..svc:9092", "not an IP address or a host name"),
    ("kafka.-svc:9092", "not an IP address or a host name"),
    (f"{'k' * 64}.svc:9092", "not an IP address or a host name"),
])
def test_a_broker_list_librdkafka_cannot_read_is_refused(servers: str, says: str) -> None:
    """Taken by check-config, then `run` waited for ever as for an outage: librdkafka
    takes such an entry as one name it cannot resolve (review config25)."""
    assert says in problem(KAFKA_BOOTSTRAP_SERVERS=servers)


@pytest.mark.parametrize("servers", ["10.0.0.1:9092", "[::1]:9092", "kafka-0.kafka:9092",
                                     "kafka_broker:9092", "kafka.:9092", "k:9092", "::1",
                                     "2001:db8::10", "fe80::1,[::1]:9093",
                                     "b-1.msk.example:9096", "1kafka:9092", "127.1:9092",
                                     "10.65535:9092"])
def test_broker_names_and_addresses_are_taken(servers: str) -> None:
    assert load(KAFKA_BOOTSTRAP_SERVERS=servers).bootstrap_servers


@pytest.mark.parametrize("url", ["redis://[1::2::3]:6379/0", "redis://[:::::]",
                                 "redis://999.1.1.1:6379/0"])
def test_a_redis_host_in_brackets_that_is_no_ipv6_address_is_refused(url: str) -> None:
    """check-config took it, and run refused it with advice about the password."""
    assert "is not an IP address" in problem(REDIS_URL=url)


def test_a_redis_host_with_an_empty_label_is_refused() -> None:
    """Taken, `run` stayed on the fallback for ever (no dedup, a partition share of the
    budget) while check-config said OK (review "config41")."""
    assert "redis..svc" in problem(REDIS_URL="redis://redis..svc:6379/0")


def test_url_schemes_are_case_insensitive() -> None:
    """`HTTP://…` was refused with "needs a scheme: e.g. http://HTTP://…" (review "ops23")."""
    settings = load(SCHEMA_REGISTRY_URL="HTTP://schema-registry:8081",
                    REDIS_URL="REDISS://redis:6380/0")
    assert settings.registry_url == "http://schema-registry:8081"
    assert settings.redis is not None and settings.redis.tls
    assert settings.redis.url.reveal() == "rediss://redis:6380/0"


@pytest.mark.parametrize("content", [None, b"", b"\n"])
def test_an_unreadable_api_key_file_is_one_problem_not_two(
        tmp_path: Path, content: bytes | None) -> None:
    """A missing or empty USERPILOT_API_KEY_FILE also listed "USERPILOT_API_KEY is not
    set: copy the … token", which sent the user to Userpilot instead of the mount."""
    path = tmp_path / "token"
    if content is not None:
        path.write_bytes(content)
    env = {k: v for k, v in BASE.items() if k != "USERPILOT_API_KEY"}
    found = problems({**env, "USERPILOT_API_KEY_FILE": str(path)})
    assert len(found) == 1 and found[0].startswith("USERPILOT_API_KEY_FILE="), found


@pytest.mark.parametrize("name", ["KAFKA_GROUP_ID", "KAFKA_BOOTSTRAP_SERVERS",
                                  "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO", "KAFKA_TOPICS",
                                  "USERPILOT_API_KEY", "REDIS_URL", "HTTPS_PROXY",
                                  "WORKER_LOG_LEVEL", "KAFKA_CLIENT_ID"])
def test_a_value_that_is_not_utf8_text_is_refused_once_by_name(name: str) -> None:
    """The environment's undecodable bytes (kept by Python as lone surrogates): librdkafka
    aborted the process on a group id (SIGABRT), crashed on a broker list, and redacting a
    registry password raised (review config25). Refused like any mistake, said once."""
    import os

    value = os.fsdecode(b"value-p\xffss")
    found = problems({**BASE, name: value})
    assert found == [f"{name} holds bytes that are not UTF-8 text: re-enter it"], found
    assert all(value not in line for line in found)


def test_variables_the_worker_does_not_read_may_hold_any_bytes() -> None:
    import os

    assert load_settings({**BASE, "LANG_SOMETHING": os.fsdecode(b"\xff")}).topics


@pytest.mark.parametrize(("endpoint", "example"), [
    ("https://", "e.g. analytex.userpilot.io"), ("//analytex.userpilot.io",
                                                   "e.g. 'analytex.userpilot.io'"),
    ("https://analytex-eu.userpilot.io/v1/track", "e.g. 'analytex-eu.userpilot.io'")])
def test_an_endpoint_with_a_scheme_or_path_is_answered_with_a_host(endpoint: str,
                                                                    example: str) -> None:
    """"e.g. ''" for an endpoint that named no host (review config25)."""
    found = problems({**BASE, "USERPILOT_ANALYTICS_ENDPOINT": endpoint})
    assert any(example in line for line in found), found
    assert not any("e.g. ''" in line for line in found), found


def test_registry_credentials_of_two_lines_are_refused(tmp_path: Path) -> None:
    """Review secrets34: a SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO_FILE of two lines was
    taken, the second line in the password (a 401 that said nothing of it)."""
    secret = tmp_path / "userinfo"
    secret.write_text("user:pw\nx\n")
    env = {**BASE, "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO_FILE": str(secret)}
    message = "\n".join(problems(env))
    assert "holds a line break" in message and "user:pw" not in message
    secret.write_text("user:pw\n")
    assert load_settings(env, check_clients=False) is not None


@pytest.mark.parametrize(("name", "value", "read"), [
    ("KAFKA_SESSION_TIMEOUT_MS", "45s", 45), ("KAFKA_SESSION_TIMEOUT_MS", "010000", 4096),
    ("KAFKA_HEARTBEAT_INTERVAL_MS", "0x2710", 10000),
    ("KAFKA_MESSAGE_MAX_BYTES", "0x100000", 1048576),
    ("KAFKA_MESSAGE_MAX_BYTES", "1048576x", 1048576),
    ("KAFKA_SESSION_TIMEOUT_MS", "4.5e4", 4)])
def test_an_integer_kafka_setting_not_in_plain_decimal_is_refused(name: str, value: str,
                                                                  read: int) -> None:
    """librdkafka reads integers C-style (010000 is 4096, 45s is 45) while the worker's own
    checks read decimal only: such a session timeout passed check-config --online and run
    never joined its group; produce and replay crashed on such a message.max.bytes
    (review "config35")."""
    found = problems({**BASE, name: value})
    assert any(f"{name}={value!r}: write it in plain decimal digits" in p
               and f"librdkafka would read {read}" in p for p in found), found


def test_text_kafka_settings_may_look_like_numbers() -> None:
    assert load(KAFKA_CLIENT_ID="0x12").kafka_extra["client.id"] == "0x12"
    assert load(KAFKA_SESSION_TIMEOUT_MS="45000").kafka_extra["session.timeout.ms"] == "45000"
    # librdkafka's floating-point settings read 010 as 10 and 1e3 as 1000 (review diff35).
    assert load(KAFKA_QUEUE_BUFFERING_MAX_MS="010").kafka_extra["queue.buffering.max.ms"] == "010"
    assert load(KAFKA_LINGER_MS="1e3").kafka_extra["linger.ms"] == "1e3"


def test_consent_on_essential_alone_says_it_gates_nothing() -> None:
    """Review config35: Signal grants essential consent always; check-config said gating was
    on while every event passed."""
    essential = load(USERPILOT_CONSENT_CATEGORIES="essential")
    assert any("gates nothing" in note for note in essential.notes)
    assert not any("gates nothing" in note for note in load().notes)


@pytest.mark.parametrize(("name", "says"), [
    ("KAFKA_SASL_JAAS_CONFIG", "Java's JAAS configuration, which librdkafka does not read: "
                               "set KAFKA_SASL_MECHANISM, KAFKA_SASL_USERNAME and "
                               "KAFKA_SASL_PASSWORD"),
    ("KAFKA_SSL_TRUSTSTORE_LOCATION", "a Java truststore setting"),
    ("KAFKA_SSL_TRUSTSTORE_PASSWORD", "a Java truststore setting"),
    ("KAFKA_SSL_TRUSTSTORE_TYPE", "PEM file in KAFKA_SSL_CA_LOCATION"),
])
def test_java_client_settings_are_named_with_what_to_set_instead(name: str, says: str) -> None:
    """librdkafka's refusal named no variable, and a truststore password was offered
    KAFKA_SSL_KEYSTORE_PASSWORD (review "config41"). The value is never shown."""
    value = 'PlainLoginModule required username="u" password="s3cr3t-jaas";'
    text = problem(**{name: value})
    assert f"{name} is " in text and says in text
    assert "s3cr3t-jaas" not in text


@pytest.mark.parametrize(("written", "sent"), [
    ("user:pass ", "user:pass "), (" user:pass", " user:pass"), ("user:pass\n", "user:pass"),
    ("user:pass\r\n", "user:pass")])
def test_the_registrys_basic_auth_is_taken_as_written_as_kafkas_secrets_are(
        written: str, sent: str, tmp_path: Path) -> None:
    """Trimmed, a password ending in a space met a 401 at `run` while `check-config` said OK,
    and the Kafka secrets were taken as written (review "config44"); one trailing line break
    goes, as from a `*_FILE`."""
    assert load(SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO=written).registry_auth == Secret(sent)
    path = tmp_path / "auth"
    path.write_text(written, encoding="utf-8")
    assert load(SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO_FILE=str(path)).registry_auth \
        == Secret(sent)
    assert load(SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO=" \n").registry_auth is None


@pytest.mark.parametrize("value", ["1000", "5000", " 16383 ", "+4000"])
def test_a_message_max_bytes_below_a_dead_letters_headers_is_refused(value: str) -> None:
    """Review dlqfail44: the producer's limit is the dead letters' too; below the worker's
    own headers (~5 KB, the record without its value) a dead letter was never written and
    its partition stopped for good, while check-config said OK."""
    assert any("KAFKA_MESSAGE_MAX_BYTES" in p and "16384" in p
               for p in problems({**BASE, "KAFKA_MESSAGE_MAX_BYTES": value}))
    assert load(KAFKA_MESSAGE_MAX_BYTES="16384").kafka_extra["message.max.bytes"] == "16384"


@pytest.mark.parametrize("password", [None, "wrong", "right"])
def test_an_encrypted_key_s_password_is_named_with_its_file(tmp_path: Path,
                                                            password: str | None) -> None:
    """Review "sasl55": librdkafka names the key file for a wrong (or missing) password of an
    encrypted key, and so did the problem: KAFKA_SSL_KEY_LOCATION alone."""
    import subprocess

    from tests.certificates import self_signed

    cert, key = self_signed(tmp_path)
    encrypted = tmp_path / "encrypted.pem"
    subprocess.run(["openssl", "pkey", "-in", str(key), "-aes256", "-passout", "pass:right",
                    "-out", str(encrypted)], check=True, capture_output=True)
    env = {**BASE, "KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CERTIFICATE_LOCATION": str(cert),
           "KAFKA_SSL_KEY_LOCATION": str(encrypted)}
    if password is not None:
        env["KAFKA_SSL_KEY_PASSWORD"] = password
    if password == "right":
        load_settings(env)  # taken
        return
    found = [p for p in problems(env) if "KAFKA_SSL_KEY_LOCATION" in p]
    if password is None:
        assert len(found) == 1 and ("(set by KAFKA_SSL_KEY_LOCATION; an encrypted key also "
                                    "needs KAFKA_SSL_KEY_PASSWORD)") in found[0], found
    else:
        assert len(found) == 1 and (
            "(set by KAFKA_SSL_KEY_LOCATION, KAFKA_SSL_KEY_PASSWORD)" in found[0]), found
        assert "wrong" not in found[0]


@pytest.mark.parametrize("value", ["1", "4", " 15 ", "+8"])
def test_a_producer_queue_smaller_than_a_dead_letter_is_refused(value: str) -> None:
    """Review "pass56": a dead letter larger than the producer's whole queue was refused
    locally ("Queue full") for good and held its partition, while check-config said OK."""
    assert any("KAFKA_QUEUE_BUFFERING_MAX_KBYTES" in p and "at least 16" in p
               for p in problems({**BASE, "KAFKA_QUEUE_BUFFERING_MAX_KBYTES": value}))
    assert load(KAFKA_QUEUE_BUFFERING_MAX_KBYTES="16").kafka_extra[
        "queue.buffering.max.kbytes"] == "16"


def test_a_grace_reaching_the_poll_interval_is_noted() -> None:
    """A revoke's drain (the grace and 30 s more) runs in the rebalance callback: past
    max.poll.interval.ms the worker is out of the group and its commit refused (review
    "clock45"); said at start-up, as a drain is mostly short."""
    long = load_settings({**BASE, "WORKER_SHUTDOWN_GRACE_SECONDS": "280"})
    assert any("WORKER_SHUTDOWN_GRACE_SECONDS=280" in note and "300000" in note
               for note in long.notes)
    tight = load_settings({**BASE, "KAFKA_MAX_POLL_INTERVAL_MS": "50000"})
    assert any("KAFKA_MAX_POLL_INTERVAL_MS=50000" in note for note in tight.notes)
    assert not any("WORKER_SHUTDOWN_GRACE_SECONDS" in note
                   for note in load_settings(BASE).notes)
    # 30 s below, as README asks: not noted (review diff45)
    assert not any("WORKER_SHUTDOWN_GRACE_SECONDS" in note for note in load_settings(
        {**BASE, "WORKER_SHUTDOWN_GRACE_SECONDS": "270"}).notes)


@pytest.mark.parametrize("name, value", [
    ("REDIS_URL", "redis://:$(REDIS_PASSWORD)@redis:6379/0"),
    ("REDIS_URL", "redis://HUNTER2:$(REDIS_PASSWORD)@redis:6379/0"),
    ("USERPILOT_API_KEY", "$(API_TOKEN)"),
    ("https_proxy", "http://HUNTER2:$(PROXY_PASSWORD)@proxy:3128"),
])
def test_an_unexpanded_kubernetes_reference_is_refused(name: str, value: str) -> None:
    """Review "helm52": `$(REDIS_PASSWORD)` in a value Kubernetes did not expand (a Secret's
    data, or a variable defined after it) reached Redis as the password: every pod exited 1
    with a message to check the password. Refused naming the reference, not the value."""
    (problem,) = problems({**BASE, name: value})
    assert problem.startswith(f"{name} holds a $(...), a Kubernetes reference")
    assert "not expanded" in problem
    assert "HUNTER2" not in problem and "PASSWORD" not in problem and "TOKEN" not in problem
    # Named when the environment has that variable (defined after it): no secret then.
    reference = value.split("$(")[1].split(")")[0]
    (problem,) = problems({**BASE, reference: "x", name: value})
    assert problem.startswith(f"{name} holds $({reference}), a Kubernetes reference")


def test_a_meant_dollar_and_kafkas_sasl_settings_are_not_refused() -> None:
    """A URL's `$` written %24 is no reference; Kafka's SASL password and the registry's
    credentials have no escape, so a reference there is a note, naming no piece of the
    password (review "diff52a"); `explain` (offline) sends no token."""
    load(REDIS_URL="redis://:a%24(B)c@redis:6379/0")
    settings = load(KAFKA_SECURITY_PROTOCOL="sasl_ssl", KAFKA_SASL_MECHANISM="PLAIN",
                    KAFKA_SASL_USERNAME="u", KAFKA_SASL_PASSWORD="Xk$(Zq9Secret)q",
                    SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO="user:$(Reg9Secret)")
    notes = [n for n in settings.notes if "not expanded" in n]
    assert [n.split(" ")[0] for n in notes] == ["KAFKA_SASL_PASSWORD",
                                               "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO"]
    assert not any("Zq9Secret" in n or "Reg9Secret" in n or "%24" in n for n in notes)
    assert "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO_FILE" in notes[1]
    load_settings({**BASE, "USERPILOT_API_KEY": "$(TOKEN)"}, offline=True)


def test_a_reference_in_any_kafka_secret_is_a_note() -> None:
    """Review "config53": the OAuth client secret got neither a refusal nor a note."""
    settings = load(KAFKA_SECURITY_PROTOCOL="sasl_ssl", KAFKA_SASL_MECHANISM="OAUTHBEARER",
                    KAFKA_SASL_OAUTHBEARER_METHOD="oidc",
                    KAFKA_SASL_OAUTHBEARER_CLIENT_ID="cid",
                    KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET="$(OIDC_SECRET)",
                    KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL="https://idp:8443/t")
    notes = [n for n in settings.notes if "not expanded" in n]
    assert [n.split(" ")[0] for n in notes] == ["KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET"]


def test_a_kafka_url_setting_without_a_scheme_is_masked() -> None:
    """Review "logsec52": libcurl takes `user:password@idp:8443/token` as http://, and
    `check-config` showed its password (only a value with `://` was masked)."""
    settings = load(KAFKA_SECURITY_PROTOCOL="sasl_ssl", KAFKA_SASL_MECHANISM="OAUTHBEARER",
                    KAFKA_SASL_OAUTHBEARER_METHOD="oidc",
                    KAFKA_SASL_OAUTHBEARER_CLIENT_ID="cid",
                    KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET="client-s3cret-value",
                    KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL="user:Zq9SecretPw77@idp:8443/t")
    shown = json.dumps(settings.describe())
    assert "Zq9SecretPw77" not in shown
    assert "***@idp:8443/t" in shown
    assert "Zq9SecretPw77" in settings.log_secrets()


def test_a_rate_above_userpilots_limit_is_noted_for_its_hosts() -> None:
    """Userpilot's cloud allows 600 requests a minute per token: above it every extra request
    meets a 429 and is sent again (seed51 leftover). Not for another host (the sandbox, a
    benchmark), nor at or below the limit, however the period is written."""
    def rate_notes(**over: str) -> list[str]:
        return [n for n in load(**over).notes if "USERPILOT_RATE_LIMIT=" in n]

    (note,) = rate_notes(USERPILOT_RATE_LIMIT="1200")
    assert "20 requests/s" in note and "600 per minute" in note
    assert rate_notes(USERPILOT_RATE_LIMIT="11", USERPILOT_RATE_PERIOD_SECONDS="1")
    assert rate_notes(USERPILOT_ANALYTICS_ENDPOINT="analytex-eu.userpilot.io:443",
                      USERPILOT_RATE_LIMIT="601")
    assert not rate_notes()
    assert not rate_notes(USERPILOT_RATE_LIMIT="10", USERPILOT_RATE_PERIOD_SECONDS="1")
    assert not rate_notes(USERPILOT_RATE_LIMIT="5", USERPILOT_RATE_PERIOD_SECONDS="0.5")
    assert not rate_notes(USERPILOT_ANALYTICS_ENDPOINT="sandbox:8080",
                          USERPILOT_RATE_LIMIT="100000")


def test_a_dotted_key_in_properties_or_rename_gets_a_note(tmp_path: Any) -> None:
    """Review "mappings48": `properties` and `rename` name flattened keys (`plan_tier`),
    `fields` dotted paths; "plan.tier" there selected nothing without a word. A property
    literally named so is matched, so a note, not a refusal."""
    path = tmp_path / "mappings.json"
    path.write_text(json.dumps({"events": {"Feature Used": {
        "properties": ["feature", "plan.tier"], "rename": {"plan.tier": "tier"}}}}))
    notes = [n for n in load(USERPILOT_MAPPINGS_FILE=str(path)).notes if "plan.tier" in n]
    assert len(notes) == 1 and "'plan_tier'" in notes[0], notes
    path.write_text(json.dumps({"events": {"Feature Used": {"properties": ["plan_tier"]}}}))
    assert not [n for n in load(USERPILOT_MAPPINGS_FILE=str(path)).notes if "dot" in n]
    # identify's exclude, the privacy control, above all (review "diff48b").
    path.write_text(json.dumps({"identify": {"exclude": ["address.street"]},
                                "group": {"pick": ["hq.city"]}}))
    notes = [n for n in load(USERPILOT_MAPPINGS_FILE=str(path)).notes if "has a dot" in n]
    assert [n.split(":")[1].strip() for n in notes] == ["identify", "group"], notes
    assert "'address_street'" in notes[0]


def test_registry_credentials_in_the_url_and_the_setting_are_a_note() -> None:
    """Review "registry54": with both, the URL's pair was dropped without a word."""
    both = load(SCHEMA_REGISTRY_URL="https://u:RegPw12345@registry.example",
                SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO="v:Other6789")
    said = [n for n in both.notes if "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO is set too" in n]
    assert len(said) == 1 and "RegPw12345" not in said[0] and "Other6789" not in said[0]
    for env in ({"SCHEMA_REGISTRY_URL": "https://u:RegPw12345@registry.example"},
                {"SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO": "v:Other6789"}):
        one = load(**env)
        assert not [n for n in one.notes if "is set too" in n]


def test_a_dlq_guard_one_dead_letter_trips_is_a_note() -> None:
    """Review "extremes54": WORKER_DLQ_MAX_RATIO=0.05 with WORKER_DLQ_WINDOW=10 stopped the
    worker at the first dead letter, and again after every restart."""
    tight = load(WORKER_DLQ_MAX_RATIO="0.05", WORKER_DLQ_WINDOW="10")
    assert [n for n in tight.notes if "trips the DLQ guard" in n] == [
        "WORKER_DLQ_MAX_RATIO=0.05 × WORKER_DLQ_WINDOW=10 is below 1: a single dead letter "
        "trips the DLQ guard, which stops the worker at the first bad event and after every "
        "restart; raise the window to at least 20"]
    for fine in ({}, {"WORKER_DLQ_MAX_RATIO": "0.05", "WORKER_DLQ_WINDOW": "20"}):
        assert not [n for n in load(**fine).notes if "trips the DLQ guard" in n]


def test_a_dedup_ttl_within_two_commit_intervals_is_a_note() -> None:
    """Review "extremes54": with the TTL (60 s) under the commit interval (300 s), events
    finished above one still retrying expired from Redis before a commit named them: 23 of
    57 sent twice after a SIGKILL."""
    redis = {"REDIS_URL": "redis://r:6379/0", "REDIS_DEDUP_TTL_SECONDS": "60",
             "USERPILOT_RETRY_BUDGET_SECONDS": "55"}
    said = [n for n in load(**redis, WORKER_COMMIT_INTERVAL_SECONDS="300").notes
            if "WORKER_COMMIT_INTERVAL_SECONDS" in n]
    assert len(said) == 1 and said[0].startswith(
        "REDIS_DEDUP_TTL_SECONDS=60 is not above twice WORKER_COMMIT_INTERVAL_SECONDS=300")
    assert not [n for n in load(**redis).notes if "WORKER_COMMIT_INTERVAL_SECONDS" in n]


def test_one_metadata_key_is_refused() -> None:
    """Review "extremes54": at 1 the cut marker took the only key: every event of two keys
    or more was sent as `{"_truncated": N}` alone."""
    assert "USERPILOT_MAX_METADATA_KEYS" in problem(USERPILOT_MAX_METADATA_KEYS="1")
    assert load(USERPILOT_MAX_METADATA_KEYS="2").mappings.max_metadata_keys == 2


@pytest.mark.parametrize(("value", "said"), [
    ("\ufeffuserpilot-delivery", "U+FEFF (a byte order mark"),
    ("userpilot\u200b-delivery", "U+200B (a zero-width space"),
    ("userpilot-delivery\u2060", "U+2060 (WORD JOINER)"),
])
def test_an_invisible_character_in_a_setting_is_refused_by_code_point(value: str,
                                                                      said: str) -> None:
    """Review "env60": a group id with a byte order mark (a Windows file made into a Secret)
    or a pasted zero-width space looked the same in check-config and the logs, and was
    another consumer group: the whole topic was sent again. Refused, the value unshown."""
    found = problem(KAFKA_GROUP_ID=value)
    assert found.startswith("KAFKA_GROUP_ID holds an invisible character, " + said), found
    assert "userpilot" not in found
    secret = problems({**BASE, "KAFKA_SASL_PASSWORD": "\ufeffs3cret-pw",
                       "KAFKA_SASL_MECHANISM": "PLAIN", "KAFKA_SASL_USERNAME": "u",
                       "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT"})
    assert secret[0].startswith("KAFKA_SASL_PASSWORD holds an invisible character"), secret
    assert "s3cret" not in "\n".join(secret)


def test_a_secret_files_byte_order_mark_is_dropped_and_utf16_is_named(tmp_path: Path) -> None:
    """Review "env60": a leading byte order mark is the file's encoding (Notepad's UTF-8),
    not the token's; a UTF-16 file (PowerShell's `>`) was told to check its path and
    permissions."""
    token = tmp_path / "token"
    token.write_bytes(b"\xef\xbb\xbf" + TOKEN.encode() + b"\r\n")
    env = {k: v for k, v in BASE.items() if k != "USERPILOT_API_KEY"}
    s = load_settings({**env, "USERPILOT_API_KEY_FILE": str(token)})
    assert s.api_key == Secret(TOKEN)
    token.write_bytes(TOKEN.encode("utf-16"))
    found = problems({**env, "USERPILOT_API_KEY_FILE": str(token)})
    assert found == [f"USERPILOT_API_KEY_FILE={str(token)!r} is not UTF-8 text (UTF-16, as "
                     "PowerShell's > writes): save the value as UTF-8"], found


def test_settings_are_utf8_whatever_the_locale(monkeypatch: pytest.MonkeyPatch) -> None:
    """Review "env60": under a Latin-1 locale Python decoded `KAFKA_GROUP_ID=grüppe` as
    `grÃ¼ppe` (another consumer group); the values are read as the UTF-8 bytes they are."""
    import sys

    monkeypatch.setattr(sys, "getfilesystemencoding", lambda: "latin-1")
    as_latin1 = "grüppe".encode().decode("latin-1")  # what os.environ holds then
    assert load(KAFKA_GROUP_ID=as_latin1).group_id == "grüppe"


def test_a_service_link_in_the_metrics_port_is_named_so() -> None:
    """Review "env60": a Service named `worker-metrics` gives WORKER_METRICS_PORT=tcp://…,
    refused as "not a whole number" with nothing saying where it came from."""
    said = problem(WORKER_METRICS_PORT="tcp://10.96.0.9:8082")
    assert "service link of a Service named worker-metrics" in said, said
    assert "enableServiceLinks: false" in said
    assert "service link" not in problem(WORKER_METRICS_PORT="80a")


def test_joiners_in_emoji_and_words_are_not_refused_as_invisible() -> None:
    """Review "diff60b": refusing every format character refused an emoji password (its
    zero-width joiners), which Kafka's SASL takes as any UTF-8; a zero-width non-joiner is
    part of Persian words. Only characters no value holds on purpose are refused, and the
    group id's refusal says to carry its offsets over first."""
    s = load(KAFKA_SASL_PASSWORD="pw-\U0001f469\u200d\U0001f4bb", KAFKA_SASL_MECHANISM="PLAIN",
             KAFKA_SASL_USERNAME="u", KAFKA_SECURITY_PROTOCOL="SASL_PLAINTEXT",
             KAFKA_CLIENT_ID="worker-\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645")
    assert s.kafka_config()["client.id"].endswith("\u200c\u062e\u0648\u0627\u0647\u0645")
    said = problem(KAFKA_GROUP_ID="\ufeffuserpilot-delivery")
    assert "give the new name the old group's offsets first" in said, said
    assert "\u202e" not in problem(KAFKA_CLIENT_ID="worker\u202eevil")  # a bidi override
    # Review "diff60c": every other format character is refused (a soft hyphen, a direction
    # mark), and in the group id the joiners too: a pasted one is another group.
    for char in ("\u00ad", "\u200e", "\u2063", "\u3164", "\u034f", "\u2800"):
        assert f"U+{ord(char):04X}" in problem(KAFKA_CLIENT_ID=f"worker{char}x")
    # Review "diff60d": in the group id, every character that renders as nothing.
    for char in ("\u200d", "\ufe0f", "\u1160", "\u17b4"):
        assert f"U+{ord(char):04X}" in problem(KAFKA_GROUP_ID=f"user{char}pilot")
    # A format character that shows (U+0600 ARABIC NUMBER SIGN) is no invisible one.
    assert load(KAFKA_CLIENT_ID="worker\u0600x").kafka_config()["client.id"].endswith("x")


def test_the_oidc_ca_file_goes_to_librdkafka_as_its_own_bytes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Review "diff60c": under a Latin-1 locale $SSL_CERT_FILE reached librdkafka as the
    UTF-8 encoding of the locale's reading of its bytes, another file: `run` exited 1 where
    `check-config` passed. It goes as the path's own bytes."""
    import os

    from consumer import tls

    utf8_bytes = "/etc/sécret/ca.pem".encode()
    monkeypatch.setenv("SSL_CERT_FILE", utf8_bytes.decode("latin-1"))  # the locale's reading
    monkeypatch.setattr(os, "fsencode", lambda path: path.encode("latin-1"))
    assert tls.ca_location() == "/etc/sécret/ca.pem"


def test_an_oidc_ca_file_whose_path_is_not_utf8_is_refused(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Review "diff60d": a Latin-1 file name (b"s\xe9cret") reached librdkafka as a lone
    surrogate, and `run` died on a SystemError after check-config said OK. Refused first;
    the same path without OIDC, which only Python opens, is taken."""
    import os
    import shutil

    import certifi

    pem = tmp_path / "ca.pem"
    shutil.copy(certifi.where(), pem)
    monkeypatch.setattr(os, "fsencode", lambda path: b"/tmp/s\xe9cret.pem")
    oidc = {"KAFKA_SASL_OAUTHBEARER_METHOD": "oidc", "KAFKA_SASL_MECHANISM": "OAUTHBEARER",
            "KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_OAUTHBEARER_CLIENT_ID": "c",
            "KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET": "s",
            "KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL": "https://idp.example/token"}
    found = problems({**BASE, **oidc, "SSL_CERT_FILE": str(pem)})
    assert any(p.startswith("SSL_CERT_FILE names a path whose bytes are not UTF-8")
               for p in found), found
    assert load(SSL_CERT_FILE=str(pem)).kafka_config().get("https.ca.location") is None
