"""A least-privilege principal on a broker with ACLs: `check-config --online` and `run` name
the operation the brokers deny and the command that grants it (review "sasl55": a group
without Read never joined, `/readyz` saying "no partition assignment yet" for ever; a DLQ
without Write passed the check and stopped delivery at the first dead letter)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from tests.integration.harness import (
    WorkerThread,
    produce,
    track_event,
    undelivered,
    wait_until,
    worker_env,
)
from tests.integration.secured_kafka import (
    HOST,
    NO_WRITE_PASSWORD,
    NO_WRITE_USER,
    USER,
    SecuredKafka,
    secured_kafka,
)
from tests.integration.test_cli_online import Sandbox, cli

__all__ = ["secured_kafka"]

_names = itertools.count()


def _env(secured: SecuredKafka, schema_registry_url: str, sandbox: Sandbox,
         grants: dict[str, tuple[str, ...]]) -> tuple[dict[str, str], str, str, str]:
    """A fresh topic, DLQ topic and group, the limited principal allowed `grants` on them
    (keys "topic", "dlq", "group"); the worker's settings, topic, DLQ topic and group."""
    n = next(_names)
    topic, dlq, group = f"acl-{n}", f"acl-{n}.dlq", f"acl-{n}-g"
    secured.create_topics(topic, dlq)
    for key, kind, name in (("topic", "topic", topic), ("dlq", "topic", dlq),
                            ("group", "group", group)):
        if grants.get(key):
            secured.allow(kind, name, *grants[key])
    server, _ = sandbox
    env = worker_env("unused:1", schema_registry_url, server.url, topic, group,
                     KAFKA_DLQ_TOPIC=dlq, **secured.client_env())
    return env, topic, dlq, group


ALL = {"topic": ("READ",), "dlq": ("WRITE", "DESCRIBE_CONFIGS"), "group": ("READ",)}


def _kafka_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines()
             if line.startswith(("online OK: kafka", "online FAILED: kafka"))]
    assert len(lines) == 1, stderr
    return lines[0]


def test_online_ok_with_the_grants_the_worker_needs(
        secured_kafka: SecuredKafka, schema_registry_url: str, sandbox: Sandbox) -> None:
    env, *_ = _env(secured_kafka, schema_registry_url, sandbox, ALL)
    result = cli(["check-config", "--online", "--timeout", "10"], env)
    assert _kafka_line(result.stderr) == "online OK: kafka", result.stderr
    assert "online note" not in result.stderr
    assert result.returncode == 0, result.stderr


def test_online_notes_a_dlq_whose_settings_it_may_not_read(
        secured_kafka: SecuredKafka, schema_registry_url: str, sandbox: Sandbox) -> None:
    env, _, dlq, _ = _env(secured_kafka, schema_registry_url, sandbox,
                          {**ALL, "dlq": ("WRITE",)})
    result = cli(["check-config", "--online", "--timeout", "10"], env)
    assert _kafka_line(result.stderr) == "online OK: kafka", result.stderr
    notes = [line for line in result.stderr.splitlines() if line.startswith("online note")]
    assert len(notes) == 1 and "settings could not be read" in notes[0], result.stderr
    assert (f"--command-config admin.properties --add --allow-principal User:{USER} "
            f"--operation DescribeConfigs --topic {dlq}") in notes[0]
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(("missing", "left", "said"), [
    ("group", (), "Read on group '{group}'"),
    ("group", ("DESCRIBE",), "Read on group '{group}'"),
    ("dlq", ("DESCRIBE",), "Write on topic '{dlq}'"),
    # No ACL at all: the brokers hide the topic (review "acl56": a DLQ so hidden passed,
    # and a source topic read "has no topic").
    ("dlq", (), "Write on topic '{dlq}'"),
    ("topic", ("DESCRIBE",), "Read on topic '{topic}'"),
    ("topic", (), "Read on topic '{topic}'"),
])
def test_online_names_the_operation_denied(
        secured_kafka: SecuredKafka, schema_registry_url: str, sandbox: Sandbox,
        missing: str, left: tuple[str, ...], said: str) -> None:
    # Describe alone: the resource is seen, not usable; nothing: not even seen.
    grants = {**ALL, missing: left}
    env, topic, dlq, group = _env(secured_kafka, schema_registry_url, sandbox, grants)
    result = cli(["check-config", "--online", "--timeout", "10"], env)
    line = _kafka_line(result.stderr)
    assert line.startswith("online FAILED: kafka: Kafka refuses the worker's principal "), line
    assert said.format(topic=topic, dlq=dlq, group=group) in line
    kind, name = {"group": ("group", group), "dlq": ("topic", dlq),
                  "topic": ("topic", topic)}[missing]
    operation = "Read" if missing != "dlq" else "Write"
    assert (f"--command-config admin.properties --add --allow-principal User:{USER} "
            f"--operation {operation} --{kind} {name}") in line, line
    assert result.returncode == 8 + 2, result.stderr


