"""A whole-call deadline for synchronous httpx calls (the registry's, delete-users').

httpx's timeout bounds each step (connect, each read), not the call: an answer trickled a
byte at a time, headers or body, never timed out (reviews "schema16", "diff16", "gdpr16").
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Mapping
from typing import Any

__all__ = ["Cutoff"]


class Cutoff:
    """Shuts a call's sockets down at its deadline (a timer thread): the one bound on a
    whole answer that holds in every step of a synchronous httpx call.

    Pass `trace` as the request's `trace` extension on a client that keeps no connection
    alive (each call opens its own, whose socket httpcore's trace hook hands over); after
    the call, `cancel`; `fired` tells a transport error caused by the cut.
    """

    def __init__(self, timeout_s: float) -> None:
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self.fired = False
        self._timer = threading.Timer(timeout_s, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def trace(self, name: str, info: Mapping[str, Any]) -> None:
        """httpcore's trace hook: the socket of each connection the call opens."""
        # Any step that yields a socket: through an http:// proxy's CONNECT tunnel the
        # TLS upgrade (`proxy.start_tls`) detaches the TCP socket kept before, and the call
        # was never cut (review "http42").
        if name.endswith((".connect_tcp.complete", ".start_tls.complete")):
            stream = info.get("return_value")
            sock = stream.get_extra_info("socket") if stream is not None else None
            if isinstance(sock, socket.socket):
                with self._lock:
                    self._sockets.append(sock)
                    fired = self.fired
                if fired:
                    _shut(sock)

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shut(sock)

    def cancel(self) -> None:
        self._timer.cancel()


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
