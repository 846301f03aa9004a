"""The ``/_sandbox/`` control API: inspect records, reset state, change faults and tokens.

No auth, same port as the fake Userpilot API, so a test needs one URL. Routes:

    GET    /_sandbox/health              {"status": "ok"}
    GET    /_sandbox/requests[?path=P]   accepted records, oldest first
    DELETE /_sandbox/requests            forget records, counters and rate-limit history
    GET    /_sandbox/stats               {"total", "by_status", "accepted", "users",
                                         "companies", "attributed", "unattributed", ...}
    GET    /_sandbox/users               users the sandbox knows: metadata, company
    GET    /_sandbox/companies           companies: metadata, member users
    GET    /_sandbox/limits              per-family rate-limit settings
    PUT    /_sandbox/limits              partial update: identify_rate_limit,
                                         shared_rate_limit, delete_interval_seconds
    DELETE /_sandbox/limits              back to the start-up per-family settings
    GET    /_sandbox/faults              current faults + rate-limit settings
    PUT    /_sandbox/faults              partial update (only the keys given change);
                                         "phases" (timed outages, flaky phases) start
                                         their timeline now; "echo_errors" echoes requests
    DELETE /_sandbox/faults              back to the start-up faults, rate limit and window
                                         (per-family settings: DELETE /_sandbox/limits)
    GET    /_sandbox/tokens              fingerprints of the configured tokens
    PUT    /_sandbox/tokens              {"write_tokens": [...], "read_tokens": [...]}
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any, Protocol

from consumer.sandbox.auth import TokenSet
from consumer.sandbox.config import SandboxConfig
from consumer.sandbox.directory import Directory
from consumer.sandbox.errors import Problem, json_response
from consumer.sandbox.faults import FaultError, FaultState
from consumer.sandbox.http import Request, Response
from consumer.sandbox.ratelimit import FamilyLimiter
from consumer.sandbox.records import Recorder


class ControlledApp(Protocol):
    """What the control API reads and changes on the app (`app.SandboxApp`).

    A protocol, not an import: app.py routes /_sandbox/ here, so importing it back would
    make a cycle.
    """

    config: SandboxConfig
    faults: FaultState
    limiter: FamilyLimiter
    recorder: Recorder
    retry_after: bool
    tokens: TokenSet

    directory: Directory

    def reset_state(self) -> None: ...

    def stats(self) -> dict[str, Any]: ...

__all__ = ["LIMIT_KEYS", "handle_control"]

LIMIT_KEYS = frozenset({"rate_limit", "rate_window_seconds", "retry_after"})


def _bad(message: str) -> Response:
    return Problem(400, "invalid_control_request", "Bad Request", message).to_response()


def _json_object(request: Request) -> dict[str, Any] | Response:
    try:
        body = json.loads(request.body or b"{}")
    except RecursionError:
        return _bad("body is not valid JSON: nested too deeply")
    except ValueError as exc:
        return _bad(f"body is not valid JSON: {exc}")
    if not isinstance(body, dict):
        return _bad("body must be a JSON object")
    return body


def _faults_view(app: ControlledApp) -> dict[str, Any]:
    return {
        **app.faults.to_json(),
        "rate_limit": app.limiter.limit,
        "rate_window_seconds": app.limiter.window,
        "retry_after": app.retry_after,
    }


def _put_faults(app: ControlledApp, request: Request) -> Response:
    body = _json_object(request)
    if isinstance(body, Response):
        return body
    limits = {key: body.pop(key) for key in list(body) if key in LIMIT_KEYS}
    limit = limits.get("rate_limit", app.limiter.limit)
    window = limits.get("rate_window_seconds", app.limiter.window)
    retry_after = limits.get("retry_after", app.retry_after)
    if isinstance(limit, bool) or not isinstance(limit, int):
        return _bad("rate_limit must be an integer (0 or less lifts the limit)")
    if isinstance(window, bool) or not isinstance(window, int | float) or not (
            0 < window < math.inf):
        return _bad("rate_window_seconds must be a positive number")
    if not isinstance(retry_after, bool):
        return _bad("retry_after must be true or false")
    try:
        seconds = float(window)  # an integer past a float's range (review "sandbox45")
    except OverflowError:
        return _bad("rate_window_seconds must be a positive number")
    try:
        app.faults.config.merged(body)  # validate everything before changing anything
    except FaultError as exc:
        return _bad(str(exc))
    app.faults.update(body)
    app.limiter.reconfigure(limit, seconds)
    app.retry_after = retry_after
    return json_response(200, _faults_view(app))


def _clear_faults(app: ControlledApp, request: Request) -> Response:
    app.faults.load(app.config.faults)
    app.limiter.reconfigure(app.config.rate_limit, app.config.rate_window_seconds)
    app.retry_after = app.config.retry_after
    return json_response(200, _faults_view(app))


def _tokens_view(app: ControlledApp) -> dict[str, Any]:
    return {"write_tokens": app.tokens.write_ids, "read_tokens": app.tokens.read_ids}


def _put_tokens(app: ControlledApp, request: Request) -> Response:
    body = _json_object(request)
    if isinstance(body, Response):
        return body
    unknown = set(body) - {"write_tokens", "read_tokens"}
    if unknown:
        return _bad(f"unknown keys: {sorted(unknown)}")
    write = body.get("write_tokens", None)
    read = body.get("read_tokens", None)
    for name, value in (("write_tokens", write), ("read_tokens", read)):
        if value is not None and (
            not isinstance(value, list) or not all(isinstance(t, str) and t for t in value)
        ):
            return _bad(f"{name} must be a list of non-empty strings")
    if write is None or read is None:
        return _bad("give both write_tokens and read_tokens")
    if not write:
        return _bad("at least one write token is required")
    app.tokens = TokenSet(write, read)
    return json_response(200, _tokens_view(app))


def _get_requests(app: ControlledApp, request: Request) -> Response:
    path = request.query.get("path", [None])[0]
    return json_response(200, app.recorder.select(path))


def _reset(app: ControlledApp, request: Request) -> Response:
    app.reset_state()
    return json_response(200, {"status": "reset"})


Handler = Callable[[ControlledApp, Request], Response]


def _health(app: ControlledApp, request: Request) -> Response:
    return json_response(200, {"status": "ok"})


def _stats(app: ControlledApp, request: Request) -> Response:
    return json_response(200, app.stats())


def _users(app: ControlledApp, request: Request) -> Response:
    return json_response(200, app.directory.users_view())


def _companies(app: ControlledApp, request: Request) -> Response:
    return json_response(200, app.directory.companies_view())


def _limits_view(app: ControlledApp) -> dict[str, Any]:
    limiter = app.limiter
    return {
        "rate_limit": limiter.limit,
        "rate_window_seconds": limiter.window,
        "identify_rate_limit": limiter.identify_limit,
        "shared_rate_limit": limiter.shared,
        "delete_interval_seconds": limiter.delete_interval,
    }


def _clear_limits(app: ControlledApp, request: Request) -> Response:
    config = app.config
    app.limiter.configure_families(
        identify_limit=config.identify_rate_limit, shared=config.shared_rate_limit,
        delete_interval=config.delete_interval_seconds,
    )
    return json_response(200, _limits_view(app))


def _get_limits(app: ControlledApp, request: Request) -> Response:
    return json_response(200, _limits_view(app))


def _put_limits(app: ControlledApp, request: Request) -> Response:
    """Per-family settings; ``rate_limit``/``rate_window_seconds`` stay under ``faults``."""
    body = _json_object(request)
    if isinstance(body, Response):
        return body
    allowed = {"identify_rate_limit", "shared_rate_limit", "delete_interval_seconds"}
    unknown = set(body) - allowed
    if unknown:
        return _bad(f"unknown keys: {sorted(unknown)}; use {sorted(allowed)}")
    limiter = app.limiter
    identify = body.get("identify_rate_limit", limiter.identify_limit)
    shared = body.get("shared_rate_limit", limiter.shared)
    interval = body.get("delete_interval_seconds", limiter.delete_interval)
    if identify is not None and (isinstance(identify, bool) or not isinstance(identify, int)):
        return _bad("identify_rate_limit must be an integer or null (same as rate_limit)")
    if not isinstance(shared, bool):
        return _bad("shared_rate_limit must be true or false")
    try:  # an int past a float's range raised OverflowError (review "diff41d")
        seconds = (float(interval) if isinstance(interval, int | float)
                   and not isinstance(interval, bool) else math.nan)
    except OverflowError:
        seconds = math.inf
    if not 0 <= seconds < math.inf:
        return _bad("delete_interval_seconds must be 0 (no limit) or a positive number")
    limiter.configure_families(identify_limit=identify, shared=shared,
                               delete_interval=seconds)
    return json_response(200, _limits_view(app))


def _get_faults(app: ControlledApp, request: Request) -> Response:
    return json_response(200, _faults_view(app))


def _get_tokens(app: ControlledApp, request: Request) -> Response:
    return json_response(200, _tokens_view(app))


_ROUTES: dict[tuple[str, str], Handler] = {
    ("GET", "/_sandbox/health"): _health,
    ("GET", "/_sandbox/requests"): _get_requests,
    ("DELETE", "/_sandbox/requests"): _reset,
    ("GET", "/_sandbox/stats"): _stats,
    ("GET", "/_sandbox/users"): _users,
    ("GET", "/_sandbox/companies"): _companies,
    ("GET", "/_sandbox/limits"): _get_limits,
    ("PUT", "/_sandbox/limits"): _put_limits,
    ("DELETE", "/_sandbox/limits"): _clear_limits,
    ("GET", "/_sandbox/faults"): _get_faults,
    ("PUT", "/_sandbox/faults"): _put_faults,
    ("DELETE", "/_sandbox/faults"): _clear_faults,
    ("GET", "/_sandbox/tokens"): _get_tokens,
    ("PUT", "/_sandbox/tokens"): _put_tokens,
}


def handle_control(app: ControlledApp, request: Request) -> Response:
    path = request.path.rstrip("/")
    handler = _ROUTES.get((request.method, path))
    if handler is not None:
        return handler(app, request)
    if any(route_path == path for _, route_path in _ROUTES):
        return Problem(405, "method_not_allowed", "Method Not Allowed", path).to_response()
    return Problem(404, "not_found", "Not Found", f"no control route {path}").to_response()
