"""The command line: check-config and explain, without services."""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest

from consumer.__main__ import main
from tests.conftest import hang_up_as_default


def only(env: dict[str, str]) -> dict[str, str]:
    """This process's environment without the worker's settings, plus ``env``."""
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("USERPILOT_", "KAFKA_", "SCHEMA_REGISTRY", "WORKER_"))}
    return {**clean, **env}


def cli(argv: list[str], env: dict[str, str], stdin: bytes = b"",
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run `python -m consumer ...` as a subprocess with only ``env`` configured."""
    proc = subprocess.run([sys.executable, "-m", "consumer", *argv], input=stdin,
                          env=only(env), capture_output=True, timeout=timeout,
                          check=False)
    return subprocess.CompletedProcess(proc.args, proc.returncode,
                                       proc.stdout.decode("utf-8", "replace"),
                                       proc.stderr.decode("utf-8", "replace"))

GOOD = {
    "USERPILOT_API_KEY": "wt-secret-123",
    "USERPILOT_ANALYTICS_ENDPOINT": "analytex-eu.userpilot.io",
    "KAFKA_BOOTSTRAP_SERVERS": "kafka:9092",
    "KAFKA_TOPICS": "delivery-userpilot",
    "KAFKA_SASL_PASSWORD": "kafka-secret-456",
    "SCHEMA_REGISTRY_URL": "http://user:reg-secret-789@registry:8081",
}


def _env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for name in list(__import__("os").environ):
        if name.startswith(("USERPILOT_", "KAFKA_", "SCHEMA_REGISTRY", "WORKER_")):
            monkeypatch.delenv(name, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def test_check_config_prints_the_effective_configuration_without_secrets(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    _env(monkeypatch, GOOD)
    assert main(["check-config"]) == 0
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert doc["userpilot"]["track_url"] == "https://analytex-eu.userpilot.io/v1/track"
    assert doc["kafka"]["dlq_topic"] == "delivery-userpilot.userpilot.dlq"
    assert doc["kafka"]["extra"]["sasl.password"] == "***"
    for secret in ("wt-secret-123", "kafka-secret-456", "reg-secret-789"):
        assert secret not in out + err
    assert "configuration OK" in err


def test_check_config_lists_every_problem_and_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    _env(monkeypatch, {**GOOD, "USERPILOT_ANALYTICS_ENDPOINT": "https://analytex.userpilot.io/v1",
                       "WORKER_MAX_IN_FLIGHT": "lots", "KAFKA_TOPICS": ""})
    assert main(["check-config"]) == 2
    _, err = capsys.readouterr()
    assert "enter the host only, e.g. 'analytex.userpilot.io'" in err
    assert "WORKER_MAX_IN_FLIGHT='lots' is not a whole number" in err
    assert "KAFKA_TOPICS is not set" in err
    assert "wt-secret-123" not in err


def test_explain_needs_no_connection_settings_and_redacts_the_token() -> None:
    event = {"type": "track", "event": "Feature Used", "userId": "user_001",
             "properties": {"feature": "export_csv", "feature_id": "feat_017",
                            "context": "reports_dashboard"},
             "context": {"consent": {"analytics": True}}, "messageId": "m-1"}
    anonymous = {**event, "userId": None, "messageId": "m-2"}
    result = cli(["explain"], {"USERPILOT_API_KEY": "wt-secret-123"},
                 (json.dumps(event) + "\n" + json.dumps(anonymous) + "\nnot json\n").encode())
    assert result.returncode == 1  # one line is not valid
    lines = [json.loads(x) for x in result.stdout.splitlines()]
    assert lines[0]["decision"] == "deliver"
    assert lines[0]["request"]["headers"]["Authorization"] == "Token ***"
    assert lines[0]["request"]["body"] == {
        "user_id": "user_001", "event_name": "feature_used",
        "metadata": {"feature": "export_csv", "feature_id": "feat_017",
                     "context": "reports_dashboard"}}
    assert lines[1] == {"line": 2, "event": "Feature Used", "messageId": "m-2",
                        "decision": "drop", "reason": "anonymous"}
    assert lines[2]["decision"] == "dead_letter" and lines[2]["line"] == 3
    assert "wt-secret-123" not in result.stdout + result.stderr


ISSUE_EXAMPLE = (
    b'{"type":"track","event":"Feature Used","userId":"u1","properties":{"n":"\\ud83d"},'
    b'"context":{"consent":{"analytics":true}}}\n'
)


def test_explain_the_lone_surrogate_from_the_issue_is_delivered_replaced() -> None:
    result = cli(["explain"], {}, ISSUE_EXAMPLE)
    assert result.returncode == 0, result.stderr
    (doc,) = [json.loads(x) for x in result.stdout.splitlines()]
    assert doc["decision"] == "deliver"
    assert doc["request"]["body"]["metadata"] == {"n": "\ufffd"}
    assert doc["replaced_surrogates"] == 1


@pytest.mark.parametrize(("data", "fragment"), [
    (b"\xef\xbb\xbf" + ISSUE_EXAMPLE, "byte order mark"),
    (b"\xff\xfe{}\n", "not UTF-8"),
    (b"[" * 5000 + b"]" * 5000 + b"\n", "nested deeper"),
    (b'{"type":"track","event":"Feature Used","userId":"u","properties":{"a":'
     + b"[" * 300 + b"]" * 300 + b'},"context":{"consent":{"analytics":true}}}\n',
     "nested deeper"),
    (b'{"type":"track","bogus":1}\n', "bogus"),
    (b"\x00\x01\n", "not JSON"),
    (b'{"type":"track","\\ud800":1}\n', "unknown field"),
])
def test_explain_bad_lines_are_one_line_each_and_later_lines_still_explained(
    data: bytes, fragment: str,
) -> None:
    result = cli(["explain"], {}, data + ISSUE_EXAMPLE)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    first, second = (json.loads(x) for x in result.stdout.splitlines())
    assert first["line"] == 1 and first["decision"] == "dead_letter"
    assert fragment in first["reason"]
    assert second["line"] == 2 and second["decision"] == "deliver"


def test_explain_reads_lines_as_produce_does() -> None:
    """Review cli40: lines ended by a lone carriage return were two events to `produce`
    and one bad line to `explain`, which gates what `produce` sends."""
    event = ISSUE_EXAMPLE.rstrip(b"\n")
    result = cli(["explain"], {}, event + b"\r" + event + b"\r\n\r\n" + event)
    assert result.returncode == 0, result.stdout
    docs = [json.loads(x) for x in result.stdout.splitlines()]
    assert [(d["line"], d["decision"]) for d in docs] == [
        (1, "deliver"), (2, "deliver"), (4, "deliver")]


def test_explain_ignores_common_envelope_fields() -> None:
    event = (b'{"type":"track","event":"Feature Used","userId":"u","channel":"server",'
             b'"integrations":{"All":true},"originalTimestamp":"2024-01-01T00:00:00Z",'
             b'"version":2,"context":{"consent":{"analytics":true}}}\n')
    result = cli(["explain"], {}, event)
    assert result.returncode == 0, result.stdout
    (doc,) = [json.loads(x) for x in result.stdout.splitlines()]
    assert doc["decision"] == "deliver"
    assert doc["ignored"] == ["channel", "integrations", "originalTimestamp", "version"]


@pytest.mark.parametrize("path", ["/nonexistent/events.jsonl", "/"])
def test_explain_unreadable_file_is_one_line(path: str) -> None:
    result = cli(["explain", "--file", path], {})
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"error: {path}:")


# ------------------------------------------------------------- check-config refuses what run does

RUN_ENV = {"USERPILOT_API_KEY": "wt-secret-123",
           "USERPILOT_ANALYTICS_ENDPOINT": "analytex.userpilot.io",
           "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1", "KAFKA_TOPICS": "t",
           "SCHEMA_REGISTRY_URL": "http://127.0.0.1:1", "WORKER_METRICS_PORT": "0"}

REFUSED = [
    ({"KAFKA_TOPIC": "t"}, "did you mean KAFKA_TOPICS?"),
    ({"KAFKA_SESSION_TIMEOUT_MS": "soon"}, "session.timeout.ms"),
    ({"KAFKA_ACKS": "1"}, "acks"),
    ({"KAFKA_ENABLE_AUTO_COMMIT": "true"}, "manages itself"),
    ({"USERPILOT_CONSENT_CATEGORIES": "none,analytics"}, "alone disables"),
    ({"USERPILOT_CONSENT_CATEGORIES": "analytcs"}, "did you mean analytics?"),
    ({"USERPILOT_API_TOKEN": "x"}, "did you mean USERPILOT_API_KEY?"),
    ({"WORKER_MAX_INFLIGHT": "5"}, "did you mean WORKER_MAX_IN_FLIGHT?"),
    ({"USERPILOT_API_KEY": "wt_é"}, "cannot be sent in an HTTP header"),
    ({"USERPILOT_API_KEY_FILE": "/nonexistent"}, "keep one"),
    ({"USERPILOT_MAX_METADATA_BYTES": "10"}, "out of range"),
    ({"USERPILOT_MAPPINGS_FILE": "/nonexistent.json"}, "USERPILOT_MAPPINGS_FILE"),
]


@pytest.mark.parametrize(("over", "fragment"), REFUSED)
def test_check_config_refuses_what_run_refuses(over: dict[str, str], fragment: str) -> None:
    """Each setting that stops `run` at start-up stops `check-config` with the same line."""
    checked = cli(["check-config"], {**RUN_ENV, **over})
    ran = cli(["run"], {**RUN_ENV, **over})
    assert checked.returncode == ran.returncode == 2, (checked.stderr, ran.stderr)
    assert fragment in checked.stderr
    assert checked.stderr.strip() == ran.stderr.strip()
    assert "Traceback" not in checked.stderr + ran.stderr
    assert "wt-secret-123" not in checked.stderr + ran.stderr


def test_check_config_notes_ignored_kafka_tooling_variables() -> None:
    result = cli(["check-config"], {**RUN_ENV, "KAFKA_OPTS": "-Xmx1g",
                                    "KAFKA_HEAP_OPTS": "-Xms1g"})
    assert result.returncode == 0, result.stderr
    assert "note: KAFKA_OPTS ignored" in result.stderr
    assert json.loads(result.stdout)["kafka"]["extra"] == {}


def test_run_logs_the_notes_check_config_prints() -> None:
    """`run` dropped ignored variables without a line: the operator never learned why."""
    result = cli(["run", "--timeout", "0.5", "--wait", "0"], {**RUN_ENV, "KAFKA_OPTS": "-Xmx1g"})
    assert "KAFKA_OPTS ignored: a variable of Kafka's JVM tools" in result.stderr


def test_mappings_preset_is_case_insensitive(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_text('{"preset": "Default", "events": {"Order Completed": "order_completed"}}')
    result = cli(["check-config"], {**RUN_ENV, "USERPILOT_MAPPINGS_FILE": str(path)})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["mappings"]["events"]["preset"] == "default"


def test_explain_never_prints_a_traceback_on_random_input() -> None:
    import random

    rng = random.Random(10)
    pieces = [b"{", b"}", b"[", b"]", b'"', b"\\u", b"d800", b":", b",", b"null", b"1e999",
              b'"type"', b'"track"', b'"userId"', b'"properties"', b"\xff", b"\xef\xbb\xbf",
              b"NaN", b"-", b"0", b"\t", b"\x00"]
    lines = [b"".join(rng.choice(pieces) for _ in range(rng.randrange(1, 40)))
             for _ in range(400)]
    lines += [b'{"type":"track","event":"Feature Used","userId":"u","properties":'
              + b"".join(rng.choice(pieces) for _ in range(30)) + b"}" for _ in range(100)]
    result = cli(["explain"], {}, b"\n".join(lines) + b"\n")
    assert result.returncode in (0, 1)
    assert result.stderr == ""
    numbers = [json.loads(x)["line"] for x in result.stdout.splitlines()]
    assert numbers == sorted(numbers) and len(numbers) > 400


# ---------------------------------------------- commands against unreachable services

@pytest.mark.parametrize("argv", [
    ["run", "--timeout", "1", "--wait", "0"],
    ["replay", "--from", "dlq", "--timeout", "1"],
    ["demo", "--timeout", "1"],
])
def test_unreachable_services_are_one_line_within_the_timeout(argv: list[str]) -> None:
    """Kafka (and the registry) refuse connections: a line per service, exit 1, in bounded
    time (`--timeout` per service, plus start-up), never a traceback or the token."""
    started = time.monotonic()
    result = cli(argv, RUN_ENV, timeout=30)
    took = time.monotonic() - started
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    # `run` serves its probes while it checks (a log line says so), then the errors.
    lines = [line for line in result.stderr.strip().splitlines()
             if "consumer.health: serving /metrics" not in line]
    assert lines and all(line.startswith("error: ") for line in lines), result.stderr
    assert any("Kafka at 127.0.0.1:1 not reachable" in line for line in lines)
    assert "wt-secret-123" not in result.stderr + result.stdout
    assert took < 15


@pytest.mark.parametrize("argv", [["run", "--timeout", "1", "--wait", "0"],
                                  ["replay", "--from", "dlq", "--timeout", "1"]])
def test_with_json_logs_a_command_says_why_it_stopped_in_json(argv: list[str]) -> None:
    """Review "ops31": with WORKER_LOG_FORMAT=json the fatal reason was the one plain-text
    line, which a log shipper reading JSON lines dropped or mangled (`replay` too, review
    "ops36")."""
    result = cli(argv, {**RUN_ENV, "WORKER_LOG_FORMAT": "json"}, timeout=30)
    assert result.returncode == 1, result.stderr
    docs = [json.loads(line) for line in result.stderr.strip().splitlines()]
    assert any(d["level"] == "error" and "Kafka at 127.0.0.1:1 not reachable" in d["message"]
               for d in docs), result.stderr
    assert "wt-secret-123" not in result.stderr


def test_help_of_run_replay_and_demo_states_the_bound() -> None:
    for command in ("replay", "demo"):
        result = cli([command, "--help"], {})
        assert result.returncode == 0
        assert "one line within --timeout" in " ".join(result.stdout.split()), command
    text = " ".join(cli(["run", "--help"], {}).stdout.split())
    assert "for up to --wait seconds, then exits 1" in text
    assert "0: exit 1 at once" in text


# ---------------------------------------------- the garbage collector of `run`

_RUN_WITH_A_FAKE_WORKER = """
import gc
import consumer.health, consumer.reach, consumer.worker
seen = {}
class Worker:
    kafka_abandoned = False
    fatal = None
    def __init__(self, *args, **kwargs): pass
    def stop(self): pass
    async def run(self):
        seen["frozen"], seen["young"] = gc.get_freeze_count(), gc.get_threshold()[0]
        return 0
class Server:
    def close(self): pass
consumer.reach.services = lambda *args, **kwargs: []
consumer.reach.topic_notes = lambda *args, **kwargs: []  # no Kafka here: 20 s of tries
consumer.health.serve = lambda *args, **kwargs: Server()
consumer.worker.Worker = Worker
from consumer.__main__ import main
code = main(["run"])
print(code, seen["frozen"], seen["young"])
"""


def test_run_freezes_start_up_objects_and_collects_the_young_generation_less_often() -> None:
    """`run` hands the event loop a collector set for a worker (`tune_collector`): what
    start-up made is frozen, and the youngest generation waits for GC_YOUNG_THRESHOLD."""
    from consumer.__main__ import GC_YOUNG_THRESHOLD

    proc = subprocess.run([sys.executable, "-c", _RUN_WITH_A_FAKE_WORKER],
                          env=only(RUN_ENV), capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    code, frozen, young = map(int, proc.stdout.split())
    assert code == 0
    assert frozen > 10_000  # the modules and settings of start-up
    assert young == GC_YOUNG_THRESHOLD > 700


def test_run_with_its_metrics_port_taken_says_so_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """It ended in an OSError traceback; Kafka and the registry answered (stubbed here)."""
    import signal
    import socket

    from consumer import reach

    taken = socket.socket()
    taken.bind(("0.0.0.0", 0))
    taken.listen()
    port = taken.getsockname()[1]
    monkeypatch.setattr(reach, "services", lambda *a, **k: [])
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # keep pytest's own handlers
    _env(monkeypatch, {**GOOD, "WORKER_METRICS_PORT": str(port)})
    try:
        assert main(["run"]) == 2
    finally:
        taken.close()
    err = capsys.readouterr().err
    assert f"WORKER_METRICS_PORT={port}: cannot listen" in err and "choose a free port" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("command", [["run"], ["replay", "--from", "dlq", "--all", "--dry-run"]])
def test_kafkas_refusal_quoting_another_party_is_one_escaped_line(
    command: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """Reviews "logsec52", "diff52a": librdkafka quotes an OIDC endpoint's error body in
    its refusal, and `run` and `replay` printed its line breaks and a terminal's escapes as
    they were: a forged `error:` line."""
    from consumer import reach

    said = "Kafka refused: token: denied\nerror: FORGED\x1b[2J\x1b]0;PWNED\x07"
    monkeypatch.setattr(reach, "services", lambda *a, **k: [said])
    monkeypatch.setattr(reach, "kafka", lambda *a, **k: said)
    _env(monkeypatch, GOOD)
    assert main(command) == 1
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if "denied" in line]
    assert "\x1b" not in err and "\x07" not in err
    assert line.endswith("denied\\nerror: FORGED\\x1b[2J\\x1b]0;PWNED\\x07")
    assert not any(line.startswith("error: FORGED") for line in err.splitlines())


def test_the_guard_hold_keeps_the_process_alive_unready_then_ends() -> None:
    """Exiting at once left the guard's gauge at 1 for ~0.2 s: no scrape saw it."""
    from consumer.__main__ import hold_after_guard
    from consumer.health import Health

    health = Health(max_silence_s=0.2)
    started = time.monotonic()
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        assert hold_after_guard(health, 0.6, beat_s=0.05)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    assert time.monotonic() - started >= 0.6
    assert health.alive()  # it kept beating: liveness does not restart it mid-hold
    assert health.ready() == (False, "stopped by the DLQ guard (too many dead letters); "
                                     "see the logs")
    assert hold_after_guard(health, 0)


def test_a_sigterm_ends_the_guard_hold_at_once() -> None:
    from consumer.__main__ import hold_after_guard
    from consumer.health import Health

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM))
    started = time.monotonic()
    try:
        timer.start()
        assert not hold_after_guard(Health(), 30.0)
    finally:
        timer.cancel()
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    assert time.monotonic() - started < 5.0


