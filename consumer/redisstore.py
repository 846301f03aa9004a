"""The Redis edge: the only module that imports ``redis``.

Replicas share two things through Redis: the token's rate budget (`consumer.sharedlimit`)
and the record of delivered ``messageId``s (`consumer.dedup`). Both must never hold a
delivery up for long, so every call is bounded by one timeout (no reconnect back-off
hidden inside redis-py; one immediate retry on a fresh connection when a pooled one turns
out closed, within the same timeout) and every failure becomes
`SharedStateUnavailable`, on which the callers fall back to what the worker does without
Redis. Each operation is one atomic Lua script or one command; times come from Redis's
own clock (``TIME``), so replicas with skewed clocks still agree.

Keys never contain the token: callers pass `token_digest(token)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import ssl
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Literal, cast

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as RedisRetry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from consumer.errors import ConfigError, SharedStateUnavailable
from consumer.stalls import StallAwareDeadline

__all__ = ["ClaimState", "RedisStore", "tls_failure", "token_digest"]

ClaimState = Literal["claimed", "duplicate", "busy"]
CallObserver = Callable[[str, float, "str | None"], None]
"""``(operation, seconds, error class name or None)`` after every Redis call."""

MAX_CONNECTIONS = 32
"""Connections per replica; one round trip takes well under a millisecond, so 32 carry
thousands of calls a second."""

# GCRA reservation, all times in microseconds of Redis's clock.
# ARGV: interval, tolerance, lookahead, debt (requests), holdoff, idle ttl (ms), span,
# reserve (0: apply the debt and hold-off only, reserve nothing).
# KEYS: the budget, its "seen" marker (Redis's time at the last reservation, kept a week,
# renewed with every write), and its "credit" (see `debt` below).
# A missing budget key means unknown history: the bucket is taken as full, so the next slot
# is one interval away and no window that began before can exceed the limit. If the marker
# is there, the key was in use and is gone (evicted, or expired after an idle hour):
# replicas may hold slots of it reserved (up to `lookahead` ahead), counted as spent too,
# so the next slot is past them (without this a lost key handed them out again: 25 sends
# in a window of 20). That state is written at once. Without the marker it is a first use
# (or a flush, or a restart that lost everything: the lookahead's reservations are the
# residual overshoot, see README) and the first request is not held back. A slot further
# away than `lookahead` is not reserved (the caller retries later), which bounds how far
# reservations reach ahead.
# `debt` adds requests sent without Redis over the last `span`; `holdoff` keeps every
# replica from drawing for that long (replicas coming back from the fallback account for
# their local sends first). Those requests were sent in the past: they first fill what the
# budget left unused of the last `span` (its credit: from the later of its schedule and
# now - span, up to now), and only the rest is owed ahead. The credit left is kept for the
# hold-off, for the other replicas coming back. Added ahead of now whole, the partition
# shares' requests, which together fit the limit, were counted twice: the deployment sent
# nothing for a whole period after every fallback (review "redis18").
# KEYS[5], when given, records the debt one fallback episode has added so far: a call
# carries all of it, and only what exceeds the record is added. Calls that timed out while
# Redis was frozen still run when it thaws: without the record each added the debt again
# (129 requests counted for 96 sent, the deployment idle for seconds).
# ARGV[9], when not 0, is the call's deadline on Redis's clock (the caller's timeout): a
# call that runs after it changes nothing (its caller gave up and is on the fallback). A
# frozen Redis runs the calls that timed out when it thaws: each moved the schedule to
# "now", which erased the unused budget the returning replicas' local requests fill first,
# so they were owed ahead whole: 6-7 requests in the 10 s after the thaw where 70-90 fit
# (review "rate21"). Every reply ends with Redis's time, from which callers set deadlines.
# KEYS[4] holds the regime the schedule was written under: ARGV[10], the settings' own
# interval (never a replica's 429 slow-down, which differs between replicas: keyed on it,
# nearly every call converted, freeing half the bucket each time, and the deployment sent
# ~4x the limit; review "diff35"), and the tolerance. Read under other settings (a lower
# USERPILOT_RATE_BURST, a higher USERPILOT_RATE_LIMIT), the old schedule held every replica
# back for what the old burst had allowed, silently, up to a day with a day-long period
# (review "config35"): it is converted, the time until its next free slot counted at the
# new pace beyond a full bucket, capped at what the new settings can hold (tolerance,
# look-ahead and one interval).
GCRA_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local clock = string.format('%.0f', now)
local deadline = tonumber(ARGV[9]) or 0
if deadline > 0 and now > deadline then return {-1, '0', clock} end
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local lookahead = tonumber(ARGV[3])
local debt = tonumber(ARGV[4])
local holdoff = tonumber(ARGV[5])
local ttl = tonumber(ARGV[6])
local span = tonumber(ARGV[7])
local reserve = ARGV[8] ~= '0'
local tat = tonumber(redis.call('GET', KEYS[1]))
-- The marker holds Redis's time at the last reservation (older versions wrote 1): a clock
-- that went back since (an NTP step, a restored VM, a failover to a node behind) moves
-- the schedule back with it. Left on the old clock, every replica waited out the step,
-- silently: a 60 s step halted delivery for 60 s (review "time18").
local last = tonumber(redis.call('GET', KEYS[2]))
if tat and last and last > 1 and now < last then
  tat = tat - (last - now)
  -- At once, not only with a reservation: a call that reserves nothing (a returning
  -- replica's hold-off and debt) left the marker ahead, and the next call shifted again,
  -- erasing them (review "diff18b").
  redis.call('SET', KEYS[2], string.format('%.0f', now), 'PX', 604800000)
end
local base = tonumber(ARGV[10]) or 0
if base <= 0 then base = interval end
local regime = string.format('%.0f:%.0f', base, tolerance)
local was = redis.call('GET', KEYS[4])
local converted = false
if was ~= regime then
  local b, bt = string.match(was or '', '^(%d+):(%d+)')
  local before, before_tol = tonumber(b), tonumber(bt) or 0
  if tat and before and before > 0 and tat > now then
    -- What the old settings still owed before their next free slot, not all they held:
    -- converted whole and capped, a schedule full under a large burst lost its
    -- reservations, and the next call under that burst found the whole burst free again.
    -- Replicas of two burst settings side by side (a rolling upgrade) undid each other's
    -- reservations on every call: 12,339 requests in 15 s under a 600/min limit (review
    -- "redis44"). Now the bucket is as full under either settings.
    local due = tat - before_tol - now
    if due < 0 then due = 0 end
    local ahead = tolerance + due / before * base
    local most = tolerance + lookahead + interval
    if ahead > most then ahead = most end
    tat = now + ahead
    converted = true
  end
  redis.call('SET', KEYS[4], regime, 'PX', 604800000)
end
local since = tat or (now - span)
local changed = converted
if not tat then
  tat = now + tolerance + interval
  if redis.call('EXISTS', KEYS[2]) == 1 then tat = tat + lookahead; changed = true end
end
if tat < now then tat = now end
if debt > 0 then
  local applied = 0
  if KEYS[5] then applied = tonumber(redis.call('GET', KEYS[5])) or 0 end
  if debt > applied then
    local owed = (debt - applied) * interval
    local credit = tonumber(redis.call('GET', KEYS[3]))
    if not credit then
      if since < now - span then since = now - span end
      credit = now - since
      if credit < 0 then credit = 0 end
    end
    local used = math.min(credit, owed)
    tat = tat + owed - used; changed = true
    redis.call('SET', KEYS[3], string.format('%.0f', credit - used),
               'PX', math.max(1, math.floor((holdoff + tolerance) / 1000)))
    if KEYS[5] then redis.call('SET', KEYS[5], debt, 'PX', ttl) end
  end
end
if holdoff > 0 and tat < now + holdoff + tolerance then
  tat = now + holdoff + tolerance; changed = true
end
local keep = ttl + math.floor((tat - now) / 1000)
local wait = tat - tolerance - now
if wait < 0 then wait = 0 end
if not reserve or wait > lookahead then
  if changed then
    redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', keep)
  end
  local again = wait - lookahead
  if again < 0 then again = 0 end
  return {0, string.format('%.0f', again), clock}
end
-- Up to ARGV[11] slots in a row (a far Redis: one call per slot capped a replica at one
-- request per round trip), each within the look-ahead.
local n = tonumber(ARGV[11]) or 1
local room = math.floor((lookahead - wait) / interval) + 1
if n > room then n = room end
if n < 1 then n = 1 end
tat = tat + n * interval
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX',
           keep + math.floor(n * interval / 1000))
redis.call('SET', KEYS[2], string.format('%.0f', now), 'PX', 604800000)
return {n, string.format('%.0f', wait), clock}
"""

