"""The README is a landing page and docs/ the reference behind it: every page reachable from the README, every
relative link pointing at a file that exists and, with an #anchor, at a heading of that file."""

from __future__ import annotations

import re
from pathlib import Path

from helpers import REPO

README = REPO / "README.md"
DOCS = REPO / "docs"
MAX_README_LINES = 400  # issue 34: a landing page (it had 1,343 lines and 20 sections)
LINK_RE = re.compile(r"\]\(([^)\s]+)\)")
FENCE_RE = re.compile(r"^```.*?^```", re.M | re.S)


def _links(page: Path) -> list[str]:
    """The targets of the page's markdown links, outside code blocks."""
    return LINK_RE.findall(FENCE_RE.sub("", page.read_text()))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = FENCE_RE.sub("", page.read_text())
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


def _broken(pages: list[Path], root: Path = REPO) -> list[str]:
    found = []
    for page in pages:
        for target in _links(page):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                found.append(f"{page.relative_to(root)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
                found.append(f"{page.relative_to(root)}: {target} (no such heading)")
    return found


def test_the_readme_is_a_landing_page():
    assert len(README.read_text().splitlines()) <= MAX_README_LINES


def test_every_docs_page_is_reachable_from_the_readme():
    reached, todo = set(), [README]
    while todo:
        page = todo.pop()
        for target in _links(page):
            file = (page.parent / target.partition("#")[0]).resolve()
            if file.suffix == ".md" and file.is_relative_to(DOCS) and file not in reached and file.exists():
                reached.add(file)
                todo.append(file)
    assert sorted(p.name for p in DOCS.glob("*.md")) == sorted(p.name for p in reached)


def test_every_link_of_the_readme_and_the_docs_resolves():
    assert _broken([README, *sorted(DOCS.glob("*.md"))]) == []


def test_the_link_check_reports_a_missing_page_and_a_missing_heading(tmp_path):
    """Not vacuous: a link to a page that does not exist, and one to a heading the page does not have."""
    (tmp_path / "other.md").write_text("# Other\n\n## Exit codes\n")
    page = tmp_path / "page.md"
    page.write_text("[a](gone.md) [b](other.md#exit-codes) [c](other.md#resume) [d](#page) "
                    "[e](https://example.com)\n```\n[f](in-a-code-block.md)\n```\n# Page\n")
    assert _broken([page], tmp_path) == ["page.md: gone.md (no such file)",
                                         "page.md: other.md#resume (no such heading)"]
