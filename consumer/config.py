"""The one settings object, read from the environment and validated at start-up.

Every mistake is collected (not just the first) and reported with what to enter instead,
so one failed start tells an operator everything to fix. Secrets are held in `Secret`,
whose repr is redacted, so they cannot leak through logs, exceptions or `check-config`.

`run` and `check-config` share this one validation, so check-config refuses everything run
refuses at start-up: unknown ``USERPILOT_*``/``WORKER_*``/``SCHEMA_REGISTRY_*`` variables
(with a did-you-mean), consent categories outside Signal's closed set, tokens that cannot
be sent in an HTTP header, and KAFKA_* pass-through settings that librdkafka itself refuses
(checked offline by ``consumer.librdkafka``, which builds the clients without connecting).
Secrets can come from files (``<NAME>_FILE``), as mounted Kubernetes secrets are.
"""

from __future__ import annotations

import argparse
import codecs
import difflib
import ipaddress
import math
import os
import re
import ssl
import sys
import unicodedata
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, cast
from urllib.parse import parse_qsl, unquote, urlsplit

from consumer.calls import FAMILIES, renders_as_nothing
from consumer.errors import ConfigError
from consumer.filtering import CATEGORIES, ConsentPolicy
from consumer.mapping import (
    DEFAULT_MAX_METADATA_BYTES,
    DEFAULT_MAX_METADATA_KEYS,
    DEFAULT_PRESET,
    MappingsError,
    MappingSet,
    load_mappings,
)
from consumer.redaction import url_credentials, url_valued
from consumer.tls import ca_location, librdkafka_path

__all__ = [
    "CONSENT_OFF",
    "DEFAULT_MAX_CONNECTIONS",
    "ENV_VARS",
    "FILE_SECRETS",
    "KAFKA_TOOLING",
    "REDIS_ENV_VARS",
    "SECRET_KAFKA_KEYS",
    "STANDARD_ENV_VARS",
    "RedisSettings",
    "Secret",
    "Settings",
    "environment_proxy",
    "is_known_env_var",
    "kafka_key",
    "load_settings",
    "redact_userinfo",
    "timeout_seconds",
]

MAX_METADATA_BYTES_CAP = 512 * 1024
"""USERPILOT_MAX_METADATA_BYTES at most: Userpilot documents 512 KB per app in total."""

API_VERSION = "2020-09-22"

REDIS_ENV_VARS: frozenset[str] = frozenset({
    "REDIS_URL",
    "REDIS_TLS_CA_FILE",
    "REDIS_TIMEOUT_SECONDS",
    "REDIS_DEDUP_TTL_SECONDS",
    "USERPILOT_RATE_LIMIT_SHARED",
})
"""Optional shared state (issue 12): without REDIS_URL the worker behaves as before."""

ENV_VARS: frozenset[str] = REDIS_ENV_VARS | frozenset({
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
    "USERPILOT_MAX_METADATA_BYTES",
    "USERPILOT_MAX_METADATA_KEYS",
    "USERPILOT_CA_BUNDLE",
    "USERPILOT_ENSURE_USER",
    "USERPILOT_ENSURE_USER_CACHE",
    "USERPILOT_ENSURE_USER_TTL_SECONDS",
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
    "WORKER_DLQ_GUARD_HOLD_SECONDS",
    "WORKER_REPLAY_MAX",
})
"""Every variable the worker reads, besides the KAFKA_* pass-through to librdkafka."""

FILE_SECRETS = ("USERPILOT_API_KEY", "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO")
"""Secrets that may be given as ``<NAME>_FILE`` (a path); so may KAFKA_* secret settings."""

KAFKA_TOOLING = frozenset({
    "KAFKA_OPTS", "KAFKA_HEAP_OPTS", "KAFKA_JMX_OPTS", "KAFKA_JVM_PERFORMANCE_OPTS",
    "KAFKA_LOG4J_OPTS", "KAFKA_GC_LOG_OPTS", "KAFKA_DEBUG", "KAFKA_HOME", "KAFKA_VERSION",
    "KAFKA_JAVA_OPTS", "KAFKA_LOG4J_ROOT_LOGLEVEL", "KAFKA_TOOLS_LOG4J_LOGLEVEL",
})
"""Variables of Kafka's JVM tooling images: not client settings; ignored with a note."""

CONSENT_OFF = ("none", "off")
"""``USERPILOT_CONSENT_CATEGORIES=none`` (or ``off``) disables consent gating."""

DEFAULT_MAX_CONNECTIONS = 64
"""Per endpoint family (Track; identify with company identify), a ceiling, not sockets
held: at Userpilot's 10 requests a second per family the pool opens what rate x latency
needs (2 connections at 100 ms answers, review "fairbench20"), and 64 carry a family's 10
requests a second up to 6.4 s an answer. Round 20 tried 16 (one pool for both families),
where the benchmark's delivery ratio passes (both loops then wait on the sandbox, not on
the CPU); reviews measured it worse for users: a catch-up with ensure-user at 1.2 s answers
ran at 5.9 events/s against 10 at 64 (RESULTS.md, "Round 20")."""
USERPILOT_RATE_PER_S = 10.0
"""Userpilot's documented limit, 600 requests per minute per token (its cloud hosts)."""

HEARTBEAT_INTERVAL_MS = 3000  # librdkafka's default heartbeat.interval.ms

KAFKA_INTERNAL_TOPICS = frozenset({
    "__consumer_offsets", "__transaction_state", "__cluster_metadata", "__share_group_state"})
"""The brokers' own topics (Kafka 4.1): never a source or a dead-letter topic."""

_KAFKA_RESERVED = frozenset({"KAFKA_BOOTSTRAP_SERVERS", "KAFKA_TOPICS", "KAFKA_GROUP_ID",
                             "KAFKA_DLQ_TOPIC"})
_PASSTHROUGH = re.compile(r"^KAFKA_[A-Z0-9]+(?:_[A-Z0-9]+)*$")
# librdkafka settings the worker owns: letting them through would break at-least-once.
_KAFKA_OWNED = frozenset({
    "enable.auto.commit", "enable.auto.offset.store", "group.id", "bootstrap.servers",
    "partition.assignment.strategy", "auto.offset.reset", "isolation.level",
    # librdkafka's other name for bootstrap.servers: applied after it, it replaced the
    # brokers check-config showed, and KEDA and the alerts watched (review "diff22b").
    "metadata.broker.list",
    # The dead-letter producer learns a dead letter is written from its delivery report:
    # with reports of errors only, none came and every partition with a dead letter held
    # for good (and confluent-kafka refused the text value with a TypeError, review
    # "pass56").
    "delivery.report.only.error",
})
_KAFKA_OVERRIDABLE_OWNED = frozenset({"auto.offset.reset", "isolation.level"})
SECRET_KAFKA_KEYS = frozenset({
    "sasl.password", "ssl.key.password", "sasl.oauthbearer.client.secret",
    "ssl.keystore.password", "ssl.key.pem", "sasl.oauthbearer.config",
    "sasl.oauthbearer.client.credentials.client.secret",
    "sasl.oauthbearer.assertion.private.key.passphrase",
    "sasl.oauthbearer.assertion.private.key.pem",
})
_HOST = re.compile(
    r"^(?=.{1,253}(?::[0-9]{1,5})?$)"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
    r"(?::([0-9]{1,5}))?$"
)
_LINK_SERVICE = r"^(?:KAFKA|USERPILOT|WORKER|SCHEMA_REGISTRY|REDIS)(?:_[A-Z0-9_]+)?"
_LINK_IP = "ip"
_LINK_URL = re.compile(r"^(?:tcp|udp|sctp)://\S+:[0-9]+$")
_SERVICE_LINKS: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(_LINK_SERVICE + suffix), value) for suffix, value in (
        (r"_SERVICE_HOST$", _LINK_IP),
        (r"_SERVICE_PORT(?:_[A-Z0-9_]+)?$", "digits"),
        (r"_PORT$", "url"),
        (r"_PORT_\d+_(?:TCP|UDP|SCTP)$", "url"),
        (r"_PORT_\d+_(?:TCP|UDP|SCTP)_PROTO$", "proto"),
        (r"_PORT_\d+_(?:TCP|UDP|SCTP)_PORT$", "digits"),
        (r"_PORT_\d+_(?:TCP|UDP|SCTP)_ADDR$", _LINK_IP),
    ))


def _link_value(kind: str, value: str) -> bool:
    if kind == _LINK_IP:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            return False
        return True
    if kind == "url":
        return bool(_LINK_URL.match(value))
    if kind == "proto":
        return value in ("tcp", "udp", "sctp")
    return value.isascii() and value.isdigit()


def _service_link(name: str, value: str) -> bool:
    """A Kubernetes service link (`<SERVICE>_SERVICE_HOST`, `<SERVICE>_PORT`, …) of a
    Service whose name starts like ours (`kafka`, `kafka-ui`, `userpilot-worker`): not
    settings, and refusing them stopped every pod of a namespace holding such a Service.
    Told apart from a mistyped setting by the value Kubernetes gives each kind."""
    value = value.strip()
    return any(pattern.match(name) and _link_value(kind, value)
               for pattern, kind in _SERVICE_LINKS)


STANDARD_ENV_VARS: frozenset[str] = frozenset({"SSL_CERT_FILE", "SSL_CERT_DIR"})
"""Variables of the HTTP clients (not settings of this worker) that start-up checks."""
_OWN_PREFIXES = ("USERPILOT_", "WORKER_", "SCHEMA_REGISTRY_")
# REDIS_* is shared with other software (REDIS_PASSWORD fed into REDIS_URL, service links of
# a redis-master Service): only a near miss of one of ours is a typo.
_SHARED_PREFIXES = ("REDIS_",)
# Our prefix, not settings: the image's build revision (read by metrics.build_info only).
_BUILD_FACTS = frozenset({"USERPILOT_WORKER_REVISION"})
# librdkafka names that are not dots-for-underscores (KAFKA_LOG_LEVEL → log_level).
_KAFKA_UNDERSCORED = {"log.level": "log_level"}
MAX_GROUP_ID_BYTES = 32767
"""A consumer group id is a Kafka protocol string: its length is a signed 16-bit number."""
_TOPIC = re.compile(r"^(?!\.\.?$)[A-Za-z0-9._-]{1,249}$")  # Kafka refuses "." and ".."
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def is_known_env_var(name: str) -> bool:
    """True for a variable the worker reads, including valid KAFKA_* pass-through names."""
    if name.endswith("_FILE") and name[:-5] in FILE_SECRETS:
        return True
    return name in ENV_VARS or bool(_PASSTHROUGH.match(name))


def kafka_key(name: str) -> str:
    """The librdkafka property a KAFKA_* pass-through variable sets."""
    key = name[len("KAFKA_"):].lower().replace("_", ".")
    return _KAFKA_UNDERSCORED.get(key, key)


def _shown_number(value: float) -> str:
    """A bound as people write it: 2592000, not 2.592e+06 (review "ops31")."""
    return str(int(value)) if value.is_integer() and abs(value) < 1e16 else f"{value:g}"


_COMMON_KAFKA_SETTINGS = tuple(
    "KAFKA_" + key.upper().replace(".", "_") for key in sorted(SECRET_KAFKA_KEYS | {
        "security.protocol", "sasl.mechanism", "sasl.username", "ssl.ca.location",
        "ssl.certificate.location", "ssl.key.location", "ssl.endpoint.identification.algorithm",
        "sasl.oauthbearer.method", "sasl.oauthbearer.client.id",
        "sasl.oauthbearer.token.endpoint.url", "sasl.oauthbearer.scope", "client.id",
        "session.timeout.ms", "max.poll.interval.ms", "group.instance.id", "debug"}))
"""Pass-through names a typo is likely of (`KAFKA_SASL_PASWORD` got no hint)."""


_FILE_NAMES = (*(f"{n}_FILE" for n in FILE_SECRETS),
               *(f"KAFKA_{k.upper().replace('.', '_')}_FILE" for k in SECRET_KAFKA_KEYS))
"""The `<SECRET>_FILE` variables: a typo of one was told the plain secret's name, and the
file's path, put there, passed as the token (review "config42")."""


