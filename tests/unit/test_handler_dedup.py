"""The handler's messageId deduplication, through the worker loop over in-memory fakes:
claim before the request, confirm after the 2xx, release on dead-letter and abandonment,
duplicates finished without a request, Redis down delivers unchecked."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from consumer import codec
from consumer.calls import FAMILIES, Call
from consumer.dedup import Deduplicator
from consumer.errors import RateLimited, Rejected, ServerError, SharedStateUnavailable
from consumer.handler import Event
from consumer.health import Health
from consumer.metrics import Metrics
from consumer.ratelimit import AdaptiveLimiter
from consumer.redisstore import token_digest
from consumer.sharedstate import SharedState
from consumer.worker import Callbacks, Worker
from tests.unit.test_dedup import MemoryStore, State
from tests.unit.test_worker import (
    SCHEMA_ID,
    TOPIC,
    FakeClient,
    FakeDlq,
    FakeRegistry,
    FakeSource,
    Message,
    Run,
    codec_seq,
    drive,
    log_of,
    settings,
    track,
    until,
)

DIGEST = token_digest("wt_0123456789abcdef")


def make(log: dict[tuple[str, int], list[Message]], store: MemoryStore,
         **env: str) -> tuple[Run, Metrics, Deduplicator]:
    metrics = Metrics(CollectorRegistry())
    client, dlq, registry = FakeClient(), FakeDlq(), FakeRegistry()
    made: list[FakeSource] = []

    def source(cb: Callbacks) -> FakeSource:
        made.append(FakeSource(cb, log))
        return made[-1]

    # Ensure-user off: these tests count the Track requests of repeated messageIds only.
    s = settings(**{"USERPILOT_ENSURE_USER": "false", **env})
    dedup = Deduplicator(store, DIGEST, busy_retry_min_s=0.01)
    shared = SharedState(limiters={family: AdaptiveLimiter(s.rate_limit, s.rate_period_s,
                                                           s.rate_burst)
                                   for family in FAMILIES}, dedup=dedup)
    worker = Worker(s, metrics, Health(metrics), client=client, registry=registry, dlq=dlq,
                    source=source, shared=shared)
    return Run(worker, client, dlq, registry, made), metrics, dedup


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def finished_to(offset: int) -> object:
    async def scenario(source: FakeSource) -> None:
        await until(lambda: source.committed().get((TOPIC, 0)) == offset, f"commit {offset}")
    return scenario


def test_a_repeated_message_id_is_sent_once_and_counted_as_duplicate() -> None:
    store = MemoryStore()
    run, metrics, dedup = make(log_of(track("u1", 1), track("u1", 2), track("u1", 1)), store)
    assert drive(run, finished_to(3)) == 0  # type: ignore[arg-type]
    assert [codec_seq(b) for b in run.client.bodies] == [1, 2]
    assert sample(metrics, "userpilot_duplicates_skipped_total", endpoint="track") == 1
    assert store.values[dedup.key("track", "u1-1")] == "d"
    assert store.values[dedup.key("track", "u1-2")] == "d"


def test_an_id_recorded_by_another_replica_costs_no_request() -> None:
    store = MemoryStore()
    store.values[dedup_key := Deduplicator(store, DIGEST).key("track", "u1-1")] = "d"
    run, metrics, _ = make(log_of(track("u1", 1)), store)
    assert drive(run, finished_to(1)) == 0  # type: ignore[arg-type]
    assert run.client.bodies == []
    assert store.values[dedup_key] == "d"
    assert sample(metrics, "userpilot_duplicates_skipped_total", endpoint="track") == 1


def test_dead_letter_releases_the_claim() -> None:
    store = MemoryStore()
    run, _, dedup = make(log_of(track("u1", 1)), store)
    run.client.answers[track_body(1)] = Rejected("bad", status=400)
    assert drive(run, finished_to(1)) == 0  # type: ignore[arg-type]
    assert run.dlq.reasons() == ["bad_request"]
    assert dedup.key("track", "u1-1") not in store.values


def test_events_without_message_id_are_sent_as_before() -> None:
    store = MemoryStore()
    run, metrics, _ = make(log_of(track("u1", 1, messageId=None),
                                  track("u1", 1, messageId=None)), store)
    assert drive(run, finished_to(2)) == 0  # type: ignore[arg-type]
    assert len(run.client.bodies) == 2
    assert store.values == {}
    assert sample(metrics, "userpilot_duplicates_skipped_total", endpoint="track") == 0


def test_blank_message_ids_are_no_ids_not_one_shared_id() -> None:
    """" " was a dedup key like any other: every blank-id event after the first was
    skipped as its duplicate. So was an id of invisible characters only."""
    store = MemoryStore()
    run, metrics, _ = make(log_of(track("u1", 1, messageId=" "), track("u1", 2, messageId=""),
                                  track("u1", 3, messageId=" "),
                                  track("u1", 4, messageId="\u200b"),
                                  track("u1", 5, messageId="\u200b")), store)
    assert drive(run, finished_to(5)) == 0  # type: ignore[arg-type]
    assert [codec_seq(b) for b in run.client.bodies] == [1, 2, 3, 4, 5]
    assert store.values == {}
    assert sample(metrics, "userpilot_duplicates_skipped_total", endpoint="track") == 0


def _with_raw_id(seq: int, raw_id: bytes) -> bytes:
    """A track whose messageId's Avro bytes are `raw_id` (invalid UTF-8 allowed)."""
    placeholder = "Q" * len(raw_id)
    wire = codec.encode(SCHEMA_ID, codec.to_record({
        "type": "track", "event": "Feature Used", "userId": f"u{seq}",
        "properties": {"seq": seq}, "context": {"consent": {"analytics": True}},
        "timestamp": "2026-11-26T10:00:00.000Z", "messageId": placeholder}))
    assert wire.count(placeholder.encode()) == 1
    return wire.replace(placeholder.encode(), raw_id)


