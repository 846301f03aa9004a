"""`produce`: canonical Signal events as JSON lines → Avro (wire format) on a topic.

Every line is validated before anything is sent, so a bad file sends nothing rather than
half of itself; then every record is acknowledged (acks=all) before the command succeeds.

Kafka and the registry are probed first (``consumer.reach``), so with either down the
command fails with one line within ``timeout`` seconds instead of hanging.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from consumer import codec
from consumer.calls import visible
from consumer.errors import InvalidEvent, WorkerError
from consumer.stdout import printable

__all__ = ["ProduceError", "encode_lines", "notes", "parse_lines", "produce_events"]


class ProduceError(WorkerError):
    """Some input lines are invalid; nothing was sent."""


@dataclass(frozen=True)
class Parsed:
    line: int
    event: dict[str, Any]
    record: dict[str, Any]

    @property
    def key(self) -> bytes | None:
        """The user's id as the record carries it: lone surrogates already replaced (the
        input's own crashed the encode mid-file, after earlier lines were sent)."""
        # A blank or invisible userId is no user (`visible`), as the worker reads it: such
        # a visitor's events are keyed, and so partitioned, by its anonymousId (review
        # "cli40").
        for name in ("userId", "anonymousId"):
            ident = self.record.get(name)
            if isinstance(ident, str) and visible(ident):
                return ident.encode()
        return None


def parse_lines(lines: Iterable[str | bytes], source: str = "<stdin>") -> list[Parsed]:
    """Parse and validate every line; ProduceError lists each bad line by number."""
    parsed: list[Parsed] = []
    problems: list[str] = []
    for number, raw in enumerate(lines, start=1):
        try:
            text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        except UnicodeDecodeError as exc:
            problems.append(f"{source}:{number}: not UTF-8 text (byte {exc.start})")
            continue
        if not text.strip():
            continue
        try:
            with codec.any_integer():
                event = json.loads(text)
            deep = codec.too_deep(event, codec.MAX_JSON_DEPTH + 1)  # a field's, as the worker's
        except RecursionError:
            deep = True
        except ValueError as exc:
            problems.append(f"{source}:{number}: not JSON ({exc})")
            continue
        if deep:  # however deep the interpreter's parser goes (review "py312")
            problems.append(f"{source}:{number}: JSON nested deeper than "
                            f"{codec.MAX_JSON_DEPTH} levels")
            continue
        try:
            with codec.any_integer():
                record = codec.to_record(event)
        except (InvalidEvent, ValueError, RecursionError) as exc:
            problems.append(f"{source}:{number}: {printable(str(exc))}")  # its field names
            continue
        parsed.append(Parsed(number, event, record))
    if problems:
        raise _refused(problems, "{} invalid line(s)")
    return parsed


def _refused(problems: list[str], counted: str) -> ProduceError:
    """One error naming the first 20 lines refused (and how many more), nothing sent;
    `counted` says what they are, `{}` standing for their number."""
    more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
    return ProduceError(f"{counted.format(len(problems))}; nothing was sent:\n  "
                        + "\n  ".join(problems[:20]) + more)


def notes(parsed: Iterable[Parsed]) -> list[str]:
    """What the worker will not use of the valid lines: envelope fields left out, and
    types it drops (``unsupported_type``), with the first line of each."""
    ignored: dict[str, int] = {}
    dropped: dict[str, int] = {}
    for item in parsed:
        for key in item.event:
            if key in codec.IGNORED_ENVELOPE:
                ignored.setdefault(key, item.line)
        kind = item.record["type"]
        if kind not in codec.DELIVERED_TYPES:
            dropped.setdefault(kind, item.line)
    found = [f"field {key!r} (first on line {line}) is not used by the worker: left out"
             for key, line in sorted(ignored.items())]
    found += [f"type {kind!r} (first on line {line}) is sent, and the worker drops it as "
              f"unsupported_type" for kind, line in sorted(dropped.items())]
    return found


def encode_lines(parsed: Iterable[Parsed], schema_id: int) -> Iterator[tuple[bytes | None, bytes]]:
    """(key, wire-format value) per event."""
    for item in parsed:
        yield item.key, codec.encode(schema_id, item.record)


MESSAGE_MAX_BYTES = 1_000_000
"""librdkafka's `message.max.bytes` default: the largest record the producer sends."""
RECORD_OVERHEAD_BYTES = 64
"""Kept free below that limit for the record's framing (librdkafka counts its v2 record's
own, at most 36 bytes, in the limit too)."""


def check_sizes(parsed: Sequence[Parsed], records: Sequence[tuple[bytes | None, bytes]],
                limit: int, source: str = "<stdin>") -> None:
    """ProduceError naming every line whose record Kafka's client would refuse as too
    large: checked before the first is sent, so one large line sends nothing (it was a
    traceback after the lines before it had gone, review "events28")."""
    problems = [
        f"{source}:{item.line}: the event is {len(value) + len(key or b''):,} bytes as a "
        f"Kafka record, over what the producer sends (message.max.bytes {limit:,}, less "
        f"{RECORD_OVERHEAD_BYTES} for the record's framing): make its properties smaller"
        for item, (key, value) in zip(parsed, records, strict=True)
        if len(value) + len(key or b"") > limit - RECORD_OVERHEAD_BYTES]
    if problems:
        raise _refused(problems, "{} line(s) too large")


