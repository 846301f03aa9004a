"""Fault injection: what can go wrong, parsed from plain JSON and decided without I/O.

An *action* is one line of a script or rule, written as a short string so tests read well:

    "500", "429", ...   answer with that status (Userpilot-shaped error body)
    "202", "pass"       handle the request normally (any 2xx means "no fault")
    "reset"             close the socket abruptly, no response
    "timeout:2000"      wait 2000 ms, then close without a response (never recorded)
    "hang"              never answer; the connection stays open until the client leaves
    "delay:300"         wait 300 ms, then handle normally

The script is a FIFO consumed one entry per API request, before anything else. Rules match
``user_id`` / ``event_name`` (and optionally ``path``) of a parsed body and fire up to
``times`` times (``null`` = forever), so a test can make one event fail permanently.

*Phases* are a timeline that starts when they are set: each lasts ``seconds`` and either
answers every API request with one ``action`` (a timed outage: ``{"seconds": 60,
"action": "503"}``), or replaces the random faults with its own ``error_rate`` /
``error_codes`` / ``reset_rate`` (a flaky phase), or is healthy (neither). After the last
phase the configured random faults apply again. With ``echo_errors`` every error
response's body also echoes the request (headers, Authorization included, and body), as
some gateways do, so a test can check that the token never lands in the DLQ.
"""

from __future__ import annotations

import json
import random
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from consumer.sandbox.http import Request, Response

__all__ = [
    "Action",
    "FaultConfig",
    "FaultError",
    "FaultState",
    "Phase",
    "Rule",
    "echo_request",
    "parse_action",
]

ActionKind = Literal["status", "pass", "reset", "timeout", "hang", "delay"]


class FaultError(ValueError):
    """A fault setting that cannot be applied; the message says which and why."""


@dataclass(frozen=True, slots=True)
class Action:
    kind: ActionKind
    status: int = 0
    ms: float = 0.0
    text: str = ""

    @property
    def handles_normally(self) -> bool:
        return self.kind in ("pass", "delay")


def _parse_ms(text: str, raw: str) -> float:
    try:
        ms = float(text)
    except ValueError:
        raise FaultError(f"invalid milliseconds in action {raw!r}") from None
    if ms < 0:
        raise FaultError(f"negative milliseconds in action {raw!r}")
    if not ms <= MAX_DELAY_MS:  # inf and NaN too: every request hung (review diff25)
        raise FaultError(f"milliseconds in action {raw!r} must be at most {MAX_DELAY_MS}")
    return ms


