"""Workload 4: the fastest plain asyncio loop POSTing the same payloads at the same concurrency.

No Kafka, no decode, no limiter, no retries: `concurrency` tasks pull bodies from one shared
iterator and POST them until the time is up. Four clients: the worker's own
(`UserpilotClient`, the like-for-like ceiling of the delivery path), `httpx.AsyncClient` on
the same aiohttp transport (how most code would use it), httpx's own pool, and bare aiohttp,
so the report shows how much of any gap is the HTTP client itself.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import httpx
from httpx_aiohttp import HttpxAiohttpClient

from consumer.delivery import UserpilotClient
from consumer.errors import WorkerError

__all__ = ["HttpResult", "run_aiohttp", "run_httpx", "run_httpx_aiohttp", "run_worker_client",
           "send_latency"]


@dataclass(frozen=True)
class HttpResult:
    """Requests answered 202, others, and the wall time of the whole run."""

    accepted: int
    other: int
    seconds: float
    cpu_s: float = float("nan")  # this process's CPU time (all threads) over `seconds`

    @property
    def rate(self) -> float:
        return self.accepted / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_us_per_request(self) -> float:
        done = self.accepted + self.other
        return 1e6 * self.cpu_s / done if done else float("nan")


def _bodies(payloads: Sequence[bytes], seconds: float) -> Iterator[bytes]:
    """Payloads in rotation until the deadline (checked per request, by every task)."""
    deadline = time.perf_counter() + seconds
    i = 0
    while time.perf_counter() < deadline:
        yield payloads[i % len(payloads)]
        i += 1


async def _timed(send: Callable[[bytes], Awaitable[bool]], payloads: Sequence[bytes],
                 seconds: float, concurrency: int) -> HttpResult:
    """`concurrency` tasks calling `send` (True: accepted) until the time is up, after one
    warm-up call that connects before the clock starts."""
    counts = {"accepted": 0, "other": 0}
    await send(payloads[0])
    source = _bodies(payloads, seconds)

    async def run() -> None:
        for body in source:
            counts["accepted" if await send(body) else "other"] += 1

    start, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(run() for _ in range(concurrency)))
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    return HttpResult(counts["accepted"], counts["other"], elapsed, cpu)


async def _httpx(url: str, headers: Mapping[str, str], payloads: Sequence[bytes],
                 seconds: float, concurrency: int, on_aiohttp: bool = False) -> HttpResult:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    kind = HttpxAiohttpClient if on_aiohttp else httpx.AsyncClient
    target = httpx.URL(url)  # parsed once, as the worker does (`UserpilotClient`)
    async with kind(headers=dict(headers), limits=limits, timeout=30.0) as client:

        async def send(body: bytes) -> bool:
            return (await client.post(target, content=body)).status_code == 202

        return await _timed(send, payloads, seconds, concurrency)


async def _aiohttp(url: str, headers: Mapping[str, str], payloads: Sequence[bytes],
                   seconds: float, concurrency: int) -> HttpResult:
    import aiohttp  # dev extra: only the benchmark needs it

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(headers=dict(headers), connector=connector) as session:

        async def send(body: bytes) -> bool:
            async with session.post(url, data=body) as response:
                await response.read()
                return response.status == 202

        return await _timed(send, payloads, seconds, concurrency)


def run_httpx(url: str, headers: Mapping[str, str], payloads: Sequence[bytes], seconds: float,
              concurrency: int) -> HttpResult:
    return asyncio.run(_httpx(url, headers, payloads, seconds, concurrency))


def run_aiohttp(url: str, headers: Mapping[str, str], payloads: Sequence[bytes],
                seconds: float, concurrency: int) -> HttpResult:
    return asyncio.run(_aiohttp(url, headers, payloads, seconds, concurrency))


def run_httpx_aiohttp(url: str, headers: Mapping[str, str], payloads: Sequence[bytes],
                      seconds: float, concurrency: int) -> HttpResult:
    """`httpx.AsyncClient.post` on httpx-aiohttp's transport (the client's full layer)."""
    return asyncio.run(_httpx(url, headers, payloads, seconds, concurrency, on_aiohttp=True))


async def _worker_client(url: str, headers: Mapping[str, str], payloads: Sequence[bytes],
                         seconds: float, concurrency: int) -> HttpResult:
    client = UserpilotClient(url, headers, timeout_s=30.0, max_connections=concurrency)

    async def send(body: bytes) -> bool:
        try:
            return await client.track(body) == 202  # raises on anything but a 2xx
        except WorkerError:
            return False

    try:
        return await _timed(send, payloads, seconds, concurrency)
    finally:
        await client.aclose()


def run_worker_client(url: str, headers: Mapping[str, str], payloads: Sequence[bytes],
                      seconds: float, concurrency: int) -> HttpResult:
    """A plain loop on the worker's own client (`UserpilotClient.track`): the same client,
    transport and request path the delivery workload uses, and nothing else."""
    return asyncio.run(_worker_client(url, headers, payloads, seconds, concurrency))


def _stamped(i: int) -> bytes:
    """A Track body carrying the moment the client was asked to send it."""
    return json.dumps({"user_id": f"u{i}", "event_name": "latency_probe",
                       "metadata": {"sent_ns": str(time.time_ns())}}).encode()


async def _paced_sends(url: str, headers: Mapping[str, str], count: int, rate: float,
                       raw: bool) -> None:
    target = httpx.URL(url)
    if raw:
        # The floor: the same request written straight to a socket (what a hand-written
        # client costs); measurement only, never a delivery path.
        reader, writer = await asyncio.open_connection(target.host, target.port)
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        try:
            for i in range(count):
                await asyncio.sleep(1 / rate)
                body = _stamped(i)
                writer.write(f"POST {target.raw_path.decode()} HTTP/1.1\r\nhost: {target.host}\r\n"
                             f"{head}content-length: {len(body)}\r\n\r\n".encode() + body)
                response = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":", 1)[1]) for line in response.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                await reader.readexactly(length)
        finally:
            writer.close()
        return
    client = UserpilotClient(url, headers, timeout_s=30.0, max_connections=1)
    try:
        for i in range(count):
            await asyncio.sleep(1 / rate)
            await client.track(_stamped(i))
    finally:
        await client.aclose()


def send_latency(url: str, headers: Mapping[str, str], count: int, rate: float,
                 raw: bool = False) -> None:
    """Paced single requests, each stamped with the time it was handed to the client.

    The sandbox's receipt time minus that stamp is what the client itself adds to a
    delivery's latency (the bench reads it from the sandbox's records): the worker's
    client, or (`raw`) a request written straight to a socket.
    """
    asyncio.run(_paced_sends(url, headers, count, rate, raw))
