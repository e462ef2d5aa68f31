"""The project's documentation is its own: every relative link in README.md and docs/*.md
names a file (and, with a #fragment, a heading) inside the repository, and no link or
path points outside it (../shared, absolute file paths)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("**/*.md")])

# [text](target) and [text](target "title"); images too. Code spans and blocks are removed
# before matching, so a `[x](y)` shown as code is not a link.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1\s*$", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.DOTALL)
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # https:, mailto:, ...
# A path out of the repository written anywhere in a page, code included: the design
# folder the team keeps beside the repository, or an absolute path into a workspace.
OUTSIDE = re.compile(r"(?:\.\./)+shared/|(?<![\w./-])/work/|(?<![\w./-])/home/|file://")


def _prose(text: str) -> str:
    return CODE_SPAN.sub("", FENCE.sub("", text))


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading: markup dropped, lower case, punctuation removed,
    spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    anchors: set[str] = set()
    for heading in HEADING.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        slug = _slug(heading)
        n = 1
        unique = slug
        while unique in anchors:  # GitHub numbers repeated headings: x, x-1, x-2
            unique = f"{slug}-{n}"
            n += 1
        anchors.add(unique)
    return anchors


def _problems(page: Path, root: Path = ROOT) -> list[str]:
    text = page.read_text(encoding="utf-8")
    where = page.relative_to(root)
    problems = [
        f"{where}: {m.group(0)!r} points outside the repository" for m in OUTSIDE.finditer(text)
    ]
    for target in LINK.findall(_prose(text)):
        if EXTERNAL.match(target):
            continue
        path_part, _, fragment = target.partition("#")
        if path_part.startswith("/"):
            problems.append(f"{where}: link {target!r} is an absolute path")
            continue
        linked = (page.parent / path_part).resolve() if path_part else page
        if not linked.is_relative_to(root):
            problems.append(f"{where}: link {target!r} leaves the repository")
        elif not linked.exists():
            problems.append(f"{where}: link {target!r} names no file ({linked.relative_to(root)})")
        elif fragment and linked.suffix == ".md" and fragment not in _anchors(linked):
            problems.append(
                f"{where}: link {target!r}: {linked.relative_to(root)} has no heading #{fragment}"
            )
    return problems


def test_the_pages_exist() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in PAGES}
    assert {"README.md", "docs/configuration.md", "docs/security.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_link_resolves_inside_the_repository(page: Path) -> None:
    assert _problems(page) == []


def test_the_checker_catches_bad_links(tmp_path: Path) -> None:
    """The check itself fails on each kind of bad link, in a copy of the docs folder."""
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    config = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    (root / "docs" / "configuration.md").write_text(config, encoding="utf-8")
    page = root / "docs" / "planted.md"
    page.write_text(
        "# Planted\n\n"
        "[gone](missing.md) [up](../../outside.md) [abs](/etc/passwd) "
        "[anchor](configuration.md#no-such-heading) [self](#planted) "
        "see ../shared/docs/DESIGN.md\n\n"
        "`[code](not-a-link.md)`\n",
        encoding="utf-8",
    )
    problems = _problems(page, root)
    assert len(problems) == 5, problems
    assert any("missing.md" in p and "names no file" in p for p in problems)
    assert any("leaves the repository" in p for p in problems)
    assert any("absolute path" in p for p in problems)
    assert any("no heading #no-such-heading" in p for p in problems)
    assert any("../shared/" in p for p in problems)
