"""``python -m consumer delete-users``: the right to be forgotten, in Userpilot.

Reads user ids (one a line, from ``--file`` or stdin) and calls ``DELETE /v1/users``
``{"users": [...]}`` in batches. Userpilot allows one delete request per 2 s per token and
schedules the deletions for its daily job; it documents no maximum batch size, so batches
default to 1,000 ids. Pacing is measured from the previous *answer* to the next request,
so network jitter can never put two requests closer than the interval at Userpilot's end.
429, 408, 5xx, timeouts and resets are retried (tenacity, exponential backoff, Retry-After
honoured); statuses are classified by ``consumer.delivery.classify`` like every other call.
A 400 fails that batch and the rest go on; 401/403/404 stop the run (no batch can succeed).
The token is sent, never printed: messages carry statuses, request ids and Userpilot's
error text only. An adapter (it imports httpx); reading, batching, pacing and the retry loop
are plain functions tested without a network.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO

import httpx
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)
from tenacity.stop import stop_base

from consumer.answers import MAX_BODY_BYTES, capped, raw_chunks
from consumer.calls import invisible_edge
from consumer.codec import has_surrogates
from consumer.config import Settings, load_settings
from consumer.cutoff import Cutoff
from consumer.delivery import (
    USER_AGENT,
    causes,
    classify_answer,
    quoted_header,
    request_secrets,
    ssl_context,
    transport_failure,
    unreachable,
)
from consumer.errors import (
    ConfigError,
    ConnectionFailed,
    DeadLetter,
    Pause,
    Retry,
    Timeout,
    TlsRefused,
)
from consumer.redaction import Redactor
from consumer.signals import handled, stop_signals
from consumer.stdout import printable, write_line

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DELETE_INTERVAL_S",
    "DELETE_PATH",
    "MAX_BATCH_SIZE",
    "DeleteClient",
    "Pacer",
    "Summary",
    "add_arguments",
    "batches",
    "delete_body",
    "delete_users",
    "main",
    "padded",
    "read_user_ids",
]

DELETE_PATH = "/v1/users"
DELETE_INTERVAL_S = 2.0
MAX_INTERVAL_S = 3600.0  # --interval: an hour between batches is already a misuse
"""Userpilot: "1 request every 2 seconds for delete operations" (faster → 429)."""
DEFAULT_BATCH_SIZE = 1_000
MAX_BATCH_SIZE = 10_000
"""Userpilot documents no maximum; 10,000 is the row limit of its bulk identify endpoint."""

Log = Callable[[str], None]


# ---------------------------------------------------------------------------- pure parts


def read_user_ids(lines: Iterable[str]) -> list[str]:
    """One id a line, exactly as written but for the line ending: blank lines ignored,
    duplicates sent once.

    Not stripped: the worker sends a `userId` as the event carries it, so `"carol\u00a0"`
    is another user than `carol` (stripping deleted the wrong one, or none, and reported
    it deleted). A line starting with a UTF-8 byte order mark is sent both without it and as
    written: spreadsheet exports add one, and `cat a.txt b.txt` puts b's first line after
    it (sent with it alone, that user was not deleted and the run said it was, review
    "cli44"), while the worker sends a `userId` starting with one as it is (sent without it
    alone, that user could not be deleted at all, review "diff44").
    """
    seen: dict[str, None] = {}
    for line in lines:
        written = line.removesuffix("\n").removesuffix("\r")
        stripped = written.lstrip("\ufeff")
        if stripped.strip():
            seen.setdefault(stripped, None)
            seen.setdefault(written, None)  # the same id, but for a byte order mark
    return list(seen)


def read_json_ids(lines: Iterable[str]) -> list[str]:
    """One JSON string a line (`--json`), the id exactly as it decodes: blank lines ignored,
    duplicates sent once.

    The worker sends a `userId` holding a line break or a carriage return as it is, and
    one id a line cannot name it: `"a\nb"` was read as the users `a` and `b` (two others,
    deleted instead), `"c\r"` as `c` (review "ids47"). A line that is not a JSON string
    is refused, with its number, before anything is sent, and so is an id holding a lone
    surrogate (no user has one: the worker and `produce` refuse such ids; it failed its
    batch's encoding after earlier batches went, review "diff47a")."""
    seen: dict[str, None] = {}
    for number, line in enumerate(lines, 1):
        text = line.lstrip("\ufeff")  # a byte order mark before the string is the file's
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"line {number}: not JSON ({exc}); with --json each line is "
                              'one id as a JSON string, e.g. "user\\n2"') from None
        if not isinstance(value, str):
            raise ConfigError(f"line {number}: a JSON {type(value).__name__}, not a string; "
                              "with --json each line is one id as a JSON string")
        if has_surrogates(value):
            raise ConfigError(f"line {number}: the id holds a lone UTF-16 surrogate, which no "
                              "user id can (the worker refuses such ids)")
        if value:
            seen.setdefault(value, None)
    return list(seen)


