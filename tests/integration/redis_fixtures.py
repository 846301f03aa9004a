"""A real redis-server for the shared-budget and deduplication tests.

REDIS_URL from the environment is used as is (``make test`` exports it); otherwise this
session starts Redis through ``services/ctl.py`` and stops it at the end. Only a Redis this
session started may be stopped and restarted by a test (``redis_owned``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.conftest import _ctl, _ctl_env


def redis_down() -> None:
    _ctl("down", "redis")


def redis_up() -> None:
    _ctl("up", "redis")


@pytest.fixture(scope="session")
def redis_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, bool]]:
    preset = os.environ.get("REDIS_URL", "").strip()
    if preset:
        yield preset, False
        return
    record = tmp_path_factory.mktemp("services-redis") / "started"
    _ctl("up", "redis", "--record", str(record))
    try:
        yield _ctl_env()["REDIS_URL"], bool(record.exists() and record.read_text().strip())
    finally:
        if record.exists() and record.read_text().strip():
            _ctl("down", "redis")
        else:
            record.unlink(missing_ok=True)


@pytest.fixture
def redis_url(redis_session: tuple[str, bool]) -> str:
    return redis_session[0]


@pytest.fixture
def redis_owned(redis_session: tuple[str, bool]) -> bool:
    return redis_session[1]
