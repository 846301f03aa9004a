"""Services a fault test may kill, freeze or restart: never the shared ones.

They live in a run directory of their own (`SERVICES_RUN_DIR`) on free ports, so they never
collide with the services `make test` started from this checkout, whatever ports those use.
"""

from __future__ import annotations

import os
import random
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
    """A free port whose successor is free too (a broker's controller listens on port + 1),
    below the kernel's ephemeral range. A port from that range (a bind to port 0) is also
    what the kernel hands out as the source port of outgoing connections, and the tests
    open thousands: one took a broker's port before it started (CI, ctl `up` failed)."""
    top = min(_ephemeral_low(), 65535) - 1
    pick = random.Random()
    for _ in range(200):
        port = pick.randrange(20000, top)
        if _free(port) and _free(port + 1):
            return str(port)
    raise RuntimeError("no free port pair below the ephemeral range")


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class OwnServices:
    """A broker and a registry of one test module's own, driven through services/ctl.py."""

    def __init__(self, prefix: str, *, kafka_port: str | None = None,
                 registry_port: str | None = None) -> None:
        self.run_dir = tempfile.mkdtemp(prefix=prefix)
        # Picked on first use, not at import: modules are imported at collection, minutes
        # before their services start.
        self._kafka_port = kafka_port
        self._registry_port = registry_port

    @property
    def kafka_port(self) -> str:
        if self._kafka_port is None:
            self._kafka_port = free_port_pair()
        return self._kafka_port

    @property
    def registry_port(self) -> str:
        if self._registry_port is None:
            self._registry_port = free_port_pair()
        return self._registry_port

    @property
    def kafka_bootstrap(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"

    @property
    def registry_url(self) -> str:
        return f"http://127.0.0.1:{self.registry_port}/apis/ccompat/v7"

    def ctl(self, *args: str) -> None:
        env = {**os.environ, "KAFKA_PORT": self.kafka_port,
               "REGISTRY_PORT": self.registry_port, "SERVICES_RUN_DIR": self.run_dir}
        done = subprocess.run([sys.executable, str(CTL), *args], env=env, timeout=300,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if done.returncode != 0:  # say why: the exit status alone hid it
            raise RuntimeError(f"ctl {' '.join(args)} (kafka port {self.kafka_port}, registry "
                               f"port {self.registry_port}) exited {done.returncode}:\n"
                               f"{done.stdout[-2000:]}{done.stderr[-2000:]}")

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