class _Users:
    """The ids of a run as the operator counts them: a line starting with a byte order mark
    is one user, though sent in two forms (`read_user_ids`); counted twice, a two-line file
    said "3 users requested" (review "diff44")."""

    def __init__(self, user_ids: Sequence[str], *, exact: bool = False) -> None:
        given = set(user_ids)
        self._failed: set[str] = set()
        self._exact = exact  # `--json`: each id is one user, as written, a mark included
        self.marked = set() if exact else {
            user_id for user_id in user_ids
            if user_id.startswith("\ufeff") and user_id.lstrip("\ufeff") in given}

    def count(self, user_ids: Iterable[str]) -> int:
        return sum(1 for user_id in user_ids if user_id not in self.marked)

    def failed(self, batch: Sequence[str]) -> int:
        """A failed batch's users not counted failed yet, each form of one user once: a
        batch holding only a second form counted 0 and the run said "failed 0", exit 0;
        then both forms failing counted one user twice (review "diff44")."""
        users = set(batch) if self._exact else {user_id.lstrip("\ufeff") for user_id in batch}
        new = users - self._failed
        self._failed |= users
        return len(new)


def _quoted(user_id: str) -> bool:
    return len(user_id) >= 2 and user_id[0] == user_id[-1] == '"'


def quoted_ids(user_ids: Sequence[str], json_option: str) -> tuple[int, str]:
    """How many ids are written in double quotes, and the warning: `jq .key` output (or a
    `--json` file read one a line) deleted nobody, and the run said "deleted N", exit 0
    (review "gdpr54"). A warning, never a refusal: a userId may hold quotes (the worker
    sends it as the event carries it), and `--json` would then name other users (review
    "compat54")."""
    count = sum(1 for user_id in user_ids if _quoted(user_id))
    return count, (f"{count} of {len(user_ids)} ids are written in double quotes: read one a "
                   "line, the quotes are part of the id, as they are sent. If they came from "
                   f"JSON (`jq .key` output), stop and give the file with {json_option} (it "
                   "reads them without the quotes), or write it with `jq -r`")


def padded(user_ids: Iterable[str]) -> int:
    """How many ids begin or end with whitespace or a character that renders as nothing
    (kept as is; worth a warning: the id is not the one it looks like)."""
    return sum(1 for user_id in user_ids
               if user_id != user_id.strip() or invisible_edge(user_id))


def batches(user_ids: Sequence[str], size: int) -> list[list[str]]:
    """Consecutive batches of at most ``size`` ids, in input order."""
    if size < 1:
        raise ValueError("batch size must be at least 1")
    return [list(user_ids[i:i + size]) for i in range(0, len(user_ids), size)]


def delete_body(batch: Sequence[str]) -> bytes:
    return json.dumps({"users": list(batch)}, ensure_ascii=False,
                      separators=(",", ":")).encode("utf-8")


class Pacer:
    """At least ``interval`` seconds from one answer to the next request (clock injected)."""

    def __init__(
        self, interval: float, *, clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] = time.sleep,
        interrupted: Callable[[], None] = lambda: None,
    ) -> None:
        self.interval = interval
        self.clock = clock
        self._sleep = sleep
        # Raises (SystemExit) once a stop was asked: checked before each request and after
        # each wait, where nothing is half done.
        self.interrupted = interrupted
        self._next: float | None = None

    def sleep(self, seconds: float) -> None:
        """Wait `seconds` (a retry's backoff too), unless a stop is asked meanwhile."""
        self._sleep(seconds)
        self.interrupted()

    def wait(self) -> None:
        """Block until the next request may start."""
        self.interrupted()
        if self._next is None:
            return
        delay = self._next - self.clock()
        if delay > 0:
            self.sleep(delay)

    def answered(self) -> None:
        """Call when a request was answered (or failed): the interval starts now."""
        self._next = self.clock() + self.interval

    def ready_at(self) -> float:
        """When the next request may start (now, when it may at once)."""
        now = self.clock()
        return now if self._next is None else max(now, self._next)


