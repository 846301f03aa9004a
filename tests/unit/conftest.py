"""Fixtures every unit test gets: the process-wide logging state each test may change is
put back after it, so a test passes or fails alone and in any order (review "flaky57": a
`main()` run in-process left the root logger writing to a closed capture, and a log filter
module-wide kept suppressing a line another test had logged first)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from consumer.logs import RateLimit


@pytest.fixture(autouse=True)
def _logging_put_back() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    loggers = [root, *(logger for logger in logging.Logger.manager.loggerDict.values()
                       if isinstance(logger, logging.Logger))]
    for logger in loggers:
        for kept in logger.filters:
            if isinstance(kept, RateLimit):
                with kept._lock:
                    kept._last.clear()
                    kept._suppressed.clear()
