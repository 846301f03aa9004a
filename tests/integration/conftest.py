"""Integration fixtures: the Userpilot sandbox (real HTTP) beside the real broker/registry."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from consumer.sandbox import SandboxConfig, SandboxControl, SandboxThread
from tests.integration.harness import READ_TOKEN, WRITE_TOKEN


@pytest.fixture
def sandbox() -> Iterator[tuple[SandboxThread, SandboxControl]]:
    """A fresh sandbox with the integration tokens and no rate limit (tests set their own)."""
    config = SandboxConfig(port=0, write_tokens=(WRITE_TOKEN,), read_tokens=(READ_TOKEN,),
                           rate_limit=0)
    with SandboxThread(config) as server:
        yield server, SandboxControl(server.url)


from tests.integration.redis_fixtures import (  # noqa: E402  (real Redis fixtures)
    redis_url,
    stoppable_redis,
    tls_redis,
)

__all__ = ["redis_url", "sandbox", "stoppable_redis", "tls_redis"]
