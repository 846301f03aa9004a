"""Unit tests for consumer.registry: bounded calls, a log line, and a state for readiness."""

from __future__ import annotations

import base64
import copy
import gzip
import io
import json
import logging
import socket
import subprocess
import sys
import textwrap
import threading
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fastavro
import httpx
import pytest

from consumer import codec
from consumer.codec import SCHEMA, SCHEMA_TEXT
from consumer.errors import UndecodableEvent
from consumer.registry import (
    DEFAULT_TIMEOUT_S,
    MAX_ANSWER_BYTES,
    Reference,
    Registry,
    RegistryError,
    RegistryUnusable,
    RestClient,
    SchemaDoc,
    SchemaNotKnownYet,
)


class FakeClient:
    """Raises the queued errors in turn, then answers with the Signal schema."""

    def __init__(self, errors: list[BaseException]) -> None:
        self.errors = errors
        self.calls = 0

    def get_schema(self, schema_id: int) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return SCHEMA_TEXT

    def register_schema(self, subject: str, schema_text: str) -> int:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return 7


class Clock:
    now = 50.0

    def __call__(self) -> float:
        return self.now


def make(errors: list[BaseException]) -> tuple[Registry, FakeClient, Clock]:
    client, clock = FakeClient(errors), Clock()
    return Registry("http://unused", client=client, clock=clock), client, clock


def test_the_client_is_built_with_a_timeout_and_no_hidden_retries() -> None:
    registry = Registry("http://127.0.0.1:1/apis/ccompat/v7", timeout_s=1.5)
    rest: Any = registry._client
    assert isinstance(rest, RestClient) and rest.timeout_s == 1.5
    assert rest._http.timeout == httpx.Timeout(1.5)
    # Its proxy and CA store are given (Settings.registry_proxy, tls.verification), not
    # read by httpx from the environment: that parsed every proxy variable and NO_PROXY
    # entry, used or not, and crashed on one it could not parse (review "cmds17").
    assert not rest._http._trust_env
    assert Registry("http://127.0.0.1:1").timeout_s == DEFAULT_TIMEOUT_S == 5.0


def test_an_https_registry_trusts_ssl_cert_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What httpx's trust_env gave: the CA bundle the environment names."""
    import certifi

    from consumer.tls import verification

    bundle = Path(certifi.where()).read_text()
    one = bundle[:bundle.index("-----END CERTIFICATE-----") + 26]
    path = tmp_path / "ca.pem"
    path.write_text(one[one.index("-----BEGIN CERTIFICATE-----"):])
    monkeypatch.setenv("SSL_CERT_FILE", str(path))
    assert len(verification("https://registry:8081").get_ca_certs()) == 1
    assert len(verification("http://registry:8081", "https://proxy:3128")
               .get_ca_certs()) == 1
    assert verification("http://registry:8081").get_ca_certs() == []  # no TLS: none
    Registry("https://registry:8081")  # built with it


def serve(handler: Callable[[httpx.Request], httpx.Response]) -> tuple[RestClient, list[Any]]:
    """A RestClient whose requests go to `handler` (httpx's mock transport), and them."""
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return handler(request)

    client = RestClient("http://reg.test/apis/ccompat/v7/", "user:pa:ss")
    client._http = httpx.Client(base_url=client._http.base_url, auth=client._http.auth,
                                headers=client._http.headers,
                                transport=httpx.MockTransport(record))
    return client, seen


def always(response: httpx.Response) -> Callable[[httpx.Request], httpx.Response]:
    return lambda _request: response


def test_the_rest_client_speaks_the_registry_api_under_the_urls_path() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(200, json={"id": 12})
        if request.url.path.endswith("/versions/latest"):
            return httpx.Response(200, json={"id": 12, "version": 3, "schema": SCHEMA_TEXT,
                                             "subject": "signal.events-value"})
        return httpx.Response(200, json={"schema": SCHEMA_TEXT})

    client, seen = serve(answer)
    assert client.register_schema("signal.events-value", SCHEMA_TEXT) == 12
    assert client.get_latest_version("signal.events-value") == (12, SchemaDoc(SCHEMA_TEXT))
    assert client.get_schema(12) == SchemaDoc(SCHEMA_TEXT)
    assert client.get_version("ctx/v", 2) == SchemaDoc(SCHEMA_TEXT)
    assert [(r.method, r.url.path) for r in seen] == [
        ("POST", "/apis/ccompat/v7/subjects/signal.events-value/versions"),
        ("GET", "/apis/ccompat/v7/subjects/signal.events-value/versions/latest"),
        ("GET", "/apis/ccompat/v7/schemas/ids/12"),
        ("GET", "/apis/ccompat/v7/subjects/ctx/v/versions/2")]
    assert seen[3].url.raw_path == b"/apis/ccompat/v7/subjects/ctx%2Fv/versions/2?deleted=true"
    assert json.loads(seen[0].content) == {"schema": SCHEMA_TEXT, "schemaType": "AVRO"}
    assert seen[0].headers["content-type"] == "application/vnd.schemaregistry.v1+json"
    assert all(r.headers["authorization"] == httpx.BasicAuth("user", "pa:ss")._auth_header
               for r in seen), "basic auth; the password may hold a colon"


def test_the_rest_client_raises_the_registrys_status_and_error_code() -> None:
    client, _ = serve(lambda r: httpx.Response(
        404, json={"error_code": 40403, "message": "Schema not found"}))
    with pytest.raises(RegistryError) as err:
        client.get_schema(99)
    assert (err.value.http_status_code, err.value.error_code) == (404, 40403)
    assert "Schema not found" in str(err.value)
    client, _ = serve(lambda r: httpx.Response(502, text="<html>bad gateway</html>"))
    with pytest.raises(RegistryError) as err:
        client.get_schema(1)
    assert (err.value.http_status_code, err.value.error_code) == (502, None)
    for odd in (httpx.Response(200, text="[]"), httpx.Response(200, text="<html>UI</html>"),
                httpx.Response(302, headers={"location": "/login"})):
        client, _ = serve(always(odd))
        with pytest.raises(RegistryUnusable, match="check SCHEMA_REGISTRY_URL"):
            client.get_schema(1)
        registry = Registry("http://unused", client=client)
        with pytest.raises(RegistryUnusable):
            registry.writer_schema(1)
        assert not registry.healthy, "a reply that is no registry's is a failure"
    registry = Registry("http://unused", client=serve(lambda r: httpx.Response(
        404, json={"error_code": 40403, "message": "Schema not found"}))[0])
    with pytest.raises(KeyError):
        registry.writer_schema(99)
    assert registry.healthy, "a 404 is an answer"


