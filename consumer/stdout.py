"""Lines on the commands' standard output, whoever reads it (or stops reading it).

Thread rule: the command-line tools' main thread only.
"""

from __future__ import annotations

import os
import sys
from typing import IO

__all__ = ["stdout_gone", "write_line"]


def stdout_gone() -> None:
    """Nobody reads stdout any more (`| head`, `| true`): it goes to /dev/null (Python's own
    advice), so the flush at exit cannot raise again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def write_line(text: str, out: IO[str] | None = None) -> bool:
    """Print `text` on `out` (stdout); False when nobody reads it any more.

    What the stream cannot encode (an ASCII locale) is written with backslash escapes, and
    a closed pipe is not a failure of the command: its work was done. Both raised out of
    `delete-users` after every user was deleted, and out of `check-config` with a valid
    configuration: a traceback and a failing exit code (review "cli42")."""
    stream = sys.stdout if out is None else out
    try:
        try:
            print(text, file=stream, flush=True)
        except UnicodeEncodeError:
            encoding = getattr(stream, "encoding", None) or "utf-8"
            print(text.encode(encoding, "backslashreplace").decode(encoding), file=stream,
                  flush=True)
    except BrokenPipeError:
        if stream is sys.stdout:
            stdout_gone()
        return False
    return True
