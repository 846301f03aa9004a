"""`services/ctl.py env`: the addresses it prints when a service is not running."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

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


def _ctl_module() -> object:
    import importlib.util

    spec = importlib.util.spec_from_file_location("services_ctl", CTL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_registry_archive_unpacks_without_tar_filters_too(
        tmp_path: Path) -> None:
    """Review "py312": `extractall(filter="data")` raised TypeError before Python 3.11.4
    (Debian 12's python3 is 3.11.2) at the first registry download; without filters the
    members are checked by hand, and one escaping the directory is refused."""
    import io
    import tarfile

    import pytest

    ctl: Any = _ctl_module()
    good = tmp_path / "good.tar.gz"
    with tarfile.open(good, "w:gz") as tar:
        data = b"jar"
        info = tarfile.TarInfo("registry/app-runner.jar")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    bad = tmp_path / "bad.tar.gz"
    with tarfile.open(bad, "w:gz") as tar:
        info = tarfile.TarInfo("../escaped")
        info.size = 0
        tar.addfile(info, io.BytesIO(b""))
    mp = pytest.MonkeyPatch()
    try:
        mp.delattr(tarfile, "data_filter", raising=False)
        ctl.extract(good, tmp_path / "out")
        assert (tmp_path / "out/registry/app-runner.jar").read_bytes() == b"jar"
        with pytest.raises(ctl.ServiceError, match=r"refusing the member '\.\./escaped'"):
            ctl.extract(bad, tmp_path / "out2")
        assert not (tmp_path / "escaped").exists()
    finally:
        mp.undo()
    ctl.extract(good, tmp_path / "out3")  # with the filters, where Python has them
    assert (tmp_path / "out3/registry/app-runner.jar").exists()
