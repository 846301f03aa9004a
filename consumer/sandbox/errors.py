"""Userpilot-shaped error bodies, so clients parse the sandbox exactly as the real API.

Userpilot answers 4xx with ``{"errors": [{"error_code", "error", "message", "details"}]}``.
The 429 and 5xx bodies are undocumented; the sandbox uses the same shape for them so a
client that logs ``errors[0].message`` works everywhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from consumer.sandbox.http import Response

__all__ = ["Problem", "json_response", "problem_for_status"]


@dataclass(frozen=True, slots=True)
class Problem:
    """One reason to refuse a request."""

    status: int
    error_code: str
    error: str
    message: str
    details: Any = None
    headers: dict[str, str] = field(default_factory=dict)

    def to_response(self) -> Response:
        body = {
            "errors": [
                {
                    "error_code": self.error_code,
                    "error": self.error,
                    "message": self.message,
                    "details": self.details,
                }
            ]
        }
        return json_response(self.status, body, headers=self.headers)


def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(
        status=status,
        body=json.dumps(body, separators=(",", ":")).encode(),
        headers=headers or {},
    )


_GENERIC: dict[int, tuple[str, str]] = {
    400: ("bad_request", "Bad Request"),
    401: ("unauthorized", "Unauthorized"),
    403: ("forbidden", "Forbidden"),
    404: ("not_found", "Not Found"),
    405: ("method_not_allowed", "Method Not Allowed"),
    408: ("request_timeout", "Request Timeout"),
    409: ("conflict", "Conflict"),
    413: ("payload_too_large", "Payload Too Large"),
    422: ("unprocessable_entity", "Unprocessable Entity"),
    429: ("rate_limited", "Too Many Requests"),
    500: ("internal_server_error", "Internal Server Error"),
    502: ("bad_gateway", "Bad Gateway"),
    503: ("service_unavailable", "Service Unavailable"),
    504: ("gateway_timeout", "Gateway Timeout"),
}


def problem_for_status(status: int, message: str = "injected by sandbox") -> Problem:
    """A generic body for a status chosen by fault injection rather than by validation."""
    code, error = _GENERIC.get(status, (f"http_{status}", "Error"))
    return Problem(status=status, error_code=code, error=error, message=message)
