"""Runs a checker (mypy, lint-imports) on the package as it installs, paths mapped back.

shared/ and services/<stage>/ install as dicomflow.shared and dicomflow.<stage> through
pyproject.toml's package-dir (no symlinks in the repository). Type checkers and import
linters find a package by walking one folder, so this copies the Python files into
build/checktree/dicomflow/ exactly as a wheel would lay them out, runs the command given
with that folder first on the module path, and writes its output back with repository
paths (shared/nats/natsconn.py, not build/checktree/dicomflow/shared/nats/natsconn.py).

    python scripts/checktree.py mypy
    python scripts/checktree.py lint-imports
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / "build" / "checktree"


def package_folders() -> dict[str, Path]:
    """Each package of pyproject.toml and the repository folder its modules live in."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping: dict[str, str] = tool["package-dir"]
    folders: dict[str, Path] = {}
    for package in tool["packages"]:
        parts = package.split(".")
        for cut in range(len(parts), -1, -1):
            prefix = ".".join(parts[:cut])
            if prefix in mapping:
                folders[package] = ROOT / mapping[prefix] / Path(*parts[cut:])
                break
    return folders


def build(tree: Path = TREE) -> dict[Path, Path]:
    """Lays the tree out afresh; returns each copied folder and its repository folder."""
    shutil.rmtree(tree, ignore_errors=True)
    copies: dict[Path, Path] = {}
    for package, folder in package_folders().items():
        target = tree / Path(*package.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for source in folder.glob("*.py"):
            shutil.copy2(source, target / source.name)
        copies[target] = folder
    return copies


def main() -> int:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    copies = build()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TREE), env.get("PYTHONPATH")]))
    env["MYPYPATH"] = str(TREE)
    done = subprocess.run(sys.argv[1:], cwd=ROOT, env=env, capture_output=True, text=True)
    # Longest copied folder first, so dicomflow/shared/nats maps before dicomflow/shared.
    order = sorted(copies, key=lambda p: len(str(p)), reverse=True)
    for stream, text in ((sys.stdout, done.stdout), (sys.stderr, done.stderr)):
        for copied in order:
            for form in (str(copied), str(copied.relative_to(ROOT))):
                text = text.replace(form + "/", str(copies[copied].relative_to(ROOT)) + "/")
        stream.write(text)
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