def test_a_registry_that_does_not_answer_logs_once_and_turns_unhealthy(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry, client, clock = make([httpx.ReadTimeout("timed out")] * 3)
    assert registry.healthy and registry.last_error is None
    with caplog.at_level(logging.WARNING, logger="consumer.registry"):
        for _ in range(3):
            with pytest.raises(httpx.ReadTimeout):
                registry.writer_schema(1)
            clock.now += 10
        assert not registry.healthy
        assert registry.last_error == "get schema 1: ReadTimeout: timed out"
        assert registry.problem() == (
            "schema registry does not answer (get schema 1: ReadTimeout: timed out)")
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and "schema registry does not answer" in errors[0].message
        assert registry.writer_schema(1) == SCHEMA  # it answers again
    assert registry.healthy and registry.last_error is None
    assert registry.failing_since is None and registry.problem() is None
    recovered = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert recovered == ["schema registry answers again (after 30.0 s)"]
    assert client.calls == 4


def test_a_server_error_is_unhealthy_and_a_not_found_is_an_answer() -> None:
    registry, _, _ = make([RegistryError(503, 50301, "unavailable"),
                           RegistryError(404, 40403, "not found")])
    with pytest.raises(RegistryError):
        registry.writer_schema(3)
    assert not registry.healthy
    with pytest.raises(KeyError):
        registry.writer_schema(3)
    assert registry.healthy


@pytest.mark.parametrize("error", [
    RegistryError(404, None, "404 page not found"),  # a gateway's page: the registry is down
    RegistryError(404, 40401, "Subject not found"),  # not an answer about this id
    RegistryError(401, 40101, "Unauthorized"),  # a rotated credential
    RegistryError(403, None, "Forbidden"),
    RegistryError(429, None, "Too Many Requests"),
    RegistryError(400, None, "Bad Request"),
])
def test_only_the_registrys_unknown_id_answer_is_permanent(
        error: RegistryError, caplog: pytest.LogCaptureFixture) -> None:
    """Anything but the registry's JSON 40403 is an outage: the event waits (readiness off,
    one ERROR line naming the status) instead of being dead-lettered as an unknown id."""
    registry, _, _ = make([error])
    with caplog.at_level(logging.ERROR, logger="consumer.registry"), \
            pytest.raises(RegistryError):
        registry.writer_schema(3)
    assert not registry.healthy
    problem = registry.problem()
    assert problem is not None and str(error.http_status_code) in problem
    assert [r.levelno for r in caplog.records] == [logging.ERROR]
    assert registry.writer_schema(3) == SCHEMA and registry.healthy  # and it recovers


@pytest.mark.parametrize(("status", "code"), [(404, 40401), (409, 409), (422, 42201)])
def test_the_registrys_own_refusals_are_answers(status: int, code: int) -> None:
    assert RegistryError(status, code, "x").answered
    assert not RegistryError(status, None, "x").answered


def test_register_is_a_tools_call_outside_the_workers_bookkeeping() -> None:
    """`produce` registers: its failure is its own one line; through the worker's
    bookkeeping it also logged the worker's readiness line (review diff44)."""
    registry, _, _ = make([ConnectionRefusedError("refused")])
    with pytest.raises(ConnectionRefusedError):
        registry.register("topic-a")
    assert registry.last_error is None and registry.healthy
    assert registry.register("topic-a") == 7
    assert registry.healthy
    assert registry.cached(7) == SCHEMA


def test_a_cached_schema_needs_no_registry() -> None:
    registry, client, _ = make([])
    registry.writer_schema(5)
    client.errors = [httpx.ReadTimeout("frozen")]
    assert registry.writer_schema(5) == SCHEMA
    assert registry.healthy and client.calls == 1
    assert json.loads(SCHEMA_TEXT)["name"]


def test_credentials_never_reach_the_error_state() -> None:
    echoed = httpx.BasicAuth("user", "s3cr3t-pass")._auth_header.split()[-1]
    for text in ("401 for user:s3cr3t-pass at http://reg", f"502: echoed Basic {echoed}"):
        client = FakeClient([RuntimeError(text)])
        registry = Registry("http://unused", "user:s3cr3t-pass", client=client)
        with pytest.raises(RuntimeError):
            registry.writer_schema(1)
        assert registry.last_error is not None
        assert "s3cr3t" not in registry.last_error and echoed not in registry.last_error
        assert "***" in registry.last_error


class LatestClient:
    """Knows the latest schema of some subjects; fails for the others like a registry."""

    def __init__(self, latest: dict[str, tuple[int, str]]) -> None:
        self.latest = latest
        self.asked: list[str] = []

    def get_latest_version(self, subject: str) -> tuple[int, str]:
        self.asked.append(subject)
        if subject == "down-value":
            raise httpx.ConnectError("connection refused")
        if subject not in self.latest:
            raise RegistryError(404, 40401, "Subject not found")
        return self.latest[subject]

    def get_schema(self, schema_id: int) -> str:
        raise AssertionError("prefetched: no fetch by id")


def test_prefetch_caches_each_topics_latest_schema_and_ignores_failures() -> None:
    other = json.dumps({"type": "record", "name": "Other", "fields": [
        {"name": "type", "type": "string"}]})
    client = LatestClient({"signal-value": (7, SCHEMA_TEXT), "other-value": (9, other)})
    registry = Registry("http://unused", client=client)
    registry.prefetch(["signal", "down", "missing", "other"])
    assert client.asked == ["signal-value", "down-value", "missing-value", "other-value"]
    assert registry.cached(7) is SCHEMA  # our own schema: the codec skips resolution
    assert registry.writer_schema(7) is SCHEMA
    other_parsed = registry.cached(9)
    assert other_parsed is not None and other_parsed["name"] == "Other"
    assert registry.cached(8) is None
    # A best-effort start-up step: an unreachable registry changes no readiness here.
    assert registry.healthy and registry.problem() is None


CONTEXT = {"type": "record", "name": "Ctx", "namespace": "io.test",
           "fields": [{"name": "ip", "type": "string"}]}
GEO = {"type": "record", "name": "Geo", "namespace": "io.test",
       "fields": [{"name": "city", "type": "string"}]}
CONTEXT_WITH_GEO = {**CONTEXT, "fields": [*CONTEXT["fields"],
                                          {"name": "geo", "type": "io.test.Geo"}]}
MAIN = {"type": "record", "name": "Ev", "namespace": "io.test",
        "fields": [{"name": "type", "type": "string"}, {"name": "ctx", "type": "io.test.Ctx"}]}


class ReferencingClient:
    """A registry whose schema 5 takes Ctx (and Ctx takes Geo) from other subjects."""

    def __init__(self, versions: dict[tuple[str, int], SchemaDoc | BaseException]) -> None:
        self.versions = versions
        self.asked: list[tuple[str, int]] = []

    def get_schema(self, schema_id: int) -> SchemaDoc:
        from consumer.registry import Reference
        return SchemaDoc(json.dumps(MAIN), (Reference("io.test.Ctx", "ctx-value", 1),))

    def get_version(self, subject: str, version: int) -> SchemaDoc:
        self.asked.append((subject, version))
        answer = self.versions[(subject, version)]
        if isinstance(answer, BaseException):
            raise answer
        return answer


def test_a_writer_schema_with_references_is_parsed_with_them() -> None:
    """A producer keeping a record in a subject of its own (Schema Registry references):
    its events were dead-lettered as "not an Avro schema" (UnknownType), never decodable."""
    from consumer.registry import Reference
    client = ReferencingClient({
        ("ctx-value", 1): SchemaDoc(json.dumps(CONTEXT_WITH_GEO),
                                    (Reference("io.test.Geo", "geo-value", 3),)),
        ("geo-value", 3): SchemaDoc(json.dumps(GEO))})
    registry = Registry("http://unused", client=client)
    parsed = registry.writer_schema(5)
    assert client.asked == [("ctx-value", 1), ("geo-value", 3)]
    full = {**MAIN, "fields": [MAIN["fields"][0], {"name": "ctx", "type": {
        **CONTEXT, "fields": [*CONTEXT["fields"], {"name": "geo", "type": GEO}]}}]}
    record = {"type": "track", "ctx": {"ip": "1.2.3.4", "geo": {"city": "Oslo"}}}
    out = io.BytesIO()
    fastavro.schemaless_writer(out, fastavro.parse_schema(full), record)
    assert fastavro.schemaless_reader(io.BytesIO(out.getvalue()), dict(parsed), None) == record
    assert registry.writer_schema(5) is parsed and len(client.asked) == 2  # cached


def test_a_reference_the_registry_does_not_have_is_undecodable_named_and_asked_again() -> None:
    """Remembered 10 s, not for good (review "registry58"): a registry replica behind
    its leader says so of a reference it has a moment later, and remembered, the id's
    events, replayed after it caught up, were dead-lettered again until a restart; asked
    for each event, a stream of them cost two registry requests each (review "diff58")."""
    from consumer.registry import MISSING_REFERENCE_KEPT_S

    client = ReferencingClient({("ctx-value", 1): RegistryError(404, 40402, "Version not found")})
    clock = Clock()
    registry = Registry("http://unused", client=client, clock=clock)
    for _ in range(3):
        with pytest.raises(UndecodableEvent, match=r"references a schema the registry does "
                                                   r"not have .*40402"):
            registry.writer_schema(5)
    assert client.asked == [("ctx-value", 1)]
    assert registry.healthy
    client.versions[("ctx-value", 1)] = SchemaDoc(json.dumps(CONTEXT))
    clock.now += MISSING_REFERENCE_KEPT_S
    assert registry.writer_schema(5)["name"] == "io.test.Ev"


def _unknown() -> RegistryError:
    return RegistryError(404, 40403, "Schema 9 not found")


def test_an_id_the_registry_does_not_know_yet_is_asked_again_within_its_grace() -> None:
    """Review "registry58": a registry replica behind its leader (or loading its store,
    Karapace: 6 s) answers 40403 for ids it serves seconds later, and every event of them
    was dead-lettered at once. Within the grace the events wait (`SchemaNotKnownYet`, the
    registry healthy: readiness stays on); past it the answer is believed."""
    client, clock = FakeClient([_unknown(), _unknown()]), Clock()
    registry = Registry("http://unused", client=client, clock=clock, unknown_grace_s=30.0)
    with pytest.raises(SchemaNotKnownYet, match="schema id 9 not known to the registry yet"):
        registry.writer_schema(9)
    clock.now += 10
    with pytest.raises(SchemaNotKnownYet) as waited:
        registry.writer_schema(9)
    assert waited.value.schema_id == 9 and waited.value.grace_s == 30.0
    assert registry.healthy
    assert registry.writer_schema(9) is not None  # the replica caught up
    assert client.calls == 3

    client.errors = [_unknown(), _unknown(), _unknown()]
    with pytest.raises(SchemaNotKnownYet):
        registry.writer_schema(10)
    clock.now += 30
    with pytest.raises(KeyError):
        registry.writer_schema(10)  # past its grace: believed
    with pytest.raises(KeyError):
        registry.writer_schema(10)  # ... and for its later events, at once


def test_a_reference_the_registry_does_not_have_yet_is_asked_again_within_the_grace() -> None:
    client = ReferencingClient({("ctx-value", 1): RegistryError(404, 40401, "Subject not found")})
    clock = Clock()
    registry = Registry("http://unused", client=client, clock=clock, unknown_grace_s=30.0)
    with pytest.raises(SchemaNotKnownYet, match="40401"):
        registry.writer_schema(5)
    clock.now += 31
    with pytest.raises(UndecodableEvent, match="references a schema the registry does not have"):
        registry.writer_schema(5)


def test_a_stream_of_unknown_ids_is_not_held_past_the_ids_in_grace() -> None:
    """Events framed against another registry: every id unknown. Past UNKNOWN_GRACE_IDS in
    their grace at once, an id is believed at once, not held 30 s per event."""
    from consumer.registry import UNKNOWN_GRACE_IDS
    client, clock = FakeClient([]), Clock()
    registry = Registry("http://unused", client=client, clock=clock, unknown_grace_s=30.0)
    for schema_id in range(100, 100 + UNKNOWN_GRACE_IDS):
        client.errors = [_unknown()]
        with pytest.raises(SchemaNotKnownYet):
            registry.writer_schema(schema_id)
    client.errors = [_unknown()]
    with pytest.raises(KeyError):
        registry.writer_schema(999)
    clock.now += 30  # the graces ended: a new id gets its own
    client.errors = [_unknown()]
    with pytest.raises(SchemaNotKnownYet):
        registry.writer_schema(1000)


def test_an_id_in_its_grace_keeps_it_however_many_foreign_ids_come_after() -> None:
    """Review "diff58": the ids remembered were evicted least recently used first, those in
    their grace too: a stream of foreign ids cut an id's grace short (dead-lettered at
    15 s) or restarted it (held 60 s and more)."""
    client, clock = FakeClient([]), Clock()
    registry = Registry("http://unused", client=client, clock=clock, unknown_grace_s=30.0)
    client.errors = [_unknown()]
    with pytest.raises(SchemaNotKnownYet):
        registry.writer_schema(7)
    clock.now += 1
    for schema_id in range(1000, 1300):  # foreign: believed past the bound, remembered
        client.errors = [_unknown()]
        with pytest.raises((KeyError, SchemaNotKnownYet)):
            registry.writer_schema(schema_id)
    clock.now += 14
    client.errors = [_unknown()]
    with pytest.raises(SchemaNotKnownYet) as waited:
        registry.writer_schema(7)
    assert "15.0 s since it first said so" in str(waited.value)
    clock.now += 16
    client.errors = [_unknown()]
    with pytest.raises(KeyError):
        registry.writer_schema(7)


def test_an_id_far_beyond_those_the_registry_gave_is_believed_at_once() -> None:
    """Garbage after a zero byte (b"\\x00not avro": id 1,852,797,984) is a poison event, not
    a schema a lagging replica lacks: ids are issued in sequence. Held 30 s, every such
    event waited; believed at once, as before the grace. With no id known yet (a registry
    loading its store at the worker's start) every unknown id gets its grace."""
    from consumer.registry import UNKNOWN_ID_SPAN

    client, clock = FakeClient([_unknown()]), Clock()
    registry = Registry("http://unused", client=client, clock=clock, unknown_grace_s=30.0)
    with pytest.raises(SchemaNotKnownYet):
        registry.writer_schema(1_852_797_984)  # nothing known: maybe so
    assert registry.writer_schema(100_057) is not None
    assert registry.highest_known == 100_057
    client.errors = [_unknown()]
    with pytest.raises(KeyError):
        registry.writer_schema(100_057 + UNKNOWN_ID_SPAN + 1)
    client.errors = [_unknown()]
    with pytest.raises(SchemaNotKnownYet):
        registry.writer_schema(100_058)  # the next one: a replica may lack it


def test_tools_believe_an_unknown_id_at_once() -> None:
    """`replay` and `produce` build a Registry without a grace: an unknown id is the
    record's problem at once, not a registry that does not answer."""
    registry, _, _ = make([_unknown()])
    with pytest.raises(KeyError):
        registry.writer_schema(9)


def test_a_reference_the_registry_cannot_serve_now_is_an_outage() -> None:
    client = ReferencingClient({("ctx-value", 1): httpx.ConnectError("refused")})
    registry = Registry("http://unused", client=client)
    with pytest.raises(httpx.ConnectError):
        registry.writer_schema(5)
    assert not registry.healthy  # the events wait, readiness off
    client.versions[("ctx-value", 1)] = SchemaDoc(json.dumps(CONTEXT))
    assert registry.writer_schema(5)["name"] == "io.test.Ev"
    assert registry.healthy


def test_references_that_loop_or_do_not_parse_are_undecodable() -> None:
    from consumer.registry import Reference
    loop = ReferencingClient({("ctx-value", 1): SchemaDoc(
        json.dumps(CONTEXT), (Reference("io.test.Ctx", "ctx-value", 1),))})
    assert Registry("http://unused", client=loop).writer_schema(5)  # each version once
    broken = ReferencingClient({("ctx-value", 1): SchemaDoc("{not json")})
    with pytest.raises(UndecodableEvent, match=r"'io.test.Ctx' .ctx-value version 1., which "
                                               r"does not parse"):
        Registry("http://unused", client=broken).writer_schema(5)


class OneSchema:
    """A registry holding one writer schema (under any id)."""

    def __init__(self, schema: dict[str, Any]) -> None:
        self.text = json.dumps(schema)

    def get_schema(self, schema_id: int) -> SchemaDoc:
        return SchemaDoc(self.text)


def _evolved(*fields: dict[str, Any], **types: Any) -> dict[str, Any]:
    """The Signal schema with fields added and some fields' types replaced."""
    schema: dict[str, Any] = json.loads(SCHEMA_TEXT)
    schema["fields"] = [{**f, "type": types.get(f["name"], f["type"])}
                        for f in schema["fields"]] + list(fields)
    return schema


def _wire(schema: dict[str, Any], record: dict[str, Any], schema_id: int = 9) -> bytes:
    out = io.BytesIO()
    out.write(b"\0" + schema_id.to_bytes(4, "big"))
    fastavro.schemaless_writer(out, fastavro.parse_schema(copy.deepcopy(schema)), record)
    return out.getvalue()


def _record(schema: dict[str, Any], **values: Any) -> dict[str, Any]:
    return {f["name"]: values.get(f["name"], f.get("default")) for f in schema["fields"]}


def test_a_writer_annotating_ids_as_uuid_yields_strings() -> None:
    """A producer's `"logicalType": "uuid"` on userId/messageId, plus any other change: the
    ids came out as uuid.UUID, and every event was dropped as anonymous, its dedup lost."""
    from consumer.codec import decode

    uuid_string = ["null", {"type": "string", "logicalType": "uuid"}]
    writer = _evolved({"name": "producerVersion", "type": ["null", "string"], "default": None},
                      userId=uuid_string, messageId=uuid_string)
    registry = Registry("http://unused", client=OneSchema(writer))
    user, message = "6f1c2a9e-4b1d-4c3e-9a7b-2d5e8f0a1b2c", "0b9e1f6a-2c3d-4e5f-8a9b-1c2d3e4f5a6b"
    event = decode(_wire(writer, _record(writer, type="track", event="Feature Used",
                                         userId=user, messageId=message)),
                   registry.writer_schema)
    assert (event["userId"], event["messageId"]) == (user, message)
    assert type(event["userId"]) is str and type(event["messageId"]) is str


_DEEP_SCRIPT = r"""
import io, json, sys
import fastavro
from consumer.codec import SCHEMA_TEXT, decode
from consumer.errors import UndecodableEvent
from consumer.registry import Registry, SchemaDoc
schema = json.loads(SCHEMA_TEXT)
node = {"type": "record", "name": "Node",
        "fields": [{"name": "next", "type": ["null", "Node"], "default": None}]}
schema["fields"].append({"name": "trail", "type": ["null", node], "default": None})
class One:
    def get_schema(self, schema_id):
        return SchemaDoc(json.dumps(schema))
registry = Registry("http://unused", client=One())
record = {f["name"]: f.get("default") for f in schema["fields"]}
record.update(type="track", event="x", userId="u")
out = io.BytesIO()
out.write(b"\0" + (9).to_bytes(4, "big"))
fastavro.schemaless_writer(out, fastavro.parse_schema(schema), record)
# The last field is the trail: "not null" 100,000 times, then null (1 byte per level).
data = out.getvalue()[:-1] + b"\x02" * 100_000 + b"\x00"
short = out.getvalue()[:-1] + b"\x02" * 20 + b"\x00"
print(type(registry.writer_schema(9)).__name__, decode(short, registry.writer_schema)["userId"])
try:
    decode(data, registry.writer_schema)
except UndecodableEvent as exc:
    print("undecodable:", exc)
"""


def test_a_self_referencing_writer_schema_cannot_crash_the_process() -> None:
    """One 100 KB message nesting a recursive type 100,000 levels deep: fastavro's compiled
    reader recursed in C and the process died (SIGSEGV), on every restart. In a child
    process, so a crash fails this test instead of ending the test run."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", _DEEP_SCRIPT], cwd=root, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    lines = done.stdout.splitlines()
    assert lines[0] == "DeepSchema u"  # a shallow chain decodes
    assert lines[1].startswith("undecodable: not a Signal event in Avro: RecursionError")


def test_bytes_where_our_schema_has_strings_replace_invalid_utf8() -> None:
    """Avro promotes bytes to string, but fastavro's promotion decodes strictly: a producer
    declaring userId as bytes had each event with a cut multi-byte character dead-lettered
    (no replay could succeed), where a string field gets U+FFFD."""
    from consumer.codec import decode

    writer = _evolved({"name": "producerVersion", "type": ["null", "string"], "default": None},
                      userId=["null", "bytes"])
    for field in writer["fields"]:
        if field["name"] == "context":  # and one nested: context.page.url
            page = next(f for f in field["type"][1]["fields"] if f["name"] == "page")
            url = next(f for f in page["type"][1]["fields"] if f["name"] == "url")
            url["type"] = ["null", "bytes"]
    registry = Registry("http://unused", client=OneSchema(writer))
    record = _record(writer, type="track", event="Feature Used", userId=b"u-\xe9t\xe9",
                     context={**_record(next(f["type"][1] for f in writer["fields"]
                                             if f["name"] == "context")),
                              "page": {**_record(page["type"][1]), "url": b"https://x/\xe2\x82"}})
    event = decode(_wire(writer, record), registry.writer_schema)
    assert event["userId"] == "u-\ufffdt\ufffd"
    assert event["context"]["page"]["url"] == "https://x/\ufffd"
    fine = decode(_wire(writer, {**record, "userId": "u-été".encode()}), registry.writer_schema)
    assert fine["userId"] == "u-été"


def test_bytes_in_a_record_kept_in_a_subject_of_its_own_replace_invalid_utf8() -> None:
    """The rewrite covered only the writer's own document: a Context kept in its own
    subject (a Schema Registry reference) with `locale` as bytes was still read strictly."""
    import copy

    from consumer.codec import decode
    from consumer.registry import Reference

    full = json.loads(SCHEMA_TEXT)
    (index,) = [i for i, f in enumerate(full["fields"]) if f["name"] == "context"]
    context = copy.deepcopy(full["fields"][index]["type"][1])
    context["namespace"] = full["namespace"]
    for field in context["fields"]:
        if field["name"] == "locale":
            field["type"] = ["null", "bytes"]
    name = f"{full['namespace']}.Context"
    main = copy.deepcopy(full)
    main["fields"][index] = {**full["fields"][index], "type": ["null", name]}

    class Referencing:
        def get_schema(self, schema_id: int) -> SchemaDoc:
            return SchemaDoc(json.dumps(main), (Reference(name, "ctx-value", 1),))

        def get_version(self, subject: str, version: int) -> SchemaDoc:
            return SchemaDoc(json.dumps(context))

    registry = Registry("http://unused", client=Referencing())
    expanded = copy.deepcopy(full)
    expanded["fields"][index] = {**full["fields"][index], "type": ["null", context]}
    record = _record(expanded, type="track", event="Feature Used", userId="u1",
                     context={**_record(context), "locale": b"fr-\xe9"})
    event = decode(_wire(expanded, record), registry.writer_schema)
    assert event["context"]["locale"] == "fr-\ufffd"


class _DocClient:
    """Answers each get_schema with the next registry body (`SchemaDoc.of`)."""

    def __init__(self, *bodies: dict[str, Any]) -> None:
        self.bodies = list(bodies)

    def get_schema(self, schema_id: int) -> SchemaDoc:
        return SchemaDoc.of(self.bodies.pop(0))


def test_a_schema_answer_of_null_is_retried_not_remembered() -> None:
    """`{"schema": null}` read as the text "None", which does not parse: the id was refused
    for the life of the process (review "schema16")."""
    registry = Registry("http://unused", client=_DocClient({"schema": None},
                                                           {"schema": SCHEMA_TEXT}))
    with pytest.raises(ValueError, match="holds no schema"):
        registry.writer_schema(5)
    assert registry.writer_schema(5) == SCHEMA


class _RefClient:
    """The root schema names the context record, which a reference holds; each answer for
    the reference is the next body."""

    def __init__(self, *bodies: dict[str, Any]) -> None:
        self.bodies = list(bodies)
        root = json.loads(SCHEMA_TEXT)
        self.context = root["fields"][8]["type"][1]
        assert self.context["name"] == "Context", self.context
        root["fields"][8]["type"][1] = "io.datafly.signal.Context"
        self.root = json.dumps(root)

    def get_schema(self, schema_id: int) -> SchemaDoc:
        return SchemaDoc(self.root, (Reference("io.datafly.signal.Context", "ctx-value", 1),))

    def get_version(self, subject: str, version: int) -> SchemaDoc:
        body = self.bodies.pop(0)
        if body.get("schema") == "context":
            body = {**body, "schema": json.dumps(self.context)}
        return SchemaDoc.of(body)


def test_a_reference_answered_without_its_schema_is_retried_not_remembered() -> None:
    """Review "registry48": a reference's `{"schema": null}` was parsed as "", which does not
    parse: the id was refused, every event of it dead-lettered until a restart. The root's
    same answer was retried."""
    registry = Registry("http://unused", client=_RefClient({"schema": None},
                                                           {"schema": "context"}))
    with pytest.raises(ValueError, match=r"ctx-value version 1 .* holds no schema"):
        registry.writer_schema(9)
    assert registry.writer_schema(9) is not None


def test_a_reference_of_another_schema_type_is_refused_by_its_type() -> None:
    registry = Registry("http://unused", client=_RefClient(
        {"schema": "context", "schemaType": "PROTOBUF"}))
    with pytest.raises(UndecodableEvent, match=r"a PROTOBUF schema .*not Avro"):
        registry.writer_schema(9)


@pytest.mark.parametrize("body", [{"schema": "", "schemaType": "PROTOBUF"}, {"schema": ""},
                                  {"schema": "  \n"}])
def test_an_empty_schema_is_refused_for_good_not_retried(body: dict[str, Any]) -> None:
    """Apicurio stores `{"schema": ""}` and serves it on every call: read as "holds no
    schema" and retried, one such event stopped its partition for good (review "schema22").
    Empty text is the registry's word on the id: the event is dead-lettered."""
    registry = Registry("http://unused", client=_DocClient(body, {"schema": SCHEMA_TEXT}))
    with pytest.raises(UndecodableEvent, match="schema id 7 is"):
        registry.writer_schema(7)
    with pytest.raises(UndecodableEvent):
        registry.writer_schema(7)  # remembered: not asked again


def test_a_short_name_resolves_in_no_namespace_as_java_avro_does() -> None:
    """A namespaced record naming a null-namespace type by its short name: Java's Avro (the
    registry) takes it; fastavro looked only in the enclosing namespace, and every event
    was dead-lettered as "not an Avro schema" (review "schema22")."""
    schema = {"type": "record", "name": "A", "namespace": "com.acme", "fields": [
        {"name": "m", "type": {"type": "record", "name": "Meta", "namespace": "",
                               "fields": [{"name": "x", "type": "int"}]}},
        {"name": "n", "type": ["null", "Meta"]}]}
    registry = Registry("http://unused", client=_DocClient({"schema": json.dumps(schema)}))
    writer: Any = dict(registry.writer_schema(9))  # fastavro's writer takes a dict only
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, writer, {"m": {"x": 1}, "n": {"x": 2}})
    buf.seek(0)
    assert fastavro.schemaless_reader(buf, writer) == {"m": {"x": 1}, "n": {"x": 2}}
    unknown = {**schema, "fields": [{"name": "n", "type": ["null", "Nowhere"]}]}
    with pytest.raises(UndecodableEvent, match="UnknownType"):
        Registry("http://unused", client=_DocClient({"schema": json.dumps(unknown)})
                 ).writer_schema(10)


