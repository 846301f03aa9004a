"""librdkafka's own verdict on the KAFKA_* pass-through, obtained offline.

An adapter (it imports confluent_kafka). A client built without ``bootstrap.servers``
validates every property exactly as `run` will, yet connects nowhere; so `check-config`
refuses at once what `run` would refuse at start-up. Each property is first tried alone,
so every mistake is reported (librdkafka stops at the first), then the consumer and the
dead-letter producer are built whole, as the worker builds them, which catches
combinations (e.g. ``acks`` other than ``all`` with idempotence on).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from confluent_kafka import Consumer, KafkaException, Producer

__all__ = ["client_problem", "property_problem"]

_SILENT = logging.getLogger("consumer.librdkafka.check")
_SILENT.addHandler(logging.NullHandler())
_SILENT.propagate = False  # "no bootstrap.servers configured" is expected here


def _reason(exc: KafkaException) -> str:
    err = exc.args[0] if exc.args else exc
    text = err.str() if hasattr(err, "str") else str(err)
    return str(text)


def _consumer(conf: Mapping[str, Any]) -> str | None:
    try:
        consumer = Consumer({"group.id": "check-config", **conf, "logger": _SILENT})
    except KafkaException as exc:
        return _reason(exc)
    except Exception as exc:  # confluent-kafka raises SystemError/TypeError on odd values
        return f"{type(exc).__name__}: {exc}"
    consumer.close()
    return None


def _producer(conf: Mapping[str, Any]) -> str | None:
    settings = {"acks": "all", "enable.idempotence": True,
                **{k: v for k, v in conf.items() if not k.startswith("group.")},
                "logger": _SILENT}
    try:
        producer = Producer(settings)
    except KafkaException as exc:
        return _reason(exc)
    except Exception as exc:  # confluent-kafka raises SystemError/TypeError on odd values
        return f"{type(exc).__name__}: {exc}"
    producer.flush(0)
    return None


def property_problem(key: str, value: str) -> str | None:
    """librdkafka's complaint about this property itself (unknown name, invalid value).

    Complaints that arise only from the property's company (``security.protocol`` alone
    implies a SASL mechanism) are left to :func:`client_problem` on the whole config.
    """
    problem = _consumer({key: value})
    return problem if problem is not None and f'"{key}"' in problem else None


def client_problem(conf: Mapping[str, Any]) -> str | None:
    """librdkafka's complaint about the whole consumer or DLQ producer configuration.

    ``bootstrap.servers`` is left out so nothing connects.
    """
    offline = {k: v for k, v in conf.items() if k != "bootstrap.servers"}
    consumer = _consumer(offline)
    if consumer is not None:
        return f"consumer: {consumer}"
    producer = _producer(offline)
    return None if producer is None else f"dead-letter producer: {producer}"
