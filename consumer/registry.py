"""Schema Registry edge: register our schema, fetch writer schemas by id, cache both.

Subjects follow the TOPIC name strategy (`<topic>-value`) explicitly: confluent-kafka's own
serdes default to another strategy in recent versions, and other producers of these topics
expect the classic one.

Every call is bounded (`timeout_s`, no hidden client retries: the caller retries), so a
frozen registry cannot stall the worker silently: the first failure logs an error, the
first answer after it a recovery line, and `healthy` / `last_error` tell readiness.

The three REST calls go through httpx (`RestClient`), not confluent-kafka's
`SchemaRegistryClient`: importing that client loads authlib, cryptography, joserfc and a
second HTTP stack for OAuth the worker never uses, 22 MB of RSS in every replica
(measured: 22 → 44 MB for the import alone), more than the rest of the worker's imports.
httpx brings the same proxy (the one the environment names for the registry's URL, given
explicitly: `Settings.registry_proxy`), CA bundle (`SSL_CERT_FILE`, `ssl_context`) and TLS
handling as the Userpilot client; confluent-kafka's serializers still read what this registers
(integration test).
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar, cast
from urllib.parse import quote

import fastavro
import httpx

from consumer.answers import Unreadable, body_text, charset_of, raw_chunks, whole_body
from consumer.codec import (
    FANOUT_LIMIT,
    SCHEMA,
    SCHEMA_TEXT,
    DeepSchema,
    DeepUnion,
    Renamed,
    RenamedUnion,
    fanout,
    free_items,
    reader_for,
    self_referencing,
    unread_items,
    writer_json,
)
from consumer.cutoff import Cutoff
from consumer.errors import UndecodableEvent
from consumer.redaction import redact, registry_secrets, url_credentials
from consumer.stdout import printable
from consumer.tls import verification

__all__ = ["DEFAULT_TIMEOUT_S", "UNKNOWN_GRACE_S", "NoSchemaInAnswer", "Registry",
           "RegistryError", "RegistryUnusable", "RestClient", "SchemaNotKnownYet",
           "subject_for"]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 5.0
MAX_ANSWER_BYTES = 8 * 1024 * 1024
"""The largest registry answer read (inflated): a schema with its references, or the list of
subjects, is far smaller; past it the registry is not usable, not a reason to run out of
memory (review "http41")."""

T = TypeVar("T")


def subject_for(topic: str) -> str:
    """TopicNameStrategy subject for a topic's values."""
    return f"{topic}-value"


class RegistryUnusable(Exception):
    """A reply that is no registry's: a redirect, or a 2xx that is not a JSON object."""


class NoSchemaInAnswer(ValueError):
    """The registry answered for an id (or a reference) without its schema text: it
    misbehaved this once, so the lookup is retried like an outage (its name, not only
    "ValueError", is what the worker's line shows: review "registry54")."""


MAX_REFERENCES = 64  # schemas one writer schema may reference, transitively
SCHEMA_CACHE_MAX = 4096
SCHEMA_CACHE_CHARS = 8 * 1024 * 1024
"""Writer schemas kept parsed: at most SCHEMA_CACHE_MAX ids and SCHEMA_CACHE_CHARS of schema
JSON (parsed, ~6 times that in memory), the least recently used let go past either, and
fetched again when its events come back. Every id read was kept for the life of the process
(~64 KB for a 10 KB schema), and ids producers register at will grew a worker to its memory
limit (review "bounds49"); bound by count alone (256), 257 ids in use fetched every event
again (review "diff49b"). Our own schema, shared by every id that has it, weighs nothing.
The ids refused are kept the same way, by count."""


@dataclass(frozen=True)
class Reference:
    """A named type the schema takes from another subject's version (Schema Registry
    references: a producer that keeps, say, the Context record in a subject of its own)."""

    name: str
    subject: str
    version: int


