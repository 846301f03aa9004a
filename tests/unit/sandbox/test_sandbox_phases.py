"""Sandbox fault modes for outage tests: timed outages, flaky phases, echoing error bodies."""

from __future__ import annotations

import json
import random
from collections import Counter
from typing import Any

import pytest

from consumer.sandbox.app import SandboxApp
from consumer.sandbox.config import SandboxConfig
from consumer.sandbox.faults import FaultConfig, FaultError, FaultState, Phase, echo_request
from consumer.sandbox.http import Request, Response

WRITE = "Token sandbox-write-token"
HEADERS = {"authorization": WRITE, "x-api-version": "2020-09-22",
           "content-type": "application/json"}
TRACK = {"user_id": "u1", "event_name": "feature_used", "metadata": {"feature": "export"}}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def state(raw: dict[str, Any], clock: FakeClock) -> FaultState:
    faults = FaultState(rng=random.Random(3), clock=clock)
    faults.update(raw)
    return faults


def test_a_timed_outage_then_healthy() -> None:
    clock = FakeClock()
    faults = state({"phases": [{"seconds": 60, "action": "503"}]}, clock)
    action = faults.random_fault()
    assert action is not None and (action.kind, action.status) == ("status", 503)
    clock.now += 59.9
    assert faults.random_fault() is not None
    clock.now += 0.2
    assert faults.random_fault() is None  # over: the (fault-free) base config applies
    assert faults.to_json()["phase"] is None


def test_phases_follow_one_another_and_replace_the_random_faults() -> None:
    clock = FakeClock()
    faults = state({"error_rate": 1.0, "error_codes": [500], "phases": [
        {"seconds": 10, "action": "reset"},
        {"seconds": 100, "error_rate": 0.3, "error_codes": [503]},
        {"seconds": 10},  # healthy
    ]}, clock)
    first = faults.random_fault()
    assert first is not None and first.kind == "reset"
    clock.now += 10
    drawn = Counter(getattr(faults.random_fault(), "status", None) for _ in range(2000))
    assert set(drawn) == {503, None}
    assert 0.25 < drawn[503] / 2000 < 0.35
    assert faults.to_json()["phase"] == {"index": 1, "seconds_left": 100.0}
    clock.now += 100
    assert all(faults.random_fault() is None for _ in range(100))
    clock.now += 10
    after = faults.random_fault()
    assert after is not None and after.status == 500  # the base config again


def test_setting_phases_restarts_their_timeline_and_clear_ends_them() -> None:
    clock = FakeClock()
    faults = state({"phases": [{"seconds": 5, "action": "502"}]}, clock)
    clock.now += 100
    assert faults.random_fault() is None
    faults.update({"phases": [{"seconds": 5, "action": "502"}]})
    assert faults.random_fault() is not None
    faults.update({"error_rate": 0.0})  # other keys leave the timeline alone
    assert faults.random_fault() is not None
    faults.load(FaultConfig())
    assert faults.random_fault() is None


@pytest.mark.parametrize("phase", [
    {"action": "503"}, {"seconds": 0, "action": "503"}, {"seconds": True},
    {"seconds": 5, "action": "delay:100"}, {"seconds": 5, "action": "503", "error_rate": 0.1},
    {"seconds": 5, "error_rate": 2}, {"seconds": 5, "error_codes": []}, {"seconds": 5, "x": 1},
    "503",
])
def test_invalid_phases_are_refused(phase: object) -> None:
    with pytest.raises(FaultError):
        FaultConfig().merged({"phases": [phase]})


def test_phase_json_round_trip() -> None:
    cfg = FaultConfig().merged({"phases": [
        {"seconds": 2, "action": "timeout:500"}, {"seconds": 3, "error_rate": 0.5},
        {"seconds": 4, "action": "pass"}], "echo_errors": True})
    assert [p.to_json() for p in cfg.phases] == [
        {"seconds": 2.0, "action": "timeout:500"},
        {"seconds": 3.0, "error_rate": 0.5, "error_codes": [500, 502, 503], "reset_rate": 0.0},
        {"seconds": 4.0, "error_rate": 0.0, "error_codes": [500, 502, 503], "reset_rate": 0.0},
    ]
    assert cfg.echo_errors is True
    assert Phase.from_json({"seconds": 1, "action": "pass"}).action is None
    with pytest.raises(FaultError):
        FaultConfig().merged({"echo_errors": "yes"})


def test_echo_request_puts_the_request_first_in_the_body() -> None:
    request = Request("POST", "/v1/track", {}, {"authorization": "Token abc"}, b'{"x":1}')
    echoed = echo_request(Response(503, b'{"errors":[{"error":"down"}]}',
                                   {"retry-after": "1"}), request)
    doc = json.loads(echoed.body)
    assert list(doc) == ["echo", "errors"]
    assert doc["echo"]["headers"] == {"authorization": "Token abc"}
    assert doc["echo"]["body"] == '{"x":1}'
    assert (echoed.status, echoed.headers) == (503, {"retry-after": "1"})
    assert json.loads(echo_request(Response(500, b"plain"), request).body)["error"] == "plain"


def _app() -> tuple[SandboxApp, FakeClock]:
    clock = FakeClock()
    app = SandboxApp(SandboxConfig(write_tokens=("sandbox-write-token",)), clock=clock,
                     rng=random.Random(1))
    return app, clock


def _post(app: SandboxApp, headers: dict[str, str] = HEADERS) -> Response:
    outcome = app.handle(Request("POST", "/v1/track", {}, headers,
                                 json.dumps(TRACK).encode()))
    assert outcome.response is not None
    return outcome.response


def _control(app: SandboxApp, method: str, body: dict[str, Any] | None = None) -> Any:
    outcome = app.handle(Request(method, "/_sandbox/faults", {}, {},
                                 json.dumps(body or {}).encode()))
    assert outcome.response is not None
    return outcome.response.status, json.loads(outcome.response.body)


def test_the_app_runs_phases_on_its_clock_and_the_control_api_sets_them() -> None:
    app, clock = _app()
    code, view = _control(app, "PUT", {"phases": [{"seconds": 30, "action": "503"}]})
    assert code == 200 and view["phase"] == {"index": 0, "seconds_left": 30.0}
    assert _post(app).status == 503
    clock.now += 31
    assert _post(app).status == 202
    code, view = _control(app, "PUT", {"phases": [{"seconds": 1, "action": "wrong"}]})
    assert code == 400 and "unknown action" in json.dumps(view)


def test_the_app_echoes_error_requests_only_when_asked() -> None:
    app, _ = _app()
    assert WRITE not in _post(app, {**HEADERS, "x-api-version": "1999"}).body.decode()
    _control(app, "PUT", {"echo_errors": True, "phases": [{"seconds": 10, "action": "502"}]})
    body = _post(app).body.decode()
    assert WRITE in body and body.index(WRITE) < 1024
    assert _post(app, {**HEADERS, "authorization": "Token wrong"}).status == 502
    _control(app, "DELETE")
    assert _post(app).status == 202
    assert WRITE not in _post(app, {**HEADERS, "x-api-version": "1999"}).body.decode()
