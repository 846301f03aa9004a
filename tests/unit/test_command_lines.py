"""Every command line the README, docker-compose.yml and the alerts show goes through the real
parser.

Parsing is the floor; the lines are also run as written: the replay and explain lines in
tests/integration/test_readme_commands.py, the GDPR ones in test_delete_users, `make demo`'s
demo in test_demo, `make test` by .ci/run, the Helm install line by ops/check_helm.sh (as
`helm template`). The benchmark lines run for minutes: the harness itself runs as a smoke
test (test_bench_smoke).

The worker image's entrypoint is `python -m consumer`, so a compose `command` is exactly
the argument list `consumer.__main__.build_parser` receives.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from bench.cli import build_parser as bench_parser
from consumer.__main__ import build_parser, main

ROOT = Path(__file__).resolve().parents[2]
WORKER_IMAGE = "userpilot-delivery-worker:local"


def _compose_commands() -> list[tuple[str, list[str]]]:
    doc: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text("utf-8"))
    out = []
    for name, service in doc["services"].items():
        if service.get("image") == WORKER_IMAGE and "entrypoint" not in service:
            out.append((name, [str(part) for part in service["command"]]))
    return out


def _readme_lines(prefix: str) -> list[str]:
    """`prefix ...` command lines of the README, in code blocks or inline code."""
    text = (ROOT / "README.md").read_text("utf-8")
    found = []
    start = re.escape(prefix) + r"\b"
    # A code block's line (a trailing backslash continues it), or inline code, which may
    # wrap across lines of the paragraph: both whole (review "cmds17": a wrapped one was
    # parsed up to the line break).
    block = re.findall(rf"(?m)^({start}(?:[^\n]*\\\n)*[^\n]*)", text)
    inline = re.findall(rf"`({start}[^`]*)`", text)
    for raw in [*block, *inline]:
        line = re.sub(r"\\?\n\s*", " ", raw).split("  #", 1)[0].strip()
        if "<command>" in line:
            continue  # the generic `python -m consumer <command>` of the Commands section
        found.append(line)
    return found


def _args(line: str, prefix: str) -> list[str]:
    # Placeholders such as <dlq> stand for any value; `> file` is the shell's.
    parts = shlex.split(line[len(prefix):])
    if ">" in parts:
        parts = parts[:parts.index(">")]
    return [re.sub(r"^<[^>]+>$", "x", part) for part in parts]


def _alert_lines(prefix: str) -> list[str]:
    """`prefix ...` command lines in the alerts' texts, which page the on-call engineer: two
    replay lines there lacked `--from` and exited 2 as written (review "readme51").
    A Prometheus template stands for a value its label takes (`{{ $labels.reason }}`: a
    dead-letter reason)."""
    doc = yaml.safe_load((ROOT / "helm/userpilot-worker/files/alerts.yaml").read_text("utf-8"))
    found = []
    for group in doc["groups"]:
        for rule in group["rules"]:
            for text in rule.get("annotations", {}).values():
                for raw in re.findall(rf"`({re.escape(prefix)}\b[^`]*)`", text):
                    line = " ".join(raw.split()).replace("{{ $labels.reason }}", "bad_request")
                    found.append(re.sub(r"\{\{[^}]*\}\}", "<label>", line))
    return found


COMPOSE = _compose_commands()
README = _readme_lines("python -m consumer")
README_BENCH = _readme_lines("python -m bench")
ALERTS = _alert_lines("userpilot-worker")


def test_the_compose_file_and_readme_have_command_lines() -> None:
    assert {name for name, _ in COMPOSE} >= {"sandbox", "worker", "producer"}
    assert any(" replay " in line for line in README)
    assert README_BENCH


@pytest.mark.parametrize(("service", "argv"), COMPOSE, ids=[name for name, _ in COMPOSE])
def test_compose_commands_parse(service: str, argv: list[str]) -> None:
    args = build_parser("python -m consumer").parse_args(argv)
    assert args.command == argv[0]


def test_the_compose_sandbox_command_sets_host_and_port() -> None:
    argv = dict(COMPOSE)["sandbox"]
    args = build_parser("python -m consumer").parse_args(argv)
    assert (args.host, args.port) == ("0.0.0.0", 8787)
    assert args.write_tokens == ["sandbox-write-token"]


@pytest.mark.parametrize("line", README)
def test_readme_command_lines_parse(line: str) -> None:
    args = build_parser("python -m consumer").parse_args(_args(line, "python -m consumer"))
    assert args.func is not None


@pytest.mark.parametrize("line", ALERTS)
def test_alert_command_lines_parse(line: str) -> None:
    args = build_parser("userpilot-worker").parse_args(_args(line, "userpilot-worker"))
    assert args.func is not None


def test_the_alerts_have_command_lines() -> None:
    assert any(" replay --from " in line for line in ALERTS), ALERTS


@pytest.mark.parametrize("line", README_BENCH)
def test_readme_benchmark_command_lines_parse(line: str) -> None:
    bench_parser().parse_args(_args(line, "python -m bench"))


@pytest.mark.parametrize("argv", [["--help"], ["sandbox", "--help"], ["replay", "--help"]])
def test_help_exits_0_and_shows_the_flags(argv: list[str],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out
    if argv[0] == "sandbox":
        assert "--port" in out and "--host" in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert re.search(r"\d+\.\d+", capsys.readouterr().out)


@pytest.mark.parametrize("command", ["run", "check-config", "explain", "produce", "replay",
                                     "sandbox", "demo", "delete-users"])
def test_version_on_every_subcommand(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main([command, "--version"])
    assert done.value.code == 0
    assert re.search(r"\d+\.\d+", capsys.readouterr().out)


@pytest.mark.parametrize(("argv0", "prog"), [
    ("/usr/local/bin/userpilot-worker", "userpilot-worker"),
    ("/app/consumer/__main__.py", "python -m consumer"),
])
def test_usage_shows_the_name_it_was_called_by(argv0: str, prog: str,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", [argv0, "--help"])
    with pytest.raises(SystemExit):
        main(["--help"])
    assert capsys.readouterr().out.startswith(f"usage: {prog} ")


def test_sandbox_flag_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["sandbox", "--port", "not-a-port"])
    assert done.value.code == 2
    assert "--port" in capsys.readouterr().err


def test_the_installed_command_runs_the_readmes_check_config_line() -> None:
    """README shows `userpilot-worker check-config` (the installed script, as the image has
    it): run as written, with valid settings (review "cli42": no test ran it)."""
    import os
    import subprocess

    text = (ROOT / "README.md").read_text("utf-8")
    assert "`userpilot-worker check-config`" in text
    script = Path(sys.executable).parent / "userpilot-worker"
    assert script.exists(), "pip install -e . puts the console script beside python"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("USERPILOT_", "KAFKA_", "SCHEMA_REGISTRY", "WORKER_", "REDIS_"))}
    env.update({"USERPILOT_API_KEY": "wt-secret-123",
                "USERPILOT_ANALYTICS_ENDPOINT": "analytex.userpilot.io",
                "KAFKA_BOOTSTRAP_SERVERS": "kafka:9092", "KAFKA_TOPICS": "delivery-userpilot",
                "SCHEMA_REGISTRY_URL": "http://schema-registry:8081"})
    done = subprocess.run([str(script), *shlex.split("check-config")], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "configuration OK" in done.stderr and "wt-secret-123" not in done.stdout
