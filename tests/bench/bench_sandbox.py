"""How many valid track requests per second the sandbox serves (not a pytest test).

Run:  .venv/bin/python tests/bench/bench_sandbox.py [--duration 3] [--concurrency 1 8 32 128]

The sandbox runs as a separate process (rate limit lifted) so client and server do not
share a GIL. The default load generator is raw asyncio sockets over keep-alive connections,
one request in flight per connection, so the client costs less than the server;
``--client aiohttp`` uses aiohttp instead. Every response must be a 202 and the sandbox's
own counters must agree with what the client saw, or the run fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

from consumer.sandbox import SandboxControl

TOKEN = "bench-token"
BODY = json.dumps(
    {
        "user_id": "user_001",
        "event_name": "feature_used",
        "metadata": {"feature": "export_csv", "feature_id": "feat_017", "n": 3, "ok": True},
    }
).encode()
HEADERS = {
    "Authorization": f"Token {TOKEN}",
    "X-API-Version": "2020-09-22",
    "Content-Type": "application/json",
}


@dataclass
class Result:
    ok: int = 0
    failed: int = 0
    latencies: list[float] = field(default_factory=list)


def start_sandbox() -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "consumer.sandbox",
            "--port=0",
            "--rate-limit=0",
            f"--write-token={TOKEN}",
            "--log-level=WARNING",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith("sandbox listening on "):
        process.kill()
        raise SystemExit(f"sandbox did not start: {line!r}")
    return process, line.rsplit(" ", 1)[1].strip()


async def raw_worker(host: str, port: int, deadline: float, result: Result) -> None:
    request = (
        f"POST /v1/track HTTP/1.1\r\nHost: {host}:{port}\r\n"
        + "".join(f"{k}: {v}\r\n" for k, v in HEADERS.items())
        + f"Content-Length: {len(BODY)}\r\n\r\n"
    ).encode() + BODY
    reader, writer = await asyncio.open_connection(host, port)
    clock = time.perf_counter
    try:
        while (started := clock()) < deadline:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            if length:
                await reader.readexactly(length)
            result.latencies.append(clock() - started)
            if head.startswith(b"HTTP/1.1 202"):
                result.ok += 1
            else:
                result.failed += 1
    finally:
        writer.close()


async def aiohttp_worker(url: str, deadline: float, result: Result, session: object) -> None:
    import aiohttp

    assert isinstance(session, aiohttp.ClientSession)
    clock = time.perf_counter
    while (started := clock()) < deadline:
        async with session.post(f"{url}/v1/track", data=BODY, headers=HEADERS) as response:
            await response.read()
            result.latencies.append(clock() - started)
            if response.status == 202:
                result.ok += 1
            else:
                result.failed += 1


async def run_level(url: str, concurrency: int, duration: float, client: str) -> Result:
    result = Result()
    host, port = url.removeprefix("http://").rsplit(":", 1)
    deadline = time.perf_counter() + duration
    if client == "raw":
        await asyncio.gather(
            *(raw_worker(host, int(port), deadline, result) for _ in range(concurrency))
        )
    else:
        import aiohttp

        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:
            await asyncio.gather(
                *(aiohttp_worker(url, deadline, result, session) for _ in range(concurrency))
            )
    return result


def percentile(values: list[float], q: int) -> float:
    """The q-th percentile (1..99) of the observed latencies."""
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--client", choices=["raw", "aiohttp"], default="raw")
    parser.add_argument("--url", help="use an already running sandbox instead of starting one")
    args = parser.parse_args(argv)

    process = None
    url = args.url
    if url is None:
        process, url = start_sandbox()
    control = SandboxControl(url)
    try:
        control.set_faults(rate_limit=0)
        asyncio.run(run_level(url, 4, 0.5, args.client))  # warm-up
        control.reset()
        print(f"sandbox {url}  client={args.client}  duration={args.duration}s per level")
        print(
            f"{'conns':>6} {'requests':>9} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'non-202':>8}"
        )
        seen = 0
        failures = 0
        for concurrency in args.concurrency:
            started = time.perf_counter()
            result = asyncio.run(run_level(url, concurrency, args.duration, args.client))
            elapsed = time.perf_counter() - started
            total = result.ok + result.failed
            seen += total
            failures += result.failed
            print(
                f"{concurrency:>6} {total:>9} {total / elapsed:>9.0f} "
                f"{percentile(result.latencies, 50) * 1000:>8.2f} "
                f"{percentile(result.latencies, 99) * 1000:>8.2f} {result.failed:>8}"
            )
        stats = control.stats()
        print(f"sandbox counted {stats['total']} requests, {stats['accepted']} accepted")
        if stats["total"] != seen or failures:
            print("MISMATCH: client and sandbox disagree, or non-202 responses", file=sys.stderr)
            return 1
        return 0
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=10)


if __name__ == "__main__":
    sys.exit(main())
