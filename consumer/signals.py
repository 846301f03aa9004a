"""The signals that stop a command: which ones this process takes.

Thread rule: the main thread's only (Python delivers signals there).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

__all__ = ["handled", "stop_signals"]


def stop_signals() -> tuple[signal.Signals, ...]:
    """SIGTERM, SIGINT and SIGHUP, the hang-up of a closed terminal or ssh session, unless
    this process was started with SIGHUP ignored (`nohup`: asked to outlive the terminal).

    Without a handler a hang-up killed `replay` with a published batch uncommitted (the
    next run sent it again), `delete-users` without its summary and `run` without its drain
    and final commit (review "cli50")."""
    if signal.getsignal(signal.SIGHUP) is signal.SIG_IGN:
        return (signal.SIGTERM, signal.SIGINT)
    return (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@contextlib.contextmanager
def handled(handler: Callable[[int, Any], None],
            signums: Iterable[signal.Signals]) -> Iterator[None]:
    """`handler` for `signums` inside the block, what was there before after it (no
    handler of Python's own: the default action). Nothing outside the main thread, where
    Python refuses handlers (a command run in a test's thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, handler) for signum in signums}
    try:
        yield
    finally:
        for signum, before in previous.items():
            signal.signal(signum, signal.SIG_DFL if before is None else before)