# Claim a messageId for one delivery attempt. Values: "d" = delivered (confirmed),
# "c:<owner>" = an attempt under way. Re-claiming one's own claim extends it.
CLAIM_LUA = """
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], 'c:' .. ARGV[1], 'PX', ARGV[2])
  return {'claimed', 0}
end
if v == 'd' then return {'duplicate', 0} end
if v == 'c:' .. ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {'claimed', 0}
end
return {'busy', redis.call('PTTL', KEYS[1])}
"""

# Delivered: the record, and no progress note left behind (`progress_key`).
CONFIRM_LUA = """
redis.call('SET', KEYS[1], 'd', 'PX', ARGV[1])
redis.call('DEL', KEYS[2])
return 1
"""

# Drop a claim only if it is still ours (a confirmed record or another's claim stays).
RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == 'c:' .. ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


PROGRESS_PREFIX = "ud:n:"
"""Progress notes have a namespace of their own (`ud:` still, for ACL key patterns): a note
at ``<claim key>|n`` was the claim key of the messageId ``<id>|n``, which then waited a day
for a "claim" that was another event's note (review "diff24")."""


def progress_key(key: str) -> str:
    """Where the calls an event of several calls got accepted are noted, for its claim
    ``key``: kept after the claim expires, so the next owner resumes after them."""
    return PROGRESS_PREFIX + key.removeprefix("ud:")