def _did_you_mean(name: str, candidates: frozenset[str] | tuple[str, ...]) -> str:
    # Never the name itself: "KAFKA_X ... (did you mean KAFKA_X?)" for a refused value.
    close = difflib.get_close_matches(name, sorted(c for c in candidates if c != name), n=1,
                                      cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""


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
    # These two may hold credentials (a URL's user info): never in a repr (review config19).
    kafka_extra: Mapping[str, str | Secret] = field(repr=False)
    registry_url: str = field(repr=False)
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
    dlq_guard_hold_s: float = 120.0
    """After the DLQ guard stopped the worker: how long the process stays up (metrics and
    probes served, unready) before exit code 3, so a scrape sees the trip."""
    notes: tuple[str, ...] = ()
    """Things ignored on purpose (e.g. Kafka tooling variables): print, do not refuse."""
    redis: RedisSettings | None = None
    rate_limit_shared: bool = False
    ca_bundle: str | None = None  # USERPILOT_CA_BUNDLE: PEM file of CAs to trust for HTTPS
    ensure_user: bool = True  # USERPILOT_ENSURE_USER: bare identify before a user's 1st Track
    ensure_user_cache: int = 100_000  # USERPILOT_ENSURE_USER_CACHE: users remembered (LRU)
    ensure_user_ttl_s: float = 86_400.0  # USERPILOT_ENSURE_USER_TTL_SECONDS: how long
    proxy: Secret | None = None
    """The forward proxy the environment names for Userpilot (`environment_proxy`); its
    URL may carry credentials, hence a Secret."""
    registry_proxy: Secret | None = None
    """The proxy the environment names for the schema registry (HTTPS_PROXY / HTTP_PROXY /
    ALL_PROXY, less NO_PROXY, as for Userpilot), given to its client explicitly: httpx's
    own reading of the environment (`trust_env`) parsed every proxy and NO_PROXY entry,
    used or not, and crashed `run` on one it could not parse (review "cmds17")."""
    env_proxies: tuple[Secret, ...] = ()
    """Every proxy variable set (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY, either case), used by
    this worker or not: librdkafka's own HTTP requests (an OIDC token endpoint) take
    whichever applies, and a proxy echoing one showed its credentials in `run`'s and
    `check-config`'s lines (review "secrets55"). For `log_secrets` only."""

    def _kafka_ms_as_s(self, key: str, default_ms: int) -> float:
        """A librdkafka duration in ms (`default_ms` unless KAFKA_* sets it), in seconds."""
        raw = self.kafka_extra.get(key, str(default_ms))
        try:
            return int(str(raw)) / 1000
        except ValueError:  # librdkafka refused it at start-up already
            return default_ms / 1000

    @property
    def max_poll_interval_s(self) -> float:
        """librdkafka's max.poll.interval.ms (its default 300 s unless KAFKA_* sets it):
        past it the consumer leaves the group on its own."""
        return self._kafka_ms_as_s("max.poll.interval.ms", 300_000)

    @property
    def base_url(self) -> str:
        """Scheme and host of Userpilot's API; calls append their path (``/v1/track``)."""
        return userpilot_base_url(self.analytics_endpoint, self.insecure_http)

    @property
    def pool_connections(self) -> int:
        """The HTTP client's pool: `max_connections` for each of the two endpoint families
        (Track; identify with company identify), whose permits the handler takes before
        a rate slot (`consumer.permits`): one family's slow answers never hold the
        other's connections."""
        return len(FAMILIES) * self.max_connections

    @property
    def track_url(self) -> str:
        return f"{self.base_url}/v1/track"

    def headers(self) -> dict[str, str]:
        """Userpilot's required headers, token included: send them, never log them."""
        return {
            "Content-Type": "application/json",
            "Authorization": f"Token {self.api_key.reveal()}",
            "X-API-Version": API_VERSION,
        }

    def http_secrets(self) -> list[str]:
        """What must never be stored or logged of Userpilot's requests: the token and the
        proxy's credentials (an echoing proxy quotes `Proxy-Authorization: Basic …`)."""
        return [self.api_key.reveal(),
                *url_credentials(self.proxy.reveal() if self.proxy else None)]

    def replay_secret(self) -> bytes | None:
        """The key of `replay`'s seals (`deadletter.replay_seal`): derived from the write
        token, which `run` and `replay` share, and never the token itself. None without a
        token (`replay` may run without one: its records are then not sealed)."""
        import hashlib

        token = self.api_key.reveal()
        if token == _OFFLINE_DEFAULTS["USERPILOT_API_KEY"]:
            return None
        return hashlib.sha256(b"userpilot-replay-seal\0" + token.encode()).digest()

    def log_secrets(self) -> list[str]:
        """Everything no log line, dead letter or probe answer may show: `http_secrets`, the
        registry's credentials (SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO's, those written into
        SCHEMA_REGISTRY_URL, its proxy's) and the Kafka secrets (librdkafka's own lines
        and errors quote an OIDC endpoint's echo, or an unparsed sasl.oauthbearer.config),
        in the forms an echoed request shows them (review "secrets18")."""
        from consumer.redaction import kafka_secrets, registry_secrets

        registry_proxy = self.registry_proxy.reveal() if self.registry_proxy else None
        return [*self.http_secrets(), *registry_secrets(
            self.registry_url, self.registry_auth.reveal() if self.registry_auth else None),
            *url_credentials(registry_proxy),
            *(form for proxy in self.env_proxies for form in url_credentials(proxy.reveal())),
            *kafka_secrets(self.kafka_config(logger=False), SECRET_KAFKA_KEYS)]

    @property
    def session_timeout_s(self) -> float:
        """The group's session timeout: how long a frozen replica keeps its partitions."""
        from consumer.librdkafka import SESSION_TIMEOUT_MS

        return self._kafka_ms_as_s("session.timeout.ms", SESSION_TIMEOUT_MS)

    @property
    def heartbeat_interval_s(self) -> float:
        """How often the consumer tells the group it is alive (librdkafka's 3 s by default)."""
        return self._kafka_ms_as_s("heartbeat.interval.ms", HEARTBEAT_INTERVAL_MS)

    def kafka_config(self, *, logger: bool = True) -> dict[str, Any]:
        """librdkafka settings with secrets revealed, for the Kafka edge only.

        ``logger`` routes librdkafka's own log lines through Python logging (the worker's
        format, repeated connection errors rate-limited: ``consumer.logs``).
        """
        conf: dict[str, Any] = {"bootstrap.servers": self.bootstrap_servers}
        for key, value in self.kafka_extra.items():
            conf[key] = value.reveal() if isinstance(value, Secret) else value
        if (str(conf.get("sasl.oauthbearer.method", "")).lower() == "oidc"
                and "https.ca.location" not in conf and "https.ca.pem" not in conf):
            # librdkafka's wheel looks for its CA bundle where CentOS keeps it
            # (/etc/pki/tls/certs/ca-bundle.crt): on Debian, the image's, every https token
            # endpoint failed "error adding trust anchors" (review "diff58"). SSL_CERT_FILE,
            # else certifi's bundle where that file is missing (`tls.ca_location`).
            location = ca_location()
            if location is not None:
                conf["https.ca.location"] = location
        if logger:
            from consumer.logs import librdkafka_logger

            conf["logger"] = librdkafka_logger()
        return conf

    def describe(self) -> dict[str, Any]:
        """The effective configuration with every secret redacted (for check-config)."""
        return {
            "userpilot": {
                "track_url": self.track_url,
                "api_key": "***" if self.api_key.reveal() else "",
                "insecure_http": self.insecure_http,
                # Whose budget it is said: "600 per 60 s" read as the token's whole, where
                # track and identify each have one by default (review "seed44").
                "rate_limit": f"{self.rate_limit} per {self.rate_period_s:g} s "
                              f"(burst {self.rate_burst}) "
                              + ("for all calls together" if self.rate_limit_shared else
                                 "each for track and for identify (with company identify)"),
                "request_timeout_seconds": self.request_timeout_s,
                "retry": {"max_attempts": self.retry_max_attempts,
                          "budget_seconds": self.retry_budget_s,
                          "backoff_seconds": self.retry_backoff_s,
                          "backoff_max_seconds": self.retry_backoff_max_s},
                "max_connections": self.max_connections,
                "ca_bundle": self.ca_bundle,
                "proxy": redact_userinfo(self.proxy.reveal()) if self.proxy else None,
                "ensure_user": self.ensure_user,
                "ensure_user_cache": self.ensure_user_cache,
                "ensure_user_ttl_seconds": self.ensure_user_ttl_s,
            },
            "consent": {"categories": list(self.consent.categories),
                        "missing": self.consent.missing,
                        "gating": "on" if self.consent.categories else "off"},
            "mappings": {"file": self.mappings_file, "events": self.mappings.describe(),
                         "max_metadata_bytes": self.mappings.max_metadata_bytes,
                         "max_metadata_keys": self.mappings.max_metadata_keys},
            "kafka": {
                "bootstrap_servers": self.bootstrap_servers,
                "topics": list(self.topics),
                "group_id": self.group_id,
                "dlq_topic": self.dlq_topic,
                "extra": {k: ("***" if isinstance(v, Secret) else redact_userinfo(v)
                              if url_valued(k, v) else v)
                          for k, v in self.kafka_extra.items()},
                # What the worker sets beyond the KAFKA_* given (the OIDC token endpoint's
                # CA bundle): an operator chasing a TLS failure sees which file is read
                # (review "ops58"). None of these is a secret.
                "added": {k: v for k, v in self.kafka_config(logger=False).items()
                          if k != "bootstrap.servers" and k not in self.kafka_extra},
            },
            "schema_registry": {"url": redact_userinfo(self.registry_url),
                                "basic_auth": "***" if self.registry_auth else None},
            "worker": {
                "max_in_flight": self.max_in_flight,
                "shutdown_grace_seconds": self.shutdown_grace_s,
                "commit_interval_seconds": self.commit_interval_s,
                "metrics_port": self.metrics_port,
                "log_format": self.log_format,
                "log_level": self.log_level,
                "dlq_guard": {"max_ratio": self.dlq_max_ratio, "window": self.dlq_window,
                              "max_consecutive": self.dlq_max_consecutive,
                              "hold_seconds": self.dlq_guard_hold_s},
                "replay_max": self.replay_max,
            },
            "redis": self.redis.describe() if self.redis is not None else None,
            "rate_limit_shared": self.rate_limit_shared,
        }


def _ca_bundle(r: _Reader) -> str | None:
    """USERPILOT_CA_BUNDLE: a readable PEM file of CA certificates (a corporate CA).

    Also SSL_CERT_FILE, which httpx reads for every client it builds (the registry's, and
    Userpilot's without USERPILOT_CA_BUNDLE), http:// endpoints included: a wrong one was
    a traceback at start-up after check-config said OK.
    """
    cert_file = r.env.get("SSL_CERT_FILE")
    if cert_file:  # as httpx reads it: set and not empty
        _check_pem(r, "SSL_CERT_FILE", cert_file,
                   "the worker's HTTP clients load it; fix the path or unset it")
        oidc = r.env.get("KAFKA_SASL_OAUTHBEARER_METHOD", "").strip().lower() == "oidc"
        given = any(r.env.get(f"KAFKA_HTTPS_CA_{kind}", "").strip()
                    for kind in ("LOCATION", "PEM"))
        if oidc and not given and librdkafka_path(cert_file) is None:
            # Kafka's client takes it as UTF-8 (the OIDC endpoint's CAs, `tls.ca_location`):
            # passed, `run` died on a traceback after check-config said OK (review "diff60d").
            r.problems.append(
                "SSL_CERT_FILE names a path whose bytes are not UTF-8, which Kafka's client "
                "(the OIDC token endpoint's CAs) cannot be given: use an ASCII path, or set "
                "KAFKA_HTTPS_CA_LOCATION")
    cert_dir = r.env.get("SSL_CERT_DIR")
    # A list, as OpenSSL reads it (`a:b`, entries that are no directory passed over):
    # refused whole as "not a directory" (review "config48").
    dirs = [d for d in (cert_dir or "").split(os.pathsep) if d]
    if cert_dir and not cert_file and not any(os.path.isdir(d) for d in dirs):
        # Read in place of certifi's bundle (`tls.ssl_context`): every HTTPS peer would
        # then be untrusted (review config19).
        r.problems.append(f"SSL_CERT_DIR={cert_dir!r} is not a directory (nor a "
                          f"{os.pathsep!r}-separated list holding one): the worker's HTTPS "
                          "clients load their CA certificates from it; fix the path or "
                          "unset it")
    elif cert_dir and not cert_file and not any(_hashed_certificates(d) for d in dirs
                                                if os.path.isdir(d)):
        # OpenSSL looks a CA up there by its subject's hash only: a directory of `ca.pem`
        # files (a mounted ConfigMap) trusted nothing, every request refused (review
        # "config42").
        r.problems.append(f"SSL_CERT_DIR={cert_dir!r} holds no certificate named by its "
                          "subject hash (<hash>.0), the only names OpenSSL looks up there: "
                          "run `openssl rehash` on it, or give the CA certificates as a PEM "
                          "file in USERPILOT_CA_BUNDLE (or SSL_CERT_FILE)")
    path = r.text("USERPILOT_CA_BUNDLE")
    if path is None:
        return None
    return path if _check_pem(r, "USERPILOT_CA_BUNDLE", path,
                              "mount the bundle and give its path") else None


_HASHED = re.compile(r"[0-9a-f]{8}\.r?[0-9]+")


def _hashed_certificates(directory: str) -> bool:
    """Whether `directory` has a file named as OpenSSL's CA look-up reads them (`c_rehash`);
    True when it cannot be listed (the check would only guess)."""
    try:
        return any(_HASHED.fullmatch(name) for name in os.listdir(directory))
    except OSError:
        return True


def _check_pem(r: _Reader, name: str, path: str, fix: str) -> bool:
    """Whether `path` is a readable PEM file of CA certificates, as the TLS clients load
    it; a problem naming `name` and how to `fix` it otherwise."""
    try:
        ssl.create_default_context(cafile=path)
    except (OSError, ssl.SSLError) as exc:
        r.problems.append(f"{name}={path!r} is not a readable PEM file of CA certificates "
                          f"({type(exc).__name__}): {fix}")
        return False
    return True


class _Reader:
    """Reads typed values from the environment, collecting every problem.

    `unread`: variables set but whose value could not be read (a secret file's problem, or
    bytes that are not UTF-8): their own problem says why, so no "is not set" follows."""

    def __init__(self, env: Mapping[str, str], unread: Collection[str] = ()) -> None:
        self.env = env
        self.unread = unread
        self.problems: list[str] = []
        self.notes: list[str] = []

    def text(self, name: str, default: str | None = None) -> str | None:
        raw = self.env.get(name)
        if raw is None or raw.strip() == "":
            return default
        return raw.strip()

    def secret(self, name: str) -> str | None:
        """A secret as written, but for one trailing line break (`kubectl create secret
        --from-file` adds one): a space may belong to a password, and the registry's was
        trimmed while the Kafka ones were not (review "config44"). Blank is unset."""
        raw = self.env.get(name)
        if raw is None or raw.strip() == "":
            return None
        return raw.removesuffix("\n").removesuffix("\r")

    def required(self, name: str, hint: str) -> str:
        value = self.text(name)
        if value is None:
            if name not in self.unread:
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
        # ASCII digits only: Python's int() also reads "1_0" and "١٢", which no other
        # reader of the same values (Helm, KEDA, a shell) takes as numbers (review
        # "config48").
        if not _INTEGER.fullmatch(raw):
            link = ""
            if re.fullmatch(r"(tcp|udp)://[^\s]+:\d+", raw) and name.endswith("_PORT"):
                # What Kubernetes sets for a Service named after the variable (a
                # `worker-metrics` Service gives WORKER_METRICS_PORT=tcp://…, review "env60").
                link = (" (it looks like a Kubernetes service link of a Service named "
                        f"{name.removesuffix('_PORT').lower().replace('_', '-')}: set the "
                        "pod's enableServiceLinks: false, or give the port explicitly)")
            self.problems.append(f"{name}={raw!r} is not a whole number: use e.g. "
                                 f"{default}{link}")
            return default
        value = int(raw)
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            self.problems.append(f"{name}={raw} is out of range: use a number {bound}")
            return default
        return value

    def number(self, name: str, default: float, low: float, high: float | None = None,
               *, inclusive_low: bool = False) -> float:
        raw = self.text(name)
        if raw is None:
            return default
        if not _DECIMAL.fullmatch(raw):  # as `integer`: no "1_0", "١٢", "nan" or "inf"
            self.problems.append(f"{name}={raw!r} is not a number: use e.g. {default:g}")
            return default
        value = float(raw)
        too_low = value < low if inclusive_low else value <= low
        if not math.isfinite(value) or too_low or (high is not None and value > high):
            rel = ">=" if inclusive_low else ">"
            bound = f"{rel} {_shown_number(low)}" + (
                f" and <= {_shown_number(high)}" if high is not None else "")
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


# At most 30 digits: int() refuses past 4,300 (a traceback where check-config named the
# setting, review "diff48b"), and no setting's range comes near 30.
_INTEGER = re.compile(r"[+-]?[0-9]{1,30}", re.ASCII)
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)


