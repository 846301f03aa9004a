"""An in-process Kafka protocol proxy that can refuse a group's committed offsets.

Clients bootstrap to the proxy; it relays every request to one real broker and rewrites the
broker addresses in Metadata and FindCoordinator answers to its own port, so every
connection of the client (bootstrap, partition leader, group coordinator) goes through it.

Armed with `fail_offset_fetch`, it answers a group's next OffsetFetch requests itself, with
the request-level NOT_COORDINATOR a broker gives while the group coordinator moves: only the
group's error code, no partitions. That is librdkafka#5586's trigger: answered so for a new
assignment's committed offsets, librdkafka never asks again and never fetches.

    with KafkaProxy(kafka_bootstrap) as proxy:
        proxy.fail_offset_fetch(group, count=2, window_s=0.5)
        ... clients use proxy.bootstrap ...
        assert len(proxy.refused) == 2

Limits: one upstream broker (the single-node dev/CI cluster), whose advertised port is the
bootstrap's; only the port is rewritten, the advertised host must reach the proxy too
(127.0.0.1 here). The request is still relayed upstream when refused (its answer is
replaced), so the broker's view of the conversation stays whole.
"""

from __future__ import annotations

import asyncio
import struct
import threading
import time
from dataclasses import dataclass

METADATA, OFFSET_FETCH, FIND_COORDINATOR = 3, 9, 10
NOT_COORDINATOR = 16


def _uvarint(buf: bytes | bytearray, pos: int) -> tuple[int, int]:
    """An unsigned varint at `pos`: (value, position after it)."""
    shift = value = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _put_uvarint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if not value:
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)


def _skip_tags(buf: bytes | bytearray, pos: int) -> int:
    """Past a tagged-fields section (flexible versions)."""
    count, pos = _uvarint(buf, pos)
    for _ in range(count):
        _, pos = _uvarint(buf, pos)  # tag
        size, pos = _uvarint(buf, pos)
        pos += size
    return pos


def _skip_string(buf: bytes | bytearray, pos: int, flexible: bool) -> int:
    """Past a (nullable) string: compact in flexible versions, int16-sized otherwise."""
    if flexible:
        size, pos = _uvarint(buf, pos)
        return pos + max(size - 1, 0)
    size = int(struct.unpack_from(">h", buf, pos)[0])
    return pos + 2 + max(size, 0)


def _array_len(buf: bytes | bytearray, pos: int, flexible: bool) -> tuple[int, int]:
    """An array's length (0 for null) and where its items start: compact (length + 1) in
    flexible versions, int32 otherwise."""
    if flexible:
        count, pos = _uvarint(buf, pos)
        return max(count - 1, 0), pos
    (count,) = struct.unpack_from(">i", buf, pos)
    return max(int(count), 0), pos + 4


def _flexible(api: int, version: int) -> bool:
    """Whether `version` of `api` uses the flexible (compact, tagged) encoding."""
    first = {METADATA: 9, OFFSET_FETCH: 6, FIND_COORDINATOR: 3}.get(api)
    return first is not None and version >= first


@dataclass(frozen=True)
class Refusal:
    """One OffsetFetch the proxy answered NOT_COORDINATOR."""

    at: float  # time.monotonic()
    group: str
    version: int


@dataclass
class _Rule:
    count: int  # requests still to refuse
    window_s: float  # ... and any other within this long of the first refused
    first_at: float | None = None


