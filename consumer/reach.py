"""Can the worker reach its services? Bounded-time probes with one-line answers.

An adapter (network I/O). `check-config --online`, `produce`, `replay` and `demo` call these
before they start, so an unreachable broker, registry or Userpilot host is one clear line
within ``timeout`` seconds, never a traceback or a hang. Each probe returns ``None`` when
the service answered as expected, or the problem as one line.

The Userpilot probe checks the token without recording anything: a Track with an empty
body. 401/403 mean a wrong token (often the read token), 404 a wrong host or path, and 400
the empty body refused. A 400 proves the token only where the token is checked before the
body, as the sandbox does; Userpilot's documentation does not say which comes first (review
"sandbox53"), so a token this passed may still be refused by `run`, which then pauses
delivery (nothing is lost).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import shlex
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

import httpx
from confluent_kafka import KafkaError, KafkaException, Producer, TopicCollection
from confluent_kafka.admin import AclOperation, AdminClient, ConfigResource

from consumer.answers import excerpt, html_page
from consumer.config import SECRET_KAFKA_KEYS, Settings, librdkafka_bool, redact_userinfo
from consumer.delivery import REQUEST_REFUSED, UserpilotClient
from consumer.errors import (
    ConnectionFailed,
    Misconfigured,
    ProxyRefused,
    Rejected,
    Retry,
    Timeout,
    TlsRefused,
)
from consumer.kafka import login_refused
from consumer.librdkafka import (
    DLQ_PRODUCER,
    SESSION_TIMEOUT_MS,
    admin_settings,
    allowed,
    producer_settings,
    sasl_mechanism,
)
from consumer.policy import quoting
from consumer.redaction import Redactor, kafka_secrets
from consumer.registry import RegistryError, RegistryUnusable, RestClient

if TYPE_CHECKING:  # redis is imported only where Redis is used
    from consumer.redisstore import CallObserver

__all__ = [
    "Unreachable",
    "dlq_policy_now",
    "kafka",
    "redis",
    "redis_notes",
    "registry",
    "resolve",
    "services",
    "topic_notes",
    "userpilot",
]

_SILENT = logging.getLogger("consumer.reach.librdkafka")
T = TypeVar("T")
_SILENT.addHandler(logging.NullHandler())
_SILENT.propagate = False  # connection errors are summed up in the one line we return


def resolve(host_port: str) -> str | None:
    """None when the host name resolves; otherwise why not."""
    host = host_port.rsplit(":", 1)[0] if host_port.count(":") == 1 else host_port
    try:
        socket.getaddrinfo(host, None)
    except (OSError, UnicodeError) as exc:
        return f"cannot resolve {host!r}: {exc}"
    return None


def userpilot(settings: Settings, timeout: float) -> str | None:
    """Prove host and token with an empty Track (Userpilot answers 400, records nothing).

    Sent by the worker's own client (`delivery.UserpilotClient`: its proxy, CA bundle,
    timeouts and status classification), so what passes here is what `run` reaches. The
    host is resolved first only without a proxy: behind one, the proxy resolves it.
    """
    host = settings.analytics_endpoint
    proxy = settings.proxy.reveal() if settings.proxy is not None else None
    via = f" through the proxy {redact_userinfo(proxy)}" if proxy else ""
    if proxy is None:
        unresolved = resolve(host)
        if unresolved is not None:
            return f"Userpilot host {unresolved}: check USERPILOT_ANALYTICS_ENDPOINT"

    async def probe() -> int:
        client = UserpilotClient.for_settings(settings, timeout_s=timeout, max_connections=1)
        try:
            return await asyncio.wait_for(client.track(b"{}"), timeout)
        finally:
            await client.aclose()

    try:
        status = asyncio.run(probe())
    except Rejected as exc:
        if exc.status == 400 and html_page(exc.body):
            # Userpilot answers JSON: a proxy or firewall in between answered, and would
            # answer every event so (each dead-lettered; review "egress59").
            return (f"Userpilot at {host}{via} answered 400 with an HTML page, which "
                    "Userpilot's API does not send: an egress proxy, firewall or "
                    f"TLS-inspecting gateway in between answered (answer: {excerpt(exc.body)})")
        if exc.status == 400:
            return None  # the token not refused; the empty body was, as intended
        return _not_userpilot(host, exc.status)
    except Misconfigured as exc:
        if isinstance(exc, ProxyRefused):  # the proxy's own answer: its text says so
            return f"Userpilot at {host}{via}: {exc}"
        if exc.status in REQUEST_REFUSED:
            return _not_userpilot(host, exc.status)
        if exc.status in (401, 403) and html_page(exc.body):
            # A block page of something in between, not a verdict on the token (review
            # "egress59"): the page says why.
            return f"Userpilot at {host}{via}: {quoting(exc)}"
        if exc.status in (401, 403):
            return (f"Userpilot at {host} refused the token ({exc.status}): use the "
                    "application write token from the Environment page (not the "
                    "read/export token)")
        if exc.status == 404:
            return (f"Userpilot at {host} has no /v1/track (404): wrong host; check "
                    "USERPILOT_ANALYTICS_ENDPOINT")
        return f"Userpilot at {host}{via}: {exc}"
    except (Timeout, TimeoutError):
        return f"Userpilot at {host}{via} did not answer within {timeout:g} s"
    except TlsRefused as exc:  # its text names the setting already
        return f"Userpilot at {host}{via}: {exc}"
    except ConnectionFailed as exc:
        tls = "" if settings.insecure_http or exc.before_tls else (
            "; for TLS, check USERPILOT_CA_BUNDLE (a corporate or inspecting proxy's CA)")
        return f"Userpilot at {host}{via}: {exc}{tls}"
    except Retry as exc:  # 408, 429, 5xx: Userpilot is there, but busy or failing
        if exc.status is None:  # an answer that is not HTTP (a proxy or port mix-up?)
            return f"Userpilot at {host}{via}: {exc}"
        if exc.status in (501, 505):  # no POST, no HTTP/1.1: not Userpilot's API
            return (f"Userpilot at {host}{via} answered {exc.status} to a token check: this "
                    "host does not serve Userpilot's API; check USERPILOT_ANALYTICS_ENDPOINT")
        return (f"Userpilot at {host}{via} answered {exc.status} to a token check: try again "
                "later")
    # A 2xx to an empty Track: Userpilot refuses it with 400, so this host takes anything
    # (a catch-all proxy or mock), and `run` would count every event delivered to it.
    return (f"Userpilot at {host} accepted an empty Track ({status}), which Userpilot "
            "refuses with 400: this host is not Userpilot's analytics API; check "
            "USERPILOT_ANALYTICS_ENDPOINT")


def _not_userpilot(host: str, status: int | None) -> str:
    """405, 410, 422...: an answer no retry changes, from a host that does not serve
    Userpilot's Track (a static site, a CDN, another API); "try again later" misled."""
    return (f"Userpilot at {host} answered {status} to a token check, which Userpilot "
            "answers with 400: this host does not serve Userpilot's API; check "
            "USERPILOT_ANALYTICS_ENDPOINT")