def produce_events(
    lines: Iterable[str | bytes], *, topic: str, bootstrap: str, registry_url: str,
    source: str = "<stdin>", extra_conf: dict[str, Any] | None = None,
    out: TextIO = sys.stderr, registry_auth: str | None = None, timeout: float = 10.0,
    registry_proxy: str | None = None, stopping: Callable[[], bool] | None = None,
) -> int:
    """Validate, probe the services, register the schema, produce, wait for every ack.

    Returns the number of events sent. ProduceError (one line) when a line is invalid or
    Kafka/the registry does not answer within ``timeout`` seconds. Once ``stopping()`` (a
    signal), no further record is produced: those on their way are waited for and the
    count acknowledged is printed (interrupted, it said nothing of the tens of thousands
    already on the topic, or raised out of the Kafka client's poll; review "cli50").
    """
    from confluent_kafka import KafkaException

    from consumer import reach
    from consumer.kafka import make_producer
    from consumer.registry import Registry

    parsed = parse_lines(lines, source)
    for note in notes(parsed):
        print(f"note: {note}", file=out)
    conf = {**(extra_conf or {}), "bootstrap.servers": bootstrap}
    if "logger" not in conf:
        # librdkafka's lines through the logging setup (the demo printed raw "%4|…|GETPID"
        # lines on a fresh broker, review newcomer24).
        from consumer.logs import librdkafka_logger

        conf["logger"] = librdkafka_logger()
    for problem in reach.services(conf, timeout, registry_url=registry_url,
                                  registry_auth=registry_auth, registry_proxy=registry_proxy):
        raise ProduceError(f"nothing was sent: {problem}")
    import httpx

    from consumer.registry import RegistryError, RegistryUnusable

    registry = Registry(registry_url, registry_auth, proxy=registry_proxy, timeout_s=timeout)
    try:
        schema_id = registry.register(topic)
    except RegistryError as exc:
        # One line, redacted: the registry's answer may echo the request's Authorization
        # (it was an uncaught traceback quoting it, review "secrets18").
        said = printable(registry.redact(str(exc))[:300])
        if exc.http_status_code >= 500 or exc.http_status_code == 429:
            # Its failure, not its refusal (a registry electing its primary answers 50003
            # for seconds): "refused" sent users to their schema (review "registry58").
            raise ProduceError(f"nothing was sent: the schema registry failed to register "
                               f"the schema of {topic!r} ({said}); try again once it "
                               "serves") from None
        raise ProduceError(f"nothing was sent: the schema registry refused to register the "
                           f"schema of {topic!r}: {said}") from None
    except RegistryUnusable as exc:
        raise ProduceError(f"nothing was sent: the schema registry's answer to registering "
                           f"the schema of {topic!r} is unusable: "
                           f"{printable(registry.redact(str(exc))[:300])}") from None
    except (httpx.HTTPError, OSError) as exc:
        # The probe answered, then the registration did not (a registry restarting, a
        # balancer resetting): one line within --timeout, not a traceback after the
        # client's default 5 s (review "reg44").
        raise ProduceError(f"nothing was sent: the schema registry did not answer the "
                           f"registration of the schema of {topic!r} "
                           f"({type(exc).__name__})") from None
    records = list(encode_lines(parsed, schema_id))
    check_sizes(parsed, records, int(conf.get("message.max.bytes", MESSAGE_MAX_BYTES)), source)
    producer = make_producer(conf)
    failures: list[str] = []
    acked = [0]

    def on_delivery(err: Any, msg: Any) -> None:
        if err is not None:
            failures.append(str(err))
        else:
            acked[0] += 1

    def stopped() -> bool:
        return stopping is not None and stopping()

    def interrupted(unsent: int) -> int:
        """What went is waited for (10 s at most) and counted."""
        left = producer.flush(min(timeout, 10.0))
        print(f"interrupted: {acked[0]} of the {len(records)} events were sent and "
              f"acknowledged, {len(failures)} failed, {left} unacknowledged; the other "
              f"{unsent} were not sent", file=out)
        return acked[0]

    for sent, (key, value) in enumerate(records):
        if stopped():
            return interrupted(len(records) - sent)
        while True:
            try:
                producer.produce(topic, key=key, value=value, on_delivery=on_delivery)
                break
            except BufferError:
                # The queue is full (a broker gone away): a signal still stops it, not the
                # client's 300 s message timeout (review "diff50c").
                if stopped():
                    return interrupted(len(records) - sent)
                producer.poll(0.1)
            except KafkaException as exc:
                # One line, not a traceback, saying what already went (review "events28").
                unacked = producer.flush(min(timeout, 60.0)) + len(failures)
                raise ProduceError(
                    f"line {parsed[sent].line}: Kafka's client refused the record "
                    f"({exc.args[0].str() if exc.args else exc}); of the {sent} event(s) "
                    f"before it {max(0, sent - unacked)} were acknowledged, the rest were "
                    f"not sent") from None
        producer.poll(0)
    deadline = time.monotonic() + 60
    left = producer.flush(0)
    while left and time.monotonic() < deadline:
        if stopped():  # every record is on its way: counted as any interruption is
            return interrupted(0)
        left = producer.flush(0.5)
    if left or failures:
        raise ProduceError(
            f"{left} unacknowledged and {len(failures)} failed record(s) on {topic}: "
            f"{failures[:3]}"
        )
    print(f"produced {len(parsed)} events to {topic} (schema id {schema_id})", file=out)
    return len(parsed)
