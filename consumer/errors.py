"""The one exception tree. Each class names what happens next, not what went wrong.

    WorkerError
    ├── ConfigError                  stop start-up; the message says how to fix the setting
    ├── DeadLetter                   permanent for this one event: dead-letter it, move on
    │   ├── UndecodableEvent         bytes that are not a Signal event (raw bytes kept)
    │   ├── InvalidEvent             a canonical JSON event that does not fit the schema
    │   ├── MappingError             decoding, routing or mapping this one event raised
    │   ├── Rejected                 Userpilot refused the payload (400, 413, 422, other 4xx)
    │   ├── RefusedAlone             a `Refused` for this event again and again while other
    │   │                            events got through with the token (`policy`, not
    │   │                            `classify`: it takes the answers of others)
    │   └── DlqRecordTooLarge        the DLQ refused the record's size: write it value-less
    ├── Retry                        transient: try the same event again after a backoff;
    │                                evidence about Userpilot too: a run of them with no
    │                                success between closes the outage gate for every event
    │                                (`policy.Gate`); a refusal about one event alone is a
    │                                DeadLetter, not a Retry
    │   ├── RateLimited              429; carries Retry-After when Userpilot sent one
    │   ├── ServerError              408, 5xx, a final 1xx, an unknown status, no answer
    │   ├── Timeout                  no answer in time
    │   └── ConnectionFailed         reset, refused, DNS
    │       └── TlsRefused           a TLS handshake a setting fixes (untrusted certificate,
    │                                a port that does not speak TLS): the gate it closes
    │                                says "misconfigured"
    ├── Pause                        the whole integration is broken: stop sending, keep
    │   └── Misconfigured            offsets, probe with backoff (407, 431, 3xx)
    │       ├── Refused              401/403/404, or a status about the request itself
    │       │                        (402/405/410/411/414/415/426); `policy` makes it a
    │       │                        RefusedAlone when other events get past
    │       └── ProxyRefused         the egress proxy forbids the tunnel (403 to CONNECT)
    ├── AlreadyDelivered             another owner delivered this messageId meanwhile:
    │                                finish the event without a request (duplicate)
    ├── Stop                         the worker must stop consuming, loudly
    │   └── DlqGuardTripped          too many dead letters: a bad deploy, not bad events
    └── Degrade                      optional shared state is unavailable: carry on alone
        └── SharedStateUnavailable   Redis unreachable: local limiter share, no dedup

Secrets never enter a message: callers pass statuses and truncated bodies, never headers.
"""

from __future__ import annotations

__all__ = [
    "AlreadyDelivered",
    "ConfigError",
    "ConnectionFailed",
    "DeadLetter",
    "Degrade",
    "DlqGuardTripped",
    "DlqRecordTooLarge",
    "InvalidEvent",
    "MappingError",
    "Misconfigured",
    "Pause",
    "ProxyRefused",
    "RateLimited",
    "Refused",
    "RefusedAlone",
    "Rejected",
    "Retry",
    "ServerError",
    "SharedStateUnavailable",
    "Stop",
    "Timeout",
    "TlsRefused",
    "UndecodableEvent",
    "WorkerError",
]


class WorkerError(Exception):
    """Root of every error this package raises on purpose."""

    call = ""
    """Which of the event's requests failed (`ensure_user POST /v1/identify`), set as the
    error leaves it: a Track dead-lettered for its ensure-user identify's 400 named no
    request, and the runbook sent operators to a Track mapping that was fine."""

    resent = False
    """The request was sent twice before this answer (a kept-alive connection lost it as
    it went out, `delivery.UserpilotClient`): the first may have reached Userpilot,
    whatever this answer says of the second."""


class ConfigError(WorkerError):
    """A setting is wrong; start-up stops and the message says what to enter instead."""


