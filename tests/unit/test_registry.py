"""Unit tests for consumer.registry: bounded calls, a log line, and a state for readiness."""

from __future__ import annotations

import json
import logging
from typing import Any

import httpx
import pytest
from confluent_kafka.schema_registry import RegisteredSchema, Schema
from confluent_kafka.schema_registry.error import SchemaRegistryError

from consumer.codec import SCHEMA, SCHEMA_TEXT
from consumer.registry import DEFAULT_TIMEOUT_S, Registry


class FakeClient:
    """Raises the queued errors in turn, then answers with the Signal schema."""

    def __init__(self, errors: list[BaseException]) -> None:
        self.errors = errors
        self.calls = 0

    def get_schema(self, schema_id: int) -> Schema:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return Schema(SCHEMA_TEXT, "AVRO")

    def register_schema(self, subject: str, schema: Schema) -> int:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return 7


class Clock:
    now = 50.0

    def __call__(self) -> float:
        return self.now


def make(errors: list[BaseException]) -> tuple[Registry, FakeClient, Clock]:
    client, clock = FakeClient(errors), Clock()
    return Registry("http://unused", client=client, clock=clock), client, clock


def test_the_client_is_built_with_a_timeout_and_no_hidden_retries() -> None:
    registry = Registry("http://127.0.0.1:1/apis/ccompat/v7", timeout_s=1.5)
    rest: Any = registry._client._rest_client
    assert (rest.timeout, rest.max_retries) == (1.5, 0)
    assert Registry("http://127.0.0.1:1").timeout_s == DEFAULT_TIMEOUT_S == 5.0


def test_a_registry_that_does_not_answer_logs_once_and_turns_unhealthy(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry, client, clock = make([httpx.ReadTimeout("timed out")] * 3)
    assert registry.healthy and registry.last_error is None
    with caplog.at_level(logging.WARNING, logger="consumer.registry"):
        for _ in range(3):
            with pytest.raises(httpx.ReadTimeout):
                registry.writer_schema(1)
            clock.now += 10
        assert not registry.healthy
        assert registry.last_error == "get schema 1: ReadTimeout: timed out"
        assert registry.problem() == (
            "schema registry does not answer (get schema 1: ReadTimeout: timed out)")
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and "schema registry does not answer" in errors[0].message
        assert registry.writer_schema(1) == SCHEMA  # it answers again
    assert registry.healthy and registry.last_error is None
    assert registry.failing_since is None and registry.problem() is None
    recovered = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert recovered == ["schema registry answers again (after 30.0 s)"]
    assert client.calls == 4


def test_a_server_error_is_unhealthy_and_a_not_found_is_an_answer() -> None:
    registry, _, _ = make([SchemaRegistryError(503, 50301, "unavailable"),
                           SchemaRegistryError(404, 40403, "not found")])
    with pytest.raises(SchemaRegistryError):
        registry.writer_schema(3)
    assert not registry.healthy
    with pytest.raises(KeyError):
        registry.writer_schema(3)
    assert registry.healthy


def test_register_goes_through_the_same_bookkeeping() -> None:
    registry, _, _ = make([ConnectionRefusedError("refused")])
    with pytest.raises(ConnectionRefusedError):
        registry.register("topic-a")
    assert registry.last_error == "register: ConnectionRefusedError: refused"
    assert registry.register("topic-a") == 7
    assert registry.healthy
    assert registry.cached(7) == SCHEMA


def test_a_cached_schema_needs_no_registry() -> None:
    registry, client, _ = make([])
    registry.writer_schema(5)
    client.errors = [httpx.ReadTimeout("frozen")]
    assert registry.writer_schema(5) == SCHEMA
    assert registry.healthy and client.calls == 1
    assert json.loads(SCHEMA_TEXT)["name"]


def test_credentials_never_reach_the_error_state() -> None:
    client = FakeClient([RuntimeError("401 for user:s3cr3t-pass at http://reg")])
    registry = Registry("http://unused", "user:s3cr3t-pass", client=client)
    with pytest.raises(RuntimeError):
        registry.writer_schema(1)
    assert registry.last_error is not None
    assert "s3cr3t" not in registry.last_error and "***" in registry.last_error


class LatestClient:
    """Knows the latest schema of some subjects; fails for the others like a registry."""

    def __init__(self, latest: dict[str, tuple[int, str]]) -> None:
        self.latest = latest
        self.asked: list[str] = []

    def get_latest_version(self, subject: str) -> RegisteredSchema:
        self.asked.append(subject)
        if subject == "down-value":
            raise httpx.ConnectError("connection refused")
        if subject not in self.latest:
            raise SchemaRegistryError(404, 40401, "Subject not found")
        schema_id, text = self.latest[subject]
        return RegisteredSchema(subject=subject, version=1, schema_id=schema_id, guid=None,
                                schema=Schema(text, "AVRO"))

    def get_schema(self, schema_id: int) -> Schema:
        raise AssertionError("prefetched: no fetch by id")


def test_prefetch_caches_each_topics_latest_schema_and_ignores_failures() -> None:
    other = json.dumps({"type": "record", "name": "Other", "fields": [
        {"name": "type", "type": "string"}]})
    client = LatestClient({"signal-value": (7, SCHEMA_TEXT), "other-value": (9, other)})
    registry = Registry("http://unused", client=client)
    registry.prefetch(["signal", "down", "missing", "other"])
    assert client.asked == ["signal-value", "down-value", "missing-value", "other-value"]
    assert registry.cached(7) is SCHEMA  # our own schema: the codec skips resolution
    assert registry.writer_schema(7) is SCHEMA
    other_parsed = registry.cached(9)
    assert other_parsed is not None and other_parsed["name"] == "Other"
    assert registry.cached(8) is None
    # A best-effort start-up step: an unreachable registry changes no readiness here.
    assert registry.healthy and registry.problem() is None
