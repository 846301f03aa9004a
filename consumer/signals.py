"""The signals that stop a command: which ones this process takes.

Thread rule: the main thread's only (Python delivers signals there).
"""

from __future__ import annotations

import signal

__all__ = ["stop_signals"]


def stop_signals() -> tuple[signal.Signals, ...]:
    """SIGTERM, SIGINT and SIGHUP, the hang-up of a closed terminal or ssh session, unless
    this process was started with SIGHUP ignored (`nohup`: asked to outlive the terminal).

    Without a handler a hang-up killed `replay` with a published batch uncommitted (the
    next run sent it again), `delete-users` without its summary and `run` without its drain
    and final commit (review "cli50")."""
    if signal.getsignal(signal.SIGHUP) is signal.SIG_IGN:
        return (signal.SIGTERM, signal.SIGINT)
    return (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
