"""Which source topics the worker cannot read, and why: the `userpilot_source_topic_missing`
gauge, its WARNING, and the readiness problems "no source topic is there" and "Kafka
refuses the consumer group".

A typo in KAFKA_TOPICS, a topic not created yet, a Read ACL revoked: none is a reason to
stop (the worker reads a topic once it exists and is allowed), but each left a ready worker
silent, its only trace one librdkafka line (reviews "sasl55", "diff55b").

Thread rule: `error`, `group_error`, `group_taken`, `read_from`, `forget` and `problem` run
on either thread (the loop's intake, the poll thread's callbacks, readiness's checks) and
touch the shared state only under `_lock`; `granted` and `note`, and the log times only they
use (`_logged`), are the poll thread's alone (`Worker._reshare`). `refused` reads without
the lock: a hint the intake checks per batch, made exact under the lock by `read_from`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from consumer.kafka import group_refused, topic_not_there, topic_refused
from consumer.metrics import Metrics

__all__ = ["MISSING_TOPIC_CHECK_S", "MISSING_TOPIC_LOG_S", "SourceTopics"]

log = logging.getLogger(__name__)

MISSING_TOPIC_CHECK_S = 60.0  # while a source topic is missing, looked for again this often
MISSING_TOPIC_LOG_S = 600.0  # ... and its WARNING repeated this often


class SourceTopics:
    """The source topics missing or refused, and the consumer group refused."""

    def __init__(self, topics: Sequence[str], group_id: str, metrics: Metrics) -> None:
        self._topics = tuple(topics)
        self._group_id = group_id
        self._m = metrics
        self._lock = threading.Lock()
        # When each missing topic was last logged (poll thread only; `note`).
        self._logged: dict[str, float] = {}
        # Topics Kafka refused to let the worker read (a fetch answered
        # TOPIC_AUTHORIZATION_FAILED, the topic's metadata visible), until one of their
        # messages comes or this pod owns none of their partitions (librdkafka says it
        # once, and nothing says an idle topic readable again).
        self._unreadable: set[str] = set()
        # Every source topic missing: why /readyz says not ready. With none there the
        # assignment is empty, and a worker with nothing to read was ready.
        self._no_source: str | None = None
        # The brokers refused the worker's group (GROUP_AUTHORIZATION_FAILED), until
        # partitions are assigned again: why /readyz says not ready.
        self._group_refusal: str | None = None

    @property
    def refused(self) -> bool:
        """Some source topic is refused to the worker (read without the lock: a hint)."""
        return bool(self._unreadable)

    @property
    def missing(self) -> bool:
        """Poll thread: some source topic was missing at the last look (`note`)."""
        return bool(self._logged)

    def error(self, err: Any, topic: str | None = None) -> bool:
        """A consume error: True when it says a subscribed topic is gone (look again at
        once). Refused to the worker while its metadata is visible (Describe allowed, Read
        not), the topic is counted missing until one of its messages comes: the brokers'
        metadata said it was there, and the worker stayed ready and silent with one
        WARNING, its lag 0 (review "sasl55")."""
        if not topic_not_there(err):
            return False
        if topic_refused(err) and topic in self._topics:
            with self._lock:
                self._unreadable.add(topic)
        return True

    def group_error(self, err: Any) -> None:
        """The brokers refused the worker's group (its Read ACL revoked): readiness names it
        until partitions are assigned again. It read "partitions lost: the group's session
        expired (Kafka unreachable or hung...)" while only the log said why (review
        "sasl55")."""
        if group_refused(err):
            with self._lock:
                self._group_refusal = (
                    f"Kafka refuses the consumer group {self._group_id!r} "
                    "(GROUP_AUTHORIZATION_FAILED): allow the worker's principal Read on it")

    def group_taken(self) -> None:
        """Partitions were assigned: the group took the worker again."""
        with self._lock:
            self._group_refusal = None

    def forget(self, owned: Iterable[str]) -> None:
        """A refused topic none of whose partitions (`owned`: the topics this pod still has
        partitions of) is this pod's any more is its new owner's to tell (by its own fetch).
        Kept, it read missing here for good (review "diff55b")."""
        with self._lock:
            if self._unreadable:
                self._unreadable.intersection_update(owned)

    def read_from(self, topics: Iterable[str]) -> bool:
        """Messages of `topics` came: those refused before are readable now. True when one
        was (look again at once)."""
        with self._lock:
            read = self._unreadable.intersection(topics)
            self._unreadable -= read
        return bool(read)

    def granted(self, readable: Callable[[Sequence[str]], set[str]]) -> set[str]:
        """Poll thread: the refused topics the brokers' ACLs let the worker read now
        (`readable`: `Source.readable` with its timeout). Told only by a message of theirs,
        one granted while idle stayed missing (review "sasl55")."""
        with self._lock:
            unreadable = sorted(self._unreadable)
        try:
            return readable(unreadable) if unreadable else set()
        except Exception:  # the next look, MISSING_TOPIC_CHECK_S later, asks again
            log.debug("could not read the refused topics' ACLs", exc_info=True)
            return set()

    def note(self, missing: dict[str, str], granted: Iterable[str] = ()) -> None:
        """Poll thread: gauge and log the source topics the brokers do not have (`missing`,
        topic → why) or refuse; the WARNING repeats every MISSING_TOPIC_LOG_S and the gauge
        feeds an alert."""
        now = time.monotonic()
        with self._lock:
            self._unreadable.difference_update(granted)
            refused = {topic: "Kafka refuses the worker Read on it: TOPIC_AUTHORIZATION_FAILED"
                       for topic in self._unreadable}
        missing = {**refused, **missing}
        for topic in self._topics:
            reason = missing.get(topic)
            if reason is None:
                if self._logged.pop(topic, None) is not None:
                    log.info("source topic %r is there now; reading it", topic)
                self._m.source_topic_missing.labels(topic).set(0)
                continue
            self._m.source_topic_missing.labels(topic).set(1)
            last = self._logged.get(topic)
            if last is None or now - last >= MISSING_TOPIC_LOG_S:
                self._logged[topic] = now
                log.warning("source topic %r is not there (%s): nothing of it is read until "
                            "it is created; check KAFKA_TOPICS and the topic's ACLs",
                            topic, reason)
        none_there = all(topic in missing for topic in self._topics)
        with self._lock:
            self._no_source = (
                f"no source topic is there ({', '.join(self._topics)}): check KAFKA_TOPICS "
                "and the topics' ACLs" if none_there else None)

    def problem(self) -> str | None:
        """A readiness check (any thread): the group refused, or every source topic missing."""
        with self._lock:
            return self._group_refusal or self._no_source
