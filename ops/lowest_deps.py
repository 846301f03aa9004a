"""The lowest versions pyproject.toml allows, installed and tried: users do not install
through constraints.txt, so each lower bound must be one the worker runs on.

aiohttp was allowed from 3.10 while the worker passed `max_headers` (3.13.4 on): an
environment holding an older one sent nothing, every request a TypeError retried for ever
(review "pkg46"). Builds a throw-away venv with each runtime dependency at its lower bound
(transitive ones as pip resolves them), the test tools at their pinned versions, then runs
the unit tests that exercise those libraries' APIs.

    python ops/lowest_deps.py [--venv DIR] [--keep]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("pytest", "pytest-timeout", "hypothesis", "packaging", "pyyaml")
TESTS = ("tests/unit/test_delivery_wire.py", "tests/unit/test_delivery.py",
         "tests/unit/test_codec.py", "tests/unit/test_registry.py",
         "tests/unit/test_redisstore.py", "tests/unit/test_kafka_source.py",
         "tests/unit/test_metrics.py", "tests/unit/test_policy.py")


def lowest() -> list[str]:
    """`name==lower bound` for every runtime dependency (each must have one)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["project"]
    pins = []
    for raw in project["dependencies"]:
        req = Requirement(raw)
        floors = [s.version for s in req.specifier if s.operator == ">="]
        if len(floors) != 1:
            raise SystemExit(f"{raw}: give it one lower bound (>=) to be tried here")
        pins.append(f"{req.name}=={floors[0]}")
    return pins


def pinned(names: tuple[str, ...]) -> list[str]:
    """The test tools at constraints.txt's versions."""
    found = {}
    for line in (ROOT / "constraints.txt").read_text("utf-8").splitlines():
        name, sep, version = line.strip().partition("==")
        if sep and name.lower() in names:
            found[name.lower()] = f"{name}=={version}"
    return [found[name] for name in names]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", default=str(ROOT / ".venv-lowest"))
    parser.add_argument("--keep", action="store_true", help="keep the venv afterwards")
    args = parser.parse_args()
    venv = Path(args.venv)
    shutil.rmtree(venv, ignore_errors=True)
    python = venv / "bin" / "python"
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        wanted = lowest()
        print("lowest allowed:", " ".join(wanted), flush=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q",
                        "--disable-pip-version-check", *wanted, *pinned(TOOLS)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps",
                        "--disable-pip-version-check", "-e", str(ROOT)], check=True)
        return subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               *TESTS], cwd=ROOT, check=False).returncode
    finally:
        if not args.keep:
            shutil.rmtree(venv, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
