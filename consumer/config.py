"""The one settings object, read from the environment and validated at start-up.

Every mistake is collected (not just the first) and reported with what to enter instead,
so one failed start tells an operator everything to fix. Secrets are held in `Secret`,
whose repr is redacted, so they cannot leak through logs, exceptions or `check-config`.
"""

from __future__ import annotations

import math
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

from consumer.errors import ConfigError
from consumer.filtering import ConsentPolicy
from consumer.mapping import DEFAULT_PRESET, MappingsError, MappingSet, load_mappings

__all__ = [
    "ENV_VARS",
    "SECRET_KAFKA_KEYS",
    "Secret",
    "Settings",
    "is_known_env_var",
    "load_settings",
]

API_VERSION = "2020-09-22"

ENV_VARS: frozenset[str] = frozenset({
    "USERPILOT_API_KEY",
    "USERPILOT_ANALYTICS_ENDPOINT",
    "USERPILOT_INSECURE_HTTP",
    "USERPILOT_CONSENT_CATEGORIES",
    "USERPILOT_CONSENT_MISSING",
    "USERPILOT_MAPPINGS_FILE",
    "USERPILOT_RATE_LIMIT",
    "USERPILOT_RATE_PERIOD_SECONDS",
    "USERPILOT_RATE_BURST",
    "USERPILOT_REQUEST_TIMEOUT_SECONDS",
    "USERPILOT_RETRY_MAX_ATTEMPTS",
    "USERPILOT_RETRY_BUDGET_SECONDS",
    "USERPILOT_RETRY_BACKOFF_SECONDS",
    "USERPILOT_RETRY_BACKOFF_MAX_SECONDS",
    "USERPILOT_MAX_CONNECTIONS",
    "USERPILOT_CA_BUNDLE",
    "KAFKA_BOOTSTRAP_SERVERS",
    "KAFKA_TOPICS",
    "KAFKA_GROUP_ID",
    "KAFKA_DLQ_TOPIC",
    "SCHEMA_REGISTRY_URL",
    "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO",
    "WORKER_MAX_IN_FLIGHT",
    "WORKER_SHUTDOWN_GRACE_SECONDS",
    "WORKER_COMMIT_INTERVAL_SECONDS",
    "WORKER_METRICS_PORT",
    "WORKER_LOG_FORMAT",
    "WORKER_LOG_LEVEL",
    "WORKER_DLQ_MAX_RATIO",
    "WORKER_DLQ_WINDOW",
    "WORKER_DLQ_MAX_CONSECUTIVE",
    "WORKER_REPLAY_MAX",
})
"""Every variable the worker reads, besides the KAFKA_* pass-through to librdkafka."""

_KAFKA_RESERVED = frozenset({"KAFKA_BOOTSTRAP_SERVERS", "KAFKA_TOPICS", "KAFKA_GROUP_ID",
                             "KAFKA_DLQ_TOPIC"})
_PASSTHROUGH = re.compile(r"^KAFKA_[A-Z0-9]+(?:_[A-Z0-9]+)*$")
# librdkafka settings the worker owns: letting them through would break at-least-once.
_KAFKA_OWNED = frozenset({
    "enable.auto.commit", "enable.auto.offset.store", "group.id", "bootstrap.servers",
    "partition.assignment.strategy", "auto.offset.reset", "isolation.level",
})
_KAFKA_OVERRIDABLE_OWNED = frozenset({"auto.offset.reset", "isolation.level"})
SECRET_KAFKA_KEYS = frozenset({
    "sasl.password", "ssl.key.password", "sasl.oauthbearer.client.secret",
    "ssl.keystore.password", "ssl.key.pem", "sasl.oauthbearer.config",
})
_HOST = re.compile(
    r"^(?=.{1,253}(?::\d{1,5})?$)"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
    r"(?::(\d{1,5}))?$"
)
_SERVICE_LINK = re.compile(r"^KAFKA_(PORT|SERVICE_HOST|SERVICE_PORT)(_.*)?$")
_TOPIC = re.compile(r"^(?!\.\.?$)[A-Za-z0-9._-]{1,249}$")  # Kafka refuses "." and ".."
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def is_known_env_var(name: str) -> bool:
    """True for a variable the worker reads, including valid KAFKA_* pass-through names."""
    return name in ENV_VARS or bool(_PASSTHROUGH.match(name))


