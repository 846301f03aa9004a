"""`python -m consumer demo` on the real broker and registry prints the README's summary."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.integration.harness import REPO


def _readme_block() -> list[str]:
    text = (REPO / "README.md").read_text("utf-8")
    match = re.search(r"The summary, after the topic line:\n\n```\n(.*?)```", text, re.S)
    assert match, "README demo output block not found"
    return match.group(1).rstrip("\n").splitlines()


def test_demo_prints_exactly_the_readme_summary(kafka_bootstrap: str,
                                                schema_registry_url: str) -> None:
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
           "SCHEMA_REGISTRY_URL": schema_registry_url}
    proc = subprocess.run([sys.executable, "-m", "consumer", "demo"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(
        "Userpilot delivery worker demo"))
    assert lines[start + 1:] == _readme_block()