class KafkaProxy:
    """A protocol-aware TCP relay in front of one broker, served by an event loop on a
    thread of its own; `start`/`stop` or a ``with`` block."""

    def __init__(self, upstream: str, host: str = "127.0.0.1") -> None:
        up_host, _, up_port = upstream.rpartition(":")
        self.upstream_host, self.upstream_port = up_host, int(up_port)
        self.host = host
        self.port = 0  # bound at start
        self.refused: list[Refusal] = []
        self._rules: dict[str, _Rule] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def bootstrap(self) -> str:
        """``host:port`` for clients' bootstrap.servers."""
        return f"{self.host}:{self.port}"

    # lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> KafkaProxy:
        """Listen on a free port; returns once clients can connect."""
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="kafkaproxy",
                                        daemon=True)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._client, self.host, 0), loop).result(timeout)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop listening, drop every relayed connection, end the loop and its thread."""
        loop, thread, server = self._loop, self._thread, self._server
        if loop is None or thread is None:
            return

        async def shutdown() -> None:
            if server is not None:
                server.close()
            for writer in list(self._writers):
                writer.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(timeout)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)
            if not thread.is_alive():
                loop.close()
            self._loop, self._thread, self._server = None, None, None

    def __enter__(self) -> KafkaProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # control -----------------------------------------------------------------------------

    def fail_offset_fetch(self, group: str, count: int = 1, window_s: float = 0.0) -> None:
        """Answer the next `count` OffsetFetch requests of `group`, and any other within
        `window_s` of the first of them, with a request-level NOT_COORDINATOR; later ones
        pass. Replaces an earlier arming for the group."""
        with self._lock:
            self._rules[group] = _Rule(count, window_s)

    def _refuse(self, group: str) -> bool:
        with self._lock:
            rule = self._rules.get(group)
            if rule is None:
                return False
            now = time.monotonic()
            if rule.count > 0:
                rule.count -= 1
                if rule.first_at is None:
                    rule.first_at = now
                return True
            if rule.first_at is not None and now - rule.first_at <= rule.window_s:
                return True
            del self._rules[group]
            return False

    # relay -------------------------------------------------------------------------------

    async def _client(self, creader: asyncio.StreamReader,
                      cwriter: asyncio.StreamWriter) -> None:
        try:
            ureader, uwriter = await asyncio.open_connection(self.upstream_host,
                                                             self.upstream_port)
        except OSError:
            cwriter.close()
            return
        self._writers.update((cwriter, uwriter))
        # correlation id -> (api key, version, group refused or None)
        pending: dict[int, tuple[int, int, str | None]] = {}
        try:
            await asyncio.gather(self._requests(creader, uwriter, pending),
                                 self._responses(ureader, cwriter, pending))
        finally:
            self._writers.difference_update((cwriter, uwriter))

    async def _requests(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        pending: dict[int, tuple[int, int, str | None]]) -> None:
        try:
            while True:
                head = await reader.readexactly(4)
                body = await reader.readexactly(struct.unpack(">i", head)[0])
                api, version, corr = struct.unpack_from(">hhi", body)
                refused = None
                if api == OFFSET_FETCH:
                    group = self._offset_fetch_group(body, version)
                    if group is not None and self._refuse(group):
                        refused = group
                pending[corr] = (api, version, refused)
                writer.write(head + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _responses(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         pending: dict[int, tuple[int, int, str | None]]) -> None:
        try:
            while True:
                head = await reader.readexactly(4)
                body = await reader.readexactly(struct.unpack(">i", head)[0])
                (corr,) = struct.unpack_from(">i", body)
                api, version, refused = pending.pop(corr, (-1, -1, None))
                if api == METADATA:
                    body = self._metadata(body, version)
                elif api == FIND_COORDINATOR:
                    body = self._find_coordinator(body, version)
                elif refused is not None:
                    body = self._not_coordinator(body[:4], version, refused)
                    self.refused.append(Refusal(time.monotonic(), refused, version))
                writer.write(struct.pack(">i", len(body)) + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            writer.close()

    # protocol ----------------------------------------------------------------------------

    @staticmethod
    def _offset_fetch_group(body: bytes, version: int) -> str | None:
        """The (first) group an OffsetFetch request names; None below v2 (no group error
        code to answer with) or when it names none."""
        if version < 2:
            return None
        flexible = _flexible(OFFSET_FETCH, version)
        pos = _skip_string(body, 8, flexible=False)  # request header: client id
        if flexible:
            pos = _skip_tags(body, pos)
        if version >= 8:  # groups[]: the first one's id
            groups, pos = _uvarint(body, pos)
            if groups <= 1:
                return None
        if flexible:
            size, pos = _uvarint(body, pos)
            return body[pos:pos + size - 1].decode()
        (size,) = struct.unpack_from(">h", body, pos)
        return body[pos + 2:pos + 2 + size].decode()

    def _advertise(self, buf: bytearray, port_at: int) -> None:
        """The port at `port_at` becomes the proxy's when it is the upstream broker's."""
        if struct.unpack_from(">i", buf, port_at)[0] == self.upstream_port:
            struct.pack_into(">i", buf, port_at, self.port)

    def _metadata(self, body: bytes, version: int) -> bytes:
        """Metadata answer with the brokers' ports rewritten (the brokers array only)."""
        buf = bytearray(body)
        flexible = _flexible(METADATA, version)
        pos = _skip_tags(buf, 4) if flexible else 4
        if version >= 3:
            pos += 4  # throttle_time_ms
        brokers, pos = _array_len(buf, pos, flexible)
        for _ in range(brokers):
            pos = _skip_string(buf, pos + 4, flexible)  # node_id, host
            self._advertise(buf, pos)
            pos += 4
            if version >= 1:
                pos = _skip_string(buf, pos, flexible)  # rack
            if flexible:
                pos = _skip_tags(buf, pos)
        return bytes(buf)

    def _find_coordinator(self, body: bytes, version: int) -> bytes:
        """FindCoordinator answer with the coordinator's port rewritten (v0-v4)."""
        buf = bytearray(body)
        flexible = _flexible(FIND_COORDINATOR, version)
        pos = _skip_tags(buf, 4) if flexible else 4
        if version >= 1:
            pos += 4  # throttle_time_ms
        if version >= 4:  # coordinators[]: key, node_id, host, port, error, message, tags
            count, pos = _array_len(buf, pos, flexible)
            for _ in range(count):
                pos = _skip_string(buf, pos, flexible)  # key
                pos = _skip_string(buf, pos + 4, flexible)  # node_id, host
                self._advertise(buf, pos)
                pos = _skip_string(buf, pos + 4 + 2, flexible)  # port, error, message
                pos = _skip_tags(buf, pos)
            return bytes(buf)
        pos += 2  # error_code
        if version >= 1:
            pos = _skip_string(buf, pos, flexible)  # error_message
        pos = _skip_string(buf, pos + 4, flexible)  # node_id, host
        self._advertise(buf, pos)
        return bytes(buf)

    @staticmethod
    def _not_coordinator(corr: bytes, version: int, group: str) -> bytes:
        """An OffsetFetch answer (v2+) of NOT_COORDINATOR for the whole request: no topics,
        only the error code (the group's, from v8)."""
        error = struct.pack(">h", NOT_COORDINATOR)
        throttle = struct.pack(">i", 0)
        if not _flexible(OFFSET_FETCH, version):  # [throttle (v3+)] topics[] error_code
            return corr + (throttle if version >= 3 else b"") + struct.pack(">i", 0) + error
        out = corr + b"\0" + throttle  # response header tags, throttle_time_ms
        if version < 8:  # topics[] (none), error_code, tags
            return out + _put_uvarint(1) + error + b"\0"
        name = group.encode()
        # groups[1]: group_id, topics[] (none), error_code, tags; then the answer's tags
        return (out + _put_uvarint(2) + _put_uvarint(len(name) + 1) + name + _put_uvarint(1)
                + error + b"\0" + b"\0")