@pytest.mark.parametrize("command", [["run"], ["check-config", "--online"], ["replay"],
                                     ["produce", "--file", "-"], ["demo"]])
@pytest.mark.parametrize(("value", "fragment"), [("-1", "above 0"), ("0", "above 0"),
                                                 ("soon", "not a number of seconds")])
def test_a_timeout_must_be_seconds_above_zero(command: list[str], value: str, fragment: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """`run --timeout -1` with Kafka down hung silently (librdkafka's -1 is "forever");
    `--timeout 0` reported a running registry as unreachable."""
    from consumer.__main__ import build_parser

    with pytest.raises(SystemExit) as exited:
        build_parser("python -m consumer").parse_args([*command, "--timeout", value])
    assert exited.value.code == 2
    assert fragment in capsys.readouterr().err


def test_online_lines_mask_the_credentials_of_every_proxy_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """Review "secrets55": librdkafka's OIDC request went through `http_proxy` (a proxy the
    worker itself uses for nothing: Userpilot and the registry bypass it), which answered
    407 echoing the request; `check-config --online` printed its Basic credentials, and
    `run`'s lines did too. Every proxy variable's credentials are masked, in every line."""
    import base64

    from consumer import reach

    basic = base64.b64encode(b"puser:PROXYPASS-SECRET-a6d7").decode()
    _env(monkeypatch, {**GOOD, "SCHEMA_REGISTRY_URL": "https://registry:8081",
                       "http_proxy": "http://puser:PROXYPASS-SECRET-a6d7@proxy:3128"})
    monkeypatch.setattr(reach, "userpilot", lambda settings, timeout: None)
    monkeypatch.setattr(reach, "registry", lambda *args: None)
    monkeypatch.setattr(reach, "kafka", lambda *args: (
        f"OIDC token endpoint said: Proxy-Authorization: Basic {basic} (password "
        "PROXYPASS-SECRET-a6d7)"))
    assert main(["check-config", "--online"]) == 10
    err = capsys.readouterr().err
    assert "online FAILED: kafka: OIDC token endpoint said" in err
    assert basic not in err and "PROXYPASS-SECRET-a6d7" not in err


def test_check_config_writes_to_an_ascii_stdout() -> None:
    """A non-ASCII value on a stdout that cannot encode it: a traceback and exit 1
    (review config19); `run` started with the same settings."""
    result = cli(["check-config"], {**GOOD, "KAFKA_CLIENT_ID": "cfg19-ü",
                                    "PYTHONIOENCODING": "ascii"})
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert json.loads(result.stdout)["kafka"]["extra"]["client.id"] == "cfg19-ü"


def _started(proc: subprocess.Popen[bytes], settle_s: float) -> None:
    """Wait until the child's `main` has begun (its SIGTERM handler is installed by its
    first line), then `settle_s` more. A fixed 3 s sleep missed it on a loaded machine,
    where imports alone took longer (review "flaky57": 143 and a KeyboardInterrupt
    traceback, 1 run in 10)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
        except OSError:
            break
        caught = next(line for line in status.splitlines() if line.startswith("SigCgt:"))
        if int(caught.split()[1], 16) & (1 << (signal.SIGTERM - 1)):
            break
        time.sleep(0.05)
    time.sleep(settle_s)


def test_ctrl_c_while_run_waits_for_kafka_exits_130_without_a_traceback() -> None:
    """Review diff22b: `run` now waits for an unreachable Kafka (for ever by default), and
    Ctrl-C there printed a KeyboardInterrupt traceback."""
    env = only({**GOOD, "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1", "WORKER_METRICS_PORT": "0"})
    proc = subprocess.Popen([sys.executable, "-m", "consumer", "run", "--timeout", "1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _started(proc, 3.0)  # past the first check, in the wait or the next check
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=15)
    finally:
        proc.kill()
        _, err = proc.communicate()
    assert code == 128 + signal.SIGINT, (code, err.decode()[-2000:])
    assert b"Traceback" not in err and b"KeyboardInterrupt" not in err


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_during_replays_reach_check_stops_it_at_once(sig: int, code: int) -> None:
    """The check asked librdkafka for the metadata in one call of the whole `--timeout`,
    and Python runs a signal's handler only between such calls: Ctrl-C waited the timeout
    out, then printed a KeyboardInterrupt traceback (review "replay26")."""
    env = only({"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"})
    proc = subprocess.Popen([sys.executable, "-m", "consumer", "replay", "--from", "t.dlq",
                             "--timeout", "30"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _started(proc, 1.0)  # imports done, in the reach check
        assert proc.poll() is None
        started = time.monotonic()
        proc.send_signal(sig)
        got = proc.wait(timeout=25)
    finally:
        proc.kill()
        _, err = proc.communicate()
    assert got == code, (got, err.decode()[-2000:])
    assert time.monotonic() - started < 10  # 0.5 s here; was the rest of the 30 s
    assert b"Traceback" not in err and b"KeyboardInterrupt" not in err


def test_a_sigterm_while_run_starts_stops_it() -> None:
    """As PID 1 of a container a signal without a handler is ignored: a pod deleted while
    the worker started ran on until SIGKILL (review helm19). The handler is there from the
    first line of `main` (here: during the start-up reach check of an unreachable Kafka)."""
    env = only({**GOOD, "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1", "WORKER_METRICS_PORT": "0"})
    proc = subprocess.Popen([sys.executable, "-m", "consumer", "run", "--timeout", "20"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _started(proc, 1.0)  # imports done, in the reach check
        assert proc.poll() is None
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=15)
    finally:
        proc.kill()
        proc.communicate()
    # Not -15: a handler ran. Exit 0: the probes answer from the start, so this is how
    # Kubernetes stops a pod that has not reached Kafka yet, a clean stop.
    assert code == 0, code
    assert time.monotonic() - started < 12


def test_start_up_waits_while_services_are_unreachable_and_says_so_unready() -> None:
    """A pod started during a Kafka or registry outage exited 1 (Kubernetes restarted it
    minutes apart). Unreachable services are tried again, /readyz naming them; a setting
    to fix ends the wait at once; `--wait` bounds it."""
    from consumer.__main__ import wait_for_services
    from consumer.health import Health
    from consumer.reach import Unreachable

    health = Health()
    health.set_connected(True)
    health.set_assigned(True)
    said: list[tuple[bool, str]] = []
    answers: list[list[str]] = [[Unreachable("Kafka at k:9092 not reachable")],
                                [Unreachable("schema registry at r not reachable")], []]

    def check() -> list[str]:
        said.append(health.ready())
        return answers.pop(0)

    assert wait_for_services(check, math.inf, health, first_delay_s=0.01) == []
    assert [ready for ready, _ in said] == [True, False, False]
    assert said[1][1] == "waiting: Kafka at k:9092 not reachable"
    assert health.ready() == (True, "ready")

    setting = ["Kafka at k:9092 has no topic 'x'"]
    calls: list[int] = []

    def missing_topic() -> list[str]:
        calls.append(1)
        return setting

    assert wait_for_services(missing_topic, math.inf, health, first_delay_s=0.01) == setting
    assert calls == [1]  # not tried again: a topic to create, not an outage

    down: list[str] = [Unreachable("Kafka at k:9092 not reachable")]
    started = time.monotonic()
    assert wait_for_services(lambda: down, 0.3, health, first_delay_s=0.05) == down
    assert 0.25 <= time.monotonic() - started < 2.0
    assert wait_for_services(lambda: down, 0, health) == down


def test_produce_uses_the_flags_it_validated(monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    """`--schema-registry-url " http://…"` was checked stripped and used as given: the
    HTTP client refused it as an unsupported protocol (review config25)."""
    import consumer.produce

    got: dict[str, object] = {}

    def fake(lines: object, **kwargs: object) -> int:
        got.update(kwargs)
        return 0

    monkeypatch.setattr(consumer.produce, "produce_events", fake)
    for name in [k for k in os.environ if k.startswith(("KAFKA_", "SCHEMA_REGISTRY"))]:
        monkeypatch.delenv(name)
    events = tmp_path / "e.jsonl"
    events.write_text('{"type":"track","event":"Feature Used","userId":"u"}\n')
    assert main(["produce", "--topic", "t", "--file", str(events),
                 "--bootstrap-servers", " kafka:9092 ",
                 "--schema-registry-url", " http://registry:8081 "]) == 0
    assert (got["bootstrap"], got["registry_url"]) == ("kafka:9092", "http://registry:8081")


@pytest.mark.parametrize("flag", ["--bootstrap-servers", "--schema-registry-url"])
def test_produce_refuses_a_blank_flag_instead_of_a_placeholder(flag: str) -> None:
    """Review "config48": a blank flag passed the "needs" check and fell through to the
    offline placeholders: "Kafka at unused:9092 not reachable"."""
    result = cli(["produce", "--topic", "t", "--file", "-", flag, " "],
                 {"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",
                  "SCHEMA_REGISTRY_URL": "http://127.0.0.1:1"}, stdin=b"")
    assert result.returncode == 2, result.stderr
    assert f"{flag} is blank" in result.stderr and "unused" not in result.stderr


def test_demo_with_an_events_file_it_cannot_read_says_so_before_creating_anything() -> None:
    """A traceback after it had created a topic (review config25)."""
    result = cli(["demo", "--events", "/nonexistent/events.jsonl"], {})
    assert result.returncode == 1, result.stderr
    assert "/nonexistent/events.jsonl: cannot read the file" in result.stderr
    assert "Traceback" not in result.stderr


def test_demo_installed_without_kafka_says_what_to_set_in_one_line(tmp_path: Path) -> None:
    """Installed (a wheel, the image), the package has no services/ctl.py beside it: the
    demo without KAFKA_BOOTSTRAP_SERVERS was a CalledProcessError traceback, and its default
    events file was looked for in site-packages, not in the image's /app/schemas (review
    "sandbox45")."""
    import shutil

    repo = Path(__file__).resolve().parents[2]
    site = tmp_path / "site-packages"
    shutil.copytree(repo / "consumer", site / "consumer",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "schemas").mkdir()
    shutil.copy(repo / "schemas" / "sample-events.jsonl", tmp_path / "schemas")
    proc = subprocess.run([sys.executable, "-m", "consumer", "demo"], cwd=tmp_path,
                          env={**only({}), "PYTHONPATH": str(site)}, capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: demo not started: set KAFKA_BOOTSTRAP_SERVERS and SCHEMA_REGISTRY_URL (only "
        "a checkout of the repository starts Kafka and the registry itself, `make demo`)"]


@pytest.mark.parametrize("content", [b"\xff\xfe{}\n", b"{bad\n", b"\n\n"])
def test_demo_with_events_it_cannot_send_says_so_before_creating_anything(
        content: bytes, tmp_path: Path) -> None:
    """Bytes that are not UTF-8 were a traceback, invalid JSON a clean error, both after a
    topic was created and left behind (review diff25); no services are needed to refuse."""
    events = tmp_path / "events.jsonl"
    events.write_bytes(content)
    result = cli(["demo", "--events", str(events)], {})
    assert result.returncode == 1, result.stderr
    assert ("error: demo not started: 1 invalid line(s)" in result.stderr
            or "holds no events" in result.stderr), result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_sigterm_whose_exit_was_swallowed_still_stops_the_worker_before_it_runs(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The start-up SIGTERM raises SystemExit from its handler; landing in a callback the
    interpreter calls from C (a weakref's: "Exception ignored") it was lost, and the worker
    joined its group and ran on (seen once under load). The signal is remembered: the worker
    is stopped before it runs, and a wait for the services ends."""
    from consumer import __main__ as entry
    from consumer import worker as worker_module
    from consumer.reach import Unreachable

    monkeypatch.setattr(entry, "STOP_ASKED", [])

    class Ref:
        pass

    import weakref

    def swallowed(_ref: object) -> None:
        entry._stopped(signal.SIGTERM, None)

    obj = Ref()
    keep = weakref.ref(obj, swallowed)
    del obj  # the callback's SystemExit is "ignored", as a signal landing there was
    assert keep() is None and entry.STOP_ASKED == [signal.SIGTERM]

    stops: list[bool] = []

    class FakeWorker:
        signalled = False
        kafka_abandoned = False
        fatal = None

        def __init__(self, *_: object) -> None:
            pass

        def stop(self, *, signalled: bool = False) -> None:
            stops.append(signalled)

        async def run(self) -> int:
            return 0 if stops else 1

    monkeypatch.setattr(worker_module, "Worker", FakeWorker)
    monkeypatch.setattr(entry, "tune_collector", lambda: None)
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        assert entry._run_worker(cast(Any, None), cast(Any, None), cast(Any, None)) == 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert stops == [True]
    class Beating:
        def beat(self) -> None:
            pass

        def set_waiting(self, _why: str | None) -> None:
            pass

    with pytest.raises(SystemExit) as stopped:
        entry.wait_for_services(lambda: [Unreachable("kafka down")], 60.0,
                                cast(Any, Beating()))
    assert stopped.value.code == 0