def test_ids_cut_inside_a_character_are_no_ids_not_one_shared_id() -> None:
    """Invalid UTF-8 reads as U+FFFD: two ids cut inside different characters were one
    dedup key, and the second event was skipped as the first's duplicate (review
    "redis42")."""
    store = MemoryStore()
    run, metrics, _ = make(log_of(_with_raw_id(1, b"order-\xe2\x82"),
                                  _with_raw_id(2, b"order-\xe2\x84"), key=b"k"), store)
    assert drive(run, finished_to(2)) == 0  # type: ignore[arg-type]
    assert sorted(codec_seq(b) for b in run.client.bodies) == [1, 2]
    assert sample(metrics, "userpilot_duplicates_skipped_total", endpoint="track") == 0
    assert store.values == {}  # no key for either
    # ... and its log lines still show the id as read (review "diff42")
    event = Event("t", 0, 0, "k", b"k", _with_raw_id(1, b"order-\xe2\x82"), None, None)
    assert run.worker.handler.decide(event)
    assert event.cut_id and event.fields["message_id"] == "order-\ufffd"


def test_redis_down_delivers_every_event_unchecked() -> None:
    store = MemoryStore(fail=True)
    run, metrics, _ = make(log_of(track("u1", 1), track("u1", 1)), store)
    assert drive(run, finished_to(2)) == 0  # type: ignore[arg-type]
    assert len(run.client.bodies) == 2
    assert sample(metrics, "userpilot_dedup_unchecked_total", endpoint="track") == 2


def test_unchecked_counts_events_delivered_not_events_refused() -> None:
    """Review "metrics46": the count is of events delivered without the check (README,
    the metric's help); one Userpilot then refused (400) was counted too."""
    store = MemoryStore(fail=True)
    run, metrics, _ = make(log_of(track("u1", 1), track("u1", 2)), store)
    run.client.answers[track_body(1)] = Rejected("bad", status=400)
    assert drive(run, finished_to(2)) == 0  # type: ignore[arg-type]
    assert run.dlq.reasons() == ["bad_request"]
    assert sample(metrics, "userpilot_dedup_unchecked_total", endpoint="track") == 1


class Handover(MemoryStore):
    """Another owner holds the claim; it confirms (or releases) on the third look."""

    def __init__(self, key: str, then: str | None) -> None:
        super().__init__()
        self.values[key] = "c:other"
        self.key, self.then, self.looks = key, then, 0

    async def claim(self, key: str, owner: str, ttl_ms: int) -> tuple[State, float]:
        if key == self.key and self.values.get(key) == "c:other":
            self.looks += 1
            if self.looks >= 3:
                if self.then is None:
                    del self.values[key]
                else:
                    self.values[key] = self.then
        state, _ = await super().claim(key, owner, ttl_ms)
        return state, 0.02


def test_busy_waits_for_the_other_owner_then_finishes_as_duplicate() -> None:
    store = Handover(Deduplicator(MemoryStore(), DIGEST).key("track", "u1-1"), "d")
    run, metrics, _ = make(log_of(track("u1", 1)), store)
    assert drive(run, finished_to(1)) == 0  # type: ignore[arg-type]
    assert run.client.bodies == [] and store.looks >= 3
    assert sample(metrics, "userpilot_duplicates_skipped_total", endpoint="track") == 1


def test_busy_waits_for_the_other_owner_then_sends_when_released() -> None:
    store = Handover(Deduplicator(MemoryStore(), DIGEST).key("track", "u1-1"), None)
    run, _, _ = make(log_of(track("u1", 1)), store)
    assert drive(run, finished_to(1)) == 0  # type: ignore[arg-type]
    assert [codec_seq(b) for b in run.client.bodies] == [1]


