"""The package layout: one path per module, no symlinks, and the layering rule enforced.

shared/ and services/<stage>/ map into the ``dicomflow`` namespace through pyproject.toml's
package-dir (docs/development.md, Layout); scripts/lint checks the import contracts of
pyproject.toml ([tool.importlinter]) on the package as it installs.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import checktree  # noqa: E402

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def test_the_repository_holds_no_symlink() -> None:
    listed = subprocess.run(
        ["git", "ls-files", "-s"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    links = [line.split("\t", 1)[1] for line in listed.splitlines() if line.startswith("120000")]
    assert links == []


def test_every_package_folder_is_declared_and_every_declared_one_exists() -> None:
    declared = checktree.package_folders()
    assert all(folder.is_dir() for folder in declared.values()), declared
    found = {
        init.parent.resolve()
        for top in (ROOT / "src" / "dicomflow", ROOT / "shared", ROOT / "services")
        for init in top.rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert found == {folder.resolve() for folder in declared.values()}


@pytest.mark.parametrize("package", sorted(checktree.package_folders()))
def test_each_module_imports_from_its_one_folder(package: str) -> None:
    module = importlib.import_module(package)
    assert module.__file__ is not None
    assert Path(module.__file__).resolve().parent == checktree.package_folders()[package].resolve()


def run_contracts(tree: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=ROOT, env=env, capture_output=True, text=True
    )


def test_the_layering_contract_holds_and_catches_a_planted_violation(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    checktree.build(tree)
    kept = run_contracts(tree)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    assert "0 broken" in kept.stdout

    planted = tree / "dicomflow" / "shared" / "errors.py"
    planted.write_text(planted.read_text() + "\nimport dicomflow.scu_gateway.routing\n")
    sibling = tree / "dicomflow" / "encryptor" / "sealing.py"
    sibling.write_text(sibling.read_text() + "\nimport dicomflow.store_writer.service\n")
    broken = run_contracts(tree)
    assert broken.returncode != 0
    assert "dicomflow.shared.errors -> dicomflow.scu_gateway.routing" in broken.stdout
    assert "dicomflow.encryptor.sealing -> dicomflow.store_writer.service" in broken.stdout


def test_test_modules_have_unique_names() -> None:
    """pytest imports tests/unit and tests/integration as top-level modules (rootdir
    conftest, no __init__.py): two files of one name make the whole run fail to collect."""
    names = [p.name for p in (ROOT / "tests").rglob("test_*.py")]
    assert sorted(n for n in set(names) if names.count(n) > 1) == []
