"""Shared fixtures: the real Kafka broker and schema registry, started lazily.

Why lazily: ``pytest tests/unit`` must stay fast and never touch a JVM. Services start only
when a test asks for ``kafka_bootstrap`` or ``schema_registry_url``, and only if the
environment does not already point at running ones (``make test`` exports both, CI too).
Whatever this session started, it stops at the end; services it found running are left alone.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient, NewTopic

REPO = Path(__file__).resolve().parent.parent


def hang_up_as_default() -> None:
    """A child's `preexec_fn`: SIGHUP's default action, as outside `nohup`. Under `nohup`
    (SIGHUP ignored, inherited by children) the commands rightly keep running at a hang-up,
    and the tests that send one failed and left their child running (review "deps56")."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)

CTL = REPO / "services" / "ctl.py"
INTEGRATION_DIR = Path(__file__).resolve().parent / "integration"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/integration/ is marked, so ``-m "not integration"`` works."""
    for item in items:
        if INTEGRATION_DIR in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.integration)


def _ctl(*args: str) -> str:
    result = subprocess.run([sys.executable, str(CTL), *args], capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"services/ctl.py {' '.join(args)} failed:\n{result.stderr}")
    return result.stdout


def _ctl_env() -> dict[str, str]:
    return dict(line.split("=", 1) for line in _ctl("env").splitlines() if "=" in line)


def _service(name: str, env_var: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Yield the address from ``env_var``, or start ``name`` and yield the address ctl prints."""
    preset = os.environ.get(env_var, "").strip()
    if preset:
        yield preset
        return
    record = tmp_path_factory.mktemp(f"services-{name}") / "started"
    _ctl("up", name, "--record", str(record))
    try:
        yield _ctl_env()[env_var]
    finally:
        _ctl("down", "--from", str(record))


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``host:port`` of a real Kafka broker."""
    yield from _service("kafka", "KAFKA_BOOTSTRAP_SERVERS", tmp_path_factory)


@pytest.fixture(scope="session")
def schema_registry_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL of a real Confluent-compatible schema registry (Apicurio's ccompat API)."""
    yield from _service("registry", "SCHEMA_REGISTRY_URL", tmp_path_factory)


def create_topic(bootstrap: str, name: str, partitions: int = 1, timeout: float = 30.0,
                 config: Mapping[str, str] | None = None) -> str:
    """Create ``name`` (with topic ``config``) and wait until every partition has a leader,
    so producers never race it."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(name, num_partitions=partitions,
                                            replication_factor=1, config=dict(config or {}))])
    futures[name].result(timeout=timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        topic = admin.list_topics(topic=name, timeout=5).topics.get(name)
        if (topic is not None and topic.error is None and len(topic.partitions) == partitions
                and all(p.leader >= 0 for p in topic.partitions.values())):
            return name
        time.sleep(0.1)
    raise TimeoutError(f"topic {name} has no leaders after {timeout}s")


def delete_topic(bootstrap: str, name: str, timeout: float = 30.0) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.delete_topics([name])[name].result(timeout=timeout)


def _topic_name(request: pytest.FixtureRequest, suffix: str = "") -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", request.node.name)[:80].strip("-.")
    return f"t-{base}{suffix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def topic_factory(
    kafka_bootstrap: str, request: pytest.FixtureRequest
) -> Iterator[Callable[..., str]]:
    """``make(partitions=1, suffix="", config=None)`` creates a fresh topic; all are deleted
    after the test."""
    created: list[str] = []

    def make(partitions: int = 1, suffix: str = "",
             config: Mapping[str, str] | None = None) -> str:
        name = create_topic(kafka_bootstrap, _topic_name(request, suffix), partitions,
                            config=config)
        created.append(name)
        return name

    yield make
    for name in created:
        try:
            delete_topic(kafka_bootstrap, name)
        except Exception as exc:  # cleanup only: a fresh cluster per session bounds the cost
            print(f"could not delete topic {name}: {exc}", file=sys.stderr)


@pytest.fixture
def unique_topic(topic_factory: Callable[..., str], request: pytest.FixtureRequest) -> str:
    """A fresh topic for this test; partitions via ``indirect`` parametrisation (default 1)."""
    partitions = int(getattr(request, "param", 1))
    return topic_factory(partitions)
