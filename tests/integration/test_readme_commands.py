"""The README's replay and explain command lines, run exactly as written (the GDPR ones
are run in test_delete_users, the demo in test_demo, Helm's install line by
ops/check_helm.sh as `helm template`)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from confluent_kafka import Producer

from tests.conftest import create_topic, delete_topic
from tests.integration.harness import REPO, read_topic


def _readme_lines(pattern: str) -> list[str]:
    text = (REPO / "README.md").read_text("utf-8")
    return [line.split("  #", 1)[0].strip()
            for line in re.findall(rf"(?m)(?:^|`)(python -m consumer {pattern}\b[^`\n]*)", text)
            if "<" not in line]


def _run(line: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """The line as a shell runs it: `> file` writes stdout there (in `cwd`)."""
    argv = shlex.split(line, comments=True)
    assert argv[:3] == ["python", "-m", "consumer"]
    target = None
    if ">" in argv:
        at = argv.index(">")
        argv, target = argv[:at], argv[at + 1]
    done = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True,
                          env={**env, "PYTHONPATH": str(REPO)}, cwd=cwd, timeout=120,
                          check=False)
    if target is not None:
        (cwd / target).write_text(done.stdout, "utf-8")
    return done


def test_the_readme_replay_commands_work_as_written(kafka_bootstrap: str,
                                                    tmp_path: Path) -> None:
    lines = [line for line in _readme_lines("replay --from delivery-userpilot")
             if "--show-event" not in line and "--skip-keys" not in line]
    assert [line.split()[-1] for line in lines] == ["--dry-run", "--all", "bad_request"]
    origin, dlq = "delivery-userpilot", "delivery-userpilot.userpilot.dlq"
    for topic in (origin, dlq):
        create_topic(kafka_bootstrap, topic, 1)
    try:
        producer = Producer({"bootstrap.servers": kafka_bootstrap})
        for reason in (b"bad_request", b"retries_exhausted"):
            producer.produce(dlq, key=b"user_001", value=b"event bytes " + reason, headers=[
                ("__connect.errors.topic", origin.encode()),
                ("userpilot.error.reason", reason), ("userpilot.replay.count", b"0")])
        assert producer.flush(30) == 0
        env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap}
        listed, listed_all, sent = (_run(line, env, tmp_path) for line in lines)
        for done in (listed, listed_all):
            assert done.returncode == 0, done.stderr
            assert json.loads(done.stdout.splitlines()[-1])["summary"]["replayed"] == 2
        assert sent.returncode == 0, sent.stderr
        summary = json.loads(sent.stdout.splitlines()[-1])["summary"]
        assert (summary["replayed"], summary["skipped_by_filter"]) == (1, 1)
        assert [m.value() for m in read_topic(kafka_bootstrap, origin)] == [
            b"event bytes bad_request"]
        # Review replay26: once a replay of the whole DLQ committed, the plain dry run lists
        # nothing, and a user's dead letter another selection would still send was hidden
        # from the GDPR check; `--all` still lists both.
        everything = _run(f"python -m consumer replay --from {dlq}", env, tmp_path)
        assert everything.returncode == 0, everything.stderr
        counts = [json.loads(_run(line, env, tmp_path).stdout.splitlines()[-1])["summary"]
                  ["replayed"] for line in lines[:2]]
        assert counts == [0, 2]
        refused = _run(lines[1].replace("--dry-run ", ""), env, tmp_path)
        assert refused.returncode == 2 and "--all lists every dead letter" in refused.stderr
    finally:
        for topic in (origin, dlq):
            delete_topic(kafka_bootstrap, topic)


def test_the_readme_explain_command_works_as_written(tmp_path: Path) -> None:
    (line,) = set(_readme_lines("explain --file events.jsonl"))
    shutil.copy(REPO / "schemas" / "sample-events.jsonl", tmp_path / "events.jsonl")
    done = _run(line, dict(os.environ), tmp_path)
    assert done.returncode == 0, done.stderr
    events = (tmp_path / "events.jsonl").read_text("utf-8").splitlines()
    assert len(done.stdout.splitlines()) == len([e for e in events if e.strip()])


def test_the_readme_guard_trip_replay_line_works_as_written(kafka_bootstrap: str,
                                                             tmp_path: Path) -> None:
    """The DLQ guard trip's example, `replay --from signal.userpilot.dlq --skip-void …`:
    parsed only before (review "cli42"); run as written, it replays the dead letters its
    skip does not name (here one at offset 0, of another run)."""
    (line,) = _readme_lines("replay --from signal.userpilot.dlq")
    assert "--skip-void" in line
    origin, dlq = "signal", "signal.userpilot.dlq"
    for topic in (origin, dlq):
        create_topic(kafka_bootstrap, topic, 1)
    try:
        producer = Producer({"bootstrap.servers": kafka_bootstrap})
        producer.produce(dlq, key=b"user_001", value=b"event bytes", headers=[
            ("__connect.errors.topic", origin.encode()),
            ("userpilot.error.reason", b"bad_request"), ("userpilot.replay.count", b"0"),
            ("userpilot.error.worker", b"worker-7d9f-1-a1b2c3")])
        assert producer.flush(30) == 0
        env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap}
        done = _run(line, env, tmp_path)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout.splitlines()[-1])["summary"]["replayed"] == 1
        assert [m.value() for m in read_topic(kafka_bootstrap, origin)] == [b"event bytes"]
    finally:
        for topic in (origin, dlq):
            delete_topic(kafka_bootstrap, topic)


def test_the_readme_show_event_lines_work_as_written(kafka_bootstrap: str,
                                                     schema_registry_url: str,
                                                     tmp_path: Path) -> None:
    """Review "dlq48": the runbook said "explain the events", and no command got a dead
    letter's event out of its Avro bytes. `replay --dry-run --show-event` lists each with
    its event (an undecodable one with why not), and `explain` reads those lines."""
    from consumer import codec
    from consumer.registry import Registry
    from tests.integration.harness import track_event

    lines = [line for line in _readme_lines("replay --from delivery-userpilot")
             if "--show-event" in line]
    # The runbooks show it more than once (the DLQ and the success-rate alerts): the same line.
    explains = set(_readme_lines("explain --file dead.jsonl"))
    assert len(explains) == 1, explains
    (explain,) = explains
    assert len(lines) == 1 and lines[0].endswith("> dead.jsonl")
    origin, dlq = "delivery-userpilot", "delivery-userpilot.userpilot.dlq"
    for topic in (origin, dlq):
        create_topic(kafka_bootstrap, topic, 1)
    try:
        schema_id = Registry(schema_registry_url).register(origin)
        event = track_event("user_001", 1)
        producer = Producer({"bootstrap.servers": kafka_bootstrap})
        for value in (codec.encode(schema_id, codec.to_record(event)), b"garbage"):
            producer.produce(dlq, key=b"user_001", value=value, headers=[
                ("__connect.errors.topic", origin.encode()),
                ("userpilot.error.reason", b"bad_request"), ("userpilot.replay.count", b"0")])
        assert producer.flush(30) == 0
        env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
               "SCHEMA_REGISTRY_URL": schema_registry_url}
        listed = _run(lines[0], env, tmp_path)
        assert listed.returncode == 0, listed.stderr
        first, second, summary = (json.loads(line) for line in
                                  (tmp_path / "dead.jsonl").read_text("utf-8").splitlines())
        assert first["event"] == event
        assert "event" not in second and "magic byte" in second["event_unreadable"]
        assert summary["summary"]["replayed"] == 2
        explained = _run(explain, env, tmp_path)
        assert explained.returncode == 1, explained.stderr  # the undecodable one
        docs = [json.loads(line) for line in explained.stdout.splitlines()]
        assert [(d["dlq"], d["decision"]) for d in docs] == [
            (f"{dlq}[0]@0", "deliver"), (f"{dlq}[0]@1", "dead_letter")]
        assert docs[0]["request"]["body"]["event_name"] == "feature_used"
    finally:
        for topic in (origin, dlq):
            delete_topic(kafka_bootstrap, topic)


def test_the_readme_gdpr_replay_line_leaves_the_deleted_users_out(
        kafka_bootstrap: str, schema_registry_url: str, tmp_path: Path) -> None:
    """Review "gdpr48": step 3 ("leave them out of any replay") had no tool: a routine
    replay re-created the deleted user, traits included. `--skip-keys` with the file given
    to delete-users leaves out the dead letters keyed by those ids, and a keyless one whose
    event's userId is one of them (review "diff48c")."""
    from consumer import codec
    from consumer.registry import Registry
    from tests.integration.harness import track_event

    (line,) = [line for line in _readme_lines("replay --from delivery-userpilot")
               if "--skip-keys" in line]
    origin, dlq = "delivery-userpilot", "delivery-userpilot.userpilot.dlq"
    for topic in (origin, dlq):
        create_topic(kafka_bootstrap, topic, 1)
    try:
        schema_id = Registry(schema_registry_url).register(origin)
        keyless = codec.encode(schema_id, codec.to_record(track_event("user_001", 7)))
        producer = Producer({"bootstrap.servers": kafka_bootstrap})
        for key, value in ((b"user_001", b"event of user_001"),
                           (b"user_002", b"event of user_002"),
                           (b"\xef\xbb\xbfuser_003", b"event of user_003"), (None, keyless)):
            producer.produce(dlq, key=key, value=value, headers=[
                ("__connect.errors.topic", origin.encode()),
                ("userpilot.error.reason", b"bad_request"), ("userpilot.replay.count", b"0")])
        assert producer.flush(30) == 0
        (tmp_path / "user-ids.txt").write_text("user_001\r\n\ufeffuser_003\n", "utf-8")
        env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
               "SCHEMA_REGISTRY_URL": schema_registry_url}
        done = _run(line, env, tmp_path)
        assert done.returncode == 0, done.stderr
        summary = json.loads(done.stdout.splitlines()[-1])["summary"]
        assert (summary["replayed"], summary["skipped_by_filter"]) == (1, 3), summary
        assert [m.value() for m in read_topic(kafka_bootstrap, origin)] == [
            b"event of user_002"]
    finally:
        for topic in (origin, dlq):
            delete_topic(kafka_bootstrap, topic)
