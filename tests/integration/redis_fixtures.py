"""A real redis-server for the shared-budget and deduplication tests.

``redis_url``: REDIS_URL from the environment as is (``make test`` exports the one
``services/ctl.py`` started); otherwise this session starts Redis through ``services/ctl.py``
and stops it at the end.

``stoppable_redis``: a private redis-server on a free port that a test may stop and start
again (Redis going away mid-run). Private, so stopping it never disturbs the shared one.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import _ctl, _ctl_env


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    preset = os.environ.get("REDIS_URL", "").strip()
    if preset:
        yield preset
        return
    record = tmp_path_factory.mktemp("services-redis") / "started"
    _ctl("up", "redis", "--record", str(record))
    try:
        yield _ctl_env()["REDIS_URL"]
    finally:
        _ctl("down", "--from", str(record))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class StoppableRedis:
    """One redis-server process of this test's own; ``stop`` kills it, ``start`` restarts it
    on the same port (empty: no persistence, like a Redis restart that lost its data)."""

    workdir: Path
    port: int = field(default_factory=_free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        server = shutil.which("redis-server")
        if server is None:
            raise RuntimeError("redis-server is not installed: run `make sysdeps` (as root)")
        self.proc = subprocess.Popen(
            [server, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING")

    def pause(self) -> None:
        """SIGSTOP: the server keeps its connections and state but answers nothing (calls
        time out, as with a black-holed network)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture
def stoppable_redis(tmp_path: Path) -> Iterator[StoppableRedis]:
    server = StoppableRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()