def test_a_sigterm_landing_while_the_worker_builds_its_kafka_clients_is_a_clean_stop(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The start-up handler's SystemExit, raised inside the Kafka client's C code, came out
    as a TypeError of that code's own: exit 1 and a traceback for a SIGTERM (CI, round 41,
    `test_sigterm_as_soon_as_the_probes_answer_is_a_clean_exit`)."""
    from consumer import __main__ as entry
    from consumer import worker as worker_module

    monkeypatch.setattr(entry, "STOP_ASKED", [])

    signalled = [True]

    def building(*_: object) -> None:
        if signalled:
            entry.STOP_ASKED.append(signal.SIGTERM)  # the handler ran ...
        raise TypeError("expected configuration property name as type unicode string")

    monkeypatch.setattr(worker_module, "Worker", building)
    assert entry._run_worker(cast(Any, None), cast(Any, None), cast(Any, None)) == 0
    monkeypatch.setattr(entry, "STOP_ASKED", [])  # ... and without a stop asked: a crash
    signalled.clear()
    with pytest.raises(TypeError):
        entry._run_worker(cast(Any, None), cast(Any, None), cast(Any, None))


@pytest.mark.parametrize(("topic", "why"), [
    ("", "not a legal topic name"), ("bad/topic", "not a legal topic name"),
    ("__consumer_offsets", "one of Kafka's own internal topics")])
def test_produce_refuses_a_topic_it_cannot_write_before_registering_anything(
        topic: str, why: str) -> None:
    """Review config35: Kafka refused it only after the schema was registered under the bad
    name's subject (`-value`, `bad/topic-value`)."""
    result = cli(["produce", "--topic", topic, "--bootstrap-servers", "127.0.0.1:1",
                  "--schema-registry-url", "http://127.0.0.1:1"], {})
    assert result.returncode == 2, result.stderr
    assert f"--topic {topic!r}, " in result.stderr and why in result.stderr


