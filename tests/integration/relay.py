"""A small relay process for the HTTP-edge tests: a forward proxy, or a TLS terminator.

    python tests/integration/relay.py proxy --log FILE
        an HTTP forward proxy: absolute-URI requests (keep-alive, one upstream connection
        per client connection) and CONNECT tunnels; one line per request in FILE.
    python tests/integration/relay.py tls --cert C --key K --upstream HOST:PORT
        accepts TLS and pipes the plaintext to HOST:PORT (the sandbox speaks plain HTTP).

Prints `listening on PORT` once ready; stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import ssl
from urllib.parse import urlsplit


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def _tunnel(a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                  b: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
    await asyncio.gather(_pipe(a[0], b[1]), _pipe(b[0], a[1]))


async def _read_message(reader: asyncio.StreamReader) -> tuple[bytes, bytes] | None:
    """One HTTP/1.1 message (head, body); bodies by Content-Length only (all we meet)."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    return head, await reader.readexactly(length) if length else b""


class Proxy:
    def __init__(self, log_path: str) -> None:
        self.log_path = log_path

    def _log(self, line: str) -> None:
        with open(self.log_path, "a", encoding="utf-8") as log:
            log.write(line + "\n")

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while (message := await _read_message(reader)) is not None:
                head, body = message
                request_line, _, rest = head.partition(b"\r\n")
                method, target, version = request_line.decode("latin-1").split(" ", 2)
                auth = next((line.split(b":", 1)[1].strip().decode("latin-1")
                             for line in rest.split(b"\r\n")
                             if line.lower().startswith(b"proxy-authorization:")), None)
                self._log(f"{method} {target}" + (f" auth={auth}" if auth else ""))
                if method == "CONNECT":
                    host, _, port = target.rpartition(":")
                    upstream = await asyncio.open_connection(host, int(port))
                    writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    await writer.drain()
                    await _tunnel((reader, writer), upstream)
                    return
                url = urlsplit(target)
                if upstream is None:
                    upstream = await asyncio.open_connection(url.hostname, url.port or 80)
                path = (url.path or "/") + (f"?{url.query}" if url.query else "")
                upstream[1].write(f"{method} {path} {version}\r\n".encode("latin-1")
                                  + rest + body)
                await upstream[1].drain()
                response = await _read_message(upstream[0])
                if response is None:
                    return
                writer.write(response[0] + response[1])
                await writer.drain()
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            if upstream is not None:
                upstream[1].close()


class Terminator:
    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        self.host, self.port = host, int(port)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream = await asyncio.open_connection(self.host, self.port)
        except OSError:
            writer.close()
            return
        await _tunnel((reader, writer), upstream)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="mode", required=True)
    proxy = sub.add_parser("proxy")
    proxy.add_argument("--log", required=True)
    tls = sub.add_parser("tls")
    tls.add_argument("--cert", required=True)
    tls.add_argument("--key", required=True)
    tls.add_argument("--upstream", required=True)
    args = parser.parse_args()
    context = None
    if args.mode == "proxy":
        handler = Proxy(args.log).serve
    else:
        handler = Terminator(args.upstream).serve
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(args.cert, args.key)
    server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=context)
    print(f"listening on {server.sockets[0].getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    server.close()


if __name__ == "__main__":
    asyncio.run(main())
