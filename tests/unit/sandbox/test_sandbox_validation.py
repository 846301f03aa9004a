from __future__ import annotations

from typing import Any

import pytest

from consumer.sandbox.validation import Endpoint, check_headers, parse_body, validate_body

GOOD_HEADERS = {"x-api-version": "2020-09-22", "content-type": "application/json"}


def test_good_headers_pass() -> None:
    assert check_headers(GOOD_HEADERS) is None
    assert (
        check_headers({**GOOD_HEADERS, "content-type": "application/json; charset=utf-8"}) is None
    )


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({"content-type": "application/json"}, "invalid_api_version"),
        ({**GOOD_HEADERS, "x-api-version": "2021-01-01"}, "invalid_api_version"),
        ({"x-api-version": "2020-09-22"}, "invalid_content_type"),
        ({**GOOD_HEADERS, "content-type": "text/plain"}, "invalid_content_type"),
    ],
)
def test_bad_headers_are_400(headers: dict[str, str], code: str) -> None:
    problem = check_headers(headers)
    assert problem is not None
    assert (problem.status, problem.error_code) == (400, code)


@pytest.mark.parametrize("raw", [b"", b"{", b"[1]", b'"x"', b'{"a": NaN}', b"\xff"])
def test_invalid_or_non_object_json_is_400(raw: bytes) -> None:
    body, problem = parse_body(raw)
    assert body is None
    assert problem is not None and problem.status == 400


def test_object_json_parses() -> None:
    assert parse_body(b'{"user_id": "u"}') == ({"user_id": "u"}, None)


VALID: list[tuple[Endpoint, dict[str, Any]]] = [
    ("track", {"user_id": "u1", "event_name": "feature_used"}),
    ("track", {"user_id": "u1", "event_name": "e", "metadata": {}}),
    (
        "track",
        {
            "user_id": "u1",
            "event_name": "e",
            "metadata": {"s": "x", "i": 1, "f": 1.5, "b": True, "n": None},
        },
    ),
    ("identify", {"user_id": "u1", "metadata": {"plan": "pro"}}),
    ("identify", {"user_id": "u1", "company": {"id": "c1"}}),
    ("companies_identify", {"company_id": "c1", "metadata": {"size": 10}}),
]


@pytest.mark.parametrize(("endpoint", "body"), VALID)
def test_valid_bodies_pass(endpoint: Endpoint, body: dict[str, Any]) -> None:
    assert validate_body(endpoint, body) is None


INVALID: list[tuple[Endpoint, dict[str, Any], str]] = [
    ("track", {"event_name": "e"}, "missing_field"),
    ("track", {"user_id": "u"}, "missing_field"),
    ("track", {"user_id": "", "event_name": "e"}, "invalid_field"),
    ("track", {"user_id": 7, "event_name": "e"}, "invalid_field"),
    ("track", {"user_id": "u", "event_name": ""}, "invalid_field"),
    ("track", {"user_id": "u", "event_name": "e", "metadata": []}, "invalid_metadata"),
    ("track", {"user_id": "u", "event_name": "e", "metadata": None}, "invalid_metadata"),
    ("track", {"user_id": "u", "event_name": "e", "metadata": {"a": {"b": 1}}}, "invalid_metadata"),
    ("track", {"user_id": "u", "event_name": "e", "metadata": {"items": [1]}}, "invalid_metadata"),
    ("identify", {"metadata": {}}, "missing_field"),
    ("identify", {"user_id": "u", "metadata": {"a": [1]}}, "invalid_metadata"),
    ("companies_identify", {"user_id": "u"}, "missing_field"),
    ("companies_identify", {"company_id": "c", "metadata": {"a": {}}}, "invalid_metadata"),
]


@pytest.mark.parametrize(("endpoint", "body", "code"), INVALID)
def test_invalid_bodies_are_400(endpoint: Endpoint, body: dict[str, Any], code: str) -> None:
    problem = validate_body(endpoint, body)
    assert problem is not None
    assert (problem.status, problem.error_code) == (400, code)


def test_nested_metadata_problem_names_the_fields() -> None:
    body = {"user_id": "u", "event_name": "e", "metadata": {"ok": 1, "z": [1], "a": {}}}
    problem = validate_body("track", body)
    assert problem is not None
    assert problem.details == {"fields": ["a", "z"]}