@dataclass
class Summary:
    """What happened: ``deleted`` counts ids in batches Userpilot accepted (scheduled)."""

    requested: int = 0
    batches_sent: int = 0
    batches_done: int = field(default=0, compare=False)  # sent and answered, or given up
    deleted: int = 0
    failed: int = 0
    dry_run: bool = False
    aborted: str = ""
    uncleared: int = field(default=0, compare=False)  # deleted, the replicas' record kept
    scheduled: set[int] = field(default_factory=set, compare=False)  # batches (from 1)

    @property
    def unsent(self) -> int:
        """Users in batches never sent: an interrupt read "failed 0" of them (review
        "gdpr48")."""
        return max(0, self.requested - self.deleted - self.failed)

    @property
    def ok(self) -> bool:
        return self.failed == 0 and not self.aborted

    def line(self) -> str:
        text = (f"users requested {self.requested}, batches sent {self.batches_sent}, "
                f"deleted {self.deleted}, failed {self.failed}")
        if self.unsent and not self.dry_run:
            text += f", unsent {self.unsent}"
        if self.uncleared:
            text += f", not cleared from Redis {self.uncleared}"
        if self.dry_run:
            text += " (dry run: nothing sent)"
        return text


# ---------------------------------------------------------------------------- HTTP edge


class DeleteClient:
    """``DELETE /v1/users`` with the worker's headers; raises the classified exception."""

    def __init__(
        self, url: str, headers: Mapping[str, str], *, timeout_s: float,
        transport: httpx.BaseTransport | None = None, ca_bundle: str | None = None,
        proxy: str | None = None,
    ) -> None:
        """`ca_bundle` and `proxy` as the worker's client takes them (USERPILOT_CA_BUNDLE,
        the proxy `config.environment_proxy` names): deletions go where deliveries go."""
        self.url = url
        # Named by connection failures: the proxy's host when there is one (its host only,
        # never the URL, which may hold credentials), whom the connection is to.
        self._host = httpx.URL(url).host
        self._proxy_host = httpx.URL(proxy).host if proxy else None
        self._redact = Redactor(request_secrets(headers, proxy))
        # As the worker's client: a whole attempt within twice the timeout, a trickled
        # answer included (`Cutoff`; a connection per request, one request per 2 s).
        self.deadline_s = 2 * timeout_s
        self._client = httpx.Client(
            headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity", **headers},
            timeout=timeout_s,
            follow_redirects=False, transport=transport,
            verify=ssl_context(ca_bundle) if url.startswith("https:") else True,
            proxy=proxy if transport is None else None, trust_env=False,
            limits=httpx.Limits(max_keepalive_connections=0),
        )

    def delete(self, body: bytes) -> str:
        """Send one batch; returns what Userpilot said on 2xx: its x-request-id and its
        message (how many users it scheduled: the only sign that an id named nobody,
        review "gdpr48")."""
        cut = Cutoff(self.deadline_s)
        broken = False
        try:
            # The body as sent, at most MAX_BODY_BYTES of it, as the worker reads answers:
            # read whole and inflated, one answer could hold any amount of memory.
            with self._client.stream("DELETE", self.url, content=body,
                                     extensions={"trace": cut.trace}) as response:
                try:
                    raw = capped(raw_chunks(response), MAX_BODY_BYTES)
                except (httpx.HTTPError, OSError):
                    # Userpilot said 2xx: the deletion is scheduled, whatever became of the
                    # body (cut, trickled past the deadline), as the worker takes a 2xx.
                    # Counted failed, the run exited 1 and forgot nobody (review "http54").
                    if not 200 <= response.status_code < 300:
                        raise
                    raw, broken = b"", True
        except httpx.TimeoutException as exc:
            if self._proxy_host is not None:
                # httpx's own transport reads the proxy's answer to CONNECT as any answer:
                # a proxy that never gives one is a ReadTimeout, like Userpilot's silence
                # (round 59's "noticed": the proxy went unnamed).
                raise Timeout(f"no answer in time from Userpilot or the proxy (HTTPS_PROXY "
                              f"or ALL_PROXY) "
                              f"({type(exc).__name__}; a proxy that never answers CONNECT "
                              "reads so too)") from None
            raise Timeout(f"no answer from Userpilot in time ({type(exc).__name__})") from None
        except (httpx.HTTPError, OSError) as exc:
            if cut.fired:
                raise Timeout(f"Userpilot's answer took over {self.deadline_s:g} s") from None
            # The worker's rule (a proxy's 407 to the tunnel is a misconfiguration that
            # stops the run: it was retried 12 times a batch, review newcomer19).
            failure = (_before_tls(exc, self._host, self._proxy_host)
                       or transport_failure(exc, self.deadline_s,
                                            proxied=self._proxy_host is not None))
            if (isinstance(failure, ConnectionFailed) and not isinstance(failure, TlsRefused)
                    and not failure.before_tls and self.url.startswith("https:")):
                failure = ConnectionFailed(f"{failure}; for TLS, check USERPILOT_CA_BUNDLE "
                                           f"(a corporate or inspecting proxy's CA)")
            raise failure from None
        finally:
            cut.cancel()
        problem = classify_answer(response.status_code, response.headers, raw, self._redact)
        if problem is not None:
            raise problem
        # Quoted as error answers quote it: cut and redacted. A gateway echoing the request
        # into it printed the token in the batch's success line (review "secrets34").
        said = []
        request_id = quoted_header(str(response.headers.get("x-request-id", "")), self._redact)
        if request_id:
            said.append(f"x-request-id {request_id}")
        message = _answer_message(raw)
        if message:
            said.append(f"Userpilot: {printable(self._redact(message))}")  # diff52a
        if broken:
            said.append(f"HTTP {response.status_code}, its body broken off")
        return "; ".join(said)

    def close(self) -> None:
        self._client.close()


