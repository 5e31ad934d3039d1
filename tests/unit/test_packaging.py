"""Packaging: the tests read nothing outside the repository (a fresh clone has nothing beside it)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ROOT_NAMES = {"ROOT", "REPO", "REPO_ROOT", "PROJECT_ROOT"}


def _climb(node: ast.AST) -> tuple[ast.AST, int]:
    """(base, levels) of `base.parent.parent` / `base.parents[n]` chains: how far up they go."""
    levels = 0
    while True:
        if isinstance(node, ast.Attribute) and node.attr == "parent":
            levels, node = levels + 1, node.value
        elif (
            isinstance(node, ast.Subscript)
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "parents"
            and isinstance(node.slice, ast.Constant)
            and isinstance(node.slice.value, int)
        ):
            levels, node = levels + node.slice.value + 1, node.value.value
        else:
            return node, levels


def escapes(source: str, rel: Path) -> list[str]:
    """Places in the test file `rel` (relative to the repository root) that reach outside the root."""
    found = []
    for node in ast.walk(ast.parse(source)):
        where = f"{rel}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            v = node.value
            if v in ("..", "shared") or "../" in v or v.startswith(("shared/", "/work/")):
                found.append(f"{where}: path part {v!r}")
        base, levels = _climb(node)
        if not levels:
            continue
        if isinstance(base, ast.Name) and base.id in ROOT_NAMES:
            found.append(f"{where}: {base.id} + {levels} parent(s)")
        # Path(__file__).parents[len(rel.parts) - 1] is the root: one more is outside
        elif any(isinstance(n, ast.Name) and n.id == "__file__" for n in ast.walk(base)) and levels > len(
            rel.parts
        ):
            found.append(f"{where}: __file__ + {levels} parents, above the repository root")
    return found


def test_no_test_reads_outside_the_repository() -> None:
    me = Path(__file__).resolve()
    found = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        if path.resolve() != me:  # this file names the patterns it looks for
            found += escapes(path.read_text(), path.relative_to(ROOT))
    assert not found, "tests must only read files inside the repository:\n" + "\n".join(found)


def test_the_scan_catches_paths_outside_the_repository() -> None:
    rel = Path("tests/cloud/test_units.py")
    old = 'ROOT = Path(__file__).resolve().parents[2]\nS = ROOT.parent / "shared" / "schemas" / "x.yaml"\n'
    assert len(escapes(old, rel)) == 2  # ROOT.parent and "shared"
    assert escapes("P = Path(__file__).resolve().parents[3] / 'x'", rel)
    assert escapes("P = Path(__file__).parent.parent.parent.parent / 'x'", rel)
    assert escapes("P = ROOT / '..' / 'x'", rel)
    assert escapes("P = Path('../shared/schemas')", rel)
    assert not escapes("P = Path(__file__).resolve().parents[2] / 'tests' / 'fixtures'", rel)
    assert not escapes("P = Path(__file__).parent.parent.parent / 'x'\nq = tmp_path.parent", rel)