def test_a_producer_id_the_brokers_refuse_is_named_with_the_grant_that_fixes_it(
        secured_kafka: SecuredKafka) -> None:
    """Review "brokers58": brokers before Kafka 2.8 give the idempotent dead-letter producer
    its id only with IdempotentWrite on the cluster; a principal granted exactly what the
    README listed passed every check, and the first dead letter stopped its partition.
    This broker (4.1) refuses the id alike to a principal with Write on no topic."""
    import contextlib
    import time

    from confluent_kafka import KafkaError, KafkaException, Producer

    from consumer import reach
    from consumer.librdkafka import DLQ_PRODUCER, producer_settings

    conf = {"bootstrap.servers": f"{HOST}:{secured_kafka.sasl_port}",
            "security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "PLAIN",
            "sasl.username": NO_WRITE_USER, "sasl.password": NO_WRITE_PASSWORD}

    def probe(**extra: object) -> str | None:
        settings = {**producer_settings({**conf, **extra}, **DLQ_PRODUCER)}
        errors: list[KafkaError] = []
        settings["error_cb"] = errors.append
        pid = reach._ProducerId(settings)
        producer = Producer(settings)
        with contextlib.suppress(KafkaException):  # the refused id fails it fatally
            producer.list_topics(timeout=10)
        return pid.refused(producer, errors, conf, time.monotonic() + 10)

    said = probe()
    assert said is not None and "CLUSTER_AUTHORIZATION_FAILED" in said, said
    assert (f"--allow-principal User:{NO_WRITE_USER} --operation IdempotentWrite --cluster"
            in said and "KAFKA_ENABLE_IDEMPOTENCE=false" in said), said
    assert probe(**{"enable.idempotence": False}) is None  # not asked for: not judged
    # The whole check, as `run` and `check-config --online` make it: the refusal (a setting
    # to fix, not an outage to wait out), whichever request of the probe it failed first.
    checked = reach.kafka(conf, 10)
    assert checked is not None and not isinstance(checked, reach.Unreachable), checked
    assert "IdempotentWrite --cluster" in checked, checked


def test_a_replay_dry_run_needs_no_producer_id(secured_kafka: SecuredKafka) -> None:
    """Review "diff58b": a dry run builds no producer, yet the producer id's check refused
    a read-only principal (Read on the DLQ and its groups, Write on nothing): the GDPR
    runbook's look at the DLQ failed. A replay that writes still needs one."""
    from confluent_kafka.admin import (
        AclBinding,
        AclOperation,
        AclPermissionType,
        ResourcePatternType,
        ResourceType,
    )

    n = next(_names)
    source, dlq = f"ro-{n}", f"ro-{n}.dlq"
    secured_kafka.create_topics(source, dlq)
    bindings = [AclBinding(kind, name, pattern, f"User:{NO_WRITE_USER}", "*", op,
                           AclPermissionType.ALLOW)
                for kind, name, pattern, op in (
                    (ResourceType.TOPIC, dlq, ResourcePatternType.LITERAL, AclOperation.READ),
                    (ResourceType.TOPIC, dlq, ResourcePatternType.LITERAL,
                     AclOperation.DESCRIBE_CONFIGS),
                    (ResourceType.GROUP, "userpilot-replay", ResourcePatternType.PREFIXED,
                     AclOperation.READ))]
    admin = secured_kafka.admin()  # kept: a client dropped ends its requests
    for future in admin.create_acls(bindings).values():
        future.result(30)
    env = {"USERPILOT_API_KEY": "wt_1234567890", "KAFKA_TOPICS": source,
           "SCHEMA_REGISTRY_URL": "http://127.0.0.1:9",
           "KAFKA_BOOTSTRAP_SERVERS": f"{HOST}:{secured_kafka.sasl_port}",
           "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "KAFKA_SASL_MECHANISM": "PLAIN",
           "KAFKA_SASL_USERNAME": NO_WRITE_USER, "KAFKA_SASL_PASSWORD": NO_WRITE_PASSWORD}
    looked = cli(["replay", "--from", dlq, "--dry-run", "--all", "--timeout", "10"], env)
    assert looked.returncode == 0, looked.stdout + looked.stderr
    replayed = cli(["replay", "--from", dlq, "--timeout", "10"], env)
    assert replayed.returncode != 0 and "IdempotentWrite --cluster" in replayed.stderr, (
        replayed.stdout + replayed.stderr)