def kafka(conf: Mapping[str, Any], timeout: float,
          topics: Iterable[str] = (), dlq_topic: str | None = None,
          group: str | None = None, *, producer_id: bool = True) -> str | None:
    """Reach the brokers with the worker's own librdkafka settings; check topics exist, and
    that the DLQ topic takes dead letters: not compacted, records of the worker's size
    (`dlq_policy`, `missing_dlq_problem`); and that the brokers let the worker's principal
    read `topics`, write the DLQ topic and join `group` (`acl_problem`).

    The answer is printed by `run`, `check-config --online` and `replay`, not logged, so it
    is redacted here: an OIDC token endpoint's refusal, which librdkafka quotes, echoes
    the request's `Authorization: Basic base64(client.id:client.secret)` (review "ops23").
    """
    problem = _kafka(conf, timeout, topics, dlq_topic, group, producer_id)
    if problem is None:
        return None
    clean = Redactor(kafka_secrets(conf, SECRET_KAFKA_KEYS))(problem)
    return Unreachable(clean) if isinstance(problem, Unreachable) else clean


def _kafka(conf: Mapping[str, Any], timeout: float, topics: Iterable[str],
           dlq_topic: str | None, group: str | None, producer_id: bool) -> str | None:
    # The dead-letter producer's own shape (the one `check-config` validates): built from
    # the raw settings, `enable.gapless.guarantee` without the idempotence the worker adds
    # was refused here while `run` itself would accept it (review config25).
    oidc = _OidcAnswers()
    settings = {**producer_settings(conf, **DLQ_PRODUCER), "logger": oidc.logger}
    if not producer_id:
        # No dead-letter producer will be made (`replay --dry-run`): the probe asks for no
        # producer id either. Idempotent, it asked a read-only principal for one, and the
        # brokers' refusal, a fatal error, came out of its flush at random: the dry run
        # failed "Kafka failed (Failed to acquire idempotence PID ...)" (CI, round 59).
        settings["enable.idempotence"] = False
        settings.pop("enable.gapless.guarantee", None)  # refused without idempotence
    bootstrap = settings.get("bootstrap.servers", "")
    errors: list[KafkaError] = []  # the brokers' errors, latest last (`_refusal`)
    settings["error_cb"] = errors.append
    pid = _ProducerId(settings, producer_id)
    try:
        producer = Producer(settings)
    except KafkaException as exc:
        return f"Kafka client refused the configuration: {exc.args[0]}"
    started = time.monotonic()
    try:
        metadata = _metadata(producer, timeout)
        pid_problem = pid.refused(producer, errors, conf, started + timeout)
    except KafkaException as exc:
        producer.poll(0.5)  # the error callbacks say why: refused, or not there
        pid_refused = pid.said(errors, conf)
        if pid_refused is not None:
            return pid_refused
        refusal = _refusal(errors)
        if refusal is not None and oidc.outage(refusal):
            # The identity provider down or overloaded: no setting to fix. Refused, `run`
            # exited 1 at every start during its outage, a crash loop whose back-off outlived
            # it, where the running worker waits one out (review "round57").
            return Unreachable(
                f"Kafka at {bootstrap} not reachable within {timeout:g} s: the OAUTHBEARER "
                f"token endpoint gave no token ({refusal.str()}; {oidc.said()}): check that "
                "the identity provider is up and KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL")
        if refusal is not None and oidc.tls_failed(refusal):
            # Its CA is not the brokers' (KAFKA_SSL_*), which the line below names (ops58).
            return (f"Kafka at {bootstrap}: the OAUTHBEARER token endpoint's TLS failed "
                    f"({refusal.str()}): if its certificate is not trusted, give its CA as a "
                    "PEM file in KAFKA_HTTPS_CA_LOCATION (or SSL_CERT_FILE, which the worker's "
                    "other HTTPS clients read too); check "
                    "KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL")
        if refusal is not None:
            # A setting to fix, not an outage: `run` would wait for ever (review diff22b).
            return (f"Kafka at {bootstrap} refused the connection: {refusal.str()}; "
                    "check the KAFKA_* security settings (KAFKA_SECURITY_PROTOCOL, "
                    "KAFKA_SASL_*, KAFKA_SSL_*)")
        err = exc.args[0] if exc.args else exc
        text = err.str() if hasattr(err, "str") else str(err)
        # The brokers' own last word: a client certificate they refused, TLS spoken to a
        # plain listener. Only "Broker transport failure" reached the user, and `run`
        # waited for ever on what reads as an outage (review "sasl55").
        latest = [e.str() for e in errors if e.code() != KafkaError._ALL_BROKERS_DOWN][-1:]
        said = f"; the brokers' last error: {latest[0]}" if latest and latest[0] != text else ""
        return Unreachable(
            f"Kafka at {bootstrap} not reachable within {timeout:g} s ({text}{said}): check "
            "KAFKA_BOOTSTRAP_SERVERS and the KAFKA_* security settings")
    finally:
        producer.flush(0)
    topics = list(topics)
    admin = _admin(conf)
    missing = [t for t in topics if t not in metadata.topics]
    if missing:
        # Hidden by the ACLs (no Describe, so no Read either): said so, not "no topic".
        hidden = _refused_topics(admin, missing, timeout)
        if hidden:
            return _denied(conf, [("Read", "topic", topic) for topic in hidden])
        return f"Kafka at {bootstrap} has no topic {', '.join(repr(t) for t in missing)}"
    brokers = broker_config(admin, [*metadata.brokers], timeout)
    if dlq_topic is not None and dlq_topic not in metadata.topics:
        # Not in the metadata: not there, or hidden from the principal (no Describe, so no
        # Write): a DLQ without any ACL passed, and one hidden was to be created though it
        # was there (review "acl56").
        problem = (_denied(conf, [("Write", "topic", dlq_topic)])
                   if _refused_topics(admin, [dlq_topic], timeout)
                   else missing_dlq_problem(bootstrap, dlq_topic, brokers))
    elif dlq_topic is not None:
        problem = dlq_policy(admin, dlq_topic, timeout)
    else:
        problem = None
    dlq_there = dlq_topic if dlq_topic in metadata.topics else None
    return (problem or session_timeout_problem(conf, brokers)
            or acl_problem(admin, conf, topics, dlq_there, group, timeout) or pid_problem)


