from __future__ import annotations

import random

import pytest

from consumer.sandbox.faults import Action, FaultConfig, FaultError, FaultState, Rule, parse_action


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("500", Action("status", status=500, text="500")),
        (429, Action("status", status=429, text="429")),
        ("202", Action("pass", status=202, text="202")),
        ("pass", Action("pass", text="pass")),
        ("reset", Action("reset", text="reset")),
        ("RESET", Action("reset", text="reset")),
        ("hang", Action("hang", text="hang")),
        ("timeout", Action("hang", text="timeout")),
        ("timeout:2000", Action("timeout", ms=2000.0, text="timeout:2000")),
        ("delay:150", Action("delay", ms=150.0, text="delay:150")),
    ],
)
def test_parse_action(raw: object, expected: Action) -> None:
    assert parse_action(raw) == expected


@pytest.mark.parametrize(
    "raw", ["", "600", "99", "boom", "timeout:x", "timeout:-1", "delay", "reset:1", None, 1.5]
)
def test_parse_action_rejects_unknown(raw: object) -> None:
    with pytest.raises(FaultError):
        parse_action(raw)


def test_only_pass_and_delay_handle_normally() -> None:
    assert parse_action("202").handles_normally
    assert parse_action("delay:5").handles_normally
    assert not parse_action("500").handles_normally
    assert not parse_action("timeout:5").handles_normally


def test_merged_replaces_only_given_keys() -> None:
    base = FaultConfig().merged({"error_rate": 0.5, "latency_ms": 10})
    merged = base.merged({"jitter_ms": 5, "error_codes": ["503", 500]})
    assert merged.error_rate == 0.5
    assert merged.latency_ms == 10
    assert merged.jitter_ms == 5
    assert merged.error_codes == (503, 500)


@pytest.mark.parametrize(
    "raw",
    [
        {"error_rate": 1.5},
        {"error_rate": -0.1},
        {"reset_rate": "0.5"},
        {"latency_ms": -1},
        {"error_codes": []},
        {"error_codes": [700]},
        {"script": "500"},
        {"script": ["nope"]},
        {"rules": [{"action": "400"}]},
        {"rules": [{"event_name": "x"}]},
        {"rules": [{"event_name": "x", "action": "400", "times": -1}]},
        {"rules": [{"event_name": "x", "action": "400", "colour": "red"}]},
        {"surprise": 1},
    ],
)
def test_merged_rejects_bad_settings(raw: dict[str, object]) -> None:
    with pytest.raises(FaultError):
        FaultConfig().merged(raw)


def test_script_is_consumed_in_order() -> None:
    state = FaultState(FaultConfig().merged({"script": ["500", "reset", "202"]}))
    kinds = [state.next_scripted() for _ in range(4)]
    assert [a.text if a else None for a in kinds] == ["500", "reset", "202", None]


def test_update_keeps_consumed_script_unless_script_given() -> None:
    state = FaultState(FaultConfig().merged({"script": ["500", "502"]}))
    state.next_scripted()
    state.update({"error_rate": 0.1})
    assert [a.text for a in state.script] == ["502"]
    state.update({"script": ["503"]})
    assert [a.text for a in state.script] == ["503"]


def test_rules_match_fields_and_count_down() -> None:
    rule = Rule.from_json({"event_name": "bad", "action": "400", "times": 2})
    state = FaultState(FaultConfig(rules=(rule,)))
    body = {"user_id": "u", "event_name": "bad"}
    assert state.match_rule("/v1/track", {"user_id": "u", "event_name": "good"}) is None
    assert state.match_rule("/v1/track", body) == parse_action("400")
    assert state.match_rule("/v1/track", body) == parse_action("400")
    assert state.match_rule("/v1/track", body) is None


def test_rule_without_times_fires_forever_and_respects_path_and_user() -> None:
    rule = Rule.from_json({"user_id": "u1", "path": "/v1/track", "action": "reset"})
    state = FaultState(FaultConfig(rules=(rule,)))
    for _ in range(100):
        assert state.match_rule("/v1/track", {"user_id": "u1"}) == parse_action("reset")
    assert state.match_rule("/v1/identify", {"user_id": "u1"}) is None
    assert state.match_rule("/v1/track", {"user_id": "u2"}) is None


def test_random_faults_follow_configured_rates() -> None:
    config = FaultConfig().merged({"error_rate": 0.3, "error_codes": [502]})
    state = FaultState(config, random.Random(7))
    draws = [state.random_fault() for _ in range(10_000)]
    errors = [d for d in draws if d is not None]
    assert 2700 < len(errors) < 3300
    assert {d.status for d in errors} == {502}


def test_reset_rate_and_zero_rates() -> None:
    assert all(FaultState(FaultConfig()).random_fault() is None for _ in range(1000))
    state = FaultState(FaultConfig(reset_rate=1.0), random.Random(1))
    assert state.random_fault() == Action("reset", text="reset")


def test_latency_is_fixed_plus_bounded_jitter() -> None:
    state = FaultState(FaultConfig(latency_ms=100, jitter_ms=50), random.Random(3))
    samples = [state.latency_seconds() for _ in range(1000)]
    assert all(0.1 <= s <= 0.15 for s in samples)
    assert max(samples) - min(samples) > 0.04


def test_to_json_shows_remaining_script_and_rule_counts() -> None:
    rule = Rule.from_json({"event_name": "x", "action": "500", "times": 1})
    state = FaultState(FaultConfig(script=(parse_action("reset"),), rules=(rule,)))
    state.match_rule("/v1/track", {"event_name": "x"})
    view = state.to_json()
    assert view["script"] == ["reset"]
    assert view["rules"][0]["remaining"] == 0
    assert view["rules"][0]["action"] == "500"


@pytest.mark.parametrize("seconds", [float("nan"), float("inf"), 0, -1, 1e9])
def test_a_phase_lasts_a_finite_positive_time(seconds: float) -> None:
    """NaN skipped the phase and every later one silently; inf never ended (review
    diff25b)."""
    from consumer.sandbox.faults import FaultError, Phase

    with pytest.raises(FaultError, match="phase seconds"):
        Phase.from_json({"seconds": seconds, "action": "503"})
