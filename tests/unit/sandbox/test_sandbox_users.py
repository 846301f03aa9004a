"""The sandbox as a Userpilot account: identify, company identify, delete, attribution,
and the per-family rate limits."""

from __future__ import annotations

import json
import random
from typing import Any
from urllib.parse import parse_qs

import pytest

from consumer.sandbox.app import Outcome, SandboxApp
from consumer.sandbox.config import SandboxConfig
from consumer.sandbox.directory import Directory
from consumer.sandbox.http import Request
from consumer.sandbox.ratelimit import FamilyLimiter
from consumer.sandbox.validation import validate_body

HEADERS = {
    "authorization": "Token sandbox-write-token",
    "x-api-version": "2020-09-22",
    "content-type": "application/json",
}
TRACK = {"user_id": "u1", "event_name": "feature_used", "metadata": {"feature": "export"}}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_app(**config: Any) -> tuple[SandboxApp, FakeClock]:
    clock = FakeClock()
    app = SandboxApp(SandboxConfig(**config), clock=clock, wall_clock=lambda: 42.0,
                     rng=random.Random(1))
    return app, clock


def post(app: SandboxApp, path: str = "/v1/track", body: Any = TRACK,
         headers: dict[str, str] | None = None, method: str = "POST") -> Outcome:
    raw = json.dumps(body).encode()
    return app.handle(Request(method, path, {}, HEADERS if headers is None else headers, raw))


def status(outcome: Outcome) -> int:
    assert outcome.kind == "respond" and outcome.response is not None
    return outcome.response.status


def error_code(outcome: Outcome) -> str:
    assert outcome.response is not None
    code: str = json.loads(outcome.response.body)["errors"][0]["error_code"]
    return code


def control(app: SandboxApp, method: str, route: str, body: Any = None) -> Any:
    raw = b"" if body is None else json.dumps(body).encode()
    outcome = app.handle(Request(method, f"/_sandbox/{route}", parse_qs(""), {}, raw))
    assert outcome.response is not None
    return outcome.response.status, json.loads(outcome.response.body)


def delete(app: SandboxApp, users: Any, headers: dict[str, str] | None = None) -> Any:
    return post(app, "/v1/users", {"users": users} if not isinstance(users, dict) else users,
                headers=headers, method="DELETE")


def body_of(outcome: Any) -> Any:
    return json.loads(outcome.response.body)


# ---------------------------------------------------------------------------- endpoints


def test_track_for_an_unknown_user_is_202_but_unattributed() -> None:
    app, _ = make_app()
    assert status(post(app)) == 202
    assert status(post(app, "/v1/identify", {"user_id": "u1"})) == 202
    assert status(post(app)) == 202
    tracks = app.recorder.select("/v1/track")
    assert [r["attributed"] for r in tracks] == [False, True]
    stats = app.stats()
    assert (stats["attributed"], stats["unattributed"], stats["users"]) == (1, 1, 1)


def test_identify_merges_metadata_and_attaches_the_company() -> None:
    app, _ = make_app()
    post(app, "/v1/identify", {"user_id": "u1", "metadata": {"plan": "free", "n": 1}})
    post(app, "/v1/identify", {"user_id": "u1", "metadata": {"plan": "pro"},
                               "company": {"id": "acme", "name": "Acme"}})
    assert app.directory.users_view() == {
        "u1": {"metadata": {"plan": "pro", "n": 1}, "company": "acme"}}
    assert app.directory.companies_view() == {
        "acme": {"metadata": {"name": "Acme"}, "users": ["u1"]}}


def test_company_identify_answers_200_and_keeps_the_company() -> None:
    app, _ = make_app()
    outcome = post(app, "/v1/companies/identify", {"company_id": "c1", "metadata": {"n": 5}})
    assert status(outcome) == 200
    post(app, "/v1/identify", {"user_id": "u1", "company": {"company_id": "c1"}})
    assert control(app, "GET", "companies") == (
        200, {"c1": {"metadata": {"n": 5}, "users": ["u1"]}})
    assert control(app, "GET", "users")[1]["u1"]["company"] == "c1"


