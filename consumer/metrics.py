"""Every Prometheus object the worker exports, built on a registry that is passed in.

One place owns the names, labels and buckets so the dashboard, the alert rules and
``ops/check_metric_names.py`` have a single source of truth, and tests can use a fresh
``CollectorRegistry`` per case. Label values are always from small closed sets (reasons,
causes, status codes, topic/partition, mapped event names) — never a user id or free text,
which would explode series cardinality and leak personal data into monitoring.

Label sets known up front are created at start-up so their series exist at 0: ``rate()``
and ``increase()`` over a series that appears only on the first failure under-count it, and
alerts comparing ratios need both sides present.

Besides its own series the registry carries what every Prometheus-instrumented service is
expected to expose: ``process_*`` (RSS, CPU, file descriptors), ``python_*`` (GC, interpreter
info) and ``userpilot_build_info{version,revision}``, the convention dashboards use to tell
which build each replica runs.
"""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Generic, TypeVar

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

from consumer import installed_version
from consumer.calls import FAMILIES

__all__ = [
    "DEAD_LETTER_REASONS",
    "DISTRIBUTION",
    "DROP_REASONS",
    "ENDPOINTS",
    "FAMILIES",
    "KNOWN_STATUSES",
    "METADATA_CUTS",
    "REBALANCE_KINDS",
    "RETRY_CAUSES",
    "REVISION_ENV",
    "Children",
    "Metrics",
    "build_revision",
    "build_version",
    "register_runtime_collectors",
]

NAMESPACE = "userpilot"
DISTRIBUTION = "userpilot-delivery-worker"
# Set by the Dockerfile from its REVISION build argument (the git commit the image was built
# from); a build fact, not a setting, so it is not part of consumer.config.
REVISION_ENV = "USERPILOT_WORKER_REVISION"
UNKNOWN = "unknown"

DROP_REASONS: tuple[str, ...] = ("anonymous", "consent", "unmapped", "unsupported_type",
                                  "tombstone")
RETRY_CAUSES: tuple[str, ...] = (
    "rate_limited",
    "server_error",
    "timeout",
    "connection_error",
    "misconfigured",
)
DEAD_LETTER_REASONS: tuple[str, ...] = (
    "bad_request",
    "undecodable",
    "retries_exhausted",
    "mapping_error",
    "invalid_event",
    "refused",
)
REBALANCE_KINDS: tuple[str, ...] = ("assign", "revoke", "lost", "refetch")
ENDPOINTS: tuple[str, ...] = ("track", "identify", "company_identify")
"""The ``endpoint`` label of responses and latency: one per Userpilot path (consumer.calls)."""
# Statuses the dashboard and alerts look at; any other code still gets its own series.
KNOWN_STATUSES: tuple[str, ...] = (
    "200",  # a company identify's answer
    "202",
    "400",
    "401",
    "403",
    "404",
    "429",
    "500",
    "502",
    "503",
    "504",
    "timeout",
    "connection_error",
    "invalid_response",
    "proxy_refused",  # the egress proxy's 403 to the tunnel (Userpilot never saw it)
    "other",  # a status outside HTTP's classes (`status_label`)
)


def status_label(status: int) -> str:
    """The ``status`` label of an answer: its code, or "other" outside 100-599. A broken
    gateway answering random three-digit codes made a series of each (~900 per endpoint,
    review "logsec52"); within HTTP's classes the codes are few and each means something."""
    return str(status) if 100 <= status <= 599 else "other"

# One HTTP request: Userpilot usually answers in tens of ms; the request timeout defaults to
# 10 s and may be raised, so the top buckets reach 30 s.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    30.0,
)
# Now minus event time: seconds when caught up, hours to days after an outage or a replay.
EVENT_AGE_BUCKETS: tuple[float, ...] = (
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
    7200.0,
    21600.0,
    43200.0,
    86400.0,
    172800.0,
    604800.0,
    # A replay of a month-old DLQ, a topic read from its start: above the top bucket every
    # quantile read exactly 7 days (review "dash55").
    2592000.0,
)
# Waiting for a connection: 0 while the pool has room, which the first bucket's bound
# interpolated into a p95 of 4.75 ms for waits that never happened (review "dash55").
CONNECTION_WAIT_BUCKETS: tuple[float, ...] = (0.0001, 0.001, *LATENCY_BUCKETS)
# Waiting for the per-token limiter: ~0 when under the limit, up to a whole period (60 s by
# default) or more when saturated or after a 429 Retry-After.
LIMITER_WAIT_BUCKETS: tuple[float, ...] = (
    0.001,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)