def _dotted_keys(mappings: MappingSet) -> list[str]:
    """A note per `properties`, `pick`, `exclude` or `rename` key with a dot: they name
    flattened keys
    (`plan_tier`), where `fields` takes dotted paths (`properties.plan.tier`); the easy
    mistake selected nothing, without a word (review "mappings48"). A property literally
    named with a dot is matched as written, so not refused."""
    named: list[tuple[str, list[str]]] = []
    for rule in mappings.rules:
        keys = [] if isinstance(rule.properties, str) else list(rule.properties)
        named.append((f"events.{rule.source_name}",
                      [*keys, *(old for old, _ in rule.rename)]))
    # identify and group too: an `exclude` of "address.street" hid nothing (review
    # "diff48b"), and it is the privacy control.
    for section, traits in (("identify", mappings.identify), ("group", mappings.group)):
        picked = [] if isinstance(traits.pick, str) else list(traits.pick)
        named.append((section, [*picked, *traits.exclude,
                                *(old for old, _ in traits.rename)]))
    notes: list[str] = []
    for where, keys in named:
        for key in dict.fromkeys(keys):
            if "." in key:
                notes.append(
                    f"USERPILOT_MAPPINGS_FILE: {where}: {key!r} has a dot: properties, "
                    f"pick, exclude and rename name flattened keys (a nested plan.tier is "
                    f"{key.replace('.', '_')!r}); only a key named {key!r} itself matches it")
    return notes


def _check_endpoint(reader: _Reader) -> str:
    raw = reader.required(
        "USERPILOT_ANALYTICS_ENDPOINT",
        "enter your analytics host from Userpilot's Environment page, e.g. analytex.userpilot.io "
        "(EU: analytex-eu.userpilot.io)",
    )
    if not raw:
        return ""
    if "@" in raw:  # credentials have no place here, and must not be echoed back
        reader.problems.append(
            f"USERPILOT_ANALYTICS_ENDPOINT={redact_userinfo(raw)!r} holds credentials: enter "
            "the host only, e.g. analytex.userpilot.io (the token is USERPILOT_API_KEY)")
        return raw.rsplit("@", 1)[1].split("/", 1)[0]
    host = raw
    if "://" in host:
        host = host.split("://", 1)[1]
        reader.problems.append(
            f"USERPILOT_ANALYTICS_ENDPOINT={raw!r} has a scheme: enter the host only, "
            f"e.g. {_example_host(host)}"
        )
        return host.split("/", 1)[0]
    if "/" in host:
        reader.problems.append(
            f"USERPILOT_ANALYTICS_ENDPOINT={raw!r} has a path: enter the host only, "
            f"e.g. {_example_host(host)} (the worker adds /v1/track itself)"
        )
        return host.split("/", 1)[0]
    match = _HOST.match(host)
    if match is None:
        reader.problems.append(
            f"USERPILOT_ANALYTICS_ENDPOINT={raw!r} is not a host name: enter e.g. "
            "analytex.userpilot.io (letters, digits, dots and dashes, optionally :port)"
        )
    elif match.group(1) is not None and not 0 < int(match.group(1)) < 65536:
        reader.problems.append(f"USERPILOT_ANALYTICS_ENDPOINT={raw!r} has an invalid port: "
                               "use 1-65535, or no port for 443")
    else:
        refused = (_http_url_problem(f"https://{host}")
                   or _aiohttp_host_problem(host.split(":", 1)[0]))
        if refused is not None:  # e.g. 10.0.0.256: digits and dots, yet no address
            reader.problems.append(
                f"USERPILOT_ANALYTICS_ENDPOINT={raw!r} is not a host the HTTP client can "
                f"use ({refused}): enter e.g. analytex.userpilot.io")
    return host


def _example_host(rest: str) -> str:
    """The host a mistyped endpoint names (quoted), else Userpilot's: `https://` or
    `//host` named none, and the advice read "e.g. ''" (review config25)."""
    host = rest.lstrip("/").split("/", 1)[0]
    return repr(host) if host else "analytex.userpilot.io"


_HOST_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")


def _aiohttp_host_problem(host: str) -> str | None:
    """What Userpilot's HTTP client (aiohttp) refuses in a host that others take: digits
    that are not a dotted quad (`127.1`, `2130706433`), which it calls "not a canonical
    IPv4 address". Taken, every request failed as a connection error, retried for ever
    (review "config42"); the registry, Kafka and Redis connect to such hosts."""
    name = host.removesuffix(".")
    if name and all(label.isascii() and label.isdigit() for label in name.split(".")):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return (f"the host {host!r} is digits but not an IPv4 address written a.b.c.d "
                    "(four numbers 0-255), which Userpilot's HTTP client requires")
    return None


def _http_url_problem(url: str) -> str | None:
    """The HTTP client's own verdict on `url` (`consumer.httpurl`), and what it takes that
    no request could ever use: a space or control character, a host no resolver can look
    up (`schema registry`, `-bad-`). Taken, `run` waited for the service as for an outage,
    unready for ever, while `check-config` said OK (review "ops36")."""
    from consumer.httpurl import url_problem

    if any(ord(c) < 32 or ord(c) == 127 for c in url):
        return "it holds a control character (a tab, a line break)"
    refused = url_problem(url)
    if refused is not None:
        return refused
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        return None  # the callers' own checks say why
    # A space in a user name or password reaches the server as written (Basic auth); in the
    # host or path, never usefully.
    if any(c.isspace() for c in parts.netloc.rpartition("@")[2] + parts.path + parts.query
           + parts.fragment):
        return "it holds a space; percent-encode it (%20) if it belongs in the path"
    if not host or _ip_address(host) is not None:
        return None
    try:
        name = host.encode("idna").decode("ascii")
    except UnicodeError:
        name = ""
    labels = (name[:-1] if name.endswith(".") else name).split(".")
    if not name or len(name) > 253 or not all(_HOST_LABEL.match(label) for label in labels):
        if "@" in url:
            # The "host" may be the start of a user name a '/', '?' or '#' cut short: never
            # quoted (review "diff36b").
            return ("its host is not a host name; a '/', '?' or '#' in the user name or "
                    "password ends the host early: percent-encode them (%2F, %3F, %23)")
        return (f"the host {host!r} is not a host name: letters, digits, dashes and dots, "
                "e.g. schema-registry.kafka.svc")
    if all(label.isdigit() for label in labels) and not _address_literal_ok(name):
        # Dotted digits no resolver reads (`127.0.0.1.`, `999.1.1.1`): `run` waited for the
        # service as for an outage (review "config40").
        return (f"the host {host!r} is not an IPv4 address (four numbers 0-255, no "
                "trailing dot)")
    return None


MAX_API_KEY_CHARS = 1024
"""A Userpilot write token is a few dozen characters; a value this long is a file or
variable holding more than the token. Sent in every request's head, a 70,000-character one
was refused (431, or a front end's 400) and every event dead-lettered (review "config53")."""


def _check_api_key(reader: _Reader) -> Secret:
    raw = reader.env.get("USERPILOT_API_KEY", "")
    value = raw.strip()
    if not value and "USERPILOT_API_KEY" in reader.unread:
        pass  # its own problem says why (USERPILOT_API_KEY_FILE's, or not UTF-8)
    elif not value:
        reader.problems.append(
            "USERPILOT_API_KEY is not set: copy the application write token (not the "
            "read/export token) from Userpilot's Environment page"
        )
    elif value.lower().startswith("token "):
        reader.problems.append(
            "USERPILOT_API_KEY starts with 'Token ': enter the token alone; the worker adds "
            "the 'Token' prefix to the Authorization header itself"
        )
    elif len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'`":
        # A YAML or --env-file quoting mistake: the quotes became part of the token, and
        # Userpilot's 401 then said "use the write token" (review "ops31").
        reader.problems.append(
            "USERPILOT_API_KEY is wrapped in quotes, which would be sent as part of the "
            "token: remove them (an --env-file or a Secret takes the value unquoted)"
        )
    elif any(ch.isspace() for ch in value) or not value.isprintable():
        reader.problems.append(
            "USERPILOT_API_KEY contains spaces or control characters: paste the token alone"
        )
    elif not value.isascii():
        reader.problems.append(
            "USERPILOT_API_KEY contains non-ASCII characters, which cannot be sent in an HTTP "
            "header (often a smart quote or a non-breaking space pasted with it): paste the "
            "token alone"
        )
    elif len(value) > MAX_API_KEY_CHARS:
        reader.problems.append(
            f"USERPILOT_API_KEY is {len(value)} characters long, more than any token "
            f"(at most {MAX_API_KEY_CHARS} taken): the variable or USERPILOT_API_KEY_FILE "
            "holds more than the token; paste the token alone"
        )
    return Secret(value)


_DEBUG_CONTEXTS = frozenset({
    "generic", "broker", "topic", "metadata", "feature", "queue", "msg", "protocol", "cgrp",
    "security", "fetch", "interceptor", "plugin", "consumer", "admin", "eos", "mock",
    "assignor", "conf", "telemetry", "all"})


def _debug_contexts(value: str) -> bool:
    """KAFKA_DEBUG names librdkafka's `debug` contexts (`consumer,cgrp`), not the JVM
    tools' switch of the same name (`y`): then it is passed through like any setting."""
    items = [item.strip().lower() for item in value.split(",")]
    return bool(value.strip()) and all(item in _DEBUG_CONTEXTS for item in items)


def _int_or_none(value: str) -> int | None:
    """A whole number as librdkafka and `int()` read it (`+4000` too: a sign passed a digits
    check, review "diff44"), or None."""
    try:
        return int(value.strip())
    except ValueError:
        return None


REVOKE_MARGIN_S = 30.0
"""How much longer than WORKER_SHUTDOWN_GRACE_SECONDS a drain is waited for (its last DLQ
records and Redis calls) before what it did not settle is left to the next owner. A
revoke's drain and wait are capped besides, at shares of max.poll.interval.ms
(`worker.REVOKE_DRAIN_SHARE`, `REVOKE_WAIT_SHARE`); a shutdown's are not (the start-up note)."""

MIN_MESSAGE_MAX_BYTES = 16 * 1024
"""The least KAFKA_MESSAGE_MAX_BYTES taken: a dead letter written without its value, with
the worker's headers at their largest (error body, message, stack), fits."""

MIN_QUEUE_KBYTES = MIN_MESSAGE_MAX_BYTES // 1024
"""The least KAFKA_QUEUE_BUFFERING_MAX_KBYTES taken: the dead-letter producer's queue holds
a dead letter whose value is as large as the smallest `message.max.bytes` taken."""


def _kafka_value_problem(key: str, value: str) -> str | None:
    """What is wrong with a pass-through value the worker's guarantees rule out (None: fine).

    librdkafka takes these values, and the worker then breaks a promise: each is refused
    with the setting to use instead (review "cmds17"). A topic-level spelling
    (`topic.acks`) is the same setting (review "diff17")."""
    lowered = value.lower()
    key = key.removeprefix("topic.")
    if key == "auto.offset.reset" and lowered not in ("earliest", "smallest", "beginning"):
        # latest: a partition added to the topic is read from the end once a worker gets it,
        # so what was produced to it before is skipped for good (15 of 40 events, review
        # "kafka21"), and so is a backlog whose committed offset retention removed; error:
        # such a partition stops for good while the worker reports ready.
        return ("would skip events (a new partition's first ones, a backlog whose committed "
                "offset retention removed) or stop a partition; the worker starts where the "
                "log starts: remove it (to skip a backlog once, reset the group's offsets "
                "with kafka-consumer-groups.sh --reset-offsets --to-latest before the first "
                "start)")
    if key == "isolation.level" and lowered != "read_committed":  # librdkafka: any case
        # read_uncommitted hands over the records of aborted transactions: events their
        # producer rolled back would reach Userpilot.
        return ("would send Userpilot the events of aborted transactions; the worker reads "
                "committed records only: remove it (or set read_committed)")
    size = _int_or_none(value) if key == "message.max.bytes" else None
    if size is not None and size < MIN_MESSAGE_MAX_BYTES:
        # The producer's limit is the dead letters' too: below the worker's own headers
        # (up to ~5 KB, the record without its value), a dead letter is never written and
        # its partition stops for good (review "dlqfail44").
        return (f"is below {MIN_MESSAGE_MAX_BYTES}: a dead letter without its value still "
                "carries up to ~5 KB of the worker's headers, and one the producer refuses "
                f"stops its partition for good; use at least {MIN_MESSAGE_MAX_BYTES} (or "
                "remove it: librdkafka's ~1 MB)")
    kbytes = _int_or_none(value) if key == "queue.buffering.max.kbytes" else None
    if kbytes is not None and kbytes < MIN_QUEUE_KBYTES:
        # A record whose value is larger than the producer's whole queue is refused
        # locally ("Queue full") however long it waits (review "pass56").
        return (f"is below {MIN_QUEUE_KBYTES}: the dead-letter producer's queue must hold "
                f"a dead letter of {MIN_MESSAGE_MAX_BYTES} bytes; use at least "
                f"{MIN_QUEUE_KBYTES} (or remove it: librdkafka's 1 GB)")
    if key == "transactional.id":
        # A transactional producer refuses every produce outside a transaction: each dead
        # letter failed for ever and held its partition.
        return ("makes the dead-letter producer transactional, and it writes outside "
                "transactions (each dead letter would fail for ever): remove it")
    if key in ("acks", "request.required.acks") and lowered not in ("all", "-1"):
        return ("would count a dead letter written before every in-sync replica has it: "
                "the worker commits its offset on the acknowledgement (acks=all): remove it")
    if key == "group.protocol" and lowered != "classic":
        # KIP-848's protocol assigns on the broker and refuses the worker's assignor.
        return ("selects the broker-side consumer-group protocol (KIP-848); the worker "
                "runs the classic protocol with cooperative-sticky assignment, whose "
                "rebalance callbacks it is tested with: remove it (or set classic)")
    if key == "group.protocol.type" and value != "consumer":  # librdkafka: this case only
        # `connect` is Kafka Connect's protocol: librdkafka then refused the worker's
        # assignor in words that named neither this setting nor the fix (review "pass56").
        return ("is not the consumer-group protocol type the worker reads with (Kafka "
                "Connect's workers use `connect`): remove it (or set consumer)")
    return None