class HeldThenConfirmed(MemoryStore):
    """Another owner's claim with a long TTL left (25 s, the default's), confirmed as
    delivered `after` seconds in; `own_first`: this owner's first claim succeeds and the
    other takes the key over before the claim renewed right before the request."""

    def __init__(self, key: str, after: float, own_first: bool = False) -> None:
        super().__init__()
        self.key, self.after, self.own_first = key, after, own_first
        self.confirm_at: float | None = None
        self.looks = 0
        if not own_first:
            self.values[key] = "c:other"

    async def claim(self, key: str, owner: str, ttl_ms: int) -> tuple[State, float]:
        if key != self.key:
            return await super().claim(key, owner, ttl_ms)
        now = asyncio.get_running_loop().time()
        if self.own_first and self.confirm_at is None:
            self.confirm_at = now + self.after
            self.values[key] = "c:other"  # taken over once this first claim is answered
            return "claimed", 0.0
        if self.confirm_at is None:
            self.confirm_at = now + self.after
        self.looks += 1
        if now >= self.confirm_at:
            self.values[key] = "d"
            return "duplicate", 0.0
        return "busy", 25.0


def test_a_claim_confirmed_soon_is_seen_soon_not_at_its_end() -> None:
    """Two copies of one messageId in flight at once (e.g. two partitions): the copy that
    lost the claim slept the claim's whole TTL, 25 s, with its user's later events behind
    it, although the winner confirmed within milliseconds (review "redis25")."""
    for own_first in (False, True):  # the claim before the limiter, the one before the send
        store = HeldThenConfirmed(Deduplicator(MemoryStore(), DIGEST).key("track", "u1-1"),
                                  0.3, own_first)
        run, metrics, _ = make(log_of(track("u1", 1), track("u1", 2)), store)

        async def scenario(source: FakeSource) -> None:
            await until(lambda: source.committed().get((TOPIC, 0)) == 2,
                        "both events finished well before the claim's end", timeout=6.0)

        assert drive(run, scenario) == 0
        assert [codec_seq(b) for b in run.client.bodies] == [2], own_first
        assert sample(metrics, "userpilot_duplicates_skipped_total", endpoint="track") == 1
        assert 2 <= store.looks <= 12, f"asked {store.looks} times in 0.3 s"


def test_owner_is_unique_per_process_and_record() -> None:
    store = MemoryStore()
    log = {(TOPIC, 0): [Message(TOPIC, 0, 0, b"a", track("a", 1)),
                        Message(TOPIC, 0, 1, b"b", track("b", 1))]}
    run, _, dedup = make(log, store)
    owners: list[str] = []
    real_claim = store.claim

    async def claim(key: str, owner: str, ttl_ms: int) -> tuple[State, float]:
        owners.append(owner)
        return await real_claim(key, owner, ttl_ms)

    store.claim = claim  # type: ignore[method-assign]
    assert drive(run, finished_to(2)) == 0  # type: ignore[arg-type]
    instance = run.worker.handler.instance
    assert set(owners) == {f"{instance}/{TOPIC}/0/0", f"{instance}/{TOPIC}/0/1"}
    # Claimed before the limiter and renewed before the request: two claims per event.
    assert len(owners) == 4
    other = Worker(settings(), Metrics(CollectorRegistry()),
                   Health(Metrics(CollectorRegistry())), client=FakeClient(),
                   registry=FakeRegistry(), dlq=FakeDlq(), source=lambda cb: FakeSource(cb, {}))
    assert other.handler.instance != instance
    assert dedup.key("track", "a-1") in store.values


def test_shutdown_releases_claims_of_events_not_sent_yet() -> None:
    # One request per minute: the first event is sent, the second waits for the limiter
    # holding its claim; shutdown abandons it and must hand the claim on.
    store = MemoryStore()
    log = {(TOPIC, 0): [Message(TOPIC, 0, 0, b"a", track("a", 1)),
                        Message(TOPIC, 0, 1, b"b", track("b", 1))]}
    run, _, dedup = make(log, store, USERPILOT_RATE_LIMIT="1", USERPILOT_RATE_BURST="1",
                         USERPILOT_RATE_PERIOD_SECONDS="60")

    # Either event may take the one slot: users a and b are separate chains, and which
    # one's schema fetch (a thread) returns first is up to the machine.
    waiting: list[str] = []

    async def scenario(source: FakeSource) -> None:
        await until(lambda: len(run.client.bodies) == 1, "the first request")
        sent = json.loads(run.client.bodies[0])["user_id"]
        waiting.append("b-1" if sent == "a" else "a-1")
        await until(lambda: store.values.get(dedup.key("track", waiting[0]), "")
                    .startswith("c:"), "the other event's claim")
        await asyncio.sleep(0.05)

    assert drive(run, scenario) == 0
    assert len(run.client.bodies) == 1
    assert dedup.key("track", waiting[0]) not in store.values, "abandoned claim released"
    delivered = "a-1" if waiting[0] == "b-1" else "b-1"
    assert store.values[dedup.key("track", delivered)] == "d"