def _answer_message(raw: bytes) -> str:
    """The `message` of a JSON answer, on one line and cut at 200 characters; "" if none."""
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):  # nested past the parser: a traceback (diff48c)
        return ""
    message = doc.get("message") if isinstance(doc, dict) else None
    if not isinstance(message, str):
        return ""
    return " ".join(message.split())[:200]


def _before_tls(exc: BaseException, host: str, proxy_host: str | None = None
                ) -> ConnectionFailed | None:
    """httpx's own transport (this command's) fails a host that does not resolve, or a port
    nothing listens on, with a bare ConnectError: each was told "for TLS, check
    USERPILOT_CA_BUNDLE" (review "cli44"). Named from the cause, as the worker names them
    (`delivery.unreachable`); through a proxy, the connection is the proxy's."""
    for seen in causes(exc):
        if isinstance(seen, socket.gaierror | ConnectionRefusedError):
            return unreachable(proxy_host or host, proxy_host is not None,
                               refused=isinstance(seen, ConnectionRefusedError))
    return None


# ---------------------------------------------------------------------------- the run


def _wait(backoff_s: float, backoff_max_s: float) -> Callable[[RetryCallState], float]:
    exponential = wait_exponential(multiplier=backoff_s, max=backoff_max_s)

    def wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        retry_after = exc.retry_after if isinstance(exc, Retry) else None
        return max(exponential(state), retry_after or 0.0)

    return wait


