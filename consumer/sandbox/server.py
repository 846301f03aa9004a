"""The socket edge: an asyncio HTTP/1.1 server that runs ``SandboxApp`` outcomes.

Raw ``asyncio`` streams rather than a web framework, so a connection reset is one
``SO_LINGER`` away and the server costs little next to the client it is measuring.
``SandboxThread`` runs it on its own loop in a background thread for in-process tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import threading
from types import TracebackType

from consumer.sandbox.app import Outcome, SandboxApp
from consumer.sandbox.config import SandboxConfig
from consumer.sandbox.errors import problem_for_status
from consumer.sandbox.http import (
    MAX_HEAD_BYTES,
    HttpError,
    Request,
    parse_head,
    render_response,
)

__all__ = ["SandboxServer", "SandboxThread", "serve"]

log = logging.getLogger(__name__)

IDLE_TIMEOUT_S = 120.0
"""How long a connection may wait for (the rest of) a request before it is closed."""

_LINGER_RESET = struct.pack("ii", 1, 0)


class SandboxServer:
    """A listening sandbox; ``url`` is known once ``serve()`` returns."""

    def __init__(self, app: SandboxApp, server: asyncio.Server) -> None:
        self.app = app
        self._server = server
        self._writers: set[asyncio.StreamWriter] = set()
        sockname = server.sockets[0].getsockname()
        self.host: str = sockname[0]
        self.port: int = sockname[1]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def serve_forever(self) -> None:
        await self._server.serve_forever()

    async def close(self) -> None:
        """Stop listening and drop every open connection (hung ones included)."""
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await self._server.wait_closed()

    async def handle_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._writers.add(writer)
        try:
            await self._connection_loop(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except TimeoutError:
            log.debug("closing a connection idle (or part-sent) for %g s", IDLE_TIMEOUT_S)
        except Exception:
            # Answered, not dropped without a word (review "sandbox48").
            log.exception("sandbox: a request failed")
            with contextlib.suppress(Exception):
                await self._refuse(writer, HttpError(500, "the sandbox failed on this request"))
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _connection_loop(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        app = self.app
        while True:
            try:
                # Bounded, as Userpilot's front ends close idle connections: held for ever,
                # part-sent heads took every descriptor and health stopped answering (review
                # "sandbox48"); a pooled connection closed while idle is the client's to handle.
                raw_head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"),
                                                  IDLE_TIMEOUT_S)
            except asyncio.IncompleteReadError as exc:
                if exc.partial:
                    log.debug("client closed mid-request")
                return
            except asyncio.LimitOverrunError:
                await self._refuse(writer, HttpError(431, "request head too large"))
                return
            try:
                head = parse_head(raw_head[:-4])
                length = head.content_length()
                if length > app.config.max_body_bytes:
                    raise HttpError(413, "request body too large")
            except HttpError as exc:
                await self._refuse(writer, exc)
                return
            body = (await asyncio.wait_for(reader.readexactly(length), IDLE_TIMEOUT_S)
                    if length else b"")
            outcome = app.handle(Request.from_head(head, body))
            if outcome.delay:
                await asyncio.sleep(outcome.delay)
            if not await self._execute(outcome, head.keep_alive, reader, writer,
                                       head_only=head.method == "HEAD"):
                return

    async def _execute(
        self,
        outcome: Outcome,
        keep_alive: bool,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        head_only: bool = False,
    ) -> bool:
        """Carry out an outcome; False means the connection is finished."""
        if outcome.kind == "respond" and outcome.response is not None:
            writer.write(
                render_response(
                    outcome.response, keep_alive=keep_alive, request_id=outcome.request_id,
                    head_only=head_only,
                )
            )
            await writer.drain()
            return keep_alive
        if outcome.kind == "reset":
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            writer.transport.abort()
            return False
        if outcome.kind == "hang":
            while await reader.read(65536):
                pass
        return False

    async def _refuse(self, writer: asyncio.StreamWriter, error: HttpError) -> None:
        response = problem_for_status(error.status, error.message).to_response()
        writer.write(
            render_response(response, keep_alive=False, request_id=self.app.next_request_id())
        )
        with contextlib.suppress(ConnectionError):
            await writer.drain()


async def serve(config: SandboxConfig, app: SandboxApp | None = None) -> SandboxServer:
    """Start listening (``port=0`` picks a free port) and return the running server."""
    sandbox: list[SandboxServer] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await sandbox[0].handle_connection(reader, writer)

    server = await asyncio.start_server(
        on_connect, config.host, config.port, limit=MAX_HEAD_BYTES, backlog=1024
    )
    sandbox.append(SandboxServer(app or SandboxApp(config), server))
    log.info(
        "userpilot sandbox listening on %s (rate limit %d per %gs)",
        sandbox[0].url,
        config.rate_limit,
        config.rate_window_seconds,
    )
    return sandbox[0]


class SandboxThread:
    """Run a sandbox on a background thread with its own event loop.

    ``with SandboxThread() as sandbox: httpx.post(sandbox.url + "/v1/track", ...)``.
    The default config listens on 127.0.0.1 with a free port.
    """

    def __init__(self, config: SandboxConfig | None = None) -> None:
        self.config = config or SandboxConfig(port=0)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="userpilot-sandbox", daemon=True)
        self._ready = threading.Event()
        self._server: SandboxServer | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def server(self) -> SandboxServer:
        if self._server is None:
            raise RuntimeError("sandbox is not running")
        return self._server

    def start(self) -> SandboxThread:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._server = self._loop.run_until_complete(serve(self.config))
        except BaseException as exc:  # handed to the starting thread
            self._error = exc
            self._ready.set()
            self._loop.close()
            return
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._loop.run_until_complete(self._shutdown())
            self._loop.close()

    async def _shutdown(self) -> None:
        await self.server.close()
        current = asyncio.current_task()
        tasks = [task for task in asyncio.all_tasks() if task is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    def __enter__(self) -> SandboxThread:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