def track_body(seq: int) -> bytes:
    """The body the mapping makes of `track("u1", seq)` (the FakeClient keys answers by it)."""
    from consumer import codec
    from consumer.routing import Send, route
    s = settings()
    decision = route(codec.decode(track("u1", seq), lambda _: codec.SCHEMA), s.consent,
                     s.mappings)
    assert isinstance(decision, Send)
    json.loads(decision.body)
    return decision.body


class SlowConfirm(MemoryStore):
    """The confirm takes a while (a slow Redis round trip); `confirming` is set meanwhile."""

    def __init__(self) -> None:
        super().__init__()
        self.confirming = False
        self.confirm_s = 0.3

    async def confirm(self, key: str, ttl_ms: int) -> None:
        self.confirming = True
        await asyncio.sleep(self.confirm_s)
        await super().confirm(key, ttl_ms)


def test_shutdown_during_the_confirm_waits_for_it_and_finishes_the_event() -> None:
    store = SlowConfirm()
    run, _, dedup = make(log_of(track("u1", 1)), store)

    async def scenario(source: FakeSource) -> None:
        await until(lambda: store.confirming, "the confirm under way")

    assert drive(run, scenario) == 0  # stop() arrives while the confirm runs
    assert store.values[dedup.key("track", "u1-1")] == "d"
    assert run.worker.committed == {(TOPIC, 0): 1}


def test_a_confirm_cut_by_the_grace_is_not_called_a_dead_letter(
        caplog: pytest.LogCaptureFixture) -> None:
    """Review "limits57": a Redis call still out when the grace ended was counted as a dead
    letter "cut on its way to the DLQ (... the DLQ may hold them twice)" at a shutdown that
    had no dead letter at all."""
    store = SlowConfirm()
    store.confirm_s = 10.0
    run, _, _ = make(log_of(track("u1", 1)), store, WORKER_SHUTDOWN_GRACE_SECONDS="0.5")

    async def scenario(source: FakeSource) -> None:
        await until(lambda: store.confirming, "the confirm under way")

    with caplog.at_level(logging.WARNING, logger="consumer.worker"):
        assert drive(run, scenario) == 0
    assert not run.dlq.records
    assert "dead letters cut" not in caplog.text
    assert "shutdown: 1 requests cut on the wire" in caplog.text


def test_a_group_is_recorded_under_company_identify_not_its_associations_identify() -> None:
    """A group with a userId was recorded under "identify" (its last call): an identify
    event with the same messageId made the group a duplicate, skipped unsent."""
    from consumer import codec
    from tests.unit.test_worker import SCHEMA_ID

    def encoded(**event: object) -> bytes:
        base = {"context": {"consent": {"analytics": True}}, "messageId": "m-1",
                "timestamp": "2026-11-26T10:00:00.000Z", **event}
        return codec.encode(SCHEMA_ID, codec.to_record(base))

    store = MemoryStore()
    run, _, _ = make(log_of(
        encoded(type="identify", userId="u1", traits={"email": "a@b.c"}),
        encoded(type="group", userId="u1", groupId="acme", traits={"name": "Acme"})), store)
    assert drive(run, finished_to(2)) == 0  # type: ignore[arg-type]
    assert [c.path for c in run.client.calls] == [
        "/v1/identify", "/v1/companies/identify", "/v1/identify"]
    assert sorted(k.split(":")[1] for k in store.values) == ["company_identify", "identify"]


class SlowClaim(MemoryStore):
    """The claim lands in Redis, and its answer takes a while (a slow round trip)."""

    def __init__(self) -> None:
        super().__init__()
        self.claiming = False

    async def claim(self, key: str, owner: str, ttl_ms: int) -> tuple[State, float]:
        answer = await super().claim(key, owner, ttl_ms)
        self.claiming = True
        await asyncio.sleep(0.3)
        return answer


def test_a_drain_that_cuts_a_claim_short_releases_it() -> None:
    """A drain cancelled the event while its claim's answer was in transit: the claim had
    landed, the event did not know it held it, and the next owner waited the claim's TTL
    (25 s by default) for that messageId, its partition's offset held meanwhile."""
    store = SlowClaim()
    run, _, dedup = make(log_of(track("u1", 1)), store)

    async def scenario(source: FakeSource) -> None:
        await until(lambda: store.claiming, "the claim under way")

    assert drive(run, scenario) == 0  # stop() arrives while the claim's answer is awaited
    assert run.client.bodies == []
    assert dedup.key("track", "u1-1") not in store.values, "the cut claim was released"