def test_delete_users_answers_202_and_removes_them() -> None:
    app, _ = make_app()
    for user in ("a", "b", "c"):
        post(app, "/v1/identify", {"user_id": user})
    outcome = delete(app, ["a", "c", "nobody"])
    assert status(outcome) == 202
    assert body_of(outcome) == {"status": "accepted",
                                "message": "3 users scheduled for deletion"}
    assert sorted(app.directory.users) == ["b"]
    record = app.recorder.select("/v1/users")[0]
    assert (record["method"], record["body"], record["deleted"]) == (
        "DELETE", {"users": ["a", "c", "nobody"]}, 2)
    assert app.stats()["deleted_users"] == 2


@pytest.mark.parametrize(("body", "code"), [
    ({}, "missing_field"),
    ({"users": []}, "invalid_field"),
    ({"users": "a"}, "invalid_field"),
    ({"users": ["a", ""]}, "invalid_field"),
    ({"users": ["a", 1]}, "invalid_field"),
])
def test_delete_users_body_is_validated(body: dict[str, Any], code: str) -> None:
    app, _ = make_app(delete_interval_seconds=0)
    assert error_code(delete(app, body)) == code
    assert app.recorder.select() == []


def test_delete_users_needs_auth_and_headers_like_track() -> None:
    app, _ = make_app(delete_interval_seconds=0)
    assert status(delete(app, ["a"], headers={**HEADERS, "authorization": "Token x"})) == 401
    read = delete(app, ["a"], headers={**HEADERS, "authorization": "Token sandbox-read-token"})
    assert status(read) == 403
    assert error_code(delete(app, ["a"], headers={**HEADERS, "x-api-version": "1"})) == (
        "invalid_api_version")


def test_each_path_answers_its_own_method_only() -> None:
    app, _ = make_app()
    wrong = post(app, "/v1/users", {"users": ["a"]})
    assert status(wrong) == 405
    assert wrong.response is not None and wrong.response.headers["allow"] == "DELETE"
    wrong = post(app, "/v1/identify", {"user_id": "u"}, method="DELETE")
    assert wrong.response is not None and wrong.response.headers["allow"] == "POST"


@pytest.mark.parametrize(("body", "code"), [
    ({"user_id": "u", "company": None}, "invalid_metadata"),
    ({"user_id": "u", "company": "acme"}, "invalid_metadata"),
    ({"user_id": "u", "company": {"id": "c", "tags": ["x"]}}, "invalid_metadata"),
    ({"user_id": "u", "company": {"name": "Acme"}}, "invalid_company"),
    ({"user_id": "u", "company": {"id": ""}}, "invalid_company"),
    ({"user_id": "u", "company": {"id": 7}}, "invalid_company"),
    ({"user_id": "", "metadata": {}}, "invalid_field"),
    ({"user_id": "u", "metadata": {"a": {"b": 1}}}, "invalid_metadata"),
])
def test_identify_is_validated_as_strictly_as_track(body: dict[str, Any], code: str) -> None:
    problem = validate_body("identify", body)
    assert problem is not None and (problem.status, problem.error_code) == (400, code)


@pytest.mark.parametrize("company", [{"id": "c"}, {"company_id": "c"}, {"id": "c", "n": 1}])
def test_both_documented_company_keys_are_accepted(company: dict[str, Any]) -> None:
    assert validate_body("identify", {"user_id": "u", "company": company}) is None


def test_reset_forgets_users_companies_and_attribution() -> None:
    app, _ = make_app()
    post(app, "/v1/identify", {"user_id": "u1", "company": {"id": "c"}})
    post(app)
    assert control(app, "DELETE", "requests")[0] == 200
    stats = control(app, "GET", "stats")[1]
    assert {k: stats[k] for k in ("users", "companies", "attributed", "unattributed")} == {
        "users": 0, "companies": 0, "attributed": 0, "unattributed": 0}
    assert control(app, "GET", "users") == (200, {})


