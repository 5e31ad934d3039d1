"""The import graph: every import in every module (lazy ones too), read with ast, follows the layers.

    splitclip                      shared: imports no other package of this repo
    partitioner, edge_node,        the product sides: the shared package and themselves only
    cloud_service
    demo, benchmarks               not product code: anything above, never tests
and no two packages import each other, directly or round a longer loop.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("splitclip", "partitioner", "edge_node", "cloud_service", "demo", "benchmarks")
ALLOWED: dict[str, set[str]] = {
    "splitclip": set(),
    "partitioner": {"splitclip"},
    "edge_node": {"splitclip"},
    "cloud_service": {"splitclip"},
    "demo": {"splitclip", "partitioner", "edge_node", "cloud_service", "benchmarks"},
    "benchmarks": {"splitclip", "partitioner", "edge_node", "cloud_service", "demo"},
}


def imports_of(path: Path, own: str | None = None) -> set[str]:
    """Top-level names of every module `path` imports (relative imports resolve to its own package)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    own = own or path.relative_to(ROOT).parts[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            out.add(own if node.level else (node.module or "").split(".")[0])
    return out


def package_graph() -> dict[str, dict[str, list[str]]]:
    """package -> imported package -> the modules that import it."""
    graph: dict[str, dict[str, list[str]]] = {p: {} for p in PACKAGES}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if "wire" in path.parts and path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue  # generated code
            for name in imports_of(path) & set(PACKAGES) - {pkg}:
                graph[pkg].setdefault(name, []).append(path.relative_to(ROOT).as_posix())
    return graph


def test_no_package_imports_upward_or_sideways() -> None:
    bad = [
        f"{pkg} -> {dep} ({', '.join(mods)})"
        for pkg, deps in package_graph().items()
        for dep, mods in deps.items()
        if dep not in ALLOWED[pkg]
    ]
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_no_package_imports_tests() -> None:
    bad = [
        path.relative_to(ROOT).as_posix()
        for pkg in PACKAGES
        for path in (ROOT / pkg).rglob("*.py")
        if "tests" in imports_of(path)
    ]
    assert not bad


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], dict.fromkeys(graph, 0)  # 0 new, 1 on the path, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append([*path[path.index(nxt) :], nxt])
            elif state.get(nxt) == 0:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for n in sorted(graph):
        if state[n] == 0:
            visit(n, [n])
    return found


def test_no_import_cycle_between_packages() -> None:
    graph = {pkg: set(deps) for pkg, deps in package_graph().items()}
    assert _cycles(graph) == []


@pytest.mark.parametrize(
    ("graph", "cycle"),
    [
        ({"a": {"b"}, "b": {"a"}}, True),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, True),
        ({"a": {"b"}, "b": set()}, False),
    ],
)
def test_the_cycle_finder_finds_cycles(graph: dict[str, set[str]], cycle: bool) -> None:
    assert bool(_cycles(graph)) is cycle


def test_the_import_reader_sees_lazy_imports(tmp_path: Path) -> None:
    """The old splitclip/demo.py imported edge_node inside a function: that counts."""
    src = tmp_path / "probe.py"
    src.write_text("def f():\n    from edge_node.demo import run_demo\n    import partitioner.export\n")
    assert {"edge_node", "partitioner"} <= imports_of(src, own="splitclip")