def test_every_request_of_an_event_renews_its_claim_first() -> None:
    """A group event sends the company identify (the endpoint its id is recorded under)
    and then the association. Only the last call renewed the claim: after a wait for its
    slot longer than the claim's TTL, the company identify went out while another owner
    of the same messageId, holding the lapsed claim, sent it too."""
    event = {
        "type": "group", "userId": "u1", "groupId": "acme", "anonymousId": "anon-1",
        "traits": {"name": "Acme"}, "context": {"consent": {"analytics": True}},
        "timestamp": "2026-11-26T10:00:00.000Z", "messageId": "g-1",
    }
    store = MemoryStore()
    run, _, dedup = make(log_of(codec.encode(SCHEMA_ID, codec.to_record(event))), store)
    steps: list[str] = []
    real_claim, real_send = store.claim, run.client.send

    async def claim(key: str, owner: str, ttl_ms: int) -> tuple[State, float]:
        steps.append("claim")
        return await real_claim(key, owner, ttl_ms)

    async def send(call: Call) -> int:
        steps.append(call.endpoint)
        return await real_send(call)

    store.claim = claim  # type: ignore[method-assign]
    run.client.send = send  # type: ignore[method-assign]
    assert drive(run, finished_to(1)) == 0  # type: ignore[arg-type]
    # Claimed before the limiter, then renewed before each of the two requests.
    assert steps == ["claim", "claim", "company_identify", "claim", "identify"]
    assert store.values[dedup.key("company_identify", "g-1")] == "d"


class Blip(MemoryStore):
    """Redis unreachable for the first `failures` claims only (a short blip)."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def claim(self, key: str, owner: str, ttl_ms: int) -> tuple[State, float]:
        if self.failures:
            self.failures -= 1
            self._check_blip()
        return await super().claim(key, owner, ttl_ms)

    @staticmethod
    def _check_blip() -> None:
        raise SharedStateUnavailable("redis claim failed: TimeoutError")


def test_an_intake_claim_cut_by_a_blip_is_asked_again_before_the_request() -> None:
    """Review redis18: the intake's claim failed in a short blip; without an owner the
    event skipped the claim before its request and its confirm after, and went out
    unchecked seconds later, Redis answering and holding its messageId as delivered."""
    store = Blip(failures=1)
    store.values[Deduplicator(store, DIGEST).key("track", "u1-1")] = "d"  # delivered before
    run, metrics, _ = make(log_of(track("u1", 1)), store)
    assert drive(run, finished_to(1)) == 0  # type: ignore[arg-type]
    assert run.client.bodies == []
    assert sample(metrics, "userpilot_duplicates_skipped_total", endpoint="track") == 1
    assert sample(metrics, "userpilot_dedup_unchecked_total", endpoint="track") == 0


def test_an_event_claimed_after_a_blip_is_recorded_when_delivered() -> None:
    store = Blip(failures=1)
    run, metrics, _ = make(log_of(track("u1", 1)), store)
    assert drive(run, finished_to(1)) == 0  # type: ignore[arg-type]
    assert len(run.client.bodies) == 1
    assert store.values == {Deduplicator(store, DIGEST).key("track", "u1-1"): "d"}
    assert sample(metrics, "userpilot_dedup_unchecked_total", endpoint="track") == 0


def _group(message_id: str, user: str = "u1", company: str = "acme",
           name: str = "Acme") -> bytes:
    from consumer import codec
    from tests.unit.test_worker import SCHEMA_ID

    return codec.encode(SCHEMA_ID, codec.to_record({
        "type": "group", "userId": user, "groupId": company, "traits": {"name": name},
        "context": {"consent": {"analytics": True}}, "messageId": message_id,
        "timestamp": "2026-11-26T10:00:00.000Z"}))


def _refusing_associations(run: Run) -> None:
    """The sandbox refuses every association (an identify) for good: dead-lettered."""
    original_send = run.client.send

    async def send(call: Call) -> int:
        if call.path == "/v1/identify":
            run.client.calls.append(call)
            raise Rejected("refused", status=400)
        return await original_send(call)

    run.client.send = send  # type: ignore[method-assign]


def test_a_group_re_read_after_its_company_identify_sends_only_its_association() -> None:
    """Review scale23: a replica killed (or a partition lost) between a group's company
    identify and its association left the next owner to send the company identify again.
    The accepted calls are noted beside the claim; the next owner resumes after them."""
    from consumer.redisstore import progress_key

    store = MemoryStore()
    run, metrics, dedup = make(log_of(_group("g-1")), store)
    key = dedup.key("company_identify", "g-1")
    # The association fails for good: the event is dead-lettered, its claim released, and
    # the company identify's acceptance stays noted.
    _refusing_associations(run)
    assert drive(run, finished_to(1)) == 0  # type: ignore[arg-type]
    assert [c.path for c in run.client.calls] == ["/v1/companies/identify", "/v1/identify"]
    assert key not in store.values and store.values[progress_key(key)].startswith("1:")

    again, metrics, _ = make(log_of(_group("g-1")), store)
    assert drive(again, finished_to(1)) == 0  # type: ignore[arg-type]
    assert [c.path for c in again.client.calls] == ["/v1/identify"]
    assert sample(metrics, "userpilot_duplicates_skipped_total",
                  endpoint="company_identify") == 1
    assert store.values[key] == "d" and progress_key(key) not in store.values, \
        "the confirm clears the note"


def test_the_same_message_id_with_other_content_sends_every_call() -> None:
    """Review diff24: the note held a count only, so a corrected event reusing the
    messageId (another user and company), or a replay after the mappings changed what the
    company identify carries, skipped a company identify never sent with its content."""
    store = MemoryStore()
    run, _, _ = make(log_of(_group("g-3", user="bad", company="c1")), store)
    _refusing_associations(run)
    assert drive(run, finished_to(1)) == 0  # type: ignore[arg-type]

    for changed in (_group("g-3", user="good", company="c2"),
                    _group("g-3", user="bad", company="c1", name="Acme Inc")):
        again, metrics, _ = make(log_of(changed), store)
        _refusing_associations(again)
        assert drive(again, finished_to(1)) == 0  # type: ignore[arg-type]
        assert [c.path for c in again.client.calls] == [
            "/v1/companies/identify", "/v1/identify"], changed
        assert sample(metrics, "userpilot_duplicates_skipped_total",
                      endpoint="company_identify") == 0


def test_a_note_is_never_another_message_ids_claim() -> None:
    """Review diff24: the note of messageId M sat at the claim key of messageId "M|n",
    whose event then waited a day for a "claim" that was M's note."""
    from consumer.redisstore import progress_key

    store = MemoryStore()
    run, _, dedup = make(log_of(_group("M")), store)
    _refusing_associations(run)
    assert drive(run, finished_to(1)) == 0  # type: ignore[arg-type]
    note = progress_key(dedup.key("company_identify", "M"))
    assert note in store.values and note.startswith("ud:n:")
    for mid in ("M|n", "n:M", note.removeprefix("ud:").split(":", 2)[-1]):
        assert dedup.key("company_identify", mid) != note
        assert dedup.key("track", mid) != note and dedup.key("identify", mid) != note
    other, _, _ = make(log_of(_group("M|n")), store)
    assert drive(other, finished_to(1)) == 0  # type: ignore[arg-type]
    assert [c.path for c in other.client.calls] == [
        "/v1/companies/identify", "/v1/identify"]