def test_a_producer_id_refusal_is_what_the_kafka_check_says_when_all_else_passes(
        kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`run`'s and `check-config --online`'s Kafka check ends with the producer id's verdict
    (after the ACL lines, which name a DLQ without Write more precisely)."""
    from consumer import reach

    monkeypatch.setattr(reach._ProducerId, "refused", lambda *args: "no producer id")
    assert reach.kafka({"bootstrap.servers": kafka_bootstrap}, 10) == "no producer id"
    monkeypatch.undo()
    assert reach.kafka({"bootstrap.servers": kafka_bootstrap}, 10) is None


@pytest.mark.parametrize("missing", ["group", "dlq"])
def test_run_stops_at_start_up_on_a_group_it_may_not_join_or_a_dlq_it_may_not_write(
        secured_kafka: SecuredKafka, schema_registry_url: str, sandbox: Sandbox,
        missing: str) -> None:
    env, _, dlq, group = _env(secured_kafka, schema_registry_url, sandbox,
                              {**ALL, missing: ()})
    proc = cli(["run", "--timeout", "10"], env, timeout=120)
    assert proc.returncode == 1, proc.stderr
    said = f"Read on group '{group}'" if missing == "group" else f"Write on topic '{dlq}'"
    assert said in proc.stderr, proc.stderr


def test_readiness_names_a_group_the_brokers_refuse_until_it_is_allowed(
        secured_kafka: SecuredKafka, schema_registry_url: str, sandbox: Sandbox) -> None:
    """The worker itself (past `run`'s start-up check: an ACL revoked later reads the same):
    `/readyz` said "no partition assignment yet" or "partitions lost: the group's session
    expired (Kafka unreachable or hung...)" while only the log said why (review "sasl55")."""
    env, _, _, group = _env(secured_kafka, schema_registry_url, sandbox,
                            {**ALL, "group": ("DESCRIBE",)})
    with WorkerThread(env) as w:
        wait_until(lambda: "GROUP_AUTHORIZATION_FAILED" in w.health.ready()[1], 60,
                   "readiness naming the refusal")
        assert f"Kafka refuses the consumer group {group!r}" in w.health.ready()[1]
        secured_kafka.allow("group", group, "READ")
        wait_until(lambda: w.health.ready()[0], 90, "ready once allowed")


def test_the_source_reads_which_refused_topics_its_principal_may_read_now(
        secured_kafka: SecuredKafka, schema_registry_url: str, sandbox: Sandbox) -> None:
    """`KafkaSource.readable`, the worker's look at a refused topic: granted Read while
    idle, no message told it, and the topic stayed counted missing on its owner (round
    56's "noticed"). Describe alone is not Read; a topic it may not see is not readable."""
    from consumer.kafka import KafkaSource

    _, topic, dlq, group = _env(secured_kafka, schema_registry_url, sandbox,
                                {"topic": ("DESCRIBE",), "group": ("READ",)})
    conf = {key.removeprefix("KAFKA_").lower().replace("_", "."): value
            for key, value in secured_kafka.client_env().items()}
    source = KafkaSource({**conf, "group.id": group}, [topic], on_assign=lambda _: None,
                         on_revoke=lambda _: None, on_lost=lambda _: None)
    try:
        assert source.readable([topic, dlq], 15) == set()
        secured_kafka.allow("topic", topic, "READ")
        wait_until(lambda: source.readable([topic, dlq], 15) == {topic}, 30,
                   "the granted topic readable")
    finally:
        source.close(5)


def test_a_kafka_password_rotated_while_running_restarts_the_worker_onto_the_new_one(
        secured_kafka: SecuredKafka, schema_registry_url: str, sandbox: Sandbox,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review "rotate57": the brokers changed the worker's SCRAM password and the mounted
    file followed; the worker, which reads it at start-up, was refused from the brokers'
    next check of its login and waited for ever (live, unready, nothing delivered). Now it
    stops (exit 1) once refused for LOGIN_REFUSED_STOP_S (shortened here), and the restart
    reads the new password and delivers what came meanwhile."""
    import consumer.kafka as kafka

    monkeypatch.setattr(kafka, "LOGIN_REFUSED_STOP_S", 3.0, raising=False)
    n = next(_names)
    topic, dlq, group = f"rot-{n}", f"rot-{n}.dlq", f"rot-{n}-g"
    secured_kafka.create_topics(topic, dlq)
    secured_kafka.set_scram("first-password")
    password = tmp_path / "kafka-password"
    password.write_text("first-password\n")
    server, control = sandbox
    env = worker_env("unused:1", schema_registry_url, server.url, topic, group,
                     KAFKA_DLQ_TOPIC=dlq, USERPILOT_ENSURE_USER="false",
                     **secured_kafka.scram_env(str(password)))
    admin_bootstrap = secured_kafka.admin_bootstrap
    first, second = track_event("rot-u", 1), track_event("rot-u", 2)
    produce(admin_bootstrap, schema_registry_url, topic, [first])
    with WorkerThread(env) as w:
        wait_until(lambda: not undelivered(control, [first]), 60, "delivered before")
        secured_kafka.set_scram("second-password")
        password.write_text("second-password\n")
        wait_until(lambda: not w.alive, 60, "the worker stopping on the refused login")
        assert w.exit_code == 1
    produce(admin_bootstrap, schema_registry_url, topic, [second])
    with WorkerThread(env):
        wait_until(lambda: not undelivered(control, [second]), 60, "delivered after restart")
