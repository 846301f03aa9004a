"""`run`'s and `check-config --online`'s Redis checks against servers that answer but can
never serve the worker: a user denied SCRIPT while the scripts are cached, a SCRIPT renamed
away, cluster mode (review "redisconf45"); and the ACL the hints name is taken."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as sync_redis

from consumer import reach
from consumer.config import Settings, load_settings
from consumer.redisstore import CLAIM_LUA, CONFIRM_LUA, GCRA_LUA, RELEASE_LUA
from tests.integration.harness import free_port
from tests.integration.redis_fixtures import StoppableRedis


def _settings(url: str) -> Settings:
    return load_settings({
        "USERPILOT_API_KEY": "it-write-token-7f3a9c", "USERPILOT_ANALYTICS_ENDPOINT": "127.0.0.1:9",
        "USERPILOT_INSECURE_HTTP": "true", "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9",
        "KAFKA_TOPICS": "t", "KAFKA_GROUP_ID": "g", "SCHEMA_REGISTRY_URL": "http://127.0.0.1:9",
        "REDIS_URL": url})


def _server(tmp_path: Path, *extra: str) -> Iterator[StoppableRedis]:
    server = StoppableRedis(tmp_path, extra=extra)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def plain(tmp_path: Path) -> Iterator[StoppableRedis]:
    yield from _server(tmp_path)


def test_a_user_denied_script_load_is_refused_even_with_the_scripts_cached(
        plain: StoppableRedis) -> None:
    """Cached by another client, the scripts ran for a user whose ACL denies SCRIPT: both
    checks said OK, and after a failover or restart (no script cache) every replica ran
    on its fallback for ever."""
    admin = sync_redis.Redis.from_url(plain.url)
    for script in (GCRA_LUA, CLAIM_LUA, CONFIRM_LUA, RELEASE_LUA):
        admin.script_load(script)
    admin.acl_setuser("noscript", enabled=True, passwords=["+pw"], keys=["ud:*", "userpilot:*"],
                      commands=["+@all", "-script"])
    hinted = reach.REDIS_ACL_EXAMPLE.removeprefix("e.g. ").split()
    admin.acl_setuser("hinted", enabled=True, passwords=["+pw"], keys=["ud:*", "userpilot:*"],
                      commands=hinted)
    admin.close()
    denied = _settings(plain.url.replace("redis://", "redis://noscript:pw@", 1))
    refused = reach.redis_refusal(denied, 5)
    assert refused is not None and "may not load the worker's scripts" in refused, refused
    checked = reach.redis(denied, 5)
    assert checked is not None and "NoPermissionError" in checked, checked
    # The ACL the hints give is enough (it lacked PING: refused, review "redisconf45").
    allowed = _settings(plain.url.replace("redis://", "redis://hinted:pw@", 1))
    assert reach.redis_refusal(allowed, 5) is None
    assert reach.redis(allowed, 5) is None


@pytest.fixture(params=["SCRIPT", "TIME", "PEXPIRE", "EXISTS", "DEL", "PTTL"])
def renamed(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoppableRedis]:
    yield from _server(tmp_path, "--rename-command", request.param, "")


def test_a_redis_with_a_command_renamed_away_is_refused_at_start_up(
        renamed: StoppableRedis) -> None:
    """One the worker calls, or one its scripts call (Redis words that one "Unknown Redis
    command called from script"; review diff45b); PEXPIRE only on a claim of one's own."""
    settings = _settings(renamed.url)
    refused = reach.redis_refusal(settings, 5)
    assert refused is not None and "renamed or disabled" in refused, refused
    checked = reach.redis(settings, 5)
    assert checked is not None and "renamed or disabled" in checked, checked


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[StoppableRedis]:
    for server in _server(tmp_path, "--cluster-enabled", "yes",
                          "--cluster-port", str(free_port()),  # port + 10000 may not exist
                          "--cluster-config-file", str(tmp_path / "nodes.conf")):
        admin = sync_redis.Redis.from_url(server.url)
        command: Callable[..., Any] = admin.execute_command
        command("CLUSTER", "ADDSLOTSRANGE", "0", "16383")
        deadline = time.monotonic() + 10
        while b"cluster_state:ok" not in command("CLUSTER", "INFO"):
            assert time.monotonic() < deadline, "the one-node cluster did not come up"
            time.sleep(0.05)
        admin.close()
        yield server


def test_a_redis_in_cluster_mode_is_refused_at_start_up(cluster: StoppableRedis) -> None:
    """Its scripts' keys (a claim and its note, a budget and its markers) are in different
    slots: CROSSSLOT on every confirm, taken for an outage, ready on the fallback for ever."""
    settings = _settings(cluster.url)
    refused = reach.redis_refusal(settings, 5)
    assert refused is not None and "cluster mode" in refused, refused
    checked = reach.redis(settings, 5)
    assert checked is not None and "cluster mode" in checked, checked
