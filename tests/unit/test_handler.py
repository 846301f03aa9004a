"""Unit tests for consumer.handler: an event's calls in order, ensure-user, limiters."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import random
import threading
import time
import types
from collections import Counter
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from consumer import codec
from consumer.calls import Call
from consumer.config import Settings, load_settings
from consumer.deadletter import DlqGuard
from consumer.delivery import UserpilotClient
from consumer.errors import DeadLetter, ProxyRefused, RateLimited, Rejected, ServerError
from consumer.filtering import Drop
from consumer.handler import (
    MAX_EVENT_AGE_S,
    DeadLettered,
    Delivered,
    Event,
    Handler,
    TrackClient,
    _event_age,
)
from consumer.metrics import Metrics
from consumer.policy import Gate, RetryPolicy
from consumer.routing import Send

SCHEMA_ID = 7
CONSENT = {"consent": {"analytics": True}}


def settings(**extra: str) -> Settings:
    env = {"USERPILOT_API_KEY": "wt_0123456789abcdef", "USERPILOT_RETRY_MAX_ATTEMPTS": "3",
           "USERPILOT_RETRY_BACKOFF_SECONDS": "0.001",
           "USERPILOT_RETRY_BACKOFF_MAX_SECONDS": "0.001", **extra}
    return load_settings(env, offline=True)


class Client:
    """Records every call; `fail` scripts exceptions per (path, user) in order."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.fail: dict[tuple[str, str], list[Exception]] = {}

    async def send(self, call: Call) -> int:
        body = json.loads(call.body)
        who = body.get("user_id") or body.get("company_id")
        errors = self.fail.get((call.path, who), [])
        if errors:
            raise errors.pop(0)
        self.sent.append((call.path, body))
        return 200 if call.endpoint == "company_identify" else 202

    async def aclose(self) -> None:
        return None


class Registry:
    evictions = 0

    def cached(self, schema_id: int) -> Mapping[str, Any] | None:
        return codec.SCHEMA

    def writer_schema(self, schema_id: int) -> Mapping[str, Any]:
        return codec.SCHEMA


class Dlq:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    async def send(self, topic: str, *, key: bytes | None, value: bytes | None,
                   headers: list[tuple[str, bytes | None]],
                   placement: bytes | None = None) -> None:
        self.sent.append({"key": key, "value": value, "headers": dict(headers)})

    def close(self, timeout_s: float = 10.0) -> int:
        return 0


class Limiter:
    def __init__(self) -> None:
        self.acquired = 0
        self.slowed = 0

    @property
    def rate(self) -> float:
        return 10.0 / (1 + self.slowed)

    @property
    def share_rate(self) -> float:
        return self.rate

    def set_share(self, share: float) -> None:
        return None

    def slow_down(self) -> None:
        self.slowed += 1

    async def acquire(self, want: int = 1) -> float:
        self.acquired += 1
        return 0.0


def handler_for(s: Settings, client: TrackClient
                ) -> tuple[Handler, Dlq, dict[str, Limiter], CollectorRegistry]:
    """A Handler on `client`, with fake DLQ, limiters and registry, and fast retries."""
    reg = CollectorRegistry()
    dlq = Dlq()
    limiters = {"track": Limiter(), "identify": Limiter()}
    policy = RetryPolicy(Gate(), max_attempts=s.retry_max_attempts, budget_s=60,
                         backoff_multiplier_s=0.001, backoff_max_s=0.001)
    handler = Handler(s, Metrics(reg), client=client, registry=Registry(), dlq=dlq,
                      limiters=limiters.__getitem__, policy=policy,
                      guard=DlqGuard(1.0, 100, 1000))
    return handler, dlq, limiters, reg


def make(**extra: str) -> tuple[Handler, Client, Dlq, dict[str, Limiter], CollectorRegistry]:
    client = Client()
    handler, dlq, limiters, reg = handler_for(settings(**extra), client)
    return handler, client, dlq, limiters, reg


def event(offset: int, **fields: Any) -> Event:
    doc = {"context": CONSENT, "messageId": f"m{offset}", **fields}
    value = codec.encode(SCHEMA_ID, codec.to_record(doc))
    key = str(fields.get("userId", "")).encode()
    return Event("t", 0, offset, key, key, value, [("trace", b"1")], 1)


def track(offset: int, user: str) -> Event:
    return event(offset, type="track", event="Feature Used", userId=user,
                 properties={"seq": offset})


def run(handler: Handler, *events: Event) -> list[Any]:
    async def main() -> list[Any]:
        return [await handler.handle(e) for e in events]
    return asyncio.run(main())


def metric(reg: CollectorRegistry, name: str, **labels: str) -> float:
    return reg.get_sample_value(name, labels) or 0.0


