"""Request validation for the Userpilot write endpoints (track, identify, delete).

The rules mirror what Userpilot rejects with 400: missing headers, invalid JSON, missing
ids, and above all non-primitive ``metadata`` values (the bug the worker's flattening
exists to prevent). identify's optional ``company`` must be an object with a non-empty
string ``id`` (help page) or ``company_id`` (OpenAPI page): Userpilot's own docs disagree,
so both are accepted and the record shows which one a client sent. Pure, so each case is a
one-line unit test.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, Literal

from consumer.sandbox.errors import Problem

__all__ = [
    "API_VERSION",
    "COMPANY_ID_KEYS",
    "ENDPOINTS",
    "METHODS",
    "Endpoint",
    "check_headers",
    "company_id_of",
    "parse_body",
    "validate_body",
]

API_VERSION = "2020-09-22"

Endpoint = Literal["track", "identify", "companies_identify", "delete_users"]

ENDPOINTS: dict[str, Endpoint] = {
    "/v1/track": "track",
    "/v1/identify": "identify",
    "/v1/companies/identify": "companies_identify",
    "/v1/users": "delete_users",
}

METHODS: dict[Endpoint, str] = {
    "track": "POST",
    "identify": "POST",
    "companies_identify": "POST",
    "delete_users": "DELETE",
}
"""The one method each path answers; any other is 405 with an ``Allow`` header."""

COMPANY_ID_KEYS = ("id", "company_id")
"""Keys accepted for the company id in identify's ``company`` (first found wins)."""

_REQUIRED: dict[Endpoint, tuple[str, ...]] = {
    "track": ("user_id", "event_name"),
    "identify": ("user_id",),
    "companies_identify": ("company_id",),
    "delete_users": (),
}


def _bad(error_code: str, message: str, details: Any = None) -> Problem:
    return Problem(400, error_code, "Bad Request", message, details)


def check_headers(headers: Mapping[str, str]) -> Problem | None:
    """``X-API-Version`` and a JSON ``Content-Type`` are mandatory on every write call."""
    version = headers.get("x-api-version")
    if version != API_VERSION:
        return _bad(
            "invalid_api_version",
            f"X-API-Version header must be {API_VERSION}",
            {"received": version},
        )
    content_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type != "application/json":
        return _bad(
            "invalid_content_type",
            "Content-Type header must be application/json",
            {"received": headers.get("content-type")},
        )
    return None


def parse_body(raw: bytes) -> tuple[Any, Problem | None]:
    """Decode the JSON body; the body must be a JSON object."""
    try:
        body = json.loads(raw, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        # Uncaught, the connection was dropped without an answer (review "sandbox48").
        return None, _bad("invalid_json", "request body is not valid JSON",
                          "nested too deeply")
    except (ValueError, UnicodeDecodeError) as exc:
        return None, _bad("invalid_json", "request body is not valid JSON", str(exc))
    if not isinstance(body, dict):
        return None, _bad("invalid_body", "request body must be a JSON object")
    return body, None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    """`1e999` as `Infinity` is: refused (taken, it was stored as inf and the control API
    answered `Infinity`, which strict JSON parsers refuse; review "sandbox48")."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of a double's range")
    return value


def _is_primitive(value: object) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def company_id_of(company: Mapping[str, Any]) -> str | None:
    """The company id in identify's ``company`` object, under either documented key."""
    for key in COMPANY_ID_KEYS:
        value = company.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def _flat(name: str, value: Any) -> Problem | None:
    if not isinstance(value, dict):
        return _bad("invalid_metadata", f"{name} must be an object", {"field": name})
    nested = sorted(key for key, item in value.items() if not _is_primitive(item))
    if nested:
        return _bad(
            "invalid_metadata",
            f"{name} values must be string, number, boolean or null",
            {"fields": nested} if name == "metadata" else {"field": name, "fields": nested},
        )
    return None


def _validate_delete(body: Mapping[str, Any]) -> Problem | None:
    users = body.get("users")
    if users is None:
        return _bad("missing_field", "users is required: a list of user ids", {"field": "users"})
    if (not isinstance(users, list) or not users
            or not all(isinstance(u, str) and u for u in users)):
        return _bad(
            "invalid_field", "users must be a non-empty list of non-empty strings",
            {"field": "users"},
        )
    return None


def validate_body(endpoint: Endpoint, body: Mapping[str, Any]) -> Problem | None:
    """Required ids must be non-empty strings; metadata (and company) must be flat objects."""
    if endpoint == "delete_users":
        return _validate_delete(body)
    for name in _REQUIRED[endpoint]:
        value = body.get(name)
        if not isinstance(value, str) or not value:
            return _bad(
                "missing_field" if value is None else "invalid_field",
                f"{name} is required and must be a non-empty string",
                {"field": name},
            )
    problem = _flat("metadata", body.get("metadata", {}))
    if problem is not None or endpoint != "identify" or "company" not in body:
        return problem
    company = body["company"]
    problem = _flat("company", company)
    if problem is not None:
        return problem
    if company_id_of(company) is None:
        return _bad(
            "invalid_company",
            "company needs a non-empty string id (\"id\" or \"company_id\")",
            {"field": "company"},
        )
    return None
