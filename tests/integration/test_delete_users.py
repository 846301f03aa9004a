"""`python -m consumer delete-users` against the sandbox over real HTTP: batches, pace,
retries on 429, and a refused token that is never printed."""

from __future__ import annotations

import itertools
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from consumer.sandbox import SandboxConfig, SandboxControl, SandboxThread

pytestmark = pytest.mark.integration

TOKEN = "delete-users-write-token"
HEADERS = {"Authorization": f"Token {TOKEN}", "X-API-Version": "2020-09-22",
           "Content-Type": "application/json"}
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def sandbox() -> Iterator[tuple[SandboxThread, SandboxControl]]:
    config = SandboxConfig(port=0, write_tokens=(TOKEN,), rate_limit=0)
    with SandboxThread(config) as server:
        yield server, SandboxControl(server.url)


def identify(url: str, users: list[str]) -> None:
    with httpx.Client(base_url=url, headers=HEADERS) as client:
        for user in users:
            assert client.post("/v1/identify", json={"user_id": user}).status_code == 202


def delete_users(url: str, *argv: str, token: str = TOKEN, stdin: str | None = None,
                 **env: str) -> subprocess.CompletedProcess[str]:
    host = url.removeprefix("http://")
    environ = {**os.environ, "USERPILOT_API_KEY": token, "USERPILOT_ANALYTICS_ENDPOINT": host,
               "USERPILOT_INSECURE_HTTP": "true", **env}
    return subprocess.run(
        [sys.executable, "-m", "consumer", "delete-users", *argv], input=stdin,
        capture_output=True, text=True, env=environ, cwd=REPO, timeout=120, check=False,
    )


def deletes(control: SandboxControl) -> list[dict[str, object]]:
    return control.requests("/v1/users")


def gaps(records: list[dict[str, object]]) -> list[float]:
    times = [float(r["received_at"]) for r in records]  # type: ignore[arg-type]
    return [b - a for a, b in itertools.pairwise(times)]


def test_deletes_in_batches_at_a_compressed_pace(
    sandbox: tuple[SandboxThread, SandboxControl], tmp_path: Path
) -> None:
    server, control = sandbox
    control.set_limits(delete_interval_seconds=0.3)
    users = [f"user_{i:02d}" for i in range(10)]
    identify(server.url, [*users, "kept"])
    ids = tmp_path / "ids.txt"
    ids.write_text("\n".join([*users, "", users[0]]) + "\n", encoding="utf-8")

    done = delete_users(server.url, "--file", str(ids), "--batch-size", "3",
                        "--interval", "0.3")

    assert done.returncode == 0, done.stderr
    assert done.stdout == ("delete-users: users requested 10, batches sent 4, deleted 10, "
                           "failed 0\n")
    records = deletes(control)
    assert [r["body"] for r in records] == [
        {"users": users[0:3]}, {"users": users[3:6]}, {"users": users[6:9]},
        {"users": users[9:]}]
    assert all(r["method"] == "DELETE" for r in records)
    assert all(gap >= 0.3 for gap in gaps(records)), gaps(records)
    assert control.stats()["by_status"].get("429", 0) == 0
    assert list(control.users()) == ["kept"]
    assert TOKEN not in done.stdout + done.stderr


def test_default_pace_is_one_request_per_two_seconds(
    sandbox: tuple[SandboxThread, SandboxControl]
) -> None:
    server, control = sandbox  # the sandbox enforces Userpilot's 1 request per 2 s
    done = delete_users(server.url, "--batch-size", "2", stdin="a\nb\nc\n")
    assert done.returncode == 0, done.stderr
    records = deletes(control)
    assert [r["body"] for r in records] == [{"users": ["a", "b"]}, {"users": ["c"]}]
    assert gaps(records)[0] >= 2.0
    assert control.stats()["by_status"] == {"202": 2}


