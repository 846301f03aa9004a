"""Services a fault test may kill, freeze or restart: never the shared ones.

They live in a run directory of their own (`SERVICES_RUN_DIR`) on free ports, so they never
collide with the services `make test` started from this checkout, whatever ports those use.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.integration.harness import REPO

__all__ = ["OwnServices", "free_port_pair"]

CTL = REPO / "services" / "ctl.py"


def free_port_pair() -> str:
    """A port whose successor is free too (a broker's controller listens on port + 1)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port >= 65535:
            continue
        with socket.socket() as s2:
            try:
                s2.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return str(port)
    raise RuntimeError("no free port pair")


class OwnServices:
    """A broker and a registry of one test module's own, driven through services/ctl.py."""

    def __init__(self, prefix: str, *, kafka_port: str | None = None,
                 registry_port: str | None = None) -> None:
        self.run_dir = tempfile.mkdtemp(prefix=prefix)
        self.kafka_port = kafka_port or free_port_pair()
        self.registry_port = registry_port or free_port_pair()

    @property
    def kafka_bootstrap(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"

    @property
    def registry_url(self) -> str:
        return f"http://127.0.0.1:{self.registry_port}/apis/ccompat/v7"

    def ctl(self, *args: str) -> None:
        env = {**os.environ, "KAFKA_PORT": self.kafka_port,
               "REGISTRY_PORT": self.registry_port, "SERVICES_RUN_DIR": self.run_dir}
        subprocess.run([sys.executable, str(CTL), *args], env=env, check=True, timeout=300,
                       stdin=subprocess.DEVNULL, capture_output=True)

    def kafka(self, record: Path) -> Iterator[str]:
        """Fixture body: the broker up for the module, stopped after (even if left down)."""
        self.ctl("up", "kafka", "--record", str(record))
        try:
            yield self.kafka_bootstrap
        finally:
            self.ctl("up", "kafka", "--keep-data")  # a test may have left it down
            self.ctl("down", "--from", str(record))

    def registry(self, record: Path) -> Iterator[str]:
        """Fixture body: the registry up for the module, thawed and stopped after."""
        self.ctl("up", "registry", "--record", str(record))
        try:
            yield self.registry_url
        finally:
            self.ctl("thaw", "registry")
            self.ctl("down", "--from", str(record))
