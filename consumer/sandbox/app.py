"""The Userpilot stand-in as a pure function: a parsed request in, an ``Outcome`` out.

Order of checks for ``/v1/*`` (documented because tests depend on it):

1. routing: unknown path → 404, known path with another method than its own → 405
   (``DELETE /v1/users``, ``POST`` for the others);
2. the next scripted action, if any (a 2xx/``pass`` entry falls through to normal handling);
3. random faults: ``reset_rate``, then ``error_rate`` (these do not use rate-limit budget);
4. auth: write token passes, read token → 403, anything else → 401;
5. rate limit per write token and endpoint family → 429: track and identify (company
   identify included) each have their own budget, unless ``shared_rate_limit``; delete is
   one request per ``delete_interval_seconds``;
6. headers (``X-API-Version``, ``Content-Type``) → 400; then JSON body → 400;
7. rules matching ``user_id`` / ``event_name`` of the parsed body;
8. field validation → 400; otherwise record, update the users and companies it knows,
   and answer: track 202, identify 202, company identify 200 (Userpilot's help page; its
   OpenAPI file says 202), delete 202.

A Track for a user the sandbox does not know is still answered 202, as Userpilot does, but
its record says ``"attributed": false`` and ``/_sandbox/stats`` counts it as unattributed.
Every API outcome is delayed by ``latency_ms`` plus up to ``jitter_ms``. Requests that
pass step 5 count against the limit even if later rejected; 429s themselves do not.
The server executes the outcome; nothing here touches a socket or sleeps.
"""

from __future__ import annotations

import itertools
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

from consumer.sandbox.auth import AuthResult, TokenSet
from consumer.sandbox.config import SandboxConfig
from consumer.sandbox.control import handle_control
from consumer.sandbox.directory import Directory
from consumer.sandbox.errors import Problem, json_response, problem_for_status
from consumer.sandbox.faults import Action, FaultState, echo_request
from consumer.sandbox.http import Request, Response
from consumer.sandbox.ratelimit import Family, FamilyLimiter
from consumer.sandbox.records import Recorder
from consumer.sandbox.validation import (
    ENDPOINTS,
    METHODS,
    Endpoint,
    check_headers,
    parse_body,
    validate_body,
)

__all__ = ["CONTROL_PREFIX", "Outcome", "SandboxApp"]

CONTROL_PREFIX = "/_sandbox/"

OutcomeKind = Literal["respond", "reset", "close", "hang"]

_ACCEPTED = b'{"status":"accepted"}'