def delete_users(
    user_ids: Sequence[str],
    send: Callable[[bytes], str],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    pacer: Pacer,
    attempts: int = 12,
    backoff_s: float = 1.0,
    backoff_max_s: float = 60.0,
    budget_s: float | None = None,
    log: Log = lambda _line: None,
    summary: Summary | None = None,
    forget: Forget | None = None,
    exact: bool = False,
) -> Summary:
    """Send every batch through ``send`` (paced, retried); never raises for a batch.

    ``send`` is ``DeleteClient.delete`` (or a fake in tests). Every attempt, retries
    included, waits for the pacer, so Userpilot never sees two within the interval. A batch
    is retried at most ``attempts`` times and, with ``budget_s``
    (USERPILOT_RETRY_BUDGET_SECONDS), never starts an attempt past that long after its
    first; each wait is logged. ``summary``: filled as batches end (the caller prints it
    if the run is interrupted). ``forget``: called with each batch Userpilot scheduled
    (`_shared_users`); a failure is logged, the deletion stands. ``exact``: ids counted as
    given (`--json`), as `main` counts them: a byte order mark's variants were counted as
    one user here and two in the dry run (review "gdpr48").

    A batch given up on a failure before Userpilot was reached (its certificate not
    trusted, its host not resolving or refusing) stops the run: retried in full for every
    batch, 50 batches took five hours (review "gdpr48").
    """
    summary = summary if summary is not None else Summary()
    users = _Users(user_ids, exact=exact)
    summary.requested = users.count(user_ids)
    groups = batches(user_ids, batch_size)
    for index, batch in enumerate(groups, 1):
        if summary.aborted:
            summary.failed += users.failed(batch)
            continue
        body = delete_body(batch)
        tries = 0
        within = _Within(budget_s, pacer) if budget_s is not None else None

        def attempt(body: bytes = body, within: _Within | None = within) -> str:
            nonlocal tries
            pacer.wait()
            tries += 1
            if tries == 1 and within is not None:
                within.start()  # the budget runs from the first attempt, not the pause
            if tries == 1:
                # Counted once it goes out: an interrupt in the pacer's wait named a batch
                # never sent as "may or may not have been scheduled" (review "replay26").
                summary.batches_sent += 1
            try:
                return send(body)
            finally:
                pacer.answered()

        # Users as the summary counts them (a byte order mark's two forms are one user):
        # the start line said 5 users, the summary 3 (review "gdpr54").
        where = f"batch {index}/{len(groups)} ({users.count(batch)} users)"

        def waiting(state: RetryCallState, where: str = where) -> None:
            exc = state.outcome.exception() if state.outcome is not None else None
            pause = state.next_action.sleep if state.next_action is not None else 0.0
            # The pacer's interval from the answer too: "next in 1 s" went out 2 s later,
            # and a sub-second wait read "next in 0 s" (review "gdpr48").
            pause = max(pause, pacer.ready_at() - pacer.clock())
            log(f"{where}: attempt {state.attempt_number}/{attempts}: {_said(exc)}; "
                f"next in {pause:.1f} s")

        stop: stop_base = stop_after_attempt(attempts)
        if within is not None:
            stop = stop | within
        retrying = Retrying(
            stop=stop,
            wait=_wait(backoff_s, backoff_max_s),
            retry=retry_if_exception_type(Retry),
            sleep=pacer.sleep,
            before_sleep=waiting,
            reraise=True,
        )
        try:
            request_id = retrying(attempt)
        except Pause as exc:
            summary.batches_done += 1
            summary.failed += users.failed(batch)
            summary.aborted = str(exc)
            log(f"{where}: {_said(exc)}; stopping, no batch can succeed")
        except (DeadLetter, Retry) as exc:
            summary.batches_done += 1
            summary.failed += users.failed(batch)
            log(f"{where}: gave up after {tries} attempt(s): {_said(exc)}")
            if isinstance(exc, TlsRefused) or (isinstance(exc, ConnectionFailed)
                                                and exc.before_tls):
                summary.aborted = str(exc)
                log(f"{where}: stopping: Userpilot was not reached in {tries} attempt(s), "
                    "nor would the next batch be; fix the setting named, then run the same "
                    "list again")
        else:
            summary.batches_done += 1
            summary.scheduled.add(index)
            summary.deleted += users.count(batch)
            said = f" ({request_id})" if request_id else ""
            log(f"{where}: scheduled for deletion{said}")
            if summary.uncleared:
                # Not asked again after a failure: a hung Redis cost its timeout (5 s)
                # on every batch, 83 minutes over 1,000 batches (review "gdpr54").
                summary.uncleared += users.count(batch)
                continue
            failed = forget(batch) if forget is not None else None
            if failed is not None:
                summary.uncleared += users.count(batch)
                log(f"{where}: the replicas' record of these users not cleared: {failed}; "
                    "not tried again in this run (the summary counts them); a returning id "
                    "is identified again only after USERPILOT_ENSURE_USER_TTL_SECONDS")
    return summary


class _Within(stop_base):
    """Stop before an attempt would start more than `budget_s` after the first (tenacity's
    `stop_before_delay` on the pacer's clock, which tests control). From the first attempt
    itself, and with the pacer's wait counted: started when the object was made, the pause
    after the previous batch (or `--interval`) took its budget, and later batches were not
    retried at all (review "cli44")."""

    def __init__(self, budget_s: float, pacer: Pacer) -> None:
        self.budget_s = budget_s
        self.pacer = pacer
        self.started: float | None = None

    def start(self) -> None:
        self.started = self.pacer.clock()

    def __call__(self, retry_state: RetryCallState) -> bool:
        if self.started is None:
            return False
        begins = max(self.pacer.clock() + retry_state.upcoming_sleep, self.pacer.ready_at())
        return begins - self.started > self.budget_s


