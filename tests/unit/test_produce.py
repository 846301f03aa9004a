"""Unit tests for consumer.produce: all-or-nothing validation of JSON lines."""

from __future__ import annotations

import json
from typing import Any

import pytest

from consumer import codec
from consumer.produce import ProduceError, encode_lines, notes, parse_lines

GOOD = json.dumps({"type": "track", "event": "Feature Used", "userId": "user_001",
                   "anonymousId": "anon_1", "properties": {"feature": "export_csv"}})
ANON = json.dumps({"type": "page", "anonymousId": "anon_2"})
NO_ID = json.dumps({"type": "track", "event": "E"})


def test_good_lines_are_parsed_with_their_numbers_and_keys() -> None:
    parsed = parse_lines([GOOD, "", "  \n", ANON, NO_ID])
    assert [p.line for p in parsed] == [1, 4, 5]
    assert [p.key for p in parsed] == [b"user_001", b"anon_2", None]
    assert parsed[0].event == json.loads(GOOD)
    assert parsed[0].record == codec.to_record(json.loads(GOOD))


@pytest.mark.parametrize("blank", ["", "  ", "\u200b", "\t"])
def test_a_blank_user_id_keys_by_the_anonymous_id(blank: str) -> None:
    """Review cli40: a blank userId is no user (the worker drops such an event as
    anonymous); keyed "  ", the visitor's events spread over partitions."""
    line = json.dumps({"type": "track", "event": "E", "userId": blank, "anonymousId": "a1"})
    (parsed,) = parse_lines([line])
    assert parsed.key == b"a1"


def test_bad_lines_are_named_and_nothing_is_accepted() -> None:
    lines = [GOOD, "{not json", GOOD, json.dumps({"type": "track", "evnt": "x"}),
             json.dumps({"type": 5}), json.dumps([1, 2])]
    with pytest.raises(ProduceError) as info:
        parse_lines(lines, source="events.jsonl")
    text = str(info.value)
    assert text.startswith("4 invalid line(s); nothing was sent:")
    assert "events.jsonl:2: not JSON" in text
    assert "events.jsonl:4: unknown field(s) evnt" in text
    assert "events.jsonl:5: type must be" in text
    assert "events.jsonl:6: an event must be a JSON object" in text
    assert "events.jsonl:1:" not in text
    assert "events.jsonl:3:" not in text


def test_what_the_worker_drops_or_leaves_out_is_sent_with_a_note_not_refused() -> None:
    """Review "mapping22": a Segment-style line (integrations, channel, ...) or a screen or
    alias event refused the whole file, while `explain` said "deliver" for the first and
    `run` drops the second as unsupported_type. Sent now, with a note each."""
    segment = json.dumps({**json.loads(GOOD), "integrations": {"All": True}, "channel": "web"})
    screen = json.dumps({"type": "screen", "name": "Home", "userId": "u1"})
    parsed = parse_lines([GOOD, segment, screen, screen])
    assert [p.line for p in parsed] == [1, 2, 3, 4]
    assert "integrations" not in codec.to_record(parsed[1].event)
    assert parsed[1].record == codec.to_record(json.loads(GOOD))
    assert parsed[2].record["type"] == "screen"
    assert notes(parsed) == [
        "field 'channel' (first on line 2) is not used by the worker: left out",
        "field 'integrations' (first on line 2) is not used by the worker: left out",
        "type 'screen' (first on line 3) is sent, and the worker drops it as "
        "unsupported_type",
    ]
    assert notes(parse_lines([GOOD])) == []


def test_many_bad_lines_are_summarised() -> None:
    with pytest.raises(ProduceError) as info:
        parse_lines(["nope"] * 25)
    text = str(info.value)
    assert text.startswith("25 invalid line(s)")
    assert "<stdin>:20: not JSON" in text
    assert "<stdin>:21:" not in text
    assert text.endswith("... and 5 more")


def test_empty_input_is_no_events() -> None:
    assert parse_lines([]) == []
    assert parse_lines(["", "\n"]) == []


def test_encode_lines_gives_wire_format_that_decodes_back() -> None:
    parsed = parse_lines([GOOD, ANON])
    encoded = list(encode_lines(parsed, schema_id=42))
    assert [key for key, _ in encoded] == [b"user_001", b"anon_2"]
    for (_, value), item in zip(encoded, parsed, strict=True):
        assert codec.split_wire(value)[0] == 42
        assert codec.decode(value, lambda _id: codec.SCHEMA) == item.event


def test_parse_lines_reports_bad_bytes_and_deep_nesting_by_line() -> None:
    from consumer.produce import ProduceError, parse_lines

    good = b'{"type":"track","event":"E","userId":"u"}'
    with pytest.raises(ProduceError) as info:
        parse_lines([good, b"\xff\xfe", b"[" * 100000 + b"]" * 100000, good], "f.jsonl")
    text = str(info.value)
    assert "2 invalid line(s); nothing was sent" in text
    assert "f.jsonl:2: not UTF-8 text" in text
    assert "f.jsonl:3: JSON nested deeper than 200 levels" in text