# One Redis round trip: well under a millisecond on the same network; the client gives up
# at REDIS_TIMEOUT_SECONDS (0.25 s by default, at most 5 s).
REDIS_LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    5.0,
)
REDIS_OPERATIONS: tuple[str, ...] = ("gcra", "claim", "confirm", "release", "progress",
                                     "progress_of", "mark_left", "mark", "ping")
"""Every Redis call the worker makes (`redisstore`), its error series made at start: a
series born at its first error loses that error to `rate()` and `increase()`."""


_M = TypeVar("_M", Counter, Gauge, Histogram)


METADATA_CUTS = ("truncated",)
"""`userpilot_events_metadata_cut_total`'s kinds."""


class Children(Generic[_M]):
    """A metric's labelled children, looked up once per label set.

    `metric.labels(...)` validates and joins its arguments under a lock on every call,
    which costs more than the increment: the per-event paths go through this instead.
    Label values come from the closed sets above, so the cache stays small.
    """

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: _M) -> None:
        self._metric: _M = metric
        self._children: dict[tuple[str, ...], _M] = {}

    def __call__(self, *values: str) -> _M:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


def build_version() -> str:
    """The installed package's version (from its metadata), "unknown" when not installed."""
    return installed_version()


# The project checkout when running from source (an editable install), else site-packages.
_SOURCE = Path(__file__).resolve().parent.parent


def build_revision(environ: Mapping[str, str] = os.environ, source: Path = _SOURCE) -> str:
    """The source revision: the image's build argument, else the git checkout this package
    runs from (a development install), else "unknown"."""
    revision = environ.get(REVISION_ENV, "").strip()
    if revision:
        return revision
    if not (source / "pyproject.toml").is_file():
        # An installed wheel: a git repository around site-packages is someone else's.
        return UNKNOWN
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=source,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return UNKNOWN
    return out.stdout.strip() or UNKNOWN


@functools.cache
def _this_build() -> tuple[str, str]:
    """(version, revision) of the running code; asked once per process (git is a subprocess)."""
    return build_version(), build_revision()


def register_runtime_collectors(registry: CollectorRegistry) -> None:
    """process_* and python_* on this registry, as prometheus_client's default registry has.

    Skipped for the process-wide default registry, which registers them itself."""
    if registry is REGISTRY:
        return
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)