def _said(exc: BaseException | None) -> str:
    """An error as the operator reads it: the classified message and, when Userpilot
    explained itself, its answer (truncated; the token never reaches a body Userpilot
    writes). A 400's body is the only way to learn which id of a batch was refused."""
    if exc is None:
        return "no answer"
    body = getattr(exc, "body", None)
    said = f"; Userpilot said: {body[:300]!r}" if isinstance(body, str) and body.strip() else ""
    return f"{exc}{said}"


# ---------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--file", help="user ids, one a line (default or '-': stdin)")
    parser.add_argument("--json", action="store_true",
                        help="each line is one id as a JSON string (ids holding a line "
                        "break or other control character)")
    parser.add_argument(
        "--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
        help=f"ids per request, 1-{MAX_BATCH_SIZE} (default {DEFAULT_BATCH_SIZE})",
    )
    parser.add_argument(
        "--interval", type=float, default=DELETE_INTERVAL_S,
        help="seconds from one answer to the next request (default 2: Userpilot allows "
        "one delete request per 2 s; lower only against the sandbox)",
    )
    parser.add_argument("--dry-run", action="store_true",
                        help="read and batch the ids, check the settings, print the plan, "
                        "send nothing (and write no --left-file)")
    parser.add_argument("--left-file", metavar="PATH",
                        help="write the ids of every batch Userpilot did not schedule "
                        "(failed, not sent, or cut by an interrupt) to PATH, as read (one a "
                        "line; JSON strings with --json), to run again with --file PATH")


def _read(path: str | None, stdin: IO[str] | None, *, as_json: bool = False) -> list[str]:
    read = read_json_ids if as_json else read_user_ids
    if path is None or path == "-":
        if stdin is None:  # `<&-`: the shell closed it
            raise ConfigError("cannot read user ids from stdin: it is closed")
        # Strict UTF-8 as for --file, every id checked before anything is sent: the text
        # stream's decoding let a bad byte through to a traceback after some batches went.
        raw = getattr(stdin, "buffer", None)
        if raw is None:
            return read(stdin)
        try:
            text = raw.read().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"cannot read user ids from stdin: {exc}") from None
        # Lines as `open()` reads the file (universal newlines: \n, \r\n, \r only):
        # str.splitlines also splits at U+2028, NEL, FF, VT, ..., which cut one id in two.
        return read(io.StringIO(text, newline=None))
    try:
        with open(path, encoding="utf-8") as stream:
            return read(stream)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read user ids from {path!r}: {exc}") from None


_UNUSED_PREFIXES = ("KAFKA_", "SCHEMA_REGISTRY_", "REDIS_")
_UNUSED_NAMES = frozenset({"USERPILOT_MAPPINGS_FILE"})
_NOT_USED_HERE = {
    "KAFKA_BOOTSTRAP_SERVERS": "unused-by-delete-users:9092",
    "KAFKA_TOPICS": "unused-by-delete-users",
    "SCHEMA_REGISTRY_URL": "http://unused-by-delete-users",
}


Forget = Callable[[Sequence[str]], str | None]


def _unusable(_user_ids: Sequence[str]) -> str:
    """The clean-up of a run whose Redis settings are unusable: it fails for each batch."""
    return "its settings are unusable (above)"


def _shared_users(env: Mapping[str, str], settings: Settings, log: Log) -> Forget | None:
    """With REDIS_URL and ensure-user: what clears the replicas' shared record of the
    deleted users (`dedup.user_key`), so the identify that re-creates a returning id is
    sent at once, not only after USERPILOT_ENSURE_USER_TTL_SECONDS. Unusable Redis
    settings (a CA file not mounted where this runs) are one line, not a stop: the
    deletion is what was asked for. None without Redis."""
    if not env.get("REDIS_URL", "").strip() or not settings.ensure_user:
        return None
    present = {k: v for k, v in env.items() if v.strip() and k.startswith("REDIS_")}
    try:
        redis = load_settings({**_settings_env(env), **present, **_NOT_USED_HERE},
                              uses_registry=False).redis
    except ConfigError as exc:
        log(f"Redis settings unusable ({exc}); the replicas' record of these users is not "
            "cleared: a returning id is identified again only after "
            "USERPILOT_ENSURE_USER_TTL_SECONDS")
        # Still a clean-up that failed: the summary counts what stays (review "diff54b").
        return _unusable
    if redis is None:
        return None
    from consumer.dedup import user_key
    from consumer.errors import SharedStateUnavailable
    from consumer.redisstore import RedisStore, token_digest

    digest = token_digest(settings.api_key.reveal())

    def forget(user_ids: Sequence[str]) -> str | None:
        async def unlink() -> None:
            store = RedisStore(redis.url.reveal(), timeout_s=max(redis.timeout_s, 5.0),
                               ca_file=redis.tls_ca_file)
            try:
                await store.forget([user_key(digest, u) for u in user_ids])
            finally:
                await store.close()

        try:
            asyncio.run(unlink())
        except SharedStateUnavailable as exc:
            return f"{exc} (Redis at {redis.redacted_url})"
        return None

    return forget


