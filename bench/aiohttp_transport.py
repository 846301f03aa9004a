"""A proposal measured by the benchmark: httpx's client API over an aiohttp transport.

httpcore's pool checks every idle connection on every request (encode/httpx#3215), which
the profile of the delivery path shows as its top cost. This transport keeps
`httpx.AsyncClient` (and so `UserpilotClient`, its error mapping and MockTransport-based
tests) and replaces only the wire. It lives here until the worker adopts it.
"""

from __future__ import annotations

import asyncio

import httpx

__all__ = ["AiohttpTransport"]

_HOP_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection"})


class AiohttpTransport(httpx.AsyncBaseTransport):
    """Sends httpx requests with one aiohttp session (created on first use, in its loop)."""

    def __init__(self, *, max_connections: int) -> None:
        self._limit = max_connections
        self._session: object | None = None

    def _get_session(self) -> object:
        import aiohttp  # dev extra for now: the benchmark is its only user

        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._limit),
                auto_decompress=False,  # httpx decodes from the headers itself
            )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        import aiohttp

        session = self._get_session()
        assert isinstance(session, aiohttp.ClientSession)
        headers = [(k, v) for k, v in request.headers.multi_items()
                   if k.lower() not in _HOP_HEADERS]
        timeouts = request.extensions.get("timeout", {})
        total = max((t for t in timeouts.values() if t is not None), default=None)
        try:
            async with session.request(
                request.method, str(request.url), headers=headers, data=await request.aread(),
                allow_redirects=False, timeout=aiohttp.ClientTimeout(total=total),
            ) as response:
                content = await response.read()
                return httpx.Response(
                    response.status,
                    headers=[(k.decode("latin-1"), v.decode("latin-1"))
                             for k, v in response.raw_headers],
                    content=content, request=request,
                )
        except TimeoutError as exc:
            raise httpx.ReadTimeout(str(exc) or "timed out", request=request) from exc
        except aiohttp.ClientConnectionError as exc:
            raise httpx.ConnectError(str(exc), request=request) from exc
        except asyncio.CancelledError:
            raise

    async def aclose(self) -> None:
        import aiohttp

        if isinstance(self._session, aiohttp.ClientSession):
            await self._session.close()
