"""docs/index.md is the way into the documentation: it links every guide (docs/*.md) and every API page."""

import re
from pathlib import Path

DOCS = Path(__file__).parents[1] / "docs"


def test_index_links_every_guide_and_api_page():
    links = set(re.findall(r"\]\(([^)#\s]+)", (DOCS / "index.md").read_text(encoding="utf-8")))
    pages = {p.relative_to(DOCS).as_posix() for p in [*DOCS.glob("*.md"), *DOCS.glob("api/*.md")]} - {"index.md"}
    assert sorted(pages - links) == [], "docs/index.md links none of these pages"
    assert sorted(p for p in links if not p.startswith("http") and not (DOCS / p).is_file()) == []  # no dead links
