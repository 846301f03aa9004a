"""identify, group and ensure-user on the real broker, registry and sandbox (issue 9)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from consumer.sandbox import SandboxControl, SandboxThread
from tests.integration.harness import (
    WorkerThread,
    caught_up,
    produce,
    read_topic,
    track_event,
    wait_until,
    worker_env,
)

Sandbox = tuple[SandboxThread, SandboxControl]
CONSENT = {"consent": {"analytics": True}}
FAST_RETRY = {"USERPILOT_RETRY_BACKOFF_SECONDS": "0.05",
              "USERPILOT_RETRY_BACKOFF_MAX_SECONDS": "0.2"}


def identify_event(user: str, seq: int, **traits: Any) -> dict[str, Any]:
    return {"type": "identify", "userId": user, "anonymousId": f"anon-{user}",
            "traits": {"seq": seq, **traits}, "context": CONSENT,
            "timestamp": "2026-11-26T10:00:00.000Z", "messageId": f"{user}-id-{seq}"}


def group_event(user: str | None, group: str | None, seq: int, **traits: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "type": "group", "anonymousId": f"anon-{user}", "traits": {"seq": seq, **traits},
        "context": CONSENT, "timestamp": "2026-11-26T10:00:00.000Z",
        "messageId": f"{user}-grp-{seq}"}
    if user is not None:
        event["userId"] = user
    if group is not None:
        event["groupId"] = group
    return event


def mixed(users: int, per_user: int) -> list[dict[str, Any]]:
    """Per user: track, identify, group, track... (the first Track before any identify)."""
    events: list[dict[str, Any]] = []
    for seq in range(per_user):
        for u in range(users):
            user = f"u{u}"
            kind = seq % 3
            if kind == 0:
                events.append(track_event(user, seq))
            elif kind == 1:
                events.append(identify_event(user, seq, plan="pro"))
            else:
                events.append(group_event(user, f"c{u % 2}", seq, name=f"Company {u % 2}",
                                          by=user))
    return events


def expected_requests(user: str, per_user: int, ensure: bool) -> list[tuple[str, Any]]:
    """The exact (path, body) sequence one user's events cause, in order."""
    out: list[tuple[str, Any]] = []
    identified = False
    for seq in range(per_user):
        kind = seq % 3
        company = f"c{int(user[1:]) % 2}"
        if kind == 0:
            if ensure and not identified:
                out.append(("/v1/identify", {"user_id": user, "metadata": {}}))
                identified = True
            out.append(("/v1/track", {"user_id": user, "event_name": "feature_used",
                                      "metadata": {"seq": seq, "user": user}}))
        elif kind == 1:
            out.append(("/v1/identify", {"user_id": user,
                                         "metadata": {"seq": seq, "plan": "pro"}}))
            identified = True
        else:
            out.append(("/v1/companies/identify", {
                "company_id": company,
                "metadata": {"seq": seq, "name": f"Company {company[1:]}", "by": user}}))
            out.append(("/v1/identify", {"user_id": user, "metadata": {},
                                         "company": {"id": company}}))
            identified = True
    return out


def per_user(control: SandboxControl) -> dict[str, list[tuple[str, Any]]]:
    """Accepted requests grouped by user, in arrival order (a company identify belongs to
    the user its traits name in ``by``)."""
    got: dict[str, list[tuple[str, Any]]] = {}
    for record in control.requests():
        body = record["body"]
        user = (body["metadata"]["by"] if record["path"] == "/v1/companies/identify"
                else body["user_id"])
        got.setdefault(user, []).append((record["path"], body))
    return got


def test_mixed_events_arrive_in_per_user_order_and_ensure_user_attributes_every_track(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    sandbox: Sandbox,
) -> None:
    server, control = sandbox
    control.set_faults(latency_ms=2)
    topic = topic_factory(partitions=3)
    users, count = 6, 7
    produce(kafka_bootstrap, schema_registry_url, topic, mixed(users, count))
    group = f"{topic}-g"
    env = worker_env(kafka_bootstrap, schema_registry_url, server.url, topic, group)
    with WorkerThread(env) as w:
        wait_until(caught_up(kafka_bootstrap, group, topic), 60, "offsets at the end")
        ensured = w.metric("userpilot_ensure_user_identify_total")
    got = per_user(control)
    for u in range(users):
        user = f"u{u}"
        assert got[user] == expected_requests(user, count, ensure=True), user
    assert ensured == users, "one bare identify per user, before its first Track"
    attributed, unattributed = control.attribution()
    assert (attributed, unattributed) == (users * 3, 0)
    assert set(control.users()) == {f"u{u}" for u in range(users)}
    companies = control.companies()
    assert set(companies) == {"c0", "c1"}
    assert sorted(companies["c0"]["users"]) == ["u0", "u2", "u4"]