def test_ensure_user_identifies_once_before_a_users_first_track() -> None:
    handler, client, _, limiters, reg = make()
    outcomes = run(handler, track(0, "u1"), track(1, "u1"), track(2, "u2"))
    assert all(isinstance(o, Delivered) for o in outcomes)
    assert [(p, b.get("event_name", b)) for p, b in client.sent] == [
        ("/v1/identify", {"user_id": "u1", "metadata": {}}), ("/v1/track", "feature_used"),
        ("/v1/track", "feature_used"),
        ("/v1/identify", {"user_id": "u2", "metadata": {}}), ("/v1/track", "feature_used")]
    assert metric(reg, "userpilot_ensure_user_identify_total") == 2
    assert (limiters["identify"].acquired, limiters["track"].acquired) == (2, 3)
    assert metric(reg, "userpilot_responses_total", status="202", endpoint="identify") == 2
    assert metric(reg, "userpilot_responses_total", status="202", endpoint="track") == 3


class SlowIdentify(Client):
    """Userpilot holding every identify until `answer` is set; `fail` as Client's."""

    def __init__(self) -> None:
        super().__init__()
        self.answer = asyncio.Event()
        self.identifies = 0

    async def send(self, call: Call) -> int:
        if call.path == "/v1/identify":
            self.identifies += 1
            await self.answer.wait()
        return await super().send(call)


def _side_by_side(client: SlowIdentify, *events: Event) -> list[Any]:
    """`events` handled at once (a user's events on several partitions or topics), the
    identify answered once all of them had their turn to ask for it."""
    handler, _, _, reg = handler_for(settings(), client)

    async def main() -> list[Any]:
        tasks = [asyncio.create_task(handler.handle(e)) for e in events]
        for _ in range(50):
            await asyncio.sleep(0)
        client.answer.set()
        return list(await asyncio.gather(*tasks))
    outcomes = asyncio.run(main())
    assert metric(reg, "userpilot_ensure_user_identify_total") == client.sent.count(
        ("/v1/identify", {"user_id": "u1", "metadata": {}}))
    return outcomes


def test_a_users_events_side_by_side_send_one_ensure_user_identify() -> None:
    """Review "events31": a user's events on two topics (or a keyless producer's
    partitions) ran side by side, each decided "needs identify" before the first answer,
    and each sent one: 2-3 identifies per user. The others now wait for the one under way."""
    client = SlowIdentify()
    outcomes = _side_by_side(client, track(0, "u1"), track(1, "u1"), track(2, "u1"))
    assert all(isinstance(o, Delivered) for o in outcomes)
    assert client.identifies == 1
    assert [p for p, _ in client.sent] == ["/v1/identify"] + ["/v1/track"] * 3


def test_when_the_identify_under_way_fails_a_waiting_event_sends_its_own() -> None:
    """The waiters follow its answer: refused (the event dead-lettered), the next event of
    the user sends an identify of its own rather than a Track to a user not created."""
    client = SlowIdentify()
    client.fail[("/v1/identify", "u1")] = [Rejected("refused", status=400)]
    outcomes = _side_by_side(client, track(0, "u1"), track(1, "u1"))
    assert [type(o).__name__ for o in outcomes] == ["DeadLettered", "Delivered"]
    assert client.identifies == 2
    assert [p for p, _ in client.sent] == ["/v1/identify", "/v1/track"]


def test_handle_names_the_event_to_lines_logged_on_its_behalf() -> None:
    """`logs.CURRENT_EVENT` is the event while it is handled, and reset after."""
    from consumer.logs import CURRENT_EVENT

    seen: list[Any] = []

    class Peeking(Client):
        async def send(self, call: Call) -> int:
            seen.append(CURRENT_EVENT.get())
            return await super().send(call)

    handler, _, _, _ = handler_for(settings(USERPILOT_ENSURE_USER="false"), Peeking())
    first, second = track(0, "u1"), track(1, "u2")
    run(handler, first, second)
    assert seen == [first, second]
    assert CURRENT_EVENT.get() is None


EVENT_PATH_MODULES = {"consumer", "tenacity", "asyncio", "httpx", "aiohttp", "prometheus_client",
                      __name__.split(".")[0]}


def _module_of(obj: object) -> str:
    """The module an object in a cycle comes from (a function's or frame's own module;
    builtins otherwise)."""
    if isinstance(obj, types.FunctionType | types.MethodType):
        return getattr(obj, "__module__", None) or ""
    if isinstance(obj, types.FrameType):
        return str(obj.f_globals.get("__name__", ""))
    return type(obj).__module__


def cyclic_garbage(handler: Handler, *events: Event) -> list[str]:
    """The objects of the event path (not of another thread of the test run) that handling
    `events` left in reference cycles, freed only by the garbage collector, by type; warmed
    up first so caches filled on first use don't count."""
    async def main() -> list[str]:
        await handler.handle(track(10_000, "warm"))
        gc.collect()
        enabled, debug, logging_off = gc.isenabled(), gc.get_debug(), logging.root.manager.disable
        # Off while measuring: pytest's log capture keeps records whose arguments hold
        # exceptions, which would keep a cycle alive and hide it.
        logging.disable(logging.CRITICAL)
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for e in events:
                await handler.handle(e)
            gc.collect()
            return sorted({f"{_module_of(o)}.{type(o).__qualname__}" for o in gc.garbage
                           if _module_of(o).split(".")[0] in EVENT_PATH_MODULES})
        finally:
            gc.set_debug(debug)
            gc.garbage.clear()
            if enabled:
                gc.enable()
            logging.disable(logging_off)
    return asyncio.run(main())