@pytest.mark.parametrize("kind", ["PROTOBUF", "JSON", "protobuf"])
def test_a_schema_of_another_type_is_refused_by_its_name(kind: str) -> None:
    registry = Registry("http://unused", client=_DocClient(
        {"schema": 'syntax = "proto3"; message M {}', "schemaType": kind}))
    with pytest.raises(UndecodableEvent, match=f"schema id 41 is a {kind.upper()} schema"):
        registry.writer_schema(41)


def test_a_writer_schema_with_defaults_not_matching_their_types_is_read() -> None:
    """Confluent's registry accepts them (default validation off); a writer's defaults play
    no part in reading, yet fastavro refused the schema and every event of that version was
    dead-lettered (review "schema16")."""
    schema = json.loads(SCHEMA_TEXT)
    schema["fields"].append({"name": "tags", "type": {"type": "array", "items": "string"},
                             "default": None})
    schema["fields"].append({"name": "n", "type": "int", "default": "0"})
    with pytest.raises(Exception, match="Default value"):
        fastavro.parse_schema(copy.deepcopy(schema))
    registry = Registry("http://unused", client=_DocClient({"schema": json.dumps(schema)}))
    writer: Any = registry.writer_schema(8)
    record = {"type": "track", "userId": "u1", "tags": ["a"], "n": 3}
    full = {f["name"]: record.get(f["name"]) for f in schema["fields"]}
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, writer, full)
    buf.seek(0)
    decoded: Any = fastavro.schemaless_reader(buf, writer, SCHEMA)
    assert decoded["userId"] == "u1"


