"""The sandbox's start-up settings, shared by the CLI, ``serve()`` and ``SandboxThread``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from consumer.sandbox.faults import FaultConfig

__all__ = ["DEFAULT_READ_TOKEN", "DEFAULT_WRITE_TOKEN", "SandboxConfig"]

DEFAULT_WRITE_TOKEN = "sandbox-write-token"
DEFAULT_READ_TOKEN = "sandbox-read-token"


@dataclass(frozen=True, slots=True)
class SandboxConfig:
    """Everything fixed at start; faults, limits and tokens can change later via the API.

    ``rate_limit`` is per token and per endpoint family: track and identify (company identify
    included) each get their own budget, as Userpilot documents; ``identify_rate_limit``
    overrides the identify budget (None: same as ``rate_limit``) and ``shared_rate_limit``
    makes all of them share one. Delete calls are limited to one per
    ``delete_interval_seconds`` (Userpilot: 2 s; 0 lifts it).
    ``rate_limit <= 0`` lifts the limit (benchmarks). ``retry_after`` is off by default
    because Userpilot documents no ``Retry-After`` header; turn it on to test that path.
    ``seed`` makes random faults reproducible.
    """

    host: str = "127.0.0.1"
    port: int = 8787
    write_tokens: tuple[str, ...] = (DEFAULT_WRITE_TOKEN,)
    read_tokens: tuple[str, ...] = (DEFAULT_READ_TOKEN,)
    rate_limit: int = 600
    rate_window_seconds: float = 60.0
    identify_rate_limit: int | None = None
    shared_rate_limit: bool = False
    delete_interval_seconds: float = 2.0
    retry_after: bool = False
    faults: FaultConfig = field(default_factory=FaultConfig)
    seed: int | None = None
    max_body_bytes: int = 1024 * 1024
    record_limit: int = 1_000_000

    def __post_init__(self) -> None:
        if not 0 < self.rate_window_seconds < math.inf:  # nan too: it lifted the limit
            raise ValueError("rate_window_seconds must be a positive number of seconds")
        if not 0 <= self.delete_interval_seconds < math.inf:  # nan, inf: a broken DELETE
            raise ValueError("delete_interval_seconds must be 0 (no limit) or positive")
        if not 0 <= self.port <= 65535:
            raise ValueError("port must be between 0 and 65535")
        if not self.write_tokens:
            raise ValueError("at least one write token is required")
