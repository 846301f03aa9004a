"""Request validation for the three Userpilot write endpoints.

The rules mirror what Userpilot rejects with 400: missing headers, invalid JSON, missing
ids, and above all non-primitive ``metadata`` values (the bug the worker's flattening
exists to prevent). Pure, so each case is a one-line unit test.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal

from consumer.sandbox.errors import Problem

__all__ = [
    "API_VERSION",
    "ENDPOINTS",
    "Endpoint",
    "check_headers",
    "parse_body",
    "validate_body",
]

API_VERSION = "2020-09-22"

Endpoint = Literal["track", "identify", "companies_identify"]

ENDPOINTS: dict[str, Endpoint] = {
    "/v1/track": "track",
    "/v1/identify": "identify",
    "/v1/companies/identify": "companies_identify",
}

_REQUIRED: dict[Endpoint, tuple[str, ...]] = {
    "track": ("user_id", "event_name"),
    "identify": ("user_id",),
    "companies_identify": ("company_id",),
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
        body = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        return None, _bad("invalid_json", "request body is not valid JSON", str(exc))
    if not isinstance(body, dict):
        return None, _bad("invalid_body", "request body must be a JSON object")
    return body, None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _is_primitive(value: object) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def validate_body(endpoint: Endpoint, body: Mapping[str, Any]) -> Problem | None:
    """Required ids must be non-empty strings; metadata must be a flat object."""
    for name in _REQUIRED[endpoint]:
        value = body.get(name)
        if not isinstance(value, str) or not value:
            return _bad(
                "missing_field" if value is None else "invalid_field",
                f"{name} is required and must be a non-empty string",
                {"field": name},
            )
    metadata = body.get("metadata", {})
    if not isinstance(metadata, dict):
        return _bad("invalid_metadata", "metadata must be an object", {"field": "metadata"})
    nested = sorted(key for key, value in metadata.items() if not _is_primitive(value))
    if nested:
        return _bad(
            "invalid_metadata",
            "metadata values must be string, number, boolean or null",
            {"fields": nested},
        )
    return None