def librdkafka_bool(value: str) -> bool | None:
    """A boolean setting as librdkafka reads it (`true`/`t`/`1`, `false`/`f`/`0`, any case);
    None for anything else (librdkafka refuses it: `check_clients` says so). Read apart, `t`
    was true to librdkafka and "not idempotent" to a note (review "whole46")."""
    return {"true": True, "t": True, "1": True,
            "false": False, "f": False, "0": False}.get(value.strip().lower())


def _kafka_extra(reader: _Reader, check_clients: bool) -> dict[str, str | Secret]:
    extra: dict[str, str | Secret] = {}
    for name in sorted(reader.env):
        if not name.startswith("KAFKA_") or name in _KAFKA_RESERVED:
            continue
        if not reader.env[name].strip():
            continue  # empty: unset, as every other setting (librdkafka read it as null)
        if _service_link(name, reader.env[name]):
            continue  # Kubernetes service links for a Service named "kafka…", not settings
        if name in KAFKA_TOOLING and not (name == "KAFKA_DEBUG"
                                          and _debug_contexts(reader.env[name])):
            reader.notes.append(
                f"{name} ignored: a variable of Kafka's JVM tools, not a client setting"
                + (" (librdkafka's debug takes contexts, e.g. KAFKA_DEBUG=consumer,cgrp)"
                   if name == "KAFKA_DEBUG" else "")
            )
            continue
        if not _PASSTHROUGH.match(name):
            reader.problems.append(
                f"{name} is not a valid pass-through name: use KAFKA_ plus the librdkafka "
                "setting in upper case with dots as underscores, e.g. KAFKA_SASL_MECHANISM"
            )
            continue
        key = kafka_key(name)
        if key in _KAFKA_OWNED and key not in _KAFKA_OVERRIDABLE_OWNED:
            reader.problems.append(
                f"{name} sets {key}, which the worker manages itself to keep at-least-once "
                "delivery: remove it"
            )
            continue
        if key == "statistics.interval.ms":
            # The worker sets its own (`kafka.KafkaSource`): check-config showed the user's
            # value as in effect, and it was not (review "ops22").
            reader.notes.append(
                f"{name} ignored: the worker sets statistics.interval.ms itself (5000: its "
                "broker states and lag figures come from the statistics)")
            continue
        # A trailing line break, as a Secret made with `kubectl create secret --from-file`
        # carries: dropped, as from a *_FILE (a password sent with it fails SASL).
        value = reader.env[name].rstrip("\r\n")  # UTF-8 text: `_drop_undecodable`
        if key not in SECRET_KAFKA_KEYS:
            # Trimmed as every other setting is: librdkafka refused 'SASL_SSL ' with no
            # word of the space (review "ops31"). A secret is taken as it is.
            value = value.strip()
        if key in _JAVA_ONLY:  # the value is not shown: a JAAS line holds a password
            reader.problems.append(f"{name} is {_JAVA_ONLY[key]}")
            continue
        refusal = _kafka_value_problem(key, value.strip())
        if refusal is not None:
            reader.problems.append(f"{name}={value!r} {refusal}")
            continue
        if key == "batch.num.messages":
            # Shown as in effect while the producers that matter override it (review
            # "kafkacfg46"): kept for `produce`, said plainly.
            reader.notes.append(
                f"{name} applies to the produce tool only: the dead-letter and replay "
                "producers write one record per batch (a broker checks a topic's "
                "max.message.bytes per batch)")
        if key == "allow.auto.create.topics" and librdkafka_bool(value) is False:
            reader.notes.append(
                f"{name}={value!r} keeps the consumer from creating source topics; the "
                "dead-letter producer may still create the DLQ topic where the brokers "
                "allow it (create it beforehand to choose its partitions and retention)")
        if key == "enable.idempotence" and librdkafka_bool(value) is False:
            # Taken (brokers without the IdempotentWrite permission, Azure Event Hubs):
            # acks=all still makes a dead letter durable; a retry may write it twice.
            reader.notes.append(
                f"{name}={value!r}: the dead-letter producer is not idempotent, so a retried "
                "dead letter may be written twice (replay sends it once more; with Redis "
                "the second is recognised). Keep it only where the brokers refuse "
                "idempotent producers")
        if check_clients:
            from consumer.librdkafka import c_integer_reading, property_problem

            refused = property_problem(key, value)
            if refused is not None:
                # A name only for a name librdkafka does not know; for a refused value,
                # another setting's name misled.
                hint = (_did_you_mean(name, (*ENV_VARS, *_COMMON_KAFKA_SETTINGS,
                                             *_FILE_NAMES))
                        if "No such configuration property" in refused else "")
                reader.problems.append(
                    f"{name} sets librdkafka setting {key!r}, which librdkafka refuses: "
                    f"{refused}{hint}"
                )
                continue
            read = c_integer_reading(key, value) if key not in SECRET_KAFKA_KEYS else None
            if read is not None:
                reader.problems.append(
                    f"{name}={value.strip()!r}: write it in plain decimal digits; librdkafka "
                    f"would read {read} (a leading 0 is octal, 0x hex, and what follows the "
                    "digits is ignored)")
                continue
        extra[key] = Secret(value) if key in SECRET_KAFKA_KEYS else value
    return extra


def _protocol_problems(extra: Mapping[str, str | Secret], bootstrap: str) -> list[str]:
    """A broker written `SASL_SSL://host:port` whose prefix is not the security protocol:
    librdkafka drops it ("protocol does not match security.protocol setting"), so `run`
    could never connect (review diff19)."""
    protocol = str(extra.get("security.protocol", "plaintext")).strip().lower()
    for entry in (e.strip() for e in bootstrap.split(",")):
        prefix, sep, _ = entry.rpartition("://")
        if sep and prefix.lower() in _BOOTSTRAP_PROTOCOLS and prefix.lower() != protocol:
            return [f"KAFKA_BOOTSTRAP_SERVERS has {redact_userinfo(entry)!r}, whose protocol is "
                    f"not KAFKA_SECURITY_PROTOCOL ({protocol}): librdkafka drops such a broker; "
                    f"set KAFKA_SECURITY_PROTOCOL={prefix.upper()} or write the broker without "
                    "its prefix"]
    return []


_TRUSTSTORE = ("a Java truststore setting, which librdkafka cannot use: give the brokers' "
               "CA certificate as a PEM file in KAFKA_SSL_CA_LOCATION instead")
_JAVA_ONLY = {
    "sasl.jaas.config": "Java's JAAS configuration, which librdkafka does not read: set "
                        "KAFKA_SASL_MECHANISM, KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD "
                        "(or KAFKA_SASL_OAUTHBEARER_*) instead",
    "ssl.truststore.location": _TRUSTSTORE,
    "ssl.truststore.password": _TRUSTSTORE,
    "ssl.truststore.type": _TRUSTSTORE,
}
"""Java clients' settings librdkafka refuses; its own text named no variable (review
"config41")."""


def _kafka_together(reader: _Reader, extra: Mapping[str, str | Secret], group_id: str) -> None:
    """librdkafka's verdict on the KAFKA_* settings as a whole, each complaint naming the
    variables it is about; its configuration warnings become notes, except a SASL mechanism
    without a SASL protocol: the connection would be unauthenticated, the credentials unused
    (librdkafka only warns, and `run` connected in plaintext; review config19)."""
    from consumer.librdkafka import ALIASES, client_problem

    conf = {k: v.reveal() if isinstance(v, Secret) else v for k, v in extra.items()}
    warnings: list[str] = []
    refused = client_problem({**conf, "group.id": group_id or "check-config"}, warnings)

    def said(key: str, text: str) -> bool:
        return f"`{key}`" in text or f"{key} " in text or f'"{key}"' in text

    def named(text: str) -> str:
        # Also by librdkafka's name for it: its messages say compression.codec for
        # compression.type, and the note named no setting (review "ops28").
        names = [f"KAFKA_{key.upper().replace('.', '_')}" for key in sorted(conf)
                 if said(key, text) or (key in ALIASES and said(ALIASES[key], text))]
        hint = ""
        if said("ssl.key.location", text) and "ssl.key.password" not in text:
            # librdkafka names the key file for a wrong or missing password of an
            # encrypted key as for a bad file (review "sasl55").
            if "ssl.key.password" in conf:
                names.append("KAFKA_SSL_KEY_PASSWORD")
            else:
                hint = "; an encrypted key also needs KAFKA_SSL_KEY_PASSWORD"
        return (f" (set by {', '.join(names)}{hint})" if names else "")

    if refused is not None and "No provider for SASL mechanism GSSAPI" in refused:
        # GSSAPI (Kerberos) is not in the wheel's build, and librdkafka's text says
        # "recompile librdkafka", where the fix is the mechanism setting (review "ops29").
        if any(conf.get(key) for key in ("sasl.mechanism", "sasl.mechanisms")):
            reader.problems.append(
                "KAFKA_SASL_MECHANISM=GSSAPI (Kerberos) is not in this build of librdkafka: "
                "use PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or OAUTHBEARER, as your brokers "
                "offer")
        else:  # librdkafka's default mechanism
            reader.problems.append(
                "KAFKA_SECURITY_PROTOCOL asks for SASL but KAFKA_SASL_MECHANISM is not set "
                "(librdkafka's default, GSSAPI/Kerberos, is not in this build): set "
                "KAFKA_SASL_MECHANISM to PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or OAUTHBEARER, "
                "as your brokers expect")
    elif refused is not None:
        reader.problems.append(f"the KAFKA_* settings together are refused by librdkafka "
                               f"({refused}){named(refused)}: fix or remove them")
    if refused is None:
        _heartbeat_within_session(reader, conf)
    for warning in warnings:
        if "is not configured for SASL" in warning:
            reader.problems.append(
                f"librdkafka would ignore the SASL settings: {warning}{named(warning)}; set "
                "KAFKA_SECURITY_PROTOCOL=SASL_SSL (or SASL_PLAINTEXT), or remove them")
        else:
            reader.notes.append(f"librdkafka: {warning}{named(warning)}")


def _heartbeat_within_session(reader: _Reader, conf: Mapping[str, Any]) -> None:
    """librdkafka takes a heartbeat interval at or past the session timeout, which the
    worker lowers to 10 s: a 15 s heartbeat, harmless under librdkafka's 45 s, lost every
    partition every session (review "ops23"). Kafka's own rule of thumb is a third."""
    from consumer.librdkafka import SESSION_TIMEOUT_MS

    if str(conf.get("group.protocol", "classic")).strip().lower() == "consumer":
        return  # KIP-848: the brokers set both
    try:
        session = int(conf.get("session.timeout.ms", SESSION_TIMEOUT_MS))
        heartbeat = int(conf.get("heartbeat.interval.ms", HEARTBEAT_INTERVAL_MS))
    except (TypeError, ValueError):
        return  # librdkafka's own check names it
    given = ("KAFKA_SESSION_TIMEOUT_MS" if "session.timeout.ms" in conf
             else "the worker's default session timeout")
    if "heartbeat.interval.ms" in conf:
        beat, fix = f"KAFKA_HEARTBEAT_INTERVAL_MS={heartbeat}", "set it to"
    else:
        beat = f"librdkafka's default heartbeat ({heartbeat} ms)"
        fix = "raise KAFKA_SESSION_TIMEOUT_MS or set KAFKA_HEARTBEAT_INTERVAL_MS to"
    if heartbeat >= session:
        reader.problems.append(
            f"{beat} is not below the session timeout ({session} ms, {given}): the group "
            f"would drop this replica every session and its partitions with it; {fix} at "
            f"most {session // 3} (a third)")
    elif heartbeat * 3 > session:
        reader.notes.append(
            f"{beat} is over a third of the session timeout ({session} ms, {given}): one "
            f"lost heartbeat may cost the replica its partitions; {fix} "
            f"{session // 3} or less")


def _read_secret_files(env: Mapping[str, str], problems: list[str],
                       unread: set[str] | None = None) -> Mapping[str, str]:
    """Replace each ``<NAME>_FILE`` by ``<NAME>`` with the file's content (one line);
    `unread` collects the ``<NAME>``s whose file could not give a value (its problem said
    so: "<NAME> is not set" after it only misled)."""
    if not any(name.endswith("_FILE") for name in env):
        return env
    resolved = dict(env)
    for name in sorted(env):
        if not name.endswith("_FILE"):
            continue
        base = name[:-5]
        is_kafka_secret = base.startswith("KAFKA_") and kafka_key(base) in SECRET_KAFKA_KEYS
        if not env[name].strip():
            if base in FILE_SECRETS or is_kafka_secret:
                del resolved[name]  # empty: unset, as every other setting
            continue
        if base not in FILE_SECRETS and not is_kafka_secret:
            if base.startswith("KAFKA_"):
                from consumer.librdkafka import property_problem

                own = property_problem(kafka_key(name), "x")
                if own is None or "No such configuration property" not in own:
                    # librdkafka's own `….file` settings (sasl.oauthbearer.assertion.file,
                    # …private.key.file, …jwt.template.file): a setting, not a secret's
                    # file form; refused, the jwt-bearer grant could not be set up (review
                    # "secrets49").
                    continue
                # A typo of a secret's file variable is told that one; a setting librdkafka
                # knows is told to be set itself (the first hint sent a certificate's file
                # to `ssl.key.pem`; review "diff42").
                unknown = "No such configuration property" in (
                    property_problem(kafka_key(base), "x") or "")
                hint = _did_you_mean(name, _FILE_NAMES) if unknown else ""
                problems.append(
                    f"{name}: only secrets can be read from a file{hint} "
                    f"({', '.join(sorted(SECRET_KAFKA_KEYS))})"
                    + ("" if hint else f"; set {base} instead")
                )
                del resolved[name]
            continue
        del resolved[name]
        if env.get(base, "").strip():
            problems.append(f"both {base} and {name} are set: keep one")
            continue
        path = env[name].strip()
        value, problem = _secret_file(path)
        if problem is not None:
            problems.append(f"{name}={path!r} {problem}")
            if unread is not None:
                unread.add(base)
            continue
        resolved[base] = value
    return resolved