def test_too_fast_is_answered_429_and_retried_until_all_are_deleted(
    sandbox: tuple[SandboxThread, SandboxControl]
) -> None:
    server, control = sandbox
    control.set_limits(delete_interval_seconds=1.0)
    done = delete_users(server.url, "--batch-size", "1", "--interval", "0.1",
                        stdin="a\nb\n", USERPILOT_RETRY_BACKOFF_SECONDS="0.3")
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith("batches sent 2, deleted 2, failed 0\n")
    stats = control.stats()["by_status"]
    assert stats["202"] == 2 and stats["429"] >= 1
    assert [r["body"] for r in deletes(control)] == [{"users": ["a"]}, {"users": ["b"]}]


def test_a_refused_token_fails_without_printing_it(
    sandbox: tuple[SandboxThread, SandboxControl]
) -> None:
    server, control = sandbox
    identify(server.url, ["a"])
    wrong = "not-the-write-token-987"
    done = delete_users(server.url, "--interval", "0", stdin="a\nb\n", token=wrong)
    assert done.returncode == 1
    assert "failed 2" in done.stdout and "HTTP 401" in done.stderr
    assert wrong not in done.stdout + done.stderr
    assert list(control.users()) == ["a"]


def test_dry_run_sends_nothing(sandbox: tuple[SandboxThread, SandboxControl]) -> None:
    server, control = sandbox
    done = delete_users(server.url, "--file", "-", "--dry-run", stdin="a\nb\n")
    assert done.returncode == 0
    assert "(dry run: nothing sent)" in done.stdout
    assert control.stats()["total"] == 0


def readme_commands() -> list[str]:
    """The delete-users command lines of the README's GDPR section, as written."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("### Deleting users (GDPR)", 1)[1].split("```bash", 1)[1]
    block = section.split("```", 1)[0]
    return [line for line in block.splitlines() if line.startswith("python -m consumer")]


def test_the_readme_commands_work_as_written(
    sandbox: tuple[SandboxThread, SandboxControl], tmp_path: Path
) -> None:
    server, control = sandbox
    identify(server.url, ["u1", "u2", "u3"])
    (tmp_path / "user-ids.txt").write_text("u1\nu2\n", encoding="utf-8")
    commands = readme_commands()
    assert len(commands) == 2
    env = {**os.environ, "USERPILOT_API_KEY": TOKEN, "PYTHONPATH": str(REPO),
           "USERPILOT_ANALYTICS_ENDPOINT": server.url.removeprefix("http://"),
           "USERPILOT_INSECURE_HTTP": "true"}
    outputs = []
    for command in commands:
        argv = shlex.split(command, comments=True)
        assert argv[0] == "python"
        done = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        outputs.append(done.stdout)
    assert "(dry run: nothing sent)" in outputs[0]
    assert outputs[1] == ("delete-users: users requested 2, batches sent 1, deleted 2, "
                          "failed 0\n")
    assert list(control.users()) == ["u3"]


def test_deleted_users_are_forgotten_by_the_replicas_shared_record(
    sandbox: tuple[SandboxThread, SandboxControl], tmp_path: Path, redis_url: str
) -> None:
    """With Redis, the replicas share who they identified (ensure-user); a deleted user's
    record would have kept its returning Tracks from re-creating it until the TTL."""
    import redis as sync_redis

    from consumer.dedup import user_key
    from consumer.redisstore import token_digest

    server, control = sandbox
    control.set_limits(delete_interval_seconds=0.1)
    digest = token_digest(TOKEN)
    client = sync_redis.Redis.from_url(redis_url)
    gone, kept = user_key(digest, "gone"), user_key(digest, "kept")
    client.set(gone, b"1", px=60_000)
    client.set(kept, b"1", px=60_000)
    try:
        done = delete_users(server.url, "--interval", "0.1", stdin="gone\n",
                            REDIS_URL=redis_url)
        assert done.returncode == 0, done.stderr
        assert client.exists(gone) == 0 and client.exists(kept) == 1
        # Redis unreachable: the deletion stands, one line says what was not cleared.
        client.set(gone, b"1", px=60_000)
        down = delete_users(server.url, "--interval", "0.1", stdin="gone\n",
                            REDIS_URL="redis://127.0.0.1:1/0")
        assert down.returncode == 0, down.stderr
        assert "record of these users not cleared" in down.stderr
        assert TOKEN not in down.stderr + down.stdout
    finally:
        client.delete(gone, kept)
        client.close()
