"""`services/ctl.py env`: the addresses it prints when a service is not running."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CTL = Path(__file__).resolve().parents[2] / "services" / "ctl.py"
PORT_VARS = ("KAFKA_PORT", "REGISTRY_PORT", "REDIS_PORT")


def _env(run_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in PORT_VARS}
    env.update(SERVICES_RUN_DIR=str(run_dir), **extra)
    done = subprocess.run([sys.executable, str(CTL), "env"], env=env, capture_output=True,
                          text=True, timeout=30, check=True)
    return dict(line.split("=", 1) for line in done.stdout.splitlines())


def test_a_stopped_service_is_named_at_the_port_its_run_dir_used_last(tmp_path: Path) -> None:
    """Review "faults28": after `kill registry` in a run dir started on REGISTRY_PORT=42081,
    `env` without the variable printed the default port, where another clone's registry
    may answer: a "registry down" test then tested nothing."""
    (tmp_path / "kafka.port").write_text("45092\n")
    (tmp_path / "registry.port").write_text("45081\n")
    found = _env(tmp_path)
    assert found["KAFKA_BOOTSTRAP_SERVERS"] == "127.0.0.1:45092"
    assert found["SCHEMA_REGISTRY_URL"].startswith("http://127.0.0.1:45081/")
    assert found["REDIS_URL"] == "redis://127.0.0.1:16379/0"  # never started here: default
    # The variable, when set, still decides.
    assert _env(tmp_path, KAFKA_PORT="46092")["KAFKA_BOOTSTRAP_SERVERS"] == "127.0.0.1:46092"


def test_a_fresh_run_dir_uses_the_default_ports(tmp_path: Path) -> None:
    found = _env(tmp_path / "fresh")
    assert found["KAFKA_BOOTSTRAP_SERVERS"] == "127.0.0.1:19092"
    assert found["SCHEMA_REGISTRY_URL"].startswith("http://127.0.0.1:18081/")
