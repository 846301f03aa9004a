"""The Makefile's `pytest` target, run with a stand-in pytest: one CI run reports every
problem, so a failing unit test must not keep the integration tests from running."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _make_pytest(tmp_path: Path, then: str) -> tuple[subprocess.CompletedProcess[str],
                                                   list[str]]:
    """`make pytest` with a stand-in pytest that records its arguments, then runs `then`;
    what make did, and the stand-in's calls."""
    calls = tmp_path / "calls"
    fake = tmp_path / "pytest"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n{then}\n')
    fake.chmod(0o755)
    done = subprocess.run(["make", "--no-print-directory", "-o", "venv", "pytest",
                           f"BIN={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=False)
    return done, calls.read_text().splitlines()


def test_a_failing_unit_run_still_runs_the_integration_tests_and_fails_the_target(
        tmp_path: Path) -> None:
    """Review "diff58": the target's two pytest lines were two recipe lines, and make stops
    a recipe at its first failing line (under `-k` too): the integration tests never ran."""
    done, ran = _make_pytest(tmp_path, "exit 1")
    assert done.returncode != 0, done.stdout + done.stderr
    assert len(ran) == 2, ran
    assert "tests/unit" in ran[0] and "-n 2" in ran[0]
    assert ran[1].endswith("tests/integration")


def test_an_interrupted_unit_run_does_not_start_the_integration_tests(tmp_path: Path) -> None:
    """Review "diff58b": Ctrl-C during the unit tests went on to the integration suite
    (minutes), make waiting for it. The stand-in interrupts its recipe's shell, as a
    terminal's Ctrl-C reaches the whole process group, and exits 2 as pytest does."""
    done, ran = _make_pytest(tmp_path, "kill -INT $PPID\nexit 2")
    assert done.returncode != 0, done.stdout + done.stderr
    assert len(ran) == 1, ran