class Secret:
    """A string that never shows itself in repr, str, logs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The real value; call only where it is sent (an HTTP header, librdkafka)."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class Settings:
    """Everything the worker needs, checked; built by `load_settings`."""

    api_key: Secret
    analytics_endpoint: str
    insecure_http: bool
    consent: ConsentPolicy
    mappings: MappingSet
    mappings_file: str | None
    rate_limit: int
    rate_period_s: float
    rate_burst: int
    request_timeout_s: float
    retry_max_attempts: int
    retry_budget_s: float
    retry_backoff_s: float
    retry_backoff_max_s: float
    max_connections: int
    bootstrap_servers: str
    topics: tuple[str, ...]
    group_id: str
    dlq_topic: str
    kafka_extra: Mapping[str, str | Secret]
    registry_url: str
    registry_auth: Secret | None
    max_in_flight: int
    shutdown_grace_s: float
    commit_interval_s: float
    metrics_port: int
    log_format: Literal["text", "json"]
    log_level: str
    dlq_max_ratio: float
    dlq_window: int
    dlq_max_consecutive: int
    replay_max: int
    ca_bundle: str | None = None  # USERPILOT_CA_BUNDLE: PEM file of CAs to trust for HTTPS

    @property
    def track_url(self) -> str:
        scheme = "http" if self.insecure_http else "https"
        return f"{scheme}://{self.analytics_endpoint}/v1/track"

    def headers(self) -> dict[str, str]:
        """Userpilot's required headers, token included: send them, never log them."""
        return {
            "Content-Type": "application/json",
            "Authorization": f"Token {self.api_key.reveal()}",
            "X-API-Version": API_VERSION,
        }

    def kafka_config(self) -> dict[str, str]:
        """librdkafka settings with secrets revealed, for the Kafka edge only."""
        conf = {"bootstrap.servers": self.bootstrap_servers}
        for key, value in self.kafka_extra.items():
            conf[key] = value.reveal() if isinstance(value, Secret) else value
        return conf

    def describe(self) -> dict[str, Any]:
        """The effective configuration with every secret redacted (for check-config)."""
        return {
            "userpilot": {
                "track_url": self.track_url,
                "api_key": "***" if self.api_key.reveal() else "",
                "insecure_http": self.insecure_http,
                "rate_limit": f"{self.rate_limit} per {self.rate_period_s:g} s "
                              f"(burst {self.rate_burst})",
                "request_timeout_seconds": self.request_timeout_s,
                "retry": {"max_attempts": self.retry_max_attempts,
                          "budget_seconds": self.retry_budget_s,
                          "backoff_seconds": self.retry_backoff_s,
                          "backoff_max_seconds": self.retry_backoff_max_s},
                "max_connections": self.max_connections,
                "ca_bundle": self.ca_bundle,
            },
            "consent": {"categories": list(self.consent.categories),
                        "missing": self.consent.missing},
            "mappings": {"file": self.mappings_file, "events": self.mappings.describe()},
            "kafka": {
                "bootstrap_servers": self.bootstrap_servers,
                "topics": list(self.topics),
                "group_id": self.group_id,
                "dlq_topic": self.dlq_topic,
                "extra": {k: ("***" if isinstance(v, Secret) else v)
                          for k, v in self.kafka_extra.items()},
            },
            "schema_registry": {"url": re.sub(r"//[^/@]*@", "//***@", self.registry_url),
                                "basic_auth": "***" if self.registry_auth else None},
            "worker": {
                "max_in_flight": self.max_in_flight,
                "shutdown_grace_seconds": self.shutdown_grace_s,
                "commit_interval_seconds": self.commit_interval_s,
                "metrics_port": self.metrics_port,
                "log_format": self.log_format,
                "log_level": self.log_level,
                "dlq_guard": {"max_ratio": self.dlq_max_ratio, "window": self.dlq_window,
                              "max_consecutive": self.dlq_max_consecutive},
                "replay_max": self.replay_max,
            },
        }


def _ca_bundle(r: _Reader) -> str | None:
    """USERPILOT_CA_BUNDLE: a readable PEM file of CA certificates (a corporate CA)."""
    path = r.text("USERPILOT_CA_BUNDLE")
    if path is None:
        return None
    try:
        ssl.create_default_context(cafile=path)
    except (OSError, ssl.SSLError) as exc:
        r.problems.append(
            f"USERPILOT_CA_BUNDLE={path!r} is not a readable PEM file of CA certificates "
            f"({type(exc).__name__}): mount the bundle and give its path"
        )
        return None
    return path


