"""No ``messageId`` delivered twice by the deployment: claim before the request, confirm after.

Userpilot has no idempotency key, so a re-sent event (a crash or rebalance re-reads up to
``WORKER_MAX_IN_FLIGHT`` events per replica) is a duplicate in the customer's analytics.
Per (token, endpoint, messageId) one Redis key moves through

    (none) ──claim──▶ "c:<owner>"  (claim TTL) ──confirm (2xx)──▶ "d"  (REDIS_DEDUP_TTL_SECONDS)
                           └──release (given up undelivered)──▶ (none)

- ``claim`` → `Outcome.SEND` (deliver), `Outcome.DUPLICATE` (already delivered: finish the
  event without a request, counted as ``duplicate``) or `Outcome.BUSY` (another owner's
  attempt is under way; not a failure, no attempt is spent): asked again at `BusyWait`'s
  pace, 0.1 s doubling to 2 s and never past ``retry_after_s`` (the claim's end), so a
  confirm is seen within moments and a dead owner's claim is still waited out. Waiting the
  whole claim TTL at once held a copy of a messageId in another partition, and its user's
  later events, 25 s behind a confirm that came 50 ms later (review "redis25"). Claim once
  before the limiter (a duplicate costs no budget) and again right before each request:
  re-claiming one's own claim extends it, and an expired claim is simply taken again, so
  the claim TTL only has to cover one request and a frozen replica's session (default
  the longer of 2 × request timeout and the group's session timeout, + 5 s).
- ``owner`` must be unique per process and record (e.g. ``<instance>/<topic>/<partition>/
  <offset>``): after a crash the re-reading replica then waits for the claim TTL instead of
  racing a zombie's request.
- An event of several calls (a ``group``: company identify, then the association) notes
  after each accepted call but the last which calls were accepted (``progress``: their
  count and a digest of their requests, kept for the record's TTL, cleared by the
  confirm); an owner that takes the claim over reads it (``progress_of``) and resumes
  after them when its own first calls are those same requests, so a replica killed
  between the two calls does not cost the company identify twice, while an event that
  reuses the messageId with other content, or a replay after a mapping change, sends
  all its calls.
- ``confirm`` after any 2xx. Across retries the claim is kept (the retry is this owner's;
  after a timeout the request may even have been accepted). ``release`` when this owner
  gives the event up undelivered: dead-lettered, or abandoned on revoke/shutdown before it
  reached the wire, so the next owner need not wait for the claim TTL.
- Redis unreachable → `Outcome.SEND` with ``degraded=True`` (delivered as without Redis,
  at least once) and counted by the caller.
- Redis hung (`HUNG_AFTER` calls in a row timed out, no answer between them): not asked
  again for `SKIP_FIRST_S`, then one call at a time probes it, the skip doubling to
  `SKIP_MAX_S` while the probes time out too; the other calls are answered as if Redis
  failed. Each event makes up to four calls in turn (claim, re-claim, confirm, release or
  progress), and at REDIS_TIMEOUT_SECONDS each one user's events ran at ~1 a second while
  a frozen Redis (a failover, a partition) was waited out on every call (review
  "faults26"). One slow call among answers (a fork for BGSAVE) trips nothing; the calls in
  flight when Redis froze, timing out together, are one sign, not one doubling each; a
  claim skipped while another owner's claim of the same key was last seen live answers
  BUSY until that claim's end, not SEND (review "diff26"). A refusal (connection refused)
  costs nothing and skips nothing.

Thread rule: event loop only (every call is a coroutine on the handler's loop).

The remaining duplicate window: a ``messageId`` is sent twice only if (a) the process dies
or loses Redis between Userpilot accepting the request and the confirm reaching Redis (the
requests it had on the wire that Userpilot had taken: its answer time plus one Redis round
trip, so about rate × answer time requests per death) and the event is consumed
again after the claim TTL; (b) a request times out after Userpilot accepted it and the
retry is accepted too (no idempotency key can tell them apart); (c) a request outlives its
claim TTL (claim TTL > request timeout and > the session timeout prevents it unless the
process stalls past the session, when the group takes its partitions); (d) Redis is
unreachable, lost its data (no persistence) or the record's TTL passed before the re-read.

Memory: a confirmed record is one string key (62 bytes for a UUID messageId) with a TTL:
197 bytes per id in Redis 7.0 (INFO used_memory delta over 100 000 ids, measured by
tests/integration/test_redis_dedup.py); 600/min all day is about 170 MB per family at 24 h.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum
from typing import Literal, Protocol, TypeVar

from consumer.errors import SharedStateUnavailable
from consumer.logs import RateLimit

__all__ = ["USER_SHAPE", "ClaimResult", "DedupStore", "Deduplicator", "Outcome", "dedup_key",
           "user_key"]

log = logging.getLogger(__name__)
# Redis down means every event's claim fails: one line per 10 s (with the count of the
# lines it stands for), not one per event; the counters and the fallback gauge tell the rest.
log.addFilter(RateLimit(10.0))

MAX_RAW_ID = 64
HUNG_AFTER = 2
SKIP_FIRST_S = 1.0
SKIP_MAX_S = 10.0
BUSY_SEEN_MAX = 10_000  # keys whose other owner's claim is remembered (in flight: far fewer)

T = TypeVar("T")
V = TypeVar("V")


def _pruned(entries: dict[str, V], live: Callable[[str, V], bool]) -> tuple[dict[str, V], int]:
    """`entries` past their cap: the live ones, and the next cap, twice as many (at least
    BUSY_SEEN_MAX), so a dict of many live entries is rebuilt once per as many more, not
    on every busy answer (~1 ms each at 10,000, review "scale46"). No live entry is let go:
    a claim seen busy is waited out while Redis hangs (README; dropping the oldest sent
    copies over other replicas' live claims, review "diff46b")."""
    kept = {key: value for key, value in entries.items() if live(key, value)}
    return kept, max(BUSY_SEEN_MAX, 2 * len(kept))


class Outcome(Enum):
    SEND = "send"
    DUPLICATE = "duplicate"
    BUSY = "busy"


@dataclass(frozen=True, slots=True)
class ClaimResult:
    outcome: Outcome
    retry_after_s: float = 0.0
    degraded: bool = False  # Redis was unreachable: delivered without deduplication


BUSY_POLL_FIRST_S = 0.1
BUSY_POLL_MAX_S = 2.0


class BusyWait:
    """The pace at which another owner's claim is asked about again, for one waiting
    event: BUSY_POLL_FIRST_S doubling to BUSY_POLL_MAX_S, never past the claim's end."""

    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next = BUSY_POLL_FIRST_S

    def after(self, claim: ClaimResult) -> float:
        wait = min(self._next, claim.retry_after_s)
        self._next = min(self._next * 2, BUSY_POLL_MAX_S)
        return wait


class DedupStore(Protocol):
    """What deduplication needs from Redis (`consumer.redisstore.RedisStore`)."""

    @property
    def answers(self) -> int:
        """Calls of any kind the store got an answer to, ever (the shared budget's too)."""
        ...

    async def claim(
        self, key: str, owner: str, ttl_ms: int
    ) -> tuple[Literal["claimed", "duplicate", "busy"], float]: ...

    async def confirm(self, key: str, ttl_ms: int) -> None: ...

    async def progress(self, key: str, note: str, ttl_ms: int) -> None: ...

    async def progress_of(self, key: str) -> str | None: ...

    async def release(self, key: str, owner: str) -> None: ...

    async def mark(self, key: str, ttl_ms: int) -> None: ...

    async def mark_left(self, key: str) -> tuple[int | None, int] | None: ...


_HASHED = re.compile(r"#[0-9a-f]{32}")


def dedup_key(token_digest: str, endpoint: str, message_id: str) -> str:
    """The record's key: short on purpose (memory per id grows with it); a messageId
    longer than 64 bytes is hashed, and so is one spelt as a hashed one: `#` and 32 hex
    digits, raw, was the key of a long id, and the event sent second was skipped as the
    other's duplicate (review "sec45"). Only that spelling: any other id keeps its key, so
    replicas of the previous release read the same records (review "diff45c")."""
    mid = message_id
    if len(mid.encode()) > MAX_RAW_ID or _HASHED.fullmatch(mid):
        mid = "#" + hashlib.sha256(mid.encode()).hexdigest()[:32]
    return f"ud:{endpoint}:{token_digest[:16]}:{mid}"


USER_SHAPE = "user"
"""The key space of users some replica identified (`user_key`), beside the endpoints'."""


def user_key(token_digest: str, user_id: str) -> str:
    """The key that says a replica identified ``user_id`` (ensure-user, shared)."""
    return dedup_key(token_digest, USER_SHAPE, user_id)


class Deduplicator:
    """claim / confirm / release for one token; ``owner`` identifies one Kafka record."""

    def __init__(
        self, store: DedupStore, token_digest: str, *, ttl_s: float = 86400.0,
        claim_ttl_s: float = 60.0, busy_retry_min_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._digest = token_digest
        self._ttl_ms = max(1, round(ttl_s * 1000))
        self._claim_ms = max(1, round(claim_ttl_s * 1000))
        self._busy_min = busy_retry_min_s
        self._clock = clock
        self._timeouts = 0  # calls timed out since the last answer
        self._skip_for = 0.0  # > 0 while Redis counts as hung: the current skip's length
        self._skip_until = 0.0
        self._probing = False  # a call past the skip is asking Redis: the others skip
        self._answers_at_skip = 0  # the store's `answers` when the current skip began
        self._busy: dict[str, float] = {}  # key -> end of a claim seen busy, as last seen
        # key -> the owner on this replica holding its claim (while Redis said so last):
        # only it sends past a claim seen busy while Redis hangs (review "diff42")
        self._holding: dict[str, str] = {}
        self._busy_cap = self._holding_cap = BUSY_SEEN_MAX  # their sizes that prune them

    def key(self, endpoint: str, message_id: str) -> str:
        return dedup_key(self._digest, endpoint, message_id)

    async def _ask(self, call: Callable[[], Awaitable[T]]) -> T:
        """One Redis call, unless Redis counts as hung (module docstring): then
        SharedStateUnavailable(skipped=True) at once, as a failed call."""
        if self._probing or (self._clock() < self._skip_until and not self._back()):
            raise SharedStateUnavailable("redis skipped: its calls timed out lately",
                                         skipped=True)
        probe = self._skip_for > 0
        self._probing = probe
        try:
            result = await call()
        except SharedStateUnavailable as exc:
            if exc.timed_out:
                self._timed_out(probe)
            raise
        finally:
            if probe:
                self._probing = False
        self._timeouts = 0
        if probe:
            self._skip_for = 0.0  # answered: asked as usual again
        return result

    def _back(self) -> bool:
        """While skipping: True once Redis answered another call of this replica (the shared
        rate budget's) since the skip began: this call probes it now instead of at the
        skip's end. Skipped on until then, events went out unchecked against a Redis that
        answered, for up to SKIP_MAX_S after a freeze ended: delivered twice when the
        replica then died (review "faults36"). Still one probe at a time, and a probe that
        times out doubles the skip as before: a Redis that answers the budget but not the
        claims (one shard hung) gets one call at a time, not every event's (review
        "diff36b")."""
        if self._store.answers <= self._answers_at_skip:
            return False
        self._skip_until = 0.0
        return True

    def _timed_out(self, probe: bool) -> None:
        self._timeouts += 1
        if probe:  # still hung: the next skip twice as long
            self._skip_for = min(SKIP_MAX_S, 2 * self._skip_for)
        elif self._skip_for or self._timeouts < HUNG_AFTER:
            return  # skipping already (a call begun before), or one slow call so far
        else:
            self._skip_for = SKIP_FIRST_S
        self._skip_until = self._clock() + self._skip_for
        self._answers_at_skip = self._store.answers

    async def claim(self, endpoint: str, message_id: str, owner: str) -> ClaimResult:
        key = self.key(endpoint, message_id)
        try:
            state, seconds = await self._ask(
                lambda: self._store.claim(key, owner, self._claim_ms))
        except SharedStateUnavailable as exc:
            held = self._busy.get(key, 0.0) - self._clock()
            if (exc.skipped or exc.timed_out) and held > 0 and self._holding.get(key) != owner:
                # A claim live when last asked, not this owner's, is still waited out: not
                # ours to send because Redis hangs, whether this call was skipped or timed
                # out itself (the calls under way as it froze sent over it ~0.1 s after
                # the freeze, review "redis42"), or is a copy's first ask. Its holder on
                # this replica sends (it waited out its own claim; review "diff42").
                return ClaimResult(Outcome.BUSY, retry_after_s=max(self._busy_min, held))
            log.warning("deduplication skipped (%s): delivering at least once", exc)
            return ClaimResult(Outcome.SEND, degraded=True)
        if state == "busy":
            if len(self._busy) >= self._busy_cap:
                now = self._clock()
                self._busy, self._busy_cap = _pruned(self._busy, lambda _key, end: end > now)
            self._busy[key] = self._clock() + seconds
            if self._holding.get(key) == owner:  # its claim ended, another took the key
                del self._holding[key]
            return ClaimResult(Outcome.BUSY, retry_after_s=max(self._busy_min, seconds))
        if state == "duplicate":
            self._busy.pop(key, None)
            self._holding.pop(key, None)
            return ClaimResult(Outcome.DUPLICATE)
        if key in self._busy:  # others wait for it: this owner's claim, renewed
            self._busy[key] = self._clock() + self._claim_ms / 1000
        if len(self._holding) >= self._holding_cap:
            busy = self._busy
            self._holding, self._holding_cap = _pruned(self._holding,
                                                       lambda held, _owner: held in busy)
        self._holding[key] = owner
        return ClaimResult(Outcome.SEND)

    async def confirm(self, endpoint: str, message_id: str) -> bool:
        """Record the delivery; False when Redis failed (a later re-read may re-send)."""
        try:
            key = self.key(endpoint, message_id)
            self._holding.pop(key, None)
            await self._ask(lambda: self._store.confirm(key, self._ttl_ms))
        except SharedStateUnavailable as exc:
            log.warning("delivered but not recorded (%s): a re-read may send it again", exc)
            return False
        return True

    async def progress(self, endpoint: str, message_id: str, note: str) -> bool:
        """Note which of the event's calls were accepted (`calls.CallPlan.progress_note`;
        kept for the record's TTL, cleared by the confirm); False when Redis failed."""
        try:
            key = self.key(endpoint, message_id)
            await self._ask(lambda: self._store.progress(key, note, self._ttl_ms))
        except SharedStateUnavailable as exc:
            log.warning("progress not recorded (%s): a re-read may send its first call "
                        "again", exc)
            return False
        return True

    async def progress_of(self, endpoint: str, message_id: str) -> str | None:
        """The note of the calls an earlier owner got accepted (None: none, or Redis
        failed: then every call is sent)."""
        try:
            key = self.key(endpoint, message_id)
            return await self._ask(lambda: self._store.progress_of(key))
        except SharedStateUnavailable:
            return None

    async def user_known(self, user_id: str, ttl_s: float) -> float | None:
        """Seconds a replica may still trust that some replica (or this one before a
        restart) identified ``user_id`` (`note_user`): what is left of that identify's
        ``ttl_s`` (USERPILOT_ENSURE_USER_TTL_SECONDS now), or None when there is none, or
        Redis failed (the identify is sent).

        Counted from when the record was written, by the TTL it holds: a record written
        under a longer TTL than today's was trusted for what was left of the old one, so
        lowering the setting did nothing for up to the old value (review "users41"). A
        record written without one (before this) is trusted for at most ``ttl_s``."""
        try:
            return await self.user_record(user_id, ttl_s)
        except SharedStateUnavailable:
            return None

    async def user_record(self, user_id: str, ttl_s: float) -> float | None:
        """`user_known`, raising SharedStateUnavailable when Redis cannot say (the caller
        then decides: `Handler` trusts what Redis said last)."""
        key = user_key(self._digest, user_id)
        found = await self._ask(lambda: self._store.mark_left(key))
        if found is None:
            return None
        written_ms, left_ms = found
        ttl_ms = ttl_s * 1000
        trust_ms = (min(left_ms, ttl_ms) if written_ms is None
                    else min(left_ms, ttl_ms - (written_ms - left_ms)))
        # A record about to end is as good as none: trusted for the few milliseconds left,
        # the user's next call would ask again at once.
        return None if trust_ms < 1000 else trust_ms / 1000

    async def note_user(self, user_id: str, ttl_s: float) -> bool:
        """Record that Userpilot accepted an identify of ``user_id``, for ``ttl_s``
        (USERPILOT_ENSURE_USER_TTL_SECONDS); False when Redis failed (the other replicas
        then identify the user themselves, once each)."""
        try:
            key = user_key(self._digest, user_id)
            ttl_ms = max(1, round(ttl_s * 1000))
            await self._ask(lambda: self._store.mark(key, ttl_ms))
        except SharedStateUnavailable as exc:
            log.warning("identified user not recorded (%s): other replicas identify it "
                        "again", exc)
            return False
        return True

    async def release(self, endpoint: str, message_id: str, owner: str) -> bool:
        """Drop our claim after a definite failure; False when Redis failed (it expires)."""
        try:
            key = self.key(endpoint, message_id)
            if self._holding.get(key) == owner:
                del self._holding[key]
            await self._ask(lambda: self._store.release(key, owner))
        except SharedStateUnavailable:
            return False
        return True