def _settings_env(env: Mapping[str, str]) -> dict[str, str]:
    """The environment `load_settings` reads here: only what a DELETE uses."""
    # In a pod with the worker's environment but not its mounted files, a Kafka CA or a
    # mappings file it cannot read stopped the deletion.
    return {k: v for k, v in env.items() if v.strip() and not k.startswith(_UNUSED_PREFIXES)
            and k not in _UNUSED_NAMES}


def _client_from_env(env: Mapping[str, str]) -> tuple[DeleteClient, Settings]:
    """The worker's own settings (token, host, timeouts, retries); Kafka ones not needed."""
    settings = load_settings({**_settings_env(env), **_NOT_USED_HERE}, uses_registry=False)
    url = f"{settings.base_url}{DELETE_PATH}"
    client = DeleteClient(url, settings.headers(), timeout_s=settings.request_timeout_s,
                          ca_bundle=settings.ca_bundle,
                          proxy=settings.proxy.reveal() if settings.proxy else None)
    return client, settings


def main(
    args: argparse.Namespace, *, env: Mapping[str, str] | None = None,
    stdin: IO[str] | None = None, out: IO[str] | None = None, err: IO[str] | None = None,
) -> int:
    """0 when every batch was accepted; 1 when any failed; ConfigError (2) on bad input."""
    env = os.environ if env is None else env
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    if not 1 <= args.batch_size <= MAX_BATCH_SIZE:
        raise ConfigError(f"--batch-size={args.batch_size}: use 1 to {MAX_BATCH_SIZE} "
                          f"(default {DEFAULT_BATCH_SIZE})")
    if not 0 <= args.interval <= MAX_INTERVAL_S:
        raise ConfigError(f"--interval must be 0 to {MAX_INTERVAL_S:g} seconds (Userpilot: 2)")
    user_ids = _read(args.file, sys.stdin if stdin is None else stdin,
                     as_json=args.json)

    def log(line: str) -> None:
        # A reader of stderr that went away stopped the deletions mid-list, without a
        # summary, exit 1 (review "cli50"): progress is for a reader, not the work's.
        with contextlib.suppress(OSError):
            print(f"delete-users: {line}", file=err, flush=True)

    if not user_ids:
        # A GDPR script read exit 0 as done (review "replay26"): an empty list is a mistake
        # in what was given (a wrong file, a failed export upstream), not a deletion.
        raise ConfigError("no user ids given: the file or stdin holds no id (one per line)")
    if not args.json:
        count, said = quoted_ids(user_ids, "--json")
        if count:
            log(said)
    users = _Users(user_ids, exact=args.json)
    if users.marked:
        log(f"{len(users.marked)} ids began with a byte order mark: each is sent both "
            "without it and as written (counted once)")
    spaced = padded(user_id for user_id in user_ids
                    if args.json or not user_id.startswith("\ufeff"))
    if spaced:
        log(f"{spaced} ids begin or end with whitespace or an invisible character; sent "
            "exactly as written (the worker sends userId as the event carries it)")
    groups = batches(user_ids, args.batch_size)
    if args.left_file is not None:
        problem = _left_file_problem(args.left_file)
        if problem is not None:
            raise ConfigError(problem)
    if args.dry_run:
        # The real run's settings, read: a rehearsal that said OK for a token written
        # `Token …` or an endpoint with a scheme proved nothing (review "gdpr54").
        client, settings = _client_from_env(env)
        client.close()
        # As the real run reads Redis' settings: unusable ones are its line here too.
        forget = _shared_users(env, settings, log)
        clears = (" and clear the replicas' record of them in Redis"
                  if forget is not None and forget is not _unusable else "")
        log(f"would DELETE {client.url}{clears}: {users.count(user_ids)} users in "
            f"{len(groups)} batches, one request per {args.interval:g} s")
        for index, batch in enumerate(groups, 1):
            log(f"batch {index}/{len(groups)}: would delete {users.count(batch)} users")
        summary = Summary(requested=users.count(user_ids), dry_run=True)
        write_line(f"delete-users: {summary.line()}", out)
        return 0
    client, settings = _client_from_env(env)
    summary = Summary()
    # SIGTERM and SIGHUP set a flag the pacer reads between requests (and wake its waits):
    # raised from the handler, their SystemExit was swallowed where it landed in a
    # generator's finalizer (the run went on to its end, exit 1) or left a lock of the HTTP
    # client taken and the close in `finally` hung for good (review "deps56").
    signalled: list[int] = []
    woken = threading.Event()

    def stop_asked(signum: int, _frame: object) -> None:
        signalled.append(signum)
        woken.set()

    def interrupted() -> None:
        if signalled:
            raise SystemExit(128 + signalled[0])

    try:
        with handled(stop_asked, [s for s in stop_signals() if s != signal.SIGINT]):
            log(f"DELETE {client.url}: {users.count(user_ids)} users in {len(groups)} "
                f"batches, one request per {args.interval:g} s")
            delete_users(
                user_ids, client.delete, batch_size=args.batch_size,
                pacer=Pacer(args.interval, sleep=woken.wait, interrupted=interrupted),
                attempts=settings.retry_max_attempts, backoff_s=settings.retry_backoff_s,
                backoff_max_s=settings.retry_backoff_max_s, budget_s=settings.retry_budget_s,
                log=log, summary=summary, forget=_shared_users(env, settings, log),
                exact=args.json,
            )
            interrupted()  # asked during the last batch: said so, as after any other
        code = 0 if summary.ok else 1
    except (KeyboardInterrupt, SystemExit) as exc:
        # Ctrl-C, or a SIGTERM (`__main__` raises SystemExit(143) for it): what was done so
        # far, not a traceback; the batches after it were not sent.
        summary.aborted = "interrupted"
        under_way = summary.batches_sent > summary.batches_done
        log(f"interrupted after {summary.batches_sent} of {len(groups)} batches"
            + ("; the batch under way may or may not have been scheduled" if under_way
               else "") + "; run the same list again to finish: deleting a user again is "
            "harmless (Userpilot answers 202)")
        code = exc.code if isinstance(exc, SystemExit) and isinstance(exc.code, int) else 130
    finally:
        client.close()
    if args.left_file is not None:
        # The failed batches' ids were never named: a list re-run whole met the same 400
        # again, and a failed batch could not be cut out of it (review "gdpr54").
        left = [user_id for index, batch in enumerate(groups, 1)
                if index not in summary.scheduled for user_id in batch]
        _write_left(args.left_file, left, as_json=args.json, log=log,
                    unsure=summary.batches_sent > summary.batches_done)
    write_line(f"delete-users: {summary.line()}", out)  # done, whoever still reads
    return code


