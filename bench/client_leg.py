"""`python -m bench.client_leg`: the HTTP client's own leg of a request, in a hot loop.

Issue 11's added-latency point compares the worker with `5aa140f`, whose client was
hand-written; `bench.latency_legs` puts most of the gap in the client leg (the transport handed
the request → its bytes written to the socket). This times that leg alone: sequential Track
POSTs through `delivery.UserpilotClient` against a raw asyncio server in the same process
(202, no body), after a warm-up, from `handle_async_request` to the socket's `write`.
`--profile` prints cProfile's cumulative view of the same loop (the leg doubles under it).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

ANSWER = b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n"
BODY = b'{"user_id":"u1","event_name":"e","metadata":{"a":1}}'


class _Accepting(asyncio.Protocol):
    """Answers each whole request (head and Content-Length body) with a bare 202."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, rest = self.buffer.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            if len(rest) < length:
                return
            self.buffer = rest[length:]
            self.transport.write(ANSWER)


async def _legs(requests: int, warmup: int, profile: cProfile.Profile | None
                ) -> tuple[list[float], float]:
    """Per request, µs from the transport handed it to the client's socket write; and µs
    per request in all."""
    import asyncio.selector_events as selector_events

    from consumer.delivery import UserpilotClient

    writes: list[float] = []
    socket_transport: Any = getattr(selector_events, "_SelectorSocketTransport")  # noqa: B009
    plain_write = socket_transport.write

    def stamped(transport: Any, data: Any) -> None:
        writes.append(time.perf_counter())
        plain_write(transport, data)

    socket_transport.write = stamped
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Accepting, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = UserpilotClient(f"http://127.0.0.1:{port}/v1/track",
                             {"Authorization": "Token bench"}, timeout_s=10,
                             max_connections=4)
    starts: list[float] = []
    handle = client._transport.handle_async_request

    async def timed(request: Any) -> Any:
        starts.append(time.perf_counter())
        return await handle(request)

    client._transport.handle_async_request = timed  # type: ignore[method-assign]
    try:
        for _ in range(warmup):
            await client.track(BODY)
        starts.clear()
        writes.clear()
        if profile is not None:
            profile.enable()
        began = time.perf_counter()
        for _ in range(requests):
            await client.track(BODY)
            await asyncio.sleep(0)
        took = time.perf_counter() - began
        if profile is not None:
            profile.disable()
    finally:
        await client.aclose()
        server.close()
        socket_transport.write = plain_write
    # The server's answers are written too: each leg ends at the first write after its start.
    legs: list[float] = []
    i = 0
    for start in starts:
        while i < len(writes) and writes[i] < start:
            i += 1
        if i < len(writes):
            legs.append((writes[i] - start) * 1e6)
            i += 1
    return legs, took / requests * 1e6


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.client_leg", description=__doc__)
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--profile", action="store_true", help="print cProfile's cumulative view")
    args = p.parse_args(argv)
    profile = cProfile.Profile() if args.profile else None
    legs, per_request = asyncio.run(_legs(args.requests, args.warmup, profile))
    ordered = sorted(legs)
    print(f"client leg p50 {statistics.median(legs):.1f} µs, "
          f"p90 {ordered[int(len(ordered) * 0.9)]:.1f} µs; "
          f"{per_request:.1f} µs per request in all ({len(legs)} requests)")
    if profile is not None:
        pstats.Stats(profile, stream=sys.stdout).sort_stats("cumulative").print_stats(40)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