# ---------------------------------------------------------------------------- rate limits


def test_track_and_identify_each_have_their_own_budget() -> None:
    app, clock = make_app(rate_limit=2, rate_window_seconds=10)
    assert [status(post(app)) for _ in range(3)] == [202, 202, 429]
    identify = {"user_id": "u"}
    assert status(post(app, "/v1/identify", identify)) == 202
    assert status(post(app, "/v1/companies/identify", {"company_id": "c"})) == 200
    limited = post(app, "/v1/identify", identify)
    assert (status(limited), error_code(limited)) == (429, "rate_limited")
    assert "identify" in body_of(limited)["errors"][0]["message"]
    clock.now += 10
    assert status(post(app)) == 202


def test_identify_budget_can_differ_and_be_changed_at_run_time() -> None:
    app, _ = make_app(rate_limit=5, identify_rate_limit=1)
    assert [status(post(app, "/v1/identify", {"user_id": "u"})) for _ in range(2)] == [202, 429]
    assert status(post(app)) == 202
    code, view = control(app, "PUT", "limits", {"identify_rate_limit": None})
    assert (code, view["identify_rate_limit"]) == (200, None)
    assert status(post(app, "/v1/identify", {"user_id": "u"})) == 202  # 5 now


def test_delete_is_limited_to_one_request_per_interval() -> None:
    app, clock = make_app()
    assert status(delete(app, ["a"])) == 202
    clock.now += 1.9
    limited = delete(app, ["b"])
    assert (status(limited), error_code(limited)) == (429, "rate_limited")
    assert "delete" in body_of(limited)["errors"][0]["message"]
    assert status(post(app)) == 202  # other families are not affected
    clock.now += 0.1
    assert status(delete(app, ["b"])) == 202
    assert [r["body"]["users"] for r in app.recorder.select("/v1/users")] == [["a"], ["b"]]


def test_control_limits_validate_and_reset() -> None:
    app, _ = make_app()
    assert control(app, "GET", "limits") == (200, {
        "rate_limit": 600, "rate_window_seconds": 60.0, "identify_rate_limit": None,
        "shared_rate_limit": False, "delete_interval_seconds": 2.0})
    for bad in ({"delete_interval_seconds": -1}, {"shared_rate_limit": "yes"},
                {"identify_rate_limit": True}, {"rate_limit": 5}):
        assert control(app, "PUT", "limits", bad)[0] == 400
    code, view = control(app, "PUT", "limits", {"shared_rate_limit": True,
                                                "delete_interval_seconds": 0.5})
    assert (code, view["shared_rate_limit"], view["delete_interval_seconds"]) == (200, True, 0.5)
    assert control(app, "DELETE", "limits")[1]["delete_interval_seconds"] == 2.0


def test_family_limiter_off_switches() -> None:
    limiter = FamilyLimiter(0, 60, delete_interval=0)
    assert all(limiter.acquire("t", 0.0, f).allowed
               for f in ("track", "identify", "delete") for _ in range(100))


def test_family_limiter_shared_budget() -> None:
    limiter = FamilyLimiter(2, 60, shared=True)
    assert [limiter.acquire("t", 0.0, f).allowed
            for f in ("track", "identify", "identify")] == [True, True, False]
    assert limiter.in_window("t", 0.0, "identify") == 2


def test_directory_attribution_counts() -> None:
    directory = Directory()
    assert directory.track("u") is False
    directory.identify({"user_id": "u"})
    assert directory.track("u") is True
    assert directory.delete_users(["u", "u"]) == 1
    assert directory.track("u") is False
    assert directory.stats() == {"users": 0, "companies": 0, "attributed": 1,
                                 "unattributed": 2, "deleted_users": 1}


def test_track_body_is_unchanged_by_attribution() -> None:
    app, _ = make_app()
    post(app)
    assert app.recorder.select()[0]["body"] == TRACK