def _drop_undecodable(env: Mapping[str, str], problems: list[str],
                      unread: set[str]) -> Mapping[str, str]:
    """Refuse the values of this worker's variables that are not UTF-8 text (the
    environment's undecodable bytes, which Python keeps as lone surrogates): passed on,
    librdkafka aborted the process (a group id), crashed it (a broker list) and the
    redaction of a registry password raised (review config25). Each is then unset, and
    said once."""
    bad = [name for name, value in env.items()
           if _ours(name) and not _utf8(value)]
    if not bad:
        return env
    codec = codecs.lookup(sys.getfilesystemencoding()).name
    for name in sorted(bad):
        if _opened_here(name) and codec != "utf-8":
            # A path whose bytes the locale cannot read: the locale's fault, not the path's
            # (review "diff60c": "re-enter it" for a right path under LANG=C).
            problems.append(f"{name} names a path the locale ({codec}) cannot read: run with "
                            "a UTF-8 locale (LANG=C.UTF-8, the image's) or use an ASCII path")
        else:
            problems.append(f"{name} holds bytes that are not UTF-8 text: re-enter it")
        unread.add(name)
    return {name: value for name, value in env.items() if name not in bad}


def _as_utf8(env: Mapping[str, str]) -> Mapping[str, str]:
    """The environment's values as UTF-8 text, whatever the locale: Python decodes them in
    the locale's encoding, so under a Latin-1 one `KAFKA_GROUP_ID=grüppe` read as
    `grÃ¼ppe`, another consumer group on the brokers (the topic read again from its
    start), and under a bare ASCII one valid UTF-8 was refused as not UTF-8 (review
    "env60"). Undecodable bytes stay lone surrogates, which `_drop_undecodable` refuses."""
    codec = sys.getfilesystemencoding()
    if codecs.lookup(codec).name == "utf-8":
        return env
    return {name: value if _opened_here(name) else
            value.encode(codec, "surrogateescape").decode("utf-8", "surrogateescape")
            for name, value in env.items()}


def _opened_here(name: str) -> bool:
    """A path this process opens itself (a secret's or the mappings' file, a CA bundle):
    kept as the locale gave it, which is what `open` encodes it back with. Decoded as UTF-8,
    a path under a Latin-1 locale named another file and one outside Latin-1 raised out of
    start-up (review "diff60b"). Kafka's own paths go to librdkafka as UTF-8: decoded."""
    if name in ("USERPILOT_CA_BUNDLE", "SSL_CERT_DIR"):
        return True
    if not name.endswith("_FILE"):
        return False
    return not name.startswith("KAFKA_") or kafka_key(name[:-5]) in SECRET_KAFKA_KEYS


def _invisible(char: str, name: str) -> bool:
    """A character that renders as nothing (`calls.renders_as_nothing`: a byte order mark,
    a zero-width space, a soft hyphen, a Hangul filler, a direction mark) and that no value
    holds on purpose. Not the zero-width joiner and non-joiner (emoji, Persian words),
    variation selectors (emoji) and tag characters (subdivision flags), in passwords and
    ids alike (review "diff60b": an emoji password was refused), but in the group id, where
    a pasted one is another consumer group (reviews "diff60c", "diff60d")."""
    if not renders_as_nothing(char):
        return False
    return name == "KAFKA_GROUP_ID" or not (
        char in "\u200c\u200d" or "\ufe00" <= char <= "\ufe0f"
        or "\U000e0020" <= char <= "\U000e007f" or "\U000e0100" <= char <= "\U000e01ef")


_INVISIBLE_NAMES = {"\ufeff": "a byte order mark, which Windows editors write at a file's start",
                    "\u200b": "a zero-width space, which copying from a web page or chat may add"}


def _drop_invisible(env: Mapping[str, str], problems: list[str],
                    unread: set[str]) -> Mapping[str, str]:
    """Refuse the values of this worker's variables holding an invisible (format)
    character: a byte order mark from a Windows file made into a Secret, a zero-width space
    pasted with a value. Shown, they look like the intended value; a group id with one
    was another consumer group, and the whole topic was sent again (review "env60"). Said
    by code point and place, never the value (it may be a secret); then unset."""
    bad: dict[str, tuple[int, str]] = {}
    for name, value in env.items():
        if not _ours(name):
            continue
        at = next((i for i, c in enumerate(value) if _invisible(c, name)), None)
        if at is not None:
            bad[name] = (at, value[at])
    if not bad:
        return env
    for name, (at, char) in sorted(bad.items()):
        said = _INVISIBLE_NAMES.get(char, unicodedata.name(char, "a format character"))
        group = ("; a worker that ran with it committed under that group name: give the new "
                 "name the old group's offsets first (kafka-consumer-groups.sh "
                 "--reset-offsets --from-file, README), or the topic is read again from its "
                 "start" if name == "KAFKA_GROUP_ID" else "")
        problems.append(f"{name} holds an invisible character, U+{ord(char):04X} ({said}), "
                        f"at character {at + 1}: re-enter the value without it{group}")
        unread.add(name)
    return {name: value for name, value in env.items() if name not in bad}


def _ours(name: str) -> bool:
    """A variable this worker reads (or refuses as unknown): its value must be text."""
    return (name in ENV_VARS or name in STANDARD_ENV_VARS
            or name.lower() in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
            or name.startswith(("KAFKA_", "USERPILOT_", "SCHEMA_REGISTRY_", "REDIS_",
                                "WORKER_")))


def _utf8(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _secret_file(path: str) -> tuple[str, str | None]:
    """A secret file's value (one line), or what is wrong with the file."""
    try:
        with open(path, "rb") as file:  # a bounded read
            raw = file.read(MAX_SECRET_FILE_BYTES + 1)
    except (OSError, UnicodeError) as exc:  # UnicodeError: a path the locale cannot encode
        reason = getattr(exc, "strerror", None) or str(exc)
        return "", f"cannot be read ({reason}): check the mounted secret's path and permissions"
    try:
        # A leading byte order mark is the file's encoding, not the secret's (Notepad).
        content = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError:
        # Not a path or permission problem (the advice it got, review "env60").
        utf16 = raw[:2] in (b"\xff\xfe", b"\xfe\xff")
        return "", ("is not UTF-8 text" + (" (UTF-16, as PowerShell's > writes)" if utf16
                                           else "") + ": save the value as UTF-8")
    if len(raw) > MAX_SECRET_FILE_BYTES:
        return "", (f"holds over {MAX_SECRET_FILE_BYTES // 1024} KB: a secret file holds the "
                    "value alone; check the path")
    value = content.removesuffix("\n").removesuffix("\r")
    if not value.strip():
        return "", "is empty: the secret file must hold the value"
    return value, None


MAX_SECRET_FILE_BYTES = 64 * 1024
"""A `*_FILE` secret read at most this far (`/dev/zero` or a wrong mount: no endless read)."""


def userpilot_base_url(endpoint: str, insecure_http: bool) -> str:
    """``scheme://host[:port]`` of Userpilot's API (`Settings.base_url`)."""
    return f"{'http' if insecure_http else 'https'}://{endpoint}"


_BOOTSTRAP_PROTOCOLS = ("plaintext", "ssl", "sasl_plaintext", "sasl_ssl")


def _bootstrap_problems(raw: str) -> list[str]:
    """KAFKA_BOOTSTRAP_SERVERS as librdkafka reads it: host[:port] entries, each perhaps
    with a security-protocol prefix (`SASL_SSL://host:9093`). Checked here because a
    mistake otherwise shows only as "Kafka not reachable" after the reach timeout."""
    entries = [e.strip() for e in raw.split(",")]
    if not any(entries):
        return [f"KAFKA_BOOTSTRAP_SERVERS={raw!r} lists no broker: enter host:port, e.g. "
                "kafka:9092"]
    problems: list[str] = []
    for entry in entries:
        if not entry:  # a stray comma: librdkafka skips it too
            continue
        protocol, sep, address = entry.rpartition("://")
        shown = redact_userinfo(entry)  # credentials written into it are never echoed
        if ";" in entry or any(ch.isspace() for ch in entry):
            # librdkafka takes it as one unresolvable name: `run` waited for ever, as for
            # an outage (review config25).
            problems.append(f"KAFKA_BOOTSTRAP_SERVERS has {shown!r}: separate brokers with "
                            "commas and no spaces, e.g. kafka-0:9092,kafka-1:9092")
            continue
        if sep and protocol.lower() not in _BOOTSTRAP_PROTOCOLS:
            problems.append(f"KAFKA_BOOTSTRAP_SERVERS has {shown!r}: a broker is host:port, "
                            f"not a URL ({protocol}:// is not a Kafka security protocol)")
            continue
        if address.count(":") > 1 and not address.startswith("["):
            if _ipv6_with_port(address):
                # librdkafka reads `::1:9092` as the address `::1:9092` on port 9092 (the
                # Java client as `::1`, port 9092): `run` waited for ever (review diff25b).
                problems.append(f"KAFKA_BOOTSTRAP_SERVERS has {shown!r}: write an IPv6 "
                                "address with a port in brackets, e.g. [::1]:9092")
                continue
            try:  # an IPv6 address without brackets: librdkafka takes it, on port 9092
                ipaddress.IPv6Address(address)
                continue
            except ValueError:
                pass
        host, port = address, None  # None: no port written (librdkafka's 9092)
        if address.startswith("["):  # [IPv6]:port
            host, closed, tail = address.partition("]")
            host = host + "]" if closed else ""
            if tail:
                if not tail.startswith(":"):
                    host = ""
                port = tail[1:]
        elif ":" in address:
            host, _, port = address.rpartition(":")
        if not host or host == "[]" or "/" in address or "@" in address:
            problems.append(f"KAFKA_BOOTSTRAP_SERVERS has {shown!r}, not host:port "
                            "(e.g. kafka:9092)" + (": credentials go in KAFKA_SASL_USERNAME "
                                                   "and KAFKA_SASL_PASSWORD"
                                                   if "@" in address else ""))
        elif port is not None and not (port.isascii() and port.isdigit()
                                       and 0 < int(port) < 65536):
            # An empty one (`kafka:`, an unset ${PORT}) too: librdkafka dialled port 0 and
            # `run` waited for ever (review "helm49").
            problems.append(f"KAFKA_BOOTSTRAP_SERVERS has {shown!r}: the port must be "
                            "1-65535" + (", or leave out the ':' for 9092" if not port
                                         else ""))
        elif not _address_literal_ok(host):
            # librdkafka only fails to resolve it: `run` waited for ever, as for an outage.
            problems.append(f"KAFKA_BOOTSTRAP_SERVERS has {shown!r}: {host} is not an IP "
                            "address or a host name; give the broker's name or its address")
    return problems


def _ipv6_with_port(address: str) -> bool:
    """`addr:port` without brackets: the last group is decimal, port-like, and what is
    before it is an IPv6 address of its own (`::1:9092`, `2001:db8::5:9093`)."""
    head, _, last = address.rpartition(":")
    if not (last.isascii() and last.isdigit() and 0 < int(last) < 65536 and len(last) >= 2):
        return False
    try:
        ipaddress.IPv6Address(head)
    except ValueError:
        return False
    return True


_BROKER_NAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?\.?")


def _address_literal_ok(host: str) -> bool:
    """False for what can only be a mistyped address: `[…]` that is no IPv6 address, or
    dotted digits no resolver reads as IPv4 (`999.1.1.1`, five parts). The shorthand
    inet_aton takes (`127.1`) stays valid: librdkafka connects to it."""
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return False
        return True
    parts = host.removesuffix(".").split(".")
    if len(parts) < 2 or not all(p.isascii() and p.isdigit() for p in parts):
        # A name: letters, digits, '-', '_' and dots ("kafka:9092:9092" left a ':'), in
        # labels a resolver looks up, as for the registry's host: `kafka..svc` was taken,
        # and `run` waited for the brokers for ever (review "config41").
        return _BROKER_NAME.fullmatch(host) is not None and all(
            _HOST_LABEL.match(label.lower()) for label in host.removesuffix(".").split("."))
    if len(parts) > 4 or host.endswith("."):
        # `127.0.0.1.`: a name's trailing dot on an address, which no resolver reads
        # (taken, the brokers were "not reachable" for ever; review "config40").
        return False
    *leading, last = (int(p) for p in parts)
    return all(p <= 255 for p in leading) and last < 256 ** (5 - len(parts))


def _url_problem(url: str) -> str | None:
    """What makes `url` unusable as an HTTP URL (the reason, after the redacted URL), or
    None. The HTTP client would fail only at start-up, with part of a password in its
    message when a `/`, `?` or `#` in it ended the host early."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        if "@" in url:  # a '/', '?' or '#' in the password ended the host early
            return ("is not a valid URL: percent-encode '/', '?', '#' and '@' in the user "
                    "name and password (%2F, %3F, %23, %40), or use "
                    "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO")
        return "is not a valid URL (check the host and the port): e.g. http://registry:8081"
    if not parts.hostname:
        return "has no host: e.g. http://schema-registry:8081"
    if port == 0:
        return "has port 0: use 1-65535"
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        # The client adds its paths after the URL's: `…/v7?x=1` became `…/v7?x=1/schemas/…`
        # and every schema fetch failed at `run` (review "ops26").
        return ("has a query or fragment ('?…', '#…'): give the registry's base URL alone, "
                "e.g. http://schema-registry:8081 or https://host/apis/ccompat/v7")
    refused = _http_url_problem(url)
    if refused is not None:
        return f"is not a URL the HTTP client can use ({refused}): check the host and the port"
    return None


def timeout_seconds(text: str) -> float:
    """A command line's --timeout: a number of seconds above 0. Why: -1 is librdkafka's
    "wait forever" (a silent hang with Kafka down) and 0 reported a running registry as
    unreachable."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (0 < value <= 3600):
        raise argparse.ArgumentTypeError(f"{text!r}: give seconds above 0 and at most 3600")
    return value


def wait_seconds(text: str) -> float:
    """`run --wait`: seconds (0 or more, "inf" for ever) to keep trying unreachable
    services at start-up."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if math.isnan(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give seconds, 0 or more (inf: for ever)")
    return value


def redact_userinfo(url: str) -> str:
    """`url` with everything between the scheme and the last `@` replaced by `***` (for
    logs and check-config): a password may hold `@` or `/` itself, and a malformed URL
    without a scheme is redacted too. A query or fragment is masked too: a token pasted
    there was echoed by the refusal that named it (review "secrets49"), as REDIS_URL's
    are not."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    if "@" in rest:
        rest = "***@" + rest.rsplit("@", 1)[1]
    cut = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=-1)
    if cut >= 0:
        rest = rest[:cut + 1] + "***"
    return f"{scheme}{sep}{rest}"