class _ProducerId:
    """Whether the brokers give the dead-letter producer its idempotent producer id, from
    the probe producer's statistics (`eos.idemp_state`). Brokers before Kafka 2.8 give one
    only with IdempotentWrite on the cluster, which no topic ACL implies: a principal
    granted exactly Write on the DLQ topic passed every check, and the first dead letter
    stopped its partition for good, the DLQ producer failed fatally (review "brokers58").
    Later brokers give one with Write on any topic, which the DLQ's own check covers."""

    def __init__(self, settings: dict[str, Any], wanted: bool = True) -> None:
        self.state = ""
        self.wanted = wanted and bool(librdkafka_bool(str(settings.get("enable.idempotence",
                                                                        ""))))
        if self.wanted:
            settings["statistics.interval.ms"] = 50
            settings["stats_cb"] = self._stats

    def _stats(self, raw: str) -> None:
        with contextlib.suppress(ValueError, AttributeError):
            self.state = str(json.loads(raw).get("eos", {}).get("idemp_state", ""))

    def refused(self, producer: Producer, errors: list[KafkaError], conf: Mapping[str, Any],
                deadline: float) -> str | None:
        """The line naming the refusal once the brokers refused the id; None once they gave
        it, or when they said neither by `deadline` (not judged)."""
        while self.wanted and time.monotonic() < deadline:
            said = self.said(errors, conf)
            if said is not None or self.state == "Assigned":
                return said
            try:
                producer.poll(0.02)
            except KafkaException as exc:  # a fatal error is raised here, not called back
                if exc.args and isinstance(exc.args[0], KafkaError):
                    errors.append(exc.args[0])
                else:
                    raise
        return None

    def said(self, errors: list[KafkaError], conf: Mapping[str, Any]) -> str | None:
        """The refusal's line if `errors` hold it (a producer failed by it fails its
        metadata requests too: not an outage to wait out)."""
        if not any(err.code() == KafkaError.CLUSTER_AUTHORIZATION_FAILED
                   or (err.fatal() and "idempotence PID" in err.str()) for err in errors):
            return None
        bootstrap = shlex.quote(str(conf.get("bootstrap.servers", "")))
        return ("Kafka refuses the worker's principal an idempotent producer id (its "
                "dead-letter producer's, replay's; CLUSTER_AUTHORIZATION_FAILED): brokers "
                "before Kafka 2.8 give one only with "
                "IdempotentWrite on the cluster; grant it, as an admin: kafka-acls.sh "
                f"--bootstrap-server {bootstrap} --command-config admin.properties --add "
                f"--allow-principal {_principal(conf)} --operation IdempotentWrite --cluster; "
                "or set KAFKA_ENABLE_IDEMPOTENCE=false (a retried dead letter may then be "
                "written twice)")


def _admin(conf: Mapping[str, Any]) -> AdminClient:
    """An admin client of the worker's principal, its log lines silenced (a check says
    what it found itself)."""
    settings: dict[str, Any] = {**admin_settings(conf), "logger": _SILENT}
    return AdminClient(settings)