def test_a_user_on_two_topics_is_ensured_once_per_replica(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    sandbox: Sandbox,
) -> None:
    """Review "events31": a user's Tracks on two topics run side by side, and each sent its
    own ensure-user identify (2 per user). With answers slower than the intake, every
    user's two first Tracks meet while the first identify is under way."""
    server, control = sandbox
    control.set_faults(latency_ms=200)
    first, second = topic_factory(partitions=1), topic_factory(partitions=1)
    users = 20
    for topic in (first, second):
        produce(kafka_bootstrap, schema_registry_url, topic,
                [track_event(f"dual{u}", u) for u in range(users)])
    group = f"{first}-g"
    env = worker_env(kafka_bootstrap, schema_registry_url, server.url, f"{first},{second}",
                     group)
    done = [caught_up(kafka_bootstrap, group, topic) for topic in (first, second)]
    with WorkerThread(env) as w:
        wait_until(lambda: all(check() for check in done), 60, "both topics committed")
        ensured = w.metric("userpilot_ensure_user_identify_total")
    identifies = [r["body"]["user_id"] for r in control.requests("/v1/identify")]
    assert sorted(identifies) == sorted(f"dual{u}" for u in range(users))
    assert ensured == users
    assert control.attribution() == (2 * users, 0)


def test_two_users_updates_of_one_company_reach_it_in_stream_order(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    sandbox: Sandbox,
) -> None:
    """Review "events31": ka's backlog of Tracks held its group (plan free) back while kb's
    later group (plan enterprise) went first, and the older plan ended on the company."""
    server, control = sandbox
    control.set_faults(latency_ms=100)
    topic = topic_factory(partitions=1)
    events = [track_event("ka", i) for i in range(5)]
    events.append(group_event("ka", "acme", 5, plan="free", seats=1))
    events.append(group_event("kb", "acme", 6, plan="enterprise", seats=50))
    events.append(identify_event("kc", 7, company={"id": "acme", "plan": "scale"}))
    events.append(group_event("kd", "globex", 8, plan="free"))
    produce(kafka_bootstrap, schema_registry_url, topic, events)
    group = f"{topic}-g"
    env = worker_env(kafka_bootstrap, schema_registry_url, server.url, topic, group)
    with WorkerThread(env):
        wait_until(caught_up(kafka_bootstrap, group, topic), 60, "offsets at the end")
    writes = [(r["body"]["company_id"], r["body"]["metadata"].get("plan"))
              if r["path"] == "/v1/companies/identify"
              else (r["body"]["company"]["id"], r["body"]["company"].get("plan"))
              for r in control.requests()
              if r["path"] == "/v1/companies/identify"
              or (r["path"] == "/v1/identify" and len(r["body"].get("company", {})) > 1)]
    assert [w for w in writes if w[0] == "acme"] == [
        ("acme", "free"), ("acme", "enterprise"), ("acme", "scale")]
    assert control.companies()["acme"]["metadata"]["plan"] == "scale"
    assert writes.index(("globex", "free")) < writes.index(("acme", "free")), (
        "another company's update does not wait")


def test_without_ensure_user_first_tracks_are_unattributed(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    sandbox: Sandbox,
) -> None:
    server, control = sandbox
    topic = topic_factory(partitions=1)
    produce(kafka_bootstrap, schema_registry_url, topic, mixed(4, 4))
    group = f"{topic}-g"
    env = worker_env(kafka_bootstrap, schema_registry_url, server.url, topic, group,
                     USERPILOT_ENSURE_USER="false")
    with WorkerThread(env) as w:
        wait_until(caught_up(kafka_bootstrap, group, topic), 60, "offsets at the end")
        assert w.metric("userpilot_ensure_user_identify_total") == 0
    for u in range(4):
        assert per_user(control)[f"u{u}"] == expected_requests(f"u{u}", 4, ensure=False)
    assert control.attribution() == (4, 4), "seq 0 (before identify) is attributed to no one"


def headers_of(message: Any) -> dict[str, bytes]:
    return {k: v for k, v in (message.headers() or [])}


