"""docs/ describes the repository as it is: no page speaks of the sessions that wrote it, of
working copies, or of files outside the repository; every relative link resolves inside it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted((ROOT / "docs").glob("*.md"))
FORBIDDEN = [r"\bsessions?\b", r"working copy", r"\.\./shared", r"/work/", r"outside the repo"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_page_speaks_only_of_the_repository(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    for pattern in FORBIDDEN:
        assert not re.search(pattern, text, re.IGNORECASE), f"{page.name}: {pattern}"
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):  # relative markdown links
        resolved = (page.parent / target).resolve()
        assert resolved.is_relative_to(ROOT) and resolved.exists(), f"{page.name}: {target}"
