"""A second real broker with ACLs (KRaft, StandardAuthorizer) and a SASL/PLAIN and SCRAM
listener.

The shared broker has no authorizer: what a least-privilege principal meets (a group it may
not join, a DLQ it may not write) cannot be seen there. This one has two client listeners:
SASL_PLAINTEXT for the principals the tests log in as, and PLAINTEXT, whose ANONYMOUS
principal is a super user, for the tests' own admin work (topics, ACLs). SCRAM users, whose
passwords the tests change, are super users too; every login is checked again each
REAUTH_MS (KIP-368), so a changed password is refused within seconds. Started once per
test module that asks for it, from the jars `services/ctl.py` already fetched.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
from confluent_kafka.admin import (
    AclBinding,
    AclOperation,
    AclPermissionType,
    AdminClient,
    ResourcePatternType,
    ResourceType,
)

from tests.integration.harness import REPO, free_port

HOST = "127.0.0.1"
USER, PASSWORD = "limited", "limited-secret"
NO_WRITE_USER, NO_WRITE_PASSWORD = "nowrite", "nowrite-secret"  # granted nothing, ever
SCRAM_USER = "rotor"  # a super user logging in with SCRAM-SHA-256 (`SecuredKafka.set_scram`)
REAUTH_MS = 4000


def _ctl() -> ModuleType:
    spec = importlib.util.spec_from_file_location("userpilot_services_ctl",
                                                  REPO / "services" / "ctl.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class SecuredKafka:
    sasl_port: int
    admin_port: int

    @property
    def admin_bootstrap(self) -> str:
        return f"{HOST}:{self.admin_port}"

    def client_env(self) -> dict[str, str]:
        """The worker's KAFKA_* settings to log in as the limited principal."""
        return {"KAFKA_BOOTSTRAP_SERVERS": f"{HOST}:{self.sasl_port}",
                "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "KAFKA_SASL_MECHANISM": "PLAIN",
                "KAFKA_SASL_USERNAME": USER, "KAFKA_SASL_PASSWORD": PASSWORD}

    def admin(self) -> AdminClient:
        return AdminClient({"bootstrap.servers": self.admin_bootstrap})

    def create_topics(self, *names: str) -> None:
        from confluent_kafka.admin import NewTopic

        admin = self.admin()  # kept: a client dropped ends its requests
        for future in admin.create_topics([NewTopic(name, 1, 1) for name in names]).values():
            future.result(30)

    def scram_env(self, password_file: str) -> dict[str, str]:
        """The worker's KAFKA_* settings to log in as the SCRAM user, its password read
        from `password_file`."""
        return {"KAFKA_BOOTSTRAP_SERVERS": f"{HOST}:{self.sasl_port}",
                "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
                "KAFKA_SASL_MECHANISM": "SCRAM-SHA-256", "KAFKA_SASL_USERNAME": SCRAM_USER,
                "KAFKA_SASL_PASSWORD_FILE": password_file}

    def set_scram(self, password: str) -> None:
        """Create the SCRAM user, or change its password (the brokers refuse the old one
        from their next check of each login)."""
        from confluent_kafka.admin import (
            ScramCredentialInfo,
            ScramMechanism,
            UserScramCredentialUpsertion,
        )

        upsert = UserScramCredentialUpsertion(
            SCRAM_USER, ScramCredentialInfo(ScramMechanism.SCRAM_SHA_256, 4096),
            password.encode())
        admin = self.admin()
        for future in admin.alter_user_scram_credentials([upsert]).values():
            future.result(30)

    def allow(self, kind: str, name: str, *operations: str) -> None:
        """Allow the limited principal `operations` (`READ`, `WRITE`, `DESCRIBE`) on the
        topic or group `name` (literal)."""
        rtype = {"topic": ResourceType.TOPIC, "group": ResourceType.GROUP}[kind]
        bindings = [AclBinding(rtype, name, ResourcePatternType.LITERAL, f"User:{USER}", "*",
                               getattr(AclOperation, op), AclPermissionType.ALLOW)
                    for op in operations]
        admin = self.admin()
        for future in admin.create_acls(bindings).values():
            future.result(30)


def _properties(root: Path, ports: tuple[int, int, int]) -> str:
    sasl, plain, controller = ports
    jaas = ("org.apache.kafka.common.security.plain.PlainLoginModule required "
            f'user_{USER}="{PASSWORD}" user_{NO_WRITE_USER}="{NO_WRITE_PASSWORD}";')
    return "\n".join([
        "process.roles=broker,controller",
        "node.id=1",
        f"listeners=SASL_PLAINTEXT://{HOST}:{sasl},PLAINTEXT://{HOST}:{plain},"
        f"CONTROLLER://{HOST}:{controller}",
        f"advertised.listeners=SASL_PLAINTEXT://{HOST}:{sasl},PLAINTEXT://{HOST}:{plain}",
        "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,"
        "SASL_PLAINTEXT:SASL_PLAINTEXT",
        "inter.broker.listener.name=PLAINTEXT",
        "controller.listener.names=CONTROLLER",
        f"controller.quorum.bootstrap.servers={HOST}:{controller}",
        f"log.dirs={root / 'data'}",
        "num.partitions=1",
        "auto.create.topics.enable=false",
        "offsets.topic.replication.factor=1",
        "offsets.topic.num.partitions=1",
        "transaction.state.log.replication.factor=1",
        "transaction.state.log.min.isr=1",
        "share.coordinator.state.topic.replication.factor=1",
        "share.coordinator.state.topic.min.isr=1",
        "group.initial.rebalance.delay.ms=0",
        "sasl.enabled.mechanisms=PLAIN,SCRAM-SHA-256",
        f"listener.name.sasl_plaintext.plain.sasl.jaas.config={jaas}",
        "listener.name.sasl_plaintext.scram-sha-256.sasl.jaas.config="
        "org.apache.kafka.common.security.scram.ScramLoginModule required;",
        f"connections.max.reauth.ms={REAUTH_MS}",
        "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        f"super.users=User:ANONYMOUS;User:{SCRAM_USER}",
        "",
    ])


@pytest.fixture(scope="module")
def secured_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecuredKafka]:
    root = tmp_path_factory.mktemp("secured-kafka")
    ports = (free_port(), free_port(), free_port())
    props = root / "server.properties"
    props.write_text(_properties(root, ports))
    ctl = _ctl()  # the shared broker's java command, cluster id and readiness probe
    command = [*ctl._java("KAFKA_JAVA_OPTS", "384m"), f"-Dkafka.logs.dir={root}",
               "-cp", f"{ctl.kafka_libs()}/*"]
    log = (root / "console.log").open("w")
    subprocess.run([*command, "kafka.tools.StorageTool", "format", "--standalone", "-t",
                    ctl._random_cluster_id(), "-c", str(props)],
                   stdout=log, stderr=subprocess.STDOUT, check=True)
    proc = subprocess.Popen([*command, "kafka.Kafka", str(props)], stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not ctl._kafka_metadata(ports[1]):
            assert proc.poll() is None, f"the secured broker exited; see {root / 'console.log'}"
            assert time.monotonic() < deadline, "the secured broker did not start in 120 s"
            time.sleep(0.5)
        yield SecuredKafka(sasl_port=ports[0], admin_port=ports[1])
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
