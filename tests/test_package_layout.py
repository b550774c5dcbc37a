"""The package reads as the pipeline (issue 27): at most 6 modules beside the stage packages at the
top of ``espo_lightning/``, and imports between packages go one way (no package imports a package
that imports it back, directly or around a longer loop)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "espo_lightning"


def package_imports() -> dict[str, set[str]]:
    """Stage package (or top-level module) -> the other ones it imports."""
    edges: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        source = parts[0]
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                if name.startswith("espo_lightning.") and name.split(".")[1] != source:
                    edges.setdefault(source, set()).add(name.split(".")[1])
    return edges


def test_at_most_six_modules_beside_the_packages():
    modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(modules) <= 6, modules


def test_no_package_imports_one_that_imports_it_back():
    edges = package_imports()

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in edges.get(start, ()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    loops = sorted(p for p in edges if reaches(p, p, {p}))
    assert not loops, {p: sorted(edges[p]) for p in loops}
