"""A tiny stdlib client for the ``/_sandbox/`` control API, for tests and scripts.

Stdlib only (urllib) so any test can use it without choosing an HTTP library.
"""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from typing import Any

__all__ = ["SandboxControl"]


class SandboxControl:
    """``SandboxControl("http://127.0.0.1:8787").set_faults(error_rate=0.5)``."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        # Never through HTTP_PROXY: the sandbox is local, and a shell's corporate proxy
        # turned `demo` into a traceback (407) after its events were delivered (review
        # "secrets49").
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _call(self, method: str, route: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{self.url}/_sandbox/{route}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        with self._opener.open(request, timeout=self.timeout) as response:
            return json.loads(response.read())

    def health(self) -> bool:
        return bool(self._call("GET", "health").get("status") == "ok")

    def requests(self, path: str | None = None) -> list[dict[str, Any]]:
        """Accepted records, oldest first; ``path`` filters e.g. ``/v1/track``."""
        query = "" if path is None else "?" + urllib.parse.urlencode({"path": path})
        records: list[dict[str, Any]] = self._call("GET", "requests" + query)
        return records

    def bodies(self, path: str | None = "/v1/track") -> list[dict[str, Any]]:
        """Just the parsed bodies of accepted requests."""
        return [record["body"] for record in self.requests(path)]

    def reset(self) -> None:
        """Forget records, counters, users, companies and rate-limit history."""
        self._call("DELETE", "requests")

    def stats(self) -> dict[str, Any]:
        """Counters: by status, accepted, users, companies, attributed, unattributed, ..."""
        stats: dict[str, Any] = self._call("GET", "stats")
        return stats

    def users(self) -> dict[str, Any]:
        """Users the sandbox knows: ``{user_id: {"metadata": {...}, "company": id|None}}``."""
        users: dict[str, Any] = self._call("GET", "users")
        return users

    def companies(self) -> dict[str, Any]:
        """Companies: ``{company_id: {"metadata": {...}, "users": [user ids]}}``."""
        companies: dict[str, Any] = self._call("GET", "companies")
        return companies

    def attribution(self) -> tuple[int, int]:
        """(attributed, unattributed) Track calls since start or the last reset."""
        stats = self.stats()
        return int(stats["attributed"]), int(stats["unattributed"])

    def limits(self) -> dict[str, Any]:
        limits: dict[str, Any] = self._call("GET", "limits")
        return limits

    def set_limits(self, **settings: Any) -> dict[str, Any]:
        """Partial update: ``identify_rate_limit``, ``shared_rate_limit``,
        ``delete_interval_seconds`` (``rate_limit`` itself is set with ``set_faults``)."""
        limits: dict[str, Any] = self._call("PUT", "limits", settings)
        return limits

    def clear_limits(self) -> dict[str, Any]:
        """Back to the start-up per-family settings."""
        limits: dict[str, Any] = self._call("DELETE", "limits")
        return limits

    def faults(self) -> dict[str, Any]:
        faults: dict[str, Any] = self._call("GET", "faults")
        return faults

    def set_faults(self, **settings: Any) -> dict[str, Any]:
        """Partial update: ``error_rate``, ``script=["500", "reset"]``, ``rate_limit``..."""
        faults: dict[str, Any] = self._call("PUT", "faults", settings)
        return faults

    def clear_faults(self) -> dict[str, Any]:
        """Back to the start-up faults, rate limit and window (the per-family settings
        have `clear_limits`)."""
        faults: dict[str, Any] = self._call("DELETE", "faults")
        return faults

    def set_tokens(self, write_tokens: list[str], read_tokens: list[str]) -> dict[str, Any]:
        tokens: dict[str, Any] = self._call(
            "PUT", "tokens", {"write_tokens": write_tokens, "read_tokens": read_tokens}
        )
        return tokens