def _proxy_variable(env: Mapping[str, str], name: str) -> tuple[str, str] | None:
    """(the variable's name as set, its value); the lower-case spelling wins, as in curl.
    An empty one counts as unset, as curl reads it: `https_proxy=` beside `HTTPS_PROXY=...`
    hid the proxy, and `no_proxy=` beside `NO_PROXY=host` the bypass (Python's urllib
    rule; review "http33")."""
    for spelled in (name.lower(), name.upper()):
        if spelled in env and env[spelled].strip():
            return spelled, env[spelled].strip()
    return None


def _bypassed(netloc: str, no_proxy: str) -> bool:
    """NO_PROXY as curl reads it (entries apart by commas or blanks): `*`, or a host or
    domain (a leading dot
    optional) that is the URL's host or a domain above it. An entry with a port matches
    only a URL that names that port (Userpilot's URL names none). A URL whose host is an
    IP address also matches that address however it is written (`::1`, `[0::1]`) and a
    network holding it in CIDR notation (`10.0.0.0/8`, `fd00::/8`), as curl (7.86+),
    Go and requests read NO_PROXY: Kubernetes clusters commonly list their networks so."""
    host = netloc.rsplit("@", 1)[-1].lower()
    bare = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    # An IPv6 address is written bracketed in a URL, and either way in NO_PROXY (curl
    # matches `::1` for http://[::1]:8081): compared without the brackets.
    unbracketed = bare.rsplit("]", 1)[0].lstrip("[") if bare.startswith("[") else None
    address = _ip_address(unbracketed if unbracketed is not None else bare)
    # Entries apart by commas or blanks, as curl reads them (review "egress59": a
    # space-separated list bypassed nothing here while curl honoured it).
    for entry in (e.lower().lstrip(".") for e in re.split(r"[,\s]+", no_proxy)):
        if entry == "*":
            return True
        if entry and any(h == entry or h.endswith("." + entry) for h in (host, bare)):
            return True
        if unbracketed is not None and entry.strip("[]") == unbracketed:
            return True
        if address is not None and _holds(entry.strip("[]"), address):
            return True
    return False