def _principal(conf: Mapping[str, Any]) -> str:
    """The worker's principal as `kafka-acls.sh` takes it, quoted for a shell, where the
    settings tell it (a SASL user name; not an OAuth token's or a certificate's)."""
    user = conf.get("sasl.username")
    known = (isinstance(user, str) and user.strip()
             and sasl_mechanism(conf) in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"))
    return shlex.quote(f"User:{user}" if known else "<principal>")


def _acl_command(conf: Mapping[str, Any], operation: str, kind: str, name: str) -> str:
    """The `kafka-acls.sh` line that grants `operation` on `name`, as an admin runs it."""
    bootstrap = shlex.quote(str(conf.get("bootstrap.servers", "")))
    return (f"kafka-acls.sh --bootstrap-server {bootstrap} --command-config admin.properties "
            f"--add --allow-principal {_principal(conf)} --operation {operation} "
            f"--{kind} {shlex.quote(name)}")


def _denied(conf: Mapping[str, Any], denied: Sequence[tuple[str, str, str]]) -> str:
    """The line naming what the brokers deny the worker's principal, (operation, kind, name)
    each, and how to grant it."""
    grants = "; ".join(_acl_command(conf, *item) for item in denied)
    return ("Kafka refuses the worker's principal "
            + ", ".join(f"{op} on {kind} {name!r}" for op, kind, name in denied)
            + f": grant it, as an admin (admin.properties: an admin's client settings): "
            f"{grants}; or remove a DENY ACL that overrides a grant")


_HIDDEN = object()
"""`_described_topics`' answer for a topic the brokers refuse to describe to the principal."""


def _described_topics(admin: Any, topics: Sequence[str], timeout: float,
                      operations: bool = False) -> dict[str, Any]:
    """Each of `topics` the brokers answered for: its authorized operations (with
    `operations`; else None), or `_HIDDEN` when they refuse to describe it to the worker's
    principal (TOPIC_AUTHORIZATION_FAILED: it may not even see it). Those not there, or
    whose answer did not come, are left out."""
    try:
        found = admin.describe_topics(TopicCollection(list(topics)), request_timeout=timeout,
                                      include_authorized_operations=operations)
    except (KafkaException, ValueError):
        return {}
    out: dict[str, Any] = {}
    for topic, future in found.items():
        try:
            out[topic] = future.result().authorized_operations
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            if isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED:
                out[topic] = _HIDDEN
    return out


def _refused_topics(admin: Any, topics: Sequence[str], timeout: float) -> list[str]:
    """Those of `topics` the brokers hide from the worker's principal."""
    return [topic for topic, answer in _described_topics(admin, topics, timeout).items()
            if answer is _HIDDEN]


def acl_problem(admin: Any, conf: Mapping[str, Any], topics: Sequence[str],
                dlq_topic: str | None, group: str | None, timeout: float) -> str | None:
    """The operations the brokers' ACLs deny the worker's principal and the worker needs:
    Read on each source topic and on its consumer group, Write on the DLQ topic.

    Why before start-up: a group without Read never joins (`/readyz` said "no partition
    assignment yet" for ever), a topic with Describe but not Read looked there, and a DLQ
    without Write passed `check-config --online` and stopped delivery at the first dead
    letter (review "sasl55"). A resource whose operations cannot be read is not judged."""
    wanted: dict[str, Any] = {topic: AclOperation.READ for topic in topics}
    if dlq_topic is not None:
        wanted.setdefault(dlq_topic, AclOperation.WRITE)
    denied: list[tuple[str, str, str]] = []  # (operation, kind, name)
    if wanted:
        answers = _described_topics(admin, list(wanted), timeout, operations=True)
        for topic, ops in answers.items():
            if ops is not _HIDDEN and allowed(ops, wanted[topic]) is False:
                denied.append((wanted[topic].name.capitalize(), "topic", topic))
    if group:
        try:
            ops = admin.describe_consumer_groups(
                [group], request_timeout=timeout,
                include_authorized_operations=True)[group].result().authorized_operations
        except KafkaException as exc:
            refused = (exc.args and isinstance(exc.args[0], KafkaError)
                       and exc.args[0].code() == KafkaError.GROUP_AUTHORIZATION_FAILED)
            ops = [AclOperation.DESCRIBE] if refused else None  # not even Describe
        except ValueError:
            ops = None
        if allowed(ops, AclOperation.READ) is False:
            denied.append(("Read", "group", group))
    return _denied(conf, denied) if denied else None


def _metadata(producer: Producer, timeout: float) -> Any:
    """The cluster's metadata within `timeout` seconds: one request, awaited so that a
    signal's handler runs meanwhile (`interruptible`). In one call on the main thread
    Ctrl-C (or a SIGTERM before a command's own handling) waited the timeout out, then
    printed a traceback (review "replay26"); asked again in 0.5 s slices, a metadata
    answer slower than a slice (a large cluster, a slow link) was never taken (review
    "diff27")."""
    return interruptible(lambda: producer.list_topics(timeout=timeout))


def interruptible(check: Callable[[], T], tick: Callable[[], None] | None = None) -> T:
    """`check()` on a thread of its own, awaited in short waits: a signal handler runs
    between them. Inside librdkafka's or a socket's blocking call (a start-up check of an
    unreachable Kafka takes up to --timeout) the main thread ran no handler until the call
    returned. `tick` runs between the waits."""
    result: list[T] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            result.append(check())
        except BaseException as exc:  # re-raised on the calling thread
            failure.append(exc)

    thread = threading.Thread(target=target, name="start-up-check", daemon=True)
    thread.start()
    while thread.is_alive():
        if tick is not None:
            tick()
        thread.join(0.1)
    if failure:
        raise failure[0]
    return result[0]


def missing_dlq_problem(bootstrap: str, dlq_topic: str,
                        brokers: Mapping[str, str]) -> str | None:
    """A DLQ topic that does not exist is created by the first dead letter, unless the
    brokers create no topics: then that dead letter is retried for ever, its partition
    held, while the worker reports ready (review config19). Created, it takes the brokers'
    `message.max.bytes` (`_size_problem`) and `log.cleanup.policy`: compacted, it keeps
    one dead letter per user (review "dlq54": started, and its dead letters compacted)."""
    if brokers.get("auto.create.topics.enable") != "false":
        policy = brokers.get("log.cleanup.policy", "")
        if _compacts(policy):
            return (f"Kafka at {bootstrap} has no DLQ topic {dlq_topic!r}, and its brokers "
                    f"would create it compacted (log.cleanup.policy={policy}): compaction "
                    "keeps one dead letter per user and refuses keyless ones. Create it with "
                    "cleanup.policy=delete, e.g. kafka-topics.sh --bootstrap-server <broker> "
                    f"--create --topic {dlq_topic} --config cleanup.policy=delete")
        small = _size_problem(brokers.get("message.max.bytes", ""))
        if small is None:
            return None
        return (f"Kafka at {bootstrap} has no DLQ topic {dlq_topic!r}, and its brokers would "
                f"create it with message.max.bytes={small}{_SIZE_WHY}: create it with a "
                "larger limit, e.g. kafka-topics.sh --bootstrap-server <broker> --create "
                f"--topic {dlq_topic} --config max.message.bytes={DLQ_MESSAGE_MAX_BYTES}")
    return (f"Kafka at {bootstrap} has no DLQ topic {dlq_topic!r} and its brokers create "
            "no topics (auto.create.topics.enable=false): create it, e.g. kafka-topics.sh "
            f"--bootstrap-server <broker> --create --topic {dlq_topic}, or fix "
            "KAFKA_DLQ_TOPIC")


DLQ_MESSAGE_MAX_BYTES = 1_048_588
"""Kafka's default `max.message.bytes`: what the fix for a too small DLQ topic suggests."""

DLQ_TOPIC_MIN_BYTES = 8192
"""The least DLQ topic `max.message.bytes` taken at start-up: the smallest record the worker
writes for a dead letter (without its value, key and original headers; its own headers at
their largest: error body, message, stack, each cut to 1 KiB) is under ~5 KB, plus the
batch's framing: the floor leaves room."""

_SIZE_WHY = (f", below {DLQ_TOPIC_MIN_BYTES}: a dead letter written without its value, key "
             "and original headers still carries up to ~5 KB of the worker's own headers, "
             "and one the topic refuses holds its partition for good")


def _size_problem(limit: str) -> int | None:
    """A topic's record limit too small for the smallest dead letter the worker writes
    (`DLQ_TOPIC_MIN_BYTES`), else None (fine, or unread).

    The producer's own limit is checked offline; the topic's is the broker's to enforce:
    a DLQ topic of 512 bytes refused even the value-less record, retried every 0.5 s for
    ever, while `check-config --online` said OK (review "readme51"). Only at start-up
    (`dlq_policy`'s `size`): in a running worker a topic between ~5 KB and the floor
    still takes every dead letter, and one it refuses is reported as unwritable (the
    periodic check blocked them all, review "diff51a")."""
    return int(limit) if limit.isdigit() and int(limit) < DLQ_TOPIC_MIN_BYTES else None


def _compacts(policy: str) -> bool:
    """A topic's `cleanup.policy` compacts it (`compact`, `compact,delete`)."""
    return "compact" in policy.split(",")


def _configs(admin: AdminClient, resource: ConfigResource, timeout: float) -> dict[str, str]:
    """A broker's or topic's settings (`DescribeConfigs`), empty when they cannot be read
    (no ACL for it, an old broker): the checks that use them then pass."""
    return _described(admin, [resource], timeout).get(resource.name, {})


def _described(admin: AdminClient, resources: Sequence[ConfigResource],
               timeout: float) -> dict[str, dict[str, str]]:
    """Each resource's settings that have a value, as text, by name: one request, all
    answers within `timeout` (one wait per topic held start-up for topics × timeout;
    review "diff46b"); those not read are left out."""
    try:
        futures = admin.describe_configs(list(resources), request_timeout=timeout)
    except Exception:
        return {}
    deadline = time.monotonic() + timeout
    found: dict[str, dict[str, str]] = {}
    for resource in resources:
        try:
            entries = futures[resource].result(max(0.0, deadline - time.monotonic()))
        except Exception:
            continue
        found[resource.name] = {name: str(entry.value) for name, entry in entries.items()
                                if getattr(entry, "value", None) is not None}
    return found


def broker_config(admin: AdminClient, brokers: list[int], timeout: float) -> dict[str, str]:
    """One broker's settings (see `_configs`)."""
    if not brokers:
        return {}
    return _configs(admin, ConfigResource(ConfigResource.Type.BROKER, str(min(brokers))),
                    timeout)


def session_timeout_problem(conf: Mapping[str, Any], brokers: Mapping[str, str]) -> str | None:
    """A session timeout outside the brokers' group.min/max.session.timeout.ms: every
    JoinGroup is refused, which librdkafka only logs and retries, so the worker never gets
    a partition while its process looks alive (review config19)."""
    try:
        low = int(brokers["group.min.session.timeout.ms"])
        high = int(brokers["group.max.session.timeout.ms"])
        wanted = int(str(conf.get("session.timeout.ms", SESSION_TIMEOUT_MS)))
    except (KeyError, ValueError):
        return None
    if low <= wanted <= high:
        return None
    setting = (f"KAFKA_SESSION_TIMEOUT_MS={wanted}" if "session.timeout.ms" in conf else
               f"the worker's default session timeout ({wanted} ms; KAFKA_SESSION_TIMEOUT_MS "
               "unset)")
    return (f"{setting} is outside what the brokers accept "
            f"(group.min.session.timeout.ms={low} to group.max.session.timeout.ms={high}): "
            "every join of the consumer group would be refused; set it within that range "
            f"or remove it (the worker's default {SESSION_TIMEOUT_MS})")


def dlq_policy(admin: AdminClient, dlq_topic: str, timeout: float,
               size: bool = True) -> str | None:
    """A compacted DLQ topic loses dead letters: they are keyed by user, so compaction keeps
    one per user, a dead tombstone's (no value) deletes the user's others, and a keyless
    one is refused (INVALID_RECORD), retried for ever while its partition stalls (review
    "kafka18"). With `size`, a topic whose `max.message.bytes` is below the worker's floor
    refuses a dead letter even without its value (`_size_problem`). None when both are
    fine or cannot be read (no DescribeConfigs ACL)."""
    # Not readable: no verdict (the produce path still reports its refusals).
    configs = _configs(admin, ConfigResource(ConfigResource.Type.TOPIC, dlq_topic), timeout)
    return _dlq_config_problem(dlq_topic, configs, size)


def _dlq_config_problem(dlq_topic: str, configs: Mapping[str, str], size: bool) -> str | None:
    """`dlq_policy`'s verdict on the DLQ topic's settings as read."""
    value = configs.get("cleanup.policy", "")
    if not _compacts(value):
        small = _size_problem(configs.get("max.message.bytes", "")) if size else None
        if small is None:
            return None
        return (f"the DLQ topic {dlq_topic!r} has max.message.bytes={small}{_SIZE_WHY}. "
                "Raise it, e.g. kafka-configs.sh --bootstrap-server <broker> --alter "
                f"--entity-type topics --entity-name {dlq_topic} --add-config "
                f"max.message.bytes={DLQ_MESSAGE_MAX_BYTES}")
    return (f"the DLQ topic {dlq_topic!r} has cleanup.policy={value}: compaction keeps one "
            "dead letter per user (a dead tombstone deletes the user's others) and refuses "
            "keyless ones. Make it cleanup.policy=delete, e.g. kafka-configs.sh "
            f"--bootstrap-server <broker> --alter --entity-type topics --entity-name "
            f"{dlq_topic} --add-config cleanup.policy=delete")


COMPACTION_LAG_SAFE_MS = 86_400_000
"""A compacted source topic whose `min.compaction.lag.ms` keeps at least a day uncompacted
is not warned about: a backlog longer than that is an outage the lag alerts speak of."""


RECEIVE_MAX_DEFAULT = 100_000_000
"""librdkafka's `receive.message.max.bytes`: the largest answer the consumer takes."""
FETCH_ANSWER_OVERHEAD = 1024
"""Bytes of a fetch answer beside its record batches (librdkafka wants
`receive.message.max.bytes` at least `fetch.max.bytes` + 512)."""


def topic_notes(conf: Mapping[str, Any], topics: Iterable[str], dlq_topic: str,
                timeout: float, admin: Any = None) -> list[str]:
    """Start-up warnings from the topics' settings, read in one request: one per source
    topic the log cleaner compacts sooner than a day after writing, one per source topic
    whose largest record batch the consumer could not receive, and one when the DLQ topic
    is there but its settings cannot be read.

    A batch larger than `receive.message.max.bytes` (with its answer's framing) makes the
    consumer drop its connection to that broker at every fetch: every partition behind it
    stalls, read as a Kafka outage ("not connected to Kafka"), while `check-config` took
    the settings (review "sizes59").

    Events are keyed by user, so compaction keeps each user's latest event only: those not
    yet delivered when the cleaner runs (a backlog behind an outage or a slow Userpilot)
    were removed without a trace, and the commit reached the log's end as if all had been
    sent (review "gaps46"). A warning, not a refusal: a topic compacted on purpose with
    a long `min.compaction.lag.ms` loses nothing. A source whose policy cannot be read is
    not warned of.

    A DLQ topic whose settings cannot be read (no DescribeConfigs ACL) passes the
    compacted-DLQ and size checks unseen: a compacted DLQ kept one dead letter per user,
    the others removed by the log cleaner, while `check-config --online` said OK and
    `run` started without a word (review "sasl55"). A DLQ topic not there is checked
    elsewhere."""
    sources = list(dict.fromkeys(topics))
    if admin is None:
        admin = _admin(conf)
    resources = [ConfigResource(ConfigResource.Type.TOPIC, topic)
                 for topic in dict.fromkeys([*sources, dlq_topic])]
    described = _described(admin, resources, timeout)
    warnings = []
    fetch = str(conf.get("fetch.max.bytes", "0"))
    fetch_floor = int(fetch) + 512 if fetch.isdigit() else 0  # librdkafka's own rule
    # Not given, librdkafka raises it to fetch.max.bytes + 512 itself (review "diff59b").
    receive = str(conf.get("receive.message.max.bytes", max(RECEIVE_MAX_DEFAULT, fetch_floor)))
    for topic in sources:
        configs = described.get(topic)
        largest = configs.get("max.message.bytes", "") if configs is not None else ""
        if (largest.isdigit() and receive.isdigit()
                and int(largest) + FETCH_ANSWER_OVERHEAD > int(receive)):
            warnings.append(
                f"the source topic {topic!r} takes record batches of up to {int(largest):,} "
                f"bytes (max.message.bytes), more than the consumer takes in one answer "
                f"(receive.message.max.bytes {int(receive):,}): a fetch holding such a batch "
                "is refused and the connection to its broker dropped, again at every try, "
                "every partition behind it stalled as in a Kafka outage. Raise "
                f"KAFKA_RECEIVE_MESSAGE_MAX_BYTES to at least "
                f"{max(int(largest) + FETCH_ANSWER_OVERHEAD, fetch_floor):,}")
        policy = configs.get("cleanup.policy", "") if configs is not None else ""
        if not _compacts(policy):
            continue
        lag = configs.get("min.compaction.lag.ms", "0") if configs is not None else "0"
        if lag.isdigit() and int(lag) >= COMPACTION_LAG_SAFE_MS:
            continue
        warnings.append(
            f"the source topic {topic!r} has cleanup.policy={policy} with "
            f"min.compaction.lag.ms={lag}: compaction keeps each key's (user's) latest "
            "event only, so events not yet delivered when the log cleaner runs (a backlog "
            "behind an outage) are removed unsent. Use cleanup.policy=delete, or set "
            f"min.compaction.lag.ms to at least {COMPACTION_LAG_SAFE_MS} (a day) or the "
            "longest backlog you plan for")
    if dlq_topic not in described and _exists(admin, dlq_topic, timeout):
        warnings.append(
            f"the DLQ topic {dlq_topic!r}'s settings could not be read (DescribeConfigs "
            "denied?), so whether it is compacted is not checked: compaction would keep one "
            "dead letter per user and remove the others. Allow the worker's principal "
            f"DescribeConfigs on it ({_acl_command(conf, 'DescribeConfigs', 'topic', dlq_topic)}"
            "; admin.properties: an admin's client settings), or make sure its cleanup.policy "
            "is delete")
    return warnings


def _exists(admin: Any, topic: str, timeout: float) -> bool:
    """Whether the brokers' metadata shows `topic` (False when it cannot be read)."""
    try:
        found = admin.list_topics(topic, timeout).topics.get(topic)
    except Exception:
        return False
    return found is not None and found.error is None


def dlq_policy_now(conf: Mapping[str, Any], dlq_topic: str, timeout: float) -> str | None:
    """`dlq_policy` through an admin client of its own, for a running worker's DLQ producer
    (`kafka.DeadLetterProducer`): a topic made compacted after start-up took keyed dead
    letters without a word, and compaction then deleted all but one per user (review
    "faults31"). Blocking: run it off the event loop."""
    configs = _configs(_admin(conf),
                       ConfigResource(ConfigResource.Type.TOPIC, dlq_topic), timeout)
    if not configs:
        # No verdict, said so: taken as "fine", a blip while the topic was known compacted
        # let keyed dead letters into it, and compaction removed them (review "dlq54").
        raise PolicyUnread(f"the DLQ topic {dlq_topic!r}'s settings could not be read")
    problem = _dlq_config_problem(dlq_topic, configs, size=False)
    return None if problem is None else Redactor(kafka_secrets(conf, SECRET_KAFKA_KEYS))(problem)


class PolicyUnread(Exception):
    """The DLQ topic's settings could not be read (the brokers away, no DescribeConfigs
    ACL, the topic not created yet): no verdict."""


def registry(url: str, user_info: str | None, timeout: float,
             proxy: str | None = None) -> str | None:
    """Reach the schema registry (``GET /subjects``) through the worker's own client
    (`registry.RestClient`: its credentials, proxy, CA store, whole-answer deadline and its
    rule of what a registry's answer is). A probe of its own took any status under 300: a
    UI's HTML page passed, and then every schema lookup failed (review newcomer19)."""
    parts = urlsplit(url)
    shown = parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]).geturl()  # no password
    started = time.monotonic()
    client = RestClient(url, user_info, timeout_s=timeout, proxy=proxy)
    try:
        client.subjects()
    except RegistryError as exc:
        if exc.http_status_code in (401, 403):
            return (f"schema registry at {shown} refused the credentials "
                    f"({exc.http_status_code}): check SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO")
        if exc.http_status_code == 407 and proxy:
            # Its proxy's refusal, not the registry's: "check SCHEMA_REGISTRY_URL" sent users
            # after a right URL (review "registry54").
            return _registry_proxy_refused(shown, proxy)
        if exc.http_status_code >= 500 or exc.http_status_code == 429:
            return Unreachable(f"schema registry at {shown} answered {exc.http_status_code} "
                               "to GET /subjects: not serving yet, or overloaded")
        return (f"schema registry at {shown} answered {exc.http_status_code} to GET "
                "/subjects: check SCHEMA_REGISTRY_URL (include the API path)")
    except RegistryUnusable as exc:
        return f"schema registry at {shown}: {exc}"
    except (httpx.HTTPError, OSError) as exc:  # TimeoutError included: the deadline
        waited = time.monotonic() - started
        if proxy and isinstance(exc, httpx.ProxyError) and str(exc).startswith("407"):
            # The same refusal to an https registry's tunnel (CONNECT): it read as "not
            # reachable through the proxy", and `run` waited for ever (review "compat54").
            return _registry_proxy_refused(shown, proxy)
        untrusted = _certificate_refused(exc)
        if untrusted is not None:
            # A setting, as Kafka's and Redis' untrusted certificates are: reported as "not
            # reachable", `run` waited for ever for a registry that was up (review
            # "registry54"). Not USERPILOT_CA_BUNDLE: that is Userpilot's alone.
            return (f"schema registry at {shown}: its TLS certificate is not trusted "
                    f"({untrusted}): give the CA that signed it in SSL_CERT_FILE (or "
                    "SSL_CERT_DIR); the registry's client trusts those, else certifi's bundle")
        via = proxy  # the one the client used (Settings resolved the environment's)
        if via:
            # The proxy may be what failed: "check SCHEMA_REGISTRY_URL" sent users after a
            # right URL behind a cluster-wide HTTP_PROXY (review "ops22").
            return Unreachable(
                f"schema registry at {shown} not reachable through the proxy "
                f"{redact_userinfo(via)} ({type(exc).__name__} after {waited:.1f} s): "
                "check SCHEMA_REGISTRY_URL and the proxy, or add the registry's host to "
                "NO_PROXY if it is reached directly")
        return Unreachable(f"schema registry at {shown} not reachable ({type(exc).__name__} "
                           f"after {waited:.1f} s): check SCHEMA_REGISTRY_URL")
    finally:
        client.close()
    return None