def test_a_delivered_event_leaves_no_reference_cycle_behind() -> None:
    """Each event's state is freed by reference counting when it ends. Cycles (tenacity's
    iterator form kept ~40 objects per event in one) wait for the collector: at 2,000
    events/s that was two full collections a second and the memory of every event
    finished meanwhile (RESULTS.md, "Round 8")."""
    handler, client, dlq, _, _ = make()
    client.fail[("/v1/track", "u2")] = [ServerError("HTTP 503", status=503)]  # one retry
    client.fail[("/v1/track", "u7")] = [Rejected("HTTP 400", status=400)]  # dead-lettered
    events = [track(n, f"u{n % 3}") for n in range(30)]
    events += [event(100, type="identify", userId="u9", traits={"plan": "pro"}),
               event(101, type="group", userId="u9", groupId="acme", traits={"n": 1}),
               track(102, "u7")]
    assert cyclic_garbage(handler, *events) == []
    assert len([p for p, _ in client.sent if p == "/v1/track"]) == 31
    assert len(dlq.sent) == 1


def test_the_http_client_leaves_no_reference_cycle_on_answers_other_than_2xx() -> None:
    """The same through the real client (`UserpilotClient` on httpx's MockTransport): a 503
    then 202, a 429 then 202, a 400 (dead-lettered). A classified answer raised from the
    frame that holds it would keep the response and its buffers in a cycle per attempt."""
    answers = {"u1": [503], "u2": [429], "u3": [400]}

    def answer(request: httpx.Request) -> httpx.Response:
        who = json.loads(request.content).get("user_id", "")
        statuses = answers.get(who)
        return httpx.Response(statuses.pop(0) if statuses else 202, text="{}")

    s = settings(USERPILOT_ENSURE_USER="false")
    client = UserpilotClient("http://userpilot.test/v1/track", s.headers(), timeout_s=5.0,
                             max_connections=4, transport=httpx.MockTransport(answer))
    handler, dlq, _, _ = handler_for(s, client)
    events = [track(n, f"u{n}") for n in range(1, 6)]
    assert cyclic_garbage(handler, *events) == []
    assert not any(answers.values())
    assert len(dlq.sent) == 1


def test_an_identify_event_makes_the_user_known_and_ensure_user_can_be_off() -> None:
    handler, client, _, _, _ = make()
    run(handler, event(0, type="identify", userId="u1", traits={"plan": "pro"}),
        track(1, "u1"))
    assert [p for p, _ in client.sent] == ["/v1/identify", "/v1/track"]
    handler, client, _, _, reg = make(USERPILOT_ENSURE_USER="false")
    run(handler, track(0, "u1"))
    assert [p for p, _ in client.sent] == ["/v1/track"]
    assert metric(reg, "userpilot_ensure_user_identify_total") == 0


def test_group_calls_go_in_order_and_count_by_endpoint() -> None:
    handler, client, _, limiters, reg = make()
    (outcome,) = run(handler, event(0, type="group", userId="u1", groupId="acme",
                                    traits={"name": "Acme"}))
    assert outcome == Delivered("group", 1)
    assert client.sent == [
        ("/v1/companies/identify", {"company_id": "acme", "metadata": {"name": "Acme"}}),
        ("/v1/identify", {"user_id": "u1", "metadata": {}, "company": {"id": "acme"}})]
    assert limiters["identify"].acquired == 2 and limiters["track"].acquired == 0
    assert metric(reg, "userpilot_responses_total", status="200",
                  endpoint="company_identify") == 1


def test_a_retry_resumes_at_the_call_that_failed() -> None:
    handler, client, _, _, _ = make()
    client.fail[("/v1/track", "u1")] = [ServerError("HTTP 503", status=503)]
    (outcome,) = run(handler, track(0, "u1"))
    assert isinstance(outcome, Delivered)
    assert [p for p, _ in client.sent] == ["/v1/identify", "/v1/track"], "identify sent once"


def test_a_429_slows_only_the_family_that_got_it() -> None:
    handler, client, _, limiters, reg = make()
    client.fail[("/v1/identify", "u1")] = [RateLimited("HTTP 429", status=429)]
    (outcome,) = run(handler, track(0, "u1"))
    assert isinstance(outcome, Delivered)
    assert (limiters["identify"].slowed, limiters["track"].slowed) == (1, 0)
    assert metric(reg, "userpilot_responses_total", status="429", endpoint="identify") == 1
    assert metric(reg, "userpilot_rate_limit_requests_per_second", endpoint="identify") == 5.0


