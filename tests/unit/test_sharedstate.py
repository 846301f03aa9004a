"""Unit tests for consumer.sharedstate: what gets built from which settings (no I/O)."""

from __future__ import annotations

import asyncio

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