def token_digest(token: str) -> str:
    """A short, stable stand-in for the token in key names (the token never reaches Redis)."""
    return hashlib.sha256(token.encode()).hexdigest()[:24]


@contextlib.asynccontextmanager
async def _naming(shape: str) -> AsyncIterator[None]:
    """A probe's failure names the key shape it was on (never a key: they hold the token's
    digest): "NoPermissionError" alone left the operator to guess which ACL pattern."""
    try:
        yield
    except SharedStateUnavailable as exc:
        raise SharedStateUnavailable(f"{exc} on keys {shape}", timed_out=exc.timed_out,
                                     tls=exc.tls) from None


def tls_failure(exc: BaseException) -> str | None:
    """Why the TLS handshake failed, when that is what `exc` (or what it came from) is:
    OpenSSL's words ("certificate verify failed: self-signed certificate", "IP address
    mismatch, ...", "WRONG_VERSION_NUMBER"), which hold no password, unlike the URL. A
    bare "ConnectionError" sent operators looking for an outage (review "redis34")."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"certificate verify failed: {cause.verify_message or cause.reason}"
        if isinstance(cause, ssl.SSLError):
            return str(cause.reason or type(cause).__name__)
        cause = cause.__cause__ or cause.__context__
    return None


class RedisStore:
    """Bounded, atomic Redis operations for the shared budget and deduplication."""

    def __init__(
        self, url: str, *, timeout_s: float = 0.25, ca_file: str | None = None,
        observe: CallObserver | None = None,
    ) -> None:
        # No socket timeout (redis-py's default is 5 s): with one, redis-py writes each
        # command through `asyncio.wait_for`, which on Python 3.11 drops a cancellation that
        # arrives as the write completes (the call returns, the task runs on): a revoke or
        # shutdown then waited for deliveries it had cancelled. `_call`'s `asyncio.timeout`
        # bounds every call instead (redis-py drops a connection whose call was cut short).
        options: dict[str, Any] = {
            "socket_timeout": None,
            "socket_connect_timeout": timeout_s,
            # A pooled connection the server (its `timeout`, a managed Redis's idle limit)
            # or a load balancer closed fails on its next use: once, at once, on a fresh
            # connection. Without this, that one failure made a claim "unchecked": after an
            # idle spell, a rebalance's re-read re-sent events already delivered. Every
            # operation may run twice: claims are re-entrant for their owner, confirm and
            # release idempotent, and a second budget slot is only a slot unused.
            "retry": RedisRetry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            "retry_on_timeout": False,
            "health_check_interval": 0,
            # A new connection costs its connect and the call, nothing more: redis-py's
            # defaults add HELLO 3 and CLIENT SETINFO, two round trips more inside the
            # call's timeout. With Redis 90 ms away no call on a new connection fitted in
            # 0.25 s, and a call cut short drops its connection: no call ever succeeded.
            # (A URL's own `protocol=3` still wins.)
            "protocol": 2,
            "driver_info": None,
        }
        if url.startswith("rediss://") and ca_file:
            options["ssl_ca_certs"] = ca_file
        # A blocking pool: a call beyond MAX_CONNECTIONS waits for a free connection (within
        # the call's timeout) instead of failing at once. The plain pool raises
        # MaxConnectionsError past 100, which WORKER_MAX_IN_FLIGHT concurrent claims reach:
        # every event then fell back (no dedup, partition share).
        try:
            pool = aioredis.BlockingConnectionPool.from_url(
                url, max_connections=MAX_CONNECTIONS, timeout=None, **options)
        except (ValueError, TypeError) as exc:
            # Its message may quote part of the URL, the password included: only the type.
            raise ConfigError(f"REDIS_URL (not shown: it is a secret) cannot be read by the "
                              f"Redis client ({type(exc).__name__}): percent-encode any of "
                              f"#?[]@/: in its user name and password") from None
        self._client: aioredis.Redis = aioredis.Redis(connection_pool=pool)
        self._timeout = timeout_s
        self._observe = observe
        self.answers = 0
        """Calls answered, ever, whatever their kind: a sign Redis is back that the
        deduplicator, skipping a hung Redis, reads (`Deduplicator._back`)."""
        self._offset_us: float | None = None  # Redis's clock - our monotonic clock (µs)
        self._gcra = self._client.register_script(GCRA_LUA)
        self._claim = self._client.register_script(CLAIM_LUA)
        self._release = self._client.register_script(RELEASE_LUA)
        self._confirm = self._client.register_script(CONFIRM_LUA)

    @property
    def timeout_s(self) -> float:
        return self._timeout

    async def _call(self, op: str, make: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        error: str | None = None
        try:
            # Not counting a stalled loop: frozen while a call was out, it resumed with the
            # answer waiting unread and the overdue timeout failed the call, so a claim
            # went unchecked and its event out twice (review "freeze57").
            async with StallAwareDeadline(self._timeout):
                result = await make()
            self.answers += 1
            return result
        except (RedisError, OSError, TimeoutError, TypeError, ValueError) as exc:
            # TypeError/ValueError: redis-py refusing the URL's options at connect time,
            # which check-config checks; were one to slip through, the replica falls
            # back instead of crash-looping. Only the type: the text may quote the URL.
            error = type(exc).__name__
            if isinstance(exc, ResponseError) and "DB index is out of range" in str(exc):
                error += " (DB index is out of range)"  # Redis's own words: no URL in them
            elif isinstance(exc, ResponseError) and (
                    str(exc).lower().startswith(("unknown command", "err unknown command"))
                    or "unknown redis command called from" in str(exc).lower()):
                # Renamed or disabled (rename-command); in a script Redis says it so.
                error += " (unknown command)"
            if isinstance(exc, ReadOnlyError):
                await self._reconnect()
            tls = tls_failure(exc)
            if tls is not None:
                error += f" (TLS: {tls})"
            timed_out = isinstance(exc, TimeoutError | RedisTimeoutError)
            raise SharedStateUnavailable(f"redis {op} failed: {error}",
                                         timed_out=timed_out, tls=tls is not None) from None
        finally:
            if self._observe is not None:
                self._observe(op, time.perf_counter() - start, error)

    async def ping(self) -> None:
        await self._call("ping", self._client.ping)

    async def eviction(self) -> tuple[str, int] | None:
        """Redis's `maxmemory-policy` and `maxmemory` (bytes, 0: no cap), or None where its
        user may not run CONFIG GET (a managed Redis often denies it): what `reach.redis_notes`
        reads, for `check-config --online` and `run` to warn of."""
        try:  # through `_call`: its timeout (a Redis that accepts and never answers held
            # `run`'s start-up for good, review "diff51b")
            found = await self._call("config get",
                                     functools.partial(self._client.config_get, "maxmemory*"))
        except SharedStateUnavailable:
            return None
        policy, cap = found.get("maxmemory-policy"), str(found.get("maxmemory"))
        if not isinstance(policy, str) or not cap.isdigit():
            return None
        return policy, int(cap)

    async def probe(self, claims: Sequence[str], budgets: Sequence[str]) -> None:
        """What `run` does, once, on throw-away keys of the same shapes (`ud:`, `userpilot:`):
        per claim key a claim and its release, a progress note and its read, a confirm
        (keys living 1 s); per budget key a reservation. A PING passes where these fail: a
        user whose ACL allows PING but not the scripts, the commands or the keys, a
        read-only replica. `claims` and `budgets`: keys shaped as the worker's own for its
        token, one of each shape it uses (`reach.probe_keys`), so an ACL narrowed to those
        shapes passes (review diff25b) and one that leaves a shape out does not (review
        redis34); never a live budget's key.

        The scripts are loaded first, as a replica loads them after a failover or a restart
        (Redis keeps no script cache across either): a user whose ACL denies SCRIPT passed
        while another client's load was cached, then every replica ran on its fallback
        after the next failover (review "redisconf45")."""
        for script in (self._claim, self._release, self._confirm, self._gcra):
            await self._call("script load",
                             functools.partial(self._client.script_load, script.script))
        for claim in claims:
            shape = ":".join(claim.split(":")[:2]) + ":*"  # an ACL denying it is named
            async with _naming(shape):
                await self.claim(claim, "check-config", 1000)
                await self.claim(claim, "check-config", 1000)  # its own again: PEXPIRE
                await self.claim(claim, "check-config-other", 1000)  # another's: PTTL
                await self.release(claim, "check-config")
                await self.progress(claim, "1:probe", 1000)
                await self.progress_of(claim)
                await self.mark_left(claim)  # GET + PTTL: how a known user's record is read
                await self.confirm(claim, 1000)
        for budget in budgets:
            async with _naming(":".join(budget.split(":")[:3]) + ":*"):
                await self.gcra(budget, interval_us=1000, tolerance_us=0, lookahead_us=1000,
                                idle_ttl_ms=1000)
            with contextlib.suppress(RedisError, OSError, TimeoutError):  # else a week
                async with asyncio.timeout(self._timeout):
                    await self._client.unlink(f"{budget}:seen", f"{budget}:regime")

    async def _reconnect(self) -> None:
        """READONLY: the node behind the URL was demoted (a managed Redis's failover moves
        its name to the new primary). Its connections would answer READONLY for ever: the
        replica stayed on its fallback until restarted (review "redis18"). They are closed,
        so the next call resolves the name again."""
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with asyncio.timeout(self._timeout):
                await self._client.connection_pool.disconnect()

    async def gcra(
        self, key: str, *, interval_us: int, tolerance_us: int, lookahead_us: int,
        debt: int = 0, debt_key: str | None = None, holdoff_us: int = 0, idle_ttl_ms: int,
        span_us: int = 0, reserve: bool = True, base_interval_us: int = 0, count: int = 1,
    ) -> tuple[int, float]:
        """Reserve the next slots of the budget at ``key``: ``(reserved, seconds)``.

        Reserved (1 to ``count`` slots, one interval apart, each within the look-ahead):
        send the first after ``seconds``. None reserved (0): ask again after ``seconds``.
        ``debt``: requests sent without Redis over the last ``span_us``; ``debt_key``: the
        record of what this ``debt`` (a running total) already added. ``reserve=False``:
        apply the debt and hold-off only. Its own argument: passed as a look-ahead of -1,
        it also cut a lost key's look-ahead (the slots replicas hold), which were handed
        out again (review "prop18"). ``base_interval_us``: the settings' interval, before any
        429 slow-down (0: ``interval_us``): what the schedule's regime is recorded by.
        """
        interval_us = max(1, interval_us)  # the schedule's resolution: 1 µs
        # Never shorter than one interval (`SharedLimiter.lookahead_s` keeps the same floor):
        # above ~2e7 requests a second the look-ahead rounded to 0 µs under the 1 µs
        # interval, no slot was ever near enough to reserve, and a ready worker sent
        # nothing while asking Redis in a loop (review "config40").
        args = [interval_us, max(0, tolerance_us), max(interval_us, lookahead_us),
                max(0, debt), max(0, holdoff_us), max(1, idle_ttl_ms), max(0, span_us),
                1 if reserve else 0, 0, max(0, base_interval_us), max(1, count)]
        keys = [key, f"{key}:seen", f"{key}:credit", f"{key}:regime",
                *([debt_key] if debt_key else [])]
        for _ in range(2):
            args[8] = self._deadline_us()
            sent = time.monotonic()
            reply = await self._call("gcra", lambda: self._gcra(keys=keys, args=args))
            self._observe_clock(int(reply[2]), sent)
            if int(reply[0]) >= 0:
                return int(reply[0]), int(reply[1]) / 1e6
            # Refused as late while this still waited: Redis's clock stepped forward since
            # the deadline was set. Once more, on the clock it now reports.
        raise SharedStateUnavailable("redis gcra ran past its deadline twice")

    def _deadline_us(self) -> int:
        """When a reservation sent now must have run, on Redis's clock (0: not known yet).

        The offset is read from earlier replies, which arrive after Redis read its clock:
        it errs early by their way back, so a call may be refused while its caller still
        waits (it is then sent again on the clock the refusal reported), never late."""
        if self._offset_us is None:
            return 0
        return round(time.monotonic() * 1e6 + self._offset_us + self._timeout * 1e6)

    def _observe_clock(self, redis_now_us: int, sent: float) -> None:
        """Narrows the offset with one reply: Redis read its clock after the call was sent
        and before the reply came, so the offset lies between ``now - received`` and
        ``now - sent``. The largest lower bound is kept (the least delayed reply), cut to
        the latest upper bound: a clock that stepped back or runs slower lowers it at once
        (kept high, deadlines ran late for good and stale calls ran again, review
        "diff22"); one that stepped forward raises it."""
        received = time.monotonic() * 1e6
        low, high = redis_now_us - received, redis_now_us - sent * 1e6
        known = self._offset_us
        self._offset_us = min(high, low if known is None else max(known, low))

    async def claim(self, key: str, owner: str, ttl_ms: int) -> tuple[ClaimState, float]:
        """Claim ``key`` for ``owner``: ``(state, seconds until another claim may win)``."""
        reply = await self._call("claim", lambda: self._claim(keys=[key],
                                                              args=[owner, max(1, ttl_ms)]))
        state = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
        if state not in ("claimed", "duplicate", "busy"):
            raise SharedStateUnavailable(f"redis claim answered {state!r}")
        return cast(ClaimState, state), max(0, int(reply[1])) / 1000

    async def confirm(self, key: str, ttl_ms: int) -> None:
        """Record ``key`` as delivered for ``ttl_ms``, whoever's claim it held."""
        await self._call("confirm", lambda: self._confirm(keys=[key, progress_key(key)],
                                                          args=[max(1, ttl_ms)]))

    async def progress(self, key: str, note: str, ttl_ms: int) -> None:
        """Note which calls of ``key``'s event were accepted (`note`, opaque here)."""
        await self._call("progress", lambda: self._client.set(
            progress_key(key), note, px=max(1, ttl_ms)))

    async def progress_of(self, key: str) -> str | None:
        """The note of ``key``'s event (None when none)."""
        raw = await self._call("progress_of", lambda: self._client.get(progress_key(key)))
        if raw is None:
            return None
        return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)

    async def mark(self, key: str, ttl_ms: int) -> None:
        """Set ``key`` for ``ttl_ms`` (a fact the replicas share, e.g. a user identified),
        holding that TTL: its readers tell from it how long ago it was set (`mark_left`)."""
        ttl_ms = max(1, ttl_ms)
        await self._call("mark", lambda: self._client.set(key, str(ttl_ms).encode(), px=ttl_ms))

    async def mark_left(self, key: str) -> tuple[int | None, int] | None:
        """A `mark`'s TTL (None: written without one, `b"1"` before this) and the
        milliseconds it has left (PTTL), in one round trip; None when it is not set."""

        async def read() -> list[Any]:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.get(key)
                pipe.pttl(key)
                return list(await pipe.execute())

        value, left = await self._call("mark_left", read)
        left = int(left)
        if left < 0:  # -2: no such key; -1: no TTL (not ours)
            return None
        text = value.decode("ascii", "replace") if isinstance(value, bytes) else ""
        written = int(text) if text.isdigit() and len(text) <= 12 else None
        return (written if written and written > 1 else None), left

    async def forget(self, keys: Sequence[str]) -> None:
        """Delete ``keys`` (UNLINK)."""
        if keys:
            await self._call("forget", lambda: self._client.unlink(*keys))

    async def release(self, key: str, owner: str) -> None:
        """Drop ``owner``'s claim on ``key`` (no-op if confirmed or claimed by another)."""
        await self._call("release", lambda: self._release(keys=[key], args=[owner]))

    async def close(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self._client.aclose(close_connection_pool=True)
