"""Reproducible installs: constraints.txt pins every dependency pyproject.toml names, within
its ranges, and both the Makefile's venv and the Dockerfile install through it."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
CONSTRAINTS = (ROOT / "constraints.txt").read_text(encoding="utf-8")
# Tools whose new releases add checks: unbounded, they could fail `make lint` on a clean clone.
DEV_TOOLS = {"ruff", "mypy", "pytest", "pytest-timeout", "types-pyyaml"}


def pins() -> dict[str, str]:
    out: dict[str, str] = {}
    for line in CONSTRAINTS.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep and version, f"not an exact pin: {line!r}"
        out[canonicalize_name(name)] = version
    return out


def requirements() -> list[Requirement]:
    project = PYPROJECT["project"]
    raw = list(project["dependencies"]) + list(project["optional-dependencies"]["dev"])
    return [Requirement(r) for r in raw]


def test_every_declared_dependency_is_pinned_within_its_range() -> None:
    pinned = pins()
    problems = []
    for req in requirements():
        name = canonicalize_name(req.name)
        if name not in pinned:
            problems.append(f"{req.name} is not in constraints.txt (run `make constraints`)")
        elif not req.specifier.contains(pinned[name], prereleases=True):
            problems.append(f"{req.name}=={pinned[name]} is outside {req.specifier}")
    assert problems == []


def test_the_package_itself_is_not_pinned() -> None:
    assert "userpilot-delivery-worker" not in pins()
    lines = [x for x in CONSTRAINTS.splitlines() if x.strip() and not x.startswith("#")]
    assert not [x for x in lines if x.startswith("-e") or "file://" in x or " @ " in x]


def test_dev_tools_have_upper_bounds() -> None:
    bounded = {
        canonicalize_name(r.name)
        for r in requirements()
        if any(s.operator in {"<", "<=", "==", "~="} for s in r.specifier)
    }
    assert bounded >= DEV_TOOLS, sorted(DEV_TOOLS - bounded)


def test_make_venv_installs_through_the_constraints() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^\$\(STAMP\): pyproject\.toml constraints\.txt", makefile, re.M)
    assert "pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'" in makefile
    # and the documented refresh command exists
    assert re.search(r"^constraints:$", makefile, re.M)
    assert "make constraints" in CONSTRAINTS


def test_what_pinned_packages_need_on_the_oldest_python_allowed_is_pinned_too() -> None:
    """Review "pkg46": redis needs async-timeout below Python 3.11.3 (Debian 12's python3.11
    is 3.11.2); frozen on a newer Python it was installed unpinned there."""
    from importlib import metadata

    from packaging.markers import default_environment

    oldest: dict[str, str] = {**{k: str(v) for k, v in default_environment().items()},
                              "python_version": "3.11", "python_full_version": "3.11.0",
                              "extra": ""}
    pinned = pins()
    missing = []
    for name in pinned:
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            continue  # pinned for another platform or Python
        for raw in requires:
            req = Requirement(raw)
            if req.marker is not None and not req.marker.evaluate(oldest):
                continue
            if canonicalize_name(req.name) not in pinned:
                missing.append(f"{name} needs {req} on Python 3.11.0")
    assert missing == []