def test_the_proxys_refusal_is_not_counted_as_userpilots_403() -> None:
    """A 403 to CONNECT came from the egress proxy, Userpilot never saw the request: counted
    as status "403" it read as a refused token on the dashboard."""
    handler, client, _, _, reg = make(USERPILOT_ENSURE_USER="false")
    assert reg.get_sample_value("userpilot_responses_total", {
        "status": "proxy_refused", "endpoint": "track"}) == 0, "made at start for rate()"
    client.fail[("/v1/track", "u1")] = [ProxyRefused("the proxy refused", status=403)]
    (outcome,) = run(handler, track(0, "u1"))
    assert isinstance(outcome, Delivered)
    assert metric(reg, "userpilot_responses_total", status="proxy_refused",
                  endpoint="track") == 1
    assert metric(reg, "userpilot_responses_total", status="403", endpoint="track") == 0


def test_a_400_on_any_call_dead_letters_the_event_with_its_own_bytes() -> None:
    handler, client, dlq, _, _ = make()
    bad = event(3, type="group", userId="u1", groupId="acme")
    client.fail[("/v1/identify", "u1")] = [Rejected("HTTP 400", status=400, body="nope")]
    (outcome,) = run(handler, bad)
    assert isinstance(outcome, DeadLettered) and outcome.reason == "bad_request"
    assert [p for p, _ in client.sent] == ["/v1/companies/identify"]
    (record,) = dlq.sent
    assert record["key"] == b"u1" and record["value"] == bad.value
    assert record["headers"]["trace"] == b"1"
    assert record["headers"]["userpilot.error.status"] == b"400"
    assert record["headers"]["__connect.errors.offset"] == b"3"
    assert record["headers"]["userpilot.error.attempts"] == b"1", "the failed call's attempts"
    written = datetime.fromisoformat(record["headers"]["userpilot.error.dead_lettered_at"].decode())
    assert abs(written.timestamp() - time.time()) < 60, "when it was dead-lettered (replay)"


def _drop_counts(reg: CollectorRegistry) -> dict[tuple[str, str], float]:
    return {(s.labels["reason"], s.labels["category"]): s.value
            for metric in reg.collect() if metric.name.endswith("events_dropped")
            for s in metric.samples if s.name.endswith("_total") and s.value}


def test_screen_drops_exactly_what_route_drops_and_hands_the_rest_to_decide() -> None:
    """`screen` (the intake's fast path) and `decide` (the full path) agree on every event:
    a Drop is route's Drop; a decoded event decides as decoding the bytes again would; an
    event screen cannot tell (undecodable, broken JSON text) is left to decide."""
    rng = random.Random(2)
    handler, *_ = make()
    consents: list[Any] = [None, {}, {"analytics": True}, {"analytics": False},
                           {"canonical": {"analytics": "granted"}}, "not an object"]
    for offset in range(400):
        doc: dict[str, Any] = {
            "type": rng.choice(["track", "page", "identify", "group"]),
            "event": rng.choice(["Feature Used", "Nobody Maps This", None]),
            "userId": rng.choice(["u1", None, " "]), "groupId": rng.choice(["c1", None]),
            "messageId": f"m{offset}", "properties": {"n": offset}, "traits": {"plan": "x"},
            "context": {"consent": rng.choice(consents)}}
        value = codec.encode(SCHEMA_ID, codec.to_record(doc))
        if rng.random() < 0.05:
            value = value[:-3]  # truncated: undecodable
        first = handler.screen(value)
        full = Event("t", 0, offset, None, None, value, None, None)
        assert handler.decide(full)
        if isinstance(first, Drop):
            assert full.decision == first
            continue
        assert not isinstance(full.decision, Drop)
        if first is None:
            assert isinstance(full.decision, DeadLetter)
            continue
        again = Event("t", 0, offset, None, None, value, None, None)
        assert handler.decide(again, first)
        assert type(again.decision) is type(full.decision)
        if isinstance(full.decision, Send):
            assert isinstance(again.decision, Send)
            assert again.decision.calls == full.decision.calls
        assert (again.message_id, again.event_time) == (full.message_id, full.event_time)