def _registry_proxy_refused(shown: str, proxy: str) -> str:
    return (f"schema registry at {shown}: the proxy {redact_userinfo(proxy)} refused its "
            "credentials (407): check the user:password in the proxy's URL (HTTPS_PROXY / "
            "HTTP_PROXY), or add the registry's host to NO_PROXY if it is reached directly")


def _certificate_refused(exc: BaseException) -> str | None:
    """OpenSSL's reason when `exc` (or what it came from) is a certificate that failed
    verification; else None."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ssl.SSLCertVerificationError):
            return str(cause.verify_message or cause.reason or "certificate verify failed")
        cause = cause.__cause__ or cause.__context__
    return None


_OIDC_ANSWER = re.compile(r'Failed to retrieve OIDC token from "[^"]*": (.*)\((-?\d+)\)\s*$',
                          re.DOTALL)  # the reason after the URL (which may say "tls"), status
_OIDC_OUTAGE = frozenset({408, 429})  # and 5xx; and -1 when the endpoint did not answer:
_OIDC_UNANSWERED = re.compile(  # curl's words for that ("Could not connect to server"), a
    # load balancer or proxy without a backend included (an EOF in the TLS handshake, a 5xx
    # to CONNECT): read first, since they may name a host ("idp-tls...") or TLS as well
    r"(could ?n[o']t|failed to) (connect|resolve)|resolv\w* timed out|timed out|timeout was "
    r"reached|connection (refused|reset)|empty reply|server returned nothing|recv failure|"
    r"unexpected eof|ssl_error_syscall|connect tunnel failed, response 5\d\d",
    re.IGNORECASE)


class _OidcAnswers(logging.Handler):
    """The status of the latest OIDC token request, from librdkafka's log line about it:
    its error (`Failed to acquire SASL OAUTHBEARER token: <body>`) carries only the body, so
    a 503 page read as a refused client secret. The log line ends in the status; -1 is any
    failure of curl's, an endpoint down (an outage) as well as a certificate not trusted or
    https spoken to a plain port (a setting: waited out, `run` waited for ever; review
    "diff58"), told apart by curl's words for an endpoint that did not answer (which win:
    a host name may say "tls", review "diff58b"). The rest of librdkafka's lines are dropped: a
    check says what it found itself."""

    def __init__(self) -> None:
        super().__init__()
        self.status: int | None = None
        self.text = ""
        self.logger = logging.Logger("consumer.reach.librdkafka")  # no parent: not shown
        self.logger.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        found = _OIDC_ANSWER.search(text)
        if found:
            self.status, self.text = int(found.group(2)), found.group(1)

    def outage(self, refusal: KafkaError) -> bool:
        """`refusal` is a token the identity provider failed to give for want of an answer
        (or with a 5xx, 408, 429): an outage, not a setting to fix."""
        status = self.status
        if status is None or "OAUTHBEARER token" not in refusal.str():
            return False
        if status < 0:  # a certificate, TLS spoken to a plain port...: a setting
            return bool(_OIDC_UNANSWERED.search(self.text))
        return status >= 500 or status in _OIDC_OUTAGE

    def tls_failed(self, refusal: KafkaError) -> bool:
        """`refusal` is curl's failure other than no answer: a certificate, TLS itself."""
        return (self.status is not None and self.status < 0
                and "OAUTHBEARER token" in refusal.str()
                and not _OIDC_UNANSWERED.search(self.text))

    def said(self) -> str:
        return "no answer" if self.status is not None and self.status < 0 else (
            f"HTTP {self.status}")


