"""A local stand-in for Userpilot's HTTP API, for tests, demos and benchmarks.

Enforces the contract the worker must meet (tokens, headers, flat metadata, 600/min per
token) and injects the faults it must survive (5xx, resets, latency, hangs, scripts).
"""

from __future__ import annotations

import importlib as _importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from consumer.sandbox.auth import fingerprint
    from consumer.sandbox.client import SandboxControl
    from consumer.sandbox.config import DEFAULT_READ_TOKEN, DEFAULT_WRITE_TOKEN, SandboxConfig
    from consumer.sandbox.faults import FaultConfig
    from consumer.sandbox.server import SandboxServer, SandboxThread, serve

__all__ = [
    "DEFAULT_READ_TOKEN",
    "DEFAULT_WRITE_TOKEN",
    "FaultConfig",
    "SandboxConfig",
    "SandboxControl",
    "SandboxServer",
    "SandboxThread",
    "fingerprint",
    "serve",
]

_HOMES = {"fingerprint": "auth", "SandboxControl": "client", "DEFAULT_READ_TOKEN": "config",
          "DEFAULT_WRITE_TOKEN": "config", "SandboxConfig": "config", "FaultConfig": "faults",
          "SandboxServer": "server", "SandboxThread": "server", "serve": "server"}
"""Where each name lives, imported on first use (PEP 562): `python -m consumer run` builds
the `sandbox` subcommand's options (`cli.add_arguments`) without loading the server, its
client and their imports (~0.7 MB of RSS at import, ~0.3 MB of a worker's peak:
tests/bench/RESULTS.md, "Round 37")."""

if not TYPE_CHECKING:  # for mypy the names above are the imports: a misspelt one is an error

    def __getattr__(name: str) -> Any:
        home = _HOMES.get(name)
        if home is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(_importlib.import_module(f"{__name__}.{home}"), name)
        globals()[name] = value  # resolved once
        return value


def __dir__() -> list[str]:
    return sorted(__all__)