@dataclass(frozen=True)
class SchemaDoc:
    """A schema's text and the references it needs to be parsed."""

    text: str
    references: tuple[Reference, ...] = ()
    kind: str = "AVRO"  # the registry's schemaType (absent: AVRO)
    missing: bool = False  # the answer held no schema text at all (retried, `_parse`)

    @classmethod
    def of(cls, body: Mapping[str, Any]) -> SchemaDoc:
        refs = body.get("references")
        text = body.get("schema")
        kind = body.get("schemaType")
        # Not text (`{"schema": null}`): an answer without the schema, retried (`_parse`).
        # Text, even empty, is the registry's word on the id: an empty one is permanent.
        return cls(text if isinstance(text, str) else "", tuple(
            Reference(str(ref.get("name", "")), str(ref.get("subject", "")),
                      _version(ref.get("version")))
            for ref in refs if isinstance(ref, dict)) if isinstance(refs, list) else (),
            kind.upper() if isinstance(kind, str) and kind else "AVRO",
            missing=not isinstance(text, str))


def _version(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1  # "latest" to the registry; a reference names a fixed version


def _doc(answer: SchemaDoc | str) -> SchemaDoc:
    """A client's answer as a SchemaDoc (a bare text: a schema without references)."""
    return answer if isinstance(answer, SchemaDoc) else SchemaDoc(str(answer))


def _parse_names(schema: Any, named: dict[str, Any]) -> Any:
    """`fastavro.parse_schema`, resolving short names as Java's Avro does (which parsed the
    schema when it was registered): in the enclosing namespace, then in none. fastavro
    tries only the first, so a namespaced record naming a null-namespace type by its short
    name (`"Context"`, defined in a reference or inline) was "not an Avro schema" and every
    event dead-lettered (review "schema22"). Each such name is aliased to its
    null-namespace type in `named`, and the schema parsed again (at most once per name)."""
    for _ in range(MAX_REFERENCES + 1):
        attempt = dict(named)
        try:
            parsed = fastavro.parse_schema(schema, named_schemas=attempt)
        except fastavro.schema.UnknownType as exc:
            full = str(exc.name)
            short = full.rpartition(".")[2]
            if short == full or full in named or short not in attempt:
                raise
            named[full] = attempt[short]
            continue
        named.update(attempt)
        return parsed
    raise ValueError(f"more than {MAX_REFERENCES} names resolved in no namespace")


def _with_references(parsed: Any, named: dict[str, Any]) -> Any:
    """A parsed writer schema whose root, or a branch of its root union, is only the name of
    a referenced type (`["ns.TrackEvent", "ns.IdentifyEvent"]`, Confluent's way to put
    several event types on one topic) with that type in its place, marked parsed with its
    names: fastavro parses a root it is handed again, and without the references it raised
    UnknownType, retried as a registry outage for ever (review "schema44")."""
    def named_type(branch: Any) -> Any:
        found = named.get(branch) if isinstance(branch, str) else None
        if not isinstance(found, dict):
            return branch
        return {**found, "__fastavro_parsed": True, "__named_schemas": named}

    if isinstance(parsed, list):
        return [named_type(branch) for branch in parsed]
    return named_type(parsed)


class _BadSchema(Exception):
    """A referenced schema the registry gave that cannot be parsed (permanent)."""


UNKNOWN_SCHEMA_CODE = 40403  # Confluent, Apicurio, Karapace and Redpanda: no schema with that id


class RegistryError(Exception):
    """The registry answered with an error status (`http_status_code`, its `error_code`)."""

    def __init__(self, http_status_code: int, error_code: int | None, message: str) -> None:
        super().__init__(f"{http_status_code} (error {error_code}): {message}")
        self.http_status_code = http_status_code
        self.error_code = error_code

    @property
    def answered(self) -> bool:
        """The registry's own answer about what was asked (an unknown id, subject or version;
        a schema it refuses to register), not a failure to reach it.

        Only with the registry's JSON `error_code`: a gateway's or ingress's `404 page not
        found` in front of a registry that is down is an outage (dead-lettering good events
        as "unknown schema id" lost them), and 401/403/429 are failures whatever the body
        (a rotated credential must turn readiness off, not wait silently).
        """
        return self.error_code is not None and self.http_status_code in (404, 409, 422)

    @property
    def unknown_schema(self) -> bool:
        """The registry says no schema has the id asked for (permanent: ids never change)."""
        return self.http_status_code == 404 and self.error_code == UNKNOWN_SCHEMA_CODE


class SchemaNotKnownYet(RegistryError):
    """The registry says it has no schema with an event's id (or none that schema
    references), within the id's grace (`UNKNOWN_GRACE_S`): a registry replica behind its
    leader, or one still loading its store, says so of schemas it serves seconds later.
    The event waits and asks again, as in an outage (readiness stays on: the registry
    answers), and is dead-lettered if the registry still says so after the grace. A
    registry failure, as the others: outside `errors`' tree, whose retries are Userpilot's."""

    def __init__(self, exc: RegistryError, *, schema_id: int, since_s: float, grace_s: float,
                 said: str) -> None:
        super().__init__(exc.http_status_code, exc.error_code, said)
        self.args = (f"schema id {schema_id} not known to the registry yet ({since_s:.1f} s "
                     f"since it first said so: {said})",)
        self.schema_id = schema_id
        self.grace_s = grace_s
        self.said = said


UNKNOWN_GRACE_S = 30.0
"""How long the worker asks again for a schema id the registry says it does not have (40403,
or a reference of it 40401/40402) before its events are dead-lettered. Believed at once, a
registry replica behind its leader, or one loading its store (Karapace: 6 s for 40,000
schemas), had every event of a new schema dead-lettered, and a missing reference was
remembered for the process's life, so a replay of them failed again (review "registry58")."""
UNKNOWN_GRACE_IDS = 16
"""At most this many ids in their grace at once: a stream of ids no registry has (events
framed against another registry) is dead-lettered at once past them, not held 30 s each."""
_UNKNOWN_KEPT = 4 * UNKNOWN_GRACE_IDS  # ids remembered, in grace or past it (LRU)
UNKNOWN_ID_SPAN = 100_000
"""... and only for an id at most this far above the highest this registry has given: Schema
Registry ids (Confluent's, Karapace's, Apicurio's) are issued in sequence, so a replica
behind its leader lacks the newest; an id far beyond them is garbage after a zero byte (a
poison event), believed at once as before the grace, not held 30 s."""
MISSING_REFERENCE_KEPT_S = 10.0
"""How long a schema whose reference the registry does not have is refused without asking
again, after its grace: asked for each event, a stream of them cost two registry requests
each on the one fetch thread (review "diff58"); remembered for good, a replay after the
registry had it failed again until a restart (review "registry58"); kept a minute, a replay
soon after it caught up failed again, spending one of the event's replays
(review "registry58b")."""


_ACCEPT = "application/vnd.schemaregistry.v1+json, application/vnd.schemaregistry+json, " \
    "application/json"


class RestClient:
    """The Schema Registry REST calls the worker makes, over httpx (one pooled client).

    `url` may carry a path (Apicurio's `/apis/ccompat/v7`); `user_info` is `user:password`
    for basic auth. No retries here: `Registry`'s callers retry.
    """

    def __init__(self, url: str, user_info: str | None = None, *,
                 timeout_s: float = DEFAULT_TIMEOUT_S, proxy: str | None = None) -> None:
        auth = None
        if user_info:
            user, _, password = user_info.partition(":")
            auth = httpx.BasicAuth(user, password)
        self.timeout_s = timeout_s
        # A connection per call (the worker makes a few: at start-up and per new schema
        # id), so each call's socket is its own to cut at the deadline (`_json`).
        # The proxy is the one given (not httpx's reading of the environment, which parsed
        # every proxy variable, used or not, and crashed on one it could not parse).
        self._http = httpx.Client(base_url=url.rstrip("/") + "/", auth=auth,
                                  timeout=timeout_s, trust_env=False, proxy=proxy,
                                  verify=verification(url, proxy),
                                  headers={"Accept": _ACCEPT, "Accept-Encoding": "identity"},
                                  limits=httpx.Limits(max_keepalive_connections=0))

    def get_schema(self, schema_id: int) -> SchemaDoc:
        """The schema of an id (`GET /schemas/ids/{id}`), with its references."""
        return SchemaDoc.of(self._json("GET", f"schemas/ids/{int(schema_id)}"))

    def get_version(self, subject: str, version: int) -> SchemaDoc:
        """One version of a subject (`GET /subjects/{subject}/versions/{version}`), a
        soft-deleted one included (`?deleted=true`, as Confluent's clients resolve
        references): a schema that references a version deleted since is still the
        writer schema of the events written with it (review "schema22": they were
        dead-lettered, while Confluent's own deserialiser read them)."""
        return SchemaDoc.of(self._json(
            "GET", f"subjects/{_path(subject)}/versions/{version}?deleted=true"))

    def register_schema(self, subject: str, schema_text: str) -> int:
        """Register an Avro schema under `subject`; its id (the same one if known)."""
        body = self._json("POST", f"subjects/{_path(subject)}/versions",
                          {"schema": schema_text, "schemaType": "AVRO"})
        found = body.get("id")
        if isinstance(found, bool) or not isinstance(found, int):
            # A KeyError escaped `produce` as a traceback (review "reg44").
            raise RegistryUnusable(f"its answer to the registration holds no schema id: "
                                   f"{str(body)[:200]}")
        return found

    def get_latest_version(self, subject: str) -> tuple[int, SchemaDoc]:
        """(id, schema) of the subject's latest version."""
        body = self._json("GET", f"subjects/{_path(subject)}/versions/latest")
        return int(body["id"]), SchemaDoc.of(body)

    def subjects(self) -> list[Any]:
        """The registered subjects (`GET /subjects`): `check-config --online`'s and `run`'s
        start-up probe, so they accept the answers the worker can use and no other."""
        subjects: list[Any] = self._json("GET", "subjects", want=list)
        return subjects

    def close(self) -> None:
        self._http.close()

    def _json(self, method: str, path: str, body: Any = None, *,
              want: type[Any] = dict) -> Any:
        # httpx's timeout bounds each step (connect, each read), not the call: an answer
        # trickled a byte at a time, its headers or its body, never timed out, held the
        # schema lookup with readiness on and kept the process from exiting (reviews
        # "schema16", "diff16"). At `timeout_s` the call's socket is shut down, which ends
        # a read blocked in any step.
        cut = Cutoff(self.timeout_s)
        try:
            with self._http.stream(
                    method, path, json=body,
                    headers={"Content-Type": "application/vnd.schemaregistry.v1+json"}
                    if body else None, extensions={"trace": cut.trace}) as response:
                try:
                    content = whole_body(raw_chunks(response),
                                         response.headers.get("content-encoding"),
                                         MAX_ANSWER_BYTES)
                    unreadable: Unreadable | None = None
                except Unreadable as exc:
                    content, unreadable = b"", exc
        except httpx.TransportError:
            if not cut.fired:
                raise
        finally:
            cut.cancel()
        if cut.fired:  # the read it broke, or one that ended just as it fired
            raise TimeoutError(f"the registry's answer took over {self.timeout_s:g} s")
        try:
            data = json.loads(content)
        except (ValueError, RecursionError):  # RecursionError: nested past Python's stack
            data = None
        if response.status_code >= 400:
            code = data.get("error_code") if isinstance(data, dict) else None
            message = (data.get("message") if isinstance(data, dict)
                       else str(unreadable) if unreadable is not None
                       else body_text(content, charset=charset_of(response.headers))[:200])
            raise RegistryError(response.status_code, code if isinstance(code, int) else None,
                                str(message))
        if unreadable is not None:
            raise RegistryUnusable(f"HTTP {response.status_code} from {response.url.path!s}: "
                                   f"{unreadable}; check SCHEMA_REGISTRY_URL")
        location = response.headers.get("location")
        if 300 <= response.status_code < 400 and location:
            # Where it sends the worker is the fix (http → https, a moved host): "not a
            # Schema Registry answer" alone left users guessing (review "registry58").
            target = str(response.url.join(location).copy_with(userinfo=b""))[:300]
            raise RegistryUnusable(
                f"HTTP {response.status_code} from {response.url.path!s} redirects to "
                f"{printable(target)}, and the worker does not follow redirects: check "
                "SCHEMA_REGISTRY_URL (the registry's own address and API base path)")
        if response.status_code >= 300 or not isinstance(data, want):
            # Not a registry answering (a URL without Apicurio's /apis/ccompat/v7, a UI, a
            # gateway's redirect): a failure for readiness, not an answer.
            raise RegistryUnusable(
                f"HTTP {response.status_code} from {response.url.path!s}: not a Schema "
                "Registry JSON answer; check SCHEMA_REGISTRY_URL (its API base path)")
        return data


def _path(segment: str) -> str:
    """A subject as one URL path segment."""
    return quote(segment, safe="")


class Registry:
    """A cached view of the registry; `writer_schema` is the codec's SchemaLookup."""

    def __init__(self, url: str, basic_auth_user_info: str | None = None, *,
                 timeout_s: float = DEFAULT_TIMEOUT_S, client: Any = None,
                 clock: Callable[[], float] = time.monotonic,
                 proxy: str | None = None, unknown_grace_s: float = 0.0) -> None:
        self._client = client if client is not None else RestClient(
            url, basic_auth_user_info, timeout_s=timeout_s, proxy=proxy)
        # Both least recently used first, bounded (SCHEMA_CACHE_MAX, SCHEMA_CACHE_CHARS);
        # written under `_lock` (the fetch thread and the event loop both read them).
        self._parsed: OrderedDict[int, Mapping[str, Any]] = OrderedDict()
        self._weights: dict[int, int] = {}  # a parsed schema's JSON length (ours: 0)
        self._weight = 0
        self._unusable: OrderedDict[int, str] = OrderedDict()  # ids whose schema is not Avro
        # Ids the registry said it does not have, and when it first said so (`_believed`):
        # the worker's alone (`unknown_grace_s`); a tool (replay, produce) believes at once.
        self._unknown_grace_s = unknown_grace_s
        self._unknown_since: OrderedDict[int, float] = OrderedDict()
        self.highest_known = 0  # the highest id this registry gave a schema for (0: none yet)
        # Ids whose reference is missing: the dead letter's reason, and until when it is
        # given without asking (MISSING_REFERENCE_KEPT_S; bounded as `_unusable`).
        self._missing_reference: OrderedDict[int, tuple[str, float]] = OrderedDict()
        self.evictions = 0  # parsed schemas let go so far: copies of them go stale
        self._ours = fastavro.schema.to_parsing_canonical_form(SCHEMA)
        self._lock = threading.Lock()
        self._fetching = threading.Lock()
        self._clock = clock
        # The credentials never reach `last_error` (readiness may show it) or the log line:
        # the setting's and those written into the URL (a gateway's 5xx page may echo the
        # request's `Authorization: Basic …`), nor its proxy's (a 407 page quotes
        # `Proxy-Authorization: Basic …`, review "secrets18").
        self._secrets = [*registry_secrets(url, basic_auth_user_info), *url_credentials(proxy)]
        self.timeout_s = timeout_s
        self.healthy = True
        self.last_error: str | None = None
        self.failing_since: float | None = None

    def redact(self, text: str) -> str:
        """`text` (an answer of the registry or its proxy, which may echo the request) with
        the registry's and its proxy's credentials masked."""
        return redact(text, self._secrets)

    def problem(self) -> str | None:
        """For readiness: None while the registry answers, else what failed (no I/O). Both
        read under the lock the fetch threads write them under: read apart, an answer
        between the two reads gave "does not answer (None)" (review "threads46")."""
        with self._lock:
            healthy, error = self.healthy, self.last_error
        return None if healthy else f"schema registry does not answer ({error})"

    def _call(self, what: str, call: Callable[[], T],
              answer: Callable[[RegistryError], bool] = lambda exc: exc.answered) -> T:
        """Run one registry request, keeping `healthy` and logging the transitions; `answer`
        tells which error statuses are the registry answering (not a failure)."""
        try:
            result = call()
        except RegistryError as exc:
            if answer(exc):
                self._answered()  # e.g. 40403: it answers, the id is unknown
            else:
                self._failed(what, exc)
            raise
        except Exception as exc:
            self._failed(what, exc)
            raise
        self._answered()
        return result

    def _failed(self, what: str, exc: BaseException) -> None:
        detail = f"{type(exc).__name__}: {self.redact(str(exc))[:200]}"
        with self._lock:
            first = self.healthy
            self.healthy = False
            self.last_error = f"{what}: {detail}"
            if first:
                self.failing_since = self._clock()
        if first:
            log.error("schema registry does not answer (%s: %s; timeout %.1f s); events of "
                      "schemas not cached yet wait, readiness is off until it answers",
                      what, detail, self.timeout_s)

    def _answered(self) -> None:
        if self.healthy:  # the common case, lock-free: only a failure turns it off
            return
        with self._lock:
            if self.healthy:  # another thread's answer came first: one line, not two
                return
            since, self.failing_since = self.failing_since, None
            self.healthy = True
            self.last_error = None
        down = self._clock() - since if since is not None else 0.0
        log.warning("schema registry answers again (after %.1f s)", down)

    def register(self, topic: str) -> int:
        """Register the Signal schema under the topic's subject; returns its id. A tool's
        call (`produce`): its failure is the caller's one line, not the worker's readiness
        line beside it (review "diff44")."""
        schema_id: int = self._client.register_schema(subject_for(topic), SCHEMA_TEXT)
        self._keep_parsed(schema_id, SCHEMA, 0)
        return schema_id

    def _keep_parsed(self, schema_id: int, parsed: Mapping[str, Any], weight: int) -> None:
        """Remember a parsed schema, letting the least recently used go past the bounds."""
        with self._lock:
            self.highest_known = max(self.highest_known, schema_id)
            self._weight += weight - self._weights.get(schema_id, 0)
            self._weights[schema_id] = weight
            self._parsed[schema_id] = parsed
            self._parsed.move_to_end(schema_id)
            while len(self._parsed) > SCHEMA_CACHE_MAX:
                self._let_go(next(iter(self._parsed)))
            while self._weight > SCHEMA_CACHE_CHARS:
                # The least recently used that weighs: letting ours go freed nothing, and
                # was fetched again (review "diff49c"). The one just kept stays, alone.
                heavy = next((i for i in self._parsed
                              if self._weights.get(i, 0) > 0 and i != schema_id), None)
                if heavy is None:
                    break
                self._let_go(heavy)

    def _let_go(self, schema_id: int) -> None:
        """Forget a parsed schema (under `_lock`): copies of it are stale from now."""
        del self._parsed[schema_id]
        self._weight -= self._weights.pop(schema_id, 0)
        self.evictions += 1

    def cached(self, schema_id: int) -> Mapping[str, Any] | None:
        """The parsed writer schema if already fetched: the hot path never blocks on I/O.
        (The handler keeps its own copy per id: this is asked on its misses only.)"""
        cached = self._parsed.get(schema_id)
        if cached is not None:
            with self._lock:
                if schema_id in self._parsed:
                    self._parsed.move_to_end(schema_id)
        return cached

    def writer_schema(self, schema_id: int) -> Mapping[str, Any]:
        """Parsed writer schema for an id; KeyError when the registry does not know it,
        UndecodableEvent when its schema is not an Avro schema (JSON Schema, Protobuf, or
        broken text): the registry answered, so waiting would stall the partition for ever.
        A negative id (`codec._HEADER`) is no registry's: unknown, without a request."""
        cached = self._parsed.get(schema_id)
        if cached is not None:
            return cached
        if schema_id < 0:
            raise KeyError(schema_id)
        with self._fetching:  # many events of a new schema arrive at once: fetch it once
            cached = self._parsed.get(schema_id)
            if cached is not None:
                return cached
            problem = self._unusable.get(schema_id)
            if problem is not None:
                raise UndecodableEvent(problem)
            missing = self._missing_reference.get(schema_id)
            if missing is not None:
                if self._clock() < missing[1]:
                    raise UndecodableEvent(missing[0])
                with self._lock:  # prefetch (another thread) writes it too
                    self._missing_reference.pop(schema_id, None)
            return self._fetch(schema_id)

    def _unusable_schema(self, schema_id: int, problem: str) -> NoReturn:
        """Remember an id whose schema cannot be used (ids never change) and refuse it."""
        with self._lock:
            self._unusable[schema_id] = problem
            self._unusable.move_to_end(schema_id)
            while len(self._unusable) > SCHEMA_CACHE_MAX:
                self._unusable.popitem(last=False)
        raise UndecodableEvent(problem) from None

    def _resolve(self, refs: Iterable[Reference], named: dict[str, Any],
                 seen: set[tuple[str, int]]) -> None:
        """Parse referenced schemas into `named`, each one's own references first (depth
        first, each subject version once, at most MAX_REFERENCES in all)."""
        for ref in refs:
            key = (ref.subject, ref.version)
            if key in seen:
                continue
            if len(seen) >= MAX_REFERENCES:
                raise _BadSchema(f"more than {MAX_REFERENCES} schemas")
            seen.add(key)
            doc = _doc(self._call(f"get schema {ref.subject} version {ref.version}",
                                  functools.partial(self._client.get_version, ref.subject,
                                                    ref.version)))
            if doc.missing:
                # As for the schema itself (`_parse`): the registry misbehaved this once;
                # remembered as "does not parse", every event of the id was dead-lettered
                # until a restart (review "registry48").
                raise NoSchemaInAnswer(f"the registry's answer for {ref.subject} version "
                                 f"{ref.version} (referenced as {ref.name!r}) holds no schema")
            if doc.kind != "AVRO":
                raise _BadSchema(f"{ref.name!r} ({ref.subject} version {ref.version}), a "
                                 f"{doc.kind} schema (the registry's schemaType), not Avro")
            self._resolve(doc.references, named, seen)
            try:
                _parse_names(writer_json(doc.text, root=False), named)
            except Exception as exc:
                raise _BadSchema(f"{ref.name!r} ({ref.subject} version {ref.version}), which "
                                 f"does not parse: {type(exc).__name__}: {str(exc)[:200]}"
                                 ) from None

    def prefetch(self, topics: Iterable[str], stop: threading.Event | None = None) -> None:
        """Cache the latest schema of each topic's subject, best effort (worker start-up).

        Why: without it the first polled batch cannot be decided; its events wait for the
        schema in tasks that count against the in-flight window, a full window pauses
        every partition, and librdkafka takes up to a second to fetch again after the
        resume. Nothing here changes readiness or logs above debug: an id not cached is
        fetched on demand (`writer_schema`) as before, with its errors reported there.
        `stop` set: no further topic is asked (the worker stops).
        """
        for topic in topics:
            if stop is not None and stop.is_set():
                return
            try:
                schema_id, doc = self._client.get_latest_version(subject_for(topic))
                self._parse(schema_id, _doc(doc))
            except Exception as exc:
                log.debug("no schema prefetched for %s (%s)", topic, type(exc).__name__)

    def _fetch(self, schema_id: int) -> Mapping[str, Any]:
        try:
            doc = self._call(f"get schema {schema_id}",
                             lambda: self._client.get_schema(schema_id),
                             lambda exc: exc.unknown_schema)
        except RegistryError as exc:
            if exc.unknown_schema:
                self._believed(schema_id, exc)
                raise KeyError(schema_id) from None
            raise
        parsed = self._parse(schema_id, _doc(doc))
        if self._unknown_since:
            with self._lock:
                self._unknown_since.pop(schema_id, None)
        return parsed

    def _believed(self, schema_id: int, exc: RegistryError) -> None:
        """Return when the registry's "no such schema" for `schema_id` is to be believed:
        past the id's grace, with UNKNOWN_GRACE_IDS others in theirs, or far beyond the ids
        the registry gave (UNKNOWN_ID_SPAN); else raise
        SchemaNotKnownYet (the events wait and ask again)."""
        if self._unknown_grace_s <= 0 or (
                self.highest_known and schema_id > self.highest_known + UNKNOWN_ID_SPAN):
            return
        with self._lock:
            now = self._clock()
            since = self._unknown_since.get(schema_id)
            if since is None:
                waiting = sum(1 for t in self._unknown_since.values()
                              if now - t < self._unknown_grace_s)
                # Past the bound it is believed now, and on its later events too.
                since = now if waiting < UNKNOWN_GRACE_IDS else now - self._unknown_grace_s
                self._unknown_since[schema_id] = since
                if len(self._unknown_since) > _UNKNOWN_KEPT:
                    # The least recently asked past its grace, never one in it: evicted, an
                    # id in its grace started a new one (dead-lettered at 15 s, or held 60 s
                    # and more; review "diff58"). At most UNKNOWN_GRACE_IDS are in it.
                    gone = next((i for i, t in self._unknown_since.items()
                                 if now - t >= self._unknown_grace_s),
                                next(iter(self._unknown_since)))
                    del self._unknown_since[gone]
            self._unknown_since.move_to_end(schema_id)
        if now - since < self._unknown_grace_s:
            raise SchemaNotKnownYet(exc, schema_id=schema_id, since_s=now - since,
                                    grace_s=self._unknown_grace_s,
                                    said=self.redact(str(exc))[:200]) from None

    def _parse(self, schema_id: int, doc: SchemaDoc) -> Mapping[str, Any]:
        """Parse and cache a writer schema, its references first; our own schema is cached
        as `SCHEMA` itself (the codec then skips schema resolution)."""
        if doc.missing:
            # An answer without the schema: the registry misbehaved this once; not
            # remembered (retried like an outage), unlike a schema that cannot be parsed.
            raise NoSchemaInAnswer(
                f"the registry's answer for schema id {schema_id} holds no schema")
        if doc.kind != "AVRO":
            self._unusable_schema(schema_id, f"schema id {schema_id} is a {doc.kind} schema "
                                  "(the registry's schemaType), not Avro: this worker reads "
                                  "Avro only")
        if not doc.text.strip():
            # The registry's word on the id, on every call (Apicurio stores `""` and serves
            # it): retried, it stopped its partition for good (review "schema22").
            self._unusable_schema(schema_id, f"schema id {schema_id} is an empty schema")
        named: dict[str, Any] = {}
        try:
            self._resolve(doc.references, named, set())
        except RegistryError as exc:
            if not exc.answered:
                raise  # an outage: the events wait, as for the schema itself
            self._believed(schema_id, exc)
            # Remembered a while, not for good: a replica behind its leader said it, and a
            # replay of these events after it caught up failed again until a restart
            # (review "registry58").
            problem = (f"schema id {schema_id} references a schema the registry does not "
                       f"have ({exc})")
            with self._lock:
                self._missing_reference[schema_id] = (problem,
                                                      self._clock() + MISSING_REFERENCE_KEPT_S)
                while len(self._missing_reference) > SCHEMA_CACHE_MAX:
                    self._missing_reference.popitem(last=False)
            raise UndecodableEvent(problem) from None
        except _BadSchema as exc:
            self._unusable_schema(schema_id, f"schema id {schema_id} references {exc}")
        try:
            fresh: Any = _with_references(_parse_names(writer_json(doc.text), named), named)
        except Exception as exc:
            self._unusable_schema(
                schema_id, f"schema id {schema_id} is not an Avro schema this worker can "
                f"parse ({type(exc).__name__}: {str(exc)[:200]})")
        try:
            parsed = self._reader_of(schema_id, fresh, named)
        except UndecodableEvent:
            raise
        except Exception as exc:
            # Never an outage: every registry call succeeded, and retried as one, its events
            # held their partitions for ever with the registry healthy (review "schema44").
            self._unusable_schema(
                schema_id, f"schema id {schema_id} cannot be read as a Signal event "
                f"({type(exc).__name__}: {str(exc)[:200]})")
        weight = 0 if parsed is SCHEMA else len(json.dumps(fresh, default=str))
        self._keep_parsed(schema_id, parsed, weight)
        return parsed

    def _reader_of(self, schema_id: int, fresh: Any, named: dict[str, Any]) -> Mapping[str, Any]:
        """How events of a parsed writer schema are read: ours, ours under the writer's
        names, or through the pure-Python reader (see `_parse`)."""
        parsed: Mapping[str, Any]
        if fastavro.schema.to_parsing_canonical_form(fresh) == self._ours:
            parsed = SCHEMA
        elif (free := free_items(named, fresh)) is not None:
            self._unusable_schema(
                schema_id, f"schema id {schema_id} has an array whose items take no bytes "
                f"({free}): a count alone could make the reader loop for ever; refused")
        elif (wide := fanout(named, fresh)) is not None:
            self._unusable_schema(
                schema_id, f"schema id {schema_id} has a part ({wide}) whose reading visits "
                f"more than {FANOUT_LIMIT} records, nulls or fixed-width fields without "
                f"reading a byte: one small event could hold the process for hours; refused")
        else:
            try:
                reader = reader_for(fresh, named)  # ours, or ours under the writer's names
            except Exception as exc:  # never an outage: retried, it held its partition
                self._unusable_schema(
                    schema_id, f"schema id {schema_id} cannot be read as a Signal event "
                    f"({type(exc).__name__}: {str(exc)[:200]})")
            if self_referencing(named) or unread_items(named, fresh) is not None:
                # Read without recursion in C (see DeepSchema), and meeting the message's
                # end in an array the compiled reader skips item by item without reading
                # (`unread_items`); a union root is a list, and
                # made a dict it raised outside these checks: retried as an outage, for
                # ever (review "diff41b").
                deep: DeepSchema | DeepUnion = (DeepUnion(fresh) if isinstance(fresh, list)
                                                else DeepSchema(fresh))
                deep.reader = reader
                parsed = cast(Mapping[str, Any], deep)
            elif reader is not SCHEMA:
                # A union root is a list, as `fresh` itself may be (typed as the lookup's).
                parsed = (cast(Mapping[str, Any], RenamedUnion(fresh, reader))
                          if isinstance(fresh, list) else Renamed(fresh, reader))
            else:
                parsed = fresh
        return parsed
