"""Token checks: write tokens pass, the read token is forbidden, anything else is unknown.

Userpilot tells a read/export token apart from garbage (403 vs 401), and the worker treats
both as "integration misconfigured", so the sandbox keeps the distinction. Raw tokens never
leave this module: records and logs carry a short fingerprint instead.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from consumer.sandbox.errors import Problem

__all__ = ["AuthResult", "TokenSet", "fingerprint"]


def fingerprint(token: str) -> str:
    """A stable, non-reversible label for a token: ``sha256:`` plus 12 hex digits."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class AuthResult:
    """Who is calling: the fingerprint is the rate-limit key and the record label."""

    token_id: str


class TokenSet:
    """The configured tokens; replaceable at run time through the control API."""

    def __init__(self, write: Iterable[str], read: Iterable[str]) -> None:
        self._write = frozenset(write)
        self._read = frozenset(read)
        self._ids: dict[str, str] = {token: fingerprint(token) for token in self._write}

    @property
    def write_ids(self) -> list[str]:
        return sorted(self._ids.values())

    @property
    def read_ids(self) -> list[str]:
        return sorted(fingerprint(token) for token in self._read)

    def check(self, authorization: str | None) -> AuthResult | Problem:
        if not authorization:
            return _unauthorized("missing_token", "Authorization header is required")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme != "Token" or not token:
            return _unauthorized(
                "malformed_token", "Authorization header must be 'Token <write token>'"
            )
        token_id = self._ids.get(token)
        if token_id is not None:
            return AuthResult(token_id)
        if token in self._read:
            return Problem(
                403,
                "read_token_not_allowed",
                "Forbidden",
                "the read/export token cannot send events; use the write token",
            )
        return _unauthorized("invalid_token", "unknown token")


def _unauthorized(code: str, message: str) -> Problem:
    return Problem(401, code, "Unauthorized", message)