class _Reader:
    """Reads typed values from the environment, collecting every problem."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[str] = []

    def text(self, name: str, default: str | None = None) -> str | None:
        raw = self.env.get(name)
        if raw is None or raw.strip() == "":
            return default
        return raw.strip()

    def required(self, name: str, hint: str) -> str:
        value = self.text(name)
        if value is None:
            self.problems.append(f"{name} is not set: {hint}")
            return ""
        return value

    def boolean(self, name: str, default: bool) -> bool:
        raw = self.text(name)
        if raw is None:
            return default
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        self.problems.append(f"{name}={raw!r} is not a boolean: use true or false")
        return default

    def integer(self, name: str, default: int, low: int, high: int | None = None) -> int:
        raw = self.text(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            self.problems.append(f"{name}={raw!r} is not a whole number: use e.g. {default}")
            return default
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            self.problems.append(f"{name}={value} is out of range: use a number {bound}")
            return default
        return value

    def number(self, name: str, default: float, low: float, high: float | None = None,
               *, inclusive_low: bool = False) -> float:
        raw = self.text(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            self.problems.append(f"{name}={raw!r} is not a number: use e.g. {default:g}")
            return default
        too_low = value < low if inclusive_low else value <= low
        if not math.isfinite(value) or too_low or (high is not None and value > high):
            rel = ">=" if inclusive_low else ">"
            bound = f"{rel} {low:g}" + (f" and <= {high:g}" if high is not None else "")
            self.problems.append(f"{name}={raw} is out of range: use a number {bound}")
            return default
        return value

    def choice(self, name: str, default: str, allowed: tuple[str, ...]) -> str:
        raw = self.text(name, default)
        assert raw is not None
        if raw.lower() not in allowed:
            self.problems.append(f"{name}={raw!r} is not allowed: use one of {', '.join(allowed)}")
            return default
        return raw.lower()


def _check_endpoint(reader: _Reader) -> str:
    raw = reader.required(
        "USERPILOT_ANALYTICS_ENDPOINT",
        "enter your analytics host from Userpilot's Environment page, e.g. analytex.userpilot.io "
        "(EU: analytex-eu.userpilot.io)",
    )
    if not raw:
        return ""
    host = raw
    if "://" in host:
        host = host.split("://", 1)[1]
        reader.problems.append(
            f"USERPILOT_ANALYTICS_ENDPOINT={raw!r} has a scheme: enter the host only, "
            f"e.g. {host.split('/', 1)[0]!r}"
        )
        return host.split("/", 1)[0]
    if "/" in host:
        reader.problems.append(
            f"USERPILOT_ANALYTICS_ENDPOINT={raw!r} has a path: enter the host only, "
            f"e.g. {host.split('/', 1)[0]!r} (the worker adds /v1/track itself)"
        )
        return host.split("/", 1)[0]
    match = _HOST.match(host)
    if match is None:
        reader.problems.append(
            f"USERPILOT_ANALYTICS_ENDPOINT={raw!r} is not a host name: enter e.g. "
            "analytex.userpilot.io (letters, digits, dots and dashes, optionally :port)"
        )
    elif match.group(1) is not None and not 0 < int(match.group(1)) < 65536:
        reader.problems.append(f"USERPILOT_ANALYTICS_ENDPOINT={raw!r} has an invalid port")
    return host


def _check_api_key(reader: _Reader) -> Secret:
    raw = reader.env.get("USERPILOT_API_KEY", "")
    value = raw.strip()
    if not value:
        reader.problems.append(
            "USERPILOT_API_KEY is not set: copy the application write token (not the "
            "read/export token) from Userpilot's Environment page"
        )
    elif value.lower().startswith("token "):
        reader.problems.append(
            "USERPILOT_API_KEY starts with 'Token ': enter the token alone; the worker adds "
            "the 'Token' prefix to the Authorization header itself"
        )
    elif any(ch.isspace() for ch in value) or not value.isprintable():
        reader.problems.append(
            "USERPILOT_API_KEY contains spaces or control characters: paste the token alone"
        )
    return Secret(value)


def _kafka_extra(reader: _Reader) -> dict[str, str | Secret]:
    extra: dict[str, str | Secret] = {}
    for name in sorted(reader.env):
        if not name.startswith("KAFKA_") or name in _KAFKA_RESERVED:
            continue
        if _SERVICE_LINK.match(name):
            continue  # Kubernetes service links for a Service named "kafka", not settings
        if not _PASSTHROUGH.match(name):
            reader.problems.append(
                f"{name} is not a valid pass-through name: use KAFKA_ plus the librdkafka "
                "setting in upper case with dots as underscores, e.g. KAFKA_SASL_MECHANISM"
            )
            continue
        key = name[len("KAFKA_"):].lower().replace("_", ".")
        if key in _KAFKA_OWNED and key not in _KAFKA_OVERRIDABLE_OWNED:
            reader.problems.append(
                f"{name} sets {key}, which the worker manages itself to keep at-least-once "
                "delivery: remove it"
            )
            continue
        value = reader.env[name]
        extra[key] = Secret(value) if key in SECRET_KAFKA_KEYS else value
    return extra


def _topics(reader: _Reader) -> tuple[str, ...]:
    raw = reader.required(
        "KAFKA_TOPICS", "enter the Signal delivery topic(s), comma-separated, e.g. "
        "delivery-userpilot"
    )
    topics = tuple(t.strip() for t in raw.split(",") if t.strip())
    for topic in topics:
        if not _TOPIC.match(topic):
            reader.problems.append(
                f"KAFKA_TOPICS has {topic!r}, which is not a legal topic name (letters, "
                "digits, '.', '_', '-', at most 249 characters)"
            )
    if raw and not topics:
        reader.problems.append("KAFKA_TOPICS lists no topic: enter at least one topic name")
    if len(set(topics)) != len(topics):
        reader.problems.append("KAFKA_TOPICS lists a topic twice: list each topic once")
    return topics


_OFFLINE_DEFAULTS = {
    "USERPILOT_API_KEY": "unused-by-explain",
    "USERPILOT_ANALYTICS_ENDPOINT": "analytex.userpilot.io",
    "KAFKA_BOOTSTRAP_SERVERS": "unused:9092",
    "KAFKA_TOPICS": "unused",
    "SCHEMA_REGISTRY_URL": "http://unused",
}


def load_settings(env: Mapping[str, str], *, offline: bool = False) -> Settings:
    """Build and validate Settings; ConfigError lists every problem found, one per line.

    `offline` (for `explain`) fills connection settings that are not set with
    placeholders: the event decisions depend only on consent and mappings.
    """
    if offline:
        env = {**_OFFLINE_DEFAULTS, **{k: v for k, v in env.items() if v.strip()}}
    r = _Reader(env)
    api_key = _check_api_key(r)
    endpoint = _check_endpoint(r)
    insecure = r.boolean("USERPILOT_INSECURE_HTTP", False)

    categories = tuple(
        c.strip().lower() for c in (r.text("USERPILOT_CONSENT_CATEGORIES", "analytics") or "")
        .split(",") if c.strip()
    )
    for cat in categories:
        if not re.fullmatch(r"[a-z0-9_.-]{1,64}", cat):
            r.problems.append(
                f"USERPILOT_CONSENT_CATEGORIES has {cat!r}: use category names such as "
                "analytics, functional, marketing, advertising, personalization"
            )
    missing = r.choice("USERPILOT_CONSENT_MISSING", "deny", ("deny", "allow"))
    consent = ConsentPolicy(categories=categories, missing=cast(Literal["deny", "allow"], missing))

    mappings_file = r.text("USERPILOT_MAPPINGS_FILE")
    mappings = DEFAULT_PRESET
    if mappings_file:
        try:
            mappings = load_mappings(mappings_file)
        except MappingsError as exc:
            r.problems.append(f"USERPILOT_MAPPINGS_FILE: {exc}")
        except OSError as exc:
            r.problems.append(
                f"USERPILOT_MAPPINGS_FILE={mappings_file!r} cannot be read "
                f"({exc.strerror}): check the path and permissions"
            )

    rate_limit = r.integer("USERPILOT_RATE_LIMIT", 600, 1)
    rate_period = r.number("USERPILOT_RATE_PERIOD_SECONDS", 60.0, 0.0)
    rate_burst = r.integer("USERPILOT_RATE_BURST", 1, 1, max(1, rate_limit))
    timeout = r.number("USERPILOT_REQUEST_TIMEOUT_SECONDS", 10.0, 0.0, 300.0)
    attempts = r.integer("USERPILOT_RETRY_MAX_ATTEMPTS", 12, 1, 1000)
    budget = r.number("USERPILOT_RETRY_BUDGET_SECONDS", 900.0, 0.0)
    backoff = r.number("USERPILOT_RETRY_BACKOFF_SECONDS", 1.0, 0.0, 3600.0)
    backoff_max = r.number("USERPILOT_RETRY_BACKOFF_MAX_SECONDS", 60.0, 0.0, 3600.0)
    if backoff_max < backoff:
        r.problems.append(
            f"USERPILOT_RETRY_BACKOFF_MAX_SECONDS={backoff_max:g} is below "
            f"USERPILOT_RETRY_BACKOFF_SECONDS={backoff:g}: the cap must be at least the base"
        )
    max_connections = r.integer("USERPILOT_MAX_CONNECTIONS", 64, 1, 1000)
    ca_bundle = _ca_bundle(r)

    bootstrap = r.required(
        "KAFKA_BOOTSTRAP_SERVERS", "enter host:port[,host:port], e.g. kafka:9092"
    )
    topics = _topics(r)
    group_id = r.text("KAFKA_GROUP_ID", "userpilot-delivery") or "userpilot-delivery"
    default_dlq = f"{topics[0]}.userpilot.dlq" if topics else "userpilot.dlq"
    dlq_set = r.text("KAFKA_DLQ_TOPIC")
    dlq_topic = dlq_set or default_dlq
    if dlq_set is not None and not _TOPIC.match(dlq_topic):
        r.problems.append(f"KAFKA_DLQ_TOPIC={dlq_topic!r} is not a legal topic name")
    elif dlq_set is None and topics and _TOPIC.match(topics[0]) and not _TOPIC.match(dlq_topic):
        # Only the derived name is wrong (too long): the source topic was fine.
        r.problems.append(
            f"the default dead-letter topic {dlq_topic!r} is longer than 249 characters: "
            "set KAFKA_DLQ_TOPIC"
        )
    if dlq_topic in topics:
        r.problems.append(
            f"KAFKA_DLQ_TOPIC={dlq_topic!r} is also a source topic: dead letters would be "
            "consumed again; choose another topic"
        )
    kafka_extra = _kafka_extra(r)

    registry_url = r.required(
        "SCHEMA_REGISTRY_URL", "enter the registry's base URL, e.g. http://schema-registry:8081"
    )
    if registry_url and not re.match(r"^(https?|mock)://", registry_url):
        r.problems.append(
            f"SCHEMA_REGISTRY_URL={registry_url!r} needs a scheme: e.g. "
            f"http://{registry_url}"
        )
    auth_raw = r.text("SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO")
    if auth_raw is not None and ":" not in auth_raw:
        r.problems.append("SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO must be user:password")

    max_in_flight = r.integer("WORKER_MAX_IN_FLIGHT", 200, 1, 100_000)
    grace = r.number("WORKER_SHUTDOWN_GRACE_SECONDS", 25.0, 0.0, 3600.0)
    commit_interval = r.number("WORKER_COMMIT_INTERVAL_SECONDS", 2.0, 0.0, 300.0)
    metrics_port = r.integer("WORKER_METRICS_PORT", 8082, 0, 65535)
    log_format = r.choice("WORKER_LOG_FORMAT", "text", ("text", "json"))
    log_level = r.choice(
        "WORKER_LOG_LEVEL", "info", ("debug", "info", "warning", "error", "critical")
    ).upper()
    dlq_ratio = r.number("WORKER_DLQ_MAX_RATIO", 0.5, 0.0, 1.0)
    dlq_window = r.integer("WORKER_DLQ_WINDOW", 100, 1, 1_000_000)
    dlq_consecutive = r.integer("WORKER_DLQ_MAX_CONSECUTIVE", 50, 1, 1_000_000)
    replay_max = r.integer("WORKER_REPLAY_MAX", 3, 0, 1000)

    if r.problems:
        raise ConfigError(
            "invalid configuration:\n" + "\n".join(f"  - {p}" for p in r.problems)
        )
    return Settings(
        api_key=api_key, analytics_endpoint=endpoint, insecure_http=insecure,
        consent=consent, mappings=mappings, mappings_file=mappings_file,
        rate_limit=rate_limit, rate_period_s=rate_period, rate_burst=rate_burst,
        request_timeout_s=timeout, retry_max_attempts=attempts, retry_budget_s=budget,
        retry_backoff_s=backoff, retry_backoff_max_s=backoff_max,
        max_connections=max_connections,
        bootstrap_servers=bootstrap, topics=topics, group_id=group_id, dlq_topic=dlq_topic,
        kafka_extra=kafka_extra, registry_url=registry_url,
        registry_auth=Secret(auth_raw) if auth_raw else None,
        max_in_flight=max_in_flight, shutdown_grace_s=grace,
        commit_interval_s=commit_interval, metrics_port=metrics_port,
        log_format=cast(Literal["text", "json"], log_format),
        log_level=log_level, dlq_max_ratio=dlq_ratio, dlq_window=dlq_window,
        dlq_max_consecutive=dlq_consecutive, replay_max=replay_max, ca_bundle=ca_bundle,
    )
