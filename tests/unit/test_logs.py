"""Unit tests for consumer.logs: one line per record, coordinates, and redaction."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from consumer.logs import CURRENT_EVENT, configure_logging, event_fields

TOKEN = "wt_9f8e7d6c5b4a3210"
log = logging.getLogger("consumer.test_logs")


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


def lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    err = capsys.readouterr().err
    return err.splitlines()


def test_event_fields() -> None:
    assert event_fields("t", 3, 42, "m-1") == {
        "topic": "t", "partition": 3, "offset": 42, "message_id": "m-1"}
    assert event_fields("t", 0, 0, None)["message_id"] == ""


def test_json_is_one_line_with_coordinates(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", "json")
    log.info("delivered\nsecond line %s", "é", extra=event_fields("topic-a", 2, 99, "m-7"))
    (line,) = lines(capsys)
    doc = json.loads(line)
    assert doc["level"] == "info"
    assert doc["logger"] == "consumer.test_logs"
    assert doc["message"] == "delivered\nsecond line é"
    assert (doc["topic"], doc["partition"], doc["offset"], doc["message_id"]) == (
        "topic-a", 2, 99, "m-7")
    assert doc["time"].endswith("Z") and "T" in doc["time"]


class _Handled:
    fields = event_fields("topic-b", 1, 7, "m-9")


def test_a_line_logged_while_an_event_is_handled_names_it(
        capsys: pytest.CaptureFixture[str]) -> None:
    """Review "ops31": the deduplication store's and the retry log's lines do not know the
    event; `Handler.handle` sets `CURRENT_EVENT`, and the line carries its coordinates. A
    line naming its own event keeps them."""
    configure_logging("INFO", "json")
    token = CURRENT_EVENT.set(_Handled())
    try:
        log.warning("delivered but not recorded (redis down): a re-read may send it again")
        log.warning("about another", extra=event_fields("topic-c", 0, 1, "m-1"))
    finally:
        CURRENT_EVENT.reset(token)
    log.warning("no event")
    first, second, third = (json.loads(line) for line in lines(capsys))
    assert (first["topic"], first["partition"], first["offset"], first["message_id"]) == (
        "topic-b", 1, 7, "m-9")
    assert (second["topic"], second["offset"]) == ("topic-c", 1)
    assert "topic" not in third


def test_json_without_coordinates_has_no_coordinate_keys(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("INFO", "json")
    log.warning("started")
    doc = json.loads(lines(capsys)[0])
    assert set(doc) == {"time", "level", "logger", "message"}


def test_json_exception_stays_on_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", "json")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed", extra=event_fields("t", 0, 1, None))
    (line,) = lines(capsys)
    doc = json.loads(line)
    assert "ValueError: boom" in doc["exception"]
    assert doc["offset"] == 1


def test_text_is_one_line_with_coordinates(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("DEBUG", "text")
    log.debug("a\nb", extra=event_fields("t", 1, 5, "m"))
    try:
        raise RuntimeError("inner")
    except RuntimeError:
        log.error("with trace")
        log.exception("with trace")
    out = lines(capsys)
    assert len(out) == 3
    assert out[0].endswith("a\\nb topic=t partition=1 offset=5 message_id=m")
    assert " DEBUG consumer.test_logs: " in out[0]
    assert "RuntimeError: inner" in out[2]


def test_level_filters(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("WARNING", "text")
    log.info("hidden")
    log.warning("shown")
    out = lines(capsys)
    assert len(out) == 1 and "shown" in out[0]


@pytest.mark.parametrize("asked", [False, True])
def test_kafka_debug_lines_pass_at_info_only_when_asked(
        capsys: pytest.CaptureFixture[str], asked: bool) -> None:
    """`KAFKA_DEBUG` at `WORKER_LOG_LEVEL=info` showed nothing (review "sasl55")."""
    try:
        configure_logging("INFO", "text", kafka_debug=asked)
        logging.getLogger("librdkafka").debug("%s [%s] %s", "CGRPOP", "rdkafka#consumer-1",
                                              "[thrd:main]: Group joined")
        log.debug("the worker's own debug line")
        out = lines(capsys)
        assert len(out) == (1 if asked else 0)
        assert all("Group joined" in line for line in out)
    finally:
        configure_logging("INFO", "text")
    assert logging.getLogger("librdkafka").level == logging.NOTSET


def test_httpx_chatter_is_quiet(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("DEBUG", "text")
    logging.getLogger("httpx").info("HTTP Request: POST ...")
    assert lines(capsys) == []


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_secret_is_redacted_from_messages_and_args(
    fmt: str, capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("INFO", fmt, secrets=[TOKEN, ""])
    log.info(f"Authorization: Token {TOKEN}")
    log.info("header %s", f"Token {TOKEN}")
    out = capsys.readouterr().err
    assert TOKEN not in out
    assert out.count("Token ***") == 2


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_secret_is_redacted_from_exceptions_and_fields(
    fmt: str, capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("INFO", fmt, secrets=[TOKEN])
    try:
        raise RuntimeError(f"request failed with headers Authorization: Token {TOKEN}")
    except RuntimeError:
        log.exception("delivery crashed", extra=event_fields("t", 0, 1, TOKEN))
    out = capsys.readouterr().err
    assert TOKEN not in out
    assert "***" in out
    assert "delivery crashed" in out


def test_without_secrets_nothing_is_masked(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", "text")
    log.info("value %s", "***x")
    assert "***x" in capsys.readouterr().err


def test_configure_replaces_handlers(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", "text")
    configure_logging("INFO", "json")
    log.info("once")
    out = lines(capsys)
    assert len(out) == 1
    json.loads(out[0])


def test_secret_needing_json_escapes_is_redacted_in_json(
    capsys: pytest.CaptureFixture[str],
) -> None:
    odd = 'tok"en\\x'
    configure_logging("INFO", "json", secrets=[odd])
    try:
        raise RuntimeError(odd)
    except RuntimeError:
        log.exception("failed")
    out = capsys.readouterr().err
    doc = json.loads(out)
    assert odd not in doc["exception"]
    assert json.dumps(odd)[1:-1] not in out


ESCAPED_SECRET = 'ab+c/d"e-zq9Xw7'


@pytest.mark.parametrize("echo", [
    'ab+c\\/d\\"e-zq9Xw7',  # PHP's json_encode
    "ab\\u002Bc/d\\u0022e-zq9Xw7",  # .NET's
    json.dumps(ESCAPED_SECRET)[1:-1],  # plain JSON escaping
])
@pytest.mark.parametrize("fmt", ["text", "json"])
def test_an_escaped_echo_of_a_secret_is_masked_in_either_format(
        fmt: str, echo: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Review secrets41: an OIDC endpoint's echo of the client secret, quoted by librdkafka,
    was masked in text lines; in JSON lines each backslash was escaped again first, and no
    spelling the redaction knew was left."""
    configure_logging("INFO", fmt, [ESCAPED_SECRET])
    # As librdkafka's lines come (not through its logger: an earlier test's rate limit on
    # it would drop this one).
    log.error("%s [%s] %s", "OIDC", "rdkafka#consumer-1",
              f'Failed to retrieve OIDC token: {{"x": "{echo}"}}')
    try:
        raise RuntimeError(f"echo: {echo}")
    except RuntimeError:
        log.exception("failed")
    err = capsys.readouterr().err
    assert "zq9Xw7" not in err, err
    if fmt == "json":
        first, second = (json.loads(line) for line in err.splitlines())
        assert "zq9Xw7" not in first["message"] + second["exception"]