def test_credentials_in_the_registry_url_never_reach_its_errors() -> None:
    """A gateway's 5xx page echoing the request showed `Authorization: Basic …` of the
    URL's user info in the ERROR line and /readyz (review "schema16")."""
    password = "UrlS3cretPw"
    basic = base64.b64encode(f"reguser:{password}".encode()).decode()

    class Echo:
        def get_schema(self, schema_id: int) -> str:
            raise RegistryError(502, None, f"Authorization: Basic {basic} ({password})")

    registry = Registry(f"http://reguser:{password}@registry.test", client=Echo())
    with pytest.raises(RegistryError):
        registry.writer_schema(3)
    problem = registry.problem()
    assert problem is not None and "Authorization: Basic" in problem
    assert basic not in problem and password not in problem


@pytest.mark.parametrize("slow", ["headers", "body"])
def test_a_trickled_answer_is_cut_at_the_timeout(slow: str) -> None:
    """httpx's timeout bounds each read: an answer sent a byte every 0.1 s, its headers or
    its body, never timed out (a minute with readiness on; the process could not exit)."""
    import time

    from tests.unit.test_cutoff import trickling

    body = json.dumps({"schema": SCHEMA_TEXT}).encode()
    head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))
    parts = (b"", head, body) if slow == "headers" else (head, body, b"")
    with trickling(*parts) as url:
        client = RestClient(url, timeout_s=0.5)
        started = time.monotonic()
        try:
            with pytest.raises(TimeoutError, match=r"took over 0\.5 s"):
                client.get_schema(1)
            assert time.monotonic() - started < 1.5
        finally:
            client.close()