@pytest.mark.parametrize("depth", [201, 900, 5000])
def test_deep_json_is_refused_the_same_whatever_the_interpreter_parses(depth: int) -> None:
    """Review "py312": 3.13's JSON decoder parses 5,000 levels where 3.11's raised
    RecursionError: the message depended on the interpreter. The depth is checked on the
    value (201 and 900 levels parse everywhere)."""
    from consumer.config import load_settings
    from consumer.explain import explain_lines
    from consumer.produce import ProduceError, parse_lines

    line = ('{"type":"track","event":"E","userId":"u","properties":{"a":'
            + "[" * depth + "]" * depth + "}}").encode()
    with pytest.raises(ProduceError, match=r"f\.jsonl:1: JSON nested deeper than 200 levels"):
        parse_lines([line], "f.jsonl")
    (doc,) = explain_lines([line], load_settings({}, offline=True, check_clients=False))
    assert doc["reason"] == "invalid event: JSON nested deeper than 200 levels", doc
    # A field of 200 levels (the properties object and 199 lists) is one the worker takes.
    fits = ('{"type":"track","event":"E","userId":"u","properties":{"a":'
            + "[" * 199 + "]" * 199 + "}}").encode()
    assert len(parse_lines([fits], "f.jsonl")) == 1
    (doc,) = explain_lines([fits], load_settings({}, offline=True, check_clients=False))
    assert doc["decision"] != "dead_letter", doc


def test_a_refused_registration_is_one_redacted_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """Review secrets18: a registry refusing the registration (401, a 500 echoing the
    request) was an uncaught traceback quoting its Authorization header."""
    import base64

    from consumer import reach
    from consumer.produce import produce_events
    from consumer.registry import Registry, RegistryError

    basic = base64.b64encode(b"reguser:S3CR3T-REG-pw").decode()

    def refuse(self: Registry, topic: str) -> int:
        raise RegistryError(401, 40101, f"denied for Authorization: Basic {basic}")

    monkeypatch.setattr(reach, "services", lambda *a, **k: [])
    monkeypatch.setattr(Registry, "register", refuse)
    line = json.dumps({"type": "track", "event": "E", "userId": "u"})
    with pytest.raises(ProduceError) as refused:
        produce_events([line], topic="t", bootstrap="k:9092",
                       registry_url="http://reguser:S3CR3T-REG-pw@registry.test/apis")
    assert "refused to register the schema of 't'" in str(refused.value)
    assert basic not in str(refused.value) and "S3CR3T-REG-pw" not in str(refused.value)