def test_a_drop_the_head_decides_reads_no_further(monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """Anonymous and unmapped events are dropped on the envelope strings at the head of the
    Avro body (`codec.envelope_of`): fastavro never reads them whole, in `screen` and in
    `decide` alike, so a tail cut behind the head drops too instead of dead-lettering by
    the path taken. What the head cannot decide is read whole as before."""
    handler, *_ = make()
    anonymous = event(1, type="track", event="Feature Used", properties={"n": 1}).value
    unmapped = event(2, type="track", event="Nobody Maps This", userId="u1").value
    consent = event(3, type="track", event="Feature Used", userId="u1",
                    context={"consent": {"analytics": False}}).value
    assert anonymous is not None and unmapped is not None and consent is not None
    read_whole: list[bytes] = []
    decode = codec.decode

    def counting(data: bytes | None, lookup: codec.SchemaLookup) -> codec.Event:
        assert data is not None
        read_whole.append(data)
        return decode(data, lookup)

    monkeypatch.setattr(codec, "decode", counting)
    for value, drop in ((anonymous, Drop("anonymous")), (unmapped, Drop("unmapped")),
                        (anonymous[:-4], Drop("anonymous"))):
        assert handler.screen(value) == drop
        decided = Event("t", 0, 9, None, None, value, None, None)
        assert handler.decide(decided) and decided.decision == drop
    assert read_whole == []
    assert handler.screen(consent) == Drop("consent", "analytics")
    assert read_whole == [consent]
    # with debug logging (drops one by one) the head still decides; the whole read only
    # names the event in its debug line, and a cut tail leaves the line without its id
    caplog.set_level(logging.DEBUG, logger="consumer.handler")
    for value in (anonymous, anonymous[:-4]):
        decided = Event("t", 0, 9, None, None, value, None, None)
        assert handler.decide(decided) and decided.decision == Drop("anonymous")
        assert decided.message_id == ("m1" if value is anonymous else None)


def test_counting_drops_per_batch_equals_counting_each_drop() -> None:
    rng = random.Random(4)
    reasons = [Drop("anonymous"), Drop("unmapped"), Drop("unsupported_type"),
               Drop("consent", "analytics"), Drop("consent", "marketing")]
    one_by_one, *_, reg_one = make()
    batched, *_, reg_batched = make()
    for _batch in range(50):
        drops = [rng.choice(reasons) for _ in range(rng.randrange(0, 40))]
        for drop in drops:
            one_by_one.dropped(track(0, "u"), drop)
        # Equal drops may arrive as separate pairs (distinct objects): they add up.
        pairs = [(Drop(d.reason, d.category), 1) for d in drops[: len(drops) // 2]]
        pairs += list(Counter(drops[len(drops) // 2:]).items())
        batched.count_drops(pairs)
        assert _drop_counts(reg_batched) == _drop_counts(reg_one)
    assert len(_drop_counts(reg_one)) == len(reasons)


class _NotAvroClient:
    """A registry client whose schema for every id is `text` (not an Avro schema)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.calls = 0

    def get_schema(self, schema_id: int) -> str:
        self.calls += 1
        return self.text


@pytest.mark.parametrize("text", ['{"type": "object"}', 'syntax = "proto3";', "null", "{}"])
def test_an_event_whose_schema_is_not_avro_is_dead_lettered_not_waited_for(text: str) -> None:
    """The registry answered: retrying as if it were down stalled the partition for ever."""
    from consumer.registry import Registry as RealRegistry

    client = _NotAvroClient(text)
    handler, _, dlq, _, _ = make()
    handler.registry = RealRegistry("http://unused", client=client)
    first = event(1, type="track", event="Feature Used", userId="u1")
    second = event(2, type="track", event="Feature Used", userId="u2")

    async def both() -> list[Any]:
        return list(await asyncio.wait_for(
            asyncio.gather(handler.handle(first), handler.handle(second)), 5))

    outcomes = asyncio.run(both())
    assert all(isinstance(o, DeadLettered) and o.reason == "undecodable" for o in outcomes)
    assert "not an Avro schema" in str(outcomes[0].error)
    assert client.calls == 1, "an id's unusable schema is remembered, not fetched per event"
    assert [r["value"] for r in dlq.sent] == [first.value, second.value]


def test_an_answer_without_a_schema_is_retried_not_remembered() -> None:
    """One bad answer of the registry must not dead-letter that id's events until restart."""
    from consumer.registry import Registry as RealRegistry
    from consumer.registry import SchemaDoc

    class NoSchemaClient(_NotAvroClient):
        """`{"schema": null}` until `text` is set (an empty text is the registry's word)."""

        def get_schema(self, schema_id: int) -> SchemaDoc:  # type: ignore[override]
            self.calls += 1
            return SchemaDoc.of({"schema": self.text or None})

    client = NoSchemaClient("")
    registry = RealRegistry("http://unused", client=client)
    for _ in range(2):
        with pytest.raises(ValueError, match="holds no schema"):
            registry.writer_schema(5)
    assert client.calls == 2
    client.text = codec.SCHEMA_TEXT
    assert registry.writer_schema(5) == codec.SCHEMA


class _HungRegistry:
    """A registry that hangs on a new schema id until `release` (then knows it)."""

    evictions = 0

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls = 0

    def cached(self, schema_id: int) -> Mapping[str, Any] | None:
        return codec.SCHEMA if self.release.is_set() else None

    def writer_schema(self, schema_id: int) -> Mapping[str, Any]:
        self.calls += 1
        self.release.wait(10)
        return codec.SCHEMA


def test_events_waiting_for_a_hung_registry_leave_asyncios_default_pool_free() -> None:
    """aiohttp resolves Userpilot's host name on asyncio's default pool. Each event waiting
    for a new schema took a thread of it (`to_thread`) while the registry hung: with the
    pool full, new connections to Userpilot timed out and delivery stopped for schemas
    already cached (review "schema16"). One lookup per id, on a thread of its own."""
    handler, _, _, _, _ = make()
    hung = _HungRegistry()
    handler.registry = hung
    events = [track(i, f"u{i}") for i in range(40)]

    async def main() -> list[Any]:
        tasks = [asyncio.create_task(handler.handle(e)) for e in events]
        await asyncio.sleep(0.3)
        assert await asyncio.wait_for(asyncio.to_thread(lambda: 7), 2) == 7
        assert hung.calls == 1, "one lookup shared by the events waiting for that id"
        tasks[0].cancel()  # one waiter taken away (a revoke) leaves the others' lookup
        await asyncio.sleep(0.05)
        hung.release.set()
        return list(await asyncio.wait_for(
            asyncio.gather(*tasks[1:]), 10))

    outcomes = asyncio.run(main())
    assert all(isinstance(o, Delivered) for o in outcomes)
    handler.close()


class _ForgetfulRegistry:
    """A registry that lets every schema go at once (as one past its bounds whose other
    ids keep it busy): `cached` never has it, each fetch is counted."""

    def __init__(self) -> None:
        self.calls = 0
        self.evictions = 0

    def cached(self, schema_id: int) -> Mapping[str, Any] | None:
        return None

    def writer_schema(self, schema_id: int) -> Mapping[str, Any]:
        self.calls += 1
        self.evictions += 1
        return codec.SCHEMA


def test_an_event_waiting_for_its_schema_uses_the_one_fetched() -> None:
    """Review "diff49b": the schema a fetch returned was thrown away and read again from
    the registry's cache, which may have let it go meanwhile: the event was fetched for
    again, and again, and never decided."""
    handler, _, _, _, _ = make()
    registry = _ForgetfulRegistry()
    handler.registry = registry

    async def main() -> Any:
        return await asyncio.wait_for(handler.handle(track(0, "u1")), 10)

    assert isinstance(asyncio.run(main()), Delivered)
    assert registry.calls == 1
    handler.close()


def test_the_handler_s_schema_copies_follow_the_registry_s_bounds() -> None:
    """Review "bounds49": the handler kept its own copy of every schema the registry ever
    gave; once the registry lets any go, the copies are dropped at the next miss."""
    handler, _, _, _, _ = make()
    handler._keep_schema(1, codec.SCHEMA)
    handler._keep_schema(2, codec.SCHEMA)
    handler.registry.evictions = 1
    handler._keep_schema(3, codec.SCHEMA)
    assert list(handler._schemas) == [3]


def _track_retry_span(identify_429s: int, budget: float) -> float:
    """How long a Track retries 503s (other users' Tracks succeeding meanwhile) after its
    ensure-user identify waited out `identify_429s` 429s of 10 s each."""
    now = [0.0]

    def clock() -> float:
        return now[0]

    gate = Gate(clock=clock, outage_after=10**9)
    tried: list[float] = []

    async def sleep(seconds: float) -> None:
        now[0] += seconds
        gate.success(endpoint="track", sent=now[0])
        await asyncio.sleep(0)

    class Client:
        left_429 = identify_429s

        async def send(self, call: Call) -> int:
            if call.purpose == "ensure_user":
                if self.left_429:
                    self.left_429 -= 1
                    raise RateLimited("HTTP 429", status=429, retry_after=10.0)
                return 202
            tried.append(now[0])
            raise ServerError("HTTP 503", status=503)

        async def aclose(self) -> None:
            return None

    policy = RetryPolicy(gate, max_attempts=1000, budget_s=budget, backoff_multiplier_s=1.0,
                         backoff_max_s=5.0, sleep=sleep, clock=clock)
    handler = Handler(settings(USERPILOT_RETRY_MAX_ATTEMPTS="1000"),
                      Metrics(CollectorRegistry()), client=Client(), registry=Registry(),
                      dlq=Dlq(), limiters={"track": Limiter(), "identify": Limiter()}.__getitem__,
                      policy=policy, guard=DlqGuard(1.0, 100, 1000))
    assert isinstance(asyncio.run(handler.handle(track(0, "u1"))), DeadLettered)
    return tried[-1] - tried[0]


def test_a_tracks_budget_does_not_grow_with_its_ensure_users_429s() -> None:
    """Each call has the whole retry budget; the 429s one waited out are not a credit for
    the next (review order44: the Track retried 420 s against a 100 s budget)."""
    alone = _track_retry_span(0, 100.0)
    after = _track_retry_span(30, 100.0)
    assert alone <= 110 and after <= 110, (alone, after)


def test_events_waiting_for_one_schema_id_share_its_retries() -> None:
    """Review reg44: each waiting event retried on its own clock; taken from polled batches
    a few ms apart, 100 events of one id sent a registry answering 429 one request per
    event per round (137 in 2.4 s), not one per id."""
    from consumer.registry import Registry, RegistryError

    class Refusing:
        def __init__(self) -> None:
            self.at: list[float] = []

        def get_schema(self, schema_id: int) -> str:
            self.at.append(time.monotonic())
            raise RegistryError(429, 42901, "rate limited")

    handler, _, _, _, _ = make()
    client = Refusing()
    handler.registry = Registry("http://unused", client=client)
    start = time.monotonic()

    async def main() -> None:
        tasks = []
        for i in range(100):  # 100 users' events of one schema id, taken over ~1 s
            tasks.append(asyncio.create_task(handler.handle(track(i, f"u{i}"))))
            await asyncio.sleep(0.01)
        await asyncio.sleep(3.0 - (time.monotonic() - start))
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())
    handler.close()
    late = [at for at in client.at if at - start > 1.6]  # every event taken by then
    assert len(late) <= 3, f"{len(late)} lookups of one schema id in 1.4 s"


def test_a_schema_ids_backoff_ends_when_the_registry_answers_and_restarts_after_a_while(
) -> None:
    """Review diff44: an id's backoff outlived the outage (a new event of it waited up to
    30 s with the registry answering again), and a failure long after the last started at
    the longest wait."""
    from consumer.schemafetch import FIRST_RETRY_S, MAX_RETRY_S, SharedFetches

    answers: dict[int, list[BaseException | None]] = {8: [OSError("down")] * 10, 9: [None]}

    def lookup(schema_id: int) -> dict[str, Any]:
        outcome = answers[schema_id].pop(0)
        if outcome is not None:
            raise outcome
        return {"type": "record"}

    async def main() -> tuple[float, float, float]:
        fetches = SharedFetches(lookup)
        loop = asyncio.get_running_loop()
        for _ in range(3):  # id 8 fails: 0.5, 1, 2 s
            with pytest.raises(OSError):
                await fetches.writer_schema(8)
            fetches._backoff[8] = (loop.time(), fetches._backoff[8][1])  # its wait over now
        waited = fetches._backoff[8][1]
        await fetches.writer_schema(9)  # the registry answers (another id)
        after_answer = fetches.retry_in(8)
        # A failure long after the last one starts again from the first wait.
        fetches._backoff[8] = (loop.time() - 10 * MAX_RETRY_S, MAX_RETRY_S)
        with pytest.raises(OSError):
            await fetches.writer_schema(8)
        again = fetches._backoff[8][1]
        fetches.close()
        return waited, after_answer, again

    waited, after_answer, again = asyncio.run(main())
    assert waited == 4 * FIRST_RETRY_S and after_answer == 0.0 and again == FIRST_RETRY_S


def test_schema_backoff_doubles_when_lookups_take_longer_than_the_first_wait() -> None:
    """Review diff44: the quiet spell was counted from a lookup's failure, so a lookup that
    hung (the registry's timeout) restarted the wait at 0.5 s every round."""
    from consumer.registry import Registry

    class Hanging:
        def __init__(self) -> None:
            self.at: list[float] = []
            self.ended: list[float] = []

        def get_schema(self, schema_id: int) -> str:
            self.at.append(time.monotonic())
            time.sleep(0.6)
            self.ended.append(time.monotonic())
            raise OSError("timed out")

    handler, _, _, _, _ = make()
    client = Hanging()
    handler.registry = Registry("http://unused", client=client)

    async def main() -> None:
        task = asyncio.create_task(handler.handle(track(0, "u0")))
        await asyncio.sleep(5.6)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())
    handler.close()
    gaps = [round(start - end, 1) for end, start in zip(client.ended, client.at[1:],
                                                            strict=False)]
    assert gaps[:3] == [0.5, 1.0, 2.0], gaps


def test_an_event_waiting_out_a_schema_backoff_goes_once_the_registry_answers() -> None:
    """Review diff44: a success ended the backoff for later events only; one already
    asleep in it slept it out (up to 30 s), even after its own id was cached."""
    from consumer.registry import Registry

    class Flaky:
        up = False

        def get_schema(self, schema_id: int) -> str:
            if not self.up:
                raise OSError("connection refused")
            return codec.SCHEMA_TEXT

    def event_of(offset: int, user: str, schema_id: int) -> Event:
        doc = {"context": CONSENT, "messageId": f"m{offset}", "type": "track",
               "event": "Feature Used", "userId": user, "properties": {"seq": offset}}
        value = codec.encode(schema_id, codec.to_record(doc))
        return Event("t", 0, offset, user.encode(), user.encode(), value, None, 1)

    handler, _, _, _, _ = make()
    client = Flaky()
    handler.registry = Registry("http://unused", client=client)
    done: dict[str, float] = {}

    async def handle(event: Event, name: str) -> None:
        await handler.handle(event)
        done[name] = time.monotonic()

    async def main() -> None:
        old = asyncio.create_task(handle(event_of(0, "u1", 8), "old"))
        await asyncio.sleep(3.6)  # id 8 failed at ~0, 0.5, 1.5, 3.5 s: next due ~7.5 s
        client.up = True
        await handle(event_of(1, "u2", 9), "other id")  # the registry answers
        await asyncio.wait_for(old, 10)

    asyncio.run(main())
    handler.close()
    assert done["old"] - done["other id"] < 0.5, done


class _Unknown(Registry):
    """A registry whose cache knows no schema: each is fetched."""

    def cached(self, schema_id: int) -> Mapping[str, Any] | None:
        return None


def _undecided_earlier(handler: Handler) -> None:
    """An event taken before (intake 1) with its schema (id 42) still to fetch."""
    earlier = Event("t", 0, 0, b"k", b"k", b"\x00\x00\x00\x00\x2a" + b"x", None, None, intake=1)
    handler._undecided = {1: earlier}
    handler._undecided_by = {1: time.monotonic() + 5}


async def _cancelled_after(task: asyncio.Task[None], steps: int) -> str:
    """Cancel `task` after `steps` loop steps: "finished" (done before), "cancelled", or
    "swallowed" (it returned normally: the cancel was dropped)."""
    for _ in range(steps):
        await asyncio.sleep(0)
    if task.done():
        return "finished"
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        return "cancelled"
    return "swallowed"


def test_a_cancel_landing_as_an_earlier_event_s_schema_comes_is_not_swallowed() -> None:
    """Review "diff51a": `_decide_earlier` waited with `asyncio.wait_for`, which on Python
    3.11 can drop a cancellation that lands as the wait ends: a revoke's drain cancelled the
    event's task as the registry answered, and the task went on to send for a partition
    gone. Cancelled at each loop step after the answer, it ends cancelled (or finished)."""

    class Fetches:
        def __init__(self) -> None:
            self.answer: asyncio.Future[Any] | None = None

        async def writer_schema(self, schema_id: int) -> Any:
            self.answer = asyncio.get_running_loop().create_future()
            return await asyncio.shield(self.answer)

    async def attempt(steps: int) -> str:
        handler, *_ = make()
        fetches = Fetches()
        handler._fetches = fetches  # type: ignore[assignment]
        handler.registry = _Unknown()
        _undecided_earlier(handler)
        task = asyncio.create_task(handler._decide_earlier(2))
        while fetches.answer is None:
            assert not task.done(), "the earlier event's schema was not asked for"
            await asyncio.sleep(0)
        fetches.answer.set_result(codec.SCHEMA)
        return await _cancelled_after(task, steps)

    outcomes = {steps: asyncio.run(attempt(steps)) for steps in range(6)}
    assert "swallowed" not in outcomes.values(), outcomes
    assert "cancelled" in outcomes.values(), outcomes


def test_a_cancel_landing_as_the_registry_answers_during_an_id_s_backoff_is_not_swallowed(
) -> None:
    """Review "diff51b": `SharedFetches.writer_schema` waited out an id's backoff with
    `asyncio.wait_for`, which on 3.11 dropped a cancellation landing as the registry answered
    again (another id's lookup succeeded): the event's task went on after a revoke."""

    async def attempt(steps: int) -> str:
        handler, *_ = make()
        handler.registry = _Unknown()
        fetches = handler._fetches
        loop = asyncio.get_running_loop()
        fetches._backoff[42] = (loop.time() + 10.0, 10.0)  # the id's last lookup failed
        _undecided_earlier(handler)
        task = asyncio.create_task(handler._decide_earlier(2))
        try:
            while fetches._answered is None:  # waiting out the backoff
                assert not task.done()
                await asyncio.sleep(0)
            await asyncio.sleep(0)
            fetches._backoff.clear()  # another id's lookup succeeded: the registry answers
            answered, fetches._answered = fetches._answered, None
            answered[1].set()
            return await _cancelled_after(task, steps)
        finally:
            handler.close()

    outcomes = {steps: asyncio.run(attempt(steps)) for steps in range(6)}
    assert "swallowed" not in outcomes.values(), outcomes
    assert "cancelled" in outcomes.values(), outcomes


def test_a_status_outside_https_classes_is_counted_as_other() -> None:
    """Review "logsec52": a broken gateway answering random three-digit codes made a series
    of each (~900 per endpoint)."""
    from consumer.metrics import status_label

    assert [status_label(s) for s in (100, 202, 599, 600, 835, 99, 0)] == [
        "100", "202", "599", "other", "other", "other", "other"]
    handler, client, _, _, reg = make(USERPILOT_ENSURE_USER="false")
    client.fail[("/v1/track", "u1")] = [ServerError("HTTP 835", status=835)]
    (outcome,) = run(handler, track(0, "u1"))
    assert isinstance(outcome, Delivered)
    assert metric(reg, "userpilot_responses_total", status="other", endpoint="track") == 1
    assert reg.get_sample_value("userpilot_responses_total",
                                {"status": "835", "endpoint": "track"}) is None


@pytest.mark.parametrize(("stamp", "age"), [
    ("2026-02-25T14:30:00.000Z", 3600.0),
    ("2026-02-25T14:30:00.000z", 3600.0),  # RFC 3339 allows it; it was not observed
    ("2026-02-25T15:30:00+01:00", 3600.0),
    ("2026-02-25T16:30:00Z", 0.0),  # in the future: no negative age
    ("2026-02-25T14:30:00", None),  # no zone: no instant
    ("0001-01-01T00:00:00Z", None),  # a placeholder, not an age (review "clock53")
    ("1970-01-01T00:00:00Z", None),  # a device clock at zero
    ("Z", None),
])
def test_event_age_reads_rfc3339_and_leaves_out_what_is_no_age(
        stamp: str, age: float | None, monkeypatch: pytest.MonkeyPatch) -> None:
    now = datetime.fromisoformat("2026-02-25T15:30:00+00:00").timestamp()
    monkeypatch.setattr(time, "time", lambda: now)
    assert _event_age(stamp) == (None if age is None else pytest.approx(age))
    assert MAX_EVENT_AGE_S > 5 * 365 * 86400  # a replay of a year-old backlog still counts
