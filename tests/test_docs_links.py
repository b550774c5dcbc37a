"""The README is a front page (at most 250 lines) and every relative link in it and in ``docs/*.md``
points at a file of the repository.

Links are markdown ``[text](target)`` and images ``![alt](target)``; ``http(s)://``/``mailto:``
targets and pure ``#anchor`` links are skipped, a ``#anchor`` suffix is stripped, and a target
resolves relative to the page that holds it. Code blocks and inline code are left out, so a
command such as ``f(x)[0](y)`` in a snippet is not read as a link."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def _pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def links(text: str) -> list[str]:
    """Relative link targets of a markdown text, without their ``#anchor``."""
    text = INLINE_CODE.sub("", FENCE.sub("", text))
    out = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # http(s), mailto, ...: not a file; a pure anchor stays on the page
        out.append(target.split("#", 1)[0])
    return out


def test_link_parser():
    text = (
        "See [a](docs/a.md#part), ![fig](figures/x.png) and [web](https://example.org/y).\n"
        "[anchor](#here) `[not](code.md)`\n```bash\nf[0](y)\n```\n[t](c.md \"title\")\n"
    )
    assert links(text) == ["docs/a.md", "figures/x.png", "c.md"]


def test_readme_is_a_front_page():
    n = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; move reference material to docs/ (at most {README_MAX_LINES})"


@pytest.mark.parametrize("page", _pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page: Path):
    broken = [t for t in links(page.read_text(encoding="utf-8")) if not (page.parent / t).exists()]
    assert not broken, f"{page.relative_to(ROOT)}: links to missing files: {broken}"
