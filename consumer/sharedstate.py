"""Builds what replicas share through Redis from the settings, for the worker to call.

One Redis connection pool, one limiter per endpoint family (or one for all with
USERPILOT_RATE_LIMIT_SHARED) and one deduplicator. Without REDIS_URL: the partition-share
limiters of today and no deduplicator, so a single replica and the demo need nothing new.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from consumer.config import Settings
from consumer.dedup import Deduplicator
from consumer.metrics import Metrics
from consumer.ratelimit import AdaptiveLimiter
from consumer.sharedlimit import ALL_FAMILIES, SharedLimiter, budget_key

if TYPE_CHECKING:
    from consumer.redisstore import RedisStore

__all__ = ["Limiter", "SharedState", "build_shared_state"]


class Limiter(Protocol):
    """What the worker calls on a limiter: `AdaptiveLimiter` and `SharedLimiter` both fit."""

    @property
    def rate(self) -> float: ...

    @property
    def share_rate(self) -> float: ...

    def set_share(self, share: float) -> None: ...

    def slow_down(self) -> None: ...

    async def acquire(self, want: int = 1) -> float: ...


@dataclass
class SharedState:
    """Limiters by endpoint family, the deduplicator (None without Redis), the store."""

    limiters: dict[str, Limiter]
    dedup: Deduplicator | None = None
    store: RedisStore | None = None
    shared_budget: bool = False

    def budget(self, family: str) -> str:
        """The rate budget an endpoint family draws from (one when all share a budget)."""
        return ALL_FAMILIES if self.shared_budget else family

    def limiter(self, family: str) -> Limiter:
        """The limiter for an endpoint family (the single one when all share a budget)."""
        return self.limiters[self.budget(family)]

    def distinct(self) -> list[Limiter]:
        """Each limiter once (one when all families share a budget)."""
        return list(self.limiters.values())

    async def close(self) -> None:
        if self.store is not None:
            await self.store.close()


def build_shared_state(
    settings: Settings, metrics: Metrics, families: Iterable[str] = ("track",), *,
    claim_ttl_s: float | None = None,
) -> SharedState:
    """Limiters and deduplicator as the settings ask; nothing connects until first use."""
    names = tuple(families)
    budgets = (ALL_FAMILIES,) if settings.rate_limit_shared else names

    def local() -> AdaptiveLimiter:
        return AdaptiveLimiter(settings.rate_limit, settings.rate_period_s, settings.rate_burst)

    if settings.redis is None:
        # The series exist (at 0: never on a fallback, nothing skipped) so the dashboard
        # and alerts read the same names with or without Redis.
        metrics.declare_redis_endpoints(budgets)
        return SharedState(limiters={b: local() for b in budgets},
                           shared_budget=settings.rate_limit_shared)
    # Imported here: the Redis client costs ~6 MB of RSS that a worker without REDIS_URL
    # (one replica, the demo) has no use for.
    from consumer.redisstore import RedisStore, token_digest

    redis = settings.redis
    store = RedisStore(redis.url.reveal(), timeout_s=redis.timeout_s,
                       ca_file=redis.tls_ca_file, observe=metrics.observe_redis)
    digest = token_digest(settings.api_key.reveal())
    metrics.declare_redis_endpoints(budgets)
    limiters: dict[str, Limiter] = {}
    for budget in budgets:
        def switched(active: bool, budget: str = budget) -> None:
            metrics.rate_limiter_fallback.labels(budget).set(1 if active else 0)
            if active:
                metrics.rate_limiter_fallbacks.labels(budget).inc()

        limiters[budget] = SharedLimiter(
            store, budget_key(digest, budget), settings.rate_limit, settings.rate_period_s,
            settings.rate_burst, fallback=local(), on_fallback=switched, name=budget,
        )
    # A claim is renewed (re-claimed, atomically) right before each request, so it has to
    # outlive one request and its confirm; longer only delays, after a crash, the replica
    # that re-reads the event. And a replica frozen (SIGSTOP, a paused VM) after Userpilot
    # took its request keeps its partitions for the session timeout: its claim must last
    # that long too, or another replica holding the same messageId (another partition or
    # topic) sent it again meanwhile (review "once53": 24 of 600 sent twice in an 8.5 s
    # freeze with a 7 s claim and a 10 s session).
    claim = claim_ttl_s if claim_ttl_s is not None else (
        max(2 * settings.request_timeout_s, settings.session_timeout_s) + 5.0)
    dedup = Deduplicator(store, digest, ttl_s=redis.dedup_ttl_s, claim_ttl_s=claim)
    return SharedState(limiters=limiters, dedup=dedup, store=store,
                       shared_budget=settings.rate_limit_shared)