def test_a_proxys_credentials_never_reach_the_problem_readiness_shows() -> None:
    """Review secrets18: a registry proxy refusing with a 407 page that echoes the request
    put `Proxy-Authorization: Basic …` into the log and /readyz."""
    pair = "rpuser:S3CR3T-PROXY-pw"
    basic = base64.b64encode(pair.encode()).decode()
    client = FakeClient([RegistryError(407, None, f"proxy refused: Proxy-Authorization: "
                                                  f"Basic {basic} ({pair})")])
    registry = Registry("http://unused", client=client, clock=Clock(),
                        proxy=f"http://{pair}@proxy.test:3128")
    with pytest.raises(RegistryError):
        registry.writer_schema(1)
    shown = registry.problem() or ""
    assert "schema registry does not answer" in shown
    assert basic not in shown and "S3CR3T-PROXY-pw" not in shown


def test_an_id_past_the_signed_range_is_unknown_without_a_request() -> None:
    """Garbage after a zero byte gives an id over 2**31 - 1, which Confluent's registry
    answers 404 without its "not found" code (an outage to the worker: the partition
    retried for ever, review "poison21"). Read signed, as Java does, it is negative:
    unknown at once."""
    value = b"\x00\x80\x00\x00\x01" + b"garbage"
    schema_id, _ = codec.split_wire(value)
    assert schema_id == -(2**31) + 1
    registry, client, _ = make([])
    with pytest.raises(KeyError):
        registry.writer_schema(schema_id)
    assert client.calls == 0
    assert registry.healthy