class DeadLetter(WorkerError):
    """This event can never succeed as it is; dead-letter it and carry on with the rest."""

    reason = "dead_letter"

    def __init__(self, message: str, *, status: int | None = None, body: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class UndecodableEvent(DeadLetter):
    """The Kafka message is not a decodable Signal event (magic byte, schema id, Avro)."""

    reason = "undecodable"


class InvalidEvent(DeadLetter):
    """A canonical JSON event that does not fit the Signal schema (wrong type, unknown key)."""

    reason = "invalid_event"


class MappingError(DeadLetter):
    """Decoding, routing or mapping this one event raised: the event goes, the worker stays.

    The message names the original exception class; the event's bytes are kept in the DLQ.
    """

    reason = "mapping_error"

    def __init__(self, exc: BaseException) -> None:
        super().__init__(f"{type(exc).__name__}: {str(exc)[:500]}")
        self.exception_class = type(exc).__name__


class Rejected(DeadLetter):
    """Userpilot answered with a 4xx that no retry can fix (the payload itself is wrong)."""

    reason = "bad_request"


class RefusedAlone(DeadLetter):
    """Userpilot (or a gateway in front of it) refused this event (a `Refused`) again and
    again while it accepted other events with the same token in between: the answer is
    about this event (a WAF rule, a blocked user), not the setting."""

    reason = "refused"


class DlqRecordTooLarge(DeadLetter):
    """The DLQ refused a dead letter as too large (MSG_SIZE_TOO_LARGE, local or broker).

    Retrying the same record can never succeed: it is written once more without its value
    (`deadletter.without_value`), which `replay` fetches back from the source topic.
    """

    reason = "dlq_too_large"


class Retry(WorkerError):
    """Transient failure: the same request may succeed later."""

    cause = "retry"

    def __init__(
        self, message: str, *, status: int | None = None, body: str = "",
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = body
        self.retry_after = retry_after


class RateLimited(Retry):
    """429: slow the limiter down and wait at least Retry-After."""

    cause = "rate_limited"


class ServerError(Retry):
    """408 or 5xx: Userpilot or a proxy had a problem; also a final 1xx, an unknown status
    or an answer that cannot be read (never a dead letter: nothing says the event is bad)."""

    cause = "server_error"


class Timeout(Retry):
    """No complete answer within the request timeout."""

    cause = "timeout"


class ConnectionFailed(Retry):
    """The connection could not be made or was reset.

    `before_tls`: it failed before any TLS was spoken (a host that does not resolve, a
    proxy refusing the tunnel): its message names the cause, and a hint at the CA bundle
    beside it would send operators the wrong way (review "http33")."""

    cause = "connection_error"

    def __init__(
        self, message: str, *, status: int | None = None, body: str = "",
        retry_after: float | None = None, before_tls: bool = False,
    ) -> None:
        super().__init__(message, status=status, body=body, retry_after=retry_after)
        self.before_tls = before_tls


class TlsRefused(ConnectionFailed):
    """The TLS handshake failed in a way a setting fixes when it lasts: a certificate no
    configured CA signed, or a port that answers in plain HTTP. Retried like any connection
    error (one stray failure says little, review "r30"), but a gate it closes is
    "misconfigured", not an outage: as an outage it kept the pod ready with `/readyz` and
    `userpilot_integration_up` silent (review "faults29")."""


class Pause(WorkerError):
    """Nothing can be delivered until an operator acts; hold offsets and probe."""

    def __init__(self, message: str, *, status: int | None = None, body: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class Misconfigured(Pause):
    """A refusal no event can pass: wrong token (often the read token), wrong analytics
    endpoint host, a request Userpilot does not serve (`Refused`), a proxy refusing its
    credentials (407), a 431 or a redirect."""


class Refused(Misconfigured):
    """Userpilot or a gateway in front of it refused the request, not its payload: the
    token (401/403), the host (404), or a status that says the same of every request the
    worker makes (402 the account, 405/410/411/414/415/426 how it is called). Dead-lettering
    each event for it dead-lettered them all until the DLQ guard stopped the worker; it is
    paused instead, and dead-letters an event only when others get past (`RefusedAlone`)."""


class ProxyRefused(Misconfigured):
    """The egress proxy forbids the tunnel to Userpilot (403 to CONNECT: its policy, or a
    host NO_PROXY should bypass) or opens no tunnels at all (400, 405 or 501: a proxy for
    plain HTTP only). Never evidence about an event."""


class AlreadyDelivered(WorkerError):
    """The messageId was confirmed delivered (Redis) while this event waited to be sent:
    finish it without a request, counted as a duplicate."""


class Stop(WorkerError):
    """The worker must stop consuming and exit non-zero."""


class DlqGuardTripped(Stop):
    """Dead letters passed the configured ratio or run length."""


class UnreadableBatch(Stop):
    """A record batch Kafka's client cannot read, and starts its partition over rather
    than pass: the worker stops (exit 1; counted in `userpilot_log_resets_total` first)."""


class Degrade(WorkerError):
    """Something optional failed; the worker keeps delivering as it would without it."""


class SharedStateUnavailable(Degrade):
    """Redis did not answer in time or refused: use the local limiter share, skip dedup.

    The message names the Redis exception class only, never the URL (it may hold a password).
    `timed_out`: Redis did not answer within REDIS_TIMEOUT_SECONDS (hung, not refusing),
    after which deduplication stops asking it for a while (`dedup.Deduplicator`).
    """

    def __init__(self, message: str, *, timed_out: bool = False,
                 skipped: bool = False, tls: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out
        self.skipped = skipped  # not asked at all: Redis counts as hung (`dedup`)
        # The TLS handshake failed (an untrusted certificate, another host name, a port
        # that does not speak TLS): a setting when it lasts; `run` refuses it at start-up.
        self.tls = tls

    @property
    def refused(self) -> bool:
        """Redis refused the worker's credentials (WRONGPASS, NOAUTH) or its user's ACL
        denies a call: a setting to fix, which no wait mends (`run` refuses it at start-up;
        a read-only replica is waited for instead: `reach.redis_refusal`)."""
        return any(name in str(self) for name in _REDIS_REFUSALS)


_REDIS_REFUSALS = ("AuthenticationError", "AuthenticationWrongNumberOfArgsError",
                   "NoPermissionError")