# ------------------------------------------------------------------ librdkafka lines


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _rdkafka(logger: logging.Logger, broker: str) -> None:
    # How confluent-kafka calls the `logger` setting: log(level, fmt, facility, client, text).
    # The text begins with the thread librdkafka logs from (all on `main` here).
    logger.log(logging.ERROR, "%s [%s] %s", "FAIL", "rdkafka#consumer-1",
               f"[thrd:main]: {broker}/bootstrap: Connect to ipv4#{broker} failed: "
               "Connection refused")


def test_repeated_broker_errors_are_one_line_per_broker_per_interval(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from consumer.logs import RateLimit

    configure_logging("INFO", "json")
    clock = Clock()
    logger = logging.getLogger("librdkafka-test")
    limit = RateLimit(10.0, clock)
    logger.addFilter(limit)
    try:
        for _ in range(45):  # about one second of a broker that is down
            _rdkafka(logger, "kafka-0:9092")
            _rdkafka(logger, "kafka-1:9092")
            clock.now += 0.02
        clock.now += 10
        _rdkafka(logger, "kafka-0:9092")
    finally:
        logger.removeFilter(limit)
    docs = [json.loads(x) for x in lines(capsys)]
    # Keyed by the broker, not the thread (review logs44: both brokers were one line).
    assert [d["message"].split("/", 1)[0] for d in docs] == [
        "FAIL [rdkafka#consumer-1] [thrd:main]: kafka-0:9092",
        "FAIL [rdkafka#consumer-1] [thrd:main]: kafka-1:9092",
        "FAIL [rdkafka#consumer-1] [thrd:main]: kafka-0:9092"]
    assert docs[2]["message"].endswith("(44 similar lines suppressed)")
    assert all(d["level"] == "error" and d["logger"] == "librdkafka-test" for d in docs)


def test_librdkafka_debug_lines_asked_for_are_never_limited() -> None:
    """Review logs44: KAFKA_DEBUG=cgrp's state changes, one facility from one thread,
    came out as the first of seven."""
    from consumer.logs import RateLimit

    limit = RateLimit(10.0, Clock())
    records = [logging.LogRecord("librdkafka", logging.DEBUG, __file__, 1, "%s [%s] %s",
                                 ("CGRPSTATE", "rdkafka#consumer-1",
                                  f"[thrd:main]: Group \"g\" changed state {state}"), None)
               for state in ("init -> query-coord", "query-coord -> wait-coord",
                             "wait-coord -> wait-broker")]
    assert all(limit.filter(record) for record in records)


def test_librdkafka_logger_is_one_rate_limited_logger() -> None:
    from consumer.logs import RateLimit, librdkafka_logger

    first, second = librdkafka_logger(), librdkafka_logger()
    assert first is second and first.name == "librdkafka"
    assert sum(isinstance(f, RateLimit) for f in first.filters) == 1


@pytest.mark.parametrize(("text", "level"), [
    ("[thrd:kafka:9092/1]: kafka:9092/1: Connect to ipv4#10.0.0.1:9092 failed: Connection "
     "refused (after 0ms in state CONNECT)", "WARNING"),
    ("[thrd:kafka:9092/1]: kafka:9092/1: Disconnected (after 5012ms in state UP)", "WARNING"),
    ("[thrd:kafka:9092/1]: kafka:9092/1: SASL authentication error: Authentication failed "
     "during authentication due to invalid credentials", "ERROR"),
    ("[thrd:kafka:9092/1]: kafka:9092/1: SSL handshake failed: certificate verify failed",
     "ERROR"),
])
def test_librdkafka_connection_failures_are_warnings_other_failures_errors(
        capsys: pytest.CaptureFixture[str], text: str, level: str) -> None:
    """Review "logs56": every broker restart logged ERROR lines (and the error callback's
    WARNING), paging a log alert on errors for an outage the worker waits out."""
    from consumer.logs import librdkafka_logger

    for root in ("INFO", "ERROR"):
        configure_logging(root, "text")
        # A broker of its own each time: the logger's rate limit keys on it.
        broker = f"b{root}{len(text)}:9092/1"
        librdkafka_logger().log(logging.ERROR, "%s [%s] %s", "FAIL", "rdkafka#consumer-1",
                                text.replace("kafka:9092/1", broker))
        out = lines(capsys)
        if root == "ERROR" and level == "WARNING":
            assert out == []  # not let in at WORKER_LOG_LEVEL=error
        else:
            assert len(out) == 1 and f" {level} librdkafka: FAIL " in out[0], out
    configure_logging("INFO", "text")


def test_an_event_s_message_id_cannot_make_a_huge_or_forged_line() -> None:
    """A 100,000-character messageId made a 100 KB line (split by container runtimes at
    16 KB); a carriage return in one forged a CRITICAL line in viewers breaking on it."""
    import logging

    from consumer import logs

    formatter = logs._Text("%(levelname)s %(name)s: %(message)s")
    forged = "m1 offset=1\r2026-12-01 18:00:00,000 CRITICAL consumer.worker: DLQ guard tripped"
    for message_id in ("x" * 100_000, forged, "a\u2028b"):
        record = logging.LogRecord("consumer.worker", logging.WARNING, __file__, 1,
                                   "dead-lettered", None, None)
        record.__dict__.update(logs.event_fields("t", 0, 5, message_id))
        line = formatter.format(record)
        assert len(line) < 300
        assert "\r" not in line and "\u2028" not in line and "\n" not in line
    assert line.endswith("message_id=a\\u2028b")
    # C1 controls too: U+0085 breaks lines for log shippers, U+009B starts a terminal
    # escape sequence (review "sec45").
    record.__dict__.update(logs.event_fields("t", 0, 5, "m1\u0085forged \x9b31m"))
    line = formatter.format(record)
    assert "\u0085" not in line and "\x9b" not in line and len(line.splitlines()) == 1
    assert line.endswith("message_id=m1\\x85forged \\x9b31m")
    # The JSON lines (the chart's) too (review "diff45c").
    import json

    json_line = logs._Json().format(record)
    assert "\x9b" not in json_line and "\x85" not in json_line
    assert json.loads(json_line)["message_id"] == "m1\u0085forged \x9b31m"


def test_the_identify_lanes_pump_does_not_carry_the_event_that_started_it() -> None:
    """Review "diff31": the pump, started from an event's task, copied its context; every
    line logged while it ran (Redis unreachable, say) named that one event."""
    import asyncio

    from consumer.ratelimit import PriorityLane

    seen: list[object] = []

    class Limiter:
        async def acquire(self, want: int = 1) -> float:
            seen.append(CURRENT_EVENT.get())
            await asyncio.sleep(0)
            return 0.0

    async def main() -> None:
        lane = PriorityLane(Limiter())
        token = CURRENT_EVENT.set(_Handled())
        try:
            await lane.acquire(False, 1)
        finally:
            CURRENT_EVENT.reset(token)
        await lane.acquire(False, 2)

    asyncio.run(main())
    assert seen == [None, None]


def test_a_json_line_holds_no_unicode_line_break() -> None:
    """Review logs44: U+2028, U+2029 and U+0085 are valid in JSON, but line breaks to
    `str.splitlines` and some log shippers: a messageId holding one split its record."""
    from consumer.logs import _Json

    text = "id a\u2028b\u2029c\u0085d"
    record = logging.LogRecord("consumer.worker", logging.WARNING, __file__, 1, text, None, None)
    line = _Json().format(record)
    assert len(line.splitlines()) == 1 and json.loads(line)["message"] == text


def test_librdkafka_lines_of_ipv6_brokers_are_keyed_by_each_broker() -> None:
    """Review diff44: the thread prefix of an IPv6 broker holds `]` (`[thrd:[::1]:4/...]: `);
    cut at the first one, brokers on one port shared a key."""
    from consumer.logs import RateLimit

    def line(host: str) -> logging.LogRecord:
        text = (f"[thrd:{host}:9092/bootstrap]: {host}:9092/bootstrap: Connect to "
                f"ipv6#{host}:9092 failed: Connection refused")
        return logging.LogRecord("librdkafka", logging.ERROR, __file__, 1, "%s [%s] %s",
                                 ("FAIL", "rdkafka#consumer-1", text), None)

    keys = {RateLimit.key(line(host)) for host in ("[2001:db8::1]", "[2001:db8::2]")}
    assert len(keys) == 2, keys


def test_bidirectional_controls_are_escaped_in_text_and_json_lines() -> None:
    """Review "ids47": a messageId holding U+202E was written raw, and a terminal or viewer
    showed the rest of the line reversed (an id could disguise what follows it)."""
    from consumer import logs

    record = logging.LogRecord("consumer.worker", logging.WARNING, __file__, 1,
                               "dead-lettered", None, None)
    controls = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c"
    record.__dict__.update(logs.event_fields("t", 0, 5, f"m{controls}x"))
    text = logs._Text("%(message)s").format(record)
    assert not set(controls) & set(text)
    assert text.endswith("message_id=m\\u202a\\u202b\\u202c\\u202d\\u202e\\u2066\\u2067"
                         "\\u2068\\u2069\\u200e\\u200f\\u061cx")
    line = logs._Json().format(record)
    assert not set(controls) & set(line)
    assert json.loads(line)["message_id"] == f"m{controls}x"


def test_a_commands_error_line_is_escaped_and_masked_in_text(
        capsys: pytest.CaptureFixture[str]) -> None:
    """Review "logsec52": `run`'s last line in text format skipped the formatter: an OIDC
    endpoint's error body quoted in it wrote a forged line, a screen clear and a terminal
    title, and secrets were not masked. Its own line breaks (a list of problems) stay."""
    from consumer.logs import error_line

    configure_logging("INFO", "text", secrets=[TOKEN])
    error_line(f"refused: denied\rERROR forged\x1b[2J\x1b]0;PWNED\x07\u202e {TOKEN}\n  - next")
    err = capsys.readouterr().err
    assert err == ("error: refused: denied\\x0dERROR forged\\x1b[2J\\x1b]0;PWNED\\x07\\u202e "
                   "***\n  - next\n")


def test_a_quoted_error_line_is_escaped_in_text_and_left_to_the_json_line(
        capsys: pytest.CaptureFixture[str]) -> None:
    """Review "diff52a": an unreachable service's text was escaped before the JSON line
    escaped it again: a JSON reader saw `\\x1b` spelled out."""
    from consumer.logs import error_line

    said = "Kafka at k:9092 said \x1b[2J\nforged"
    configure_logging("INFO", "text")
    error_line(said, quoted=True)
    assert capsys.readouterr().err == "error: Kafka at k:9092 said \\x1b[2J\\nforged\n"
    configure_logging("INFO", "json")
    error_line(said, quoted=True)
    assert json.loads(capsys.readouterr().err)["message"] == said


def test_a_python_warning_is_a_json_line(capsys: pytest.CaptureFixture[str]) -> None:
    """Review "env60": under PYTHONWARNINGS=default (or -X dev) Python's warnings were
    printed raw, four lines amid WORKER_LOG_FORMAT=json's one object per line."""
    import warnings

    configure_logging("INFO", "json")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("a library's deprecation", DeprecationWarning, stacklevel=1)
    out = lines(capsys)
    assert out, "the warning went nowhere"
    for line in out:
        record = json.loads(line)
    assert "a library's deprecation" in record["message"] and record["level"] == "warning"