class Metrics:
    """The worker's metrics; attribute names drop the ``userpilot_`` prefix and unit suffix."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        version: str | None = None,
        revision: str | None = None,
    ) -> None:
        self.registry = registry
        # Every series in the worker's namespace, on the worker's registry.
        counter = functools.partial(Counter, namespace=NAMESPACE, registry=registry)
        gauge = functools.partial(Gauge, namespace=NAMESPACE, registry=registry)
        histogram = functools.partial(Histogram, namespace=NAMESPACE, registry=registry)
        register_runtime_collectors(registry)

        self.build_info = gauge(
            "build_info",
            "Always 1; the labels name the running build (package version, git revision).",
            ["version", "revision"],
        )
        this_version, this_revision = _this_build()
        self.build_info.labels(
            this_version if version is None else version,
            this_revision if revision is None else revision,
        ).set(1)

        self.events_consumed = counter(
            "events_consumed",
            "Messages read from Kafka.",
            ["topic"],
        )
        self.events_dropped = counter(
            "events_dropped",
            "Events filtered out on purpose (category is the consent category for "
            "reason=consent, empty otherwise).",
            ["reason", "category"],
        )
        self.already_finished = counter(
            "events_already_finished",
            "Events skipped because the previous owner of their partition had finished "
            "them (delivered, dead-lettered or dropped) above its last commit, which named "
            "them in its metadata: not sent again after a rebalance, a restart or a crash.",
        )
        self.delivered = counter(
            "events_delivered",
            "Events accepted by Userpilot (any HTTP 2xx).",
            ["event_name"],
        )
        self.metadata_cut = counter(
            "events_metadata_cut",
            "Delivered events whose metadata was cut: `truncated` past "
            "USERPILOT_MAX_METADATA_BYTES / _KEYS (the payload carries `_truncated`); "
            "`explain` names the keys.",
            ["kind"],
        )
        self.responses = counter(
            "responses",
            "Userpilot responses by HTTP status (or timeout / connection_error / invalid_response"
            " / proxy_refused) and endpoint.",
            ["status", "endpoint"],
        )
        self.requests_resent = counter(
            "requests_resent",
            "Requests sent again at once, not as a retry, after a kept-alive connection lost "
            "them as they went out (the server closed it idle, or took the request and then "
            "lost the connection: then Userpilot has it twice), by endpoint.",
            ["endpoint"],
        )
        self.retries = counter(
            "retries",
            "Delivery attempts that will be retried, by cause.",
            ["cause"],
        )
        self.dead_lettered = counter(
            "events_dead_lettered",
            "Events written to the dead-letter topic.",
            ["reason"],
        )
        self.delivery_latency = histogram(
            "delivery_latency_seconds",
            "Latency of one HTTP request to Userpilot, by endpoint.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
        )
        self.connection_wait = histogram(
            "connection_wait_seconds",
            "Wait for one of USERPILOT_MAX_CONNECTIONS before a request to Userpilot, by "
            "endpoint (before delivery_latency, not part of it): a pool too small shows here.",
            ["endpoint"],
            buckets=CONNECTION_WAIT_BUCKETS,
        )
        self.event_age = histogram(
            "event_age_seconds",
            "Now minus the event timestamp, observed at delivery.",
            buckets=EVENT_AGE_BUCKETS,
        )
        self.in_flight = gauge(
            "in_flight_events",
            "Events taken from Kafka but not finished yet.",
        )
        self.limiter_wait = histogram(
            "rate_limiter_wait_seconds",
            "Time a request waited for its endpoint family's rate limiter.",
            ["endpoint"],
            buckets=LIMITER_WAIT_BUCKETS,
        )
        self.rate_limit_rps = gauge(
            "rate_limit_requests_per_second",
            "This replica's current share of the per-token rate limit, by endpoint family.",
            ["endpoint"],
        )
        self.ensure_user_identify = counter(
            "ensure_user_identify",
            "Bare identify calls Userpilot accepted before the first Track of a user this "
            "replica had not identified (USERPILOT_ENSURE_USER).",
        )
        self.ensure_user_shared = counter(
            "ensure_user_shared",
            "Ensure-user identifies not sent because Redis says a replica (another, or this "
            "one before a restart) identified the user within "
            "USERPILOT_ENSURE_USER_TTL_SECONDS.",
        )
        self.paused_partitions = gauge(
            "paused_partitions",
            "Partitions paused for back-pressure.",
        )
        self.held_for_one_user = gauge(
            "partitions_held_for_one_user",
            "Partitions held (paused) because one user has CHAIN_MAX events in the window, "
            "sent one after another: until that user is down to CHAIN_RESUME, or none of its "
            "events finished for HOT_STALL_S.",
        )
        self.waiting_schema = gauge(
            "events_waiting_schema",
            "Events taken whose writer schema is not known yet (the registry has not given "
            "it): at WORKER_MAX_IN_FLIGHT the partitions carrying them pause.",
        )
        self.consumer_lag = gauge(
            "consumer_lag",
            "High watermark (last stable offset) minus the committed offset, per assigned "
            "partition.",
            ["topic", "partition"],
        )
        self.committed_offset = gauge(
            "committed_offset",
            "Last committed offset, per assigned partition.",
            ["topic", "partition"],
        )
        self.commit_failures = counter(
            "commit_failures",
            "Partitions' offset commits that Kafka refused or did not answer (the next commit "
            "asks again): rising while no committed offset moves, the window fills and "
            "delivery stops. By topic.",
            ["topic"],
        )
        self.unstable_records = gauge(
            "unstable_records",
            "High watermark minus last stable offset, per fetched assigned partition: "
            "records an open transaction holds back (its own and every later one), which "
            "read_committed cannot read yet and the lag does not count.",
            ["topic", "partition"],
        )
        self.stable_offset_stalled = gauge(
            "stable_offset_stalled_seconds",
            "How long the last stable offset has stayed below the high watermark without "
            "moving, per fetched assigned partition (0: nothing held): a transaction left "
            "open holds every later record.",
            ["topic", "partition"],
        )
        self.rebalances = counter(
            "rebalances",
            "Consumer-group rebalance callbacks, by kind.",
            ["kind"],
        )
        self.log_resets = counter(
            "log_resets",
            "A partition's offsets went back under the worker (its topic deleted and created "
            "again, or its log truncated): tracked anew from the lower offset, by topic.",
            ["topic"],
        )
        self.skipped_offsets = counter(
            "skipped_offsets",
            "Offsets of a source partition removed from its log (retention, delete-records) "
            "before the worker read them: Kafka's client went on from the log's first "
            "offset (auto.offset.reset), so their events were neither delivered nor "
            "dead-lettered, by topic.",
            ["topic"],
        )
        self.integration_up = gauge(
            "integration_up",
            "1 normally; 0 while Userpilot refuses delivery (401/403/404, a 431, a "
            "redirect, a proxy's 407, a TLS handshake a setting fixes).",
        )
        self.dlq_unwritable = gauge(
            "dlq_unwritable",
            "1 while a dead letter has waited longer than 10 s for the DLQ to take it "
            "(its partition is stuck; readiness is off).",
        )
        self.dlq_guard_tripped = gauge(
            "dlq_guard_tripped",
            "1 once the DLQ guard stopped the worker.",
        )
        self.worker_ready = gauge(
            "worker_ready",
            "1 when /readyz answers 200.",
        )
        self.source_topic_missing = gauge(
            "source_topic_missing",
            "1 while the brokers say a source topic does not exist or hide it from the "
            "worker (TOPIC_AUTHORIZATION_FAILED): nothing of it is read; by topic.",
            ["topic"],
        )

        for reason in DROP_REASONS:
            if reason != "consent":
                self.events_dropped.labels(reason, "")
        for status in KNOWN_STATUSES:
            for endpoint in ENDPOINTS:
                self.responses.labels(status, endpoint)
        for endpoint in ENDPOINTS:
            self.requests_resent.labels(endpoint)
            self.delivery_latency.labels(endpoint)
            self.connection_wait.labels(endpoint)
        for family in FAMILIES:
            self.limiter_wait.labels(family)
        for cause in RETRY_CAUSES:
            self.retries.labels(cause)
        for dl_reason in DEAD_LETTER_REASONS:
            self.dead_lettered.labels(dl_reason)
        for kind in REBALANCE_KINDS:
            self.rebalances.labels(kind)
        for cut in METADATA_CUTS:
            self.metadata_cut.labels(cut)
        self.integration_up.set(1)

        # -- Redis: shared rate budget and messageId dedup (issue 12) ------------------
        self.redis_latency = histogram(
            "redis_latency_seconds",
            "Latency of one Redis call (shared rate budget, dedup), errors included.",
            ["operation"],
            buckets=REDIS_LATENCY_BUCKETS,
        )
        self.redis_errors = counter(
            "redis_errors",
            "Redis calls that failed or timed out (the worker fell back), by operation.",
            ["operation"],
        )
        self.rate_limiter_fallback = gauge(
            "rate_limiter_fallback",
            "1 while this replica's limiter uses its partition share because Redis is "
            "unreachable, 0 on the shared budget.",
            ["endpoint"],
        )
        self.rate_limiter_fallbacks = counter(
            "rate_limiter_fallbacks",
            "Switches from the shared budget in Redis to the partition share.",
            ["endpoint"],
        )
        self.duplicates_skipped = counter(
            "duplicates_skipped",
            "Events finished without a request: their messageId was already delivered.",
            ["endpoint"],
        )
        self.dedup_unchecked = counter(
            "dedup_unchecked",
            "Events delivered without the duplicate check because Redis was unreachable.",
            ["endpoint"],
        )
        for operation in REDIS_OPERATIONS:
            self.redis_errors.labels(operation)
            # The dashboard's Redis row reads this one too: declared, it is there (empty)
            # from the start, as every name a panel uses (tests/integration/test_operations).
            self.redis_latency.labels(operation)

    def declare_redis_endpoints(self, budgets: Iterable[str]) -> None:
        """Create the rate-share and fallback series per rate budget (a family, or "all"
        when shared) and the dedup series per endpoint (they count per Userpilot path), so
        they read 0 (the share is set by the worker once it owns partitions)."""
        for budget in budgets:
            self.rate_limit_rps.labels(budget)
            self.rate_limiter_fallback.labels(budget).set(0)
            self.rate_limiter_fallbacks.labels(budget)
        for endpoint in ENDPOINTS:
            self.duplicates_skipped.labels(endpoint)
            self.dedup_unchecked.labels(endpoint)

    def observe_redis(self, operation: str, seconds: float, error: str | None) -> None:
        """`consumer.redisstore.RedisStore`'s ``observe`` hook."""
        self.redis_latency.labels(operation).observe(seconds)
        if error is not None:
            self.redis_errors.labels(operation).inc()

    def declare_topics(self, topics: Iterable[str]) -> None:
        """Create the consumed, log-reset and missing series per source topic, so they
        read 0."""
        for topic in topics:
            self.events_consumed.labels(topic)
            self.log_resets.labels(topic)
            self.skipped_offsets.labels(topic)
            self.commit_failures.labels(topic)
            self.source_topic_missing.labels(topic).set(0)

    def declare_event_names(self, names: Iterable[str]) -> None:
        """Create the delivered series for every mapped event name."""
        for name in names:
            self.delivered.labels(name)

    def declare_consent_categories(self, categories: Iterable[str]) -> None:
        """Create the consent-drop series for every required consent category."""
        for category in categories:
            self.events_dropped.labels("consent", category)

    def forget_partition(self, topic: str, partition: int | str) -> None:
        """Remove a revoked partition's lag/offset series so stale values don't linger."""
        labels = (topic, str(partition))
        for gauge in (self.consumer_lag, self.committed_offset, self.unstable_records,
                      self.stable_offset_stalled):
            with contextlib.suppress(KeyError):
                gauge.remove(*labels)