def test_a_400_on_identify_is_dead_lettered_like_a_track(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    sandbox: Sandbox,
) -> None:
    server, control = sandbox
    control.set_faults(rules=[{"user_id": "bad", "path": "/v1/identify", "action": "400"}])
    topic = topic_factory(partitions=1)
    bad_identify = identify_event("bad", 1)
    events = [track_event("ok", 0), bad_identify, track_event("ok", 1)]
    produce(kafka_bootstrap, schema_registry_url, topic, events)
    group = f"{topic}-g"
    env = worker_env(kafka_bootstrap, schema_registry_url, server.url, topic, group,
                     **FAST_RETRY)
    with WorkerThread(env) as w:
        wait_until(caught_up(kafka_bootstrap, group, topic), 60, "offsets at the end")
        assert w.metric("userpilot_events_dead_lettered_total", reason="bad_request") == 1
        assert w.metric("userpilot_responses_total", status="400", endpoint="identify") == 1
        dlq = w.settings.dlq_topic
    records = read_topic(kafka_bootstrap, dlq)
    assert len(records) == 1
    (original,) = records
    h = headers_of(original)
    assert original.key() == b"bad"
    assert h["__connect.errors.topic"] == topic.encode()
    assert h["__connect.errors.partition"] == b"0"
    assert h["__connect.errors.offset"] == b"1"
    assert h["userpilot.error.reason"] == b"bad_request"
    assert h["userpilot.error.status"] == b"400"
    assert h["userpilot.error.attempts"] == b"1"
    assert h["__connect.errors.exception.class.name"] == b"Rejected"
    assert h["userpilot.replay.count"] == b"0"
    assert [b["event_name"] for b in control.bodies("/v1/track")] == ["feature_used"] * 2


def test_consent_and_anonymous_rules_hold_for_identify_and_group(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    sandbox: Sandbox,
) -> None:
    server, control = sandbox
    topic = topic_factory(partitions=1)
    no_consent = {"consent": {"analytics": False}}
    events = [
        {**identify_event("a", 1), "context": no_consent},
        {**group_event("a", "g1", 2), "context": no_consent},
        {k: v for k, v in identify_event("b", 1).items() if k != "userId"},
        group_event("b", None, 2),  # no groupId: anonymous for a group
        group_event(None, "solo", 3, name="Solo"),  # no userId: anonymous, not sent
        identify_event("c", 4, plan="pro"),
    ]
    produce(kafka_bootstrap, schema_registry_url, topic, events)
    group = f"{topic}-g"
    env = worker_env(kafka_bootstrap, schema_registry_url, server.url, topic, group)
    with WorkerThread(env) as w:
        wait_until(caught_up(kafka_bootstrap, group, topic), 60, "offsets at the end")
        assert w.metric("userpilot_events_dropped_total", reason="consent",
                        category="analytics") == 2
        assert w.metric("userpilot_events_dropped_total", reason="anonymous", category="") == 3
    got = [(r["path"], r["body"]) for r in control.requests()]
    assert got == [("/v1/identify", {"user_id": "c", "metadata": {"seq": 4, "plan": "pro"}})]


def test_a_429_on_identify_slows_identify_only(
    kafka_bootstrap: str, schema_registry_url: str, topic_factory: Callable[..., str],
    sandbox: Sandbox,
) -> None:
    """Track has no limit here, identify 2 per 2 s: identifies get 429s and wait, Tracks
    of other users flow meanwhile, and only the identify limiter slows down."""
    server, control = sandbox
    control.set_faults(rate_limit=0, rate_window_seconds=2)
    control.set_limits(identify_rate_limit=2)
    topic = topic_factory(partitions=3)
    identifies = [identify_event(f"i{n}", n) for n in range(8)]
    tracks = [track_event(f"t{n % 30}", n) for n in range(300)]
    produce(kafka_bootstrap, schema_registry_url, topic, identifies + tracks)
    group = f"{topic}-g"
    env = worker_env(kafka_bootstrap, schema_registry_url, server.url, topic, group,
                     USERPILOT_ENSURE_USER="false", USERPILOT_RATE_LIMIT="6000",
                     USERPILOT_RATE_BURST="50", USERPILOT_RETRY_MAX_ATTEMPTS="100",
                     **FAST_RETRY)
    with WorkerThread(env) as w:
        wait_until(lambda: len(control.requests("/v1/track")) == len(tracks), 60,
                   "every Track delivered")
        track_rate = w.worker.shared.limiter("track").rate
        identify_rate = w.worker.shared.limiter("identify").rate
        wait_until(caught_up(kafka_bootstrap, group, topic), 90, "offsets at the end")
        assert w.metric("userpilot_responses_total", status="429", endpoint="identify") >= 1
        assert w.metric("userpilot_responses_total", status="429", endpoint="track") == 0
        assert w.metric("userpilot_events_dead_lettered_total", reason="retries_exhausted") == 0
    # Tracks flowed while identifies waited for their budget: the first Track arrived before
    # the last identify (sandbox arrival order, not wall-clock timing, so load cannot fake it).
    first_track = min(r["seq"] for r in control.requests("/v1/track"))
    last_identify = max(r["seq"] for r in control.requests("/v1/identify"))
    assert first_track < last_identify, "Tracks waited for identify's budget"
    assert identify_rate < track_rate, "only the family that got 429s slowed down"
    assert len(control.requests("/v1/identify")) == len(identifies)
    assert control.stats()["by_status"].get("429", 0) >= 1
