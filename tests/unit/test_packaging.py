"""Packaging: the tests read nothing outside the repository (a fresh clone has nothing beside it), and
a build of the tracked tree (wheel or editable) carries the gRPC code generated from protos/."""

from __future__ import annotations

import ast
import importlib.util
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

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
    beside = "sha" + "red"  # spelt apart, so this test's own source holds no path outside the repository
    old = f'ROOT = Path(__file__).resolve().parents[2]\nS = ROOT.parent / "{beside}" / "schemas" / "x.yaml"\n'
    assert len(escapes(old, rel)) == 2  # ROOT.parent and "shared"
    assert escapes("P = Path(__file__).resolve().parents[3] / 'x'", rel)
    assert escapes("P = Path(__file__).parent.parent.parent.parent / 'x'", rel)
    assert escapes("P = ROOT / '..' / 'x'", rel)
    assert escapes(f"P = Path('../{beside}/schemas')", rel)
    assert not escapes("P = Path(__file__).resolve().parents[2] / 'tests' / 'fixtures'", rel)
    assert not escapes("P = Path(__file__).parent.parent.parent / 'x'\nq = tmp_path.parent", rel)


# -- builds ------------------------------------------------------------------------------------

GENERATED = ("splitclip_pb2.py", "splitclip_pb2_grpc.py", "PROTO_SHA256")


@pytest.fixture
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The files a commit of the work tree would hold (tracked and new, never ignored ones)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    dst = tmp_path_factory.mktemp("tree")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():  # a tracked file deleted in the work tree is not copied
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    assert not [n for n in GENERATED if (dst / "splitclip" / "wire" / n).exists()]  # git ignores them
    return dst


def _pip(*args: str | Path) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *map(str, args)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"{' '.join(cmd)}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"


def _extra(metadata: str, extra: str) -> dict[str, Requirement]:
    reqs = (Requirement(r) for r in Parser().parsestr(metadata).get_all("Requires-Dist") or [])
    return {r.name: r for r in reqs if r.marker is not None and r.marker.evaluate({"extra": extra})}


def _floor(req: Requirement) -> Version:
    return max(Version(s.version) for s in req.specifier if s.operator in (">=", "=="))


def test_a_wheel_of_the_tree_carries_the_generated_grpc_code(tree: Path, tmp_path: Path) -> None:
    _pip("wheel", "--no-deps", "-q", "-w", tmp_path, tree)  # isolated: [build-system] requires only
    (wheel,) = tmp_path.glob("splitclip-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert {f"splitclip/wire/{n}" for n in GENERATED} <= names
        stamp = z.read("splitclip/wire/PROTO_SHA256").decode().strip()
        pb2 = z.read("splitclip/wire/splitclip_pb2.py").decode()
        grpc_py = z.read("splitclip/wire/splitclip_pb2_grpc.py").decode()
        (meta,) = (n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = z.read(meta).decode()
    assert stamp == _protogen(tree).proto_digest()
    assert "'splitclip.wire.splitclip_pb2'" in pb2 and "from . import splitclip_pb2" in grpc_py
    assert not [n for n in GENERATED if (tree / "splitclip" / "wire" / n).exists()]  # built aside

    edge, cloud = _extra(metadata, "edge"), _extra(metadata, "cloud")
    assert "grpcio-tools" not in edge and "grpcio-tools" not in cloud  # a build tool, not a runtime need
    assert "grpcio-tools" in _extra(metadata, "dev")  # `python -m splitclip.protogen`
    # the generated code refuses a grpcio / protobuf older than the tools that generated it
    grpc_gen = Version(re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", grpc_py).group(1))  # type: ignore[union-attr]
    pb_gen = re.search(r"Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),", pb2)
    assert pb_gen is not None
    for extra in (edge, cloud):
        assert _floor(extra["grpcio"]) >= grpc_gen
        assert _floor(extra["protobuf"]) >= Version(".".join(pb_gen.groups()))


def test_the_sdist_carries_the_proto_and_no_generated_code(tree: Path, tmp_path: Path) -> None:
    (tree / "splitclip" / "wire" / "splitclip_pb2.py").write_text("# stale, from an earlier build\n")
    code = f"import setuptools.build_meta as b; b.build_sdist({str(tmp_path)!r})"
    subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True, check=True, timeout=300)
    (sdist,) = tmp_path.glob("splitclip-*.tar.gz")
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    assert {"protos/splitclip.proto", "setup.py", "splitclip/protogen.py"} <= names
    assert not [n for n in names if n.startswith("splitclip/wire/") and n != "splitclip/wire/__init__.py"]


def test_an_editable_install_generates_into_the_source_tree(tree: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=120)
    _pip("--python", venv / "bin" / "python", "install", "--no-deps", "-q", "-e", tree)
    assert all((tree / "splitclip" / "wire" / n).exists() for n in GENERATED)
    _protogen(tree).ensure_current()


def _protogen(tree: Path):
    """splitclip.protogen of `tree` (it imports only the standard library)."""
    spec = importlib.util.spec_from_file_location("_tree_protogen", tree / "splitclip" / "protogen.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