def _ip_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """`host` as an IP address, or None for a name."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _holds(entry: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """A NO_PROXY entry that is `address` or a network (CIDR) holding it."""
    if "/" not in entry:
        return _ip_address(entry) == address
    try:
        # Host bits set (`10.1.2.3/8`) name the network all the same, as curl reads them.
        return address in ipaddress.ip_network(entry, strict=False)
    except ValueError:  # not an address or network: a name, compared above
        return False


def environment_proxy(url: str, env: Mapping[str, str]) -> tuple[str, str] | None:
    """(variable, proxy URL) the environment names for `url`, or None.

    HTTPS_PROXY for https, HTTP_PROXY for http, else ALL_PROXY; none when NO_PROXY
    covers the host (`_bypassed`). A proxy given without a scheme is an HTTP proxy, as
    httpx and curl read it.
    """
    try:
        parts = urlsplit(url)
    except ValueError:  # not a URL (refused where it is read): no proxy to name
        return None
    for name in (f"{parts.scheme}_proxy", "all_proxy"):
        found = _proxy_variable(env, name)
        if found is not None and found[1]:
            break
    else:
        return None
    no_proxy = _proxy_variable(env, "no_proxy")
    if no_proxy is not None and _bypassed(parts.netloc, no_proxy[1]):
        return None
    spelled, value = found
    return spelled, value if "://" in value else f"http://{value}"


def _http_proxy_only(url: str, env: Mapping[str, str]) -> list[str]:
    """A note when HTTP_PROXY alone is set and Userpilot's URL is https://: HTTP clients
    (curl, httpx, aiohttp) send https:// requests through HTTPS_PROXY or ALL_PROXY only, so
    Userpilot is reached directly. Behind an egress proxy every request failed on a
    connection error while HTTP_PROXY seemed to name the way out (round 59's "noticed")."""
    found = _proxy_variable(env, "http_proxy")
    if found is None or not url.startswith("https://"):
        return []
    no_proxy = _proxy_variable(env, "no_proxy")
    if no_proxy is not None and _bypassed(urlsplit(url).netloc, no_proxy[1]):
        return []
    # No advice to unset it: an http:// schema registry may be reached through it (review
    # "diff60": following that advice cut the registry off).
    return [f"{found[0]} is set and HTTPS_PROXY is not: Userpilot ({url}) is reached "
            "directly, not through that proxy (HTTP_PROXY is for http:// URLs only, as "
            "curl and httpx read it); set HTTPS_PROXY to the same proxy if the way out "
            f"goes through it, or add {urlsplit(url).hostname} to NO_PROXY if reaching it "
            "directly is meant (this note then goes)"]


def _proxy(reader: _Reader, url: str, service: str = "Userpilot",
           skip: tuple[str, str] | None = None) -> Secret | None:
    """The proxy for `service` at `url`, refused at start-up when the HTTP client cannot
    use it (it would fail every request, each dead-lettered or retried forever; for the
    registry, a crash at start-up that printed the proxy's password). `skip`: a
    (variable, proxy) already checked for another service: returned unchecked."""
    found = environment_proxy(url, reader.env)
    if found is None:
        return None
    name, value = found
    if found == skip:
        return Secret(value)
    if re.match(r"(?i)^(https?|socks[45]?h?):?/", value.split("://", 1)[1]):
        # `http//proxy:3128` read as a scheme-less host "http" (review "ops31"): every
        # request failed on a DNS error that only `check-config --online` showed.
        reader.problems.append(
            f"{name}={redact_userinfo(reader.env.get(name, value))} misspells the scheme "
            f"(the proxy for {service}): write it as http://host:port")
        return None
    try:
        parts = urlsplit(value)
    except ValueError:  # an unclosed [ of an IPv6 address
        reader.problems.append(
            f"{name}={redact_userinfo(value)} is not a valid URL (the proxy for {service}): "
            "give an HTTP proxy as http://host:port ([address]:port for IPv6)")
        return None
    if "@" in parts.path or "@" in parts.query or "@" in parts.fragment:
        # A "#" or "?" in the password ended the address there: the message said the port
        # was not a number (review "config35").
        reader.problems.append(
            f"{name}: the user or password of the proxy for {service} holds a character "
            "that ends the address; percent-encode it (/ as %2F, @ as %40, : as %3A, # as "
            "%23, ? as %3F)")
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        reader.problems.append(
            f"{name}={redact_userinfo(value)} is not a proxy the worker can use for "
            f"{service}: give an HTTP proxy as http://host:port (https:// for TLS to the "
            f"proxy; SOCKS is not supported), or add the host of {service} to NO_PROXY")
        return None
    try:
        port = parts.port
    except ValueError:  # not a number, or out of range
        port = -1
    if port in (-1, 0):
        reader.problems.append(
            f"{name}={redact_userinfo(value)}: the port is not a number from 1 to 65535 "
            f"(the proxy for {service})")
        return None
    refused = _http_url_problem(value) or (
        _aiohttp_host_problem(parts.hostname or "") if service == "Userpilot" else None)
    if refused is not None:
        reader.problems.append(
            f"{name}={redact_userinfo(value)} is not a proxy URL the HTTP client can use "
            f"({refused}; the proxy for {service}): check its host and port")
        return None
    if ":" in unquote(parts.username or ""):
        # Basic authentication joins user and password with ":", so a user holding one
        # cannot be sent: aiohttp refused it before anything left, every request read as
        # "unusable answer" while check-config said OK (review "http35").
        reader.problems.append(
            f"{name}={redact_userinfo(value)}: the user name of the proxy for {service} "
            "holds ':' (written %3A), which Basic authentication cannot carry: only the "
            "password may")
        return None
    if service == "Userpilot" and not all(
            unquote(part or "").isascii() for part in (parts.username, parts.password)):
        # Userpilot's client (aiohttp) writes proxy credentials in Latin-1: a "€" failed
        # every request before it left ("unusable answer", the partition stuck), and an "ä"
        # went out as other bytes than delete-users' UTF-8 (review "secrets34").
        reader.problems.append(
            f"{name}={redact_userinfo(value)}: the user or password of the proxy for "
            f"{service} holds a character outside ASCII, which HTTP clients encode "
            "differently (Latin-1 or UTF-8): give the proxy user an ASCII password")
        return None
    return Secret(value)


_K8S_REFERENCE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
_REFERENCE_REFUSED = ("REDIS_URL", "SCHEMA_REGISTRY_URL", "HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY")
_REFERENCE_NOTED = ("KAFKA_SASL_USERNAME", "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO",
                    # every Kafka secret: the OAuth client secret too (review "config53")
                    *sorted("KAFKA_" + key.upper().replace(".", "_")
                            for key in SECRET_KAFKA_KEYS))


def _unexpanded_references(reader: _Reader, env: Mapping[str, str], offline: bool) -> None:
    """A `$(VAR)` left in a secret-bearing setting: a Kubernetes reference to another
    variable that was not expanded. Kubernetes expands one only in an env var's `value`, and
    only when VAR is defined earlier in the container's env; a Secret's data never. The
    worker got the text itself, and Redis refused the password: exit 1 in every pod, with a
    message to check the password (review "helm52"). Refused where the value is a URL (a
    `$` that is meant writes %24) or a token; only noted for Kafka's SASL user and password
    and the registry's credentials, which have no escape. The referenced name is quoted
    only when the environment has that variable (defined after it): otherwise the "name" may
    be a piece of a password that really holds `$(` (review "diff52a")."""
    names = (*_REFERENCE_REFUSED, *(() if offline else ("USERPILOT_API_KEY",)))
    for name, value in env.items():
        upper = name.upper()
        refused = upper in names
        if not (refused or upper in _REFERENCE_NOTED):
            continue
        found = _K8S_REFERENCE.search(value)
        if found is None:
            continue
        ref = f"$({found[1]})" if found[1] in env else "a $(...)"
        var = found[1] if found[1] in env else "that variable"
        what = (f"{name} holds {ref}, a Kubernetes reference to another variable that was not "
                "expanded: Kubernetes expands $(VAR) only in an env var's value, and only when "
                "VAR is defined earlier in the container's env (never in a Secret's data). "
                f"Define {var} before {name}, or give the whole value from a Secret")
        if refused:
            reader.problems.append(what + ("; a URL whose password really holds it writes $ "
                                           "as %24" if upper != "USERPILOT_API_KEY" else ""))
        else:
            also = f", or give it in {upper}_FILE" if f"{upper}_FILE" in _FILE_NAMES else ""
            reader.notes.append(what + f" (if the value really holds it, ignore this note{also})")


def _unknown_variables(reader: _Reader) -> None:
    for name in sorted(reader.env):
        if name in ENV_VARS or name in _BUILD_FACTS or _service_link(name, reader.env[name]):
            continue
        upper = name.upper()
        if (name != upper and not name.startswith("KAFKA_")  # the pass-through's own check
                and upper.startswith((*_OWN_PREFIXES, *_SHARED_PREFIXES, "KAFKA_"))
                and (is_known_env_var(upper) or upper in REDIS_ENV_VARS)):
            # `userpilot_rate_burst=5` was ignored without a word (review "ops31"), and so
            # were `redis_url` and `kafka_security_protocol`: the worker ran without Redis
            # and in plaintext, check-config saying OK (review "config35"); and, in any
            # other case or as a `_FILE`, `Kafka_Security_Protocol` and
            # `userpilot_api_key_file` (review "config40").
            reader.problems.append(
                f"{name} is not a setting of this worker: names are upper case; write "
                f"{name.upper()}")
            continue
        if upper.startswith("SCHEMA_REGISTRY_BEARER_AUTH"):
            # Confluent clients' OAuth settings: "did you mean ..._BASIC_AUTH_USER_INFO?"
            # did not say a bearer token cannot be used at all (review "registry58").
            reader.problems.append(
                f"{name} is not a setting of this worker: its registry client authenticates "
                "with basic auth only (SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO, or user:password "
                "in SCHEMA_REGISTRY_URL); a registry that takes only bearer tokens (OAuth) "
                "is not supported")
            continue
        shared = name.startswith(_SHARED_PREFIXES)
        if not shared and not name.startswith(_OWN_PREFIXES):
            continue
        hint = _did_you_mean(name, REDIS_ENV_VARS if shared else (*ENV_VARS, *_FILE_NAMES))
        if shared and not hint:  # another program's variable, not a typo of ours
            continue
        reader.problems.append(
            f"{name} is not a setting of this worker{hint}: "
            "fix the name or remove it (see README, Configuration)"
        )


def _consent_categories(reader: _Reader) -> tuple[str, ...]:
    raw = reader.text("USERPILOT_CONSENT_CATEGORIES", "analytics") or ""
    categories = tuple(dict.fromkeys(c.strip().lower() for c in raw.split(",") if c.strip()))
    if not categories and raw.strip():
        # "," is not "none": a value that lists nothing must not turn gating off.
        reader.problems.append(
            f"USERPILOT_CONSENT_CATEGORIES={raw!r} lists no category: use "
            f"{', '.join(CATEGORIES)}, or 'none' to disable consent gating")
        return ("analytics",)
    if len(categories) == 1 and categories[0] in CONSENT_OFF:
        return ()
    if categories == ("essential",):
        # Signal grants essential consent always: every event passed, while check-config
        # said gating was on (review "config35").
        reader.notes.append(
            "USERPILOT_CONSENT_CATEGORIES=essential gates nothing: Signal grants essential "
            "consent always, so every event is sent as with 'none'; list the categories "
            "Userpilot's use needs, e.g. analytics")
    for cat in categories:
        if cat in CONSENT_OFF:
            reader.problems.append(
                f"USERPILOT_CONSENT_CATEGORIES={raw!r} mixes {cat!r} with categories: "
                f"{cat!r} alone disables consent gating"
            )
        elif cat not in CATEGORIES:
            close = difflib.get_close_matches(cat, CATEGORIES, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else ""
            reader.problems.append(
                f"USERPILOT_CONSENT_CATEGORIES has {cat!r}, not a Signal consent category"
                f"{hint}: use {', '.join(CATEGORIES)}, or 'none' to disable consent gating"
            )
    return categories


def topic_problem(topic: str) -> str | None:
    """Why `topic` cannot hold Signal's events (an illegal name, a Kafka internal topic),
    said after its name, or None: what KAFKA_TOPICS and `produce --topic` refuse."""
    if not _TOPIC.match(topic):
        return ("which is not a legal topic name (letters, digits, '.', '_', '-', at most "
                "249 characters)")
    if topic in KAFKA_INTERNAL_TOPICS:
        return ("one of Kafka's own internal topics (no Signal event is there): enter the "
                "Signal delivery topic")
    return None


def _topics(reader: _Reader) -> tuple[str, ...]:
    raw = reader.required(
        "KAFKA_TOPICS", "enter the Signal delivery topic(s), comma-separated, e.g. "
        "delivery-userpilot"
    )
    topics = tuple(t.strip() for t in raw.split(",") if t.strip())
    for topic in topics:
        problem = topic_problem(topic)
        if problem is not None:
            reader.problems.append(f"KAFKA_TOPICS has {topic!r}, {problem}")
    if raw and not topics:
        reader.problems.append("KAFKA_TOPICS lists no topic: enter at least one topic name")
    twice = sorted({t for t in topics if topics.count(t) > 1})
    if twice:
        reader.problems.append(f"KAFKA_TOPICS lists {', '.join(map(repr, twice))} twice: "
                               "list each topic once")
    return topics


# --------------------------------------------------------------------- Redis (optional)

_REDIS_URL = re.compile(
    r"^(?P<scheme>rediss?)://(?:(?P<user>[^:@/]*)(?::(?P<password>[^@/]*))?@)?"
    r"(?P<host>\[[0-9A-Fa-f:.]+\]|[^:/?#@\[\]]+)(?::(?P<port>[0-9]{1,5}))?"
    r"(?:/(?P<db>[0-9]{0,2}))?(?P<query>\?[^#]*)?$"
)


_REDIS_QUERY_KEYS = frozenset({"ssl_cert_reqs", "ssl_check_hostname", "client_name"})
"""Query parameters redis-py applies that override no worker setting (a self-signed TLS
certificate on a managed Redis needs ssl_cert_reqs=none). Not `protocol`: RESP3 changes how
the worker's Lua scripts' answers are read."""


@dataclass(frozen=True)
class RedisSettings:
    """Where the replicas share their rate budget and delivered messageIds."""

    url: Secret  # may carry a password: reveal only to the Redis client
    tls: bool
    tls_ca_file: str | None
    timeout_s: float
    dedup_ttl_s: float

    @property
    def redacted_url(self) -> str:
        """The URL with any user:password replaced, for check-config and logs."""
        return redact_userinfo(self.url.reveal())

    def describe(self) -> dict[str, Any]:
        return {"url": self.redacted_url, "tls": self.tls, "tls_ca_file": self.tls_ca_file,
                "timeout_seconds": self.timeout_s, "dedup_ttl_seconds": self.dedup_ttl_s}


def _redis_shown(match: re.Match[str]) -> str:
    """REDIS_URL as messages show it: no user, password or query value (any may be the
    password: `?password=` is a common mistake)."""
    host, port, db = match.group("host"), match.group("port"), match.group("db")
    userinfo = "***@" if match.group("user") is not None else ""
    query = match.group("query")
    if query:
        keys = [key for key, _ in parse_qsl(query[1:], keep_blank_values=True)]
        # Only the parameters the worker takes are named: `?pw-secret` is a password pasted
        # after the `?` (review "config48"), and so is `?c2VjcmV0=` (base64's padding,
        # review "diff48b").
        query = "?" + "&".join(f"{key}=***" if key in _REDIS_QUERY_KEYS else "***"
                               for key in keys) if keys else "?***"
    return (f"{match.group('scheme')}://{userinfo}{host}{':' + port if port else ''}"
            f"{'/' + db if db is not None else ''}{query or ''}")


_REDIS_CERT_REQS = ("none", "optional", "required")
_REDIS_NAME = re.compile(r"^[!-~]+$")  # CLIENT SETNAME: printable, no spaces
# What redis-py's to_bool reads as meant (empty: its default); "off" would read as true.
_REDIS_BOOLEANS = ("", "0", "F", "FALSE", "N", "NO", "1", "T", "TRUE", "Y", "YES")


def _redis_query_problems(query: str, shown: str, tls: bool) -> list[str]:
    """REDIS_URL's query parameters, checked as redis-py would use them at the first
    connection: there a wrong one was a TypeError in every call (`ssl_*` on redis://),
    a crash loop that check-config passed, or a replica in fallback for good."""
    params = parse_qsl(query, keep_blank_values=True)
    refused = sorted({k for k, _ in params} - _REDIS_QUERY_KEYS)
    if refused or not params:
        # Counted, not named: any of them may be a password (see `_redis_shown`).
        unknown = (f"{len(refused)} unknown, not shown: one may be a secret" if refused
                   else "none readable")
        return [f"REDIS_URL={shown!r} has query parameters the worker does not take "
                f"({unknown}): the timeout is "
                "REDIS_TIMEOUT_SECONDS, the database the /db path, TLS the rediss:// scheme; "
                f"allowed: {', '.join(sorted(_REDIS_QUERY_KEYS))}"]
    problems: list[str] = []
    for key, value in params:
        if key.startswith("ssl_") and not tls:
            problems.append(f"REDIS_URL={shown!r}: {key} applies to TLS only; use "
                            "rediss:// for TLS, or remove it")
        elif key == "ssl_cert_reqs" and value not in _REDIS_CERT_REQS:  # case matters
            problems.append(f"REDIS_URL={shown!r}: ssl_cert_reqs must be one of "
                            f"{', '.join(_REDIS_CERT_REQS)}")
        elif key == "ssl_check_hostname" and value.upper() not in _REDIS_BOOLEANS:
            problems.append(f"REDIS_URL={shown!r}: ssl_check_hostname must be true or false")
        elif key == "client_name" and not _REDIS_NAME.match(value):
            problems.append(f"REDIS_URL={shown!r}: client_name must be printable characters "
                            "without spaces (Redis refuses others)")
    return problems


def _redis(reader: _Reader) -> tuple[RedisSettings | None, bool]:
    """REDIS_* settings (None without REDIS_URL) and USERPILOT_RATE_LIMIT_SHARED."""
    shared = reader.boolean("USERPILOT_RATE_LIMIT_SHARED", False)
    # At least 5 ms: no Redis call fits in less (every call would fall back).
    timeout = reader.number("REDIS_TIMEOUT_SECONDS", 0.25, 0.005, 5.0, inclusive_low=True)
    ttl = reader.number("REDIS_DEDUP_TTL_SECONDS", 86400.0, 60.0, 30 * 86400.0,
                        inclusive_low=True)
    ca_file = reader.text("REDIS_TLS_CA_FILE")
    raw = reader.text("REDIS_URL")
    raw = None if raw is None else _lower_scheme(raw)
    if raw is None:
        if ca_file is not None:
            reader.problems.append("REDIS_TLS_CA_FILE is set but REDIS_URL is not: set "
                                   "REDIS_URL=rediss://host:6380/0 or remove it")
        for name in ("REDIS_TIMEOUT_SECONDS", "REDIS_DEDUP_TTL_SECONDS"):
            if reader.text(name) is not None:
                reader.notes.append(f"{name} ignored: REDIS_URL is not set (each replica "
                                    "runs alone: its share of the budget, no deduplication)")
        return None, shared
    match = _REDIS_URL.match(raw)
    if match is None:
        # Not shown: a secret (a bare password from a Secret's wrong key, say).
        hint = ("it must start with redis:// or rediss:// (TLS)" if "://" not in raw
                or not raw.startswith(("redis://", "rediss://"))
                else "use redis://[:password@]host[:port][/db]")
        if "@" in raw.partition("://")[2] and hint.startswith("use"):
            # A password's own '@', '/' or '#' splits it where the host seems to start: the
            # generic form did not say what to change (review "ops29").
            hint += (", and percent-encode the user name's and password's own '@' as %40, "
                     "'/' as %2F, ':' as %3A, '#' as %23, '?' as %3F")
        reader.problems.append(f"REDIS_URL (not shown: it is a secret) is not a Redis URL: "
                               f"{hint}, e.g. redis://redis:6379/0")
        return None, shared
    shown = _redis_shown(match)
    host = match.group("host")
    if not _address_literal_ok(host):
        reader.problems.append(f"REDIS_URL={shown!r}: {host} is not an IP address or a "
                               "host name: give the host's name or its address, e.g. "
                               "redis.cache.svc, 10.0.0.5 or [::1]")
    port = match.group("port")
    if port is not None and not 0 < int(port) < 65536:
        reader.problems.append(f"REDIS_URL={shown!r} has an invalid port: use 1-65535")
    if any(c in (match.group("password") or "") + (match.group("user") or "") for c in "#?[]"):
        # The Redis client would read the rest as a fragment or query, or '[' as the start
        # of an IPv6 host: a crash at start-up whose message shows part of the password
        # (review "secrets18" for the brackets).
        reader.problems.append(f"REDIS_URL={shown!r}: percent-encode '#' as %23, '?' as "
                               "%3F, '[' as %5B and ']' as %5D in the user name and password")
    tls = match.group("scheme") == "rediss"
    if match.group("query") and not any(
            c in (match.group("password") or "") + (match.group("user") or "") for c in "#?"):
        reader.problems.extend(_redis_query_problems(match.group("query")[1:], shown, tls))
    # A database past 15 is taken: a Redis may be configured with more (`databases 32`);
    # one that has no such database is refused at `run`'s start (`reach.redis_refusal`)
    # and by `check-config --online` (review "ops31").
    if ca_file is not None:
        if not tls:
            reader.problems.append("REDIS_TLS_CA_FILE is set but REDIS_URL uses redis://: "
                                   "use rediss:// for TLS, or remove REDIS_TLS_CA_FILE")
        else:
            _check_pem(reader, "REDIS_TLS_CA_FILE", ca_file, "mount the CA and give its path")
    return RedisSettings(url=Secret(raw), tls=tls, tls_ca_file=ca_file, timeout_s=timeout,
                         dedup_ttl_s=ttl), shared


def _scheme_hint(shown: str) -> str:
    """What to write instead of a URL without http:// or https://: prefixing http:// to
    `ftp://reg:8081` or `http//reg:8081` suggested "http://ftp://reg:8081" (review
    "ops31")."""
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):/*", shown)
    if scheme and scheme.group(1).lower() not in ("http", "https") and "://" in shown:
        return (f"has the scheme {scheme.group(1)}://: the registry speaks HTTP; write "
                f"http:// or https://, e.g. http://{shown.split('://', 1)[1]}")
    bare = re.sub(r"^https?:?/*", "", shown, flags=re.IGNORECASE)
    if bare != shown:
        return f"misspells the scheme: write http:// or https://, e.g. http://{bare}"
    return f"needs a scheme: e.g. http://{shown}"


def _lower_scheme(url: str) -> str:
    """A URL's scheme in lower case: schemes are case-insensitive (RFC 3986), and
    `HTTP://registry:8081` was refused with "needs a scheme: e.g. http://HTTP://…"."""
    scheme, sep, rest = url.partition("://")
    return scheme.lower() + sep + rest if sep and scheme.isalpha() else url


_OFFLINE_DEFAULTS = {
    "USERPILOT_API_KEY": "unused-by-explain",
    "USERPILOT_ANALYTICS_ENDPOINT": "analytex.userpilot.io",
    "KAFKA_BOOTSTRAP_SERVERS": "unused:9092",
    "KAFKA_TOPICS": "unused",
    "SCHEMA_REGISTRY_URL": "http://unused",
}


def load_settings(
    env: Mapping[str, str], *, offline: bool = False, check_clients: bool = True,
    uses_registry: bool = True,
) -> Settings:
    """Build and validate Settings; ConfigError lists every problem found, one per line.

    `offline` (for `explain`) fills connection settings that are not set with
    placeholders: the event decisions depend only on consent and mappings.
    `check_clients` has librdkafka validate the KAFKA_* pass-through (offline, no
    connection); `explain`, which builds no Kafka client, turns it off.
    """
    file_problems: list[str] = []
    unread: set[str] = set()
    given = env
    env = _read_secret_files(_as_utf8(env), file_problems, unread)
    env = _drop_undecodable(env, file_problems, unread)
    env = _drop_invisible(env, file_problems, unread)
    if offline:
        env = {**_OFFLINE_DEFAULTS, **{k: v for k, v in env.items() if v.strip()}}
    r = _Reader(env, unread)
    r.problems.extend(file_problems)
    _unknown_variables(r)
    _unexpanded_references(r, given, offline)
    api_key = _check_api_key(r)
    endpoint = _check_endpoint(r)
    insecure = r.boolean("USERPILOT_INSECURE_HTTP", False)
    host = endpoint.rsplit(":", 1)[0].lower().rstrip(".") if endpoint else ""
    userpilot_host = host == "userpilot.io" or host.endswith(".userpilot.io")
    if not offline and insecure and userpilot_host:
        # Refused, not noted: a note let `run` send the token in clear text (review "seed51").
        # Not offline: `explain`, `produce` and `replay` send nothing to Userpilot, and an
        # unset endpoint is a placeholder there (review "whole51").
        r.problems.append(
            f"USERPILOT_INSECURE_HTTP=true would send the write token to {endpoint} in clear "
            "text: Userpilot's API is HTTPS; the setting is for the local sandbox, unset it")

    categories = _consent_categories(r)
    missing = r.choice("USERPILOT_CONSENT_MISSING", "deny", ("deny", "allow"))
    consent = ConsentPolicy(categories=categories,
                            missing=cast(Literal["deny", "allow"], missing))

    mappings_file = r.text("USERPILOT_MAPPINGS_FILE")
    mappings = DEFAULT_PRESET
    if mappings_file:
        try:
            mappings = load_mappings(mappings_file)
            r.notes.extend(_dotted_keys(mappings))
        except MappingsError as exc:
            r.problems.append(f"USERPILOT_MAPPINGS_FILE: {exc}")
        except OSError as exc:
            r.problems.append(
                f"USERPILOT_MAPPINGS_FILE={mappings_file!r} cannot be read "
                f"({exc.strerror}): check the path and permissions"
            )

    # Bounded: a period of 1e308 s overflowed the shared limiter's arithmetic, and a limit
    # of 1e9 stalled it; Userpilot's is 600 per 60 s.
    rate_limit = r.integer("USERPILOT_RATE_LIMIT", 600, 1, 10_000_000)
    rate_period = r.number("USERPILOT_RATE_PERIOD_SECONDS", 60.0, 0.0, 86_400.0)
    rate_burst = r.integer("USERPILOT_RATE_BURST", 1, 1, max(1, rate_limit))
    if userpilot_host and rate_period > 0 and rate_limit / rate_period > USERPILOT_RATE_PER_S:
        # Userpilot's cloud answers 429 past it: every request over it is sent twice or
        # more, and the retries slow delivery below the documented rate (seed51 leftover).
        r.notes.append(
            f"USERPILOT_RATE_LIMIT={rate_limit} per USERPILOT_RATE_PERIOD_SECONDS="
            f"{rate_period:g} is {rate_limit / rate_period:g} requests/s, above Userpilot's "
            f"{USERPILOT_RATE_PER_S * 60:g} per minute per token: expect 429 answers (retried) "
            "unless Userpilot raised your token's limit; the default is 600 per 60 s")
    # At least 0.1 s: below, no answer ever arrives in time and every request times out
    # for ever, unflagged (1e-300 was accepted; review "ops22").
    timeout = r.number("USERPILOT_REQUEST_TIMEOUT_SECONDS", 10.0, 0.1, 300.0,
                       inclusive_low=True)
    attempts = r.integer("USERPILOT_RETRY_MAX_ATTEMPTS", 12, 1, 1000)
    budget = r.number("USERPILOT_RETRY_BUDGET_SECONDS", 900.0, 0.0)
    backoff = r.number("USERPILOT_RETRY_BACKOFF_SECONDS", 1.0, 0.0, 3600.0)
    backoff_max = r.number("USERPILOT_RETRY_BACKOFF_MAX_SECONDS", 60.0, 0.0, 3600.0)
    if backoff_max < backoff:
        r.problems.append(
            f"USERPILOT_RETRY_BACKOFF_MAX_SECONDS={backoff_max:g} is below "
            f"USERPILOT_RETRY_BACKOFF_SECONDS={backoff:g}: the cap must be at least the base"
        )
    max_connections = r.integer("USERPILOT_MAX_CONNECTIONS", DEFAULT_MAX_CONNECTIONS, 1, 1000)
    max_bytes = r.integer("USERPILOT_MAX_METADATA_BYTES", DEFAULT_MAX_METADATA_BYTES, 1024)
    if max_bytes > MAX_METADATA_BYTES_CAP:
        # Above it nothing is cut, and a body Userpilot refuses (413) is dead-lettered where
        # the README promises the largest fields left out (review "api43").
        r.problems.append(
            f"USERPILOT_MAX_METADATA_BYTES={max_bytes} is above {MAX_METADATA_BYTES_CAP} "
            "(512 KiB, Userpilot's documented limit per app in total): use at most that; "
            f"the default is {DEFAULT_MAX_METADATA_BYTES}")
        max_bytes = DEFAULT_MAX_METADATA_BYTES
    # At least 2: the cut marker takes a key, and at 1 every event of two keys or more was
    # sent as `{"_truncated": N}` alone (review "extremes54").
    max_keys = r.integer("USERPILOT_MAX_METADATA_KEYS", DEFAULT_MAX_METADATA_KEYS, 2, 1_000_000)
    if (max_bytes, max_keys) != (mappings.max_metadata_bytes, mappings.max_metadata_keys):
        mappings = replace(mappings, max_metadata_bytes=max_bytes, max_metadata_keys=max_keys)
    ca_bundle = _ca_bundle(r)
    userpilot_url = userpilot_base_url(endpoint, insecure) if endpoint else None
    proxy = _proxy(r, userpilot_url) if userpilot_url else None
    if userpilot_url and proxy is None:
        r.notes.extend(_http_proxy_only(userpilot_url, r.env))

    bootstrap = r.required(
        "KAFKA_BOOTSTRAP_SERVERS", "enter host:port[,host:port], e.g. kafka:9092"
    )
    if bootstrap:
        r.problems.extend(_bootstrap_problems(bootstrap))
    topics = _topics(r)
    group_id = r.text("KAFKA_GROUP_ID", "userpilot-delivery") or "userpilot-delivery"
    group_bytes = len(group_id.encode("utf-8", "surrogatepass"))
    if group_bytes > MAX_GROUP_ID_BYTES:
        # A Kafka protocol string: longer, the broker dropped every connection, which
        # read as all brokers down while check-config said OK (review "config40").
        r.problems.append(
            f"KAFKA_GROUP_ID is {group_bytes} bytes long: "
            f"Kafka takes at most {MAX_GROUP_ID_BYTES}; use a short name, e.g. "
            "userpilot-delivery")
    default_dlq = f"{topics[0]}.userpilot.dlq" if topics else "userpilot.dlq"
    dlq_set = r.text("KAFKA_DLQ_TOPIC")
    dlq_topic = dlq_set or default_dlq
    if dlq_set is not None and not _TOPIC.match(dlq_topic):
        r.problems.append(f"KAFKA_DLQ_TOPIC={dlq_topic!r} is not a legal topic name (letters, "
                          "digits, '.', '_', '-', at most 249 characters, not '.' or '..')")
    elif dlq_set is None and topics and _TOPIC.match(topics[0]) and not _TOPIC.match(dlq_topic):
        # Only the derived name is wrong (too long): the source topic was fine.
        r.problems.append(
            f"the default dead-letter topic {dlq_topic!r} is longer than 249 characters: "
            "set KAFKA_DLQ_TOPIC"
        )
    if dlq_topic in KAFKA_INTERNAL_TOPICS:
        # Taken, it was refused online as "compacted", with the advice to set
        # cleanup.policy=delete on it: on __consumer_offsets, every group's committed
        # offsets deleted by retention (review "kafka34").
        r.problems.append(
            f"KAFKA_DLQ_TOPIC={dlq_topic!r} is one of Kafka's own internal topics: the brokers "
            "refuse writes to it; choose another topic (the default is "
            f"{default_dlq!r}); never change that topic's settings")
    if dlq_set is None and len(topics) > 1:
        # Named after the first topic: a topic added at the front of the list, or the list
        # reordered, moved the dead letters to another (auto-created) topic with no word,
        # old and new pods writing to both during the rollout (review "multi53").
        r.notes.append(
            f"the dead-letter topic is {dlq_topic!r}, named after the first of "
            "KAFKA_TOPICS: reordering them, or adding one in front, moves it; set "
            "KAFKA_DLQ_TOPIC to keep it")
    if dlq_topic in topics:
        r.problems.append(
            f"KAFKA_DLQ_TOPIC={dlq_topic!r} is also a source topic: dead letters would be "
            "consumed again; choose another topic"
        )
    else:
        # Kafka refuses a topic whose name differs from an existing one only by '.' against
        # '_' (their metric names collide): every dead letter was retried for ever, its
        # partition held, while check-config --online said OK (review "config40").
        colliding = [t for t in topics if t.replace(".", "_") == dlq_topic.replace(".", "_")]
        if colliding:
            r.problems.append(
                f"KAFKA_DLQ_TOPIC={dlq_topic!r} differs from the source topic "
                f"{colliding[0]!r} only by '.' against '_', which Kafka refuses as a "
                "colliding topic name (no dead letter could be written); choose another "
                "topic")
    kafka_extra = _kafka_extra(r, check_clients)

    registry_url = r.required(
        "SCHEMA_REGISTRY_URL", "enter the registry's base URL, e.g. http://schema-registry:8081"
    )
    registry_url = _lower_scheme(registry_url)
    shown = redact_userinfo(registry_url or "")  # credentials in the URL
    registry_ok = False
    if registry_url and "," in registry_url:
        r.problems.append(
            f"SCHEMA_REGISTRY_URL={shown!r} holds several URLs: give one (for several "
            "registry instances, the URL of the load balancer or Service in front of them)"
        )
    elif registry_url and not re.match(r"^https?://", registry_url):
        r.problems.append(f"SCHEMA_REGISTRY_URL={shown!r} {_scheme_hint(shown)}")
    elif registry_url:
        problem = _url_problem(registry_url)
        if problem:
            r.problems.append(f"SCHEMA_REGISTRY_URL={shown!r} {problem}")
        else:
            registry_ok = True
    registry_proxy: Secret | None = None
    if registry_ok and uses_registry:
        registry_proxy = _proxy(
            r, registry_url, "the schema registry",
            skip=environment_proxy(userpilot_url, r.env) if userpilot_url else None)
    auth_raw = r.secret("SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO")
    if auth_raw is not None and ":" not in auth_raw:
        r.problems.append("SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO must be user:password")
    elif auth_raw is not None and ("\n" in auth_raw or "\r" in auth_raw):
        # A second line went into the password ("pw\nx"), and the registry refused it
        # with a 401 that did not say why (review "secrets34").
        r.problems.append("SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO holds a line break: give "
                          "user:password on one line (its *_FILE: the value alone)")
    elif auth_raw is not None and registry_ok and "@" in urlsplit(registry_url).netloc:
        # Both: the setting's were sent, the URL's silently dropped (review "registry54";
        # Confluent's client refuses the pair).
        r.notes.append("SCHEMA_REGISTRY_URL holds credentials and "
                       "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO is set too: the worker sends "
                       "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO's and ignores the URL's; keep one")

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
    dlq_hold = r.number("WORKER_DLQ_GUARD_HOLD_SECONDS", 120.0, 0.0, 3600.0,
                        inclusive_low=True)
    replay_max = r.integer("WORKER_REPLAY_MAX", 3, 0, 1000)
    if 0 < dlq_ratio * dlq_window < 1:  # (a ratio of 0 is refused above)
        # One dead letter in the window is over the ratio: the guard stops the worker at
        # the first one, and again after each restart (it is never committed): a crash
        # loop on one bad event (review "extremes54").
        r.notes.append(
            f"WORKER_DLQ_MAX_RATIO={dlq_ratio:g} × WORKER_DLQ_WINDOW={dlq_window} is below "
            "1: a single dead letter trips the DLQ guard, which stops the worker at the "
            "first bad event and after every restart; raise the window to at least "
            f"{math.ceil(1 / dlq_ratio)}")
    redis, rate_limit_shared = _redis(r)
    if redis is not None and redis.dedup_ttl_s <= 2 * commit_interval:
        # Events finished above one still retrying are named only by the commit's note,
        # written once a commit interval: their records expired first, and a crash sent
        # them again (23 of 57, review "extremes54").
        r.notes.append(
            f"REDIS_DEDUP_TTL_SECONDS={redis.dedup_ttl_s:g} is not above twice "
            f"WORKER_COMMIT_INTERVAL_SECONDS={commit_interval:g}: events delivered while an "
            "earlier one retries may expire from Redis before a commit names them, and "
            "be sent again after a crash; keep the TTL well above the interval")
    if redis is not None and redis.dedup_ttl_s < budget:
        # One event retrying for the whole budget holds its partition's offset back while
        # later ones are delivered and recorded: records gone first, a crash or rebalance
        # sends those again, the duplicates Redis is there to stop (review "redis44").
        r.notes.append(
            f"REDIS_DEDUP_TTL_SECONDS={redis.dedup_ttl_s:g} is below "
            f"USERPILOT_RETRY_BUDGET_SECONDS={budget:g}: events delivered while an earlier "
            "one retries may be sent again after a restart; keep the TTL above the budget")
    poll_ms = _int_or_none(str(kafka_extra.get("max.poll.interval.ms", "300000")))
    if poll_ms is not None and grace + REVOKE_MARGIN_S > poll_ms / 1000:
        # The drain at shutdown, its final commit after it, happens where the consumer does
        # not poll: past max.poll.interval.ms it is out of the group, the commit of what
        # the drain finished is refused, and the next owner sends those events again
        # (review "clock45"; a revoke's drain is capped at a share of the interval).
        r.notes.append(
            f"WORKER_SHUTDOWN_GRACE_SECONDS={grace:g} (a shutdown's drain and final commit "
            f"may take it and up to {REVOKE_MARGIN_S:g} s more) reaches "
            f"KAFKA_MAX_POLL_INTERVAL_MS={poll_ms}: a long drain at shutdown takes the "
            "worker out of the group before its final commit, and the next owner sends "
            "what it delivered meanwhile again; keep the grace "
            f"{REVOKE_MARGIN_S:g} s below the poll interval")
    ensure_user = r.boolean("USERPILOT_ENSURE_USER", True)
    ensure_user_cache = r.integer("USERPILOT_ENSURE_USER_CACHE", 100_000, 1, 10_000_000)
    ensure_user_ttl = r.number("USERPILOT_ENSURE_USER_TTL_SECONDS", 86_400.0, 1.0,
                               30 * 86_400.0, inclusive_low=True)

    r.problems.extend(_protocol_problems(kafka_extra, bootstrap or ""))
    if check_clients and kafka_extra:
        # Also beside other problems (the accepted KAFKA_* settings only): a bad CA path
        # showed only once every other mistake was fixed (review config19).
        _kafka_together(r, kafka_extra, group_id)
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
        dlq_max_consecutive=dlq_consecutive, replay_max=replay_max, dlq_guard_hold_s=dlq_hold,
        notes=tuple(r.notes),
        redis=redis, rate_limit_shared=rate_limit_shared, ca_bundle=ca_bundle,
        ensure_user=ensure_user, ensure_user_cache=ensure_user_cache,
        ensure_user_ttl_s=ensure_user_ttl, proxy=proxy,
        registry_proxy=registry_proxy,
        env_proxies=tuple(Secret(value) for name, value in sorted(r.env.items())
                          if name.lower() in ("http_proxy", "https_proxy", "all_proxy")
                          and value.strip()),
    )
