"""The librdkafka settings the worker's clients are built with, and librdkafka's own
verdict on them, obtained offline.

An adapter (it imports confluent_kafka). A client built without ``bootstrap.servers``
validates every property exactly as `run` will, yet connects nowhere; so `check-config`
refuses at once what `run` would refuse at start-up. Each property is first tried alone,
so every mistake is reported (librdkafka stops at the first), then the consumer and the
dead-letter producer are built whole, from the same settings `run` builds them with
(`consumer_settings`, `producer_settings`: the worker's own added to the user's), which
catches combinations: ``acks`` other than ``all`` with idempotence on, or
``group.protocol=consumer`` with the worker's assignor (review "cmds17").
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.admin import AclOperation

__all__ = ["DLQ_PRODUCER", "METADATA_REFRESH_MS", "PREFETCH_MESSAGES", "SESSION_TIMEOUT_MS",
           "admin_settings", "allowed", "client_problem", "consumer_settings", "producer_settings",
           "property_problem", "sasl_mechanism"]

METADATA_REFRESH_MS = 30_000  # how soon partitions added to a source topic are read
PREFETCH_MESSAGES = 4_000
"""librdkafka starts fetches while fewer messages wait (`queued.min.messages`; theirs
100,000, ours 10,000 before round 38). ~60 ms of the drop path's intake (the fastest,
~63k events/s here): by estimate, a refill from a broker up to ~20 ms away comes before the
queue runs dry (measured against a local broker only). Measured: the drop path as with
10,000 (and at 2,000), delivery at 0 and 20 ms as with 10,000 (at 2,000), the peak RSS of a
backlog into a 50 ms Userpilot ~1.8 MB lower (RESULTS.md, "Round 38").
KAFKA_QUEUED_MIN_MESSAGES overrides it: higher for a fast topic read from a distant broker."""
SESSION_TIMEOUT_MS = 10_000
"""The worker's session timeout (librdkafka's is 45 s): a SIGKILLed or lost replica held the
whole group ~39 s, no member delivering, and a SIGTERM in that wait could neither commit nor
leave (review soak19: 43 duplicates without Redis, an 86 s stall). librdkafka heartbeats
from its own thread, so a busy event loop does not miss them; KAFKA_SESSION_TIMEOUT_MS
overrides it (45000 where the network to the brokers drops for seconds)."""
DLQ_PRODUCER = {"batch.num.messages": 1, "allow.auto.create.topics": True}
"""The dead-letter producer's own: one record per batch, since the broker checks a topic's
max.message.bytes per batch, so dead letters that each fit a DLQ topic with a lower limit
were refused together and all written without their value. Dead letters are few. And it may
create the DLQ topic where the brokers do: a user's `allow.auto.create.topics=false`, set to
keep the consumer from creating source topics, made every dead letter fail for ever while the
DLQ topic did not exist yet (review diff19)."""
_CONSUMER_ONLY = (
    # librdkafka's consumer-only properties (CONFIGURATION.md, "C"): a producer given one
    # logs a CONFWARN on every start (review config19). `group.*` are left out by prefix.
    "enable.auto.commit", "auto.commit.enable", "auto.commit.interval.ms",
    "enable.auto.offset.store", "auto.offset.reset", "partition.assignment.strategy",
    "isolation.level", "session.timeout.ms", "max.poll.interval.ms", "enable.partition.eof",
    "heartbeat.interval.ms", "coordinator.query.interval.ms", "fetch.min.bytes",
    "fetch.max.bytes", "fetch.wait.max.ms", "fetch.queue.backoff.ms",
    "fetch.message.max.bytes", "max.partition.fetch.bytes", "fetch.error.backoff.ms",
    "queued.min.messages", "queued.max.messages.kbytes", "check.crcs",
    "offset.store.method", "offset.store.path", "offset.store.sync.interval.ms",
    "consume.callback.max.messages", "statistics.interval.ms")


_PRODUCER_ONLY = (
    # librdkafka's producer-only properties (CONFIGURATION.md, "P"), aliases included: they
    # reach the dead-letter producer, and the consumer given one logged on every start that
    # it "will be ignored", naming the setting in effect as ignored (review "ops28").
    "transactional.id", "transaction.timeout.ms", "enable.idempotence",
    "enable.gapless.guarantee", "queue.buffering.max.messages", "queue.buffering.max.kbytes",
    "queue.buffering.max.ms", "linger.ms", "message.send.max.retries", "retries",
    "queue.buffering.backpressure.threshold", "compression.codec", "compression.type",
    "compression.level", "batch.num.messages", "batch.size", "delivery.report.only.error",
    "sticky.partitioning.linger.ms", "request.required.acks", "acks", "request.timeout.ms",
    "message.timeout.ms", "delivery.timeout.ms", "queuing.strategy", "produce.offset.report",
    "partitioner")
ALIASES = {"compression.type": "compression.codec", "linger.ms": "queue.buffering.max.ms",
           "acks": "request.required.acks", "retries": "message.send.max.retries",
           "delivery.timeout.ms": "message.timeout.ms"}
"""librdkafka's own name for a setting, as its messages spell it."""


