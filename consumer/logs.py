"""Logging set-up: one line per record, text or JSON, with event coordinates as fields.

Event-related lines pass `extra={"topic", "partition", "offset", "message_id"}`; both
formats print them. A last-line filter masks the token should anything ever carry it.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from consumer.redaction import Redactor

__all__ = ["configure_logging", "event_fields"]

_FIELDS = ("topic", "partition", "offset", "message_id")


def event_fields(topic: str, partition: int, offset: int, message_id: str | None) -> dict[str, Any]:
    """The `extra` for a log line about one event."""
    return {"topic": topic, "partition": partition, "offset": offset,
            "message_id": message_id or ""}


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
        self._inner = inner
        self._redact = Redactor(secrets)

    def format(self, record: logging.LogRecord) -> str:
        return self._redact(self._inner.format(record), edges=False)


class _Text(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        coords = [f"{k}={getattr(record, k)}" for k in _FIELDS if hasattr(record, k)]
        line = base + (" " + " ".join(coords) if coords else "")
        return line.replace("\n", "\\n")


class _Json(logging.Formatter):
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
        return json.dumps(doc, ensure_ascii=False, default=str)


def configure_logging(level: str = "INFO", fmt: str = "text",
                      secrets: list[str] | None = None) -> None:
    """Route all logging to stderr, one line per record."""
    handler = logging.StreamHandler(sys.stderr)
    formatter: logging.Formatter = (
        _Json() if fmt == "json"
        else _Text("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    handler.setFormatter(_Redacting(formatter, secrets) if secrets else formatter)
    handler.addFilter(_Redact(secrets or []))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("httpx", "httpcore", "httpx2", "httpcore2"):  # httpx2: the registry client
        logging.getLogger(noisy).setLevel(logging.WARNING)
