"""Lines on the commands' standard output, whoever reads it (or stops reading it).

Thread rule: `write_line` and `stdout_gone` on the command-line tools' main thread only;
`json_line` is pure (the JSON log formatter calls it from every thread).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from collections.abc import Callable
from typing import IO, Any

__all__ = ["ESCAPES", "QuietStream", "json_line", "printable", "stdout_gone", "write_line"]

_UNSAFE = (0x2028, 0x2029, *range(0x7F, 0xA0), 0x061C, 0x200E, 0x200F,
           *range(0x202A, 0x202F), *range(0x2066, 0x206A))
ESCAPES = {code: f"\\u{code:04x}" for code in _UNSAFE}
"""What `json.dumps(ensure_ascii=False)` leaves raw and a reader must not get raw: the
Unicode line breaks and U+0085 (line breaks to `str.splitlines` and log shippers: one in an
id split a record in two, reviews "logs44", "ids47"), DEL and the C1 controls (U+009B is a
terminal's CSI), and the bidirectional controls (U+202E shows the rest of a line reversed:
an id could disguise what follows it, review "ids47")."""
_RAW = re.compile("[" + "".join(chr(code) for code in _UNSAFE) + "]")
_CONTROL = re.compile("[\x00-\x1f" + "".join(chr(code) for code in _UNSAFE) + "]")
_CONTROL_BUT_NEWLINE = re.compile("[\x00-\x09\x0b-\x1f" + "".join(chr(code) for code in _UNSAFE)
                                  + "]")


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return "\\n" if code == 10 else f"\\x{code:02x}" if code < 256 else f"\\u{code:04x}"


def printable(text: str, *, newlines: bool = False) -> str:
    """`text` safe for a terminal and a log line: the C0 controls and `ESCAPES` written as
    backslash escapes. Text from another party (an HTTP answer's header or body, a
    registry's refusal, an event's field names) wrote terminal escapes and forged lines in
    the commands' output (review "logsec52"). `newlines`: keep line feeds (a message of
    several lines of the worker's own, whose quoted parts were escaped where quoted)."""
    return (_CONTROL_BUT_NEWLINE if newlines else _CONTROL).sub(_escaped, text)


def json_line(doc: Any, default: Callable[[Any], Any] | None = None) -> str:
    """`doc` as one line of JSON, non-ASCII text kept readable but for `ESCAPES`."""
    line = json.dumps(doc, ensure_ascii=False, default=default)
    return line.translate(ESCAPES) if _RAW.search(line) else line


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
    except OSError:
        # A closed pipe, or a full disk or a dead device under `> file` (ENOSPC, EIO): the
        # line is lost either way, and the callers' answer is the same (review "cli50").
        if stream is sys.stdout:
            stdout_gone()
        return False
    return True


class QuietStream:
    """Standard error that nobody may read any more: what cannot be written is dropped.

    Notes, progress and summaries on stderr are for a reader; one that went away (`2>&1 |
    head`, a log shipper that died) raised BrokenPipeError out of the command's next line:
    `check-config` exited 1 on a valid configuration, and `delete-users` stopped mid-list
    without a word (review "cli50"). What the command does must not depend on it. Anything
    but writing is the stream's own (`encoding`, `fileno`, `isatty`, `buffer`)."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except OSError:
            return len(text)

    def flush(self) -> None:
        with contextlib.suppress(OSError):
            self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)
