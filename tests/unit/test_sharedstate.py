"""Unit tests for consumer.sharedstate: what gets built from which settings (no I/O)."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from consumer.metrics import Metrics
from consumer.ratelimit import AdaptiveLimiter
from consumer.sharedlimit import SharedLimiter
from consumer.sharedstate import build_shared_state
from tests.unit.test_config import load


def test_without_redis_todays_limiters_and_no_dedup() -> None:
    state = build_shared_state(load(), Metrics(CollectorRegistry()), ("track", "identify"))
    assert state.dedup is None and state.store is None
    assert isinstance(state.limiter("track"), AdaptiveLimiter)
    assert state.limiter("track") is not state.limiter("identify")


def test_one_budget_for_all_families_when_shared() -> None:
    settings = load(USERPILOT_RATE_LIMIT_SHARED="true")
    state = build_shared_state(settings, Metrics(CollectorRegistry()), ("track", "identify"))
    assert state.limiter("track") is state.limiter("identify")


def test_with_redis_shared_limiters_per_family_and_dedup() -> None:
    reg = CollectorRegistry()
    settings = load(REDIS_URL="redis://127.0.0.1:1/0", REDIS_DEDUP_TTL_SECONDS="600")
    state = build_shared_state(settings, Metrics(reg), ("track", "identify"))
    track, identify = state.limiter("track"), state.limiter("identify")
    assert isinstance(track, SharedLimiter) and isinstance(identify, SharedLimiter)
    assert track is not identify
    assert state.dedup is not None
    assert reg.get_sample_value("userpilot_rate_limiter_fallback", {"endpoint": "track"}) == 0
    asyncio.run(state.close())


@pytest.mark.parametrize(("env", "claim_s"), [
    ({}, 25.0),  # 2 x the 10 s request timeout, + 5
    ({"USERPILOT_REQUEST_TIMEOUT_SECONDS": "1"}, 15.0),  # the 10 s session, + 5
    ({"KAFKA_SESSION_TIMEOUT_MS": "45000"}, 50.0),
    ({"KAFKA_SESSION_TIMEOUT_MS": "6000", "USERPILOT_REQUEST_TIMEOUT_SECONDS": "2"}, 11.0),
])
def test_a_claim_outlives_the_session_of_a_frozen_replica(
        env: dict[str, str], claim_s: float) -> None:
    """Review "once53": a replica frozen after Userpilot took its request keeps its
    partitions for the session timeout; a claim that expired sooner let another replica
    holding the same messageId send it again."""
    settings = load(REDIS_URL="redis://127.0.0.1:1/0", **env)
    state = build_shared_state(settings, Metrics(CollectorRegistry()), ("track",))
    assert state.dedup is not None
    assert state.dedup._claim_ms == claim_s * 1000
    asyncio.run(state.close())


def test_each_shared_budget_is_named_in_its_lines() -> None:
    """Review "night53": the track and identify budgets' fallback lines were identical."""
    settings = load(REDIS_URL="redis://127.0.0.1:1/0")
    state = build_shared_state(settings, Metrics(CollectorRegistry()), ("track", "identify"))
    named = {family: getattr(state.limiter(family), "_named", None)
             for family in ("track", "identify")}
    assert named == {"track": " (track)", "identify": " (identify)"}
    asyncio.run(state.close())