def _left_file_problem(path: str) -> str | None:
    """Why `--left-file` cannot be written, checked before the first batch (after the
    whole run, a wrong path lost the list, review "diff54b"); None when it can."""
    if path == "-":
        return "--left-file -: give a file (`--file -` reads stdin, not this)"
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        return f"--left-file {path!r}: its folder {folder!r} does not exist or is not writable"
    if os.path.isdir(path):
        return f"--left-file {path!r} is a folder"
    return None


def _write_left(path: str, user_ids: Sequence[str], *, as_json: bool, log: Log,
                unsure: bool = False) -> None:
    """The ids not scheduled, as `--file` reads them back (`--json`: one JSON string a
    line); an empty file when none is left. Written whole or not at all (a temporary file
    renamed: the path may be the list it was read from). A failure to write it names the
    ids on stderr."""
    lines = [(json.dumps(user_id, ensure_ascii=False) if as_json else user_id) + "\n"
             for user_id in user_ids]
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        with open(temporary, "w", encoding="utf-8", newline="\n") as stream:
            stream.writelines(lines)
        os.replace(temporary, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        log(f"--left-file {path!r}: cannot write it ({exc.strerror or exc}); the "
            f"{len(user_ids)} ids left follow, one a line{' (JSON)' if as_json else ''}")
        for line in lines:
            log(line.rstrip("\n"))
        return
    if user_ids:
        log(f"{len(user_ids)} ids not scheduled"
            + (" (the batch under way included: it may have been)" if unsure else "")
            + f" written to {path}: run again with --file {path}"
            + (" --json" if as_json else ""))