def _answer_once(raw: bytes, heads: list[bytes]) -> socket.socket:
    """A server on 127.0.0.1 that records one request's head and answers it with `raw`."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.recv(65536)
            heads.append(head)
            conn.sendall(raw)

    threading.Thread(target=serve, daemon=True).start()
    return listener


def test_a_registry_answer_is_read_only_up_to_its_limit_inflated_or_not() -> None:
    """Review http41: the answer was read whole and inflated as it came (httpx asked for
    gzip): 255 KB of gzip held 512 MB, the chart's memory limit, on every restart."""
    bomb = gzip.compress(b" " * (4 * MAX_ANSWER_BYTES), compresslevel=9)
    heads: list[bytes] = []
    listener = _answer_once(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                            b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n"
                            % len(bomb) + bomb, heads)
    client = RestClient(f"http://127.0.0.1:{listener.getsockname()[1]}", timeout_s=10.0)
    tracemalloc.start()
    try:
        with pytest.raises(RegistryUnusable, match=f"over {MAX_ANSWER_BYTES} bytes"):
            client.get_schema(1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        client.close()
        listener.close()
    assert peak < 3 * MAX_ANSWER_BYTES, f"held {peak / 2**20:.0f} MiB"
    assert b"accept-encoding: identity" in heads[0].lower()


def test_a_registry_redirect_names_where_it_points_without_its_credentials() -> None:
    """Review "registry58": a registry answering 308 (http → https) read "not a Schema
    Registry JSON answer", without the one thing that fixes it: where it points."""
    listener = _answer_once(b"HTTP/1.1 308 Permanent Redirect\r\nContent-Length: 0\r\n"
                            b"Location: https://u:S3CRET@registry.example:8443/subjects\r\n"
                            b"\r\n", [])
    client = RestClient(f"http://127.0.0.1:{listener.getsockname()[1]}", timeout_s=10.0)
    try:
        with pytest.raises(RegistryUnusable) as unusable:
            client.subjects()
    finally:
        client.close()
        listener.close()
    text = str(unusable.value)
    assert "redirects to https://registry.example:8443/subjects" in text, text
    assert "check SCHEMA_REGISTRY_URL" in text and "S3CRET" not in text


def test_a_compressed_registry_answer_within_the_limit_is_read() -> None:
    """A server that compresses although asked for `identity` is still understood."""
    doc = json.dumps({"schema": SCHEMA_TEXT}).encode()
    packed = gzip.compress(doc)
    heads: list[bytes] = []
    listener = _answer_once(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                            b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n"
                            % len(packed) + packed, heads)
    client = RestClient(f"http://127.0.0.1:{listener.getsockname()[1]}", timeout_s=10.0)
    try:
        assert client.get_schema(1).text == SCHEMA_TEXT
    finally:
        client.close()
        listener.close()


def test_a_registry_answer_nested_past_pythons_stack_is_not_a_registry() -> None:
    """A nested answer raised RecursionError out of the registry client, which callers
    do not expect (`check-config --online` printed a traceback)."""
    doc = b"[" * 100_000 + b"]" * 100_000
    listener = _answer_once(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                            b"Content-Length: %d\r\n\r\n" % len(doc) + doc, [])
    client = RestClient(f"http://127.0.0.1:{listener.getsockname()[1]}", timeout_s=10.0)
    try:
        with pytest.raises(RegistryUnusable, match="not a Schema Registry JSON answer"):
            client.subjects()
    finally:
        client.close()
        listener.close()


class _Docs:
    """A registry answering every id with one schema (and its referenced versions)."""

    def __init__(self, text: str, refs: tuple[Any, ...] = (),
                 versions: dict[tuple[str, int], SchemaDoc] | None = None) -> None:
        self.doc = SchemaDoc(text, refs)
        self.versions = versions or {}

    def get_schema(self, schema_id: int) -> SchemaDoc:
        return self.doc

    def get_version(self, subject: str, version: int) -> SchemaDoc:
        return self.versions[(subject, version)]


SIGNAL_EVENT = {"type": "track", "event": "Feature Used", "userId": "u1", "messageId": "m1",
                "properties": {"feature": "export_csv"},
                "context": {"consent": {"analytics": True}, "page": {"url": "https://x.test/"}}}


def _renamed(root: str | None = None, context: str | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(SCHEMA_TEXT)
    if root is not None:
        schema["name"] = root
    if context is not None:
        field = next(f for f in schema["fields"] if f["name"] == "context")
        field["type"][1]["name"] = context
    return schema


def _decoded(writer: dict[str, Any], registry: Registry) -> codec.Event:
    body = io.BytesIO()
    fastavro.schemaless_writer(body, fastavro.parse_schema(copy.deepcopy(writer)),
                               codec.to_record(SIGNAL_EVENT))
    return codec.decode(b"\x00\x00\x00\x00\x2a" + body.getvalue(), registry.writer_schema)


@pytest.mark.parametrize("writer", [
    _renamed(root="TrackEvent"),  # TopicRecordNameStrategy: a record type per event type
    _renamed(root="io.other.TrackEvent"),
    _renamed(context="SignalContext"),
    _renamed(root="TrackEvent", context="io.other.SignalContext"),
], ids=["root", "root in another namespace", "context", "both"])
def test_an_event_whose_records_have_other_names_is_read_as_ours(
        writer: dict[str, Any]) -> None:
    """Review schemas41: Avro (Java's Resolver, the registry's) matches records by their
    fields whatever they are called; fastavro compares names, and every event of such a
    producer was dead-lettered, for good."""
    ours = codec.decode(codec.encode(1, codec.to_record(SIGNAL_EVENT)), lambda _id: SCHEMA)
    event = _decoded(writer, Registry("http://unused", client=_Docs(json.dumps(writer))))
    assert dict(event) == dict(ours)


def test_a_union_of_records_per_event_type_is_read_as_ours() -> None:
    """Several event types on one topic, the writer's root a union of records of their
    own names (Confluent's multi-type topics): each branch is read as ours (review
    "diff41")."""
    track_event = _renamed(root="TrackEvent")
    identify_event = copy.deepcopy(track_event)
    identify_event["name"] = "IdentifyEvent"
    # The second branch reuses the first's named records by name, as a union must.
    for field in identify_event["fields"]:
        if field["name"] == "context":
            field["type"] = ["null", "io.datafly.signal.Context"]
    writer = [track_event, identify_event]
    registry = Registry("http://unused", client=_Docs(json.dumps(writer)))
    ours = codec.decode(codec.encode(1, codec.to_record(SIGNAL_EVENT)), lambda _id: SCHEMA)
    for branch in (0, 1):
        body = io.BytesIO()
        fastavro.schemaless_writer(body, fastavro.parse_schema(copy.deepcopy(writer)),
                                   (f"io.datafly.signal.{writer[branch]['name']}",
                                    codec.to_record(SIGNAL_EVENT)))
        event = codec.decode(b"\x00\x00\x00\x00\x2a" + body.getvalue(),
                             registry.writer_schema)
        assert dict(event) == dict(ours), branch


def test_a_renamed_writer_that_refers_to_itself_is_read_as_ours() -> None:
    """The pure-Python reader's path (`DeepSchema`) takes the renamed reader too."""
    writer = _renamed(root="TrackEvent")
    writer["fields"].append({"name": "previous", "type": ["null", "TrackEvent"],
                             "default": None})
    registry = Registry("http://unused", client=_Docs(json.dumps(writer)))
    assert isinstance(registry.writer_schema(42), codec.DeepSchema)
    ours = codec.decode(codec.encode(1, codec.to_record(SIGNAL_EVENT)), lambda _id: SCHEMA)
    assert dict(_decoded(writer, registry)) == dict(ours)


def test_a_union_root_whose_record_refers_to_itself_is_read_as_ours() -> None:
    """Made a `DeepSchema` (a dict) of a list, it raised outside the schema's checks and was
    retried as a registry outage, for ever: its partition stalled (review "diff41b")."""
    track_event = _renamed(root="TrackEvent")
    track_event["fields"].append({"name": "previous", "type": ["null", "TrackEvent"],
                                  "default": None})
    writer: list[Any] = ["null", track_event]
    registry = Registry("http://unused", client=_Docs(json.dumps(writer)))
    assert isinstance(registry.writer_schema(42), codec.DeepUnion)
    body = io.BytesIO()
    fastavro.schemaless_writer(body, fastavro.parse_schema(copy.deepcopy(writer)),
                               ("io.datafly.signal.TrackEvent", codec.to_record(SIGNAL_EVENT)))
    ours = codec.decode(codec.encode(1, codec.to_record(SIGNAL_EVENT)), lambda _id: SCHEMA)
    event = codec.decode(b"\x00\x00\x00\x00\x2a" + body.getvalue(), registry.writer_schema)
    assert dict(event) == dict(ours)


def test_a_renamed_record_kept_in_a_subject_of_its_own_is_read_as_ours() -> None:
    from consumer.registry import Reference

    whole = _renamed(root="TrackEvent", context="io.other.Ctx")
    field = next(f for f in whole["fields"] if f["name"] == "context")
    context = {**field["type"][1], "namespace": "io.other", "name": "Ctx"}
    main = copy.deepcopy(whole)
    next(f for f in main["fields"] if f["name"] == "context")["type"][1] = "io.other.Ctx"
    client = _Docs(json.dumps(main), (Reference("io.other.Ctx", "ctx-value", 1),),
                   {("ctx-value", 1): SchemaDoc(json.dumps(context))})
    ours = codec.decode(codec.encode(1, codec.to_record(SIGNAL_EVENT)), lambda _id: SCHEMA)
    assert dict(_decoded(whole, Registry("http://unused", client=client))) == dict(ours)


def test_a_record_without_our_fields_is_still_undecodable_whatever_its_name() -> None:
    """Matched by fields, a record lacking our required `type` is not a Signal event."""
    other = {"type": "record", "name": "Order", "fields": [{"name": "id", "type": "string"}]}
    registry = Registry("http://unused", client=_Docs(json.dumps(other)))
    body = io.BytesIO()
    fastavro.schemaless_writer(body, fastavro.parse_schema(other), {"id": "o1"})
    with pytest.raises(UndecodableEvent, match="not a Signal event"):
        codec.decode(b"\x00\x00\x00\x00\x2a" + body.getvalue(), registry.writer_schema)


_SPIN = textwrap.dedent(r"""
    import io, json, sys
    import fastavro
    from consumer.codec import SCHEMA, SCHEMA_TEXT, DeepSchema, decode
    from consumer.errors import UndecodableEvent
    from consumer.registry import Registry

    items = json.loads(sys.argv[1])
    writer = json.loads(SCHEMA_TEXT)
    writer["fields"].append({"name": "coords", "type": {"type": "array", "items": items},
                             "default": []})

    class One:  # the registry's answer for id 1
        def get_schema(self, schema_id):
            return json.dumps(writer)

    registry = Registry("http://unused", client=One())
    assert isinstance(registry.writer_schema(1), DeepSchema)
    record = {f["name"]: None for f in json.loads(SCHEMA_TEXT)["fields"]}
    record["type"] = "track"
    body = io.BytesIO()
    fastavro.schemaless_writer(body, SCHEMA, record)
    n = 2**62
    n = (n << 1) ^ (n >> 63)
    count = bytearray()
    while True:
        b = n & 0x7f
        n >>= 7
        count.append(b | 0x80 if n else b)
        if not n:
            break
    try:
        decode(b"\x00\x00\x00\x00\x01" + body.getvalue() + bytes(count), registry.writer_schema)
    except UndecodableEvent as exc:
        print("dead-lettered:", exc)
""")


@pytest.mark.parametrize("items", ['"boolean"', '"float"', '"double"',
                                   '{"type": "fixed", "name": "F4", "size": 4}',
                                   '{"type": "record", "name": "P", "fields": ['
                                   '{"name": "x", "type": "double"}, '
                                   '{"name": "y", "type": "float"}]}'])
def test_a_32_byte_event_declaring_2_62_fixed_width_items_is_dead_lettered_not_spun(
        items: str) -> None:
    """Review "big43": `coords: array<double>` added to the writer's schema (an ordinary
    evolution) is a field ours lacks, which fastavro's compiled reader skips item by item
    without reading a byte: 2^62 items declared by a 32-byte event spun in C with the GIL
    held (no health answers, no SIGTERM), on every replica that took the partition. Such
    schemas are read by the pure-Python reader, which meets the message's end at once."""
    try:
        done = subprocess.run([sys.executable, "-c", _SPIN, items], timeout=60,
                              capture_output=True, text=True, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"one 32-byte event of array<{items}> held the process for over 60 s")
    assert done.returncode == 0, done.stderr
    assert "dead-lettered:" in done.stdout, done.stdout


class EventTypesClient:
    """Confluent's several event types on one topic: schema 42 is a union of references
    (or one bare name), each type under a subject of its own."""

    def __init__(self, root: Any) -> None:
        from consumer.registry import Reference

        self.root = root
        self.refs = (Reference("io.datafly.signal.TrackEvent", "track-value", 1),
                     Reference("io.datafly.signal.IdentifyEvent", "identify-value", 1))

    @staticmethod
    def event_type(name: str) -> dict[str, Any]:
        schema: dict[str, Any] = json.loads(SCHEMA_TEXT)
        schema["name"] = name
        return schema

    def get_schema(self, schema_id: int) -> SchemaDoc:
        return SchemaDoc(json.dumps(self.root), self.refs)

    def get_version(self, subject: str, version: int) -> SchemaDoc:
        name = "TrackEvent" if subject == "track-value" else "IdentifyEvent"
        return SchemaDoc(json.dumps(self.event_type(name)))


def _union_wire(branch: int, name: str, event: dict[str, Any]) -> bytes:
    out = io.BytesIO()
    out.write(b"\0\0\0\0\x2a" + bytes([branch * 2]))  # the union's branch, zig-zag
    fastavro.schemaless_writer(out, fastavro.parse_schema(EventTypesClient.event_type(name)),
                               codec.to_record(event))
    return out.getvalue()


def test_a_union_root_of_referenced_event_types_is_read() -> None:
    """Review schema44: fastavro parsed the root again without the references, raised
    UnknownType, and the handler retried it as a registry outage for ever: the partition
    stalled with the registry healthy and readiness on."""
    registry = Registry("http://unused", client=EventTypesClient(
        ["io.datafly.signal.TrackEvent", "io.datafly.signal.IdentifyEvent"]))
    track = {"type": "track", "event": "Feature Used", "userId": "u1", "messageId": "m1",
             "properties": {"feature": "export_csv"}}
    identify = {"type": "identify", "userId": "u2", "messageId": "m2",
                "traits": {"plan": "pro"}}
    got = codec.decode(_union_wire(0, "TrackEvent", track), registry.writer_schema)
    assert (got["type"], got["userId"], got["event"]) == ("track", "u1", "Feature Used")
    got = codec.decode(_union_wire(1, "IdentifyEvent", identify), registry.writer_schema)
    assert (got["type"], got["userId"]) == ("identify", "u2")
    assert registry.healthy


def test_a_root_that_only_names_a_referenced_type_is_read() -> None:
    registry = Registry("http://unused", client=EventTypesClient("io.datafly.signal.TrackEvent"))
    track = {"type": "track", "event": "Feature Used", "userId": "u1", "messageId": "m1"}
    data = _union_wire(0, "TrackEvent", track)
    data = data[:5] + data[6:]  # no union branch: the record alone
    assert codec.decode(data, registry.writer_schema)["userId"] == "u1"


def test_a_surprise_while_preparing_a_writer_schemas_reader_dead_letters(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever fails once the registry answered is the schema's, never an outage: retried
    as one, its events held their partitions for ever (review "schema44")."""
    from consumer import registry as module

    def broken(*_args: Any) -> None:
        raise RuntimeError("a fastavro surprise")

    monkeypatch.setattr(module, "free_items", broken)
    registry = Registry("http://unused", client=OneSchema(_evolved({"name": "x", "type":
                                                                     "int", "default": 0})))
    for _ in range(2):
        with pytest.raises(UndecodableEvent, match="a fastavro surprise"):
            registry.writer_schema(7)
    assert registry.healthy


def test_writer_schemas_kept_are_bounded_least_recently_used_first() -> None:
    """Review "bounds49": every schema id read was kept parsed for the life of the process
    (~64 KB for a 10 KB schema), and ids producers register at will grew a worker to its
    memory limit. Past SCHEMA_CACHE_MAX the least recently used goes, and is fetched again
    when it comes back."""
    from consumer.registry import SCHEMA_CACHE_MAX

    registry, client, _ = make([])
    for schema_id in range(1, SCHEMA_CACHE_MAX + 1):
        registry.writer_schema(schema_id)
    assert registry.cached(1) is not None  # used: the least recently used is now 2
    registry.writer_schema(SCHEMA_CACHE_MAX + 1)
    assert registry.cached(2) is None and registry.cached(1) is not None
    assert len(registry._parsed) == SCHEMA_CACHE_MAX
    calls = client.calls
    registry.writer_schema(2)
    assert client.calls == calls + 1 and registry.cached(2) is not None


def test_ids_refused_are_bounded_too() -> None:
    from consumer.registry import SCHEMA_CACHE_MAX

    class NotAvro(FakeClient):
        def get_schema(self, schema_id: int) -> str:
            self.calls += 1
            return "{not json"

    registry = Registry("http://unused", client=NotAvro([]))
    for schema_id in range(1, SCHEMA_CACHE_MAX + 50):
        with pytest.raises(UndecodableEvent):
            registry.writer_schema(schema_id)
    assert len(registry._unusable) == SCHEMA_CACHE_MAX


def test_writer_schemas_kept_are_bounded_by_their_size_too(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Review "diff49b": a count alone either let large schemas through or, set low enough
    for them, thrashed at 257 ids in use. Schemas of another shape than ours weigh their
    JSON; ours, shared by every id that has it, nothing."""
    import consumer.registry as registry_module

    def variant(i: int) -> str:
        schema = json.loads(SCHEMA_TEXT)
        schema["fields"].append({"name": f"extra_{i}", "type": ["null", "string"],
                                 "default": None})
        return json.dumps(schema)

    class Variants(FakeClient):
        def get_schema(self, schema_id: int) -> str:
            self.calls += 1
            return variant(schema_id) if schema_id < 1000 else SCHEMA_TEXT

    registry = Registry("http://unused", client=Variants([]))
    registry.writer_schema(1)
    weight = registry._weight
    assert weight >= len(variant(1)) // 2
    monkeypatch.setattr(registry_module, "SCHEMA_CACHE_CHARS", 5 * weight + weight // 2)
    for schema_id in range(2, 21):
        registry.writer_schema(schema_id)
    kept = [i for i in range(1, 21) if registry.cached(i) is not None]
    assert kept == [16, 17, 18, 19, 20] and registry.evictions == 15
    for schema_id in range(1000, 1100):  # ours: weightless, nothing let go
        registry.writer_schema(schema_id)
    assert registry.evictions == 15 and registry.cached(20) is not None
    # ... nor for the size bound, least recently used as they may be (review "diff49c":
    # ours went first, freeing nothing, and were fetched again)
    again = Registry("http://unused", client=Variants([]))
    for schema_id in [*range(1000, 1100), *range(1, 21)]:
        again.writer_schema(schema_id)
    assert all(again.cached(i) is not None for i in range(1000, 1100))
    assert [i for i in range(1, 21) if again.cached(i) is not None] == [16, 17, 18, 19, 20]
    assert again.evictions == 15