def test_a_group_sent_whole_leaves_no_progress_note_and_single_calls_write_none() -> None:
    store = MemoryStore()
    writes: list[tuple[str, str]] = []
    real = store.progress

    async def progress(key: str, note: str, ttl_ms: int) -> None:
        writes.append((key.split(":")[1], note.partition(":")[0]))
        await real(key, note, ttl_ms)

    store.progress = progress  # type: ignore[method-assign]
    run, _, _ = make(log_of(_group("g-2"), track("u1", 1)), store)
    assert drive(run, finished_to(2)) == 0  # type: ignore[arg-type]
    assert [c.path for c in run.client.calls] == [
        "/v1/companies/identify", "/v1/identify", "/v1/track"]
    assert writes == [("company_identify", "1")]
    assert not [k for k in store.values if k.startswith("ud:n:")]


def test_a_user_another_replica_identified_is_not_identified_again() -> None:
    """Ensure-user shared through Redis: a restart or a rolling deploy sent one identify per
    active user again, each taking the identify budget's slot in front of its Tracks."""
    store = MemoryStore()
    first, m1, _ = make(log_of(track("u1", 1)), store, USERPILOT_ENSURE_USER="true")
    assert drive(first, finished_to(1)) == 0  # type: ignore[arg-type]
    assert [c.purpose for c in first.client.calls] == ["ensure_user", "track"]
    assert sample(m1, "userpilot_ensure_user_shared_total") == 0
    # Another replica (or this one restarted, its own record empty): the Track goes alone.
    second, m2, _ = make(log_of(track("u1", 2), track("u2", 3)), store,
                         USERPILOT_ENSURE_USER="true")
    assert drive(second, finished_to(2)) == 0  # type: ignore[arg-type]
    assert [(c.purpose, c.user_id or json.loads(c.body)["user_id"])
            for c in second.client.calls] == [
        ("track", "u1"), ("ensure_user", "u2"), ("track", "u2")]
    assert sample(m2, "userpilot_ensure_user_shared_total") == 1
    assert sample(m2, "userpilot_ensure_user_identify_total") == 1


def test_redis_down_sends_the_ensure_user_identify_as_without_it() -> None:
    store = MemoryStore()
    first, _, _ = make(log_of(track("u1", 1)), store, USERPILOT_ENSURE_USER="true")
    assert drive(first, finished_to(1)) == 0  # type: ignore[arg-type]
    store.fail = True
    second, m2, _ = make(log_of(track("u1", 2)), store, USERPILOT_ENSURE_USER="true")
    assert drive(second, finished_to(1)) == 0  # type: ignore[arg-type]
    assert [c.purpose for c in second.client.calls] == ["ensure_user", "track"]
    assert sample(m2, "userpilot_ensure_user_shared_total") == 0


