"""Logging set-up: one line per record, text or JSON, with event coordinates as fields.

Event-related lines pass `extra={"topic", "partition", "offset", "message_id"}`; both
formats print them. A last-line filter masks the token should anything ever carry it.

librdkafka's own lines come through :func:`librdkafka_logger` (its ``logger`` setting), so
they share the format (JSON with ``WORKER_LOG_FORMAT=json``), and :class:`RateLimit` keeps
a broker that is down from writing ~45 lines a second: one line per broker and kind per
10 s, the next one saying how many were suppressed.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from contextvars import ContextVar
from typing import Any

from consumer.redaction import Redactor
from consumer.stdout import json_line, printable

__all__ = ["CURRENT_EVENT", "LIBRDKAFKA_LOGGER", "QUIET_LOGGERS", "RateLimit",
           "configure_command_logging", "configure_logging", "error_line", "event_fields",
           "librdkafka_logger"]

LIBRDKAFKA_LOGGER = "librdkafka"
QUIET_LOGGERS = ("httpx", "httpcore", "httpx2", "httpcore2")
"""Held at WARNING by `configure_logging` (httpx2: the registry client's)."""

_FIELDS = ("topic", "partition", "offset", "message_id")


MESSAGE_ID_CHARS = 128
"""A messageId longer than this is cut in log lines (a 100,000-character one made a line
that container runtimes split at 16 KB)."""


def shown_id(text: str) -> str:
    """An id an event brings (a messageId, a company id) as log lines show it: cut at
    MESSAGE_ID_CHARS, as its length has no bound but the Kafka message's."""
    return text if len(text) <= MESSAGE_ID_CHARS else f"{text[:MESSAGE_ID_CHARS]}…"


def event_fields(topic: str, partition: int, offset: int, message_id: str | None) -> dict[str, Any]:
    """The `extra` for a log line about one event."""
    return {"topic": topic, "partition": partition, "offset": offset,
            "message_id": shown_id(message_id or "")}


CURRENT_EVENT: ContextVar[Any] = ContextVar("userpilot_current_event", default=None)
"""The event (anything with `.fields`) the running task handles: `Handler.handle` sets it.
Lines logged meanwhile by code that does not know the event (the retry log, the
deduplication store's fallbacks) carry its coordinates all the same."""


class _EventContext(logging.Filter):
    """Adds the current event's topic, partition, offset and message_id to a line that
    names none itself: "delivered but not recorded: a re-read may send it again" said not
    which event (review "ops31")."""

    def filter(self, record: logging.LogRecord) -> bool:
        event = CURRENT_EVENT.get()
        if event is not None and not hasattr(record, "topic"):
            record.__dict__.update(event.fields)
        return True


class _Redact(logging.Filter):
    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self._secrets = [s for s in secrets if s]
        self._redact = Redactor(self._secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        if self._secrets:
            text = record.getMessage()
            if any(s in text for s in self._secrets):
                record.msg, record.args = self._redact(text, edges=False), None
        return True


class _Redacting(logging.Formatter):
    """Masks secrets in the finished line, so tracebacks and extra fields are covered too."""

    def __init__(self, inner: logging.Formatter, secrets: list[str]) -> None:
        super().__init__()
        self.inner = inner
        self._redact = Redactor(secrets)

    def format(self, record: logging.LogRecord) -> str:
        return self._redact(self.inner.format(record), edges=False)

    def redact(self, text: str) -> str:
        """`text` masked as a line of this formatter is."""
        return self._redact(text, edges=False)


class _Text(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        coords = [f"{k}={getattr(record, k)}" for k in _FIELDS if hasattr(record, k)]
        line = base + (" " + " ".join(coords) if coords else "")
        # One event, one line: a carriage return or a Unicode line break in an event's
        # messageId or a log message forged a line of its own in viewers that break there.
        # C0 and C1 controls (U+0085 is a line break to `splitlines` and log shippers,
        # U+009B a terminal's CSI; review "sec45"), the Unicode line breaks and the
        # bidirectional controls (U+202E showed the rest of the line reversed; "ids47").
        return printable(line)


class _Json(logging.Formatter):
    """One JSON object per line, its texts masked before they are encoded: JSON escapes
    each backslash again, and an echo spelled with escapes (PHP's `\\/`, `\\u002B`, an
    escaped quote) was no spelling the final line's redaction knew (review "secrets41")."""

    def __init__(self, secrets: list[str] | None = None) -> None:
        super().__init__()
        self._redact = Redactor(secrets) if secrets else None

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in _FIELDS:
            if hasattr(record, key):
                doc[key] = getattr(record, key)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        if self._redact is not None:
            for key, value in doc.items():
                if isinstance(value, str):
                    doc[key] = self._redact(value, edges=False)
        # Valid JSON either way, but U+2028, U+2029 and U+0085 are line breaks to
        # `str.splitlines` and some shippers: one in a messageId split the record in two
        # (review "logs44"). Escaped, as the text formatter escapes them, with the other
        # C1 controls (review "diff45c") and the bidirectional ones (`stdout.json_line`).
        return json_line(doc, default=str)


def error_line(text: str, env: Mapping[str, str] | None = None, *,
               quoted: bool = False) -> None:
    """A command's last word, on stderr: `error: …`, or once logging is JSON, one JSON
    line as every other (a plain-text line was the only record of why `run` stopped that
    a log shipper could not parse, review "ops31"), secrets masked as in every line.
    `env`: where logging is not set up yet (the settings were refused), its
    WORKER_LOG_FORMAT=json still asks for JSON (review "config35"). `quoted`: the text is
    another party's (a service's refusal): its line breaks escaped too, in text format only
    (the JSON line escapes it itself; escaped before, it read `\\x1b`, review "diff52a")."""
    wanted = (env or {}).get("WORKER_LOG_FORMAT", "").strip().lower() == "json"
    if wanted and not _logging_json():
        configure_logging("WARNING", "json")
    if _logging_json():
        logging.getLogger("consumer").error("%s", text)
    else:
        # Masked and escaped as a log line is (it skipped the formatter: an OIDC
        # endpoint's error body wrote a forged line and terminal escapes, review
        # "logsec52"); its own line breaks kept (a list of problems), any other quoted
        # party's escaped where it is quoted.
        print(f"error: {printable(_masked(text), newlines=not quoted)}", file=sys.stderr)


def _masked(text: str) -> str:
    """`text` with the secrets the logging setup masks masked (none before it is set up)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler.formatter, _Redacting):
            return handler.formatter.redact(text)
    return text


def _logging_json() -> bool:
    """Whether the root logger writes JSON lines (`configure_logging(fmt="json")`)."""
    for handler in logging.getLogger().handlers:
        formatter = handler.formatter
        if isinstance(formatter, _Redacting):
            formatter = formatter.inner
        if isinstance(formatter, _Json):
            return True
    return False


def configure_logging(level: str = "INFO", fmt: str = "text",
                      secrets: list[str] | None = None, kafka_debug: bool = False) -> None:
    """Route all logging to stderr, one line per record.

    ``kafka_debug`` (`KAFKA_DEBUG` set) lets librdkafka's DEBUG lines through whatever
    `WORKER_LOG_LEVEL` says: they are what was asked for, and at `info` they were dropped
    without a word (review "sasl55").
    """
    handler = logging.StreamHandler(sys.stderr)
    formatter: logging.Formatter = (
        _Json(secrets) if fmt == "json"
        else _Text("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    handler.setFormatter(_Redacting(formatter, secrets) if secrets else formatter)
    handler.addFilter(_Redact(secrets or []))
    handler.addFilter(_EventContext())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in QUIET_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger(LIBRDKAFKA_LOGGER).setLevel(logging.DEBUG if kafka_debug else logging.NOTSET)
    # Python's warnings (shown under PYTHONWARNINGS=default or -X dev) as log records, the
    # same format and redaction: printed raw, they broke WORKER_LOG_FORMAT=json's one object
    # per line (review "env60").
    logging.captureWarnings(True)


def configure_command_logging(fmt: str, secrets: list[str]) -> None:
    """A command's own log lines (`produce`, `replay`, `check-config --online`: librdkafka's,
    through `Settings.kafka_config`): warnings and errors, redacted as `run`'s are. Python's
    last-resort handler printed them as they came, an OIDC endpoint's echo of the client
    secret included (review "ops23")."""
    configure_logging("WARNING", fmt, secrets)


_THREAD = re.compile(r"^\[thrd:.*?\]:\s+")
"""The thread a librdkafka line names first (`[thrd:main]: `)."""


class RateLimit(logging.Filter):
    """At most one record per key per ``interval`` seconds; counts what it suppressed.

    The key of a librdkafka record (``logger.log(level, "%s [%s] %s", facility, client,
    text)``) is its facility and the first word of its text after the thread librdkafka
    names (``[thrd:main]: kafka:9092/1: Connect to ... failed``), which names the broker:
    keyed on the thread, every line of a facility from one thread was one, for brokers and
    state changes alike (review "logs44"). DEBUG records (`KAFKA_DEBUG`, asked for) are
    never limited. Other records are keyed by their template and first argument.
    Thread-safe: librdkafka logs from whichever thread polls.
    """

    def __init__(self, interval: float = 10.0, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 1024) -> None:
        super().__init__()
        self.interval = interval
        self._clock = clock
        self._max_keys = max_keys
        self._lock = threading.Lock()
        self._last: dict[tuple[Any, ...], float] = {}
        self._suppressed: dict[tuple[Any, ...], int] = {}

    @staticmethod
    def key(record: logging.LogRecord) -> tuple[Any, ...]:
        args = record.args if isinstance(record.args, tuple) else ()
        if len(args) == 3 and isinstance(args[2], str):
            text = _THREAD.sub("", args[2], count=1)
            return (record.levelno, args[0], text.split(" ", 1)[0])
        first = args[0] if args else None
        return (record.levelno, str(record.msg), str(first)[:200])

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.DEBUG:
            return True
        key = self.key(record)
        now = self._clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return False
            if len(self._last) >= self._max_keys:  # bounded, whatever the brokers say
                self._last.clear()
                self._suppressed.clear()
            self._last[key] = now
            suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            record.msg = f"{record.getMessage()} ({suppressed} similar lines suppressed)"
            record.args = None
        return True


_RIDDEN = re.compile(r"Connect to .* failed|Disconnected|Receive failed|Send failed|"
                     r"Connection (?:refused|reset)|timed out", re.IGNORECASE)
"""librdkafka's FAIL lines of a broker connection lost or not made: what an outage the
worker waits out logs."""


class Ridden(logging.Filter):
    """librdkafka's connection failures at WARNING, not ERROR: the worker waits an outage
    out (readiness, `userpilot_*` series and alerts say it), and its error callback's
    WARNING says the same; at ERROR, a log alert on errors paged for every broker restart
    (review "logs56"). Other FAIL lines (a refused login or TLS handshake) stay ERROR."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        if (record.levelno == logging.ERROR and len(args) == 3 and args[0] == "FAIL"
                and isinstance(args[2], str) and _RIDDEN.search(args[2])):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            # At WORKER_LOG_LEVEL=error the logger let the ERROR in: the WARNING is not.
            return logging.getLogger(record.name).isEnabledFor(logging.WARNING)
        return True


def librdkafka_logger(interval: float = 10.0) -> logging.Logger:
    """The logger to give librdkafka as its ``logger`` setting (one per process).

    Records propagate to the root handler that :func:`configure_logging` set up, so they
    take the worker's format; repeated lines are rate-limited per broker.
    """
    logger = logging.getLogger(LIBRDKAFKA_LOGGER)
    if not any(isinstance(f, Ridden) for f in logger.filters):
        logger.addFilter(Ridden())
    if not any(isinstance(f, RateLimit) for f in logger.filters):
        logger.addFilter(RateLimit(interval))
    return logger


def offset_ranges(offsets: Iterable[int]) -> str:
    """Offsets as `replay --skip-void` takes them: `5,7-9`."""
    out: list[str] = []
    low = high = None
    for offset in sorted(set(offsets)):
        if high is not None and offset == high + 1:
            high = offset
            continue
        if low is not None:
            out.append(f"{low}" if low == high else f"{low}-{high}")
        low = high = offset
    if low is not None:
        out.append(f"{low}" if low == high else f"{low}-{high}")
    return ",".join(out)


def partitions_text(parts: Iterable[tuple[str, int]]) -> str:
    """Partitions for a log line, each topic's as ranges: `t[0-299]`, `t[0,3-5],u[1]`.
    One entry each made an assignment of 500 partitions a line of 7-13 KB, which the
    container runtime splits past 16 KiB (review "scale53")."""
    by_topic: dict[str, list[int]] = {}
    for topic, partition in parts:
        by_topic.setdefault(topic, []).append(partition)
    return ",".join(f"{t}[{offset_ranges(ps)}]"
                    for t, ps in sorted(by_topic.items())) or "nothing"