def test_a_registry_failing_to_register_is_not_said_to_refuse(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Review "registry58": a registry electing its primary (Karapace: 500, error 50003)
    read "refused to register the schema", sending users to their schema."""
    from consumer import reach
    from consumer.produce import produce_events
    from consumer.registry import Registry, RegistryError

    def fail(self: Registry, topic: str) -> int:
        raise RegistryError(500, 50003, "Error while forwarding the request to the master")

    monkeypatch.setattr(reach, "services", lambda *a, **k: [])
    monkeypatch.setattr(Registry, "register", fail)
    line = json.dumps({"type": "track", "event": "E", "userId": "u"})
    with pytest.raises(ProduceError) as failed:
        produce_events([line], topic="t", bootstrap="k:9092", registry_url="http://r.test")
    text = str(failed.value)
    assert "failed to register the schema of 't'" in text and "try again" in text, text
    assert "refused" not in text and "50003" in text


def test_a_lone_surrogate_in_the_anonymous_id_is_keyed_as_the_record_carries_it() -> None:
    """The key was the input's own id, encoded only while producing: a lone surrogate
    (what a browser sends for an emoji cut in half) crashed the command with a traceback
    after every earlier line was sent (review "seed23")."""
    line = '{"type": "track", "event": "Feature Used", "anonymousId": "abc\\ud83d"}'
    (parsed,) = parse_lines([line])
    assert parsed.key == "abc\ufffd".encode()
    ((key, value),) = list(encode_lines([parsed], 7))
    assert key == parsed.key
    decoded = codec.decode(value, lambda _id: codec.SCHEMA)
    assert decoded["anonymousId"] == "abc\ufffd"


def test_a_lone_surrogate_in_a_user_id_refuses_the_file() -> None:
    """Review "ids47": replaced, two users cut alike became one (README, Strings)."""
    lines = ['{"type": "track", "event": "Feature Used", "userId": "alice\\ud83d"}',
             '{"type": "track", "event": "Feature Used", "userId": "alice\\ud83e"}']
    with pytest.raises(ProduceError) as refused:
        parse_lines(lines)
    assert "<stdin>:1: userId holds a lone UTF-16 surrogate" in str(refused.value)
    assert "<stdin>:2: userId holds a lone UTF-16 surrogate" in str(refused.value)


def test_an_integer_past_4300_digits_is_sent_as_explain_and_run_take_it() -> None:
    """produce refused it as "not JSON" while explain and run deliver the event with the
    field left out (review "seed23")."""
    line = ('{"type": "track", "event": "Feature Used", "userId": "u1", '
            f'"properties": {{"ok": 1, "huge": {"9" * 5000}}}}}')
    (parsed,) = parse_lines([line])
    ((_, value),) = list(encode_lines([parsed], 7))
    decoded = codec.decode(value, lambda _id: codec.SCHEMA)
    assert decoded["properties"]["ok"] == 1


def test_librdkafka_speaks_through_the_logging_setup_unless_the_caller_chose(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Review newcomer24: the demo printed librdkafka's raw "%4|…|GETPID" lines (a producer
    without `logger` writes to stderr itself)."""
    import logging

    from consumer import reach
    from consumer.produce import ProduceError, produce_events

    seen: list[dict[str, object]] = []

    def services(conf: dict[str, object], *_a: object, **_k: object) -> list[str]:
        seen.append(conf)
        return ["stop here"]

    monkeypatch.setattr(reach, "services", services)
    mine = logging.getLogger("mine")
    for extra in (None, {"logger": mine}):
        with pytest.raises(ProduceError):
            produce_events([], topic="t", bootstrap="k:9092", registry_url="http://r",
                           extra_conf=extra)
    assert isinstance(seen[0]["logger"], logging.Logger) and seen[0]["logger"] is not mine
    assert seen[1]["logger"] is mine


def test_a_record_over_the_producers_limit_is_named_before_anything_is_sent() -> None:
    """Review "events28": the size was not validated; the lines before a 1.1 MB one went."""
    from consumer.produce import RECORD_OVERHEAD_BYTES, check_sizes

    parsed = parse_lines([GOOD, GOOD, GOOD])
    limit = 10_000
    fits = limit - RECORD_OVERHEAD_BYTES - len(b"user_001")
    records = [(b"user_001", b"v" * fits), (b"user_001", b"v" * (fits + 1)), (None, b"v")]
    with pytest.raises(ProduceError) as info:
        check_sizes(parsed, records, limit, "f.jsonl")
    text = str(info.value)
    assert text.startswith("1 line(s) too large; nothing was sent")
    assert "f.jsonl:2:" in text and "f.jsonl:1:" not in text and "f.jsonl:3:" not in text
    check_sizes(parsed, [records[0], records[2], records[2]], limit, "f.jsonl")


def _registry_failing_registration(mode: str) -> str:
    """A registry that answers the start-up probe, then fails the registration itself:
    the connection dropped, a stalled POST, or a 200 without an id."""
    import http.server
    import threading
    import time

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *_args: object) -> None:
            pass

        def _json(self, body: bytes) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            self._json(b"[]")

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            if mode == "drop":
                self.close_connection = True
                self.connection.shutdown(2)
                return
            if mode == "stall":
                time.sleep(4)
            self._json(b'{"message": "ok"}')

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_port}"


@pytest.mark.parametrize("mode", ["drop", "stall", "no-id"])
def test_a_registration_that_fails_is_one_line_within_the_timeout(
        mode: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Review reg44: only the registry's refusals were caught; a dropped connection, a
    stalled POST (after the client's default 5 s, not --timeout) and a 200 without an id
    escaped `produce` as tracebacks."""
    import time

    from consumer import reach
    from consumer.__main__ import main

    monkeypatch.setattr(reach, "kafka", lambda *_a, **_k: None)  # Kafka answers
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1")
    monkeypatch.setenv("SCHEMA_REGISTRY_URL", _registry_failing_registration(mode))
    events = tmp_path / "e.jsonl"
    events.write_text(json.dumps({"type": "track", "event": "E", "userId": "u"}) + "\n")
    started = time.monotonic()
    code = main(["produce", "--topic", "t", "--file", str(events), "--timeout", "1"])
    took = time.monotonic() - started
    assert code == 1 and took < 3.0, (code, took)
    err = capsys.readouterr().err
    # One line (review diff44: the worker's readiness line came beside it).
    assert "nothing was sent" in err and "Traceback" not in err and "readiness" not in err


def test_a_bad_lines_field_names_are_escaped_in_the_refusal() -> None:
    """Review "logsec52": an unknown key holding a line break or a terminal's escape was
    printed as it is (`explain` shows the same line escaped)."""
    with pytest.raises(ProduceError) as info:
        parse_lines([json.dumps({"type": "track", "FORGED\n\x1b[2J\u202ekey": 1})])
    text = str(info.value)
    assert "\x1b" not in text and "\u202e" not in text
    assert "FORGED\\n\\x1b[2J\\u202ekey" in text