def consumer_settings(conf: Mapping[str, Any]) -> dict[str, Any]:
    """The source consumer's settings: the worker's own, then the user's (`conf`), less
    what only the dead-letter producer uses."""
    return {
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "partition.assignment.strategy": "cooperative-sticky",
        "auto.offset.reset": "earliest",
        "enable.partition.eof": False,
        # Prefetch: librdkafka's defaults (64 MiB, 100k messages) dominate the RSS of a
        # worker draining a large backlog. Fetches start while fewer than
        # PREFETCH_MESSAGES wait (one figure for the whole consumer: the partitions'
        # queues forward to it), and a fetch's answer adds at most
        # queued.max.messages.kbytes (librdkafka lowers fetch.max.bytes to it).
        "queued.max.messages.kbytes": 16384,
        "queued.min.messages": PREFETCH_MESSAGES,
        # Past those bounds librdkafka waits fetch.queue.backoff.ms (1 s by default)
        # before fetching again: with bounded queues that starved the worker (13k vs
        # 45k events/s measured on the drop path). Refill quickly instead.
        "fetch.queue.backoff.ms": 10,
        # Partitions added to a source topic (the way to scale out past the replica
        # count) were first read 288 s later with librdkafka's 300 s: two thirds of the
        # keys undelivered meanwhile, with no lag series and readiness green.
        "topic.metadata.refresh.interval.ms": METADATA_REFRESH_MS,
        "session.timeout.ms": SESSION_TIMEOUT_MS,
        # `topic.acks` is `acks` (librdkafka's topic-level spelling, review diff28).
        **{k: v for k, v in conf.items() if k.removeprefix("topic.") not in _PRODUCER_ONLY},
    }