def parse_action(raw: object) -> Action:
    """Parse one action string (or bare status int); raise ``FaultError`` if unknown."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        raw = str(raw)
    if not isinstance(raw, str):
        raise FaultError(f"action must be a string, got {raw!r}")
    text = raw.strip().lower()
    name, _, arg = text.partition(":")
    if name.isdigit():
        status = int(name)
        if not 100 <= status <= 599 or arg:
            raise FaultError(f"invalid status action {raw!r}")
        if 200 <= status < 300:
            return Action("pass", status=status, text=text)
        return Action("status", status=status, text=text)
    if name in ("pass", "ok") and not arg:
        return Action("pass", text=text)
    if name == "reset" and not arg:
        return Action("reset", text=text)
    if name == "hang" and not arg:
        return Action("hang", text=text)
    if name == "timeout":
        return (
            Action("timeout", ms=_parse_ms(arg, raw), text=text)
            if arg
            else Action("hang", text=text)
        )
    if name == "delay" and arg:
        return Action("delay", ms=_parse_ms(arg, raw), text=text)
    raise FaultError(
        f"unknown action {raw!r}; use a status, pass, reset, hang, timeout:MS or delay:MS"
    )


@dataclass(frozen=True, slots=True)
class Rule:
    """Fire ``action`` for requests whose body matches every given field."""

    action: Action
    user_id: str | None = None
    event_name: str | None = None
    path: str | None = None
    times: int | None = None

    @classmethod
    def from_json(cls, raw: object) -> Rule:
        if not isinstance(raw, dict):
            raise FaultError("each rule must be an object")
        unknown = set(raw) - {"action", "user_id", "event_name", "path", "times"}
        if unknown:
            raise FaultError(f"unknown rule keys: {sorted(unknown)}")
        if "action" not in raw:
            raise FaultError("rule needs an action")
        if not any(raw.get(key) is not None for key in ("user_id", "event_name")):
            raise FaultError("rule needs user_id and/or event_name to match")
        times = raw.get("times")
        if times is not None and (not isinstance(times, int) or times < 0):
            raise FaultError("rule times must be a non-negative integer or null")
        for key in ("user_id", "event_name", "path"):
            if raw.get(key) is not None and not isinstance(raw[key], str):
                raise FaultError(f"rule {key} must be a string")
        return cls(
            action=parse_action(raw["action"]),
            user_id=raw.get("user_id"),
            event_name=raw.get("event_name"),
            path=raw.get("path"),
            times=times,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "action": self.action.text,
            "user_id": self.user_id,
            "event_name": self.event_name,
            "path": self.path,
            "times": self.times,
        }

    def matches(self, path: str, body: Mapping[str, Any]) -> bool:
        if self.path is not None and self.path != path:
            return False
        if self.user_id is not None and body.get("user_id") != self.user_id:
            return False
        return self.event_name is None or body.get("event_name") == self.event_name


@dataclass(frozen=True, slots=True)
class Phase:
    """``seconds`` of one fault regime (see the module docstring)."""

    seconds: float
    action: Action | None = None
    error_rate: float = 0.0
    error_codes: tuple[int, ...] = (500, 502, 503)
    reset_rate: float = 0.0

    KEYS = frozenset({"seconds", "action", "error_rate", "error_codes", "reset_rate"})

    @classmethod
    def from_json(cls, raw: object) -> Phase:
        if not isinstance(raw, dict):
            raise FaultError("each phase must be an object")
        unknown = set(raw) - cls.KEYS
        if unknown:
            raise FaultError(f"unknown phase keys: {sorted(unknown)}")
        seconds = raw.get("seconds")
        if (isinstance(seconds, bool) or not isinstance(seconds, int | float)
                or not 0 < seconds <= MAX_DELAY_MS / 1000):  # NaN and inf too (diff25b)
            raise FaultError(f"phase seconds must be a number over 0, at most "
                             f"{MAX_DELAY_MS // 1000}")
        action = None
        if raw.get("action") is not None:
            action = parse_action(raw["action"])
            if action.kind == "delay":
                raise FaultError("a phase action must be a fault (status, reset, timeout, "
                                 "hang) or pass; use latency_ms for delays")
            if action.handles_normally:
                action = None  # "pass": a healthy phase
            if any(key in raw for key in ("error_rate", "error_codes", "reset_rate")):
                raise FaultError("a phase has an action or error/reset rates, not both")
        codes: tuple[int, ...] = (500, 502, 503)
        if "error_codes" in raw:
            value = raw["error_codes"]
            if not isinstance(value, list) or not value:
                raise FaultError("error_codes must be a non-empty list of statuses")
            codes = tuple(_status(code) for code in value)
        return cls(float(seconds), action, _rate(raw, "error_rate", 0.0), codes,
                   _rate(raw, "reset_rate", 0.0))

    def to_json(self) -> dict[str, Any]:
        if self.action is not None:
            return {"seconds": self.seconds, "action": self.action.text}
        return {"seconds": self.seconds, "error_rate": self.error_rate,
                "error_codes": list(self.error_codes), "reset_rate": self.reset_rate}


def echo_request(response: Response, request: Request) -> Response:
    """The error response with the request echoed first in its body (headers included)."""
    try:
        doc: Any = json.loads(response.body or b"{}")
    except ValueError:
        doc = {"error": response.body.decode("utf-8", "replace")}
    if not isinstance(doc, dict):
        doc = {"error": doc}
    echo = {"method": request.method, "path": request.path, "headers": dict(request.headers),
            "body": request.body.decode("utf-8", "replace")[:2000]}
    body = json.dumps({"echo": echo, **doc}).encode()
    return replace(response, body=body, headers=dict(response.headers))


def _rate(raw: Mapping[str, Any], key: str, default: float) -> float:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise FaultError(f"{key} must be a number between 0 and 1")
    return float(value)


def _ms(raw: Mapping[str, Any], key: str, default: float) -> float:
    value = raw.get(key, default)
    if (isinstance(value, bool) or not isinstance(value, int | float) or value < 0
            or not value <= MAX_DELAY_MS):  # inf and NaN too: every request hung
        raise FaultError(f"{key} must be a number of milliseconds from 0 to {MAX_DELAY_MS}")
    return float(value)


MAX_DELAY_MS = 3_600_000  # an hour: longer is no test of a client


@dataclass(frozen=True, slots=True)
class FaultConfig:
    """Random faults plus the script and rules to load; all off by default."""

    error_rate: float = 0.0
    error_codes: tuple[int, ...] = (500, 502, 503)
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    reset_rate: float = 0.0
    script: tuple[Action, ...] = ()
    rules: tuple[Rule, ...] = ()
    phases: tuple[Phase, ...] = ()
    echo_errors: bool = False

    KEYS = frozenset(
        {"error_rate", "error_codes", "latency_ms", "jitter_ms", "reset_rate", "script", "rules",
         "phases", "echo_errors"}
    )

    def merged(self, raw: Mapping[str, Any]) -> FaultConfig:
        """This config with the keys present in ``raw`` replaced (validated)."""
        unknown = set(raw) - self.KEYS
        if unknown:
            raise FaultError(f"unknown fault keys: {sorted(unknown)}")
        codes = self.error_codes
        if "error_codes" in raw:
            value = raw["error_codes"]
            if not isinstance(value, list) or not value:
                raise FaultError("error_codes must be a non-empty list of statuses")
            codes = tuple(_status(code) for code in value)
        script = self.script
        if "script" in raw:
            if not isinstance(raw["script"], list):
                raise FaultError("script must be a list of actions")
            script = tuple(parse_action(entry) for entry in raw["script"])
        rules = self.rules
        if "rules" in raw:
            if not isinstance(raw["rules"], list):
                raise FaultError("rules must be a list of objects")
            rules = tuple(Rule.from_json(entry) for entry in raw["rules"])
        phases = self.phases
        if "phases" in raw:
            if not isinstance(raw["phases"], list):
                raise FaultError("phases must be a list of objects")
            phases = tuple(Phase.from_json(entry) for entry in raw["phases"])
        echo = raw.get("echo_errors", self.echo_errors)
        if not isinstance(echo, bool):
            raise FaultError("echo_errors must be true or false")
        return replace(
            self,
            error_rate=_rate(raw, "error_rate", self.error_rate),
            error_codes=codes,
            latency_ms=_ms(raw, "latency_ms", self.latency_ms),
            jitter_ms=_ms(raw, "jitter_ms", self.jitter_ms),
            reset_rate=_rate(raw, "reset_rate", self.reset_rate),
            script=script,
            rules=rules,
            phases=phases,
            echo_errors=echo,
        )


def _status(value: object) -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 100 <= value <= 599:
        raise FaultError(f"invalid status {value!r}")
    return value


@dataclass
class _LiveRule:
    rule: Rule
    remaining: int | None


@dataclass
class FaultState:
    """The live fault settings: a consumable script, counted rules, and a seeded RNG."""

    config: FaultConfig = field(default_factory=FaultConfig)
    rng: random.Random = field(default_factory=random.Random)
    script: deque[Action] = field(default_factory=deque)
    rules: list[_LiveRule] = field(default_factory=list)
    clock: Callable[[], float] = time.monotonic
    phases_started: float = 0.0

    def __post_init__(self) -> None:
        self.load(self.config)

    def load(self, config: FaultConfig) -> None:
        self.config = config
        self.script = deque(config.script)
        self.rules = [_LiveRule(rule, rule.times) for rule in config.rules]
        self.phases_started = self.clock()

    def update(self, raw: Mapping[str, Any]) -> None:
        """Apply a partial update; the script, rules and phases restart only if given."""
        self.config = self.config.merged(raw)
        if "script" in raw:
            self.script = deque(self.config.script)
        if "rules" in raw:
            self.rules = [_LiveRule(rule, rule.times) for rule in self.config.rules]
        if "phases" in raw:
            self.phases_started = self.clock()

    def current_phase(self) -> tuple[int, Phase, float] | None:
        """(index, phase, seconds left in it) now, or None once the timeline is over."""
        elapsed = self.clock() - self.phases_started
        for index, phase in enumerate(self.config.phases):
            if elapsed < phase.seconds:
                return index, phase, phase.seconds - elapsed
            elapsed -= phase.seconds
        return None

    def next_scripted(self) -> Action | None:
        return self.script.popleft() if self.script else None

    def random_fault(self) -> Action | None:
        """The current phase's fault, else a reset or an error status drawn from the
        configured probabilities (the phase's own, while one runs)."""
        cfg: FaultConfig | Phase = self.config
        if self.config.phases:
            now = self.current_phase()
            if now is not None:
                cfg = now[1]
                if cfg.action is not None:
                    return cfg.action
        if cfg.reset_rate and self.rng.random() < cfg.reset_rate:
            return Action("reset", text="reset")
        if cfg.error_rate and self.rng.random() < cfg.error_rate:
            status = self.rng.choice(cfg.error_codes)
            return Action("status", status=status, text=str(status))
        return None

    def latency_seconds(self) -> float:
        cfg = self.config
        ms = cfg.latency_ms
        if cfg.jitter_ms:
            ms += self.rng.uniform(0, cfg.jitter_ms)
        return ms / 1000

    def match_rule(self, path: str, body: Mapping[str, Any]) -> Action | None:
        """The first live rule matching this body, consuming one of its ``times``."""
        for live in self.rules:
            if live.remaining == 0 or not live.rule.matches(path, body):
                continue
            if live.remaining is not None:
                live.remaining -= 1
            return live.rule.action
        return None

    def to_json(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "error_rate": cfg.error_rate,
            "error_codes": list(cfg.error_codes),
            "latency_ms": cfg.latency_ms,
            "jitter_ms": cfg.jitter_ms,
            "reset_rate": cfg.reset_rate,
            "script": [action.text for action in self.script],
            "rules": [{**live.rule.to_json(), "remaining": live.remaining} for live in self.rules],
            "phases": [phase.to_json() for phase in cfg.phases],
            "phase": self._phase_view(),
            "echo_errors": cfg.echo_errors,
        }

    def _phase_view(self) -> dict[str, Any] | None:
        now = self.current_phase() if self.config.phases else None
        if now is None:
            return None
        index, _, left = now
        return {"index": index, "seconds_left": round(left, 3)}
