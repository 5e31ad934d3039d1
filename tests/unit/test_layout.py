"""Files you can hold in your head: every module says what it is for, no product module is huge."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("splitclip", "partitioner", "edge_node", "cloud_service")
MAX_LINES = 420  # "about 400"


def _modules(packages: tuple[str, ...]) -> list[Path]:
    return [
        p
        for pkg in packages
        for p in sorted((ROOT / pkg).rglob("*.py"))
        if not p.name.endswith(("_pb2.py", "_pb2_grpc.py"))  # generated gRPC code
    ]


def test_every_module_opens_with_a_line_saying_what_it_is_for() -> None:
    missing = [
        p.relative_to(ROOT).as_posix()
        for p in _modules((*PRODUCT, "demo", "benchmarks"))
        if not (ast.get_docstring(ast.parse(p.read_text())) or "").strip()
    ]
    assert not missing, f"modules without a docstring: {missing}"


def test_no_product_module_is_over_about_400_lines() -> None:
    sizes = {p.relative_to(ROOT).as_posix(): len(p.read_text().splitlines()) for p in _modules(PRODUCT)}
    big = {name: n for name, n in sizes.items() if n > MAX_LINES}
    assert not big, f"over {MAX_LINES} lines: {big}"