_FAMILY: dict[Endpoint, Family] = {
    "track": "track",
    "identify": "identify",
    "companies_identify": "identify",
    "delete_users": "delete",
}


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the server must do: wait ``delay`` seconds, then respond / reset / close / hang."""

    kind: OutcomeKind
    request_id: str
    response: Response | None = None
    delay: float = 0.0


class SandboxApp:
    """All sandbox state; not thread-safe, owned by the server's event loop."""

    def __init__(
        self,
        config: SandboxConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.wall_clock = wall_clock
        self.tokens = TokenSet(config.write_tokens, config.read_tokens)
        self.limiter = FamilyLimiter(
            config.rate_limit, config.rate_window_seconds,
            identify_limit=config.identify_rate_limit, shared=config.shared_rate_limit,
            delete_interval=config.delete_interval_seconds,
        )
        self.directory = Directory()
        self.retry_after = config.retry_after
        self.faults = FaultState(config.faults, rng or random.Random(config.seed), clock=clock)
        self.recorder = Recorder(limit=config.record_limit)
        self._ids = itertools.count(1)
        self._id_prefix = os.urandom(4).hex()

    def next_request_id(self) -> str:
        return f"{self._id_prefix}-{next(self._ids):08x}"

    def handle(self, request: Request) -> Outcome:
        if request.path.startswith(CONTROL_PREFIX):
            return Outcome("respond", self.next_request_id(), handle_control(self, request))
        request_id = self.next_request_id()
        outcome = self._handle_api(request, request_id)
        self.recorder.count(_label(outcome))
        if outcome.response is not None and outcome.response.status >= 400 \
                and self.faults.config.echo_errors:
            outcome = replace(outcome, response=echo_request(outcome.response, request))
        return outcome

    # -- the Userpilot API -------------------------------------------------------------

    def _handle_api(self, request: Request, request_id: str) -> Outcome:
        delay = self.faults.latency_seconds()
        endpoint = ENDPOINTS.get(request.path)
        if endpoint is None:
            problem = Problem(404, "not_found", "Not Found", f"no route for {request.path}")
            return _respond(request_id, problem.to_response(), delay)
        method = METHODS[endpoint]
        if request.method != method:
            problem = Problem(
                405, "method_not_allowed", "Method Not Allowed", f"use {method} {request.path}"
            )
            response = problem.to_response()
            response.headers["allow"] = method
            return _respond(request_id, response, delay)

        scripted = self.faults.next_scripted()
        if scripted is not None and not scripted.handles_normally:
            return self._fault(scripted, request_id, delay)
        if scripted is not None:
            delay += scripted.ms / 1000
        injected = self.faults.random_fault()
        if injected is not None:
            return self._fault(injected, request_id, delay)

        auth = self.tokens.check(request.headers.get("authorization"))
        if isinstance(auth, Problem):
            return _respond(request_id, auth.to_response(), delay)
        family = _FAMILY[endpoint]
        decision = self.limiter.acquire(auth.token_id, self.clock(), family)
        if not decision.allowed:
            self.recorder.refuse(family, self.wall_clock())
            limited = self._rate_limited(decision.retry_after_header, family)
            return _respond(request_id, limited, delay)

        header_problem = check_headers(request.headers)
        if header_problem is not None:
            return _respond(request_id, header_problem.to_response(), delay)
        body, body_problem = parse_body(request.body)
        if body_problem is not None:
            return _respond(request_id, body_problem.to_response(), delay)

        ruled = self.faults.match_rule(request.path, body)
        if ruled is not None and not ruled.handles_normally:
            return self._fault(ruled, request_id, delay)
        if ruled is not None:
            delay += ruled.ms / 1000

        invalid = validate_body(endpoint, body)
        if invalid is not None:
            return _respond(request_id, invalid.to_response(), delay)
        record = self._record(request, request_id, auth, body)
        response = self._apply(endpoint, body, record)
        self.recorder.accept(record)
        return _respond(request_id, response, delay)

    def _apply(self, endpoint: Endpoint, body: dict[str, Any], record: dict[str, Any]) -> Response:
        """Update the users and companies the sandbox knows; the success response."""
        directory = self.directory
        if endpoint == "track":
            record["attributed"] = directory.track(body["user_id"])
            return Response(202, _ACCEPTED)
        if endpoint == "identify":
            directory.identify(body)
            return Response(202, _ACCEPTED)
        if endpoint == "companies_identify":
            directory.identify_company(body)
            return json_response(200, {"status": "ok"})
        users: list[str] = body["users"]
        record["deleted"] = directory.delete_users(users)
        return json_response(202, {
            "status": "accepted",
            "message": f"{len(users)} users scheduled for deletion",
        })

    def stats(self) -> dict[str, Any]:
        """Outcome counters plus the users, companies and attribution counts."""
        return {**self.recorder.stats(), **self.directory.stats()}

    def _rate_limited(self, retry_after: str, family: Family = "track") -> Response:
        headers = {"retry-after": retry_after} if self.retry_after else {}
        limit, window = self.limiter.limit_of(family)
        which = "delete" if family == "delete" else (
            "track and identify" if self.limiter.shared else family)
        return Problem(
            429,
            "rate_limited",
            "Too Many Requests",
            f"more than {limit} {which} requests per {window:g} s for this token",
            headers=headers,
        ).to_response()

    def _fault(self, action: Action, request_id: str, delay: float) -> Outcome:
        if action.kind == "reset":
            return Outcome("reset", request_id, delay=delay)
        if action.kind == "timeout":
            return Outcome("close", request_id, delay=delay + action.ms / 1000)
        if action.kind == "hang":
            return Outcome("hang", request_id, delay=delay)
        if action.status == 429:
            # Not the track budget's words: an injected 429 said "more than 0 track
            # requests" on /v1/identify too (review "sandbox48").
            headers = {"retry-after": "1"} if self.retry_after else {}
            return _respond(request_id, Problem(
                429, "rate_limited", "Too Many Requests",
                "rate limited (injected by the sandbox's faults)", headers=headers,
            ).to_response(), delay)
        return _respond(request_id, problem_for_status(action.status).to_response(), delay)

    def _record(
        self, request: Request, request_id: str, auth: AuthResult, body: dict[str, Any]
    ) -> dict[str, Any]:
        headers = dict(request.headers)
        headers["authorization"] = f"Token {auth.token_id}"
        return {
            "request_id": request_id,
            "method": request.method,
            "path": request.path,
            "token": auth.token_id,
            "headers": headers,
            "body": body,
            "received_at": self.wall_clock(),
        }

    def reset_state(self) -> None:
        """Forget records, counters, users, companies and rate-limit history.

        Faults, limits and tokens stay: a reset gives a test a fresh Userpilot account.
        """
        self.recorder.reset()
        self.limiter.reset()
        self.directory.reset()


def _respond(request_id: str, response: Response, delay: float) -> Outcome:
    return Outcome("respond", request_id, response, delay)


def _label(outcome: Outcome) -> str:
    if outcome.kind == "respond" and outcome.response is not None:
        return str(outcome.response.status)
    return "reset" if outcome.kind == "reset" else "timeout"
