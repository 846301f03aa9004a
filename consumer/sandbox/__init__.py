"""A local stand-in for Userpilot's HTTP API, for tests, demos and benchmarks.

Enforces the contract the worker must meet (tokens, headers, flat metadata, 600/min per
token) and injects the faults it must survive (5xx, resets, latency, hangs, scripts).
"""

from __future__ import annotations

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
