"""The command line: check-config and explain, without services."""

from __future__ import annotations

import io
import json
import sys

import pytest

from consumer.__main__ import main

GOOD = {
    "USERPILOT_API_KEY": "wt-secret-123",
    "USERPILOT_ANALYTICS_ENDPOINT": "analytex-eu.userpilot.io",
    "KAFKA_BOOTSTRAP_SERVERS": "kafka:9092",
    "KAFKA_TOPICS": "delivery-userpilot",
    "KAFKA_SASL_PASSWORD": "kafka-secret-456",
    "SCHEMA_REGISTRY_URL": "http://user:reg-secret-789@registry:8081",
}


def _env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for name in list(__import__("os").environ):
        if name.startswith(("USERPILOT_", "KAFKA_", "SCHEMA_REGISTRY", "WORKER_")):
            monkeypatch.delenv(name, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def test_check_config_prints_the_effective_configuration_without_secrets(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    _env(monkeypatch, GOOD)
    assert main(["check-config"]) == 0
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert doc["userpilot"]["track_url"] == "https://analytex-eu.userpilot.io/v1/track"
    assert doc["kafka"]["dlq_topic"] == "delivery-userpilot.userpilot.dlq"
    assert doc["kafka"]["extra"]["sasl.password"] == "***"
    for secret in ("wt-secret-123", "kafka-secret-456", "reg-secret-789"):
        assert secret not in out + err
    assert "configuration OK" in err


def test_check_config_lists_every_problem_and_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    _env(monkeypatch, {**GOOD, "USERPILOT_ANALYTICS_ENDPOINT": "https://analytex.userpilot.io/v1",
                       "WORKER_MAX_IN_FLIGHT": "lots", "KAFKA_TOPICS": ""})
    assert main(["check-config"]) == 2
    _, err = capsys.readouterr()
    assert "enter the host only, e.g. 'analytex.userpilot.io'" in err
    assert "WORKER_MAX_IN_FLIGHT='lots' is not a whole number" in err
    assert "KAFKA_TOPICS is not set" in err
    assert "wt-secret-123" not in err


def test_explain_needs_no_connection_settings_and_redacts_the_token(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    _env(monkeypatch, {"USERPILOT_API_KEY": "wt-secret-123"})
    event = {"type": "track", "event": "Feature Used", "userId": "user_001",
             "properties": {"feature": "export_csv", "feature_id": "feat_017",
                            "context": "reports_dashboard"},
             "context": {"consent": {"analytics": True}}, "messageId": "m-1"}
    anonymous = {**event, "userId": None, "messageId": "m-2"}
    monkeypatch.setattr(sys, "stdin", io.StringIO(
        json.dumps(event) + "\n" + json.dumps(anonymous) + "\nnot json\n"))
    assert main(["explain"]) == 0
    out = capsys.readouterr().out
    lines = [json.loads(x) for x in out.splitlines()]
    assert lines[0]["decision"] == "deliver"
    assert lines[0]["request"]["headers"]["Authorization"] == "Token ***"
    assert lines[0]["request"]["body"] == {
        "user_id": "user_001", "event_name": "feature_used",
        "metadata": {"feature": "export_csv", "feature_id": "feat_017",
                     "context": "reports_dashboard"}}
    assert lines[1] == {"messageId": "m-2", "decision": "drop", "reason": "anonymous"}
    assert lines[2]["decision"] == "dead_letter" and lines[2]["line"] == 3
    assert "wt-secret-123" not in out
