"""A real redis-server for the shared-budget and deduplication tests.

``redis_url``: REDIS_URL from the environment as is (``make test`` exports the one
``services/ctl.py`` started); otherwise this session starts Redis through ``services/ctl.py``
and stops it at the end.

``stoppable_redis``: a private redis-server on a free port that a test may stop and start
again (Redis going away mid-run). Private, so stopping it never disturbs the shared one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.certificates import self_signed
from tests.conftest import _ctl, _ctl_env
from tests.integration.harness import free_port


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


@dataclass
class StoppableRedis:
    """One redis-server process of this test's own; ``stop`` kills it, ``start`` restarts it
    on the same port (empty: no persistence, like a Redis restart that lost its data)."""

    workdir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    extra: tuple[str, ...] = ()  # more redis-server arguments (`--rename-command`, ...)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        server = shutil.which("redis-server")
        if server is None:
            raise RuntimeError("redis-server is not installed: run `make sysdeps` (as root)")
        self.proc = subprocess.Popen(
            [server, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), *self.extra],
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


@dataclass
class TlsRedis:
    """A redis-server of this test's own that speaks TLS only, with a self-signed
    certificate for `localhost` (`cert`, also the CA to trust)."""

    port: int
    cert: Path

    def url(self, host: str = "localhost", scheme: str = "rediss") -> str:
        return f"{scheme}://{host}:{self.port}/0"


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[TlsRedis]:
    server = shutil.which("redis-server")
    if server is None:
        raise RuntimeError("redis-server is not installed: run `make sysdeps` (as root)")
    cert, key = self_signed(tmp_path, "DNS:localhost", stem="redis-")
    port = free_port()
    proc = subprocess.Popen(
        [server, "--bind", "127.0.0.1", "--port", "0", "--tls-port", str(port),
         "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file",
         str(cert), "--tls-auth-clients", "no", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", port), timeout=0.5):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"TLS redis-server on port {port} did not listen")
            time.sleep(0.05)
        yield TlsRedis(port, cert)
    finally:
        proc.kill()
        proc.wait(10)


class SlowLink:
    """A TCP relay to a Redis that delays every reply by `delay_s` (a Redis that far away):
    its own event loop on a thread, so a subprocess (check-config) can use it too."""

    def __init__(self, upstream_port: int, delay_s: float) -> None:
        self.upstream_port, self.delay_s = upstream_port, delay_s
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def __enter__(self) -> SlowLink:
        self._thread.start()
        assert self._ready.wait(5), "relay did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                       delay: float) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await src.read(65536):
                    if delay:
                        await asyncio.sleep(delay)
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(Exception):
                dst.close()

        await asyncio.gather(pipe(reader, up_writer, 0.0),
                             pipe(up_reader, writer, self.delay_s))