def _refusal(errors: list[KafkaError]) -> KafkaError | None:
    """The brokers' latest error when it means they refuse these settings, which no wait
    makes pass: a SASL login or mechanism refused, a broker certificate not trusted. The
    latest only: a broker restarting, then refusing connections while down, is an outage.
    A TLS handshake the other side merely ended is not a refusal: librdkafka words every
    such disconnect "connecting to a PLAINTEXT broker listener?", a TLS load balancer
    without a backend included (review final22); the hint shows in the wait's log."""
    latest = [err for err in errors if err.code() != KafkaError._ALL_BROKERS_DOWN][-1:]
    return latest[0] if latest and login_refused(latest[0]) else None


class Unreachable(str):
    """A start-up problem that may pass by itself (a service down, or not answering yet):
    `run` keeps trying; any other problem is a setting or a topic to fix."""

    __slots__ = ()


def services(kafka_conf: Mapping[str, Any], timeout: float, *, topics: Iterable[str] = (),
             registry_url: str | None = None, registry_auth: str | None = None,
             registry_proxy: str | None = None, dlq_topic: str | None = None,
             group: str | None = None) -> list[str]:
    """Start-up check of a command: Kafka (and topics), then the registry if given.

    Empty when everything answered within ``timeout`` seconds each; otherwise one line per
    unreachable service. ``produce`` uses it; ``replay`` and ``demo`` should too.
    """
    problems = [kafka(kafka_conf, timeout, topics, dlq_topic, group)]
    if registry_url is not None:
        problems.append(registry(registry_url, registry_auth, timeout, registry_proxy))
    return [p for p in problems if p is not None]


