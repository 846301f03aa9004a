"""`check-config --online` and `produce` against real and unreachable services (subprocesses).

The Userpilot side is the sandbox, run in-process (it answers like Userpilot: 401/403 for
a wrong token, 400 for an empty Track with a good one).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from consumer.sandbox import SandboxControl, SandboxThread
from tests.conftest import create_topic
from tests.integration.harness import READ_TOKEN, REPO, worker_env
from tests.integration.redis_fixtures import SlowLink, StoppableRedis, TlsRedis

Sandbox = tuple[SandboxThread, SandboxControl]
EVENT = b'{"type":"track","event":"Feature Used","userId":"u"}\n'


def cli(argv: list[str], env: dict[str, str], stdin: bytes = b"",
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    # REDIS_URL too: `make test` exports it, and only a test that passes it uses Redis.
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("USERPILOT_", "KAFKA_", "SCHEMA_REGISTRY", "WORKER_",
                                  "REDIS_"))}
    proc = subprocess.run([sys.executable, "-m", "consumer", *argv], input=stdin,
                          env={**clean, **env}, capture_output=True, timeout=timeout,
                          cwd=REPO, check=False)
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(),
                                       proc.stderr.decode())


@pytest.fixture
def online_env(kafka_bootstrap: str, schema_registry_url: str,
               topic_factory: Callable[..., str], sandbox: Sandbox) -> dict[str, str]:
    server, _ = sandbox
    topic = topic_factory(partitions=1)
    env = worker_env(kafka_bootstrap, schema_registry_url, server.url, topic, f"{topic}-g")
    create_topic(kafka_bootstrap, f"{topic}.userpilot.dlq")
    return env


def _run_until_warning(env: dict[str, str], marker: str) -> list[str]:
    """`run` started with `env` until a line holding `marker` (60 s at most), then stopped
    with SIGTERM (exit 0: it went on after the warning); the lines holding `marker`."""
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("USERPILOT_", "KAFKA_", "SCHEMA_REGISTRY", "WORKER_",
                                  "REDIS_"))}
    proc = subprocess.Popen([sys.executable, "-m", "consumer", "run", "--timeout", "5"],
                            env={**clean, **env, "WORKER_METRICS_PORT": "0"}, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            if marker in line:
                break
    finally:
        proc.terminate()
        proc.wait(30)
    assert proc.returncode == 0, seen
    return [line for line in seen if marker in line]


def test_online_all_good(online_env: dict[str, str]) -> None:
    result = cli(["check-config", "--online", "--timeout", "5"], online_env)
    assert result.returncode == 0, result.stderr
    for name in ("userpilot", "kafka", "schema registry"):
        assert f"online OK: {name}" in result.stderr


def test_online_the_token_check_records_nothing(online_env: dict[str, str],
                                                sandbox: Sandbox) -> None:
    _, control = sandbox
    assert cli(["check-config", "--online"], online_env).returncode == 0
    assert control.requests("/v1/track") == []


@pytest.mark.parametrize(("token", "status"), [(READ_TOKEN, "403"), ("wt_wrong", "401")],
                         ids=["read-token", "unknown-token"])
def test_online_wrong_token_exits_9(online_env: dict[str, str], token: str,
                                    status: str) -> None:
    result = cli(["check-config", "--online"], {**online_env, "USERPILOT_API_KEY": token})
    assert result.returncode == 9, result.stderr
    assert f"refused the token ({status})" in result.stderr
    assert token not in result.stderr + result.stdout


def test_online_wrong_host_exits_9(online_env: dict[str, str], schema_registry_url: str) -> None:
    """A host that is not Userpilot answers 404 on /v1/track (here: the registry's host)."""
    host = schema_registry_url.split("://", 1)[1].split("/", 1)[0]
    result = cli(["check-config", "--online"],
                 {**online_env, "USERPILOT_ANALYTICS_ENDPOINT": host})
    assert result.returncode == 9, result.stderr
    assert "wrong host" in result.stderr


def test_online_unresolvable_host_exits_9(online_env: dict[str, str]) -> None:
    result = cli(["check-config", "--online"],
                 {**online_env, "USERPILOT_ANALYTICS_ENDPOINT": "no-such-host.invalid"})
    assert result.returncode == 9
    assert "cannot resolve" in result.stderr


def test_online_kafka_down_exits_10_within_the_timeout(online_env: dict[str, str]) -> None:
    started = time.monotonic()
    result = cli(["check-config", "--online", "--timeout", "3"],
                 {**online_env, "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"})
    assert result.returncode == 10, result.stderr
    assert time.monotonic() - started < 30
    assert "online FAILED: kafka: Kafka at 127.0.0.1:1 not reachable within 3 s" in result.stderr
    assert "Traceback" not in result.stderr


def test_online_missing_topics_exit_10(online_env: dict[str, str]) -> None:
    result = cli(["check-config", "--online"], {**online_env, "KAFKA_TOPICS": "no-such-topic-x1"})
    assert result.returncode == 10
    assert "has no topic 'no-such-topic-x1'" in result.stderr


def test_online_takes_a_missing_dlq_topic_the_brokers_will_create(
        online_env: dict[str, str]) -> None:
    """Review newcomer24: check-config --online refused a DLQ topic not created yet, which
    `run` takes (the first dead letter creates it on these brokers)."""
    dlq = f"not-yet-{time.time_ns()}.dlq"
    result = cli(["check-config", "--online"], {**online_env, "KAFKA_DLQ_TOPIC": dlq})
    assert result.returncode == 0, result.stderr
    assert "online OK: kafka" in result.stderr


def test_online_registry_down_exits_12(online_env: dict[str, str]) -> None:
    result = cli(["check-config", "--online"],
                 {**online_env, "SCHEMA_REGISTRY_URL": "http://127.0.0.1:1"})
    assert result.returncode == 12, result.stderr
    assert "schema registry at http://127.0.0.1:1 not reachable" in result.stderr


def test_online_everything_wrong_exits_15(online_env: dict[str, str]) -> None:
    result = cli(["check-config", "--online", "--timeout", "2"],
                 {**online_env, "USERPILOT_API_KEY": "wt_wrong",
                  "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",
                  "SCHEMA_REGISTRY_URL": "http://127.0.0.1:1"})
    assert result.returncode == 15


# ------------------------------------------------------------------ produce


def test_produce_with_kafka_down_is_one_line_within_the_timeout(
    schema_registry_url: str,
) -> None:
    started = time.monotonic()
    result = cli(["produce", "--topic", "t", "--timeout", "3"],
                 {"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",
                  "SCHEMA_REGISTRY_URL": schema_registry_url}, EVENT)
    assert result.returncode == 1
    assert time.monotonic() - started < 30
    assert result.stderr.startswith("error: nothing was sent: Kafka at 127.0.0.1:1 not "
                                    "reachable within 3 s")
    assert result.stderr.count("\n") == 1


def test_produce_with_the_registry_down_is_one_line(kafka_bootstrap: str) -> None:
    result = cli(["produce", "--topic", "t"],
                 {"KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
                  "SCHEMA_REGISTRY_URL": "http://127.0.0.1:1"}, EVENT)
    assert result.returncode == 1
    assert result.stderr.startswith("error: nothing was sent: schema registry at "
                                    "http://127.0.0.1:1 not reachable")
    assert result.stderr.count("\n") == 1


def test_produce_refuses_kafka_settings_run_refuses(kafka_bootstrap: str,
                                                    schema_registry_url: str) -> None:
    result = cli(["produce", "--topic", "t"],
                 {"KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
                  "SCHEMA_REGISTRY_URL": schema_registry_url, "KAFKA_TOPIC": "x"}, EVENT)
    assert result.returncode == 2
    assert "did you mean KAFKA_TOPICS?" in result.stderr


def test_produce_help_states_the_bound() -> None:
    result = cli(["produce", "--help"], {})
    assert result.returncode == 0
    assert "within --timeout seconds" in " ".join(result.stdout.split())


def test_online_checks_redis_when_configured(online_env: dict[str, str], redis_url: str,
                                            stoppable_redis: StoppableRedis) -> None:
    """A wrong Redis password or host was noticed only once the worker ran without the
    shared budget and deduplication."""
    good = cli(["check-config", "--online", "--timeout", "5"],
               {**online_env, "REDIS_URL": redis_url})
    assert good.returncode == 0, good.stderr
    assert "online OK: redis" in good.stderr
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    import redis as sync_redis

    sync_redis.Redis.from_url(stoppable_redis.url).config_set("requirepass", "the-right-one")
    for url in (f"redis://:s3cret-pw@127.0.0.1:{closed}/0",  # nobody listens
                stoppable_redis.url.replace("redis://", "redis://:s3cret-pw@", 1)):  # refused
        bad = cli(["check-config", "--online", "--timeout", "2"], {**online_env, "REDIS_URL": url})
        assert bad.returncode == 8 + 16, bad.stderr
        assert "online FAILED: redis: Redis at redis://***@127.0.0.1" in bad.stderr
        assert "s3cret-pw" not in bad.stdout + bad.stderr
    assert "online OK: redis" not in cli(["check-config", "--online", "--timeout", "5"],
                                         online_env).stderr  # not configured: not checked


def test_a_redis_database_the_server_lacks_is_refused_by_run_and_check_config_online(
        online_env: dict[str, str], redis_url: str) -> None:
    """Review "ops31": databases past 15 were refused offline, though a Redis may have
    more; now the Redis says whether it has the database."""
    from urllib.parse import urlsplit

    lacking = urlsplit(redis_url)._replace(path="/99").geturl()
    refused = cli(["run", "--wait", "0", "--timeout", "5"],
                  {**online_env, "REDIS_URL": lacking, "WORKER_METRICS_PORT": "0"})
    assert refused.returncode == 1, refused.stderr
    assert "has no such database (redis ping failed: ResponseError (DB index is out of " \
        "range))" in refused.stderr
    online = cli(["check-config", "--online", "--timeout", "5"],
                 {**online_env, "REDIS_URL": lacking})
    assert online.returncode == 8 + 16, online.stderr
    assert "DB index is out of range" in online.stderr


def test_run_stops_at_start_up_when_redis_refuses_its_password_not_when_it_is_down(
        online_env: dict[str, str], stoppable_redis: StoppableRedis) -> None:
    """Review config25: a wrong Redis password was taken like an outage: every replica ran
    ready, without deduplication and on its partition share, for ever. It is a setting:
    one line, exit 1. Redis not answering stays the fallback's (the worker starts)."""
    import redis as sync_redis

    sync_redis.Redis.from_url(stoppable_redis.url).config_set("requirepass", "the-right-one")
    wrong = stoppable_redis.url.replace("redis://", "redis://:s3cret-pw@", 1)
    refused = cli(["run", "--wait", "0", "--timeout", "5"],
                  {**online_env, "REDIS_URL": wrong, "WORKER_METRICS_PORT": "0"})
    assert refused.returncode == 1, refused.stderr
    assert "refused the worker (redis ping failed: AuthenticationError)" in refused.stderr
    assert "REDIS_URL" in refused.stderr and "s3cret-pw" not in refused.stderr
    assert "Traceback" not in refused.stderr
    # A user whose ACL allows PING but not the worker's calls (review diff25).
    admin = sync_redis.Redis.from_url(
        stoppable_redis.url.replace("redis://", "redis://:the-right-one@", 1))
    admin.acl_setuser("pingonly", enabled=True, passwords=["+pw"], keys=["*"],
                      commands=["+ping"])
    admin.close()
    ping_only = stoppable_redis.url.replace("redis://", "redis://pingonly:pw@", 1)
    denied = cli(["run", "--wait", "0", "--timeout", "5"],
                 {**online_env, "REDIS_URL": ping_only, "WORKER_METRICS_PORT": "0"})
    assert denied.returncode == 1, denied.stderr
    assert "NoPermissionError" in denied.stderr and "the user's ACL" in denied.stderr
    # ... but an ACL narrowed to the worker's own key shapes is taken (review diff25b).
    from consumer import reach
    from consumer.config import load_settings

    admin = sync_redis.Redis.from_url(
        stoppable_redis.url.replace("redis://", "redis://:the-right-one@", 1))
    admin.acl_setuser("narrow", enabled=True, passwords=["+pw"],
                      keys=["ud:*", "userpilot:rl:track:*", "userpilot:rl:identify:*"],
                      commands=["+@all"])
    narrow = stoppable_redis.url.replace("redis://", "redis://narrow:pw@", 1)
    settings = load_settings({**online_env, "REDIS_URL": narrow})
    from prometheus_client import CollectorRegistry

    from consumer.metrics import Metrics

    registry = CollectorRegistry()
    assert reach.redis_refusal(settings, 5, observe=Metrics(registry).observe_redis) is None
    # `run` passes its metrics: the start-up PING is seen as `ping`, the probe's calls on
    # throw-away keys not as the worker's own (review "metrics46": `ping` never moved)
    counts = {op: registry.get_sample_value("userpilot_redis_latency_seconds_count",
                                            {"operation": op}) for op in ("ping", "claim")}
    assert counts == {"ping": 1.0, "claim": 0.0}, counts
    assert reach.redis(settings, 5) is None, "check-config --online takes it too"
    # ... and one that allows the Track keys alone is refused: identify ran on its
    # fallback for ever (review redis34).
    admin.acl_setuser("trackonly", enabled=True, passwords=["+pw"],
                      keys=["ud:track:*", "ud:n:track:*", "userpilot:rl:track:*"],
                      commands=["+@all"])
    track_only = load_settings({
        **online_env, "REDIS_URL": stoppable_redis.url.replace("redis://",
                                                               "redis://trackonly:pw@", 1)})
    refused_now = reach.redis_refusal(track_only, 5)
    assert refused_now is not None and "NoPermissionError" in refused_now, refused_now
    assert "on keys ud:identify:*" in refused_now, "the denied key shape is named"
    checked_now = reach.redis(track_only, 5)
    assert checked_now is not None and "NoPermissionError" in checked_now, checked_now
    # ... and so is one without the identified users' keys (ensure-user, shared).
    admin.acl_setuser("nousers", enabled=True, passwords=["+pw"],
                      keys=["ud:track:*", "ud:identify:*", "ud:company_identify:*", "ud:n:*",
                            "userpilot:rl:*"],
                      commands=["+@all"])
    no_users = load_settings({
        **online_env, "REDIS_URL": stoppable_redis.url.replace("redis://",
                                                               "redis://nousers:pw@", 1)})
    refused_users = reach.redis_refusal(no_users, 5)
    assert refused_users is not None and "on keys ud:user:*" in refused_users, refused_users
    admin.close()
    stoppable_redis.stop()  # an outage: the worker starts on its fallback
    right = stoppable_redis.url.replace("redis://", "redis://:the-right-one@", 1)
    proc = subprocess.Popen(
        [sys.executable, "-m", "consumer", "run", "--wait", "0", "--timeout", "5"],
        env={**{k: v for k, v in os.environ.items()
                if not k.startswith(("USERPILOT_", "KAFKA_", "SCHEMA_REGISTRY", "WORKER_",
                                     "REDIS_"))},
             **online_env, "REDIS_URL": right, "WORKER_METRICS_PORT": "0"},
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(8)
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert b"consuming" in err


def test_the_documented_least_acl_is_named_with_what_a_db_or_client_name_adds(
        online_env: dict[str, str], stoppable_redis: StoppableRedis) -> None:
    """Review "readme48": the README's least ACL (`+@read +@write +@scripting +time +ping`
    on `ud:*` and `userpilot:*`) was refused with a /db other than 0 (SELECT) or a
    `client_name` (CLIENT SETNAME), both in @connection, and the refusal named the same ACL
    as the fix."""
    import redis as sync_redis

    from consumer import reach
    from consumer.config import load_settings

    admin = sync_redis.Redis.from_url(stoppable_redis.url)
    admin.acl_setuser("documented", enabled=True, passwords=["+pw"],
                      keys=["ud:*", "userpilot:*"],
                      commands=["+@read", "+@write", "+@scripting", "+time", "+ping"])
    base = stoppable_redis.url.replace("redis://", "redis://documented:pw@", 1)

    def refusal(url: str) -> str | None:
        return reach.redis_refusal(load_settings({**online_env, "REDIS_URL": url}), 5)

    assert refusal(base) is None
    on_db = base.rsplit("/", 1)[0] + "/1"
    named = refusal(on_db)
    assert named is not None and "+select" in named, named
    online = reach.redis(load_settings({**online_env, "REDIS_URL": on_db}), 5)
    assert online is not None and "+select" in online, online
    admin.acl_setuser("documented", enabled=True, commands=["+select"])
    assert refusal(on_db) is None
    named = refusal(base + "?client_name=up-worker")
    assert named is not None and "+client|setname" in named, named
    admin.acl_setuser("documented", enabled=True, commands=["+client|setname"])
    assert refusal(base + "?client_name=up-worker") is None
    admin.close()


def test_online_refuses_a_redis_too_slow_for_redis_timeout_seconds(
        online_env: dict[str, str], stoppable_redis: StoppableRedis) -> None:
    """A Redis that answers, but not within REDIS_TIMEOUT_SECONDS on a new connection, was
    "online OK" while every replica gave every call up and ran without it."""
    with SlowLink(stoppable_redis.port, 0.4) as far:
        slow = cli(["check-config", "--online", "--timeout", "5"],
                   {**online_env, "REDIS_URL": far.url()})
        assert slow.returncode == 8 + 16, slow.stderr
        assert "over REDIS_TIMEOUT_SECONDS (0.25 s)" in slow.stderr
        assert "raise REDIS_TIMEOUT_SECONDS" in slow.stderr
        raised = cli(["check-config", "--online", "--timeout", "5"],
                     {**online_env, "REDIS_URL": far.url(), "REDIS_TIMEOUT_SECONDS": "2"})
        assert raised.returncode == 0, raised.stderr
        assert "online OK: redis" in raised.stderr


def test_a_compacted_source_topic_is_warned_of_by_check_config_and_run(
    online_env: dict[str, str], topic_factory: Callable[..., str],
) -> None:
    """Review "gaps46": events are keyed by user, so compacting the source topic kept each
    user's latest only; a backlog lost the rest unsent, and nothing said so. A warning
    (not a refusal): with a day or more of `min.compaction.lag.ms` nothing is said."""
    compacted = topic_factory(partitions=1, suffix="-c", config={"cleanup.policy": "compact"})
    kept = topic_factory(partitions=1, suffix="-k", config={
        "cleanup.policy": "compact,delete", "min.compaction.lag.ms": "172800000"})
    env = {**online_env, "KAFKA_TOPICS": f"{online_env['KAFKA_TOPICS']},{compacted},{kept}"}
    checked = cli(["check-config", "--online", "--timeout", "5"], env)
    assert checked.returncode == 0, checked.stderr
    notes = [line for line in checked.stderr.splitlines() if line.startswith("online note:")]
    assert notes == [
        f"online note: kafka: the source topic {compacted!r} has cleanup.policy=compact with "
        "min.compaction.lag.ms=0: compaction keeps each key's (user's) latest event only, so "
        "events not yet delivered when the log cleaner runs (a backlog behind an outage) are "
        "removed unsent. Use cleanup.policy=delete, or set min.compaction.lag.ms to at least "
        "86400000 (a day) or the longest backlog you plan for"], checked.stderr
    warned = _run_until_warning(env, "start-up: the source topic")
    assert len(warned) == 1 and repr(compacted) in warned[0] and "WARNING" in warned[0]


@pytest.mark.parametrize("policy", ["compact", "compact,delete"])
def test_a_compacted_dlq_is_refused_by_check_config_and_run(
    online_env: dict[str, str], kafka_bootstrap: str, topic_factory: Callable[..., str],
    policy: str,
) -> None:
    """Review kafka18: dead letters are keyed by user; compaction keeps one per user (a
    dead tombstone deletes the others) and refuses keyless ones, stalling their partition
    for ever; check-config said OK."""
    dlq = topic_factory(partitions=1, suffix="-dlq", config={"cleanup.policy": policy})
    env = {**online_env, "KAFKA_DLQ_TOPIC": dlq}
    checked = cli(["check-config", "--online", "--timeout", "5"], env)
    assert checked.returncode == 10, checked.stderr
    assert f"has cleanup.policy={policy}" in checked.stderr
    assert "cleanup.policy=delete" in checked.stderr
    ran = cli(["run", "--timeout", "5"], env)
    assert ran.returncode == 1, ran.stderr
    assert f"has cleanup.policy={policy}" in ran.stderr


def test_a_dlq_topic_too_small_for_a_dead_letter_is_refused_by_check_config_and_run(
    online_env: dict[str, str], topic_factory: Callable[..., str],
) -> None:
    """Review "readme51": a DLQ topic with max.message.bytes=512 refused even the value-less
    dead letter; its partition stalled for ever (commit at 0, the record retried every
    0.5 s) while check-config --online said OK."""
    dlq = topic_factory(partitions=1, suffix="-dlq", config={"max.message.bytes": "512"})
    env = {**online_env, "KAFKA_DLQ_TOPIC": dlq}
    checked = cli(["check-config", "--online", "--timeout", "5"], env)
    assert checked.returncode == 10, checked.stderr
    said = f"the DLQ topic {dlq!r} has max.message.bytes=512, below 8192"
    assert said in checked.stderr
    assert "--add-config max.message.bytes=1048588" in checked.stderr
    ran = cli(["run", "--timeout", "5"], env)
    assert ran.returncode == 1, ran.stderr
    assert said in ran.stderr


def test_a_dlq_topic_at_the_floor_takes_the_largest_dead_letter_the_worker_can_write_there(
    online_env: dict[str, str], kafka_bootstrap: str, topic_factory: Callable[..., str],
) -> None:
    """The floor is the worker's own worst case, not KAFKA_MESSAGE_MAX_BYTES's 16384: a dead
    letter the topic refuses is written without its value, key and original headers, which
    leaves the worker's headers (under ~5 KB; here inflated past what it writes, ~6.4 KB). A
    topic at the floor takes it,
    and check-config --online passes it (review "diff51a": 8-16 KB topics were refused)."""
    import asyncio

    from consumer.deadletter import Failure, dead_letter_record, without_originals, without_value
    from consumer.kafka import DeadLetterProducer
    from consumer.reach import DLQ_TOPIC_MIN_BYTES

    dlq = topic_factory(partitions=1, suffix="-dlq",
                        config={"max.message.bytes": str(DLQ_TOPIC_MIN_BYTES)})
    checked = cli(["check-config", "--online", "--timeout", "5"],
                  {**online_env, "KAFKA_DLQ_TOPIC": dlq})
    assert checked.returncode == 0, checked.stderr
    huge = "\u00e9" * 200_000
    failure = Failure(reason="bad_request", exception_class="Rejected" * 50, message=huge,
                      status=400, body=huge,
                      call="company_identify POST /v1/companies/identify" * 20)
    record = dead_letter_record(key=b"k" * 100_000, value=b"v" * 2_000_000,
                                headers=[("trace", b"x" * 50_000)], timestamp_ms=1,
                                topic="t" * 249, partition=2**31 - 1, offset=2**63 - 1,
                                failure=failure, max_bytes=1_000_000)
    bare = without_originals(without_value(record))
    assert 6000 < bare.size < DLQ_TOPIC_MIN_BYTES - 1024

    async def send() -> None:
        producer = DeadLetterProducer({"bootstrap.servers": kafka_bootstrap})
        try:
            await asyncio.wait_for(producer.send(dlq, key=bare.key, value=bare.value,
                                                 headers=bare.headers), 30)
        finally:
            producer.close(5)

    asyncio.run(send())  # raises if the broker refused it


# Below the brokers' group.min.session.timeout.ms (6 s) yet three heartbeats (1 s here)
# long: a session shorter than the heartbeat is refused offline, before any broker.
@pytest.mark.parametrize("timeout_ms", ["3000", "1800001"])
def test_a_session_timeout_the_brokers_refuse_stops_check_config_and_run(
    online_env: dict[str, str], timeout_ms: str,
) -> None:
    """Review config19: every JoinGroup was refused (librdkafka logs it and retries), the
    worker never became ready, and check-config --online said OK."""
    env = {**online_env, "KAFKA_SESSION_TIMEOUT_MS": timeout_ms,
           "KAFKA_MAX_POLL_INTERVAL_MS": "1800001"}  # librdkafka: at least the session's
    checked = cli(["check-config", "--online", "--timeout", "5"], env)
    assert checked.returncode == 10, checked.stderr
    said = f"KAFKA_SESSION_TIMEOUT_MS={timeout_ms} is outside what the brokers accept"
    assert said in checked.stderr
    ran = cli(["run", "--timeout", "5"], env)
    assert ran.returncode == 1, ran.stderr
    assert said in ran.stderr


@pytest.mark.parametrize(("policy", "cap", "noted"), [
    ("volatile-lru", "64mb", False), ("noeviction", "0", False),
    ("noeviction", "64mb", True), ("allkeys-random", "64mb", True), ("volatile-ttl", "64mb", True),
    ("volatile-ttl", "0", False),  # no maxmemory: nothing is ever evicted (review "diff51b")
])
def test_online_notes_a_redis_memory_policy_that_loses_the_workers_keys(
        online_env: dict[str, str], stoppable_redis: StoppableRedis, policy: str, cap: str,
        noted: bool) -> None:
    """Review "redisfail51": `online OK: redis` for a Redis that, once full, refuses the
    worker's writes (noeviction with a cap: every replica on its fallback, no
    deduplication) or evicts the budget key and claims in flight first. A note, not a
    refusal: the check still passes; the README's volatile-lru is not noted."""
    import redis as sync_redis

    admin = sync_redis.Redis.from_url(stoppable_redis.url)
    admin.config_set("maxmemory-policy", policy)
    admin.config_set("maxmemory", cap)
    checked = cli(["check-config", "--online", "--timeout", "5"],
                  {**online_env, "REDIS_URL": stoppable_redis.url})
    assert checked.returncode == 0, checked.stderr
    notes = [line for line in checked.stderr.splitlines()
             if line.startswith("online note: redis:")]
    assert bool(notes) is noted, checked.stderr
    if noted:
        assert f"maxmemory-policy={policy}" in notes[0] and "volatile-lru" in notes[0]
    if policy != "allkeys-random":
        return
    # `run` warns of it at start-up too, and goes on.
    warned = _run_until_warning({**online_env, "REDIS_URL": stoppable_redis.url},
                                "start-up: Redis at")
    assert len(warned) == 1 and "maxmemory-policy=allkeys-random" in warned[0]
    assert "WARNING" in warned[0]


@pytest.mark.parametrize("refusal", ["ping-only user", "read-only replica"])
def test_online_refuses_a_redis_that_answers_ping_but_not_the_workers_calls(
        online_env: dict[str, str], stoppable_redis: StoppableRedis, refusal: str) -> None:
    """Review redis18: a PING passed for a user whose ACL allows nothing else and for a
    read-only replica; every replica then ran without the shared budget and deduplication."""
    import redis as sync_redis

    admin = sync_redis.Redis.from_url(stoppable_redis.url)
    url = stoppable_redis.url
    if refusal == "ping-only user":
        admin.acl_setuser("pingonly", enabled=True, passwords=["+pw-1"], keys=["*"],
                          commands=["+ping"])
        url = url.replace("redis://", "redis://pingonly:pw-1@", 1)
        expected = "NoPermissionError"
    else:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            nowhere = probe.getsockname()[1]
        admin.replicaof("127.0.0.1", nowhere)
        expected = "read-only replica"
    refused = cli(["check-config", "--online", "--timeout", "5"], {**online_env, "REDIS_URL": url})
    assert refused.returncode == 8 + 16, refused.stderr
    assert "answers PING but refused the worker's own calls" in refused.stderr
    assert expected in refused.stderr
    assert "pw-1" not in refused.stderr
    # And run does not consume on it either: it ran on its fallback for ever (review
    # "faults29": a read-only replica was check-config's refusal only). A read-only
    # replica is waited for (a failover may be under way): `--wait 0` ends that at once.
    ran = cli(["run", "--wait", "0", "--timeout", "5"],
              {**online_env, "REDIS_URL": url, "WORKER_METRICS_PORT": "0"})
    assert ran.returncode == 1, ran.stderr
    assert expected in ran.stderr and "pw-1" not in ran.stderr
    if refusal == "read-only replica":
        admin.replicaof("no", "one")
        assert cli(["check-config", "--online", "--timeout", "5"],
                   {**online_env, "REDIS_URL": url}).returncode == 0


def test_run_exits_at_once_when_the_brokers_refuse_the_security_settings(
    online_env: dict[str, str],
) -> None:
    """Review diff22b: a refused SASL login read as "not reachable", and `run` waited for
    it for ever. It is a setting: one line, exit 1."""
    security = {"KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "KAFKA_SASL_MECHANISM": "PLAIN",
                "KAFKA_SASL_USERNAME": "u", "KAFKA_SASL_PASSWORD": "pw-S3CRET"}
    started = time.monotonic()
    ran = cli(["run", "--timeout", "3"], {**online_env, **security}, timeout=60)
    assert ran.returncode == 1, ran.stderr
    assert "refused the connection" in ran.stderr and "KAFKA_SASL_" in ran.stderr
    assert "S3CRET" not in ran.stderr and "Traceback" not in ran.stderr
    assert time.monotonic() - started < 30


def test_a_redis_tls_handshake_that_fails_is_a_setting_run_refuses(
        online_env: dict[str, str], tls_redis: TlsRedis) -> None:
    """Review redis34: a certificate no configured CA signed (or for another host name)
    fails every Redis call for ever; taken as an outage, `run` ran ready without the shared
    budget and deduplication, its log saying "ConnectionError". Now check-config --online
    and run say it is TLS, why, and what to set; run exits 1. Trusted: both take it."""
    env = {**online_env, "WORKER_METRICS_PORT": "0"}
    for url, why in ((tls_redis.url(), "self-signed certificate"),
                     (tls_redis.url("127.0.0.1"), "mismatch")):
        ca = {"REDIS_TLS_CA_FILE": str(tls_redis.cert)} if "127.0.0.1" in url else {}
        checked = cli(["check-config", "--online", "--timeout", "5"],
                      {**env, "REDIS_URL": url, **ca})
        assert checked.returncode == 8 + 16, checked.stderr
        ran = cli(["run", "--wait", "0", "--timeout", "5"], {**env, "REDIS_URL": url, **ca})
        assert ran.returncode == 1, ran.stderr
        for said in (checked.stderr, ran.stderr):
            assert "the TLS handshake failed" in said and why in said, said
            assert "REDIS_TLS_CA_FILE" in said and "Traceback" not in said
    trusted = {**env, "REDIS_URL": tls_redis.url(), "REDIS_TLS_CA_FILE": str(tls_redis.cert)}
    checked = cli(["check-config", "--online", "--timeout", "5"], trusted)
    assert checked.returncode == 0 and "online OK: redis" in checked.stderr, checked.stderr
    # The plain scheme on the TLS port: reset, like an outage for run, but check-config
    # names the scheme.
    plain = cli(["check-config", "--online", "--timeout", "5"],
                {**env, "REDIS_URL": tls_redis.url(scheme="redis")})
    assert plain.returncode == 8 + 16 and "rediss:// for a TLS port" in plain.stderr