def producer_settings(conf: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """A producer's settings from the consumer's (`conf`): acks=all and idempotence, so a
    DLQ record is durable once acknowledged; the consumer's own settings left out."""
    settings = {
        "acks": "all",
        "enable.idempotence": True,
        "linger.ms": 5,
        "compression.type": "lz4",
        **{k: v for k, v in conf.items() if not k.startswith("group.")},
    }
    for key in [k for k in settings if k.removeprefix("topic.") in _CONSUMER_ONLY]:
        # Written `topic.auto.commit.interval.ms` too (librdkafka's topic-level alias):
        # a CONFWARN at every start (review "rebal54").
        del settings[key]
    return {**settings, **extra}  # a producer's own (`extra`) win over the user's


def admin_settings(conf: Mapping[str, Any]) -> dict[str, Any]:
    """An admin client's settings: the dead-letter producer's (the user's security
    settings, the consumer's own left out) without idempotence. An admin client sends no
    record; made idempotent, it asked the brokers for a producer id, which they refuse a
    principal with Write on no topic (nor IdempotentWrite): a fatal error that failed every
    later request of the client."""
    settings = producer_settings(conf, **DLQ_PRODUCER)
    settings["enable.idempotence"] = False
    settings.pop("enable.gapless.guarantee", None)  # refused without idempotence
    return settings


def sasl_mechanism(conf: Mapping[str, Any]) -> str:
    """The SASL mechanism the clients log in with, upper case (librdkafka's `sasl.mechanism`,
    or its alias `sasl.mechanisms`; GSSAPI by default)."""
    return str(conf.get("sasl.mechanism", conf.get("sasl.mechanisms", "GSSAPI"))).upper()


def allowed(ops: Any, op: AclOperation) -> bool | None:
    """Whether `ops` (a resource's authorized operations, as the brokers report them) holds
    `op`; None when they say nothing: not asked for or not given (brokers before 2.3), or
    without DESCRIBE, which every resource the brokers described to the worker allows it (a
    broker or proxy that answers an empty set was taken at its word, and every start
    refused)."""
    if not ops or AclOperation.DESCRIBE not in ops:
        return None
    return op in ops or AclOperation.ALL in ops


class _Warnings(logging.Handler):
    """librdkafka's configuration warnings (CONFWARN) while a client is built offline."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if text.startswith("CONFWARN") and "bootstrap.servers" not in text:
            # "No `bootstrap.servers` configured" is this check's own doing.
            self.lines.append(text.split("]: ", 1)[-1])


_CHECK = logging.getLogger("consumer.librdkafka.check")
_CHECK.propagate = False
_CHECK.setLevel(logging.DEBUG)
_LOCK = threading.Lock()  # one check at a time owns the logger's handler


def _reason(exc: KafkaException) -> str:
    err = exc.args[0] if exc.args else exc
    text = err.str() if hasattr(err, "str") else str(err)
    return str(text)


def _consumer(conf: Mapping[str, Any], warnings: list[str] | None = None) -> str | None:
    with _capture(warnings):
        try:
            consumer = Consumer({"group.id": "check-config", **conf, "logger": _CHECK})
        except KafkaException as exc:
            return _reason(exc)
        except Exception as exc:  # confluent-kafka raises SystemError/TypeError on odd values
            return f"{type(exc).__name__}: {exc}"
        consumer.poll(0)  # serves the log lines queued while it was built
        consumer.close()
    return None


def _producer(conf: Mapping[str, Any], warnings: list[str] | None = None) -> str | None:
    settings = {**producer_settings(conf, **DLQ_PRODUCER), "logger": _CHECK}
    with _capture(warnings):
        try:
            producer = Producer(settings)
        except KafkaException as exc:
            return _reason(exc)
        except Exception as exc:  # confluent-kafka raises SystemError/TypeError on odd values
            return f"{type(exc).__name__}: {exc}"
        producer.poll(0)
        producer.flush(0)
    return None


@contextlib.contextmanager
def _capture(warnings: list[str] | None) -> Iterator[None]:
    handler = _Warnings()
    with _LOCK:
        _CHECK.addHandler(handler)
        try:
            yield
        finally:
            _CHECK.removeHandler(handler)
    if warnings is not None:
        warnings.extend(line for line in handler.lines if line not in warnings)


def property_problem(key: str, value: str) -> str | None:
    """librdkafka's complaint about this property itself (unknown name, invalid value).

    Complaints that arise only from the property's company (``security.protocol`` alone
    implies a SASL mechanism) are left to :func:`client_problem` on the whole config.
    """
    problem = _consumer({key: value})
    return problem if problem is not None and f'"{key}"' in problem else None


_C_INTEGER = re.compile(r"([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")
_NUMBER_LIKE = re.compile(r"[+-]?[0-9].*", re.DOTALL)
_DECIMAL = re.compile(r"[+-]?(?:0|[1-9][0-9]*)")
_DOUBLES = frozenset({"queue.buffering.max.ms", "linger.ms"})
"""librdkafka's floating-point settings (strtod: `010` is 10, `1e3` 1000): not integers."""


def c_integer_reading(key: str, value: str) -> int | None:
    """What librdkafka reads for ``value`` when ``key`` is an integer setting and the
    value is not plain decimal digits (it parses C-style: a leading 0 is octal, 0x hex,
    and what follows the digits is ignored: ``010000`` is 4096, ``45s`` 45); None when
    the value is plain decimal, not number-like, or ``key`` takes text. The worker's own
    checks read decimal only, so such a value passed them and broke `run` (a session
    timeout the brokers refuse; review "config35")."""
    text = value.strip()
    if key in _DOUBLES or not _NUMBER_LIKE.fullmatch(text) or _DECIMAL.fullmatch(text):
        return None
    consumer, producer = _consumer({key: "not-a-number"}), _producer({key: "not-a-number"})
    if not any(p is not None and "Invalid value" in p and f'"{key}"' in p
               for p in (consumer, producer)):
        return None
    match = _C_INTEGER.match(text)
    if match is None:
        return 0
    sign, digits = match.groups()
    number = (int(digits, 16) if digits[:2].lower() == "0x"
              else int(digits, 8) if digits.startswith("0") else int(digits))
    return -number if sign == "-" else number


def client_problem(conf: Mapping[str, Any], warnings: list[str] | None = None) -> str | None:
    """librdkafka's complaint about the whole consumer or DLQ producer configuration; its
    configuration warnings (CONFWARN: a setting it will ignore) are added to `warnings`.

    ``bootstrap.servers`` is left out so nothing connects.
    """
    offline = {k: v for k, v in conf.items() if k != "bootstrap.servers"}
    consumer = _consumer(consumer_settings(offline), warnings)
    if consumer is not None:
        return f"consumer: {consumer}"
    producer = _producer(offline, warnings)
    return None if producer is None else f"dead-letter producer: {producer}"