def test_a_failed_identify_is_not_shared() -> None:
    store = MemoryStore()
    run, _, _ = make(log_of(track("u1", 1)), store, USERPILOT_ENSURE_USER="true")
    bare = json.dumps({"user_id": "u1", "metadata": {}}, separators=(",", ":")).encode()
    run.client.answers[bare] = Rejected("bad", status=400)
    assert drive(run, finished_to(1)) == 0  # type: ignore[arg-type]
    assert run.dlq.reasons() == ["bad_request"]
    assert not any(key.startswith("ud:user:") for key in store.values)


def test_a_user_known_from_redis_is_trusted_only_for_what_is_left_of_its_ttl() -> None:
    """Review diff35: remembered as identified now, a user another replica identified up to
    a TTL ago was trusted for up to twice USERPILOT_ENSURE_USER_TTL_SECONDS."""
    import time

    from consumer.dedup import user_key

    store = MemoryStore()
    store.values[user_key(DIGEST, "u1")] = "1 ttl=1000"  # identified 99 s ago, 1 s left
    run, _, _ = make(log_of(track("u1", 1)), store, USERPILOT_ENSURE_USER="true",
                           USERPILOT_ENSURE_USER_TTL_SECONDS="100")
    assert drive(run, finished_to(1)) == 0  # type: ignore[arg-type]
    assert [c.purpose for c in run.client.calls] == ["track"]
    known = run.worker.handler.known
    assert known is not None
    age = time.monotonic() - known._users["u1"]
    assert 98.0 <= age <= 100.0, age


def _calls_for_a_track_a_minute_after_one_learned_from_redis(
        then: Callable[[MemoryStore], None]) -> list[str]:
    """A Track of a user another replica identified (its Redis record), `then` done to the
    store a minute and a second later, and another Track: the calls sent."""
    from consumer.dedup import user_key
    from consumer.handler import SHARED_RECHECK_S

    store = MemoryStore()
    store.values[user_key(DIGEST, "u1")] = "86400000 ttl=86000000"  # another replica's
    log = log_of(track("u1", 1))
    run, _, _ = make(log, store, USERPILOT_ENSURE_USER="true")

    async def scenario(source: Any) -> None:
        await until(lambda: source.committed().get((TOPIC, 0)) == 1, "commit 1")
        known = run.worker.handler.known
        assert known is not None
        known._users["u1"] -= SHARED_RECHECK_S + 1  # a minute and a second later
        then(store)
        log[(TOPIC, 0)].append(Message(TOPIC, 0, 1, b"user", track("u1", 2)))
        await until(lambda: source.committed().get((TOPIC, 0)) == 2, "commit 2")

    assert drive(run, scenario) == 0
    return [c.purpose for c in run.client.calls]


def test_a_user_learned_from_redis_is_asked_again_after_a_minute() -> None:
    """Review users41: trusted for the rest of its TTL, a user `delete-users` removed from
    the shared record got Tracks attributed to no one for up to a day from every replica
    that had learned it from Redis. Now asked again after SHARED_RECHECK_S."""
    from consumer.dedup import user_key

    def delete_users(store: MemoryStore) -> None:
        del store.values[user_key(DIGEST, "u1")]  # what delete-users does

    assert _calls_for_a_track_a_minute_after_one_learned_from_redis(delete_users) == [
        "track", "ensure_user", "track"]


def test_a_lowered_ensure_user_ttl_counts_from_the_shared_identify() -> None:
    """Review users41: a user identified two hours ago under a day's TTL was trusted with
    the setting lowered to 60 s."""
    from consumer.dedup import user_key

    store = MemoryStore()
    store.values[user_key(DIGEST, "u1")] = f"86400000 ttl={22 * 3600 * 1000}"
    run, _, _ = make(log_of(track("u1", 1)), store, USERPILOT_ENSURE_USER="true",
                     USERPILOT_ENSURE_USER_TTL_SECONDS="60")
    assert drive(run, finished_to(1)) == 0  # type: ignore[arg-type]
    assert [c.purpose for c in run.client.calls] == ["ensure_user", "track"]


def test_a_user_learned_from_redis_stays_trusted_while_redis_cannot_be_read() -> None:
    """Review diff41: asked again after a minute, a user learned from Redis was identified
    again whenever Redis could not answer (a failover): one identify per active user in
    front of its Tracks. What Redis said last holds until that record would end."""

    def failing(store: MemoryStore) -> None:
        store.fail = True  # Redis cannot be read

    assert _calls_for_a_track_a_minute_after_one_learned_from_redis(failing) == [
        "track", "track"]


def _resent(exc: RateLimited) -> RateLimited:
    exc.resent = True
    return exc