def probe_keys(settings: Settings) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Throw-away keys shaped as the worker's own for this token, one of each shape `run`
    uses: a messageId's claim per endpoint, the record of an identified user (with
    ensure-user), and a key beside each budget's
    (`<budget>:probe:<tag>`, never the budget itself). Track's alone passed an ACL that
    allowed only the Track keys: identify then ran without the shared budget and
    deduplication for ever (review "redis34")."""
    import uuid

    from consumer.calls import ENDPOINTS, FAMILIES
    from consumer.dedup import USER_SHAPE, dedup_key
    from consumer.redisstore import token_digest
    from consumer.sharedlimit import ALL_FAMILIES, budget_key

    digest, tag = token_digest(settings.api_key.reveal()), uuid.uuid4().hex[:16]
    families = (ALL_FAMILIES,) if settings.rate_limit_shared else FAMILIES
    # With ensure-user, the users some replica identified are shared too (`dedup.user_key`).
    shapes = (*ENDPOINTS, USER_SHAPE) if settings.ensure_user else ENDPOINTS
    return (tuple(dedup_key(digest, shape, f"probe-{tag}") for shape in shapes),
            tuple(f"{budget_key(digest, family)}:probe:{tag}" for family in families))


REDIS_TLS_HINT = ("set REDIS_TLS_CA_FILE to the CA that signed Redis's certificate, use "
                  "the host name that certificate names in REDIS_URL, and rediss:// only "
                  "for a TLS port; the worker presents no client certificate (a Redis with "
                  "tls-auth-clients yes needs optional or no)")


def _tls_refusal(redacted_url: str, exc: Exception) -> str:
    """The one line for a Redis TLS handshake that failed (`run`'s refusal and
    check-config's alike): OpenSSL's reason holds no password, unlike the URL."""
    return f"Redis at {redacted_url}: the TLS handshake failed ({exc}): {REDIS_TLS_HINT}"


REDIS_REFUSAL_BUDGET_S = 30.0
"""The whole of `run`'s start-up probe of Redis, however many of its calls are slow."""


def redis_refusal(settings: Settings, timeout: float,
                  observe: CallObserver | None = None) -> str | None:
    """`run`'s start-up: Redis answered and refused the credentials. Falling back like for
    an outage, a wrong password ran every replica without deduplication and on its
    partition share for ever, ready and green (review config25). None when Redis is not
    configured, accepts, or does not answer (an outage: the worker's fallback covers it).

    `observe` (`Metrics.observe_redis`) sees the PING only, as `ping`: the probe's calls on
    throw-away keys are not the worker's claims and budgets (its series stayed at 0 while
    README named it, review "metrics46")."""
    conf = settings.redis
    if conf is None:
        return None
    from consumer.errors import SharedStateUnavailable
    from consumer.redisstore import RedisStore

    def ping_only(operation: str, seconds: float, error: str | None) -> None:
        if observe is not None and operation == "ping":
            observe(operation, seconds, error)

    async def ping() -> None:
        """A PING, then the worker's own calls on throw-away keys (`RedisStore.probe`): an
        ACL may allow PING and deny the scripts (review diff25)."""
        store = RedisStore(conf.url.reveal(), timeout_s=timeout, ca_file=conf.tls_ca_file,
                           observe=ping_only)
        try:
            await store.ping()
            await store.probe(*probe_keys(settings))
        finally:
            await store.close()

    try:
        async def bounded() -> None:
            async with asyncio.timeout(REDIS_REFUSAL_BUDGET_S):
                await ping()

        asyncio.run(bounded())
    except TimeoutError:
        # Answering, but too slowly to finish the probe's ~40 calls: each took up to its
        # timeout, and a Redis answering in 2.6 s held `run` unready for 110 s, /readyz
        # naming Kafka and the registry (review "slow55"). A refusal shows at the first
        # call; a slow Redis is the fallback's at run time.
        return None
    except SharedStateUnavailable as exc:
        if exc.tls:
            # Every call fails so, for ever: taken as an outage, each replica ran ready on
            # its partition share without deduplication, the log saying "ConnectionError"
            # (review "redis34"), as a refused password did (config25).
            return _tls_refusal(conf.redacted_url, exc)
        if "ReadOnlyError" in str(exc):
            # check-config --online said so; run took it and fell back for ever (review
            # "faults29"). Waited for, not refused: during a managed Redis's failover the
            # name may still point at the demoted primary for a while (review "r30").
            return Unreachable(
                f"Redis at {conf.redacted_url} refused the worker ({exc}): it is a "
                "read-only replica: point REDIS_URL at the primary (waiting: a failover "
                "may be under way)")
        if "DB index is out of range" in str(exc):
            return (f"Redis at {conf.redacted_url} has no such database ({exc}): select one "
                    "it has in REDIS_URL's /db (0-15 unless its `databases` setting says more)")
        if "script load failed: NoPermissionError" in str(exc):
            return (f"Redis at {conf.redacted_url} refused the worker ({exc}): its user may not "
                    "load the worker's scripts (SCRIPT LOAD, needed after every failover or "
                    f"restart): allow it in the user's ACL ({redis_acl(conf.url.reveal())})")
        if exc.refused:
            return (f"Redis at {conf.redacted_url} refused the worker ({exc}): check the user "
                    "name and password in REDIS_URL, and the user's ACL ("
                    f"{redis_acl(conf.url.reveal())})")
        unusable = redis_unusable(str(exc))
        if unusable is not None:
            # Answered, and never otherwise: taken as an outage, every replica ran ready on
            # its fallback for ever, without deduplication (review "redisconf45").
            return f"Redis at {conf.redacted_url} refused the worker ({exc}): {unusable}"
    return None


REDIS_ACL_EXAMPLE = "e.g. +@read +@write +@scripting +time +ping"
"""The least ACL the worker's calls need (PING is in @connection, no category above)."""


def redis_acl(url: str) -> str:
    """REDIS_ACL_EXAMPLE for this REDIS_URL: the client also sends SELECT at connect for a
    /db other than 0, and CLIENT SETNAME for `client_name` (both in @connection): a user
    set up as the README said was refused, with the same ACL named as the fix (review
    "readme48")."""
    parts = urlsplit(url)
    extra = ""
    if parts.path.strip("/") not in ("", "0"):
        extra += " +select"
    if any(key == "client_name" for key, _ in parse_qsl(parts.query, keep_blank_values=True)):
        extra += " +client|setname"
    return REDIS_ACL_EXAMPLE + extra

REDIS_CLUSTER_ERRORS = ("ClusterCrossSlotError", "MovedError", "AskError")


def redis_unusable(text: str) -> str | None:
    """Why a Redis that answered can never serve the worker, from a failed call's text
    (`SharedStateUnavailable`): cluster mode, a command renamed or disabled; else None."""
    if any(name in text for name in REDIS_CLUSTER_ERRORS):
        return ("it runs in cluster mode, which the worker does not support (its scripts "
                "use several keys in one call): point REDIS_URL at a standalone Redis or a "
                "primary with replicas")
    if "(unknown command)" in text:
        return ("a command the worker runs is renamed or disabled there (rename-command): "
                "it needs PING, EVALSHA, SCRIPT, UNLINK, SET, GET, PTTL and, in its "
                "scripts, TIME, EXISTS, PEXPIRE, DEL")
    return None


EVICTING_BADLY = ("allkeys-random", "volatile-random", "volatile-ttl")
"""Eviction policies that take the budget key or claims in flight before old delivered-id
records (every key of the worker has a TTL, so `volatile-lru` evicts those first)."""


def redis_notes(settings: Settings, timeout: float) -> list[str]:
    """Warnings about Redis's memory policy (review "redisfail51"): `check-config --online`
    said OK for a Redis that refuses writes when full (`noeviction` with a cap: every
    replica then ran on its fallback, without deduplication) or evicts the keys in use.
    Empty when it is fine, or CONFIG GET is denied or fails."""
    conf = settings.redis
    if conf is None:
        return []
    from consumer.redisstore import RedisStore

    async def read() -> tuple[str, int] | None:
        store = RedisStore(conf.url.reveal(), timeout_s=max(timeout, conf.timeout_s),
                           ca_file=conf.tls_ca_file)
        try:
            return await store.eviction()
        finally:
            await store.close()

    try:
        found = asyncio.run(read())
    except Exception:
        return []
    if found is None:
        return []
    policy, cap = found
    advice = ("set maxmemory-policy volatile-lru (every key of the worker has a TTL: old "
              "delivered-id records go first) and maxmemory with headroom (README: Redis)")
    if policy == "noeviction" and cap > 0:
        return [f"Redis at {conf.redacted_url} has maxmemory {cap} with "
                "maxmemory-policy=noeviction: once full it refuses the worker's writes, and "
                f"replicas run without the shared budget and deduplication; {advice}"]
    if policy in EVICTING_BADLY and cap > 0:  # no cap: nothing is ever evicted
        return [f"Redis at {conf.redacted_url} has maxmemory-policy={policy}: at maxmemory it "
                "may evict the shared budget or a claim in flight (an event sent twice, a "
                f"burst over the budget) before old delivered-id records; {advice}"]
    return []


def redis(settings: Settings, timeout: float) -> str | None:
    """A PING through the worker's own Redis client (URL, password, TLS and CA as the
    worker uses them): a wrong password, host or CA is otherwise noticed only once replicas
    run without the shared budget and deduplication (a warning and a 10-minute alert)."""
    conf = settings.redis
    if conf is None:
        return None
    from consumer.errors import SharedStateUnavailable
    from consumer.redisstore import RedisStore

    async def ping() -> float:
        """Seconds the fastest of three first calls on a new connection took (each store
        opens its own): what a replica's call costs after a timeout dropped a connection."""
        fastest = float("inf")
        for _ in range(3):
            store = RedisStore(conf.url.reveal(), timeout_s=timeout, ca_file=conf.tls_ca_file)
            try:
                start = time.perf_counter()
                await store.ping()
                fastest = min(fastest, time.perf_counter() - start)
            finally:
                await store.close()
            if fastest <= conf.timeout_s:
                break
        return fastest

    async def probe() -> None:
        store = RedisStore(conf.url.reveal(), timeout_s=max(timeout, conf.timeout_s),
                           ca_file=conf.tls_ca_file)
        try:
            await store.probe(*probe_keys(settings))
        finally:
            await store.close()

    try:
        took = asyncio.run(ping())
    except SharedStateUnavailable as exc:
        if exc.tls:
            return _tls_refusal(conf.redacted_url, exc)
        if "NoPermissionError" in str(exc):
            return (f"Redis at {conf.redacted_url}: {exc}: its user may not run PING (nor, "
                    "connecting, SELECT for a /db other than 0 or CLIENT SETNAME for "
                    "client_name); allow the worker's commands "
                    f"({redis_acl(conf.url.reveal())})")
        return (f"Redis at {conf.redacted_url}: {exc}; check REDIS_URL (host, password, db; "
                "rediss:// for a TLS port, redis:// for a plain one: the other scheme times "
                "out or is reset) and REDIS_TLS_CA_FILE")
    if took > conf.timeout_s:
        # It answers, but a replica would give every call up: it would run on the
        # partition share without deduplication, and this check said OK. Told before the
        # probe, whose dozens of calls at that distance took 15 s more to say nothing new.
        return (f"Redis at {conf.redacted_url} answers, but a call on a new connection took "
                f"{took * 1000:.0f} ms, over REDIS_TIMEOUT_SECONDS ({conf.timeout_s:g} s): "
                f"replicas would give every call up and run without Redis; raise "
                f"REDIS_TIMEOUT_SECONDS above {took * 2:.2g} or use a Redis closer by")
    try:
        asyncio.run(probe())
    except SharedStateUnavailable as exc:
        # PING passed: the user, the node or a key is what refuses.
        text = str(exc)
        unusable = redis_unusable(text)
        if "ReadOnlyError" in text:
            hint = "it is a read-only replica: point REDIS_URL at the primary"
        elif unusable is not None:
            hint = unusable
        elif "NoPermissionError" in text or "ResponseError" in text:
            # Redis checks the commands a script calls too (review "diff18").
            hint = ("its user may not run what the worker runs: allow EVALSHA, SCRIPT, "
                    "UNLINK and, called by the scripts, TIME, GET, SET, EXISTS, PEXPIRE, "
                    f"PTTL and DEL ({redis_acl(conf.url.reveal())}), on the keys ud:* and "
                    "userpilot:*")
        else:
            hint = "check its maxmemory, ACLs and role"
        return (f"Redis at {conf.redacted_url} answers PING but refused the worker's own "
                f"calls ({text}): {hint}. Replicas would run without the shared budget and "
                "deduplication")
    return None