def test_a_refused_setting_is_one_json_line_when_the_logs_are_json() -> None:
    """Review config35: with WORKER_LOG_FORMAT=json, the refusal (the only record of why the
    pod crash-loops) was plain text a log shipper could not parse."""
    result = cli(["run"], {"WORKER_LOG_FORMAT": "json", "USERPILOT_RATE_LIMIT": "abc"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    record = json.loads(lines[0])
    assert record["level"] == "error" and "USERPILOT_RATE_LIMIT='abc'" in record["message"]
    plain = cli(["run"], {"USERPILOT_RATE_LIMIT": "abc"})
    assert plain.stderr.startswith("error: invalid configuration:")


def test_the_command_line_does_not_load_the_sandbox_server() -> None:
    """`run` builds every subcommand's options, the sandbox's included; the sandbox's server,
    client and their imports are loaded only by the commands that use them (~0.7 MB of RSS
    at import). The package's names still resolve on first use."""
    probe = ("import json, sys, consumer.__main__ as m; m.build_parser(); "
             "print(json.dumps([n for n in sys.modules if n.startswith('consumer.sandbox.')])); "
             "from consumer.sandbox import SandboxThread; print(SandboxThread.__module__)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, timeout=60).stdout.splitlines()
    loaded = json.loads(out[0])
    assert "consumer.sandbox.server" not in loaded and "consumer.sandbox.client" not in loaded
    assert out[1] == "consumer.sandbox.server"


def _closed_stdout(argv: list[str], env: dict[str, str], stdin: bytes = b""
                   ) -> subprocess.CompletedProcess[str]:
    """`python -m consumer argv` with a stdout whose reader is already gone (`| true`)."""
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([sys.executable, "-m", "consumer", *argv], env=only(env),
                              stdout=write, stderr=subprocess.PIPE, input=stdin,
                              timeout=60, check=False)
    finally:
        os.close(write)
    return subprocess.CompletedProcess(proc.args, proc.returncode, "",
                                       proc.stderr.decode("utf-8", "replace"))


def test_a_closed_stdout_is_not_a_failure_of_check_config_or_delete_users() -> None:
    """The work was done (a valid configuration; every user deleted): a BrokenPipeError
    traceback and exit 1 (or 120) said otherwise (review "cli42")."""
    checked = _closed_stdout(["check-config"], GOOD)
    assert checked.returncode == 0 and "Traceback" not in checked.stderr, checked.stderr
    listed = _closed_stdout(["delete-users", "--dry-run"], GOOD, stdin=b"u1\nu2\n")
    assert listed.returncode == 0 and "Traceback" not in listed.stderr, listed.stderr


@pytest.mark.parametrize(("argv", "says", "code"), [
    (["explain"], "stdin: cannot read the file (standard input is closed)", 1),
    (["produce", "--topic", "t", "--bootstrap-servers", "127.0.0.1:1",
      "--schema-registry-url", "http://127.0.0.1:1"],
     "stdin: cannot read the file (standard input is closed)", 1),
    (["delete-users", "--dry-run"], "cannot read user ids from stdin: it is closed", 2)])
def test_a_closed_stdin_is_a_clear_error(argv: list[str], says: str, code: int) -> None:
    """`explain <&-`: `sys.stdin` is None, an AttributeError's traceback (round 42's note);
    `delete-users` a TypeError's."""
    proc = subprocess.run([sys.executable, "-m", "consumer", *argv], env=only(GOOD),
                          capture_output=True, timeout=60, check=False,
                          preexec_fn=lambda: os.close(0))
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == code and "Traceback" not in err, err
    assert says in err, err


def test_the_main_help_and_the_demo_summary_write_to_an_ascii_stdout() -> None:
    """`python -m consumer --help` on an ASCII stdout: UnicodeEncodeError on its `→`, exit 1
    (review "cli42"); the demo's summary (`—`) goes through the same writer."""
    helped = cli(["--help"], {"PYTHONIOENCODING": "ascii"})
    assert helped.returncode == 0 and "Traceback" not in helped.stderr, helped.stderr
    from consumer.stdout import write_line

    class Ascii(io.StringIO):
        encoding = "ascii"

        def write(self, text: str) -> int:
            text.encode("ascii")  # as an ASCII stdout does
            return super().write(text)

    out = Ascii()
    assert write_line("demo \u2014 topic", out)
    assert out.getvalue() == "demo \\u2014 topic\n"


@pytest.mark.parametrize(("flag", "text"), [("--since", "0001-01-01T00:00:00+14:00"),
                                            ("--until", "9999-12-31T23:59:59-23:00")])
def test_a_time_outside_the_calendar_in_utc_is_a_usage_error(
        flag: str, text: str, capsys: pytest.CaptureFixture[str]) -> None:
    """It passed parsing and raised OverflowError once Kafka had answered (review
    "cli42")."""
    from consumer.__main__ import build_parser

    with pytest.raises(SystemExit) as exited:
        build_parser("python -m consumer").parse_args(["replay", "--from", "d", flag, text])
    assert exited.value.code == 2
    assert "outside the years 0001-9999 in UTC" in capsys.readouterr().err


def test_until_the_last_day_is_the_end_of_time() -> None:
    from consumer.__main__ import build_parser
    from consumer.replay import Filters, default_group

    args = build_parser("python -m consumer").parse_args(
        ["replay", "--from", "d", "--until", "9999-12-31"])
    assert args.until == datetime.max.replace(tzinfo=UTC)
    assert default_group("d", Filters(until=args.until)).startswith("userpilot-replay.d")


def test_explain_writes_one_line_an_event_whatever_its_ids_hold() -> None:
    """Review "ids47": U+2028, U+2029 and U+0085 were written raw in explain's JSON lines,
    which `str.splitlines` and log shippers split (one event read as five lines)."""
    line = ('{"type":"track","event":"Feature Used","userId":"u\\u2028a\\u2029b\\u0085c'
            '\\u202ed","messageId":"m\\u2028","context":{"consent":{"analytics":true}}}\n')
    result = cli(["explain"], {}, line.encode())
    assert result.returncode == 0, result.stderr
    (doc,) = [json.loads(x) for x in result.stdout.splitlines()]
    assert doc["request"]["body"]["user_id"] == "u\u2028a\u2029b\u0085c\u202ed"
    assert "\u202e" not in result.stdout


@pytest.mark.parametrize("argv", [["check-config"], ["explain"]])
def test_a_command_started_with_stdout_closed_does_its_work_without_a_traceback(
        argv: list[str]) -> None:
    """Review "config48": `check-config >&-` and `explain >&-` found sys.stdout None and
    failed with a traceback and exit 1 after their work was done."""
    script = ("import os, subprocess, sys; os.close(1); "
              "sys.exit(subprocess.run([sys.executable, '-m', 'consumer', *sys.argv[1:]], "
              "input=b'{\"type\":\"track\",\"event\":\"x\",\"userId\":\"u\"}\\n').returncode)")
    proc = subprocess.run([sys.executable, "-c", script, *argv], env=only(GOOD),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60,
                          check=False)
    err = proc.stderr.decode("utf-8", "replace")
    assert "Traceback" not in err, err
    assert proc.returncode == 0, err


@pytest.mark.parametrize(("argv", "says"), [(["--bogus"], "unrecognized arguments: --bogus"),
                                            ([], "a command is required")])
def test_an_unknown_option_before_the_command_is_named(argv: list[str], says: str) -> None:
    """Review "config48": `--bogus` said "the following arguments are required: command"."""
    result = cli(argv, {})
    assert result.returncode == 2 and says in result.stderr, result.stderr


def _closed_stderr(argv: list[str], env: dict[str, str], stdin: bytes = b"",
                   stdout: int | None = subprocess.DEVNULL) -> subprocess.CompletedProcess[str]:
    """`python -m consumer argv` with a stderr whose reader is already gone."""
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([sys.executable, "-m", "consumer", *argv], env=only(env),
                              stdout=stdout, stderr=write, input=stdin, timeout=60,
                              check=False)
    finally:
        os.close(write)
    return subprocess.CompletedProcess(proc.args, proc.returncode, "", "")


@pytest.mark.parametrize(("argv", "stdin"), [
    (["check-config"], b""), (["delete-users", "--dry-run"], b"u1\nu2\n"),
    (["explain"], b'{"type":"track","event":"x","userId":"u"}\n')])
def test_a_closed_stderr_is_not_a_failure_of_the_command(argv: list[str], stdin: bytes) -> None:
    """Review "cli50": notes and progress go to stderr; a reader of it that went away
    (`2>&1 | head`) raised BrokenPipeError out of the command's next line: `check-config`
    exited 1 on a valid configuration, `delete-users` stopped mid-list."""
    assert _closed_stderr(argv, GOOD, stdin).returncode == 0


def test_explain_names_the_output_not_the_input_when_stdout_cannot_be_written(
        tmp_path: Path) -> None:
    """Review "cli50": `explain --file events.jsonl > /dev/full` said the input file could
    not be read."""
    events = tmp_path / "events.jsonl"
    events.write_text('{"type":"track","event":"x","userId":"u"}\n' * 5000)
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "consumer", "explain", "--file",
                               str(events)], env=only(GOOD), stdout=full,
                              stderr=subprocess.PIPE, timeout=60, check=False, text=True)
    assert proc.returncode == 1
    assert "cannot write the output (No space left on device)" in proc.stderr, proc.stderr
    assert "cannot read" not in proc.stderr and "Traceback" not in proc.stderr


def test_a_hang_up_is_a_stop_signal_unless_the_process_ignores_it() -> None:
    """Review "cli50": a closed terminal's SIGHUP killed `replay` with a published batch
    uncommitted, `delete-users` without its summary and `run` without its final commit;
    started under `nohup` (SIGHUP ignored), the process is asked to outlive the terminal."""
    from consumer.signals import stop_signals

    previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        assert stop_signals() == (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        assert stop_signals() == (signal.SIGTERM, signal.SIGINT)
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_delete_users_reports_a_hang_up_like_a_sigterm(tmp_path: Path) -> None:
    """Review "cli50": SIGHUP mid-run printed nothing and exited -1; now the summary and
    exit 129, as SIGTERM gives 143."""
    ids = tmp_path / "ids.txt"
    ids.write_text("".join(f"u{i}\n" for i in range(50)))
    env = {**GOOD, "USERPILOT_ANALYTICS_ENDPOINT": "127.0.0.1:9", "USERPILOT_INSECURE_HTTP": "true"}
    proc = subprocess.Popen([sys.executable, "-m", "consumer", "delete-users", "--file",
                             str(ids), "--batch-size", "1", "--interval", "5"], env=only(env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=hang_up_as_default)
    try:
        deadline = time.monotonic() + 30
        assert proc.stderr is not None
        while "users in" not in proc.stderr.readline():  # the first progress line
            assert time.monotonic() < deadline and proc.poll() is None
        proc.send_signal(signal.SIGHUP)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGHUP, err
    assert "interrupted after" in err and "delete-users:" in out, (out, err)


def test_explain_names_the_input_when_reading_it_fails_with_an_io_error() -> None:
    """Review "diff50c": an input that fails to read with EIO (a failing disk; here
    /proc/self/mem, whose first page is not mapped) was reported as the output's failure,
    by its errno."""
    if not Path("/proc/self/mem").exists():
        pytest.skip("no /proc here")
    proc = subprocess.run([sys.executable, "-m", "consumer", "explain", "--file",
                           "/proc/self/mem"], env=only(GOOD), capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 1
    assert "/proc/self/mem: cannot read the file (Input/output error)" in proc.stderr, \
        proc.stderr


def test_signal_handlers_are_put_back_after_the_block_and_left_alone_off_the_main_thread(
) -> None:
    """`signals.handled`, which `main` and `produce` use: the handler inside the block, the
    one before it after (none of Python's own: the default action); outside the main
    thread, where Python refuses handlers, nothing is installed."""
    from consumer.signals import handled

    def mine(_signum: int, _frame: Any) -> None:
        return None

    previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        with handled(mine, [signal.SIGUSR1]):
            assert signal.getsignal(signal.SIGUSR1) is mine
        assert signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN
        seen: list[object] = []

        def in_thread() -> None:
            with handled(mine, [signal.SIGUSR1]):
                seen.append(signal.getsignal(signal.SIGUSR1))

        thread = threading.Thread(target=in_thread)
        thread.start()
        thread.join()
        assert seen == [signal.SIG_IGN]
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_check_config_under_an_ascii_locale_reads_values_as_utf8_and_paths_as_given(
        tmp_path: Path) -> None:
    """Reviews "env60" and "diff60b": under a locale that is not UTF-8 (here bare ASCII,
    Python's coercion off) a group id holding "ü" was refused as not UTF-8 (under Latin-1
    it became another consumer group); decoding every value as UTF-8 then broke the paths
    the process opens itself (a traceback for the token's file). Values are UTF-8; a path
    is opened as the locale gives it."""
    folder = tmp_path / "sécret"
    folder.mkdir()
    (folder / "token").write_text("wt-file-token-1\n")
    env = {k: v for k, v in GOOD.items() if k != "USERPILOT_API_KEY"}
    raw = {**only(env), "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0",
           "PYTHONCOERCECLOCALE": "0"}
    environ = {k.encode(): v.encode() for k, v in raw.items()}
    environ[b"KAFKA_GROUP_ID"] = "grüppe".encode()
    environ[b"USERPILOT_API_KEY_FILE"] = str(folder / "token").encode()
    proc = subprocess.run([sys.executable, "-m", "consumer", "check-config"],
                          env=environ, capture_output=True, timeout=60, check=False)
    out, err = proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert '"group_id": "gr\\u00fcppe"' in out or '"group_id": "grüppe"' in out, out
    # A path Python opens whose bytes the ASCII locale cannot read: the locale is named,
    # not "re-enter it" (review "diff60c").
    (folder / "mappings.json").write_text("{}")
    environ[b"USERPILOT_MAPPINGS_FILE"] = str(folder / "mappings.json").encode()
    proc = subprocess.run([sys.executable, "-m", "consumer", "check-config"],
                          env=environ, capture_output=True, timeout=60, check=False)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2 and "Traceback" not in err, err
    assert "USERPILOT_MAPPINGS_FILE names a path the locale (ascii) cannot read" in err, err