@pytest.mark.parametrize(("answer", "kept"), [
    (RateLimited("HTTP 429", status=429, retry_after=30.0), False),
    (ServerError("HTTP 503", status=503, retry_after=30.0), True),
    (_resent(RateLimited("HTTP 429", status=429, retry_after=30.0)), True),
], ids=["429", "503", "429-to-a-resend"])
def test_a_claim_is_kept_at_a_stop_only_if_userpilot_may_have_taken_a_request(
        answer: Exception, kept: bool) -> None:
    """Review "extremes54": an event answered 429 (Userpilot did not take it) and abandoned
    at a stop kept its claim, and the next owner waited out the claim's lifetime (10
    minutes at the longest request timeout) with no line. A 4xx says the request was not
    taken; a 5xx may come after Userpilot took it (a gateway's), so that claim is kept; so
    is one whose 429 answered a resend: the request the lost connection carried may have
    been taken (review "r54")."""
    store = MemoryStore()
    log = {(TOPIC, 0): [Message(TOPIC, 0, 0, b"u1", track("u1", 1))]}
    run, _, dedup = make(log, store)
    run.client.answers[track_body(1)] = answer

    async def scenario(source: FakeSource) -> None:
        await until(lambda: len(run.client.bodies) >= 1, "the refused request")
        await asyncio.sleep(0.05)

    assert drive(run, scenario) == 0
    assert (dedup.key("track", "u1-1") in store.values) is kept


class LapsedThenOther(MemoryStore):
    """The owner's claim lapses before its request (another owner took the key at its
    renewal); on the `looks`-th look that owner confirms (`then` "d") or releases (None)."""

    def __init__(self, then: str | None, looks: int = 3) -> None:
        super().__init__()
        self.then, self.looks_needed = then, looks
        self.claims: dict[str, int] = {}
        self.looks = 0

    async def claim(self, key: str, owner: str, ttl_ms: int) -> tuple[State, float]:
        n = self.claims[key] = self.claims.get(key, 0) + 1
        if n == 2:  # the renewal before the request: lapsed, another owner took it
            self.values[key] = "c:other"
        if self.values.get(key) == "c:other":
            self.looks += 1
            if self.looks >= self.looks_needed:
                if self.then is None:
                    del self.values[key]
                else:
                    self.values[key] = self.then
        state, _ = await super().claim(key, owner, ttl_ms)
        return state, 0.02


@pytest.mark.parametrize("connections", ["64", "1"])
def test_a_claim_lost_before_the_request_and_then_released_is_sent_once(
        connections: str) -> None:
    """Review "coverage60" (a branch no test ran): another owner takes the messageId between
    intake and the request, then lets it go. Each event is sent once and confirmed, no
    connection permit is given back twice, and one connection does not deadlock."""
    store = LapsedThenOther(None)
    run, _, dedup = make(log_of(track("u1", 1), track("u2", 2), track("u3", 3)), store,
                         USERPILOT_MAX_CONNECTIONS=connections)
    assert drive(run, finished_to(3)) == 0  # type: ignore[arg-type]
    assert sorted(codec_seq(b) for b in run.client.bodies) == [1, 2, 3]
    for user, seq in (("u1", 1), ("u2", 2), ("u3", 3)):
        assert store.values[dedup.key("track", f"{user}-{seq}")] == "d"


@pytest.mark.parametrize("connections", ["64", "1"])
def test_a_claim_lost_before_the_request_and_then_confirmed_is_a_duplicate(
        connections: str) -> None:
    """The same, the other owner delivering it: nothing is sent, both count duplicates."""
    store = LapsedThenOther("d")
    run, metrics, _ = make(log_of(track("u1", 1), track("u1", 2)), store,
                           USERPILOT_MAX_CONNECTIONS=connections)
    assert drive(run, finished_to(2)) == 0  # type: ignore[arg-type]
    assert run.client.bodies == []
    assert sample(metrics, "userpilot_duplicates_skipped_total", endpoint="track") == 2


class SlowIdentify(FakeClient):
    """Identify requests take `delay` s; the rest are answered at once."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay
        self.started: list[str] = []

    async def send(self, call: Call) -> int:
        self.started.append(call.path)
        if call.endpoint == "identify":
            await asyncio.sleep(self.delay)
        return await super().send(call)


def test_a_stop_during_a_tracks_ensure_user_identify_hands_its_claim_on() -> None:
    """Review "cancel60": cut while its ensure-user identify was on the wire (the Track
    itself never sent), the Track kept its messageId claim, and the next owner waited out
    its TTL for a Track nobody had sent. Only a request of the messageId's own keeps it."""
    store = MemoryStore()
    run, _, dedup = make(log_of(track("u1", 1)), store, USERPILOT_ENSURE_USER="true",
                         WORKER_SHUTDOWN_GRACE_SECONDS="0.2")
    client = SlowIdentify(2.0)
    run.worker.handler.client = client

    async def scenario(source: FakeSource) -> None:
        await until(lambda: client.started == ["/v1/identify"], "the identify on the wire")

    assert drive(run, scenario) == 0
    assert client.bodies == []  # no Track went out
    assert dedup.key("track", "u1-1") not in store.values, store.values
